/**
 * One RX queue's receive side in the poller: reads frames from the tap
 * straight into the guest buffers the device posted, and completes them
 * (`rx_publisher.ts`). No system call is made here: reads go through an
 * {@link RxReadEngine} (`rx_engine.ts`: `readv` and io_uring on the tap;
 * tests: a fake tap), so the code the daemon runs is the code the tests and
 * fuzzers run.
 *
 * Receiving: one chain per frame, or (RXF_MERGEABLE) consecutive chains
 * until they can hold the tap's longest frame (`frameRoom`: what the parent
 * says, from the tap's MTU and offloads; the maximum, 64 KiB GSO, until
 * then), then a private overflow iovec: a frame that does not fit shows as
 * `n > capacity` instead of being truncated; it is dropped (CTL.POLLER_TOO_BIG,
 * rx-done {0, n, RX_STATUS_TOO_BIG}) and no chain is consumed; a frame longer
 * than `frameRoom` also makes the poller assume the maximum from then on.
 * Per batch (up to {@link RX_BATCH} frames) rx-post is released and rx-done
 * published once.
 *
 * Batched reads (an engine with `batch`): while the leading posted chains
 * can each take a whole frame, one system call carries one non-blocking read
 * per chain ({@link RxReceiver.receive}); reads run in order and each one
 * finds the tap's next frame or nothing. A chain whose read found nothing
 * while a later read found a frame is given back (rx-done {k, 0, RX_UNUSED};
 * the device posts it again). One system call then carries a batch of
 * frames instead of one.
 *
 * Discards (RXF_DISCARD): a chain the device could not use is completed
 * with length 0 when it reaches the front, in post order. So that one never
 * waits behind chains that no frame fits, chains in front of a discard are
 * given back (RX_UNUSED) as soon as the device says it posted one
 * (CTL.RX_DISCARDS): the discard reaches the front at once.
 *
 * Rate limits (`rate_limiter.ts`, the NIC's RX buckets): while RX is
 * limited, a batch takes a grant first and starts no read once the bytes
 * (past the net header) or frames it read reach it; a batch of reads in
 * one system call is cut to the reads a largest frame each could fill
 * (so a batch overshoots by one frame at most; the bucket owes it). A
 * refused grant holds the tap: {@link RxReceiver.look} stops watching it
 * and says when to look again. The tap's queue fills meanwhile, and the
 * kernel drops what does not fit in it (its txqueuelen, counted as the
 * tap's TX drops), as it does for any slow reader; vionet drops nothing.
 *
 * Trust: rx-post and rx-long records are hostile (`rx_stage.ts` copies and
 * checks them); a refused chain is consumed with rx-done {1, 0,
 * RX_STATUS_BAD_POST}, counted in CTL.IO_BAD_RECORD, and raises EV_IO_FAULT.
 * A ring whose indices break the protocol (CorruptRingError) stops this
 * queue's receiving for good (EV_IO_FAULT; the device resets the queue).
 *
 * @module
 */

import {
  CTL,
  EV_IO_FAULT,
  EV_RX_DONE,
  EV_RX_STARVED,
  IOVEC_WORDS,
  NET_HDR_BYTES,
  POLLER_ENGINE_READV,
  RX_DONE,
  RX_MAX_IOV,
  RX_POST,
  RX_STATUS_BAD_HEADER,
  RX_STATUS_BAD_POST,
  RX_STATUS_TOO_BIG,
  RX_UNUSED,
  RXF_DISCARD,
  RXF_LONG,
  RXF_MERGEABLE,
  rxSignalChains,
} from "../../ipc/datapath.ts";
import { CorruptRingError, type SpscRing } from "../../ipc/spsc_ring.ts";
import type { HostMemory } from "./regions.ts";
import { RX_FRAME_ROOM_MAX } from "./protocol.ts";
import type { RxPublisher } from "./rx_publisher.ts";
import { RxStage, STAGED } from "./rx_stage.ts";
import { DIR_RX, type RateLimiter } from "./rate_limiter.ts";

