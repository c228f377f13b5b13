/**
 * bench/report.ts: a TX test whose vionet daemon left its core idle is
 * named driver-bound; one that used its core, RX (where the daemon waits
 * for the injector by design) and failed samples are not. Every figure is
 * set against the kernel's batched ceiling (issue 27) and the targets
 * judged; older results files without ceilings still render.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  ceilingFor,
  deviation,
  driverBound,
  injectorBound,
  machineKind,
  markdown,
  migrationTable,
  ratioToCeiling,
  type Results,
  rxReaderLines,
  sharedMachineWarning,
  spread,
  svg,
  targets,
} from "../../bench/report.ts";
import type { CeilingSample } from "../../bench/tap_ceiling.ts";
import { guestOnly } from "./fixtures.ts";
import type { GuestSample } from "../../bench/guest.ts";
import type { BackendName, BackendSample, BackendTest } from "../../bench/dpdk.ts";
import type { MigrationBackend, MigrationSample } from "../../bench/migration.ts";

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

// ---- issue 27: every figure against the kernel's batched ceiling ----------

function ceiling(
  frame: CeilingSample["frame"],
  call: CeilingSample["call"],
  mpps: number,
  nonBlocking = true,
): CeilingSample {
  return { frame, call, nonBlocking, mpps, microseconds: 1 / mpps, errors: 0 };
}

function measured(test: BackendTest, backend: BackendName, pps: number, rep = 0): BackendSample {
  return { ...sample(test, backend, 1), pps, gbps: pps * 1e-9, rep };
}

/** A backend run with TX and RX against their ceilings, on the slow-syscall kind. */
function ceilingRun(): Results {
  const r = guestOnly([]);
  r.ceiling = [
    ceiling("64", "write", 0.59), // 1.69 µs: the slow-syscall kind
    ceiling("64", "uring-writev", 3.5),
    ceiling("1514", "uring-writev", 3.2),
    ceiling("tso", "uring-writev", 0.4),
  ];
  r.backend = [
    measured("tx64", "vionet", 1.4e6),
    measured("tx64", "dpdk", 0.5e6),
    measured("tx1514", "vionet", 2.0e6),
    measured("tx64q2", "vionet", 1.75e6),
    // RX: vionet 0.20, 0.22, 0.24 Mpps (±9 %); readv 0.40 beats io_uring 0.30.
    measured("rx64", "vionet", 0.20e6, 0),
    measured("rx64", "vionet", 0.22e6, 1),
    measured("rx64", "vionet", 0.24e6, 2),
    measured("rx64", "c-readv", 0.40e6),
    measured("rx64", "c-uring-readv", 0.30e6),
    measured("rx64", "c-uring-readv", 0, 1),
  ];
  r.backend[r.backend.length - 1].error = "failed";
  return r;
}

Deno.test("ceilingFor() takes TX from the batched io_uring write and RX from the faster C reader", () => {
  const r = ceilingRun();
  assert.equal(ceilingFor(r, "tx64")?.pps, 3.5e6);
  assert.equal(ceilingFor(r, "tx64q2")?.pps, 3.5e6, "two pairs against one thread's ceiling");
  assert.equal(ceilingFor(r, "tx1514")?.pps, 3.2e6);
  assert.equal(ceilingFor(r, "tso")?.pps, 0.4e6);
  const rx = ceilingFor(r, "rx64");
  assert.equal(rx?.pps, 0.4e6);
  assert.match(rx!.what, /readv/);
  assert.equal(ratioToCeiling(r, "tx64"), 0.4);
  assert.equal(ratioToCeiling(r, "tx64q2"), 0.5);
  assert.equal(ratioToCeiling(r, "rx64"), 0.55);
  // One system call a frame is not the ceiling: without the batched figure there is none.
  const old = guestOnly([]);
  old.ceiling = [ceiling("64", "write", 0.59), ceiling("64", "writev", 0.57)];
  old.backend = [measured("tx64", "vionet", 1e6)];
  assert.equal(ceilingFor(old, "tx64"), undefined);
  assert.ok(Number.isNaN(ratioToCeiling(old, "tx64")));
});

Deno.test("deviation() is the largest distance from the median as a share of it, NaN for one sample", () => {
  assert.equal(deviation(spread([90, 100, 115])), 0.15);
  assert.equal(deviation(spread([80, 100, 105])), 0.2);
  assert.ok(Number.isNaN(deviation(spread([100]))));
});

