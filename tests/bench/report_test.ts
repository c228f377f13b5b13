/**
 * bench/report.ts: a TX test whose vionet daemon left its core idle is
 * named driver-bound; one that used its core, RX (where the daemon waits
 * for the injector by design) and failed samples are not.
 *
 * @module
 */

import assert from "node:assert/strict";
import { driverBound, markdown } from "../../bench/report.ts";
import { guestOnly } from "./fixtures.ts";
import type { GuestSample } from "../../bench/guest.ts";
import type { BackendName, BackendSample, BackendTest } from "../../bench/dpdk.ts";

function sample(
  test: BackendTest,
  backend: BackendName,
  backendCores: number,
  error?: string,
): BackendSample {
  return {
    test,
    backend,
    rep: 0,
    pps: 1,
    gbps: 1,
    backendCores,
    tapDropped: 0,
    seconds: 4,
    ...(error ? { error } : {}),
  };
}

Deno.test("driverBound() names TX tests whose vionet daemon waited, by median", () => {
  const lines = driverBound([
    sample("tso", "vionet", 0.76),
    sample("tso", "vionet", 0.88),
    sample("tso", "vionet", 0.83),
    sample("tso", "vionet-offload-off", 1.0),
    sample("tx64", "vionet", 0.99),
    sample("tx64", "vionet", 0.5, "failed"),
    sample("tx1514", "vionet", 0.99),
    sample("tx1514", "vionet", 0.6),
    sample("tx1514", "vionet", 0.98),
    sample("rx64", "vionet", 0.2),
    sample("tso", "dpdk", 0.5),
  ]);
  assert.equal(lines.length, 1, lines.join("\n"));
  assert.match(lines[0], /in tso the vionet daemon used 0\.83 of its core/);
});

Deno.test("the guest table gives the ratio of medians and of each backend's best run, and sums lost kicks over boots", () => {
  const g = (backend: "vionet" | "qemu", boot: number, gbps: number): GuestSample => ({
    backend,
    offloads: "on",
    direction: "guest->host",
    boot,
    rep: 0,
    gbps,
    backendCores: 0.2,
    qemuCores: 1,
    ...(backend === "vionet" ? { kicksMissed: { rx: 0, tx: boot } } : {}),
  });
  // vionet: one slow boot of three, median 1.2, best 1.8; QEMU: median 1.0, best 1.2.
  const r = guestOnly([
    g("vionet", 0, 0.6),
    g("vionet", 1, 1.2),
    g("vionet", 2, 1.8),
    g("qemu", 0, 1.0),
    g("qemu", 1, 1.2),
    g("qemu", 2, 0.5),
  ]);
  const text = markdown(r);
  const row = text.split("\n").find((l) => l.startsWith("| guest->host | on "));
  assert.ok(row, text);
  const cells = row.split("|").map((c) => c.trim());
  assert.equal(cells[5], "1.2"); // 1.2 / 1.0
  assert.equal(cells[6], "1.5"); // 1.8 / 1.2
  assert.match(text, /offloads on: TX 3, RX 0/); // boots 0 + 1 + 2
});

Deno.test("the CPU split table gives QEMU's other threads' wake-ups and vionet's calls, by median", () => {
  const t = (cores: number, wakeupsPerSecond: number) => ({
    cores,
    sysCores: cores / 2,
    wakeupsPerSecond,
  });
  const g = (backend: "vionet" | "qemu", boot: number, wakeups: number): GuestSample => ({
    backend,
    offloads: "on",
    direction: "guest->host",
    boot,
    rep: 0,
    gbps: 1,
    backendCores: 0.2,
    qemuCores: 1,
    qemuThreads: {
      "10 CPU 0/TCG": t(0.9, 100),
      "11 qemu-system-x86": t(0.1, wakeups),
      "12 call_rcu": t(0, 1),
    },
    ...(backend === "vionet"
      ? {
        threads: { "20 worker-1": t(0.2, 50) },
        callsPerSecond: { rx: wakeups / 2, tx: wakeups / 2 - 10 },
      }
      : {}),
  });
  const r = guestOnly([
    g("vionet", 0, 4000),
    g("vionet", 1, 3000),
    g("vionet", 2, 5000),
    g("qemu", 0, 900),
  ]);
  const rows = markdown(r).split("\n").filter((l) => l.startsWith("| guest->host | on "));
  const split = (name: string) => {
    const row = rows.find((l) => l.split("|")[3].trim() === name);
    assert.ok(row, rows.join("\n"));
    return row.split("|").map((c) => c.trim());
  };
  const v = split("vionet");
  assert.equal(v[7], "4001"); // QEMU's threads other than the vCPU: 4000 + 1
  assert.equal(v[9], "3990"); // calls rx 2000 + tx 1990
  const q = split("QEMU built-in");
  assert.equal(q[7], "901");
  assert.equal(q[9], "", "QEMU's own backend makes no calls");
});
