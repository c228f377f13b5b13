/**
 * A vhost-user session in one process, with every part of the daemon real
 * except the VMM: this test module plays QEMU (vhost-user requests with
 * descriptors, handed to the real backend) and the guest's driver (split
 * rings in a memfd the test maps too, `tests/device/driver.ts`), in front
 * of the real device worker, the real I/O workers and a real tap in a
 * private network namespace (198.18.0.1 on the tap, the guest 198.18.0.2).
 *
 * Used by the live-migration tests (the dirty log, quiescing, RARP, how
 * fast the queues start). Cleanup is complete even after a failure:
 * `close()` ends the backend (device reset, memory back), terminates the
 * device worker, unmaps the test's mapping and closes every descriptor.
 *
 * @module
 */

import * as libc from "../../../parent/host/libc.ts";
import { createTap, type Tap } from "../../../parent/host/tap.ts";
import { allowedTapOffloads, tunscapHandler } from "../../../parent/control/daemon.ts";
import { DeviceHost } from "../../../parent/control/device_host.ts";
import { VionetDevicePort } from "../../../parent/control/device_port.ts";
import {
  type HandleResult,
  VhostUserBackend,
  VIONET_PROTOCOL_FEATURES,
} from "../../../parent/control/vhost_user_backend.ts";
import { LIBC_BACKEND_SYSTEM } from "../../../parent/control/vhost_user_socket.ts";
import {
  decodeHeader,
  encodeVringState,
  VHOST_F_LOG_ALL,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_LOG_BASE,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
  VHOST_VRING_F_LOG,
} from "../../../parent/control/vhost_user_messages.ts";
import {
  encodeMemTable,
  encodeRequest,
  encodeVringAddr,
  encodeVringFd,
} from "./vhost_user_encode.ts";
import { encodeU64 } from "../../../parent/control/vhost_user_messages.ts";
import { RX_QUEUE, TX_QUEUE } from "../../../ipc/datapath.ts";
import { VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF } from "../../../ipc/features.ts";
import { TestDriver, TestGuest } from "../../device/driver.ts";
import { buildFrame } from "../../device/frames.ts";
import { exec, type Netns } from "../../net_ns.ts";
import { quietLogger, testConfig } from "../../helpers.ts";

/** The guest's MAC and addresses, and the tap's. */
export const GUEST_MAC = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
export const GUEST_IP = "198.18.0.2";
export const HOST_IP = "198.18.0.1";
/** Where guest memory starts (GPA) and how big it is unless told otherwise. */
export const GUEST_GPA = 0;
export const GUEST_BYTES = 4 << 20;
/** The user address QEMU would give GPA 0 (TestGuest's default mapping). */
const USER_BASE = 0x7f00_0000_0000;
/** The 12-byte virtio-net header the driver puts before each frame. */
const HDR = 12;
/** Bytes of each RX buffer the driver posts. */
export const RX_BUFFER_BYTES = 2048;

/** Features the rig negotiates unless told otherwise. */
export const RIG_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF;

export interface FrontendRigOptions {
  /** Virtio features acked (VHOST_USER_F_PROTOCOL_FEATURES is added). */
  features?: bigint;
  /** Queue pairs (default 1): a multi-queue tap, a device worker per pair. */
  pairs?: number;
  queueSize?: number;
  /** The daemon's `--offload` (default auto). */
  offload?: "auto" | "off";
  /** The daemon's `--mac`, as the port gets it (default: none). */
  sourceMac?: number[];
  /**
   * Guest memory in bytes (default {@link GUEST_BYTES}): one memfd, mapped
   * once; pages cost nothing until written.
   */
  guestBytes?: number;
}

/** One queue pair's driver side: its two rings, and their kick and call eventfds. */
export interface RigPair {
  rx: TestDriver;
  tx: TestDriver;
  kick: [number, number];
  call: [number, number];
}

/** One vhost-user session against the real daemon parts (see the module comment). */
export class FrontendRig {
  readonly logger = quietLogger();
  readonly guest: TestGuest;
  /** Every queue pair's rings and eventfds; `rx`, `tx`, `kick`, `call` are pair 0's. */
  readonly pairs: RigPair[];
  readonly rx: TestDriver;
  readonly tx: TestDriver;
  /** Kick and call eventfds, by queue. */
  readonly kick: [number, number];
  readonly call: [number, number];
  readonly features: bigint;
  backend!: VhostUserBackend;
  port!: VionetDevicePort;
  device!: DeviceHost;
  /** The test's own descriptors (closed on close()). */
  readonly #fds: number[] = [];
  readonly #memFd: number;
  readonly #memPtr: Deno.PointerObject;
  /** Guest memory's size in bytes. */
  readonly guestBytes: number;

