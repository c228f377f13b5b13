/**
 * A single-producer/single-consumer ring of fixed-size records in a
 * SharedArrayBuffer: the data path between the zero-permission device worker
 * and the privileged I/O worker (TX requests, RX buffers, completions,
 * doorbells).
 *
 * Theory of operation
 *
 * Layout (all words little-endian, as the host is): a header of
 * {@link SPSC_RING_HEADER_BYTES} bytes, then `capacity` records of
 * `recordWords` u32 words each. The header is an Int32Array:
 *
 * | word | name              | written by  | meaning                                  |
 * | ---- | ----------------- | ----------- | ---------------------------------------- |
 * | 0    | magic             | creator     | {@link SPSC_RING_MAGIC}                  |
 * | 1    | version           | creator     | {@link SPSC_RING_VERSION}                |
 * | 2    | capacity          | creator     | records, a power of two                  |
 * | 3    | recordWords       | creator     | u32 words per record                     |
 * | 32   | head              | producer    | records ever published (u32, wraps)      |
 * | 33   | producer sleeping | producer    | 0 awake, else the free slots it waits for |
 * | 64   | tail              | consumer    | records ever released (u32, wraps)       |
 * | 65   | consumer sleeping | consumer    | 0 awake, else the records it waits for   |
 *
 * head and tail are free-running counters: record `i` lives in slot
 * `i & (capacity - 1)`, the ring holds `(head - tail) >>> 0` records, and the
 * arithmetic stays right across the 2^32 wrap because the capacity is a power
 * of two no larger than 2^24. Each side's words sit on their own 128-byte
 * line so the two threads do not bounce one cache line.
 *
 * Memory ordering: the producer writes a record's words with plain stores,
 * then publishes with one `Atomics.store(head)`; the consumer reads head with
 * `Atomics.load` before reading the words. JS atomics are sequentially
 * consistent, so the store/load pair orders the plain accesses around it. The
 * same holds in the other direction for tail: a slot is rewritten only after
 * the producer has loaded the tail that released it.
 *
 * Wake-ups without spinning (the consumer side; the producer's is symmetric
 * with tail, free slots and "producer sleeping"):
 *   1. The consumer finds fewer than `want` records ready (usually want = 1)
 *      and stores `want` to "consumer sleeping" (announce).
 *   2. It loads head again (re-check); if `want` records are now ready it
 *      clears the word and returns.
 *   3. Otherwise it calls `Atomics.wait(header, head, headItSaw)`, and after
 *      each wake-up goes back to step 2 until its deadline.
 *   The producer stores head, then loads "consumer sleeping" and calls
 *   `Atomics.notify(header, head)` only if it is non-zero and
 *   `head - tailTheProducerLastSaw >= want`. That count can only overstate
 *   what is ready (tail does not move while the consumer sleeps), so a needed
 *   notify is never skipped; a spurious one costs one extra re-check.
 *   Both sides store one word and then load the other's (Dekker): in the
 *   single total order of sequentially consistent atomics, either the
 *   consumer's re-check in step 2 sees the new head, or the producer's load
 *   sees the announcement and notifies. A notify that comes before step 3 is
 *   not lost either: `Atomics.wait` compares head with `headItSaw` atomically
 *   with going to sleep and returns at once ("not-equal") if head moved. So
 *   publishing costs one store and one load when nobody sleeps and one notify
 *   when someone does; `want > 1` batches wake-ups (EVENT_IDX-like, virtio
 *   1.2 §2.7.10) so neither side is woken for every record.
 *
 * Trust: the peer is untrusted. `attach()` validates the header, each side
 * keeps its own counter in a local field (never re-reading it from shared
 * memory), and every index loaded from the peer is checked: head may only
 * move forward and at most `capacity` records past tail; tail may only move
 * forward and never past head. A violation throws {@link CorruptRingError}
 * (failure policy: the owner stops the queue that uses the ring); no slot
 * outside the ring is ever addressed, because slots are always `index & mask`
 * and the capacity is the one read once at attach time. Record contents are
 * the peer's to choose: a consumer must copy a word before validating it
 * (a hostile producer may rewrite a published slot at any time).
 *
 * The hot path (`reserve`, `commit`, `publish`, `available`, `peek`,
 * `release`) allocates nothing and returns small numbers; it throws only for a
 * corrupt ring or a caller bug (RangeError).
 *
 * @module
 */

