/**
 * Which threads of this process are Workers the parent started and still
 * trusts, and which are not: the evidence that decides whether memory a
 * worker once held may be unmapped (`retired_memory.ts`).
 *
 * Deno runs each Worker on its own OS thread named `worker-<n>`, created
 * synchronously inside `new Worker()` (measured on Deno 2.9.6), and a worker
 * the parent terminates stops running JavaScript but keeps its thread, and
 * every view it had of guest memory, until that thread exits: usually within
 * milliseconds, later when it is blocked in a system call, never when it is
 * a nested worker spinning in a loop (measured: a zero-permission worker can
 * start one, and terminating its parent does not stop it; the device worker
 * deletes its `Worker` constructor before it reads any input for that reason).
 *
 * So the census records, for every worker the parent starts, the `worker-*`
 * thread ids that appeared during its `new Worker()` (only the main thread
 * starts workers), and forgets them once the parent ends the worker. A
 * `worker-*` thread that belongs to no live worker is a *stray*: a worker
 * that was ended and has not exited yet, or one that a worker started on its
 * own. While any stray exists, no memory a worker may have held is unmapped.
 *
 * @module
 */

import { listThreadIds, threadName } from "../host/proc_self.ts";

/** A thread of this process. */
export interface ThreadInfo {
  tid: number;
  name: string;
}

/** Deno's name for a Worker's thread (`worker-<n>`, in creation order). */
const WORKER_THREAD = /^worker-\d+$/;

/** The `worker-*` threads alive now; null when /proc cannot be read. */
export function workerThreads(): ThreadInfo[] | null {
  let tids: number[];
  try {
    tids = listThreadIds();
  } catch {
    return null;
  }
  const out: ThreadInfo[] = [];
  for (const tid of tids) {
    const name = threadName(tid);
    if (name !== null && WORKER_THREAD.test(name)) out.push({ tid, name });
  }
  return out;
}

/** The parent's record of the workers it started and has not ended. */
export class WorkerCensus {
  /** Thread ids of each live worker. */
  readonly #live = new Map<Worker, { label: string; tids: number[] }>();
  /** /proc could not be read at some start: every thread is suspect from then on. */
  #blind = false;

  /** Starts a worker and records its thread. */
  start(url: URL | string, options: WorkerOptions, label: string): Worker {
    const before = workerThreads();
    const worker = new Worker(url, options);
    const after = workerThreads();
    if (before === null || after === null) {
      this.#blind = true;
      this.#live.set(worker, { label, tids: [] });
      return worker;
    }
    const known = new Set(before.map((t) => t.tid));
    this.#live.set(worker, {
      label,
      tids: after.filter((t) => !known.has(t.tid)).map((t) => t.tid),
    });
    return worker;
  }

  /** The parent ended `worker` (terminated it, or it closed itself): its thread is a stray until it exits. */
  end(worker: Worker): void {
    this.#live.delete(worker);
  }

  /** Workers the parent started and has not ended, with their threads. */
  live(): Array<{ label: string; tids: readonly number[] }> {
    return [...this.#live.values()];
  }

  /**
   * `worker-*` threads that belong to no live worker; null when that cannot
   * be known (/proc unreadable, now or at a worker's start): treat as "some".
   */
  strays(): ThreadInfo[] | null {
    if (this.#blind) return null;
    const threads = workerThreads();
    if (threads === null) return null;
    const ours = new Set<number>();
    for (const w of this.#live.values()) for (const tid of w.tids) ours.add(tid);
    return threads.filter((t) => !ours.has(t.tid));
  }
}

/** The process's census: every worker the parent starts goes through it. */
export const workerCensus = new WorkerCensus();
