/**
 * Turns the bench's samples into medians with spreads, ratios against the
 * kernel's own batched ceiling first and the peers second, and the targets
 * of issue 27; writes them as JSON, a markdown table and an SVG chart
 * (bench/results/).
 *
 * @module
 */

import type { BackendName, BackendSample, BackendTest } from "./dpdk.ts";
import { type Direction, type GuestSample, type IdleSample, isVcpu } from "./guest.ts";
import { BATCHED_CALL, type CeilingSample, ceilingTable } from "./tap_ceiling.ts";
import type { MigrationSample } from "./migration.ts";
import { tsoFrame } from "./frames.ts";
import { type FootprintRun, footprintTable } from "./footprint_report.ts";

/** Where and how the bench ran. */
export interface Machine {
  cpus: number;
  cpuModel: string;
  kernel: string;
  accelerator: string;
  deno: string;
  dpdk: string;
  qemu: string;
  date: string;
  loadBefore: string;
  /** The load average when the run ended (absent in older runs). */
  loadAfter?: string;
}

/** Everything one `deno task bench` run produced. */
export interface Results {
  machine: Machine;
  command: string;
  options: Record<string, unknown>;
  backend: BackendSample[];
  guest: GuestSample[];
  idle: IdleSample[];
  /** The kernel's tap write ceiling from one C thread (bench/tap_ceiling.ts); absent in older runs. */
  ceiling?: CeilingSample[];
  /** Live migrations, vionet and QEMU's own tap backend (bench/migration.ts); absent in older runs. */
  migration?: MigrationSample[];
  /** One daemon's memory, threads and startup (bench/footprint.ts); absent in older runs. */
  footprint?: FootprintRun[];
  notes: string[];
}

/** Median, min, max and count of the successful values. */
export interface Spread {
  median: number;
  min: number;
  max: number;
  n: number;
  failed: number;
}

/** The spread of `values` (NaN medians when there are none). */
export function spread(values: number[], failed = 0): Spread {
  const v = [...values].sort((a, b) => a - b);
  if (v.length === 0) return { median: NaN, min: NaN, max: NaN, n: 0, failed };
  const mid = v.length >> 1;
  const median = v.length & 1 ? v[mid] : (v[mid - 1] + v[mid]) / 2;
  return { median, min: v[0], max: v[v.length - 1], n: v.length, failed };
}

/** One target of issue 27 and where this run stands. */
export interface TargetRow {
  name: string;
  /** vionet's figure over the reference's (medians); for `percent` rows a share. */
  ratio: number;
  target: number;
  /** For "at most" targets (idle CPU, spread). */
  atMost?: boolean;
  /** A share shown in per cent (idle CPU, spread), not a ratio. */
  percent?: boolean;
  met: boolean;
  detail: string;
}

/**
 * Which of the two kinds of test machine this is, by what one C `write()`
 * of a 64 B frame to the tap cost in this run (`tap_ceiling`, O_NONBLOCK):
 * 1.6–1.8 µs on the kind with dear system calls, 0.6–0.7 µs on the other,
 * though both report the same CPU and kernel. Undefined without that figure.
 */
export function machineKind(
  ceiling: readonly CeilingSample[] | undefined,
): { kind: "slow-syscall" | "cheap-syscall"; microseconds: number } | undefined {
  const w = ceiling?.find((x) => x.frame === "64" && x.call === "write" && x.nonBlocking);
  if (!w || !(w.microseconds > 0)) return undefined;
  return { kind: w.microseconds >= KIND_THRESHOLD_US ? "slow-syscall" : "cheap-syscall", ...w };
}

/** A 64 B `write()` at or above this many µs marks the slow-syscall kind (see {@link machineKind}). */
export const KIND_THRESHOLD_US = 1.1;

/**
 * A warning when other work shared the machine: a 1-minute load average
 * above half the CPUs before the run, or above the CPUs plus a half after it
 * (while it runs the bench itself keeps every CPU busy: the backend on one,
 * the polling driver and injector on the other, so a quiet run ends near
 * 2 on 2 CPUs). Undefined for a quiet run, or without figures.
 */
export function sharedMachineWarning(m: Machine): string | undefined {
  const first = (l: string | undefined) => Number(l?.split(" ")[0]);
  const before = first(m.loadBefore);
  const after = first(m.loadAfter);
  const busyBefore = before > m.cpus / 2;
  const busyAfter = after > m.cpus + 0.5;
  if (!busyBefore && !busyAfter) return undefined;
  const load = Math.max(...[before, after].filter((x) => Number.isFinite(x)));
  return `**Shared machine**: a load average of ${load} on ${m.cpus} CPUs ` +
    `(before: ${m.loadBefore}; after: ${m.loadAfter ?? "not recorded"}): other work took CPU ` +
    "time from the processes measured, so rates and their ratios measure that too; a busy " +
    "loop (the raw and C ceilings, DPDK) loses more than a process that sleeps. The C " +
    "ceiling's CPU microseconds a frame hold better. Re-run on a quiet machine.";
}

