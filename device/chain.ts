/**
 * Descriptor chains: the one function that walks a chain in guest memory
 * (`walkChain`), the validated segments it produces (`DescriptorChain`), and
 * `chainRead`, the only way the device copies data out of a chain. (It
 * writes none into one: received frames go straight from the tap into guest
 * buffers through the poller.)
 *
 * Trust boundary: everything read here from the descriptor table or an
 * indirect table is guest-controlled. Each descriptor is read exactly once
 * (no double fetch). Code after `walkChain()` sees only validated segments:
 * each one lies inside one granted region, device-readable segments come
 * before device-writable ones, the total is below `maxChainBytes` (< 2^32),
 * and the directions match what the queue allows. Segments are only valid
 * under the memory epoch recorded in the chain; `chainRead` refuses a stale
 * chain.
 *
 * Failure policy (the caller, `Virtqueue`, applies it; see virtqueue.ts):
 * codes below FIRST_RING_ERROR are per-chain: the head is known and sound, so
 * the chain is returned to the guest with used length 0 and counted. Codes
 * from FIRST_RING_ERROR on mean the ring itself is corrupt: the queue needs a
 * reset.
 *
 * @module
 */

import { type GuestMemory, NO_REGION, readLe64Address } from "./guest_memory.ts";

/** virtio 1.2 §2.7.5: struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } */
export const VIRTQ_DESC_SIZE = 16;
export const VIRTQ_DESC_OFF_ADDR = 0;
export const VIRTQ_DESC_OFF_LEN = 8;
export const VIRTQ_DESC_OFF_FLAGS = 12;
export const VIRTQ_DESC_OFF_NEXT = 14;
/** virtio 1.2 §2.7.5: the buffer continues via the next field. */
export const VIRTQ_DESC_F_NEXT = 1;
/** virtio 1.2 §2.7.5: the buffer is device write-only (otherwise device read-only). */
export const VIRTQ_DESC_F_WRITE = 2;
/** virtio 1.2 §2.7.5.3: the buffer holds a table of descriptors. */
export const VIRTQ_DESC_F_INDIRECT = 4;

/** Which descriptor directions a queue accepts (the caller states it per queue). */
export const CHAIN_ANY = 0;
/** Device-readable only: a TX queue (the device reads what the driver sends). */
export const CHAIN_DEVICE_READABLE = 1;
/** Device-writable only: an RX queue (the device writes received frames). */
export const CHAIN_DEVICE_WRITABLE = 2;
/** One of CHAIN_ANY, CHAIN_DEVICE_READABLE, CHAIN_DEVICE_WRITABLE. */
export type ChainDirection = 0 | 1 | 2;

/** Largest total a chain may describe: used `len` is le32 (virtio 1.2 §2.7.5.2: < 2^32). */
export const MAX_CHAIN_BYTES = 0xffffffff;
/** Default cap on entries of one indirect table (QEMU's VIRTQUEUE_MAX_SIZE; §2.7.4.1 allows a limit). */
export const DEFAULT_MAX_INDIRECT_ENTRIES = 1024;
/** Default cap on segments per chain (§2.7.4.1: "a reasonable limit of descriptors"). */
export const DEFAULT_MAX_SEGMENTS = 2048;

/**
 * Result codes of `walkChain()`. 0 is success; per-chain errors come first,
 * ring errors from FIRST_RING_ERROR on. `CHAIN_ERROR_NAMES[code]` names them.
 */
