/**
 * One queue pair's poller: the loop that waits in `epoll_wait` on the tap,
 * the pair's kick eventfds and the worker's wake eventfd (`wait_set.ts`),
 * receives frames (`rx_receiver.ts`), turns kicks into device events, and
 * writes the TX records the device answers a TX kick with (`tx_drain.ts`).
 * Everything it holds is its own: one pair is one instance. The worker that
 * runs it (`poller_worker.ts`) only wires control messages to it.
 *
 * TX after a kick: the poller announces CTL.POLLER_AWAITS_TX before it
 * raises EV_KICK_TX, waits (at most {@link TX_ANSWER_WAIT_MS}) for the
 * device's answer, and writes the records itself with its own `TxDrainer`,
 * in turns with the writer, which writes what the device publishes at other
 * times. A guest's frame then wakes two threads, not three (kick -> poller
 * -> device -> poller), and the TCP ACK the host's stack sends back during
 * the write is read by the wait that follows at once.
 *
 * Kicks are edge-triggered and never read as they come (one system call
 * less per guest kick); each kick eventfd is read once when the poller lets
 * go of it, so its counter is left at zero as if every kick had been read.
 *
 * Rate limits: while the NIC's RX limit holds the tap, the receiver's look
 * stops watching it and gives the wait a timeout (`rx_receiver.ts`); TX
 * records it leaves for want of tokens go to the writer, which waits for
 * them on a timer (`tx_drain.ts`).
 *
 * A thread blocked in `epoll_wait` sees neither Atomics nor postMessage. So:
 * - the tap is watched only while RX chains are posted; otherwise the
 *   receiver sets CTL.POLLER_STARVED and re-checks the rx-post ring (Dekker
 *   with the device, which publishes and then reads POLLER_STARVED and asks
 *   the writer for WEV_WAKE_POLLER);
 * - the parent posts a control message and then writes the wake eventfd; on
 *   waking the poller drains it and, while its mailbox (`protocol.ts`) says
 *   messages are waiting, yields to the event loop, which serves them.
 *   Control messages are served only there, between batches, so an ack
 *   means the old regions/descriptors are out of use.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import { macrotask, messageTurn } from "../../ipc/macrotask.ts";
import { SpscRing } from "../../ipc/spsc_ring.ts";
import {
  CTL,
  EV_KICK_RX,
  EV_KICK_TX,
  POLLER_ENGINE_IO_URING,
  POLLER_ENGINE_READV,
  RX_QUEUE,
  signal,
  TX_QUEUE,
  WEV_TX,
} from "../../ipc/datapath.ts";
import type { IoRegions } from "./regions.ts";
import { TxDrainer, writeEventfd } from "./tx_drain.ts";
import { WaitSet } from "./wait_set.ts";
import type { FaultNotice, InfoNotice, InitRequest } from "./protocol.ts";
import { RX_BATCH, RxReceiver } from "./rx_receiver.ts";
import { RxPublisher } from "./rx_publisher.ts";
import { DirtyLog } from "./dirty_log.ts";
import { CaptureProducer } from "./capture_ring.ts";
import { TapReadEngine } from "./rx_engine.ts";
import { RateLimiter } from "./rate_limiter.ts";

const { EINTR } = libc.Errno;

/** Longest the poller yields for a message the mailbox announced (the parent retries anyway). */
const MAIL_WAIT_MS = 100;
/**
 * How long the poller waits for the device's answer to a TX kick (ms)
 * before it leaves the records to the writer. The device answers as soon as
 * its pass over the TX queue is done, records or not; this bounds the delay
 * RX and control messages see when it is slow to wake.
 */
const TX_ANSWER_WAIT_MS = 2;
/** Batches the poller writes per kick at most; a longer run is the writer's. */
const TX_BATCHES_PER_KICK = 4;

/** What the poller waits on (`wait_set.ts`), by tag. */
const TAG_WAKE = 0;
const TAG_KICK = [1, 2]; // indexed by RX_QUEUE / TX_QUEUE
const TAG_TAP = 3;
/** Kicks are edge-triggered: each guest kick is reported once, and the eventfd is not read. */
const KICK_EVENTS = libc.EPOLLIN | libc.EPOLLET;
const BAD_FD = libc.EPOLLERR | libc.EPOLLHUP;

