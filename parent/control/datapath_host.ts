/**
 * The parent's side of the data path: allocates the shared buffers of
 * `ipc/datapath.ts`, starts the two privileged I/O workers (writer and
 * poller) and configures them over the control protocol of `io/protocol.ts`.
 *
 * Revocation: every change that takes something away (a region, a
 * descriptor) resolves only after both workers that could use it
 * acknowledged it; only then may the caller unmap the region or close the
 * old descriptor. The poller, blocked in `epoll_wait`, cannot see a message:
 * the host bumps the worker's mailbox count, posts, then writes the poller's
 * wake eventfd, and writes it again every {@link WAKE_RETRY_MS} until the ack
 * arrives (a safety net; the mailbox makes the first wake-up enough).
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import { type LentRings, type RingPool, RINGS_PER_DATAPATH } from "./ring_pool.ts";
import { VIRTIO_RING_F_EVENT_IDX } from "../../ipc/features.ts";
import { SpscRing } from "../../ipc/spsc_ring.ts";
import {
  BOUNCE_BYTES,
  CTL,
  CTL_BYTES,
  type DatapathBuffers,
  POLLER_ENGINE_IO_URING,
  POLLER_ENGINE_READV,
  RX_DONE_RECORD_WORDS,
  RX_DONE_RING_RECORDS,
  RX_LONG_RECORD_WORDS,
  RX_LONG_RING_RECORDS,
  RX_POST_RECORD_WORDS,
  RX_POST_RING_RECORDS,
  RX_QUEUE,
  signal,
  TX_QUEUE,
  TX_RECORD_WORDS,
  TX_RING_RECORDS,
  WRITER_ENGINE_IO_URING,
  WRITER_ENGINE_WRITEV,
} from "../../ipc/datapath.ts";
import { type HostRange, IoRegions } from "../io/regions.ts";
import {
  createTxShared,
  type FdSlot,
  IO_PROTOCOL_VERSION,
  type IoReply,
  type IoRequest,
  type IoRole,
  type IoUringMode,
  type LogConfig,
  MAILBOX,
  MAILBOX_BYTES,
  parseIoReply,
  RX_FRAME_ROOM_MAX,
  type RxUsedPlace,
  STOP_UNTIL_TX_CLOSED,
  type TxUsedPlace,
} from "../io/protocol.ts";
import type { Logger } from "./log.ts";
import { workerCensus } from "./worker_census.ts";

/** The modules the I/O workers run. */
export const IO_WRITER_URL = new URL("../io/writer_worker.ts", import.meta.url);
export const IO_POLLER_URL = new URL("../io/poller_worker.ts", import.meta.url);

/**
 * Permissions of both I/O workers: FFI and nothing else, written once here so
 * the permission audit prints what the code uses.
 *
 * FFI cannot be narrowed further in Deno 2.9.6 (measured): a path list
 * (`ffi: ["/lib/x86_64-linux-gnu/libc.so.6"]`) lets `Deno.dlopen` of that
 * absolute path through, but `Deno.UnsafePointer.*` and
 * `Deno.UnsafePointerView` (errno in `libc.ts`, the private buffers'
 * addresses) then fail with NotCapable "Requires ffi access": they demand
 * unscoped FFI. `ffi: ["libc.so.6"]` is resolved against the working
 * directory and matches nothing. And FFI to libc is all of the process's
 * authority anyway; what the workers do is bounded by their code, which is
 * why it is small and checks every record.
 */
export const IO_WORKER_PERMISSIONS = {
  ffi: true,
  env: false,
  import: false,
  net: false,
  read: false,
  run: false,
  sys: false,
  write: false,
} as const;

/** Worker options of the writer. */
export const IO_WRITER_OPTIONS = {
  type: "module",
  name: "vionet-io-writer",
  deno: { permissions: IO_WORKER_PERMISSIONS },
} as const satisfies WorkerOptions;

/** Worker options of the poller. */
export const IO_POLLER_OPTIONS = {
  type: "module",
  name: "vionet-io-poller",
  deno: { permissions: IO_WORKER_PERMISSIONS },
} as const satisfies WorkerOptions;

/** How long a worker has to acknowledge a request (default). */
const DEFAULT_TIMEOUT_MS = 5000;
/** How long a worker has to load and acknowledge init (default). */
const DEFAULT_START_TIMEOUT_MS = 30_000;
/**
 * How long {@link DatapathHost.end} waits for a stopped worker to release
 * what it was lent before it ends the worker anyway (ms); releasing takes
 * 1-3 ms.
 */
