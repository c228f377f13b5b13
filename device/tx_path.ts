/**
 * Guest transmit: chains from the TX virtqueue become records on the TX ring
 * (`ipc/datapath.ts`), which the writer `writev`s to the tap.
 *
 * Completion: a chain's used element is written when its (last) record is
 * made, and the record carries the used->idx value that publishes it; the
 * writer stores that value after the write (`TX_REC.USED_IDX`), so the
 * device is not woken per transmitted frame. Dropped chains ride on the next
 * record, or on a completion-only record at the end of a pump. The device
 * keeps fewer than `size` elements unpublished, and reaps the ring's tail
 * whenever it runs to free bounce space; it asks for EV_TX_DONE
 * (`waitForWriter()`) only when it has to wait.
 *
 * Per chain, by what the tap takes (`--offload auto`: everything a Linux tap
 * with IFF_VNET_HDR accepts on write; `off`: nothing):
 * - pass-through (zero copy): the header is copied out of guest memory once,
 *   validated against a copied prefix of the frame, and that validated copy
 *   is what the kernel sees (all zero when the tap takes no offloads: a
 *   frame that needs no checksum or segmentation); the frame itself goes
 *   from guest memory;
 * - segmented in place (TSO to a tap without it, `--offload off`): each
 *   segment's headers are built in the bounce arena from the validated
 *   header copy, and its payload goes from guest memory, as QEMU's software
 *   segmentation does (hw/net/net_tx_pkt.c): no copy of the payload. The
 *   TCP checksum is summed over guest memory; a guest that changes its
 *   payload meanwhile only spoils the checksum of its own segments;
 * - software: the frame is copied, its checksum completed or its TCP stream
 *   segmented (device/offload.ts), and the results placed in the bounce arena
 *   (checksum completion, and TSO frames that do not fit the in-place path:
 *   more segments than the ring has room for, or a too fragmented chain).
 *
 * Failure policy: a bad frame is completed with used length 0 and counted by
 * reason (`drops`); a corrupt ring leaves the queue in needs-reset (see
 * virtqueue.ts). Nothing here throws on guest input.
 *
 * @module
 */

import { chainRead } from "./chain.ts";
import type { GuestMemory } from "./guest_memory.ts";
import { type DeviceIoRings, putIovec } from "./io_rings.ts";
import {
  createNetHdr,
  NET_DROP_COUNT,
  NET_DROP_NAMES,
  NetDrop,
  type NetDropCode,
  readNetHdr,
  validateTxHeader,
  VIRTIO_NET_HDR_GSO_ECN,
  type VirtioNetHdr,
  writeNetHdr,
} from "./net_header.ts";
import { createNetOffloadContext, decideTx, processTx, TxAction } from "./offload.ts";
import { addPartialSum, sumBytes } from "./checksum.ts";
import { createTcpSegmentPlan, planTcpSegments, writeSegmentHeaders } from "./segment.ts";
import { POP_CHAIN, POP_DROPPED, type Virtqueue } from "./virtqueue.ts";
import {
  IOVEC_WORDS,
  MAX_FRAME_BYTES,
  NET_HDR_BYTES,
  TX_MAX_IOV,
  TX_REC,
  TXF_COMPLETE_ONLY,
} from "../ipc/datapath.ts";
import { ETH_HLEN } from "./frame_parse.ts";

/** Bytes of a frame copied to validate its headers without copying the frame. */
const HEADER_PREFIX = 256;
/** Software work waits while less than this is free in the bounce arena. */
const BOUNCE_LOW_WATER = 256 * 1024;
/** Records handed to the writer at once while a long batch is still being walked. */
const PUBLISH_BATCH = 32;
/**
 * Free TX records the pump waits for while the tap takes no offloads, so
 * that a TSO frame's segments (45 at the usual 1448-byte MSS) fit the ring
 * and can be segmented in place.
 */
const SEGMENT_RECORD_RESERVE = 64;

/** Extra drop reasons of the TX path, counted beside NetDrop's. */
export const TX_DROP_RUNT = "RUNT";
export const TX_DROP_TOO_BIG = "TOO_BIG";
export const TX_DROP_STALE = "STALE_MEMORY";
export const TX_DROP_BOUNCE_FULL = "BOUNCE_FULL";