/** What the poller needs of the worker that runs it. */
export interface PollerWorker {
  /** Posts a notice or fault to the parent. */
  post(n: InfoNotice | FaultNotice): void;
  /** A stop was asked for: the loop ends. */
  readonly stopping: boolean;
  /** The loop has ended: no more guest memory access (said before the teardown). */
  loopEnded(): void;
  /** Whether the parent posted a message not served yet. */
  mailPending(): boolean;
}

/** One queue pair's poller (see the module comment). */
export class PairPoller {
  readonly #ctl: Int32Array;
  readonly #waits: WaitSet;
  readonly #wakeFd: number;
  readonly #tap: TapReadEngine;
  /** The wait set reported the tap invalid; cleared by a new tap. */
  #tapBroken = false;
  readonly #rx: RxReceiver;
  readonly #publisher: RxPublisher;
  /** Writes TX records after the kicks this poller read (null: the writer alone does). */
  readonly #tx: TxDrainer | null;
  readonly #kickFd: [number, number] = [-1, -1];
  #callRxFd = -1;
  readonly #worker: PollerWorker;

  /**
   * Attaches what `init` carries. Throws when the wake eventfd cannot be
   * waited on or the RX used ring is not in `regions`.
   */
  constructor(msg: InitRequest, ctl: Int32Array, regions: IoRegions, worker: PollerWorker) {
    if (msg.rxUsed === null) throw new Error("init: the poller needs the RX used ring (rxUsed)");
    this.#ctl = ctl;
    this.#worker = worker;
    const waits = new WaitSet();
    if (!waits.set(TAG_WAKE, msg.wakeFd, libc.EPOLLIN)) {
      waits.close();
      throw new Error(`wake fd ${msg.wakeFd} cannot be waited on`);
    }
    this.#waits = waits;
    this.#wakeFd = msg.wakeFd;
    this.#tap = new TapReadEngine(msg.tapFd);
    const publisher = new RxPublisher(ctl, msg.rxUsed, regions, () => {
      if (this.#callRxFd < 0) return false;
      return writeEventfd(ctl, this.#callRxFd, CTL.POLLER_ERRORS);
    });
    publisher.log = msg.log === null ? null : new DirtyLog(msg.log);
    // One capture ring for this worker: its RX frames and the TX frames it writes.
    const capture = msg.capture === null
      ? null
      : new CaptureProducer(msg.capture.ring, msg.capture.state);
    publisher.capture = capture;
    this.#publisher = publisher;
    // The NIC's rate limits, the same buckets for every worker of every pair.
    const limiter = msg.rateLimit === null
      ? null
      : new RateLimiter(msg.rateLimit, libc.monotonicMs);
    this.#rx = new RxReceiver({
      ctl,
      rxPost: SpscRing.attach(msg.rxPost),
      rxLong: SpscRing.attach(msg.rxLong),
      rxDone: SpscRing.attach(msg.rxDone),
      memory: regions,
      publisher,
      engine: this.#tap,
      frameRoom: msg.rxFrameRoom,
      notice: (message) => worker.post({ kind: "notice", message }),
      fault: (message) => worker.post({ kind: "fault", message }),
      limiter,
    });
    this.#tx = null;
    if (msg.txShared !== null) {
      // TX frames after kicks it read (tx_drain.ts), in turns with the writer.
      const t = new TxDrainer(
        ctl,
        msg.txShared,
        (n) => worker.post(n),
        -1,
        "tap writes after the poller's kicks",
      );
      t.ring = SpscRing.attach(msg.tx);
      t.regions = regions;
      t.tapFd = msg.tapFd;
      t.setTxUsed(msg.txUsed);
      t.log = publisher.log;
      t.limiter = limiter;
      t.capture = capture;
      t.start(msg.ioUring, msg.rings[0] ?? null);
      this.#tx = t;
    }
    this.#startEngine(msg);
  }

  /** The longest frame the tap can hand us now. */
  set frameRoom(bytes: number) {
    this.#rx.frameRoom = bytes;
  }

