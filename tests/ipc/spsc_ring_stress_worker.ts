/// <reference no-default-lib="true" />
/// <reference lib="deno.worker" />

/**
 * The far end of the two-thread SPSC ring tests. It runs with no permissions,
 * like the device worker, and does one job per message:
 *
 * - `produce`: push `count` sequenced records in batches of random size up to
 *   `maxBatch`, blocking in `waitForSpace` for `minFree` (default 1) slots
 *   when the ring is full.
 * - `consume`: pop `count` records, blocking in `waitForData`, and check each
 *   record's sequence number and content.
 * - `echo`: `rounds` times, wait for one record on `requests` and answer with
 *   its first word + 1 on `responses` (a ping-pong where both sides sleep).
 *
 * It answers `{ ok: true, ... }` with its ring end's stats, or
 * `{ ok: false, error }`.
 *
 * @module
 */

import { tryPop, tryPush } from "./spsc_ring_helpers.ts";
import { SpscRing } from "../../ipc/spsc_ring.ts";

/** Word `k` of record `seq`: every word depends on both. */
function recordWord(seq: number, k: number): number {
  return (Math.imul(seq, 0x9e3779b1) ^ Math.imul(k + 1, 0x85ebca6b)) >>> 0;
}

/** Per-wait timeout: a lost wake-up shows up as a timeout, not a hang. */
const WAIT_MS = 2000;

function produce(
  ring: SpscRing,
  count: number,
  maxBatch: number,
  seed: number,
  minFree: number,
): void {
  const words = ring.words;
  const recordWords = ring.recordWords;
  let rng = seed >>> 0 || 1;
  let seq = 0;
  while (seq < count) {
    rng ^= rng << 13;
    rng ^= rng >>> 17;
    rng ^= rng << 5;
    const batch = 1 + ((rng >>> 0) % maxBatch);
    let n = 0;
    while (n < batch && seq < count) {
      const offset = ring.reserve();
      if (offset < 0) break;
      words[offset] = seq;
      for (let k = 1; k < recordWords; k++) words[offset + k] = recordWord(seq, k);
      seq++;
      n++;
    }
    if (n !== 0) ring.publish();
    else if (ring.waitForSpace(WAIT_MS, minFree) === 0) {
      throw new Error(`producer: no space for ${WAIT_MS} ms at record ${seq}`);
    }
  }
}

function consume(ring: SpscRing, count: number): void {
  const words = ring.words;
  const recordWords = ring.recordWords;
  let seq = 0;
  while (seq < count) {
    let n = ring.available();
    if (n === 0) n = ring.waitForData(WAIT_MS);
    if (n === 0) throw new Error(`consumer: no data for ${WAIT_MS} ms at record ${seq}`);
    for (let i = 0; i < n; i++) {
      const offset = ring.peek(i);
      if (words[offset] !== seq) {
        throw new Error(`consumer: record ${seq} has sequence number ${words[offset]}`);
      }
      for (let k = 1; k < recordWords; k++) {
        if (words[offset + k] !== recordWord(seq, k)) {
          throw new Error(`consumer: record ${seq} word ${k} is ${words[offset + k]}`);
        }
      }
      seq++;
    }
    ring.release(n);
  }
}

function echo(requests: SpscRing, responses: SpscRing, rounds: number): void {
  const record = new Uint32Array(requests.recordWords);
  for (let round = 0; round < rounds; round++) {
    if (requests.waitForData(WAIT_MS) === 0) {
      throw new Error(`echo: no request for ${WAIT_MS} ms in round ${round}`);
    }
    tryPop(requests, record);
    record[0] = record[0] + 1;
    if (responses.waitForSpace(WAIT_MS) === 0) {
      throw new Error(`echo: no space for ${WAIT_MS} ms in round ${round}`);
    }
    tryPush(responses, record);
  }
}

self.onmessage = (event: MessageEvent) => {
  const job = event.data;
  try {
    if (job.kind === "produce") {
      const ring = SpscRing.attach(job.buffer);
      self.postMessage({ ready: true });
      produce(ring, job.count, job.maxBatch, job.seed, job.minFree ?? 1);
      self.postMessage({ ok: true, stats: ring.stats() });
    } else if (job.kind === "consume") {
      const ring = SpscRing.attach(job.buffer);
      self.postMessage({ ready: true });
      const start = performance.now();
      consume(ring, job.count);
      self.postMessage({ ok: true, stats: ring.stats(), ms: performance.now() - start });
    } else if (job.kind === "echo") {
      const requests = SpscRing.attach(job.requests);
      const responses = SpscRing.attach(job.responses);
      self.postMessage({ ready: true });
      echo(requests, responses, job.rounds);
      self.postMessage({
        ok: true,
        stats: { requests: requests.stats(), responses: responses.stats() },
      });
    } else {
      throw new Error(`unknown job ${job.kind}`);
    }
  } catch (error) {
    self.postMessage({ ok: false, error: String(error) });
  }
};
