import assert from "node:assert/strict";

function assertEquals(actual: unknown, expected: unknown, msg?: string): void {
  assert.deepStrictEqual(actual, expected, msg);
}
function assertThrows(f: () => unknown, cls: new (...a: never[]) => Error): void {
  assert.throws(f, cls);
}
function assertAlmostEquals(actual: number, expected: number, eps: number): void {
  assert(Math.abs(actual - expected) <= eps, `${actual} is not ${expected}`);
}
import {
  createRateLimitBuffer,
  DIR_RX,
  DIR_TX,
  MAX_HOLD_MS,
  RateLimiter,
} from "../../../parent/io/rate_limiter.ts";

/** A clock the test moves by hand. */
function fakeClock(start = 1000) {
  const c = { now: start, read: () => c.now };
  return c;
}

/**
 * Sends `frameBytes`-byte frames the way a worker does (take a grant, start
 * frames while it lasts, settle) until `ms` of fake time passed; waits when
 * refused. Returns the bytes and frames sent.
 */
function run(
  rl: RateLimiter,
  clock: { now: number },
  dir: 0 | 1,
  frameBytes: number,
  ms: number,
  batch = 64,
): { bytes: number; frames: number; waits: number } {
  const end = clock.now + ms;
  let bytes = 0, frames = 0, waits = 0;
  while (clock.now < end) {
    if (!rl.take(dir, batch * frameBytes, batch)) {
      assert(rl.waitMs > 0 && rl.waitMs <= MAX_HOLD_MS, `wait ${rl.waitMs}`);
      clock.now += rl.waitMs;
      waits++;
      continue;
    }
    let b = 0, f = 0;
    while (f < batch && b < rl.grantBytes(dir) && f < rl.grantFrames(dir)) {
      b += frameBytes;
      f++;
    }
    rl.settle(dir, b, f);
    bytes += b;
    frames += f;
    clock.now += 0.1; // the batch's own time
  }
  return { bytes, frames, waits };
}

Deno.test("RateLimiter: without limits every take is granted without bound", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  assertEquals(rl.active(DIR_TX), false);
  assert(rl.take(DIR_TX, 100, 1));
  assertEquals(rl.grantBytes(DIR_TX), Infinity);
  assertEquals(rl.grantFrames(DIR_TX), Infinity);
  rl.settle(DIR_TX, 1e9, 1e6);
  assert(rl.take(DIR_TX, 100, 1));
});

Deno.test("RateLimiter: a byte bucket starts full and then passes its rate, within one frame", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_TX, { bytes: { rate: 1_000_000, size: 100_000 }, frames: null });
  assert(rl.active(DIR_TX));
  assertEquals(rl.active(DIR_RX), false);
  const r = run(rl, clock, DIR_TX, 1514, 10_000);
  // 100 kB burst + 10 s at 1 MB/s, overshoot at most one frame.
  const expected = 100_000 + 10 * 1_000_000;
  assert(Math.abs(r.bytes - expected) <= 2 * 1514, `sent ${r.bytes}, expected ${expected}`);
  assert(r.waits > 100, "it waited on timers");
});

Deno.test("RateLimiter: frames larger than the bucket pass, and are owed", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_RX, { bytes: { rate: 100_000, size: 10_000 }, frames: null });
  const r = run(rl, clock, DIR_RX, 65_550, 5_000);
  const expected = 10_000 + 5 * 100_000;
  assert(Math.abs(r.bytes - expected) <= 2 * 65_550, `sent ${r.bytes}, expected ${expected}`);
  const c = rl.counters(DIR_RX);
  assert(c.byteTokens! <= 10_000);
});

Deno.test("RateLimiter: a frame bucket limits frames, whatever their size", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_TX, { bytes: null, frames: { rate: 1000, size: 10 } });
  const r = run(rl, clock, DIR_TX, 60, 2_000);
  assert(Math.abs(r.frames - 2010) <= 2, `sent ${r.frames} frames`);
});

Deno.test("RateLimiter: both buckets: the tighter one sets the pace", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_TX, {
    bytes: { rate: 1_000_000, size: 10_000 },
    frames: { rate: 100, size: 1 },
  });
  const r = run(rl, clock, DIR_TX, 1000, 3_000);
  assert(Math.abs(r.frames - 301) <= 2, `sent ${r.frames} frames`);
});

Deno.test("RateLimiter: a refused take takes nothing and says how long to wait", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_TX, { bytes: { rate: 1_000_000, size: 5000 }, frames: null });
  assert(rl.take(DIR_TX, 100_000, 64));
  assertEquals(rl.grantBytes(DIR_TX), 5000);
  rl.settle(DIR_TX, 6000, 4); // one frame too many: 1000 owed
  assertEquals(rl.take(DIR_TX, 1514, 1), false);
  // Owed 1000 and resumes at 2 ms worth (2000): 3000 bytes at 1 MB/s = 3 ms.
  assertAlmostEquals(rl.waitMs, 3, 1e-9);
  clock.now += 1; // not yet: still owes
  assertEquals(rl.take(DIR_TX, 1514, 1), false);
  assertAlmostEquals(rl.waitMs, 2, 1e-9);
  clock.now += 2;
  assert(rl.take(DIR_TX, 1514, 1));
  assertAlmostEquals(rl.grantBytes(DIR_TX), 1514, 1e-9);
  rl.settle(DIR_TX, 0, 0); // unused: given back
  assertAlmostEquals(rl.counters(DIR_TX).byteTokens!, 2000, 1e-9);
});