  /** Dirty logging starts, changes or ends (null). */
  setLog(log: DirtyLog | null): void {
    this.#publisher.log = log;
    if (this.#tx) this.#tx.log = log;
  }

  /** New ranges iovecs may point into. */
  setRegions(r: IoRegions): void {
    this.#tx?.setRegions(r);
    this.#rx.setMemory(r);
  }

  /** Sets (or with -1 clears) one of the poller's descriptors. */
  setFd(slot: "tap" | "kickRx" | "kickTx" | "callRx" | "callTx", fd: number): void {
    if (slot === "tap") {
      this.#tap.tapFd = fd;
      this.#tapBroken = false;
      if (this.#tx) this.#tx.tapFd = fd;
    } else if (slot === "callRx") {
      this.#callRxFd = fd;
    } else if (slot === "callTx") {
      if (this.#tx) this.#tx.callFd = fd;
    } else {
      this.#watchKick(slot === "kickRx" ? RX_QUEUE : TX_QUEUE, fd);
    }
  }

  /**
   * Runs until the worker is asked to stop; then lets go of the parent's
   * descriptors ({@link release} takes down the rest).
   */
  async run(): Promise<void> {
    const c = this.#ctl, ws = this.#waits, rx = this.#rx, worker = this.#worker;
    while (!worker.stopping) {
      const look = this.#tap.tapFd >= 0 && !this.#tapBroken
        ? rx.look(performance.now())
        : { watch: false, timeoutMs: -1, bits: 0 };
      let bits = look.bits;
      // Level-triggered: watched while there is room, quiet otherwise.
      const tapFd = this.#tap.tapFd >= 0 && !this.#tapBroken ? this.#tap.tapFd : -1;
      if (!ws.set(TAG_TAP, tapFd, look.watch ? libc.EPOLLIN : 0)) {
        this.#tapBroken = true;
        Atomics.add(c, CTL.POLLER_ERRORS, 1);
      }
      if (bits === 0) {
        const r = ws.wait(look.timeoutMs);
        if (r < 0) {
          if (libc.errno() !== EINTR) {
            Atomics.add(c, CTL.POLLER_ERRORS, 1);
            await macrotask(); // do not spin on a persistent error
          }
          continue;
        }
      } else {
        ws.clear();
      }
      // Kicks first: edge-triggered, a kick reported now is never reported again.
      bits |= this.#kick(RX_QUEUE, EV_KICK_RX);
      bits |= this.#kick(TX_QUEUE, EV_KICK_TX);
      if (ws.ready(TAG_WAKE) !== 0) {
        // Woken for control messages (or by the writer for new RX buffers): drain,
        // let the event loop serve messages, and look at everything again.
        libc.eventfdDrain(this.#wakeFd);
        if (bits !== 0) {
          signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
        }
        const deadline = performance.now() + MAIL_WAIT_MS;
        while (worker.mailPending() && !worker.stopping && performance.now() < deadline) {
          await messageTurn();
        }
        continue;
      }
      // A TX kick: wait for the device's answer and write its records here
      // (announced before the device can see the kick; it answers either way).
      const awaitTx = (bits & EV_KICK_TX) !== 0 && this.#tx !== null;
      let answerSeen = 0;
      if (awaitTx) {
        answerSeen = Atomics.load(c, CTL.POLLER_DOORBELL);
        Atomics.store(c, CTL.POLLER_AWAITS_TX, 1);
      }
      const tapEv = ws.ready(TAG_TAP);
      if (look.watch && (tapEv & libc.EPOLLIN)) {
        bits |= rx.receive();
      } else if (tapEv & BAD_FD) {
        // Reported even while the tap is quiet: stop watching it (next pass) or we would spin.
        this.#tapBroken = true;
        Atomics.add(c, CTL.POLLER_ERRORS, 1);
      }
      if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
      if (awaitTx) {
        const txBits = this.#writeKickedTx(this.#tx!, answerSeen);
        if (txBits !== 0) {
          signal(c, CTL.DEVICE_EVENTS, txBits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
        }
        // The next wait finds at once what the writes brought back (a TCP
        // ACK from the host's stack, typically): no sleep, no wake-up.
      }
    }
    worker.loopEnded();
    // The kick eventfds are the parent's, closed once the stop is acked.
    for (const q of [RX_QUEUE, TX_QUEUE]) this.#letGoOfKick(q);
  }

  /**
   * After {@link run} and the stop's ack: takes down what this poller set
   * up (its io_uring mappings, the files it registered on lent rings, its
   * epoll set). No descriptor of the parent's is touched here.
   */
  release(): void {
    this.#tap.close();
    this.#tx?.close();
    this.#waits.close();
  }

  /**
   * After a TX kick: waits for the device's answer (CTL.POLLER_AWAITS_TX),
   * then writes the TX records it finds, taking turns with the writer
   * (`tx_drain.ts`). One thread fewer per kick than handing them to the
   * writer: kick -> poller -> device -> poller. Returns device event bits.
   */
  #writeKickedTx(d: TxDrainer, seen: number): number {
    const c = this.#ctl;
    if (Atomics.load(c, CTL.POLLER_AWAITS_TX) !== 0) {
      Atomics.wait(c, CTL.POLLER_DOORBELL, seen, TX_ANSWER_WAIT_MS);
    }
    // Answered, or given up: from now on the device wakes the writer.
    Atomics.store(c, CTL.POLLER_AWAITS_TX, 0);
    let bits = 0;
    for (let i = 0; i < TX_BATCHES_PER_KICK; i++) {
      bits |= d.drain();
      if (d.holdMs !== 0) break; // held by the rate limit: the writer waits for the tokens
      if (d.lastCount === 0) return bits; // empty, or the writer holds the ring and looks again
      Atomics.add(c, CTL.POLLER_TX_BATCHES, 1);
    }
    // Stopped with records perhaps left: they are the writer's (it may have
    // found the ring taken and gone to sleep).
    if (d.pending()) signal(c, CTL.WRITER_EVENTS, WEV_TX, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
    return bits;
  }

  /** Picks the read engine: io_uring batches when allowed and the kernel agrees, else `readv`. */
  #startEngine(msg: InitRequest): void {
    const c = this.#ctl, tap = this.#tap, mode = msg.ioUring, room = msg.rxFrameRoom;
    if (mode === "auto") {
      const { batching, message } = tap.startBatching(RX_BATCH, msg.rings[1] ?? null);
      if (batching) {
        Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_IO_URING);
        this.#worker.post({
          kind: "notice",
          message: `tap reads: io_uring, up to ${RX_BATCH} frames per system call into ` +
            `buffers that take ${room} bytes; else one readv per frame${message}`,
        });
        return;
      }
      this.#worker.post({
        kind: "notice",
        message: `tap reads: one readv per frame (io_uring unavailable: ${message})`,
      });
    } else {
      this.#worker.post({
        kind: "notice",
        message: "tap reads: one readv per frame (--io-uring off)",
      });
    }
    Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_READV);
  }

  /** The device event for the queue's kick if the wait reported one (a broken fd is let go of). */
  #kick(queue: number, bit: number): number {
    const ev = this.#waits.ready(TAG_KICK[queue]);
    if (ev & libc.EPOLLIN) {
      Atomics.add(this.#ctl, queue === RX_QUEUE ? CTL.RX_KICKS : CTL.TX_KICKS, 1);
      return bit;
    }
    if (ev & BAD_FD) {
      // Not an fd we can wait on: stop watching it until the parent sets another.
      this.#waits.set(TAG_KICK[queue], -1, 0);
      this.#kickFd[queue] = -1;
      Atomics.add(this.#ctl, CTL.POLLER_ERRORS, 1);
    }
    return 0;
  }

  /** Watches `fd` for the queue's kicks (-1: none). A descriptor the kernel refuses counts as an error. */
  #watchKick(queue: number, fd: number): void {
    this.#letGoOfKick(queue);
    this.#kickFd[queue] = fd;
    if (fd >= 0 && !this.#waits.set(TAG_KICK[queue], fd, KICK_EVENTS)) {
      this.#kickFd[queue] = -1;
      Atomics.add(this.#ctl, CTL.POLLER_ERRORS, 1);
    }
  }

  /**
   * Stops watching the queue's kick eventfd and reads it once: kicks are not
   * read as they come (edge-triggered), so this leaves its counter at zero, as
   * if each had been read, for whoever watches it next (the VMM, or the next
   * start, which looks at the rings anyway).
   */
  #letGoOfKick(queue: number): void {
    const fd = this.#kickFd[queue];
    if (fd < 0) return;
    this.#waits.set(TAG_KICK[queue], -1, 0);
    libc.eventfdDrain(fd);
    this.#kickFd[queue] = -1;
  }
}