/** Frames read per batch before rx-done is published. */
export const RX_BATCH = 64;
/** Words of one read's iovec array in a batch: a chain's inline iovecs, then the overflow. */
export const BATCH_SLOT_WORDS = (RX_MAX_IOV + 1) * IOVEC_WORDS;
/** Reads in one batch start at this many and double while batches come back full. */
const BURST_MIN = 4;
/** How long the poller waits while rx-done is full: the device's release cannot wake it (ms). */
const RX_DONE_FULL_RETRY_MS = 1;
/**
 * How long to wait for enough mergeable buffers before reading with fewer
 * (ms). The clock restarts whenever the guest posts more, so a guest that is
 * refilling its ring is waited for; only one whose whole ring holds less than
 * a largest frame pays this delay (and may see such frames dropped).
 */
const ROOM_WAIT_MS = 20;
/**
 * Frames often come one per wake (a TCP ACK per segment the guest sent, one
 * GSO frame per wake towards it): then a batch reads one frame and leaves
 * the rest to the (level-triggered) wait, instead of a second read that
 * finds nothing. Every READ_ONE_BATCHES+1-th batch reads until the tap runs
 * dry again, to see whether frames still come one at a time.
 */
const READ_ONE_BATCHES = 3;
/** A batch result below -RESULT_BAD_HEADER marks a frame of (-result - RESULT_BAD_HEADER) bytes dropped for its header. */
const RESULT_BAD_HEADER = 1 << 20;
const EAGAIN = 11;
const EINTR = 4;

/** Batched reads from the tap: one system call for many. */
export interface RxBatchReader {
  /** Read i's iovec array starts at word i * {@link BATCH_SLOT_WORDS}. */
  readonly iov: Uint32Array;
  /** Queues read i over its slot's first `count` iovecs. */
  queue(i: number, count: number): void;
  /**
   * Runs the queued reads in order, non-blocking; `results[i]` is read i's
   * bytes or -errno. Throws when batching itself failed: the caller reads
   * one frame at a time from then on.
   */
  submit(results: Int32Array): void;
}

/** How frames come from the tap. */
export interface RxReadEngine {
  /** One non-blocking read into the first `count` iovecs of `iov`; bytes, or -errno. */
  readv(iov: Uint8Array, count: number): number;
  /** Batched reads, or null: one `readv` a frame. */
  batch: RxBatchReader | null;
  /** Where a frame's bytes beyond the chains go (never guest memory): iovec words. */
  readonly overflowLo: number;
  readonly overflowHi: number;
  readonly overflowLen: number;
}

/** What the poller's loop should do about the tap, from {@link RxReceiver.look}. */
export interface RxLook {
  /** Wait for frames: there is room for one. */
  watch: boolean;
  /** Wake up after this long anyway (ms; -1: no need). */
  timeoutMs: number;
  /** Device events to raise. */
  bits: number;
}

export interface RxReceiverOptions {
  ctl: Int32Array;
  rxPost: SpscRing;
  rxLong: SpscRing;
  rxDone: SpscRing;
  memory: HostMemory;
  publisher: RxPublisher;
  engine: RxReadEngine;
  /** The tap's longest frame, net header included. */
  frameRoom: number;
  /** Something the operator should know (logged at info by the parent). */
  notice: (message: string) => void;
  /** The rings broke the protocol: receiving stopped (the parent logs it as a fault). */
  fault: (message: string) => void;
  /** The NIC's rate limits (absent or null: none). */
  limiter?: RateLimiter | null;
}

/** One RX queue's receive side (see the module comment). */
export class RxReceiver {
  readonly #ctl: Int32Array;
  readonly #post: SpscRing;
  readonly #long: SpscRing;
  readonly #done: SpscRing;
  readonly #stage: RxStage;
  readonly #pub: RxPublisher;
  readonly #engine: RxReadEngine;
  readonly #notice: (message: string) => void;
  readonly #fault: (message: string) => void;
  #frameRoom: number;
  /** A ring broke the protocol: nothing more is read or completed. */
  #dead = false;
  /** Reads queued in the next batch. */
  #burstSize = BURST_MIN;
  /** What the last batch of reads did. */
  #burstChains = 0;
  #burstDrained = false;
  readonly #burstResult = new Int32Array(RX_BATCH);
  #readOne = false;
  #readOneLeft = 0;
  /** When the poller last had room for a largest frame, or saw the guest post more. */
  #roomWaitSince = 0;
  #roomWaitPosted = 0;
  /** Discard records completed (against CTL.RX_DISCARDS, the device's count). */
  #discards = 0;
  // Per batch: records consumed from rx-post and rx-long, records pushed to
  // rx-done (and of them, those that are not RX_PUBLISHED).
  #used = 0;
  #longUsed = 0;
  #pushed = 0;
  #pushedOthers = 0;
  readonly #limiter: RateLimiter | null;
  /** `now` (look()'s clock) before which the rate limit holds the tap; 0: not held. */
  #holdUntil = 0;
  /** This batch's rate-limit grant (Infinity: not limited), and what it read. */
  #grantBytes = Infinity;
  #grantFrames = Infinity;
  #readBytes = 0;
  #readFrames = 0;

