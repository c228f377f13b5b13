/**
 * Where the daemon's time goes under load. Runs one backend-bound test
 * (default TX 64 B) against vionet, in one of two ways:
 *
 * - default: vionet started with `deno --cpu-prof`; prints the functions
 *   with the most self time in every profile written (one per isolate: the
 *   main thread and each worker). JavaScript only.
 * - `--perf`: `perf record` of the whole daemon over the measured window,
 *   V8's `--perf-basic-prof` naming the JIT code, and each thread's CPU time
 *   from /proc: microseconds per frame for every thread, split into kernel,
 *   JavaScript, Deno/V8 runtime and libc, with the heaviest symbols
 *   (`bench/thread_profile.ts`). Needs `perf` (Debian: linux-perf).
 *
 * ```
 * deno run --unstable-worker-options -A bench/profile.ts [--test tx64] [--seconds 5] [--offload off] [--perf]
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import { BACKEND_TESTS, type BackendTest, measureBackend } from "./dpdk.ts";
import { threadTimes } from "./proc.ts";
import { ROOT } from "../tests/helpers.ts";
import { parsePerfReport, profileTable, threadProfiles } from "./thread_profile.ts";

/**
 * `--perf-basic-prof` makes V8 write an `isolate-<address>-<pid>-v8.log` per
 * isolate into the daemon's working directory (the checkout): removed here
 * once the daemon is gone, so a profile leaves no files behind.
 */
function removeV8Logs(pid: number): void {
  if (pid === 0) return;
  for (const e of Deno.readDirSync(ROOT)) {
    if (e.isFile && new RegExp(`^isolate-0x[0-9a-f]+-${pid}-v8\\.log$`).test(e.name)) {
      Deno.removeSync(`${ROOT}/${e.name}`);
    }
  }
}

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

