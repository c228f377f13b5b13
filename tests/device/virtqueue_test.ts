import assert from "node:assert/strict";
import { chainWrite } from "./chain_write.ts";
import {
  ADDRESS_HI_LIMIT,
  GuestMemory,
  NO_REGION,
  readLe64Address,
} from "../../device/guest_memory.ts";
import {
  CHAIN_ANY,
  CHAIN_DEVICE_READABLE,
  CHAIN_DEVICE_WRITABLE,
  type ChainDirection,
  chainRead,
  DescriptorChain,
  MAX_CHAIN_BYTES,
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  VIRTQ_DESC_SIZE,
} from "../../device/chain.ts";
import {
  POP_CHAIN,
  POP_DISABLED,
  POP_DROPPED,
  POP_EMPTY,
  POP_NEEDS_RESET,
  VIRTQ_AVAIL_F_NO_INTERRUPT,
  VIRTQ_USED_F_NO_NOTIFY,
  Virtqueue,
  type VirtqueueOptions,
  vringNeedEvent,
} from "../../device/virtqueue.ts";
import type { QueueErrorReason } from "../../device/queue_counters.ts";
import { VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "../../ipc/features.ts";
import { TestDriver, TestGuest, type TestRegionSpec, writeDescAt } from "./driver.ts";

const INDIRECT = VIRTIO_RING_F_INDIRECT_DESC;
const EVENT_IDX = VIRTIO_RING_F_EVENT_IDX;

interface Setup {
  guest: TestGuest;
  drv: TestDriver;
  q: Virtqueue;
}

function setup(
  opts: {
    size?: number;
    features?: bigint;
    direction?: ChainDirection;
    regions?: TestRegionSpec[];
    startIdx?: number;
    queue?: Partial<VirtqueueOptions>;
  } = {},
): Setup {
  const guest = new TestGuest(opts.regions);
  const drv = new TestDriver(guest, {
    size: opts.size ?? 16,
    features: opts.features ?? 0n,
    startIdx: opts.startIdx,
    ringRegion: 0,
  });
  const q = new Virtqueue(guest.memory, {
    name: "test",
    direction: opts.direction ?? CHAIN_ANY,
    ...opts.queue,
  });
  if (opts.startIdx !== undefined) q.lastAvailIdx = opts.startIdx;
  q.configure(drv.config());
  return { guest, drv, q };
}

function bytes(n: number, seed = 1): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (i * 31 + seed) & 0xff;
  return b;
}

/** Offers a hand-written chain: descriptors written by `write`, head = first taken slot. */
function offerRaw(drv: TestDriver, count: number, write: (d: number[]) => void): number {
  const d = drv.takeDescriptors(count);
  write(d);
  drv.pushAvail(d[0]);
  drv.publish();
  return d[0];
}

/** Asserts the next pop drops the chain for `reason`, returning it with used len 0. */
function assertDropped(s: Setup, head: number, reason: QueueErrorReason): void {
  const before = s.q.counters.errors[reason];
  assert.equal(s.q.popAvail(), POP_DROPPED);
  assert.equal(s.q.lastDropReason, reason);
  assert.equal(s.q.counters.errors[reason], before + 1);
  assert.equal(s.q.state, "ready");
  s.q.flushUsed();
  const used = s.drv.readUsed();
  assert.deepEqual(used.map((u) => [u.id, u.len]), [[head, 0]]);
}

function assertRingFatal(s: Setup, reason: QueueErrorReason): void {
  assert.equal(s.q.popAvail(), POP_NEEDS_RESET);
  assert.equal(s.q.state, "needs-reset");
  assert.ok(s.q.resetReason?.startsWith(reason + ":"), `reason ${s.q.resetReason}`);
  assert.equal(s.q.counters.errors[reason], 1);
  assert.equal(s.q.counters.ringErrors, 1);
}

// ---------------------------------------------------------------- guest memory

Deno.test("GuestMemory.addRegion() rejects bad regions with a message naming the problem", async (t) => {
  const cases: [string, () => void, RegExp][] = [
    ["size differs from buffer", () => {
      new GuestMemory().addRegion({
        guestPhysAddr: 0,
        size: 8192,
        userAddr: 0,
        buffer: new ArrayBuffer(4096),
      });
    }, /equal the buffer length/],
    ["zero size", () => {
      new GuestMemory().addRegion({
        guestPhysAddr: 0,
        size: 0,
        userAddr: 0,
        buffer: new ArrayBuffer(0),
      });
    }, /must be positive/],
    ["range beyond 2^53", () => {
      new GuestMemory().addRegion({
        guestPhysAddr: Number.MAX_SAFE_INTEGER - 100,
        size: 4096,
        userAddr: 0,
        buffer: new ArrayBuffer(4096),
      });
    }, /beyond 2\^53/],
    ["fractional address", () => {
      new GuestMemory().addRegion({
        guestPhysAddr: 0.5,
        size: 4096,
        userAddr: 0,
        buffer: new ArrayBuffer(4096),
      });
    }, /integers/],
    ["detached buffer", () => {
      const b = new ArrayBuffer(4096);
      structuredClone(b, { transfer: [b] });
      new GuestMemory().addRegion({ guestPhysAddr: 0, size: 4096, userAddr: 0, buffer: b });
    }, /detached/],
    ["GPA overlap", () => {
      const m = new GuestMemory();
      m.addRegion({
        guestPhysAddr: 0x1000,
        size: 0x2000,
        userAddr: 0,
        buffer: new ArrayBuffer(0x2000),
      });
      m.addRegion({
        guestPhysAddr: 0x2000,
        size: 0x1000,
        userAddr: 0x10000,
        buffer: new ArrayBuffer(0x1000),
      });
    }, /GPA range .* overlaps region 0/],
    ["user address overlap", () => {
      const m = new GuestMemory();
      m.addRegion({
        guestPhysAddr: 0,
        size: 0x2000,
        userAddr: 0x5000,
        buffer: new ArrayBuffer(0x2000),
      });
      m.addRegion({
        guestPhysAddr: 0x10000,
        size: 0x1000,
        userAddr: 0x6000,
        buffer: new ArrayBuffer(0x1000),
      });
    }, /user address range .* overlaps/],
  ];
  for (const [name, fn, re] of cases) {
    await t.step(name, () => assert.throws(fn, re));
  }
});