import { hex } from "./hex.ts";
/** Header word 0: the bytes "SPSC" read as a little-endian u32. */
export const SPSC_RING_MAGIC = 0x43535053;
/** Header word 1: bumped on any incompatible change of the layout. */
export const SPSC_RING_VERSION = 1;
/** Bytes before the first record. */
export const SPSC_RING_HEADER_BYTES = 384;
/** Largest capacity accepted, in records (keeps u32 distances unambiguous). */
export const SPSC_RING_MAX_CAPACITY = 1 << 24;
/** Largest record accepted, in u32 words. */
export const SPSC_RING_MAX_RECORD_WORDS = 4096;

/** Header word indexes (Int32Array); see the layout table above. */
export const SPSC_RING_WORD = {
  MAGIC: 0,
  VERSION: 1,
  CAPACITY: 2,
  RECORD_WORDS: 3,
  /** Byte 128: the producer's line. */
  HEAD: 32,
  PRODUCER_SLEEPING: 33,
  /** Byte 256: the consumer's line. */
  TAIL: 64,
  CONSUMER_SLEEPING: 65,
} as const;

const {
  MAGIC,
  VERSION,
  CAPACITY,
  RECORD_WORDS,
  HEAD,
  PRODUCER_SLEEPING,
  TAIL,
  CONSUMER_SLEEPING,
} = SPSC_RING_WORD;

/**
 * The peer broke the ring: a bad header at attach time, or an index that
 * moved where the protocol does not allow. Callers catch this one to stop the
 * queue that uses the ring.
 */
export class CorruptRingError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "CorruptRingError";
  }
}

/** Options of {@link SpscRing.create}. */
export interface SpscRingOptions {
  /** Number of records; a power of two in [1, {@link SPSC_RING_MAX_CAPACITY}]. */
  capacity: number;
  /** u32 words per record, in [1, {@link SPSC_RING_MAX_RECORD_WORDS}]. */
  recordWords: number;
  /** Initial value of head and tail (a u32); tests start near 2^32. Default 0. */
  startIndex?: number;
}

/** Counters of one end, for tests and metrics. */
export interface SpscRingStats {
  /** `Atomics.notify` calls this end made. */
  notifies: number;
  /** Waits of this end that really went to sleep (not "not-equal"). */
  sleeps: number;
}

function isPowerOfTwo(n: number): boolean {
  return Number.isInteger(n) && n > 0 && (n & (n - 1)) === 0;
}

/** Total SharedArrayBuffer size of a ring. */
export function spscRingByteLength(capacity: number, recordWords: number): number {
  return SPSC_RING_HEADER_BYTES + capacity * recordWords * 4;
}

/**
 * One end of an SPSC ring. The producer uses `reserve`/`commit`/`publish`
 * (or `tryPush`) and `waitForSpace`; the consumer uses
 * `available`/`peek`/`release` (or `tryPop`) and `waitForData`. Exactly one
 * thread may produce and one may consume; a single object may play both roles
 * in one thread (tests do).
 */
export class SpscRing {
  /** The shared memory; post it to the peer, which calls {@link SpscRing.attach}. */
  readonly buffer: SharedArrayBuffer;
  /** Records in the ring, a power of two. */
  readonly capacity: number;
  /** u32 words per record. */
  readonly recordWords: number;
  /** The record area: record slots start at the offsets `reserve`/`peek` return. */
  readonly words: Uint32Array;

  readonly #header: Int32Array;
  readonly #mask: number;
  // Producer end: published head, next slot to reserve, last tail loaded.
  #head: number;
  #reserved: number;
  #tailSeen: number;
  // Consumer end: own tail, last head loaded.
  #tail: number;
  #headSeen: number;
  #corruption: string | undefined;
  #notifies = 0;
  #sleeps = 0;

