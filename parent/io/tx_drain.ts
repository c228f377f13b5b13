/**
 * Draining the TX ring onto the tap: what the writer does with the device's
 * TX records, and what the poller does with them when it waits for the
 * device's answer to a kick it read (`io/poller_worker.ts`). Each I/O worker
 * holds its own {@link TxDrainer} (private slots, its own io_uring ring); the two
 * take turns on the ring under a lock in `txShared`, a buffer only they hold.
 *
 * Trust: TX records are hostile (the device parses guest memory and could be
 * subverted). Each record is copied out of shared memory into private
 * buffers before any check, and the write runs on the private copy: the
 * 12-byte virtio_net_hdr from a private buffer (iov[0]), then the record's
 * iovecs, each checked to lie inside one granted region (`io/regions.ts`).
 * Failure policy for a bad record: do not write it, count CTL.IO_BAD_RECORD,
 * release it with the rest of the batch (so the ring moves) and raise
 * EV_IO_FAULT; the device resets the queue. A write the kernel refuses
 * counts CTL.WRITER_ERRORS and the frame is dropped (released as sent).
 *
 * Engines: with `ioUring: "auto"` (the default) a batch of up to
 * {@link TX_BATCH} records is queued as IORING_OP_WRITEV and submitted with
 * one io_uring_enter that returns when every write completed (`io_uring.ts`):
 * one system call per batch instead of one per frame, the figure that sets
 * the TX rate here. If the kernel refuses io_uring (disabled by sysctl,
 * seccomp, old kernel), or with `ioUring: "off"`, each frame is one
 * `writev`. Each record in a batch owns a private slot (header copy + iovec
 * array) that stays unchanged until the batch completed.
 *
 * TX completions: after a batch's writes completed, the drainer stores the
 * last record's USED_IDX into the TX used->idx (where: `txUsed` from the
 * parent, checked against the granted regions), reads the driver's
 * used_event (EVENT_IDX) or avail flags after that store, and writes the TX
 * call eventfd if the driver asked (vring_need_event, virtio 1.2 §2.7.10).
 * Then it releases the records, and raises EV_TX_DONE only when the device
 * asked for it (CTL.TX_WANT_DONE).
 *
 * Taking turns: a drainer takes TX_SHARED.LOCK with a compare-and-swap, or
 * leaves the records to the holder: a holder looks at the ring again after
 * it lets go, so whatever was published before a failed attempt is written.
 * The ring's consumer end (its tail) and the used->idx last published move
 * with the lock, in `txShared`, which the device cannot write.
 *
 * Rate limits (`rate_limiter.ts`, the NIC's TX buckets): while TX is
 * limited, a batch first takes a grant for the frames it holds (their
 * lengths as the records say; each frame is charged the length its checked
 * copy says) and stops before the first frame the grant does not cover.
 * The frames left stay on the ring, unreleased: the device finds the ring
 * full and stops taking chains, the guest's TX ring fills and its stack
 * waits. Nothing is dropped. A refused grant sets {@link TxDrainer.holdMs}:
 * the worker waits that long on a timer. Without limits this costs one
 * load and one branch per batch.
 *
 * EAGAIN: the tap fd is O_NONBLOCK (the poller needs that, and both share one
 * open file). tun's write side has no queue to fill: `tun_get_user()` only
 * waits for socket send buffer, which is INT_MAX unless TUNSETSNDBUF lowered
 * it. So EAGAIN is not expected; if it happens the frame is dropped and
 * counted like any other write error, as a NIC drops on a full TX ring.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import type { DirtyLog } from "./dirty_log.ts";
import { IoUring, type PreparedRing } from "./io_uring.ts";
import { fullBarrier, usedNotifyWanted } from "../../ipc/vring_notify.ts";
import {
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
  VNH_CSUM_OFFSET,
  VNH_CSUM_START,
  VNH_FLAGS,
  VNH_GSO_SIZE,
  VNH_GSO_TYPE,
} from "../../ipc/virtio_net_hdr.ts";
import { CorruptRingError, SpscRing } from "../../ipc/spsc_ring.ts";
import {
  CTL,
  EV_IO_FAULT,
  EV_TX_DONE,
  IOVEC_WORDS,
  MAX_FRAME_BYTES,
  NET_HDR_BYTES,
  TX_MAX_IOV,
  TX_REC,
  TXF_COMPLETE_ONLY,
  WRITER_ENGINE_IO_URING,
  WRITER_ENGINE_WRITEV,
} from "../../ipc/datapath.ts";
import { copyCheckedIovecs, IoRegions } from "./regions.ts";
import { DIR_TX, type RateLimiter } from "./rate_limiter.ts";
import { CAPTURE_FULL, CAPTURE_OFF, CAPTURE_ON, type CaptureProducer } from "./capture_ring.ts";
import {
  type FaultNotice,
  type InfoNotice,
  type IoUringMode,
  TX_SHARED_BYTES,
  type TxUsedPlace,
} from "./protocol.ts";

/** Records written before they are released and the device is signalled. */
export const TX_BATCH = 64;
/** ETH_HLEN: tun_get_user() refuses shorter frames. */
const ETH_HLEN = 14;

