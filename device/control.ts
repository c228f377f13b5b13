/**
 * The device's control plane: the `hello` handshake, feature negotiation and
 * the TUNSCAP request that keeps the tap's offloads in step with the driver.
 * It holds no authority: everything outside the worker is a request to the
 * parent, which may refuse it.
 *
 * @module
 */

import { Endpoint, type MessagePortLike, RefusedError, type WithoutId } from "../ipc/endpoint.ts";
import {
  type DeviceConfig,
  type DeviceMessage,
  type LogLevel,
  type ParentMessage,
  PERMISSION_NAMES,
  type PermissionsReply,
  PROTOCOL_VERSION,
  REPLY_KIND,
  type TunscapReply,
} from "../ipc/protocol.ts";
import { parseParentMessage } from "../ipc/validate.ts";
import { featureNames } from "../ipc/features.ts";
import { checkDriverFeatures, DEVICE_FEATURES, wantedTapOffloads } from "./negotiation.ts";
import { NetDevice } from "./net_device.ts";
import type { DeviceMailbox } from "./mailbox.ts";

const LEVELS: Record<LogLevel, number> = { error: 0, warn: 1, info: 2, debug: 3 };

/** Device state as negotiated with the driver and the parent. */
export interface ControlState {
  config: DeviceConfig | null;
  /** Features the driver acknowledged (0 until SET_FEATURES). */
  acked: bigint;
  /** GUEST_* offloads the tap delivers, as the parent last answered TUNSCAP. */
  tapOffloads: bigint;
}

/** Runs the device's side of the control channel on `port` (the worker's global scope). */
export class DeviceControl {
  readonly state: ControlState = { config: null, acked: 0n, tapOffloads: 0n };
  readonly device: NetDevice;
  readonly #ep: Endpoint<ParentMessage, DeviceMessage>;

