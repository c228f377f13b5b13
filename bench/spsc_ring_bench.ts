/**
 * Throughput of ipc/spsc_ring.ts between two threads: a worker (this same
 * file, zero permissions) produces sequenced 4-word records, the main thread
 * consumes them with blocking waits and checks the sequence numbers. Also
 * the single-thread cost of one record through reserve/publish and
 * available/peek/release.
 *
 *   deno run --unstable-worker-options -A bench/spsc_ring_bench.ts
 *
 * @module
 */

import { SpscRing } from "../ipc/spsc_ring.ts";

const RECORD_WORDS = 4;
const WAIT_MS = 2000;

interface ProduceJob {
  buffer: SharedArrayBuffer;
  count: number;
  batch: number;
  /** Free slots the producer sleeps for when the ring is full. */
  wake: number;
}

/** Producer loop: batches of `batch` records, one publish per batch. */
function produce({ buffer, count, batch, wake }: ProduceJob): void {
  const ring = SpscRing.attach(buffer);
  const words = ring.words;
  let seq = 0;
  while (seq < count) {
    let n = 0;
    while (n < batch && seq < count) {
      const offset = ring.reserve();
      if (offset < 0) break;
      words[offset] = seq;
      words[offset + 1] = 0x1000;
      words[offset + 2] = seq * 8;
      words[offset + 3] = 1514;
      seq++;
      n++;
    }
    if (n !== 0) ring.publish();
    else if (ring.waitForSpace(WAIT_MS, wake) === 0) throw new Error(`producer stalled at ${seq}`);
  }
}

/**
 * Consumer loop on this thread; returns records/s. Both sides sleep for
 * `wake` records or slots at a time (batched wake-ups).
 */
async function run(capacity: number, batch: number, wake: number, count: number): Promise<number> {
  const ring = SpscRing.create({ capacity, recordWords: RECORD_WORDS });
  const worker = new Worker(import.meta.url, {
    type: "module",
    deno: { permissions: "none" },
  });
  const { promise: done, resolve, reject } = Promise.withResolvers<void>();
  worker.onmessage = (e) => (e.data.ok ? resolve() : reject(new Error(e.data.error)));
  worker.onerror = (e) => {
    e.preventDefault();
    reject(new Error(e.message));
  };
  worker.postMessage({ buffer: ring.buffer, count, batch, wake } satisfies ProduceJob);
  try {
    const words = ring.words;
    const start = performance.now();
    let seq = 0;
    while (seq < count) {
      const want = Math.min(wake, count - seq);
      let n = ring.available();
      if (n < want) n = ring.waitForData(WAIT_MS, want);
      if (n < want) throw new Error(`consumer stalled at ${seq}`);
      for (let i = 0; i < n; i++, seq++) {
        if (words[ring.peek(i)] !== seq) throw new Error(`record ${seq} out of sequence`);
      }
      ring.release(n);
    }
    const seconds = (performance.now() - start) / 1000;
    await done;
    return count / seconds;
  } finally {
    worker.terminate();
  }
}

/** One thread, no waits: the bare cost of the hot-path calls. */
function singleThread(count: number, batch: number): number {
  const ring = SpscRing.create({ capacity: 256, recordWords: RECORD_WORDS });
  const words = ring.words;
  let sum = 0;
  const start = performance.now();
  for (let seq = 0; seq < count; seq += batch) {
    for (let i = 0; i < batch; i++) {
      const offset = ring.reserve();
      words[offset] = seq + i;
      words[offset + 3] = 60;
    }
    ring.publish();
    const n = ring.available();
    for (let i = 0; i < n; i++) sum += words[ring.peek(i)];
    ring.release(n);
  }
  const ns = (performance.now() - start) * 1e6 / count;
  if (sum === -1) console.log(sum); // keep the reads alive
  return ns;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[sorted.length >> 1];
}

async function main(): Promise<void> {
  const count = 4_000_000;
  console.log(`SPSC ring, ${RECORD_WORDS}-word records, ${count} records per run, median of 3`);
  singleThread(count, 1); // warm-up: let the JIT optimise both loops first
  singleThread(count, 32);
  console.log(
    `single thread: ${singleThread(count, 1).toFixed(1)} ns/record one at a time, ` +
      `${singleThread(count, 32).toFixed(1)} ns/record in batches of 32`,
  );
  const configs = [
    [256, 1, 1],
    [256, 16, 1],
    [256, 64, 1],
    [256, 16, 16],
    [256, 64, 64],
    [1024, 256, 1],
    [1024, 64, 128],
    [16, 4, 1],
  ];
  for (const [capacity, batch, wake] of configs) {
    const rates = [];
    for (let i = 0; i < 3; i++) rates.push(await run(capacity, batch, wake, count));
    console.log(
      `two threads, capacity ${capacity}, publish every ${batch}, wake for ${wake}: ` +
        `${(median(rates) / 1e6).toFixed(2)} M records/s ` +
        `[${rates.map((r) => (r / 1e6).toFixed(2)).join(", ")}]`,
    );
  }
}

// The same file is the producer worker; only a worker has `WorkerGlobalScope`.
if ("WorkerGlobalScope" in globalThis) {
  const scope = globalThis as unknown as {
    onmessage: (e: MessageEvent<ProduceJob>) => void;
    postMessage: (m: unknown) => void;
  };
  scope.onmessage = (e) => {
    try {
      produce(e.data);
      scope.postMessage({ ok: true });
    } catch (error) {
      scope.postMessage({ ok: false, error: String(error) });
    }
  };
} else {
  await main();
}