export const CHAIN_OK = 0;
/** A descriptor address is 2^53 or more (le64 hi word >= 2^21). */
export const CHAIN_ADDRESS_TOO_LARGE = 1;
/** A descriptor's buffer is not inside granted guest memory. */
export const CHAIN_ADDRESS_OUTSIDE_MEMORY = 2;
/** The chain describes more than maxChainBytes (§2.7.5.2). */
export const CHAIN_TOO_LONG_BYTES = 3;
/** A device-readable descriptor follows a device-writable one (§2.7.4.2). */
export const CHAIN_READABLE_AFTER_WRITABLE = 4;
/** A device-writable descriptor on a device-readable-only (TX) queue. */
export const CHAIN_UNEXPECTED_WRITABLE = 5;
/** A device-readable descriptor on a device-writable-only (RX) queue. */
export const CHAIN_UNEXPECTED_READABLE = 6;
/** VIRTQ_DESC_F_INDIRECT without VIRTIO_F_INDIRECT_DESC negotiated (§2.7.5.3.1). */
export const CHAIN_INDIRECT_NOT_NEGOTIATED = 7;
/** VIRTQ_DESC_F_INDIRECT together with VIRTQ_DESC_F_NEXT (§2.7.5.3.1). */
export const CHAIN_INDIRECT_WITH_NEXT = 8;
/** VIRTQ_DESC_F_INDIRECT inside an indirect table (§2.7.5.3.1). */
export const CHAIN_INDIRECT_NESTED = 9;
/** Indirect table length zero or not a multiple of 16 (§2.7.5.3). */
export const CHAIN_INDIRECT_BAD_LENGTH = 10;
/** Indirect table with more entries than maxIndirectEntries. */
export const CHAIN_INDIRECT_TOO_LARGE = 11;
/** Indirect table address too large or the table not inside one region. */
export const CHAIN_INDIRECT_OUTSIDE_MEMORY = 12;
/** next >= number of entries inside an indirect table. */
export const CHAIN_INDIRECT_NEXT_OUT_OF_RANGE = 13;
/** An indirect table's chain is longer than the table (a loop). */
export const CHAIN_INDIRECT_LOOP = 14;
/** More segments than maxSegments (many descriptors, or buffers split over regions). */
export const CHAIN_TOO_MANY_SEGMENTS = 15;
/** First ring-fatal code: avail ring head index >= queue size (§2.7.6). */
export const CHAIN_HEAD_OUT_OF_RANGE = 16;
/** A descriptor's next >= queue size (§2.7.5). */
export const CHAIN_NEXT_OUT_OF_RANGE = 17;
/** The chain is longer than the queue size: a loop (§2.7.5.2, §2.7.5.3.1). */
export const CHAIN_LOOP = 18;
/** Codes >= this mean the ring itself is corrupt. */
export const FIRST_RING_ERROR = CHAIN_HEAD_OUT_OF_RANGE;

/** Names of the codes above, indexed by code (counter keys, log text). */
export const CHAIN_ERROR_NAMES = [
  "OK",
  "ADDRESS_TOO_LARGE",
  "ADDRESS_OUTSIDE_MEMORY",
  "TOO_LONG_BYTES",
  "READABLE_AFTER_WRITABLE",
  "UNEXPECTED_WRITABLE",
  "UNEXPECTED_READABLE",
  "INDIRECT_NOT_NEGOTIATED",
  "INDIRECT_WITH_NEXT",
  "INDIRECT_NESTED",
  "INDIRECT_BAD_LENGTH",
  "INDIRECT_TOO_LARGE",
  "INDIRECT_OUTSIDE_MEMORY",
  "INDIRECT_NEXT_OUT_OF_RANGE",
  "INDIRECT_LOOP",
  "TOO_MANY_SEGMENTS",
  "HEAD_OUT_OF_RANGE",
  "NEXT_OUT_OF_RANGE",
  "LOOP",
] as const;

/** One of CHAIN_ERROR_NAMES. */
export type ChainErrorName = typeof CHAIN_ERROR_NAMES[number];

/**
 * Validated segments of one chain, struct-of-arrays with a fixed capacity so
 * walking allocates nothing. A queue owns one and reuses it for every pop:
 * copy out what you need before the next `popAvail()`.
 *
 * Segment i is `length[i]` bytes at byte `offset[i]` of region `region[i]`
 * (a `GuestMemory` slot), device-writable when `writable[i]` is 1. The first
 * `readableCount` segments are device-readable, the rest device-writable.
 */
export class DescriptorChain {
  /** Head descriptor index (the used ring `id`). */
  head = 0;
  /** Number of valid segments. */
  count = 0;
  /** Segments [0, readableCount) are device-readable, [readableCount, count) device-writable. */
  readableCount = 0;
  /** Total device-readable bytes. */
  readableBytes = 0;
  /** Total device-writable bytes. */
  writableBytes = 0;
  /** `GuestMemory.epoch` the segments were translated under. */
  epoch = -1;
  /** Number of descriptors walked (direct + indirect), including zero-length ones. */
  descriptors = 0;
  /** Number of device-writable descriptors seen, including zero-length ones. */
  writableDescriptors = 0;
  readonly region: Uint16Array;
  readonly offset: Float64Array;
  readonly length: Uint32Array;
  readonly writable: Uint8Array;

  constructor(readonly capacity: number = DEFAULT_MAX_SEGMENTS) {
    if (!Number.isInteger(capacity) || capacity < 1 || capacity > 0x100000) {
      throw new RangeError(`DescriptorChain capacity ${capacity} must be in [1, 2^20]`);
    }
    this.region = new Uint16Array(capacity);
    this.offset = new Float64Array(capacity);
    this.length = new Uint32Array(capacity);
    this.writable = new Uint8Array(capacity);
  }

  /** Empties the chain (keeps the storage). */
  clear(head: number, epoch: number): void {
    this.head = head;
    this.count = 0;
    this.readableCount = 0;
    this.readableBytes = 0;
    this.writableBytes = 0;
    this.epoch = epoch;
    this.descriptors = 0;
    this.writableDescriptors = 0;
  }
}

