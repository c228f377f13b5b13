/**
 * The text of a rate limit, as `--rate-limit` and `POST /rate-limit` take it:
 *
 * ```
 * SPEC  := ITEM ("," ITEM)*
 * ITEM  := DIR "=" RATE | DIR "=off" | "burst=" SIZE
 * DIR   := "tx"  (what the guest transmits: guest -> tap)
 *        | "rx"  (what the guest receives: tap -> guest)
 * RATE  := NUMBER UNIT ["/s"]
 *   bits a second:    bit kbit Mbit Gbit          (SI: 100Mbit = 12 500 000 bytes/s)
 *   bytes a second:   B kB MB GB (SI), KiB MiB GiB (binary)
 *   frames a second:  pps kpps Mpps
 * SIZE  := a byte count (a bare number, or NUMBER with a byte unit) after a
 *          byte or bit rate; a frame count (a bare number) after a frame rate
 * ```
 *
 * A direction may have one byte (or bit) rate and one frame rate, both
 * enforced (`tx=100Mbit,tx=20kpps`). `burst=` sets the bucket size of the
 * rate right before it; without it a bucket holds {@link DEFAULT_BURST_SECONDS}
 * of its rate, and a byte bucket at least one largest frame. Prefixes of
 * `bit` and `pps` may be either case (`mbit` is Mbit); byte units must say B:
 * `100M`, `100m` and `100mb` are refused as ambiguous, and so is `bps`
 * (`tc` reads it as bytes, most people as bits).
 *
 * @module
 */

import type { BucketLimit, DirectionLimit } from "../io/rate_limiter.ts";

/** A limit text that cannot be used; the message names what is wrong. */
export class RateLimitSyntaxError extends SyntaxError {
  override name = "RateLimitSyntaxError";
}

/** What a spec changes: each direction it names (null: no limit), or undefined: unchanged. */
export interface RateLimitChange {
  tx?: DirectionLimit | null;
  rx?: DirectionLimit | null;
}

/** A bucket holds this many seconds of its rate unless `burst=` says otherwise. */
export const DEFAULT_BURST_SECONDS = 0.1;
/** The least default byte bucket: one 64 KiB GSO frame with its headers. */
export const MIN_DEFAULT_BURST_BYTES = 65_550;
/** Bounds: 8 Tbit/s, 1 TiB of burst, a billion frames. */
export const MAX_BYTE_RATE = 1e12;
export const MAX_FRAME_RATE = 1e9;
export const MAX_BURST_BYTES = 2 ** 40;
export const MAX_BURST_FRAMES = 1e9;

const SI: Record<string, number> = { "": 1, k: 1e3, m: 1e6, g: 1e9 };
const BYTE_UNITS: Record<string, number> = {
  B: 1,
  kB: 1e3,
  KB: 1e3,
  MB: 1e6,
  GB: 1e9,
  KiB: 1024,
  MiB: 1024 ** 2,
  GiB: 1024 ** 3,
};
const NUMBER = /^(\d+(?:\.\d+)?)(.*)$/;

/** Parses a rate: bytes or frames a second. */
function parseRate(text: string): { kind: "bytes" | "frames"; rate: number } {
  const m = NUMBER.exec(text);
  if (!m) {
    throw new RateLimitSyntaxError(
      `"${text}" is not a rate: a number and a unit, e.g. 100Mbit, 12.5MB or 10kpps`,
    );
  }
  const n = Number(m[1]);
  const unit = m[2].replace(/\/s$/, "");
  let kind: "bytes" | "frames";
  let rate: number;
  const bit = /^([kKmMgG]?)bit$/i.exec(unit);
  const pps = /^([kKmMgG]?)pps$/i.exec(unit);
  if (bit) {
    kind = "bytes";
    rate = (n * SI[bit[1].toLowerCase()]) / 8;
  } else if (pps) {
    kind = "frames";
    rate = n * SI[pps[1].toLowerCase()];
  } else if (unit in BYTE_UNITS) {
    kind = "bytes";
    rate = n * BYTE_UNITS[unit];
  } else if (unit === "") {
    throw new RateLimitSyntaxError(
      `"${text}" has no unit: say bits (${m[1]}Mbit), bytes (${m[1]}MB) or frames (${m[1]}kpps)`,
    );
  } else if (/^[kKmMgG]?i?b?ps$/i.test(unit) || /^[kKmMgG]i?[bB]?$/.test(unit)) {
    throw new RateLimitSyntaxError(
      `"${text}": "${unit}" is ambiguous; say bits (Mbit) or bytes (MB, MiB), or frames (kpps)`,
    );
  } else {
    throw new RateLimitSyntaxError(
      `"${text}": unknown unit "${unit}" (bit kbit Mbit Gbit, B kB MB GB KiB MiB GiB, pps kpps Mpps)`,
    );
  }
  const max = kind === "bytes" ? MAX_BYTE_RATE : MAX_FRAME_RATE;
  if (!(rate >= 1 && rate <= max)) {
    throw new RateLimitSyntaxError(
      `"${text}" is out of range: 1 to ${max} ${kind} a second (use "off" for no limit)`,
    );
  }
  return { kind, rate };
}

