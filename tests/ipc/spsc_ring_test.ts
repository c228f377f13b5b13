import assert from "node:assert/strict";
import { tryPop, tryPush, waitAsyncForData, waitAsyncForSpace } from "./spsc_ring_helpers.ts";
import {
  CorruptRingError,
  SPSC_RING_HEADER_BYTES,
  SPSC_RING_MAGIC,
  SPSC_RING_WORD,
  SpscRing,
  spscRingByteLength,
} from "../../ipc/spsc_ring.ts";

/** Word `k` of record `seq`, as tests/ipc/spsc_ring_stress_worker.ts writes it. */
function recordWord(seq: number, k: number): number {
  return (Math.imul(seq, 0x9e3779b1) ^ Math.imul(k + 1, 0x85ebca6b)) >>> 0;
}

function record(seq: number, recordWords: number): number[] {
  const words = [seq >>> 0];
  for (let k = 1; k < recordWords; k++) words.push(recordWord(seq, k));
  return words;
}

function header(ring: SpscRing): Int32Array {
  return new Int32Array(ring.buffer, 0, SPSC_RING_HEADER_BYTES / 4);
}

/** xorshift32: a seeded generator, so a failing run can be repeated. */
function rng(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return x >>> 0;
  };
}

// ---- construction ----------------------------------------------------------

Deno.test("SpscRing.create() rejects a capacity that is not a power of two", async (t) => {
  for (const capacity of [0, 3, 6, 100, 1.5, -4, NaN, 2 ** 25]) {
    await t.step(`capacity ${capacity}`, () => {
      assert.throws(
        () => SpscRing.create({ capacity, recordWords: 4 }),
        (e) => e instanceof RangeError && e.message.includes(`capacity ${capacity}`),
      );
    });
  }
});

Deno.test("SpscRing.create() rejects recordWords and startIndex out of range", async (t) => {
  for (const recordWords of [0, -1, 1.5, 4097]) {
    await t.step(`recordWords ${recordWords}`, () => {
      assert.throws(
        () => SpscRing.create({ capacity: 4, recordWords }),
        (e) => e instanceof RangeError && e.message.includes(`recordWords ${recordWords}`),
      );
    });
  }
  for (const startIndex of [-1, 2 ** 32, 0.5]) {
    await t.step(`startIndex ${startIndex}`, () => {
      assert.throws(
        () => SpscRing.create({ capacity: 4, recordWords: 1, startIndex }),
        (e) => e instanceof RangeError && e.message.includes(`startIndex ${startIndex}`),
      );
    });
  }
});

Deno.test("SpscRing.create() writes a header that attach() accepts", () => {
  const ring = SpscRing.create({ capacity: 8, recordWords: 3, startIndex: 0xffff_fff0 });
  assert.equal(ring.buffer.byteLength, spscRingByteLength(8, 3));
  assert.equal(ring.words.length, 24);
  const h = header(ring);
  assert.equal(h[SPSC_RING_WORD.MAGIC], SPSC_RING_MAGIC);
  assert.equal(h[SPSC_RING_WORD.HEAD] >>> 0, 0xffff_fff0);
  assert.equal(h[SPSC_RING_WORD.TAIL] >>> 0, 0xffff_fff0);
  const peer = SpscRing.attach(ring.buffer);
  assert.equal(peer.capacity, 8);
  assert.equal(peer.recordWords, 3);
  assert.equal(peer.available(), 0);
});

// ---- empty and full --------------------------------------------------------

Deno.test("an empty ring has nothing to pop, peek or release, and waits time out", async () => {
  const ring = SpscRing.create({ capacity: 4, recordWords: 2 });
  const out = new Uint32Array(2);
  assert.equal(ring.available(), 0);
  assert.equal(tryPop(ring, out), false);
  assert.equal(ring.peek(0), -1);
  assert.throws(() => ring.release(1), RangeError);
  let start = performance.now();
  assert.equal(ring.waitForData(30), 0);
  assert.ok(performance.now() - start >= 25, "waitForData(30) returned early");
  start = performance.now();
  assert.equal(await waitAsyncForData(ring, 30), 0);
  assert.ok(performance.now() - start >= 25, "waitAsyncForData(30) returned early");
  assert.equal(header(ring)[SPSC_RING_WORD.CONSUMER_SLEEPING], 0, "sleeping flag left set");
  assert.equal(ring.stats().sleeps, 1, "the blocking wait slept once");
});