  private constructor(
    readonly ns: Netns,
    readonly tap: Tap,
    opts: FrontendRigOptions,
  ) {
    this.features = opts.features ?? RIG_FEATURES;
    this.guestBytes = opts.guestBytes ?? GUEST_BYTES;
    this.#memFd = libc.memfdCreate("vionet-frontend-rig", libc.MFD_CLOEXEC);
    libc.ftruncate(this.#memFd, this.guestBytes);
    this.#memPtr = libc.mmap(
      this.guestBytes,
      libc.PROT_READ | libc.PROT_WRITE,
      libc.MAP_SHARED,
      this.#memFd,
    );
    const buffer = Deno.UnsafePointerView.getArrayBuffer(this.#memPtr, this.guestBytes);
    this.guest = new TestGuest([{ gpa: GUEST_GPA, size: this.guestBytes, buffer }]);
    const size = opts.queueSize ?? 256;
    const ev = () => this.#own(libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC));
    this.pairs = Array.from({ length: opts.pairs ?? 1 }, () => ({
      rx: new TestDriver(this.guest, { size, features: this.features }),
      tx: new TestDriver(this.guest, { size, features: this.features }),
      kick: [ev(), ev()] as [number, number],
      call: [ev(), ev()] as [number, number],
    }));
    ({ rx: this.rx, tx: this.tx, kick: this.kick, call: this.call } = this.pairs[0]);
  }

  #own(fd: number): number {
    this.#fds.push(fd);
    return fd;
  }

  /**
   * A tap in `ns` (198.18.0.1/24, the guest's address a static neighbour),
   * a device worker and a backend on it; nothing negotiated yet.
   */
  static async open(ns: Netns, opts: FrontendRigOptions = {}): Promise<FrontendRig> {
    const name = `vr${crypto.randomUUID().replaceAll("-", "").slice(0, 8)}`;
    const pairs = opts.pairs ?? 1;
    const tap = createTap(name, { up: false, queues: pairs });
    let rig: FrontendRig | null = null;
    try {
      await exec(["ip", "link", "set", "dev", name, "netns", ns.name]);
      await ns.exec(["ip", "addr", "add", `${HOST_IP}/24`, "dev", name]);
      await ns.exec(["ip", "link", "set", name, "up"]);
      await ns.exec([
        "ip",
        "neigh",
        "replace",
        GUEST_IP,
        "lladdr",
        GUEST_MAC.map((b) => b.toString(16).padStart(2, "0")).join(":"),
        "dev",
        name,
      ]);
      rig = new FrontendRig(ns, tap, opts);
      const offload = opts.offload ?? "auto";
      const logger = rig.logger;
      const startDevice = (pair: number) =>
        DeviceHost.start({
          config: testConfig({ mac: GUEST_MAC, offloadMode: offload }),
          handlers: { tunscap: tunscapHandler(tap, allowedTapOffloads(offload), logger) },
          logger,
          label: pair === 0 ? "device" : `device ${pair}`,
          timeoutMs: 30_000,
        });
      rig.device = await startDevice(0);
      rig.port = new VionetDevicePort({
        device: rig.device,
        tapFd: tap.fd,
        logger,
        queuePairs: pairs,
        tapQueueFd: (p) => tap.queueFd(p),
        setTapQueueAttached: (p, on) => tap.setQueueAttached(p, on),
        startDevice,
        sourceMac: opts.sourceMac ?? null,
      });
      rig.backend = new VhostUserBackend(rig.port, LIBC_BACKEND_SYSTEM, {
        logger,
        queuePairs: pairs,
      });
      return rig;
    } catch (e) {
      if (rig) await rig.close();
      else tap.close();
      throw e;
    }
  }

  /** Sends one request to the backend; throws with its error when it fails. */
  async send(
    request: number,
    payload = new Uint8Array(0),
    fds: number[] = [],
  ): Promise<Uint8Array | null> {
    const r = await this.sendRaw(request, payload, fds);
    if (!r.ok) throw new Error(`request ${request} failed: ${r.error.message}`);
    return r.reply;
  }

  /** Sends one request; returns the backend's result whatever it is. */
  sendRaw(request: number, payload = new Uint8Array(0), fds: number[] = []): Promise<HandleResult> {
    const msg = encodeRequest(request, payload);
    return this.backend.handleMessage(decodeHeader(msg), payload, fds);
  }

