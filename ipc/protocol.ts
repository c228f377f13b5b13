/**
 * The control protocol between the privileged parent and the zero-permission
 * device worker. One file: every message kind either side may send.
 *
 * Theory of operation:
 * - Messages travel over the Worker's `postMessage` (structured clone), so
 *   64-bit feature words are `bigint` and guest memory travels as transferred
 *   `ArrayBuffer`s.
 * - The parent opens with `hello` (protocol version and configuration); the
 *   device answers `ready` or an `error` with code `version` and stops.
 * - Either side may send a *request* carrying a numeric `id`; the other side
 *   answers with exactly one reply of the matching kind or an `error` carrying
 *   the same `id`. Ids are per sender, so each side keeps its own counter.
 * - Each side treats the other's messages as untrusted: `ipc/validate.ts`
 *   checks every field, and a malformed or unknown message is answered with an
 *   `error` naming the field, after which the receiver keeps running.
 *
 * The data path does not use these messages: frames and doorbells go through
 * the shared-memory rings of `ipc/spsc_ring.ts`.
 *
 * @module
 */

import type { DatapathBuffers } from "./datapath.ts";

/** Bumped on any incompatible change of a message below. */
export const PROTOCOL_VERSION = 3;

/** How the tap's offloads are used; see the `--offload` option. */
export type OffloadMode = "auto" | "off";

/** Severity of a `log` notice from the device. */
export type LogLevel = "error" | "warn" | "info" | "debug";

/** Everything the device is told at start. */
export interface DeviceConfig {
  /**
   * The only Ethernet source address the guest may send from (`--mac`, a
   * unicast address): the TX path drops and counts every other frame
   * (`drop_SPOOFED_MAC`). Null: not enforced.
   */
  mac: number[] | null;
  /**
   * The tap's MTU (68..65535): the TX path drops a frame without GSO that is
   * longer than the MTU plus an Ethernet header and two VLAN tags
   * (`drop_OVER_MTU`); 65535 when the tap's MTU is unknown.
   */
  mtu: number;
  /** `off`: TUNSCAP asks for nothing and the device does all offload work itself. */
  offloadMode: OffloadMode;
  /** Messages at or above this level are sent as `log` notices. */
  logLevel: LogLevel;
}

/** Why a message was refused or failed. */
export type ErrorCode =
  /** A field is missing, of the wrong type, or out of range. */
  | "malformed"
  /** The `kind` is not one this receiver knows. */
  | "unknown-kind"
  /** The peer speaks another protocol version. */
  | "version"
  /** Well formed, but not allowed (outside a policy mask, wrong state). */
  | "refused"
  /** Valid and allowed, but carrying it out failed (a syscall error). */
  | "failed";

/** The answer to any request that failed, or to a message that was bad. */
export interface ErrorMessage {
  kind: "error";
  /** The request answered, or null when the bad message had no usable id. */
  id: number | null;
  code: ErrorCode;
  /** The offending field as a path (`offloads`, `config.mac[3]`), if any. */
  field?: string;
  message: string;
}

// ---------------------------------------------------------------------------
// Parent → device

/** First message; starts the device. */
export interface HelloMessage {
  kind: "hello";
  version: number;
  config: DeviceConfig;
}

/** Request: the virtio feature bits the device offers. Reply: `features`. */
export interface GetFeaturesRequest {
  kind: "get-features";
  id: number;
}

/**
 * Request: the driver acknowledged these features. The device checks them
 * against its offer and the spec's dependency rules, then asks TUNSCAP.
 * Reply: `done`, once the tap's offloads match.
 */
export interface SetFeaturesRequest {
  kind: "set-features";
  id: number;
  features: bigint;
}

/** Request: back to the state after `hello` (vhost-user RESET_OWNER/RESET_DEVICE). Reply: `done`. */
export interface ResetRequest {
  kind: "reset";
  id: number;
}

/** Request: the device's counters. Reply: `stats`. */
export interface GetStatsRequest {
  kind: "get-stats";
  id: number;
}

/** Request: the Deno permission state of each kind, as queried inside the device. Reply: `permissions`. */
export interface GetPermissionsRequest {
  kind: "get-permissions";
  id: number;
}

/** One region of guest memory granted to the device. */
export interface RegionGrant {
  /** Guest physical address of its first byte. */
  guestPhysAddr: number;
  size: number;
  /** The VMM's virtual address of its first byte (vhost-user ring addresses use these). */
  userAddr: number;
  /** Where the parent mapped it: the I/O workers check every iovec against these mappings. */
  hostAddr: number;
  /** The mapping itself, transferred: the parent keeps no view of it while the device holds it. */
  buffer: ArrayBuffer;
}

/**
 * Request: grant these regions (transferred). Reply: `done`. The device must
 * give them back (`revoke-memory`) before the parent unmaps them.
 */
export interface GrantMemoryRequest {
  kind: "grant-memory";
  id: number;
  regions: RegionGrant[];
}

/** Names one granted region, as its grant did. */
export interface RegionRef {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
}

/**
 * Request: hand back these regions. The queues must be stopped. Reply:
 * `memory-returned` with their buffers, transferred, in the order asked. The
 * parent accepts a region as returned only if its buffer is the very one it
 * lent (same backing address and length, transferred, so detached on the
 * device's side); anything else ends the device.
 */
export interface RevokeMemoryRequest {
  kind: "revoke-memory";
  id: number;
  regions: RegionRef[];
}

/** Where one virtqueue's rings are, and where to resume (vhost-user SET_VRING_*). */
export interface QueuePlacement {
  size: number;
  desc: number;
  avail: number;
  used: number;
  base: number;
}

