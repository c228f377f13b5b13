/**
 * The control protocol between the parent's main thread and its two
 * privileged I/O workers (`io/writer_worker.ts`, `io/poller_worker.ts`):
 * message types and their runtime validators.
 *
 * Every request from the parent carries an `id`; the worker answers each with
 * `ack` (done, and for revocations: "I no longer touch the old thing") or
 * `error` (refused, nothing changed). A message that fails validation gets an
 * `error` with the id if one could be read, and the worker keeps running.
 * Workers also post `fault` on their own when a data-path ring turned out to
 * be corrupt (they stop using that ring).
 *
 * The mailbox: a tiny SharedArrayBuffer per worker whose word
 * {@link MAILBOX.POSTED} counts the messages the parent has posted to it,
 * bumped *before* each postMessage. A worker counts the messages it has
 * served; while it is behind, it yields to its event loop before touching
 * memory or blocking in FFI again. (A worker that resumes after a macrotask
 * cannot tell whether a message arrived in the same event-loop turn and is
 * still waiting for its own microtask: measured, the poller otherwise went
 * back into its wait and answered only after ~280 ms of retries.)
 *
 * Its words {@link MAILBOX.STOP} (the stop request's id) and
 * {@link MAILBOX.STOP_MODE} are set by the parent just before it posts a
 * stop: the loop ends on its next look at them, woken as for any message,
 * and the worker acknowledges that id once its loop has ended and it has
 * let go of every descriptor the parent owns, without waiting for its
 * event loop to deliver the message (a worker's event loop took 2-12 ms to
 * get there during a stop, inside a migration's downtime); the message,
 * when it comes, is acknowledged again (the parent ignores an ack it no
 * longer waits for). With the ack the worker stores that id in
 * {@link MAILBOX.ENDED} and notifies: a parent that blocks its thread for a
 * stop (`control/pair_port.ts`) learns of it there without a turn of its
 * event loop. Only the parent and the worker share the mailbox, never the
 * device: what it says here is the worker's word, not the device's.
 *
 * After the stop's ack the worker waits, blocked, until the parent sets
 * {@link MAILBOX.RELEASE} (with the end of its thread, a while after the
 * stop is answered, or at once when a start needs its rings; at most
 * {@link RELEASE_WAIT_MAX_MS}), then takes down what it set up (its io_uring
 * mappings, the files registered on a lent ring: 1-3 ms of system calls,
 * which on a small machine took the CPU from the rest of the stop: an idle
 * stop took 4.4 ms with them at once, 2.8 without) and says `released`:
 * only then may the rings it was lent go to another data path.
 *
 * The data path itself (records, event bits) is `ipc/datapath.ts`; this file
 * is only the slow control channel beside it.
 *
 * @module
 */

import { MAX_FRAME_BYTES, NET_HDR_BYTES } from "../../ipc/datapath.ts";
import type { HostRange } from "./regions.ts";
import { RATE_LIMIT_BYTES } from "./rate_limiter.ts";
import { CAPTURE_STATE_BYTES } from "./capture_ring.ts";
import { describe, isRecord, MAX_TEXT, Reader, ValidationError } from "../../ipc/reader.ts";

/** Bumped on any incompatible change of these messages. */
export const IO_PROTOCOL_VERSION = 1;

/**
 * The most bytes one frame from the tap can take, its 12-byte net header
 * included: a 64 KiB GSO frame plus Ethernet and VLAN headers. What the
 * poller assumes until the parent says less (`rxFrameRoom`).
 */
export const RX_FRAME_ROOM_MAX = MAX_FRAME_BYTES + NET_HDR_BYTES;
/** The least `rxFrameRoom` may say: header + a minimal Ethernet frame. */
export const RX_FRAME_ROOM_MIN = NET_HDR_BYTES + 60;

/** Word indices of the mailbox (an Int32Array over {@link MAILBOX_BYTES}). */
export const MAILBOX = { POSTED: 0, STOP: 1, STOP_MODE: 2, RELEASE: 3, ENDED: 4 } as const;
/**
 * Longest a stopped worker waits for MAILBOX.RELEASE before it takes down
 * its rings anyway (ms): the parent sets it 500 ms after the stop
 * (`IO_TEARDOWN_DELAY_MS` in `control/pair_port.ts`) or sooner.
 */
export const RELEASE_WAIT_MAX_MS = 1000;
/** MAILBOX.STOP_MODE: the stop posted is `untilTxClosed` (`StopRequest`). */
export const STOP_UNTIL_TX_CLOSED = 1;
export const MAILBOX_BYTES = 64;