/** Where the descriptor table is and what the queue allows: fixed per queue configuration. */
export interface ChainWalkConfig {
  readonly memory: GuestMemory;
  /** DataView over the region holding the descriptor table. */
  readonly tableView: DataView;
  /** Byte offset of the descriptor table in that view. */
  readonly tableOffset: number;
  /** Queue size: descriptor count, and the walk budget. */
  readonly queueSize: number;
  /** VIRTIO_F_INDIRECT_DESC negotiated. */
  readonly indirect: boolean;
  readonly direction: ChainDirection;
  /** Cap on the chain's total bytes; at most MAX_CHAIN_BYTES. */
  readonly maxChainBytes: number;
  /** Cap on entries in one indirect table. */
  readonly maxIndirectEntries: number;
}

/**
 * Walks the chain starting at descriptor `head` and fills `out` with
 * validated segments. Returns CHAIN_OK or an error code; never throws on
 * guest input. The walk stops at the first error; `out.head` is always set.
 *
 * Checks (virtio 1.2): head < queue size (§2.7.6); each next < queue size and
 * at most queue-size descriptors (§2.7.5, §2.7.5.2 loops are forbidden);
 * INDIRECT only when negotiated, never with NEXT, never nested, table length
 * a non-zero multiple of 16 inside one region, entries capped, next inside
 * the table and at most as many steps as entries (§2.7.5.3.1); the write
 * flag of the descriptor that refers to a table is ignored (§2.7.5.3.2);
 * no device-readable descriptor after a device-writable one (§2.7.4.2); the
 * queue's direction; total length capped (§2.7.5.2); every byte inside
 * granted memory (a data buffer may span adjacent regions and is then split).
 */
export function walkChain(cfg: ChainWalkConfig, head: number, out: DescriptorChain): number {
  const memory = cfg.memory;
  out.clear(head, memory.epoch);
  const size = cfg.queueSize;
  // §2.7.6: each avail ring entry refers to the head of a descriptor chain.
  if (!(head >= 0 && head < size)) return CHAIN_HEAD_OUT_OF_RANGE;
  const view = cfg.tableView;
  const base = cfg.tableOffset;
  let index = head;
  // §2.7.5: the table holds queue-size descriptors, the longest possible chain.
  let budget = size;
  for (;;) {
    if (budget === 0) return CHAIN_LOOP;
    budget--;
    const o = base + index * VIRTQ_DESC_SIZE;
    const addr = readLe64Address(view, o + VIRTQ_DESC_OFF_ADDR);
    const len = view.getUint32(o + VIRTQ_DESC_OFF_LEN, true);
    const flags = view.getUint16(o + VIRTQ_DESC_OFF_FLAGS, true);
    const next = view.getUint16(o + VIRTQ_DESC_OFF_NEXT, true);
    out.descriptors++;
    if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) {
      // §2.7.5.3.1: only when negotiated; never together with NEXT.
      if (!cfg.indirect) return CHAIN_INDIRECT_NOT_NEGOTIATED;
      if ((flags & VIRTQ_DESC_F_NEXT) !== 0) return CHAIN_INDIRECT_WITH_NEXT;
      // §2.7.5.3.2: zero or more direct descriptors, then one indirect one, last.
      return walkIndirect(cfg, addr, len, out);
    }
    const code = addSegment(cfg, addr, len, (flags & VIRTQ_DESC_F_WRITE) !== 0, out);
    if (code !== CHAIN_OK) return code;
    if ((flags & VIRTQ_DESC_F_NEXT) === 0) return CHAIN_OK;
    // §2.7.5: next indexes the descriptor table.
    if (next >= size) return CHAIN_NEXT_OUT_OF_RANGE;
    index = next;
  }
}

