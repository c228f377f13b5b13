/**
 * vionet: the virtio-net device. Owns the guest memory grants, the RX and TX
 * virtqueues and their data paths, and runs the loop that moves frames
 * between the virtqueues and the I/O workers' rings.
 *
 * Lifecycle, as the parent drives it (from vhost-user):
 *   grant memory → set features → start (rings attached, queues placed) →
 *   ... → stop (returns each queue's last_avail_idx) → revoke memory
 * The parent quiesces its I/O workers before `stop()` and before revoking
 * memory, so no system call can touch a buffer the device gives back.
 *
 * Failure policy: bad chains and frames are dropped and counted (in the
 * paths); a corrupt ring or an I/O fault puts that queue in needs-reset and
 * the device reports it; the loop itself never throws on guest input.
 *
 * @module
 */

import {
  CTL,
  EV_IO_FAULT,
  EV_KICK_RX,
  EV_KICK_TX,
  EV_RX_DONE,
  EV_RX_STARVED,
  EV_TX_DONE,
  RX_QUEUE,
  rxSignalChains,
  RXT_CSUM,
  RXT_ECN,
  RXT_MERGEABLE,
  TX_QUEUE,
} from "../ipc/datapath.ts";
import type { DatapathBuffers } from "../ipc/datapath.ts";
import {
  MAX_IO_END_WAIT_MS,
  type QueuePlacement,
  type RegionGrant,
  type RegionRef,
} from "../ipc/protocol.ts";
import {
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
} from "../ipc/virtio_net_hdr.ts";
import { macrotask, messageTurn } from "../ipc/macrotask.ts";
import { VIRTIO_NET_F_MRG_RXBUF } from "../ipc/features.ts";
import { CHAIN_DEVICE_READABLE, CHAIN_DEVICE_WRITABLE } from "./chain.ts";
import { GuestMemory, MAX_REGIONS } from "./guest_memory.ts";
import { DeviceIoRings } from "./io_rings.ts";
import { KickWatch } from "./kick_watch.ts";
import type { DeviceMailbox } from "./mailbox.ts";
import {
  guestOffloads,
  hostOffloads,
  NET_OFFLOAD_ALL,
  NET_OFFLOAD_CSUM,
  NET_OFFLOAD_TSO_ECN,
} from "./net_header.ts";
import { takesGso } from "./offload.ts";
import { ETH_HLEN, VLAN_HLEN } from "./frame_parse.ts";
import { RxPath } from "./rx_path.ts";
import { TxPath } from "./tx_path.ts";
import { Virtqueue } from "./virtqueue.ts";

/** What the device reports about a queue that went wrong. */
export type FaultHandler = (queue: number, reason: string) => void;

/** How long the loop sleeps with nothing to do before it looks again anyway (ms). */
const IDLE_WAIT_MS = 1000;
/** How long a stop waits for the writer to take every TX record (ms). */
const QUIESCE_MAX_MS = 1000;
/**
 * With a mailbox the loop blocks the worker's thread; it lets the event loop
 * turn at least this often (ms), for timers, even when no message came.
 */
const BLOCKING_SLICE_MS = 1000;

/** A stop the loop carries out (`NetDevice.stop`, or CTL.STOP_ASKED). */
interface StopAsk {
  /** How long to wait for the I/O workers' loops to end (0: they have). */
  ioEndWaitMs: number;
  /** Write what was taken first (the writer runs until TX closes). */
  quiesce: boolean;
  /** When the quiesce gives up on the writer (performance.now()). */
  until: number;
  /** The loop has looked at the queues once since (a quiesce's first pass). */
  seen: boolean;
}

/** What the loop's stop came to, for `stop()`. */
type StopOutcome = { bases: { rx: number; tx: number } } | { error: Error };

export class NetDevice {
  readonly memory = new GuestMemory();
  /** Host address of each region slot's mapping. */
  readonly hostBase = new Float64Array(MAX_REGIONS);
  readonly rxq: Virtqueue;
  readonly txq: Virtqueue;
  features = 0n;
  offloadMode: "auto" | "off" = "auto";
  /** `--mac`: the only source MAC the guest may send from, or null. */
  sourceMac: Uint8Array | null = null;
  /** The tap's MTU: longer frames without GSO are dropped on TX. */
  mtu = 65535;

