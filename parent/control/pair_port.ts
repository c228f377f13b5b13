/**
 * One queue pair of the device: its zero-permission device worker, its two
 * privileged I/O workers and its tap queue. Turns the front-end's ring and
 * memory requests for this pair (routed here by `device_port.ts`) into
 * requests to those workers, in the order that keeps guest memory safe.
 * Pairs share nothing but the guest's memory and the tap: no lock or thread
 * that every pair's packets pass through.
 *
 * Theory of operation
 * - Memory: each mapped region is granted to the device as an ArrayBuffer
 *   over the mapping (transferred). Before anything is unmapped, the queues
 *   are stopped (I/O workers first: no system call can be in flight on guest
 *   memory), the device hands the buffers back, and only then do we return to
 *   the backend, which unmaps.
 * - A worker that fails that hand-back (no answer in time, a refusal, a death)
 *   is ended, and what it held is orphaned: `forgetRegion` then tells the
 *   backend to retire those regions, not unmap them. A terminated worker's
 *   thread runs on until it next enters JavaScript, or finishes the system
 *   call it is in, so only a range that stays mapped is safe from it.
 * - Rings: vhost-user configures each ring separately; the device runs both
 *   together. They run once both rings have a kick and are enabled (with
 *   PROTOCOL_FEATURES, rings start disabled until SET_VRING_ENABLE), memory is
 *   granted and the ring addresses are known. Each start gets fresh data-path
 *   rings and fresh I/O workers, so no stale record survives a stop.
 * - GET_VRING_BASE stops both queues (the device quiesces and stops while
 *   the I/O workers end, each waiting for the other in the control block),
 *   and answers with the index the device reports; the other ring's index is
 *   kept for its own GET_VRING_BASE or the next start.
 *
 * @module
 */

import type { RingPool } from "./ring_pool.ts";
import { type DatapathBuffers, RX_QUEUE, TX_QUEUE } from "../../ipc/datapath.ts";
import type { QueuePlacement, RegionGrant, RegionRef } from "../../ipc/protocol.ts";
import {
  createDatapathBuffers,
  DatapathHost,
  IoWorkerPair,
  type PairCapture,
  rxUsedPlace,
  txUsedPlace,
} from "./datapath_host.ts";
import { NoAnswerError } from "../../ipc/endpoint.ts";
import type { DeviceHost } from "./device_host.ts";
import type { MappedRegion } from "./guest_memory_map.ts";
import { type LentRegion, returnedMemoryProblem } from "./memory_return.ts";
import { describeRegion } from "./vhost_user_messages.ts";
import * as libc from "../host/libc.ts";
import type { Logger } from "./log.ts";
import type { IoUringMode } from "../io/protocol.ts";
import type { VringAddrFields } from "./vhost_user_backend.ts";
import { VHOST_VRING_F_LOG } from "./vhost_user_messages.ts";
import type { LogConfig, UsedRingLog } from "../io/protocol.ts";
import { DirtyLog } from "../io/dirty_log.ts";

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

/**
 * How long the front-end must have sent this pair nothing before spare I/O
 * workers are started (ms): QEMU sends a start's or a stop's messages in one
 * burst, a few ms apart even under TCG.
 */
const SPARE_QUIET_MS = 150;
/**
 * How long a stopping device waits for the I/O workers' loops to end before
 * it leaves the stop to a second request (ms): well inside the device's
 * request timeout, far above a stop's usual 5-50 ms.
 */
const IO_END_WAIT_MS = 1000;
/**
 * How long a stop blocks this thread for the I/O workers' and the device's
 * words before it waits for their messages instead (ms): well above an
 * overlapped stop's usual 2-6 ms, short enough that a device that never
 * says it stopped costs the other connections little.
 */
const STOP_BLOCK_MS = 30;
/**
 * How long a stop leaves the stopped I/O workers' threads and their rings
 * before it takes them down (ms). Their loops have ended and they touch
 * nothing; taking two io_uring set-ups and two isolates down costs several ms
 * of CPU, which at once after the answer to GET_VRING_BASE fell inside a
 * migration's switch-over on the source, where QEMU sends the last of the
 * guest's RAM. A reset or a close ends them at once.
 */
const IO_TEARDOWN_DELAY_MS = 500;

