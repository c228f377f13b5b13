/**
 * Long fuzzing runs, beyond what `deno task test` has time for:
 *
 *   deno task fuzz [--minutes N] [--seed S] [--only virtqueue|net-device]
 *
 * Runs the two deterministic fuzzers of tests/device/ (the split virtqueue
 * in both of its modes, and the net device with the poller's own RX
 * publication in the loop, `tests/device/*_fuzz_test.ts`) on fresh seeds
 * until the time is up, half the time each. Every case is one seed: a
 * failure prints it, and `VIONET_FUZZ_ONLY=<seed> deno task test
 * tests/device/net_device_fuzz_test.ts` (or the virtqueue fuzzer's
 * regression list, tests/testdata/) replays it. The totals at the end are
 * what a closing note quotes.
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  newStats as newNetStats,
  runCase as runNetCase,
} from "../tests/device/net_device_fuzz_test.ts";
import {
  runCase as runVirtqueueCase,
  type Stats as VirtqueueStats,
} from "../tests/device/virtqueue_fuzz_test.ts";

const { values } = parseArgs({
  args: Deno.args,
  options: {
    minutes: { type: "string", default: "10" },
    seed: { type: "string" },
    only: { type: "string" },
    help: { type: "boolean", default: false },
  },
});
if (values.help) {
  console.log("deno task fuzz [--minutes N] [--seed S] [--only virtqueue|net-device]");
  Deno.exit(0);
}
const minutes = Number(values.minutes);
if (!Number.isFinite(minutes) || minutes <= 0) {
  console.error(`fuzz: --minutes must be a positive number, got ${values.minutes}`);
  Deno.exit(2);
}
const only = values.only;
if (only !== undefined && only !== "virtqueue" && only !== "net-device") {
  console.error(`fuzz: --only must be virtqueue or net-device, got ${only}`);
  Deno.exit(2);
}
const firstSeed = values.seed !== undefined
  ? Number(values.seed) >>> 0
  : crypto.getRandomValues(new Uint32Array(1))[0];
console.log(`fuzz: ${minutes} min, first seed ${firstSeed}`);

/** The n-th seed of this run (a golden-ratio walk over 32 bits). */
const seedOf = (n: number) => (firstSeed + n * 0x9e3779b1) >>> 0;

function report(name: string, cases: number, ms: number, stats: unknown): void {
  console.log(
    `fuzz ${name}: ${cases} cases in ${(ms / 60_000).toFixed(1)} min, no invariant broken; ` +
      JSON.stringify(stats),
  );
}

const budget = minutes * 60_000;
const share = only === undefined ? budget / 2 : budget;

if (only !== "net-device") {
  const stats: VirtqueueStats = { chains: 0, dropped: 0, resets: 0, external: 0, reasons: {} };
  const t0 = performance.now();
  let n = 0;
  for (; performance.now() - t0 < share; n++) {
    const seed = seedOf(n);
    try {
      runVirtqueueCase(seed, stats);
    } catch (e) {
      console.error(`fuzz virtqueue: seed ${seed} broke an invariant:\n${(e as Error).stack}`);
      Deno.exit(1);
    }
  }
  report("virtqueue", n, performance.now() - t0, stats);
}

if (only !== "virtqueue") {
  const stats = newNetStats();
  const t0 = performance.now();
  let n = 0;
  for (; performance.now() - t0 < share; n++) {
    const seed = seedOf(1_000_000 + n);
    try {
      await runNetCase(seed, stats);
    } catch (e) {
      console.error(
        `fuzz net-device: seed ${seed} broke an invariant (replay: VIONET_FUZZ_ONLY=${seed} ` +
          `deno task test tests/device/net_device_fuzz_test.ts):\n${(e as Error).stack}`,
      );
      Deno.exit(1);
    }
  }
  report("net-device", n, performance.now() - t0, stats);
}
Deno.exit(0);