/** The one-line description of the machine kind for the report. */
function kindLine(r: Results): string {
  const k = machineKind(r.ceiling);
  if (!k) return "machine kind: not known (no tap write ceiling in this run)";
  return `machine kind: **${k.kind === "slow-syscall" ? "slow" : "cheap"} system calls** ` +
    `(a C \`write()\` of a 64 B frame to the tap took ${k.microseconds.toFixed(2)} µs; ` +
    `the other kind: ${k.kind === "slow-syscall" ? "about 0.6" : "1.6 or more"})`;
}

/** Frame bytes of each test's frame, for Gbit/s from frames per second. */
const FRAME_BYTES: Record<string, number> = {
  "64": 64,
  "1514": 1514,
  tso: tsoFrame().byteLength,
};

/** The ceiling's frame for a backend test ("64" for tx64 and tx64q2, "tso" for tso). */
function ceilingFrame(test: BackendTest): CeilingSample["frame"] | undefined {
  if (test === "tso") return "tso";
  const m = /^tx(64|1514)/.exec(test);
  return m ? m[1] as CeilingSample["frame"] : undefined;
}

/** The matching ceiling of a backend test: frames per second and what it is. */
export interface Ceiling {
  pps: number;
  /** The ceiling's spread (RX: over the repetitions; TX: one measurement). */
  spread: Spread;
  what: string;
}

/**
 * The kernel's batched ceiling for `test`, or undefined where this run did
 * not measure it (older results): TX, one C thread writing 64 WRITEV per
 * io_uring_enter as vionet does (`r.ceiling`, uring-writev); RX, the faster
 * (by median) of the C `readv` loop and io_uring READV batches, measured
 * as rx64 backends in this run.
 */
export function ceilingFor(r: Results, test: BackendTest): Ceiling | undefined {
  if (test === "rx64") {
    let best: Ceiling | undefined;
    for (const bk of ["c-readv", "c-uring-readv"] as const) {
      const s = pick(r.backend, "rx64", bk, "pps");
      if (s.n > 0 && (!best || s.median > best.pps)) {
        best = {
          pps: s.median,
          spread: s,
          what: bk === "c-readv" ? "C `readv` loop" : "C io_uring READV batches",
        };
      }
    }
    return best;
  }
  const frame = ceilingFrame(test);
  const c = r.ceiling?.find((x) =>
    x.frame === frame && x.call === BATCHED_CALL && x.nonBlocking && !x.errors
  );
  if (!c) return undefined;
  const pps = c.mpps * 1e6;
  return { pps, spread: spread([pps]), what: "C io_uring, 64 WRITEV a call" };
}

/** vionet's median over the ceiling's, for `test` (NaN where either is missing). */
export function ratioToCeiling(r: Results, test: BackendTest, backend: BackendName = "vionet") {
  const c = ceilingFor(r, test);
  const v = pick(r.backend, test, backend, "pps");
  return c && v.n ? v.median / c.pps : NaN;
}

/**
 * How each RX reader fared (rx64, medians over the repetitions): frames the
 * tap dropped a second because its queue was full (a reader the tap drops
 * frames for all along is the bottleneck; one with none measured its
 * injector), and frames per second of the reader's own CPU. The latter
 * holds better than the rate when other work shares the backend's CPU, as
 * long as the reader had frames waiting; the C readers poll, so for them
 * it is a floor.
 */
export function rxReaderLines(samples: readonly BackendSample[]): string[] {
  const readers: Array<[BackendName, string]> = [
    ["vionet", "vionet"],
    ["dpdk", "DPDK vhost + tap"],
    ["c-readv", "C `readv` loop"],
    ["c-uring-readv", "C io_uring READV"],
  ];
  const cells: string[] = [];
  for (const [bk, name] of readers) {
    const s = samples.filter((x) => x.test === "rx64" && x.backend === bk && !x.error);
    if (s.length === 0) continue;
    const drops = spread(s.map((x) => x.tapDropped / x.seconds)).median;
    const perCore = spread(s.filter((x) => x.backendCores > 0).map((x) => x.pps / x.backendCores));
    cells.push(
      `${name} ${fmt(drops / 1e6)} M dropped/s, ${fmt(perCore.median / 1e6, 3)} Mpps a core`,
    );
  }
  return [
    "RX 64 B readers (medians): frames the tap dropped for a full queue, and frames per second " +
    `of the reader's own CPU: ${cells.join("; ")}.`,
  ];
}

/**
 * For rx64: a note when the tap dropped no frame for `backend` in most
 * repetitions (a median of 0 a second): the reader kept up with the
 * injector, so its figure is the injector's, a floor of its own. Undefined
 * otherwise.
 */
export function injectorBound(
  samples: readonly BackendSample[],
  backend: BackendName,
): string | undefined {
  const s = samples.filter((x) => x.test === "rx64" && x.backend === backend && !x.error);
  if (s.length === 0) return undefined;
  const drops = spread(s.map((x) => x.tapDropped / x.seconds)).median;
  return drops === 0
    ? `injector-bound: the tap dropped nothing for ${backend}, so its figure is a floor`
    : undefined;
}

/**
 * The largest deviation of a sample from the median, as a share of the
 * median (0.15: every sample within ±15 %); NaN with fewer than two.
 */
export function deviation(s: Spread): number {
  if (s.n < 2 || !(s.median > 0)) return NaN;
  return Math.max(s.median - s.min, s.max - s.median) / s.median;
}