  /** The driver of ring `index` (2·pair + queue). */
  driver(index: number): TestDriver {
    const p = this.pairs[index >> 1];
    return (index & 1) === RX_QUEUE ? p.rx : p.tx;
  }

  /** The ring addresses of ring `q` as SET_VRING_ADDR carries them (`log`: VHOST_VRING_F_LOG). */
  vringAddr(q: number, log = false): Uint8Array<ArrayBuffer> {
    const d = this.driver(q);
    const c = d.config("user");
    return encodeVringAddr({
      index: q,
      flags: log ? VHOST_VRING_F_LOG : 0,
      descUser: BigInt(c.desc),
      usedUser: BigInt(c.used),
      availUser: BigInt(c.avail),
      logGuest: BigInt(d.usedGpa),
    });
  }

  /**
   * Negotiates and starts both queues the way QEMU does. With `log`, the
   * front-end logs from the start (a migration's destination side does not;
   * a source that restarts mid-migration does). Returns how long the last
   * message, the one that starts the queues, took (ms).
   */
  async start(opts: { logAll?: boolean; setUpPairs?: number } = {}): Promise<number> {
    const setUp = opts.setUpPairs ?? this.pairs.length;
    await this.send(VHOST_USER_GET_FEATURES);
    await this.send(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES));
    await this.send(VHOST_USER_SET_OWNER);
    await this.setFeatures(opts.logAll ?? false);
    await this.setMemTable();
    for (let q = 0; q < 2 * setUp; q++) {
      const d = this.driver(q);
      const p = this.pairs[q >> 1];
      await this.send(VHOST_USER_SET_VRING_NUM, encodeVringState(q, d.size));
      await this.send(VHOST_USER_SET_VRING_BASE, encodeVringState(q, d.availIdx & 0xffff));
      await this.send(VHOST_USER_SET_VRING_ADDR, this.vringAddr(q, opts.logAll ?? false));
      await this.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(q, false), [
        libc.dup(p.call[q & 1]),
      ]);
      await this.send(VHOST_USER_SET_VRING_KICK, encodeVringFd(q, false), [
        libc.dup(p.kick[q & 1]),
      ]);
    }
    for (let pair = setUp - 1; pair > 0; pair--) await this.enablePair(pair, true);
    await this.send(VHOST_USER_SET_VRING_ENABLE, encodeVringState(RX_QUEUE, 1));
    const t0 = performance.now();
    await this.send(VHOST_USER_SET_VRING_ENABLE, encodeVringState(TX_QUEUE, 1));
    return performance.now() - t0;
  }

  /** SET_VRING_ENABLE of both rings of `pair` (as QEMU does for `ethtool -L`). */
  async enablePair(pair: number, on: boolean): Promise<void> {
    await this.send(VHOST_USER_SET_VRING_ENABLE, encodeVringState(2 * pair, on ? 1 : 0));
    await this.send(VHOST_USER_SET_VRING_ENABLE, encodeVringState(2 * pair + 1, on ? 1 : 0));
  }

  /**
   * Starts the rings again after {@link stop} (a VM that resumes, a
   * migration cancelled after the switch-over began), from the bases the
   * stop reported. Returns how long the message that starts the queues took (ms).
   */
  async restart(bases: [number, number]): Promise<number> {
    for (const q of [RX_QUEUE, TX_QUEUE]) {
      await this.send(VHOST_USER_SET_VRING_BASE, encodeVringState(q, bases[q]));
      await this.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(q, false), [libc.dup(this.call[q])]);
    }
    await this.send(VHOST_USER_SET_VRING_KICK, encodeVringFd(RX_QUEUE, false), [
      libc.dup(this.kick[RX_QUEUE]),
    ]);
    const t0 = performance.now();
    await this.send(VHOST_USER_SET_VRING_KICK, encodeVringFd(TX_QUEUE, false), [
      libc.dup(this.kick[TX_QUEUE]),
    ]);
    return performance.now() - t0;
  }

  /** SET_MEM_TABLE: the guest's memory, one region (a dup of the rig's memfd goes with it). */
  async setMemTable(): Promise<void> {
    await this.send(
      VHOST_USER_SET_MEM_TABLE,
      encodeMemTable([{
        guestPhysAddr: BigInt(GUEST_GPA),
        size: BigInt(this.guestBytes),
        userAddr: BigInt(USER_BASE + GUEST_GPA),
        mmapOffset: 0n,
      }]),
      [libc.dup(this.#memFd)],
    );
  }

  /** SET_FEATURES with or without VHOST_F_LOG_ALL (how QEMU turns logging on and off). */
  setFeatures(logAll: boolean): Promise<Uint8Array | null> {
    const v = this.features | VHOST_USER_F_PROTOCOL_FEATURES | (logAll ? VHOST_F_LOG_ALL : 0n);
    return this.send(VHOST_USER_SET_FEATURES, encodeU64(v));
  }

  /** SET_LOG_BASE with a fresh memfd log of `bytes`; returns the test's view of it. */
  async setLogBase(bytes: number): Promise<Uint8Array> {
    const fd = this.#own(libc.memfdCreate("vionet-rig-log", libc.MFD_CLOEXEC));
    libc.ftruncate(fd, bytes);
    const ptr = libc.mmap(bytes, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, fd);
    this.#logMaps.push([ptr, bytes]);
    const payload = new Uint8Array(16);
    const v = new DataView(payload.buffer);
    v.setBigUint64(0, BigInt(bytes), true);
    v.setBigUint64(8, 0n, true);
    await this.send(VHOST_USER_SET_LOG_BASE, payload, [libc.dup(fd)]);
    return new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, bytes));
  }
  readonly #logMaps: Array<[Deno.PointerObject, number]> = [];

  /** GET_VRING_BASE of both rings of `pair` (QEMU stops RX, then TX); returns their bases. */
  async stop(pair = 0): Promise<[number, number]> {
    const out: number[] = [];
    for (const q of [2 * pair + RX_QUEUE, 2 * pair + TX_QUEUE]) {
      const reply = await this.send(VHOST_USER_GET_VRING_BASE, encodeVringState(q, 0));
      // The reply: a 12-byte header, then the vring state (index, num).
      out.push(new DataView(reply!.buffer, reply!.byteOffset).getUint32(12 + 4, true));
    }
    return [out[0], out[1]];
  }

  /** Posts `n` RX buffers of {@link RX_BUFFER_BYTES} on `pair` and kicks. */
  postRx(n: number, pair = 0): void {
    const rx = this.pairs[pair].rx;
    for (let i = 0; i < n; i++) rx.post([{ len: RX_BUFFER_BYTES, writable: true }]);
    this.kickQueue(RX_QUEUE, pair);
  }

  /** Posts `n` UDP frames from the guest to the tap's address on `pair` and kicks. */
  sendUdp(n: number, payloadBytes = 200, pair = 0): void {
    for (let i = 0; i < n; i++) {
      const { frame } = buildFrame({
        srcMac: GUEST_MAC,
        dstMac: Array.from(this.tap.macBytes),
        src: [198, 18, 0, 2],
        dst: [198, 18, 0, 1],
        l4: "udp",
        srcPort: 40000,
        dstPort: 9,
        payload: new Uint8Array(payloadBytes).fill(i & 0xff),
      });
      const data = new Uint8Array(HDR + frame.length);
      data.set(frame, HDR);
      this.pairs[pair].tx.post([{ data }]);
    }
    this.kickQueue(TX_QUEUE, pair);
  }

  kickQueue(q: number, pair = 0): void {
    libc.eventfdSignal(this.pairs[pair].kick[q]);
  }

  /** Waits until `ok()` holds (polling every 10 ms), or fails naming `what`. */
  async until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
    const end = Date.now() + ms;
    while (!ok()) {
      if (Date.now() > end) {
        throw new Error(`timed out waiting for ${what}\n${this.logger.lines.join("\n")}`);
      }
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /**
   * The front-end goes and a new one connects to the same daemon (a
   * migration's destination, a VMM back after the daemon restarted): the
   * old session ends as the socket layer ends it, and a fresh backend
   * serves the next. Nothing negotiated yet.
   */
  async reconnect(): Promise<void> {
    await this.backend.close();
    this.backend = new VhostUserBackend(this.port, LIBC_BACKEND_SYSTEM, {
      logger: this.logger,
      queuePairs: this.pairs.length,
    });
  }

  /** Ends the session and releases everything (also after a failure half-way). */
  async close(): Promise<void> {
    try {
      await this.backend?.close();
    } catch { /* reported by the test that failed */ }
    for (const p of this.port?.pairs() ?? []) p.device.terminate();
    this.device?.terminate();
    for (const [ptr, bytes] of this.#logMaps) libc.munmap(ptr, bytes);
    libc.munmap(this.#memPtr, this.guestBytes);
    libc.close(this.#memFd);
    for (const fd of this.#fds) libc.closeQuietly(fd);
    this.tap.close();
  }
}
