/**
 * The capture ring: how an I/O worker hands copies of the frames it moves
 * to the capture writer (`capture_worker.ts`) without ever waiting for it.
 *
 * ## Theory of operation
 *
 * One ring per I/O worker (a pair's writer, a pair's poller): a single
 * producer, the worker, and a single consumer, the capture writer. A
 * SharedArrayBuffer of {@link CAPTURE_RING_HEADER_BYTES} bytes of header and
 * a power-of-two byte area of variable-length records, each 8-byte aligned
 * and contiguous (a record that would cross the end is preceded by a wrap
 * marker, and starts again at 0). `head` and `tail` are free-running u32
 * byte counts; the producer publishes a record with one `Atomics.store` of
 * head after its plain stores, the consumer frees space with one of tail.
 *
 * The producer never waits: a record that does not fit in the free space is
 * not written, and counted (`droppedBehind`: the writer fell behind). Nor
 * does it wake the consumer: the consumer looks every few milliseconds, and
 * straight away again while it finds records. So capture costs the data
 * path a copy of each frame into shared memory, and nothing else.
 *
 * The shared capture state ({@link CAPTURE_STATE}, one word for every ring
 * of the daemon) is read once per batch: while it is not ON, a frame costs
 * one predictable branch (and, while FULL, one counter increment).
 *
 * `--pcap-snaplen` limits the bytes of each frame a record holds (the
 * frame's length is kept): headers only, for offload debugging at a fraction
 * of the cost of whole 64 KiB frames.
 *
 * Trust: only the privileged I/O workers write records, from frames they
 * moved through iovecs they had checked (guest memory or the bounce arena),
 * and headers from their private copies; the device worker never sees a
 * ring. The consumer still checks every record's fields (a ring is reused
 * across data-path restarts, and a worker that was ended may not have
 * stopped at once) and skips to head on the first bad one, counting it.
 *
 * Record layout (byte offsets):
 *
 *     0  u32 record bytes (a multiple of 8; RECORD_WRAP: skip to the start)
 *     4  u32 frame length (without the virtio_net_hdr)
 *     8  u32 captured length (<= frame length)
 *    12  u8  direction (DIR_TX / DIR_RX, pcapng.ts), u8 0, u16 0
 *    16  f64 time, µs since the epoch
 *    24  12 bytes virtio_net_hdr
 *    36  the frame's captured bytes
 *
 * @module
 */

import { IOVEC_WORDS } from "../../ipc/datapath.ts";
import { VIRTIO_NET_HDR_SIZE } from "../../ipc/virtio_net_hdr.ts";
import type { HostMemory } from "./regions.ts";
import { DIR_RX, DIR_TX } from "./pcapng.ts";

/** Header bytes before the record area. */
export const CAPTURE_RING_HEADER_BYTES = 128;
/** Default record area per I/O worker: 2 MiB (about 30 64 KiB GSO frames, 1400 full-size ones). */
export const CAPTURE_RING_BYTES = 2 * 1024 * 1024;

/** Int32 words of the ring header. */
const HEAD = 0;
const TAIL = 16;
/** Float64 words of the ring header (producer's counters, single writer). */
const F_QUEUED = 4;
const F_QUEUED_BYTES = 5;
const F_BEHIND = 6;
const F_OVER_MAX = 7;
/** Float64 word written by the consumer: records it refused as malformed. */
const F_CORRUPT = 12;

/** A record's fixed part; the frame's bytes follow. */
export const RECORD_HEAD_BYTES = 24 + VIRTIO_NET_HDR_SIZE;
/** The record-bytes word of a wrap marker (never a multiple of 8). */
const RECORD_WRAP = 1;

/** Words of the shared capture state buffer (an Int32Array). */
export const CAPTURE_STATE = {
  /** OFF, ON, FULL or FAILED (below). */
  STATE: 0,
  /** `--pcap-snaplen`: the most bytes of a frame captured; 0: whole frames. Set once, at creation. */
  SNAPLEN: 1,
} as const;
/**
 * Float64 words of the same buffer, written by the capture writer only:
 * what reached the file.
 */
export const CAPTURE_STATS = {
  /** Bytes in the file (headers included). */
  FILE_BYTES: 2,
  /** Frames written, and their bytes (frame lengths, without headers). */
  PACKETS: 3,
  BYTES: 4,
  /** Frames written by direction. */
  TX_PACKETS: 5,
  RX_PACKETS: 6,
  /** Frames taken from the rings after the file had reached --pcap-max. */
  OVER_MAX: 7,
  /** Writes the kernel refused (capture FAILED then). */
  WRITE_ERRORS: 8,
} as const;
export const CAPTURE_STATE_BYTES = 128;
/** Not capturing (`--pcap-start off`, or `POST /capture?state=off`). */
export const CAPTURE_OFF = 0;
/** Frames are copied into the rings. */
export const CAPTURE_ON = 1;
/** The file reached `--pcap-max`: nothing more is written (counted as dropped over max). */
export const CAPTURE_FULL = 2;
/** A write to the file failed: capture ended. */
export const CAPTURE_FAILED = 3;