const BACKEND_LABEL: Record<BackendName, string> = {
  "vionet": "vionet",
  "vionet-offload-off": "vionet --offload off",
  "vionet-capture": "vionet --pcap (capture on)",
  "dpdk": "DPDK vhost + tap",
  "raw": "raw tap (1 thread)",
  "c-readv": "C readv loop (RX ceiling)",
  "c-uring-readv": "C io_uring READV (RX ceiling)",
};

function pick(
  samples: BackendSample[],
  test: BackendTest,
  backend: BackendName,
  key: "pps" | "gbps",
) {
  const s = samples.filter((x) => x.test === test && x.backend === backend);
  return spread(s.filter((x) => !x.error).map((x) => x[key]), s.filter((x) => x.error).length);
}

function guestPick(g: GuestSample[], backend: string, offloads: string, dir: Direction) {
  const s = g.filter((x) =>
    x.backend === backend && x.offloads === offloads && x.direction === dir && !x.error
  );
  return {
    gbps: spread(s.map((x) => x.gbps)),
    cores: spread(s.map((x) => x.backendCores)),
    cpuPerGbit: spread(s.map((x) => x.backendCores / x.gbps)),
    qemuCores: spread(s.map((x) => x.qemuCores)),
    /**
     * Every host core the VM's networking used, per Gbit/s: the QEMU process
     * (vCPUs included) plus, for vionet, the daemon. Under TCG QEMU's own
     * virtio-net moves TX frames on the vCPU thread, which the backend-only
     * figure cannot see; this one counts both set-ups the same way.
     */
    hostCpuPerGbit: spread(
      s.map((x) => (x.qemuCores + (backend === "vionet" ? x.backendCores : 0)) / x.gbps),
    ),
    failed: g.filter((x) => x.backend === backend && x.offloads === offloads && x.error).length,
  };
}

/** A sample's CPU by where it ran: QEMU's vCPUs, QEMU's other threads, the vionet daemon. */
function cpuSplit(x: GuestSample) {
  const sum = (
    threads:
      | Record<string, { cores: number; sysCores: number; wakeupsPerSecond: number }>
      | undefined,
    keep: (name: string) => boolean,
  ) => {
    let cores = 0, sys = 0, wakeups = 0;
    for (const [name, t] of Object.entries(threads ?? {})) {
      if (keep(name)) cores += t.cores, sys += t.sysCores, wakeups += t.wakeupsPerSecond;
    }
    return { cores, sys, wakeups };
  };
  // Keyed "tid comm".
  const vcpu = (name: string) => isVcpu(name.slice(name.indexOf(" ") + 1));
  return {
    vcpu: sum(x.qemuThreads, vcpu).cores,
    qemuOther: sum(x.qemuThreads, (n) => !vcpu(n)),
    daemon: sum(x.threads, () => true),
  };
}

/** The median of the guest's virtio interrupts per second, or "" where the samples lack it. */
function irqs(s: GuestSample[]): string {
  const n = s.flatMap((x) => x.guestIrqsPerSecond === undefined ? [] : [x.guestIrqsPerSecond]);
  return n.length ? String(Math.round(spread(n).median)) : "";
}

/** The median of vionet's call eventfd writes per second (RX + TX), or "" where the samples lack them. */
function calls(s: GuestSample[]): string {
  const n = s.flatMap((x) => x.callsPerSecond ? [x.callsPerSecond.rx + x.callsPerSecond.tx] : []);
  return n.length ? String(Math.round(spread(n).median)) : "";
}

/** Rows of the CPU split table; none when the samples predate per-thread QEMU figures. */
function cpuSplitRows(g: GuestSample[]): string[] {
  const rows: string[] = [];
  for (const offloads of ["on", "off"]) {
    for (const dir of ["guest->host", "host->guest"] as Direction[]) {
      for (const backend of ["vionet", "qemu"]) {
        const s = g.filter((x) =>
          x.backend === backend && x.offloads === offloads && x.direction === dir && !x.error &&
          x.qemuThreads
        );
        if (!s.length) continue;
        const parts = s.map(cpuSplit);
        const med = (f: (p: ReturnType<typeof cpuSplit>) => number) =>
          fmt(spread(parts.map(f)).median, 2);
        rows.push(
          `| ${dir} | ${offloads} | ${backend === "qemu" ? "QEMU built-in" : "vionet"} | ${
            fmt(spread(s.map((x) => x.gbps)).median)
          } | ${med((p) => p.vcpu)} | ${med((p) => p.qemuOther.cores)} (${
            med((p) => p.qemuOther.sys)
          }) | ${Math.round(spread(parts.map((p) => p.qemuOther.wakeups)).median)} | ${
            backend === "vionet"
              ? `${med((p) => p.daemon.cores)} (${med((p) => p.daemon.sys)})`
              : ""
          } | ${calls(s)} | ${irqs(s)} |`,
        );
      }
    }
  }
  return rows;
}

function fmt(x: number, digits = 3): string {
  if (!Number.isFinite(x)) return "–";
  return x >= 100 ? x.toFixed(0) : x >= 10 ? x.toFixed(1) : x.toPrecision(digits);
}