Deno.test("a full ring refuses reserve() and tryPush() until a record is released", async () => {
  const ring = SpscRing.create({ capacity: 4, recordWords: 1 });
  for (let i = 0; i < 4; i++) assert.equal(tryPush(ring, [i]), true);
  assert.equal(tryPush(ring, [4]), false);
  assert.equal(ring.reserve(), -1);
  assert.equal(ring.freeSpace(), 0);
  assert.equal(ring.waitForSpace(20), 0);
  assert.equal(await waitAsyncForSpace(ring, 20), 0);
  assert.equal(header(ring)[SPSC_RING_WORD.PRODUCER_SLEEPING], 0, "sleeping flag left set");
  assert.equal(ring.available(), 4);
  const out = [0];
  assert.equal(tryPop(ring, out), true);
  assert.deepEqual(out, [0]);
  assert.equal(ring.waitForSpace(0), 1);
  assert.equal(tryPush(ring, [4]), true);
  const got = [];
  while (tryPop(ring, out)) got.push(out[0]);
  assert.deepEqual(got, [1, 2, 3, 4]);
});

Deno.test("tryPush() and tryPop() reject records of the wrong size", () => {
  const ring = SpscRing.create({ capacity: 4, recordWords: 3 });
  assert.throws(() => tryPush(ring, [1, 2]), /2 words into a ring of 3-word records/);
  assert.throws(() => tryPush(ring, [1, 2, 3, 4]), RangeError);
  tryPush(ring, [1, 2, 3]);
  assert.throws(() => tryPop(ring, new Uint32Array(2)), /3-word record into 2 words/);
});

// ---- wraparound ------------------------------------------------------------

Deno.test("records stay in order across slot and u32 counter wraparound", async (t) => {
  for (const startIndex of [0, 0xffff_ffff - 100, 0xffff_ffff, 0x7fff_fff0]) {
    await t.step(`start index ${startIndex.toString(16)}`, () => {
      const capacity = 8;
      const ring = SpscRing.create({ capacity, recordWords: 3, startIndex });
      const next = rng(startIndex + 7);
      const out = new Uint32Array(3);
      let pushed = 0;
      let popped = 0;
      const total = capacity * 200;
      while (popped < total) {
        const pushes = next() % (capacity + 2);
        for (let i = 0; i < pushes && pushed < total; i++) {
          const ok = tryPush(ring, record(pushed, 3));
          assert.equal(ok, pushed - popped < capacity, `push ${pushed} with ${pushed - popped}`);
          if (ok) pushed++;
        }
        assert.equal(ring.available(), pushed - popped);
        const pops = next() % (capacity + 2);
        for (let i = 0; i < pops; i++) {
          const ok = tryPop(ring, out);
          assert.equal(ok, popped < pushed);
          if (!ok) break;
          assert.deepEqual([...out], record(popped, 3), `record ${popped}`);
          popped++;
        }
      }
      const h = header(ring);
      assert.equal(h[SPSC_RING_WORD.HEAD] >>> 0, (startIndex + total) >>> 0);
      assert.equal(h[SPSC_RING_WORD.TAIL] >>> 0, (startIndex + total) >>> 0);
    });
  }
});

// ---- batches ---------------------------------------------------------------

Deno.test("reserved records become visible only when published, all with one store", () => {
  const producer = SpscRing.create({ capacity: 8, recordWords: 2, startIndex: 0xffff_fffe });
  const consumer = SpscRing.attach(producer.buffer);
  const offsets = [];
  for (let i = 0; i < 5; i++) {
    const offset = producer.reserve();
    assert.ok(offset >= 0 && offset + 2 <= producer.words.length);
    producer.words[offset] = 100 + i;
    producer.words[offset + 1] = 200 + i;
    offsets.push(offset);
  }
  assert.equal(new Set(offsets).size, 5, "reserve() handed out a slot twice");
  assert.equal(consumer.available(), 0, "reserved records leaked before publish()");
  assert.equal(producer.freeSpace(), 3, "reserved slots must count as used");
  producer.commit(2);
  assert.equal(consumer.available(), 2);
  assert.throws(() => producer.commit(4), /Cannot commit 4 records: 3 are reserved/);
  assert.equal(producer.publish(), 3);
  assert.equal(producer.publish(), 0);
  assert.equal(consumer.available(), 5);
  for (let i = 0; i < 5; i++) {
    const offset = consumer.peek(i);
    assert.equal(offset, offsets[i]);
    assert.deepEqual([consumer.words[offset], consumer.words[offset + 1]], [100 + i, 200 + i]);
  }
  assert.equal(consumer.peek(5), -1);
  assert.equal(consumer.peek(-1), -1);
  assert.throws(() => consumer.release(6), /Cannot release 6 records: 5 are available/);
  consumer.release(5);
  assert.equal(consumer.available(), 0);
  assert.equal(producer.freeSpace(), 8);
});