/** A bigint from the front-end that must fit a JS number exactly. */
function num(v: bigint, what: string): number {
  if (v < 0n || v > BigInt(Number.MAX_SAFE_INTEGER)) {
    throw new RangeError(`${what} 0x${v.toString(16)} is beyond 2^53`);
  }
  return Number(v);
}

export interface PairPortOptions {
  /** Which queue pair (rings 2·pair and 2·pair + 1). */
  pair: number;
  device: DeviceHost;
  /** This pair's tap queue descriptor. */
  tapFd: number;
  logger: Logger;
  /**
   * Attaches or detaches this pair's tap queue as the driver enables or
   * disables the pair (absent: a single-queue tap, always attached).
   */
  setTapQueueAttached?: (on: boolean) => void;
  /** `--io-uring`: whether the I/O workers may batch through io_uring (default "auto"). */
  ioUring?: IoUringMode;
  /**
   * The longest frame a tap read can return now, vnet header included
   * (`Tap.readRoom()`); asked at each start of the queues and after
   * {@link VionetDevicePort.tapOffloadsChanged}. Default: the largest.
   */
  tapReadRoom?: () => number;
  /** Restricted io_uring rings made during set-up, lent to each data path (`ring_pool.ts`). */
  rings?: RingPool;
  /** The NIC's rate limits, the same buffer for every pair (`io/rate_limiter.ts`). */
  rateLimit?: SharedArrayBuffer | null;
  /** `--pcap`: this pair's capture rings, given to each data path it starts. */
  capture?: PairCapture | null;
  /**
   * Called each time the queues start running, with the ring bases they
   * started from (non-zero: a guest that ran before, on another host or
   * another connection).
   */
  onRunning?: (bases: { rx: number; tx: number }) => void;
}

/** One queue pair over its device worker and I/O workers (see the module comment). */
export class PairPort {
  readonly pair: number;
  #device: DeviceHost;
  readonly #setTapQueueAttached: ((on: boolean) => void) | undefined;
  #ioUring: IoUringMode;
  readonly #tapFd: number;
  readonly #logger: Logger;
  readonly #rings: [RingConfig, RingConfig] = [freshRing(), freshRing()];
  #regions: MappedRegion[] = [];
  /** Regions whose buffer went to the live device worker and has not come back. */
  readonly #lent = new Set<MappedRegion>();
  /** Regions a worker that was ended without giving them back may still touch. */
  readonly #orphaned = new Set<MappedRegion>();
  #featuresSet = false;
  /** The driver's acknowledged features (EVENT_IDX decides how the writer reads the TX ring). */
  #features = 0n;
  #datapath: DatapathHost | null = null;
  /** I/O workers started ahead for the next start of the queues (while a front-end is set up). */
  #spare: IoWorkerPair | null = null;
  /**
   * Fresh data-path buffers made with the spare, for the same start:
   * allocating them took 0.8-1.9 ms of it (8 MiB of bounce arena among them).
   */
  #spareBuffers: DatapathBuffers | null = null;
  /** The dirty log's bitmap (SET_LOG_BASE), and whether VHOST_F_LOG_ALL is on. */
  #log: MappedRegion | null = null;
  #logAll = false;
  readonly #tapReadRoom: (() => number) | undefined;
  readonly #ringPool: RingPool | undefined;
  readonly #rateLimit: SharedArrayBuffer | null;
  readonly #capture: PairCapture | null;
  readonly #onRunning: ((bases: { rx: number; tx: number }) => void) | undefined;

  constructor(opts: PairPortOptions) {
    this.pair = opts.pair;
    this.#onRunning = opts.onRunning;
    this.#rateLimit = opts.rateLimit ?? null;
    this.#capture = opts.capture ?? null;
    this.#ringPool = opts.rings;
    this.#setTapQueueAttached = opts.setTapQueueAttached;
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
    this.#orphanLent();
    this.#device = device;
  }

  /** This pair's device worker. */
  get device(): DeviceHost {
    return this.#device;
  }

  /** Ends this pair's device worker; what it still held is orphaned (retired, not unmapped). */
  close(): void {
    this.#endStoppedWorkers();
    this.#dropSpare();
    this.#orphanLent();
    this.#device.terminate();
  }