/** Self-time shares by function of one .cpuprofile, largest first. */
export function topFunctions(profile: { nodes: ProfileNode[] }, n: number): string[] {
  const byFn = new Map<string, number>();
  let total = 0;
  for (const node of profile.nodes) {
    const hits = node.hitCount ?? 0;
    total += hits;
    const f = node.callFrame;
    const file = f.url.replace(/^.*\/main\//, "");
    const key = `${f.functionName || "(anonymous)"} ${file ? `${file}:${f.lineNumber + 1}` : ""}`
      .trim();
    byFn.set(key, (byFn.get(key) ?? 0) + hits);
  }
  return [...byFn.entries()].sort((a, b) => b[1] - a[1]).slice(0, n).map(([k, v]) =>
    `${(100 * v / Math.max(total, 1)).toFixed(1).padStart(5)} %  ${k}`
  );
}

/** Why `perf` cannot be used here, or undefined. */
async function perfUnavailable(): Promise<string | undefined> {
  try {
    const out = await new Deno.Command("perf", {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    })
      .output();
    return out.success ? undefined : "perf --version failed (apt-get install linux-perf)";
  } catch {
    return "perf is not installed (apt-get install linux-perf)";
  }
}

/** How both kinds of profile run the test: the bench's CPU placement, a short warm-up. */
const RUN = { warmSeconds: 1.5, backendCpu: 0, frontendCpu: 1, log: console.log } as const;

/** Runs `cmd`, returning its stdout; throws with its stderr when it fails. */
async function run(cmd: string[]): Promise<string> {
  const out = await new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  if (!out.success) {
    throw new Error(`${cmd.join(" ")} failed: ${new TextDecoder().decode(out.stderr).slice(-800)}`);
  }
  return new TextDecoder().decode(out.stdout);
}

/** The `--perf` way: per-thread microseconds per frame, by layer. */
async function perfProfile(
  test: BackendTest,
  backend: "vionet" | "vionet-offload-off",
  seconds: number,
  top: number,
  dir: string,
): Promise<void> {
  const why = await perfUnavailable();
  if (why) {
    console.error(`profile: ${why}`);
    Deno.exit(2);
  }
  const data = `${dir}/perf.data`;
  let before: ReturnType<typeof threadTimes> | undefined;
  let after: ReturnType<typeof threadTimes> | undefined;
  let window = 0;
  let daemonPid = 0;
  const s = await measureBackend(test, backend, 0, {
    ...RUN,
    seconds,
    // V8 writes /tmp/perf-PID.map, which names the JIT code for perf.
    daemonFlags: ["--v8-flags=--perf-basic-prof"],
    during: async (pid, secs) => {
      daemonPid = pid;
      before = threadTimes(pid);
      const t0 = performance.now();
      // 1999 Hz: not a multiple of the scheduler tick.
      await run([
        "perf",
        "record",
        "-F",
        "1999",
        "-p",
        String(pid),
        "-o",
        data,
        "--",
        "sleep",
        String(secs),
      ]);
      after = threadTimes(pid);
      window = (performance.now() - t0) / 1000;
    },
  });
  removeV8Logs(daemonPid);
  if (s.error) throw new Error(`the measurement failed: ${s.error}`);
  if (!before || !after) throw new Error("the profiler did not run");
  const cpu = new Map<number, { comm: string; seconds: number }>();
  for (const [key, b] of after) {
    const a = before.get(key);
    if (!a) continue;
    const [tid, ...comm] = key.split(" ");
    cpu.set(Number(tid), { comm: comm.join(" "), seconds: b.cpu - a.cpu });
  }
  const report = await run([
    "perf",
    "report",
    "-i",
    data,
    "--no-children",
    "--sort",
    "pid,dso,sym",
    "--stdio",
    "-g",
    "none",
    "-t",
    "|",
    "--percent-limit",
    "0",
  ]);
  const frames = s.pps * window;
  const profiles = threadProfiles(parsePerfReport(report), cpu, window, frames, { top });
  console.log(
    `\n${test} on ${backend}: ${(s.pps / 1e6).toFixed(3)} Mpps, daemon ${
      s.backendCores.toFixed(2)
    } cores; microseconds of each thread per frame over ${window.toFixed(1)} s ` +
      `(load average ${Deno.loadavg().map((x) => x.toFixed(2)).join(" ")}):\n`,
  );
  console.log(profileTable(profiles).join("\n"));
  for (const p of profiles) {
    console.log(`\n${p.role} (${p.comm}, tid ${p.tid}):`);
    for (const t of p.top) console.log(`  ${t.microseconds.toFixed(3)} µs  ${t.symbol}`);
  }
  await Deno.remove(`/tmp/perf-${daemonPid}.map`).catch(() => {});
  console.log(`\nperf data kept in ${data} (the JIT map is gone with the daemon)`);
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      test: { type: "string", default: "tx64" },
      seconds: { type: "string", default: "5" },
      top: { type: "string", default: "15" },
      offload: { type: "string", default: "auto" },
      perf: { type: "boolean", default: false },
    },
  });
  if (!(BACKEND_TESTS as readonly string[]).includes(values.test)) {
    console.error(`profile: --test must be one of ${BACKEND_TESTS.join(", ")}, not ${values.test}`);
    Deno.exit(2);
  }
  const test = values.test as BackendTest;
  const seconds = Number(values.seconds);
  if (!(seconds > 0 && seconds <= 120)) {
    console.error(`profile: --seconds ${values.seconds}: want a number of seconds in (0, 120]`);
    Deno.exit(2);
  }
  const dir = await Deno.makeTempDir({ prefix: "vionet-prof-" });
  if (values.offload !== "auto" && values.offload !== "off") {
    console.error(`profile: --offload must be auto or off, not ${values.offload}`);
    Deno.exit(2);
  }
  const backend = values.offload === "off" ? "vionet-offload-off" : "vionet";
  if (values.perf) return await perfProfile(test, backend, seconds, Number(values.top), dir);
  const s = await measureBackend(test, backend, 0, {
    ...RUN,
    seconds,
    daemonFlags: ["--cpu-prof", `--cpu-prof-dir=${dir}`],
  });
  console.log(
    `${test}: ${(s.pps / 1e6).toFixed(3)} Mpps, daemon ${s.backendCores.toFixed(2)} cores`,
  );
  for (const e of Deno.readDirSync(dir)) {
    const p = JSON.parse(Deno.readTextFileSync(`${dir}/${e.name}`));
    console.log(`\n${e.name}:`);
    for (const line of topFunctions(p, Number(values.top))) console.log(line);
  }
  console.log(`\nprofiles kept in ${dir}`);
}

if (import.meta.main) await main();
