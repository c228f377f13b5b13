/**
 * The vhost-user backend's view of the device: turns the front-end's ring
 * and memory requests into requests to the zero-permission device worker and
 * to the privileged I/O workers, in the order that keeps guest memory safe.
 *
 * Theory of operation
 * - Memory: each mapped region is granted to the device as an ArrayBuffer
 *   over the mapping (transferred). Before anything is unmapped, the queues
 *   are stopped (I/O workers first: no system call can be in flight on guest
 *   memory), the device hands the buffers back, and only then do we return to
 *   the backend, which unmaps.
 * - Rings: vhost-user configures each ring separately; the device runs both
 *   together. They run once both rings have a kick and are enabled (with
 *   PROTOCOL_FEATURES, rings start disabled until SET_VRING_ENABLE), memory is
 *   granted and the ring addresses are known. Each start gets fresh data-path
 *   rings and fresh I/O workers, so no stale record survives a stop.
 * - GET_VRING_BASE stops both queues (the I/O workers first), and answers
 *   with the index the device reports; the other ring's index is kept for its
 *   own GET_VRING_BASE or the next start.
 *
 * @module
 */

import { RX_QUEUE, TX_QUEUE } from "../ipc/datapath.ts";
import type { QueuePlacement } from "../ipc/protocol.ts";
import { createDatapathBuffers, DatapathHost, rxUsedPlace, txUsedPlace } from "./datapath_host.ts";
import type { DeviceHost } from "./device_host.ts";
import type { MappedRegion } from "./guest_memory_map.ts";
import * as libc from "./libc.ts";
import type { Logger } from "./log.ts";
import type { IoUringMode } from "./io_protocol.ts";
import type { DevicePort, VringAddrFields } from "./vhost_user_backend.ts";

interface RingConfig {
  num: number;
  addr: VringAddrFields | null;
  base: number;
  kickFd: number | null;
  /** SET_VRING_KICK arrived (the ring is started, in vhost-user terms). */
  started: boolean;
  callFd: number | null;
  enabled: boolean;
}

function freshRing(): RingConfig {
  return {
    num: 0,
    addr: null,
    base: 0,
    kickFd: null,
    started: false,
    callFd: null,
    enabled: false,
  };
}

/** A bigint from the front-end that must fit a JS number exactly. */
function num(v: bigint, what: string): number {
  if (v < 0n || v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new RangeError(`${what} 0x${v.toString(16)} is beyond 2^53`);
  }
  return Number(v);
}

export interface DevicePortOptions {
  device: DeviceHost;
  tapFd: number;
  logger: Logger;
  /** `--io-uring`: whether the I/O workers may batch through io_uring (default "auto"). */
  ioUring?: IoUringMode;
  /**
   * The longest frame a tap read can return now, vnet header included
   * (`Tap.readRoom()`); asked at each start of the queues and after
   * {@link VionetDevicePort.tapOffloadsChanged}. Default: the largest.
   */
  tapReadRoom?: () => number;
}

/** DevicePort over the device worker and the I/O workers. */
export class VionetDevicePort implements DevicePort {
  #device: DeviceHost;
  #ioUring: IoUringMode;
  readonly #tapFd: number;
  readonly #logger: Logger;
  readonly #rings: [RingConfig, RingConfig] = [freshRing(), freshRing()];
  #regions: MappedRegion[] = [];
  #featuresSet = false;
  /** The driver's acknowledged features (EVENT_IDX decides how the writer reads the TX ring). */
  #features = 0n;
  #datapath: DatapathHost | null = null;
  readonly #tapReadRoom: (() => number) | undefined;

  constructor(opts: DevicePortOptions) {
    this.#device = opts.device;
    this.#tapFd = opts.tapFd;
    this.#logger = opts.logger;
    this.#ioUring = opts.ioUring ?? "auto";
    this.#tapReadRoom = opts.tapReadRoom;
  }

