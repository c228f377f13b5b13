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
 * back into `poll()` and answered only after ~280 ms of retries.)
 *
 * The data path itself (records, event bits) is `ipc/datapath.ts`; this file
 * is only the slow control channel beside it.
 *
 * @module
 */

import { MAX_FRAME_BYTES, NET_HDR_BYTES } from "../../ipc/datapath.ts";
import type { HostRange } from "./regions.ts";

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
export const MAILBOX = { POSTED: 0 } as const;
export const MAILBOX_BYTES = 64;

/** Which I/O worker a message is for. */
export type IoRole = "writer" | "poller";

/** Descriptor slots the parent may set; each worker accepts only its own. */
export type FdSlot = "tap" | "kickRx" | "kickTx" | "callRx" | "callTx";
export const FD_SLOTS: readonly FdSlot[] = ["tap", "kickRx", "kickTx", "callRx", "callTx"];
/** Slots each role accepts in `setFd`. */
export const ROLE_SLOTS: Readonly<Record<IoRole, readonly FdSlot[]>> = {
  writer: ["tap", "callRx", "callTx"],
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

/** End the loop; the ack is the last message. */
export interface StopRequest {
  kind: "stop";
  id: number;
}

export type IoRequest =
  | InitRequest
  | SetRegionsRequest
  | SetFdRequest
  | SetRxFrameRoomRequest
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

export type IoReply = AckReply | ErrorReply | FaultNotice | InfoNotice;

/** A control message did not have the required shape. */
export class IoProtocolError extends Error {
  override name = "IoProtocolError";
  constructor(message: string, readonly id: number | null) {
    super(message);
  }
}

const MAX_RANGES = 1024;
const MAX_TEXT = 4096;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function readId(msg: Record<string, unknown>): number | null {
  const id = msg.id;
  return typeof id === "number" && Number.isSafeInteger(id) && id > 0 ? id : null;
}

function fail(what: string, id: number | null): never {
  throw new IoProtocolError(what, id);
}

function fd(v: unknown, field: string, id: number | null): number {
  if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > 0x7fff_ffff) {
    fail(`${field} must be a descriptor (integer in [0, 2^31)), got ${String(v)}`, id);
  }
  return v;
}

/** Size of `txShared` (its words: TX_SHARED in `tx_drain.ts`). */
export const TX_SHARED_BYTES = 16;

/** A fresh `txShared` buffer for one data path's two I/O workers. */
export function createTxShared(): SharedArrayBuffer {
  return new SharedArrayBuffer(TX_SHARED_BYTES);
}

function txSharedBuffer(v: unknown, id: number | null): SharedArrayBuffer {
  const b = sab(v, "txShared", id);
  if (b.byteLength !== TX_SHARED_BYTES) fail(`txShared must be ${TX_SHARED_BYTES} bytes`, id);
  return b;
}

function sab(v: unknown, field: string, id: number | null): SharedArrayBuffer {
  if (!(v instanceof SharedArrayBuffer)) fail(`${field} must be a SharedArrayBuffer`, id);
  if (field === "mailbox" && v.byteLength !== MAILBOX_BYTES) {
    fail(`mailbox must be ${MAILBOX_BYTES} bytes`, id);
  }
  return v;
}

function ranges(v: unknown, id: number | null): HostRange[] {
  if (!Array.isArray(v) || v.length > MAX_RANGES) {
    fail(`ranges must be an array of at most ${MAX_RANGES} ranges`, id);
  }
  return v.map((r, i): HostRange => {
    if (!isObject(r)) fail(`ranges[${i}] must be an object`, id);
    if (typeof r.base !== "bigint") fail(`ranges[${i}].base must be a bigint`, id);
    const size = r.size;
    if (typeof size !== "bigint" && !(typeof size === "number" && Number.isSafeInteger(size))) {
      fail(`ranges[${i}].size must be a bigint or a safe integer`, id);
    }
    return { base: r.base, size };
  });
}

function parseTxUsed(v: unknown, id: number | null): TxUsedPlace | null {
  if (v === null || v === undefined) return null;
  if (!isObject(v)) fail("txUsed must be an object or null", id);
  for (const f of ["idxAddr", "eventAddr"] as const) {
    const a = v[f];
    if (typeof a !== "bigint" || a <= 0n || a >= 1n << 64n || (a & 1n) !== 0n) {
      fail(`txUsed.${f} must be a 2-byte aligned host address (bigint)`, id);
    }
  }
  if (typeof v.eventIdx !== "boolean") fail("txUsed.eventIdx must be a boolean", id);
  return {
    idxAddr: v.idxAddr as bigint,
    eventAddr: v.eventAddr as bigint,
    eventIdx: v.eventIdx,
  };
}

