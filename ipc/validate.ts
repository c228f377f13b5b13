/**
 * Runtime validators for `ipc/protocol.ts`: `unknown` in, a typed message or a
 * `ValidationError` naming the offending field out. Each side runs the
 * validator for the *other* side's messages on everything it receives.
 *
 * @module
 */

import type {
  DatapathGrant,
  DeviceConfig,
  DeviceMessage,
  ErrorCode,
  ErrorMessage,
  LogLevel,
  ParentMessage,
  PermissionsReply,
  QueuePlacement,
} from "./protocol.ts";
import { PERMISSION_NAMES } from "./protocol.ts";

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

const LOG_LEVELS: readonly LogLevel[] = ["error", "warn", "info", "debug"];
const ERROR_CODES: readonly ErrorCode[] = [
  "malformed",
  "unknown-kind",
  "version",
  "refused",
  "failed",
];
const PERMISSION_STATES = ["granted", "prompt", "denied"] as const;
const U64_MAX = (1n << 64n) - 1n;
/** Longest text accepted in `message` fields, so a peer cannot flood the log. */
const MAX_TEXT = 4096;

/** Field reader over one untrusted object; every getter names the path on failure. */
class Reader {
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

  sharedBuffer(key: string): SharedArrayBuffer {
    const v = this.get(key);
    if (!(v instanceof SharedArrayBuffer)) {
      this.fail(key, `must be a SharedArrayBuffer, got ${describe(v)}`);
    }
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

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v) &&
    !ArrayBuffer.isView(v) && !(v instanceof ArrayBuffer);
}

function describe(v: unknown): string {
  if (typeof v === "string") return JSON.stringify(v.length > 40 ? v.slice(0, 40) + "…" : v);
  if (typeof v === "bigint") return `${v}n`;
  if (Array.isArray(v)) return `an array of ${v.length}`;
  if (v === null) return "null";
  if (typeof v === "object") return "an object";
  return `${typeof v} ${String(v)}`;
}

const MAX_ID = 2 ** 31 - 1;

/** Opens a message: it must be an object with a string `kind`; returns its reader and id. */
function open(raw: unknown): { r: Reader; kind: string; id: number | null } {
  if (!isRecord(raw)) {
    throw new ValidationError(
      "malformed",
      undefined,
      `message must be an object, got ${describe(raw)}`,
    );
  }
  const rawId = raw.id;
  const id = typeof rawId === "number" && Number.isInteger(rawId) && rawId >= 0 && rawId <= MAX_ID
    ? rawId
    : null;
  const r = new Reader(raw, "", id);
  if (typeof raw.kind !== "string") {
    throw new ValidationError(
      "malformed",
      "kind",
      `kind must be a string, got ${describe(raw.kind)}`,
      id,
    );
  }
  return { r, kind: raw.kind, id };
}

function unknownKind(kind: string, id: number | null): never {
  throw new ValidationError("unknown-kind", "kind", `unknown message kind ${describe(kind)}`, id);
}

function errorMessage(r: Reader): ErrorMessage {
  return {
    kind: "error",
    // `id: null` is legal in an error about a message that had no usable id.
    id: r.uintOrNull("id", MAX_ID),
    code: r.oneOf("code", ERROR_CODES),
    field: r.optionalText("field"),
    message: r.text("message"),
  };
}

/** Most regions a grant may carry (vhost-user: 8, or more with CONFIGURE_MEM_SLOTS). */
const MAX_GRANT_REGIONS = 512;

function placement(r: Reader): QueuePlacement {
  return {
    size: r.uint("size", 32768),
    desc: r.address("desc"),
    avail: r.address("avail"),
    used: r.address("used"),
    base: r.uint("base", 0xffff),
  };
}

function datapathGrant(r: Reader): DatapathGrant {
  return {
    control: r.sharedBuffer("control"),
    tx: r.sharedBuffer("tx"),
    rxPost: r.sharedBuffer("rxPost"),
    rxLong: r.sharedBuffer("rxLong"),
    rxDone: r.sharedBuffer("rxDone"),
    bounce: r.sharedBuffer("bounce"),
    bounceHost: r.address("bounceHost"),
  };
}