/** Word indices of `txShared` (an Int32Array over a SharedArrayBuffer only the I/O workers hold). */
export const TX_SHARED = {
  /** 1 while a drainer owns the TX ring's consumer end. */
  LOCK: 0,
  /** The ring's tail as the last holder left it, valid once TAIL_SET is 1. */
  TAIL: 1,
  TAIL_SET: 2,
  /** used->idx as last stored, plus 0x10000; 0: none yet. */
  PUBLISHED: 3,
} as const;

const sys = libc.sys;

/** The TX queue's used->idx and the driver's event word. */
interface TxUsedViews {
  place: TxUsedPlace;
  idx: Uint16Array;
  event: Uint16Array;
  eventIdx: boolean;
}

/**
 * Views of the TX ring's two words, after checking each lies inside one
 * granted region. Throws RangeError naming the bad one.
 */
function txUsedViews(place: TxUsedPlace, granted: IoRegions): TxUsedViews {
  const view = (addr: bigint, what: string) => {
    const a = Number(addr);
    if (!granted.contains(a, 2)) {
      throw new RangeError(`txUsed.${what} 0x${addr.toString(16)} is not in guest memory`);
    }
    return new Uint16Array(
      Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(addr)!, 2),
    );
  };
  return {
    place,
    idx: view(place.idxAddr, "idxAddr"),
    event: view(place.eventAddr, "eventAddr"),
    eventIdx: place.eventIdx,
  };
}

/**
 * A light second look at the header the device validated (`device/net_header.ts`
 * does the real check); the kernel checks it again in virtio_net_hdr_to_skb().
 */
function checkTxHeader(h: Uint8Array, at: number, frameLen: number): boolean {
  const flags = h[at + VNH_FLAGS];
  // §5.1.6.2: the driver MUST NOT set DATA_VALID or RSC_INFO on transmit.
  if ((flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) return false;
  const gsoType = h[at + VNH_GSO_TYPE];
  const gsoSize = h[at + VNH_GSO_SIZE] | (h[at + VNH_GSO_SIZE + 1] << 8);
  const base = gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  if (gsoType === VIRTIO_NET_HDR_GSO_NONE) {
    // no GSO: nothing more to say about gso_size
  } else if (
    base === VIRTIO_NET_HDR_GSO_TCPV4 || base === VIRTIO_NET_HDR_GSO_TCPV6 ||
    (gsoType === VIRTIO_NET_HDR_GSO_UDP || gsoType === VIRTIO_NET_HDR_GSO_UDP_L4)
  ) {
    // §5.1.6.2: gso_size is the segment size for a GSO frame; 0 makes no segments.
    if (gsoSize === 0) return false;
  } else {
    return false;
  }
  if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
    // §5.1.6.2: the checksum field lies at csum_start + csum_offset, inside the frame.
    const csumStart = h[at + VNH_CSUM_START] | (h[at + VNH_CSUM_START + 1] << 8);
    const csumOffset = h[at + VNH_CSUM_OFFSET] | (h[at + VNH_CSUM_OFFSET + 1] << 8);
    if (csumStart + csumOffset + 2 > frameLen) return false;
  }
  return true;
}

/** Words of one slot's iovec array: iov[0] is the header copy, iov[1..] the record's iovecs. */
const SLOT_WORDS = (TX_MAX_IOV + 1) * IOVEC_WORDS;
/** Bytes reserved per slot for the header copy (12 used). */
const HDR_SLOT_BYTES = 16;