Deno.test("publish() and release() notify only when the other side announced sleep", () => {
  const producer = SpscRing.create({ capacity: 4, recordWords: 1 });
  const consumer = SpscRing.attach(producer.buffer);
  const h = header(producer);
  tryPush(producer, [1]);
  assert.equal(producer.stats().notifies, 0);
  Atomics.store(h, SPSC_RING_WORD.CONSUMER_SLEEPING, 1);
  tryPush(producer, [2]);
  assert.equal(producer.stats().notifies, 1);
  consumer.available();
  consumer.release(1);
  assert.equal(consumer.stats().notifies, 0);
  Atomics.store(h, SPSC_RING_WORD.PRODUCER_SLEEPING, 1);
  consumer.release(1);
  assert.equal(consumer.stats().notifies, 1);
});

Deno.test("waitForData() returns at once without sleeping when records are ready", async () => {
  const ring = SpscRing.create({ capacity: 4, recordWords: 1 });
  tryPush(ring, [7]);
  tryPush(ring, [8]);
  assert.equal(ring.waitForData(10_000), 2);
  assert.equal(await waitAsyncForData(ring, 10_000), 2);
  assert.equal(ring.waitForSpace(10_000), 2);
  assert.equal(ring.stats().sleeps, 0);
});

Deno.test("waitForData(t, minRecords) waits for the whole batch, and returns what is ready on timeout", async () => {
  const ring = SpscRing.create({ capacity: 8, recordWords: 1 });
  tryPush(ring, [1]);
  tryPush(ring, [2]);
  let start = performance.now();
  assert.equal(ring.waitForData(30, 3), 2);
  assert.ok(performance.now() - start >= 25, "returned before the timeout with too few records");
  start = performance.now();
  assert.equal(await waitAsyncForData(ring, 30, 3), 2);
  assert.ok(performance.now() - start >= 25, "returned before the timeout with too few records");
  tryPush(ring, [3]);
  assert.equal(ring.waitForData(10_000, 3), 3);
  assert.throws(() => ring.waitForData(0, 0), /Cannot wait for 0 records: not in \[1, 8\]/);
  assert.throws(() => ring.waitForData(0, 9), RangeError);
  assert.throws(() => ring.waitForSpace(0, 9), /Cannot wait for 9 free slots/);
  for (let i = 0; i < 5; i++) tryPush(ring, [i]);
  assert.equal(ring.waitForSpace(20, 2), 0);
  ring.available();
  ring.release(3);
  assert.equal(ring.waitForSpace(10_000, 2), 3);
});

Deno.test("publish() and release() notify only once the sleeper's batch is complete", () => {
  const producer = SpscRing.create({ capacity: 4, recordWords: 1, startIndex: 0xffff_ffff });
  const consumer = SpscRing.attach(producer.buffer);
  const h = header(producer);
  Atomics.store(h, SPSC_RING_WORD.CONSUMER_SLEEPING, 3); // wants 3 records
  tryPush(producer, [1]);
  tryPush(producer, [2]);
  assert.equal(producer.stats().notifies, 0, "woke the consumer for 2 of 3 records");
  tryPush(producer, [3]);
  assert.equal(producer.stats().notifies, 1);
  tryPush(producer, [4]);
  Atomics.store(h, SPSC_RING_WORD.PRODUCER_SLEEPING, 2); // wants 2 free slots
  assert.equal(consumer.available(), 4);
  consumer.release(1);
  assert.equal(consumer.stats().notifies, 0, "woke the producer for 1 of 2 slots");
  consumer.release(1);
  assert.equal(consumer.stats().notifies, 1);
});

// ---- attach validation -----------------------------------------------------

