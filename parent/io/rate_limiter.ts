/**
 * Rate limits of one VM interface: token buckets in a SharedArrayBuffer that
 * every I/O worker of every queue pair takes from, so a limit is the NIC's,
 * not a pair's (`--rate-limit`, `POST /rate-limit`).
 *
 * Model (the facts of Firecracker's rate limiter; none of its code): each
 * direction has up to two buckets, one of bytes (bandwidth) and one of
 * frames (ops). A bucket holds at most `size` tokens, starts full, and
 * refills continuously at `rate` tokens a second (Firecracker states the
 * same as `size` tokens per `refill_time`). A frame takes its length in
 * bytes from the one and 1 from the other.
 *
 * A frame may start while every limited bucket of its direction holds a
 * token; it takes its whole size, and the bucket may go below zero (it owes).
 * Firecracker lets a frame larger than the bucket through the same way and
 * then waits for the refill; here every frame does, so the long-run rate is
 * exactly `rate` and the overshoot at any moment is at most one frame per
 * worker. While a bucket is empty or owes, its direction is held: the
 * worker takes no more frames and waits ({@link RateLimiter.waitMs}, a timer,
 * never a spin) until the bucket holds a small quantum again.
 *
 * Sharing: the writers and pollers of all pairs take under one spin lock
 * (a word of the buffer; the critical section is a few arithmetic steps).
 * A worker takes a grant for a whole batch ({@link RateLimiter.take}: at
 * most what it asks for), spends it frame by frame without the lock, and
 * gives back what it did not use, or owes what it overspent
 * ({@link RateLimiter.settle}). What one worker holds, the others do not
 * see, so no two workers spend the same tokens; a worker that finds the
 * tokens only lent out looks again 0.2 ms later, and that is not a hold.
 *
 * The clock is injected (a monotonic milliseconds counter shared by all
 * threads: `libc.monotonicMs`; tests pass their own).
 *
 * Trust: only the parent and the I/O workers hold this buffer; the device
 * never sees it, so a hostile device cannot raise its own limit.
 *
 * @module
 */

/** Directions: tx is what the guest transmits (towards the tap), rx what it receives. */
export const DIR_TX = 0;
export const DIR_RX = 1;
export type Direction = typeof DIR_TX | typeof DIR_RX;
export const DIRECTION_NAMES = ["tx", "rx"] as const;

/** One bucket: `rate` tokens a second, at most `size` held. */
export interface BucketLimit {
  rate: number;
  size: number;
}

/** One direction's limits; null: that bucket is not limited. */
export interface DirectionLimit {
  bytes: BucketLimit | null;
  frames: BucketLimit | null;
}

/** Both directions' limits. */
export interface RateLimits {
  tx: DirectionLimit;
  rx: DirectionLimit;
}

export const UNLIMITED: DirectionLimit = Object.freeze({ bytes: null, frames: null });

/** What the counters of one direction say. */
export interface DirectionCounters {
  /** Times the direction went from flowing to held. */
  throttles: number;
  /** Milliseconds it was held, the current hold included. */
  throttledMs: number;
  /** Tokens in the byte and frame buckets now (negative: owed); null when not limited. */
  byteTokens: number | null;
  frameTokens: number | null;
}

/**
 * A held direction resumes when its buckets hold this many seconds' worth
 * of tokens (or are full, when `size` is less): a wake-up every 2 ms at
 * most, not one per frame.
 */
const RESUME_SECONDS = 0.002;
/**
 * The longest one wait lasts (ms): a limit changed at run time is seen by a
 * held worker within this long, without anyone having to wake it.
 */
export const MAX_HOLD_MS = 50;
/** The shortest wait worth a timer (ms). */
const MIN_HOLD_MS = 0.2;
/**
 * Grants are settled within one batch; tokens still lent this long after
 * the last grant belong to a worker that was ended mid-batch, and are
 * forgotten (so they do not pass for tokens merely lent out).
 */
const LENT_STALE_MS = 100;

// ---- layout ------------------------------------------------------------------

/** Int32 words. */
const I_LOCK = 0;
/** Nonzero while the direction has a limited bucket (the hot path's one load). */
const I_ACTIVE = [1, 2];
/** Bumped by every change of the direction's limits (a grant from before is not given back). */
const I_GEN = [3, 4];
const INT_WORDS = 8;

/** Float64 fields of one bucket. */
/** B_LENT: tokens out in grants not settled yet (the bucket's own, lent for a batch). */
const B_RATE = 0, B_SIZE = 1, B_TOKENS = 2, B_LAST = 3, B_LENT = 4;
const BUCKET_FIELDS = 5;
/** Float64 fields of one direction: its two buckets, then the hold counters. */
const D_BYTES = 0, D_FRAMES = BUCKET_FIELDS;
const D_SINCE = 2 * BUCKET_FIELDS, D_HELD_MS = D_SINCE + 1, D_THROTTLES = D_SINCE + 2;
/** When the direction last lent tokens to a grant. */
const D_LENT_AT = D_SINCE + 3;
const DIR_FIELDS = D_SINCE + 4;

