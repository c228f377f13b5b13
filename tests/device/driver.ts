/**
 * A guest-side virtio split-ring driver for tests: it lays out rings in
 * ArrayBuffers standing in for guest memory (one or several regions with
 * distinct guest physical and user addresses), allocates buffers, posts
 * chains (direct, indirect, mixed), reads the used ring, and can craft
 * malicious descriptors and ring indices.
 *
 * Used by the virtqueue tests and by the net device tests (send and receive
 * frames through real rings).
 *
 * @module
 */

import { GuestMemory } from "../../device/guest_memory.ts";
import {
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_DESC_SIZE,
} from "../../device/chain.ts";
import {
  availRingSize,
  descTableSize,
  type RingAddressSpace,
  usedRingSize,
  VIRTQ_AVAIL_OFF_FLAGS,
  VIRTQ_AVAIL_OFF_IDX,
  VIRTQ_AVAIL_OFF_RING,
  VIRTQ_USED_ELEM_SIZE,
  VIRTQ_USED_F_NO_NOTIFY,
  VIRTQ_USED_OFF_FLAGS,
  VIRTQ_USED_OFF_IDX,
  VIRTQ_USED_OFF_RING,
  type VirtqueueConfig,
  vringNeedEvent,
} from "../../device/virtqueue.ts";
import { VIRTIO_RING_F_EVENT_IDX } from "../../ipc/features.ts";

/** One region of test guest memory. */
export interface TestRegionSpec {
  /** Guest physical address. */
  gpa: number;
  /** Size in bytes. */
  size: number;
  /** VMM user address (defaults to gpa + 0x7f00_0000_0000). */
  user?: number;
  /**
   * Memory to use instead of a fresh ArrayBuffer (e.g. a view of an mmap'd
   * memfd shared with a real device); its byteLength must equal `size`.
   */
  buffer?: ArrayBuffer;
}

/** A region as the test guest holds it. */
export interface TestRegion {
  gpa: number;
  size: number;
  user: number;
  buffer: ArrayBuffer;
  bytes: Uint8Array;
  view: DataView;
  /** Slot in `TestGuest.memory`. */
  slot: number;
}

/** Default layout: one 4 MiB region at GPA 1 MiB. */
export const DEFAULT_REGIONS: TestRegionSpec[] = [{ gpa: 0x100000, size: 4 << 20 }];

const USER_BASE = 0x7f0000000000;

/**
 * Guest memory for tests: the regions, the device's `GuestMemory` over them,
 * byte access by guest physical address, and a first-fit allocator.
 */
export class TestGuest {
  readonly memory: GuestMemory = new GuestMemory();
  readonly regions: TestRegion[] = [];
  /** Free ranges [start, end) in guest physical addresses, sorted. */
  #free: [number, number][] = [];

  constructor(specs: TestRegionSpec[] = DEFAULT_REGIONS) {
    for (const s of specs) {
      if (s.buffer !== undefined && s.buffer.byteLength !== s.size) {
        throw new RangeError(
          `test guest: region at ${
            s.gpa.toString(16)
          } has a ${s.buffer.byteLength}-byte buffer, not ${s.size}`,
        );
      }
      const buffer = s.buffer ?? new ArrayBuffer(s.size);
      const user = s.user ?? s.gpa + USER_BASE;
      const slot = this.memory.addRegion({
        guestPhysAddr: s.gpa,
        size: s.size,
        userAddr: user,
        buffer,
      });
      this.regions.push({
        gpa: s.gpa,
        size: s.size,
        user,
        buffer,
        bytes: new Uint8Array(buffer),
        view: new DataView(buffer),
        slot,
      });
      this.#free.push([s.gpa, s.gpa + s.size]);
    }
    this.#free.sort((a, b) => a[0] - b[0]);
  }

