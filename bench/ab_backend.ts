/**
 * Two checkouts of vionet side by side on the backend-bound tests (vionet
 * only, no peers): a before/after of one change on the same machine in the
 * same run, repetitions interleaved ABBA so drift and other load hit both
 * alike. Each checkout's own `bench/dpdk.ts` starts its own daemon.
 *
 * ```
 * deno run --unstable-worker-options -A bench/ab_backend.ts --a DIR --b DIR
 *          [--tests tx64,rx64] [--reps 6] [--seconds 4]
 * ```
 *
 * Prints each window, then per test the median [min–max] of frames/s and of
 * frames/s per core the daemon used (the steadier figure when other work
 * shares the CPUs), and the ratios a / b. Used for "dirty logging off costs
 * nothing": b is the same commit with the data path's three log checks
 * deleted (docs/benchmarks.md).
 *
 * @module
 */

import { parseArgs } from "node:util";
import type { BackendOptions, BackendSample, BackendTest } from "./dpdk.ts";

type Measure = (
  test: BackendTest,
  backend: "vionet",
  rep: number,
  o: BackendOptions,
) => Promise<BackendSample>;

function median(v: number[]): number {
  const s = [...v].sort((x, y) => x - y);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

function load(): string {
  return Deno.readTextFileSync("/proc/loadavg").split(" ").slice(0, 3).join(" ");
}

async function measureOf(dir: string): Promise<Measure> {
  const url = new URL(`file://${Deno.realPathSync(dir)}/bench/dpdk.ts`);
  const mod = await import(url.href);
  return mod.measureBackend as Measure;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      a: { type: "string" },
      b: { type: "string" },
      tests: { type: "string", default: "tx64,rx64" },
      reps: { type: "string", default: "6" },
      seconds: { type: "string", default: "4" },
    },
  });
  if (values.a === undefined || values.b === undefined) {
    console.error("ab_backend: --a DIR and --b DIR (two vionet checkouts) are both needed");
    Deno.exit(2);
  }
  const reps = Number(values.reps);
  const seconds = Number(values.seconds);
  if (!Number.isInteger(reps) || reps < 1 || !Number.isInteger(seconds) || seconds < 1) {
    console.error(`ab_backend: --reps and --seconds must be whole numbers of at least 1`);
    Deno.exit(2);
  }
  const tests = values.tests.split(",") as BackendTest[];
  const sides = { a: await measureOf(values.a), b: await measureOf(values.b) };
  const o: BackendOptions = {
    seconds,
    warmSeconds: 1.5,
    backendCpu: 0,
    frontendCpu: 1,
    log: (s) => console.error(s),
  };
  const got = new Map<string, { pps: number; perCore: number }[]>();
  console.log(`a: ${values.a}\nb: ${values.b}\nload before: ${load()}`);
  for (let rep = 0; rep < reps; rep++) {
    for (const test of tests) {
      for (const side of rep % 2 === 0 ? ["a", "b"] as const : ["b", "a"] as const) {
        const s = await sides[side](test, "vionet", rep, o);
        if (s.error) throw new Error(`${test} ${side} rep ${rep}: ${s.error}`);
        const key = `${test} ${side}`;
        const perCore = s.backendCores > 0 ? s.pps / s.backendCores : NaN;
        got.set(key, [...got.get(key) ?? [], { pps: s.pps, perCore }]);
        console.log(
          `${key} rep ${rep}: ${(s.pps / 1e6).toFixed(4)} Mpps, ${
            s.backendCores.toFixed(2)
          } cores (load ${load()})`,
        );
      }
    }
  }
  const fmt = (v: number[]) =>
    `${(median(v) / 1e6).toFixed(4)} [${(Math.min(...v) / 1e6).toFixed(4)}–${
      (Math.max(...v) / 1e6).toFixed(4)
    }]`;
  for (const test of tests) {
    const a = got.get(`${test} a`)!, b = got.get(`${test} b`)!;
    const pa = a.map((x) => x.pps), pb = b.map((x) => x.pps);
    const ca = a.map((x) => x.perCore), cb = b.map((x) => x.perCore);
    console.log(
      `${test}: Mpps a ${fmt(pa)}, b ${fmt(pb)}, a/b ${(median(pa) / median(pb)).toFixed(2)}; ` +
        `Mpps per daemon core a ${fmt(ca)}, b ${fmt(cb)}, a/b ${
          (median(ca) / median(cb)).toFixed(2)
        }`,
    );
  }
  console.log(`load after: ${load()}`);
}

if (import.meta.main) await main();