const align8 = (n: number) => (n + 7) & ~7;

/** Makes a ring with a record area of `bytes` (a power of two, at least 64 KiB + headers). */
export function createCaptureRing(bytes = CAPTURE_RING_BYTES): SharedArrayBuffer {
  if (bytes < 128 * 1024 || (bytes & (bytes - 1)) !== 0) {
    throw new RangeError(`a capture ring must be a power of two of at least 128 KiB, got ${bytes}`);
  }
  return new SharedArrayBuffer(CAPTURE_RING_HEADER_BYTES + bytes);
}

/** Throws TypeError unless `sab` has a ring's shape. */
function areaOf(sab: SharedArrayBuffer): number {
  if (!(sab instanceof SharedArrayBuffer)) {
    throw new TypeError("a capture ring is a SharedArrayBuffer");
  }
  const area = sab.byteLength - CAPTURE_RING_HEADER_BYTES;
  if (area < 128 * 1024 || (area & (area - 1)) !== 0) {
    throw new TypeError(`a capture ring's area must be a power of two, got ${area} bytes`);
  }
  return area;
}

/** Counters of one ring (producer's, and the consumer's refusals). */
export interface CaptureRingCounters {
  /** Frames copied into the ring. */
  queued: number;
  queuedBytes: number;
  /** Frames not copied: the ring was full (the capture writer fell behind). */
  droppedBehind: number;
  /** Frames not copied: the file had reached --pcap-max. */
  droppedOverMax: number;
  /** Records the consumer refused as malformed. */
  corrupt: number;
}

/** Reads a ring's counters (any thread). */
export function ringCounters(sab: SharedArrayBuffer): CaptureRingCounters {
  const f = new Float64Array(sab, 0, CAPTURE_RING_HEADER_BYTES / 8);
  return {
    queued: f[F_QUEUED],
    queuedBytes: f[F_QUEUED_BYTES],
    droppedBehind: f[F_BEHIND],
    droppedOverMax: f[F_OVER_MAX],
    corrupt: f[F_CORRUPT],
  };
}

/** The I/O worker's end of a ring (see the module comment). */
export class CaptureProducer {
  readonly #state: Int32Array;
  readonly #hdr: Int32Array;
  readonly #f: Float64Array;
  readonly #u8: Uint8Array;
  readonly #u32: Uint32Array;
  readonly #f64: Float64Array;
  readonly #mask: number;
  readonly #area: number;
  /** The most bytes of a frame captured (`--pcap-snaplen`; whole frames: no limit). */
  readonly #snap: number;
  #head: number;
  /** The record {@link reserve} made: its bytes and its frame's length. */
  #need = 0;
  #frameLen = 0;
  /** The time records get (µs since the epoch), from {@link stamp}. */
  #now = 0;