  /** The region holding [gpa, gpa + len), or throws (test bug). */
  regionOf(gpa: number, len = 1): TestRegion {
    for (const r of this.regions) {
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) return r;
    }
    throw new RangeError(`test guest: ${gpa.toString(16)}+${len} is not inside one region`);
  }

  /** The user address of a guest physical address. */
  toUser(gpa: number): number {
    const r = this.regionOf(gpa, 0);
    return r.user + (gpa - r.gpa);
  }

  /**
   * Allocates `len` bytes aligned to `align`, inside one region unless
   * `within` names a GPA range to allocate from. Returns the GPA; throws when
   * memory is exhausted.
   */
  alloc(len: number, align = 16, within?: [number, number]): number {
    const need = roundAlloc(len);
    for (let i = 0; i < this.#free.length; i++) {
      const [s, e] = this.#free[i];
      const lo = within ? Math.max(s, within[0]) : s;
      const hi = within ? Math.min(e, within[1]) : e;
      const a = Math.ceil(lo / align) * align;
      if (a + need > hi) continue;
      if (!within && !this.regions.some((r) => a >= r.gpa && a + need <= r.gpa + r.size)) continue;
      const parts: [number, number][] = [];
      if (a > s) parts.push([s, a]);
      if (a + need < e) parts.push([a + need, e]);
      this.#free.splice(i, 1, ...parts);
      return a;
    }
    throw new RangeError(`test guest: out of memory allocating ${len} bytes`);
  }

  /** Returns [gpa, gpa + len) to the allocator (merging with free neighbours). */
  free(gpa: number, len: number): void {
    const start = gpa;
    const end = gpa + roundAlloc(len);
    const f = this.#free;
    let lo = 0;
    let hi = f.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (f[mid][0] < start) lo = mid + 1;
      else hi = mid;
    }
    const prev = f[lo - 1];
    const next = f[lo];
    if (prev && prev[1] === start) {
      prev[1] = end;
      if (next && next[0] === end) {
        prev[1] = next[1];
        f.splice(lo, 1);
      }
    } else if (next && next[0] === end) {
      next[0] = start;
    } else {
      f.splice(lo, 0, [start, end]);
    }
  }

  /** Writes bytes at a GPA (may cross adjacent regions). */
  write(gpa: number, data: Uint8Array): void {
    let done = 0;
    while (done < data.length) {
      const r = this.regionOf(gpa + done, 1);
      const off = gpa + done - r.gpa;
      const n = Math.min(data.length - done, r.size - off);
      r.bytes.set(data.subarray(done, done + n), off);
      done += n;
    }
  }

  /** Reads bytes at a GPA (may cross adjacent regions). */
  read(gpa: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    let done = 0;
    while (done < len) {
      const r = this.regionOf(gpa + done, 1);
      const off = gpa + done - r.gpa;
      const n = Math.min(len - done, r.size - off);
      out.set(r.bytes.subarray(off, off + n), done);
      done += n;
    }
    return out;
  }

  u16(gpa: number): number {
    const r = this.regionOf(gpa, 2);
    return r.view.getUint16(gpa - r.gpa, true);
  }
  setU16(gpa: number, v: number): void {
    const r = this.regionOf(gpa, 2);
    r.view.setUint16(gpa - r.gpa, v, true);
  }
  /**
   * Sequentially consistent u16 access (2-byte aligned, little-endian host):
   * what a driver's barriers around avail->idx and the event words give
   * (virtio 1.2 §2.7.13.3.1: the store must be seen before the load after it).
   */
  atomicU16(gpa: number): number {
    const r = this.regionOf(gpa, 2);
    return Atomics.load(new Uint16Array(r.buffer, gpa - r.gpa, 1), 0);
  }
  atomicSetU16(gpa: number, v: number): void {
    const r = this.regionOf(gpa, 2);
    Atomics.store(new Uint16Array(r.buffer, gpa - r.gpa, 1), 0, v);
  }
  u32(gpa: number): number {
    const r = this.regionOf(gpa, 4);
    return r.view.getUint32(gpa - r.gpa, true);
  }
  setU32(gpa: number, v: number): void {
    const r = this.regionOf(gpa, 4);
    r.view.setUint32(gpa - r.gpa, v, true);
  }

  /** A copy of every region's bytes (for before/after comparisons). */
  snapshot(): Uint8Array[] {
    return this.regions.map((r) => r.bytes.slice());
  }
}

/** Allocation sizes are multiples of 16, so 16-byte-aligned allocations leave no slivers. */
function roundAlloc(len: number): number {
  return Math.max(16, Math.ceil(len / 16) * 16);
}

