/**
 * The control side that both I/O workers (`io/writer_worker.ts`,
 * `io/poller_worker.ts`) share: the handler of the parent's control messages
 * (`io/protocol.ts`). It counts each message against the mailbox, validates
 * it, refuses everything once a stop was asked for, checks the role and the
 * descriptor slots, and answers any failure with an `error` carrying the
 * request's id, so the worker keeps running whatever it is sent.
 *
 * Each worker supplies only what is its own ({@link WorkerHooks}): what
 * `init` attaches, which descriptor a slot sets, how its loop is woken for a
 * stop. The handler runs only while the worker's loop is suspended at an
 * `await` (never inside a batch), so its effects are complete before the
 * loop touches memory or a descriptor again: an ack is a true revocation.
 *
 * @module
 */

/// <reference lib="deno.worker" />

import { CTL, IO_ENDED_POLLER, IO_ENDED_WRITER } from "../../ipc/datapath.ts";
import { DirtyLog } from "./dirty_log.ts";
import { IoRegions } from "./regions.ts";
import { messageArrived } from "../../ipc/macrotask.ts";
import {
  errorReply,
  type FdSlot,
  type InitRequest,
  type IoReply,
  type IoRequest,
  type IoRole,
  MAILBOX,
  parseIoRequest,
  QUEUE_FD_SLOTS,
  RELEASE_WAIT_MAX_MS,
  ROLE_SLOTS,
  STOP_UNTIL_TX_CLOSED,
} from "./protocol.ts";

/** What a worker does with each control message; each may throw to refuse it. */
export interface WorkerHooks {
  /** Attaches the rings and descriptors of `init`; returns the loop to start once acked. */
  init(msg: InitRequest, ctl: Int32Array): () => Promise<void>;
  setRegions(regions: IoRegions): void;
  /** Sets (or, with -1, clears) the descriptor of one of the role's slots. */
  setFd(slot: FdSlot, fd: number): void;
  /** The poller only: the longest frame the tap can hand it changed. */
  setRxFrameRoom?(bytes: number): void;
  /** Dirty logging starts, changes or ends (null): every later write uses the new log. */
  setLog(log: DirtyLog | null): void;
  /** A stop was asked for: make the loop notice soon (it acks as its last act). */
  wake(): void;
}

export class WorkerControl {
  #mailbox: Int32Array | null = null;
  #served = 0;
  #ctl: Int32Array | null = null;
  // Fields whose representation never changes (a number from the start, a
  // boolean): the stop flips them, and a field that went from null to a
  // number would throw away the loop's optimized code (V8 deoptimizes code
  // that depends on a field's representation) just when the stop must be quick.
  #stopping = false;
  #stopId = 0;
  #stopUntilTxClosed = false;
  #ended = false;
  /** The loop ended and let go of everything (and acked the stop it knew of). */
  #finished = false;

  constructor(readonly role: IoRole, private readonly hooks: WorkerHooks) {
    self.onmessage = (e: MessageEvent) => this.#receive(e.data);
  }

  /** Posts a reply or notice to the parent. */
  post(reply: IoReply): void {
    self.postMessage(reply);
  }

  /**
   * A stop was asked for: the loop ends. Seen in the mailbox's STOP word
   * before the message itself arrives (`io/protocol.ts`).
   */
  get stopping(): boolean {
    const m = this.#mailbox;
    return this.#stopping || (m !== null && Atomics.load(m, MAILBOX.STOP) !== 0);
  }

