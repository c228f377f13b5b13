/**
 * The Linux tap device: create one (`/dev/net/tun`) or adopt a descriptor a
 * supervisor handed over (`--tap-fd`), always with a 12-byte virtio_net_hdr in
 * front of every frame.
 *
 * Facts this file relies on (Linux `drivers/net/tun.c`, `include/uapi/linux/if_tun.h`):
 * - TUNSETIFF with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR creates the interface, or
 *   attaches to an existing persistent tap of that name. IFF_TUN_EXCL makes it
 *   fail with EBUSY instead when the name exists, which tells the two apart.
 *   A tap we create is not persistent: closing the fd removes the interface.
 * - TUNSETOFFLOAD takes TUN_F_* by value and says what the *reader* (the guest's
 *   receive path) accepts. set_offload() accepts TSO4/TSO6/UFO/USO only together
 *   with TUN_F_CSUM, TSO_ECN only with TSO4 or TSO6, USO4 only with USO6, and
 *   answers EINVAL for anything left over: that is how the offloads are probed.
 * - Ioctls on the tun fd itself (TUNGETIFF, SIOCGIFHWADDR) follow the device
 *   into whatever network namespace it is moved to; name lookups do not.
 *
 * @module
 */

import * as libc from "./libc.ts";
import { MAX_FRAME_BYTES } from "../../ipc/datapath.ts";

// if_tun.h: TUNSETIFF flags (`struct ifreq.ifr_flags`).
export const IFF_TUN = 0x0001;
export const IFF_TAP = 0x0002;
export const IFF_NAPI = 0x0010;
export const IFF_NAPI_FRAGS = 0x0020;
export const IFF_NO_CARRIER = 0x0040;
export const IFF_MULTI_QUEUE = 0x0100;
export const IFF_ATTACH_QUEUE = 0x0200;
export const IFF_DETACH_QUEUE = 0x0400;
export const IFF_PERSIST = 0x0800;
export const IFF_NO_PI = 0x1000;
export const IFF_ONE_QUEUE = 0x2000;
export const IFF_VNET_HDR = 0x4000;
export const IFF_TUN_EXCL = 0x8000;

// if_tun.h: TUNSETOFFLOAD flags: what the reader of the tap fd can take.
/** The reader handles frames with a partial checksum (NETIF_F_HW_CSUM). */
export const TUN_F_CSUM = 0x01;
/** The reader handles TSO for IPv4 (NETIF_F_TSO). */
export const TUN_F_TSO4 = 0x02;
/** The reader handles TSO for IPv6 (NETIF_F_TSO6). */
export const TUN_F_TSO6 = 0x04;
/** The reader handles TSO with ECN (NETIF_F_TSO_ECN). */
export const TUN_F_TSO_ECN = 0x08;
/** The reader handles UFO (accepted but unused since Linux 4.14). */
export const TUN_F_UFO = 0x10;
/** The reader handles USO for IPv4 (only together with USO6: NETIF_F_GSO_UDP_L4). */
export const TUN_F_USO4 = 0x20;
/** The reader handles USO for IPv6. */
export const TUN_F_USO6 = 0x40;
/** The reader handles UDP tunnel GSO (Linux 6.17+). Not probed. */
export const TUN_F_UDP_TUNNEL_GSO = 0x080;
/** The reader handles UDP tunnel GSO with outer checksum (Linux 6.17+). Not probed. */
export const TUN_F_UDP_TUNNEL_GSO_CSUM = 0x100;

const TUN_F_NAMES: ReadonlyArray<[number, string]> = [
  [TUN_F_CSUM, "TUN_F_CSUM"],
  [TUN_F_TSO4, "TUN_F_TSO4"],
  [TUN_F_TSO6, "TUN_F_TSO6"],
  [TUN_F_TSO_ECN, "TUN_F_TSO_ECN"],
  [TUN_F_UFO, "TUN_F_UFO"],
  [TUN_F_USO4, "TUN_F_USO4"],
  [TUN_F_USO6, "TUN_F_USO6"],
  [TUN_F_UDP_TUNNEL_GSO, "TUN_F_UDP_TUNNEL_GSO"],
  [TUN_F_UDP_TUNNEL_GSO_CSUM, "TUN_F_UDP_TUNNEL_GSO_CSUM"],
];

/** Names of the TUN_F_* bits in `flags` ("0x200" for unknown ones). */
export function tunFlagNames(flags: number): string[] {
  const names: string[] = [];
  let rest = flags;
  for (const [bit, name] of TUN_F_NAMES) {
    if (flags & bit) names.push(name);
    rest &= ~bit;
  }
  for (let bit = 1; rest !== 0; bit <<= 1) {
    if (rest & bit) names.push(`0x${bit.toString(16)}`);
    rest &= ~bit;
  }
  return names;
}