/** One buffer of a chain to post. */
export interface BufferSpec {
  /** Length in bytes (defaults to `data.length`). */
  len?: number;
  /** Device-writable (RX, status) instead of device-readable (TX). */
  writable?: boolean;
  /** Content for a readable buffer (defaults to zeros); sets len when len is omitted. */
  data?: Uint8Array;
  /** Use this GPA instead of allocating (the buffer is then not freed). */
  gpa?: number;
}

/** How to post a chain. */
export interface PostOptions {
  /** Put the buffers in an indirect table (all of them, or after `directPrefix` direct ones). */
  indirect?: boolean;
  /** With `indirect`: how many buffers go in direct descriptors before the indirect one. */
  directPrefix?: number;
  /** Make it available at once (default true); otherwise call `publish()`. */
  publish?: boolean;
}

/** A posted buffer as the driver remembers it. */
export interface PostedBuffer {
  gpa: number;
  len: number;
  writable: boolean;
}

/** A chain the driver posted and has not seen used yet. */
export interface PostedChain {
  head: number;
  buffers: PostedBuffer[];
  descriptors: number[];
  /** Allocations to free when used: [gpa, len]. */
  allocations: [number, number][];
}

/** A used ring entry as the driver read it. */
export interface UsedEntry {
  id: number;
  len: number;
  /** The chain, when the driver posted this head. */
  chain?: PostedChain;
}

/** Driver-side ring options. */
export interface TestDriverOptions {
  /** Queue size (default 256). */
  size?: number;
  /** Negotiated features (default 0n). */
  features?: bigint;
  /** Where the rings go (default: allocated anywhere). */
  ringRegion?: number;
  /** Initial avail->idx and used->idx (default 0), for wraparound tests. */
  startIdx?: number;
}

/**
 * The driver side of one split virtqueue in a TestGuest.
 */
export class TestDriver {
  readonly guest: TestGuest;
  readonly size: number;
  readonly features: bigint;
  readonly descGpa: number;
  readonly availGpa: number;
  readonly usedGpa: number;
  /** The driver's avail->idx (free-running, mod 2^16). */
  availIdx: number;
  /** used->idx up to which the driver has consumed entries. */
  lastUsed: number;
  /** Chains posted and not yet seen in the used ring, by head. */
  readonly posted: Map<number, PostedChain> = new Map();
  #freeDesc: number[] = [];

  constructor(guest: TestGuest, options: TestDriverOptions = {}) {
    this.guest = guest;
    this.size = options.size ?? 256;
    this.features = options.features ?? 0n;
    const within = options.ringRegion !== undefined
      ? [
        guest.regions[options.ringRegion].gpa,
        guest.regions[options.ringRegion].gpa + guest.regions[options.ringRegion].size,
      ] as [number, number]
      : undefined;
    this.descGpa = guest.alloc(descTableSize(this.size), 16, within);
    this.availGpa = guest.alloc(availRingSize(this.size), 2, within);
    this.usedGpa = guest.alloc(usedRingSize(this.size), 4, within);
    guest.write(this.descGpa, new Uint8Array(descTableSize(this.size)));
    guest.write(this.availGpa, new Uint8Array(availRingSize(this.size)));
    guest.write(this.usedGpa, new Uint8Array(usedRingSize(this.size)));
    const start = options.startIdx ?? 0;
    this.availIdx = start;
    this.lastUsed = start;
    guest.setU16(this.availGpa + VIRTQ_AVAIL_OFF_IDX, start);
    guest.setU16(this.usedGpa + VIRTQ_USED_OFF_IDX, start);
    // Linux hands out descriptors from the end of a free list; any order works.
    for (let i = this.size - 1; i >= 0; i--) this.#freeDesc.push(i);
  }

  /** VirtqueueConfig for `Virtqueue.configure()`, in either address space. */
  config(addressSpace: RingAddressSpace = "guest-physical"): VirtqueueConfig {
    const user = addressSpace === "user";
    const t = (gpa: number) => user ? this.guest.toUser(gpa) : gpa;
    return {
      size: this.size,
      desc: t(this.descGpa),
      avail: t(this.availGpa),
      used: t(this.usedGpa),
      addressSpace,
      features: this.features,
    };
  }

  /** Free descriptor slots. */
  get freeDescriptors(): number {
    return this.#freeDesc.length;
  }

  /** Writes descriptor `index` of the main table (any values: for malicious tests too). */
  writeDesc(index: number, addr: number, len: number, flags: number, next: number): void {
    writeDescAt(this.guest, this.descGpa + index * VIRTQ_DESC_SIZE, addr, len, flags, next);
  }

