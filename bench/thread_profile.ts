/**
 * Where each microsecond of a frame goes, per thread: turns a `perf record`
 * of the daemon (with V8's `--perf-basic-prof` map, so JIT code has names)
 * and each thread's CPU time over the same window into a table of
 * microseconds per frame for every thread, split into the kernel, JIT-compiled
 * JavaScript, the Deno/V8 runtime and libc, with each thread's heaviest
 * symbols. `bench/profile.ts --perf` runs it.
 *
 * Threads are told apart by the code they run, not their names (Deno names
 * every worker thread `worker-N` in the order they start): the one running
 * `device/` is the device worker, `pair_poller.ts` the poller,
 * `writer_worker.ts` the writer, `capture_worker.ts` the capture writer.
 *
 * @module
 */

/** One line of `perf report --sort pid,dso,sym -t '|'`: a share of all samples. */
export interface PerfLine {
  percent: number;
  tid: number;
  comm: string;
  dso: string;
  symbol: string;
}

/** What part of the process a sample ran in. */
export type Layer = "kernel" | "js" | "runtime" | "libc" | "other";
export const LAYERS: Layer[] = ["kernel", "js", "runtime", "libc", "other"];

/** One thread's part of the window. */
export interface ThreadProfile {
  tid: number;
  comm: string;
  role: string;
  /** Share of one core over the window (from /proc). */
  cores: number;
  /** Microseconds of this thread per frame moved. */
  microseconds: number;
  /** The same split by layer (sums to `microseconds`). */
  layers: Record<Layer, number>;
  /** The heaviest symbols: name and microseconds per frame. */
  top: Array<{ symbol: string; microseconds: number }>;
}

/** Parses `perf report --no-children --sort pid,dso,sym --stdio -g none -t '|'`. */
export function parsePerfReport(text: string): PerfLine[] {
  const out: PerfLine[] = [];
  for (const raw of text.split("\n")) {
    if (raw.startsWith("#") || raw.trim() === "") continue;
    const parts = raw.split("|");
    if (parts.length < 4) continue;
    const percent = Number(parts[0].trim().replace(/%$/, ""));
    const m = /^\s*(\d+):(.*?)\s*$/.exec(parts[1]);
    if (!m || !Number.isFinite(percent)) {
      throw new Error(`perf report line not understood: ${JSON.stringify(raw.slice(0, 200))}`);
    }
    out.push({
      percent,
      tid: Number(m[1]),
      comm: m[2],
      dso: parts[2].trim(),
      // "[k] name" or "[.] name"; the symbol may itself hold a '|'.
      symbol: parts.slice(3).join("|").trim().replace(/^\[[k.]\]\s*/, ""),
    });
  }
  return out;
}

/** The layer a sample's object and symbol belong to. */
export function layerOf(dso: string, symbol: string): Layer {
  if (dso === "[kernel.kallsyms]" || dso.startsWith("[kernel")) return "kernel";
  if (dso.startsWith("[JIT]") || /^(JS|Builtin|Function|LazyCompile|Script):/.test(symbol)) {
    return "js";
  }
  if (/\/deno$|^deno$/.test(dso)) return "runtime";
  if (/^lib(c|m|pthread)[.-]/.test(dso) || dso === "[vdso]") return "libc";
  return "other";
}

/** A thread's role, from the JavaScript files its JIT samples name (see the module note). */
export function roleOf(lines: PerfLine[], comm: string): string {
  const weight = new Map<string, number>();
  const add = (role: string, w: number) => weight.set(role, (weight.get(role) ?? 0) + w);
  for (const l of lines) {
    const f = /file:\/\/\S*?\/((?:device|parent|ipc)\/[\w/]+\.ts)/.exec(l.symbol)?.[1];
    if (!f) continue;
    if (f.endsWith("writer_worker.ts")) add("writer", l.percent * 100);
    else if (f.endsWith("pair_poller.ts") || f.endsWith("poller_worker.ts")) {
      add("poller", l.percent * 100);
    } else if (f.endsWith("capture_worker.ts")) add("capture", l.percent * 100);
    else if (f.startsWith("device/")) add("device", l.percent);
    else if (f.startsWith("parent/control/")) add("main", l.percent);
  }
  let best = "";
  let most = 0;
  for (const [role, w] of weight) {
    if (w > most) [best, most] = [role, w];
  }
  if (best) return best;
  if (comm === "deno") return "main";
  if (comm.startsWith("V8 ")) return "V8 helper";
  if (comm.startsWith("tokio")) return "Deno runtime";
  return comm;
}