  /** The stop asks the writer to run on until the device closed TX (`StopRequest`). */
  get stopUntilTxClosed(): boolean {
    if (this.#stopping) return this.#stopUntilTxClosed;
    const m = this.#mailbox;
    return m !== null && Atomics.load(m, MAILBOX.STOP) !== 0 &&
      Atomics.load(m, MAILBOX.STOP_MODE) === STOP_UNTIL_TX_CLOSED;
  }

  /** Whether the parent posted a message this worker has not served yet. */
  mailPending(): boolean {
    const m = this.#mailbox;
    return m !== null && this.#served !== Atomics.load(m, MAILBOX.POSTED);
  }

  /**
   * The loop has ended: say so in the control block at once (a device
   * stopping meanwhile waits for that, `device/io_rings.ts`, and answers the
   * front-end then). From here the worker touches no guest memory: every
   * batch it submitted was reaped in its turn, and what is left (unmapping
   * its io_uring, unregistering the tap, closing descriptors) does not.
   * Idempotent.
   */
  loopEnded(): void {
    if (this.#ended) return;
    this.#ended = true;
    const ctl = this.#ctl;
    if (ctl !== null) {
      Atomics.or(ctl, CTL.IO_ENDED, this.role === "poller" ? IO_ENDED_POLLER : IO_ENDED_WRITER);
      Atomics.notify(ctl, CTL.IO_ENDED);
    }
  }

  /**
   * Once the loop has ended and the worker has let go of every descriptor
   * the parent owns (the parent closes them after this): acknowledge the
   * stop (after {@link loopEnded}, if the loop did not say so itself). Its
   * own teardown comes after, then {@link released}.
   */
  finish(): void {
    this.loopEnded();
    this.#finished = true;
    // A loop that ended on the mailbox's words acks their id (the message
    // itself may still be on its way; it is acked again when it comes).
    const m = this.#mailbox;
    const id = this.#stopping ? this.#stopId : m !== null ? Atomics.load(m, MAILBOX.STOP) : 0;
    if (id !== 0) this.#ackStop(id);
  }

  /**
   * Acknowledges stop `id`: in MAILBOX.ENDED, where the parent can block for
   * it (`io/protocol.ts`), and by message.
   */
  #ackStop(id: number): void {
    const m = this.#mailbox;
    if (m !== null) {
      Atomics.store(m, MAILBOX.ENDED, id);
      Atomics.notify(m, MAILBOX.ENDED);
    }
    this.post({ kind: "ack", id });
  }

  /**
   * After {@link finish}: blocks until the parent lets the worker take down
   * its rings (MAILBOX.RELEASE, set once the stop is answered), for at most
   * RELEASE_WAIT_MAX_MS (`io/protocol.ts`).
   */
  awaitRelease(): void {
    const m = this.#mailbox;
    if (m !== null) Atomics.wait(m, MAILBOX.RELEASE, 0, RELEASE_WAIT_MAX_MS);
  }

  /**
   * The worker's last act, after {@link finish}: its ring mappings are gone
   * and no file stays registered on a lent ring, so the parent may lend the
   * rings again (`DatapathHost`); it ends the worker when the rest of the
   * stop no longer needs the CPU.
   */
  released(): void {
    this.post({ kind: "released" });
  }

  #receive(data: unknown): void {
    this.#served++;
    let id: number | null = null;
    try {
      const msg = parseIoRequest(data);
      id = msg.id;
      if (this.#stopping) throw new Error("stopping");
      this.#serve(msg);
    } catch (err) {
      this.post(errorReply(err, id ?? (err as { id?: number | null }).id ?? null));
    } finally {
      messageArrived(); // a loop waiting for it goes on (`ipc/macrotask.ts`)
    }
  }

  #serve(msg: IoRequest): void {
    const role = this.role;
    switch (msg.kind) {
      case "init": {
        if (this.#ctl !== null) throw new Error("init: already initialised");
        if (msg.role !== role) throw new Error(`init: this is the ${role}, not the ${msg.role}`);
        const ctl = new Int32Array(msg.control);
        const loop = this.hooks.init(msg, ctl);
        for (const slot of QUEUE_FD_SLOTS) {
          const fd = msg.queueFds[slot];
          if (fd !== null && ROLE_SLOTS[role].includes(slot)) this.hooks.setFd(slot, fd);
        }
        this.#mailbox = new Int32Array(msg.mailbox);
        this.#ctl = ctl;
        this.post({ kind: "ack", id: msg.id });
        loop().catch((e) => {
          this.post({ kind: "fault", message: `${role} loop died: ${String(e)}` });
          throw e;
        });
        return;
      }
      case "setRegions":
        this.hooks.setRegions(IoRegions.from(msg.ranges));
        this.post({ kind: "ack", id: msg.id });
        return;
      case "setFd":
        if (!ROLE_SLOTS[role].includes(msg.slot)) {
          throw new Error(`setFd: the ${role} has no ${msg.slot} slot`);
        }
        this.hooks.setFd(msg.slot, msg.fd ?? -1);
        this.post({ kind: "ack", id: msg.id });
        return;
      case "setRxFrameRoom": {
        if (this.hooks.setRxFrameRoom === undefined) {
          throw new Error(`setRxFrameRoom: the ${role} reads no frames`);
        }
        this.hooks.setRxFrameRoom(msg.bytes);
        this.post({ kind: "ack", id: msg.id });
        return;
      }
      case "setLog":
        this.hooks.setLog(msg.log === null ? null : new DirtyLog(msg.log));
        this.post({ kind: "ack", id: msg.id });
        return;
      case "stop":
        if (this.#ctl === null) {
          this.#ackStop(msg.id);
          self.close();
          return;
        }
        this.#stopId = msg.id;
        this.#stopUntilTxClosed = msg.untilTxClosed === true;
        this.#stopping = true;
        if (this.#finished) {
          this.#ackStop(msg.id);
          return;
        }
        this.hooks.wake();
        return;
      default: {
        const never: never = msg;
        throw new Error(`unhandled ${(never as { kind: string }).kind}`);
      }
    }
  }
}