Deno.test("GuestMemory lookups accept ranges inside one region and reject everything else", () => {
  const g = new TestGuest([
    { gpa: 0x10000, size: 0x1000, user: 0x900000 },
    { gpa: 0x11000, size: 0x1000, user: 0x700000 },
    { gpa: 0x20000, size: 0x1000, user: 0x800000 },
  ]);
  const m = g.memory;
  assert.equal(m.lookupGpa(0x10000, 0x1000), g.regions[0].slot);
  assert.equal(m.lookupGpa(0x10fff, 1), g.regions[0].slot);
  assert.equal(m.lookupGpa(0x11000, 0x1000), g.regions[1].slot);
  assert.equal(m.lookupGpa(0x20800, 0x800), g.regions[2].slot);
  // A range crossing two adjacent regions is not inside ONE region.
  assert.equal(m.lookupGpa(0x10ff0, 0x20), NO_REGION);
  assert.equal(m.lookupGpa(0x20800, 0x801), NO_REGION);
  assert.equal(m.lookupGpa(0xffff, 1), NO_REGION);
  assert.equal(m.lookupGpa(0x21000, 0), NO_REGION);
  assert.equal(m.lookupGpa(0x20000, 0xffffffff), NO_REGION);
  assert.equal(m.lookupGpa(Number.MAX_SAFE_INTEGER, 0xffffffff), NO_REGION);
  assert.equal(m.lookupGpa(-1, 1), NO_REGION);
  assert.equal(m.lookupGpa(NaN, 1), NO_REGION);
  assert.equal(m.lookupGpa(0x10000, NaN), NO_REGION);
  // User addresses are a separate space.
  assert.equal(m.lookupUser(0x900010, 16), g.regions[0].slot);
  assert.equal(m.lookupUser(0x700000, 0x1000), g.regions[1].slot);
  assert.equal(m.lookupUser(0x10000, 16), NO_REGION);
  assert.equal(m.lookupUser(0x7fffff, 2), NO_REGION);
});

Deno.test("readLe64Address() reads lo + hi * 2^32 and rejects addresses of 2^53 or more", () => {
  const v = new DataView(new ArrayBuffer(8));
  v.setUint32(0, 0x89abcdef, true);
  v.setUint32(4, ADDRESS_HI_LIMIT - 1, true);
  assert.equal(readLe64Address(v, 0), (ADDRESS_HI_LIMIT - 1) * 2 ** 32 + 0x89abcdef);
  assert.ok(Number.isSafeInteger(readLe64Address(v, 0)));
  v.setUint32(4, ADDRESS_HI_LIMIT, true);
  assert.equal(readLe64Address(v, 0), -1);
  v.setUint32(4, 0xffffffff, true);
  assert.equal(readLe64Address(v, 0), -1);
});

Deno.test("GuestMemory.removeRegion() hands the buffer back and makes stale lookups fail", () => {
  const g = new TestGuest([{ gpa: 0x10000, size: 0x1000 }, { gpa: 0x40000, size: 0x1000 }]);
  const m = g.memory;
  const epoch = m.epoch;
  assert.equal(m.findRegion(0x40000, 0x1000, g.regions[1].user), g.regions[1].slot);
  const buf = m.removeRegion(g.regions[1].slot);
  assert.equal(buf, g.regions[1].buffer);
  assert.ok(m.epoch > epoch);
  assert.equal(m.lookupGpa(0x40000, 1), NO_REGION);
  assert.equal(m.region(g.regions[1].slot), undefined);
  assert.throws(() => m.removeRegion(g.regions[1].slot), /no such region/);
  assert.equal(m.lookupGpa(0x10000, 1), g.regions[0].slot);
  const all = m.removeAll();
  assert.deepEqual(all, [g.regions[0].buffer]);
  assert.equal(m.lookupGpa(0x10000, 1), NO_REGION);
  assert.equal(m.count, 0);
});

// ---------------------------------------------------------------- configure

Deno.test("Virtqueue.configure() validates size, alignment and placement", async (t) => {
  const guest = new TestGuest([{ gpa: 0x100000, size: 0x100000 }, {
    gpa: 0x200000,
    size: 0x100000,
  }]);
  const q = new Virtqueue(guest.memory, { direction: CHAIN_ANY });
  const ok = { size: 16, desc: 0x100000, avail: 0x101000, used: 0x102000, features: 0n };
  const cases: [string, Partial<typeof ok>, RegExp][] = [
    ["size 0", { size: 0 }, /not a power of 2/],
    ["size 3", { size: 3 }, /not a power of 2/],
    ["size 65536", { size: 65536 }, /not a power of 2 in \[1, 32768\]/],
    ["size 32769", { size: 32769 }, /not a power of 2/],
    ["descriptor table not 16-byte aligned", { desc: 0x100008 }, /descriptor table .* 16-byte/],
    ["avail ring not 2-byte aligned", { avail: 0x101001 }, /avail ring .* 2-byte/],
    ["used ring not 4-byte aligned", { used: 0x102002 }, /used ring .* 4-byte/],
    ["descriptor table outside memory", { desc: 0x50000 }, /descriptor table .* not inside/],
    ["used ring crossing into the next region", { used: 0x1ffff0 }, /used ring .* not inside one/],
    ["used ring overlapping the descriptor table", { used: 0x100080 }, /overlaps the descriptor/],
    ["used ring overlapping the avail ring", { used: 0x101004 }, /overlaps the avail ring/],
    ["address beyond 2^53", { desc: 2 ** 53 }, /address .* is invalid/],
  ];
  for (const [name, patch, re] of cases) {
    await t.step(`rejects ${name}`, () => {
      assert.throws(() => q.configure({ ...ok, ...patch }), re);
      assert.equal(q.state, "disabled");
      assert.equal(q.popAvail(), POP_DISABLED);
    });
  }
  await t.step("accepts size 1 and size 32768 placed inside one region", () => {
    q.configure({ ...ok, size: 1 });
    assert.equal(q.state, "ready");
    q.configure({ size: 32768, desc: 0x200000, avail: 0x100000, used: 0x180000, features: 0n });
    assert.equal(q.size, 32768);
  });
});

Deno.test("Virtqueue.configure() takes vhost-user user addresses", () => {
  const guest = new TestGuest([{ gpa: 0x100000, size: 0x100000, user: 0x7f1234500000 }]);
  const drv = new TestDriver(guest, { size: 8 });
  const q = new Virtqueue(guest.memory, { direction: CHAIN_DEVICE_READABLE });
  const cfg = drv.config("user");
  assert.ok(cfg.desc >= 0x7f1234500000);
  q.configure(cfg);
  drv.post([{ data: bytes(100) }]);
  assert.equal(q.popAvail(), POP_CHAIN);
  const got = new Uint8Array(100);
  assert.equal(chainRead(guest.memory, q.chain, 0, got), 100);
  assert.deepEqual(got, bytes(100));
  // The same numbers as guest physical addresses are nowhere.
  const q2 = new Virtqueue(guest.memory, { direction: CHAIN_ANY });
  assert.throws(() => q2.configure({ ...cfg, addressSpace: "guest-physical" }), /not inside/);
});