/** Bytes of the shared buffer. */
export const RATE_LIMIT_BYTES = INT_WORDS * 4 + 2 * DIR_FIELDS * 8;

/** A fresh buffer: nothing limited. */
export function createRateLimitBuffer(): SharedArrayBuffer {
  return new SharedArrayBuffer(RATE_LIMIT_BYTES);
}

/** One thread's handle on the shared buckets (see the module comment). */
export class RateLimiter {
  readonly buffer: SharedArrayBuffer;
  readonly #i: Int32Array;
  readonly #f: Float64Array;
  readonly #clock: () => number;
  /** The last grant per direction: bytes, frames (Infinity: not limited), and its generation. */
  readonly #grantBytes = [0, 0];
  readonly #grantFrames = [0, 0];
  readonly #grantGen = [0, 0];
  /** After a refused {@link take}: how long to wait (ms). */
  waitMs = 0;

  /** @throws {TypeError} when `buffer` is not a SharedArrayBuffer of {@link RATE_LIMIT_BYTES}. */
  constructor(buffer: SharedArrayBuffer, clock: () => number) {
    if (!(buffer instanceof SharedArrayBuffer) || buffer.byteLength !== RATE_LIMIT_BYTES) {
      throw new TypeError(
        `the rate-limit buffer must be a SharedArrayBuffer of ${RATE_LIMIT_BYTES} bytes`,
      );
    }
    this.buffer = buffer;
    this.#i = new Int32Array(buffer, 0, INT_WORDS);
    this.#f = new Float64Array(buffer, INT_WORDS * 4, 2 * DIR_FIELDS);
    this.#clock = clock;
  }

