/**
 * Guest memory that a worker held and never provably gave back: retired,
 * kept reserved while any thread that may hold a view of it can still run,
 * then unmapped.
 *
 * Theory of operation
 *
 * - Retiring (`guest_memory_map.ts` `retireRegion`) maps private zero pages
 *   over the whole range (MAP_FIXED, so the range is never without a
 *   mapping) and closes the guest's file. A stale view then reads zeros and
 *   writes into pages nobody reads; nothing else can be mapped at that
 *   address, so no later mapping (the next guest's memory, an io_uring ring,
 *   a V8 page) can become visible through it.
 * - Reclaiming: a view of the range can only live in a worker thread that
 *   the parent ended (the device that did not give the memory back, an I/O
 *   worker that did not answer) or in a thread such a worker started. All of
 *   those are "strays" to the census (`worker_census.ts`): `worker-*` threads
 *   that belong to no live worker. Once there is no stray, no thread but the
 *   live, trusted ones exists that could touch the range, and it is
 *   unmapped. Until then it stays, and the census is looked at again every
 *   {@link RECLAIM_POLL_MS}.
 * - A stray that does not exit: Deno's `Worker.terminate()` (2.9.6,
 *   measured) takes effect only when the worker's event loop next turns; a
 *   worker that never returns to it (a loop, a chain of blocking waits)
 *   keeps running, at full speed, for good. The daemon cannot end such a
 *   thread on its own, so a stray still there {@link STRAY_GRACE_MS} after a
 *   range was retired is reported by name and the owner is told
 *   (`onUncontained`: the daemon exits, and its supervisor starts a fresh
 *   process; only the guest whose device went rogue loses its connection).
 * - The bound: ranges wait only for strays, and strays either exit within
 *   the grace period or end the process, so the address space kept reserved
 *   never grows over a daemon's life; as a backstop, a total above
 *   `limitBytes` is also reported to the owner. Reserved bytes are address
 *   space, not memory: zero pages cost nothing until written.
 *
 * @module
 */

import { type MappedRegion, retireRegion } from "./guest_memory_map.ts";
import * as libc from "../host/libc.ts";
import type { Logger } from "./log.ts";
import { type ThreadInfo, workerCensus } from "./worker_census.ts";

/** How often the census is looked at while ranges wait (ms). */
export const RECLAIM_POLL_MS = 200;
/** A stray still running after this long is reported (ms). */
export const STRAY_GRACE_MS = 5000;
/** Default bound on the address space kept reserved: 1 TiB of the 128 TiB x86-64 user space. */
export const DEFAULT_RETIRED_LIMIT_BYTES = 2 ** 40;

/** One retired range. */
interface Retired {
  base: Deno.PointerObject;
  length: number;
  what: string;
  since: number;
}

export interface RetiredMemoryOptions {
  /** Most bytes kept reserved before `onUncontained` (default {@link DEFAULT_RETIRED_LIMIT_BYTES}). */
  limitBytes?: number;
  /** How long a stray may outlive a retirement (ms; default {@link STRAY_GRACE_MS}). */
  graceMs?: number;
  /** The threads that may hold views of retired ranges (default: the process census). */
  strays?: () => ThreadInfo[] | null;
  /** Unmaps a range (default munmap). */
  unmap?: (base: Deno.PointerObject, length: number) => void;
}

/** The process's retired ranges. */
export class RetiredMemory {
  readonly #ranges: Retired[] = [];
  #limit: number;
  readonly #strays: () => ThreadInfo[] | null;
  readonly #unmap: (base: Deno.PointerObject, length: number) => void;
  #logger: Logger | null = null;
  readonly #graceMs: number;
  #onUncontained: ((reason: string) => void) | null = null;
  #timer: ReturnType<typeof setTimeout> | null = null;
  /** Strays already reported, by tid. */
  readonly #reported = new Set<number>();
  /** Bytes unmapped so far, and ranges retired so far (for tests and the stats dump). */
  reclaimedBytes = 0;
  retiredCount = 0;
  /** When ranges were last unmapped (Date.now()); 0: never. */
  lastReclaimAt = 0;

  constructor(opts: RetiredMemoryOptions = {}) {
    this.#limit = opts.limitBytes ?? DEFAULT_RETIRED_LIMIT_BYTES;
    this.#graceMs = opts.graceMs ?? STRAY_GRACE_MS;
    this.#strays = opts.strays ?? (() => workerCensus.strays());
    this.#unmap = opts.unmap ?? ((base, length) => libc.munmap(base, length));
  }