Deno.test("RateLimiter: a long wait is cut to MAX_HOLD_MS, so a new limit is seen soon", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_TX, { bytes: { rate: 100, size: 100 }, frames: null });
  assert(rl.take(DIR_TX, 65_000, 1));
  rl.settle(DIR_TX, 65_000, 1);
  assertEquals(rl.take(DIR_TX, 1, 1), false);
  assertEquals(rl.waitMs, MAX_HOLD_MS);
  rl.configure(DIR_TX, null);
  assertEquals(rl.active(DIR_TX), false);
  assert(rl.take(DIR_TX, 1, 1));
});

Deno.test("RateLimiter: holds are counted once each, with their time", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_RX, { bytes: { rate: 1000, size: 1000 }, frames: null });
  assert(rl.take(DIR_RX, 2000, 1));
  rl.settle(DIR_RX, 2000, 1); // owes 1000
  assertEquals(rl.take(DIR_RX, 1, 1), false);
  clock.now += 500;
  assertEquals(rl.take(DIR_RX, 1, 1), false); // the same hold
  assertEquals(rl.counters(DIR_RX).throttles, 1);
  assertAlmostEquals(rl.counters(DIR_RX).throttledMs, 500, 1e-9);
  clock.now += 600; // tokens: -1000 + 1100 = 100 >= 2 ms worth (2)
  assert(rl.take(DIR_RX, 1, 1));
  rl.settle(DIR_RX, 0, 0);
  const c = rl.counters(DIR_RX);
  assertEquals(c.throttles, 1);
  assertAlmostEquals(c.throttledMs, 1100, 1e-9);
  assertEquals(rl.counters(DIR_TX).throttles, 0);
});

Deno.test("RateLimiter: a grant from before a new limit is not given back into it", () => {
  const clock = fakeClock();
  const rl = new RateLimiter(createRateLimitBuffer(), clock.read);
  rl.configure(DIR_TX, { bytes: { rate: 1000, size: 1000 }, frames: null });
  assert(rl.take(DIR_TX, 1000, 1));
  rl.configure(DIR_TX, { bytes: { rate: 10, size: 10 }, frames: null });
  rl.settle(DIR_TX, 0, 0);
  assertEquals(rl.counters(DIR_TX).byteTokens, 10);
  assertEquals(rl.limit(DIR_TX), { bytes: { rate: 10, size: 10 }, frames: null });
});

Deno.test("RateLimiter: two handles on one buffer share the buckets", () => {
  const clock = fakeClock();
  const buf = createRateLimitBuffer();
  const a = new RateLimiter(buf, clock.read);
  const b = new RateLimiter(buf, clock.read);
  a.configure(DIR_TX, { bytes: { rate: 1000, size: 3000 }, frames: null });
  assert(a.take(DIR_TX, 2000, 1));
  assert(b.take(DIR_TX, 2000, 1));
  assertEquals(b.grantBytes(DIR_TX), 1000, "what a holds, b does not get");
  // Nothing left but what a and b hold for their batches: wait a moment, not a hold.
  assertEquals(a.take(DIR_TX, 1, 1), false);
  assertEquals(a.waitMs, 0.2);
  assertEquals(a.counters(DIR_TX).throttles, 0);
  a.settle(DIR_TX, 2000, 1);
  b.settle(DIR_TX, 0, 0);
  assertEquals(a.counters(DIR_TX).byteTokens, 1000);
  // All spent and settled: now it is a hold.
  assert(a.take(DIR_TX, 1000, 1));
  a.settle(DIR_TX, 1000, 1);
  assertEquals(b.take(DIR_TX, 1, 1), false);
  assertEquals(b.counters(DIR_TX).throttles, 1);
  assert(b.waitMs > 0.2);
});

Deno.test("RateLimiter: rejects a bad buffer and a bad bucket", () => {
  assertThrows(() => new RateLimiter(new SharedArrayBuffer(8), () => 0), TypeError);
  const rl = new RateLimiter(createRateLimitBuffer(), () => 0);
  assertThrows(
    () => rl.configure(DIR_TX, { bytes: { rate: 0, size: 1 }, frames: null }),
    RangeError,
  );
  assertThrows(
    () => rl.configure(DIR_TX, { bytes: null, frames: { rate: 1, size: Infinity } }),
    RangeError,
  );
});

Deno.test("RateLimiter: tokens lent to a grant never settled (a worker ended mid-batch) are forgotten", () => {
  const clock = fakeClock();
  const buf = createRateLimitBuffer();
  const dead = new RateLimiter(buf, clock.read);
  const live = new RateLimiter(buf, clock.read);
  dead.configure(DIR_RX, { bytes: { rate: 1, size: 1000 }, frames: null });
  assert(dead.take(DIR_RX, 1000, 1)); // never settled
  assertEquals(live.take(DIR_RX, 1, 1), false);
  assertEquals(live.waitMs, 0.2, "lent for a moment");
  assertEquals(live.counters(DIR_RX).throttles, 0);
  clock.now += 101; // 0.101 tokens came: still empty, and the grant is stale
  assertEquals(live.take(DIR_RX, 1, 1), false);
  assertEquals(live.waitMs, MAX_HOLD_MS, "a real hold: wait for the refill");
  assertEquals(live.counters(DIR_RX).throttles, 1);
});
