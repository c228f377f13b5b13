/**
 * The footprint bench's figures (bench/footprint.ts) as the report shows
 * them: the types, the growth over connections, the markdown table and
 * issue 27's targets. No system access, so the report can be rewritten from
 * results.json anywhere.
 *
 * @module
 */

/** One reading of the daemon's memory and threads. */
export interface MemSample {
  rssKb: number;
  anonKb: number;
  fileKb: number;
  pssKb: number;
  ussKb: number;
  /** VmHWM: the largest RSS so far. */
  hwmKb: number;
  threads: number;
  /** Threads by name (`comm`), e.g. tokio-runtime-w: 3. */
  threadNames: Record<string, number>;
}

/** What one variant measured. */
export interface FootprintRun {
  variant: string;
  describe: string;
  /** Milliseconds from exec to the first successful connect(), each start. */
  startupMs: number[];
  idle: MemSample;
  /** Right after the socket accepted, before Deno's idle threads ended. */
  ready: MemSample;
  attached: MemSample;
  /** The largest sample of the load window (by RSS). */
  load: MemSample;
  loadSeconds: number;
  /** Frames per second through the daemon in the load window: guest to tap, tap to guest. */
  loadTxPps: number;
  loadRxPps: number;
  /** After the load, the VM detached, once idle threads ended. */
  afterLoad: MemSample;
  /** Every `sampleEvery` attachments: how many so far, and the sample (first: before any). */
  connections: Array<{ done: number; sample: MemSample }>;
  connectionSeconds: number;
  error?: string;
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length === 0
    ? NaN
    : s.length % 2
    ? s[(s.length - 1) / 2]
    : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** The targets of issue 27, in MB of RSS and seconds. */
export const FOOTPRINT_TARGETS = { idleMb: 48, loadMb: 96, readySeconds: 0.3 };

/**
 * Growth over the connections, in kB: the least-squares slope of RSS over
 * the samples from the first hundred on (the first hundred warm the
 * allocators), times the connections they span. RSS wanders by ±10 MB
 * between samples as V8 and glibc keep and reuse what ended workers used;
 * the trend over ten samples is what a leak would move. Null with fewer
 * than three such samples.
 */
export function connectionGrowthKb(run: FootprintRun): number | null {
  const xs = run.connections.filter((c) => c.done > 0);
  if (xs.length < 3) return null;
  const n = xs.length;
  const mx = xs.reduce((a, c) => a + c.done, 0) / n;
  const my = xs.reduce((a, c) => a + c.sample.rssKb, 0) / n;
  let sxy = 0, sxx = 0;
  for (const c of xs) {
    sxy += (c.done - mx) * (c.sample.rssKb - my);
    sxx += (c.done - mx) ** 2;
  }
  return (sxy / sxx) * (xs[n - 1].done - xs[0].done);
}

/** What the footprint section reads of a backend-bound sample (bench/dpdk.ts). */
export interface BackendMemory {
  test: string;
  backend: string;
  pps: number;
  rssKb?: number;
  hwmKb?: number;
}

/**
 * The bench report's footprint section (markdown lines); `backend`: the
 * backend-bound samples, whose vionet daemons' RSS under DPDK's driver at
 * full speed is listed too.
 */
export function footprintTable(
  runs: readonly FootprintRun[],
  backend: readonly BackendMemory[] = [],
): string[] {
  const lines: string[] = [];
  const loaded = backend.filter((b) => b.backend === "vionet" && b.hwmKb !== undefined);
  if (loaded.length > 0) {
    const byTest = new Map<string, BackendMemory[]>();
    for (const b of loaded) byTest.set(b.test, [...(byTest.get(b.test) ?? []), b]);
    lines.push(
      "**One NIC's memory under the backend-bound load** (vionet, DPDK's virtio-user driver at " +
        "full speed, end of each window): " +
        [...byTest].map(([test, xs]) =>
          `${test} ${(median(xs.map((x) => x.pps)) / 1e6).toFixed(2)} Mpps: RSS ${
            (median(xs.map((x) => x.rssKb!)) / 1024).toFixed(1)
          } MB, peak ${(Math.max(...xs.map((x) => x.hwmKb!)) / 1024).toFixed(1)} MB`
        ).join("; ") + ".",
    );
    lines.push("");
  }
  if (runs.length === 0) return lines;
  const f = (kb: number) => (kb / 1024).toFixed(1);
  const cell = (s: MemSample) => `${f(s.rssKb)} / ${f(s.pssKb)} / ${f(s.ussKb)} / ${s.threads}`;
  lines.push(
    "**What one NIC costs** (`deno task bench --only footprint`, bench/footprint.ts): one daemon " +
      "as the start task runs it, `--queues 1`, a VM played over its socket by " +
      "tests/parent/control/socket_vm.ts. Each cell: RSS / PSS / USS in MB / threads. RSS counts " +
      "the pages of the deno binary the process touched (shared by every Deno process); USS is " +
      "what one more daemon adds.",
  );
  lines.push("");
  lines.push(
    "| variant | ready (s), median [min–max] | idle | VM attached | under load (peak) | load kpps out / in | after the load, detached |",
  );
  lines.push("|---|---|---|---|---|---|---|");
  for (const r of runs) {
    const ms = [...r.startupMs].sort((a, b) => a - b);
    lines.push(
      `| ${r.variant} | ${(median(ms) / 1000).toFixed(3)} [${(ms[0] / 1000).toFixed(3)}–${
        (ms[ms.length - 1] / 1000).toFixed(3)
      }] | ${cell(r.idle)} | ${cell(r.attached)} | ${cell(r.load)} | ${
        (r.loadTxPps / 1e3).toFixed(0)
      } / ${(r.loadRxPps / 1e3).toFixed(0)} | ${cell(r.afterLoad)} |`,
    );
  }
  lines.push("");
  for (const r of runs) lines.push(`- ${r.variant}: ${r.describe}`);
  lines.push("");
  const withConnections = runs.filter((r) => r.connections.length > 1);
  for (const r of withConnections) {
    const n = r.connections[r.connections.length - 1].done;
    lines.push(
      `Over ${n} connections (${r.variant}, ${r.connectionSeconds.toFixed(0)} s; attach, ` +
        "start the queues, 4 frames out and at least 1 in, detach), RSS / USS in MB and threads " +
        "after each hundred:",
    );
    lines.push("");
    lines.push(`| connections | ${r.connections.map((c) => c.done).join(" | ")} |`);
    lines.push(`|---|${r.connections.map(() => "---").join("|")}|`);
    lines.push(`| RSS | ${r.connections.map((c) => f(c.sample.rssKb)).join(" | ")} |`);
    lines.push(`| USS | ${r.connections.map((c) => f(c.sample.ussKb)).join(" | ")} |`);
    lines.push(`| threads | ${r.connections.map((c) => c.sample.threads).join(" | ")} |`);
    lines.push("");
  }
  const shipped = runs[0];
  const growth = connectionGrowthKb(shipped);
  const t = FOOTPRINT_TARGETS;
  lines.push("| target (issue 27) | measured | wanted | met |");
  lines.push("|---|---|---|---|");
  const row = (name: string, got: number, want: number, unit: string) =>
    lines.push(
      `| ${name} | ${got.toFixed(unit === "s" ? 3 : 1)} ${unit} | ≤ ${want} ${unit} | ${
        got <= want ? "yes" : "**no**"
      } |`,
    );
  row("idle RSS", shipped.idle.rssKb / 1024, t.idleMb, "MB");
  row("RSS under load", shipped.load.rssKb / 1024, t.loadMb, "MB");
  row("ready (exec to a listening socket)", median(shipped.startupMs) / 1000, t.readySeconds, "s");
  if (growth !== null) {
    const first = shipped.connections.find((c) => c.done > 0)!.done;
    const last = shipped.connections[shipped.connections.length - 1].done;
    lines.push(
      `| RSS trend, connections ${first} to ${last} (least squares) | ${
        (growth / 1024).toFixed(1)
      } MB | none (within ${NO_GROWTH_SLACK_MB} MB: 11 kB a connection) | ${
        growth / 1024 <= NO_GROWTH_SLACK_MB ? "yes" : "**no**"
      } |`,
    );
  }
  lines.push("");
  return lines;
}

/**
 * The trend over the connections a run may show without a leak: 10 MB over
 * the 900 connections after the first hundred is 11 kB per connection; ten
 * samples that each wander by ±10 MB move a least-squares trend by less.
 */
export const NO_GROWTH_SLACK_MB = 10;
