/**
 * The device's table of granted guest memory regions, and the only place where
 * a guest address becomes a position in an `ArrayBuffer`.
 *
 * Trust: every address passed to `lookupGpa()` / `lookupUser()` may come from the
 * guest (descriptor `addr`, ring addresses relayed by the VMM). Lookups never
 * throw and never compute `addr + len` (which could round above 2^53): they
 * compare lengths against `end - addr`, both exact integers below 2^53.
 *
 * Regions are granted by the parent as transferred `ArrayBuffer`s over mmap'd
 * guest memory. Revocation (a later SET_MEM_TABLE, REM_MEM_REG, a disconnect)
 * goes through `removeRegion()` / `removeAll()`, which hand the buffers back for
 * transfer to the parent and bump `epoch`. Anything translated under an older
 * epoch (descriptor segments, ring views) is stale and must be re-translated:
 * `Virtqueue` and the chain copy helpers check the epoch before touching memory.
 * Never transfer a buffer that is still in the table: hand it back through
 * `removeRegion()`/`removeAll()` first, or the next access throws TypeError.
 *
 * @module
 */

import { hex } from "../ipc/hex.ts";
/** Guest addresses are used as JS numbers; anything at or above this is rejected. */
export const MAX_GUEST_ADDRESS = Number.MAX_SAFE_INTEGER; // 2^53 - 1

/** The high 32-bit word of a le64 address must be below this (2^21): addr < 2^53. */
export const ADDRESS_HI_LIMIT = 0x200000;

/** vhost-user with CONFIGURE_MEM_SLOTS allows up to 509 slots; keep a round cap. */
export const MAX_REGIONS = 512;

/** Returned by the lookups when no single region holds the range. */
export const NO_REGION = -1;

/** What the parent grants for one region. */
export interface GuestMemoryRegionInit {
  /** Guest physical address of the first byte (GPA). */
  guestPhysAddr: number;
  /** Length in bytes; must equal `buffer.byteLength`. */
  size: number;
  /** The VMM's virtual address of the first byte (vhost-user ring addresses use it). */
  userAddr: number;
  /** The memory itself (transferred from the parent; ordinary, non-shared). */
  buffer: ArrayBuffer;
  /** Opaque id chosen by the parent (e.g. its mapping number), echoed in I/O requests. */
  id?: number;
}

/** One granted region. Fields are fixed for the region's lifetime. */
export interface GuestMemoryRegion {
  readonly guestPhysAddr: number;
  readonly size: number;
  readonly userAddr: number;
  readonly id: number;
  readonly buffer: ArrayBuffer;
  /** Little-endian accessors over the whole region (reads of guest structures). */
  readonly view: DataView;
  /** Bytes of the whole region (data copies). */
  readonly bytes: Uint8Array;
  /** `guestPhysAddr + size` (exact, <= 2^53 - 1). */
  readonly guestPhysEnd: number;
  /** `userAddr + size` (exact, <= 2^53 - 1). */
  readonly userEnd: number;
}

/**
 * Reads a le64 guest address as two u32 words (lo + hi * 2^32, no BigInt).
 * Returns -1 when the address is 2^53 or more (hi >= 2^21): callers treat it
 * like any address outside guest memory.
 */
export function readLe64Address(view: DataView, offset: number): number {
  const lo = view.getUint32(offset, true);
  const hi = view.getUint32(offset + 4, true);
  if (hi >= ADDRESS_HI_LIMIT) return -1;
  return hi * 0x100000000 + lo;
}

function isAddress(n: unknown): n is number {
  return typeof n === "number" && Number.isSafeInteger(n) && n >= 0;
}

/**
 * The region table. Slot indices returned by `addRegion()` stay valid until that
 * region is removed; removal bumps `epoch`, so a slot index together with the
 * epoch it was obtained under identifies a region unambiguously.
 */
export class GuestMemory {
  #slots: (GuestMemoryRegion | undefined)[] = [];
  /** Slot indices sorted by guestPhysAddr / userAddr (regions never overlap). */
  #byGpa: number[] = [];
  #byUser: number[] = [];
  #lastGpa = NO_REGION;
  #lastUser = NO_REGION;
  #epoch = 0;