  /**
   * The tap's offloads changed (TUNSCAP): the poller learns how long its
   * frames can be now. Not awaited: a GSO frame that arrives before the
   * poller took the message is dropped, and the poller then assumes the
   * largest frames by itself.
   */
  tapOffloadsChanged(): void {
    const dp = this.#datapath;
    if (dp === null || this.#tapReadRoom === undefined) return;
    dp.setRxFrameRoom(this.#tapReadRoom()).catch((e) =>
      this.#logger.log("warn", "datapath", `frame room not updated: ${(e as Error).message}`)
    );
  }

  /** Set by the vhost-user backend while a front-end is connected (DevicePort). */
  vringErrorSink: ((index: number) => void) | null = null;

  /** The device reported that queue `queue` needs a reset (-1: the I/O side, both). */
  queueFault(queue: number): void {
    this.vringErrorSink?.(queue);
  }

  /** True while the queues run. */
  get running(): boolean {
    return this.#datapath !== null;
  }

  /** The data path's counters, while it runs. */
  datapathCounters() {
    return this.#datapath?.counters() ?? null;
  }

  /** Swaps in a new device worker after the old one died (the connection has ended by then). */
  replaceDevice(device: DeviceHost): void {
    this.#device = device;
  }

  #ring(index: number): RingConfig {
    if (index !== RX_QUEUE && index !== TX_QUEUE) {
      throw new RangeError(`vring ${index} does not exist: vionet has one queue pair (0 and 1)`);
    }
    return this.#rings[index];
  }

  getFeatures(): Promise<bigint> {
    return this.#device.getFeatures();
  }

  async setFeatures(features: bigint): Promise<void> {
    await this.#device.setFeatures(features);
    this.#features = features;
    this.#featuresSet = true;
    await this.#maybeStart();
  }