/** Which I/O worker a message is for. */
export type IoRole = "writer" | "poller";

/** Descriptor slots the parent may set; each worker accepts only its own. */
export type FdSlot = "tap" | "kickRx" | "kickTx" | "callRx" | "callTx";
export const FD_SLOTS: readonly FdSlot[] = ["tap", "kickRx", "kickTx", "callRx", "callTx"];
/** Slots each role accepts in `setFd`. */
export const ROLE_SLOTS: Readonly<Record<IoRole, readonly FdSlot[]>> = {
  writer: ["tap", "callTx"],
  poller: ["tap", "kickRx", "kickTx", "callRx", "callTx"],
};

/** First message: everything the worker needs to run. */
export interface InitRequest {
  kind: "init";
  id: number;
  version: number;
  role: IoRole;
  control: SharedArrayBuffer;
  tx: SharedArrayBuffer;
  rxPost: SharedArrayBuffer;
  rxLong: SharedArrayBuffer;
  rxDone: SharedArrayBuffer;
  /** This worker's mailbox (see the module comment). */
  mailbox: SharedArrayBuffer;
  /** The tap, O_NONBLOCK, shared by both workers. */
  tapFd: number;
  /** The poller's wake eventfd: the poller polls it, the writer writes it. */
  wakeFd: number;
  /** Initial region table (guest memory and the bounce arena). */
  ranges: HostRange[];
  /**
   * The engine: "auto" batches tap writes (writer) and reads (poller)
   * through io_uring when the kernel allows it and falls back to one
   * `writev`/`readv` per frame; "off" always uses those (`--io-uring off`).
   */
  ioUring: IoUringMode;
  /**
   * Rings made during set-up, restricted to reads and writes (`io_uring.ts`),
   * for this worker to adopt instead of making its own: the writer's TX
   * ring; the poller's TX ring, then its RX ring. Fewer (or none): the
   * worker makes what is missing with io_uring_setup if it may, else it
   * falls back to `writev`/`readv`. Handed back, untouched, at the stop.
   */
  rings: PreparedRing[];
  /**
   * Where TX completions go (`ipc/datapath.ts`), computed by the parent from
   * the vring addresses the VMM gave; null: none are published (tests of a
   * worker alone). Both workers write TX frames (`tx_drain.ts`).
   */
  txUsed: TxUsedPlace | null;
  /**
   * The lock and TX ring position the two workers take turns with
   * (`tx_drain.ts`: TX_SHARED), the same buffer for both and never the
   * device's; null: this worker is the only one that writes TX frames
   * (the writer) or it writes none (the poller).
   */
  txShared: SharedArrayBuffer | null;
  /**
   * The NIC's rate limits (`rate_limiter.ts`): one buffer shared by every
   * I/O worker of every pair, never the device's; null (or absent): no
   * limits, not even at run time.
   */
  rateLimit: SharedArrayBuffer | null;
  /**
   * The longest frame the tap can hand the poller now, net header included
   * ({@link RX_FRAME_ROOM_MIN}..{@link RX_FRAME_ROOM_MAX}): the tap's MTU
   * while it has no GSO offload, else the maximum. The poller reads a frame
   * into buffers this big, and batches reads when each posted chain is.
   * The writer ignores it.
   */
  rxFrameRoom: number;
  /**
   * Where the poller completes RX frames (RX publication, `ipc/datapath.ts`),
   * computed by the parent from the RX vring addresses. The poller refuses
   * an init without it; the writer ignores it.
   */
  rxUsed: RxUsedPlace | null;
  /** The dirty log, while the front-end logs (`dirty_log.ts`); null (or absent) otherwise. */
  log: LogConfig | null;
  /**
   * The queues' kick and call eventfds as `setFd` would set them, so that a
   * start takes one round trip per worker; each worker takes its own
   * slots ({@link ROLE_SLOTS}) and ignores the rest. Absent: none yet.
   */
  queueFds: QueueFds;
  /**
   * `--pcap`: this worker's capture ring and the daemon's capture state
   * (`capture_ring.ts`); null (or absent): no capture, and the data path
   * never looks.
   */
  capture: CaptureConfig | null;
}

/** What an I/O worker needs to copy the frames it moves into the capture. */
export interface CaptureConfig {
  ring: SharedArrayBuffer;
  state: SharedArrayBuffer;
}

/** Kick and call eventfds by slot (null: none). */
export interface QueueFds {
  kickRx: number | null;
  kickTx: number | null;
  callRx: number | null;
  callTx: number | null;
}

/** The queue fd slots, in the order a start sets them. */
export const QUEUE_FD_SLOTS = ["kickRx", "kickTx", "callRx", "callTx"] as const;