function fmtSpread(s: Spread, scale = 1, digits = 3): string {
  if (s.n === 0) return s.failed ? `failed (${s.failed}×)` : "–";
  const body = `${fmt(s.median * scale, digits)} [${fmt(s.min * scale, 2)}–${
    fmt(s.max * scale, 2)
  }]`;
  return s.failed ? `${body}, ${s.failed} failed` : body;
}

function row(name: string, num: Spread, den: Spread, target: number, detail: string): TargetRow {
  const ratio = num.median / den.median;
  return { name, ratio, target, met: ratio >= target, detail };
}

/** The issue 27 targets against the kernel's batched ceiling. */
export const CEILING_TARGETS = { tx: 0.6, rx: 0.6, tso: 0.8, rxDeviation: 0.15 } as const;

/**
 * Every target of issue 27 that this run measured: TX and RX against the
 * kernel's batched ceiling, RX's spread over the repetitions, TSO against
 * the plain GSO write (raw), guest-bound throughput against QEMU's own
 * backend, the idle guest's CPU. The peers (DPDK) and CPU per Gbit/s are
 * in the tables, no longer targets.
 */
export function targets(r: Results): TargetRow[] {
  const b = r.backend;
  const rows: TargetRow[] = [];
  if (b.length) {
    const vsCeiling = (test: BackendTest, name: string, target: number) => {
      const c = ceilingFor(r, test);
      const ratio = ratioToCeiling(r, test);
      rows.push({
        name,
        ratio,
        target,
        met: ratio >= target,
        detail: c ? `${c.what}: ${fmt(c.pps / 1e6)} Mpps` : "ceiling not measured",
      });
    };
    vsCeiling("tx64", "TX 64 B vs the kernel's batched ceiling", CEILING_TARGETS.tx);
    vsCeiling("tx1514", "TX 1514 B vs the kernel's batched ceiling", CEILING_TARGETS.tx);
    vsCeiling("rx64", "RX 64 B vs the kernel's batched read ceiling", CEILING_TARGETS.rx);
    // A reader the tap dropped nothing for waited for its injector: its figure is a floor.
    const idle = injectorBound(b, "vionet");
    if (idle) rows[rows.length - 1].detail += `; ${idle}`;
    // The ratio holds still only if both of its figures do.
    const rxCeiling = ceilingFor(r, "rx64");
    for (
      const [name, s] of [
        [
          "RX 64 B: largest deviation from the median over the repetitions",
          pick(b, "rx64", "vionet", "pps"),
        ],
        [
          "RX 64 B read ceiling: largest deviation from the median",
          rxCeiling?.spread ?? spread([]),
        ],
      ] as const
    ) {
      const dev = deviation(s);
      rows.push({
        name,
        ratio: dev,
        target: CEILING_TARGETS.rxDeviation,
        atMost: true,
        percent: true,
        met: dev <= CEILING_TARGETS.rxDeviation,
        detail: `${s.n} repetition${s.n === 1 ? "" : "s"}`,
      });
    }
    const tso = row(
      "TSO vs the plain GSO write (raw)",
      pick(b, "tso", "vionet", "gbps"),
      pick(b, "tso", "raw", "gbps"),
      CEILING_TARGETS.tso,
      "Gbit/s",
    );
    // The daemon, not the driver, must be what limits it (driverBound()).
    if (driverBound(b).some((l) => l.includes("in tso the vionet daemon"))) {
      tso.met = false;
      tso.detail = "Gbit/s; driver-bound (the daemon waited), so not a figure of vionet's";
    }
    rows.push(tso);
  }
  for (const offloads of ["on", "off"]) {
    for (const dir of ["guest->host", "host->guest"] as Direction[]) {
      const v = guestPick(r.guest, "vionet", offloads, dir);
      const q = guestPick(r.guest, "qemu", offloads, dir);
      if (v.gbps.n + q.gbps.n + v.failed + q.failed === 0) continue;
      rows.push(row(`guest ${dir}, offloads ${offloads}, vs QEMU`, v.gbps, q.gbps, 1, "Gbit/s"));
    }
  }
  if (r.idle.length) {
    const idle = spread(r.idle.map((x) => x.cores));
    rows.push({
      name: "idle guest: daemon CPU (share of a core)",
      ratio: idle.median,
      target: 0.02,
      atMost: true,
      percent: true,
      met: idle.median < 0.02,
      detail: "cores",
    });
  }
  return rows;
}

/**
 * Two queue pairs against one, each backend on one core (issue 24's target:
 * vionet with 2 pairs at least 0.95× of 1 pair: being multiqueue costs
 * nothing). Empty when the run had no two-pair test.
 */
