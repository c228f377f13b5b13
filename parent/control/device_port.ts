/**
 * The vhost-user backend's view of the device: routes the front-end's
 * requests to the queue pairs (`pair_port.ts`), each with its own device
 * worker, I/O workers and tap queue, and keeps what is the device's as a
 * whole: the acked features, the memory table, the dirty log, announcing a
 * migrated guest.
 *
 * Pairs and rings: rings 2·i and 2·i + 1 are pair i's RX and TX (virtio 1.2
 * §5.1.2). A pair gets its device worker the first time the front-end needs
 * it: pair 0 at its first request that reaches the device (GET_FEATURES,
 * the first QEMU sends), pair i > 0 when the front-end names one of its
 * rings (QEMU does at start-up, for every pair it was told to use); a pair
 * that starts late is given the features, memory and log the device has by
 * then. A daemon that has not served a VM yet holds no worker at all. When
 * the front-end goes (its memory table emptied) the workers of pairs past
 * the first end; pair 0's stays for the next VM: ending it there would make
 * its thread a stray while the VM's memory is unmapped, which retires the
 * memory instead and ends the daemon if the thread is slow to exit
 * (`retired_memory.ts`). A pair's workers run while both of its rings
 * are started and enabled; QEMU enables and disables pairs with
 * SET_VRING_ENABLE as the driver changes its number of queue pairs
 * (`ethtool -L`: QEMU serves the control queue's VIRTIO_NET_CTRL_MQ itself).
 *
 * @module
 */

import type { RingPool } from "./ring_pool.ts";
import type { PairCapture } from "./datapath_host.ts";
import { RX_QUEUE, TX_QUEUE } from "../../ipc/datapath.ts";
import { VIRTIO_NET_HDR_SIZE } from "../../ipc/virtio_net_hdr.ts";
import * as libc from "../host/libc.ts";
import type { DeviceHost } from "./device_host.ts";
import type { MappedRegion } from "./guest_memory_map.ts";
import type { Logger } from "./log.ts";
import type { IoUringMode } from "../io/protocol.ts";
import { PairPort } from "./pair_port.ts";
import type { DevicePort, VringAddrFields } from "./vhost_user_backend.ts";

export interface DevicePortOptions {
  /**
   * Pair 0's device worker; without it pair 0's starts, like the others',
   * when the front-end first needs it. Either way it is kept for the next VM.
   */
  device?: DeviceHost;
  /** Pair 0's tap queue (the tap's first descriptor). */
  tapFd: number;
  logger: Logger;
  /** `--io-uring`: whether the I/O workers may batch through io_uring (default "auto"). */
  ioUring?: IoUringMode;
  /**
   * The longest frame a tap read can return now, vnet header included
   * (`Tap.readRoom()`); asked at each start of a pair's queues and after
   * {@link VionetDevicePort.tapOffloadsChanged}. Default: the largest.
   */
  tapReadRoom?: () => number;
  /** Queue pairs the front-end may use (default 1). */
  queuePairs?: number;
  /** Pair i's tap queue descriptor (pair 0's is `tapFd`). */
  tapQueueFd?: (pair: number) => number;
  /** Attaches or detaches pair i's tap queue (multi-queue taps; pair 0 stays attached). */
  setTapQueueAttached?: (pair: number, on: boolean) => void;
  /** Starts the device worker of pair `pair` (pair 0's too, when no `device` was given). */
  startDevice?: (pair: number) => Promise<DeviceHost>;
  /** Restricted io_uring rings made during set-up, lent to each pair's data path (`ring_pool.ts`). */
  rings?: RingPool;
  /**
   * `--mac`: the only source MAC the tap may get from this VM, the VMM's
   * RARP included (SEND_RARP for another MAC is not sent). Default: any.
   */
  sourceMac?: readonly number[] | null;
  /** The NIC's rate limits, one buffer every pair's I/O workers take from (`io/rate_limiter.ts`). */
  rateLimit?: SharedArrayBuffer | null;
  /** `--pcap`: pair i's capture rings (`capture_host.ts`); absent: no capture. */
  capture?: (pair: number) => PairCapture;
}

