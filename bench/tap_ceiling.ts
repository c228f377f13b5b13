/**
 * The kernel's ceiling for a tap, measured without any runtime in the way:
 * compiles `bench/tap_ceiling.c` with gcc and runs it, pinned to one core in
 * a throw-away namespace.
 *
 * TX: the bench's frames (64 B, 1514 B and the 64 KiB TSO frame, each after
 * its vnet header) with `write()` of one buffer and `writev()` of header +
 * frame, on a non-blocking and a blocking fd, and batched as vionet's writer
 * batches them: 64 IORING_OP_WRITEV (header, frame) per `io_uring_enter`,
 * all reaped before the next batch, non-blocking. The batched figure is the
 * one the bench divides vionet's TX figures by (`report.ts`): the same
 * system calls vionet makes, with nothing else around them.
 *
 * RX: the C reader is a backend of the bench's rx64 test (`c-readv`,
 * `c-uring-readv` in bench/dpdk.ts), so that it reads frames injected the
 * way vionet's are and is counted the same way; this program runs that test
 * for both readers ({@link measureRxCeiling}), the faster being the ceiling.
 *
 * ```
 * deno run -A bench/tap_ceiling.ts [--cpu 0] [--frontend-cpu 1] [--seconds 2] [--reps 1] [--no-rx]
 * ```
 *
 * `deno task bench` runs both and reports every vionet figure against them.
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ROOT } from "../tests/helpers.ts";
import { Netns, sh } from "./proc.ts";
import { rawWriteBuffer } from "./raw_tap.ts";
import { type BackendSample, measureBackend, RX_CEILING_BACKENDS } from "./dpdk.ts";

/** The frames measured, by raw_tap.ts's names. */
export const CEILING_FRAMES = ["64", "1514", "tso"] as const;
/**
 * How each frame is handed to the tap: one system call a frame (`write`,
 * `writev`), or vionet's io_uring batches (`uring-writev`).
 */
export const CEILING_CALLS = ["write", "writev", "uring-writev"] as const;
/** The call whose figure is the TX ceiling vionet is measured against. */
export const BATCHED_CALL = "uring-writev";

/** The modes each call is measured in: io_uring only non-blocking, as vionet's tap is. */
function modesOf(call: typeof CEILING_CALLS[number]): boolean[] {
  return call === BATCHED_CALL ? [true] : [true, false];
}