  /** Increments whenever a region is removed: older translations are stale. */
  get epoch(): number {
    return this.#epoch;
  }

  /** Number of regions currently granted. */
  get count(): number {
    return this.#byGpa.length;
  }

  /** The region in `slot`, or undefined when the slot is empty or out of range. */
  region(slot: number): GuestMemoryRegion | undefined {
    return this.#slots[slot];
  }

  /** Slot indices of the granted regions, by ascending guest physical address. */
  slots(): number[] {
    return this.#byGpa.slice();
  }

  /**
   * Grants one region. Throws RangeError/TypeError naming what was wrong (a
   * size that does not match the buffer, a detached buffer, an address range
   * beyond 2^53, an overlap with an existing region in either address space).
   * Returns the slot index.
   */
  addRegion(init: GuestMemoryRegionInit): number {
    const { guestPhysAddr, size, userAddr, buffer } = init;
    const id = init.id ?? 0;
    if (!(buffer instanceof ArrayBuffer)) {
      throw new TypeError("Cannot add guest memory region: buffer is not an ArrayBuffer");
    }
    if (buffer.detached) {
      throw new TypeError("Cannot add guest memory region: buffer is detached");
    }
    if (!isAddress(guestPhysAddr) || !isAddress(userAddr)) {
      throw new RangeError(
        `Cannot add guest memory region: addresses must be integers in [0, 2^53), got GPA ${guestPhysAddr}, user ${userAddr}`,
      );
    }
    if (!Number.isSafeInteger(size) || size <= 0 || size !== buffer.byteLength) {
      throw new RangeError(
        `Cannot add guest memory region at GPA ${
          hex(guestPhysAddr)
        }: size ${size} must be positive and equal the buffer length ${buffer.byteLength}`,
      );
    }
    if (size > MAX_GUEST_ADDRESS - guestPhysAddr || size > MAX_GUEST_ADDRESS - userAddr) {
      throw new RangeError(
        `Cannot add guest memory region at GPA ${hex(guestPhysAddr)}: it ends beyond 2^53`,
      );
    }
    if (!Number.isSafeInteger(id)) {
      throw new RangeError(`Cannot add guest memory region: id ${id} is not an integer`);
    }
    if (this.#byGpa.length >= MAX_REGIONS) {
      throw new RangeError(`Cannot add guest memory region: already ${MAX_REGIONS} regions`);
    }
    const gEnd = guestPhysAddr + size;
    const uEnd = userAddr + size;
    for (const s of this.#byGpa) {
      const r = this.#slots[s]!;
      if (guestPhysAddr < r.guestPhysEnd && r.guestPhysAddr < gEnd) {
        throw new RangeError(
          `Cannot add guest memory region: GPA range ${hex(guestPhysAddr)}..${
            hex(gEnd)
          } overlaps region ${s} (${hex(r.guestPhysAddr)}..${hex(r.guestPhysEnd)})`,
        );
      }
      if (userAddr < r.userEnd && r.userAddr < uEnd) {
        throw new RangeError(
          `Cannot add guest memory region: user address range ${hex(userAddr)}..${
            hex(uEnd)
          } overlaps region ${s}`,
        );
      }
    }
    let bytes: Uint8Array;
    let view: DataView;
    try {
      bytes = new Uint8Array(buffer);
      view = new DataView(buffer);
    } catch (e) {
      throw new RangeError(
        `Cannot add guest memory region at GPA ${hex(guestPhysAddr)}: ${(e as Error).message}`,
      );
    }
    const region: GuestMemoryRegion = Object.freeze({
      guestPhysAddr,
      size,
      userAddr,
      id,
      buffer,
      view,
      bytes,
      guestPhysEnd: gEnd,
      userEnd: uEnd,
    });
    let slot = this.#slots.indexOf(undefined);
    if (slot < 0) slot = this.#slots.length;
    this.#slots[slot] = region;
    this.#byGpa.push(slot);
    this.#byGpa.sort((a, b) => this.#slots[a]!.guestPhysAddr - this.#slots[b]!.guestPhysAddr);
    this.#byUser.push(slot);
    this.#byUser.sort((a, b) => this.#slots[a]!.userAddr - this.#slots[b]!.userAddr);
    return slot;
  }

