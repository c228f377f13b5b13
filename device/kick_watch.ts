/**
 * Lost-kick recovery: a device that asks the driver for kicks and then
 * sleeps relies on every kick arriving. When one is lost the queue stalls
 * for good: the driver, having published past avail_event without kicking,
 * never meets avail_event again, and the device never looks again.
 *
 * Such a kick is lost in practice (a guest's TX queue stopped with avail->idx
 * past avail_event == last_avail_idx and no kick on the eventfd). A known
 * cause: QEMU before 8.1
 * under TCG with one vCPU drops the guest's memory barriers (QEMU commit
 * "tcg: Do not elide memory barriers for !CF_PARALLEL in system mode"), so
 * the guest can load a stale avail_event after its avail->idx store, the
 * store-load race that the barrier in `Virtqueue.enableNotifications`
 * closes on the device's side.
 *
 * The watch looks at each queue at most every {@link KICK_GRACE_MS}. A
 * queue that waits for a kick (`awaitsKick`: notifications on, buffers
 * offered that the device has not taken) is noted with its last_avail_idx;
 * if it still waits at the next look with that index unchanged, no kick is
 * on its way any more: the watch counts `kicksMissed` and returns the
 * queue's event bit, and the device serves the queue as if kicked. A kick
 * still in flight (microseconds) is never counted; a stall lasts at most
 * about two grace periods.
 *
 * @module
 */

/** What the watch needs of a queue. */
export interface WatchedQueue {
  /**
   * True while the device asks for kicks, the driver has offered buffers
   * the device has not taken, and nothing else keeps the device from taking
   * them (e.g. a full TX ring it waits on).
   */
  awaitsKick(): boolean;
  /** The device's last_avail_idx: unchanged between two looks means it took nothing. */
  lastAvailIdx(): number;
  /** Where lost kicks are counted. */
  counters: { kicksMissed: number };
  /** The device event bit that serves this queue. */
  event: number;
}

/** How long offered buffers may wait for their kick before the device takes them without it (ms). */
export const KICK_GRACE_MS = 10;

export class KickWatch {
  readonly #queues: readonly WatchedQueue[];
  /** last_avail_idx at the first look that found the queue waiting, or -1. */
  readonly #noted: number[];
  #nextLook = 0;
  /** The device worked since the last look: the next look comes one grace period after. */
  #worked = false;

  constructor(queues: readonly WatchedQueue[]) {
    this.#queues = queues;
    this.#noted = queues.map(() => -1);
  }

  /**
   * Looks at the queues if a look is due at `now` (ms, monotonic); returns
   * the event bits of the queues whose kick was lost (0 almost always).
   */
  look(now: number): number {
    if (now < this.#nextLook) return 0;
    this.#nextLook = now + KICK_GRACE_MS;
    this.#worked = false;
    let bits = 0;
    for (let i = 0; i < this.#queues.length; i++) {
      const q = this.#queues[i];
      if (!q.awaitsKick()) {
        this.#noted[i] = -1;
        continue;
      }
      const last = q.lastAvailIdx();
      if (this.#noted[i] === last) {
        q.counters.kicksMissed++;
        bits |= q.event;
        this.#noted[i] = -1;
      } else {
        this.#noted[i] = last;
      }
    }
    return bits;
  }

  /** The device served its queues: a kick lost just before it slept is looked for soon. */
  worked(): void {
    this.#worked = true;
  }

  /**
   * How long the device may sleep (ms) before the watch must look again:
   * until the next look while a queue is noted or the device worked since
   * the last look (a kick lost as it went to sleep costs a grace period or
   * two, not a whole idle wait), else `idleMs`.
   */
  sleepFor(now: number, idleMs: number): number {
    if (!this.#worked && !this.#noted.some((v) => v >= 0)) return idleMs;
    return Math.max(1, Math.min(idleMs, this.#nextLook - now));
  }

  /** Forgets what it noted (queues stopped or reset). */
  clear(): void {
    this.#noted.fill(-1);
    this.#nextLook = 0;
    this.#worked = false;
  }
}