Deno.test("SpscRing.attach() names what is wrong with a bad header", async (t) => {
  const cases: [string, (h: Int32Array) => void, RegExp][] = [
    [
      "bad magic",
      (h) => (h[SPSC_RING_WORD.MAGIC] = 0x1234),
      /magic is 0x1234, expected 0x43535053/,
    ],
    ["bad version", (h) => (h[SPSC_RING_WORD.VERSION] = 9), /version is 9, expected 1/],
    ["capacity 3", (h) => (h[SPSC_RING_WORD.CAPACITY] = 3), /capacity 3 is not a power of two/],
    ["capacity 0", (h) => (h[SPSC_RING_WORD.CAPACITY] = 0), /capacity 0 is not a power of two/],
    [
      "capacity -2^31",
      (h) => (h[SPSC_RING_WORD.CAPACITY] = -(2 ** 31)),
      /capacity -2147483648 is not/,
    ],
    [
      "capacity larger than the buffer",
      (h) => (h[SPSC_RING_WORD.CAPACITY] = 32),
      /buffer is 512 bytes, but capacity 32 × recordWords 2 needs 640/,
    ],
    ["recordWords 0", (h) => (h[SPSC_RING_WORD.RECORD_WORDS] = 0), /recordWords 0 is not in/],
    ["recordWords -1", (h) => (h[SPSC_RING_WORD.RECORD_WORDS] = -1), /recordWords -1 is not in/],
    [
      "head more than capacity past tail",
      (h) => (h[SPSC_RING_WORD.HEAD] = 17),
      /head 0x11 is 17 records past tail 0x0, more than capacity 16/,
    ],
    [
      "head behind tail",
      (h) => (h[SPSC_RING_WORD.TAIL] = 5),
      /head 0x0 is 4294967291 records past tail 0x5/,
    ],
  ];
  for (const [name, spoil, message] of cases) {
    await t.step(name, () => {
      const ring = SpscRing.create({ capacity: 16, recordWords: 2 });
      spoil(header(ring));
      assert.throws(
        () => SpscRing.attach(ring.buffer),
        (e) => e instanceof CorruptRingError && message.test(e.message),
      );
    });
  }
  await t.step("head exactly capacity past tail is a full ring, not corrupt", () => {
    const ring = SpscRing.create({ capacity: 16, recordWords: 2, startIndex: 0xffff_fff8 });
    header(ring)[SPSC_RING_WORD.HEAD] = 8;
    assert.equal(SpscRing.attach(ring.buffer).available(), 16);
  });
});

Deno.test("SpscRing.attach() rejects buffers that cannot hold a ring", () => {
  assert.throws(() => SpscRing.attach(new ArrayBuffer(1024)), TypeError);
  assert.throws(() => SpscRing.attach({ byteLength: 1024 }), TypeError);
  assert.throws(
    () => SpscRing.attach(new SharedArrayBuffer(100)),
    /buffer is 100 bytes, smaller than the 384-byte header/,
  );
  const ring = SpscRing.create({ capacity: 4, recordWords: 1 });
  const bigger = new SharedArrayBuffer(ring.buffer.byteLength + 4);
  new Uint8Array(bigger).set(new Uint8Array(ring.buffer));
  assert.throws(() => SpscRing.attach(bigger), /buffer is 404 bytes, but .* needs 400/);
});

// ---- corrupt indices at run time --------------------------------------------

Deno.test("the consumer reports a head beyond capacity and never indexes past the ring", () => {
  const producer = SpscRing.create({ capacity: 4, recordWords: 1 });
  const consumer = SpscRing.attach(producer.buffer);
  tryPush(producer, [1]);
  assert.equal(consumer.available(), 1);
  Atomics.store(header(producer), SPSC_RING_WORD.HEAD, 1000);
  assert.throws(
    () => consumer.available(),
    (e) =>
      e instanceof CorruptRingError &&
      /head 0x3e8 is 1000 records past tail 0x0, more than capacity 4/.test(e.message),
  );
  assert.match(consumer.corruption ?? "", /head 0x3e8/);
  // The last validated view stays in bounds: one record, and nothing past it.
  assert.equal(consumer.peek(0), 0);
  assert.equal(consumer.peek(1), -1);
  assert.equal(consumer.peek(999), -1);
  assert.throws(() => consumer.waitForData(0), CorruptRingError);
  assert.equal(header(producer)[SPSC_RING_WORD.CONSUMER_SLEEPING], 0);
});

