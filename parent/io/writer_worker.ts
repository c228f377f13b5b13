/// <reference lib="deno.worker" />
/**
 * The writer: the privileged I/O worker that writes the device's TX records
 * to the tap straight from guest memory and publishes their TX completions
 * (`tx_drain.ts`), and wakes the poller for the device (`ipc/datapath.ts`). The poller writes TX records too when
 * it waits for the device's answer to a kick it read; the two take turns on
 * the ring.
 *
 * Runs with FFI only (`IO_WRITER_OPTIONS` in `datapath_host.ts`).
 *
 * Loop: announce WRITER_SLEEPING, load the doorbell, re-check events, the
 * TX ring and the mailbox, and only then block in `Atomics.wait` on
 * CTL.WRITER_DOORBELL (a futex wake-up; `waitAsync` costs several times
 * more and does not keep Deno's event loop turning). The parent bumps the
 * mailbox before each control message and rings the doorbell after it, and
 * the loop yields to the event loop whenever its mailbox says a message is
 * waiting (`io/protocol.ts`), busy or not.
 *
 * Rate limits: while the NIC's TX limit holds the records back, the loop
 * waits on the doorbell with the limit's wait as its timeout (a timer,
 * never a spin; `tx_drain.ts`).
 *
 * Trust, engines and completions: `tx_drain.ts`.
 *
 * @module
 */

import { macrotask, messageTurn, warmTimers } from "../../ipc/macrotask.ts";
import { SpscRing } from "../../ipc/spsc_ring.ts";
import { CTL, signal, WEV_WAKE_POLLER } from "../../ipc/datapath.ts";
import { IoRegions } from "./regions.ts";
import { TxDrainer, writeEventfd } from "./tx_drain.ts";
import { createTxShared, TX_CLOSE_WAIT_MS } from "./protocol.ts";
import { WorkerControl } from "./worker_control.ts";
import { DirtyLog } from "./dirty_log.ts";
import { RateLimiter } from "./rate_limiter.ts";
import { monotonicMs } from "../host/libc.ts";
import { CaptureProducer } from "./capture_ring.ts";

// A message the mailbox announced is waited for on timer turns (`messageTurn`):
// the isolate's first timer is paid now, before the worker serves a start.
warmTimers();

// ---- state (set by control messages, read by the loop) -----------------------

let drainer: TxDrainer | null = null;
let wakeFd = -1;
/** The TX call eventfd, kept for a drainer that starts later. */
let callTxFd = -1;

/**
 * How long one blocking wait lasts at most (ms); the event loop turns after
 * it even when nothing came (the parent rings the doorbell with each message).
 */
const WAIT_SLICE_MS = 1000;

/** When the loop first saw a stop that waits for the device to close TX (ms, monotonic). */
let stopSeenAt: number | null = null;

/**
 * Whether the loop goes on: no stop was asked for, or one that waits until
 * the device has quiesced (CTL.TX_CLOSED: every record it took is written,
 * it takes no more), for at most TX_CLOSE_WAIT_MS. Returns the time left
 * (ms, Infinity before a stop), 0 to end.
 */
function timeLeft(c: Int32Array): number {
  if (!control.stopping) return Infinity;
  if (!control.stopUntilTxClosed || Atomics.load(c, CTL.TX_CLOSED) !== 0) return 0;
  const now = monotonicMs();
  stopSeenAt ??= now;
  return Math.max(0, stopSeenAt + TX_CLOSE_WAIT_MS - now);
}

async function loop(c: Int32Array): Promise<void> {
  while (timeLeft(c) > 0) {
    // Serve waiting control messages first (a revocation must not wait). Not
    // once stopping: what is posted then is the stop, whose words the loop
    // has read (its message is acked at the end); the device's TX close
    // comes as a doorbell, which only a sleeping loop hears at once.
    if (control.mailPending() && !control.stopping) {
      await messageTurn();
      if (timeLeft(c) === 0) break;
    }
    const ev = Atomics.exchange(c, CTL.WRITER_EVENTS, 0);
    if (ev & WEV_WAKE_POLLER) {
      writeEventfd(c, wakeFd);
      Atomics.add(c, CTL.POLLER_WAKE_ASKED, 1);
    }
    // WEV_TX only says "look"; the ring itself says how much.
    const bits = drainer!.drain();
    if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
    if (ev !== 0 || bits !== 0 || drainer!.lastCount !== 0) continue;
    // Records held by the rate limit: sleep until its tokens come, on a
    // timer (a doorbell still wakes us for events and messages).
    const holdMs = drainer!.holdMs;
    // Sleep (Dekker with signal()): announce, load the doorbell, re-check, wait.
    // A blocking wait: a futex wake-up is several times cheaper than waitAsync's,
    // and the mailbox tells when the event loop must turn instead.
    Atomics.store(c, CTL.WRITER_SLEEPING, 1);
    const seen = Atomics.load(c, CTL.WRITER_DOORBELL);
    const left = timeLeft(c); // the device rings the doorbell when it closes TX
    if (
      Atomics.load(c, CTL.WRITER_EVENTS) === 0 && (holdMs !== 0 || !drainer!.pending()) &&
      (!control.mailPending() || control.stopping) && left > 0
    ) {
      const slice = Math.min(holdMs !== 0 ? holdMs : WAIT_SLICE_MS, left);
      if (Atomics.wait(c, CTL.WRITER_DOORBELL, seen, slice) === "timed-out") {
        Atomics.store(c, CTL.WRITER_SLEEPING, 0);
        await macrotask(); // timers and anything else the event loop holds
        continue;
      }
    }
    Atomics.store(c, CTL.WRITER_SLEEPING, 0);
  }
  // The stop is acked first, and the io_uring taken down only once the
  // parent lets it (1-3 ms of system calls, off the stop's path:
  // `io/protocol.ts`). The writer holds no descriptor of the parent's beyond
  // the loop: the tap and call eventfds are only written in it.
  control.finish();
  control.awaitRelease();
  drainer?.close();
  control.released();
}

const control = new WorkerControl("writer", {
  init(msg, c) {
    const d = new TxDrainer(
      c,
      msg.txShared ?? createTxShared(),
      (n) => control.post(n),
      CTL.WRITER_ENGINE,
      "tap writes",
    );
    d.ring = SpscRing.attach(msg.tx);
    d.regions = IoRegions.from(msg.ranges);
    d.tapFd = msg.tapFd;
    d.setTxUsed(msg.txUsed);
    d.log = msg.log === null ? null : new DirtyLog(msg.log);
    d.capture = msg.capture === null
      ? null
      : new CaptureProducer(msg.capture.ring, msg.capture.state);
    d.callFd = callTxFd;
    d.limiter = msg.rateLimit === null ? null : new RateLimiter(msg.rateLimit, monotonicMs);
    d.start(msg.ioUring, msg.rings[0] ?? null);
    drainer = d;
    wakeFd = msg.wakeFd;
    return () => loop(c);
  },
  setRegions(r) {
    drainer?.setRegions(r);
  },
  setLog(log) {
    if (!drainer) throw new Error("setLog: not initialised");
    drainer.log = log;
  },
  setFd(slot, fd) {
    if (slot === "tap") {
      if (drainer) drainer.tapFd = fd;
      return;
    }
    callTxFd = fd; // callTx, the writer's only other slot
    if (drainer) drainer.callFd = fd;
  },
  // The parent rings the writer's doorbell after every message (datapath_host.ts),
  // and the loop checks for a stop after each turn of the event loop.
  wake() {},
});