/** Parses a burst for a bucket of `kind`. */
function parseBurst(text: string, kind: "bytes" | "frames"): number {
  const m = NUMBER.exec(text);
  let size = NaN;
  if (m && m[2] === "") size = Number(m[1]);
  else if (m && kind === "bytes" && m[2] in BYTE_UNITS) size = Number(m[1]) * BYTE_UNITS[m[2]];
  if (Number.isNaN(size)) {
    throw new RateLimitSyntaxError(
      kind === "bytes"
        ? `burst "${text}" is not a size in bytes (e.g. 262144, 256KiB, 1MB)`
        : `burst "${text}" is not a number of frames (after a frame rate, e.g. burst=64)`,
    );
  }
  size = Math.round(size);
  const max = kind === "bytes" ? MAX_BURST_BYTES : MAX_BURST_FRAMES;
  if (!(size >= 1 && size <= max)) {
    throw new RateLimitSyntaxError(`burst "${text}" is out of range: 1 to ${max} ${kind}`);
  }
  return size;
}

/** The bucket size a rate gets without `burst=`. */
export function defaultBurst(kind: "bytes" | "frames", rate: number): number {
  const s = Math.ceil(rate * DEFAULT_BURST_SECONDS);
  return kind === "bytes" ? Math.max(MIN_DEFAULT_BURST_BYTES, s) : Math.max(1, s);
}

/**
 * Parses a spec (module comment). Throws {@link RateLimitSyntaxError} naming
 * the first thing wrong.
 */
export function parseRateLimit(text: string): RateLimitChange {
  const spec = text.trim();
  if (spec === "") {
    throw new RateLimitSyntaxError("the limit is empty: say tx=RATE and/or rx=RATE, or tx=off");
  }
  const change: RateLimitChange = {};
  const seen = { tx: false, rx: false };
  let last: { dir: "tx" | "rx"; kind: "bytes" | "frames"; burst: boolean } | null = null;
  for (const item of spec.split(",")) {
    const eq = item.indexOf("=");
    const key = (eq < 0 ? item : item.slice(0, eq)).trim();
    const value = eq < 0 ? "" : item.slice(eq + 1).trim();
    if (eq < 0 || value === "") {
      throw new RateLimitSyntaxError(`"${item}" wants KEY=VALUE (tx=, rx= or burst=)`);
    }
    if (key === "burst") {
      if (last === null) {
        throw new RateLimitSyntaxError(`burst=${value} must follow the rate it is for`);
      }
      if (last.burst) {
        throw new RateLimitSyntaxError(
          `burst=${value}: ${last.dir}'s ${last.kind} rate has one already`,
        );
      }
      const d = change[last.dir]!;
      d[last.kind]!.size = parseBurst(value, last.kind);
      last.burst = true;
      continue;
    }
    if (key !== "tx" && key !== "rx") {
      throw new RateLimitSyntaxError(
        `unknown key "${key}": tx= (guest transmits), rx= (guest receives) or burst=`,
      );
    }
    if (value === "off") {
      if (seen[key]) throw new RateLimitSyntaxError(`${key}=off with another ${key}= item`);
      change[key] = null;
      seen[key] = true;
      last = null;
      continue;
    }
    if (seen[key] && change[key] === null) {
      throw new RateLimitSyntaxError(`${key}=${value} after ${key}=off`);
    }
    const { kind, rate } = parseRate(value);
    const d: DirectionLimit = change[key] ?? { bytes: null, frames: null };
    if (d[kind] !== null) {
      throw new RateLimitSyntaxError(
        `${key} has two ${kind === "bytes" ? "byte (or bit)" : "frame"} rates`,
      );
    }
    const bucket: BucketLimit = { rate, size: defaultBurst(kind, rate) };
    d[kind] = bucket;
    change[key] = d;
    seen[key] = true;
    last = { dir: key, kind, burst: false };
  }
  return change;
}

/**
 * A query string as `POST /rate-limit?tx=50Mbit&rx=off` sends it: `&`
 * separates items like `,`; percent-escapes are decoded.
 * @throws {RateLimitSyntaxError} for a bad escape.
 */
export function queryToSpec(query: string): string {
  try {
    return decodeURIComponent(query.replaceAll("+", " ")).replaceAll("&", ",");
  } catch {
    throw new RateLimitSyntaxError(`the query "${query}" has a bad percent-escape`);
  }
}

/** Up to six significant digits, without trailing zeros. */
function num(n: number): string {
  return String(Number(n.toPrecision(6)));
}

/** A byte rate as bits with the largest SI prefix that keeps it at least 1. */
export function formatByteRate(bytesPerSecond: number): string {
  const bits = bytesPerSecond * 8;
  for (const [p, f] of [["G", 1e9], ["M", 1e6], ["k", 1e3]] as const) {
    if (bits >= f) return `${num(bits / f)}${p}bit`;
  }
  return `${num(bits)}bit`;
}

/** A direction's limits as a spec would say them (`off` when none): `tx=50Mbit,burst=625000`. */
export function formatDirection(dir: "tx" | "rx", l: DirectionLimit | null): string {
  if (l === null || (l.bytes === null && l.frames === null)) return `${dir}=off`;
  const items: string[] = [];
  if (l.bytes) {
    items.push(`${dir}=${formatByteRate(l.bytes.rate)}`, `burst=${Math.round(l.bytes.size)}`);
  }
  if (l.frames) items.push(`${dir}=${num(l.frames.rate)}pps`, `burst=${Math.round(l.frames.size)}`);
  return items.join(",");
}