export function queuePairTable(samples: BackendSample[], r?: Results): string[] {
  const tests = [["tx64", "tx64q2", "TX 64 B"], ["tx1514", "tx1514q2", "TX 1514 B"]] as const;
  if (!samples.some((x) => x.test === "tx64q2" || x.test === "tx1514q2")) return [];
  const lines = [
    "**Two queue pairs** on the same one backend core (Mpps; the driver sends on both):",
    "",
    "| test | vionet, 1 pair | vionet, 2 pairs | 2 / 1 (≥ 0.95) | 2 pairs / kernel's batched ceiling (1 thread) | DPDK, 1 queue | DPDK, 2 queues | 2 / 1 |",
    "|---|---|---|---|---|---|---|---|",
  ];
  for (const [one, two, name] of tests) {
    const s = (t: BackendTest, bk: BackendName) => pick(samples, t, bk, "pps");
    lines.push(
      `| ${name} | ${fmtSpread(s(one, "vionet"), 1e-6)} | ${fmtSpread(s(two, "vionet"), 1e-6)} | ` +
        `${fmt(s(two, "vionet").median / s(one, "vionet").median, 2)} | ` +
        `${r ? fmt(ratioToCeiling(r, two), 2) : "–"} | ` +
        `${fmtSpread(s(one, "dpdk"), 1e-6)} | ${fmtSpread(s(two, "dpdk"), 1e-6)} | ` +
        `${fmt(s(two, "dpdk").median / s(one, "dpdk").median, 2)} |`,
    );
  }
  lines.push("");
  return lines;
}

/**
 * Capture on against off: the same test with `--pcap` (capture on from the
 * start, the file on the bench's temporary directory), its rate over plain
 * vionet's, and what share of the frames the capture wrote (the rest were
 * dropped behind: the writer thread shares the backend's one core).
 */
export function captureTable(samples: BackendSample[]): string[] {
  if (!samples.some((x) => x.backend === "vionet-capture")) return [];
  const lines = [
    "**Capture on** (`--pcap FILE`, capture on; same core; file on the bench's temporary directory):",
    "",
    "| test | unit | vionet | vionet, capture on | on / off | frames written (median share) | dropped behind (median share) | file MB/s (median) |",
    "|---|---|---|---|---|---|---|---|",
  ];
  const names = { tx64: "TX 64 B", tx1514: "TX 1514 B", tso: "TX 64 KiB TSO", rx64: "RX 64 B" };
  for (const test of ["tx64", "tx1514", "tso", "rx64"] as const) {
    const key = test === "tso" ? "gbps" : "pps";
    const scale = test === "tso" ? 1 : 1e-6;
    const off = pick(samples, test, "vionet", key);
    const on = pick(samples, test, "vionet-capture", key);
    const runs = samples.filter((x) =>
      x.test === test && x.backend === "vionet-capture" && x.capture
    );
    if (runs.length === 0) continue;
    // Of the frames the capture saw in the window: written, or dropped behind.
    const frames = (x: BackendSample) => x.capture!.packets + x.capture!.droppedBehind;
    const share = (f: (x: BackendSample) => number) =>
      spread(runs.map((x) => (frames(x) > 0 ? f(x) / frames(x) : 0))).median;
    const captured = share((x) => x.capture!.packets);
    const behind = share((x) => x.capture!.droppedBehind);
    const mbps = spread(runs.map((x) => x.capture!.fileBytes / x.seconds / 1e6)).median;
    lines.push(
      `| ${names[test]} | ${test === "tso" ? "Gbit/s" : "Mpps"} | ${fmtSpread(off, scale)} | ` +
        `${fmtSpread(on, scale)} | ${fmt(on.median / off.median, 2)} | ${
          fmt(captured * 100, 2)
        } % | ` +
        `${fmt(behind * 100, 2)} % | ${fmt(mbps, 2)} |`,
    );
  }
  lines.push("");
  return lines;
}

/**
 * A TX test in which vionet's daemon left its CPU idle (a median below
 * {@link DRIVER_BOUND_CORES} cores) measured the driver, not vionet: with
 * frames to move, the daemon's threads would use the whole core they share.
 * One line per such test, for the notes under the backend table.
 */
export function driverBound(samples: readonly BackendSample[]): string[] {
  const out: string[] = [];
  for (const test of ["tx64", "tx1514", "tso"] as BackendTest[]) {
    for (const bk of ["vionet", "vionet-offload-off"] as BackendName[]) {
      const c = spread(
        samples.filter((x) => x.test === test && x.backend === bk && !x.error).map((x) =>
          x.backendCores
        ),
      );
      if (c.n > 0 && c.median < DRIVER_BOUND_CORES) {
        out.push(
          `Driver-bound: in ${test} the ${bk} daemon used ${fmt(c.median, 2)} of its core ` +
            `(median): it waited for the driver, so its figure is a floor, not its ceiling.`,
        );
      }
    }
  }
  return out;
}

/** Below this many cores a TX test's daemon was waiting (see {@link driverBound}). */
export const DRIVER_BOUND_CORES = 0.9;