/** One transmit queue's data path. Single-threaded: the device loop calls it. */
export class TxPath {
  /** Frames handed to the writer, and their bytes (without the net header). */
  frames = 0;
  bytes = 0;
  /** TSO frames segmented in place (payload from guest memory); `segmented` counts all. */
  segmentedInPlace = 0;
  /** Drops by reason name. */
  readonly drops: Record<string, number> = {};

  /** NET_OFFLOAD_* the driver may use (from HOST_* features). */
  hostOffloads = 0;
  /** NET_OFFLOAD_* the tap takes on write: all (auto) or none (off). */
  sinkOffloads = 0;

  readonly #hdr: VirtioNetHdr = createNetHdr();
  readonly #zeroHdr: VirtioNetHdr = createNetHdr();
  readonly #hdrBytes = new Uint8Array(NET_HDR_BYTES);
  readonly #prefix = new Uint8Array(HEADER_PREFIX);
  /** The empty prefix non-GSO frames are validated with: no view made per frame. */
  readonly #noPrefix = new Uint8Array(0);
  readonly #frame = new Uint8Array(MAX_FRAME_BYTES);
  readonly #ctx = createNetOffloadContext();
  readonly #plan = createTcpSegmentPlan();
  /** Free records the pump waits for without offloads (a quarter of a small ring). */
  readonly #segmentReserve: number;
  /** Byte view of the TX ring's record words, for writing headers into records. */
  readonly #recBytes: Uint8Array;

  // Records published and not yet released by the writer, oldest first: the
  // used->idx each publishes and the bounce mark to free up to.
  readonly #inIdx: Uint16Array;
  readonly #inMark: Float64Array;
  #inStart = 0;
  #inCount = 0;
  /** used->idx as of the last record the writer released: what the driver has seen. */
  #confirmed = 0;

  // Software-built frames waiting for ring space: bounce offset, length, head.
  readonly #pendAt: Float64Array;
  readonly #pendLen: Uint32Array;
  readonly #pendHead: Int32Array;
  readonly #pendMark: Float64Array;
  #pendStart = 0;
  #pendCount = 0;
  #head = -1;
  #token = 0;
  #unpublished = 0;

  constructor(
    private readonly memory: GuestMemory,
    private readonly queue: Virtqueue,
    private readonly rings: DeviceIoRings,
    /** Host virtual address of each guest-memory slot's first byte. */
    private readonly hostBase: Float64Array,
  ) {
    const cap = rings.tx.capacity;
    this.#segmentReserve = Math.max(1, Math.min(SEGMENT_RECORD_RESERVE, cap >> 2));
    this.#inIdx = new Uint16Array(cap);
    this.#inMark = new Float64Array(cap);
    this.#confirmed = queue.usedIdx;
    const pend = 4096;
    this.#pendAt = new Float64Array(pend);
    this.#pendLen = new Uint32Array(pend);
    this.#pendHead = new Int32Array(pend);
    this.#pendMark = new Float64Array(pend);
    const w = rings.tx.words;
    this.#recBytes = new Uint8Array(w.buffer, w.byteOffset, w.byteLength);
  }

  /** Records the writer has not released yet. */
  get outstanding(): number {
    return this.#inCount;
  }

  /** Software-built frames still waiting for ring space. */
  get pending(): number {
    return this.#pendCount;
  }

