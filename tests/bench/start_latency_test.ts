/**
 * bench/start_latency.ts: the table gives each step's median [min-max]
 * over the runs, the first round of each run apart from the later ones,
 * and a dash where no run had a later round; the V8 flags it runs by
 * default are the start task's.
 *
 * @module
 */

import assert from "node:assert/strict";
import { startLatencyTable, startTaskV8Flags } from "../../bench/start_latency.ts";
import type { StartRound } from "../../bench/start_probe.ts";
import { startTaskFlags } from "../helpers.ts";

function round(totalMs: number, stopMs?: number): StartRound {
  return {
    ...(stopMs === undefined ? {} : { stopMs }),
    featuresMs: totalMs / 10,
    memoryMs: 1,
    ringsMs: 0.5,
    startMs: totalMs / 2,
    callMs: 2,
    firstFrameMs: 3,
    totalMs,
  };
}

Deno.test("start_latency's table: median [min-max] per step, fresh rounds apart from later ones", () => {
  const table = startLatencyTable([
    [round(40), round(20, 4)],
    [round(60), round(30, 6)],
    [round(30), round(10, 2)],
    [round(50), round(40, 8)],
  ]);
  const row = (name: string) => table.split("\n").find((l) => l.startsWith(`| ${name} |`));
  assert.equal(
    row("SET_FEATURES to that used entry"),
    "| SET_FEATURES to that used entry | 45.0 [30.0-60.0] | 25.0 [10.0-40.0] |",
  );
  assert.equal(row("SET_FEATURES"), "| SET_FEATURES | 4.5 [3.0-6.0] | 2.5 [1.0-4.0] |");
  assert.equal(
    row("the stop before the round (both GET_VRING_BASE)"),
    "| the stop before the round (both GET_VRING_BASE) | - | 5.0 [2.0-8.0] |",
    "a fresh process has no stop before its round",
  );
  assert.equal(table.split("\n").length, 2 + 8, "a header, its rule and eight steps");
});

Deno.test("start_latency's table: runs without a second round leave that column a dash", () => {
  const table = startLatencyTable([[round(40)], [round(20)]]);
  assert.match(table, /\| SET_VRING_CALL after it \| 2\.0 \[2\.0-2\.0\] \| - \|/);
  assert.match(table, /\| the stop before the round \(both GET_VRING_BASE\) \| - \| - \|/);
});

Deno.test("start_latency runs the start task's V8 flags unless told otherwise", () => {
  const given = startTaskFlags().find((f) => f.startsWith("--v8-flags="));
  assert.ok(given !== undefined, "the start task gives V8 flags");
  assert.equal(`--v8-flags=${startTaskV8Flags()}`, given);
});