function parseRxUsed(v: unknown, id: number | null): RxUsedPlace | null {
  if (v === null || v === undefined) return null;
  if (!isObject(v)) fail("rxUsed must be an object or null", id);
  const size = v.size;
  if (
    typeof size !== "number" || !Number.isInteger(size) || size < 1 || size > 32768 ||
    (size & (size - 1)) !== 0
  ) {
    fail("rxUsed.size must be a power of 2 in 1..32768", id);
  }
  const ring = v.ringAddr;
  if (typeof ring !== "bigint" || ring <= 0n || ring >= 1n << 64n || (ring & 3n) !== 0n) {
    fail("rxUsed.ringAddr must be a 4-byte aligned host address (bigint)", id);
  }
  const event = v.eventAddr;
  if (typeof event !== "bigint" || event <= 0n || event >= 1n << 64n || (event & 1n) !== 0n) {
    fail("rxUsed.eventAddr must be a 2-byte aligned host address (bigint)", id);
  }
  if (typeof v.eventIdx !== "boolean") fail("rxUsed.eventIdx must be a boolean", id);
  return { ringAddr: ring, size, eventAddr: event, eventIdx: v.eventIdx };
}

function frameRoom(v: unknown, id: number | null): number {
  if (
    typeof v !== "number" || !Number.isInteger(v) || v < RX_FRAME_ROOM_MIN ||
    v > RX_FRAME_ROOM_MAX
  ) {
    fail(`rxFrameRoom must be an integer in ${RX_FRAME_ROOM_MIN}..${RX_FRAME_ROOM_MAX}`, id);
  }
  return v;
}

function ioUringMode(v: unknown, id: number | null): IoUringMode {
  if (v !== "auto" && v !== "off") fail(`ioUring must be "auto" or "off"`, id);
  return v;
}

/**
 * Validates a request from the parent (worker side).
 * @throws {IoProtocolError} naming the first wrong field.
 */
export function parseIoRequest(data: unknown): IoRequest {
  if (!isObject(data)) fail("message must be an object", null);
  const id = readId(data);
  if (id === null) fail("id must be a positive safe integer", null);
  switch (data.kind) {
    case "init": {
      if (data.version !== IO_PROTOCOL_VERSION) {
        fail(`version ${String(data.version)} is not ${IO_PROTOCOL_VERSION}`, id);
      }
      if (data.role !== "writer" && data.role !== "poller") {
        fail(`role must be "writer" or "poller"`, id);
      }
      return {
        kind: "init",
        id,
        version: IO_PROTOCOL_VERSION,
        role: data.role,
        control: sab(data.control, "control", id),
        tx: sab(data.tx, "tx", id),
        rxPost: sab(data.rxPost, "rxPost", id),
        rxLong: sab(data.rxLong, "rxLong", id),
        rxDone: sab(data.rxDone, "rxDone", id),
        mailbox: sab(data.mailbox, "mailbox", id),
        tapFd: fd(data.tapFd, "tapFd", id),
        wakeFd: fd(data.wakeFd, "wakeFd", id),
        ranges: ranges(data.ranges, id),
        ioUring: data.ioUring === undefined ? "auto" : ioUringMode(data.ioUring, id),
        txUsed: parseTxUsed(data.txUsed, id),
        txShared: data.txShared === undefined || data.txShared === null
          ? null
          : txSharedBuffer(data.txShared, id),
        rxFrameRoom: data.rxFrameRoom === undefined
          ? RX_FRAME_ROOM_MAX
          : frameRoom(data.rxFrameRoom, id),
        rxUsed: parseRxUsed(data.rxUsed, id),
      };
    }
    case "setRegions":
      return { kind: "setRegions", id, ranges: ranges(data.ranges, id) };
    case "setFd": {
      const slot = data.slot;
      if (typeof slot !== "string" || !(FD_SLOTS as readonly string[]).includes(slot)) {
        fail(`slot must be one of ${FD_SLOTS.join(", ")}`, id);
      }
      return {
        kind: "setFd",
        id,
        slot: slot as FdSlot,
        fd: data.fd === null ? null : fd(data.fd, "fd", id),
      };
    }
    case "setRxFrameRoom":
      return { kind: "setRxFrameRoom", id, bytes: frameRoom(data.bytes, id) };
    case "stop":
      return { kind: "stop", id };
    default:
      fail(`unknown kind ${JSON.stringify(String(data.kind)).slice(0, 64)}`, id);
  }
}

/**
 * Validates a reply from a worker (parent side).
 * @throws {IoProtocolError} naming the first wrong field.
 */
export function parseIoReply(data: unknown): IoReply {
  if (!isObject(data)) fail("reply must be an object", null);
  const text = (v: unknown, field: string): string => {
    if (typeof v !== "string" || v.length > MAX_TEXT) {
      fail(`${field} must be a string of at most ${MAX_TEXT} characters`, readId(data));
    }
    return v;
  };
  switch (data.kind) {
    case "ack": {
      const id = readId(data);
      if (id === null) fail("ack.id must be a positive safe integer", null);
      return { kind: "ack", id };
    }
    case "error":
      if (data.id !== null && readId(data) === null) {
        fail("error.id must be null or a positive safe integer", null);
      }
      return { kind: "error", id: readId(data), message: text(data.message, "error.message") };
    case "fault":
      return { kind: "fault", message: text(data.message, "fault.message") };
    case "notice":
      return { kind: "notice", message: text(data.message, "notice.message") };
    default:
      fail(`unknown reply kind ${JSON.stringify(String(data.kind)).slice(0, 64)}`, null);
  }
}

/** The error reply for a request that could not be parsed or served. */
export function errorReply(e: unknown, id: number | null): ErrorReply {
  const message = e instanceof Error ? `${e.name}: ${e.message}` : String(e);
  return { kind: "error", id, message: message.slice(0, MAX_TEXT) };
}
