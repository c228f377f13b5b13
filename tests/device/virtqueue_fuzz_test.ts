/**
 * Deterministic fuzzing of the split virtqueue (STYLE.md habit 14).
 *
 * Each case builds guest memory (1-3 regions, sometimes adjacent, distinct
 * user addresses), a queue with random size, features, direction and caps,
 * and then interleaves driver steps (valid chains, corrupted descriptors and
 * indirect tables, random avail entries and indices, notification fields)
 * with device steps (pop, write into writable segments, complete now or
 * later, flush, interrupt and notification decisions).
 *
 * Invariants:
 * - no device call throws;
 * - every chain the device accepts or drops matches an independent reference
 *   walk (BigInt addresses, linear region scan) of the same memory;
 * - the device never completes more chains than the driver offered;
 * - every guest byte that changes during a device step lies in the used ring
 *   or in a device-writable buffer that the descriptors described;
 * - a queue that reports needs-reset writes nothing more;
 * - used->idx only ever moves forward, and never past what was offered.
 *
 * Half the cases run the queue as the daemon runs its RX queue: the used
 * ring handed over to another publisher (the poller, `ipc/datapath.ts`),
 * played here by the test, which completes the chains the device popped
 * (dropped ones with length 0) in pop order, stores used->idx, and has the
 * device retire them when it next reads avail->idx. Then the device must
 * never write the used ring itself (a write throws) and must hand every bad
 * chain to the publisher instead.
 *
 * Seeds that once broke something live in tests/testdata/virtqueue_fuzz_seeds.json
 * and run first. VIONET_FUZZ_CASES raises the number of random cases.
 *
 * @module
 */