Deno.test("the consumer reports a head that moved backwards", () => {
  const producer = SpscRing.create({ capacity: 8, recordWords: 1, startIndex: 2 });
  const consumer = SpscRing.attach(producer.buffer);
  for (let i = 0; i < 3; i++) tryPush(producer, [i]);
  assert.equal(consumer.available(), 3);
  Atomics.store(header(producer), SPSC_RING_WORD.HEAD, 3);
  assert.throws(() => consumer.available(), /head moved backwards from 0x5 to 0x3/);
});

Deno.test("the producer reports a tail past head or moving backwards", async (t) => {
  await t.step("tail past head", () => {
    const producer = SpscRing.create({ capacity: 2, recordWords: 1 });
    tryPush(producer, [1]);
    Atomics.store(header(producer), SPSC_RING_WORD.TAIL, 2);
    assert.throws(
      () => producer.freeSpace(),
      (e) => e instanceof CorruptRingError && /tail 0x2 is outside \[0x0, 0x1\]/.test(e.message),
    );
    assert.throws(() => producer.waitForSpace(0), CorruptRingError);
    assert.equal(header(producer)[SPSC_RING_WORD.PRODUCER_SLEEPING], 0);
  });
  await t.step("tail backwards", () => {
    const ring = SpscRing.create({ capacity: 2, recordWords: 1, startIndex: 10 });
    const out = [0];
    tryPush(ring, [1]);
    tryPop(ring, out);
    tryPush(ring, [2]);
    tryPush(ring, [3]);
    Atomics.store(header(ring), SPSC_RING_WORD.TAIL, 9);
    // Tail 0xb (one released), head 0xd (two published): the ring is full,
    // so reserve() must load the tail, and finds it moved back.
    assert.throws(() => ring.reserve(), /tail 0x9 is outside \[0xb, 0xd\]/);
    assert.match(ring.corruption ?? "", /tail 0x9/);
  });
});

Deno.test("the producer keeps its own head when the peer scribbles on it", () => {
  const producer = SpscRing.create({ capacity: 4, recordWords: 1 });
  const consumer = SpscRing.attach(producer.buffer);
  tryPush(producer, [1]);
  Atomics.store(header(producer), SPSC_RING_WORD.HEAD, 3); // the peer lies
  tryPush(producer, [2]);
  assert.equal(Atomics.load(header(producer), SPSC_RING_WORD.HEAD), 2);
  assert.equal(consumer.available(), 2);
});

// ---- two threads -----------------------------------------------------------

interface WorkerResult {
  ok: boolean;
  error?: string;
  ms?: number;
  stats?: unknown;
}

/** Starts the stress worker, zero permissions like the device, on one job. */
async function startWorker(
  job: Record<string, unknown>,
): Promise<{ worker: Worker; done: Promise<WorkerResult> }> {
  const worker = new Worker(new URL("./spsc_ring_stress_worker.ts", import.meta.url), {
    type: "module",
    deno: { permissions: "none" },
  });
  const { promise: ready, resolve: onReady, reject } = Promise.withResolvers<void>();
  const { promise: done, resolve: onDone } = Promise.withResolvers<WorkerResult>();
  worker.onmessage = (e) => (e.data.ready ? onReady() : onDone(e.data));
  worker.onerror = (e) => {
    e.preventDefault();
    reject(new Error(`worker failed: ${e.message}`));
    onDone({ ok: false, error: e.message });
  };
  worker.postMessage(job);
  await ready;
  return { worker, done };
}

/**
 * Pops `count` records on this thread, checking each; blocks in waitForData
 * for `minRecords` at a time (fewer at the very end).
 */
function consumeChecked(ring: SpscRing, count: number, deadline: number, minRecords = 1): void {
  const words = ring.words;
  const recordWords = ring.recordWords;
  let seq = 0;
  while (seq < count) {
    const want = Math.min(minRecords, count - seq);
    let n = ring.available();
    if (n < want) n = ring.waitForData(Math.max(0, deadline - performance.now()), want);
    if (n < want) throw new Error(`no data before the deadline at record ${seq} of ${count}`);
    for (let i = 0; i < n; i++) {
      const offset = ring.peek(i);
      if (words[offset] !== seq) {
        throw new Error(`record ${seq} has sequence number ${words[offset]}`);
      }
      for (let k = 1; k < recordWords; k++) {
        if (words[offset + k] !== recordWord(seq, k)) {
          throw new Error(`record ${seq} word ${k} is ${words[offset + k]}`);
        }
      }
      seq++;
    }
    ring.release(n);
  }
}

