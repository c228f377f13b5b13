/// <reference lib="deno.worker" />
/**
 * The poller: the privileged I/O worker that blocks in `epoll_wait` on the
 * tap, the queues' kick eventfds and its own wake eventfd (`wait_set.ts`);
 * receives frames into the guest buffers the device posted and completes
 * them (`rx_receiver.ts`, `rx_publisher.ts`), and turns kicks into device
 * events (`ipc/datapath.ts`). This file is the wiring: the wait, the kicks,
 * TX after a kick, and the parent's control messages. Kicks are
 * edge-triggered and never read as they come (one system call less per
 * guest kick); the poller reads each kick eventfd once when it lets go of
 * it, so its counter is left at zero as if every kick had been read.
 *
 * TX after a kick: the poller announces CTL.POLLER_AWAITS_TX before it
 * raises EV_KICK_TX, waits (at most {@link TX_ANSWER_WAIT_MS}) for the
 * device's answer, and writes the records itself with its own `TxDrainer`
 * (`tx_drain.ts`), in turns with the writer, which writes what the device
 * publishes at other times. A guest's frame then wakes two threads, not
 * three (kick -> poller -> device -> poller), and the TCP ACK the host's
 * stack sends back during the write is read by the wait that follows at
 * once, without a wake-up of its own.
 *
 * Runs with FFI only (`IO_POLLER_OPTIONS` in `datapath_host.ts`).
 *
 * A thread blocked in `epoll_wait` sees neither Atomics nor postMessage. So:
 * - the tap is watched only while RX chains are posted; otherwise the
 *   receiver sets CTL.POLLER_STARVED and re-checks the rx-post ring (Dekker
 *   with the device, which publishes and then reads POLLER_STARVED and asks
 *   the writer for WEV_WAKE_POLLER);
 * - the parent posts a control message and then writes the wake eventfd; on
 *   waking the poller drains it and, while its mailbox (`io/protocol.ts`)
 *   says messages are waiting, yields to the event loop, which serves them.
 *   Control messages are served only there, between batches, so an ack
 *   means the old regions/descriptors are out of use.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import { macrotask } from "../../ipc/macrotask.ts";
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
import { IoRegions } from "./regions.ts";
import { TxDrainer, writeEventfd } from "./tx_drain.ts";
import { WaitSet } from "./wait_set.ts";
import type { IoUringMode } from "./protocol.ts";
import { WorkerControl } from "./worker_control.ts";
import { RX_BATCH, RxReceiver } from "./rx_receiver.ts";
import { RxPublisher } from "./rx_publisher.ts";
import { TapReadEngine } from "./rx_engine.ts";

const { EINTR } = libc.Errno;

/** Longest the poller yields for a message the mailbox announced (the parent retries anyway). */
const MAIL_WAIT_MS = 100;

/** What the poller waits on (`wait_set.ts`), by tag. */
const TAG_WAKE = 0;
const TAG_KICK = [1, 2]; // indexed by RX_QUEUE / TX_QUEUE
const TAG_TAP = 3;
/** Kicks are edge-triggered: each guest kick is reported once, and the eventfd is not read. */
const KICK_EVENTS = libc.EPOLLIN | libc.EPOLLET;
const BAD_FD = libc.EPOLLERR | libc.EPOLLHUP;

/** u64 counter of an eventfd read. */
const counter = new Uint8Array(new ArrayBuffer(8));

/** Reads an eventfd's counter without blocking; true if it was non-zero. */
function readEventfd(fd: number): boolean {
  return Number(libc.sys.read(fd, counter, 8n)) === 8;
}

/** Everything one started poller holds: set at init, changed only by control messages. */
interface Poller {
  ctl: Int32Array;
  waits: WaitSet;
  wakeFd: number;
  tap: TapReadEngine;
  /** Set when the wait set reported the tap invalid; cleared by a new tap. */
  tapBroken: boolean;
  rx: RxReceiver;
  /** Writes TX records after the kicks this worker read (null: the writer alone does). */
  tx: TxDrainer | null;
  kickFd: [number, number];
  callRxFd: number;
}

let poller: Poller | null = null;