/** The markdown tables: backend-bound, guest-bound, targets. */
export function markdown(r: Results): string {
  const m = r.machine;
  const lines: string[] = [];
  lines.push(
    `Machine: ${m.cpus} × ${m.cpuModel}, Linux ${m.kernel}, guests under ${m.accelerator}; ` +
      `${m.deno}, DPDK ${m.dpdk}, QEMU ${m.qemu}; ${m.date}; load average before the run: ${m.loadBefore}; ` +
      `${kindLine(r)}.`,
  );
  lines.push("");
  const shared = sharedMachineWarning(m);
  if (shared) lines.push(shared, "");
  lines.push(
    `Command: \`${r.command}\`. Medians [min–max] over the repetitions; ratios are of medians.`,
  );
  lines.push("");
  if (r.backend.length) {
    lines.push(
      "**Backend-bound** (DPDK virtio-user as the guest, no VM; one CPU per process). " +
        "First against the kernel's own ceiling, one C thread making the system calls vionet " +
        "makes and nothing else (TX: 64 io_uring WRITEV a call; RX: the faster of a `readv` " +
        "loop and io_uring READV batches, fed by the same injector), then against the peers:",
    );
    lines.push("");
    lines.push(
      "| test | unit | vionet | kernel's batched ceiling | **vionet / ceiling** | DPDK vhost + tap | vionet / DPDK | raw tap (Deno, 1 thread) | vionet / raw | vionet --offload off |",
    );
    lines.push("|---|---|---|---|---|---|---|---|---|---|");
    const names = { tx64: "TX 64 B", tx1514: "TX 1514 B", tso: "TX 64 KiB TSO", rx64: "RX 64 B" };
    for (const test of ["tx64", "tx1514", "tso", "rx64"] as const) {
      const gbit = test === "tso";
      const key = gbit ? "gbps" : "pps";
      const scale = gbit ? 1 : 1e-6;
      const unit = gbit ? "Gbit/s" : "Mpps";
      const s = (bk: BackendName) => pick(r.backend, test, bk, key);
      const c = ceilingFor(r, test);
      // The ceiling in the row's unit: TSO from 64 KiB frames a second.
      const ceilingCell = (bits: boolean) => {
        if (!c) return "–";
        const k = bits ? FRAME_BYTES[ceilingFrame(test) ?? "64"] * 8 / 1e9 : 1e-6;
        return test === "rx64"
          ? `${fmtSpread(c.spread, k)} (${c.what})`
          : `${fmt(c.pps * k)} (${c.what})`;
      };
      const off = gbit ? fmtSpread(s("vionet-offload-off"), scale) : "";
      lines.push(
        `| ${names[test]} | ${unit} | ${fmtSpread(s("vionet"), scale)} | ${ceilingCell(gbit)} | ` +
          `**${fmt(ratioToCeiling(r, test), 2)}** | ${fmtSpread(s("dpdk"), scale)} | ` +
          `${fmt(s("vionet").median / s("dpdk").median, 2)} | ${fmtSpread(s("raw"), scale)} | ` +
          `${fmt(s("vionet").median / s("raw").median, 2)} | ${off} |`,
      );
      if (test === "tx1514") {
        const g = (bk: BackendName) => pick(r.backend, test, bk, "gbps");
        lines.push(
          `| TX 1514 B | Gbit/s | ${fmtSpread(g("vionet"))} | ${ceilingCell(true)} | | ` +
            `${fmtSpread(g("dpdk"))} | | ${fmtSpread(g("raw"))} | | |`,
        );
      }
    }
    if (ceilingFor(r, "rx64")) {
      lines.push("");
      lines.push(...rxReaderLines(r.backend));
    }
    const cores = (bk: BackendName) =>
      spread(r.backend.filter((x) => x.backend === bk && !x.error).map((x) => x.backendCores));
    lines.push("");
    lines.push(
      `Backend CPU over the windows (cores, median): vionet ${fmt(cores("vionet").median, 2)}, ` +
        `DPDK ${fmt(cores("dpdk").median, 2)} (polls), raw ${fmt(cores("raw").median, 2)}.`,
    );
    for (const line of driverBound(r.backend)) lines.push("", line);
    lines.push("");
    lines.push(...queuePairTable(r.backend, r));
    lines.push(...captureTable(r.backend));
  }
  if (r.ceiling?.length) {
    lines.push(
      "**The kernel's own ceiling** for the same frames: one C thread on the backend's CPU, " +
        "one system call a frame or vionet's io_uring batches, nothing else " +
        "(`deno run -A bench/tap_ceiling.ts`). The batched column is the TX ceiling above; " +
        "the raw column above is the `write` loop in Deno (one FFI call a frame, O_NONBLOCK):",
    );
    lines.push("");
    lines.push(...ceilingTable(r.ceiling));
    lines.push("");
  }
  if (r.guest.length) {
    lines.push(`**Guest-bound** (one Linux guest under ${m.accelerator}, iperf3, one TCP stream):`);
    lines.push("");
    lines.push(
      "| direction | offloads | vionet Gbit/s | QEMU built-in Gbit/s | ratio | ratio of best runs | vionet CPU (cores) | QEMU backend CPU (cores) | CPU per Gbit/s ratio | all host CPU per Gbit/s ratio |",
    );
    lines.push("|---|---|---|---|---|---|---|---|---|---|");
    for (const offloads of ["on", "off"]) {
      for (const dir of ["guest->host", "host->guest"] as Direction[]) {
        const v = guestPick(r.guest, "vionet", offloads, dir);
        const q = guestPick(r.guest, "qemu", offloads, dir);
        const vf = v.failed ? ` (${v.failed} failed)` : "";
        const qf = q.failed ? ` (${q.failed} failed)` : "";
        lines.push(
          `| ${dir} | ${offloads} | ${fmtSpread(v.gbps)}${vf} | ${fmtSpread(q.gbps)}${qf} | ` +
            `${fmt(v.gbps.median / q.gbps.median, 2)} | ${fmt(v.gbps.max / q.gbps.max, 2)} | ${
              fmtSpread(v.cores, 1, 2)
            } | ${fmtSpread(q.cores, 1, 2)} | ` +
            `${fmt(v.cpuPerGbit.median / q.cpuPerGbit.median, 2)} | ` +
            `${fmt(v.hostCpuPerGbit.median / q.hostCpuPerGbit.median, 2)} |`,
        );
      }
    }
    lines.push("");
    lines.push(
      "QEMU backend CPU is QEMU's threads other than its vCPUs; under TCG its virtio-net does the " +
        "TX work on the vCPU thread, so that figure leaves it out. The last column counts every " +
        "host core the VM's networking used the same way for both: the QEMU process (vCPUs " +
        "included) plus, for vionet, the daemon. Under TCG a guest's TCP stream runs at one of " +
        "two speeds, mostly one per boot; the ratio of the best runs compares each backend's " +
        "fastest, which interference can only have slowed (the targets use the medians). " +
        "CPU per Gbit/s is recorded, not a target (issue 27): under TCG most of vionet's " +
        "difference is QEMU's main loop relaying each call eventfd into an interrupt, which " +
        "only exists without KVM's irqfd.",
    );
    lines.push("");
    const split = cpuSplitRows(r.guest);
    if (split.length) {
      lines.push(
        "Where the host CPU went (cores, medians; sys: the kernel's part, which includes the " +
          "host TCP stack's work run in the tap write or read). vionet calls/s are its writes " +
          "to the queues' call eventfds; without KVM's irqfd QEMU's main loop wakes to inject " +
          "each as an interrupt, and that is most of QEMU's other threads' CPU beside vionet:",
      );
      lines.push("");
      lines.push(
        "| direction | offloads | backend | Gbit/s | vCPU | QEMU other threads (sys) | their wake-ups/s | vionet daemon (sys) | vionet calls/s | guest virtio irq/s |",
      );
      lines.push("|---|---|---|---|---|---|---|---|---|---|");
      lines.push(...split);
      lines.push("");
    }
  }
  if (r.idle.length) {
    lines.push(
      `**Idle guest**: the daemon used ${
        fmtSpread(spread(r.idle.map((x) => x.cores * 100)), 1, 2)
      } % of a core.`,
    );
    lines.push("");
  }
  // Every sample of a boot carries that boot's count: add up one per boot.
  const missed = new Map<string, { rx: number; tx: number }>();
  const counted = new Set<string>();
  for (const g of r.guest ?? []) {
    const key = `offloads ${g.offloads}`;
    if (!g.kicksMissed || counted.has(`${key} ${g.boot}`)) continue;
    counted.add(`${key} ${g.boot}`);
    const m = missed.get(key) ?? { rx: 0, tx: 0 };
    missed.set(key, { rx: m.rx + g.kicksMissed.rx, tx: m.tx + g.kicksMissed.tx });
  }
  if (missed.size) {
    lines.push(
      "**Lost kicks** the vionet device recovered (`kicksMissed`, over all boots): " +
        [...missed].map(([k, v]) => `${k}: TX ${v.tx}, RX ${v.rx}`).join("; ") + ".",
    );
    lines.push("");
  }
  const rows = targets(r);
  if (rows.length) {
    lines.push(
      `**Targets** (issue 27; ratios of medians from this run, on the ${
        machineKind(r.ceiling)?.kind ?? "unknown"
      } kind of machine):`,
    );
    lines.push("");
    lines.push("| target | measured | wanted | met | against |");
    lines.push("|---|---|---|---|---|");
  }
  for (const t of rows) {
    const want = t.percent
      ? `${t.atMost ? "≤" : "≥"} ${+(t.target * 100).toFixed(2)} %`
      : `${t.atMost ? "≤" : "≥"} ${t.target}×`;
    const measured = Number.isFinite(t.ratio) && (t.percent || t.ratio !== 0);
    const got = !measured
      ? "not measured"
      : t.percent
      ? `${(t.ratio * 100).toFixed(2)} %`
      : `${t.ratio.toFixed(2)}×`;
    const met = !measured ? "–" : t.met ? "yes" : "**no**";
    lines.push(`| ${t.name.trim()} | ${got} | ${want} | ${met} | ${t.detail} |`);
  }
  if (r.migration?.length) {
    lines.push("");
    lines.push(...migrationTable(r.migration));
  }
  if (r.footprint?.length || r.backend.some((b) => b.hwmKb !== undefined)) {
    lines.push("");
    lines.push(...footprintTable(r.footprint ?? [], r.backend));
  }
  if (r.notes.length) {
    lines.push("");
    for (const n of r.notes) lines.push(`- ${n}`);
  }
  return lines.join("\n") + "\n";
}

