/**
 * Field-by-field reading of untrusted messages: `unknown` in, a typed value
 * or a {@link ValidationError} naming the offending field out. The one
 * validator of both control protocols: parent ↔ device (`validate.ts`) and
 * parent ↔ I/O workers (`parent/io/protocol.ts`).
 *
 * @module
 */

import type { ErrorCode } from "./protocol.ts";

/** A message did not have the shape its kind requires. */
export class ValidationError extends Error {
  override name = "ValidationError";
  constructor(
    readonly code: ErrorCode,
    /** Path of the offending field, e.g. `config.mac[2]`. */
    readonly field: string | undefined,
    message: string,
    /** The request id, when the message had a usable one. */
    readonly id: number | null = null,
  ) {
    super(message);
  }
}

const U64_MAX = (1n << 64n) - 1n;
/** Longest text accepted in `message` fields, so a peer cannot flood the log. */
export const MAX_TEXT = 4096;

/** Field reader over one untrusted object; every getter names the path on failure. */
export class Reader {
  constructor(
    private readonly obj: Record<string, unknown>,
    private readonly path: string,
    private readonly id: number | null,
  ) {}

  private fail(key: string, what: string): never {
    throw new ValidationError("malformed", this.path + key, `${this.path + key} ${what}`, this.id);
  }

  private get(key: string): unknown {
    if (!Object.hasOwn(this.obj, key)) this.fail(key, "is missing");
    return this.obj[key];
  }