/** tun.c MAX_TAP_QUEUES (DEFAULT_MAX_NUM_RSS_QUEUES): the most queues one tap can have. */
export const MAX_TAP_QUEUES = 256;

/** virtio 1.2 §5.1.6: struct virtio_net_hdr with num_buffers (VERSION_1): 12 bytes. */
export const VNET_HDR_LEN = 12;
/** The offloads that let the tap hand its reader frames longer than the MTU. */
const TUN_F_GSO = TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_UFO | TUN_F_USO4 | TUN_F_USO6;
const ETH_HLEN = 14;
const VLAN_HLEN = 4;

/**
 * Every ioctl this file issues (_IOW/_IOR('T', n, unsigned int) and sockios.h):
 * its number, the descriptor it goes to and why. The permission audit prints
 * this table, so a new ioctl belongs here.
 */
export const TAP_IOCTLS = {
  TUNSETIFF: { number: 0x400454can, on: "tun", purpose: "create or attach the tap" },
  TUNGETFEATURES: { number: 0x800454cfn, on: "tun", purpose: "check IFF_TAP and IFF_VNET_HDR" },
  TUNSETOFFLOAD: { number: 0x400454d0n, on: "tun", purpose: "probe offloads; apply TUNSCAP" },
  TUNGETIFF: { number: 0x800454d2n, on: "tun", purpose: "read an adopted tap's name and flags" },
  TUNGETVNETHDRSZ: { number: 0x800454d7n, on: "tun", purpose: "check the vnet header size" },
  TUNSETVNETHDRSZ: { number: 0x400454d8n, on: "tun", purpose: "set the 12-byte vnet header" },
  TUNGETDEVNETNS: { number: 0x54e3n, on: "tun", purpose: "is an adopted tap in our netns" },
  TUNSETQUEUE: {
    number: 0x400454d9n,
    on: "tun",
    purpose: "attach or detach a queue as its queue pair is enabled or disabled",
  },
  TUNSETSTEERINGEBPF: {
    number: 0x800454e0n,
    on: "tun",
    purpose: "a multi-queue tap: attach the flow-hash steering program, at set-up",
  },
  SIOCGIFFLAGS: { number: 0x8913n, on: "AF_INET socket", purpose: "read the link flags" },
  SIOCSIFFLAGS: { number: 0x8914n, on: "AF_INET socket", purpose: "bring the link up" },
  SIOCGIFHWADDR: { number: 0x8927n, on: "tun", purpose: "read the tap's MAC" },
  SIOCGIFMTU: {
    number: 0x8921n,
    on: "AF_UNIX socket",
    purpose: "read the MTU: how long the frames the poller reads can be",
  },
  SIOCGIFINDEX: {
    number: 0x8933n,
    on: "AF_UNIX socket",
    purpose: "check that the tap's name still names it (its ifindex) before asking its MTU",
  },
  SIOCSIFMTU: { number: 0x8922n, on: "AF_INET socket", purpose: "set the MTU (--mtu), at set-up" },
} as const;
const TUNSETIFF = TAP_IOCTLS.TUNSETIFF.number;
const TUNGETFEATURES = TAP_IOCTLS.TUNGETFEATURES.number;
const TUNSETOFFLOAD = TAP_IOCTLS.TUNSETOFFLOAD.number;
const TUNGETIFF = TAP_IOCTLS.TUNGETIFF.number;
const TUNGETVNETHDRSZ = TAP_IOCTLS.TUNGETVNETHDRSZ.number;
const TUNSETVNETHDRSZ = TAP_IOCTLS.TUNSETVNETHDRSZ.number;
const TUNSETQUEUE = TAP_IOCTLS.TUNSETQUEUE.number;
const TUNGETDEVNETNS = TAP_IOCTLS.TUNGETDEVNETNS.number;
const SIOCGIFFLAGS = TAP_IOCTLS.SIOCGIFFLAGS.number;
const SIOCSIFFLAGS = TAP_IOCTLS.SIOCSIFFLAGS.number;
const SIOCGIFHWADDR = TAP_IOCTLS.SIOCGIFHWADDR.number;
const SIOCGIFMTU = TAP_IOCTLS.SIOCGIFMTU.number;
const SIOCGIFINDEX = TAP_IOCTLS.SIOCGIFINDEX.number;
const SIOCSIFMTU = TAP_IOCTLS.SIOCSIFMTU.number;
/** net/if.h IFF_UP: a *link* flag (ifr_flags of SIOC[GS]IFFLAGS), not a TUNSETIFF flag. */
const LINK_IFF_UP = 0x1;

