/**
 * The back-end side of one vhost-user connection: a state machine with one
 * handler per request, in front of a device that lives elsewhere.
 *
 * Theory of operation. The transport (`vhost_user_socket.ts`) reads one
 * message at a time and hands it to {@link VhostUserBackend.handleMessage},
 * which decodes it (`vhost_user_messages.ts`: header, exact size, syntax,
 * descriptor count), runs the handler from a table indexed by request, and
 * returns the reply bytes to send, if any. Nothing is handled concurrently:
 * the transport awaits each message before it reads the next.
 *
 * The virtio device is not here. Feature negotiation and the virtqueues run in
 * a zero-permission worker; this module reaches it through a {@link DevicePort}
 * (implemented over IPC by the parent). This module keeps the protocol state
 * (acked features, protocol features, per-ring started/enabled, the memory
 * table) and the privileged resources: mappings and descriptors.
 *
 * Failure policy. A message that fails any check, or that the device refuses,
 * is a broken front-end: `handleMessage` returns `ok: false` (with a failure
 * REPLY_ACK if one was asked for and the request decoded), the transport ends
 * the connection and calls {@link VhostUserBackend.close}, which releases every
 * mapping and descriptor. The daemon keeps serving. An exception from a bug on
 * our side is treated the same way, so it ends a connection, never the process.
 *
 * Descriptor ownership, all of it:
 * - Descriptors that come with a message belong to the backend while it is
 *   handled. The ones a handler hands on (below) leave its care; every other
 *   one (too many, a failed message, the fd REM_MEM_REG may carry) is closed
 *   when the message is done.
 * - Memory region fds go to {@link BackendSystem.mapRegion} with the region:
 *   the {@link MappedRegion} owns its fd and mapping; {@link BackendSystem.unmapRegion}
 *   releases both ({@link BackendSystem.retireRegion} when a worker may still
 *   touch the mapping). The device receives regions but never closes or unmaps them.
 * - Kick and call fds go to the device: from the moment `setVringKick` /
 *   `setVringCall` is called (whether it resolves or rejects) the port owns the
 *   fd and closes it when it is replaced, on `getVringBase` (kick), on `reset`.
 * - Error fds (SET_VRING_ERR) stay with the backend; it closes them when
 *   replaced, on RESET_DEVICE and on close. It writes 1 to one when the
 *   device reports that ring faulted (`DevicePort.vringErrorSink`).
 *
 * @module
 */

import type { MappedRegion } from "./guest_memory_map.ts";
import {
  decodeRequest,
  describeRegion,
  encodeReply,
  encodeU64,
  encodeVringState,
  type LogDesc,
  type MemoryRegionDesc,
  ProtocolError,
  rangesOverlap,
  replyKind,
  requestName,
  type RequestOf,
  type SupportedRequest,
  VHOST_F_LOG_ALL,
  VHOST_USER_ADD_MEM_REG,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_MAX_MEM_SLOTS,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_NET_SET_MTU,
  VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
  VHOST_USER_PROTOCOL_F_LOG_SHMFD,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_MTU,
  VHOST_USER_PROTOCOL_F_RARP,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_PROTOCOL_F_RESET_DEVICE,
  VHOST_USER_REM_MEM_REG,
  VHOST_USER_RESET_DEVICE,
  VHOST_USER_RESET_OWNER,
  VHOST_USER_SEND_RARP,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_LOG_BASE,
  VHOST_USER_SET_LOG_FD,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_ERR,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
  type VhostUserHeader,
  type VhostUserRequest,
} from "./vhost_user_messages.ts";

export type { MappedRegion } from "./guest_memory_map.ts";
import { VIRTIO_NET_F_MQ } from "../../ipc/features.ts";

/** virtio 1.2 §6: packed virtqueue layout (bit 34). Not in ipc/features.ts yet. */
export const VIRTIO_F_RING_PACKED = 1n << 34n;
/** virtio 1.2 §2.6 / §2.7.10.1: the largest queue size there is. */
export const VIRTQUEUE_MAX_SIZE = 32768;

/**
 * Protocol features vionet offers by default: REPLY_ACK (QEMU uses need_reply),
 * MQ (the spec asks every back-end to implement it), CONFIGURE_MEM_SLOTS (more
 * than 8 memory regions, memory hotplug), RESET_DEVICE, MTU (QEMU's
 * `host_mtu=` reaches the back-end as NET_SET_MTU, which it may refuse), and
 * for live migration LOG_SHMFD (the dirty log in shared memory; with it
 * vionet offers VHOST_F_LOG_ALL) and RARP (announce a guest that cannot
 * announce itself).
 */
export const VIONET_PROTOCOL_FEATURES = VHOST_USER_PROTOCOL_F_REPLY_ACK |
  VHOST_USER_PROTOCOL_F_MQ | VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS |
  VHOST_USER_PROTOCOL_F_RESET_DEVICE | VHOST_USER_PROTOCOL_F_MTU |
  VHOST_USER_PROTOCOL_F_LOG_SHMFD | VHOST_USER_PROTOCOL_F_RARP;

/** RFC 791 / Linux ETH_MIN_MTU: the smallest MTU an IPv4 host must take. */
export const MIN_NET_MTU = 68;

/**
 * A well-formed request the back-end will not carry out (a policy said no).
 * With REPLY_ACK negotiated and need_reply set the front-end hears a failure
 * (reply 1) and the connection goes on; otherwise the connection ends, the
 * only refusal the front-end would notice.
 */
export class RequestRefusedError extends Error {
  override name = "RequestRefusedError";
}

/** Protocol features this module can honour; options may offer a subset. */
const SUPPORTED_PROTOCOL_FEATURES = VIONET_PROTOCOL_FEATURES;

