/**
 * How the poller reads frames from the tap (`rx_receiver.ts` RxReadEngine):
 * one non-blocking `readv` a frame, and batches of IORING_OP_READV with
 * RWF_NOWAIT through the poller's own io_uring when the kernel allows it
 * (`--io-uring auto`). The iovec arrays and the overflow buffer are private
 * to the poller: the device never sees them.
 *
 * @module
 */

import { IoUring, type PreparedRing } from "./io_uring.ts";
import * as libc from "../host/libc.ts";
import { RX_FRAME_ROOM_MAX } from "./protocol.ts";
import {
  BATCH_SLOT_WORDS,
  RX_BATCH,
  type RxBatchReader,
  type RxReadEngine,
} from "./rx_receiver.ts";

const sys = libc.sys;

/** Batches of reads on an io_uring (see `io_uring.ts`, "Ordering"). */
class UringBatch implements RxBatchReader {
  readonly #iov = libc.addressed(new Uint32Array(RX_BATCH * BATCH_SLOT_WORDS));
  readonly #lo = new Uint32Array(RX_BATCH);
  readonly #hi = new Uint32Array(RX_BATCH);

  constructor(readonly ring: IoUring, private readonly engine: TapReadEngine) {
    for (let i = 0; i < RX_BATCH; i++) {
      const a = this.#iov.address + BigInt(i * BATCH_SLOT_WORDS * 4);
      this.#lo[i] = Number(a & 0xffff_ffffn);
      this.#hi[i] = Number(a >> 32n);
    }
  }

  get iov(): Uint32Array {
    // Read through the holder: it keeps the buffer alive while SQEs name it (libc.addressed).
    return this.#iov.view;
  }

  queue(i: number, count: number): void {
    this.ring.queueReadvNowait(this.engine.tapFd, this.#lo[i], this.#hi[i], count, i);
  }

  submit(results: Int32Array): void {
    this.ring.submitAndWait(results);
  }
}

/** Reads from the tap with libc: `readv`, and io_uring batches when set up. */
export class TapReadEngine implements RxReadEngine {
  #tapFd: number;
  batch: RxBatchReader | null = null;
  #uring: IoUring | null = null;
  /**
   * The overflow buffer: a frame's bytes beyond the chains land here and are
   * discarded. Its address is read from the holder at each read, which is
   * what keeps the buffer alive (libc.addressed: a cached address alone let
   * V8 free it, and readv then wrote over a free malloc chunk).
   */
  readonly #overflow = libc.addressed(new Uint8Array(RX_FRAME_ROOM_MAX));

  constructor(tapFd: number) {
    this.#tapFd = tapFd;
  }

  get overflowLo(): number {
    return this.#overflow.lo;
  }
  get overflowHi(): number {
    return this.#overflow.hi;
  }
  get overflowLen(): number {
    return this.#overflow.view.byteLength;
  }

  get tapFd(): number {
    return this.#tapFd;
  }

  /** Another tap descriptor (between batches); the io_uring's registered file follows. */
  set tapFd(fd: number) {
    this.#tapFd = fd;
    this.#uring?.useFixedFile(fd);
  }

  /**
   * Sets up batching on an io_uring of `entries` (the `prepared` one, a ring
   * made during set-up, when given); returns a line for the log saying what
   * the reads use. Without io_uring (refused by the kernel),
   * reads are one `readv` a frame.
   */
  startBatching(
    entries: number,
    prepared: PreparedRing | null = null,
  ): { batching: boolean; message: string } {
    try {
      const ring = prepared ? IoUring.adopt(prepared, entries) : IoUring.setup(entries);
      const fixed = ring.useFixedFile(this.#tapFd);
      this.#uring = ring;
      this.batch = new UringBatch(ring, this);
      return {
        batching: true,
        message: fixed ? "" : " (the tap is not a registered file: the kernel refused)",
      };
    } catch (e) {
      return { batching: false, message: (e as Error).message };
    }
  }

  readv(iov: Uint8Array, count: number): number {
    const r = Number(sys.readv(this.#tapFd, iov, count));
    return r < 0 ? -libc.errno() : r;
  }

  close(): void {
    this.#uring?.close();
    this.#uring = null;
    this.batch = null;
  }
}