/** struct ifreq: char ifr_name[16]; union at 16 (short flags; struct sockaddr hwaddr). */
const IFREQ_SIZE = 40;
const IFR_FLAGS = 16;
const IFR_MTU = 16;
const IFR_IFINDEX = 16;
const IFR_HWADDR_DATA = 18;
const IFNAMSIZ = 16;

/**
 * The offload sets tried, each a combination set_offload() accepts on a kernel
 * that has the feature. The union of the accepted ones is what the kernel supports.
 */
const OFFLOAD_PROBES = [
  TUN_F_CSUM,
  TUN_F_CSUM | TUN_F_TSO4,
  TUN_F_CSUM | TUN_F_TSO6,
  TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN,
  TUN_F_CSUM | TUN_F_UFO,
  TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6,
];

/** A tap could not be created, adopted or configured. `cause` holds the SyscallError, if any. */
export class TapError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "TapError";
  }
}

/** Options for {@link createTap}. */
export interface CreateTapOptions {
  /** Open the fd O_NONBLOCK, so {@link Tap.read} returns 0 instead of waiting. Default false. */
  nonBlocking?: boolean;
  /** Bring the link up (SIOCSIFFLAGS IFF_UP). Default true. */
  up?: boolean;
  /**
   * Queues (one per virtio queue pair). More than 1 opens the tap with
   * IFF_MULTI_QUEUE, one descriptor per queue, and detaches every queue but
   * the first until {@link Tap.setQueueAttached}: the kernel steers flows
   * only to attached queues. Default 1 (a single-queue tap, as before).
   */
  queues?: number;
}

/** Options for {@link adoptTap}. */
export interface AdoptTapOptions {
  /** Set (true) or clear (false) O_NONBLOCK; leave it as it is when absent. */
  nonBlocking?: boolean;
}

function ifreq(name: string): Uint8Array<ArrayBuffer> {
  const req = new Uint8Array(IFREQ_SIZE);
  req.set(new TextEncoder().encode(name));
  return req;
}

function ifreqName(req: Uint8Array): string {
  const end = req.indexOf(0);
  return new TextDecoder().decode(req.subarray(0, end < 0 || end > IFNAMSIZ ? IFNAMSIZ : end));
}

/** dev_valid_name() rules, checked here for a clearer error than the kernel's EINVAL. */
function checkInterfaceName(name: string): void {
  const length = new TextEncoder().encode(name).length;
  if (length >= IFNAMSIZ) {
    throw new RangeError(
      `Interface name ${JSON.stringify(name)} is ${length} bytes; the limit is ${IFNAMSIZ - 1}`,
    );
  }
  if (name === "." || name === ".." || /[\s/:\0]/.test(name)) {
    throw new TypeError(
      `Interface name ${JSON.stringify(name)} is not valid (no "/", ":", spaces, "." or "..")`,
    );
  }
}

function formatMac(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join(":");
}

function readInt(fd: number, request: bigint, name: string): number {
  const out = new Int32Array(1);
  libc.ioctl(fd, request, new Uint8Array(out.buffer), name);
  return out[0];
}

function setVnetHdrSize(fd: number, name: string): void {
  const size = new Int32Array([VNET_HDR_LEN]);
  try {
    libc.ioctl(fd, TUNSETVNETHDRSZ, new Uint8Array(size.buffer), "TUNSETVNETHDRSZ");
    const now = readInt(fd, TUNGETVNETHDRSZ, "TUNGETVNETHDRSZ");
    if (now !== VNET_HDR_LEN) {
      throw new TapError(`tap ${name}: vnet header size is ${now} after setting ${VNET_HDR_LEN}`);
    }
  } catch (e) {
    if (e instanceof TapError) throw e;
    throw new TapError(`tap ${name}: cannot set the vnet header size to ${VNET_HDR_LEN}`, {
      cause: e,
    });
  }
}

/** Tries each probe with TUNSETOFFLOAD; EINVAL means "not supported". Leaves offloads at 0. */
function probeOffloads(fd: number, name: string): number {
  let supported = 0;
  for (const probe of OFFLOAD_PROBES) {
    if (libc.sys.ioctl_value(fd, TUNSETOFFLOAD, BigInt(probe)) === 0) {
      supported |= probe;
      continue;
    }
    const err = libc.errno();
    if (err !== libc.Errno.EINVAL) {
      throw new TapError(
        `tap ${name}: probing offloads failed`,
        { cause: new libc.SyscallError("ioctl(TUNSETOFFLOAD)", err, `fd ${fd}`) },
      );
    }
  }
  libc.ioctlValue(fd, TUNSETOFFLOAD, 0n, "TUNSETOFFLOAD");
  return supported;
}