// ---------------------------------------------------------------- good chains

Deno.test("popAvail() returns direct, indirect and mixed chains as validated segments", async (t) => {
  const s = setup({ features: INDIRECT });
  const hdr = bytes(12, 7);
  const payload = bytes(1500, 9);
  const cases: [string, { indirect?: boolean; directPrefix?: number }][] = [
    ["direct", {}],
    ["indirect", { indirect: true }],
    ["mixed: one direct descriptor then an indirect table", { indirect: true, directPrefix: 1 }],
  ];
  for (const [name, opts] of cases) {
    await t.step(name, () => {
      const head = s.drv.post([
        { data: hdr },
        { data: payload },
        { len: 64, writable: true },
        { len: 100, writable: true },
      ], opts);
      assert.equal(s.q.popAvail(), POP_CHAIN);
      const c = s.q.chain;
      assert.equal(c.head, head);
      assert.equal(c.readableCount, 2);
      assert.equal(c.count, 4);
      assert.equal(c.readableBytes, 1512);
      assert.equal(c.writableBytes, 164);
      const got = new Uint8Array(1512);
      assert.equal(chainRead(s.guest.memory, c, 0, got), 1512);
      assert.deepEqual(got.subarray(0, 12), hdr);
      assert.deepEqual(got.subarray(12), payload);
      // Reading from an offset and past the end is short, never beyond readable data.
      assert.equal(chainRead(s.guest.memory, c, 1500, new Uint8Array(100)), 12);
      const data = bytes(150, 3);
      assert.equal(chainWrite(s.guest.memory, c, 0, data), 150);
      assert.equal(chainWrite(s.guest.memory, c, 160, bytes(10)), 4);
      assert.ok(s.q.pushUsed(head, 150));
      assert.equal(s.q.flushUsed(), 1);
      const [u] = s.drv.readUsed();
      assert.deepEqual([u.id, u.len], [head, 150]);
      assert.deepEqual(s.drv.readWritten(u.chain!, 150), data);
      assert.equal(s.q.popAvail(), POP_EMPTY);
    });
  }
  assert.equal(s.q.counters.chains, 3);
  assert.equal(s.q.counters.bytes, 450);
  assert.equal(s.q.counters.dropped, 0);
});