/**
 * Live migration, vionet against QEMU's own tap backend on the same bridge
 * (issue 23's target: vionet's downtime and stalls at most 1.0× the other's).
 */
export function migrationTable(samples: readonly MigrationSample[]): string[] {
  const ok = (b: string) => samples.filter((x) => x.backend === b && x.status === "completed");
  const col = (b: string, key: keyof MigrationSample) =>
    spread(ok(b).map((x) => Number(x[key])).filter(Number.isFinite));
  const failed = (b: string) => samples.filter((x) => x.backend === b && x.status !== "completed");
  const lines = [
    "**Live migration** (the guest moves between two hosts on one bridge; paced TCP streams " +
    "both ways across the switch-over; ms, medians [min–max]):",
    "",
    "| figure | vionet | QEMU tap backend | vionet / QEMU (≤ 1.0) |",
    "|---|---|---|---|",
  ];
  const rows: Array<[string, keyof MigrationSample]> = [
    ["downtime QEMU reports", "downtimeMs"],
    ["of it, the source's stop of the VM (QEMU's trace)", "stopMs"],
    ["longest stall, host → guest", "stallToGuestMs"],
    ["longest stall, guest → host", "stallFromGuestMs"],
    ["the bridge learns the new port, after the VM resumed there (capture)", "bridgeMs"],
    ["whole migration", "totalMs"],
  ];
  for (const [name, key] of rows) {
    const v = col("vionet", key), q = col("qemu", key);
    lines.push(
      `| ${name} | ${fmtSpread(v, 1, 2)} | ${fmtSpread(q, 1, 2)} | ${
        fmt(v.median / q.median, 2)
      } |`,
    );
  }
  const broken = samples.filter((x) => x.status === "completed" && !x.intact).length;
  lines.push("");
  lines.push(
    `Migrations: vionet ${ok("vionet").length} completed, ${failed("vionet").length} not; ` +
      `QEMU ${ok("qemu").length} completed, ${failed("qemu").length} not; ` +
      `streams not intact: ${broken}.`,
  );
  return lines;
}