const RELEASE_WAIT_MS = 200;
/**
 * Longest a start waits for stopped data paths to give their rings back
 * when the pool is short (`RingPool.reclaim`); releasing takes 1-3 ms.
 */
const RECLAIM_WAIT_MS = 100;
/** The poller's wake eventfd is written again at this interval until the ack. */
const WAKE_RETRY_MS = 20;

/**
 * Allocates the data path's SharedArrayBuffers and initialises the three
 * rings with the sizes and record words of `ipc/datapath.ts`.
 */
export function createDatapathBuffers(): DatapathBuffers {
  return {
    control: new SharedArrayBuffer(CTL_BYTES),
    tx: SpscRing.create({ capacity: TX_RING_RECORDS, recordWords: TX_RECORD_WORDS }).buffer,
    rxPost: SpscRing.create({ capacity: RX_POST_RING_RECORDS, recordWords: RX_POST_RECORD_WORDS })
      .buffer,
    rxLong: SpscRing.create({ capacity: RX_LONG_RING_RECORDS, recordWords: RX_LONG_RECORD_WORDS })
      .buffer,
    rxDone: SpscRing.create({ capacity: RX_DONE_RING_RECORDS, recordWords: RX_DONE_RECORD_WORDS })
      .buffer,
    bounce: new SharedArrayBuffer(BOUNCE_BYTES),
  };
}

/** The data path's counters (from the control block). */
export interface DatapathCounters {
  /** The poller has no posted RX buffers (and so does not poll the tap). */
  pollerStarved: boolean;
  pollerNoBuffer: number;
  /** Frames larger than the posted chains, dropped. */
  pollerTooBig: number;
  /** Records refused by either worker (bad iovec, count, length, header). */
  ioBadRecord: number;
  /** writev (and call/wake eventfd write) failures. */
  writerErrors: number;
  /** How the writer puts frames on the tap: batched io_uring writes or one writev each. */
  writerEngine: "io_uring" | "writev" | "starting";
  /** readv/poll failures other than EAGAIN/EINTR, and invalid polled descriptors. */
  pollerErrors: number;
  /** How the poller reads the tap: batches through io_uring (where chains allow) or one readv each. */
  pollerEngine: "io_uring" | "readv" | "starting";
  /** Batches of reads (io_uring_enter calls) the poller made. */
  pollerBatches: number;
  /** Posted chains a batch gave back unfilled (posted again by the device). */
  pollerUnused: number;
  /** Times the poller ran out of posted RX buffers (and stopped polling the tap). */
  pollerStarvations: number;
  /** Times the device had the writer wake the poller for new RX buffers. */
  pollerWakeAsked: number;
  /** RX used buffer notifications the poller sent. */
  rxInterrupts: number;
  /** Guest kicks the poller read on the RX and TX queues. */
  rxKicks: number;
  txKicks: number;
  /** Times the device worker woke from waiting for work. */
  deviceWakes: number;
  /** Batches of TX records the poller wrote after kicks it read (the writer wrote the rest). */
  pollerTxBatches: number;
}

export interface DatapathHostOptions extends IoWorkerPairOptions {
  /**
   * Workers spawned ahead ({@link IoWorkerPair.spawn}); they become this
   * data path's (fresh ones are spawned when absent or no longer usable).
   */
  workers?: IoWorkerPair;
  /**
   * Runs while the workers take their configuration, given the bounce
   * arena's host address (the device's start, which needs nothing from
   * them: what it puts on the rings waits there). {@link DatapathHost.start}
   * resolves once both the workers and this are done. It must not reject
   * (the workers would be running); when the workers fail, the start
   * rejects only after this settled, so the caller knows what to undo.
   */
  alongside?: (bounceHost: number) => Promise<void>;
  /** The tap's descriptor (IFF_VNET_HDR, 12-byte header). Set to O_NONBLOCK here. */
  tapFd: number;
  /** From {@link createDatapathBuffers}; the device gets the same buffers. */
  buffers: DatapathBuffers;
  /** Initial guest ranges (the bounce arena is always added). Default none. */
  ranges?: HostRange[];
  /**
   * Milliseconds each worker has to load and acknowledge `init` (default
   * 30000: under `deno test` a worker module is type-checked when it loads).
   */
  startTimeoutMs?: number;
  /** Called when a worker reports a corrupt ring or dies. */
  onFault?: (role: IoRole, message: string) => void;
  /** Whether the writer may batch through io_uring (`--io-uring`; default "auto"). */
  ioUring?: IoUringMode;
  /**
   * Restricted rings made during set-up (`ring_pool.ts`), lent to the
   * workers and taken back at the stop; absent: each worker makes its own.
   */
  rings?: RingPool;
  /** Where the writer publishes TX completions (omitted: nowhere, for tests of the workers alone). */
  txUsed?: TxUsedPlace | null;
  /** The tap's longest frame, net header included (`rxFrameRoom` in io/protocol.ts; default the maximum). */
  rxFrameRoom?: number;
  /** Where the poller completes RX frames (the poller refuses to start without it). */
  rxUsed?: RxUsedPlace | null;
  /** The dirty log, when the front-end logs from the start (`io/dirty_log.ts`). */
  log?: LogConfig | null;
  /** The NIC's rate limits, shared by every pair (`io/rate_limiter.ts`); absent: none. */
  rateLimit?: SharedArrayBuffer | null;
  /**
   * The queues' kick and call eventfds (indexed by RX_QUEUE/TX_QUEUE; null:
   * none), made O_NONBLOCK; the workers take them with `init`. The caller
   * keeps owning them, as with {@link DatapathHost.setKickFd}.
   */
  kickFds?: readonly (number | null)[];
  callFds?: readonly (number | null)[];
  /** `--pcap`: this pair's capture rings (one per worker) and the shared state; absent: none. */
  capture?: PairCapture | null;
}