  /**
   * Revokes one region and returns its buffer so the caller can transfer it back
   * to the parent. Bumps `epoch`. Throws RangeError for an empty slot.
   */
  removeRegion(slot: number): ArrayBuffer {
    const r = this.#slots[slot];
    if (r === undefined) {
      throw new RangeError(`Cannot remove guest memory region ${slot}: no such region`);
    }
    this.#slots[slot] = undefined;
    this.#byGpa = this.#byGpa.filter((s) => s !== slot);
    this.#byUser = this.#byUser.filter((s) => s !== slot);
    this.#invalidate();
    return r.buffer;
  }

  /** Revokes every region (SET_MEM_TABLE, disconnect); returns the buffers. Bumps `epoch`. */
  removeAll(): ArrayBuffer[] {
    const buffers: ArrayBuffer[] = [];
    for (const s of this.#byGpa) buffers.push(this.#slots[s]!.buffer);
    this.#slots = [];
    this.#byGpa = [];
    this.#byUser = [];
    this.#invalidate();
    return buffers;
  }

  /** Slot of the region with exactly this GPA, size and user address (REM_MEM_REG), or -1. */
  findRegion(guestPhysAddr: number, size: number, userAddr: number): number {
    for (const s of this.#byGpa) {
      const r = this.#slots[s]!;
      if (r.guestPhysAddr === guestPhysAddr && r.size === size && r.userAddr === userAddr) {
        return s;
      }
    }
    return NO_REGION;
  }

  #invalidate(): void {
    this.#epoch++;
    this.#lastGpa = NO_REGION;
    this.#lastUser = NO_REGION;
  }

  /**
   * Slot of the one region holding guest physical range [addr, addr + len), or
   * NO_REGION. `len` 0 asks for the region holding `addr`. The offset inside the
   * region is `addr - region(slot).guestPhysAddr`. Never throws.
   */
  lookupGpa(addr: number, len: number): number {
    if (!(addr >= 0 && len >= 0)) return NO_REGION; // also rejects NaN
    let s = this.#lastGpa;
    if (s >= 0) {
      const r = this.#slots[s]!;
      if (addr >= r.guestPhysAddr && addr < r.guestPhysEnd) {
        return len <= r.guestPhysEnd - addr ? s : NO_REGION;
      }
    }
    s = this.#search(this.#byGpa, addr, true);
    if (s < 0) return NO_REGION;
    this.#lastGpa = s;
    const r = this.#slots[s]!;
    return len <= r.guestPhysEnd - addr ? s : NO_REGION;
  }

  /** Like `lookupGpa()` for the VMM's user addresses (vhost-user SET_VRING_ADDR). */
  lookupUser(addr: number, len: number): number {
    if (!(addr >= 0 && len >= 0)) return NO_REGION;
    let s = this.#lastUser;
    if (s >= 0) {
      const r = this.#slots[s]!;
      if (addr >= r.userAddr && addr < r.userEnd) {
        return len <= r.userEnd - addr ? s : NO_REGION;
      }
    }
    s = this.#search(this.#byUser, addr, false);
    if (s < 0) return NO_REGION;
    this.#lastUser = s;
    const r = this.#slots[s]!;
    return len <= r.userEnd - addr ? s : NO_REGION;
  }

  /** Binary search for the region whose [start, end) holds addr. */
  #search(order: number[], addr: number, gpa: boolean): number {
    let lo = 0;
    let hi = order.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      const r = this.#slots[order[mid]]!;
      const start = gpa ? r.guestPhysAddr : r.userAddr;
      const end = gpa ? r.guestPhysEnd : r.userEnd;
      if (addr < start) hi = mid - 1;
      else if (addr >= end) lo = mid + 1;
      else return order[mid];
    }
    return NO_REGION;
  }
}
