/**
 * The kernel's ceiling for tap writes, measured without any runtime in the
 * way: compiles `bench/tap_ceiling.c` with gcc and runs it, pinned to one
 * core in a throw-away namespace, for the bench's frames (64 B, 1514 B and
 * the 64 KiB TSO frame, each after its vnet header) with `write()` of one
 * buffer and `writev()` of header + frame, on a non-blocking and a blocking
 * fd. bench/raw_tap.ts's Deno loop pays an FFI call per frame on top of
 * this; vionet's writer pays io_uring's per-request work and the header
 * kept apart from the frame (a `writev`).
 *
 * ```
 * deno run -A bench/tap_ceiling.ts [--cpu 0] [--seconds 2]
 * ```
 *
 * `deno task bench` runs it too and puts the figures under its table.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ROOT } from "../tests/helpers.ts";
import { Netns, sh } from "./proc.ts";
import { rawWriteBuffer } from "./raw_tap.ts";

/** The frames measured, by raw_tap.ts's names. */
export const CEILING_FRAMES = ["64", "1514", "tso"] as const;
/** How each frame is handed to the tap. */
export const CEILING_CALLS = ["write", "writev"] as const;

/** One measurement. */
export interface CeilingSample {
  frame: typeof CEILING_FRAMES[number];
  call: typeof CEILING_CALLS[number];
  nonBlocking: boolean;
  /** Frames written per second, in millions. */
  mpps: number;
  /** Microseconds per frame on the one core. */
  microseconds: number;
  /** Writes that did not take the whole frame (expected 0). */
  errors: number;
}

/** Why the ceiling cannot be measured here (no gcc), or undefined. */
export async function ceilingUnavailable(): Promise<string | undefined> {
  try {
    await sh(["gcc", "--version"]);
    return undefined;
  } catch {
    return "gcc is not installed (apt-get install gcc)";
  }
}

/** Parses the C program's "frames seconds errors" line; throws naming what was wrong. */
export function parseCeilingLine(
  line: string,
): { frames: number; seconds: number; errors: number } {
  const m = /^(\d+) (\d+(?:\.\d+)?) (\d+)$/.exec(line.trim());
  if (!m) {
    throw new Error(
      `tap_ceiling printed ${JSON.stringify(line.slice(0, 200))}, not "frames seconds errors"`,
    );
  }
  const seconds = Number(m[2]);
  if (!(seconds > 0)) throw new Error(`tap_ceiling ran for ${m[2]} s`);
  return { frames: Number(m[1]), seconds, errors: Number(m[3]) };
}

/**
 * Builds the program and measures every frame × call × blocking mode for
 * `seconds` each on CPU `cpu`. Cleans up its namespace and files.
 */
export async function measureTapCeiling(
  opts: { cpu: number; seconds: number; log?: (line: string) => void },
): Promise<CeilingSample[]> {
  const dir = await Deno.makeTempDir({ prefix: "vionet-ceiling-" });
  let ns: Netns | undefined;
  try {
    const bin = `${dir}/tap_ceiling`;
    await sh(["gcc", "-O2", "-Wall", "-o", bin, `${ROOT}bench/tap_ceiling.c`]);
    ns = await Netns.create();
    const out: CeilingSample[] = [];
    let n = 0;
    for (const frame of CEILING_FRAMES) {
      const file = `${dir}/frame-${frame}.bin`;
      await Deno.writeFile(file, rawWriteBuffer(frame));
      for (const call of CEILING_CALLS) {
        for (const nonBlocking of [true, false]) {
          // A fresh tap each time: no state carried from the last run.
          const child = ns.spawn([
            bin,
            `vc${n++}`,
            file,
            call,
            nonBlocking ? "nonblock" : "block",
            String(opts.seconds),
          ], { cpu: opts.cpu });
          const status = await child.exited;
          if (!status.success) {
            throw new Error(
              `tap_ceiling ${frame} ${call} exited ${status.code}: ${child.tail(500)}`,
            );
          }
          const r = parseCeilingLine(child.output);
          const s: CeilingSample = {
            frame,
            call,
            nonBlocking,
            mpps: r.frames / r.seconds / 1e6,
            microseconds: r.seconds / Math.max(r.frames, 1) * 1e6,
            errors: r.errors,
          };
          opts.log?.(
            `ceiling ${frame} ${call} ${nonBlocking ? "non-blocking" : "blocking"}: ` +
              `${s.mpps.toFixed(3)} Mpps, ${s.microseconds.toFixed(3)} µs a frame` +
              (s.errors ? `, ${s.errors} short writes` : ""),
          );
          out.push(s);
        }
      }
    }
    return out;
  } finally {
    await ns?.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** The samples as a markdown table: one row per frame, one column per call and mode. */
export function ceilingTable(samples: CeilingSample[]): string[] {
  const cols = CEILING_CALLS.flatMap((call) =>
    [true, false].map((nonBlocking) => ({ call, nonBlocking }))
  );
  const head = cols.map((c) =>
    `${c.call === "write" ? "`write` header+frame" : "`writev` header, frame"}, ${
      c.nonBlocking ? "O_NONBLOCK" : "blocking"
    }`
  );
  const lines = [
    `| frame | ${head.join(" | ")} |`,
    `|---|${cols.map(() => "---").join("|")}|`,
  ];
  for (const frame of CEILING_FRAMES) {
    const cells = cols.map((c) => {
      const s = samples.find((x) =>
        x.frame === frame && x.call === c.call && x.nonBlocking === c.nonBlocking
      );
      return s ? `${s.mpps.toFixed(3)} Mpps (${s.microseconds.toFixed(2)} µs)` : "";
    });
    lines.push(`| ${frame === "tso" ? "64 KiB TSO" : `${frame} B`} | ${cells.join(" | ")} |`);
  }
  return lines;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      cpu: { type: "string", default: "0" },
      seconds: { type: "string", default: "2" },
    },
  });
  const cpu = Number(values.cpu);
  const seconds = Number(values.seconds);
  if (!Number.isInteger(cpu) || cpu < 0) throw new Error(`--cpu ${values.cpu}: not a CPU number`);
  if (!(seconds > 0 && seconds <= 60)) {
    throw new Error(`--seconds ${values.seconds}: want a number of seconds in (0, 60]`);
  }
  const why = await ceilingUnavailable();
  if (why) {
    console.error(`tap_ceiling: ${why}`);
    Deno.exit(2);
  }
  const samples = await measureTapCeiling({ cpu, seconds, log: console.log });
  console.log("\n" + ceilingTable(samples).join("\n"));
}

if (import.meta.main) await main();
