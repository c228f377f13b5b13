/**
 * What one NIC costs (issue 27): the memory and threads of one vionet
 * daemon, started as `deno task start` starts it, in a private network
 * namespace, with a VM played by `tests/parent/control/socket_vm.ts` over
 * the real vhost-user socket:
 *
 * - **startup**: from the exec of `ip netns exec ... deno run` to the first
 *   successful connect() on the socket, median of `startups` starts;
 * - **idle**: after start, no VM, once Deno's idle threads have ended;
 * - **attached**: a VM attached, queues started, a few frames each way;
 * - **load**: the VM sending 64 B UDP frames as fast as it can while a
 *   sender in the namespace floods it the other way, sampled through the
 *   window (the peak, and VmHWM);
 * - **connections**: `connections` attachments in a row (attach, negotiate,
 *   start the queues, 4 frames out and at least 1 in, detach: gracefully
 *   with GET_VRING_BASE, or by closing the socket, alternately), sampled
 *   every `sampleEvery`.
 *
 * Each sample: VmRSS (and its anonymous and file parts), PSS and USS from
 * smaps_rollup, and the thread count. RSS counts every page of the deno
 * binary the process touched (about 40 MB, shared by every Deno process on
 * the host); USS is what one more daemon adds, PSS its fair share.
 *
 * A variant changes the start task's environment or Deno flags (a V8 flag,
 * glibc's arena count, a code cache) to measure what a setting costs or
 * saves, each measured the same way.
 *
 * ```
 * deno run -A bench/footprint.ts [--connections 1000] [--startups 5] [--variants shipped,arenas2]
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ROOT, startTaskEnv, startTaskFlags } from "../tests/helpers.ts";
import { SocketVm, VM_HOST_IP, VM_IP, VM_MAC } from "../tests/parent/control/socket_vm.ts";
import { type Child, Netns, sleep } from "./proc.ts";
import { TRIM_DELAY_MS } from "../parent/control/daemon.ts";
import type { FootprintRun, MemSample } from "./footprint_report.ts";

export type { FootprintRun, MemSample };

/** A way to start the daemon other than the start task's, for comparison. */
export interface Variant {
  name: string;
  /** What it changes, for the report. */
  describe: string;
  /** Environment set on top of the start task's. */
  env?: Record<string, string>;
  /** Deno flags added after the start task's. */
  addFlags?: string[];
  /** Start-task flags taken out. */
  removeFlags?: string[];
  /** A DENO_DIR of its own (a fresh directory, warmed by the first start). */
  ownDenoDir?: boolean;
}

/** The variants the bench knows; `shipped` is the start task as it is. */
export const VARIANTS: readonly Variant[] = [
  { name: "shipped", describe: "deno.json's start task as it is" },
  {
    name: "arenas2",
    describe: "MALLOC_ARENA_MAX=2 (glibc: two malloc arenas instead of up to 8 per CPU)",
    env: { MALLOC_ARENA_MAX: "2" },
  },
  {
    name: "arenas1",
    describe: "MALLOC_ARENA_MAX=1 (one malloc arena for every thread)",
    env: { MALLOC_ARENA_MAX: "1" },
  },
  {
    name: "mmap-threshold",
    describe:
      "MALLOC_MMAP_THRESHOLD_=1 MiB (glibc: no dynamic threshold; large buffers always mmap'd)",
    env: { MALLOC_MMAP_THRESHOLD_: String(1 << 20) },
  },
  {
    name: "semi1",
    describe: "--v8-flags=--max-semi-space-size=1 (V8's young generation capped at 1 MiB)",
    addFlags: ["--v8-flags=--max-semi-space-size=1"],
  },
  {
    name: "single-gc",
    describe: "--v8-flags=--single-threaded-gc (no concurrent or parallel GC threads)",
    addFlags: ["--v8-flags=--single-threaded-gc"],
  },
  {
    name: "lite",
    describe: "--v8-flags=--lite-mode (interpreter only: no optimizing compilers)",
    addFlags: ["--v8-flags=--lite-mode"],
  },
  {
    name: "no-short-builtins",
    describe:
      "--v8-flags=--no-short-builtin-calls (no copy of V8's builtins, about 2 MB, per isolate)",
    addFlags: ["--v8-flags=--no-short-builtin-calls"],
  },
  {
    name: "arenas2+no-short-builtins",
    describe: "MALLOC_ARENA_MAX=2 and --v8-flags=--no-short-builtin-calls together",
    env: { MALLOC_ARENA_MAX: "2" },
    addFlags: ["--v8-flags=--no-short-builtin-calls"],
  },
  {
    name: "lazy",
    describe:
      "without --v8-flags=--no-lazy,--no-flush-bytecode (V8 compiles each function at its first call, and drops what has not run for a while)",
    removeFlags: ["--v8-flags=--no-lazy,--no-flush-bytecode"],
  },
  {
    name: "no-lazy",
    describe:
      "--v8-flags=--no-lazy only (V8 may drop the bytecode of what has not run for a while)",
    removeFlags: ["--v8-flags=--no-lazy,--no-flush-bytecode"],
    addFlags: ["--v8-flags=--no-lazy"],
  },
  {
    name: "code-cache",
    describe: "a DENO_DIR of the daemon's own, with V8's code cache (warm: second start on)",
    removeFlags: ["--no-code-cache"],
    ownDenoDir: true,
  },
];