function rate(records: number, ms: number): string {
  return `${(records / ms / 1000).toFixed(2)} M records/s`;
}

Deno.test("a worker producer and a blocking main-thread consumer pass 4M records intact", async () => {
  const count = 4_000_000;
  const ring = SpscRing.create({ capacity: 256, recordWords: 4, startIndex: 0xffff_ffff - 3000 });
  const { worker, done } = await startWorker({
    kind: "produce",
    buffer: ring.buffer,
    count,
    maxBatch: 64,
    seed: 1,
  });
  try {
    const start = performance.now();
    consumeChecked(ring, count, start + 9000);
    const ms = performance.now() - start;
    const result = await done;
    assert.ok(result.ok, result.error);
    assert.equal(ring.available(), 0);
    console.log(
      `  SPSC 4-word records, capacity 256, batches ≤ 64: ${rate(count, ms)} ` +
        `(consumer ${JSON.stringify(ring.stats())}, producer ${JSON.stringify(result.stats)})`,
    );
  } finally {
    worker.terminate();
  }
});

Deno.test("a blocking main-thread producer feeds a checking worker consumer 2M records", async () => {
  const count = 2_000_000;
  const ring = SpscRing.create({ capacity: 128, recordWords: 3, startIndex: 0xffff_ff00 });
  const { worker, done } = await startWorker({ kind: "consume", buffer: ring.buffer, count });
  try {
    const words = ring.words;
    const start = performance.now();
    const deadline = start + 9000;
    let seq = 0;
    while (seq < count) {
      let n = 0;
      for (let offset = ring.reserve(); offset >= 0; offset = n < 32 ? ring.reserve() : -1) {
        words[offset] = seq;
        words[offset + 1] = recordWord(seq, 1);
        words[offset + 2] = recordWord(seq, 2);
        seq++;
        n++;
        if (seq === count) break;
      }
      if (n !== 0) ring.publish();
      else if (ring.waitForSpace(Math.max(0, deadline - performance.now())) === 0) {
        throw new Error(`no space before the deadline at record ${seq}`);
      }
    }
    const result = await done;
    assert.ok(result.ok, result.error);
    console.log(`  SPSC main producer → worker consumer: ${rate(count, result.ms ?? NaN)}`);
  } finally {
    worker.terminate();
  }
});

Deno.test("waitAsyncForData() on the main thread is woken by a worker producer", async () => {
  const count = 200_000;
  const ring = SpscRing.create({ capacity: 64, recordWords: 2 });
  const { worker, done } = await startWorker({
    kind: "produce",
    buffer: ring.buffer,
    count,
    maxBatch: 16,
    seed: 2,
  });
  try {
    const words = ring.words;
    const start = performance.now();
    let seq = 0;
    while (seq < count) {
      let n = ring.available();
      if (n === 0) n = await waitAsyncForData(ring, 5000);
      assert.notEqual(n, 0, `waitAsyncForData() timed out at record ${seq}`);
      for (let i = 0; i < n; i++, seq++) {
        const offset = ring.peek(i);
        if (words[offset] !== seq || words[offset + 1] !== recordWord(seq, 1)) {
          assert.fail(`record ${seq} reads ${words[offset]}, ${words[offset + 1]}`);
        }
      }
      ring.release(n);
    }
    const result = await done;
    assert.ok(result.ok, result.error);
    assert.ok(performance.now() - start < 9000);
  } finally {
    worker.terminate();
  }
});

Deno.test("no wake-up is lost when producer and consumer sleep in turn (capacity 1)", async () => {
  const count = 50_000;
  const ring = SpscRing.create({ capacity: 1, recordWords: 2 });
  const { worker, done } = await startWorker({
    kind: "produce",
    buffer: ring.buffer,
    count,
    maxBatch: 1,
    seed: 3,
  });
  try {
    // Each wait in the worker gives up after 2 s and each here at the 9 s
    // deadline: a lost wake-up fails the test instead of hanging it.
    consumeChecked(ring, count, performance.now() + 9000);
    const result = await done;
    assert.ok(result.ok, result.error);
    const producerSleeps = (result.stats as { sleeps: number }).sleeps;
    assert.ok(ring.stats().sleeps > 0, "the consumer never slept: the test proved nothing");
    assert.ok(producerSleeps > 0, "the producer never slept: the test proved nothing");
    console.log(
      `  capacity 1: consumer slept ${ring.stats().sleeps}×, producer ${producerSleeps}×`,
    );
  } finally {
    worker.terminate();
  }
});

