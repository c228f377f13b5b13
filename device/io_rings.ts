/**
 * The device's end of the data path (`ipc/datapath.ts`): the TX and RX-post
 * rings it produces, the RX-done ring it consumes, the control block's
 * events and doorbells, and a FIFO allocator over the bounce arena.
 *
 * Trust: the buffers come from the parent. Ring headers are checked by
 * `SpscRing.attach`; everything read back from the I/O side (rx-done
 * records, ring indices) is checked by the paths that use it.
 *
 * @module
 */

import {
  BOUNCE_BYTES,
  CTL,
  CTL_BYTES,
  type DatapathBuffers,
  IO_ENDED_BOTH,
  RX_DONE_RECORD_WORDS,
  RX_LONG_RECORD_WORDS,
  RX_POST_RECORD_WORDS,
  signal,
  TX_RECORD_WORDS,
  WEV_TX,
} from "../ipc/datapath.ts";
import { SpscRing } from "../ipc/spsc_ring.ts";

/** The data-path buffers did not have the shape the device needs. */
export class DatapathSetupError extends Error {
  override name = "DatapathSetupError";
}

/** The device's handles on the shared data-path memory. */
export class DeviceIoRings {
  readonly ctl: Int32Array;
  readonly tx: SpscRing;
  readonly rxPost: SpscRing;
  /** The iovecs of RX chains of more than RX_MAX_IOV segments (`ipc/datapath.ts` RXF_LONG). */
  readonly rxLong: SpscRing;
  readonly rxDone: SpscRing;
  /** The bounce arena, for frames the device builds itself. */
  readonly bounce: Uint8Array;
  /** Host address of `bounce[0]`, as the parent reported it (for iovecs). */
  readonly bounceHost: number;

  /** Bounce bytes ever allocated / freed (monotonic; positions are `% bounce.length`). */
  #bounceHead = 0;
  #bounceTail = 0;

  constructor(buffers: DatapathBuffers, bounceHost: number) {
    if (
      !(buffers.control instanceof SharedArrayBuffer) || buffers.control.byteLength !== CTL_BYTES
    ) {
      throw new DatapathSetupError(`control block must be a ${CTL_BYTES}-byte SharedArrayBuffer`);
    }
    if (
      !(buffers.bounce instanceof SharedArrayBuffer) || buffers.bounce.byteLength !== BOUNCE_BYTES
    ) {
      throw new DatapathSetupError(`bounce arena must be a ${BOUNCE_BYTES}-byte SharedArrayBuffer`);
    }
    if (!Number.isSafeInteger(bounceHost) || bounceHost <= 0) {
      throw new DatapathSetupError(`bounce arena host address ${bounceHost} is not an address`);
    }
    this.ctl = new Int32Array(buffers.control);
    this.tx = attach(buffers.tx, TX_RECORD_WORDS, "tx");
    this.rxPost = attach(buffers.rxPost, RX_POST_RECORD_WORDS, "rx-post");
    this.rxLong = attach(buffers.rxLong, RX_LONG_RECORD_WORDS, "rx-long");
    this.rxDone = attach(buffers.rxDone, RX_DONE_RECORD_WORDS, "rx-done");
    this.bounce = new Uint8Array(buffers.bounce);
    this.bounceHost = bounceHost;
  }

  /** Takes the pending device events (EV_* bits), clearing them. */
  takeEvents(): number {
    return Atomics.exchange(this.ctl, CTL.DEVICE_EVENTS, 0);
  }

  /**
   * Sleeps until the I/O side rings the device's doorbell or `timeoutMs`
   * passes, without blocking the worker's event loop (control messages keep
   * arriving). Announces the sleep and re-checks first, so a ring that raced
   * with it is not missed.
   */
  async sleep(timeoutMs: number): Promise<void> {
    const ctl = this.ctl;
    const seen = Atomics.load(ctl, CTL.DEVICE_DOORBELL);
    Atomics.store(ctl, CTL.DEVICE_SLEEPING, 1);
    if (Atomics.load(ctl, CTL.DEVICE_EVENTS) === 0) {
      const w = Atomics.waitAsync(ctl, CTL.DEVICE_DOORBELL, seen, timeoutMs);
      if (w.async) {
        w.value.then((r) => r === "ok" && Atomics.add(ctl, CTL.DEVICE_WAKES, 1));
        // A pending waitAsync does not keep Deno's event loop turning; a timer does.
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([w.value, new Promise((r) => timer = setTimeout(r, timeoutMs))]);
        clearTimeout(timer);
      }
    }
    Atomics.store(ctl, CTL.DEVICE_SLEEPING, 0);
  }

  /**
   * Blocks the thread until the I/O side rings the device's doorbell, the
   * parent posts a message (`mail`), or `timeoutMs` passes. Announces the
   * sleep and re-checks first, like {@link sleep}. The worker's event loop
   * does not run meanwhile: that is what the mailbox is for.
   */
  sleepBlocking(timeoutMs: number, mailPending: () => boolean): void {
    const ctl = this.ctl;
    const seen = Atomics.load(ctl, CTL.DEVICE_DOORBELL);
    Atomics.store(ctl, CTL.DEVICE_SLEEPING, 1);
    if (Atomics.load(ctl, CTL.DEVICE_EVENTS) === 0 && !mailPending()) {
      if (Atomics.wait(ctl, CTL.DEVICE_DOORBELL, seen, timeoutMs) === "ok") {
        Atomics.add(ctl, CTL.DEVICE_WAKES, 1);
      }
    }
    Atomics.store(ctl, CTL.DEVICE_SLEEPING, 0);
  }