export interface FootprintOptions {
  connections: number;
  sampleEvery: number;
  startups: number;
  loadSeconds: number;
  /** Seconds to wait for Deno's idle blocking-pool threads to end (tokio keeps them 10 s). */
  settleSeconds: number;
  variants: readonly Variant[];
  log: (line: string) => void;
}

const TAP = "vf0";

/** Reads `pid`'s memory and threads from /proc. */
export function memSample(pid: number): MemSample {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const rollup = Deno.readTextFileSync(`/proc/${pid}/smaps_rollup`);
  const kb = (text: string, key: string) => {
    const m = new RegExp(`^${key}:\\s+(\\d+) kB`, "m").exec(text);
    if (!m) throw new Error(`/proc/${pid}: no ${key}`);
    return Number(m[1]);
  };
  const threadNames: Record<string, number> = {};
  let threads = 0;
  for (const e of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      const comm = Deno.readTextFileSync(`/proc/${pid}/task/${e.name}/comm`).trim();
      threadNames[comm] = (threadNames[comm] ?? 0) + 1;
      threads++;
    } catch { /* ended meanwhile */ }
  }
  return {
    rssKb: kb(status, "VmRSS"),
    anonKb: kb(status, "RssAnon"),
    fileKb: kb(status, "RssFile") + kb(status, "RssShmem"),
    pssKb: kb(rollup, "Pss"),
    ussKb: kb(rollup, "Private_Clean") + kb(rollup, "Private_Dirty"),
    hwmKb: kb(status, "VmHWM"),
    threads,
    threadNames,
  };
}

/**
 * The start task's Deno flags under `variant`. A flag to take out that the
 * start task does not have is an error: the variant would otherwise measure
 * the shipped daemon again under another name.
 */
export function variantFlags(variant: Variant, shipped = startTaskFlags()): string[] {
  const missing = (variant.removeFlags ?? []).filter((f) => !shipped.includes(f));
  if (missing.length > 0) {
    throw new Error(
      `footprint variant ${variant.name}: the start task has no ${missing.join(" ")} to take out`,
    );
  }
  return [
    ...shipped.filter((f) => !(variant.removeFlags ?? []).includes(f)),
    ...(variant.addFlags ?? []),
  ];
}

/** The daemon's command line under `variant`, in namespace `ns`. */
function daemonArgv(variant: Variant, socket: string, denoDir: string | null): string[] {
  const env = { ...startTaskEnv(), ...(variant.env ?? {}) };
  if (denoDir !== null) env.DENO_DIR = denoDir;
  const flags = variantFlags(variant);
  return [
    "env",
    ...Object.entries(env).map(([k, v]) => `${k}=${v}`),
    Deno.execPath(),
    "run",
    ...flags,
    `${ROOT}main.ts`,
    "--tap",
    TAP,
    "--socket-path",
    socket,
    "--queues",
    "1",
    "--log-level",
    "warn",
  ];
}

/** Tries to connect to `path` every 2 ms; resolves with the time it first succeeded. */
async function whenListening(path: string, daemon: Child, timeoutMs: number): Promise<number> {
  const end = performance.now() + timeoutMs;
  for (;;) {
    try {
      const conn = await Deno.connect({ transport: "unix", path });
      const t = performance.now();
      conn.close();
      return t;
    } catch { /* not yet */ }
    if (daemon.done) throw new Error(`the daemon exited before it listened:\n${daemon.tail()}`);
    if (performance.now() > end) {
      throw new Error(`the daemon did not listen within ${timeoutMs} ms:\n${daemon.tail()}`);
    }
    await sleep(2);
  }
}