import { chainWrite } from "./chain_write.ts";
import assert from "node:assert/strict";
import {
  CHAIN_ANY,
  CHAIN_DEVICE_READABLE,
  CHAIN_DEVICE_WRITABLE,
  type ChainDirection,
  chainRead,
  DEFAULT_MAX_INDIRECT_ENTRIES,
  DEFAULT_MAX_SEGMENTS,
  MAX_CHAIN_BYTES,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from "../../device/chain.ts";
import {
  POP_CHAIN,
  POP_DROPPED,
  POP_EMPTY,
  POP_NEEDS_RESET,
  usedRingSize,
  VIRTQ_AVAIL_OFF_RING,
  Virtqueue,
} from "../../device/virtqueue.ts";
import { QUEUE_ERROR_REASONS } from "../../device/queue_counters.ts";
import { VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "../../ipc/features.ts";
import { type BufferSpec, TestDriver, TestGuest, type TestRegionSpec } from "./driver.ts";

/** mulberry32: small, fast, deterministic. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

class Rand {
  next: () => number;
  constructor(seed: number) {
    this.next = rng(seed);
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
}

// ---------------------------------------------------------------- reference walk

interface RefResult {
  code: string;
  /** Merged [gpa, len, writable] ranges of the chain's buffers. */
  ranges: [number, number, boolean][];
}

interface RefConfig {
  guest: TestGuest;
  regions: TestRegionSpec[];
  descGpa: number;
  size: number;
  indirect: boolean;
  direction: ChainDirection;
  maxBytes: number;
  maxIndirect: number;
  maxSegments: number;
}

function refReadDesc(g: TestGuest, gpa: number) {
  const lo = BigInt(g.u32(gpa));
  const hi = BigInt(g.u32(gpa + 4));
  return {
    addr: (hi << 32n) | lo,
    len: g.u32(gpa + 8),
    flags: g.u16(gpa + 12),
    next: g.u16(gpa + 14),
  };
}

/** The region (by spec order) holding byte `a`, or -1; linear scan over BigInt. */
function refRegion(regions: TestRegionSpec[], a: bigint): number {
  return regions.findIndex((r) => a >= BigInt(r.gpa) && a < BigInt(r.gpa + r.size));
}

function refWalk(c: RefConfig, head: number): RefResult {
  const ranges: [number, number, boolean][] = [];
  const out = (code: string) => ({ code, ranges });
  if (head >= c.size) return out("HEAD_OUT_OF_RANGE");
  let total = 0n;
  let segments = 0;
  let sawWritable = false;
  const limit = 1n << 53n;
  const add = (addr: bigint, len: number, w: boolean): string | null => {
    if (w) {
      if (c.direction === CHAIN_DEVICE_READABLE) return "UNEXPECTED_WRITABLE";
      sawWritable = true;
    } else {
      if (sawWritable) return "READABLE_AFTER_WRITABLE";
      if (c.direction === CHAIN_DEVICE_WRITABLE) return "UNEXPECTED_READABLE";
    }
    if (addr >= limit) return "ADDRESS_TOO_LARGE";
    if (total + BigInt(len) > BigInt(c.maxBytes)) return "TOO_LONG_BYTES";
    total += BigInt(len);
    // Split at region ends; every byte must be in some region.
    let a = addr;
    const end = addr + BigInt(len);
    while (a < end) {
      const r = refRegion(c.regions, a);
      if (r < 0) return "ADDRESS_OUTSIDE_MEMORY";
      if (segments === c.maxSegments) return "TOO_MANY_SEGMENTS";
      segments++;
      const rEnd = BigInt(c.regions[r].gpa + c.regions[r].size);
      a = end < rEnd ? end : rEnd;
    }
    if (len > 0) {
      const last = ranges[ranges.length - 1];
      if (last && last[2] === w && last[0] + last[1] === Number(addr)) last[1] += len;
      else ranges.push([Number(addr), len, w]);
    }
    return null;
  };
  let idx = head;
  for (let steps = 0;; steps++) {
    if (steps === c.size) return out("LOOP");
    const d = refReadDesc(c.guest, c.descGpa + 16 * idx);
    if (d.flags & VIRTQ_DESC_F_INDIRECT) {
      if (!c.indirect) return out("INDIRECT_NOT_NEGOTIATED");
      if (d.flags & VIRTQ_DESC_F_NEXT) return out("INDIRECT_WITH_NEXT");
      if (d.len === 0 || d.len % 16 !== 0) return out("INDIRECT_BAD_LENGTH");
      const n = d.len / 16;
      if (n > c.maxIndirect) return out("INDIRECT_TOO_LARGE");
      const r = refRegion(c.regions, d.addr);
      if (
        d.addr >= limit || r < 0 ||
        d.addr + BigInt(d.len) > BigInt(c.regions[r].gpa + c.regions[r].size)
      ) {
        return out("INDIRECT_OUTSIDE_MEMORY");
      }
      const table = Number(d.addr);
      let i = 0;
      for (let s = 0;; s++) {
        if (s === n) return out("INDIRECT_LOOP");
        const e = refReadDesc(c.guest, table + 16 * i);
        if (e.flags & VIRTQ_DESC_F_INDIRECT) return out("INDIRECT_NESTED");
        const err = add(e.addr, e.len, (e.flags & VIRTQ_DESC_F_WRITE) !== 0);
        if (err) return out(err);
        if (!(e.flags & VIRTQ_DESC_F_NEXT)) return out("OK");
        if (e.next >= n) return out("INDIRECT_NEXT_OUT_OF_RANGE");
        i = e.next;
      }
    }
    const err = add(d.addr, d.len, (d.flags & VIRTQ_DESC_F_WRITE) !== 0);
    if (err) return out(err);
    if (!(d.flags & VIRTQ_DESC_F_NEXT)) return out("OK");
    if (d.next >= c.size) return out("NEXT_OUT_OF_RANGE");
    idx = d.next;
  }
}

// ---------------------------------------------------------------- one case

export interface Stats {
  chains: number;
  dropped: number;
  resets: number;
  /** Cases run with the used ring handed over to another publisher (the daemon's RX mode). */
  external: number;
  /** Drop and reset reasons seen, by name. */
  reasons: Record<string, number>;
}

function makeRegions(r: Rand, ringBytes: number): TestRegionSpec[] {
  const regions: TestRegionSpec[] = [];
  let gpa = (1 + r.int(64)) * 0x10000;
  const n = 1 + r.int(3);
  for (let i = 0; i < n; i++) {
    const size = (i === 0 ? Math.ceil(ringBytes / 4096) * 4096 + 0x4000 : 0) +
      (1 + r.int(8)) * 0x1000 + (r.chance(0.3) ? 8 * r.int(64) : 0);
    regions.push({ gpa, size, user: 0x7f0000000000 + (n - i) * 0x10000000 + r.int(16) * 0x1000 });
    gpa += size + (r.chance(0.5) ? 0 : (1 + r.int(4)) * 0x1000);
  }
  return regions;
}

function interestingAddress(r: Rand, regions: TestRegionSpec[]): [number, number] {
  // Returns [lo, hi] words of a le64 address.
  const reg = r.pick(regions);
  const split = (a: number): [number, number] => [a % 0x100000000, Math.floor(a / 0x100000000)];
  switch (r.int(8)) {
    case 0:
      return split(reg.gpa + r.int(reg.size));
    case 1:
      return split(reg.gpa + reg.size - r.int(32));
    case 2:
      return split(reg.gpa + reg.size + r.int(32));
    case 3:
      return split(Math.max(0, reg.gpa - r.int(64)));
    case 4:
      return [r.int(2 ** 32), 0x200000 + r.int(0x1000)]; // >= 2^53
    case 5:
      return [r.int(2 ** 32), 0x1fffff]; // just below 2^53, outside memory
    case 6:
      return [r.int(2 ** 32), r.int(2 ** 32)];
    default:
      return split(r.int(0x100000));
  }
}

function interestingLength(r: Rand): number {
  switch (r.int(6)) {
    case 0:
      return 0;
    case 1:
      return 0xffffffff - r.int(16);
    case 2:
      return 16 * (1 + r.int(8));
    case 3:
      return 0x80000000 + r.int(16);
    default:
      return r.int(0x3000);
  }
}

export function runCase(seed: number, stats: Stats): void {
  const r = new Rand(seed);
  const size = 1 << r.int(9); // 1..256
  const features = (r.chance(0.5) ? VIRTIO_RING_F_EVENT_IDX : 0n) |
    (r.chance(0.6) ? VIRTIO_RING_F_INDIRECT_DESC : 0n);
  const direction = r.pick([CHAIN_ANY, CHAIN_DEVICE_READABLE, CHAIN_DEVICE_WRITABLE] as const);
  const maxBytes = r.chance(0.2) ? 1 + r.int(0x4000) : MAX_CHAIN_BYTES;
  const maxIndirect = r.chance(0.2) ? 1 + r.int(8) : DEFAULT_MAX_INDIRECT_ENTRIES;
  const maxSegments = r.chance(0.2) ? 1 + r.int(8) : DEFAULT_MAX_SEGMENTS;
  const ringBytes = 16 * size + 6 + 2 * size + 6 + 8 * size + 64;
  const regions = makeRegions(r, ringBytes);
  const guest = new TestGuest(regions);
  const startIdx = r.chance(0.3) ? 65536 - r.int(2 * size + 2) : 0;
  const drv = new TestDriver(guest, { size, features, startIdx: startIdx & 0xffff, ringRegion: 0 });
  const q = new Virtqueue(guest.memory, {
    name: `fuzz${seed}`,
    direction,
    maxChainBytes: maxBytes,
    maxIndirectEntries: maxIndirect,
    maxSegments,
  });
  q.lastAvailIdx = startIdx & 0xffff;
  q.configure(drv.config(r.chance(0.5) ? "user" : "guest-physical"));
  // The daemon's RX mode: another publisher owns the used ring.
  const external = r.chance(0.5);
  if (external) stats.external++;
  /** Chains the device popped and the publisher has not completed, in pop order. */
  let toPublish: [number, number][] = [];
  /** Heads the publisher completed that the device has not retired yet. */
  let toRetire: number[] = [];
  let pubIdx = startIdx & 0xffff;
  const handOver = () => {
    if (!external) return;
    q.handOverUsed();
    q.onAvailIdx = () => {
      for (const h of toRetire) q.retireUsed(h);
      toRetire = [];
    };
  };
  handOver();
  const ref: RefConfig = {
    guest,
    regions,
    descGpa: drv.descGpa,
    size,
    indirect: (features & VIRTIO_RING_F_INDIRECT_DESC) !== 0n,
    direction,
    maxBytes,
    maxIndirect,
    maxSegments,
  };
  const usedStart = drv.usedGpa;
  const usedEnd = drv.usedGpa + usedRingSize(size);
  let offered = 0; // avail entries the driver exposed (forward moves of avail->idx)
  let publishedIdx = startIdx & 0xffff;
  const held: { head: number; len: number }[] = [];
  const where = (msg: string) => `seed ${seed}: ${msg}`;

  const setAvail = (v: number) => {
    const fwd = (v - publishedIdx) & 0xffff;
    if (fwd <= size) offered += fwd;
    publishedIdx = v & 0xffff;
    drv.setAvailIdx(v);
  };

  const driverStep = () => {
    const op = r.int(10);
    if (op <= 3) {
      // A valid chain (may still be rejected for direction or caps).
      const n = 1 + r.int(4);
      const bufs: BufferSpec[] = [];
      let w = direction === CHAIN_DEVICE_WRITABLE;
      for (let i = 0; i < n; i++) {
        if (direction === CHAIN_ANY && !w && r.chance(0.4)) w = true;
        if (r.chance(0.05)) w = !w; // occasionally wrong
        bufs.push({ len: r.int(600), writable: w });
      }
      const useIndirect = ref.indirect && r.chance(0.4);
      let head = -1;
      try {
        head = drv.post(bufs, {
          indirect: useIndirect,
          directPrefix: useIndirect ? r.int(n) : 0,
          publish: false,
        });
      } catch {
        return; // test guest out of memory: skip
      }
      if (head < 0) return;
      setAvail(drv.availIdx);
    } else if (op === 4) {
      // Corrupt a main-table descriptor.
      const i = r.int(size);
      const [lo, hi] = interestingAddress(r, regions);
      const flags = r.chance(0.1) ? r.int(0x10000) : r.int(8);
      const next = r.chance(0.8) ? r.int(size) : r.int(0x10000);
      drv.writeDescRaw(i, lo, hi, interestingLength(r), flags, next);
    } else if (op === 5) {
      // A crafted chain: 1-3 descriptors with mostly sane, sometimes wild
      // fields, optionally ending in a crafted indirect table.
      if (drv.freeDescriptors < 3) return;
      const d = drv.takeDescriptors(1 + r.int(3));
      const allocations: [number, number][] = [];
      const tryAlloc = (n: number) => {
        try {
          const a = guest.alloc(n, 16);
          allocations.push([a, n]);
          return a;
        } catch {
          return -1;
        }
      };
      drv.posted.set(d[0], { head: d[0], buffers: [], descriptors: d, allocations });
      const field = (hasNext: boolean, next: number) => {
        const a = r.chance(0.6) ? tryAlloc(64) : -1;
        const [lo, hi] = a >= 0 ? [a % 0x100000000, 0] : interestingAddress(r, regions);
        const len = r.chance(0.7) ? r.int(64) : interestingLength(r);
        let flags = r.int(4); // NEXT and WRITE
        if (hasNext) flags |= VIRTQ_DESC_F_NEXT;
        return { lo, hi, len, flags, next };
      };
      for (let i = 0; i < d.length; i++) {
        const wild = r.chance(0.5) ? size + r.int(0x10000 - size) : r.int(size);
        const nextIdx = r.chance(0.9) ? (d[i + 1] ?? d[0]) : wild;
        const f = field(i < d.length - 1 ? r.chance(0.9) : r.chance(0.1), nextIdx);
        drv.writeDescRaw(d[i], f.lo, f.hi, f.len, f.flags, f.next);
      }
      if (ref.indirect && r.chance(0.5)) {
        const n = 1 + r.int(4);
        const table = tryAlloc(16 * n);
        if (table < 0) return;
        for (let i = 0; i < n; i++) {
          const next = r.chance(0.85) ? (i + 1 < n ? i + 1 : r.int(n)) : n + r.int(4);
          const f = field(i < n - 1 ? r.chance(0.9) : r.chance(0.4), next);
          if (r.chance(0.05)) f.flags |= VIRTQ_DESC_F_INDIRECT;
          guest.setU32(table + 16 * i, f.lo);
          guest.setU32(table + 16 * i + 4, f.hi);
          guest.setU32(table + 16 * i + 8, f.len);
          guest.setU16(table + 16 * i + 12, f.flags);
          guest.setU16(table + 16 * i + 14, f.next);
        }
        const tlen = r.chance(0.9) ? 16 * n : r.int(16 * n + 8);
        const lastFlags = VIRTQ_DESC_F_INDIRECT | (r.chance(0.1) ? VIRTQ_DESC_F_NEXT : 0);
        const last = d[d.length - 1];
        drv.writeDescRaw(last, table % 0x100000000, 0, tlen, lastFlags, 0);
        if (d.length > 1) {
          const prev = d[d.length - 2];
          guest.setU16(drv.descGpa + 16 * prev + 12, VIRTQ_DESC_F_NEXT);
          guest.setU16(drv.descGpa + 16 * prev + 14, last);
        }
      }
      drv.pushAvail(d[0]);
      setAvail(drv.availIdx);
    } else if (op === 6) {
      // A random avail entry.
      drv.pushAvail(r.chance(0.9) ? r.int(size) : r.int(0x10000));
      setAvail(drv.availIdx);
    } else if (op === 7 && r.chance(0.3)) {
      // A random avail->idx (small step or wild jump).
      const v = r.chance(0.5) ? (publishedIdx + r.int(size + 2)) & 0xffff : r.int(0x10000);
      drv.availIdx = v;
      setAvail(v);
    } else if (op === 8) {
      if (r.chance(0.5)) drv.readUsed(); // recycle descriptors and buffers
      drv.setUsedEvent(r.int(0x10000));
      drv.setAvailFlags(r.int(2));
    } else {
      // Random bytes anywhere in the avail ring ring[] area.
      const slot = r.int(size);
      const v = r.chance(0.9) ? r.int(size) : r.int(0x10000);
      guest.setU16(drv.availGpa + VIRTQ_AVAIL_OFF_RING + 2 * slot, v);
    }
  };

  // Used entries the device wrote, in order, not yet seen published.
  let pushLog: [number, number][] = [];
  let checkedUsed = startIdx & 0xffff;
  // A guest may point a writable buffer at its own used ring; from then on
  // the entries' values are the guest's problem (only their count is checked).
  let usedClobbered = false;
  const checkPublished = () => {
    const idx = drv.usedIdx();
    if (usedClobbered) {
      // The guest's own buffer wrote over used->idx too: only the device's count is known.
      checkedUsed = idx;
      pushLog = [];
      return;
    }
    while (checkedUsed !== idx) {
      const e = drv.usedGpa + 4 + 8 * (checkedUsed & (size - 1));
      const want = pushLog.shift();
      assert.ok(want, where(`used entry ${checkedUsed} published but never pushed`));
      if (!usedClobbered) {
        assert.deepEqual(
          [guest.u32(e), guest.u32(e + 4)],
          want,
          where(`used entry ${checkedUsed}`),
        );
      }
      checkedUsed = (checkedUsed + 1) & 0xffff;
    }
  };

  const complete = (head: number, len: number) => {
    if (external) {
      assert.throws(() => q.pushUsed(head, len), /another publisher's/, where("pushUsed"));
      toPublish.push([head, len]);
      return;
    }
    const ready = q.state === "ready";
    assert.equal(q.pushUsed(head, len), ready, where(`pushUsed in state ${q.state}`));
    if (ready) pushLog.push([head, len]);
  };

  /** The other publisher: completes a prefix of what was popped, in order, then used->idx. */
  const publish = () => {
    if (!external || q.needsReset) return;
    const n = r.int(toPublish.length + 1);
    for (const [head, len] of toPublish.splice(0, n)) {
      const e = drv.usedGpa + 4 + 8 * (pubIdx & (size - 1));
      guest.setU32(e, head);
      guest.setU32(e + 4, len);
      pushLog.push([head, len]);
      toRetire.push(head);
      pubIdx = (pubIdx + 1) & 0xffff;
    }
    if (n > 0) guest.setU16(drv.usedGpa + 2, pubIdx);
  };

  /**
   * used->idx only moves forward, and never past what was made available
   * (§2.7.8): used entry `u` answers avail entry `u + availSkew`. Both rings
   * start at startIdx (skew 0); a recovery below restarts the device at
   * last_avail_idx = avail->idx with used->idx where the ring has it (as a
   * VMM's SET_VRING_BASE does), which sets the skew from then on.
   */
  let lastUsedIdx = startIdx & 0xffff;
  let availSkew = 0;
  const checkUsedIdx = () => {
    const now = drv.usedIdx();
    if (usedClobbered) {
      lastUsedIdx = now; // the guest's own buffer overlaps used->idx: its value is the guest's
      return;
    }
    const moved = (now - lastUsedIdx) & 0xffff;
    const outstanding = (publishedIdx - availSkew - lastUsedIdx) & 0xffff;
    assert.ok(
      moved <= outstanding,
      where(
        `used->idx went from ${lastUsedIdx} to ${now} with avail->idx ${publishedIdx}` +
          ` (used entry u answers avail entry u + ${availSkew})`,
      ),
    );
    lastUsedIdx = now;
  };

  const deviceStep = () => {
    const before = guest.snapshot();
    const allowed: [number, number][] = [[usedStart, usedEnd - usedStart]];
    const wasReset = q.needsReset;
    const pops = 1 + r.int(8);
    for (let k = 0; k < pops; k++) {
      const last = q.lastAvailIdx;
      const head = guest.u16(drv.availGpa + VIRTQ_AVAIL_OFF_RING + 2 * (last & (size - 1)));
      const expect = refWalk(ref, head);
      // What the device still holds once it retired what the publisher completed.
      const outstanding = q.inFlight + q.pendingUsed - toRetire.length;
      const res = q.popAvail();
      if (res === POP_EMPTY) break;
      if (res === POP_NEEDS_RESET) {
        if (!wasReset) {
          const reason = q.resetReason!.split(":")[0];
          stats.reasons[reason] = (stats.reasons[reason] ?? 0) + 1;
          if (reason === "AVAIL_IDX_CORRUPT") {
            const ahead = (guest.u16(drv.availGpa + 2) - last) & 0xffff;
            assert.ok(ahead + outstanding > size, where(`AVAIL_IDX_CORRUPT with ${ahead} ahead`));
          } else if (reason === "AVAIL_HEAD_IN_USE") {
            assert.ok(
              // A head the publisher completed stays the device's until it next reads
              // avail->idx (retired then): an entry rewritten before that names it.
              held.some((h) => h.head === head) || toPublish.some(([h]) => h === head) ||
                toRetire.includes(head),
              where("AVAIL_HEAD_IN_USE for a free head"),
            );
          } else {
            assert.equal(reason, expect.code, where(`ring error for head ${head}`));
          }
          stats.resets++;
        }
        break;
      }
      if (res === POP_DROPPED) {
        assert.equal(q.lastDropReason, expect.code, where(`drop reason for head ${head}`));
        stats.dropped++;
        // The device wrote its used element; with another publisher, that one completes it.
        if (external) toPublish.push([head, 0]);
        else pushLog.push([head, 0]);
        stats.reasons[expect.code] = (stats.reasons[expect.code] ?? 0) + 1;
        continue;
      }
      assert.equal(res, POP_CHAIN);
      assert.equal(expect.code, "OK", where(`device accepted head ${head}`));
      const c = q.chain;
      assert.equal(c.head, head);
      // Segments, merged back into guest ranges, equal the reference walk.
      const got: [number, number, boolean][] = [];
      for (let i = 0; i < c.count; i++) {
        const reg = guest.memory.region(c.region[i])!;
        assert.ok(c.offset[i] + c.length[i] <= reg.size, where("segment beyond its region"));
        assert.equal(c.writable[i] === 1, i >= c.readableCount, where("segment order"));
        const gpa = reg.guestPhysAddr + c.offset[i];
        const w = c.writable[i] === 1;
        const prev = got[got.length - 1];
        if (prev && prev[2] === w && prev[0] + prev[1] === gpa) prev[1] += c.length[i];
        else got.push([gpa, c.length[i], w]);
      }
      assert.deepEqual(got, expect.ranges, where(`segments of head ${head}`));
      stats.chains++;
      if (r.chance(0.05)) {
        // Give it back (MRG_RXBUF-style); the next pop must return it again.
        q.unpopAvail(1);
        assert.equal(q.lastAvailIdx, last);
        continue;
      }
      // Use the chain like a device would.
      const scratch = new Uint8Array(Math.min(c.readableBytes, 256));
      chainRead(guest.memory, c, r.int(4), scratch);
      let written = 0;
      if (c.writableBytes > 0) {
        const from = r.int(Math.min(c.writableBytes, 64));
        const data = new Uint8Array(1 + r.int(Math.min(c.writableBytes, 2048)));
        data.fill(0xa5 ^ (seed & 0xff));
        written = chainWrite(guest.memory, c, from, data);
        assert.ok(written >= 0 && written <= data.length);
        for (let i = c.readableCount; i < c.count; i++) {
          const reg = guest.memory.region(c.region[i])!;
          const start = reg.guestPhysAddr + c.offset[i];
          allowed.push([start, c.length[i]]);
          if (start < usedEnd && usedStart < start + c.length[i]) usedClobbered = true;
        }
      }
      const len = Math.min(written, c.writableBytes);
      if (external || r.chance(0.7)) complete(c.head, len);
      else held.push({ head: c.head, len });
    }
    // Complete some held chains, out of order.
    while (held.length > 0 && r.chance(0.5)) {
      const h = held.splice(r.int(held.length), 1)[0];
      complete(h.head, h.len);
    }
    if (external) {
      if (r.chance(0.1)) assert.throws(() => q.flushUsed(), /another publisher's/);
    } else {
      if (r.chance(0.7)) q.flushUsed();
      q.needsInterrupt();
    }
    if (r.chance(0.2)) q.disableNotifications();
    if (r.chance(0.2)) q.enableNotifications();
    const completed = q.counters.used + (external ? toRetire.length : 0);
    assert.ok(completed <= offered, where(`completed ${completed} > offered ${offered}`));
    assert.ok(q.counters.chains + q.counters.dropped <= offered, where("consumed > offered"));
    checkPublished();
    // Every changed byte is in the used ring or a writable buffer.
    const after = guest.snapshot();
    for (let ri = 0; ri < regions.length; ri++) {
      const a = before[ri];
      const b = after[ri];
      const a32 = new Uint32Array(a.buffer);
      const b32 = new Uint32Array(b.buffer);
      for (let w = 0; w < a32.length; w++) {
        if (a32[w] === b32[w]) continue;
        for (let i = w * 4; i < w * 4 + 4; i++) {
          if (a[i] === b[i]) continue;
          const gpa = regions[ri].gpa + i;
          const ok = !wasReset && allowed.some(([s, n]) => gpa >= s && gpa < s + n);
          assert.ok(ok, where(`device wrote GPA 0x${gpa.toString(16)} outside writable buffers`));
        }
      }
    }
  };

  const steps = 10 + r.int(40);
  for (let s = 0; s < steps; s++) {
    const driverOps = 1 + r.int(4);
    for (let i = 0; i < driverOps; i++) driverStep();
    deviceStep();
    publish();
    checkPublished();
    checkUsedIdx();
    if (q.needsReset && r.chance(0.3)) {
      // Recovery: reset, re-place the same rings, continue from the ring state.
      q.reset();
      held.length = 0;
      pushLog = [];
      toPublish = [];
      toRetire = [];
      checkedUsed = pubIdx = lastUsedIdx = drv.usedIdx();
      q.lastAvailIdx = publishedIdx;
      availSkew = (publishedIdx - lastUsedIdx) & 0xffff;
      q.configure(drv.config());
      q.usedIdx = drv.usedIdx();
      handOver();
      // Chains offered before the reset are gone from the device's view.
      offered = 0;
      q.counters.used = 0;
      q.counters.chains = 0;
      q.counters.dropped = 0;
    }
  }
}

// ---------------------------------------------------------------- tests

const seedsFile = new URL("../testdata/virtqueue_fuzz_seeds.json", import.meta.url);

Deno.test("fuzz: regression seeds from tests/testdata run clean", () => {
  const seeds = JSON.parse(Deno.readTextFileSync(seedsFile)).seeds as number[];
  assert.ok(Array.isArray(seeds));
  const stats: Stats = { chains: 0, dropped: 0, resets: 0, external: 0, reasons: {} };
  for (const seed of seeds) runCase(seed, stats);
});

Deno.test("fuzz: random rings and descriptors never break the device's invariants", () => {
  const cases = Number(Deno.env.get("VIONET_FUZZ_CASES") ?? "300");
  const stats: Stats = { chains: 0, dropped: 0, resets: 0, external: 0, reasons: {} };
  const t0 = performance.now();
  for (let seed = 1; seed <= cases; seed++) runCase(seed * 2654435761 >>> 0, stats);
  const ms = performance.now() - t0;
  // The generator must actually reach all three outcomes, or it tests nothing.
  assert.ok(stats.chains > cases, `only ${stats.chains} good chains`);
  assert.ok(stats.dropped > cases / 4, `only ${stats.dropped} dropped chains`);
  assert.ok(stats.resets > cases / 10, `only ${stats.resets} ring errors`);
  assert.ok(stats.external > cases / 4, `only ${stats.external} cases in the daemon's RX mode`);
  const unseen = QUEUE_ERROR_REASONS.filter((n) => n !== "RING_UNMAPPED" && !stats.reasons[n]);
  assert.deepEqual(
    unseen,
    [],
    `every drop and ring-error reason is reached: ${JSON.stringify(stats)}`,
  );
  console.log(`fuzz: ${cases} cases in ${ms.toFixed(0)} ms`, stats);
});