  constructor(ring: SharedArrayBuffer, state: SharedArrayBuffer) {
    this.#area = areaOf(ring);
    if (!(state instanceof SharedArrayBuffer) || state.byteLength < CAPTURE_STATE_BYTES) {
      throw new TypeError(
        `the capture state must be a SharedArrayBuffer of ${CAPTURE_STATE_BYTES} bytes`,
      );
    }
    this.#state = new Int32Array(state, 0, CAPTURE_STATE_BYTES / 4);
    const snap = Atomics.load(this.#state, CAPTURE_STATE.SNAPLEN);
    this.#snap = snap > 0 ? snap : 0x7fff_ffff;
    this.#hdr = new Int32Array(ring, 0, CAPTURE_RING_HEADER_BYTES / 4);
    this.#f = new Float64Array(ring, 0, CAPTURE_RING_HEADER_BYTES / 8);
    this.#u8 = new Uint8Array(ring, CAPTURE_RING_HEADER_BYTES);
    this.#u32 = new Uint32Array(ring, CAPTURE_RING_HEADER_BYTES);
    this.#f64 = new Float64Array(ring, CAPTURE_RING_HEADER_BYTES);
    this.#mask = this.#area - 1;
    // A ring outlives the workers that fill it: continue where the last one stopped.
    this.#head = Atomics.load(this.#hdr, HEAD) >>> 0;
    this.stamp();
  }

  /**
   * Takes the time the next records get: once per batch, not per frame
   * (`performance.now()` costs about 200 ns here, more than the rest of a
   * small frame's capture), so the frames of one batch share its time.
   */
  stamp(): void {
    this.#now = Math.round((performance.timeOrigin + performance.now()) * 1000);
  }

  /** The capture state (CAPTURE_ON, ...): read once per batch. */
  state(): number {
    return Atomics.load(this.#state, CAPTURE_STATE.STATE);
  }

  /** Counts a frame not captured because the file is full. */
  overMax(): void {
    this.#f[F_OVER_MAX]++;
  }

  /**
   * Reserves a record for a frame of `frameLen` bytes, of which
   * {@link capLen} are captured (the snap length), with the time of the last
   * {@link stamp}; returns the
   * byte offset of its virtio_net_hdr in {@link bytes} (the frame follows
   * at +12), or -1 when it does not fit (counted). {@link commit} publishes it.
   */
  reserve(dir: number, frameLen: number): number {
    const capLen = frameLen < this.#snap ? frameLen : this.#snap;
    const need = align8(RECORD_HEAD_BYTES + capLen);
    const tail = Atomics.load(this.#hdr, TAIL) >>> 0;
    let head = this.#head;
    const free = this.#area - ((head - tail) >>> 0);
    let pos = head & this.#mask;
    const toEnd = this.#area - pos;
    if (need > toEnd) {
      if (need + toEnd > free) {
        this.#f[F_BEHIND]++;
        return -1;
      }
      this.#u32[pos >>> 2] = RECORD_WRAP;
      head = (head + toEnd) >>> 0;
      pos = 0;
    } else if (need > free) {
      this.#f[F_BEHIND]++;
      return -1;
    }
    this.#head = head;
    const w = pos >>> 2;
    const u32 = this.#u32;
    u32[w] = need;
    u32[w + 1] = frameLen;
    u32[w + 2] = capLen;
    u32[w + 3] = dir;
    this.#need = need;
    this.#frameLen = frameLen;
    this.#f64[(pos >>> 3) + 2] = this.#now;
    return pos + 24;
  }

  /** The record area, for the caller to fill what {@link reserve} returned. */
  get bytes(): Uint8Array {
    return this.#u8;
  }

  /** The bytes of a `frameLen`-byte frame a record holds (the snap length). */
  capLen(frameLen: number): number {
    return frameLen < this.#snap ? frameLen : this.#snap;
  }

  /** Publishes the record {@link reserve} made. */
  commit(): void {
    this.#head = (this.#head + this.#need) >>> 0;
    this.#f[F_QUEUED]++;
    this.#f[F_QUEUED_BYTES] += this.#frameLen;
    Atomics.store(this.#hdr, HEAD, this.#head | 0);
  }

  /**
   * Captures a TX frame: the header copy at `hdr[hdrAt]` (the one the
   * kernel gets) and `frameLen` bytes through `count` iovecs at `iov[w]`,
   * each already checked to lie inside one range of `memory`.
   */
  tx(
    hdr: Uint8Array,
    hdrAt: number,
    iov: Uint32Array,
    w: number,
    count: number,
    frameLen: number,
    memory: HostMemory,
  ): void {
    const at = this.reserve(DIR_TX, frameLen);
    if (at < 0) return;
    const u8 = this.#u8;
    for (let i = 0; i < VIRTIO_NET_HDR_SIZE; i++) u8[at + i] = hdr[hdrAt + i];
    const capLen = this.capLen(frameLen);
    copyIovecs(iov, w, w + count * IOVEC_WORDS, capLen, memory, u8, at + VIRTIO_NET_HDR_SIZE);
    this.commit();
  }

  /**
   * Captures an RX frame of `bytes` bytes, its virtio_net_hdr first, as
   * read into the iovecs at `iov[w..end)` (checked ranges of `memory`).
   */
  rx(iov: Uint32Array, w: number, end: number, bytes: number, memory: HostMemory): void {
    const frameLen = bytes - VIRTIO_NET_HDR_SIZE;
    if (frameLen < 0) return;
    const at = this.reserve(DIR_RX, frameLen);
    if (at < 0) return;
    copyIovecs(iov, w, end, VIRTIO_NET_HDR_SIZE + this.capLen(frameLen), memory, this.#u8, at);
    this.commit();
  }
}

/**
 * Copies `bytes` bytes through the iovecs at words `[w, end)` of `iov` into
 * `dst[at]`. Each iovec was checked against `memory` when it was staged; one
 * that no longer lies in it (never expected) leaves zeros.
 */
function copyIovecs(
  iov: Uint32Array,
  w: number,
  end: number,
  bytes: number,
  memory: HostMemory,
  dst: Uint8Array,
  at: number,
): void {
  let left = bytes;
  for (; left > 0 && w < end; w += IOVEC_WORDS) {
    const len = Math.min(iov[w + 2], left);
    if (len === 0) continue;
    const addr = iov[w + 1] * 0x1_0000_0000 + iov[w];
    const r = memory.find(addr, len);
    if (r < 0) {
      dst.fill(0, at, at + len);
    } else {
      const off = addr - memory.start(r);
      dst.set(memory.bytes(r).subarray(off, off + len), at);
    }
    at += len;
    left -= len;
  }
  if (left > 0) dst.fill(0, at, at + left);
}

/** One record as the consumer sees it (views into the ring, valid until {@link CaptureConsumer.release}). */
export interface CaptureRecord {
  dir: number;
  /** µs since the epoch. */
  timeUs: number;
  frameLen: number;
  /** The 12-byte virtio_net_hdr at `bytes[hdrAt]`. */
  hdrAt: number;
  /** The frame's captured bytes. */
  frame: Uint8Array;
  bytes: Uint8Array;
}

/** The capture writer's end of a ring. */
export class CaptureConsumer {
  readonly #hdr: Int32Array;
  readonly #f: Float64Array;
  readonly #u8: Uint8Array;
  readonly #u32: Uint32Array;
  readonly #f64: Float64Array;
  readonly #area: number;
  #tail: number;
  readonly ring: SharedArrayBuffer;
  readonly #rec: CaptureRecord;

  constructor(ring: SharedArrayBuffer) {
    this.ring = ring;
    this.#area = areaOf(ring);
    this.#hdr = new Int32Array(ring, 0, CAPTURE_RING_HEADER_BYTES / 4);
    this.#f = new Float64Array(ring, 0, CAPTURE_RING_HEADER_BYTES / 8);
    this.#u8 = new Uint8Array(ring, CAPTURE_RING_HEADER_BYTES);
    this.#u32 = new Uint32Array(ring, CAPTURE_RING_HEADER_BYTES);
    this.#f64 = new Float64Array(ring, CAPTURE_RING_HEADER_BYTES);
    this.#tail = Atomics.load(this.#hdr, TAIL) >>> 0;
    this.#rec = {
      dir: 0,
      timeUs: 0,
      frameLen: 0,
      hdrAt: 0,
      frame: this.#u8.subarray(0, 0),
      bytes: this.#u8,
    };
  }

  /**
   * Calls `fn` for each published record (one object, reused: valid only during the call), in order, until `fn` returns
   * false (that record stays for the next call); frees their space.
   * Returns the records consumed. A malformed record (counted) drops
   * everything published so far.
   */
  drain(fn: (r: CaptureRecord) => boolean): number {
    const head = Atomics.load(this.#hdr, HEAD) >>> 0;
    let tail = this.#tail;
    let n = 0;
    const mask = this.#area - 1;
    const u32 = this.#u32;
    while (tail !== head) {
      const used = (head - tail) >>> 0;
      const pos = tail & mask;
      const len = u32[pos >>> 2];
      if (len === RECORD_WRAP) {
        const toEnd = this.#area - pos;
        if (toEnd > used) {
          tail = this.#corrupt(head);
          break;
        }
        tail = (tail + toEnd) >>> 0;
        continue;
      }
      const w = pos >>> 2;
      const frameLen = u32[w + 1];
      const capLen = u32[w + 2];
      const dir = u32[w + 3];
      if (
        (len & 7) !== 0 || len < RECORD_HEAD_BYTES || len > used || len > this.#area - pos ||
        capLen > frameLen || align8(RECORD_HEAD_BYTES + capLen) !== len ||
        (dir !== DIR_TX && dir !== DIR_RX)
      ) {
        tail = this.#corrupt(head);
        break;
      }
      const start = pos + RECORD_HEAD_BYTES;
      // One record object, reused: the callback must not keep it.
      const rec = this.#rec;
      rec.dir = dir;
      rec.timeUs = this.#f64[(pos >>> 3) + 2];
      rec.frameLen = frameLen;
      rec.hdrAt = pos + 24;
      rec.frame = this.#u8.subarray(start, start + capLen);
      const ok = fn(rec);
      if (!ok) break;
      tail = (tail + len) >>> 0;
      n++;
    }
    this.#tail = tail;
    Atomics.store(this.#hdr, TAIL, tail | 0);
    return n;
  }

  /** The share of the ring's space in use (0..1). */
  fill(): number {
    return this.pending() / this.#area;
  }

  /** Bytes published and not consumed. */
  pending(): number {
    return ((Atomics.load(this.#hdr, HEAD) >>> 0) - this.#tail) >>> 0;
  }

  #corrupt(head: number): number {
    this.#f[F_CORRUPT]++;
    return head;
  }
}