function deviceConfig(r: Reader): DeviceConfig {
  return {
    mac: r.bytes("mac", 6),
    mtu: r.uint("mtu", 65535),
    offloadMode: r.oneOf("offloadMode", ["auto", "off"] as const),
    logLevel: r.oneOf("logLevel", LOG_LEVELS),
  };
}

/** Validates a message the device received from the parent. */
export function parseParentMessage(raw: unknown): ParentMessage {
  const { r, kind, id } = open(raw);
  switch (kind) {
    case "hello":
      return { kind, version: r.uint("version", MAX_ID), config: deviceConfig(r.object("config")) };
    case "get-features":
    case "reset":
    case "get-stats":
    case "get-permissions":
      return { kind, id: r.uint("id", MAX_ID) };
    case "set-features":
      return { kind, id: r.uint("id", MAX_ID), features: r.u64("features") };
    case "tunscap-result":
      return { kind, id: r.uint("id", MAX_ID), inForce: r.u64("inForce") };
    case "grant-memory":
      return {
        kind,
        id: r.uint("id", MAX_ID),
        regions: r.list("regions", MAX_GRANT_REGIONS, (g) => ({
          guestPhysAddr: g.address("guestPhysAddr"),
          size: g.address("size"),
          userAddr: g.address("userAddr"),
          hostAddr: g.address("hostAddr"),
          buffer: g.arrayBuffer("buffer"),
        })),
      };
    case "revoke-memory":
      return {
        kind,
        id: r.uint("id", MAX_ID),
        regions: r.list("regions", MAX_GRANT_REGIONS, (g) => ({
          guestPhysAddr: g.address("guestPhysAddr"),
          size: g.address("size"),
          userAddr: g.address("userAddr"),
        })),
      };
    case "start-queues":
      return {
        kind,
        id: r.uint("id", MAX_ID),
        rx: placement(r.object("rx")),
        tx: placement(r.object("tx")),
        datapath: datapathGrant(r.object("datapath")),
      };
    case "stop-queues":
      return { kind, id: r.uint("id", MAX_ID) };
    case "error":
      return errorMessage(r);
    default:
      return unknownKind(kind, id);
  }
}

/** Validates a message the parent received from the device. */
export function parseDeviceMessage(raw: unknown): DeviceMessage {
  const { r, kind, id } = open(raw);
  switch (kind) {
    case "ready":
      return { kind, version: r.uint("version", MAX_ID), features: r.u64("features") };
    case "log":
      return { kind, level: r.oneOf("level", LOG_LEVELS), message: r.text("message") };
    case "tunscap":
      return { kind, id: r.uint("id", MAX_ID), offloads: r.u64("offloads") };
    case "features":
      return { kind, id: r.uint("id", MAX_ID), features: r.u64("features") };
    case "done":
      return { kind, id: r.uint("id", MAX_ID) };
    case "stats":
      return { kind, id: r.uint("id", MAX_ID), queues: r.counters("queues") };
    case "memory-returned":
      return {
        kind,
        id: r.uint("id", MAX_ID),
        buffers: r.buffers("buffers", MAX_GRANT_REGIONS),
      };
    case "queue-bases":
      return { kind, id: r.uint("id", MAX_ID), rx: r.uint("rx", 0xffff), tx: r.uint("tx", 0xffff) };
    case "queue-fault":
      return { kind, queue: r.int("queue", -1, 1), reason: r.text("reason") };
    case "permissions": {
      const states = r.object("states");
      return {
        kind,
        id: r.uint("id", MAX_ID),
        states: Object.fromEntries(
          PERMISSION_NAMES.map((n) => [n, states.oneOf(n, PERMISSION_STATES)]),
        ) as PermissionsReply["states"],
      };
    }
    case "error":
      return errorMessage(r);
    default:
      return unknownKind(kind, id);
  }
}