/**
 * Per-thread microseconds per frame: each thread's CPU seconds over the
 * window (`cpuSeconds`, from /proc, by tid) divided by the frames moved, and
 * split by the thread's own perf samples. Threads under `minCores` are left out.
 */
export function threadProfiles(
  lines: PerfLine[],
  cpuSeconds: Map<number, { comm: string; seconds: number }>,
  windowSeconds: number,
  frames: number,
  opts: { top?: number; minCores?: number } = {},
): ThreadProfile[] {
  if (!(frames > 0)) throw new Error(`no frames moved in the window (${frames})`);
  const byTid = new Map<number, PerfLine[]>();
  for (const l of lines) {
    const list = byTid.get(l.tid) ?? [];
    list.push(l);
    byTid.set(l.tid, list);
  }
  const out: ThreadProfile[] = [];
  for (const [tid, { comm, seconds }] of cpuSeconds) {
    const cores = seconds / windowSeconds;
    if (cores < (opts.minCores ?? 0.005)) continue;
    const own = byTid.get(tid) ?? [];
    const sampled = own.reduce((a, l) => a + l.percent, 0);
    const microseconds = seconds / frames * 1e6;
    const layers = Object.fromEntries(LAYERS.map((k) => [k, 0])) as Record<Layer, number>;
    const bySymbol = new Map<string, number>();
    for (const l of own) {
      const us = sampled > 0 ? microseconds * l.percent / sampled : 0;
      layers[layerOf(l.dso, l.symbol)] += us;
      const name = shortSymbol(l.symbol);
      bySymbol.set(name, (bySymbol.get(name) ?? 0) + us);
    }
    if (sampled === 0) layers.other = microseconds;
    const top = [...bySymbol.entries()].sort((a, b) => b[1] - a[1]).slice(0, opts.top ?? 6)
      .map(([symbol, us]) => ({ symbol, microseconds: us }));
    out.push({ tid, comm, role: roleOf(own, comm), cores, microseconds, layers, top });
  }
  const order = ["device", "poller", "writer", "capture", "main"];
  const rank = (r: string) => (order.indexOf(r) + 1 || order.length + 1);
  return out.sort((a, b) => rank(a.role) - rank(b.role) || b.microseconds - a.microseconds);
}

/** "JS:*'walkChain file:///x/device/chain.ts:148:30" → "walkChain device/chain.ts:148". */
export function shortSymbol(symbol: string): string {
  const m = /^JS:\S*?'?([^' ]*) file:\/\/\S*?\/((?:device|parent|ipc|bench|tests)\/[\w/.]+):(\d+)/
    .exec(symbol);
  if (m) return `${m[1] || "(anonymous)"} ${m[2]}:${m[3]}`;
  return symbol.length > 70 ? symbol.slice(0, 67) + "..." : symbol;
}

/** The profiles as a markdown table, one row per thread and a total. */
export function profileTable(profiles: ThreadProfile[]): string[] {
  const f = (x: number) => x.toFixed(3);
  const lines = [
    `| thread | cores | µs/frame | kernel | JS (JIT) | Deno/V8 runtime | libc | other | heaviest |`,
    `|---|---|---|---|---|---|---|---|---|`,
  ];
  const total = { cores: 0, us: 0, layers: Object.fromEntries(LAYERS.map((k) => [k, 0])) };
  for (const p of profiles) {
    total.cores += p.cores;
    total.us += p.microseconds;
    for (const k of LAYERS) total.layers[k] += p.layers[k];
    const heavy = p.top.slice(0, 3).map((t) => `${t.symbol} ${f(t.microseconds)}`).join("; ");
    lines.push(
      `| ${p.role} (${p.comm}) | ${p.cores.toFixed(2)} | ${f(p.microseconds)} | ${
        LAYERS.map((k) => f(p.layers[k])).join(" | ")
      } | ${heavy} |`,
    );
  }
  lines.push(
    `| **all** | ${total.cores.toFixed(2)} | ${f(total.us)} | ${
      LAYERS.map((k) => f(total.layers[k])).join(" | ")
    } | |`,
  );
  return lines;
}