/** The tap's MAC, asked of the tun fd itself (works wherever the device lives). */
function readMac(fd: number, name: string): Uint8Array {
  const req = ifreq(name);
  libc.ioctl(fd, SIOCGIFHWADDR, req, "SIOCGIFHWADDR");
  return req.slice(IFR_HWADDR_DATA, IFR_HWADDR_DATA + 6);
}

function setLinkUp(name: string): void {
  const sock = libc.socket(libc.AF_INET, libc.SOCK_DGRAM | libc.SOCK_CLOEXEC);
  try {
    const req = ifreq(name);
    libc.ioctl(sock, SIOCGIFFLAGS, req, "SIOCGIFFLAGS");
    const view = new DataView(req.buffer);
    view.setUint16(IFR_FLAGS, view.getUint16(IFR_FLAGS, true) | LINK_IFF_UP, true);
    libc.ioctl(sock, SIOCSIFFLAGS, req, "SIOCSIFFLAGS");
  } finally {
    libc.close(sock);
  }
}

/** Whether the device behind `fd` lives in the calling thread's network namespace. */
function inOurNetns(fd: number): boolean {
  const r = libc.sys.ioctl_value(fd, TUNGETDEVNETNS, 0n);
  if (r < 0) return false; // old kernel or no CAP_NET_ADMIN there: assume elsewhere
  try {
    const ours = libc.open("/proc/thread-self/ns/net", libc.O_RDONLY | libc.O_CLOEXEC);
    try {
      const a = libc.fstat(r);
      const b = libc.fstat(ours);
      return a.ino === b.ino && a.dev === b.dev;
    } finally {
      libc.close(ours);
    }
  } finally {
    libc.close(r);
  }
}

/** Reads a small sysfs file through libc (no --allow-read needed); undefined if absent. */
function readSysfs(path: string): string | undefined {
  let fd: number;
  try {
    fd = libc.open(path, libc.O_RDONLY | libc.O_CLOEXEC);
  } catch {
    return undefined;
  }
  try {
    const buf = new Uint8Array(64);
    return new TextDecoder().decode(buf.subarray(0, libc.read(fd, buf))).trim();
  } finally {
    libc.close(fd);
  }
}

/**
 * The tap's real IFF_* flags from /sys/class/net/<name>/tun_flags, if this
 * process's /sys shows the same device (checked by ifindex); else undefined.
 */
function sysfsTunFlags(name: string, ifindex: number): number | undefined {
  if (readSysfs(`/sys/class/net/${name}/ifindex`) !== String(ifindex)) return undefined;
  const text = readSysfs(`/sys/class/net/${name}/tun_flags`);
  return text === undefined || !/^0x[0-9a-f]+$/.test(text) ? undefined : parseInt(text, 16);
}

interface TapInit {
  /** One descriptor per queue; the first is the tap's control descriptor. */
  fds: number[];
  name: string;
  ifindex: number;
  mac: Uint8Array;
  created: boolean;
  iffFeatures: number;
  iffFlags: number;
  kernelOffloads: number;
}

/**
 * An open tap with a 12-byte virtio_net_hdr. Made by {@link createTap} or
 * {@link adoptTap}; closing it removes the interface if this process created it.
 */
export class Tap {
  #fds: number[];
  /** Which queues are attached (IFF_ATTACH_QUEUE), by index. */
  readonly #attached: boolean[];
  /** Interface name, as the kernel reported it when opened or adopted. */
  readonly name: string;
  /** Interface index in this process's network namespace at open time; 0 if it lived elsewhere. */
  readonly ifindex: number;
  /** MAC address as "xx:xx:xx:xx:xx:xx". */
  readonly mac: string;
  /** The MAC's 6 bytes (a copy each time). */
  get macBytes(): Uint8Array {
    return this.#mac.slice();
  }
  readonly #mac: Uint8Array;
  /** True if this process created the interface (it goes away on close). */
  readonly created: boolean;
  /** IFF_* flags the tun driver supports (TUNGETFEATURES). */
  readonly iffFeatures: number;
  /**
   * IFF_* flags of this tap: IFF_TAP, IFF_NO_PI, IFF_VNET_HDR, ... From sysfs
   * when visible, else from TUNGETIFF, where 0x1000 may mean IFF_NOFILTER instead.
   */
  readonly iffFlags: number;
  /** TUN_F_* offloads this kernel accepts, probed with TUNSETOFFLOAD. */
  readonly kernelOffloads: number;
  #offloads = 0;

  /** @internal Use createTap() or adoptTap(). */
  constructor(init: TapInit) {
    this.#fds = [...init.fds];
    this.#attached = init.fds.map((_, i) => i === 0 || init.fds.length === 1);
    this.name = init.name;
    this.ifindex = init.ifindex;
    this.#mac = init.mac;
    this.mac = formatMac(init.mac);
    this.created = init.created;
    this.iffFeatures = init.iffFeatures;
    this.iffFlags = init.iffFlags;
    this.kernelOffloads = init.kernelOffloads;
  }