/** Starts the daemon; returns it and the milliseconds from exec to its socket accepting. */
async function startDaemon(
  ns: Netns,
  variant: Variant,
  socket: string,
  denoDir: string | null,
): Promise<{ daemon: Child; ms: number }> {
  await Deno.remove(socket).catch(() => {});
  const t0 = performance.now();
  const daemon = ns.spawn(daemonArgv(variant, socket, denoDir), { cwd: ROOT });
  const t = await whenListening(socket, daemon, 30_000);
  return { daemon, ms: t - t0 };
}

/** Measures one variant (see the module comment); `connections` 0 skips that phase. */
async function measureVariant(
  variant: Variant,
  connections: number,
  o: FootprintOptions,
): Promise<FootprintRun> {
  const dir = await Deno.makeTempDir({ prefix: "vionet-footprint-" });
  await Deno.chmod(dir, 0o777); // the daemon, once it is nobody, removes its socket
  const socket = `${dir}/v.sock`;
  const denoDir = variant.ownDenoDir ? `${dir}/deno-dir` : null;
  const ns = await Netns.create();
  const children: Child[] = [];
  let vm: SocketVm | null = null;
  let running: Child | null = null;
  try {
    // (e) Startup, `startups` times; with a code cache, one start first to fill it.
    const startupMs: number[] = [];
    for (let i = denoDir === null ? 0 : -1; i < o.startups; i++) {
      const { daemon, ms } = await startDaemon(ns, variant, socket, denoDir);
      await daemon.stop("SIGTERM", 5000);
      if (i >= 0) startupMs.push(ms);
    }
    o.log(
      `footprint ${variant.name}: ready in ${startupMs.map((m) => m.toFixed(0)).join(", ")} ms`,
    );

    // (a) Idle.
    const { daemon } = await startDaemon(ns, variant, socket, denoDir);
    children.push(daemon);
    running = daemon;
    const pid = daemon.pid;
    const ready = memSample(pid);
    await sleep(o.settleSeconds * 1000);
    const idle = memSample(pid);
    o.log(`footprint ${variant.name}: idle ${describe(idle)}`);

    // The tap's host side, and a trickle of frames towards the guest.
    await ns.exec(["ip", "addr", "add", `${VM_HOST_IP}/24`, "dev", TAP]);
    await ns.exec(["ip", "link", "set", TAP, "up"]);
    await ns.exec([
      "ip",
      "neigh",
      "replace",
      VM_IP,
      "lladdr",
      VM_MAC.map((b) => b.toString(16).padStart(2, "0")).join(":"),
      "dev",
      TAP,
    ]);
    const link = JSON.parse(await ns.exec(["ip", "-j", "link", "show", "dev", TAP]));
    const tapMac = (link[0].address as string).split(":").map((h) => parseInt(h, 16));
    const sender = (rate: number) => {
      const c = ns.spawn([
        Deno.execPath(),
        "run",
        "-A",
        `${ROOT}bench/udp_sender.ts`,
        VM_IP,
        "9",
        String(rate),
      ]);
      children.push(c);
      return c;
    };
    let trickle = sender(2000);
    vm = new SocketVm(socket, tapMac);

    // (b) Attached.
    await vm.attach();
    await vm.exchange(32, 8);
    await sleep(2000);
    const attached = memSample(pid);
    o.log(`footprint ${variant.name}: attached ${describe(attached)}`);

    // (c) Load: the guest sends as fast as it can; the namespace floods it back.
    await trickle.stop("SIGKILL", 2000);
    const flood = sender(0);
    await sleep(500);
    let load = memSample(pid);
    const sent0 = vm.sent, received0 = vm.received;
    const t0 = performance.now();
    let nextSample = t0 + 500;
    while (performance.now() - t0 < o.loadSeconds * 1000) {
      if (vm.txInFlight < 192) vm.sendUdp(64);
      vm.reap();
      if (performance.now() >= nextSample) {
        const s = memSample(pid);
        if (s.rssKb > load.rssKb) load = s;
        nextSample += 500;
        await sleep(0);
      }
    }
    const loadSeconds = (performance.now() - t0) / 1000;
    const loadTxPps = (vm.sent - sent0) / loadSeconds;
    const loadRxPps = (vm.received - received0) / loadSeconds;
    const end = memSample(pid);
    load = { ...(end.rssKb > load.rssKb ? end : load), hwmKb: end.hwmKb };
    await flood.stop("SIGKILL", 2000);
    o.log(
      `footprint ${variant.name}: load ${describe(load)}, HWM ${mb(load.hwmKb)}; ` +
        `${(loadTxPps / 1e3).toFixed(0)} kpps out, ${(loadRxPps / 1e3).toFixed(0)} kpps in`,
    );
    await vm.detach(true);
    await settledAfterVm(pid, idle);
    await sleep(o.settleSeconds * 1000);
    const afterLoad = memSample(pid);
    o.log(`footprint ${variant.name}: after the load, detached ${describe(afterLoad)}`);

    // (d) Connections.
    trickle = sender(2000);
    const samples: FootprintRun["connections"] = [];
    const c0 = performance.now();
    if (connections > 0) {
      samples.push({ done: 0, sample: memSample(pid) });
      for (let i = 1; i <= connections; i++) {
        await vm.attach(64);
        await vm.exchange(4, 1);
        await vm.detach(i % 2 === 0);
        if (i % o.sampleEvery === 0 || i === connections) {
          await settledAfterVm(pid, idle);
          const s = memSample(pid);
          samples.push({ done: i, sample: s });
          o.log(`footprint ${variant.name}: after ${i} connections ${describe(s)}`);
        }
      }
    }
    return {
      variant: variant.name,
      describe: variant.describe,
      startupMs,
      ready,
      idle,
      attached,
      load,
      loadSeconds,
      loadTxPps,
      loadRxPps,
      afterLoad,
      connections: samples,
      connectionSeconds: (performance.now() - c0) / 1000,
    };
  } catch (e) {
    // What the daemon said (warnings and errors) is what explains a failure on the VM's side.
    const said = running === null ? "" : `\nthe daemon said:\n${running.tail(4000)}`;
    throw new Error(`${(e as Error).message}${said}`, { cause: e });
  } finally {
    vm?.close();
    for (const c of children.reverse()) await c.stop("SIGTERM", 5000).catch(() => {});
    await ns.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** Worker threads (`worker-*`) of a sample. */
function workerCount(s: MemSample): number {
  return Object.entries(s.threadNames).filter(([n]) => /^worker-\d+$/.test(n))
    .reduce((a, [, c]) => a + c, 0);
}

/**
 * Waits (up to 5 s) until the daemon has no more worker threads than in
 * `idle` and pair 0's device (the ended connection's I/O workers have
 * exited), then past the moment
 * the daemon gives free memory back after a VM (`TRIM_DELAY_MS`): a sample
 * then reads the daemon as it idles between VMs, not half-way through one's end.
 */
async function settledAfterVm(pid: number, idle: MemSample): Promise<void> {
  const end = Date.now() + 5000;
  // Pair 0's device worker stays for the next VM.
  const between = workerCount(idle) + 1;
  while (workerCount(memSample(pid)) > between && Date.now() < end) await sleep(20);
  await sleep(TRIM_DELAY_MS + 1000);
}

/** Measures every variant in `o.variants`, each over `o.connections` attachments. */
export async function measureFootprint(o: FootprintOptions): Promise<FootprintRun[]> {
  const out: FootprintRun[] = [];
  for (const v of o.variants) {
    try {
      out.push(await measureVariant(v, o.connections, o));
    } catch (e) {
      const why = (e as Error).message.slice(0, 1500);
      o.log(`footprint ${v.name}: FAILED: ${why}`);
      throw e;
    }
  }
  return out;
}

function mb(kb: number): string {
  return `${(kb / 1024).toFixed(1)} MB`;
}

function describe(s: MemSample): string {
  return `RSS ${mb(s.rssKb)} (anon ${mb(s.anonKb)}), PSS ${mb(s.pssKb)}, USS ${mb(s.ussKb)}, ` +
    `${s.threads} threads`;
}

/** The variants named in `list` (comma-separated), in that order; exits 2 on an unknown one. */
export function variantsNamed(list: string): Variant[] {
  return list.split(",").filter((n) => n !== "").map((name) => {
    const v = VARIANTS.find((x) => x.name === name);
    if (!v) {
      console.error(
        `footprint: no variant ${JSON.stringify(name)}; known: ${
          VARIANTS.map((x) => x.name).join(", ")
        }`,
      );
      Deno.exit(2);
    }
    return v;
  });
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      connections: { type: "string", default: "1000" },
      "sample-every": { type: "string", default: "100" },
      startups: { type: "string", default: "5" },
      "load-seconds": { type: "string", default: "5" },
      "settle-seconds": { type: "string", default: "12" },
      variants: { type: "string", default: "shipped" },
    },
  });
  const runs = await measureFootprint({
    connections: Number(values.connections),
    sampleEvery: Number(values["sample-every"]),
    startups: Number(values.startups),
    loadSeconds: Number(values["load-seconds"]),
    settleSeconds: Number(values["settle-seconds"]),
    variants: variantsNamed(values.variants),
    log: (s) => console.log(s),
  });
  console.log(JSON.stringify(runs, null, 1));
}
