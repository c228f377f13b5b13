/**
 * bench/report.ts: a TX test whose vionet daemon left its core idle is
 * named driver-bound; one that used its core, RX (where the daemon waits
 * for the injector by design) and failed samples are not.
 *
 * @module
 */

import assert from "node:assert/strict";
import { driverBound } from "../../bench/report.ts";
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