  /** Ring `index` of this pair: RX_QUEUE (0) or TX_QUEUE (1). */
  #ring(index: number): RingConfig {
    if (index !== RX_QUEUE && index !== TX_QUEUE) {
      throw new RangeError(`queue ${index} of a pair does not exist (0: RX, 1: TX)`);
    }
    return this.#rings[index];
  }

  getFeatures(): Promise<bigint> {
    // A front-end is setting up: its queues will start soon.
    if (this.#datapath === null) this.#spawnSpare();
    return this.#device.getFeatures();
  }

  async setFeatures(features: bigint): Promise<void> {
    this.#postponeSpare();
    if (this.#datapath === null) this.#spawnSpare();
    await this.#device.setFeatures(features);
    this.#features = features;
    this.#featuresSet = true;
    await this.#maybeStart();
  }

  /** "queues " for pair 0 (as single-queue logs always said), "queue pair N " otherwise. */
  #what(): string {
    return this.pair === 0 ? "queues " : `queue pair ${this.pair} `;
  }

  #debug(text: string): void {
    this.#logger.log("debug", "vhost-user", text);
  }

  async setMemTable(regions: MappedRegion[]): Promise<void> {
    this.#postponeSpare();
    this.#debug(`SET_MEM_TABLE ${regions.map(describe).join(", ") || "(empty)"}`);
    if (regions.length === 0) this.#dropSpare();
    const wasRunning = await this.#stopQueues();
    await this.#revoke([...this.#lent]);
    this.#regions = [];
    if (regions.length > 0) {
      await this.#grant(regions);
      this.#regions = [...regions];
      this.#spawnSpare();
    }
    if (wasRunning) await this.#maybeStart();
  }

  /**
   * Starts the I/O workers of the next start of the queues ahead of it, so
   * that the start itself only configures them (a front-end with memory is
   * about to start its queues, or will start them again after a stop) —
   * once the front-end has been quiet for {@link SPARE_QUIET_MS}.
   *
   * Starting a worker blocks this thread until Deno has built the worker's
   * runtime: 90-280 ms for the two on a loaded 2-core machine (measured).
   * Run right after the message that asked for it (as it was), that delay
   * fell on the front-end's next messages: on a migration's source, the
   * second GET_VRING_BASE came 107 ms late, inside the downtime.
   */
  #spawnSpare(): void {
    if (this.#spareSoon !== null) clearTimeout(this.#spareSoon);
    this.#spareSoon = setTimeout(() => {
      this.#spareSoon = null;
      if (this.#spare?.usable || this.#datapath !== null) return;
      this.#spare?.terminate();
      const t0 = performance.now();
      this.#spare = IoWorkerPair.spawn({ logger: this.#logger });
      this.#spareBuffers ??= createDatapathBuffers();
      this.#debug(`${this.#what()}spare I/O workers spawned in ${ms(performance.now() - t0)}`);
    }, SPARE_QUIET_MS);
  }

  /** Stopped data paths whose workers' threads end soon ({@link IO_TEARDOWN_DELAY_MS}). */
  readonly #ending = new Map<DatapathHost, ReturnType<typeof setTimeout>>();

  #endLater(dp: DatapathHost): void {
    // The workers take down their rings then too (`dp.end()` releases them
    // first), not right after the answer: on a migration's source the front-end
    // asks for the second ring's base 0.1-0.3 ms after the first answer, and
    // then sends the last of the guest's RAM, inside the downtime; the 1-3 ms of
    // system calls of two teardowns took a CPU from that (the second answer came
    // 1.8 ms late once). A start that needs the rings sooner has them released
    // at once (`RingPool.reclaim`).
    const timer = setTimeout(() => {
      this.#ending.delete(dp);
      dp.end();
    }, IO_TEARDOWN_DELAY_MS);
    Deno.unrefTimer(timer); // the daemon's exit does not wait for it
    this.#ending.set(dp, timer);
  }

  /** Ends the threads of every stopped data path now. */
  #endStoppedWorkers(): void {
    for (const [dp, timer] of this.#ending) {
      clearTimeout(timer);
      dp.end();
    }
    this.#ending.clear();
  }

  /** A message came: a pending spare start waits until the front-end is quiet again. */
  #postponeSpare(): void {
    if (this.#spareSoon !== null) this.#spawnSpare();
  }
  #spareSoon: ReturnType<typeof setTimeout> | null = null;

  #dropSpare(): void {
    if (this.#spareSoon !== null) clearTimeout(this.#spareSoon);
    this.#spareSoon = null;
    this.#spare?.terminate();
    this.#spare = null;
    this.#spareBuffers = null;
  }

  async addMemRegion(region: MappedRegion): Promise<void> {
    this.#postponeSpare();
    this.#debug(`ADD_MEM_REG ${describe(region)}`);
    // The I/O workers learn the new range before the device can point into it.
    const all = [...this.#regions, region];
    const dp = this.#datapath;
    if (dp !== null) await this.#toIoWorkers(dp, all, [region]);
    try {
      await this.#grant([region]);
    } catch (e) {
      if (dp !== null) {
        try {
          await this.#toIoWorkers(dp, this.#regions, [region]);
        } catch (again) {
          // The region is orphaned either way; the report keeps both causes.
          throw new Error(
            `${(e as Error).message}; taking the range back from the I/O workers failed too: ${
              (again as Error).message
            }`,
            { cause: e },
          );
        }
      }
      throw e;
    }
    this.#regions = all;
    if (this.#datapath === null) this.#spawnSpare();
  }

  /**
   * The backend lets go of `region`: true if a worker may still touch it (it
   * is lent to the device, or orphaned by a worker that was ended).
   */
  forgetRegion(region: MappedRegion): boolean {
    const orphaned = this.#orphaned.delete(region);
    const lent = this.#lent.delete(region);
    return orphaned || lent;
  }

  /** Hands `regions` to the device; a device that does not answer is ended, holding them. */
  async #grant(regions: readonly MappedRegion[]): Promise<void> {
    const grants = regions.map((r) => this.#grantOf(r));
    for (const r of regions) this.#lent.add(r);
    try {
      await this.#device.grantMemory(grants);
    } catch (e) {
      // An answer, even a refusal, comes after the device dropped them (net_device.ts grant).
      if (e instanceof NoAnswerError) this.#abandonDevice(`grant-memory: ${e.message}`);
      else for (const r of regions) this.#lent.delete(r);
      throw e;
    }
  }

  /**
   * Takes `regions` back from the device (those it holds). A device that
   * does not answer, or answers with anything but the very buffers lent, in
   * order (`memory_return.ts`), is ended, and every region it held is
   * orphaned (retired by the backend, never unmapped under it).
   */
  async #revoke(regions: readonly MappedRegion[]): Promise<void> {
    const lent = regions.filter((r) => this.#lent.has(r));
    if (lent.length === 0) return;
    let returned: ArrayBuffer[];
    try {
      returned = await this.#device.revokeMemory(lent.map(regionRef));
    } catch (e) {
      this.#abandonDevice(`revoke-memory: ${(e as Error).message}`);
      throw e;
    }
    const problem = returnedMemoryProblem(lent.map(lentRegion), returned);
    if (problem !== null) {
      this.#logger.log("warn", "parent", `refused the device's memory-returned: ${problem}`);
      this.#abandonDevice(`revoke-memory: ${problem}`);
      throw new Error(`the device did not give back guest memory: ${problem}`);
    }
    for (const r of lent) this.#lent.delete(r);
  }

  /** Tells running I/O workers which ranges they may use; ones that do not answer orphan `at`. */
  async #toIoWorkers(
    dp: DatapathHost,
    regions: readonly MappedRegion[],
    at: readonly MappedRegion[],
  ): Promise<void> {
    try {
      await dp.setRegions(regions.map(hostRange));
    } catch (e) {
      for (const r of at) this.#orphaned.add(r);
      throw e;
    }
  }

  /** Ends a device worker that may hold guest memory it did not give back. */
  #abandonDevice(reason: string): void {
    this.#orphanLent();
    this.#device.fail(`the device did not give back guest memory (${reason})`);
  }

  /**
   * Stops the I/O workers. One that had to be ended without answering may be
   * inside a system call on guest memory now: every region they had is orphaned.
   */
  async #endIoWorkers(
    dp: DatapathHost,
    opts: { endLater?: boolean; untilTxClosed?: boolean } = {},
  ): Promise<void> {
    if (await dp.stop(opts)) return;
    for (const r of this.#regions) this.#orphaned.add(r);
    if (this.#log !== null) this.#orphaned.add(this.#log);
  }

  #orphanLent(): void {
    for (const r of this.#lent) this.#orphaned.add(r);
    this.#lent.clear();
  }

  async removeMemRegion(gpa: bigint, size: bigint): Promise<void> {
    this.#postponeSpare();
    this.#debug(`REM_MEM_REG gpa 0x${gpa.toString(16)} size 0x${size.toString(16)}`);
    const i = this.#regions.findIndex((r) => r.guestPhysAddr === gpa && r.size === size);
    if (i < 0) throw new RangeError(`no region at GPA 0x${gpa.toString(16)} of ${size} bytes`);
    const r = this.#regions[i];
    const wasRunning = await this.#stopQueues();
    await this.#revoke([r]);
    this.#regions.splice(i, 1);
    if (wasRunning) await this.#maybeStart();
  }

  setVringNum(index: number, n: number): Promise<void> {
    this.#postponeSpare();
    this.#ring(index).num = n;
    return Promise.resolve();
  }

  async setVringAddr(index: number, addr: VringAddrFields): Promise<void> {
    this.#postponeSpare();
    const ring = this.#ring(index);
    const before = ring.addr;
    ring.addr = addr;
    // QEMU turns used-ring logging on and off with SET_VRING_ADDR on running rings.
    const logChanged = before === null || before.flags !== addr.flags ||
      before.logGuest !== addr.logGuest;
    if (this.#datapath !== null && logChanged) await this.#applyLog(this.#log);
  }

  async setLogAll(on: boolean): Promise<void> {
    this.#postponeSpare();
    if (on === this.#logAll) return;
    this.#logAll = on;
    this.#logger.log("info", "parent", `dirty logging ${on ? "on" : "off"}`);
    if (this.#datapath !== null) await this.#applyLog(this.#log);
  }

  async setLogBase(log: MappedRegion): Promise<void> {
    this.#postponeSpare();
    const old = this.#log;
    this.#log = log;
    if (this.#datapath !== null) await this.#applyLog(old);
  }

  /**
   * Gives the running I/O workers the log as it is now. When they do not
   * acknowledge, `previous` (the bitmap they may still write) is orphaned:
   * the backend retires it rather than unmapping it.
   */
  async #applyLog(previous: MappedRegion | null): Promise<void> {
    try {
      await this.#datapath!.setLog(this.#logConfig());
    } catch (e) {
      if (previous !== null) this.#orphaned.add(previous);
      throw e;
    }
  }

  /** What the I/O workers log into, or null while the front-end does not log. */
  #logConfig(): LogConfig | null {
    const log = this.#log;
    if (!this.#logAll || log === null) return null;
    const used = (i: number): UsedRingLog | null => {
      const r = this.#rings[i];
      if (r.addr === null || (r.addr.flags & VHOST_VRING_F_LOG) === 0 || r.num === 0) return null;
      // virtio 1.2 §2.7.8: flags, idx, ring[num], avail_event.
      return { gpa: num(r.addr.logGuest, "used ring log address"), bytes: 6 + 8 * r.num };
    };
    return {
      base: Deno.UnsafePointer.value(log.pointer),
      size: num(log.size, "log size"),
      rxUsed: used(RX_QUEUE),
      txUsed: used(TX_QUEUE),
    };
  }

  /**
   * After the queues stopped: what the device wrote in the used rings last
   * (the TX used index, ring flags, avail_event) is marked here, so that the
   * log is complete when GET_VRING_BASE is answered (QEMU syncs it then).
   */
  #logStoppedRings(): void {
    const cfg = this.#logConfig();
    if (cfg === null) return;
    const log = new DirtyLog(cfg);
    log.markUsed(cfg.rxUsed);
    log.markUsed(cfg.txUsed);
  }

  setVringBase(index: number, base: number): Promise<void> {
    this.#postponeSpare();
    this.#ring(index).base = base;
    return Promise.resolve();
  }

  async getVringBase(index: number): Promise<number> {
    this.#postponeSpare();
    const ring = this.#ring(index);
    await this.#stopQueues();
    ring.started = false;
    await this.#setKick(index, null);
    // The front-end may start the rings again (a VM that resumes), so the
    // next start's workers are started ahead; not in a migration's
    // switch-over (logging on), where the front-end goes away once it
    // completes and where starting them costs the destination CPU it needs
    // now (both hosts share 2 cores in the bench). A cancelled migration's
    // restart starts its own.
    if (!this.#logAll) this.#spawnSpare();
    return ring.base;
  }

  async setVringKick(index: number, fd: number | null): Promise<void> {
    this.#postponeSpare();
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
    this.#postponeSpare();
    const ring = this.#ring(index);
    const old = ring.callFd;
    ring.callFd = fd;
    if (this.#datapath) await this.#datapath.setCallFd(index, fd);
    if (old !== null && old !== fd) libc.sys.close(old);
  }

  async setVringEnable(index: number, enabled: boolean): Promise<void> {
    this.#postponeSpare();
    this.#ring(index).enabled = enabled;
    // The kernel steers flows to this pair's tap queue only while the driver uses the pair.
    this.#setTapQueueAttached?.(this.#rings.some((r) => r.enabled));
    if (enabled) await this.#maybeStart();
    else await this.#stopQueues();
  }

  async reset(): Promise<void> {
    await this.#stopQueues();
    this.#endStoppedWorkers();
    this.#dropSpare();
    for (const i of [RX_QUEUE, TX_QUEUE]) {
      const r = this.#rings[i];
      if (r.kickFd !== null) libc.sys.close(r.kickFd);
      if (r.callFd !== null) libc.sys.close(r.callFd);
      this.#rings[i] = freshRing();
    }
    this.#featuresSet = false;
    this.#features = 0n;
    this.#logAll = false;
    await this.#device.reset();
  }

  #grantOf(r: MappedRegion): RegionGrant {
    const ref = regionRef(r);
    return {
      ...ref,
      hostAddr: Number(Deno.UnsafePointer.value(r.pointer)),
      buffer: Deno.UnsafePointerView.getArrayBuffer(r.pointer, ref.size),
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
    // The spare becomes this start's workers. A spare still to come (a timer
    // set by a request handled just before, when the requests came in one
    // burst) would otherwise be started while this start awaits and then
    // idle beside the running workers, two isolates, for the whole session.
    if (this.#spareSoon !== null) clearTimeout(this.#spareSoon);
    this.#spareSoon = null;
    const workers = this.#spare ?? undefined;
    this.#spare = null;
    // Made with the spare, ahead; fresh either way.
    const buffers = this.#spareBuffers ?? createDatapathBuffers();
    this.#spareBuffers = null;
    const t0 = performance.now();
    // The device starts its queues while the I/O workers take their
    // configuration (one round trip less before frames move: a migration's
    // destination is what the guest waits for); what the device puts on the
    // rings meanwhile waits for the workers.
    let deviceMs = 0;
    let deviceStarted = false;
    let deviceError: unknown = null;
    const startDevice = async (bounceHost: number) => {
      const d0 = performance.now();
      try {
        await this.#device.startQueues(this.#placement(RX_QUEUE), this.#placement(TX_QUEUE), {
          ...buffers,
          bounceHost,
        });
        deviceStarted = true;
      } catch (e) {
        deviceError = e;
      }
      deviceMs = performance.now() - d0;
    };
    let dp: DatapathHost;
    try {
      dp = await DatapathHost.start({
        workers,
        txUsed,
        rxUsed,
        tapFd: this.#tapFd,
        buffers,
        logger: this.#logger,
        ranges: this.#regions.map(hostRange),
        ioUring: this.#ioUring,
        rings: this.#ringPool,
        capture: this.#capture,
        rxFrameRoom: this.#tapReadRoom?.(),
        log: this.#logConfig(),
        rateLimit: this.#rateLimit,
        kickFds: this.#rings.map((r) => r.kickFd),
        callFds: this.#rings.map((r) => r.callFd),
        onFault: (role, message) => this.#logger.log("error", "datapath", `${role}: ${message}`),
        alongside: startDevice,
      });
    } catch (e) {
      // The workers are ended (DatapathHost.start did); a device that started
      // stops again, so that it holds no queue its workers will not serve.
      if (deviceStarted) {
        try {
          await this.#device.stopQueues();
        } catch (again) {
          this.#abandonDevice(`stop-queues: ${(again as Error).message}`);
        }
      }
      throw e;
    }
    if (!deviceStarted) {
      // The workers run: they stop as at any stop (orphaning what they held if they do not answer).
      await this.#endIoWorkers(dp);
      throw deviceError;
    }
    this.#datapath = dp;
    this.#debug(
      `${this.#what()}start: ${ms(performance.now() - t0)}, I/O workers ${
        workers ? "started ahead" : "spawned now"
      }, the device's part ${ms(deviceMs)} of it`,
    );
    this.#logger.log("info", "parent", `${this.#what()}running`);
    this.#onRunning?.({ rx: this.#rings[RX_QUEUE].base, tx: this.#rings[TX_QUEUE].base });
  }

  /** Stops the queues if they run; returns whether they did. */
  async #stopQueues(): Promise<boolean> {
    const dp = this.#datapath;
    if (!dp) return false;
    this.#datapath = null;
    const t0 = performance.now();
    // One request to each, all at once. The device quiesces (what it took
    // goes out: a TX frame in flight is sent, not completed unsent; nothing
    // new is taken) while the writer runs on until it has (CTL.TX_CLOSED);
    // the workers' loops end; the device waits for that in the control block
    // (CTL.IO_ENDED), not for a message from here, then finishes. One round
    // trip between threads instead of three, inside a migration's downtime.
    // The answer waits for the workers' acks too: after it no system call
    // touches guest memory.
    // The device first: its quiesce is the longest part, and each thread
    // woken takes a turn on a small machine's CPUs before the next.
    const stop = this.#device.beginStop(IO_END_WAIT_MS);
    let ioMs = 0;
    const io = this.#endIoWorkers(dp, { endLater: true, untilTxClosed: true }).then(() => {
      ioMs = performance.now() - t0;
    });
    // Their threads end a while after the answer is out (the reply to
    // GET_VRING_BASE is written in this turn of the event loop).
    const endWorkers = () => this.#endLater(dp);
    // Each reply and ack above wakes this thread's event loop when it comes:
    // a turn each, on CPUs the front-ends keep busy in a migration. Block the
    // thread instead, for a while, on the words the workers and the device
    // set with them; the workers' first, in their own mailboxes (the
    // device's say nothing of them). The replies are read later.
    const deadline = performance.now() + STOP_BLOCK_MS;
    const published = dp.loopsEndedBy(deadline) ? stop.published(deadline) : null;
    if (published !== null) {
      stop.reply.catch((e) =>
        this.#logger.log("warn", "parent", `${this.#what()}stop-queues: ${(e as Error).message}`)
      );
      endWorkers();
      this.#stopped(published, `${ms(performance.now() - t0)}, read from the control block`);
      return true;
    }
    let bases: { rx: number; tx: number };
    try {
      try {
        bases = await stop.reply;
      } catch (e) {
        // A device that did not answer (or is gone) is not asked twice.
        if (e instanceof NoAnswerError) throw e;
        // The workers were slower than that: once they are gone, the plain stop.
        this.#debug(`${this.#what()}stop, overlapped: ${(e as Error).message}`);
        await io;
        bases = await this.#device.stopQueues();
      }
    } catch (e) {
      await io;
      endWorkers();
      this.#abandonDevice(`stop-queues: ${(e as Error).message}`);
      throw e;
    }
    const t2 = performance.now();
    await io;
    endWorkers();
    this.#stopped(
      bases,
      `${ms(performance.now() - t0)} (device ${ms(t2 - t0)}, I/O workers ${ms(ioMs)})`,
    );
    return true;
  }

  /** The queues stopped at `bases`: the rings keep them; the log marks the used rings. */
  #stopped(bases: { rx: number; tx: number }, took: string): void {
    this.#rings[RX_QUEUE].base = bases.rx;
    this.#rings[TX_QUEUE].base = bases.tx;
    this.#logStoppedRings();
    this.#debug(`${this.#what()}stop: ${took}`);
    this.#logger.log("info", "parent", `${this.#what()}stopped at rx ${bases.rx}, tx ${bases.tx}`);
  }
}

/** A duration for the debug log. */
function ms(v: number): string {
  return `${v.toFixed(1)} ms`;
}

/** How the device names a region (its grant's addresses). */
function regionRef(r: MappedRegion): RegionRef {
  return {
    guestPhysAddr: num(r.guestPhysAddr, "guest address"),
    size: num(r.size, "region size"),
    userAddr: num(r.userAddr, "user address"),
  };
}

function lentRegion(r: MappedRegion): LentRegion {
  return { pointer: r.pointer, size: num(r.size, "region size"), what: describeRegion(r) };
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
  return { base: Deno.UnsafePointer.value(r.pointer), size: r.size, gpa: r.guestPhysAddr };
}