  /**
   * Moves available chains to the writer until the queue is empty or the ring
   * or bounce arena is full; wakes the writer once. Returns true if it
   * stopped for lack of space (call again after `reap()`).
   */
  pump(popNew = true): boolean {
    const ring = this.rings.tx;
    let blocked = false;
    let published = 0;
    for (;;) {
      if (this.#pendCount > 0 && !this.#flushPending()) {
        blocked = true;
        break;
      }
      // Quiescing (NetDevice.quiesce): what was taken goes out, nothing new is taken.
      if (!popNew) break;
      if (ring.freeSpace() < 1 || this.#inCount >= this.#inIdx.length) {
        blocked = true;
        break;
      }
      // Each chain adds one used element the driver cannot see until the
      // writer publishes it: never more than the ring has slots.
      if (this.#unseen() + this.#pendCount >= this.queue.size) {
        blocked = true;
        break;
      }
      if (
        this.sinkOffloads === 0 &&
        (this.#bounceFree() < BOUNCE_LOW_WATER || ring.freeSpace() < this.#segmentReserve)
      ) {
        blocked = true;
        break;
      }
      const r = this.queue.popAvail();
      if (r === POP_DROPPED) continue;
      if (r !== POP_CHAIN) break;
      this.#transmit();
      // Publish in batches: the writer starts on the first frames while we walk more.
      if (this.#unpublished >= PUBLISH_BATCH) {
        published += ring.publish();
        this.#unpublished = 0;
        this.rings.signalTx();
      }
    }
    // Chains dropped since the last record: a record of their own carries them.
    if (this.queue.pendingUsed > 0) this.#completeOnly();
    published += ring.publish();
    this.#unpublished = 0;
    if (published > 0) this.rings.signalTx();
    return blocked;
  }

  /**
   * After `pump()` reported it is blocked: asks the writer for EV_TX_DONE
   * with its next release, then looks once more (Dekker with the writer's
   * release-then-check). Returns true when records were released meanwhile:
   * pump again instead of sleeping.
   */
  waitForWriter(): boolean {
    this.rings.wantTxDone();
    return this.reap() > 0;
  }

  /**
   * Takes note of the records the writer released (in order; their chains
   * are already published) and frees their bounce space. Returns how many.
   */
  reap(): number {
    const ring = this.rings.tx;
    const outstanding = ring.capacity - ring.freeSpace();
    let done = this.#inCount - outstanding;
    if (done <= 0) return 0;
    const n = done;
    const cap = this.#inIdx.length;
    while (done-- > 0) {
      const i = this.#inStart;
      this.#confirmed = this.#inIdx[i];
      this.rings.freeBounceTo(this.#inMark[i]);
      this.#inStart = (i + 1) % cap;
      this.#inCount--;
    }
    return n;
  }

  /** Records on the TX ring the writer has not released yet. */
  get inFlight(): number {
    return this.#inCount;
  }

  /** Drops every software frame not yet handed to the writer (queue stop). */
  discardPending(): void {
    while (this.#pendCount > 0) {
      const head = this.#pendHead[this.#pendStart];
      if (head >= 0) this.queue.pushUsed(head, 0);
      this.#pendStart = (this.#pendStart + 1) % this.#pendHead.length;
      this.#pendCount--;
    }
  }

  /** Counters for `get-stats`. */
  counters(): Record<string, number> {
    const out: Record<string, number> = { frames: this.frames, bytes: this.bytes };
    for (const [k, v] of Object.entries(this.drops)) out[`drop_${k}`] = v;
    const s = this.#ctx.stats;
    out.passThrough = s.passThrough;
    out.csumCompleted = s.csumCompleted;
    out.segmented = s.segmented;
    out.segments = s.segments;
    out.segmentedInPlace = this.segmentedInPlace;
    return out;
  }

  /** Used elements written that the driver cannot see yet (handed to the writer or pending). */
  #unseen(): number {
    return ((this.queue.usedIdx - this.#confirmed) & 0xffff) + this.queue.pendingUsed;
  }

  #drop(reason: string): void {
    this.drops[reason] = (this.drops[reason] ?? 0) + 1;
    this.queue.pushUsed(this.queue.chain.head, 0);
  }

  /** A record with no frame: it publishes the dropped chains' used elements. */
  #completeOnly(): void {
    const ring = this.rings.tx;
    if (this.#inCount >= this.#inIdx.length) return;
    const at = ring.reserve();
    if (at < 0) return; // the next record carries them
    const w = ring.words;
    w[at + TX_REC.IOV_COUNT] = 0;
    w[at + TX_REC.FRAME_LEN] = 0;
    w[at + TX_REC.TOKEN] = this.#token++ >>> 0;
    w[at + TX_REC.FLAGS] = TXF_COMPLETE_ONLY;
    this.#track(at, -1, this.rings.bounceMark);
  }

  #dropCode(code: NetDropCode): void {
    this.#drop(code < NET_DROP_COUNT ? NET_DROP_NAMES[code] || `code${code}` : `code${code}`);
  }

  /** Handles the chain `popAvail()` just produced. */
  #transmit(): void {
    const chain = this.queue.chain;
    const frameLen = chain.readableBytes - NET_HDR_BYTES;
    if (frameLen < ETH_HLEN) return this.#drop(TX_DROP_RUNT);
    if (frameLen > MAX_FRAME_BYTES) return this.#drop(TX_DROP_TOO_BIG);
    // The header is read from guest memory exactly once; everything after
    // works on this copy (no double fetch the guest could race).
    if (chainRead(this.memory, chain, 0, this.#hdrBytes) !== NET_HDR_BYTES) {
      return this.#drop(TX_DROP_STALE);
    }
    readNetHdr(this.#hdrBytes, 0, this.#hdr);

    // Only GSO headers are checked against the frame's own headers; for the
    // rest the frame's length is all validateTxHeader reads.
    const prefixLen = (this.#hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN) !== 0
      ? Math.min(frameLen, HEADER_PREFIX)
      : 0;
    const prefix = prefixLen === 0 ? this.#noPrefix : this.#prefix.subarray(0, prefixLen);
    if (
      prefixLen > 0 && chainRead(this.memory, chain, NET_HDR_BYTES, prefix) !== prefixLen
    ) {
      return this.#drop(TX_DROP_STALE);
    }
    let headers = prefix;
    let v = validateTxHeader(this.#hdr, this.hostOffloads, prefix, frameLen, this.#ctx.parsed);
    if (v === NetDrop.PREFIX_SHORT) {
      // Unusual headers (long IPv6 extension chains): validate on a whole copy.
      headers = this.#frame.subarray(0, frameLen);
      if (chainRead(this.memory, chain, NET_HDR_BYTES, headers) !== frameLen) {
        return this.#drop(TX_DROP_STALE);
      }
      v = validateTxHeader(this.#hdr, this.hostOffloads, headers, frameLen, this.#ctx.parsed);
    }
    if (v !== NetDrop.OK) return this.#dropCode(v);
    const action = decideTx(this.#hdr, this.sinkOffloads);
    if (action === TxAction.PASS_THROUGH && chain.readableCount <= TX_MAX_IOV) {
      this.#passThrough(frameLen);
      return;
    }
    if (action === TxAction.SEGMENT && this.#segmentInPlace(headers)) return;
    if (action === TxAction.DROP) return this.#dropCode(NetDrop.OFFLOAD_UNSUPPORTED);
    this.#software(frameLen);
  }

  /** One record whose iovecs point straight into guest memory. */
  #passThrough(frameLen: number): void {
    const chain = this.queue.chain;
    const ring = this.rings.tx;
    const w = ring.words;
    const at = ring.reserve(); // pump() checked there is room
    let n = 0;
    let skip = NET_HDR_BYTES;
    for (let i = 0; i < chain.readableCount; i++) {
      let len = chain.length[i];
      let off = chain.offset[i];
      if (skip >= len) {
        skip -= len;
        continue;
      }
      off += skip;
      len -= skip;
      skip = 0;
      putIovec(w, at + TX_REC.IOV + n * IOVEC_WORDS, this.hostBase[chain.region[i]] + off, len);
      n++;
    }
    w[at + TX_REC.IOV_COUNT] = n;
    w[at + TX_REC.FRAME_LEN] = frameLen;
    w[at + TX_REC.TOKEN] = this.#token++ >>> 0;
    w[at + TX_REC.FLAGS] = 0;
    // A tap that takes no offloads gets an all-zero header (see #sink).
    writeNetHdr(
      this.sinkOffloads === 0 ? this.#zeroHdr : this.#hdr,
      this.#recBytes,
      (at + TX_REC.HDR) * 4,
    );
    this.#track(at, chain.head, this.rings.bounceMark);
    this.#ctx.stats.passThrough++;
    this.frames++;
    this.bytes += frameLen;
  }

  /**
   * Segments the TCP frame of the current chain, whose headers were
   * validated on the private copy `headers` (parsed in the offload
   * context), with each segment's headers in the bounce arena and its
   * payload in guest memory. Returns false, having done nothing, when the
   * frame does not fit this path; the copying path then takes it.
   */
  #segmentInPlace(headers: Uint8Array): boolean {
    const plan = this.#plan;
    if (planTcpSegments(headers, this.#ctx.parsed, this.#hdr.gsoSize, plan) !== NetDrop.OK) {
      return false; // the copying path drops it with the reason
    }
    const chain = this.queue.chain;
    const count = plan.count;
    const hlen = plan.hlen;
    const ring = this.rings.tx;
    // Each record: its header piece, then at most every readable segment.
    if (chain.readableCount >= TX_MAX_IOV || chain.epoch !== this.memory.epoch) return false;
    if (count > ring.freeSpace() || this.#inCount + count > this.#inIdx.length) return false;
    const base = this.rings.allocBounce(count * hlen);
    if (base < 0) return false;
    // Marks are absolute: segment i's headers end (count - 1 - i) * hlen before the head.
    const endMark = this.rings.bounceMark;
    const bounce = this.rings.bounce;
    const proto = headers.subarray(0, hlen);
    const w = ring.words;
    const memory = this.memory;
    // The payload cursor: readable segment `seg`, `segOff` bytes into it.
    let seg = 0;
    let segOff = NET_HDR_BYTES + hlen;
    while (seg < chain.readableCount && segOff >= chain.length[seg]) segOff -= chain.length[seg++];
    for (let i = 0; i < count; i++) {
      const at = base + i * hlen;
      const n = Math.min(plan.gsoSize, plan.end - hlen - i * plan.gsoSize);
      bounce.set(proto, at);
      const rec = ring.reserve(); // room checked above
      let pieces = 0;
      let sum = 0;
      for (let done = 0; done < n;) {
        const slot = chain.region[seg];
        const take = Math.min(chain.length[seg] - segOff, n - done);
        const start = chain.offset[seg] + segOff;
        sum = addPartialSum(sum, sumBytes(memory.region(slot)!.bytes, start, start + take), done);
        pieces++;
        putIovec(w, rec + TX_REC.IOV + pieces * IOVEC_WORDS, this.hostBase[slot] + start, take);
        done += take;
        segOff += take;
        if (segOff === chain.length[seg]) {
          seg++;
          segOff = 0;
        }
      }
      writeSegmentHeaders(plan, bounce, at, i, n, sum);
      putIovec(w, rec + TX_REC.IOV, this.rings.bounceHost + at, hlen);
      w[rec + TX_REC.IOV_COUNT] = pieces + 1;
      w[rec + TX_REC.FRAME_LEN] = hlen + n;
      w[rec + TX_REC.TOKEN] = this.#token++ >>> 0;
      w[rec + TX_REC.FLAGS] = 0;
      // Segments carry an all-zero header, as the copying path's do.
      writeNetHdr(this.#zeroHdr, this.#recBytes, (rec + TX_REC.HDR) * 4);
      this.#track(rec, i === count - 1 ? chain.head : -1, endMark - (count - 1 - i) * hlen);
      this.frames++;
      this.bytes += hlen + n;
    }
    const stats = this.#ctx.stats;
    stats.segmented++;
    stats.segments += count;
    this.segmentedInPlace++;
    return true;
  }

  /** Checksum completion or segmentation on a private copy, output to the bounce arena. */
  #software(frameLen: number): void {
    const chain = this.queue.chain;
    const frame = this.#frame.subarray(0, frameLen);
    if (chainRead(this.memory, chain, NET_HDR_BYTES, frame) !== frameLen) {
      return this.#drop(TX_DROP_STALE);
    }
    const before = this.#pendCount;
    this.#head = -1;
    const code = processTx(
      this.#ctx,
      this.#hdr,
      frame,
      frameLen,
      this.hostOffloads,
      this.sinkOffloads,
      this.#sink,
    );
    if (code !== NetDrop.OK || this.#head === -2 || this.#pendCount === before) {
      // Nothing (complete) was queued: undo the partial output and return the chain.
      this.#pendCount = before;
      return code !== NetDrop.OK
        ? this.#drop(NET_DROP_NAMES[code] || `code${code}`)
        : this.#drop(TX_DROP_BOUNCE_FULL);
    }
    // The frame's last piece completes the chain.
    const last = (this.#pendStart + this.#pendCount - 1) % this.#pendHead.length;
    this.#pendHead[last] = chain.head;
  }

  /** Receives each frame processTx produces; copies it into the bounce arena. */
  readonly #sink = (hdr: VirtioNetHdr, bytes: Uint8Array, length: number): void => {
    if (this.#head === -2) return; // an earlier piece did not fit
    const total = NET_HDR_BYTES + length;
    const at = this.rings.allocBounce(total);
    if (at < 0 || this.#pendCount === this.#pendHead.length) {
      this.#head = -2;
      return;
    }
    const b = this.rings.bounce;
    // A sink that takes no offloads (--offload off) gets an all-zero header:
    // the guest's other fields (hdr_len, csum_* without NEEDS_CSUM,
    // num_buffers) would reach the kernel unchecked otherwise.
    writeNetHdr(this.sinkOffloads === 0 ? this.#zeroHdr : hdr, b, at);
    b.set(length === bytes.length ? bytes : bytes.subarray(0, length), at + NET_HDR_BYTES);
    const i = (this.#pendStart + this.#pendCount) % this.#pendHead.length;
    this.#pendAt[i] = at;
    this.#pendLen[i] = total;
    this.#pendHead[i] = -1;
    this.#pendMark[i] = this.rings.bounceMark;
    this.#pendCount++;
  };

  /** Hands queued software frames to the writer while the ring has room. */
  #flushPending(): boolean {
    const ring = this.rings.tx;
    const w = ring.words;
    const cap = this.#pendHead.length;
    while (this.#pendCount > 0) {
      if (this.#inCount >= this.#inIdx.length) return false;
      const at = ring.reserve();
      if (at < 0) return false;
      const i = this.#pendStart;
      const total = this.#pendLen[i];
      const frameLen = total - NET_HDR_BYTES;
      const host = this.rings.bounceHost + this.#pendAt[i];
      // The software frame's header (all zero, or as built) rides in the record;
      // the iovec covers the frame after it.
      w[at + TX_REC.IOV_COUNT] = 1;
      w[at + TX_REC.FRAME_LEN] = frameLen;
      w[at + TX_REC.TOKEN] = this.#token++ >>> 0;
      w[at + TX_REC.FLAGS] = 0;
      this.#recBytes.set(
        this.rings.bounce.subarray(this.#pendAt[i], this.#pendAt[i] + NET_HDR_BYTES),
        (at + TX_REC.HDR) * 4,
      );
      putIovec(w, at + TX_REC.IOV, host + NET_HDR_BYTES, frameLen);
      this.#track(at, this.#pendHead[i], this.#pendMark[i]);
      this.frames++;
      this.bytes += frameLen;
      this.#pendStart = (i + 1) % cap;
      this.#pendCount--;
    }
    return true;
  }

  /**
   * Follows the record at `at` until the writer releases it: completes the
   * chain `head` ends (-1: none; a frame's earlier segments, or a
   * completion-only record) and puts the used->idx that publishes it, and
   * every element before it, into the record.
   */
  #track(at: number, head: number, mark: number): void {
    if (head >= 0) this.queue.pushUsed(head, 0);
    const idx = this.queue.handOffUsed();
    this.rings.tx.words[at + TX_REC.USED_IDX] = idx;
    this.#unpublished++;
    const i = (this.#inStart + this.#inCount) % this.#inIdx.length;
    this.#inIdx[i] = idx;
    this.#inMark[i] = mark;
    this.#inCount++;
  }

  #bounceFree(): number {
    return this.rings.bounceFree;
  }
}