function esc(s: string): string {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

/** An SVG bar chart of every target's ratio, with the target marked. */
export function svg(r: Results): string {
  const rows = targets(r).filter((t) => !t.percent);
  const idle = targets(r).find((t) => t.name.startsWith("idle"));
  const W = 760, left = 300, right = 60, rowH = 26, top = 40;
  const H = top + rows.length * rowH + 50;
  const finite = rows.map((t) => t.ratio).filter(Number.isFinite);
  const max = Math.max(2.5, ...finite.map((x) => Math.min(x, 10)));
  const x = (v: number) => left + (Math.min(v, max) / max) * (W - left - right);
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
  );
  out.push(`<rect width="${W}" height="${H}" fill="white"/>`);
  out.push(
    `<text x="10" y="20" font-size="14" font-weight="bold">vionet / reference (medians, same run) — ${
      esc(r.machine.date)
    }, ${r.machine.cpus} CPUs, ${esc(r.machine.accelerator)}, ${
      esc(machineKind(r.ceiling)?.kind ?? "unknown")
    } kind</text>`,
  );
  for (let v = 0; v <= max + 1e-9; v += 0.5) {
    out.push(
      `<line x1="${x(v)}" y1="${top - 5}" x2="${x(v)}" y2="${
        top + rows.length * rowH
      }" stroke="#ddd"/>`,
    );
    out.push(
      `<text x="${x(v)}" y="${
        top + rows.length * rowH + 15
      }" text-anchor="middle" fill="#555">${v}×</text>`,
    );
  }
  rows.forEach((t, i) => {
    const y = top + i * rowH;
    const ok = Number.isFinite(t.ratio) && t.ratio > 0;
    const color = !ok ? "#999" : t.met ? "#2a9d4b" : "#d1495b";
    out.push(`<text x="${left - 8}" y="${y + 16}" text-anchor="end">${esc(t.name.trim())}</text>`);
    if (ok) {
      out.push(
        `<rect x="${left}" y="${y + 4}" width="${x(t.ratio) - left}" height="${
          rowH - 8
        }" fill="${color}"/>`,
      );
      out.push(
        `<text x="${x(t.ratio) + 4}" y="${y + 16}" fill="#222">${t.ratio.toFixed(2)}×</text>`,
      );
    } else {
      out.push(`<text x="${left + 4}" y="${y + 16}" fill="#999">not measured (failed)</text>`);
    }
    out.push(
      `<line x1="${x(t.target)}" y1="${y + 1}" x2="${x(t.target)}" y2="${
        y + rowH - 1
      }" stroke="black" stroke-width="2" stroke-dasharray="3,2"/>`,
    );
  });
  const foot = idle
    ? `Dashed: target (CPU rows: at most). Idle guest: daemon at ${
      fmt(idle.ratio * 100, 2)
    } % of a core (target < 2 %).`
    : "Dashed: target (CPU rows: at most).";
  out.push(`<text x="10" y="${H - 10}" fill="#555">${esc(foot)}</text>`);
  out.push("</svg>");
  return out.join("\n") + "\n";
}

/** Writes results.json, results.md and chart.svg into `dir`. */
export async function writeReport(r: Results, dir: string): Promise<void> {
  await Deno.mkdir(dir, { recursive: true });
  await Deno.writeTextFile(
    `${dir}/results.json`,
    JSON.stringify({ ...r, targets: targets(r) }, null, 2) + "\n",
  );
  await Deno.writeTextFile(`${dir}/results.md`, markdown(r));
  await Deno.writeTextFile(`${dir}/chart.svg`, svg(r));
  // The repository's `deno fmt --check` covers these files too.
  await new Deno.Command(Deno.execPath(), {
    args: ["fmt", "-q", `${dir}/results.json`, `${dir}/results.md`, `${dir}/chart.svg`],
    stdout: "null",
    stderr: "inherit",
  }).output();
}

export { BACKEND_LABEL };