  /** Writes descriptor `index` with a raw le64 address given as two u32 words. */
  writeDescRaw(
    index: number,
    addrLo: number,
    addrHi: number,
    len: number,
    flags: number,
    next: number,
  ): void {
    const g = this.descGpa + index * VIRTQ_DESC_SIZE;
    this.guest.setU32(g, addrLo >>> 0);
    this.guest.setU32(g + 4, addrHi >>> 0);
    this.guest.setU32(g + 8, len >>> 0);
    this.guest.setU16(g + 12, flags & 0xffff);
    this.guest.setU16(g + 14, next & 0xffff);
  }

  /** Puts `head` in the next avail ring slot without publishing (raw). */
  pushAvail(head: number): void {
    const slot = this.availIdx % this.size;
    this.guest.setU16(this.availGpa + VIRTQ_AVAIL_OFF_RING + 2 * slot, head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
  }

  /**
   * The heads in the avail ring from index `from` up to the published
   * avail->idx (what a device that stopped at last_avail_idx `from` has not
   * taken), or null when `from` is not within one ring of avail->idx.
   */
  availableFrom(from: number): number[] | null {
    const idx = this.guest.u16(this.availGpa + VIRTQ_AVAIL_OFF_IDX);
    const n = (idx - from) & 0xffff;
    if (n > this.size) return null;
    const out: number[] = [];
    for (let k = 0; k < n; k++) {
      const slot = ((from + k) & 0xffff) % this.size;
      out.push(this.guest.u16(this.availGpa + VIRTQ_AVAIL_OFF_RING + 2 * slot));
    }
    return out;
  }

  /** Stores avail->idx = the driver's availIdx. Returns whether a kick is needed. */
  publish(): boolean {
    const old = this.guest.u16(this.availGpa + VIRTQ_AVAIL_OFF_IDX);
    // Store, then load the device's event word: seq-cst, as a driver's mb() does.
    this.guest.atomicSetU16(this.availGpa + VIRTQ_AVAIL_OFF_IDX, this.availIdx);
    return this.kickNeeded(old, this.availIdx);
  }

  /** Raw avail->idx write (corrupt-ring tests). */
  setAvailIdx(v: number): void {
    this.guest.setU16(this.availGpa + VIRTQ_AVAIL_OFF_IDX, v & 0xffff);
  }
  /** avail->flags (VIRTQ_AVAIL_F_NO_INTERRUPT). */
  setAvailFlags(v: number): void {
    this.guest.setU16(this.availGpa + VIRTQ_AVAIL_OFF_FLAGS, v);
  }
  /** used_event (the word after the avail ring). */
  setUsedEvent(v: number): void {
    this.guest.setU16(this.availGpa + VIRTQ_AVAIL_OFF_RING + 2 * this.size, v & 0xffff);
  }
  /** used->flags as the device left it. */
  usedFlags(): number {
    return this.guest.atomicU16(this.usedGpa + VIRTQ_USED_OFF_FLAGS);
  }
  /** avail_event (the word after the used ring). */
  availEvent(): number {
    return this.guest.atomicU16(
      this.usedGpa + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * this.size,
    );
  }
  /** used->idx as published by the device. */
  usedIdx(): number {
    return this.guest.u16(this.usedGpa + VIRTQ_USED_OFF_IDX);
  }

  /** §2.7.10.1: whether moving avail->idx from old to new needs a kick. */
  kickNeeded(oldIdx: number, newIdx: number): boolean {
    if ((this.features & VIRTIO_RING_F_EVENT_IDX) !== 0n) {
      return vringNeedEvent(this.availEvent(), newIdx, oldIdx);
    }
    return (this.usedFlags() & VIRTQ_USED_F_NO_NOTIFY) === 0;
  }

  /**
   * Posts one chain. Buffers are allocated (and filled from `data`) unless a
   * GPA is given. Returns the head, or -1 when descriptors ran out.
   */
  post(buffers: BufferSpec[], options: PostOptions = {}): number {
    const indirect = options.indirect ?? false;
    const prefix = indirect ? Math.min(options.directPrefix ?? 0, buffers.length) : buffers.length;
    const needDesc = prefix + (indirect ? 1 : 0);
    if (needDesc === 0 || needDesc > this.#freeDesc.length) return -1;
    const chain: PostedChain = { head: -1, buffers: [], descriptors: [], allocations: [] };
    const placed = buffers.map((b) => {
      const len = b.len ?? b.data?.length ?? 0;
      let gpa = b.gpa;
      if (gpa === undefined) {
        gpa = this.guest.alloc(len, 16);
        chain.allocations.push([gpa, len]);
        this.guest.write(gpa, b.data ? b.data.subarray(0, len) : new Uint8Array(len));
      } else if (b.data) {
        this.guest.write(gpa, b.data.subarray(0, len));
      }
      const p: PostedBuffer = { gpa, len, writable: b.writable ?? false };
      chain.buffers.push(p);
      return p;
    });
    const descs: number[] = [];
    for (let i = 0; i < needDesc; i++) descs.push(this.#freeDesc.pop()!);
    chain.descriptors = descs;
    for (let i = 0; i < prefix; i++) {
      const b = placed[i];
      const last = i === needDesc - 1;
      this.writeDesc(
        descs[i],
        b.gpa,
        b.len,
        (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT),
        last ? 0 : descs[i + 1],
      );
    }
    if (indirect) {
      const rest = placed.slice(prefix);
      const tableLen = rest.length * VIRTQ_DESC_SIZE;
      const table = this.guest.alloc(tableLen, 16);
      chain.allocations.push([table, tableLen]);
      rest.forEach((b, i) => {
        const last = i === rest.length - 1;
        writeDescAt(
          this.guest,
          table + i * VIRTQ_DESC_SIZE,
          b.gpa,
          b.len,
          (b.writable ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT),
          last ? 0 : i + 1,
        );
      });
      this.writeDesc(descs[needDesc - 1], table, tableLen, VIRTQ_DESC_F_INDIRECT, 0);
    }
    chain.head = descs[0];
    this.posted.set(chain.head, chain);
    this.pushAvail(chain.head);
    if (options.publish ?? true) this.publish();
    return chain.head;
  }

  /**
   * Reads used entries published since the last call (used->idx first, then
   * the entries: the order a real driver uses), returns their descriptors
   * and buffers to the free pools.
   */
  readUsed(): UsedEntry[] {
    const idx = this.usedIdx();
    const out: UsedEntry[] = [];
    while (this.lastUsed !== idx) {
      const slot = this.lastUsed % this.size;
      const e = this.usedGpa + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * slot;
      const id = this.guest.u32(e);
      const len = this.guest.u32(e + 4);
      const chain = this.posted.get(id);
      if (chain) {
        this.posted.delete(id);
        for (const d of chain.descriptors) this.#freeDesc.push(d);
        for (const [g, l] of chain.allocations) this.guest.free(g, l);
      }
      out.push({ id, len, chain });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    return out;
  }

  /** Reads the first `len` bytes the device wrote into a chain's writable buffers. */
  readWritten(chain: PostedChain, len: number): Uint8Array {
    const out = new Uint8Array(len);
    let done = 0;
    for (const b of chain.buffers) {
      if (!b.writable || done >= len) continue;
      const n = Math.min(b.len, len - done);
      out.set(this.guest.read(b.gpa, n), done);
      done += n;
    }
    return out.subarray(0, done);
  }

  /**
   * Takes `count` descriptor slots off the free list for hand-crafted chains
   * (write them with `writeDesc`, offer the head with `pushAvail` + `publish`).
   */
  takeDescriptors(count: number): number[] {
    if (count > this.#freeDesc.length) throw new RangeError("test driver: out of descriptors");
    const out: number[] = [];
    for (let i = 0; i < count; i++) out.push(this.#freeDesc.pop()!);
    return out;
  }
}

/** Writes one descriptor at a guest physical address (main or indirect table). */
export function writeDescAt(
  guest: TestGuest,
  gpa: number,
  addr: number,
  len: number,
  flags: number,
  next: number,
): void {
  guest.setU32(gpa, addr % 0x100000000);
  guest.setU32(gpa + 4, Math.floor(addr / 0x100000000));
  guest.setU32(gpa + 8, len >>> 0);
  guest.setU16(gpa + 12, flags & 0xffff);
  guest.setU16(gpa + 14, next & 0xffff);
}
