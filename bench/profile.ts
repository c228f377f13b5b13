/**
 * Where the daemon's time goes under load: runs one backend-bound test
 * (default TX 64 B) against vionet started with `deno --cpu-prof`, then
 * prints the functions with the most self time in every profile written
 * (one per isolate: the main thread and each worker).
 *
 * ```
 * deno run --unstable-worker-options -A bench/profile.ts [--test tx64] [--seconds 5] [--offload off]
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import { type BackendTest, measureBackend } from "./dpdk.ts";

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

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      test: { type: "string", default: "tx64" },
      seconds: { type: "string", default: "5" },
      top: { type: "string", default: "15" },
      offload: { type: "string", default: "auto" },
    },
  });
  const dir = await Deno.makeTempDir({ prefix: "vionet-prof-" });
  if (values.offload !== "auto" && values.offload !== "off") {
    console.error(`profile: --offload must be auto or off, not ${values.offload}`);
    Deno.exit(2);
  }
  const backend = values.offload === "off" ? "vionet-offload-off" : "vionet";
  const s = await measureBackend(values.test as BackendTest, backend, 0, {
    seconds: Number(values.seconds),
    warmSeconds: 1.5,
    backendCpu: 0,
    frontendCpu: 1,
    log: console.log,
    daemonFlags: ["--cpu-prof", `--cpu-prof-dir=${dir}`],
  });
  console.log(
    `${values.test}: ${(s.pps / 1e6).toFixed(3)} Mpps, daemon ${s.backendCores.toFixed(2)} cores`,
  );
  for (const e of Deno.readDirSync(dir)) {
    const p = JSON.parse(Deno.readTextFileSync(`${dir}/${e.name}`));
    console.log(`\n${e.name}:`);
    for (const line of topFunctions(p, Number(values.top))) console.log(line);
  }
  console.log(`\nprofiles kept in ${dir}`);
}

if (import.meta.main) await main();
