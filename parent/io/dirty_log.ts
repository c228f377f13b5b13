/**
 * The dirty log of a live migration (vhost-user.rst "Migration"): while the
 * front-end has VHOST_F_LOG_ALL on, every guest page vionet writes is marked
 * in a bitmap the front-end shares (one bit per VHOST_LOG_PAGE of guest
 * physical memory, `log[page / 8] |= 1 << page % 8`, atomically: the
 * front-end reads and clears it concurrently), before the used index that
 * publishes the write becomes visible. The front-end then sends the page
 * again.
 *
 * Who writes what. Only the I/O workers write guest memory while the queues
 * run (RX frames, their headers, used elements, used->idx; the device writes
 * TX used elements and ring flags into the used ring, which this log marks
 * as a whole with each publication), so only they write this bitmap; the
 * parent marks the used rings once more when the queues stop (the device's
 * last writes). The device never sees the log.
 *
 * Trust. The bitmap's place and size come from the parent, which mapped the
 * front-end's log fd; the pages come from iovecs the worker already checked
 * against guest memory, translated with guest addresses the parent gave, or
 * from the used ring's log address the front-end gave (`log_guest_addr`). A
 * page past the end of the bitmap (a front-end that sized it too small, or a
 * hostile one) is counted, never written: no address outside the bitmap is
 * computed from anything the guest or device controls.
 *
 * @module
 */

import type { HostMemory } from "./regions.ts";
import type { LogConfig, UsedRingLog } from "./protocol.ts";

/** vhost-user.rst "Migration": `#define VHOST_LOG_PAGE 0x1000`. */
export const LOG_PAGE = 0x1000;

/** One worker's writer of the log bitmap. */
export class DirtyLog {
  readonly #bits: Uint8Array;
  readonly #pages: number;
  /** The used rings to mark with each publication (null: the front-end does not log it). */
  readonly rxUsed: UsedRingLog | null;
  readonly txUsed: UsedRingLog | null;
  /** Pages that fell past the end of the bitmap, not marked. */
  overflow = 0;

  /**
   * A view over the bitmap at `config.base` (host memory the parent mapped;
   * it stays mapped until this worker acknowledged a new config).
   */
  constructor(config: LogConfig) {
    const ptr = Deno.UnsafePointer.create(config.base);
    if (ptr === null) throw new RangeError("the log bitmap is at address 0");
    this.#bits = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, config.size));
    this.#pages = config.size * 8;
    this.rxUsed = config.rxUsed;
    this.txUsed = config.txUsed;
  }

  /** Marks the pages of guest-physical bytes `[gpa, gpa + len)`. */
  markGuest(gpa: number, len: number): void {
    if (!(len > 0)) return;
    const last = Math.floor((gpa + len - 1) / LOG_PAGE);
    for (let page = Math.floor(gpa / LOG_PAGE); page <= last; page++) {
      if (page >= this.#pages) {
        this.overflow += last - page + 1;
        return;
      }
      Atomics.or(this.#bits, Math.floor(page / 8), 1 << (page % 8));
    }
  }

  /**
   * Marks the guest pages behind host bytes `[addr, addr + len)`, which the
   * caller checked lie inside one range of `memory`. A range with no guest
   * address (the bounce arena) is not guest memory: nothing to mark.
   */
  markHost(memory: HostMemory, addr: number, len: number): void {
    const i = memory.find(addr, len);
    if (i < 0) return;
    const gpa = memory.guestAddress(i);
    if (gpa < 0) return;
    this.markGuest(gpa + (addr - memory.start(i)), len);
  }

  /** Marks a used ring (with each publication: its elements, idx and the device's words). */
  markUsed(ring: UsedRingLog | null): void {
    if (ring !== null) this.markGuest(ring.gpa, ring.bytes);
  }
}