/** A queue pair's share of the capture (`control/capture_host.ts`). */
export interface PairCapture {
  state: SharedArrayBuffer;
  writer: SharedArrayBuffer;
  poller: SharedArrayBuffer;
}

interface Pending {
  resolve: () => void;
  reject: (e: Error) => void;
}

/** One worker and its request/ack bookkeeping. */
class IoWorker {
  /** Called after each post: the host that uses the worker rings its doorbell here. */
  nudge: () => void = () => {};
  /** Told of a fault the worker reports, or of its death. */
  onFault: (message: string) => void = () => {};

  readonly worker: Worker;
  /** Word MAILBOX.POSTED: messages posted to this worker (io/protocol.ts). */
  readonly mailbox = new SharedArrayBuffer(MAILBOX_BYTES);
  readonly #posted = new Int32Array(this.mailbox);
  readonly #pending = new Map<number, Pending>();
  #nextId = 1;
  /** The id of the stop posted (0: none yet). */
  #stopId = 0;
  #dead: string | undefined;
  /**
   * True once the worker said `released` (after its stop: it let go of the
   * rings it was lent); false if it died or was ended before that.
   */
  readonly released: Promise<boolean>;
  #settleReleased: (released: boolean) => void = () => {};

  constructor(
    readonly role: IoRole,
    url: URL,
    options: WorkerOptions,
    private readonly logger: Logger,
    private readonly timeoutMs: number,
  ) {
    this.released = new Promise((resolve) => this.#settleReleased = resolve);
    this.worker = workerCensus.start(url, options, role);
    this.worker.onmessage = (e) => this.#reply(e.data);
    this.worker.onmessageerror = () => this.logger.log("warn", "datapath", `${role}: bad message`);
    this.worker.onerror = (e) => {
      e.preventDefault();
      this.#die(`${role} worker failed: ${e.message}`);
    };
  }

  get dead(): string | undefined {
    return this.#dead;
  }

  /** Posts a request and resolves on its ack; rejects on error, timeout or death. */
  request(
    msg: DistributiveOmit<IoRequest, "id">,
    timeoutMs = this.timeoutMs,
    beforePost?: (id: number) => void,
  ): Promise<void> {
    if (this.#dead !== undefined) {
      return Promise.reject(new Error(`${this.role} is not running: ${this.#dead}`));
    }
    const id = this.#nextId++;
    return new Promise<void>((resolve, reject) => {
      let retry: ReturnType<typeof setInterval> | undefined;
      const settle = () => {
        clearTimeout(timer);
        if (retry !== undefined) clearInterval(retry);
        this.#pending.delete(id);
      };
      const timer = setTimeout(() => {
        settle();
        reject(new Error(`${this.role} did not acknowledge ${msg.kind} in ${timeoutMs} ms`));
      }, timeoutMs);
      this.#pending.set(id, {
        resolve: () => {
          settle();
          resolve();
        },
        reject: (e) => {
          settle();
          reject(e);
        },
      });
      beforePost?.(id);
      Atomics.add(this.#posted, MAILBOX.POSTED, 1);
      this.worker.postMessage({ ...msg, id });
      this.nudge();
      if (this.role === "poller") retry = setInterval(() => this.nudge(), WAKE_RETRY_MS);
    });
  }