  /** Whether `dir` is limited at all: one load, the data path's only cost without limits. */
  active(dir: Direction): boolean {
    return Atomics.load(this.#i, I_ACTIVE[dir]) !== 0;
  }

  /** What a grant of `dir` allows, for the frame-by-frame loop (Infinity: no limit). */
  grantBytes(dir: Direction): number {
    return this.#grantBytes[dir];
  }
  grantFrames(dir: Direction): number {
    return this.#grantFrames[dir];
  }

  /**
   * Sets `dir`'s limits (null: none). Buckets start full; a grant taken under
   * the old limits is neither given back nor owed.
   * @throws {RangeError} for a rate or size that is not positive and finite.
   */
  configure(dir: Direction, limit: DirectionLimit | null): void {
    const l = limit ?? UNLIMITED;
    for (const b of [l.bytes, l.frames]) {
      if (b === null) continue;
      if (!(b.rate > 0 && Number.isFinite(b.rate) && b.size > 0 && Number.isFinite(b.size))) {
        throw new RangeError(`a bucket needs a positive rate and size, not ${b.rate}/${b.size}`);
      }
    }
    const now = this.#clock();
    this.#lock();
    try {
      const f = this.#f, d = dir * DIR_FIELDS;
      for (const [at, b] of [[d + D_BYTES, l.bytes], [d + D_FRAMES, l.frames]] as const) {
        f[at + B_RATE] = b?.rate ?? 0;
        f[at + B_SIZE] = b?.size ?? 0;
        f[at + B_TOKENS] = b?.size ?? 0;
        f[at + B_LENT] = 0;
        f[at + B_LAST] = now;
      }
      if (l.bytes === null && l.frames === null) this.#endHold(d, now);
      Atomics.add(this.#i, I_GEN[dir], 1);
      Atomics.store(this.#i, I_ACTIVE[dir], l.bytes !== null || l.frames !== null ? 1 : 0);
    } finally {
      this.#unlock();
    }
  }

  /** `dir`'s limits as configured. */
  limit(dir: Direction): DirectionLimit {
    this.#lock();
    try {
      const f = this.#f, d = dir * DIR_FIELDS;
      const bucket = (at: number): BucketLimit | null =>
        f[at + B_RATE] > 0 ? { rate: f[at + B_RATE], size: f[at + B_SIZE] } : null;
      return { bytes: bucket(d + D_BYTES), frames: bucket(d + D_FRAMES) };
    } finally {
      this.#unlock();
    }
  }

  /**
   * Takes a grant for a batch of at most `bytes` bytes and `frames` frames
   * from `dir`'s buckets. Returns false when the direction is held (a
   * limited bucket holds no token): then {@link waitMs} says how long to
   * wait before asking again, and nothing was taken. On true, spend it with
   * {@link grantBytes} / {@link grantFrames}: start a frame while both are
   * above what was spent, then {@link settle}.
   */
  take(dir: Direction, bytes: number, frames: number): boolean {
    const now = this.#clock();
    this.#lock();
    try {
      const f = this.#f, d = dir * DIR_FIELDS;
      const b = d + D_BYTES, p = d + D_FRAMES;
      refill(f, b, now);
      refill(f, p, now);
      const wait = Math.max(holdMs(f, b), holdMs(f, p));
      if (wait > 0 && now - f[d + D_LENT_AT] > LENT_STALE_MS) f[b + B_LENT] = f[p + B_LENT] = 0;
      if (wait > 0 && onlyLent(f, b) && onlyLent(f, p)) {
        // The tokens are there, lent to another worker's batch for a moment: not a hold.
        this.waitMs = MIN_HOLD_MS;
        return false;
      }
      if (wait > 0) {
        if (f[d + D_SINCE] === 0) {
          f[d + D_SINCE] = now;
          f[d + D_THROTTLES]++;
        }
        this.waitMs = Math.min(MAX_HOLD_MS, Math.max(MIN_HOLD_MS, wait));
        return false;
      }
      this.#endHold(d, now);
      this.#grantBytes[dir] = grant(f, b, Math.max(1, bytes));
      this.#grantFrames[dir] = grant(f, p, Math.max(1, frames));
      f[d + D_LENT_AT] = now;
      this.#grantGen[dir] = Atomics.load(this.#i, I_GEN[dir]);
      this.waitMs = 0;
      return true;
    } finally {
      this.#unlock();
    }
  }

  /**
   * Ends the grant {@link take} gave: what was not spent goes back, what was
   * overspent (the last frame's excess) is owed.
   */
  settle(dir: Direction, bytes: number, frames: number): void {
    const gb = this.#grantBytes[dir], gf = this.#grantFrames[dir];
    this.#grantBytes[dir] = this.#grantFrames[dir] = 0;
    if (gb === Infinity && gf === Infinity) return;
    this.#lock();
    try {
      if (Atomics.load(this.#i, I_GEN[dir]) !== this.#grantGen[dir]) return; // new limits since
      const f = this.#f, d = dir * DIR_FIELDS;
      if (gb !== Infinity) {
        f[d + D_BYTES + B_TOKENS] += gb - bytes;
        f[d + D_BYTES + B_LENT] -= gb;
      }
      if (gf !== Infinity) {
        f[d + D_FRAMES + B_TOKENS] += gf - frames;
        f[d + D_FRAMES + B_LENT] -= gf;
      }
    } finally {
      this.#unlock();
    }
  }

  /** `dir`'s hold counters and tokens now. */
  counters(dir: Direction): DirectionCounters {
    const now = this.#clock();
    this.#lock();
    try {
      const f = this.#f, d = dir * DIR_FIELDS;
      const b = d + D_BYTES, p = d + D_FRAMES;
      refill(f, b, now);
      refill(f, p, now);
      const since = f[d + D_SINCE];
      return {
        throttles: f[d + D_THROTTLES],
        throttledMs: f[d + D_HELD_MS] + (since === 0 ? 0 : now - since),
        byteTokens: f[b + B_RATE] > 0 ? f[b + B_TOKENS] : null,
        frameTokens: f[p + B_RATE] > 0 ? f[p + B_TOKENS] : null,
      };
    } finally {
      this.#unlock();
    }
  }

  #endHold(d: number, now: number): void {
    const f = this.#f;
    const since = f[d + D_SINCE];
    if (since === 0) return;
    f[d + D_HELD_MS] += Math.max(0, now - since);
    f[d + D_SINCE] = 0;
  }

  #lock(): void {
    const i = this.#i;
    for (let spins = 0; Atomics.compareExchange(i, I_LOCK, 0, 1) !== 0; spins++) {
      // The holder runs a few arithmetic steps; if it was preempted, sleep
      // instead of burning the core it needs.
      if (spins > 64) Atomics.wait(i, I_LOCK, 1, 0.05);
    }
  }

  #unlock(): void {
    Atomics.store(this.#i, I_LOCK, 0);
    Atomics.notify(this.#i, I_LOCK, 1);
  }
}

/** Adds what `rate` brought since the bucket's last look, up to `size`. */
function refill(f: Float64Array, at: number, now: number): void {
  const rate = f[at + B_RATE];
  if (rate === 0) return;
  const dt = now - f[at + B_LAST];
  if (dt <= 0) return; // a clock that did not move (or a caller's stale now)
  f[at + B_LAST] = now;
  const t = f[at + B_TOKENS] + (rate * dt) / 1000;
  f[at + B_TOKENS] = t > f[at + B_SIZE] ? f[at + B_SIZE] : t;
}

/**
 * 0 when the bucket lets a frame start (it holds a token, or is not
 * limited), else the ms until it holds the resume quantum.
 */
function holdMs(f: Float64Array, at: number): number {
  const rate = f[at + B_RATE];
  if (rate === 0) return 0;
  const tokens = f[at + B_TOKENS];
  if (tokens >= 1) return 0;
  const resume = Math.max(1, Math.min(f[at + B_SIZE], rate * RESUME_SECONDS));
  return ((resume - tokens) * 1000) / rate;
}

/** Takes up to `want` tokens out of the bucket for a grant (Infinity: not limited). */
function grant(f: Float64Array, at: number, want: number): number {
  if (f[at + B_RATE] === 0) return Infinity;
  const g = Math.min(f[at + B_TOKENS], want);
  f[at + B_TOKENS] -= g;
  f[at + B_LENT] += g;
  return g;
}

/** Whether the bucket lets a frame start, or would but for tokens lent to grants not settled. */
function onlyLent(f: Float64Array, at: number): boolean {
  return f[at + B_RATE] === 0 || f[at + B_TOKENS] + f[at + B_LENT] >= 1;
}