  /** The first queue's tun descriptor, which also sets the offloads (-1 once closed). */
  get fd(): number {
    return this.#fds[0] ?? -1;
  }

  /** Queues (1 for a single-queue tap). */
  get queues(): number {
    return this.#fds.length;
  }

  /** Queue `i`'s descriptor (-1 once closed). */
  queueFd(i: number): number {
    if (!Number.isInteger(i) || i < 0 || i >= this.#fds.length) {
      throw new RangeError(`tap ${this.name} has no queue ${i} (it has ${this.#fds.length})`);
    }
    return this.#fds[i];
  }

  /** Whether queue `i` is attached (frames are steered to it). */
  queueAttached(i: number): boolean {
    this.queueFd(i);
    return this.#attached[i];
  }

  /**
   * Attaches or detaches queue `i` (TUNSETQUEUE): the kernel steers flows
   * only to attached queues, so a queue pair the driver disabled must not
   * keep one. Queue 0 stays attached (a tap with no queue drops every
   * frame). No capability needed: the descriptor already belongs to the tap.
   */
  setQueueAttached(i: number, on: boolean): void {
    const fd = this.queueFd(i);
    if (fd < 0) throw new TapError(`tap ${this.name} is closed`);
    if (i === 0 || this.#attached[i] === on) return;
    const req = ifreq("");
    new DataView(req.buffer).setUint16(IFR_FLAGS, on ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE, true);
    try {
      libc.ioctl(fd, TUNSETQUEUE, req, "TUNSETQUEUE");
    } catch (e) {
      throw new TapError(
        `tap ${this.name}: cannot ${on ? "attach" : "detach"} queue ${i}: ${(e as Error).message}`,
        { cause: e },
      );
    }
    this.#attached[i] = on;
  }

  /** TUN_F_* offloads in force (0 after open: the tap starts with none). */
  get offloads(): number {
    return this.#offloads;
  }

  #open(): number {
    const fd = this.fd;
    if (fd < 0) throw new TapError(`tap ${this.name} is closed`);
    return fd;
  }

  /**
   * Sets the TUN_F_* offloads the reader accepts (TUNSETOFFLOAD). Flags the
   * kernel does not support are a RangeError; nothing changes then.
   */
  setOffload(tunFlags: number): void {
    const fd = this.#open();
    const unsupported = tunFlags & ~this.kernelOffloads;
    if (unsupported !== 0) {
      throw new RangeError(
        `tap ${this.name}: the kernel does not support ${tunFlagNames(unsupported).join(", ")}`,
      );
    }
    try {
      libc.ioctlValue(fd, TUNSETOFFLOAD, BigInt(tunFlags), "TUNSETOFFLOAD");
    } catch (e) {
      throw new TapError(
        `tap ${this.name}: TUNSETOFFLOAD refused ${tunFlagNames(tunFlags).join("|") || "0"}`,
        { cause: e },
      );
    }
    this.#offloads = tunFlags;
  }

  /**
   * The tap's MTU, asked by name (SIOCGIFMTU on a socket), and only while
   * that name still means this tap in this namespace (its ifindex); null
   * when the tap lives elsewhere, was renamed or is gone.
   */
  mtu(): number | null {
    this.#open();
    if (this.ifindex === 0) return null;
    try {
      // Interface ioctls work on any socket; an AF_UNIX stream socket is the
      // one kind the seccomp filter lets the daemon create after set-up
      // (glibc's if_nametoindex would try netlink and datagram sockets).
      const sock = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
      try {
        const index = ifreq(this.name);
        libc.ioctl(sock, SIOCGIFINDEX, index, "SIOCGIFINDEX");
        if (new DataView(index.buffer).getInt32(IFR_IFINDEX, true) !== this.ifindex) return null;
        const req = ifreq(this.name);
        libc.ioctl(sock, SIOCGIFMTU, req, "SIOCGIFMTU");
        return new DataView(req.buffer).getInt32(IFR_MTU, true);
      } finally {
        libc.close(sock);
      }
    } catch {
      return null;
    }
  }