/** §2.7.5.3: walks the table at guest address `addr`, `len` bytes long. */
function walkIndirect(
  cfg: ChainWalkConfig,
  addr: number,
  len: number,
  out: DescriptorChain,
): number {
  // §2.7.5.3: struct virtq_desc desc[len / 16].
  if (len === 0 || len % VIRTQ_DESC_SIZE !== 0) return CHAIN_INDIRECT_BAD_LENGTH;
  const entries = len / VIRTQ_DESC_SIZE;
  if (entries > cfg.maxIndirectEntries) return CHAIN_INDIRECT_TOO_LARGE;
  if (addr < 0) return CHAIN_INDIRECT_OUTSIDE_MEMORY;
  // The table is a structure we index into: it must lie in one region.
  const slot = cfg.memory.lookupGpa(addr, len);
  if (slot === NO_REGION) return CHAIN_INDIRECT_OUTSIDE_MEMORY;
  const region = cfg.memory.region(slot)!;
  const view = region.view;
  const base = addr - region.guestPhysAddr;
  let index = 0; // §2.7.5.3: the first indirect descriptor is at index 0.
  let budget = entries;
  for (;;) {
    if (budget === 0) return CHAIN_INDIRECT_LOOP;
    budget--;
    const o = base + index * VIRTQ_DESC_SIZE;
    const daddr = readLe64Address(view, o + VIRTQ_DESC_OFF_ADDR);
    const dlen = view.getUint32(o + VIRTQ_DESC_OFF_LEN, true);
    const flags = view.getUint16(o + VIRTQ_DESC_OFF_FLAGS, true);
    const next = view.getUint16(o + VIRTQ_DESC_OFF_NEXT, true);
    out.descriptors++;
    // §2.7.5.3.1: no VIRTQ_DESC_F_INDIRECT within an indirect descriptor.
    if ((flags & VIRTQ_DESC_F_INDIRECT) !== 0) return CHAIN_INDIRECT_NESTED;
    const code = addSegment(cfg, daddr, dlen, (flags & VIRTQ_DESC_F_WRITE) !== 0, out);
    if (code !== CHAIN_OK) return code;
    if ((flags & VIRTQ_DESC_F_NEXT) === 0) return CHAIN_OK;
    if (next >= entries) return CHAIN_INDIRECT_NEXT_OUT_OF_RANGE;
    index = next;
  }
}

/** Checks one buffer and appends it as one or more segments (split at region boundaries). */
function addSegment(
  cfg: ChainWalkConfig,
  addr: number,
  len: number,
  writable: boolean,
  out: DescriptorChain,
): number {
  if (writable) {
    if (cfg.direction === CHAIN_DEVICE_READABLE) return CHAIN_UNEXPECTED_WRITABLE;
  } else {
    // §2.7.4.2: device-writable elements come after device-readable ones.
    if (out.writableDescriptors !== 0) return CHAIN_READABLE_AFTER_WRITABLE;
    if (cfg.direction === CHAIN_DEVICE_WRITABLE) return CHAIN_UNEXPECTED_READABLE;
  }
  if (addr < 0) return CHAIN_ADDRESS_TOO_LARGE;
  // §2.7.5.2: less than 2^32 bytes in total (or the queue's smaller cap).
  const total = out.readableBytes + out.writableBytes;
  if (len > cfg.maxChainBytes - total) return CHAIN_TOO_LONG_BYTES;
  if (writable) {
    // Counted even when zero-length, so a readable descriptor after it is caught.
    out.writableDescriptors++;
    out.writableBytes += len;
  } else {
    out.readableBytes += len;
  }
  const memory = cfg.memory;
  let a = addr;
  let remaining = len;
  while (remaining > 0) {
    const slot = memory.lookupGpa(a, 0);
    if (slot === NO_REGION) return CHAIN_ADDRESS_OUTSIDE_MEMORY;
    const region = memory.region(slot)!;
    const room = region.guestPhysEnd - a;
    const take = remaining < room ? remaining : room;
    const i = out.count;
    if (i === out.capacity) return CHAIN_TOO_MANY_SEGMENTS;
    out.region[i] = slot;
    out.offset[i] = a - region.guestPhysAddr;
    out.length[i] = take;
    out.writable[i] = writable ? 1 : 0;
    out.count = i + 1;
    if (!writable) out.readableCount = i + 1;
    a += take;
    remaining -= take;
  }
  return CHAIN_OK;
}

/** Copies of at most this many bytes are done byte by byte (see chainRead). */
const SMALL_COPY = 32;

/**
 * Copies device-readable bytes of `chain`, starting `from` bytes into its
 * readable part, into `dst`. Returns the number of bytes copied (short when
 * the readable part ends first), or -1 when the chain is stale (guest memory
 * was revoked or replaced after the walk) or `from` is not a non-negative
 * integer. Never touches writable segments.
 */
export function chainRead(
  memory: GuestMemory,
  chain: DescriptorChain,
  from: number,
  dst: Uint8Array,
): number {
  if (chain.epoch !== memory.epoch) return -1;
  if (!(Number.isSafeInteger(from) && from >= 0)) return -1;
  let skip = from;
  let done = 0;
  for (let i = 0; i < chain.readableCount && done < dst.length; i++) {
    const len = chain.length[i];
    if (skip >= len) {
      skip -= len;
      continue;
    }
    const n = Math.min(len - skip, dst.length - done);
    const start = chain.offset[i] + skip;
    const bytes = memory.region(chain.region[i])!.bytes;
    if (n <= SMALL_COPY) {
      // A header or a MAC pair: a loop costs less than a subarray object and
      // the runtime call behind set() (measured: 4 % of the device's TX time).
      for (let k = 0; k < n; k++) dst[done + k] = bytes[start + k];
    } else {
      dst.set(bytes.subarray(start, start + n), done);
    }
    done += n;
    skip = 0;
  }
  return done;
}
