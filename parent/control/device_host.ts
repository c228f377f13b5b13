/**
 * Starts the device worker with no permissions at all and speaks the parent's
 * side of the control protocol with it. The device's requests (TUNSCAP first)
 * are served by handlers the daemon supplies; each may refuse.
 *
 * @module
 */

import { Endpoint, IpcError, type MessagePortLike, RefusedError } from "../../ipc/endpoint.ts";
import { CTL, CTL_BYTES, signal } from "../../ipc/datapath.ts";
import {
  type DatapathGrant,
  type DeviceConfig,
  type DeviceMessage,
  type DoneReply,
  type FeaturesReply,
  type MemoryReturnedReply,
  type ParentMessage,
  type PermissionsReply,
  PROTOCOL_VERSION,
  type QueueBasesReply,
  type QueuePlacement,
  type ReadyMessage,
  type RegionGrant,
  type RegionRef,
  REPLY_KIND,
  type StatsReply,
} from "../../ipc/protocol.ts";
import { parseDeviceMessage } from "../../ipc/validate.ts";
import type { Logger } from "./log.ts";
import { workerCensus } from "./worker_census.ts";

/** The module the device worker runs. */
export const DEVICE_WORKER_URL = new URL("../../device/worker.ts", import.meta.url);

/**
 * The device worker's Worker options: the only place they are written, so the
 * permission audit prints exactly what the code uses.
 */
export const DEVICE_WORKER_OPTIONS = {
  type: "module",
  name: "vionet-device",
  deno: { permissions: "none" },
} as const satisfies WorkerOptions;

/** What the parent does for the device when it asks. */
export interface DeviceRequestHandlers {
  /** Applies TUNSCAP; returns the offloads in force, or throws RefusedError. */
  tunscap(offloads: bigint): bigint;
}

export interface DeviceHostOptions {
  config: DeviceConfig;
  handlers: DeviceRequestHandlers;
  logger: Logger;
  /** A queue needs a reset (queue -1: the data path as a whole). */
  onQueueFault?: (queue: number, reason: string) => void;
  /** Called once if the worker dies (an uncaught error in it). May be set later through `onDeath`. */
  onDeath?: (reason: string) => void;
  /** Milliseconds the device has to answer a request (default 5000). */
  timeoutMs?: number;
  /** Another module to run as the device: for tests only. */
  workerUrl?: URL;
  /** How its log lines are tagged (default "device"; "device 1" for queue pair 1's). */
  label?: string;
}

/** A stop in flight (`DeviceHost.beginStop`). */
export interface DeviceStop {
  /** The device's reply: each queue's last_avail_idx. */
  reply: Promise<{ rx: number; tx: number }>;
  /** Blocks until the device published the bases in the control block, or `deadline`; null then. */
  published(deadline: number): { rx: number; tx: number } | null;
}

/** The running device worker, seen from the parent. */
export class DeviceHost {
  /** Feature bits the device offered in `ready`. */
  offered = 0n;
  /** Called once if the worker dies; overrides the option of the same name. */
  onDeath?: (reason: string) => void;
  readonly #worker: Worker;
  readonly #ep: Endpoint<DeviceMessage, ParentMessage>;
  #dead = false;
  /**
   * The running data path's control block, between start-queues and
   * stop-queues: every message posted then is counted in CTL.DEVICE_MAIL and
   * rings the device's doorbell, because the device loop blocks in
   * Atomics.wait and runs its event loop only when told (`device/mailbox.ts`).
   */
  #mailCtl: Int32Array | null = null;