/** Ring address as SET_VRING_ADDR gives it, without the index. */
export interface VringAddrFields {
  flags: number;
  descUser: bigint;
  usedUser: bigint;
  availUser: bigint;
  logGuest: bigint;
}

/**
 * The device, seen from the vhost-user back-end. The parent implements it over
 * IPC to the zero-permission device worker; tests use a fake. Any rejection
 * ends the vhost-user connection (throw ProtocolError for a refusal the
 * front-end caused; any error works).
 *
 * Revocation contract: `setMemTable`, `removeMemRegion` and `reset` must not
 * resolve while the device can still touch memory it is asked to give up.
 * When one rejects, or `setMemTable` or `addMemRegion` rejects after handing
 * new regions over, the port may not know whether a worker still holds a
 * view (it did not answer and was terminated, and a terminated worker's
 * thread can run on for a while). Before the backend lets go of a region it
 * asks {@link DevicePort.forgetRegion}: unmapped only if nothing can still
 * touch it, retired (zero pages over the range, kept for good) otherwise.
 */
export interface DevicePort {
  /** The device's offered virtio feature bits (bit 30 is the backend's own). */
  getFeatures(): Promise<bigint>;
  /** The driver's acked features (without VHOST_USER_F_PROTOCOL_FEATURES); may reject. */
  setFeatures(features: bigint): Promise<void>;
  /**
   * Replaces the whole memory table (an empty list releases all). Resolves only
   * after the device released every buffer of the old table.
   */
  setMemTable(regions: MappedRegion[]): Promise<void>;
  /** Adds one region (CONFIGURE_MEM_SLOTS). */
  addMemRegion(region: MappedRegion): Promise<void>;
  /** Gives back the region at `gpa` of `size` bytes; resolves after the device released it. */
  removeMemRegion(gpa: bigint, size: bigint): Promise<void>;
  /** Queue size; checked here: 1..32768 and a power of 2 unless RING_PACKED. */
  setVringNum(index: number, num: number): Promise<void>;
  /** Ring addresses: front-end user addresses, translated through the memory table. */
  setVringAddr(index: number, addr: VringAddrFields): Promise<void>;
  /**
   * Next available-ring index to process (split: 16 bits). When the ring then
   * starts, the device compares it with `used->idx` in guest memory: after a
   * reconnect the ring state is taken from the used index (DPDK, passt), so
   * nothing is lost or sent twice.
   */
  setVringBase(index: number, base: number): Promise<void>;
  /**
   * Stops the ring and returns the next available-ring index to process. Every
   * chain in flight is completed (or un-popped) first, so the index equals the
   * used index. The device closes the ring's kick fd; it keeps the call fd.
   */
  getVringBase(index: number): Promise<number>;
  /**
   * Starts the ring (vhost-user.rst "Ring states"). `fd` null: no kick fd, poll.
   * The port owns `fd` from this call on.
   */
  setVringKick(index: number, fd: number | null): Promise<void>;
  /**
   * The interrupt eventfd (null: none). The port owns `fd` from this call on.
   * The backend made it O_NONBLOCK and signalled it once already.
   */
  setVringCall(index: number, fd: number | null): Promise<void>;
  /** A started but disabled ring discards TX and supplies no RX. */
  setVringEnable(index: number, enabled: boolean): Promise<void>;
  /**
   * Back to the initial state: rings stopped and disabled, kick and call fds
   * closed, features cleared, logging off. Memory grants and the log mapping
   * are left alone (see setMemTable, setLogBase).
   */
  reset(): Promise<void>;
  /**
   * VHOST_F_LOG_ALL was acked (on) or dropped (off): while on, and while a
   * log is set, every guest page written is marked in it (vhost-user.rst
   * "Migration"). Resolves once that holds for every later write.
   */
  setLogAll(on: boolean): Promise<void>;
  /**
   * The dirty log's new bitmap (SET_LOG_BASE), mapped by the backend.
   * Resolves once nothing writes the previous one any more; the backend
   * then lets go of it (asking {@link DevicePort.forgetRegion}).
   */
  setLogBase(log: MappedRegion): Promise<void>;
  /** Puts a RARP frame from `mac` on the host network (SEND_RARP, after a migration). */
  sendRarp(mac: Uint8Array): Promise<void>;
  /**
   * Where the device reports a ring that entered needs-reset (its index; -1
   * for both, when the fault is the I/O side's). The backend sets it while a
   * front-end is connected and signals that ring's SET_VRING_ERR eventfd, so
   * the VMM hears of it (QEMU logs "vhost vring error"). Optional.
   */
  vringErrorSink?: ((index: number) => void) | null;
  /**
   * The backend is letting go of `region`: true when a worker may still hold
   * a view of it (given and never provably given back), so unmapping it could
   * kill the process. The port forgets the region either way.
   */
  forgetRegion(region: MappedRegion): boolean;
}

/** The system calls the backend needs; the socket layer supplies the libc ones. */
export interface BackendSystem {
  /** mmap a region after checking the fd's size; takes ownership of `fd` (closed on failure). */
  mapRegion(desc: MemoryRegionDesc, fd: number): MappedRegion;
  /**
   * mmap a dirty log bitmap (SET_LOG_BASE) after checking the fd's size;
   * takes ownership of `fd`. Released like a region (unmapRegion, retireRegion).
   */
  mapLog(desc: LogDesc, fd: number): MappedRegion;
  /** munmap and close the region's fd. */
  unmapRegion(region: MappedRegion): void;
  /**
   * Release a region that a worker may still touch: zero pages over its
   * whole range (kept mapped for good, so a stale access is harmless), fd closed.
   */
  retireRegion(region: MappedRegion): void;
  /** close(2), errors ignored. */
  closeFd(fd: number): void;
  /**
   * What file `fd` names (device and inode), to tell a region sent again
   * from a new one; null when it cannot be told.
   */
  fileId(fd: number): string | null;
  /** Make the call fd O_NONBLOCK and write 1 to it; throws if it cannot be signalled. */
  signalCall(fd: number): void;
}