Deno.test("no wake-up is lost in 20k request/response rounds where both sides sleep", async () => {
  const rounds = 20_000;
  const requests = SpscRing.create({ capacity: 1, recordWords: 1 });
  const responses = SpscRing.create({ capacity: 1, recordWords: 1 });
  const { worker, done } = await startWorker({
    kind: "echo",
    requests: requests.buffer,
    responses: responses.buffer,
    rounds,
  });
  try {
    const out = new Uint32Array(1);
    const start = performance.now();
    for (let round = 0; round < rounds; round++) {
      assert.ok(tryPush(requests, [round * 3]), `request ${round} found the ring full`);
      if (responses.waitForData(2000) === 0) assert.fail(`round ${round}: no response in 2 s`);
      tryPop(responses, out);
      if (out[0] !== round * 3 + 1) assert.fail(`round ${round}: response ${out[0]}`);
    }
    const ms = performance.now() - start;
    const result = await done;
    assert.ok(result.ok, result.error);
    const echoSleeps = (result.stats as { requests: { sleeps: number } }).requests.sleeps;
    // Thousands of rounds must have really slept on both sides, or this is no
    // test. (How many depends on the scheduler: a reply can beat the wait.)
    assert.ok(responses.stats().sleeps > rounds / 20, `main slept ${responses.stats().sleeps}×`);
    assert.ok(echoSleeps > rounds / 20, `worker slept ${echoSleeps}×`);
    console.log(`  ping-pong sleeps: main ${responses.stats().sleeps}×, worker ${echoSleeps}×`);
    console.log(`  ping-pong round trip: ${(ms / rounds * 1000).toFixed(1)} µs`);
  } finally {
    worker.terminate();
  }
});

Deno.test("batched wake-ups: both sides sleep for 32 at a time and 2M records pass intact", async () => {
  const count = 2_000_000;
  const batch = 32;
  const ring = SpscRing.create({ capacity: 256, recordWords: 4, startIndex: 0xffff_f000 });
  const { worker, done } = await startWorker({
    kind: "produce",
    buffer: ring.buffer,
    count,
    maxBatch: 64,
    seed: 4,
    minFree: batch,
  });
  try {
    const start = performance.now();
    consumeChecked(ring, count, start + 9000, batch);
    const ms = performance.now() - start;
    const result = await done;
    assert.ok(result.ok, result.error);
    const { sleeps } = ring.stats();
    assert.ok(sleeps <= count / batch + 1, `the consumer slept ${sleeps}× for ${count} records`);
    console.log(
      `  batched wake-ups (32/32), capacity 256: ${rate(count, ms)} ` +
        `(consumer ${JSON.stringify(ring.stats())}, producer ${JSON.stringify(result.stats)})`,
    );
  } finally {
    worker.terminate();
  }
});

Deno.test("two consumers taking turns: one that does not hold the ring looks with unreleased(), never fails it", () => {
  const ring = SpscRing.create({ capacity: 4, recordWords: 1 });
  const a = SpscRing.attach(ring.buffer);
  const b = SpscRing.attach(ring.buffer);
  assert.equal(b.unreleased(), false, "empty");
  for (let i = 0; i < 4; i++) assert.ok(tryPush(ring, [i]));
  assert.equal(b.unreleased(), true, "four published");
  // a holds the consumer end, takes all four and releases them.
  assert.equal(a.available(), 4);
  a.release(4);
  // The producer refills the ring: its head is now 8 records past the tail
  // b last knew (0), more than the capacity. Only a look that takes the tail
  // from the header sees this as records waiting rather than corruption.
  for (let i = 4; i < 8; i++) assert.ok(tryPush(ring, [i]));
  assert.equal(b.unreleased(), true);
  b.adoptTail(a.tail);
  assert.equal(b.available(), 4, "b continues from a's tail");
  const out = [0];
  assert.ok(tryPop(b, out));
  assert.deepEqual(out, [4]);
  b.release(3);
  assert.equal(a.unreleased(), false, "all released");
});