  private constructor(private readonly opts: DeviceHostOptions) {
    this.#worker = workerCensus.start(
      opts.workerUrl ?? DEVICE_WORKER_URL,
      DEVICE_WORKER_OPTIONS,
      "device",
    );
    const worker = this.#worker;
    const port: MessagePortLike = {
      postMessage: (message: unknown, transfer?: Transferable[]) => this.#post(message, transfer),
      get onmessage() {
        return worker.onmessage as MessagePortLike["onmessage"];
      },
      set onmessage(handler: MessagePortLike["onmessage"]) {
        worker.onmessage = handler;
      },
    };
    this.#ep = new Endpoint<DeviceMessage, ParentMessage>(port, {
      parse: parseDeviceMessage,
      requestKinds: new Set(["tunscap"]),
      replyKinds: new Set([
        "features",
        "done",
        "stats",
        "permissions",
        "memory-returned",
        "queue-bases",
      ]),
      onRequest: (req) => Promise.resolve(this.serve(req)),
      onNotice: (msg) => this.notice(msg),
      onProblem: (text) => opts.logger.log("warn", "parent", `device channel: ${text}`),
      timeoutMs: opts.timeoutMs ?? 5000,
    });
    this.#worker.onerror = (e) => {
      e.preventDefault();
      this.die(`device worker failed: ${e.message}`);
    };
  }

  /** Starts the worker and completes the version handshake. */
  static async start(opts: DeviceHostOptions): Promise<DeviceHost> {
    const host = new DeviceHost(opts);
    try {
      const ready = await host.handshake(opts.config, opts.timeoutMs ?? 5000);
      host.offered = ready.features;
      return host;
    } catch (e) {
      host.terminate();
      throw e;
    }
  }

  private readyWaiter?: { resolve: (m: ReadyMessage) => void; reject: (e: Error) => void };

  private handshake(config: DeviceConfig, timeoutMs: number): Promise<ReadyMessage> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new IpcError("failed", undefined, `device did not answer hello in ${timeoutMs} ms`),
          ),
        timeoutMs,
      );
      this.readyWaiter = {
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
      this.#ep.send({ kind: "hello", version: PROTOCOL_VERSION, config });
    });
  }

  private notice(msg: DeviceMessage): void {
    switch (msg.kind) {
      case "ready":
        if (msg.version !== PROTOCOL_VERSION) {
          this.readyWaiter?.reject(
            new IpcError(
              "version",
              "version",
              `device speaks version ${msg.version}, parent ${PROTOCOL_VERSION}`,
            ),
          );
        } else {
          this.readyWaiter?.resolve(msg);
        }
        this.readyWaiter = undefined;
        return;
      case "log":
        this.opts.logger.log(msg.level, this.opts.label ?? "device", msg.message);
        return;
      case "queue-fault":
        this.opts.onQueueFault?.(msg.queue, msg.reason);
        return;
      default:
        this.opts.logger.log("warn", "parent", `device sent ${msg.kind} unasked; ignored`);
    }
  }

  /** Serves one device request. Anything thrown becomes a typed error reply. */
  private serve(req: DeviceMessage) {
    switch (req.kind) {
      case "tunscap":
        return {
          reply: { kind: REPLY_KIND.tunscap, inForce: this.opts.handlers.tunscap(req.offloads) },
        };
      default:
        throw new RefusedError(`${req.kind} is not a request the parent serves`, "kind");
    }
  }

  /** The device's offered features. */
  async getFeatures(): Promise<bigint> {
    return (await this.#ep.request<FeaturesReply>({ kind: "get-features" }, "features")).features;
  }

  /** Tells the device what the driver acknowledged; resolves once TUNSCAP is applied. */
  async setFeatures(features: bigint): Promise<void> {
    await this.#ep.request<DoneReply>(
      { kind: "set-features", features },
      REPLY_KIND["set-features"],
    );
  }

  /** Resets the device to its state after hello. */
  async reset(): Promise<void> {
    await this.#ep.request<DoneReply>({ kind: "reset" }, REPLY_KIND.reset);
  }

  /** The device's counters per queue. */
  async getStats(): Promise<StatsReply["queues"]> {
    return (await this.#ep.request<StatsReply>({ kind: "get-stats" }, "stats")).queues;
  }

  /** The device's own view of its Deno permissions, queried inside the worker. */
  async getPermissions(): Promise<PermissionsReply["states"]> {
    return (await this.#ep.request<PermissionsReply>({ kind: "get-permissions" }, "permissions"))
      .states;
  }

  /**
   * Grants guest memory. The buffers are transferred: the parent keeps no
   * view of them until `revokeMemory` gives them back.
   */
  async grantMemory(regions: RegionGrant[]): Promise<void> {
    await this.#ep.request<DoneReply>(
      { kind: "grant-memory", regions },
      "done",
      regions.map((r) => r.buffer),
    );
  }

  /**
   * Asks for `regions` back; resolves with the buffers the device returned,
   * which the caller must check (`memory_return.ts`): the device may lie.
   */
  async revokeMemory(regions: RegionRef[]): Promise<ArrayBuffer[]> {
    const reply = await this.#ep.request<MemoryReturnedReply>(
      { kind: "revoke-memory", regions },
      "memory-returned",
    );
    return reply.buffers;
  }

  /** Places both queues on fresh data-path rings and starts them. */
  async startQueues(
    rx: QueuePlacement,
    tx: QueuePlacement,
    datapath: DatapathGrant,
  ): Promise<void> {
    const started = this.#ep.request<DoneReply>(
      { kind: "start-queues", rx, tx, datapath },
      "done",
    );
    // Posted (synchronously, above): count from the next message on, as the device does.
    this.#mailCtl = datapath.control instanceof SharedArrayBuffer &&
        datapath.control.byteLength >= CTL_BYTES
      ? new Int32Array(datapath.control, 0, CTL_BYTES / 4)
      : null;
    try {
      await started;
    } catch (e) {
      this.#mailCtl = null;
      throw e;
    }
  }

  /**
   * Stops both queues; resolves with each queue's last_avail_idx.
   * `ioEndWaitMs` above 0: the I/O workers are being ended meanwhile and
   * the device waits for them that long (`StopQueuesRequest`); if it
   * rejects, the queues are half stopped and need this again with 0.
   * `quiesce`: the device quiesces first (the writer runs until it has).
   */
  async stopQueues(ioEndWaitMs = 0, quiesce = false): Promise<{ rx: number; tx: number }> {
    const ctl = this.#mailCtl;
    try {
      const r = await this.#ep.request<QueueBasesReply>(
        { kind: "stop-queues", ioEndWaitMs, quiesce },
        "queue-bases",
      );
      return { rx: r.rx, tx: r.tx };
    } finally {
      // A reply read after the control block said the same (`beginStop`)
      // may come after the next start: its count is not this stop's.
      if (this.#mailCtl === ctl) this.#mailCtl = null;
    }
  }

  /**
   * The overlapped stop (`stopQueues(ioEndWaitMs, true)`, `ioEndWaitMs` above 0),
   * asked in the control block as well (CTL.STOP_ASKED), so that the device's
   * loop starts it as soon as it wakes. `reply` settles as `stopQueues` would.
   * `published(deadline)` blocks the calling thread until the device says in
   * the control block that it stopped (CTL.STOPPED), or until `deadline`
   * (performance.now()); it returns the bases it put there, or null.
   *
   * Those words are the device's, as its reply would be: a device can write
   * them at any time. They say nothing about the I/O workers; the caller
   * waits for those in their own mailboxes first (`DatapathHost.loopsEndedBy`).
   */
  beginStop(ioEndWaitMs: number): DeviceStop {
    const ctl = this.#mailCtl;
    if (ctl !== null) {
      Atomics.store(ctl, CTL.STOPPED, 0);
      Atomics.store(ctl, CTL.STOP_ASKED, ioEndWaitMs);
    }
    const reply = this.stopQueues(ioEndWaitMs, true);
    const published = (deadline: number): { rx: number; tx: number } | null => {
      if (ctl === null) return null;
      for (;;) {
        const seen = Atomics.load(ctl, CTL.STOPPED);
        if (seen === 1) break;
        const left = deadline - performance.now();
        if (left <= 0) return null;
        Atomics.wait(ctl, CTL.STOPPED, seen, left);
      }
      // Any 32 bits are two valid indices: nothing else to check.
      const bases = Atomics.load(ctl, CTL.STOP_BASES);
      if (this.#mailCtl === ctl) this.#mailCtl = null;
      return { rx: bases & 0xffff, tx: (bases >>> 16) & 0xffff };
    };
    return { reply, published };
  }

  /** Sends a raw message, bypassing the types: tests use it to feed the device bad input. */
  sendRaw(msg: unknown): void {
    this.#post(msg);
  }

  /** Every message to the worker goes here: counted and rung while the queues run. */
  #post(message: unknown, transfer?: Transferable[]): void {
    // Counted only once posted: a postMessage that throws (a detached buffer)
    // must not leave the device waiting for a message that never comes. The
    // device may see the message a moment before the count; it waits for the
    // two to agree either way.
    this.#worker.postMessage(message, transfer ?? []);
    const ctl = this.#mailCtl;
    if (ctl !== null) {
      Atomics.add(ctl, CTL.DEVICE_MAIL, 1);
      signal(ctl, CTL.DEVICE_EVENTS, 0, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
    }
  }

  get alive(): boolean {
    return !this.#dead;
  }

  private die(reason: string): void {
    if (this.#dead) return;
    this.opts.logger.log("error", "parent", reason);
    this.terminate();
    this.readyWaiter?.reject(new IpcError("failed", undefined, reason));
    (this.onDeath ?? this.opts.onDeath)?.(reason);
  }

  /**
   * Ends a worker that can no longer be trusted (it kept guest memory it was
   * asked to give back): logged, terminated, and `onDeath` runs as for a
   * worker that died, so the daemon starts a new one. No-op once dead.
   */
  fail(reason: string): void {
    this.die(reason);
  }

  /** Stops the worker; pending requests fail. */
  terminate(): void {
    this.#dead = true;
    this.#ep.close("device worker terminated");
    this.#worker.terminate();
    workerCensus.end(this.#worker);
  }
}
