/**
 * Pools the guest halves of several bench runs into one report. Under TCG a
 * guest's TCP stream runs at one of two speeds, mostly one per boot, so five
 * boots a backend leave a median ratio that moved by up to ~0.7 between runs
 * of the same code on one machine; more boots narrow that. Each run alternates the
 * backends boot by boot (ABBA), so every run is a fair comparison on its
 * own, and so is their union. Backend-bound samples are left out: those
 * ratios count only within one run.
 *
 * ```
 * deno run -A bench/pool.ts [--out DIR] RUN1.json RUN2.json ...
 * ```
 *
 * With `--out` it writes DIR/results.json, results.md and chart.svg as a
 * run does (`report.ts`); without, it prints the markdown.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { markdown, type Results, writeReport } from "./report.ts";

/**
 * The union of the runs' guest and idle samples, boots renumbered so that
 * no two runs share a boot number. Throws if the runs name different
 * machines (CPU, kernel, accelerator or QEMU), or if none has guest samples.
 */
export function pool(runs: readonly Results[], files: readonly string[] = []): Results {
  if (runs.length === 0) throw new Error("pool: no runs given");
  runs.forEach((r, i) => {
    if (
      typeof r !== "object" || r === null || typeof r.machine !== "object" || r.machine === null ||
      !Array.isArray(r.guest) || !Array.isArray(r.idle)
    ) {
      throw new Error(
        `pool: ${files[i] ?? `run ${i + 1}`} is not a bench run's results.json ` +
          "(it needs machine, guest and idle)",
      );
    }
  });
  const first = runs[0].machine;
  const same = (r: Results) =>
    r.machine.cpuModel === first.cpuModel && r.machine.kernel === first.kernel &&
    r.machine.accelerator === first.accelerator && r.machine.qemu === first.qemu &&
    r.machine.cpus === first.cpus;
  runs.forEach((r, i) => {
    if (!same(r)) {
      throw new Error(
        `pool: ${files[i] ?? `run ${i + 1}`} ran on ${r.machine.cpus} × ${r.machine.cpuModel}, ` +
          `Linux ${r.machine.kernel}, ${r.machine.accelerator}, QEMU ${r.machine.qemu}; ` +
          `the first on ${first.cpus} × ${first.cpuModel}, Linux ${first.kernel}, ` +
          `${first.accelerator}, QEMU ${first.qemu}`,
      );
    }
  });
  const guest: Results["guest"] = [];
  const idle: Results["idle"] = [];
  let offset = 0;
  for (const r of runs) {
    const boots = Math.max(-1, ...r.guest.map((s) => s.boot), ...r.idle.map((s) => s.boot)) + 1;
    for (const s of r.guest) guest.push({ ...s, boot: s.boot + offset });
    for (const s of r.idle) idle.push({ ...s, boot: s.boot + offset });
    offset += boots;
  }
  if (guest.length === 0) throw new Error("pool: none of the runs has guest samples");
  return {
    machine: {
      ...first,
      date: runs.map((r) => r.machine.date).join(", "),
      loadBefore: runs.map((r) => r.machine.loadBefore).join("; "),
    },
    command: `bench/pool.ts ${files.join(" ")}`.trim(),
    options: {},
    backend: [],
    guest,
    idle,
    notes: [`Guest halves of ${runs.length} runs pooled; backend-bound samples left out.`],
  };
}

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    args: Deno.args,
    options: { out: { type: "string" } },
    allowPositionals: true,
  });
  if (positionals.length === 0) {
    console.error("usage: deno run -A bench/pool.ts [--out DIR] RUN1.json RUN2.json ...");
    Deno.exit(2);
  }
  const runs: Results[] = [];
  for (const f of positionals) {
    try {
      runs.push(JSON.parse(await Deno.readTextFile(f)) as Results);
    } catch (e) {
      console.error(`pool: ${f}: ${(e as Error).message}`);
      Deno.exit(1);
    }
  }
  let pooled: Results;
  try {
    pooled = pool(runs, positionals);
  } catch (e) {
    console.error((e as Error).message);
    Deno.exit(1);
  }
  if (values.out) {
    await writeReport(pooled, values.out);
    console.log(`pool: wrote ${values.out}/results.json, results.md, chart.svg`);
  } else {
    console.log(markdown(pooled));
  }
}

if (import.meta.main) await main();