  /**
   * Posts the stop, its id in MAILBOX.STOP first: the loop ends at its next
   * look and the worker acknowledges whenever its event loop gets to the
   * message or not (`io/protocol.ts`).
   */
  requestStop(untilTxClosed: boolean): Promise<void> {
    return this.request({ kind: "stop", untilTxClosed }, this.timeoutMs, (id) => {
      this.#stopId = id;
      Atomics.store(this.#posted, MAILBOX.STOP_MODE, untilTxClosed ? STOP_UNTIL_TX_CLOSED : 0);
      Atomics.store(this.#posted, MAILBOX.STOP, id);
    });
  }

  /**
   * After {@link requestStop}: blocks the calling thread until the worker
   * says, in its mailbox (MAILBOX.ENDED, the word of its ack), that its
   * loop ended and it let go of the parent's descriptors, or until
   * `deadline` (performance.now()). Returns whether it said so. Only the
   * parent and this worker share the mailbox: a device cannot say it.
   */
  loopEndedBy(deadline: number): boolean {
    const id = this.#stopId;
    if (id === 0 || this.#dead !== undefined) return false;
    for (;;) {
      const seen = Atomics.load(this.#posted, MAILBOX.ENDED);
      if (seen === id) return true;
      const left = deadline - performance.now();
      if (left <= 0) return false;
      Atomics.wait(this.#posted, MAILBOX.ENDED, seen, left);
    }
  }

  #reply(data: unknown): void {
    let reply: IoReply;
    try {
      reply = parseIoReply(data);
    } catch (e) {
      this.logger.log("warn", "datapath", `${this.role} sent a bad reply: ${(e as Error).message}`);
      return;
    }
    switch (reply.kind) {
      case "ack":
        this.#pending.get(reply.id)?.resolve();
        return;
      case "error": {
        const error = new Error(`${this.role} refused: ${reply.message}`);
        if (reply.id !== null && this.#pending.has(reply.id)) {
          this.#pending.get(reply.id)!.reject(error);
        } else {
          this.logger.log("warn", "datapath", error.message);
        }
        return;
      }
      case "fault":
        this.logger.log("error", "datapath", `${this.role}: ${reply.message}`);
        this.onFault(reply.message);
        return;
      case "notice":
        this.logger.log("info", "datapath", `${this.role}: ${reply.message}`);
        return;
      case "released":
        this.#settleReleased(true);
        return;
      default: {
        const never: never = reply;
        throw new Error(`unhandled ${(never as IoReply).kind}`);
      }
    }
  }

  #die(reason: string, fault = true): void {
    if (this.#dead !== undefined) return;
    this.#dead = reason;
    this.#settleReleased(false);
    for (const p of [...this.#pending.values()]) p.reject(new Error(reason));
    if (fault) {
      this.logger.log("error", "datapath", reason);
      this.onFault(reason);
    }
  }

  /** Lets the stopped worker take down its rings (`io/protocol.ts` MAILBOX.RELEASE). */
  release(): void {
    Atomics.store(this.#posted, MAILBOX.RELEASE, 1);
    Atomics.notify(this.#posted, MAILBOX.RELEASE);
  }

  terminate(): void {
    this.#die("terminated", false);
    this.worker.terminate();
    workerCensus.end(this.worker);
  }
}

type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;

/** Whether `fd` is an eventfd (its /proc link names the anon inode). */
function isEventfd(fd: number): boolean {
  try {
    // libc, not Deno.readLinkSync: the daemon's --allow-read does not reach /proc/self.
    return libc.readlink(`/proc/self/fd/${fd}`) === "anon_inode:[eventfd]";
  } catch {
    return false;
  }
}

/** What {@link IoWorkerPair.spawn} needs. */
export interface IoWorkerPairOptions {
  logger: Logger;
  /** Milliseconds a worker has to acknowledge a request (default 5000). */
  timeoutMs?: number;
  /** Other worker modules, for tests only. */
  writerUrl?: URL;
  pollerUrl?: URL;
}

/**
 * A writer and a poller started ahead of the queues they will serve: their
 * threads exist and their modules load while the front-end is still
 * setting up, so starting the queues only sends `init` (a few ms, where
 * starting two workers took 100-300 ms here: downtime at every connection
 * and at every migration's switch-over). They hold nothing until `init`.
 */
export class IoWorkerPair {
  readonly writer: IoWorker;
  readonly poller: IoWorker;

  private constructor(writer: IoWorker, poller: IoWorker) {
    this.writer = writer;
    this.poller = poller;
  }

  static spawn(opts: IoWorkerPairOptions): IoWorkerPair {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    return new IoWorkerPair(
      new IoWorker(
        "writer",
        opts.writerUrl ?? IO_WRITER_URL,
        IO_WRITER_OPTIONS,
        opts.logger,
        timeoutMs,
      ),
      new IoWorker(
        "poller",
        opts.pollerUrl ?? IO_POLLER_URL,
        IO_POLLER_OPTIONS,
        opts.logger,
        timeoutMs,
      ),
    );
  }

  /** Neither worker has died or been terminated. */
  get usable(): boolean {
    return this.writer.dead === undefined && this.poller.dead === undefined;
  }

  terminate(): void {
    this.writer.terminate();
    this.poller.terminate();
  }
}

/** The running data path, seen from the parent's main thread. */
export class DatapathHost {
  readonly buffers: DatapathBuffers;
  /** The bounce arena as a host range (always granted). */
  readonly bounceRange: HostRange;
  readonly #ctl: Int32Array;
  readonly #wakeFd: number;
  readonly #writer: IoWorker;
  readonly #poller: IoWorker;
  readonly #logger: Logger;
  /** The rings lent by the pool, given back at the stop. */
  readonly #lent: LentRings;
  readonly #pool: RingPool | undefined;
  #stopped = false;

  private constructor(opts: DatapathHostOptions, wakeFd: number) {
    this.#pool = opts.rings;
    this.#lent = opts.ioUring !== "off" && opts.rings
      ? opts.rings.lend()
      : { writer: [], poller: [] };
    const lent = this.#lent.writer.length + this.#lent.poller.length;
    if (opts.ioUring !== "off" && opts.rings && lent < RINGS_PER_DATAPATH) {
      opts.logger.log(
        "warn",
        "datapath",
        `only ${lent} of ${RINGS_PER_DATAPATH} io_uring rings left (workers that were ended ` +
          "may still have held theirs): the rest make their own if allowed, else use writev/readv",
      );
    }
    this.buffers = opts.buffers;
    this.#ctl = new Int32Array(opts.buffers.control);
    this.#wakeFd = wakeFd;
    this.#logger = opts.logger;
    const bounce = new Uint8Array(opts.buffers.bounce);
    this.bounceRange = {
      base: Deno.UnsafePointer.value(Deno.UnsafePointer.of(bounce)),
      size: bounce.byteLength,
    };
    const onFault = opts.onFault ?? (() => {});
    const pair = opts.workers?.usable ? opts.workers : IoWorkerPair.spawn(opts);
    if (opts.workers && pair !== opts.workers) opts.workers.terminate();
    this.#writer = pair.writer;
    this.#poller = pair.poller;
    // The writer blocks in Atomics.wait on its doorbell: ring it so that it serves the message.
    this.#writer.nudge = () =>
      signal(this.#ctl, CTL.WRITER_EVENTS, 0, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
    this.#poller.nudge = () => this.#wakePoller();
    this.#writer.onFault = (m) => onFault("writer", m);
    this.#poller.onFault = (m) => onFault("poller", m);
  }

  /**
   * Starts both workers and waits until each acknowledged its configuration.
   * @throws {TypeError} if a buffer does not have the datapath.ts layout.
   * @throws {RangeError} if a range is invalid.
   * @throws SyscallError when the tap's flags cannot be set.
   * @throws Error if a worker refuses or does not answer in time.
   */
  static async start(opts: DatapathHostOptions): Promise<DatapathHost> {
    const { buffers } = opts;
    if (opts.ioUring !== "off") await opts.rings?.reclaim(RINGS_PER_DATAPATH, RECLAIM_WAIT_MS);
    for (const ring of [buffers.tx, buffers.rxPost, buffers.rxLong, buffers.rxDone]) {
      SpscRing.attach(ring);
    }
    if (!(buffers.control instanceof SharedArrayBuffer) || buffers.control.byteLength < CTL_BYTES) {
      throw new TypeError(`control must be a SharedArrayBuffer of ${CTL_BYTES} bytes`);
    }
    if (!(buffers.bounce instanceof SharedArrayBuffer)) {
      throw new TypeError("bounce must be a SharedArrayBuffer");
    }
    libc.setNonBlocking(opts.tapFd, true);
    const wakeFd = libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC);
    const host = new DatapathHost(opts, wakeFd);
    try {
      const ranges = host.#grant(opts.ranges ?? []);
      // The workers' turns on the TX ring (tx_drain.ts); the device never sees it.
      const txShared = createTxShared();
      const fd = (list: readonly (number | null)[] | undefined, q: number) =>
        host.#eventfd(list?.[q] ?? null);
      const queueFds = {
        kickRx: fd(opts.kickFds, RX_QUEUE),
        kickTx: fd(opts.kickFds, TX_QUEUE),
        callRx: fd(opts.callFds, RX_QUEUE),
        callTx: fd(opts.callFds, TX_QUEUE),
      };
      const init = (role: IoRole, mailbox: SharedArrayBuffer) => ({
        kind: "init" as const,
        version: IO_PROTOCOL_VERSION,
        role,
        control: buffers.control,
        tx: buffers.tx,
        rxPost: buffers.rxPost,
        rxLong: buffers.rxLong,
        rxDone: buffers.rxDone,
        mailbox,
        tapFd: opts.tapFd,
        wakeFd,
        ranges,
        ioUring: opts.ioUring ?? "auto",
        rings: role === "writer" ? host.#lent.writer : host.#lent.poller,
        txUsed: opts.txUsed ?? null,
        txShared,
        rateLimit: opts.rateLimit ?? null,
        rxFrameRoom: opts.rxFrameRoom ?? RX_FRAME_ROOM_MAX,
        rxUsed: opts.rxUsed ?? null,
        log: opts.log ?? null,
        queueFds,
        capture: opts.capture
          ? {
            ring: role === "writer" ? opts.capture.writer : opts.capture.poller,
            state: opts.capture.state,
          }
          : null,
      });
      const startMs = opts.startTimeoutMs ?? DEFAULT_START_TIMEOUT_MS;
      const settled = await Promise.allSettled([
        host.#writer.request(init("writer", host.#writer.mailbox), startMs),
        host.#poller.request(init("poller", host.#poller.mailbox), startMs),
        opts.alongside?.(Number(host.bounceRange.base)),
      ]);
      const failed = settled.find((r) => r.status === "rejected");
      if (failed !== undefined) throw failed.reason;
      return host;
    } catch (e) {
      host.#writer.terminate();
      host.#poller.terminate();
      libc.close(wakeFd);
      // A worker that failed to start may have mapped a ring: none is lent again.
      host.#pool?.giveBack(host.#lent, false);
      throw e;
    }
  }

  /** The ranges the workers get: the caller's plus the bounce arena; validated here. */
  #grant(ranges: readonly HostRange[]): HostRange[] {
    const all = [...ranges, this.bounceRange];
    IoRegions.from(all); // throws a RangeError naming the bad range
    return all;
  }

  #wakePoller(): void {
    // A failed write (counter at its maximum) still leaves the poller readable.
    libc.eventfdSignal(this.#wakeFd);
  }

  #both(msg: DistributiveOmit<IoRequest, "id">): Promise<void> {
    return Promise.all([this.#writer.request(msg), this.#poller.request(msg)]).then(() => {});
  }

  /**
   * Replaces the guest ranges iovecs may point into (the bounce arena stays).
   * Resolves when both workers acknowledged: from then on neither touches a
   * range that is not in `ranges`, and the caller may unmap it.
   */
  setRegions(ranges: readonly HostRange[]): Promise<void> {
    return this.#both({ kind: "setRegions", ranges: this.#grant(ranges) });
  }

  /**
   * Sets (or with null, clears) the kick eventfd of `queue` (RX_QUEUE or
   * TX_QUEUE), made O_NONBLOCK. Resolves when the poller no longer uses the
   * old one (the caller may close it then).
   * @throws {TypeError} if `fd` is not an eventfd.
   */
  setKickFd(queue: number, fd: number | null): Promise<void> {
    return this.#poller.request({ kind: "setFd", slot: kickSlot(queue), fd: this.#eventfd(fd) });
  }

  /**
   * Sets (or clears) the call eventfd of `queue`. Resolves when no worker
   * uses the old one: RX's the poller alone signals (it publishes RX); TX's
   * both (each writes TX frames and publishes their completions).
   * @throws {TypeError} if `fd` is not an eventfd.
   */
  setCallFd(queue: number, fd: number | null): Promise<void> {
    const msg = { kind: "setFd", slot: callSlot(queue), fd: this.#eventfd(fd) } as const;
    return queue === RX_QUEUE ? this.#poller.request(msg) : this.#both(msg);
  }

  /**
   * Starts, changes or ends (null) dirty logging in both workers. Resolves
   * when both log every later write in the new bitmap and no longer touch
   * the old one (the caller may unmap it then).
   */
  setLog(log: LogConfig | null): Promise<void> {
    return this.#both({ kind: "setLog", log });
  }

  /**
   * Tells the poller the longest frame the tap can now hand it, net header
   * included. Resolves once the poller reads with that room.
   */
  setRxFrameRoom(bytes: number): Promise<void> {
    return this.#poller.request({ kind: "setRxFrameRoom", bytes });
  }

  /** Replaces the tap descriptor in both workers (made O_NONBLOCK). */
  setTap(fd: number): Promise<void> {
    libc.setNonBlocking(fd, true);
    return this.#both({ kind: "setFd", slot: "tap", fd });
  }

  /** The control block's counters, read now. */
  counters(): DatapathCounters {
    const c = this.#ctl;
    return {
      pollerStarved: Atomics.load(c, CTL.POLLER_STARVED) !== 0,
      pollerNoBuffer: Atomics.load(c, CTL.POLLER_NO_BUFFER),
      pollerTooBig: Atomics.load(c, CTL.POLLER_TOO_BIG),
      ioBadRecord: Atomics.load(c, CTL.IO_BAD_RECORD),
      writerErrors: Atomics.load(c, CTL.WRITER_ERRORS),
      writerEngine: Atomics.load(c, CTL.WRITER_ENGINE) === WRITER_ENGINE_IO_URING
        ? "io_uring"
        : Atomics.load(c, CTL.WRITER_ENGINE) === WRITER_ENGINE_WRITEV
        ? "writev"
        : "starting",
      pollerErrors: Atomics.load(c, CTL.POLLER_ERRORS),
      pollerEngine: Atomics.load(c, CTL.POLLER_ENGINE) === POLLER_ENGINE_IO_URING
        ? "io_uring"
        : Atomics.load(c, CTL.POLLER_ENGINE) === POLLER_ENGINE_READV
        ? "readv"
        : "starting",
      pollerBatches: Atomics.load(c, CTL.POLLER_BATCHES),
      pollerUnused: Atomics.load(c, CTL.POLLER_UNUSED),
      pollerStarvations: Atomics.load(c, CTL.POLLER_STARVATIONS),
      pollerWakeAsked: Atomics.load(c, CTL.POLLER_WAKE_ASKED),
      rxInterrupts: Atomics.load(c, CTL.RX_INTERRUPTS),
      rxKicks: Atomics.load(c, CTL.RX_KICKS),
      txKicks: Atomics.load(c, CTL.TX_KICKS),
      deviceWakes: Atomics.load(c, CTL.DEVICE_WAKES),
      pollerTxBatches: Atomics.load(c, CTL.POLLER_TX_BATCHES),
    };
  }

  /**
   * Ends both loops (each acknowledges once its loop has ended and it let
   * go of the parent's descriptors), terminates the workers and closes the
   * wake eventfd. A worker that does not answer in time is terminated
   * anyway; the error is logged. Idempotent. Resolves false when one did
   * not answer: its thread may still be inside a system call on guest
   * memory. The lent rings go back to the pool once both workers say they
   * released them, after {@link release}.
   *
   * `untilTxClosed`: the writer first writes what the device hands over
   * until the device says it has quiesced (`StopRequest`).
   *
   * `endLater`: the workers' threads are left for {@link end} (the caller's
   * to call). Tearing two isolates down takes several ms of CPU that the
   * rest of a stop needs first on a small machine (the device's stop, the
   * answer to GET_VRING_BASE); a worker whose loop ended touches nothing.
   */
  async stop(opts: { endLater?: boolean; untilTxClosed?: boolean } = {}): Promise<boolean> {
    if (this.#stopped) return true;
    this.#stopped = true;
    const results = await Promise.allSettled([
      this.#writer.requestStop(opts.untilTxClosed === true),
      this.#poller.requestStop(false),
    ]);
    let clean = true;
    for (const r of results) {
      if (r.status === "rejected") {
        clean = false;
        this.#logger.log("warn", "datapath", `stop: ${(r.reason as Error).message}`);
      }
    }
    if (!opts.endLater || !clean) this.end();
    libc.close(this.#wakeFd);
    // The rings are lent again once both workers, having acked, released
    // them (unmapped, no file registered). A worker ended before that may
    // still be inside a system call on one: its rings are closed instead.
    const pool = this.#pool;
    if (pool !== undefined) {
      const released = Promise.all([this.#writer.released, this.#poller.released]).then(
        ([w, p]) => pool.giveBack(this.#lent, clean && w && p),
      );
      pool.returning({ release: () => this.release(), released });
    }
    return clean;
  }

  /**
   * After {@link stop} was called: blocks the calling thread until both
   * workers say in their own mailboxes that their loops ended (the word of
   * their acks), or until `deadline` (performance.now()). Returns whether
   * both did: then nothing of theirs touches guest memory or the parent's
   * descriptors any more, though their acks may not have arrived yet.
   */
  loopsEndedBy(deadline: number): boolean {
    return this.#writer.loopEndedBy(deadline) && this.#poller.loopEndedBy(deadline);
  }

  /**
   * Lets both stopped workers take down their rings, once the rest of the
   * stop is done (the answer to the front-end is out): they wait for this
   * (`io/protocol.ts` MAILBOX.RELEASE). Idempotent.
   */
  release(): void {
    this.#writer.release();
    this.#poller.release();
  }

  /**
   * Ends both workers' threads (after `stop({ endLater: true })`): lets them
   * release their rings, and ends each once it has, or after
   * {@link RELEASE_WAIT_MS} (a worker that never acked its stop). Idempotent.
   */
  end(): void {
    this.release();
    for (const w of [this.#writer, this.#poller]) {
      if (w.dead !== undefined) continue;
      const timer = setTimeout(() => w.terminate(), RELEASE_WAIT_MS);
      Deno.unrefTimer(timer); // the daemon's exit does not wait for it
      w.released.then(() => {
        clearTimeout(timer);
        w.terminate();
      });
    }
  }

  #eventfd(fd: number | null): number | null {
    if (fd === null) return null;
    if (!isEventfd(fd)) throw new TypeError(`Descriptor ${fd} is not an eventfd`);
    libc.setNonBlocking(fd, true);
    return fd;
  }
}

/** A region of guest memory as the parent maps it: where a VMM user address lives here. */
export interface UserMapping {
  userAddr: bigint;
  size: bigint;
  hostAddr: bigint;
}

/**
 * Where the writer publishes TX completions (`ipc/datapath.ts`): the TX used
 * ring's idx, and the avail ring's used_event (with EVENT_IDX) or flags, as
 * host addresses in this process's mappings of guest memory.
 * @throws {RangeError} if a word is not inside one mapped region.
 */
export function txUsedPlace(
  maps: readonly UserMapping[],
  ring: { num: number; availUser: bigint; usedUser: bigint },
  features: bigint,
): TxUsedPlace {
  const v = ringWords(maps, ring, features, "TX");
  return {
    // virtio 1.2 §2.7.8 used ring: le16 flags, le16 idx, ...
    idxAddr: v.host(ring.usedUser + 2n, 2n, "TX used->idx"),
    eventAddr: v.eventAddr,
    eventIdx: v.eventIdx,
  };
}

/**
 * Where the poller completes RX frames (RX publication): the RX used ring
 * and the driver's word it reads after publishing, as host addresses, from
 * the ring's user addresses (SET_VRING_ADDR) and the mapped regions. The
 * used ring must lie inside one mapping.
 * @throws {RangeError} naming what is not in guest memory.
 */
export function rxUsedPlace(
  maps: readonly UserMapping[],
  ring: { num: number; availUser: bigint; usedUser: bigint },
  features: bigint,
): RxUsedPlace {
  const v = ringWords(maps, ring, features, "RX");
  return {
    ringAddr: v.host(ring.usedUser, 4n + 8n * BigInt(ring.num), "RX used ring"),
    size: ring.num,
    eventAddr: v.eventAddr,
    eventIdx: v.eventIdx,
  };
}

/**
 * What both used-ring places share: translating a user range that must lie
 * inside one mapping, and the driver's word read after publishing
 * (§2.7.6 avail ring: le16 flags, le16 idx, le16 ring[num], le16 used_event).
 */
function ringWords(
  maps: readonly UserMapping[],
  ring: { num: number; availUser: bigint },
  features: bigint,
  queue: string,
) {
  const host = (user: bigint, bytes: bigint, what: string): bigint => {
    for (const m of maps) {
      if (user >= m.userAddr && user + bytes <= m.userAddr + m.size) {
        return m.hostAddr + (user - m.userAddr);
      }
    }
    throw new RangeError(`${what} at user address 0x${user.toString(16)} is not in guest memory`);
  };
  const eventIdx = (features & VIRTIO_RING_F_EVENT_IDX) !== 0n;
  const eventAddr = eventIdx
    ? host(ring.availUser + 4n + 2n * BigInt(ring.num), 2n, `${queue} avail->used_event`)
    : host(ring.availUser, 2n, `${queue} avail->flags`);
  return { host, eventIdx, eventAddr };
}

function kickSlot(queue: number): FdSlot {
  if (queue === RX_QUEUE) return "kickRx";
  if (queue === TX_QUEUE) return "kickTx";
  throw new RangeError(`Queue ${queue} is neither RX_QUEUE nor TX_QUEUE`);
}

function callSlot(queue: number): FdSlot {
  if (queue === RX_QUEUE) return "callRx";
  if (queue === TX_QUEUE) return "callTx";
  throw new RangeError(`Queue ${queue} is neither RX_QUEUE nor TX_QUEUE`);
}