/**
 * A live migration's dirty log (`dirty_log.ts`): the bitmap the parent
 * mapped from the front-end's log fd, and the used rings to mark with each
 * publication.
 */
export interface LogConfig {
  /** Host address of the bitmap's first byte (the bit of guest page 0). */
  base: bigint;
  /** Bytes of bitmap: it covers `size * 8` pages. */
  size: number;
  /** The RX used ring's guest address and length (VHOST_VRING_F_LOG), or null. */
  rxUsed: UsedRingLog | null;
  /** The TX used ring's, or null. */
  txUsed: UsedRingLog | null;
}

/** Where a used ring is logged: `log_guest_addr` of SET_VRING_ADDR, and the ring's bytes. */
export interface UsedRingLog {
  gpa: number;
  bytes: number;
}

/** The RX virtqueue's words the poller writes and reads, as host addresses inside `ranges`. */
export interface RxUsedPlace {
  /** The used ring (virtio 1.2 §2.7.8): le16 flags, le16 idx, then `size` elements of 8 bytes. */
  ringAddr: bigint;
  /** Queue size: a power of 2, 1..32768. */
  size: number;
  /** avail->used_event with EVENT_IDX, else avail->flags (as {@link TxUsedPlace.eventAddr}). */
  eventAddr: bigint;
  /** VIRTIO_F_RING_EVENT_IDX was negotiated. */
  eventIdx: boolean;
}

/** The two words of the TX virtqueue the writer touches, as host addresses inside `ranges`. */
export interface TxUsedPlace {
  /** used->idx (virtio 1.2 §2.7.8: the used ring's second le16); the writer stores it. */
  idxAddr: bigint;
  /**
   * The driver's word the writer reads after storing: avail->used_event
   * (§2.7.10) with EVENT_IDX, else avail->flags (VIRTQ_AVAIL_F_NO_INTERRUPT).
   */
  eventAddr: bigint;
  /** VIRTIO_F_RING_EVENT_IDX was negotiated. */
  eventIdx: boolean;
}

/** struct io_uring_params is 120 bytes (include/uapi/linux/io_uring.h). */
export const IO_URING_PARAMS_BYTES = 120;

/**
 * A ring made during set-up for a worker to adopt (`io_uring.ts`,
 * `IoUring.prepareRestricted`): its descriptor, and the io_uring_params the
 * kernel filled in (the offsets to map it with), as octets so that it
 * crosses postMessage as it is.
 */
export interface PreparedRing {
  fd: number;
  params: number[];
}

/** `--io-uring`: whether the writer may batch tap writes through io_uring. */
export type IoUringMode = "auto" | "off";

/** Replace the region table. The ack means: no iovec into a dropped range will be used again. */
export interface SetRegionsRequest {
  kind: "setRegions";
  id: number;
  ranges: HostRange[];
}

/** Set or clear a descriptor. The ack means: the old descriptor is no longer used. */
export interface SetFdRequest {
  kind: "setFd";
  id: number;
  slot: FdSlot;
  fd: number | null;
}

/**
 * The poller only: the tap's longest frame changed (TUNSCAP, MTU); see
 * `InitRequest.rxFrameRoom`. Raise it *before* the tap can produce longer
 * frames: a frame longer than the room the poller assumed is dropped.
 */
export interface SetRxFrameRoomRequest {
  kind: "setRxFrameRoom";
  id: number;
  bytes: number;
}

/**
 * Start, change or end dirty logging. The ack means: every write from now
 * on is logged in the new bitmap, and the old one is no longer touched.
 */
export interface SetLogRequest {
  kind: "setLog";
  id: number;
  log: LogConfig | null;
}

/**
 * End the loop; the ack is the last message. `untilTxClosed` (the writer
 * only): first go on writing what the device hands over until it says it
 * has quiesced (CTL.TX_CLOSED), for at most {@link TX_CLOSE_WAIT_MS}, so a
 * stop needs no separate quiesce before it.
 */
export interface StopRequest {
  kind: "stop";
  id: number;
  untilTxClosed?: boolean;
}

/** How long a writer stopping `untilTxClosed` waits for the device (ms). */
export const TX_CLOSE_WAIT_MS = 1500;

export type IoRequest =
  | InitRequest
  | SetRegionsRequest
  | SetFdRequest
  | SetRxFrameRoomRequest
  | SetLogRequest
  | StopRequest;

export interface AckReply {
  kind: "ack";
  id: number;
}

export interface ErrorReply {
  kind: "error";
  /** The request's id, or null when the message had none that could be read. */
  id: number | null;
  message: string;
}