  #debug(text: string): void {
    this.#logger.log("debug", "vhost-user", text);
  }

  async setMemTable(regions: MappedRegion[]): Promise<void> {
    this.#debug(`SET_MEM_TABLE ${regions.map(describe).join(", ") || "(empty)"}`);
    const wasRunning = await this.#stopQueues();
    await this.#device.revokeMemory();
    this.#regions = [];
    if (regions.length > 0) {
      await this.#device.grantMemory(regions.map((r) => this.#grantOf(r)));
      this.#regions = [...regions];
    }
    if (wasRunning) await this.#maybeStart();
  }

  async addMemRegion(region: MappedRegion): Promise<void> {
    this.#debug(`ADD_MEM_REG ${describe(region)}`);
    // The I/O workers learn the new range before the device can point into it.
    const all = [...this.#regions, region];
    await this.#datapath?.setRegions(all.map(hostRange));
    try {
      await this.#device.grantMemory([this.#grantOf(region)]);
    } catch (e) {
      await this.#datapath?.setRegions(this.#regions.map(hostRange));
      throw e;
    }
    this.#regions = all;
  }

  async removeMemRegion(gpa: bigint, size: bigint): Promise<void> {
    this.#debug(`REM_MEM_REG gpa 0x${gpa.toString(16)} size 0x${size.toString(16)}`);
    const i = this.#regions.findIndex((r) => r.guestPhysAddr === gpa && r.size === size);
    if (i < 0) throw new RangeError(`no region at GPA 0x${gpa.toString(16)} of ${size} bytes`);
    const r = this.#regions[i];
    const wasRunning = await this.#stopQueues();
    await this.#device.revokeMemory({
      guestPhysAddr: num(r.guestPhysAddr, "guest address"),
      size: num(r.size, "region size"),
      userAddr: num(r.userAddr, "user address"),
    });
    this.#regions.splice(i, 1);
    if (wasRunning) await this.#maybeStart();
  }

  setVringNum(index: number, n: number): Promise<void> {
    this.#ring(index).num = n;
    return Promise.resolve();
  }

  setVringAddr(index: number, addr: VringAddrFields): Promise<void> {
    this.#ring(index).addr = addr;
    return Promise.resolve();
  }

  setVringBase(index: number, base: number): Promise<void> {
    this.#ring(index).base = base;
    return Promise.resolve();
  }

  async getVringBase(index: number): Promise<number> {
    const ring = this.#ring(index);
    await this.#stopQueues();
    ring.started = false;
    await this.#setKick(index, null);
    return ring.base;
  }

  async setVringKick(index: number, fd: number | null): Promise<void> {
    const ring = this.#ring(index);
    await this.#setKick(index, fd);
    ring.started = true;
    if (fd === null) {
      this.#logger.log(
        "warn",
        "vhost-user",
        `vring ${index} has no kick fd; it is served only on other events`,
      );
    }
    await this.#maybeStart();
  }

  async #setKick(index: number, fd: number | null): Promise<void> {
    const ring = this.#rings[index];
    const old = ring.kickFd;
    ring.kickFd = fd;
    if (this.#datapath) await this.#datapath.setKickFd(index, fd);
    if (old !== null && old !== fd) libc.sys.close(old);
  }

  async setVringCall(index: number, fd: number | null): Promise<void> {
    const ring = this.#ring(index);
    const old = ring.callFd;
    ring.callFd = fd;
    if (this.#datapath) await this.#datapath.setCallFd(index, fd);
    if (old !== null && old !== fd) libc.sys.close(old);
  }

  async setVringEnable(index: number, enabled: boolean): Promise<void> {
    this.#ring(index).enabled = enabled;
    if (enabled) await this.#maybeStart();
    else await this.#stopQueues();
  }

  async reset(): Promise<void> {
    await this.#stopQueues();
    for (const i of [RX_QUEUE, TX_QUEUE]) {
      const r = this.#rings[i];
      if (r.kickFd !== null) libc.sys.close(r.kickFd);
      if (r.callFd !== null) libc.sys.close(r.callFd);
      this.#rings[i] = freshRing();
    }
    this.#featuresSet = false;
    this.#features = 0n;
    await this.#device.reset();
  }

  #grantOf(r: MappedRegion) {
    const size = num(r.size, "region size");
    return {
      guestPhysAddr: num(r.guestPhysAddr, "guest address"),
      size,
      userAddr: num(r.userAddr, "user address"),
      hostAddr: Number(Deno.UnsafePointer.value(r.pointer)),
      buffer: Deno.UnsafePointerView.getArrayBuffer(r.pointer, size),
    };
  }

  #placement(index: number): QueuePlacement {
    const r = this.#rings[index];
    const a = r.addr!;
    return {
      size: r.num,
      desc: num(a.descUser, "descriptor table address"),
      avail: num(a.availUser, "avail ring address"),
      used: num(a.usedUser, "used ring address"),
      base: r.base,
    };
  }

  /** Starts the queues if everything they need is there. */
  async #maybeStart(): Promise<void> {
    if (this.#datapath) return;
    const ready = this.#rings.every((r) => r.started && r.enabled && r.num > 0 && r.addr);
    if (!ready || !this.#featuresSet || this.#regions.length === 0) return;
    const buffers = createDatapathBuffers();
    const tx = this.#rings[TX_QUEUE];
    const txUsed = txUsedPlace(this.#regions.map(userMapping), {
      num: tx.num,
      availUser: tx.addr!.availUser,
      usedUser: tx.addr!.usedUser,
    }, this.#features);
    const rx = this.#rings[RX_QUEUE];
    const rxUsed = rxUsedPlace(this.#regions.map(userMapping), {
      num: rx.num,
      availUser: rx.addr!.availUser,
      usedUser: rx.addr!.usedUser,
    }, this.#features);
    const dp = await DatapathHost.start({
      txUsed,
      rxUsed,
      tapFd: this.#tapFd,
      buffers,
      logger: this.#logger,
      ranges: this.#regions.map(hostRange),
      ioUring: this.#ioUring,
      rxFrameRoom: this.#tapReadRoom?.(),
      onFault: (role, message) => this.#logger.log("error", "datapath", `${role}: ${message}`),
    });
    try {
      for (const i of [RX_QUEUE, TX_QUEUE]) {
        await dp.setKickFd(i, this.#rings[i].kickFd);
        await dp.setCallFd(i, this.#rings[i].callFd);
      }
      await this.#device.startQueues(this.#placement(RX_QUEUE), this.#placement(TX_QUEUE), {
        ...buffers,
        bounceHost: Number(dp.bounceRange.base),
        rxPublish: true,
      });
    } catch (e) {
      await dp.stop();
      throw e;
    }
    this.#datapath = dp;
    this.#logger.log("info", "parent", "queues running");
  }

  /** Stops the queues if they run; returns whether they did. */
  async #stopQueues(): Promise<boolean> {
    const dp = this.#datapath;
    if (!dp) return false;
    this.#datapath = null;
    // The I/O workers end first: after this no system call touches guest memory.
    await dp.stop();
    const bases = await this.#device.stopQueues();
    this.#rings[RX_QUEUE].base = bases.rx;
    this.#rings[TX_QUEUE].base = bases.tx;
    this.#logger.log("info", "parent", `queues stopped at rx ${bases.rx}, tx ${bases.tx}`);
    return true;
  }
}

function describe(r: MappedRegion): string {
  return `gpa 0x${r.guestPhysAddr.toString(16)}+0x${r.size.toString(16)} user 0x${
    r.userAddr.toString(16)
  } host 0x${Deno.UnsafePointer.value(r.pointer).toString(16)}`;
}

function userMapping(r: MappedRegion) {
  return {
    userAddr: r.userAddr,
    size: r.size,
    hostAddr: BigInt(Deno.UnsafePointer.value(r.pointer)),
  };
}

function hostRange(r: MappedRegion) {
  return { base: Deno.UnsafePointer.value(r.pointer), size: r.size };
}