  /**
   * Where reports go, and what to do when a stray cannot be waited out or
   * the bound is passed (the daemon sets these at start).
   */
  configure(opts: {
    logger?: Logger;
    limitBytes?: number;
    onUncontained?: (reason: string) => void;
  }): void {
    if (opts.logger !== undefined) this.#logger = opts.logger;
    if (opts.limitBytes !== undefined) this.#limit = opts.limitBytes;
    if (opts.onUncontained !== undefined) this.#onUncontained = opts.onUncontained;
  }

  /** Bytes of address space kept reserved now. */
  get reservedBytes(): number {
    return this.#ranges.reduce((n, r) => n + r.length, 0);
  }

  /** The ranges kept now, for logs and tests. */
  ranges(): Array<{ base: bigint; length: number; what: string }> {
    return this.#ranges.map((r) => ({
      base: Deno.UnsafePointer.value(r.base),
      length: r.length,
      what: r.what,
    }));
  }

  /**
   * Retires `region` (zero pages over its range, its fd closed) and keeps
   * the range until no stray may hold it. Errors are returned, not thrown.
   */
  retire(region: MappedRegion, what: string): Error | null {
    const error = retireRegion(region);
    if (error !== null) return error;
    this.#ranges.push({
      base: region.mapBase,
      length: region.mapLength,
      what,
      since: performance.now(),
    });
    this.retiredCount++;
    this.reclaim();
    const reserved = this.reservedBytes;
    if (reserved > this.#limit) {
      this.#uncontained(
        `${reserved} bytes of address space are reserved for guest memory that ended workers ` +
          `may still hold (limit ${this.#limit})`,
      );
    }
    return null;
  }

  /**
   * Unmaps every retired range if no stray thread exists; otherwise keeps
   * them and looks again later. Returns the bytes unmapped.
   */
  reclaim(): number {
    if (this.#ranges.length === 0) return 0;
    const strays = this.#strays();
    if (strays === null || strays.length > 0) {
      this.#reportLongStrays(strays);
      this.#schedule();
      return 0;
    }
    let freed = 0;
    for (const r of this.#ranges.splice(0)) {
      try {
        this.#unmap(r.base, r.length);
        freed += r.length;
      } catch (e) {
        this.#log("error", `unmapping retired ${r.what} failed: ${(e as Error).message}`);
      }
    }
    this.reclaimedBytes += freed;
    if (freed > 0) this.lastReclaimAt = Date.now();
    this.#reported.clear();
    if (freed > 0) {
      this.#log("info", `${freed} bytes of retired guest memory unmapped: no ended worker is left`);
    }
    return freed;
  }

  /** Strays that outlived the grace period: reported once, and the owner told. */
  #reportLongStrays(strays: ThreadInfo[] | null): void {
    const oldest = Math.min(...this.#ranges.map((r) => r.since));
    if (performance.now() - oldest < this.#graceMs) return;
    const fresh = strays === null
      ? (this.#reported.has(-1) ? [] : [{ tid: -1, name: "(threads cannot be listed)" }])
      : strays.filter((t) => !this.#reported.has(t.tid));
    if (fresh.length === 0) return;
    for (const t of fresh) this.#reported.add(t.tid);
    this.#uncontained(
      `${fresh.map((t) => `thread ${t.name} (tid ${t.tid})`).join(", ")} belongs to no worker ` +
        `the parent runs and is still there ${this.#graceMs} ms after guest memory was retired: ` +
        `a worker that was ended keeps running, and only ending the process stops it`,
    );
  }

  #uncontained(reason: string): void {
    this.#log("error", reason);
    this.#onUncontained?.(reason);
  }

  #schedule(): void {
    if (this.#timer !== null) return;
    const timer = setTimeout(() => {
      this.#timer = null;
      this.reclaim();
    }, RECLAIM_POLL_MS);
    // Waiting ranges never keep the process alive.
    Deno.unrefTimer(timer);
    this.#timer = timer;
  }

  #log(level: "error" | "warn" | "info", message: string): void {
    this.#logger?.log(level, "memory", message);
  }
}

/** The process's retired memory: the vhost-user backends retire through it. */
export const retiredMemory = new RetiredMemory();