Deno.test("machineKind() tells the two kinds apart by one C write of a 64 B frame", () => {
  assert.equal(machineKind(undefined), undefined);
  assert.equal(machineKind([ceiling("64", "write", 0.59)])?.kind, "slow-syscall");
  assert.equal(machineKind([ceiling("64", "write", 1.6)])?.kind, "cheap-syscall");
  // The blocking figure is not the one classified.
  assert.equal(machineKind([ceiling("64", "write", 1.6, false)]), undefined);
});

Deno.test("the targets table judges TX and RX against the ceiling and RX's spread, with the kind", () => {
  const r = ceilingRun();
  const t = targets(r);
  const byName = (re: RegExp) => {
    const row = t.find((x) => re.test(x.name));
    assert.ok(row, t.map((x) => x.name).join("\n"));
    return row;
  };
  assert.equal(byName(/^TX 64 B vs the kernel's batched ceiling/).met, false); // 0.40 < 0.6
  assert.equal(byName(/^TX 1514 B vs the kernel's batched ceiling/).ratio, 2 / 3.2);
  assert.equal(byName(/^TX 1514 B/).met, true); // 0.625
  assert.equal(byName(/^RX 64 B vs/).ratio, 0.55);
  const spreadRow = byName(/^RX 64 B: largest deviation/);
  assert.ok(Math.abs(spreadRow.ratio - 0.02 / 0.22) < 1e-12);
  assert.equal(spreadRow.met, true);
  // The ceiling's spread: one repetition measured (the other failed), so none to judge.
  const ceilingSpread = byName(/^RX 64 B read ceiling: largest deviation/);
  assert.ok(Number.isNaN(ceilingSpread.ratio));
  assert.equal(ceilingSpread.detail, "1 repetition");
  assert.equal(t.some((x) => /DPDK|CPU per Gbit/.test(x.name)), false, "peers are no target");
  const md = markdown(r);
  assert.match(md, /\*\*Targets\*\* \(issue 27; .* slow-syscall kind/);
  assert.doesNotMatch(md, /issue 5\)/);
  assert.match(
    md,
    /\| RX 64 B: largest deviation from the median over the repetitions \| 9\.09 % \| ≤ 15 % \| yes \|/,
  );
  assert.match(
    md,
    /\| TX 64 B vs the kernel's batched ceiling \| 0\.40× \| ≥ 0\.6× \| \*\*no\*\* \| C io_uring/,
  );
  // The backend table leads with the ratio to the ceiling, then the peers.
  const row = md.split("\n").find((l) => l.startsWith("| TX 64 B | Mpps |"));
  assert.ok(row, md);
  const cells = row.split("|").map((c) => c.trim());
  assert.equal(cells[5], "**0.40**");
  assert.equal(cells[7], "2.8"); // 1.4 / 0.5
  assert.match(md, /machine kind: \*\*slow system calls\*\*/);
  assert.match(svg(r), /slow-syscall kind/);
});

Deno.test("an older results file without ceilings still renders, its ceiling targets not measured", () => {
  const r = guestOnly([]);
  r.backend = [measured("tx64", "vionet", 1e6), measured("rx64", "vionet", 1e5)];
  const md = markdown(r);
  assert.match(md, /machine kind: not known/);
  assert.match(md, /\| TX 64 B vs the kernel's batched ceiling \| not measured \| ≥ 0\.6× \| – \|/);
  assert.match(md, /\| RX 64 B: largest deviation .* \| not measured \|/);
  svg(r);
});

Deno.test("rxReaderLines() gives each RX reader's drops a second and frames per core-second, by median", () => {
  const rx = (
    backend: BackendName,
    pps: number,
    cores: number,
    dropped: number,
  ): BackendSample => ({
    ...measured("rx64", backend, pps),
    backendCores: cores,
    tapDropped: dropped,
    seconds: 2,
  });
  const [line] = rxReaderLines([
    rx("vionet", 200_000, 0.4, 20_000),
    rx("vionet", 300_000, 0.5, 40_000),
    rx("vionet", 250_000, 0.5, 0),
    rx("c-readv", 500_000, 1, 2_000_000),
    rx("tx64" as BackendName, 1, 1, 1),
  ]);
  // vionet: drops 0, 10k, 20k a second (median 10k); per core 500k, 600k, 500k (median 500k).
  assert.match(
    line,
    /vionet 0\.0100 M dropped\/s, 0\.500 Mpps a core; C `readv` loop 1\.00 M dropped\/s, 0\.500 Mpps a core\.$/,
  );
  assert.doesNotMatch(line, /DPDK|io_uring/);
});

Deno.test("sharedMachineWarning() speaks up when the load is above half the CPUs before, or above the bench's own after", () => {
  const m = guestOnly([]).machine;
  assert.equal(sharedMachineWarning({ ...m, loadBefore: "0.55 0.52 0.71" }), undefined);
  assert.equal(
    sharedMachineWarning({ ...m, loadBefore: "0.5 2 2", loadAfter: "1.0 1 1" }),
    undefined,
  );
  // A quiet run ends with the bench's own two busy processes in the load.
  assert.equal(
    sharedMachineWarning({ ...m, loadBefore: "0.15 1.22 2.47", loadAfter: "2.11 2.38 2.56" }),
    undefined,
  );
  assert.match(
    sharedMachineWarning({ ...m, loadBefore: "1.2 1 1", loadAfter: "2.11 2 2" })!,
    /a load average of 2\.11/,
  );
  const w = sharedMachineWarning({ ...m, loadBefore: "0.9 1 1", loadAfter: "8.56 7.70 5.66" });
  assert.match(
    w!,
    /a load average of 8\.56 on 2 CPUs \(before: 0\.9 1 1; after: 8\.56 7\.70 5\.66\)/,
  );
  assert.match(
    markdown({ ...guestOnly([]), machine: { ...m, loadBefore: "3 3 3" } }),
    /\*\*Shared machine\*\*/,
  );
  assert.doesNotMatch(markdown(guestOnly([])), /Shared machine/);
});

Deno.test("injectorBound() names an RX reader the tap dropped nothing for, by median, and the target says so", () => {
  const rx = (backend: BackendName, dropped: number, rep: number): BackendSample => ({
    ...measured("rx64", backend, 200_000, rep),
    tapDropped: dropped,
  });
  const busy = [rx("vionet", 5, 0), rx("vionet", 0, 1), rx("vionet", 9, 2)];
  assert.equal(injectorBound(busy, "vionet"), undefined);
  const idle = [rx("vionet", 0, 0), rx("vionet", 0, 1), rx("vionet", 9, 2)];
  assert.match(
    injectorBound(idle, "vionet")!,
    /injector-bound: the tap dropped nothing for vionet/,
  );
  assert.equal(injectorBound(idle, "dpdk"), undefined, "no dpdk samples");
  const r = ceilingRun();
  r.backend = [...r.backend.filter((x) => !(x.test === "rx64" && x.backend === "vionet")), ...idle];
  const row = targets(r).find((t) => t.name.startsWith("RX 64 B vs"));
  assert.match(row!.detail, /C `readv` loop: 0\.400 Mpps; injector-bound/);
});

function migration(
  backend: MigrationBackend,
  downtimeMs: number,
  stopMs?: number,
): MigrationSample {
  return {
    backend,
    rep: 0,
    status: "completed",
    downtimeMs,
    ...(stopMs === undefined ? {} : { stopMs }),
    totalMs: 1800,
    stallToGuestMs: 300,
    stallFromGuestMs: 250,
    bridgeMs: 20,
    intact: true,
  };
}

Deno.test("report: the migration table sets the source's stop beside the downtime", () => {
  const lines = migrationTable([
    migration("vionet", 50, 6),
    migration("vionet", 40, 5),
    migration("vionet", 60, 7),
    migration("qemu", 40, 0.5),
    migration("qemu", 30, 0.4),
    migration("qemu", 50, 0.6),
  ]);
  const row = (name: string) => lines.find((l) => l.startsWith(`| ${name} |`));
  assert.equal(
    row("downtime QEMU reports"),
    "| downtime QEMU reports | 50.0 [40.0–60.0] | 40.0 [30.0–50.0] | 1.3 |",
  );
  assert.equal(
    row("of it, the source's stop of the VM (QEMU's trace)"),
    "| of it, the source's stop of the VM (QEMU's trace) | 6.0 [5.0–7.0] | 0.50 [0.40–0.60] | 12.0 |",
  );
});

Deno.test("report: a migration run from before the stop was traced shows a dash there", () => {
  const lines = migrationTable([migration("vionet", 50), migration("qemu", 40)]);
  const stop = lines.find((l) => l.startsWith("| of it, the source's stop"));
  assert.match(stop!, /\| – \| – \| /);
});