/** A logger shaped like `parent/control/log.ts`'s. */
export interface BackendLogger {
  log(level: "error" | "warn" | "info" | "debug", source: string, message: string): void;
}

export interface VhostUserBackendOptions {
  /** Queue pairs offered (GET_QUEUE_NUM); rings are 0 .. 2·pairs-1. Default 1. */
  queuePairs?: number;
  /** GET_MAX_MEM_SLOTS answer and ADD_MEM_REG limit. Default 32. */
  maxMemSlots?: number;
  /** Protocol features to offer, a subset of {@link VIONET_PROTOCOL_FEATURES}. */
  protocolFeatures?: bigint;
  /**
   * The largest MTU NET_SET_MTU may set (the tap's, `--mtu`), 68..65535;
   * default 65535. A larger one is refused.
   */
  maxMtu?: number;
  /** What `maxMtu` is, for the refusal's message (default "the back-end's limit"). */
  maxMtuSource?: string;
  logger?: BackendLogger;
}

/** What the transport does after a message: send `reply` if any; end the connection if not ok. */
export type HandleResult =
  | { ok: true; reply: Uint8Array | null }
  | { ok: false; error: Error; reply: Uint8Array | null };

/** How a ring's kick or call was set. */
export type NotifierState = "unset" | "fd" | "nofd";

/** The backend's view of one ring. */
export interface RingState {
  num: number | null;
  addr: VringAddrFields | null;
  base: number;
  /** Started by SET_VRING_KICK, stopped by GET_VRING_BASE. */
  started: boolean;
  /** vhost-user.rst "Ring states": tracked even while stopped. */
  enabled: boolean;
  kick: NotifierState;
  call: NotifierState;
  /** SET_VRING_ERR's descriptor, owned by the backend. */
  errFd: number | null;
}

function initialRing(): RingState {
  return {
    num: null,
    addr: null,
    base: 0,
    started: false,
    enabled: false,
    kick: "unset",
    call: "unset",
    errFd: null,
  };
}

/** Per-message context: hands a received fd on, out of the close-at-end set. */
interface MessageFds {
  take(i: number): number;
  /** Fd `i` without taking it (-1 if there is none). */
  peek(i: number): number;
}

type Handler<R extends SupportedRequest> = (
  msg: RequestOf<R>,
  fds: MessageFds,
) => Promise<Uint8Array | null>;

const SOURCE = "vhost-user";

/** One connection's back-end state machine. Create a new one per connection. */
export class VhostUserBackend {
  readonly #device: DevicePort;
  readonly #system: BackendSystem;
  readonly #logger: BackendLogger | undefined;
  readonly #queuePairs: number;
  readonly #maxMemSlots: number;
  readonly #offeredProtocol: bigint;
  readonly #maxMtu: number;
  readonly #maxMtuSource: string;
  #mtu: number | null = null;
  #offeredFeatures: bigint | null = null;
  #ackedFeatures = 0n;
  #ackedProtocol = 0n;
  /** SET_FEATURES / SET_PROTOCOL_FEATURES were received (since the last reset). */
  #featuresSet = false;
  #protocolSet = false;
  #owned = false;
  #closed = false;
  #rings: RingState[];
  #regions: MappedRegion[] = [];
  /** The dirty log's bitmap (SET_LOG_BASE), while one is set. */
  #dirtyLog: MappedRegion | null = null;
  /** Regions REM_MEM_REG removed lately: the same removal again is not an error. */
  #removed: MemoryRegionDesc[] = [];
  /** A region that is not sealed against shrinking was reported (once per connection). */
  #unsealedReported = false;
  readonly #handlers: { [R in SupportedRequest]: Handler<R> };