  /**
   * Sets the tap's MTU (SIOCSIFMTU by name, on a socket; needs CAP_NET_ADMIN
   * over the tap's network namespace, so only at set-up). Throws TapError
   * saying why not: the tap lives in another namespace or was renamed, the
   * kernel refused the value, or permission was denied.
   */
  setMtu(mtu: number): void {
    this.#open();
    let here = false;
    try {
      here = this.ifindex !== 0 && libc.ifNametoindex(this.name) === this.ifindex;
    } catch {
      // ENODEV: no such name here (moved to another namespace, or renamed)
    }
    if (!here) {
      throw new TapError(
        `cannot set tap ${this.name}'s MTU to ${mtu}: it is not in this network namespace ` +
          `under that name; set it where it lives (ip link set ${this.name} mtu ${mtu})`,
      );
    }
    const sock = libc.socket(libc.AF_INET, libc.SOCK_DGRAM | libc.SOCK_CLOEXEC);
    try {
      const req = ifreq(this.name);
      new DataView(req.buffer).setInt32(IFR_MTU, mtu, true);
      libc.ioctl(sock, SIOCSIFMTU, req, "SIOCSIFMTU");
    } catch (e) {
      const code = e instanceof libc.SyscallError ? e.code : String(e);
      throw new TapError(
        `cannot set tap ${this.name}'s MTU to ${mtu} (SIOCSIFMTU: ${code}${
          code === "EPERM" ? ", needs CAP_NET_ADMIN" : ""
        })`,
        { cause: e },
      );
    } finally {
      libc.close(sock);
    }
  }