export type DrainerNotice = InfoNotice | FaultNotice;

/** One I/O worker's means to write TX records to the tap (see the module comment). */
export class TxDrainer {
  ring: SpscRing | null = null;
  regions: IoRegions = IoRegions.EMPTY;
  callFd = -1;
  #tapFd = -1;
  /** Records this drainer wrote or completed (both workers count into CTL separately). */
  drained = 0;
  /** The dirty log while the front-end migrates the guest (`dirty_log.ts`), else null. */
  log: DirtyLog | null = null;
  /** The NIC's rate limits (null: none, not even at run time). */
  limiter: RateLimiter | null = null;
  /**
   * After a {@link drain} that took nothing: > 0 when records wait for the
   * rate limit's tokens, the ms to wait before draining again.
   */
  holdMs = 0;
  /** `--pcap`: where copies of the frames go (`capture_ring.ts`); null: no capture. */
  capture: CaptureProducer | null = null;
  #dead = false;
  #used: TxUsedViews | null = null;
  #uring: IoUring | null = null;
  readonly #ctl: Int32Array;
  readonly #shared: Int32Array;
  readonly #post: (n: DrainerNotice) => void;
  readonly #engineWord: number;
  readonly #what: string;

  // Private buffers (never shared, so the device cannot change them). Their
  // addresses are taken once, with libc.addressed: the code reads them
  // through the same holders, so they cannot be collected while an iovec or
  // an SQE names them.
  readonly #iovs = libc.addressed(new Uint32Array(TX_BATCH * SLOT_WORDS));
  readonly #hdrs = libc.addressed(new Uint8Array(TX_BATCH * HDR_SLOT_BYTES));
  readonly #hdrWords = new Uint32Array(this.#hdrs.view.buffer);
  /** Each slot's iovec array address (lo, hi words), for the SQEs. */
  readonly #slotLo = new Uint32Array(TX_BATCH);
  readonly #slotHi = new Uint32Array(TX_BATCH);
  /** Each slot's bytes for `writev`: header + frame. */
  readonly #slotExpected = new Int32Array(TX_BATCH);
  /** Each slot's completion result (bytes or -errno). */
  readonly #slotResult = new Int32Array(TX_BATCH);
  /** Slot 0's iovec array as bytes, for the `writev` engine. */
  readonly #slot0Bytes = new Uint8Array(this.#iovs.view.buffer, 0, SLOT_WORDS * 4);

  /**
   * @param engineWord CTL word that shows the engine (CTL.WRITER_ENGINE), or -1
   * @param what how notices name this drainer ("tap writes", ...)
   */
  constructor(
    ctl: Int32Array,
    txShared: SharedArrayBuffer,
    post: (n: DrainerNotice) => void,
    engineWord: number,
    what: string,
  ) {
    this.#ctl = ctl;
    this.#shared = new Int32Array(txShared, 0, TX_SHARED_BYTES / 4);
    this.#post = post;
    this.#engineWord = engineWord;
    this.#what = what;
    const iovs = this.#iovs;
    for (let slot = 0; slot < TX_BATCH; slot++) {
      const iovAddr = iovs.address + BigInt(slot * SLOT_WORDS * 4);
      this.#slotLo[slot] = Number(iovAddr & 0xffff_ffffn);
      this.#slotHi[slot] = Number(iovAddr >> 32n);
      const hdrAddr = this.#hdrs.address + BigInt(slot * HDR_SLOT_BYTES);
      const w = slot * SLOT_WORDS;
      iovs.view[w] = Number(hdrAddr & 0xffff_ffffn);
      iovs.view[w + 1] = Number(hdrAddr >> 32n);
      iovs.view[w + 2] = NET_HDR_BYTES;
      iovs.view[w + 3] = 0;
    }
  }

  get tapFd(): number {
    return this.#tapFd;
  }

  /** The tap to write to; with io_uring it becomes the ring's registered file. Only between batches. */
  set tapFd(fd: number) {
    this.#tapFd = fd;
    this.#uring?.useFixedFile(fd);
  }

