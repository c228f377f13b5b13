/**
 * `parent/control/ring_pool.ts`: a start that finds the pool short has the
 * stopped data paths that still hold rings release them, and waits for
 * that (bounded); a pool with enough rings waits for nobody.
 *
 * @module
 */

import assert from "node:assert/strict";
import { type ReturningRings, RingPool } from "../../../parent/control/ring_pool.ts";
import type { PreparedRing } from "../../../parent/io/io_uring.ts";

/** Stand-ins: the pool only moves them between its lists here (never closes: all clean). */
function fakeRings(n: number): PreparedRing[] {
  return Array.from({ length: n }, () => ({ fd: -1 }) as unknown as PreparedRing);
}

/** A stopped data path holding a set, which gives it back `afterMs` after its release. */
function stopped(
  pool: RingPool,
  afterMs: number | null,
): { r: ReturningRings; asked: () => number } {
  let asked = 0;
  let done!: () => void;
  const released = new Promise<void>((resolve) => done = resolve);
  const lent = { writer: fakeRings(1), poller: fakeRings(2) };
  const r: ReturningRings = {
    release() {
      asked++;
      if (afterMs === null || asked > 1) return;
      setTimeout(() => {
        pool.giveBack(lent, true);
        done();
      }, afterMs);
    },
    released,
  };
  pool.returning(r);
  return { r, asked: () => asked };
}

Deno.test("ring pool: a short pool has stopped data paths release their rings, and waits for them", async () => {
  const pool = new RingPool([]);
  const a = stopped(pool, 5);
  const t0 = performance.now();
  await pool.reclaim(3, 5_000);
  assert.equal(a.asked(), 1, "the stopped data path was asked to release");
  assert.equal(pool.free, 3, "its set is back before the start takes one");
  assert.ok(performance.now() - t0 < 4_000, "it did not wait out the bound");
});

Deno.test("ring pool: enough free rings, or none coming back: no waiting, no release asked", async () => {
  const pool = new RingPool(fakeRings(3));
  const a = stopped(pool, 5);
  await pool.reclaim(3, 5_000);
  assert.equal(a.asked(), 0, "released early though the pool had a set");
  const empty = new RingPool([]);
  await empty.reclaim(3, 5_000); // nobody holds rings: returns at once
  assert.equal(empty.free, 0);
});

Deno.test("ring pool: a data path that never gives its rings back costs the start the bound, no more", async () => {
  const pool = new RingPool([]);
  const a = stopped(pool, null);
  const t0 = performance.now();
  await pool.reclaim(3, 50);
  const ms = performance.now() - t0;
  assert.equal(a.asked(), 1);
  assert.equal(pool.free, 0);
  assert.ok(ms >= 45 && ms < 2_000, `waited ${ms.toFixed(0)} ms for a bound of 50`);
});