  uint(key: string, max: number): number {
    const v = this.get(key);
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > max) {
      this.fail(key, `must be an integer in 0..${max}, got ${describe(v)}`);
    }
    return v;
  }

  u64(key: string): bigint {
    const v = this.get(key);
    if (typeof v !== "bigint" || v < 0n || v > U64_MAX) {
      this.fail(key, `must be a bigint in 0..2^64-1, got ${describe(v)}`);
    }
    return v;
  }

  uintOrNull(key: string, max: number): number | null {
    return this.get(key) === null ? null : this.uint(key, max);
  }

  text(key: string): string {
    const v = this.get(key);
    if (typeof v !== "string" || v.length > MAX_TEXT) {
      this.fail(key, `must be a string of at most ${MAX_TEXT} characters, got ${describe(v)}`);
    }
    return v;
  }

  optionalText(key: string): string | undefined {
    return Object.hasOwn(this.obj, key) && this.obj[key] !== undefined ? this.text(key) : undefined;
  }

  oneOf<T extends string>(key: string, options: readonly T[]): T {
    const v = this.get(key);
    if (typeof v !== "string" || !(options as readonly string[]).includes(v)) {
      this.fail(key, `must be one of ${options.join(", ")}, got ${describe(v)}`);
    }
    return v as T;
  }

  object(key: string): Reader {
    const v = this.get(key);
    if (!isRecord(v)) this.fail(key, `must be an object, got ${describe(v)}`);
    return new Reader(v, `${this.path}${key}.`, this.id);
  }

  bytes(key: string, length: number): number[] {
    const v = this.get(key);
    if (!Array.isArray(v) || v.length !== length) {
      this.fail(key, `must be an array of ${length} octets, got ${describe(v)}`);
    }
    return v.map((b, i) => {
      if (typeof b !== "number" || !Number.isInteger(b) || b < 0 || b > 255) {
        this.fail(`${key}[${i}]`, `must be an octet, got ${describe(b)}`);
      }
      return b;
    });
  }

  /** `length` octets, or null; the field must be there either way. */
  bytesOrNull(key: string, length: number): number[] | null {
    return this.get(key) === null ? null : this.bytes(key, length);
  }

  /** A non-negative integer that is exactly representable (an address or a size). */
  address(key: string): number {
    const v = this.get(key);
    if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
      this.fail(key, `must be an integer in 0..2^53-1, got ${describe(v)}`);
    }
    return v;
  }

  int(key: string, min: number, max: number): number {
    const v = this.get(key);
    if (typeof v !== "number" || !Number.isInteger(v) || v < min || v > max) {
      this.fail(key, `must be an integer in ${min}..${max}, got ${describe(v)}`);
    }
    return v;
  }

  buffers(key: string, max: number): ArrayBuffer[] {
    const v = this.get(key);
    if (!Array.isArray(v) || v.length > max) {
      this.fail(key, `must be an array of at most ${max} ArrayBuffers, got ${describe(v)}`);
    }
    return v.map((b, i) => {
      if (!(b instanceof ArrayBuffer) || b.detached) {
        this.fail(`${key}[${i}]`, `must be an ArrayBuffer, got ${describe(b)}`);
      }
      return b;
    });
  }

  boolean(key: string): boolean {
    const v = this.get(key);
    if (typeof v !== "boolean") this.fail(key, `must be true or false, got ${describe(v)}`);
    return v;
  }

  arrayBuffer(key: string): ArrayBuffer {
    const v = this.get(key);
    if (!(v instanceof ArrayBuffer) || v.detached) {
      this.fail(key, `must be an ArrayBuffer, got ${describe(v)}`);
    }
    return v;
  }

  /** A SharedArrayBuffer, of exactly `bytes` bytes when given. */
  sharedBuffer(key: string, bytes?: number): SharedArrayBuffer {
    const v = this.get(key);
    if (!(v instanceof SharedArrayBuffer)) {
      this.fail(key, `must be a SharedArrayBuffer, got ${describe(v)}`);
    }
    if (bytes !== undefined && v.byteLength !== bytes) {
      this.fail(key, `must be ${bytes} bytes, got ${v.byteLength}`);
    }
    return v;
  }

  /** Whether `key` is there (and not undefined). */
  has(key: string): boolean {
    return Object.hasOwn(this.obj, key) && this.obj[key] !== undefined;
  }

  /** `read(key)` when the field is there, else `fallback`. */
  optional<T>(key: string, fallback: T, read: (key: string) => T): T {
    return this.has(key) ? read(key) : fallback;
  }

  /** `read(key)`, or null when the field is null or absent. */
  nullable<T>(key: string, read: (key: string) => T): T | null {
    return this.has(key) && this.obj[key] !== null ? read(key) : null;
  }

  /** A descriptor number: an integer in [0, 2^31). */
  fd(key: string): number {
    const v = this.get(key);
    if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > 0x7fff_ffff) {
      this.fail(key, `must be a descriptor (an integer in 0..2^31-1), got ${describe(v)}`);
    }
    return v;
  }

  /** A host address as a bigint: non-zero, below 2^64, `align`-byte aligned. */
  hostAddress(key: string, align: number): bigint {
    const v = this.get(key);
    if (typeof v !== "bigint" || v <= 0n || v > U64_MAX || v % BigInt(align) !== 0n) {
      this.fail(key, `must be a ${align}-byte aligned host address (bigint), got ${describe(v)}`);
    }
    return v;
  }

  /** A bigint, or a number that is a safe integer (a size either way). */
  bigintOrSafe(key: string): bigint | number {
    const v = this.get(key);
    if (typeof v !== "bigint" && !(typeof v === "number" && Number.isSafeInteger(v))) {
      this.fail(key, `must be a bigint or a safe integer, got ${describe(v)}`);
    }
    return v;
  }

  /** A bigint of any value (the caller checks its range). */
  bigint(key: string): bigint {
    const v = this.get(key);
    if (typeof v !== "bigint") this.fail(key, `must be a bigint, got ${describe(v)}`);
    return v;
  }

  /** An array of at most `max` items, each read by `item` with its own path. */
  list<T>(key: string, max: number, item: (r: Reader) => T): T[] {
    const v = this.get(key);
    if (!Array.isArray(v) || v.length > max) {
      this.fail(key, `must be an array of at most ${max} items, got ${describe(v)}`);
    }
    return v.map((x, i) => {
      if (!isRecord(x)) this.fail(`${key}[${i}]`, `must be an object, got ${describe(x)}`);
      return item(new Reader(x, `${this.path}${key}[${i}].`, this.id));
    });
  }

  counters(key: string): Record<string, Record<string, number>> {
    const v = this.get(key);
    if (!isRecord(v)) this.fail(key, `must be an object, got ${describe(v)}`);
    const out: Record<string, Record<string, number>> = {};
    for (const [queue, counters] of Object.entries(v)) {
      if (!isRecord(counters)) this.fail(`${key}.${queue}`, "must be an object");
      out[queue] = {};
      for (const [name, n] of Object.entries(counters)) {
        if (typeof n !== "number" || !Number.isFinite(n) || n < 0) {
          this.fail(`${key}.${queue}.${name}`, `must be a non-negative number, got ${describe(n)}`);
        }
        out[queue][name] = n;
      }
    }
    return out;
  }
}

export function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) &&
    !ArrayBuffer.isView(v) && !(v instanceof ArrayBuffer);
}

export function describe(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v.length > 40 ? v.slice(0, 40) + "…" : v);
  if (typeof v === "bigint") return `${v}n`;
  if (Array.isArray(v)) return `an array of ${v.length}`;
  if (v === null) return "null";
  if (typeof v === "object") return "an object";
  return `${typeof v} ${String(v)}`;
}