  private constructor(buffer: SharedArrayBuffer, capacity: number, recordWords: number) {
    this.buffer = buffer;
    this.capacity = capacity;
    this.recordWords = recordWords;
    this.#mask = capacity - 1;
    this.#header = new Int32Array(buffer, 0, SPSC_RING_HEADER_BYTES / 4);
    this.words = new Uint32Array(buffer, SPSC_RING_HEADER_BYTES, capacity * recordWords);
    const head = Atomics.load(this.#header, HEAD) >>> 0;
    const tail = Atomics.load(this.#header, TAIL) >>> 0;
    this.#head = this.#reserved = this.#headSeen = head;
    this.#tail = this.#tailSeen = tail;
  }

  /**
   * Allocates a new ring in a fresh SharedArrayBuffer.
   * @throws {RangeError} if capacity is not a power of two in range, or
   *   recordWords or startIndex is out of range.
   */
  static create(options: SpscRingOptions): SpscRing {
    const { capacity, recordWords, startIndex = 0 } = options;
    if (!isPowerOfTwo(capacity) || capacity > SPSC_RING_MAX_CAPACITY) {
      throw new RangeError(
        `Cannot create SPSC ring: capacity ${capacity} is not a power of two in [1, ${SPSC_RING_MAX_CAPACITY}]`,
      );
    }
    if (
      !Number.isInteger(recordWords) || recordWords < 1 ||
      recordWords > SPSC_RING_MAX_RECORD_WORDS
    ) {
      throw new RangeError(
        `Cannot create SPSC ring: recordWords ${recordWords} is not an integer in [1, ${SPSC_RING_MAX_RECORD_WORDS}]`,
      );
    }
    if (!Number.isInteger(startIndex) || startIndex < 0 || startIndex > 0xffff_ffff) {
      throw new RangeError(`Cannot create SPSC ring: startIndex ${startIndex} is not a u32`);
    }
    const buffer = new SharedArrayBuffer(spscRingByteLength(capacity, recordWords));
    const header = new Int32Array(buffer, 0, SPSC_RING_HEADER_BYTES / 4);
    header[MAGIC] = SPSC_RING_MAGIC;
    header[VERSION] = SPSC_RING_VERSION;
    header[CAPACITY] = capacity;
    header[RECORD_WORDS] = recordWords;
    Atomics.store(header, HEAD, startIndex | 0);
    Atomics.store(header, TAIL, startIndex | 0);
    return new SpscRing(buffer, capacity, recordWords);
  }

  /**
   * Opens the other end of a ring created by the peer. Everything in the
   * header is checked, since the peer is untrusted.
   * @throws {TypeError} if `buffer` is not a SharedArrayBuffer.
   * @throws {CorruptRingError} naming the first header field that is wrong.
   */
  static attach(buffer: unknown): SpscRing {
    if (!(buffer instanceof SharedArrayBuffer)) {
      throw new TypeError("Cannot attach SPSC ring: the buffer is not a SharedArrayBuffer");
    }
    const fail = (what: string): never => {
      throw new CorruptRingError(`Cannot attach SPSC ring: ${what}`);
    };
    if (buffer.byteLength < SPSC_RING_HEADER_BYTES) {
      fail(
        `buffer is ${buffer.byteLength} bytes, smaller than the ${SPSC_RING_HEADER_BYTES}-byte header`,
      );
    }
    const header = new Int32Array(buffer, 0, SPSC_RING_HEADER_BYTES / 4);
    const magic = Atomics.load(header, MAGIC);
    if (magic !== SPSC_RING_MAGIC) {
      fail(`magic is ${hex(magic)}, expected ${hex(SPSC_RING_MAGIC)}`);
    }
    const version = Atomics.load(header, VERSION);
    if (version !== SPSC_RING_VERSION) {
      fail(`version is ${version}, expected ${SPSC_RING_VERSION}`);
    }
    const capacity = Atomics.load(header, CAPACITY);
    if (!isPowerOfTwo(capacity) || capacity > SPSC_RING_MAX_CAPACITY) {
      fail(`capacity ${capacity} is not a power of two in [1, ${SPSC_RING_MAX_CAPACITY}]`);
    }
    const recordWords = Atomics.load(header, RECORD_WORDS);
    if (recordWords < 1 || recordWords > SPSC_RING_MAX_RECORD_WORDS) {
      fail(`recordWords ${recordWords} is not in [1, ${SPSC_RING_MAX_RECORD_WORDS}]`);
    }
    const expected = spscRingByteLength(capacity, recordWords);
    if (buffer.byteLength !== expected) {
      fail(
        `buffer is ${buffer.byteLength} bytes, but capacity ${capacity} × recordWords ${recordWords} needs ${expected}`,
      );
    }
    const head = Atomics.load(header, HEAD) >>> 0;
    const tail = Atomics.load(header, TAIL) >>> 0;
    const distance = (head - tail) >>> 0;
    if (distance > capacity) {
      fail(
        `head ${hex(head)} is ${distance} records past tail ${
          hex(tail)
        }, more than capacity ${capacity}`,
      );
    }
    return new SpscRing(buffer, capacity, recordWords);
  }

  /** Why the ring was found corrupt, or undefined while it is sound. */
  get corruption(): string | undefined {
    return this.#corruption;
  }

  /** This end's counters. */
  stats(): SpscRingStats {
    return { notifies: this.#notifies, sleeps: this.#sleeps };
  }

  // ---- producer ----------------------------------------------------------

  /**
   * Reserves the next free slot and returns its word offset in
   * {@link words}, or -1 when the ring is full. The record becomes visible
   * only at `commit`/`publish`; reserve several to publish a batch at once.
   * @throws {CorruptRingError} if the consumer's tail is invalid.
   */
  reserve(): number {
    if (((this.#reserved - this.#tailSeen) >>> 0) === this.capacity) {
      this.#loadTail();
      if (((this.#reserved - this.#tailSeen) >>> 0) === this.capacity) return -1;
    }
    const offset = (this.#reserved & this.#mask) * this.recordWords;
    this.#reserved = (this.#reserved + 1) >>> 0;
    return offset;
  }

  /**
   * Publishes the `n` oldest reserved records with one `Atomics.store`, and
   * wakes the consumer with one `Atomics.notify` only if it announced that it
   * sleeps and enough records for it are ready. Their words must be written
   * before.
   * @throws {RangeError} if `n` is not in [1, reserved-but-unpublished].
   */
  commit(n = 1): void {
    const pending = (this.#reserved - this.#head) >>> 0;
    if (!(n >= 1 && n <= pending && Number.isInteger(n))) {
      throw new RangeError(`Cannot commit ${n} records: ${pending} are reserved`);
    }
    this.#head = (this.#head + n) >>> 0;
    const header = this.#header;
    Atomics.store(header, HEAD, this.#head | 0);
    // Overstates what is ready (tail may have moved), never understates it.
    const want = Atomics.load(header, CONSUMER_SLEEPING);
    if (want !== 0 && ((this.#head - this.#tailSeen) >>> 0) >= want) {
      Atomics.notify(header, HEAD);
      this.#notifies++;
    }
  }

  /** Publishes every reserved record (see {@link commit}); returns how many. */
  publish(): number {
    const pending = (this.#reserved - this.#head) >>> 0;
    if (pending !== 0) this.commit(pending);
    return pending;
  }

  /**
   * Free slots for the producer (reserved ones count as used), reloading the
   * consumer's tail.
   * @throws {CorruptRingError} if the consumer's tail is invalid.
   */
  freeSpace(): number {
    this.#loadTail();
    return this.capacity - ((this.#reserved - this.#tailSeen) >>> 0);
  }

  /**
   * Blocks (with `Atomics.wait`) until `minFree` slots are free or
   * `timeoutMs` passes. Only where `Atomics.wait` is allowed (workers; Deno's
   * main thread). Publish first: slots reserved but unpublished count as
   * used, and the consumer cannot release what it cannot see.
   * @returns the free slots; on timeout fewer than `minFree`, maybe 0.
   * @throws {RangeError} if `minFree` is not in [1, capacity].
   * @throws {CorruptRingError} if the consumer's tail is invalid.
   */
  waitForSpace(timeoutMs = Infinity, minFree = 1): number {
    return this.#wait(false, timeoutMs, minFree);
  }

  // ---- consumer ----------------------------------------------------------

  /**
   * Loads head and returns how many records are ready to read.
   * @throws {CorruptRingError} if the producer's head is invalid.
   */
  available(): number {
    const head = Atomics.load(this.#header, HEAD) >>> 0;
    if (head !== this.#headSeen) this.#acceptHead(head);
    return (head - this.#tail) >>> 0;
  }

  /** Consumer: its tail, the records released so far (mod 2^32). */
  get tail(): number {
    return this.#tail;
  }

  /**
   * Whether the producer's head differs from the tail last released into the
   * header: a look without validation or side effect, for a consumer end
   * that threads take turns on, by a thread that does not hold it (its own
   * view of the tail may be stale; the header's is not).
   */
  unreleased(): boolean {
    const header = this.#header;
    return Atomics.load(header, HEAD) !== Atomics.load(header, TAIL);
  }

  /**
   * Consumer: continues from `tail`, where another consumer of this ring
   * left it, for a consumer end that threads take turns on under a lock
   * (`parent/io/tx_drain.ts`). The next `available()` checks the producer's
   * head against it.
   */
  adoptTail(tail: number): void {
    if (this.#corruption !== undefined) throw new CorruptRingError(this.#corruption);
    this.#tail = this.#headSeen = tail >>> 0;
  }

  /**
   * Word offset in {@link words} of the `i`-th ready record (0 = oldest), or
   * -1 if `i` is not below the count the last `available()` returned.
   */
  peek(i: number): number {
    if (!(i >= 0 && i < ((this.#headSeen - this.#tail) >>> 0))) return -1;
    return ((this.#tail + i) & this.#mask) * this.recordWords;
  }

  /**
   * Hands the `n` oldest ready records back to the producer with one
   * `Atomics.store`, and one `Atomics.notify` only if it sleeps and enough
   * slots for it are free.
   * @throws {RangeError} if `n` is more than `available()` last returned.
   */
  release(n = 1): void {
    const ready = (this.#headSeen - this.#tail) >>> 0;
    if (!(n >= 1 && n <= ready && Number.isInteger(n))) {
      throw new RangeError(`Cannot release ${n} records: ${ready} are available`);
    }
    this.#tail = (this.#tail + n) >>> 0;
    const header = this.#header;
    Atomics.store(header, TAIL, this.#tail | 0);
    // Overstates the free slots (head may have moved), never understates them.
    const want = Atomics.load(header, PRODUCER_SLEEPING);
    if (want !== 0 && this.capacity - ((this.#headSeen - this.#tail) >>> 0) >= want) {
      Atomics.notify(header, TAIL);
      this.#notifies++;
    }
  }

  /**
   * Blocks (with `Atomics.wait`) until `minRecords` records are ready or
   * `timeoutMs` passes. Only where `Atomics.wait` is allowed (workers; Deno's
   * main thread).
   * @returns the ready records; on timeout fewer than `minRecords`, maybe 0.
   * @throws {RangeError} if `minRecords` is not in [1, capacity].
   * @throws {CorruptRingError} if the producer's head is invalid.
   */
  waitForData(timeoutMs = Infinity, minRecords = 1): number {
    return this.#wait(true, timeoutMs, minRecords);
  }

  // ---- internals ---------------------------------------------------------

  /** Ready records (`data`) or free slots, reloading the peer's index. */
  #count(data: boolean): number {
    return data ? this.available() : this.freeSpace();
  }

  #checkWant(want: number, what: string): void {
    if (!(Number.isInteger(want) && want >= 1 && want <= this.capacity)) {
      throw new RangeError(`Cannot wait for ${want} ${what}: not in [1, ${this.capacity}]`);
    }
  }

  /**
   * The sleep protocol of the module comment, blocking: announce `want` in
   * this end's sleeping word, re-check, `Atomics.wait` on the peer's index.
   */
  #wait(data: boolean, timeoutMs: number, want: number): number {
    this.#checkWant(want, data ? "records" : "free slots");
    let n = this.#count(data);
    if (n >= want) return n;
    const header = this.#header;
    const sleeping = data ? CONSUMER_SLEEPING : PRODUCER_SLEEPING;
    const index = data ? HEAD : TAIL;
    const deadline = performance.now() + timeoutMs;
    Atomics.store(header, sleeping, want); // step 1: announce
    try {
      for (;;) {
        n = this.#count(data); // step 2: re-check after announcing
        if (n >= want) return n;
        const remaining = deadline - performance.now();
        if (remaining <= 0) return n;
        // step 3: sleep unless the index moved since the re-check
        const seen = data ? this.#headSeen : this.#tailSeen;
        if (Atomics.wait(header, index, seen | 0, remaining) !== "not-equal") this.#sleeps++;
      }
    } finally {
      Atomics.store(header, sleeping, 0);
    }
  }

  /** Producer: load the consumer's tail; it may only advance, up to head. */
  #loadTail(): void {
    if (this.#corruption !== undefined) throw new CorruptRingError(this.#corruption);
    const tail = Atomics.load(this.#header, TAIL) >>> 0;
    const advance = (tail - this.#tailSeen) >>> 0;
    if (advance > ((this.#head - this.#tailSeen) >>> 0)) {
      this.#fail(
        `tail ${hex(tail)} is outside [${hex(this.#tailSeen)}, ${hex(this.#head)}]` +
          " (last tail seen, published head)",
      );
    }
    this.#tailSeen = tail;
  }

  /** Consumer: accept a new head; it may only advance, up to tail + capacity. */
  #acceptHead(head: number): void {
    if (this.#corruption !== undefined) throw new CorruptRingError(this.#corruption);
    const advance = (head - this.#headSeen) >>> 0;
    const room = (this.#tail + this.capacity - this.#headSeen) >>> 0;
    if (advance > room) {
      const distance = (head - this.#tail) >>> 0;
      this.#fail(
        distance > this.capacity
          ? `head ${hex(head)} is ${distance} records past tail ${
            hex(this.#tail)
          }, more than capacity ${this.capacity}`
          : `head moved backwards from ${hex(this.#headSeen)} to ${hex(head)}`,
      );
    }
    this.#headSeen = head;
  }

  #fail(what: string): never {
    this.#corruption = `Corrupt SPSC ring: ${what}`;
    throw new CorruptRingError(this.#corruption);
  }
}