  /**
   * Waits until both I/O workers' loops have ended (CTL.IO_ENDED, which each
   * sets as its last act), for at most `timeoutMs`; `blocking` (a worker's
   * thread) waits with Atomics.wait, else with Atomics.waitAsync. Returns
   * whether they have.
   */
  async ioEnded(timeoutMs: number, blocking: boolean): Promise<boolean> {
    const ctl = this.ctl;
    const end = performance.now() + timeoutMs;
    for (;;) {
      const seen = Atomics.load(ctl, CTL.IO_ENDED);
      if ((seen & IO_ENDED_BOTH) === IO_ENDED_BOTH) return true;
      const left = end - performance.now();
      if (left <= 0) return false;
      if (blocking) {
        Atomics.wait(ctl, CTL.IO_ENDED, seen, left);
        continue;
      }
      const w = Atomics.waitAsync(ctl, CTL.IO_ENDED, seen, left);
      if (!w.async) continue;
      // A pending waitAsync does not keep Deno's event loop turning; a timer does.
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([w.value, new Promise((r) => timer = setTimeout(r, Math.min(left, 5)))]);
      clearTimeout(timer);
    }
  }

  /**
   * New TX records: answers the poller if it waits for them (it read the
   * kick; it writes them itself), else wakes the writer. Returns true when
   * the poller got them.
   */
  signalTx(): boolean {
    if (this.answerPoller()) return true;
    this.signalWriter(WEV_TX);
    return false;
  }

  /**
   * Answers a poller that waits after a TX kick (CTL.POLLER_AWAITS_TX), with
   * records or without; returns whether one waited.
   */
  answerPoller(): boolean {
    const ctl = this.ctl;
    if (Atomics.load(ctl, CTL.POLLER_AWAITS_TX) === 0) return false;
    if (Atomics.exchange(ctl, CTL.POLLER_AWAITS_TX, 0) === 0) return false;
    Atomics.add(ctl, CTL.POLLER_DOORBELL, 1);
    Atomics.notify(ctl, CTL.POLLER_DOORBELL);
    return true;
  }

  /** Sets writer events (WEV_* bits) and wakes the writer if it sleeps. */
  signalWriter(bits: number): void {
    signal(this.ctl, CTL.WRITER_EVENTS, bits, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
  }

  /** Asks the writer to raise EV_TX_DONE after its next release of TX records (see `ipc/datapath.ts`). */
  wantTxDone(): void {
    Atomics.store(this.ctl, CTL.TX_WANT_DONE, 1);
  }

  /** TX call eventfd writes the I/O workers made (they decide them: `ipc/datapath.ts`). */
  get txInterrupts(): number {
    return Atomics.load(this.ctl, CTL.TX_INTERRUPTS);
  }

  /** RX call eventfd writes: the poller's, and the writer's for this device's requests. */
  get rxInterrupts(): number {
    return Atomics.load(this.ctl, CTL.RX_INTERRUPTS);
  }

  /** Wakes the device's own loop (used by control requests that need the loop's attention). */
  wakeSelf(bits: number): void {
    signal(this.ctl, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
  }

  /**
   * Reserves `n` contiguous bounce bytes; returns the offset, or -1 when the
   * arena is full. Allocation is FIFO: free with `freeBounceTo()` in order.
   */
  allocBounce(n: number): number {
    const size = this.bounce.length;
    if (n <= 0 || n > size / 2) return -1;
    let at = this.#bounceHead;
    const inLap = at % size;
    if (inLap + n > size) at += size - inLap; // never wrap inside one frame
    if (at + n - this.#bounceTail > size) return -1;
    this.#bounceHead = at + n;
    return at % size;
  }

  /** Bounce bytes not allocated. */
  get bounceFree(): number {
    return this.bounce.length - (this.#bounceHead - this.#bounceTail);
  }

  /** The allocation mark to pass to `freeBounceTo()` once the last allocation so far is done. */
  get bounceMark(): number {
    return this.#bounceHead;
  }

  /** Frees every bounce allocation made before `mark` was read. */
  freeBounceTo(mark: number): void {
    if (mark > this.#bounceTail) this.#bounceTail = mark;
  }

  /** Counters the I/O side keeps in the control block. */
  ioCounters(): Record<string, number> {
    const c = this.ctl;
    return {
      pollerNoBuffer: Atomics.load(c, CTL.POLLER_NO_BUFFER),
      pollerTooBig: Atomics.load(c, CTL.POLLER_TOO_BIG),
      ioBadRecord: Atomics.load(c, CTL.IO_BAD_RECORD),
      writerErrors: Atomics.load(c, CTL.WRITER_ERRORS),
      pollerErrors: Atomics.load(c, CTL.POLLER_ERRORS),
    };
  }
}

function attach(buffer: unknown, recordWords: number, name: string): SpscRing {
  const ring = SpscRing.attach(buffer);
  if (ring.recordWords !== recordWords) {
    throw new DatapathSetupError(
      `${name} ring has ${ring.recordWords}-word records, the device needs ${recordWords}`,
    );
  }
  return ring;
}

/** Writes a host address and length as an iovec at `words[at..at+4)`. */
export function putIovec(words: Uint32Array, at: number, addr: number, len: number): void {
  words[at] = addr >>> 0;
  words[at + 1] = Math.floor(addr / 0x1_0000_0000);
  words[at + 2] = len;
  words[at + 3] = 0;
}
