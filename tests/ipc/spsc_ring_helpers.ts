/**
 * Conveniences tests use on the data-path rings (`ipc/spsc_ring.ts`): one
 * record in or out at a time, and waits that yield to the event loop. The
 * daemon never needs them; they are built on the ring's public API only.
 *
 * @module
 */

import type { SpscRing } from "../../ipc/spsc_ring.ts";

/**
 * Copies one record in and publishes it; false when the ring is full.
 * @throws {RangeError} if `record` is not exactly `recordWords` long.
 */
export function tryPush(ring: SpscRing, record: ArrayLike<number>): boolean {
  if (record.length !== ring.recordWords) {
    throw new RangeError(
      `Cannot push a record of ${record.length} words into a ring of ${ring.recordWords}-word records`,
    );
  }
  const offset = ring.reserve();
  if (offset < 0) return false;
  for (let i = 0; i < record.length; i++) ring.words[offset + i] = record[i];
  ring.commit(1);
  return true;
}

/**
 * Copies the oldest record into `out` and releases it; false when the ring is empty.
 * @throws {RangeError} if `out` is shorter than `recordWords`.
 */
export function tryPop(ring: SpscRing, out: { [i: number]: number; length: number }): boolean {
  if (out.length < ring.recordWords) {
    throw new RangeError(`Cannot pop a ${ring.recordWords}-word record into ${out.length} words`);
  }
  if (ring.available() === 0) return false;
  const offset = ring.peek(0);
  for (let i = 0; i < ring.recordWords; i++) out[i] = ring.words[offset + i];
  ring.release(1);
  return true;
}

/** Looks every millisecond, letting the event loop run, until `ready()` reaches `want` or time is up. */
async function poll(ready: () => number, timeoutMs: number, want: number): Promise<number> {
  const deadline = performance.now() + timeoutMs;
  for (;;) {
    const n = ready();
    if (n >= want || performance.now() >= deadline) return n;
    await new Promise((r) => setTimeout(r, 1));
  }
}

/** Waits (yielding to the event loop) until `min` records are ready; returns how many are. */
export function waitAsyncForData(ring: SpscRing, timeoutMs = Infinity, min = 1): Promise<number> {
  return poll(() => ring.available(), timeoutMs, min);
}

/** Waits (yielding to the event loop) until `min` slots are free; returns how many are. */
export function waitAsyncForSpace(ring: SpscRing, timeoutMs = Infinity, min = 1): Promise<number> {
  return poll(() => ring.freeSpace(), timeoutMs, min);
}