Deno.test("popAvail() splits a buffer spanning adjacent regions into one segment per region", () => {
  const s = setup({
    regions: [{ gpa: 0x100000, size: 0x100000 }, { gpa: 0x200000, size: 0x1000, user: 0x10 }],
    direction: CHAIN_DEVICE_READABLE,
  });
  const data = bytes(0x300, 5);
  const gpa = 0x200000 - 0x100;
  s.guest.write(gpa, data);
  s.drv.post([{ gpa, len: 0x300 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  const c = s.q.chain;
  assert.equal(c.count, 2);
  assert.deepEqual([c.region[0], c.offset[0], c.length[0]], [
    s.guest.regions[0].slot,
    0xfff00,
    0x100,
  ]);
  assert.deepEqual([c.region[1], c.offset[1], c.length[1]], [s.guest.regions[1].slot, 0, 0x200]);
  const got = new Uint8Array(0x300);
  assert.equal(chainRead(s.guest.memory, c, 0, got), 0x300);
  assert.deepEqual(got, data);
});

Deno.test("popAvail() accepts a chain exactly as long as the queue size", () => {
  const s = setup({ size: 8 });
  const buf = s.guest.alloc(8);
  offerRaw(s.drv, 8, (d) => {
    d.forEach((x, i) =>
      s.drv.writeDesc(x, buf + i, 1, i < 7 ? VIRTQ_DESC_F_NEXT : 0, d[i + 1] ?? 0)
    );
  });
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.equal(s.q.chain.count, 8);
  assert.equal(s.q.chain.descriptors, 8);
});

Deno.test("popAvail() accepts zero-length descriptors without making segments", () => {
  const s = setup();
  const buf = s.guest.alloc(16);
  offerRaw(s.drv, 2, (d) => {
    s.drv.writeDesc(d[0], 0xdead00000, 0, VIRTQ_DESC_F_NEXT, d[1]);
    s.drv.writeDesc(d[1], buf, 16, 0, 0);
  });
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.equal(s.q.chain.count, 1);
  assert.equal(s.q.chain.readableBytes, 16);
});

Deno.test("popAvail() ignores the write flag of a descriptor that refers to an indirect table", () => {
  const s = setup({ features: INDIRECT, direction: CHAIN_DEVICE_READABLE });
  const buf = s.guest.alloc(64);
  const table = s.guest.alloc(16);
  writeDescAt(s.guest, table, buf, 64, 0, 0);
  offerRaw(s.drv, 1, (d) => {
    s.drv.writeDesc(d[0], table, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE, 0);
  });
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.equal(s.q.chain.readableBytes, 64);
});

// ---------------------------------------------------------------- per-chain errors

Deno.test("popAvail() drops bad chains with used len 0 and keeps serving", async (t) => {
  // Each case writes a chain into a fresh queue, expects it dropped for the
  // reason, then checks that a good chain still goes through.
  type Case = {
    name: string;
    reason: QueueErrorReason;
    features?: bigint;
    direction?: ChainDirection;
    queue?: Partial<VirtqueueOptions>;
    regions?: TestRegionSpec[];
    write: (s: Setup, d: number[]) => void;
    descs?: number;
  };
  const cases: Case[] = [
    {
      name: "rejects an address outside guest memory",
      reason: "ADDRESS_OUTSIDE_MEMORY",
      write: (s, d) => s.drv.writeDesc(d[0], 0x10, 64, 0, 0),
    },
    {
      name: "rejects an address of 2^53 or more (le64 hi >= 2^21)",
      reason: "ADDRESS_TOO_LARGE",
      write: (s, d) => s.drv.writeDescRaw(d[0], 0x100000, 0x200000, 64, 0, 0),
    },
    {
      name: "rejects a 2^64-ish address",
      reason: "ADDRESS_TOO_LARGE",
      write: (s, d) => s.drv.writeDescRaw(d[0], 0xfffff000, 0xffffffff, 0x2000, 0, 0),
    },
    {
      name: "rejects a buffer running past the end of guest memory",
      reason: "ADDRESS_OUTSIDE_MEMORY",
      write: (s, d) => s.drv.writeDesc(d[0], 0x100000 + (4 << 20) - 8, 9, 0, 0),
    },
    {
      name: "rejects a buffer spanning a hole between regions",
      reason: "ADDRESS_OUTSIDE_MEMORY",
      regions: [{ gpa: 0x100000, size: 0x100000 }, { gpa: 0x201000, size: 0x1000 }],
      write: (s, d) => s.drv.writeDesc(d[0], 0x1ffff0, 0x20, 0, 0),
    },
    {
      name: "rejects a readable descriptor after a writable one",
      reason: "READABLE_AFTER_WRITABLE",
      write: (s, d) => {
        const b = s.guest.alloc(32);
        s.drv.writeDesc(d[0], b, 16, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, d[1]);
        s.drv.writeDesc(d[1], b + 16, 16, 0, 0);
      },
      descs: 2,
    },
    {
      name: "rejects a readable descriptor after a zero-length writable one",
      reason: "READABLE_AFTER_WRITABLE",
      write: (s, d) => {
        const b = s.guest.alloc(32);
        s.drv.writeDesc(d[0], b, 0, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, d[1]);
        s.drv.writeDesc(d[1], b + 16, 16, 0, 0);
      },
      descs: 2,
    },
    {
      name: "on a TX queue rejects a device-writable descriptor",
      reason: "UNEXPECTED_WRITABLE",
      direction: CHAIN_DEVICE_READABLE,
      write: (s, d) => s.drv.writeDesc(d[0], s.guest.alloc(16), 16, VIRTQ_DESC_F_WRITE, 0),
    },
    {
      name: "on an RX queue rejects a device-readable descriptor",
      reason: "UNEXPECTED_READABLE",
      direction: CHAIN_DEVICE_WRITABLE,
      write: (s, d) => s.drv.writeDesc(d[0], s.guest.alloc(16), 16, 0, 0),
    },
    {
      name: "rejects a chain longer than maxChainBytes",
      reason: "TOO_LONG_BYTES",
      queue: { maxChainBytes: 100 },
      write: (s, d) => {
        const b = s.guest.alloc(128);
        s.drv.writeDesc(d[0], b, 60, VIRTQ_DESC_F_NEXT, d[1]);
        s.drv.writeDesc(d[1], b + 64, 41, 0, 0);
      },
      descs: 2,
    },
    {
      name: "rejects more segments than maxSegments",
      reason: "TOO_MANY_SEGMENTS",
      queue: { maxSegments: 2 },
      write: (s, d) => {
        const b = s.guest.alloc(48);
        s.drv.writeDesc(d[0], b, 16, VIRTQ_DESC_F_NEXT, d[1]);
        s.drv.writeDesc(d[1], b + 16, 16, VIRTQ_DESC_F_NEXT, d[2]);
        s.drv.writeDesc(d[2], b + 32, 16, 0, 0);
      },
      descs: 3,
    },
    {
      name: "rejects INDIRECT when VIRTIO_F_INDIRECT_DESC was not negotiated",
      reason: "INDIRECT_NOT_NEGOTIATED",
      write: (s, d) => s.drv.writeDesc(d[0], s.guest.alloc(16), 16, VIRTQ_DESC_F_INDIRECT, 0),
    },
    {
      name: "rejects INDIRECT together with NEXT",
      reason: "INDIRECT_WITH_NEXT",
      features: INDIRECT,
      write: (s, d) => {
        const t = s.guest.alloc(16);
        writeDescAt(s.guest, t, s.guest.alloc(16), 16, 0, 0);
        s.drv.writeDesc(d[0], t, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, d[1]);
        s.drv.writeDesc(d[1], s.guest.alloc(16), 16, 0, 0);
      },
      descs: 2,
    },
    {
      name: "rejects a nested indirect table",
      reason: "INDIRECT_NESTED",
      features: INDIRECT,
      write: (s, d) => {
        const inner = s.guest.alloc(16);
        writeDescAt(s.guest, inner, s.guest.alloc(16), 16, 0, 0);
        const outer = s.guest.alloc(16);
        writeDescAt(s.guest, outer, inner, 16, VIRTQ_DESC_F_INDIRECT, 0);
        s.drv.writeDesc(d[0], outer, 16, VIRTQ_DESC_F_INDIRECT, 0);
      },
    },
    {
      name: "rejects an indirect table of length 0",
      reason: "INDIRECT_BAD_LENGTH",
      features: INDIRECT,
      write: (s, d) => s.drv.writeDesc(d[0], s.guest.alloc(16), 0, VIRTQ_DESC_F_INDIRECT, 0),
    },
    {
      name: "rejects an indirect table length that is not a multiple of 16",
      reason: "INDIRECT_BAD_LENGTH",
      features: INDIRECT,
      write: (s, d) => s.drv.writeDesc(d[0], s.guest.alloc(32), 17, VIRTQ_DESC_F_INDIRECT, 0),
    },
    {
      name: "rejects an indirect table with more entries than maxIndirectEntries",
      reason: "INDIRECT_TOO_LARGE",
      features: INDIRECT,
      queue: { maxIndirectEntries: 4 },
      write: (s, d) => s.drv.writeDesc(d[0], s.guest.alloc(80), 80, VIRTQ_DESC_F_INDIRECT, 0),
    },
    {
      name: "rejects an indirect table outside guest memory",
      reason: "INDIRECT_OUTSIDE_MEMORY",
      features: INDIRECT,
      write: (s, d) => s.drv.writeDesc(d[0], 0x1000, 32, VIRTQ_DESC_F_INDIRECT, 0),
    },
    {
      name: "rejects an indirect table at an address of 2^53 or more",
      reason: "INDIRECT_OUTSIDE_MEMORY",
      features: INDIRECT,
      write: (s, d) => s.drv.writeDescRaw(d[0], 0, 0xffffffff, 32, VIRTQ_DESC_F_INDIRECT, 0),
    },
    {
      name: "rejects an indirect table spanning two regions",
      reason: "INDIRECT_OUTSIDE_MEMORY",
      features: INDIRECT,
      regions: [{ gpa: 0x100000, size: 0x100000 }, { gpa: 0x200000, size: 0x1000, user: 0 }],
      write: (s, d) => {
        writeDescAt(s.guest, 0x1ffff0, s.guest.alloc(16), 16, VIRTQ_DESC_F_NEXT, 1);
        writeDescAt(s.guest, 0x200000, s.guest.alloc(16), 16, 0, 0);
        s.drv.writeDesc(d[0], 0x1ffff0, 32, VIRTQ_DESC_F_INDIRECT, 0);
      },
    },
    {
      name: "rejects next >= table entries inside an indirect table",
      reason: "INDIRECT_NEXT_OUT_OF_RANGE",
      features: INDIRECT,
      write: (s, d) => {
        const t = s.guest.alloc(32);
        writeDescAt(s.guest, t, s.guest.alloc(16), 16, VIRTQ_DESC_F_NEXT, 2);
        writeDescAt(s.guest, t + 16, s.guest.alloc(16), 16, 0, 0);
        s.drv.writeDesc(d[0], t, 32, VIRTQ_DESC_F_INDIRECT, 0);
      },
    },
    {
      name: "rejects a loop inside an indirect table",
      reason: "INDIRECT_LOOP",
      features: INDIRECT,
      write: (s, d) => {
        const t = s.guest.alloc(32);
        writeDescAt(s.guest, t, s.guest.alloc(16), 16, VIRTQ_DESC_F_NEXT, 1);
        writeDescAt(s.guest, t + 16, s.guest.alloc(16), 16, VIRTQ_DESC_F_NEXT, 0);
        s.drv.writeDesc(d[0], t, 32, VIRTQ_DESC_F_INDIRECT, 0);
      },
    },
    {
      name: "rejects a bad address inside an indirect table",
      reason: "ADDRESS_OUTSIDE_MEMORY",
      features: INDIRECT,
      write: (s, d) => {
        const t = s.guest.alloc(16);
        writeDescAt(s.guest, t, 0x40, 16, 0, 0);
        s.drv.writeDesc(d[0], t, 16, VIRTQ_DESC_F_INDIRECT, 0);
      },
    },
  ];
  for (const c of cases) {
    await t.step(`popAvail() ${c.name}`, () => {
      const s = setup({
        features: c.features,
        direction: c.direction,
        queue: c.queue,
        regions: c.regions,
      });
      const head = offerRaw(s.drv, c.descs ?? 1, (d) => c.write(s, d));
      assertDropped(s, head, c.reason);
      assert.equal(s.q.counters.dropped, 1);
      assert.equal(s.q.inFlight, 0);
      // The queue keeps serving good chains.
      const writable = c.direction === CHAIN_DEVICE_WRITABLE;
      const good = s.drv.post([{ len: 8, writable }]);
      assert.equal(s.q.popAvail(), POP_CHAIN);
      assert.equal(s.q.chain.head, good);
    });
  }
});

// ---------------------------------------------------------------- ring-fatal errors

Deno.test("popAvail() marks the queue needs-reset when next index >= queue size", () => {
  const s = setup({ size: 16 });
  offerRaw(s.drv, 1, (d) => s.drv.writeDesc(d[0], s.guest.alloc(16), 16, VIRTQ_DESC_F_NEXT, 16));
  assertRingFatal(s, "NEXT_OUT_OF_RANGE");
});

Deno.test("popAvail() marks the queue needs-reset when the avail ring head >= queue size", () => {
  const s = setup({ size: 16 });
  s.drv.pushAvail(16);
  s.drv.publish();
  assertRingFatal(s, "HEAD_OUT_OF_RANGE");
});

Deno.test("popAvail() marks the queue needs-reset on a descriptor loop", () => {
  const s = setup({ size: 16 });
  offerRaw(s.drv, 2, (d) => {
    const b = s.guest.alloc(16);
    s.drv.writeDesc(d[0], b, 8, VIRTQ_DESC_F_NEXT, d[1]);
    s.drv.writeDesc(d[1], b + 8, 8, VIRTQ_DESC_F_NEXT, d[0]);
  });
  assertRingFatal(s, "LOOP");
});

Deno.test("popAvail() marks the queue needs-reset on a self-loop of zero-length descriptors", () => {
  const s = setup({ size: 32768, regions: [{ gpa: 0x100000, size: 2 << 20 }] });
  offerRaw(s.drv, 1, (d) => s.drv.writeDesc(d[0], 0, 0, VIRTQ_DESC_F_NEXT, d[0]));
  assertRingFatal(s, "LOOP");
});

Deno.test("popAvail() marks the queue needs-reset when avail->idx jumps more than queue size", () => {
  const s = setup({ size: 16 });
  s.drv.setAvailIdx(17);
  assertRingFatal(s, "AVAIL_IDX_CORRUPT");
});

Deno.test("popAvail() marks the queue needs-reset when avail->idx goes backwards", () => {
  const s = setup({ size: 16 });
  s.drv.post([{ len: 8 }]);
  s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  s.drv.setAvailIdx(1);
  assertRingFatal(s, "AVAIL_IDX_CORRUPT");
});

Deno.test("popAvail() marks the queue needs-reset when more chains are outstanding than the queue size", () => {
  const s = setup({ size: 2 });
  const a = s.drv.post([{ len: 8 }]);
  const b = s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  s.q.pushUsed(a, 0);
  s.q.pushUsed(b, 0);
  // Both used entries are still unpublished; offering a head again would let
  // a third used entry overwrite one of them.
  s.drv.pushAvail(a);
  s.drv.publish();
  assertRingFatal(s, "AVAIL_IDX_CORRUPT");
  assert.match(s.q.resetReason!, /0 chains in flight and 2 unpublished/);
});

Deno.test("popAvail() marks the queue needs-reset when a head still in flight is offered again", () => {
  const s = setup({ size: 16 });
  const head = s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  s.drv.pushAvail(head);
  s.drv.publish();
  assertRingFatal(s, "AVAIL_HEAD_IN_USE");
});

Deno.test("a queue in needs-reset refuses work and leaves the rings alone until reset", () => {
  const s = setup({ size: 16 });
  const good = s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.ok(s.q.pushUsed(good, 8));
  s.drv.pushAvail(99);
  s.drv.publish();
  assert.equal(s.q.popAvail(), POP_NEEDS_RESET);
  const before = s.guest.snapshot();
  s.drv.post([{ len: 8 }]);
  const afterPost = s.guest.snapshot();
  assert.equal(s.q.popAvail(), POP_NEEDS_RESET);
  assert.equal(s.q.flushUsed(), 0);
  assert.equal(s.q.needsInterrupt(), false);
  assert.equal(s.q.enableNotifications(), false);
  s.q.disableNotifications();
  assert.deepEqual(s.guest.snapshot(), afterPost, "no device writes after needs-reset");
  assert.notDeepEqual(before, afterPost);
  assert.equal(s.drv.usedIdx(), 0, "the pending used entry was never published");
  s.q.reset();
  assert.equal(s.q.state, "disabled");
  assert.equal(s.q.resetReason, null);
  assert.equal(s.q.popAvail(), POP_DISABLED);
});

Deno.test("pushUsed() throws for a head that is not in flight (a device bug)", () => {
  const s = setup({ size: 16 });
  assert.throws(() => s.q.pushUsed(3, 0), /not in flight/);
  const head = s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.throws(() => s.q.pushUsed(head, 2 ** 32), /not a u32/);
  assert.ok(s.q.pushUsed(head, 0));
  assert.throws(() => s.q.pushUsed(head, 0), /not in flight/);
});

Deno.test("unpopAvail() gives back the last chains so the next pops return them again", () => {
  const s = setup({ size: 8, direction: CHAIN_DEVICE_WRITABLE });
  const heads = [0, 1, 2].map(() => s.drv.post([{ len: 100, writable: true }]));
  const own = [new DescriptorChain(4), new DescriptorChain(4)];
  assert.equal(s.q.popAvail(own[0]), POP_CHAIN);
  assert.equal(s.q.popAvail(own[1]), POP_CHAIN);
  assert.deepEqual([own[0].head, own[1].head], heads.slice(0, 2));
  assert.equal(own[0].writableBytes, 100, "each caller-owned chain keeps its own segments");
  s.q.unpopAvail(2);
  assert.equal(s.q.inFlight, 0);
  assert.equal(s.q.lastAvailIdx, 0);
  const again: number[] = [];
  while (s.q.popAvail() === POP_CHAIN) again.push(s.q.chain.head);
  assert.deepEqual(again, heads);
  // A completed chain cannot be given back.
  s.q.pushUsed(heads[2], 0);
  assert.throws(() => s.q.unpopAvail(1), /not a chain still in flight/);
  assert.equal(s.q.inFlight, 2, "a refused unpop changes nothing");
  s.q.unpopAvail(0);
  // A dropped chain cannot be given back either.
  s.q.pushUsed(heads[0], 0);
  s.q.pushUsed(heads[1], 0);
  s.q.flushUsed();
  s.drv.readUsed();
  s.drv.post([{ len: 8 }]); // readable on an RX queue: dropped
  assert.equal(s.q.popAvail(), POP_DROPPED);
  assert.throws(() => s.q.unpopAvail(1), /not a chain still in flight/);
});

Deno.test("chainRead()/chainWrite() refuse negative or fractional offsets", () => {
  const s = setup();
  s.drv.post([{ data: bytes(16) }, { len: 16, writable: true }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  const before = s.guest.snapshot();
  for (const off of [-1, -16, 0.5, NaN, Infinity]) {
    assert.equal(chainRead(s.guest.memory, s.q.chain, off, new Uint8Array(8)), -1);
    assert.equal(chainWrite(s.guest.memory, s.q.chain, off, bytes(8)), -1);
  }
  assert.deepEqual(s.guest.snapshot(), before);
});

// ---------------------------------------------------------------- used ring

Deno.test("used ring entries become visible to the driver only with one used->idx publish", () => {
  const s = setup({ size: 16 });
  const heads = [0, 1, 2, 3].map(() => s.drv.post([{ len: 64, writable: true }]));
  const popped: number[] = [];
  while (s.q.popAvail() === POP_CHAIN) popped.push(s.q.chain.head);
  assert.deepEqual(popped, heads);
  for (const h of popped.reverse()) s.q.pushUsed(h, h + 10);
  assert.equal(s.q.pendingUsed, 4);
  // Entries are in memory, but used->idx has not moved: the driver sees nothing.
  assert.equal(s.drv.usedIdx(), 0);
  assert.deepEqual(s.drv.readUsed(), []);
  assert.equal(s.q.flushUsed(), 1 * 4);
  assert.equal(s.drv.usedIdx(), 4);
  assert.deepEqual(s.drv.readUsed().map((u) => [u.id, u.len]), popped.map((h) => [h, h + 10]));
  assert.equal(s.q.flushUsed(), 0);
});

Deno.test("16-bit ring indices wrap around from a base near 65535", () => {
  const s = setup({ size: 8, startIdx: 65530 });
  assert.equal(s.q.lastAvailIdx, 65530);
  assert.equal(s.q.usedIdx, 65530);
  let total = 0;
  for (let round = 0; round < 5; round++) {
    const heads = [0, 1, 2, 3, 4, 5].map((i) => s.drv.post([{ data: bytes(10 + i, round) }]));
    const seen: number[] = [];
    while (s.q.popAvail() === POP_CHAIN) {
      seen.push(s.q.chain.head);
      s.q.pushUsed(s.q.chain.head, 0);
    }
    assert.deepEqual(seen, heads);
    s.q.flushUsed();
    assert.deepEqual(s.drv.readUsed().map((u) => u.id), heads);
    total += 6;
  }
  assert.equal(s.q.lastAvailIdx, (65530 + total) & 0xffff);
  assert.equal(s.drv.usedIdx(), (65530 + total) & 0xffff);
  assert.ok(s.q.lastAvailIdx < 100, "wrapped");
});

for (const size of [1024, 32768]) {
  Deno.test(`a queue of size ${size} fills completely and drains in order`, () => {
    const s = setup({ size, regions: [{ gpa: 0x100000, size: 8 << 20 }], startIdx: 65000 });
    const heads: number[] = [];
    for (let i = 0; i < size; i++) heads.push(s.drv.post([{ len: 4 }], { publish: false }));
    assert.ok(heads.every((h) => h >= 0));
    assert.equal(s.drv.post([{ len: 4 }]), -1, "the driver has no descriptor left");
    s.drv.publish();
    let n = 0;
    while (s.q.popAvail() === POP_CHAIN) {
      assert.equal(s.q.chain.head, heads[n]);
      s.q.pushUsed(s.q.chain.head, 4);
      n++;
    }
    assert.equal(n, size);
    assert.equal(s.q.flushUsed(), size);
    const used = s.drv.readUsed();
    assert.equal(used.length, size);
    assert.deepEqual(used.map((u) => u.id), heads);
    assert.equal(s.q.counters.chains, size);
  });
}

// ---------------------------------------------------------------- notifications

Deno.test("vringNeedEvent() matches the spec's examples, across the 16-bit wrap", () => {
  // used_event 0: notify after the first buffer (idx 0 -> 1).
  assert.equal(vringNeedEvent(0, 1, 0), true);
  assert.equal(vringNeedEvent(0, 2, 1), false);
  assert.equal(vringNeedEvent(5, 10, 3), true);
  assert.equal(vringNeedEvent(5, 5, 3), false);
  assert.equal(vringNeedEvent(65535, 2, 65530), true);
  assert.equal(vringNeedEvent(3, 2, 65530), false);
  assert.equal(vringNeedEvent(7, 7, 7), false);
});

Deno.test("needsInterrupt() with EVENT_IDX fires only when used->idx passes used_event", () => {
  const s = setup({ size: 16, features: EVENT_IDX });
  const complete = (n: number) => {
    for (let i = 0; i < n; i++) s.drv.post([{ len: 8 }]);
    while (s.q.popAvail() === POP_CHAIN) s.q.pushUsed(s.q.chain.head, 0);
    s.q.flushUsed();
    s.drv.readUsed();
  };
  complete(1);
  assert.equal(s.q.needsInterrupt(), true, "first decision after configure");
  s.drv.setUsedEvent(4); // notify when the entry at index 4 is written (idx reaches 5)
  complete(2); // idx 3
  assert.equal(s.q.needsInterrupt(), false);
  complete(1); // idx 4
  assert.equal(s.q.needsInterrupt(), false);
  complete(1); // idx 5
  assert.equal(s.q.needsInterrupt(), true);
  assert.equal(s.q.needsInterrupt(), false, "nothing new since the last decision");
  s.drv.setUsedEvent(3); // already behind
  complete(3); // idx 8
  assert.equal(s.q.needsInterrupt(), false);
  assert.equal(s.q.counters.interrupts, 2);
});

Deno.test("needsInterrupt() with EVENT_IDX handles used_event across the 16-bit wrap", () => {
  const s = setup({ size: 8, features: EVENT_IDX, startIdx: 65533 });
  s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  s.q.pushUsed(s.q.chain.head, 0);
  s.q.flushUsed();
  s.q.needsInterrupt(); // 65534: establishes the baseline
  s.drv.setUsedEvent(1); // fires when idx reaches 2
  for (let i = 0; i < 3; i++) s.drv.post([{ len: 8 }]);
  while (s.q.popAvail() === POP_CHAIN) s.q.pushUsed(s.q.chain.head, 0);
  s.q.flushUsed(); // idx 1
  assert.equal(s.q.needsInterrupt(), false);
  s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  s.q.pushUsed(s.q.chain.head, 0);
  s.q.flushUsed(); // idx 2
  assert.equal(s.drv.usedIdx(), 2);
  assert.equal(s.q.needsInterrupt(), true);
});

Deno.test("needsInterrupt() without EVENT_IDX honours VIRTQ_AVAIL_F_NO_INTERRUPT", () => {
  const s = setup({ size: 16 });
  assert.equal(s.q.needsInterrupt(), true, "first decision after configure may be spurious");
  assert.equal(s.q.needsInterrupt(), false, "nothing used");
  const one = () => {
    s.drv.post([{ len: 8 }]);
    assert.equal(s.q.popAvail(), POP_CHAIN);
    s.q.pushUsed(s.q.chain.head, 0);
    s.q.flushUsed();
  };
  one();
  assert.equal(s.q.needsInterrupt(), true);
  s.drv.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT);
  one();
  assert.equal(s.q.needsInterrupt(), false);
  s.drv.setAvailFlags(0);
  one();
  assert.equal(s.q.needsInterrupt(), true);
});

Deno.test("disable/enableNotifications() without EVENT_IDX toggle VIRTQ_USED_F_NO_NOTIFY", () => {
  const s = setup({ size: 16 });
  s.q.disableNotifications();
  assert.equal(s.drv.usedFlags(), VIRTQ_USED_F_NO_NOTIFY);
  assert.equal(s.drv.kickNeeded(0, 1), false);
  assert.equal(s.q.enableNotifications(), false, "no buffers arrived meanwhile");
  assert.equal(s.drv.usedFlags(), 0);
  assert.equal(s.drv.kickNeeded(0, 1), true);
});

Deno.test("enableNotifications() with EVENT_IDX sets avail_event and reports buffers that raced in", () => {
  const s = setup({ size: 16, features: EVENT_IDX });
  s.q.disableNotifications();
  assert.equal(s.drv.usedFlags(), 0, "flags stay 0 under EVENT_IDX (§2.7.10.2)");
  // The driver posts while the device is polling with notifications off.
  s.drv.post([{ len: 8 }]);
  s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  // Enabling now must report the buffer still waiting, so the device does not sleep on it.
  assert.equal(s.q.enableNotifications(), true);
  assert.equal(s.drv.availEvent(), 1);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.equal(s.q.enableNotifications(), false);
  assert.equal(s.drv.availEvent(), 2);
  // The driver's next publish (idx 2 -> 3) crosses avail_event 2: it must kick.
  s.drv.pushAvail(s.drv.takeDescriptors(1)[0]);
  assert.equal(s.drv.publish(), true);
});

// ---------------------------------------------------------------- revocation, stop, base

Deno.test("after memory is replaced the queue remaps its rings and old chains are stale", () => {
  const s = setup({ size: 16 });
  s.drv.post([{ data: bytes(32) }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  const head = s.q.chain.head;
  // SET_MEM_TABLE with the same layout: hand back, then grant "new" mappings
  // (a copy stands in for mapping the same memfd again).
  const old = s.guest.memory.removeAll();
  assert.equal(old.length, 1);
  const copy = old[0].slice(0);
  const r = s.guest.regions[0];
  s.guest.memory.addRegion({ guestPhysAddr: r.gpa, size: r.size, userAddr: r.user, buffer: copy });
  structuredClone(old[0], { transfer: [old[0]] }); // the parent now owns (and unmaps) it
  assert.equal(chainRead(s.guest.memory, s.q.chain, 0, new Uint8Array(32)), -1);
  assert.equal(chainWrite(s.guest.memory, s.q.chain, 0, new Uint8Array(32)), -1);
  assert.ok(s.q.pushUsed(head, 0), "the ring is re-translated into the new buffer");
  assert.equal(s.q.flushUsed(), 1);
  assert.equal(new DataView(copy).getUint16(s.drv.usedGpa - r.gpa + 2, true), 1);
});

Deno.test("popAvail() marks the queue needs-reset when its ring memory was revoked", () => {
  const s = setup({ size: 16 });
  s.guest.memory.removeAll();
  assertRingFatal(s, "RING_UNMAPPED");
});

Deno.test("stop() returns in-flight chains with len 0 and reports last_avail_idx", () => {
  const s = setup({ size: 16, startIdx: 100 });
  const a = s.drv.post([{ len: 8 }]);
  const b = s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  assert.equal(s.q.popAvail(), POP_CHAIN);
  s.q.pushUsed(a, 8);
  assert.equal(s.q.stop(), 102);
  assert.equal(s.q.state, "disabled");
  assert.deepEqual(s.drv.readUsed().map((u) => [u.id, u.len]), [[a, 8], [b, 0]]);
  // Restart at the reported base (vhost-user SET_VRING_BASE + SET_VRING_ADDR).
  s.q.lastAvailIdx = 102;
  s.q.configure(s.drv.config());
  assert.equal(s.q.usedIdx, 102);
  s.drv.post([{ len: 8 }]);
  assert.equal(s.q.popAvail(), POP_CHAIN);
});

Deno.test("lastAvailIdx and usedIdx setters validate their range", () => {
  const s = setup();
  assert.throws(() => (s.q.lastAvailIdx = 65536), RangeError);
  assert.throws(() => (s.q.usedIdx = -1), RangeError);
  assert.throws(() => (s.q.lastAvailIdx = 1.5), RangeError);
  s.q.usedIdx = 7;
  assert.equal(s.q.usedIdx, 7);
});

Deno.test("MAX_CHAIN_BYTES is the le32 maximum (total chain < 2^32 bytes)", () => {
  assert.equal(MAX_CHAIN_BYTES, 2 ** 32 - 1);
  assert.throws(
    () => new Virtqueue(new GuestMemory(), { direction: CHAIN_ANY, maxChainBytes: 2 ** 32 }),
    /maxChainBytes/,
  );
  assert.equal(VIRTQ_DESC_SIZE, 16);
});

Deno.test("another publisher's completions: onAvailIdx retires them before re-offered heads are checked", () => {
  const { guest, drv, q } = setup({ size: 2 });
  for (let i = 0; i < 2; i++) drv.post([{ len: 64, writable: true }]);
  const heads = [0, 1].map(() => {
    assert.equal(q.popAvail(), POP_CHAIN);
    return q.chain.head;
  });
  // The other publisher (the poller, RX publication) writes both used elements and used->idx.
  const publish = () => {
    heads.forEach((h, i) => {
      guest.setU32(drv.usedGpa + 4 + 8 * i, h);
      guest.setU32(drv.usedGpa + 8 + 8 * i, 64);
    });
    guest.atomicSetU16(drv.usedGpa + 2, 2);
  };
  publish();
  assert.equal(drv.readUsed().length, 2);
  // The driver offers the same heads again before the device heard of the completions.
  for (let i = 0; i < 2; i++) drv.post([{ len: 64, writable: true }]);
  let calls = 0;
  q.onAvailIdx = () => {
    calls++;
    for (const h of heads.splice(0)) q.retireUsed(h);
  };
  assert.equal(q.popAvail(), POP_CHAIN, "the re-offered head is taken");
  assert.equal(q.popAvail(), POP_CHAIN);
  assert.equal(calls, 1, "called once per read of avail->idx");
  assert.equal(q.counters.used, 2);
  assert.throws(() => q.retireUsed(99), /not in flight/);
  // Without the hook the same re-offer is a driver error: the device still holds the heads.
  const s2 = setup({ size: 2 });
  for (let i = 0; i < 2; i++) s2.drv.post([{ len: 64, writable: true }]);
  const h2 = [0, 1].map(() => {
    assert.equal(s2.q.popAvail(), POP_CHAIN);
    return s2.q.chain.head;
  });
  for (let i = 0; i < 2; i++) {
    s2.guest.setU32(s2.drv.usedGpa + 4 + 8 * i, h2[i]);
    s2.guest.setU32(s2.drv.usedGpa + 8 + 8 * i, 64);
  }
  s2.guest.atomicSetU16(s2.drv.usedGpa + 2, 2);
  s2.drv.readUsed();
  for (let i = 0; i < 2; i++) s2.drv.post([{ len: 64, writable: true }]);
  assert.equal(s2.q.popAvail(), POP_NEEDS_RESET);
});

Deno.test("a queue whose used ring another publisher owns refuses to write it (a device bug throws); a bad chain stays in flight for that publisher", () => {
  const { drv, q } = setup({ size: 8, direction: CHAIN_DEVICE_WRITABLE });
  q.handOverUsed();
  const head = drv.post([{ len: 64, writable: true }]);
  assert.equal(q.popAvail(), POP_CHAIN);
  assert.throws(() => q.pushUsed(head, 64), /used ring is another publisher's/);
  assert.throws(() => q.flushUsed(), /used ring is another publisher's/);
  assert.throws(() => q.stop(), /used ring is another publisher's/);
  // A bad chain stays in flight for the publisher to complete: nothing is written.
  drv.post([{ len: 64, writable: false }]);
  assert.equal(q.popAvail(), POP_DROPPED);
  assert.equal(q.inFlight, 2);
  assert.equal(drv.usedIdx(), 0);
  q.retireUsed(head);
  q.takeBackUsed(0);
  q.stop();
  assert.equal(drv.readUsed().length, 1, "taken back, the device completes what is in flight");
});

Deno.test("chainRead() copies small and large segments alike, from every offset", () => {
  const s = setup({ features: INDIRECT });
  // Segments around the byte-by-byte threshold and one well past it.
  const sizes = [1, 5, 31, 32, 33, 12, 200];
  const parts = sizes.map((n, i) => bytes(n, i * 17 + 1));
  const all = new Uint8Array(sizes.reduce((a, b) => a + b, 0));
  let at = 0;
  for (const p of parts) {
    all.set(p, at);
    at += p.length;
  }
  s.drv.post(parts.map((data) => ({ data })));
  assert.equal(s.q.popAvail(), POP_CHAIN);
  for (let from = 0; from <= all.length; from++) {
    for (const want of [1, 12, 40, all.length]) {
      const got = new Uint8Array(want);
      const n = chainRead(s.guest.memory, s.q.chain, from, got);
      assert.equal(n, Math.min(want, all.length - from), `from ${from} want ${want}`);
      assert.deepEqual(got.subarray(0, n), all.subarray(from, from + n), `from ${from}`);
    }
  }
});