  constructor(opts: RxReceiverOptions) {
    this.#ctl = opts.ctl;
    this.#post = opts.rxPost;
    this.#long = opts.rxLong;
    this.#done = opts.rxDone;
    this.#stage = new RxStage(opts.memory);
    this.#pub = opts.publisher;
    this.#engine = opts.engine;
    this.#frameRoom = opts.frameRoom;
    this.#notice = opts.notice;
    this.#fault = opts.fault;
    this.#limiter = opts.limiter ?? null;
  }

  /** Receiving stopped for good (a corrupt ring, or the used ring out of reach). */
  get dead(): boolean {
    return this.#dead;
  }

  /** The longest frame the tap can hand us now (the parent says so after TUNSCAP). */
  set frameRoom(bytes: number) {
    this.#frameRoom = bytes;
  }

  /**
   * New ranges iovecs may point into; the used ring must lie inside them,
   * else receiving stops (the parent stops the queues before it takes their
   * memory away, so that is a fault).
   */
  setMemory(memory: HostMemory): void {
    this.#stage.memory = memory;
    try {
      this.#pub.setMemory(memory);
    } catch (e) {
      this.#die(`RX publication stopped: ${(e as Error).message}`);
    }
  }

  /**
   * Before the poller waits: completes discards that reached the front,
   * and says whether to wait for frames (there is room for a largest one),
   * how long at most, and which device events to raise (EV_RX_STARVED when
   * it ran out of room and the device may not be asking for kicks).
   */
  look(now: number): RxLook {
    if (this.#stopped()) return { watch: false, timeoutMs: -1, bits: 0 };
    const c = this.#ctl;
    try {
      let bits = this.#settleDiscards();
      if (this.#done.freeSpace() === 0) {
        return { watch: false, timeoutMs: RX_DONE_FULL_RETRY_MS, bits };
      }
      if (this.#holdUntil !== 0) {
        // Held by the rate limit: the tap is not watched until tokens came.
        if (now < this.#holdUntil) {
          return { watch: false, timeoutMs: Math.ceil(this.#holdUntil - now), bits };
        }
        this.#holdUntil = 0;
      }
      if (this.#hasRoom(now)) {
        Atomics.store(c, CTL.POLLER_STARVED, 0);
        return { watch: true, timeoutMs: -1, bits };
      }
      // Starved: announce, then re-check (the device publishes, then reads the flag).
      const fresh = Atomics.exchange(c, CTL.POLLER_STARVED, 1) === 0;
      if (fresh) Atomics.add(c, CTL.POLLER_STARVATIONS, 1);
      if (this.#hasRoom(now)) {
        Atomics.store(c, CTL.POLLER_STARVED, 0);
        return { watch: true, timeoutMs: -1, bits };
      }
      if (fresh) {
        // The device may not be asking the guest for RX kicks while it
        // thought we had plenty (rxSignalChains): have it top up now. It
        // posts what the guest offers (and then has the writer wake us),
        // or asks for the guest's kick.
        bits |= EV_RX_STARVED;
        return { watch: false, timeoutMs: -1, bits };
      }
      if (this.#post.available() !== 0) {
        // Some mergeable buffers, not enough for a largest frame: a guest
        // with a small ring may never post more, so look again shortly and
        // then read with what there is.
        if (now - this.#roomWaitSince > ROOM_WAIT_MS) {
          Atomics.store(c, CTL.POLLER_STARVED, 0);
          return { watch: true, timeoutMs: ROOM_WAIT_MS, bits };
        }
        return { watch: false, timeoutMs: ROOM_WAIT_MS, bits };
      }
      return { watch: false, timeoutMs: -1, bits };
    } catch (e) {
      return { watch: false, timeoutMs: -1, bits: this.#ringFault(e) };
    }
  }

  /** Reads up to {@link RX_BATCH} frames into posted chains; returns the device event bits. */
  receive(): number {
    if (this.#stopped()) return 0;
    const rl = this.#limiter;
    const limited = rl !== null && rl.active(DIR_RX);
    if (limited) {
      if (!rl.take(DIR_RX, RX_BATCH * this.#frameRoom, RX_BATCH)) {
        this.#holdUntil = performance.now() + rl.waitMs;
        return 0;
      }
      this.#grantBytes = rl.grantBytes(DIR_RX);
      this.#grantFrames = rl.grantFrames(DIR_RX);
      this.#readBytes = this.#readFrames = 0;
    }
    try {
      return this.#receiveBatch();
    } catch (e) {
      this.#stage.clear();
      return this.#ringFault(e);
    } finally {
      if (limited) {
        rl.settle(DIR_RX, this.#readBytes, this.#readFrames);
        this.#grantBytes = this.#grantFrames = Infinity;
      }
    }
  }

  /** Whether this batch's rate-limit grant is spent (always false without limits). */
  #grantSpent(): boolean {
    return this.#readBytes >= this.#grantBytes || this.#readFrames >= this.#grantFrames;
  }

  /** Charges a frame read from the tap (`bytes` with its net header) to the grant. */
  #charge(bytes: number): void {
    this.#readBytes += bytes - NET_HDR_BYTES;
    this.#readFrames++;
  }

  /** Nothing more is received: a ring broke, or the device stopped the queue (CTL.RX_STOPPED). */
  #stopped(): boolean {
    return this.#dead || Atomics.load(this.#ctl, CTL.RX_STOPPED) !== 0;
  }

  #ringFault(e: unknown): number {
    if (!(e instanceof CorruptRingError)) throw e;
    this.#die(`rx rings: ${e.message}`);
    return EV_IO_FAULT;
  }

  #die(message: string): void {
    this.#dead = true;
    this.#fault(message);
  }

  /**
   * Whether the posted chains can take a largest frame: the first one unless
   * mergeable, else consecutive mergeable chains adding up to frameRoom.
   */
  #hasRoom(now: number): boolean {
    const ring = this.#post;
    const avail = ring.available();
    if (avail === 0) return false;
    if (avail !== this.#roomWaitPosted) {
      this.#roomWaitPosted = avail;
      this.#roomWaitSince = now;
    }
    const words = ring.words;
    let total = 0;
    for (let i = 0; i < avail; i++) {
      const off = ring.peek(i);
      const flags = words[off + RX_POST.FLAGS];
      if ((flags & RXF_MERGEABLE) === 0) return true;
      total += words[off + RX_POST.CAPACITY];
      if (total >= this.#frameRoom) {
        this.#roomWaitSince = now;
        return true;
      }
    }
    return false;
  }

  // ---- one batch ------------------------------------------------------------

  #beginBatch(): void {
    this.#used =
      this.#longUsed =
      this.#pushed =
      this.#pushedOthers =
        0;
    this.#stage.clear();
    this.#pub.begin();
  }