/** The shared memory of the data path (`ipc/datapath.ts`), as the device gets it. */
export interface DatapathGrant extends DatapathBuffers {
  /** Host address of the bounce arena's first byte, for iovecs. */
  bounceHost: number;
}

/** Request: place both queues on fresh data-path rings and run. Reply: `done`. */
export interface StartQueuesRequest {
  kind: "start-queues";
  id: number;
  rx: QueuePlacement;
  tx: QueuePlacement;
  datapath: DatapathGrant;
}

/**
 * Request: stop both queues. Reply: `queue-bases` with each queue's
 * last_avail_idx (GET_VRING_BASE).
 *
 * `ioEndWaitMs` 0: the parent has ended its I/O workers. More: it is ending
 * them meanwhile; the device stops its loop, waits up to that long for both
 * to say their loops ended (CTL.IO_ENDED), then finishes. If they have not,
 * it answers an error and stays half stopped; the parent asks again with 0
 * once the workers are gone.
 */
export interface StopQueuesRequest {
  kind: "stop-queues";
  id: number;
  ioEndWaitMs: number;
  /**
   * Quiesce first: finish what is in flight and take nothing new (no more
   * chains popped, no more RX buffers posted, every TX frame already taken
   * written by the writer, or the device's own bound passed), then say so to
   * the writer (CTL.TX_CLOSED), which the parent told to run until then:
   * the whole stop in one request (a migration's switch-over).
   */
  quiesce: boolean;
}

/** Longest `ioEndWaitMs` a `stop-queues` may carry (ms). */
export const MAX_IO_END_WAIT_MS = 10_000;

/** Reply to a device's `tunscap`: the guest offload bits now in force on the tap. */
export interface TunscapReply {
  kind: "tunscap-result";
  id: number;
  /** Subset of the requested GUEST_* bits that the tap now delivers. */
  inForce: bigint;
}

export type ParentRequest =
  | GetFeaturesRequest
  | SetFeaturesRequest
  | ResetRequest
  | GetStatsRequest
  | GetPermissionsRequest
  | GrantMemoryRequest
  | RevokeMemoryRequest
  | StartQueuesRequest
  | StopQueuesRequest;

export type ParentMessage = HelloMessage | ParentRequest | TunscapReply | ErrorMessage;

// ---------------------------------------------------------------------------
// Device → parent

/** The device accepted `hello`. */
export interface ReadyMessage {
  kind: "ready";
  version: number;
  /** The feature bits the device offers, as `get-features` would answer. */
  features: bigint;
}

/** A line for the parent's log. */
export interface LogMessage {
  kind: "log";
  level: LogLevel;
  message: string;
}

/**
 * Request (the TUNSCAP of OpenBSD's tun(4)): make the tap deliver frames with
 * exactly these guest receive offloads (a subset of GUEST_OFFLOAD_FEATURES).
 * Reply: `tunscap-result`, or `error` with code `refused` and nothing changed.
 */
export interface TunscapRequest {
  kind: "tunscap";
  id: number;
  offloads: bigint;
}

/** Reply to `get-features`. */
export interface FeaturesReply {
  kind: "features";
  id: number;
  features: bigint;
}

/** Reply to a request that has no value. */
export interface DoneReply {
  kind: "done";
  id: number;
}

/** Reply to `get-stats`: counter name to value, per queue. */
export interface StatsReply {
  kind: "stats";
  id: number;
  queues: Record<string, Record<string, number>>;
}

/** The Deno permission names the audit covers. */
export const PERMISSION_NAMES = [
  "read",
  "write",
  "net",
  "env",
  "run",
  "ffi",
  "sys",
  "import",
] as const;
export type PermissionName = typeof PERMISSION_NAMES[number];

/** Reply to `get-permissions`: `granted`, `prompt` or `denied` per permission. */
export interface PermissionsReply {
  kind: "permissions";
  id: number;
  states: Record<PermissionName, "granted" | "prompt" | "denied">;
}

/** Reply to `revoke-memory`: the buffers, transferred back, in the order asked. */
export interface MemoryReturnedReply {
  kind: "memory-returned";
  id: number;
  buffers: ArrayBuffer[];
}

/** Reply to `stop-queues`. */
export interface QueueBasesReply {
  kind: "queue-bases";
  id: number;
  rx: number;
  tx: number;
}

/**
 * Notice: a queue needs a reset (a corrupt ring, or the I/O side misbehaved;
 * queue -1: not tied to one queue). The parent signals the VMM (the vring's
 * error eventfd) and logs it.
 */
export interface QueueFaultMessage {
  kind: "queue-fault";
  queue: number;
  reason: string;
}

export type DeviceRequest = TunscapRequest;

export type DeviceMessage =
  | ReadyMessage
  | LogMessage
  | DeviceRequest
  | FeaturesReply
  | DoneReply
  | StatsReply
  | PermissionsReply
  | MemoryReturnedReply
  | QueueBasesReply
  | QueueFaultMessage
  | ErrorMessage;

/** The reply kind each request expects, so a requester can check what came back. */
export const REPLY_KIND = {
  "get-features": "features",
  "set-features": "done",
  "reset": "done",
  "get-stats": "stats",
  "get-permissions": "permissions",
  "grant-memory": "done",
  "revoke-memory": "memory-returned",
  "start-queues": "done",
  "stop-queues": "queue-bases",
  "tunscap": "tunscap-result",
} as const satisfies Record<ParentRequest["kind"] | DeviceRequest["kind"], string>;
