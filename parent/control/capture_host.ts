/**
 * `--pcap FILE`: the parent's side of packet capture.
 *
 * During set-up (before the sandbox, which forbids opening a file for
 * writing) the parent opens FILE (created 0600, truncated; a regular file
 * only, not followed through a symbolic link), makes one capture ring per
 * I/O worker of every queue pair and the shared state word, and starts the
 * capture worker (`io/capture_worker.ts`, FFI only) with the descriptor.
 * The I/O workers copy each frame they move into their ring while the state
 * is ON (`io/capture_ring.ts`); the capture worker writes the rings to the
 * file as pcapng (`io/capture_writer.ts`).
 *
 * The operator turns capture on and off at run time with
 * `POST /capture?state=on|off` on the `--metrics` socket ({@link CaptureHost.set});
 * once the file reached `--pcap-max` (FULL) or a write failed (FAILED) it
 * stays ended until a restart.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import {
  CAPTURE_FAILED,
  CAPTURE_FULL,
  CAPTURE_OFF,
  CAPTURE_ON,
  CAPTURE_STATE,
  CAPTURE_STATE_BYTES,
  CAPTURE_STATS,
  createCaptureRing,
  ringCounters,
} from "../io/capture_ring.ts";
import type { CaptureInit, CaptureReply } from "../io/capture_writer.ts";
import { IO_WORKER_PERMISSIONS, type PairCapture } from "./datapath_host.ts";
import type { Logger } from "./log.ts";
import { workerCensus } from "./worker_census.ts";

/** The module the capture worker runs. */
export const CAPTURE_WORKER_URL = new URL("../io/capture_worker.ts", import.meta.url);

/** Worker options of the capture writer: FFI only, as the I/O workers (write(2) on its file). */
export const CAPTURE_WORKER_OPTIONS = {
  type: "module",
  name: "vionet-capture",
  deno: { permissions: IO_WORKER_PERMISSIONS },
} as const satisfies WorkerOptions;

/** What capture is doing. */
export type CaptureStateName = "off" | "on" | "full" | "failed";

const STATE_NAMES: Readonly<Record<number, CaptureStateName>> = {
  [CAPTURE_OFF]: "off",
  [CAPTURE_ON]: "on",
  [CAPTURE_FULL]: "full",
  [CAPTURE_FAILED]: "failed",
};

/** The capture's state and counters, for `/capture`, `/metrics` and SIGUSR2. */
export interface CaptureStatus {
  state: CaptureStateName;
  file: string;
  maxBytes: number;
  /** Bytes in the file. */
  fileBytes: number;
  /** Frames written to the file, their bytes, and by direction. */
  packets: number;
  bytes: number;
  txPackets: number;
  rxPackets: number;
  /** Frames not captured: a ring was full (the writer fell behind the data path). */
  droppedBehind: number;
  /** Frames not captured: the file had reached --pcap-max. */
  droppedOverMax: number;
  /** Writes the kernel refused. */
  writeErrors: number;
  /** Records the writer refused as malformed (never expected). */
  corrupt: number;
}

/** The answer to a change asked at run time. */
export type CaptureChange = { ok: true; status: CaptureStatus } | {
  ok: false;
  reason: string;
  status: CaptureStatus;
};

export interface CaptureOptions {
  path: string;
  maxBytes: number;
  /** `--pcap-snaplen`: the most bytes of each frame captured; 0 (default): whole frames. */
  snapLen?: number;
  /** Capture from the start (`--pcap-start on`). */
  start: boolean;
  /** Queue pairs: one interface (and two rings) each. */
  pairs: number;
  /** The tap's name, for the interfaces' names. */
  tapName: string;
  logger: Logger;
  /** Milliseconds the worker has to load (default 30000: under `deno test` it is type-checked). */
  startTimeoutMs?: number;
}