  /** Releases what the batch consumed, publishes rx-done and used->idx; returns device events. */
  #endBatch(bad: number): number {
    const c = this.#ctl;
    const done = this.#done;
    let bits = 0;
    this.#stage.clear();
    if (this.#pub.pending !== 0) {
      this.#pub.flush(done);
      this.#pushed++;
    }
    if (this.#used !== 0) this.#post.release(this.#used);
    if (this.#longUsed !== 0) this.#long.release(this.#longUsed);
    if (this.#pushed !== 0) {
      // Records before used->idx: the driver may offer a chain again once it
      // sees it used, and the device must find it retired then (Virtqueue.onAvailIdx).
      done.publish();
      if (this.#pushedOthers !== 0 || this.#pub.unsignalled >= rxSignalChains(this.#pub.size)) {
        bits |= EV_RX_DONE;
        this.#pub.unsignalled = 0;
      }
    }
    this.#pub.end();
    if (bad !== 0) {
      Atomics.add(c, CTL.IO_BAD_RECORD, bad);
      bits |= EV_IO_FAULT;
    }
    return bits;
  }

  /** Pushes a record that is not RX_PUBLISHED, after the published run (order is chain order). */
  #pushDone(chains: number, bytes: number, status: number): void {
    const done = this.#done;
    if (this.#pub.pending !== 0) {
      this.#pub.flush(done);
      this.#pushed++;
    }
    const off = done.reserve(); // the caller checked for space
    const w = done.words;
    w[off + RX_DONE.CHAINS] = chains;
    w[off + RX_DONE.BYTES] = bytes;
    w[off + RX_DONE.STATUS] = status;
    w[off + RX_DONE.FRAMES] = 0;
    this.#pushed++;
    this.#pushedOthers++;
  }