  constructor(device: DevicePort, system: BackendSystem, options: VhostUserBackendOptions = {}) {
    this.#device = device;
    this.#system = system;
    this.#logger = options.logger;
    this.#queuePairs = options.queuePairs ?? 1;
    // vhost-user.rst SET_VRING_KICK: the ring index has 8 bits.
    if (!Number.isInteger(this.#queuePairs) || this.#queuePairs < 1 || this.#queuePairs > 128) {
      throw new RangeError(`queuePairs is ${this.#queuePairs}, must be 1 to 128`);
    }
    this.#maxMemSlots = options.maxMemSlots ?? 32;
    if (!Number.isInteger(this.#maxMemSlots) || this.#maxMemSlots < 1) {
      throw new RangeError(`maxMemSlots is ${this.#maxMemSlots}, must be a positive integer`);
    }
    this.#maxMtu = options.maxMtu ?? 65535;
    if (!Number.isInteger(this.#maxMtu) || this.#maxMtu < MIN_NET_MTU || this.#maxMtu > 65535) {
      throw new RangeError(`maxMtu is ${this.#maxMtu}, must be ${MIN_NET_MTU} to 65535`);
    }
    this.#maxMtuSource = options.maxMtuSource ?? "the back-end's limit";
    this.#offeredProtocol = options.protocolFeatures ?? VIONET_PROTOCOL_FEATURES;
    if ((this.#offeredProtocol & ~SUPPORTED_PROTOCOL_FEATURES) !== 0n) {
      throw new RangeError(
        `protocolFeatures 0x${
          this.#offeredProtocol.toString(16)
        } include bits this backend cannot honour`,
      );
    }
    this.#rings = Array.from({ length: 2 * this.#queuePairs }, initialRing);
    if ("vringErrorSink" in device) device.vringErrorSink = this.#vringErrorSink;
    this.#handlers = {
      [VHOST_USER_GET_FEATURES]: () => this.#getFeatures(),
      [VHOST_USER_SET_FEATURES]: (m) => this.#setFeatures(m.body.value),
      [VHOST_USER_SET_OWNER]: () => {
        // QEMU sends SET_OWNER once per queue pair on the same connection: tolerate repeats.
        this.#owned = true;
        return Promise.resolve(null);
      },
      [VHOST_USER_RESET_OWNER]: () => this.#resetOwner(),
      [VHOST_USER_SET_MEM_TABLE]: (m, fds) => this.#setMemTable(m.body.regions, fds),
      [VHOST_USER_SET_LOG_BASE]: (m, fds) => this.#setLogBase(m.body, fds),
      // An eventfd to tell the front-end the log changed: optional, and not used.
      // (Not taken: closed when the message is done.)
      [VHOST_USER_SET_LOG_FD]: () => Promise.resolve(null),
      [VHOST_USER_SEND_RARP]: (m) => this.#sendRarp(m.body.mac),
      [VHOST_USER_SET_VRING_NUM]: (m) => this.#setVringNum(m.body.index, m.body.num),
      [VHOST_USER_SET_VRING_ADDR]: (m) => this.#setVringAddr(m.body),
      [VHOST_USER_SET_VRING_BASE]: (m) => this.#setVringBase(m.body.index, m.body.num),
      [VHOST_USER_GET_VRING_BASE]: (m) => this.#getVringBase(m.body.index),
      [VHOST_USER_SET_VRING_KICK]: (m, fds) => this.#setVringKick(m.body, fds),
      [VHOST_USER_SET_VRING_CALL]: (m, fds) => this.#setVringCall(m.body, fds),
      [VHOST_USER_SET_VRING_ERR]: (m, fds) => this.#setVringErr(m.body, fds),
      [VHOST_USER_GET_PROTOCOL_FEATURES]: () => Promise.resolve(encodeU64(this.#offeredProtocol)),
      [VHOST_USER_SET_PROTOCOL_FEATURES]: (m) => this.#setProtocolFeatures(m.body.value),
      [VHOST_USER_GET_QUEUE_NUM]: () => this.#getQueueNum(),
      [VHOST_USER_SET_VRING_ENABLE]: (m) => this.#setVringEnable(m.body.index, m.body.enable),
      [VHOST_USER_RESET_DEVICE]: () => this.#resetDevice(),
      [VHOST_USER_GET_MAX_MEM_SLOTS]: () => this.#getMaxMemSlots(),
      [VHOST_USER_ADD_MEM_REG]: (m, fds) => this.#addMemReg(m.body.region, fds),
      [VHOST_USER_REM_MEM_REG]: (m) => this.#remMemReg(m.body.region),
      [VHOST_USER_NET_SET_MTU]: (m) => this.#setMtu(m.body.mtu),
    };
  }

  // -------------------------------------------------------------------------
  // Introspection (tests, logs).

  /** Virtio features the front-end acked, VHOST_USER_F_PROTOCOL_FEATURES included. */
  get ackedFeatures(): bigint {
    return this.#ackedFeatures;
  }
  /** Protocol features the front-end acked. */
  get ackedProtocolFeatures(): bigint {
    return this.#ackedProtocol;
  }
  /** The MTU the front-end gave the guest (NET_SET_MTU), or null. */
  get mtu(): number | null {
    return this.#mtu;
  }
  /** SET_OWNER was received. */
  get owned(): boolean {
    return this.#owned;
  }
  /** close() was called. */
  get closed(): boolean {
    return this.#closed;
  }
  /** Number of rings (2 per queue pair). */
  get ringCount(): number {
    return this.#rings.length;
  }
  /** A copy of ring `index`'s state. */
  ring(index: number): Readonly<RingState> {
    const r = this.#rings[index];
    if (r === undefined) throw new RangeError(`No ring ${index}`);
    return { ...r };
  }
  /** The mapped memory table. */
  get regions(): readonly MappedRegion[] {
    return [...this.#regions];
  }

  // -------------------------------------------------------------------------
  // The entry point.

  /**
   * Handles one message. `fds` came with its header; the backend owns them from
   * here (see the module comment). Never throws.
   */
  async handleMessage(
    header: VhostUserHeader,
    payload: Uint8Array,
    fds: readonly number[],
  ): Promise<HandleResult> {
    const pending = new Set(fds);
    const ctx: MessageFds = {
      take: (i) => {
        const fd = fds[i];
        if (fd === undefined || !pending.delete(fd)) throw new Error(`fd ${i} already taken`);
        return fd;
      },
      peek: (i) => fds[i] ?? -1,
    };
    let msg: VhostUserRequest | null = null;
    try {
      if (this.#closed) throw new Error("Backend is closed");
      msg = decodeRequest(header, payload, fds);
      const handler = this.#handlers[msg.request] as Handler<SupportedRequest>;
      const body = await handler(msg, ctx);
      return { ok: true, reply: this.#reply(msg, body, 0n) };
    } catch (e) {
      const error = e instanceof Error ? e : new Error(String(e));
      // A refusal the front-end can hear (REPLY_ACK asked for): say no, serve on.
      if (
        error instanceof RequestRefusedError && msg !== null && msg.needReply &&
        replyKind(msg.request) === "none" &&
        (this.#ackedProtocol & VHOST_USER_PROTOCOL_F_REPLY_ACK) !== 0n
      ) {
        this.#log("error", `${requestName(msg.request)} refused: ${error.message}`);
        return { ok: true, reply: this.#reply(msg, null, 1n) };
      }
      let reply: Uint8Array | null = null;
      // vhost-user.rst REPLY_ACK: "non-zero on failure". Requests with their
      // own reply body have no way to say so; the connection just ends.
      if (msg !== null && replyKind(msg.request) === "none") reply = this.#reply(msg, null, 1n);
      return { ok: false, error, reply };
    } finally {
      for (const fd of pending) this.#system.closeFd(fd);
    }
  }

  /** The reply for `msg`: its explicit reply body, or a REPLY_ACK when asked, or none. */
  #reply(msg: VhostUserRequest, body: Uint8Array | null, ack: bigint): Uint8Array | null {
    if (replyKind(msg.request) !== "none") {
      if (body === null) throw new Error(`${requestName(msg.request)} handler returned no reply`);
      return encodeReply(msg.request, body);
    }
    // vhost-user.rst REPLY_ACK: only with the protocol feature negotiated and
    // need_reply set; otherwise the front-end is not reading.
    if (msg.needReply && (this.#ackedProtocol & VHOST_USER_PROTOCOL_F_REPLY_ACK) !== 0n) {
      return encodeReply(msg.request, encodeU64(ack));
    }
    return null;
  }

  /**
   * Releases everything this connection holds: stops and resets the device,
   * has it give back all memory, then unmaps and closes every descriptor.
   * Idempotent; never throws (errors are logged).
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    if (this.#device.vringErrorSink === this.#vringErrorSink) this.#device.vringErrorSink = null;
    try {
      await this.#device.reset();
    } catch (e) {
      this.#log("warn", `device reset on disconnect failed: ${(e as Error).message}`);
    }
    if (this.#regions.length > 0) {
      try {
        await this.#device.setMemTable([]);
      } catch (e) {
        this.#log("warn", `device memory release on disconnect failed: ${(e as Error).message}`);
      }
    }
    this.#unmapAll(this.#regions);
    this.#regions = [];
    if (this.#dirtyLog !== null) this.#unmapAll([this.#dirtyLog]);
    this.#dirtyLog = null;
    for (const ring of this.#rings) this.#closeErrFd(ring);
    this.#rings = this.#rings.map(initialRing);
  }

  // -------------------------------------------------------------------------
  // Features.

  async #offered(): Promise<bigint> {
    if (this.#offeredFeatures === null) {
      const device = await this.#device.getFeatures();
      // Bit 30 is vhost-user's own; dirty logging is the back-end's (with the
      // log in shared memory), not the device's.
      const logAll = (this.#offeredProtocol & VHOST_USER_PROTOCOL_F_LOG_SHMFD) !== 0n
        ? VHOST_F_LOG_ALL
        : 0n;
      // Multiqueue only with more than one pair to offer (GET_QUEUE_NUM).
      const mq = this.#queuePairs > 1 ? 0n : VIRTIO_NET_F_MQ;
      this.#offeredFeatures = (device & ~(VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL | mq)) |
        VHOST_USER_F_PROTOCOL_FEATURES | logAll;
    }
    return this.#offeredFeatures;
  }

  async #getFeatures(): Promise<Uint8Array> {
    return encodeU64(await this.#offered());
  }

  async #setFeatures(value: bigint): Promise<null> {
    const offered = await this.#offered();
    if ((value & ~offered) !== 0n) {
      throw new ProtocolError(
        `SET_FEATURES acks 0x${(value & ~offered).toString(16)}, which the back-end did not offer`,
      );
    }
    const own = VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL;
    // QEMU turns logging on and off with SET_FEATURES while the rings run,
    // nothing else changed: the device need not hear of that. Anything else
    // (a driver that loaded again, new features) is the device's.
    const changed = value ^ this.#ackedFeatures;
    if (!this.#featuresSet || changed !== VHOST_F_LOG_ALL) {
      await this.#device.setFeatures(value & ~own);
    }
    await this.#device.setLogAll((value & VHOST_F_LOG_ALL) !== 0n);
    this.#ackedFeatures = value;
    this.#featuresSet = true;
    // vhost-user.rst "Ring states": "upon receiving a VHOST_USER_SET_FEATURES
    // message from the front-end without VHOST_USER_F_PROTOCOL_FEATURES set,
    // the back-end must enable all rings immediately."
    if ((value & VHOST_USER_F_PROTOCOL_FEATURES) === 0n) {
      for (let i = 0; i < this.#rings.length; i++) {
        if (!this.#rings[i].enabled) {
          await this.#device.setVringEnable(i, true);
          this.#rings[i].enabled = true;
        }
      }
    }
    return null;
  }

  #setProtocolFeatures(value: bigint): Promise<null> {
    if ((value & ~this.#offeredProtocol) !== 0n) {
      throw new ProtocolError(
        `SET_PROTOCOL_FEATURES acks 0x${
          (value & ~this.#offeredProtocol).toString(16)
        }, which the back-end did not offer`,
      );
    }
    this.#ackedProtocol = value;
    this.#protocolSet = true;
    return Promise.resolve(null);
  }

  #getQueueNum(): Promise<Uint8Array> {
    // vhost-user.rst GET_QUEUE_NUM: only when VHOST_USER_PROTOCOL_F_MQ is offered.
    if ((this.#offeredProtocol & VHOST_USER_PROTOCOL_F_MQ) === 0n) {
      throw new ProtocolError("GET_QUEUE_NUM without VHOST_USER_PROTOCOL_F_MQ offered");
    }
    // QEMU's vhost-user net compares this with its queue *pairs*.
    return Promise.resolve(encodeU64(BigInt(this.#queuePairs)));
  }

  /**
   * vhost-user.rst NET_SET_MTU: the MTU QEMU gives the guest (`host_mtu=`),
   * sent before the device starts. One above `maxMtu` would let the guest
   * send frames the tap (`--mtu`) does not take: refused, and QEMU then does
   * not start the device ("MTU not supported by the backend").
   */
  #setMtu(value: bigint): Promise<null> {
    this.#requireProtocol(VHOST_USER_PROTOCOL_F_MTU, "NET_SET_MTU");
    if (value < BigInt(MIN_NET_MTU) || value > BigInt(this.#maxMtu)) {
      throw new RequestRefusedError(
        `the front-end asks for guest MTU ${value} (QEMU: host_mtu), ${
          value < BigInt(MIN_NET_MTU)
            ? `below the minimum of ${MIN_NET_MTU}`
            : `above ${this.#maxMtuSource}, ${this.#maxMtu}`
        }; give the VMM host_mtu=${this.#maxMtu} or less${
          value > BigInt(this.#maxMtu) ? `, or start vionet with --mtu ${value}` : ""
        }`,
      );
    }
    this.#mtu = Number(value);
    this.#log(
      "info",
      `guest MTU ${value} (NET_SET_MTU)${
        this.#mtu < this.#maxMtu
          ? `; the tap's is ${this.#maxMtu}: frames the host sends longer than the guest's MTU are its to drop`
          : ""
      }`,
    );
    return Promise.resolve(null);
  }

  #getMaxMemSlots(): Promise<Uint8Array> {
    this.#requireProtocol(VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS, "GET_MAX_MEM_SLOTS");
    return Promise.resolve(encodeU64(BigInt(this.#maxMemSlots)));
  }

  #requireProtocol(feature: bigint, what: string): void {
    if ((this.#ackedProtocol & feature) === 0n) {
      throw new ProtocolError(`${what} needs a protocol feature that was not negotiated`);
    }
  }

  async #resetOwner(): Promise<null> {
    // vhost-user.rst RESET_OWNER (deprecated): "back-ends either ignore this
    // message, or use it to disable all rings". vionet disables them.
    for (let i = 0; i < this.#rings.length; i++) {
      if (this.#rings[i].enabled) {
        await this.#device.setVringEnable(i, false);
        this.#rings[i].enabled = false;
      }
    }
    return null;
  }

  async #resetDevice(): Promise<null> {
    // vhost-user.rst RESET_DEVICE: "Only valid if the
    // VHOST_USER_PROTOCOL_F_RESET_DEVICE protocol feature is set by the back-end."
    if ((this.#offeredProtocol & VHOST_USER_PROTOCOL_F_RESET_DEVICE) === 0n) {
      throw new ProtocolError("RESET_DEVICE without VHOST_USER_PROTOCOL_F_RESET_DEVICE offered");
    }
    // The device closes kick and call fds; protocol state and memory stay.
    await this.#device.reset();
    for (const ring of this.#rings) this.#closeErrFd(ring);
    this.#rings = this.#rings.map(initialRing);
    this.#ackedFeatures = 0n;
    this.#featuresSet = false;
    return null;
  }

  // -------------------------------------------------------------------------
  // Memory.

  async #setMemTable(regions: MemoryRegionDesc[], fds: MessageFds): Promise<null> {
    if (regions.length > this.#maxMemSlots) {
      throw new ProtocolError(
        `SET_MEM_TABLE has ${regions.length} regions, more than ${this.#maxMemSlots} slots`,
      );
    }
    // QEMU before 9.1 sends the table once per queue pair: the same table
    // again (same regions, same files) changes nothing. Its fds are closed.
    if (
      regions.length === this.#regions.length &&
      regions.every((r, i) => this.#sameRegion(this.#regions[i], r, fds.peek(i)))
    ) {
      return null;
    }
    const mapped: MappedRegion[] = [];
    try {
      for (let i = 0; i < regions.length; i++) {
        mapped.push(this.#system.mapRegion(regions[i], fds.take(i)));
      }
      for (const r of mapped) this.#checkSealed(r);
      // Resolves only once the device gave back every buffer of the old table.
      await this.#device.setMemTable(mapped);
    } catch (e) {
      this.#unmapAll(mapped);
      throw e;
    }
    const old = this.#regions;
    this.#regions = mapped;
    this.#unmapAll(old);
    return null;
  }

  async #addMemReg(desc: MemoryRegionDesc, fds: MessageFds): Promise<null> {
    this.#requireProtocol(VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS, "ADD_MEM_REG");
    if (this.#regions.length >= this.#maxMemSlots) {
      throw new ProtocolError(`ADD_MEM_REG: all ${this.#maxMemSlots} memory slots are in use`);
    }
    // QEMU before 9.1 adds each region once per queue pair: one already
    // mapped from the same file is not added twice (its fd is closed).
    if (this.#regions.some((r) => this.#sameRegion(r, desc, fds.peek(0)))) return null;
    const clash = this.#regions.find((r) => rangesOverlap(r, desc));
    if (clash !== undefined) {
      throw new ProtocolError(
        `ADD_MEM_REG: ${describeRegion(desc)} overlaps ${describeRegion(clash)}`,
      );
    }
    const region = this.#system.mapRegion(desc, fds.take(0));
    this.#checkSealed(region);
    try {
      await this.#device.addMemRegion(region);
    } catch (e) {
      this.#unmapAll([region]);
      throw e;
    }
    this.#regions.push(region);
    return null;
  }

  async #remMemReg(desc: MemoryRegionDesc): Promise<null> {
    this.#requireProtocol(VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS, "REM_MEM_REG");
    // vhost-user.rst REM_MEM_REG: "identified by its guest address, user
    // address and size. The mmap offset is ignored."
    const i = this.#regions.findIndex((r) =>
      r.guestPhysAddr === desc.guestPhysAddr && r.size === desc.size &&
      r.userAddr === desc.userAddr
    );
    if (i < 0) {
      // QEMU before 9.1 removes each region once per queue pair: gone is gone.
      if (this.#removed.some((r) => sameDesc(r, desc))) return null;
      throw new ProtocolError(`REM_MEM_REG: no region ${describeRegion(desc)} is mapped`);
    }
    const region = this.#regions[i];
    // Resolves after the device released it; only then is it unmapped.
    await this.#device.removeMemRegion(region.guestPhysAddr, region.size);
    this.#regions.splice(i, 1);
    this.#unmapAll([region]);
    this.#removed = [...this.#removed.slice(-(this.#maxMemSlots - 1)), desc];
    return null;
  }

  /** Whether `r` (mapped) is `desc` sent again, from the same file as `fd`. */
  #sameRegion(r: MappedRegion | undefined, desc: MemoryRegionDesc, fd: number): boolean {
    if (r === undefined || !sameDesc(r, desc)) return false;
    const a = this.#system.fileId(r.fd);
    return a !== null && a === this.#system.fileId(fd);
  }

  /**
   * Warns, once per connection, about a region the front-end can still
   * shrink under us: a page past a new end SIGBUSes the whole daemon.
   */
  #checkSealed(r: MappedRegion): void {
    if (r.shrinkSealed || this.#unsealedReported) return;
    this.#unsealedReported = true;
    this.#log(
      "warn",
      `${describeRegion(r)}: the front-end's file is not sealed against shrinking ` +
        `(F_SEAL_SHRINK); truncating it while mapped would kill this daemon with SIGBUS. ` +
        `QEMU seals memfds unless memory-backend-memfd has seal=off; hugetlbfs files ` +
        `cannot be sealed (this warning is given once per connection)`,
    );
  }

  /** Lets go of regions: unmapped, or retired when a worker may still touch them. */
  #unmapAll(regions: readonly MappedRegion[]): void {
    for (const r of regions) {
      const retire = this.#device.forgetRegion(r);
      try {
        if (retire) {
          this.#system.retireRegion(r);
          this.#log(
            "warn",
            `${describeRegion(r)} was never given back by a worker that was ended; ` +
              `its range stays reserved (zero pages) instead of being unmapped`,
          );
        } else {
          this.#system.unmapRegion(r);
        }
      } catch (e) {
        const what = retire ? "retiring" : "unmapping";
        this.#log("error", `${what} ${describeRegion(r)} failed: ${(e as Error).message}`);
      }
    }
  }

  // -------------------------------------------------------------------------
  // Live migration.

  async #setLogBase(desc: LogDesc, fds: MessageFds): Promise<Uint8Array> {
    // vhost-user.rst "Migration": the log fd comes with LOG_SHMFD, the only way vionet takes one.
    this.#requireProtocol(VHOST_USER_PROTOCOL_F_LOG_SHMFD, "SET_LOG_BASE");
    const log = this.#system.mapLog(desc, fds.take(0));
    try {
      // Resolves once nothing writes the old bitmap.
      await this.#device.setLogBase(log);
    } catch (e) {
      this.#unmapAll([log]);
      throw e;
    }
    const old = this.#dirtyLog;
    this.#dirtyLog = log;
    if (old !== null) this.#unmapAll([old]);
    this.#log(
      "info",
      `dirty log: ${desc.mmapSize} bytes (guest memory up to 0x${
        (desc.mmapSize * 8n * 0x1000n).toString(16)
      })`,
    );
    // QEMU reads a reply to SET_LOG_BASE when LOG_SHMFD is negotiated (its payload unused).
    return encodeU64(0n);
  }

  async #sendRarp(mac: Uint8Array): Promise<null> {
    this.#requireProtocol(VHOST_USER_PROTOCOL_F_RARP, "SEND_RARP");
    await this.#device.sendRarp(mac);
    return null;
  }

  // -------------------------------------------------------------------------
  // Rings.

  #ringAt(index: number, what: string): RingState {
    const ring = this.#rings[index];
    if (ring === undefined) {
      throw new ProtocolError(
        `${what}: ring ${index} does not exist (this back-end has ${this.#rings.length})`,
      );
    }
    return ring;
  }

  #packed(): boolean {
    return (this.#ackedFeatures & VIRTIO_F_RING_PACKED) !== 0n;
  }

  async #setVringNum(index: number, num: number): Promise<null> {
    const ring = this.#ringAt(index, "SET_VRING_NUM");
    // virtio 1.2 §2.7: split queue sizes are powers of 2, at most 32768;
    // §2.8: packed queue sizes are at most 32768.
    const pow2 = (num & (num - 1)) === 0;
    if (num === 0 || num > VIRTQUEUE_MAX_SIZE || (!this.#packed() && !pow2)) {
      throw new ProtocolError(
        `SET_VRING_NUM: ring ${index} size ${num} is not ${
          this.#packed() ? "1..32768" : "a power of 2 in 1..32768"
        }`,
      );
    }
    await this.#device.setVringNum(index, num);
    // Stored only once accepted: DPDK kept a rejected size and crashed on it.
    ring.num = num;
    return null;
  }

  async #setVringAddr(body: { index: number } & VringAddrFields): Promise<null> {
    const ring = this.#ringAt(body.index, "SET_VRING_ADDR");
    const { index: _, ...addr } = body;
    // vhost-user.rst "Migration": VHOST_VRING_F_LOG only while VHOST_F_LOG_ALL is on.
    if (addr.flags !== 0 && (this.#ackedFeatures & VHOST_F_LOG_ALL) === 0n) {
      throw new ProtocolError(
        `SET_VRING_ADDR: ring ${body.index} asks for VHOST_VRING_F_LOG without VHOST_F_LOG_ALL`,
      );
    }
    await this.#device.setVringAddr(body.index, addr);
    ring.addr = addr;
    return null;
  }

  async #setVringBase(index: number, base: number): Promise<null> {
    const ring = this.#ringAt(index, "SET_VRING_BASE");
    // vhost-user.rst "A vring descriptor index for split virtqueues": bits
    // 16-31 are reserved (set to zero).
    if (!this.#packed() && base > 0xffff) {
      throw new ProtocolError(
        `SET_VRING_BASE: ring ${index} base 0x${base.toString(16)} sets reserved bits 16-31`,
      );
    }
    await this.#device.setVringBase(index, base);
    ring.base = base;
    return null;
  }

  async #getVringBase(index: number): Promise<Uint8Array> {
    const ring = this.#ringAt(index, "GET_VRING_BASE");
    // Stops the ring; the device completes what is in flight first.
    const base = await this.#device.getVringBase(index);
    const limit = this.#packed() ? 0xffff_ffff : 0xffff;
    if (!Number.isInteger(base) || base < 0 || base > limit) {
      throw new Error(`Device returned ring ${index} base ${base}, outside 0..${limit}`);
    }
    ring.started = false;
    ring.kick = "unset";
    ring.base = base;
    return encodeVringState(index, base);
  }

  async #setVringKick(body: { index: number; noFd: boolean }, fds: MessageFds): Promise<null> {
    const ring = this.#ringAt(body.index, "SET_VRING_KICK");
    const fd = body.noFd ? null : fds.take(0);
    // The port owns fd from here, even if it rejects.
    await this.#device.setVringKick(body.index, fd);
    ring.kick = fd === null ? "nofd" : "fd";
    // vhost-user.rst "Ring states": the back-end starts a ring on a kick. Like
    // libvhost-user and rust-vmm, vionet starts it when the kick fd is set.
    ring.started = true;
    return null;
  }

  async #setVringCall(body: { index: number; noFd: boolean }, fds: MessageFds): Promise<null> {
    const ring = this.#ringAt(body.index, "SET_VRING_CALL");
    const fd = body.noFd ? null : fds.take(0);
    if (fd !== null) {
      try {
        // Signal once, in case the guest waits for an interrupt it lost while
        // the back-end was away (passt: "I/O hang after reconnecting").
        this.#system.signalCall(fd);
      } catch (e) {
        this.#system.closeFd(fd);
        throw new ProtocolError(
          `SET_VRING_CALL: ring ${body.index} call fd cannot be signalled: ${(e as Error).message}`,
        );
      }
    }
    // The port owns fd from here, even if it rejects.
    await this.#device.setVringCall(body.index, fd);
    ring.call = fd === null ? "nofd" : "fd";
    return null;
  }

  #setVringErr(body: { index: number; noFd: boolean }, fds: MessageFds): Promise<null> {
    const ring = this.#ringAt(body.index, "SET_VRING_ERR");
    this.#closeErrFd(ring);
    ring.errFd = body.noFd ? null : fds.take(0);
    return Promise.resolve(null);
  }