/** Unsolicited: a ring is corrupt (CorruptRingError); the worker stopped using it. */
export interface FaultNotice {
  kind: "fault";
  message: string;
}

/** Unsolicited: something the operator should know that needs no action (logged at info). */
export interface InfoNotice {
  kind: "notice";
  message: string;
}

/**
 * Unsolicited, after the stop's ack: the worker has let go of everything
 * it was lent (its ring mappings are gone, no file is registered on a lent
 * ring); the parent may lend those rings again.
 */
export interface ReleasedNotice {
  kind: "released";
}

export type IoReply = AckReply | ErrorReply | FaultNotice | InfoNotice | ReleasedNotice;

const MAX_RANGES = 1024;

/** Size of `txShared` (its words: TX_SHARED in `tx_drain.ts`). */
export const TX_SHARED_BYTES = 16;

/** A fresh `txShared` buffer for one data path's two I/O workers. */
export function createTxShared(): SharedArrayBuffer {
  return new SharedArrayBuffer(TX_SHARED_BYTES);
}

/** A request id: a positive safe integer, or null when the message has none. */
function readId(msg: Record<string, unknown>): number | null {
  const id = msg.id;
  return typeof id === "number" && Number.isSafeInteger(id) && id > 0 ? id : null;
}

/** Opens a message from the other side: an object with a usable id (`needId`) and a kind. */
function open(data: unknown, needId: boolean): { r: Reader; kind: unknown; id: number | null } {
  if (!isRecord(data)) {
    throw new ValidationError(
      "malformed",
      undefined,
      `message must be an object, got ${describe(data)}`,
    );
  }
  const id = readId(data);
  if (needId && id === null) {
    throw new ValidationError(
      "malformed",
      "id",
      `id must be a positive safe integer, got ${describe(data.id)}`,
    );
  }
  return { r: new Reader(data, "", id), kind: data.kind, id };
}

function unknownKind(kind: unknown, id: number | null): never {
  throw new ValidationError("unknown-kind", "kind", `unknown kind ${describe(kind)}`, id);
}

function ranges(r: Reader): HostRange[] {
  return r.list(
    "ranges",
    MAX_RANGES,
    (g) => ({
      base: g.bigint("base"),
      size: g.bigintOrSafe("size"),
      ...(g.has("gpa") ? { gpa: g.bigint("gpa") } : {}),
    }),
  );
}

const NO_QUEUE_FDS: QueueFds = { kickRx: null, kickTx: null, callRx: null, callTx: null };

function queueFds(r: Reader): QueueFds {
  const fd = (k: string) => r.nullable(k, (k2) => r.fd(k2));
  return { kickRx: fd("kickRx"), kickTx: fd("kickTx"), callRx: fd("callRx"), callTx: fd("callTx") };
}

/** The largest log bitmap a worker takes: 2^40 bytes cover 2^55 bytes of guest memory. */
const MAX_LOG_BYTES = 2 ** 40;

function usedRingLog(r: Reader): UsedRingLog {
  return { gpa: r.address("gpa"), bytes: r.int("bytes", 1, 6 + 8 * 32768) };
}

function logConfig(r: Reader): LogConfig {
  return {
    base: r.hostAddress("base", 1),
    size: r.int("size", 1, MAX_LOG_BYTES),
    rxUsed: r.nullable("rxUsed", (k) => usedRingLog(r.object(k))),
    txUsed: r.nullable("txUsed", (k) => usedRingLog(r.object(k))),
  };
}

function txUsed(r: Reader): TxUsedPlace {
  return {
    idxAddr: r.hostAddress("idxAddr", 2),
    eventAddr: r.hostAddress("eventAddr", 2),
    eventIdx: r.boolean("eventIdx"),
  };
}

function rxUsed(r: Reader): RxUsedPlace {
  const size = r.uint("size", 32768);
  if (size < 1 || (size & (size - 1)) !== 0) {
    throw new ValidationError(
      "malformed",
      "rxUsed.size",
      `rxUsed.size must be a power of 2 in 1..32768, got ${size}`,
    );
  }
  return {
    ringAddr: r.hostAddress("ringAddr", 4),
    size,
    eventAddr: r.hostAddress("eventAddr", 2),
    eventIdx: r.boolean("eventIdx"),
  };
}

function frameRoom(r: Reader, key: string): number {
  const v = r.uint(key, RX_FRAME_ROOM_MAX);
  if (v < RX_FRAME_ROOM_MIN) {
    throw new ValidationError(
      "malformed",
      key,
      `${key} must be an integer in ${RX_FRAME_ROOM_MIN}..${RX_FRAME_ROOM_MAX}, got ${v}`,
    );
  }
  return v;
}