async function loop(p: Poller): Promise<void> {
  const { ctl: c, waits: ws, rx } = p;
  while (control.stopId === null) {
    const look = p.tap.tapFd >= 0 && !p.tapBroken
      ? rx.look(performance.now())
      : { watch: false, timeoutMs: -1, bits: 0 };
    let bits = look.bits;
    // Level-triggered: watched while there is room, quiet otherwise.
    const tapFd = p.tap.tapFd >= 0 && !p.tapBroken ? p.tap.tapFd : -1;
    if (!ws.set(TAG_TAP, tapFd, look.watch ? libc.EPOLLIN : 0)) {
      p.tapBroken = true;
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
    bits |= kick(p, RX_QUEUE, EV_KICK_RX);
    bits |= kick(p, TX_QUEUE, EV_KICK_TX);
    if (ws.ready(TAG_WAKE) !== 0) {
      // Woken for control messages (or by the writer for new RX buffers): drain,
      // let the event loop serve messages, and look at everything again.
      readEventfd(p.wakeFd);
      if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
      const deadline = performance.now() + MAIL_WAIT_MS;
      while (control.mailPending() && control.stopId === null && performance.now() < deadline) {
        await macrotask();
      }
      continue;
    }
    // A TX kick: wait for the device's answer and write its records here
    // (announced before the device can see the kick; it answers either way).
    const awaitTx = (bits & EV_KICK_TX) !== 0 && p.tx !== null;
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
      p.tapBroken = true;
      Atomics.add(c, CTL.POLLER_ERRORS, 1);
    }
    if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
    if (awaitTx) {
      const txBits = writeKickedTx(p.tx!, c, answerSeen);
      if (txBits !== 0) {
        signal(c, CTL.DEVICE_EVENTS, txBits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
      }
      // The next wait finds at once what the writes brought back (a TCP
      // ACK from the host's stack, typically): no sleep, no wake-up.
    }
  }
  p.tap.close();
  p.tx?.close();
  for (const q of [RX_QUEUE, TX_QUEUE]) letGoOfKick(p, q);
  p.waits.close();
  poller = null;
  control.finish();
}

/**
 * How long the poller waits for the device's answer to a TX kick (ms)
 * before it leaves the records to the writer. The device answers as soon as
 * its pass over the TX queue is done, records or not; this bounds the delay
 * RX and control messages see when it is slow to wake.
 */
const TX_ANSWER_WAIT_MS = 2;
/** Batches the poller writes per kick at most; a longer run is the writer's. */
const TX_BATCHES_PER_KICK = 4;

/**
 * After a TX kick: waits for the device's answer (CTL.POLLER_AWAITS_TX),
 * then writes the TX records it finds, taking turns with the writer
 * (`tx_drain.ts`). One thread fewer per kick than handing them to the
 * writer: kick -> poller -> device -> poller. Returns device event bits.
 */
function writeKickedTx(d: TxDrainer, c: Int32Array, seen: number): number {
  if (Atomics.load(c, CTL.POLLER_AWAITS_TX) !== 0) {
    Atomics.wait(c, CTL.POLLER_DOORBELL, seen, TX_ANSWER_WAIT_MS);
  }
  // Answered, or given up: from now on the device wakes the writer.
  Atomics.store(c, CTL.POLLER_AWAITS_TX, 0);
  let bits = 0;
  for (let i = 0; i < TX_BATCHES_PER_KICK; i++) {
    bits |= d.drain();
    if (d.lastCount === 0) return bits; // empty, or the writer holds the ring and looks again
    Atomics.add(c, CTL.POLLER_TX_BATCHES, 1);
  }
  // Stopped with records perhaps left: they are the writer's (it may have
  // found the ring taken and gone to sleep).
  if (d.pending()) signal(c, CTL.WRITER_EVENTS, WEV_TX, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
  return bits;
}

/** Picks the read engine: io_uring batches when allowed and the kernel agrees, else `readv`. */
function startEngine(c: Int32Array, tap: TapReadEngine, mode: IoUringMode, room: number): void {
  if (mode === "auto") {
    const { batching, message } = tap.startBatching(RX_BATCH);
    if (batching) {
      Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_IO_URING);
      control.post({
        kind: "notice",
        message: `tap reads: io_uring, up to ${RX_BATCH} frames per system call into ` +
          `buffers that take ${room} bytes; else one readv per frame${message}`,
      });
      return;
    }
    control.post({
      kind: "notice",
      message: `tap reads: one readv per frame (io_uring unavailable: ${message})`,
    });
  } else {
    control.post({ kind: "notice", message: "tap reads: one readv per frame (--io-uring off)" });
  }
  Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_READV);
}

