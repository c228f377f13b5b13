/**
 * bench/pool.ts: the guest halves of several runs pool into one report,
 * boots renumbered so lost kicks still sum per boot; runs from different
 * machines are refused, and backend-bound samples are left out.
 *
 * @module
 */

import assert from "node:assert/strict";
import { pool } from "../../bench/pool.ts";
import { markdown, type Results } from "../../bench/report.ts";
import { guestOnly } from "./fixtures.ts";
import type { GuestSample } from "../../bench/guest.ts";

function run(date: string, kernel: string, gbps: number[][]): Results {
  const g = (backend: "vionet" | "qemu", boot: number, v: number): GuestSample => ({
    backend,
    offloads: "on",
    direction: "guest->host",
    boot,
    rep: 0,
    gbps: v,
    backendCores: 0.2,
    qemuCores: 1,
    ...(backend === "vionet" ? { kicksMissed: { rx: 0, tx: 1 } } : {}),
  });
  return {
    ...guestOnly(
      gbps.flatMap(([v, q], boot) => [g("vionet", boot, v), g("qemu", boot, q)]),
      kernel,
      date,
    ),
    backend: [{
      test: "tx64",
      backend: "vionet",
      rep: 0,
      pps: 1,
      gbps: 1,
      backendCores: 1,
      tapDropped: 0,
      seconds: 4,
    }],
    idle: [{ boot: 0, rep: 0, cores: 0.01, seconds: 10 }],
  };
}

Deno.test("pool() unites the runs' guest samples with boots renumbered, without backend samples", () => {
  // Run A: vionet's boots slow (0.8, 0.9), QEMU's fast; run B the other way round.
  const a = run("A", "6.x", [[0.8, 1.2], [0.9, 1.3]]);
  const b = run("B", "6.x", [[1.4, 0.9], [1.5, 1.0], [1.3, 0.8]]);
  const p = pool([a, b], ["a.json", "b.json"]);
  assert.equal(p.backend.length, 0, "backend ratios count only within one run");
  assert.deepEqual(p.guest.map((s) => s.boot), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]);
  assert.deepEqual(p.idle.map((s) => s.boot), [0, 2]);
  assert.equal(p.machine.date, "A, B");
  const text = markdown(p);
  const row = text.split("\n").find((l) => l.startsWith("| guest->host | on | "));
  assert.ok(row, text);
  // vionet 0.8 0.9 1.3 1.4 1.5 -> 1.3; QEMU 0.8 0.9 1.0 1.2 1.3 -> 1.0.
  assert.equal(row.split("|")[5].trim(), "1.3");
  assert.match(text, /offloads on: TX 5, RX 0/, "one lost kick per boot, five boots");
});

Deno.test("pool() refuses runs from different machines, naming the file", () => {
  assert.throws(
    () => pool([run("A", "6.x", [[1, 1]]), run("B", "6.y", [[1, 1]])], ["a.json", "b.json"]),
    /b\.json ran on 2 × test, Linux 6\.y/,
  );
  assert.throws(() => pool([]), /no runs/);
  assert.throws(
    () => pool([{ targets: [] } as unknown as Results], ["targets.json"]),
    /targets\.json is not a bench run's results\.json/,
  );
});