  /** The flags of the rx-post record `i` places past the batch's consumed ones. */
  #flagsAt(i: number): number {
    return this.#post.words[this.#post.peek(this.#used + i) + RX_POST.FLAGS];
  }

  /**
   * Stages the record `i` places past the consumed ones (its rx-long record
   * follows the staged ones). Returns the stage's answer.
   */
  #stageAt(i: number): number {
    const post = this.#post;
    const off = post.peek(this.#used + i);
    const words = post.words;
    if ((words[off + RX_POST.FLAGS] & RXF_LONG) === 0) {
      return this.#stage.stage(words, off, words, 0);
    }
    const k = this.#longUsed + this.#stage.longs;
    const longOff = k < this.#long.available() ? this.#long.peek(k) : -1;
    return this.#stage.stage(words, off, this.#long.words, longOff);
  }

  /**
   * Consumes the record at the front as refused or discarded (one chain,
   * with its rx-long record if it names one).
   */
  #consumeFront(): void {
    const long = (this.#flagsAt(0) & RXF_LONG) !== 0;
    this.#used++;
    if (long && this.#longUsed < this.#long.available()) this.#longUsed++;
  }

  /** Completes the discard records at the front; returns how many. */
  #discardFront(avail: number): number {
    let n = 0;
    while (this.#used < avail && (this.#flagsAt(0) & RXF_DISCARD) !== 0) {
      const off = this.#post.peek(this.#used);
      this.#pub.discard(this.#post.words[off + RX_POST.TOKEN]);
      this.#consumeFront();
      n++;
    }
    this.#discards += n;
    return n;
  }

  /**
   * When the device posted discards the poller has not completed
   * (CTL.RX_DISCARDS), gives back the chains in front of each and completes
   * it, so it never waits behind chains no frame fits. Returns device events.
   */
  #settleDiscards(): number {
    if (Atomics.load(this.#ctl, CTL.RX_DISCARDS) === this.#discards) return 0;
    if (this.#done.freeSpace() < 3) return 0; // looked at again once the device freed some
    this.#beginBatch();
    const avail = this.#post.available();
    for (;;) {
      this.#discardFront(avail);
      let first = -1;
      for (let i = 0; this.#used + i < avail; i++) {
        if (this.#flagsAt(i) & RXF_DISCARD) {
          first = i;
          break;
        }
      }
      if (first < 0 || this.#done.freeSpace() - this.#pushed < 3) break;
      // Give back the chains in front of it (with their rx-long records).
      let longs = 0;
      for (let i = 0; i < first; i++) if (this.#flagsAt(i) & RXF_LONG) longs++;
      this.#pushDone(first, 0, RX_UNUSED);
      Atomics.add(this.#ctl, CTL.POLLER_UNUSED, first);
      this.#used += first;
      this.#longUsed = Math.min(this.#longUsed + longs, this.#long.available());
    }
    return this.#endBatch(0);
  }

  #receiveBatch(): number {
    const c = this.#ctl;
    const stage = this.#stage;
    const engine = this.#engine;
    let bad = 0;
    let avail = this.#post.available();
    const free = this.#done.freeSpace();
    this.#beginBatch();
    // One readv per wake while frames come one at a time (see READ_ONE_BATCHES).
    const one = this.#readOne && this.#readOneLeft-- > 0;
    let readvFrames = 0;
    // Records: a frame needs at most a run flush and one record; a read in a burst three.
    for (let frames = 0; frames < RX_BATCH && free - this.#pushed >= 4;) {
      if (this.#grantSpent()) break; // the rate limit's grant for this batch is used up
      if (stage.chains === 0) {
        if (this.#used === avail && (avail = this.#post.available()) === this.#used) break;
        if (this.#discardFront(avail) !== 0) continue;
        const batch = engine.batch;
        if (batch !== null) {
          const limit = Math.min(RX_BATCH - frames, Math.floor((free - this.#pushed - 1) / 3));
          const got = this.#readBurst(batch, avail, limit);
          if (got >= 0) {
            frames += Math.max(got, 1);
            this.#used += this.#burstChains;
            if (this.#burstDrained) break;
            avail = this.#post.available();
            continue;
          }
        }
        if (one && readvFrames !== 0) break; // the wait says if another came
        if (this.#stageAt(0) !== STAGED) {
          this.#pushDone(1, 0, RX_STATUS_BAD_POST);
          this.#consumeFront();
          bad++;
          continue;
        }
      } else if (one && readvFrames !== 0) {
        break;
      }
      let chains = 1;
      if (stage.flags[0] & RXF_MERGEABLE) {
        // Stage more mergeable chains until they hold a largest frame, or none are left.
        while (stage.total < this.#frameRoom && this.#used + stage.chains < avail) {
          if ((this.#flagsAt(stage.chains) & RXF_MERGEABLE) === 0) break;
          if (this.#stageAt(stage.chains) !== STAGED) break; // a bad one is refused when it comes first
        }
        // Only the leading mergeable run; stage() keeps flags, so count it.
        while (chains < stage.chains && (stage.flags[chains] & RXF_MERGEABLE) !== 0) chains++;
        // Not room for a largest frame yet: wait for the guest's next buffers
        // rather than read a frame that may not fit (it would be dropped).
        if (stage.total < this.#frameRoom && frames > 0) break;
      }
      const { iovs, capacity } = stage.sumOf(chains);
      // The overflow iovec goes after the used chains; save the slot it covers.
      const iov = stage.iov;
      const o = iovs * IOVEC_WORDS;
      const s0 = iov[o], s1 = iov[o + 1], s2 = iov[o + 2], s3 = iov[o + 3];
      iov[o] = engine.overflowLo;
      iov[o + 1] = engine.overflowHi;
      iov[o + 2] = engine.overflowLen;
      iov[o + 3] = 0;
      const r = engine.readv(stage.iovBytes, iovs + 1);
      iov[o] = s0;
      iov[o + 1] = s1;
      iov[o + 2] = s2;
      iov[o + 3] = s3;
      if (r <= 0) {
        if (r < 0 && r !== -EAGAIN && r !== -EINTR) Atomics.add(c, CTL.POLLER_ERRORS, 1);
        if (!one) {
          // Read until the tap ran dry: one frame or none means they come one at a time.
          this.#readOne = readvFrames <= 1;
          this.#readOneLeft = READ_ONE_BATCHES;
        }
        break;
      }
      frames++;
      readvFrames++;
      this.#charge(r);
      if (r > capacity) {
        // Too big for the chains: drop it, keep the chains for the next frame.
        Atomics.add(c, CTL.POLLER_TOO_BIG, 1);
        if (r > this.#frameRoom) this.#roomExceeded(r);
        this.#pushDone(0, r, RX_STATUS_TOO_BIG);
        continue;
      }
      let consumed = 0;
      for (let seen = 0; seen < r; consumed++) seen += stage.capacity[consumed];
      if (!this.#pub.frame(stage, 0, 0, consumed, r)) {
        // A header the guest cannot take: dropped, the chains keep for the next frame.
        this.#pushDone(0, r, RX_STATUS_BAD_HEADER);
        continue;
      }
      this.#pub.add(consumed, r);
      this.#used += consumed;
      this.#longUsed += stage.unstage(consumed);
    }
    return this.#endBatch(bad);
  }

  /** A frame longer than `frameRoom` came: assume the largest from now on (until the parent says). */
  #roomExceeded(bytes: number): void {
    if (this.#frameRoom === RX_FRAME_ROOM_MAX) return;
    this.#notice(
      `a ${bytes}-byte frame is longer than the ${this.#frameRoom} bytes the tap's frames ` +
        `were said to take; it was dropped, and frames are read with room for ` +
        `${RX_FRAME_ROOM_MAX} bytes from now on`,
    );
    this.#frameRoom = RX_FRAME_ROOM_MAX;
  }

  /**
   * Reads a batch of frames with one system call: one non-blocking read per
   * posted chain, for the leading chains that can each take the longest
   * frame (`frameRoom`), at most `limit` of them. Each read either fills its
   * chain or finds nothing (in order: the tap's next frames). A chain left
   * unfilled (no frame, a frame too long, or a header the guest cannot take)
   * before a chain that got a frame is given back (RX_UNUSED); chains after
   * the last frame stay posted. Returns the frames read, or -1 when fewer
   * than two chains qualify (then one `readv` does better).
   */
  #readBurst(batch: RxBatchReader, avail: number, limit: number): number {
    const c = this.#ctl;
    const stage = this.#stage;
    let max = Math.min(limit, this.#burstSize, avail - this.#used);
    if (this.#grantBytes !== Infinity || this.#grantFrames !== Infinity) {
      // Rate limit: no more reads than the grant covers if each brought a largest frame.
      const bytesLeft = this.#grantBytes - this.#readBytes;
      const framesLeft = this.#grantFrames - this.#readFrames;
      max = Math.min(max, Math.ceil(framesLeft), Math.ceil(bytesLeft / this.#frameRoom));
    }
    const words = this.#post.words;
    let k = 0;
    while (k < max) {
      const off = this.#post.peek(this.#used + k);
      if (words[off + RX_POST.CAPACITY] < this.#frameRoom) break;
      // Inline chains only; a discard or a long chain ends the burst.
      if (words[off + RX_POST.FLAGS] & (RXF_DISCARD | RXF_LONG)) break;
      if (this.#stageAt(k) !== STAGED) break; // a bad record is refused when it comes first
      k++;
    }
    if (k < 2) {
      stage.clear();
      return -1;
    }
    const iov = batch.iov;
    let src = 0;
    for (let i = 0; i < k; i++) {
      const n = stage.count[i] * IOVEC_WORDS;
      const w = i * BATCH_SLOT_WORDS;
      for (let j = 0; j < n; j++) iov[w + j] = stage.iov[src + j];
      src += n;
      iov[w + n] = this.#engine.overflowLo;
      iov[w + n + 1] = this.#engine.overflowHi;
      iov[w + n + 2] = this.#engine.overflowLen;
      iov[w + n + 3] = 0;
      batch.queue(i, stage.count[i] + 1);
    }
    const result = this.#burstResult;
    result.fill(-EAGAIN, 0, k);
    try {
      batch.submit(result);
      Atomics.add(c, CTL.POLLER_BATCHES, 1);
    } catch (e) {
      // Reads it did not report are lost frames; their chains stay posted.
      this.#engine.batch = null;
      Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_READV);
      this.#notice(
        `batched reads failed (${(e as Error).message}); one readv per frame from now on`,
      );
    }
    // Which reads delivered a frame (published now).
    let last = -1;
    let iovw = 0;
    for (let i = 0; i < k; i++) {
      const r = result[i];
      if (r > 0) this.#charge(r);
      if (r > 0 && r <= stage.capacity[i]) {
        if (!this.#pub.frame(stage, i, iovw, 1, r)) {
          result[i] = -RESULT_BAD_HEADER - r; // dropped below, its chain unused
        } else {
          last = i;
        }
      }
      iovw += stage.count[i] * IOVEC_WORDS;
    }
    let frames = 0;
    let run = 0; // chains to give back before the next frame
    let unused = 0;
    let drained = false;
    for (let i = 0; i < k; i++) {
      const r = result[i];
      if (r > 0 && r <= stage.capacity[i]) {
        if (run !== 0) {
          this.#pushDone(run, 0, RX_UNUSED);
          unused += run;
          run = 0;
        }
        // Its used element is written (above); it joins the record in chain order.
        this.#pub.add(1, r);
        frames++;
        continue;
      }
      if (r > 0) {
        // Longer than its chain (and frameRoom): dropped, as the overflow shows.
        Atomics.add(c, CTL.POLLER_TOO_BIG, 1);
        this.#pushDone(0, r, RX_STATUS_TOO_BIG);
        this.#roomExceeded(r);
      } else if (r <= -RESULT_BAD_HEADER) {
        this.#pushDone(0, -r - RESULT_BAD_HEADER, RX_STATUS_BAD_HEADER);
        frames++;
      } else {
        drained = true;
        if (r !== -EAGAIN && r !== -EINTR) Atomics.add(c, CTL.POLLER_ERRORS, 1);
      }
      if (i < last) run++;
    }
    if (unused !== 0) Atomics.add(c, CTL.POLLER_UNUSED, unused);
    stage.clear();
    // Full batches double the next; otherwise size it to what came.
    this.#burstSize = drained ? Math.max(BURST_MIN, frames * 2) : Math.min(RX_BATCH, k * 2);
    this.#burstChains = last + 1;
    this.#burstDrained = drained;
    return frames;
  }
}