  /**
   * `mailbox` counts the messages `port` delivers (`mailbox.ts`); with it the
   * device loop blocks in Atomics.wait. Without it (in-thread tests) it
   * sleeps with Atomics.waitAsync.
   */
  constructor(port: MessagePortLike, mailbox?: DeviceMailbox) {
    this.device = new NetDevice((queue, reason) => this.#queueFault(queue, reason), mailbox);
    this.#ep = new Endpoint<ParentMessage, DeviceMessage>(port, {
      parse: parseParentMessage,
      requestKinds: new Set([
        "get-features",
        "set-features",
        "reset",
        "get-stats",
        "get-permissions",
        "grant-memory",
        "revoke-memory",
        "start-queues",
        "stop-queues",
      ]),
      replyKinds: new Set(["tunscap-result"]),
      onRequest: (req) => this.serve(req),
      onNotice: (msg) => this.notice(msg),
      onProblem: (text) => this.log("warn", text),
      timeoutMs: 10_000,
    });
  }

  log(level: LogLevel, message: string): void {
    const threshold = LEVELS[this.state.config?.logLevel ?? "info"];
    if (LEVELS[level] <= threshold) this.#ep.send({ kind: "log", level, message });
  }

  private notice(msg: ParentMessage): void {
    if (msg.kind !== "hello") {
      this.log("warn", `ignored ${msg.kind}: not expected here`);
      return;
    }
    if (msg.version !== PROTOCOL_VERSION) {
      this.#ep.send({
        kind: "error",
        id: null,
        code: "version",
        field: "version",
        message: `device speaks protocol version ${PROTOCOL_VERSION}, parent sent ${msg.version}`,
      });
      return;
    }
    if (this.state.config !== null) {
      this.log("warn", "ignored a second hello");
      return;
    }
    this.state.config = msg.config;
    this.device.configure(msg.config);
    this.#ep.send({ kind: "ready", version: PROTOCOL_VERSION, features: DEVICE_FEATURES });
  }

  private async serve(
    req: ParentMessage,
  ): Promise<{ reply: WithoutId<DeviceMessage>; transfer?: Transferable[] }> {
    if (this.state.config === null) throw new RefusedError(`${req.kind} before hello`, "kind");
    switch (req.kind) {
      case "get-features":
        return { reply: { kind: REPLY_KIND["get-features"], features: DEVICE_FEATURES } };
      case "set-features": {
        const problem = checkDriverFeatures(req.features);
        if (problem) throw new RefusedError(problem, "features");
        this.state.acked = req.features;
        this.device.setFeatures(req.features, this.state.config.offloadMode);
        // The answer does not wait for the parent's: the parent applies a
        // request before it reads our next message (its handler is
        // synchronous), so the tap's offloads are in force when "done"
        // arrives, two thread hops sooner (a migration's destination waits
        // for this message with its VM running). A refusal, which leaves the
        // tap as it was, is reported as a fault of the data path.
        const offloads = wantedTapOffloads(req.features, this.state.config.offloadMode);
        this.tunscap(offloads).catch((e) =>
          this.#queueFault(
            -1,
            `TUNSCAP ${featureNames(offloads).join(" ") || "none"}: ${e.message}`,
          )
        );
        this.log("info", `negotiated ${featureNames(req.features).join(" ")}`);
        return { reply: { kind: "done" } };
      }
      case "reset":
        await this.device.reset();
        this.state.acked = 0n;
        await this.tunscap(0n);
        return { reply: { kind: "done" } };
      case "get-stats":
        return { reply: { kind: "stats", queues: this.device.counters() } };
      case "grant-memory":
        this.#guard(() => this.device.grant(req.regions), "regions");
        return { reply: { kind: "done" } };
      case "revoke-memory": {
        const buffers = this.#guard(
          () => this.device.revoke(req.regions),
          "regions",
        );
        return { reply: { kind: "memory-returned", buffers }, transfer: buffers };
      }
      case "start-queues":
        this.#guard(
          () => this.device.start(req.rx, req.tx, req.datapath, req.datapath.bounceHost),
          "rx",
        );
        return { reply: { kind: "done" } };
      case "stop-queues": {
        const bases = await this.device.stop(req.ioEndWaitMs, req.quiesce);
        return { reply: { kind: "queue-bases", rx: bases.rx, tx: bases.tx } };
      }
      case "get-permissions": {
        const states = {} as PermissionsReply["states"];
        for (const name of PERMISSION_NAMES) {
          states[name] = (await Deno.permissions.query({ name })).state;
        }
        return { reply: { kind: "permissions", states } };
      }
      default:
        throw new RefusedError(`${req.kind} is not a request`, "kind");
    }
  }

  /** Runs `fn`; a RangeError/TypeError (bad input from the parent) becomes a refusal. */
  #guard<T>(fn: () => T, field: string): T {
    try {
      return fn();
    } catch (e) {
      if (
        e instanceof RangeError || e instanceof TypeError ||
        (e as Error).name === "CorruptRingError" || (e as Error).name === "DatapathSetupError"
      ) {
        throw new RefusedError((e as Error).message, field);
      }
      throw e;
    }
  }

  #queueFault(queue: number, reason: string): void {
    this.log(
      "error",
      `queue ${queue < 0 ? "(I/O)" : queue === 0 ? "rx0" : "tx0"} needs reset: ${reason}`,
    );
    this.#ep.send({ kind: "queue-fault", queue, reason: reason.slice(0, 1000) });
  }

  /**
   * Asks the parent for exactly these tap offloads and records what it put in
   * force. On refusal the tap is unchanged, and so is our record of it.
   */
  async tunscap(offloads: bigint): Promise<bigint> {
    const reply = await this.#ep.request<TunscapReply>(
      { kind: "tunscap", offloads },
      REPLY_KIND.tunscap,
    );
    if ((reply.inForce & ~offloads) !== 0n) {
      // The parent may grant less than asked, never more.
      throw new RefusedError(
        `parent put offloads in force that were not asked for: ${
          featureNames(reply.inForce & ~offloads)
        }`,
      );
    }
    this.state.tapOffloads = reply.inForce;
    return reply.inForce;
  }
}