  #rings: DeviceIoRings | null = null;
  #rx: RxPath | null = null;
  #tx: TxPath | null = null;
  #running = false;
  #loop: Promise<void> | null = null;
  #faulted = [false, false];
  /** Pump TX again without waiting for an event (more chains came, or space did). */
  #txAgain = false;
  /** Post RX buffers again without waiting for an event (the guest added some meanwhile). */
  #rxAgain = false;
  /** The last TX pass stopped for want of ring or bounce space (it waits for the writer). */
  #txBlocked = false;
  /** Lost-kick recovery (`kick_watch.ts`). */
  readonly #kicks: KickWatch;
  /** A stop quiesces: take nothing new, write what was taken (until the stop ends). */
  #quiescing = false;
  /** The quiesce is done: every TX record taken was released by the writer. */
  #drained = false;
  /** The stop the loop is carrying out, or null. */
  #stopAsk: StopAsk | null = null;
  /** What the loop's last stop came to, until `stop()` takes it. */
  #stopOutcome: StopOutcome | null = null;

  /**
   * `mailbox`: the worker's message count (`mailbox.ts`). With it the loop
   * sleeps in Atomics.wait (fast, reliable wake-ups) and yields to the event
   * loop only when the parent has posted a message; without it (the device
   * in a test's own thread) it sleeps with Atomics.waitAsync.
   */
  constructor(
    private readonly onFault: FaultHandler,
    private readonly mailbox?: DeviceMailbox,
  ) {
    this.rxq = new Virtqueue(this.memory, { name: "rx0", direction: CHAIN_DEVICE_WRITABLE });
    this.txq = new Virtqueue(this.memory, { name: "tx0", direction: CHAIN_DEVICE_READABLE });
    this.#kicks = new KickWatch([
      {
        // Not while the rx-post ring is full: then the device leaves offered buffers be.
        awaitsKick: () =>
          !this.#faulted[RX_QUEUE] && this.rxq.awaitsKick &&
          (this.#rx?.posted ?? Infinity) < (this.#rings?.rxPost.capacity ?? 0),
        lastAvailIdx: () => this.rxq.lastAvailIdx,
        counters: this.rxq.counters,
        event: EV_KICK_RX,
      },
      {
        awaitsKick: () => !this.#faulted[TX_QUEUE] && !this.#txBlocked && this.txq.awaitsKick,
        lastAvailIdx: () => this.txq.lastAvailIdx,
        counters: this.txq.counters,
        event: EV_KICK_TX,
      },
    ]);
  }

  get running(): boolean {
    return this.#running;
  }

  /** Adds granted regions. Throws RangeError/TypeError naming a bad one (nothing added then). */
  grant(regions: RegionGrant[]): void {
    const added: number[] = [];
    try {
      for (const r of regions) {
        if (!Number.isSafeInteger(r.hostAddr) || r.hostAddr <= 0) {
          throw new RangeError(
            `region at GPA ${r.guestPhysAddr}: host address ${r.hostAddr} is not an address`,
          );
        }
        const slot = this.memory.addRegion(r);
        this.hostBase[slot] = r.hostAddr;
        added.push(slot);
      }
    } catch (e) {
      for (const s of added) this.memory.removeRegion(s);
      throw e;
    }
  }

  /**
   * Gives back the named regions, in that order. The queues must be stopped
   * first (their rings may live there). Checks every name before it removes
   * anything: a region not granted, or named twice, throws RangeError and
   * nothing is given back. Returns the buffers to transfer to the parent.
   */
  revoke(regions: readonly RegionRef[]): ArrayBuffer[] {
    if (this.#running) throw new RangeError("cannot revoke guest memory while the queues run");
    const slots = regions.map((r) => {
      const slot = this.memory.findRegion(r.guestPhysAddr, r.size, r.userAddr);
      if (slot < 0) {
        throw new RangeError(
          `no granted region at GPA 0x${r.guestPhysAddr.toString(16)} of ${r.size} bytes`,
        );
      }
      return slot;
    });
    if (new Set(slots).size !== slots.length) {
      throw new RangeError("a region is named twice");
    }
    return slots.map((slot) => this.memory.removeRegion(slot));
  }

  /** The operator's policy from `hello` (`DeviceConfig`, validated): source MAC and MTU. */
  configure(config: { mac: readonly number[] | null; mtu: number }): void {
    this.sourceMac = config.mac === null ? null : Uint8Array.from(config.mac);
    this.mtu = config.mtu;
    this.#applyFeatures();
  }

  /** The driver's acknowledged features (already checked by negotiation.ts). */
  setFeatures(features: bigint, offloadMode: "auto" | "off"): void {
    this.features = features;
    this.offloadMode = offloadMode;
    this.#applyFeatures();
  }

  #applyFeatures(): void {
    if (this.#tx) {
      this.#tx.hostOffloads = hostOffloads(this.features);
      this.#tx.sinkOffloads = this.offloadMode === "auto" ? NET_OFFLOAD_ALL : 0;
      this.#tx.sourceMac = this.sourceMac;
      this.#tx.maxPlainFrame = this.mtu + ETH_HLEN + 2 * VLAN_HLEN;
    }
    if (this.#rx) {
      this.#rx.mergeable = (this.features & VIRTIO_NET_F_MRG_RXBUF) !== 0n;
      // What the poller may hand the guest as the tap wrote it.
      Atomics.store(this.rings.ctl, CTL.RX_TAKES, this.#rxTakes());
    }
  }

  /** RX_TAKES bits (`ipc/datapath.ts`) of the negotiated features. */
  #rxTakes(): number {
    const guest = guestOffloads(this.features);
    let t = 0;
    for (
      const type of [
        VIRTIO_NET_HDR_GSO_TCPV4,
        VIRTIO_NET_HDR_GSO_UDP,
        VIRTIO_NET_HDR_GSO_TCPV6,
        VIRTIO_NET_HDR_GSO_UDP_L4,
      ]
    ) {
      if (takesGso(guest, type)) t |= 1 << type;
    }
    if (guest & NET_OFFLOAD_TSO_ECN) t |= RXT_ECN;
    if (guest & NET_OFFLOAD_CSUM) t |= RXT_CSUM;
    if ((this.features & VIRTIO_NET_F_MRG_RXBUF) !== 0n) t |= RXT_MERGEABLE;
    return t;
  }

  /**
   * Places both queues, attaches fresh data-path rings and starts the loop.
   * The RX used ring is the poller's from here until `stop()` (RX
   * publication, `ipc/datapath.ts`). Throws RangeError naming what was
   * wrong (queues left stopped).
   */
  start(
    rx: QueuePlacement,
    tx: QueuePlacement,
    buffers: DatapathBuffers,
    bounceHost: number,
  ): void {
    if (this.#running || this.#rings !== null) {
      throw new RangeError(`queues are already ${this.#running ? "running" : "stopping"}`);
    }
    const rings = new DeviceIoRings(buffers, bounceHost);
    for (const [q, p] of [[this.rxq, rx], [this.txq, tx]] as const) {
      q.reset();
      q.configure({
        size: p.size,
        desc: p.desc,
        avail: p.avail,
        used: p.used,
        addressSpace: "user",
        features: this.features,
      });
      q.lastAvailIdx = p.base;
      // vhost-user: the ring state is taken from the base the front-end gives
      // (after a reconnect, its used index); used->idx follows it.
      q.usedIdx = p.base;
    }
    this.#rings = rings;
    // The poller completes RX chains from the used index the ring resumes at.
    this.rxq.handOverUsed();
    Atomics.store(rings.ctl, CTL.RX_USED_IDX, rx.base & 0xffff);
    this.#rx = new RxPath(this.rxq, rings, this.hostBase);
    this.#tx = new TxPath(this.memory, this.txq, rings, this.hostBase);
    this.#applyFeatures();
    this.#faulted = [false, false];
    this.#quiescing = false;
    this.#drained = false;
    this.#stopAsk = null;
    this.#stopOutcome = null;
    this.#txAgain = false;
    this.#rxAgain = false;
    this.#txBlocked = false;
    this.#kicks.clear();
    this.mailbox?.markStart();
    this.#running = true;
    this.#loop = this.#run();
  }

  /**
   * Stops both queues: completes what the I/O workers finished, un-pops the
   * RX chains they did not fill, returns every other chain, and reports each
   * queue's last_avail_idx for GET_VRING_BASE.
   *
   * The loop carries the stop out (`#run`): it may have begun already, when
   * the parent asked in the control block too (CTL.STOP_ASKED); this then
   * waits for it and answers the same.
   *
   * `quiesce`: first, what is in flight goes out: nothing new is popped or
   * posted, TX frames already taken go to the writer, until it released
   * every TX record or {@link QUIESCE_MAX_MS} passed. Then TX closes
   * (CTL.TX_CLOSED: a writer told to run until then may end).
   *
   * With `ioEndWaitMs` 0 the parent has ended the I/O workers already. With
   * more, it is ending them meanwhile (the stop costs one round trip between
   * threads instead of two): the rest waits until both workers' loops have
   * ended (CTL.IO_ENDED), for at most that long. If they have not by then,
   * this throws and the queues stay half stopped (no loop, nothing handed
   * back) until the next `stop()` finishes them.
   */
  async stop(ioEndWaitMs = 0, quiesce = false): Promise<{ rx: number; tx: number }> {
    if (this.#rings === null) return { rx: this.rxq.lastAvailIdx, tx: this.txq.lastAvailIdx };
    if (this.#running) {
      if (this.#stopAsk === null) this.#ask(ioEndWaitMs, quiesce, performance.now());
      this.#rings.wakeSelf(0);
      await this.#loop;
      const out = this.#stopOutcome;
      this.#stopOutcome = null;
      if (out !== null) {
        if ("error" in out) throw out.error;
        return out.bases;
      }
      if (this.#rings === null) {
        return { rx: this.rxq.lastAvailIdx, tx: this.txq.lastAvailIdx };
      }
    }
    return await this.#finishStop(ioEndWaitMs);
  }

  /** The loop is to stop (see {@link stop}). */
  #ask(ioEndWaitMs: number, quiesce: boolean, now: number): StopAsk {
    const ask = { ioEndWaitMs, quiesce, until: now + QUIESCE_MAX_MS, seen: false };
    this.#stopAsk = ask;
    this.#quiescing = quiesce;
    this.#drained = false;
    return ask;
  }

  /** A stop the parent asked for in the control block (CTL.STOP_ASKED), or null. */
  #askedInControl(ctl: Int32Array, now: number): StopAsk | null {
    const ms = Atomics.load(ctl, CTL.STOP_ASKED);
    if (ms === 0) return null;
    return this.#ask(ms > 0 && ms <= MAX_IO_END_WAIT_MS ? ms : MAX_IO_END_WAIT_MS, true, now);
  }

  /** The loop ends its part of a stop: nothing more is taken; the writer may end. */
  #closeQueues(rings: DeviceIoRings): void {
    Atomics.store(rings.ctl, CTL.TX_CLOSED, 1);
    rings.signalWriter(0);
    this.#running = false;
    this.#quiescing = false;
    this.#drained = false;
  }

  /**
   * The rest of a stop, once the loop has ended: waits for the I/O workers'
   * ends (`ioEndWaitMs` above 0), hands back what they did not finish, and
   * publishes the bases in the control block (CTL.STOP_BASES, CTL.STOPPED).
   */
  async #finishStop(ioEndWaitMs: number): Promise<{ rx: number; tx: number }> {
    const rings = this.#rings!;
    if (ioEndWaitMs > 0 && !await rings.ioEnded(ioEndWaitMs, this.mailbox !== undefined)) {
      throw new Error(
        `the I/O workers did not end in ${ioEndWaitMs} ms; the queues are not stopped`,
      );
    }
    // Retire what the poller completed before it stopped, whatever happened
    // to the queue: the used elements it names are in the ring already.
    const rxFaulted = this.#rx?.ioFault !== null;
    if (!rxFaulted) this.#rx?.complete();
    // The used ring is the device's again, from the poller's last used->idx.
    this.rxq.takeBackUsed(Atomics.load(rings.ctl, CTL.RX_USED_IDX) & 0xffff);
    this.#tx?.reap();
    this.#tx?.discardPending();
    // The writer published TX completions while it ran; it has ended, so the
    // device publishes again: every element it wrote, sent or not.
    this.txq.storeUsedIdx();
    // RX chains posted but not filled were the last ones popped (the poller
    // fills in post order): un-pop them, so they stay the guest's available
    // buffers for the next start instead of coming back as 0-byte frames
    // (which Linux counts as length errors). If they are not the last popped
    // (a bad chain was dropped after them), or after an RX fault, stop()
    // below returns them with len 0 instead.
    const unfilled = this.#rx?.forgetPosted() ?? 0;
    if (unfilled > 0 && !this.#faulted[RX_QUEUE]) {
      try {
        this.rxq.unpopAvail(unfilled);
      } catch {
        // not the last popped: returned with len 0 below
      }
    }
    this.rxq.onAvailIdx = null;
    // A poller that broke the protocol may have published chains the device
    // could not retire: completing them again would hand the driver a head
    // twice. The queue needs a reset anyway; nothing more is written.
    const rx = rxFaulted ? this.rxq.abandon() : this.rxq.stop();
    const tx = this.txq.stop();
    // For a parent that blocks on these words instead of waiting for the reply.
    Atomics.store(rings.ctl, CTL.STOP_BASES, (rx & 0xffff) | ((tx & 0xffff) << 16));
    Atomics.store(rings.ctl, CTL.STOPPED, 1);
    Atomics.notify(rings.ctl, CTL.STOPPED);
    this.#rings = null;
    this.#rx = null;
    this.#tx = null;
    return { rx, tx };
  }

  /** Device reset: stop, forget features and queue state (memory stays granted). */
  async reset(): Promise<void> {
    await this.stop();
    this.rxq.reset();
    this.txq.reset();
    this.features = 0n;
  }

  /** Counters per queue, for `get-stats`. */
  counters(): Record<string, Record<string, number>> {
    // The poller's RX_PUBLISHED records carry the RX counts: take them now.
    if (this.#running && this.#rx && this.#rx.ioFault === null) this.#rx.complete();
    const q = (vq: Virtqueue) => {
      const c = vq.counters;
      const out: Record<string, number> = {
        chains: c.chains,
        used: c.used,
        dropped: c.dropped,
        interrupts: c.interrupts,
        kicksMissed: c.kicksMissed,
      };
      for (const [k, v] of Object.entries(c.errors)) if (v) out[`error_${k}`] = v;
      return { ...out, ...vq.ringState() };
    };
    return {
      rx0: {
        ...q(this.rxq),
        // Calls made, as for tx0 (the queue's own count is of decisions, which may merge).
        ...(this.#rings ? { interrupts: this.#rings.rxInterrupts } : {}),
        ...(this.#rx?.counters() ?? {}),
      },
      tx0: {
        ...q(this.txq),
        ...(this.#rings ? { interrupts: this.#rings.txInterrupts } : {}),
        ...(this.#tx?.counters() ?? {}),
      },
      io: this.#rings?.ioCounters() ?? {},
    };
  }

  async #run(): Promise<void> {
    // start() runs inside the start-queues handler: let its reply go out
    // first. The loop below blocks the thread (Atomics.wait) until a message
    // or its slice ends, so without this turn the parent heard of the start
    // only up to BLOCKING_SLICE_MS later (a second of downtime on every
    // connection and every migration's switch-over).
    await macrotask();
    const rings = this.#rings!;
    const mail = this.mailbox;
    const mailPending = mail ? () => mail.pending(rings.ctl) : () => false;
    const noMail = () => false;
    // Look at both rings once at start, as if kicked: a queue resumed at a
    // non-zero base may already hold buffers whose kick the driver suppressed.
    let more = true;
    let first = EV_KICK_RX | EV_KICK_TX;
    let turned = performance.now();
    const kicks = this.#kicks;
    for (;;) {
      let now = performance.now();
      // A stop runs to its end here, without turns of the event loop: the
      // message that asked for it (if one did) can wait; nothing else may
      // come in between (its time is a migration's downtime).
      const stop = this.#stopAsk ?? this.#askedInControl(rings.ctl, now);
      if (
        stop !== null &&
        (!stop.quiesce || this.#drained || this.#faulted[TX_QUEUE] || now >= stop.until)
      ) {
        this.#closeQueues(rings);
        break;
      }
      if (mail && stop === null) {
        // Let the event loop deliver what the parent posted (a timer's turn:
        // `ipc/macrotask.ts`), and run timers and replies now and then; that
        // turn is a timer's too, so that a message the count missed still
        // arrives. (Were the counts ever out of step the other way, the data
        // path would go on a pass per turn but keep moving, not stall.)
        if (mailPending() || now - turned > BLOCKING_SLICE_MS) {
          await messageTurn();
          now = turned = performance.now();
          // A stop the message asked for goes first; else this pass works on.
          if (this.#stopAsk !== null) continue;
        }
      }
      // A quiesce looks at TX at once, as if the writer had released records
      // (it may hold none: nothing would wake the loop).
      let quiesceNow = 0;
      if (stop !== null && !stop.seen) {
        stop.seen = true;
        quiesceNow = EV_TX_DONE;
      }
      const ev = rings.takeEvents() | first | kicks.look(now) | quiesceNow;
      first = 0;
      if (ev === 0 && !more) {
        if (stop !== null) {
          const left = Math.max(1, stop.until - now);
          if (mail) rings.sleepBlocking(left, noMail);
          else await rings.sleep(left);
        } else if (mail) {
          rings.sleepBlocking(kicks.sleepFor(now, BLOCKING_SLICE_MS), mailPending);
        } else await rings.sleep(kicks.sleepFor(now, IDLE_WAIT_MS));
        continue;
      }
      kicks.worked();
      more = this.#work(ev);
      // Let control messages (macrotasks) in between batches, even under load.
      if (more && !mail && stop === null) await macrotask();
    }
    const ask = this.#stopAsk!;
    this.#stopAsk = null;
    try {
      this.#stopOutcome = { bases: await this.#finishStop(ask.ioEndWaitMs) };
    } catch (e) {
      this.#stopOutcome = { error: e instanceof Error ? e : new Error(String(e)) };
    }
  }

  /** One pass over both queues; returns true when there is more to do at once. */
  #work(ev: number): boolean {
    const rx = this.#rx!;
    const tx = this.#tx!;
    let more = false;
    if (ev & EV_IO_FAULT) this.onFault(-1, "an I/O worker refused a record (see io counters)");

    const quiescing = this.#quiescing;
    if (!this.#faulted[RX_QUEUE] && rx.complete() < 0) {
      this.#fault(RX_QUEUE, rx.ioFault ?? "I/O fault");
    }
    // A queue the records just faulted takes no more of the guest's chains.
    if (!this.#faulted[RX_QUEUE]) {
      if (
        !quiescing &&
        (ev & (EV_KICK_RX | EV_RX_DONE | EV_RX_STARVED) || rx.posted === 0 || this.#rxAgain)
      ) {
        rx.post();
        // post() takes rx-done records too (Virtqueue.onAvailIdx).
        if (rx.ioFault !== null) this.#fault(RX_QUEUE, rx.ioFault);
        if (rx.posted >= 2 * rxSignalChains(this.rxq.size)) {
          // Plenty posted: the poller wakes us before it runs low (ipc/datapath.ts),
          // so the guest's refills need not kick (each kick wakes two threads).
          this.rxq.disableNotifications();
          this.#rxAgain = false;
        } else {
          // Ask for a kick when the guest adds buffers; if it already did, post them now.
          this.#rxAgain = this.rxq.enableNotifications() &&
            rx.posted < this.rings.rxPost.capacity;
          if (this.#rxAgain) more = true;
        }
      }
    }
    if (!this.#faulted[TX_QUEUE]) {
      // Completions are the writer's to publish; the tail frees ring and bounce space.
      tx.reap();
      if (ev & (EV_KICK_TX | EV_TX_DONE) || tx.pending > 0 || this.#txAgain) {
        this.#txAgain = false;
        this.#txBlocked = tx.pump(!quiescing);
        if (quiescing) {
          // Wake when the writer releases records; done once it released them all.
          if (tx.pending === 0 && tx.inFlight === 0) {
            this.#drained = true;
            more = true;
          } else {
            this.#txAgain = tx.waitForWriter();
          }
        } else if (this.#txBlocked) {
          // Out of ring or bounce space: go on once the writer released some.
          this.#txAgain = tx.waitForWriter();
        } else {
          // The driver added chains while notifications were off: no kick will say so.
          this.#txAgain = this.txq.enableNotifications();
        }
        if (this.#txAgain) more = true;
      }
    }
    // A poller that read the kick waits for this answer (records or not:
    // it writes what there is, and must not wait longer for nothing).
    if (ev & EV_KICK_TX) this.#rings!.answerPoller();
    // Used rings and their interrupts are the I/O workers' (ipc/datapath.ts): never written here.
    for (const [i, q] of [[RX_QUEUE, this.rxq], [TX_QUEUE, this.txq]] as const) {
      if (q.needsReset && !this.#faulted[i]) this.#fault(i, q.resetReason ?? "needs reset");
    }
    return more;
  }

  private get rings(): DeviceIoRings {
    return this.#rings!;
  }

  #fault(queue: number, reason: string): void {
    this.#faulted[queue] = true;
    // The poller completes RX chains: it must stop too.
    if (queue === RX_QUEUE && this.#rings) Atomics.store(this.#rings.ctl, CTL.RX_STOPPED, 1);
    this.onFault(queue, reason);
  }
}