function kick(p: Poller, queue: number, bit: number): number {
  const ev = p.waits.ready(TAG_KICK[queue]);
  if (ev & libc.EPOLLIN) {
    Atomics.add(p.ctl, queue === RX_QUEUE ? CTL.RX_KICKS : CTL.TX_KICKS, 1);
    return bit;
  }
  if (ev & BAD_FD) {
    // Not an fd we can wait on: stop watching it until the parent sets another.
    p.waits.set(TAG_KICK[queue], -1, 0);
    p.kickFd[queue] = -1;
    Atomics.add(p.ctl, CTL.POLLER_ERRORS, 1);
  }
  return 0;
}

/** Watches `fd` for the queue's kicks (-1: none). A descriptor the kernel refuses counts as an error. */
function watchKick(p: Poller, queue: number, fd: number): void {
  letGoOfKick(p, queue);
  p.kickFd[queue] = fd;
  if (fd >= 0 && !p.waits.set(TAG_KICK[queue], fd, KICK_EVENTS)) {
    p.kickFd[queue] = -1;
    Atomics.add(p.ctl, CTL.POLLER_ERRORS, 1);
  }
}

/**
 * Stops watching the queue's kick eventfd and reads it once: kicks are not
 * read as they come (edge-triggered), so this leaves its counter at zero, as
 * if each had been read, for whoever watches it next (the VMM, or the next
 * start, which looks at the rings anyway).
 */
function letGoOfKick(p: Poller, queue: number): void {
  const fd = p.kickFd[queue];
  if (fd < 0) return;
  p.waits.set(TAG_KICK[queue], -1, 0);
  readEventfd(fd);
  p.kickFd[queue] = -1;
}

// ---- control messages ----------------------------------------------------------------

const control = new WorkerControl("poller", {
  init(msg, c) {
    if (msg.rxUsed === null) throw new Error("init: the poller needs the RX used ring (rxUsed)");
    const regions = IoRegions.from(msg.ranges);
    const waits = new WaitSet();
    if (!waits.set(TAG_WAKE, msg.wakeFd, libc.EPOLLIN)) {
      waits.close();
      throw new Error(`wake fd ${msg.wakeFd} cannot be waited on`);
    }
    const tap = new TapReadEngine(msg.tapFd);
    const p: Poller = {
      ctl: c,
      waits,
      wakeFd: msg.wakeFd,
      tap,
      tapBroken: false,
      rx: null as unknown as RxReceiver,
      tx: null,
      kickFd: [-1, -1],
      callRxFd: -1,
    };
    const publisher = new RxPublisher(c, msg.rxUsed, regions, () => {
      if (p.callRxFd < 0) return false;
      return writeEventfd(c, p.callRxFd, CTL.POLLER_ERRORS);
    });
    p.rx = new RxReceiver({
      ctl: c,
      rxPost: SpscRing.attach(msg.rxPost),
      rxLong: SpscRing.attach(msg.rxLong),
      rxDone: SpscRing.attach(msg.rxDone),
      memory: regions,
      publisher,
      engine: tap,
      frameRoom: msg.rxFrameRoom,
      notice: (message) => control.post({ kind: "notice", message }),
      fault: (message) => control.post({ kind: "fault", message }),
    });
    if (msg.txShared !== null) {
      // TX frames after kicks it read (tx_drain.ts), in turns with the writer.
      const t = new TxDrainer(
        c,
        msg.txShared,
        (n) => control.post(n),
        -1,
        "tap writes after the poller's kicks",
      );
      t.ring = SpscRing.attach(msg.tx);
      t.regions = regions;
      t.tapFd = msg.tapFd;
      t.setTxUsed(msg.txUsed);
      t.start(msg.ioUring);
      p.tx = t;
    }
    startEngine(c, tap, msg.ioUring, msg.rxFrameRoom);
    poller = p;
    return () => loop(p);
  },
  setRxFrameRoom(bytes) {
    if (poller) poller.rx.frameRoom = bytes;
  },
  setRegions(r) {
    if (!poller) return;
    poller.tx?.setRegions(r);
    poller.rx.setMemory(r);
  },
  setFd(slot, fd) {
    const p = poller;
    if (!p) throw new Error(`setFd ${slot}: not initialised`);
    if (slot === "tap") {
      p.tap.tapFd = fd;
      p.tapBroken = false;
      if (p.tx) p.tx.tapFd = fd;
    } else if (slot === "callRx") {
      p.callRxFd = fd;
    } else if (slot === "callTx") {
      if (p.tx) p.tx.callFd = fd;
    } else {
      watchKick(p, slot === "kickRx" ? RX_QUEUE : TX_QUEUE, fd);
    }
  },
  // The parent writes the wake eventfd with every message; epoll_wait returns then.
  wake() {},
});