  /**
   * The engine: io_uring when allowed and the kernel agrees, else `writev`.
   * Says which in a notice. `prepared`: a ring made during set-up to adopt
   * (`io_uring.ts`); without it the drainer makes its own.
   */
  start(mode: IoUringMode, prepared: PreparedRing | null = null): void {
    if (mode === "auto") {
      try {
        const uring = prepared ? IoUring.adopt(prepared, TX_BATCH) : IoUring.setup(TX_BATCH);
        this.#uring = uring;
        const fixed = uring.useFixedFile(this.#tapFd);
        this.#showEngine(WRITER_ENGINE_IO_URING);
        this.#post({
          kind: "notice",
          message: `${this.#what}: io_uring, up to ${TX_BATCH} frames per system call` +
            (fixed ? "" : " (the tap is not a registered file: the kernel refused)"),
        });
        return;
      } catch (e) {
        this.#post({
          kind: "notice",
          message: `${this.#what}: one writev per frame (io_uring unavailable: ${
            (e as Error).message
          })`,
        });
      }
    } else {
      this.#post({
        kind: "notice",
        message: `${this.#what}: one writev per frame (--io-uring off)`,
      });
    }
    this.#showEngine(WRITER_ENGINE_WRITEV);
  }

  #showEngine(v: number): void {
    if (this.#engineWord >= 0) Atomics.store(this.#ctl, this.#engineWord, v);
  }

  /** Where TX completions go (null: nowhere, tests of a worker alone). Throws RangeError outside `regions`. */
  setTxUsed(place: TxUsedPlace | null): void {
    this.#used = place === null ? null : txUsedViews(place, this.regions);
  }

  /**
   * New regions. A TX used ring outside them is not touched again (the
   * parent stops the queues before it takes their memory away; this is the
   * backstop): its completions are no longer published.
   */
  setRegions(r: IoRegions): void {
    if (this.#used !== null) {
      try {
        this.#used = txUsedViews(this.#used.place, r);
      } catch (e) {
        this.#used = null;
        this.#post({ kind: "fault", message: `tx completions stopped: ${(e as Error).message}` });
      }
    }
    this.regions = r;
  }

  /** Whether records wait and no other drainer holds the ring (so draining now would get them). */
  pending(): boolean {
    const ring = this.ring;
    if (ring === null || this.#dead) return false;
    if (Atomics.load(this.#shared, TX_SHARED.LOCK) !== 0) return false;
    return ring.unreleased();
  }

  /**
   * Writes up to {@link TX_BATCH} records if this drainer gets the ring;
   * returns the device event bits to raise. Sets {@link lastCount} to the
   * records taken (0: none waited, or the other drainer holds the ring and
   * will look again after it lets go).
   */
  drain(): number {
    this.lastCount = 0;
    this.holdMs = 0;
    const ring = this.ring;
    if (ring === null || this.#dead) return 0;
    const s = this.#shared;
    for (;;) {
      if (Atomics.compareExchange(s, TX_SHARED.LOCK, 0, 1) !== 0) return 0;
      let bits: number;
      try {
        this.#adopt(ring);
        bits = this.#batch(ring);
      } finally {
        Atomics.store(s, TX_SHARED.TAIL, ring.tail | 0);
        Atomics.store(s, TX_SHARED.TAIL_SET, 1);
        Atomics.store(s, TX_SHARED.LOCK, 0);
      }
      // Took some: the caller drains again. Took none: records published
      // while the lock was held may have been refused to the other drainer,
      // which then went to sleep; look once more now that it is free.
      // (Not adopt() and available() here: without the lock the tail may be
      // stale, and the ring would take a head past it for corruption.)
      if (
        this.lastCount !== 0 || bits !== 0 || this.holdMs !== 0 || this.#dead ||
        !ring.unreleased()
      ) {
        return bits;
      }
    }
  }
  lastCount = 0;

  close(): void {
    this.#uring?.close();
    this.#uring = null;
  }

  /** Continues from where the other drainer left the ring. */
  #adopt(ring: SpscRing): void {
    const s = this.#shared;
    if (Atomics.load(s, TX_SHARED.TAIL_SET) !== 0) ring.adoptTail(Atomics.load(s, TX_SHARED.TAIL));
  }

  #batch(ring: SpscRing): number {
    const c = this.#ctl;
    let n: number;
    try {
      n = ring.available();
    } catch (e) {
      this.#dead = true;
      this.#post({ kind: "fault", message: `tx ring: ${(e as Error).message}` });
      return e instanceof CorruptRingError ? EV_IO_FAULT : 0;
    }
    if (n === 0) return 0;
    if (n > TX_BATCH) n = TX_BATCH;
    const words = ring.words;
    // Rate limit: a grant for this batch, or wait (the module comment).
    const rl = this.limiter;
    let grantBytes = Infinity, grantFrames = Infinity, spentBytes = 0, spentFrames = 0;
    const limited = rl !== null && rl.active(DIR_TX);
    if (limited) {
      let want = 0;
      for (let i = 0; i < n; i++) {
        want += Math.min(words[ring.peek(i) + TX_REC.FRAME_LEN], MAX_FRAME_BYTES);
      }
      if (!rl.take(DIR_TX, want, n)) {
        this.holdMs = rl.waitMs;
        return 0;
      }
      grantBytes = rl.grantBytes(DIR_TX);
      grantFrames = rl.grantFrames(DIR_TX);
    }
    const batcher = this.#uring;
    let bits = 0;
    let bad = 0;
    let queued = 0;
    let usedIdx = 0;
    // Capture: the state once per batch; while it is CAPTURE_OFF (or there
    // is no capture) a frame costs the one branch below.
    const capState = this.capture === null ? CAPTURE_OFF : this.capture.state();
    if (capState === CAPTURE_ON) this.capture!.stamp();
    for (let i = 0; i < n; i++) {
      const slot = batcher === null ? 0 : queued;
      const off = ring.peek(i);
      const completeOnly = words[off + TX_REC.FLAGS] === TXF_COMPLETE_ONLY;
      if (!completeOnly && (spentBytes >= grantBytes || spentFrames >= grantFrames)) {
        n = i; // the rest waits for tokens, on the ring
        break;
      }
      usedIdx = words[off + TX_REC.USED_IDX] & 0xffff;
      if (completeOnly) continue; // no frame, only completions
      const iovcnt = this.#prepare(words, off, slot);
      if (iovcnt !== 0) {
        spentBytes += this.#slotExpected[slot] - NET_HDR_BYTES;
        spentFrames++;
      }
      if (capState !== CAPTURE_OFF && iovcnt !== 0) this.#capture(capState, slot, iovcnt);
      if (iovcnt === 0) {
        bad++;
      } else if (batcher === null) {
        const r = sys.writev(this.#tapFd, this.#slot0Bytes, iovcnt);
        if (Number(r) !== this.#slotExpected[0]) Atomics.add(c, CTL.WRITER_ERRORS, 1);
      } else {
        batcher.queueWritev(this.#tapFd, this.#slotLo[slot], this.#slotHi[slot], iovcnt, slot);
        queued++;
      }
    }
    if (limited) rl!.settle(DIR_TX, spentBytes, spentFrames);
    if (queued !== 0) this.#flushRing(batcher!, queued);
    // Every frame of the batch is with the kernel: its chains may go back.
    const call = this.#publish(usedIdx);
    ring.release(n);
    this.lastCount = n;
    this.drained += n;
    // Release, then look (Dekker with the device's want-then-reap).
    if (Atomics.load(c, CTL.TX_WANT_DONE) !== 0 && Atomics.exchange(c, CTL.TX_WANT_DONE, 0) !== 0) {
      bits |= EV_TX_DONE;
    }
    if (call && writeEventfd(c, this.callFd)) Atomics.add(c, CTL.TX_INTERRUPTS, 1);
    if (bad !== 0) {
      Atomics.add(c, CTL.IO_BAD_RECORD, bad);
      bits |= EV_IO_FAULT;
    }
    return bits;
  }

  /**
   * Copies the record at word `off` into `slot` and checks the copy. Returns
   * the iovec count for `writev` (header + frame pieces), or 0 for a bad
   * record. The checks read only the private copy.
   */
  #prepare(words: Uint32Array, off: number, slot: number): number {
    const count = words[off + TX_REC.IOV_COUNT];
    const frameLen = words[off + TX_REC.FRAME_LEN];
    // datapath.ts TX record: 1..TX_MAX_IOV iovecs.
    if (count < 1 || count > TX_MAX_IOV) return 0;
    if (frameLen < ETH_HLEN || frameLen > MAX_FRAME_BYTES) return 0;
    const hw = this.#hdrWords;
    const h = slot * (HDR_SLOT_BYTES / 4);
    hw[h] = words[off + TX_REC.HDR];
    hw[h + 1] = words[off + TX_REC.HDR + 1];
    hw[h + 2] = words[off + TX_REC.HDR + 2];
    // iov[0] of the slot is the header copy; the record's iovecs follow it.
    const sum = copyCheckedIovecs(
      words,
      off + TX_REC.IOV,
      this.#iovs.view,
      slot * SLOT_WORDS + IOVEC_WORDS,
      count,
      this.regions,
    );
    if (sum !== frameLen) return 0;
    if (!checkTxHeader(this.#hdrs.view, slot * HDR_SLOT_BYTES, frameLen)) return 0;
    this.#slotExpected[slot] = NET_HDR_BYTES + frameLen;
    return count + 1;
  }

  /**
   * Copies the frame prepared in `slot` into the capture ring (ON), or counts
   * it as not captured (FULL). Reads only the slot's private header copy and
   * its checked iovecs.
   */
  #capture(state: number, slot: number, iovcnt: number): void {
    const cap = this.capture!;
    if (state === CAPTURE_ON) {
      cap.tx(
        this.#hdrs.view,
        slot * HDR_SLOT_BYTES,
        this.#iovs.view,
        slot * SLOT_WORDS + IOVEC_WORDS,
        iovcnt - 1,
        this.#slotExpected[slot] - NET_HDR_BYTES,
        this.regions,
      );
    } else if (state === CAPTURE_FULL) {
      cap.overMax();
    }
  }

  /**
   * Submits the `queued` slots to io_uring and waits for all of them. If the
   * ring itself fails, this drainer falls back to `writev` for good; the
   * batch's frames count as errors (whether they were written is unknown).
   */
  #flushRing(ring: IoUring, queued: number): void {
    const c = this.#ctl;
    const result = this.#slotResult;
    result.fill(-1_000_000, 0, queued);
    try {
      ring.submitAndWait(result);
    } catch (e) {
      this.#uring = null;
      this.#showEngine(WRITER_ENGINE_WRITEV);
      this.#post({
        kind: "notice",
        message: `${this.#what}: io_uring failed (${
          (e as Error).message
        }); one writev per frame from now on`,
      });
    }
    let errors = 0;
    for (let slot = 0; slot < queued; slot++) {
      if (result[slot] !== this.#slotExpected[slot]) errors++;
    }
    if (errors !== 0) Atomics.add(c, CTL.WRITER_ERRORS, errors);
  }

  /**
   * Stores the TX used->idx and decides the interrupt (virtio 1.2 §2.7.10:
   * with EVENT_IDX, when the index passed used_event since the last decision;
   * without, unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT;
   * `ipc/vring_notify.ts`). Returns whether to write the TX call eventfd.
   */
  #publish(idx: number): boolean {
    const u = this.#used;
    if (u === null) return false;
    const s = this.#shared;
    const last = Atomics.load(s, TX_SHARED.PUBLISHED);
    const old = last === 0 ? -1 : last & 0xffff;
    if (idx === old) return false;
    // The device's elements (written ahead) become visible with the index: log the ring first.
    this.log?.markUsed(this.log.txUsed);
    Atomics.store(u.idx, 0, idx);
    Atomics.store(s, TX_SHARED.PUBLISHED, idx | 0x10000);
    // The load of the driver's word must not pass this store (§2.7.10).
    fullBarrier();
    return usedNotifyWanted(u.eventIdx, Atomics.load(u.event, 0), idx, old);
  }
}

/**
 * Adds 1 to the eventfd `fd` (no-op for -1); a failed write counts in the
 * control block's `errorWord` (default CTL.WRITER_ERRORS). Returns whether
 * it was written (libc.eventfdSignal: a pipe whose reader is gone fails, it
 * does not kill the process).
 */
export function writeEventfd(
  c: Int32Array,
  fd: number,
  errorWord: number = CTL.WRITER_ERRORS,
): boolean {
  if (fd < 0) return false;
  if (libc.eventfdSignal(fd)) return true;
  Atomics.add(c, errorWord, 1);
  return false;
}