/** Opens `path` for the capture; throws SyscallError, or Error when it is not a regular file. */
function openCaptureFile(path: string): number {
  // O_NONBLOCK: a FIFO without a reader fails (ENXIO) instead of blocking the start.
  const fd = libc.open(
    path,
    libc.O_WRONLY | libc.O_CREAT | libc.O_TRUNC | libc.O_CLOEXEC | libc.O_NOFOLLOW |
      libc.O_NONBLOCK,
    0o600,
  );
  try {
    const st = libc.fstat(fd);
    if ((st.mode & libc.S_IFMT) !== libc.S_IFREG) {
      throw new Error(`--pcap ${path} is not a regular file`);
    }
    return fd;
  } catch (e) {
    libc.closeQuietly(fd);
    throw e;
  }
}

/** The capture (see the module comment). */
export class CaptureHost {
  readonly path: string;
  readonly maxBytes: number;
  readonly #fd: number;
  readonly #state: SharedArrayBuffer;
  readonly #word: Int32Array;
  readonly #stats: Float64Array;
  readonly #pairs: PairCapture[];
  readonly #worker: Worker;
  readonly #logger: Logger;
  #stopped: Promise<void> | null = null;
  #onStopped: (() => void) | null = null;

  private constructor(opts: CaptureOptions, fd: number, worker: Worker) {
    this.path = opts.path;
    this.maxBytes = opts.maxBytes;
    this.#fd = fd;
    this.#logger = opts.logger;
    this.#state = new SharedArrayBuffer(CAPTURE_STATE_BYTES);
    this.#word = new Int32Array(this.#state, 0, CAPTURE_STATE_BYTES / 4);
    this.#stats = new Float64Array(this.#state, 0, CAPTURE_STATE_BYTES / 8);
    // Before any producer exists: each reads it once.
    Atomics.store(this.#word, CAPTURE_STATE.SNAPLEN, opts.snapLen ?? 0);
    this.#pairs = Array.from({ length: opts.pairs }, () => ({
      state: this.#state,
      writer: createCaptureRing(),
      poller: createCaptureRing(),
    }));
    this.#worker = worker;
  }

  /**
   * Opens the file and starts the capture worker; resolves once it wrote the
   * file's header. Throws (and leaves nothing open) when the file cannot be
   * opened or the worker refuses.
   */
  static async open(opts: CaptureOptions): Promise<CaptureHost> {
    const fd = openCaptureFile(opts.path);
    let worker: Worker;
    try {
      worker = workerCensus.start(CAPTURE_WORKER_URL, CAPTURE_WORKER_OPTIONS, "capture");
    } catch (e) {
      libc.closeQuietly(fd);
      throw e;
    }
    const host = new CaptureHost(opts, fd, worker);
    try {
      await host.#start(opts);
    } catch (e) {
      worker.terminate();
      workerCensus.end(worker);
      libc.closeQuietly(fd);
      throw e;
    }
    return host;
  }

  #start(opts: CaptureOptions): Promise<void> {
    const interfaces = this.#pairs.map((_, i) => ({
      name: `${opts.tapName}/pair${i}`,
      description: `vionet virtio-net queue pair ${i} (rings ${2 * i} RX, ${2 * i + 1} TX); ` +
        "outbound: guest to tap, inbound: tap to guest",
    }));
    const init: CaptureInit = {
      kind: "init",
      fd: this.#fd,
      state: this.#state,
      rings: this.#pairs.flatMap((p, pair) => [{ pair, ring: p.writer }, { pair, ring: p.poller }]),
      interfaces,
      maxBytes: this.maxBytes,
      snapLen: opts.snapLen ?? 0,
    };
    return new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () => reject(new Error("the capture worker did not start in time")),
        opts.startTimeoutMs ?? 30_000,
      );
      this.#worker.onerror = (e) => {
        e.preventDefault();
        clearTimeout(timer);
        reject(new Error(`capture worker failed: ${e.message}`));
        this.#logger.log("error", "capture", `capture worker failed: ${e.message}`);
        Atomics.store(this.#word, CAPTURE_STATE.STATE, CAPTURE_FAILED);
        this.#onStopped?.();
      };
      this.#worker.onmessage = (e: MessageEvent<CaptureReply>) => {
        const m = e.data;
        switch (m?.kind) {
          case "ready":
            clearTimeout(timer);
            if (opts.start) Atomics.store(this.#word, CAPTURE_STATE.STATE, CAPTURE_ON);
            resolve();
            return;
          case "error":
            clearTimeout(timer);
            reject(new Error(`capture worker refused: ${m.message}`));
            this.#logger.log("warn", "capture", m.message);
            return;
          case "notice":
            this.#logger.log(m.level === "warn" ? "warn" : "info", "capture", String(m.message));
            return;
          case "stopped":
            this.#onStopped?.();
            return;
        }
      };
      this.#worker.postMessage(init);
    });
  }

  /** Pair `pair`'s rings and the state, for its data paths. */
  pair(pair: number): PairCapture {
    const p = this.#pairs[pair];
    if (p === undefined) throw new RangeError(`capture has no queue pair ${pair}`);
    return p;
  }

  /**
   * Turns capture on or off. Refused (with the reason) once the file is
   * full or a write failed, or after stop().
   */
  set(on: boolean): CaptureChange {
    if (this.#stopped !== null) {
      return { ok: false, reason: "the daemon is stopping", status: this.status() };
    }
    const want = on ? CAPTURE_ON : CAPTURE_OFF;
    const from = on ? CAPTURE_OFF : CAPTURE_ON;
    const was = Atomics.compareExchange(this.#word, CAPTURE_STATE.STATE, from, want);
    if (was === from || was === want) {
      if (was === from) {
        this.#logger.log("info", "capture", `capture ${on ? "started" : "stopped"} (${this.path})`);
      }
      return { ok: true, status: this.status() };
    }
    const reason = was === CAPTURE_FULL
      ? `the capture file ${this.path} reached --pcap-max (${this.maxBytes} bytes); ` +
        "capture ended (restart vionet for a new file)"
      : `writing the capture file ${this.path} failed; capture ended`;
    return { ok: false, reason, status: this.status() };
  }

  /** The state and counters now. */
  status(): CaptureStatus {
    const s = this.#stats;
    let droppedBehind = 0, overMax = 0, corrupt = 0;
    for (const p of this.#pairs) {
      for (const ring of [p.writer, p.poller]) {
        const c = ringCounters(ring);
        droppedBehind += c.droppedBehind;
        overMax += c.droppedOverMax;
        corrupt += c.corrupt;
      }
    }
    return {
      state: STATE_NAMES[Atomics.load(this.#word, CAPTURE_STATE.STATE)] ?? "failed",
      file: this.path,
      maxBytes: this.maxBytes,
      fileBytes: s[CAPTURE_STATS.FILE_BYTES],
      packets: s[CAPTURE_STATS.PACKETS],
      bytes: s[CAPTURE_STATS.BYTES],
      txPackets: s[CAPTURE_STATS.TX_PACKETS],
      rxPackets: s[CAPTURE_STATS.RX_PACKETS],
      droppedBehind,
      droppedOverMax: overMax + s[CAPTURE_STATS.OVER_MAX],
      writeErrors: s[CAPTURE_STATS.WRITE_ERRORS],
      corrupt,
    };
  }

  /**
   * Stops capturing, lets the worker write what the rings hold (at most
   * `timeoutMs`), ends it and closes the file.
   */
  stop(timeoutMs = 2000): Promise<void> {
    if (this.#stopped !== null) return this.#stopped;
    Atomics.compareExchange(this.#word, CAPTURE_STATE.STATE, CAPTURE_ON, CAPTURE_OFF);
    this.#stopped = new Promise<void>((resolve) => {
      const timer = setTimeout(() => this.#onStopped?.(), timeoutMs);
      this.#onStopped = () => {
        this.#onStopped = null;
        clearTimeout(timer);
        this.#worker.terminate();
        workerCensus.end(this.#worker);
        libc.closeQuietly(this.#fd);
        resolve();
      };
      this.#worker.postMessage({ kind: "stop" });
    });
    return this.#stopped;
  }
}