/** One measurement. */
export interface CeilingSample {
  frame: typeof CEILING_FRAMES[number];
  call: typeof CEILING_CALLS[number];
  nonBlocking: boolean;
  /** Frames written per second, in millions. */
  mpps: number;
  /** Microseconds per frame on the one core (wall time). */
  microseconds: number;
  /**
   * Microseconds of the thread's own CPU per frame: below `microseconds`
   * when other work shared the core (absent in older results).
   */
  cpuMicroseconds?: number;
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

let binary: Promise<string> | undefined;

/**
 * bench/tap_ceiling.c built once per process, in a temporary directory
 * removed when the process ends. Throws with gcc's message when it fails.
 */
export function ceilingBinary(): Promise<string> {
  binary ??= (async () => {
    const dir = await Deno.makeTempDir({ prefix: "vionet-ceiling-bin-" });
    globalThis.addEventListener("unload", () => {
      try {
        Deno.removeSync(dir, { recursive: true });
      } catch { /* gone */ }
    });
    const bin = `${dir}/tap_ceiling`;
    await sh(["gcc", "-O2", "-Wall", "-o", bin, `${ROOT}bench/tap_ceiling.c`]);
    return bin;
  })();
  return binary;
}

/**
 * Parses the C program's "frames seconds errors [cpu]" line (cpu: its own
 * CPU seconds); throws naming what was wrong.
 */
export function parseCeilingLine(
  line: string,
): { frames: number; seconds: number; errors: number; cpuSeconds?: number } {
  const m = /^(\d+) (\d+(?:\.\d+)?) (\d+)(?: (\d+(?:\.\d+)?))?$/.exec(line.trim());
  if (!m) {
    throw new Error(
      `tap_ceiling printed ${
        JSON.stringify(line.slice(0, 200))
      }, not "frames seconds errors [cpu]"`,
    );
  }
  const seconds = Number(m[2]);
  if (!(seconds > 0)) throw new Error(`tap_ceiling ran for ${m[2]} s`);
  const out = { frames: Number(m[1]), seconds, errors: Number(m[3]) };
  return m[4] === undefined ? out : { ...out, cpuSeconds: Number(m[4]) };
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
    const bin = await ceilingBinary();
    ns = await Netns.create();
    const out: CeilingSample[] = [];
    let n = 0;
    for (const frame of CEILING_FRAMES) {
      const file = `${dir}/frame-${frame}.bin`;
      await Deno.writeFile(file, rawWriteBuffer(frame));
      for (const call of CEILING_CALLS) {
        for (const nonBlocking of modesOf(call)) {
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
          if (status.code === 3 && call === BATCHED_CALL) {
            opts.log?.(`ceiling ${frame} ${call}: not measured, ${child.tail(300).trim()}`);
            continue;
          }
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
            ...(r.cpuSeconds === undefined
              ? {}
              : { cpuMicroseconds: r.cpuSeconds / Math.max(r.frames, 1) * 1e6 }),
            errors: r.errors,
          };
          opts.log?.(
            `ceiling ${frame} ${call} ${nonBlocking ? "non-blocking" : "blocking"}: ` +
              `${s.mpps.toFixed(3)} Mpps, ${s.microseconds.toFixed(3)} µs a frame` +
              (s.cpuMicroseconds === undefined
                ? ""
                : ` (${s.cpuMicroseconds.toFixed(3)} µs of its CPU)`) +
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
    modesOf(call).map((nonBlocking) => ({ call, nonBlocking }))
  );
  const name = {
    write: "`write` header+frame",
    writev: "`writev` header, frame",
    "uring-writev": "io_uring, 64 `WRITEV` (header, frame) a call",
  };
  const head = cols.map((c) => `${name[c.call]}, ${c.nonBlocking ? "O_NONBLOCK" : "blocking"}`);
  const lines = [
    `| frame | ${head.join(" | ")} |`,
    `|---|${cols.map(() => "---").join("|")}|`,
  ];
  for (const frame of CEILING_FRAMES) {
    const cells = cols.map((c) => {
      const s = samples.find((x) =>
        x.frame === frame && x.call === c.call && x.nonBlocking === c.nonBlocking
      );
      if (!s) return "";
      // The CPU's µs only where other work took a tenth of the core or more.
      const cpu = s.cpuMicroseconds !== undefined && s.cpuMicroseconds < 0.9 * s.microseconds
        ? `; ${s.cpuMicroseconds.toFixed(2)} µs CPU`
        : "";
      return `${s.mpps.toFixed(3)} Mpps (${s.microseconds.toFixed(2)} µs${cpu})`;
    });
    lines.push(`| ${frame === "tso" ? "64 KiB TSO" : `${frame} B`} | ${cells.join(" | ")} |`);
  }
  return lines;
}

/**
 * The RX ceiling: the bench's rx64 test run on the C readers
 * (`RX_CEILING_BACKENDS`), repetitions interleaved. Each sample is a
 * {@link BackendSample} as `deno task bench` records it.
 */
export async function measureRxCeiling(
  opts: {
    backendCpu: number;
    frontendCpu: number;
    seconds: number;
    reps: number;
    log: (line: string) => void;
  },
): Promise<BackendSample[]> {
  const out: BackendSample[] = [];
  for (let rep = 0; rep < opts.reps; rep++) {
    for (const backend of RX_CEILING_BACKENDS) {
      const s = await measureBackend("rx64", backend, rep, { ...opts, warmSeconds: 1.5 });
      opts.log(
        `ceiling rx64 ${backend} rep ${rep}: ${(s.pps / 1e6).toFixed(3)} Mpps, ` +
          `${s.tapDropped} dropped at the tap` + (s.error ? ` (failed: ${s.error})` : ""),
      );
      out.push(s);
    }
  }
  return out;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      cpu: { type: "string", default: "0" },
      "frontend-cpu": { type: "string", default: "1" },
      seconds: { type: "string", default: "2" },
      reps: { type: "string", default: "1" },
      "no-rx": { type: "boolean", default: false },
    },
  });
  const cpu = Number(values.cpu);
  const frontendCpu = Number(values["frontend-cpu"]);
  const seconds = Number(values.seconds);
  const reps = Number(values.reps);
  for (const [name, n] of [["--cpu", cpu], ["--frontend-cpu", frontendCpu]] as const) {
    if (!Number.isInteger(n) || n < 0) throw new Error(`${name} ${n}: not a CPU number`);
  }
  if (!(seconds > 0 && seconds <= 60)) {
    throw new Error(`--seconds ${values.seconds}: want a number of seconds in (0, 60]`);
  }
  if (!Number.isInteger(reps) || reps < 1) throw new Error(`--reps ${values.reps}: want 1 or more`);
  const why = await ceilingUnavailable();
  if (why) {
    console.error(`tap_ceiling: ${why}`);
    Deno.exit(2);
  }
  const samples = await measureTapCeiling({ cpu, seconds, log: console.log });
  console.log("\n" + ceilingTable(samples).join("\n"));
  if (!values["no-rx"]) {
    const rx = await measureRxCeiling({
      backendCpu: cpu,
      frontendCpu,
      seconds,
      reps,
      log: console.log,
    });
    console.log("\n" + rxCeilingLines(rx).join("\n"));
  }
}

/** The RX ceiling's figures, one line per reader: median [min–max] and the tap's drops. */
export function rxCeilingLines(samples: readonly BackendSample[]): string[] {
  return RX_CEILING_BACKENDS.map((backend) => {
    const s = samples.filter((x) => x.backend === backend && !x.error);
    const failed = samples.filter((x) => x.backend === backend && x.error).length;
    if (s.length === 0) {
      return `rx64 ${backend}: not measured${failed ? ` (${failed} failed)` : ""}`;
    }
    const pps = s.map((x) => x.pps / 1e6).sort((a, b) => a - b);
    const mid = pps.length >> 1;
    const median = pps.length & 1 ? pps[mid] : (pps[mid - 1] + pps[mid]) / 2;
    const dropped = s.reduce((n, x) => n + x.tapDropped, 0);
    return `rx64 ${backend}: ${median.toFixed(3)} Mpps [${pps[0].toFixed(3)}–${
      pps[pps.length - 1].toFixed(3)
    }] over ${s.length}, ${dropped} frames dropped at the tap` +
      (failed ? `, ${failed} failed` : "");
  });
}

if (import.meta.main) await main();
