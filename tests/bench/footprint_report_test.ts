import assert from "node:assert/strict";
import {
  connectionGrowthKb,
  type FootprintRun,
  footprintTable,
  type MemSample,
} from "../../bench/footprint_report.ts";

function sample(rssKb: number): MemSample {
  return {
    rssKb,
    anonKb: rssKb / 2,
    fileKb: rssKb / 2,
    pssKb: rssKb,
    ussKb: rssKb / 2,
    hwmKb: rssKb,
    threads: 10,
    threadNames: { deno: 2 },
  };
}

function run(rss: number[]): FootprintRun {
  const s = sample(60_000);
  return {
    variant: "shipped",
    describe: "as it is",
    startupMs: [400, 500, 450],
    idle: s,
    ready: s,
    attached: sample(110_000),
    load: sample(120_000),
    loadSeconds: 5,
    loadTxPps: 1000,
    loadRxPps: 1000,
    afterLoad: s,
    connections: [
      { done: 0, sample: s },
      ...rss.map((r, i) => ({ done: (i + 1) * 100, sample: sample(r) })),
    ],
    connectionSeconds: 100,
  };
}

Deno.test("the growth over connections is the trend, not the wander: a plateau passes, a leak shows", () => {
  // Wandering ±10 MB about a plateau (the first sample, before any VM, is left out).
  const plateau = [123, 113, 127, 127, 118, 121, 130, 116, 125, 120].map((m) => m * 1024);
  assert.ok(Math.abs(connectionGrowthKb(run(plateau))!) < 10 * 1024);
  // 20 kB per connection on top of the same wander: 18 MB over 900 connections.
  const leak = plateau.map((r, i) => r + 2000 * (i + 1));
  assert.ok(connectionGrowthKb(run(leak))! > 15 * 1024);
  assert.equal(connectionGrowthKb(run([100_000, 101_000])), null, "too few samples");
  const table = footprintTable([run(leak)]).join("\n");
  assert.match(
    table,
    /RSS trend, connections 100 to 1000 \(least squares\) \| \d+\.\d MB \| .*\| \*\*no\*\* \|/,
  );
  assert.match(
    footprintTable([run(plateau)]).join("\n"),
    /least squares\) \| -?\d+\.\d MB \| .*\| yes \|/,
  );
});