  async #setVringEnable(index: number, enable: boolean): Promise<null> {
    const ring = this.#ringAt(index, "SET_VRING_ENABLE");
    // vhost-user.rst SET_VRING_ENABLE: "should be sent only when
    // VHOST_USER_F_PROTOCOL_FEATURES has been negotiated." QEMU sends it at
    // init, after SET_PROTOCOL_FEATURES but before SET_FEATURES, so a
    // front-end that negotiated protocol features counts; one that acked
    // features without bit 30 (or never spoke of protocol features) does not.
    const acked = (this.#ackedFeatures & VHOST_USER_F_PROTOCOL_FEATURES) !== 0n;
    const legacy = this.#featuresSet && !acked;
    if (legacy || (!acked && !this.#protocolSet)) {
      throw new ProtocolError(
        "SET_VRING_ENABLE before VHOST_USER_F_PROTOCOL_FEATURES was negotiated",
      );
    }
    await this.#device.setVringEnable(index, enable);
    ring.enabled = enable;
    return null;
  }

  /** Signals the err eventfd of ring `index` (-1: every ring); a ring without one is logged only. */
  readonly #vringErrorSink = (index: number): void => {
    const rings = index < 0 ? this.#rings : [this.#rings[index]].filter((r) => r !== undefined);
    for (const ring of rings) {
      if (ring.errFd === null) continue;
      try {
        this.#system.signalCall(ring.errFd);
      } catch (e) {
        this.#log("warn", `ring ${index}: err fd cannot be signalled: ${(e as Error).message}`);
      }
    }
  };

  #closeErrFd(ring: RingState): void {
    if (ring.errFd !== null) {
      this.#system.closeFd(ring.errFd);
      ring.errFd = null;
    }
  }

  #log(level: "error" | "warn" | "info" | "debug", message: string): void {
    this.#logger?.log(level, SOURCE, message);
  }
}

/** The same region description (guest address, size, user address, offset). */
function sameDesc(a: MemoryRegionDesc, b: MemoryRegionDesc): boolean {
  return a.guestPhysAddr === b.guestPhysAddr && a.size === b.size && a.userAddr === b.userAddr &&
    a.mmapOffset === b.mmapOffset;
}
