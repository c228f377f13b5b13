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
  RegionRef,
} from "./protocol.ts";
import { MAX_IO_END_WAIT_MS, PERMISSION_NAMES } from "./protocol.ts";
import { describe, isRecord, Reader, ValidationError } from "./reader.ts";

export { ValidationError } from "./reader.ts";

const LOG_LEVELS: readonly LogLevel[] = ["error", "warn", "info", "debug"];
const ERROR_CODES: readonly ErrorCode[] = [
  "malformed",
  "unknown-kind",
  "version",
  "refused",
  "failed",
];
const PERMISSION_STATES = ["granted", "prompt", "denied"] as const;

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

/** A region as a grant and a revocation name it. */
function regionRef(r: Reader): RegionRef {
  return {
    guestPhysAddr: r.address("guestPhysAddr"),
    size: r.address("size"),
    userAddr: r.address("userAddr"),
  };
}

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
  const mac = r.bytesOrNull("mac", 6);
  // IEEE 802: a source address is an individual one (I/G bit clear), and never all zeros.
  if (mac !== null && ((mac[0] & 1) !== 0 || mac.every((b) => b === 0))) {
    throw new ValidationError(
      "malformed",
      "config.mac",
      `config.mac must be a unicast address, got ${mac.join(",")}`,
    );
  }
  return {
    mac,
    mtu: r.int("mtu", 68, 65535),
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
          ...regionRef(g),
          hostAddr: g.address("hostAddr"),
          buffer: g.arrayBuffer("buffer"),
        })),
      };
    case "revoke-memory":
      return {
        kind,
        id: r.uint("id", MAX_ID),
        regions: r.list("regions", MAX_GRANT_REGIONS, regionRef),
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
      return {
        kind,
        id: r.uint("id", MAX_ID),
        ioEndWaitMs: r.uint("ioEndWaitMs", MAX_IO_END_WAIT_MS),
        quiesce: r.boolean("quiesce"),
      };
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