/**
 * Validates a request from the parent (worker side).
 * @throws {ValidationError} naming the first wrong field.
 */
export function parseIoRequest(data: unknown): IoRequest {
  const { r, kind, id: readIdOrNull } = open(data, true);
  const id = readIdOrNull!;
  switch (kind) {
    case "init": {
      const version = r.uint("version", 0x7fff_ffff);
      if (version !== IO_PROTOCOL_VERSION) {
        throw new ValidationError(
          "version",
          "version",
          `version ${version} is not ${IO_PROTOCOL_VERSION}`,
          id,
        );
      }
      return {
        kind: "init",
        id,
        version: IO_PROTOCOL_VERSION,
        role: r.oneOf("role", ["writer", "poller"] as const),
        control: r.sharedBuffer("control"),
        tx: r.sharedBuffer("tx"),
        rxPost: r.sharedBuffer("rxPost"),
        rxLong: r.sharedBuffer("rxLong"),
        rxDone: r.sharedBuffer("rxDone"),
        mailbox: r.sharedBuffer("mailbox", MAILBOX_BYTES),
        tapFd: r.fd("tapFd"),
        wakeFd: r.fd("wakeFd"),
        ranges: ranges(r),
        ioUring: r.optional("ioUring", "auto", (k) => r.oneOf(k, ["auto", "off"] as const)),
        rings: r.optional(
          "rings",
          [],
          (k) =>
            r.list(
              k,
              2,
              (g) => ({ fd: g.fd("fd"), params: g.bytes("params", IO_URING_PARAMS_BYTES) }),
            ),
        ),
        txUsed: r.nullable("txUsed", (k) => txUsed(r.object(k))),
        txShared: r.nullable("txShared", (k) => r.sharedBuffer(k, TX_SHARED_BYTES)),
        rateLimit: r.optional(
          "rateLimit",
          null,
          (k) => r.nullable(k, (k2) => r.sharedBuffer(k2, RATE_LIMIT_BYTES)),
        ),
        rxFrameRoom: r.optional("rxFrameRoom", RX_FRAME_ROOM_MAX, (k) => frameRoom(r, k)),
        rxUsed: r.nullable("rxUsed", (k) => rxUsed(r.object(k))),
        log: r.optional("log", null, (k) => r.nullable(k, (k2) => logConfig(r.object(k2)))),
        queueFds: r.optional("queueFds", NO_QUEUE_FDS, (k) => queueFds(r.object(k))),
        capture: r.optional("capture", null, (k) =>
          r.nullable(k, (k2) => {
            const c = r.object(k2);
            return {
              ring: c.sharedBuffer("ring"),
              state: c.sharedBuffer("state", CAPTURE_STATE_BYTES),
            };
          })),
      };
    }
    case "setLog":
      return { kind, id, log: r.nullable("log", (k) => logConfig(r.object(k))) };
    case "setRegions":
      return { kind, id, ranges: ranges(r) };
    case "setFd":
      return {
        kind,
        id,
        slot: r.oneOf("slot", FD_SLOTS),
        fd: r.nullable("fd", (k) => r.fd(k)),
      };
    case "setRxFrameRoom":
      return { kind, id, bytes: frameRoom(r, "bytes") };
    case "stop":
      return r.has("untilTxClosed")
        ? { kind, id, untilTxClosed: r.boolean("untilTxClosed") }
        : { kind, id };
    default:
      return unknownKind(kind, id);
  }
}

/**
 * Validates a reply from a worker (parent side).
 * @throws {ValidationError} naming the first wrong field.
 */
export function parseIoReply(data: unknown): IoReply {
  const { r, kind, id } = open(data, false);
  switch (kind) {
    case "ack":
      if (id === null) {
        throw new ValidationError("malformed", "id", "ack.id must be a positive safe integer");
      }
      return { kind, id };
    case "error":
      if (id === null && r.has("id") && (data as Record<string, unknown>).id !== null) {
        throw new ValidationError(
          "malformed",
          "id",
          "error.id must be null or a positive safe integer",
        );
      }
      return { kind, id, message: r.text("message") };
    case "fault":
      return { kind, message: r.text("message") };
    case "notice":
      return { kind, message: r.text("message") };
    case "released":
      return { kind };
    default:
      return unknownKind(kind, null);
  }
}

/** The error reply for a request that could not be parsed or served. */
export function errorReply(e: unknown, id: number | null): ErrorReply {
  const message = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return { kind: "error", id, message: message.slice(0, MAX_TEXT) };
}