/** DevicePort over the queue pairs (see the module comment). */
export class VionetDevicePort implements DevicePort {
  readonly #opts: DevicePortOptions;
  readonly #logger: Logger;
  readonly #pairs: (PairPort | null)[];
  /** Pairs whose device worker is starting. */
  readonly #starting = new Map<number, Promise<PairPort>>();
  /** What every pair's device is given, and a pair that starts later catches up with. */
  #regions: MappedRegion[] = [];
  #features: bigint | null = null;
  #log: MappedRegion | null = null;
  #logAll = false;
  /** Regions a pair that was let go of may still hold (its worker did not give them back). */
  readonly #orphaned = new Set<MappedRegion>();
  /** The queues have not run yet since the front-end connected (or reset the device). */
  #firstStart = true;
  /** The guest was announced on the tap on this connection (see {@link setFeatures}). */
  #announced = false;

  constructor(opts: DevicePortOptions) {
    this.#opts = opts;
    this.#logger = opts.logger;
    const n = opts.queuePairs ?? 1;
    if (!Number.isInteger(n) || n < 1 || n > 128) {
      throw new RangeError(`queuePairs is ${n}, must be 1 to 128`);
    }
    this.#pairs = Array.from({ length: n }, () => null);
    if (opts.device !== undefined) this.#pairs[0] = this.#newPair(0, opts.device);
  }

