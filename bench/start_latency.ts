/**
 * How fast a fresh daemon's queues start when a VM resumes on it (a
 * migration's destination, issue 23): `start_probe.ts` in a new process per
 * run, under the start task's V8 flags (or others, to compare), with busy
 * loops on the CPUs as two TCG guests would keep them during a switch-over.
 * Reports each step's median over the runs, for the first start in a fresh
 * process and for the start after a stop in the same one.
 *
 * ```
 * deno run -A bench/start_latency.ts [--runs 6] [--busy 2] [--guest-mib 256]
 *   [--v8-flags "--no-lazy,--no-flush-bytecode" | --v8-flags none]
 * ```
 *
 * `--v8-flags` defaults to the start task's; `none` runs V8's defaults.
 * `--guest-mib`: the guest's memory, one region (the migration bench's
 * guests have 256 MiB; what a start costs grows with it, see
 * docs/design.md "The start task's V8 flags").
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ROOT, startTaskFlags } from "../tests/helpers.ts";
import type { StartProbeResult, StartRound } from "./start_probe.ts";

/** The start task's `--v8-flags=...`, or "" when it gives none. */
export function startTaskV8Flags(): string {
  const f = startTaskFlags().find((w) => w.startsWith("--v8-flags="));
  return f === undefined ? "" : f.slice("--v8-flags=".length);
}

export interface StartLatencyOptions {
  runs: number;
  /** Busy loops running beside each probe (0: a quiet machine). */
  busy: number;
  /** V8 flags of the probe's process, comma-separated; "" for V8's defaults. */
  v8Flags: string;
  /** The guest's memory in MiB. */
  guestMiB: number;
}

/** Runs the probe `o.runs` times; returns each run's rounds. */
export async function measureStartLatency(o: StartLatencyOptions): Promise<StartRound[][]> {
  const runs: StartRound[][] = [];
  for (let i = 0; i < o.runs; i++) {
    const busy: Deno.ChildProcess[] = [];
    try {
      for (let b = 0; b < o.busy; b++) {
        busy.push(
          new Deno.Command("sh", { args: ["-c", "while :; do :; done"], stdin: "null" }).spawn(),
        );
      }
      const out = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "--unstable-worker-options",
          ...(o.v8Flags === "" ? [] : [`--v8-flags=${o.v8Flags}`]),
          "-A",
          `${ROOT}bench/start_probe.ts`,
          "--guest-mib",
          String(o.guestMiB),
        ],
        stdin: "null",
        stdout: "piped",
        stderr: "piped",
      }).output();
      const text = new TextDecoder().decode(out.stdout).trim().split("\n").at(-1) ?? "";
      if (!out.success || !text.startsWith("{")) {
        throw new Error(
          `start_probe.ts failed (${out.code}): ${
            new TextDecoder().decode(out.stderr).slice(-2000)
          }`,
        );
      }
      runs.push((JSON.parse(text) as StartProbeResult).rounds);
    } finally {
      for (const p of busy) {
        try {
          p.kill("SIGKILL");
        } catch {
          // already gone
        }
        await p.status;
      }
    }
  }
  return runs;
}

const STEPS: [keyof StartRound, string][] = [
  ["featuresMs", "SET_FEATURES"],
  ["memoryMs", "SET_MEM_TABLE"],
  ["ringsMs", "ring set-up before the start"],
  ["startMs", "SET_VRING_KICK that starts the queues"],
  ["callMs", "SET_VRING_CALL after it"],
  ["firstFrameMs", "then the first TX frame's used entry"],
  ["totalMs", "SET_FEATURES to that used entry"],
  ["stopMs", "the stop before the round (both GET_VRING_BASE)"],
];

function median(v: number[]): number {
  const s = [...v].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

/** A Markdown table: per step, the median [min-max] of the first and of the later rounds. */
export function startLatencyTable(runs: StartRound[][]): string {
  const col = (round: number, k: keyof StartRound) => {
    const v = runs.map((r) => r[round]?.[k]).filter((x): x is number => x !== undefined);
    if (v.length === 0) return "-";
    return `${median(v).toFixed(1)} [${Math.min(...v).toFixed(1)}-${Math.max(...v).toFixed(1)}]`;
  };
  const lines = [
    "| step (ms) | fresh process | after a stop, same process |",
    "| --- | --- | --- |",
  ];
  for (const [k, name] of STEPS) lines.push(`| ${name} | ${col(0, k)} | ${col(1, k)} |`);
  return lines.join("\n");
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      runs: { type: "string", default: "6" },
      busy: { type: "string", default: "2" },
      "v8-flags": { type: "string" },
      "guest-mib": { type: "string", default: "256" },
    },
  });
  const runs = Number(values.runs);
  const busy = Number(values.busy);
  if (!Number.isInteger(runs) || runs < 1) throw new Error(`--runs ${values.runs}: a count`);
  if (!Number.isInteger(busy) || busy < 0) throw new Error(`--busy ${values.busy}: a count`);
  const guestMiB = Number(values["guest-mib"]);
  if (!Number.isInteger(guestMiB) || guestMiB < 4 || guestMiB > 65536) {
    throw new Error(`--guest-mib ${values["guest-mib"]}: a whole number of MiB, 4 to 65536`);
  }
  const given = values["v8-flags"];
  const v8Flags = given === undefined ? startTaskV8Flags() : given === "none" ? "" : given;
  const result = await measureStartLatency({ runs, busy, v8Flags, guestMiB });
  console.log(
    `Start of a fresh daemon's queues (bench/start_latency.ts --runs ${runs} --busy ${busy} ` +
      `--guest-mib ${guestMiB}, V8 flags: ${
        v8Flags || "V8's defaults"
      }); medians [min-max] over the runs:\n`,
  );
  console.log(startLatencyTable(result));
}