  /**
   * The longest frame one read of this tap can return now, its 12-byte vnet
   * header included: with a GSO offload on (TSO4/6, UFO, USO4/6) a 64 KiB
   * GSO frame; else the MTU plus an Ethernet header and two VLAN tags. The
   * largest when the MTU cannot be read. Frames longer than the MTU can
   * still be queued by a misconfigured sender; the poller drops the first
   * one and assumes the largest from then on.
   */
  readRoom(): number {
    const largest = MAX_FRAME_BYTES + VNET_HDR_LEN;
    if ((this.#offloads & TUN_F_GSO) !== 0) return largest;
    const mtu = this.mtu();
    if (mtu === null || mtu < 68) return largest;
    return Math.min(largest, VNET_HDR_LEN + ETH_HLEN + 2 * VLAN_HLEN + mtu);
  }

  /**
   * Sends one frame into the host stack: 12-byte virtio_net_hdr, then the
   * Ethernet frame. Returns the bytes written, or `-errno` when the kernel
   * refused this frame (EINVAL: a bad header or a runt frame), so a caller can
   * drop and count it without an exception per packet.
   */
  write(frame: Uint8Array): number {
    const fd = this.#open();
    const n = libc.sys.write(fd, frame, BigInt(frame.byteLength));
    return n < 0n ? -libc.errno() : Number(n);
  }

  /**
   * Receives one frame (12-byte virtio_net_hdr first) into `buf`. Returns its
   * length, or 0 when none is waiting on a non-blocking fd. A frame longer than
   * `buf` is truncated: give it 12 + 65550 bytes when GSO offloads are on.
   * Any other error means the tap is broken and throws a SyscallError.
   */
  read(buf: Uint8Array): number {
    const fd = this.#open();
    const n = libc.sys.read(fd, buf, BigInt(buf.byteLength));
    if (n >= 0n) return Number(n);
    const err = libc.errno();
    if (err === libc.Errno.EAGAIN) return 0;
    throw new libc.SyscallError("read", err, `tap ${this.name}`);
  }

  /** Sets or clears O_NONBLOCK on the tap fd. */
  setNonBlocking(on: boolean): void {
    libc.setNonBlocking(this.#open(), on);
  }

  /** Closes every queue's fd (idempotent). A tap this process created disappears. */
  close(): void {
    const fds = this.#fds;
    this.#fds = fds.map(() => -1);
    for (const fd of fds) if (fd >= 0) libc.closeQuietly(fd);
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

function explainSetIffError(e: unknown, name: string): TapError {
  if (!(e instanceof libc.SyscallError)) return new TapError(`tap ${name}: ${e}`, { cause: e });
  const why: Record<string, string> = {
    EBUSY: `tap ${name} exists and is already attached to another process`,
    EINVAL: `interface ${name} exists and is not a tap with these flags (or the name is invalid)`,
    EPERM: `not permitted to create or attach tap ${name} (needs CAP_NET_ADMIN, or to own it)`,
    ENOENT: "/dev/net/tun is missing (is the tun module loaded?)",
  };
  return new TapError(`${why[e.code] ?? `cannot open tap ${name}`} (TUNSETIFF: ${e.code})`, {
    cause: e,
  });
}

/**
 * Creates tap `name` (or attaches to an existing persistent tap of that name,
 * with `created: false`), with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR and a 12-byte
 * vnet header, probes the offloads the kernel accepts, sets them to none,
 * brings the link up and reads its MAC. An empty name lets the kernel pick one.
 */
export function createTap(name: string, options: CreateTapOptions = {}): Tap {
  if (name !== "") checkInterfaceName(name);
  const queues = options.queues ?? 1;
  if (!Number.isInteger(queues) || queues < 1 || queues > MAX_TAP_QUEUES) {
    throw new RangeError(`tap queues must be 1 to ${MAX_TAP_QUEUES}, not ${queues}`);
  }
  let flags = libc.O_RDWR | libc.O_CLOEXEC;
  if (options.nonBlocking) flags |= libc.O_NONBLOCK;
  let fd: number;
  try {
    fd = libc.open("/dev/net/tun", flags);
  } catch (e) {
    throw new TapError(`cannot open /dev/net/tun: ${(e as Error).message}`, { cause: e });
  }
  try {
    const features = readInt(fd, TUNGETFEATURES, "TUNGETFEATURES") >>> 0;
    if (!(features & IFF_VNET_HDR) || !(features & IFF_TAP)) {
      throw new TapError(
        `this kernel's tun driver lacks IFF_TAP or IFF_VNET_HDR (features 0x${
          features.toString(16)
        })`,
      );
    }
    const wanted = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (queues > 1 ? IFF_MULTI_QUEUE : 0);
    if (queues > 1 && !(features & IFF_MULTI_QUEUE)) {
      throw new TapError("this kernel's tun driver lacks IFF_MULTI_QUEUE: use one queue pair");
    }
    const req = ifreq(name);
    const view = new DataView(req.buffer);
    view.setUint16(IFR_FLAGS, wanted | IFF_TUN_EXCL, true);
    let created = true;
    if (libc.sys.ioctl(fd, TUNSETIFF, req) !== 0) {
      const err = libc.errno();
      if (err !== libc.Errno.EBUSY || name === "") {
        throw explainSetIffError(new libc.SyscallError("ioctl(TUNSETIFF)", err), name);
      }
      // The name exists: attach to it if it is a persistent tap nobody holds.
      created = false;
      view.setUint16(IFR_FLAGS, wanted, true);
      try {
        libc.ioctl(fd, TUNSETIFF, req, "TUNSETIFF");
      } catch (e) {
        throw explainSetIffError(e, name);
      }
    }
    const actual = ifreqName(req);
    setVnetHdrSize(fd, actual);
    const kernelOffloads = probeOffloads(fd, actual);
    const fds = [fd];
    try {
      // Each further queue: its own descriptor, attached to the same interface,
      // then detached until its queue pair is enabled.
      for (let i = 1; i < queues; i++) {
        const q = libc.open("/dev/net/tun", flags);
        fds.push(q);
        const qreq = ifreq(actual);
        new DataView(qreq.buffer).setUint16(IFR_FLAGS, wanted, true);
        try {
          libc.ioctl(q, TUNSETIFF, qreq, "TUNSETIFF");
        } catch (e) {
          throw explainSetIffError(e, actual);
        }
        const detach = ifreq("");
        new DataView(detach.buffer).setUint16(IFR_FLAGS, IFF_DETACH_QUEUE, true);
        libc.ioctl(q, TUNSETQUEUE, detach, "TUNSETQUEUE");
      }
    } catch (e) {
      for (const q of fds.slice(1)) libc.closeQuietly(q);
      throw e;
    }
    if (options.up ?? true) setLinkUp(actual);
    const iffReq = ifreq("");
    libc.ioctl(fd, TUNGETIFF, iffReq, "TUNGETIFF");
    const ifindex = libc.ifNametoindex(actual);
    return new Tap({
      fds,
      name: actual,
      ifindex,
      mac: readMac(fd, actual),
      created,
      iffFeatures: features,
      iffFlags: sysfsTunFlags(actual, ifindex) ??
        new DataView(iffReq.buffer).getUint16(IFR_FLAGS, true),
      kernelOffloads,
    });
  } catch (e) {
    libc.close(fd);
    if (e instanceof TapError || e instanceof RangeError || e instanceof TypeError) throw e;
    throw new TapError(`cannot set up tap ${name}: ${(e as Error).message}`, { cause: e });
  }
}

/**
 * Takes over a tap descriptor opened by someone else (a supervisor passing
 * `--tap-fd`). It must be a tap with IFF_VNET_HDR and IFF_NO_PI (IFF_NO_PI can
 * only be verified when the tap lives in this network namespace); the vnet header
 * size is set to 12 and the offloads to none. The link state is left alone.
 * On failure the descriptor stays open and belongs to the caller. Several
 * descriptors are the queues of one multi-queue tap (IFF_MULTI_QUEUE), in
 * queue-pair order.
 */
export function adoptTap(fdOrFds: number | readonly number[], options: AdoptTapOptions = {}): Tap {
  const all = typeof fdOrFds === "number" ? [fdOrFds] : [...fdOrFds];
  if (all.length === 0) throw new RangeError("adoptTap: no descriptor");
  const [fd, ...more] = all;
  const tap = adoptOne(fd, options);
  if (more.length === 0) return tap;
  // A multi-queue tap: one descriptor per queue, all of the same interface.
  for (const q of more) {
    const req = ifreq("");
    if (!Number.isInteger(q) || q < 0 || libc.sys.ioctl(q, TUNGETIFF, req) !== 0) {
      throw new TapError(`fd ${q} is not a tun/tap descriptor`);
    }
    const flags = new DataView(req.buffer).getUint16(IFR_FLAGS, true);
    if (ifreqName(req) !== tap.name || !(flags & IFF_MULTI_QUEUE)) {
      throw new TapError(
        `fd ${q} is not another queue of tap ${tap.name} (it is ${ifreqName(req)}` +
          `${flags & IFF_MULTI_QUEUE ? "" : ", without IFF_MULTI_QUEUE"})`,
      );
    }
  }
  const fds = [fd, ...more];
  for (const q of more) {
    if (options.nonBlocking !== undefined) libc.setNonBlocking(q, options.nonBlocking);
    libc.fcntl(q, libc.F_SETFD, libc.fcntl(q, libc.F_GETFD) | libc.FD_CLOEXEC);
  }
  const multi = new Tap({
    fds,
    name: tap.name,
    ifindex: tap.ifindex,
    mac: tap.macBytes,
    created: false,
    iffFeatures: tap.iffFeatures,
    iffFlags: tap.iffFlags,
    kernelOffloads: tap.kernelOffloads,
  });
  // Detached until their queue pairs are enabled (a queue may come attached or not).
  for (let i = 1; i < fds.length; i++) {
    const detach = ifreq("");
    new DataView(detach.buffer).setUint16(IFR_FLAGS, IFF_DETACH_QUEUE, true);
    libc.sys.ioctl(fds[i], TUNSETQUEUE, detach); // EINVAL: already detached
  }
  return multi;
}

function adoptOne(fd: number, options: AdoptTapOptions): Tap {
  if (!Number.isInteger(fd) || fd < 0) throw new RangeError(`fd ${fd} is not a descriptor number`);
  try {
    libc.fstat(fd);
  } catch (e) {
    throw new TapError(`fd ${fd} is not an open descriptor (${(e as libc.SyscallError).code})`, {
      cause: e,
    });
  }
  const req = ifreq("");
  if (libc.sys.ioctl(fd, TUNGETIFF, req) !== 0) {
    const err = new libc.SyscallError("ioctl(TUNGETIFF)", libc.errno(), `fd ${fd}`);
    const what = err.errno === libc.Errno.EBADFD
      ? `fd ${fd} is a /dev/net/tun descriptor not attached to any interface`
      : `fd ${fd} is not a tun/tap device`;
    throw new TapError(`${what} (TUNGETIFF: ${err.code})`, { cause: err });
  }
  const name = ifreqName(req);
  const iffFlags = new DataView(req.buffer).getUint16(IFR_FLAGS, true);
  if (!(iffFlags & IFF_TAP)) {
    throw new TapError(`fd ${fd} is tun device ${name}, not a tap; vionet needs IFF_TAP`);
  }
  if (!(iffFlags & IFF_VNET_HDR)) {
    throw new TapError(
      `tap ${name} was opened without IFF_VNET_HDR; vionet needs the virtio-net header`,
    );
  }
  // TUNGETIFF reports 0x1000 both for IFF_NO_PI and for IFF_NOFILTER (no socket
  // filter attached), so IFF_NO_PI is checked in sysfs where the tap is visible.
  const ifindex = inOurNetns(fd) ? libc.ifNametoindex(name) : 0;
  const sysfsFlags = ifindex ? sysfsTunFlags(name, ifindex) : undefined;
  if (sysfsFlags !== undefined && !(sysfsFlags & IFF_NO_PI)) {
    throw new TapError(
      `tap ${name} was opened without IFF_NO_PI; vionet needs frames without the packet-info prefix`,
    );
  }
  if (options.nonBlocking !== undefined) libc.setNonBlocking(fd, options.nonBlocking);
  libc.fcntl(fd, libc.F_SETFD, libc.fcntl(fd, libc.F_GETFD) | libc.FD_CLOEXEC);
  setVnetHdrSize(fd, name);
  return new Tap({
    fds: [fd],
    name,
    ifindex,
    mac: readMac(fd, name),
    created: false,
    iffFeatures: readInt(fd, TUNGETFEATURES, "TUNGETFEATURES") >>> 0,
    iffFlags: sysfsFlags ?? iffFlags,
    kernelOffloads: probeOffloads(fd, name),
  });
}