  #newPair(pair: number, device: DeviceHost): PairPort {
    const o = this.#opts;
    return new PairPort({
      pair,
      device,
      tapFd: pair === 0 ? o.tapFd : o.tapQueueFd!(pair),
      logger: o.logger,
      ioUring: o.ioUring,
      tapReadRoom: o.tapReadRoom,
      rings: o.rings,
      rateLimit: o.rateLimit,
      capture: o.capture?.(pair) ?? null,
      onRunning: pair === 0 ? (bases) => this.#queuesRunning(bases) : undefined,
      setTapQueueAttached: pair === 0 || o.setTapQueueAttached === undefined
        ? undefined
        : (on) => o.setTapQueueAttached!(pair, on),
    });
  }

  /** Queue pairs the front-end may use. */
  get queuePairs(): number {
    return this.#pairs.length;
  }

  /** The pairs whose device worker runs now. */
  pairs(): PairPort[] {
    return this.#pairs.filter((p): p is PairPort => p !== null);
  }

  /** Pair `pair`'s device worker, started now if it was not running. */
  async device(pair: number): Promise<DeviceHost> {
    return (await this.#pair(pair)).device;
  }

  /**
   * Pair `pair`, its device worker started (and given the features, memory
   * and log the device has) if this is the first time it is named.
   */
  async #pair(pair: number): Promise<PairPort> {
    const have = this.#pairs[pair];
    if (have) return have;
    if (pair < 0 || pair >= this.#pairs.length || !Number.isInteger(pair)) {
      throw new RangeError(
        `queue pair ${pair} does not exist: vionet serves ${this.#pairs.length} (--queues)`,
      );
    }
    const pending = this.#starting.get(pair);
    if (pending) return await pending;
    const start = this.#opts.startDevice;
    if (start === undefined) throw new Error(`no way to start the device of queue pair ${pair}`);
    const p = (async () => {
      const port = this.#newPair(pair, await start(pair));
      try {
        if (this.#features !== null) await port.setFeatures(this.#features);
        if (this.#regions.length > 0) await port.setMemTable(this.#regions);
        if (this.#log !== null) await port.setLogBase(this.#log);
        if (this.#logAll) await port.setLogAll(true);
      } catch (e) {
        this.#release(port);
        throw e;
      }
      this.#pairs[pair] = port;
      this.#logger.log("info", "parent", `queue pair ${pair}: device worker started`);
      return port;
    })();
    this.#starting.set(pair, p);
    try {
      return await p;
    } finally {
      this.#starting.delete(pair);
    }
  }

  /** The pair and its local queue (RX_QUEUE or TX_QUEUE) of ring `index`. */
  async #ring(index: number): Promise<[PairPort, number]> {
    if (!Number.isInteger(index) || index < 0 || index >= 2 * this.#pairs.length) {
      throw new RangeError(
        `vring ${index} does not exist: vionet serves ${this.#pairs.length} queue pair(s), ` +
          `rings 0 to ${2 * this.#pairs.length - 1}`,
      );
    }
    return [await this.#pair(index >> 1), index & 1];
  }

  /** Lets go of a pair's worker; what it may still hold stays orphaned here. */
  #release(port: PairPort): void {
    port.close();
    for (const r of [...this.#regions, ...(this.#log ? [this.#log] : [])]) {
      if (port.forgetRegion(r)) this.#orphaned.add(r);
    }
  }

  // -------------------------------------------------------------------------
  // What the daemon asks of the device as a whole.

  /** Set by the vhost-user backend while a front-end is connected (DevicePort). */
  vringErrorSink: ((index: number) => void) | null = null;

  /** Pair `pair`'s device reported that its queue `queue` needs a reset (-1: both). */
  queueFault(pair: number, queue: number): void {
    if (queue < 0) {
      this.vringErrorSink?.(2 * pair + RX_QUEUE);
      this.vringErrorSink?.(2 * pair + TX_QUEUE);
    } else {
      this.vringErrorSink?.(2 * pair + queue);
    }
  }

  /** The tap's offloads changed (TUNSCAP): every running pair's poller learns its frame room. */
  tapOffloadsChanged(): void {
    for (const p of this.pairs()) p.tapOffloadsChanged();
  }

  /** The features the front-end acked (SET_FEATURES), or null before it did and after a reset. */
  get features(): bigint | null {
    return this.#features;
  }

  /** True while any pair's queues run. */
  get running(): boolean {
    return this.pairs().some((p) => p.running);
  }

  /** Each running pair's data-path counters, by pair number (pairs not running left out). */
  datapathCounters(): Map<number, ReturnType<PairPort["datapathCounters"]>> {
    const out = new Map<number, ReturnType<PairPort["datapathCounters"]>>();
    for (const p of this.pairs()) {
      const c = p.datapathCounters();
      if (c !== null) out.set(p.pair, c);
    }
    return out;
  }

  /**
   * Every pair's device counters, per queue: `rxN`/`txN` are pair N's
   * queues (each device names its own rx0/tx0), `ioN` its I/O side.
   */
  async stats(): Promise<Record<string, Record<string, number>>> {
    const out: Record<string, Record<string, number>> = {};
    for (const p of this.pairs()) {
      const q = await p.device.getStats();
      for (const [name, counters] of Object.entries(q)) {
        // rx0/tx0 are the device's own names; its I/O side is "io", one per pair too.
        out[name === "io" ? `io${p.pair}` : name.replace(/0$/, String(p.pair))] = counters;
      }
    }
    return out;
  }

  /** Swaps in a new device worker for `pair` after the old one died. */
  replaceDevice(pair: number, device: DeviceHost): void {
    const p = this.#pairs[pair];
    if (p) p.replaceDevice(device);
    else device.terminate();
  }

  // -------------------------------------------------------------------------
  // DevicePort.

  async getFeatures(): Promise<bigint> {
    return await (await this.#pair(0)).getFeatures();
  }

  /**
   * The first SET_FEATURES on a connection is the moment a guest's NIC
   * starts on this port: a boot, a front-end back after a restart, or a
   * migration's destination, whose QEMU sends it as the VM resumes (QEMU
   * 7.2 sends none while the migration stream runs). With `--mac`, vionet
   * announces the guest on the tap then (a RARP, once per connection), as
   * QEMU's own tap backend is announced on every incoming migration
   * (qemu_announce_self), before the memory table and the rings (10-60 ms
   * on a busy host): the bridge forwards to the new port at once, and what
   * it sends meanwhile waits in the tap (a retransmission it sent to the
   * old port would be lost, and TCP's next waits twice as long). QEMU 7.2
   * sends a vhost-user back-end no SEND_RARP for a guest that acked
   * GUEST_ANNOUNCE (vhost_user_migration_done). At a boot the RARP tells
   * the bridge what it is about to learn anyway.
   */
  async setFeatures(features: bigint): Promise<void> {
    if (!this.#announced) {
      this.#announced = true;
      const mac = this.#opts.sourceMac ?? null;
      if (mac !== null) {
        this.#writeRarp(Uint8Array.from(mac), "the guest's NIC starts on this port");
      }
    }
    this.#features = features;
    for (const p of this.pairs()) await p.setFeatures(features);
  }

  async setMemTable(regions: MappedRegion[]): Promise<void> {
    for (const p of this.pairs()) await p.setMemTable(regions);
    this.#regions = [...regions];
    if (regions.length === 0) {
      // The front-end is gone (or starts over): pairs past the first start again when named.
      for (let i = 1; i < this.#pairs.length; i++) {
        const p = this.#pairs[i];
        if (p) this.#release(p);
        this.#pairs[i] = null;
      }
    }
  }

  async addMemRegion(region: MappedRegion): Promise<void> {
    for (const p of this.pairs()) await p.addMemRegion(region);
    this.#regions = [...this.#regions, region];
  }

  async removeMemRegion(gpa: bigint, size: bigint): Promise<void> {
    for (const p of this.pairs()) await p.removeMemRegion(gpa, size);
    this.#regions = this.#regions.filter((r) => !(r.guestPhysAddr === gpa && r.size === size));
  }

  forgetRegion(region: MappedRegion): boolean {
    let held = this.#orphaned.delete(region);
    for (const p of this.pairs()) held = p.forgetRegion(region) || held;
    return held;
  }

  async setVringNum(index: number, num: number): Promise<void> {
    const [p, q] = await this.#ring(index);
    await p.setVringNum(q, num);
  }

  async setVringAddr(index: number, addr: VringAddrFields): Promise<void> {
    const [p, q] = await this.#ring(index);
    await p.setVringAddr(q, addr);
  }

  async setVringBase(index: number, base: number): Promise<void> {
    const [p, q] = await this.#ring(index);
    await p.setVringBase(q, base);
    // Pair 0's rings resume where they were: a guest that ran elsewhere.
    if (index < 2 && base !== 0) this.#resumed(`ring ${index} resumes at ${base}`);
  }

  async getVringBase(index: number): Promise<number> {
    const [p, q] = await this.#ring(index);
    return await p.getVringBase(q);
  }

  async setVringKick(index: number, fd: number | null): Promise<void> {
    let target: [PairPort, number];
    try {
      target = await this.#ring(index);
    } catch (e) {
      if (fd !== null) libc.closeQuietly(fd); // the port owns fd from this call on
      throw e;
    }
    await target[0].setVringKick(target[1], fd);
  }

  async setVringCall(index: number, fd: number | null): Promise<void> {
    let target: [PairPort, number];
    try {
      target = await this.#ring(index);
    } catch (e) {
      if (fd !== null) libc.closeQuietly(fd);
      throw e;
    }
    await target[0].setVringCall(target[1], fd);
  }

  async setVringEnable(index: number, enabled: boolean): Promise<void> {
    const [p, q] = await this.#ring(index);
    await p.setVringEnable(q, enabled);
  }

  async reset(): Promise<void> {
    for (const p of this.pairs()) await p.reset();
    this.#features = null;
    this.#logAll = false;
    this.#firstStart = true;
    this.#announced = false;
  }

  /**
   * Pair 0's queues run: whatever they resumed from, a later start on this
   * connection is not a guest arriving (a pause, a cancelled migration).
   */
  #queuesRunning(bases: { rx: number; tx: number }): void {
    if (bases.rx !== 0 || bases.tx !== 0) {
      this.#resumed(`queues resumed at rx ${bases.rx}, tx ${bases.tx}`);
    }
    this.#firstStart = false;
  }

  /**
   * Pair 0's rings resume from where they were (SET_VRING_BASE not zero)
   * before they ran on this connection: the destination of a migration, or
   * a front-end back after a restart. With `--mac` the guest was announced
   * at SET_FEATURES; without, vionet does not know its MAC, and says so
   * (once per connection).
   */
  #resumed(what: string): void {
    if (!this.#firstStart) return;
    this.#firstStart = false;
    if ((this.#opts.sourceMac ?? null) !== null) return;
    this.#logger.log(
      "info",
      "parent",
      `${what} (a migrated guest?): without --mac vionet cannot announce it; ` +
        "the bridge learns its port from the guest's own frames",
    );
  }

  async setLogAll(on: boolean): Promise<void> {
    this.#logAll = on;
    for (const p of this.pairs()) await p.setLogAll(on);
  }

  async setLogBase(log: MappedRegion): Promise<void> {
    this.#log = log;
    for (const p of this.pairs()) await p.setLogBase(log);
  }

  sendRarp(mac: Uint8Array): Promise<void> {
    const only = this.#opts.sourceMac ?? null;
    if (only !== null && only.some((b, i) => mac[i] !== b)) {
      // The device drops the guest's frames from any other source; the VMM's too.
      this.#logger.log(
        "warn",
        "parent",
        `RARP for ${macText(mac)} not sent: --mac is ${macText(Uint8Array.from(only))}`,
      );
      return Promise.resolve();
    }
    this.#writeRarp(mac, "SEND_RARP: a migrated guest");
    return Promise.resolve();
  }

  #writeRarp(mac: Uint8Array, why: string): void {
    const frame = rarpFrame(mac);
    // One write of header and frame (tun takes a packet per write); a full
    // tap (EAGAIN) loses this one: QEMU announces several times.
    try {
      libc.write(this.#opts.tapFd, frame);
      this.#logger.log("info", "parent", `sent a RARP for ${macText(mac)} (${why})`);
    } catch (e) {
      this.#logger.log(
        "warn",
        "parent",
        `RARP for ${macText(mac)} not sent: ${(e as Error).message}`,
      );
    }
  }
}

/** ARP's hardware and protocol types, and RARP's "request reverse" (RFC 903). */
const ETH_P_RARP = 0x8035;
const ARPHRD_ETHER = 1;
const ETH_P_IP = 0x0800;
const RARP_REQUEST_REVERSE = 3;

/**
 * The frame a switch learns a migrated guest's port from: a broadcast RARP
 * "request reverse" from `mac` (RFC 903), padded to the Ethernet minimum, as
 * QEMU announces guests itself; behind a zeroed virtio-net header.
 */
export function rarpFrame(mac: Uint8Array): Uint8Array {
  const out = new Uint8Array(VIRTIO_NET_HDR_SIZE + 60);
  const f = out.subarray(VIRTIO_NET_HDR_SIZE);
  const v = new DataView(f.buffer, f.byteOffset);
  f.fill(0xff, 0, 6);
  f.set(mac.subarray(0, 6), 6);
  v.setUint16(12, ETH_P_RARP);
  v.setUint16(14, ARPHRD_ETHER);
  v.setUint16(16, ETH_P_IP);
  f[18] = 6;
  f[19] = 4;
  v.setUint16(20, RARP_REQUEST_REVERSE);
  f.set(mac.subarray(0, 6), 22); // sender hardware address; sender IP 0.0.0.0
  f.set(mac.subarray(0, 6), 32); // target hardware address; target IP 0.0.0.0
  return out;
}

function macText(mac: Uint8Array): string {
  return Array.from(mac.subarray(0, 6), (b) => b.toString(16).padStart(2, "0")).join(":");
}
