/**
 * The io_uring rings the I/O workers use, made once during set-up and lent
 * to each data path: the seccomp filter installed after set-up does not
 * allow io_uring_setup (a ring's operations are invisible to seccomp, and a
 * fresh ring could open files and sockets of any family), so the rings must
 * exist before, restricted to reads and writes (`io/io_uring.ts`,
 * `IoUring.prepareRestricted`).
 *
 * A data path takes three (the writer's TX ring; the poller's TX and RX
 * rings) and gives them back when both workers, after acknowledging their
 * stop, said they released them (unmapped, no file registered). If a
 * worker did not (it was ended while it might still be inside a system
 * call on one), its rings are closed instead: the pool shrinks, and once
 * it cannot lend a full set the workers fall back to `writev`/`readv` for
 * what is missing, which the log says. A start that finds the pool short
 * has stopped data paths release theirs at once ({@link RingPool.reclaim}).
 * Two sets are made, so one data path can start while another's workers are
 * still being ended.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import { IoUring } from "../io/io_uring.ts";
import type { PreparedRing } from "../io/protocol.ts";
import { RX_BATCH } from "../io/rx_receiver.ts";
import { TX_BATCH } from "../io/tx_drain.ts";

/** Rings a data path takes: the writer's TX ring, then the poller's TX and RX rings. */
export const RINGS_PER_DATAPATH = 3;
/** Sets made during set-up. */
export const DATAPATH_SETS = 2;

/** The rings one data path borrowed, by worker. */
export interface LentRings {
  writer: PreparedRing[];
  poller: PreparedRing[];
}

/** A stopped data path whose rings come back once its workers released them. */
export interface ReturningRings {
  /** Lets its workers take their rings down now. */
  release(): void;
  /** Settles once the rings were given back (or closed). */
  released: Promise<unknown>;
}

/** Restricted rings made during set-up, lent to one data path at a time. */
export class RingPool {
  readonly #free: PreparedRing[];
  /** Stopped data paths still holding rings ({@link returning}). */
  readonly #returning = new Set<ReturningRings>();
  /** Rings made (the pool's size when full). */
  readonly made: number;

  constructor(rings: PreparedRing[]) {
    this.#free = [...rings];
    this.made = rings.length;
  }

  /**
   * Makes `sets` sets of restricted rings, during set-up. A kernel that
   * refuses io_uring gives an empty pool and the reason.
   */
  static prepare(sets = DATAPATH_SETS): { pool: RingPool; refused: string | null } {
    const rings: PreparedRing[] = [];
    try {
      for (let i = 0; i < sets * RINGS_PER_DATAPATH; i++) {
        rings.push(IoUring.prepareRestricted(Math.max(TX_BATCH, RX_BATCH)));
      }
      return { pool: new RingPool(rings), refused: null };
    } catch (e) {
      for (const r of rings) libc.closeQuietly(r.fd);
      return { pool: new RingPool([]), refused: (e as Error).message };
    }
  }

  /** Rings free now. */
  get free(): number {
    return this.#free.length;
  }

  /** Lends a set (fewer when the pool ran low: the workers make up the rest as they can). */
  lend(): LentRings {
    const take = (n: number) => this.#free.splice(0, n);
    return { writer: take(1), poller: take(2) };
  }

  /**
   * Takes back what {@link lend} gave: into the pool when the workers let go
   * of them (`clean`), else closed, since a ring a worker may still use
   * cannot be lent again.
   */
  giveBack(lent: LentRings, clean: boolean): void {
    for (const r of [...lent.writer, ...lent.poller]) {
      if (clean) this.#free.push(r);
      else libc.closeQuietly(r.fd);
    }
  }

  /**
   * A stopped data path's rings come back later: its workers release them
   * once the stop is answered, then {@link giveBack}.
   */
  returning(r: ReturningRings): void {
    this.#returning.add(r);
    r.released.finally(() => this.#returning.delete(r));
  }

  /**
   * Before a data path takes its set: when fewer than `n` rings are free
   * and stopped data paths still hold theirs, has them release now and
   * waits for that, at most `maxMs`. A start in the same burst as a stop (a
   * memory table change while the queues run, on any pair) would otherwise
   * go without io_uring for as long as it runs.
   */
  async reclaim(n: number, maxMs: number): Promise<void> {
    if (this.free >= n || this.#returning.size === 0) return;
    const waits = [...this.#returning].map((r) => {
      r.release();
      return r.released;
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    await Promise.race([
      Promise.allSettled(waits),
      new Promise((resolve) => timer = setTimeout(resolve, maxMs)),
    ]);
    clearTimeout(timer);
  }

  /** Closes every free ring (at exit). */
  close(): void {
    for (const r of this.#free.splice(0)) libc.closeQuietly(r.fd);
  }
}
