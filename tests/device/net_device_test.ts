/**
 * The device's data paths end to end in one thread: a test driver plays the
 * guest (device/virtqueue rings in a buffer standing in for guest memory), a
 * fake plays the parent's I/O workers (tests/device/fake_io.ts), and the
 * NetDevice in between runs its real loop.
 */
import assert from "node:assert/strict";
import { NetDevice } from "../../device/net_device.ts";
import {
  VIRTIO_F_VERSION_1,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../ipc/features.ts";
import {
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
} from "../../device/net_header.ts";
import { TestDriver, TestGuest } from "./driver.ts";
import { FakeIo } from "./fake_io.ts";
import {
  CTL,
  IO_ENDED_POLLER,
  IO_ENDED_WRITER,
  RX_PUBLISHED,
  RX_UNUSED,
  RXT_MERGEABLE,
  signal,
} from "../../ipc/datapath.ts";
import { buildFrame, get32, l4ChecksumOk, prng, randomBytes } from "./frames.ts";

const BASE = VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC;
const TX_OFFLOADS = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6;

interface Rig {
  guest: TestGuest;
  io: FakeIo;
  dev: NetDevice;
  rx: TestDriver;
  tx: TestDriver;
  faults: string[];
}

async function withRig(
  features: bigint,
  offloadMode: "auto" | "off",
  fn: (r: Rig) => Promise<void>,
  rxPostRecords?: number,
): Promise<void> {
  const guest = new TestGuest([{ gpa: 0x100000, size: 16 << 20 }]);
  const io = new FakeIo(guest, rxPostRecords);
  const faults: string[] = [];
  const dev = new NetDevice((q, reason) => faults.push(`${q}: ${reason}`));
  dev.grant(io.regionGrants());
  dev.setFeatures(features, offloadMode);
  const rx = new TestDriver(guest, { size: 256, features });
  const tx = new TestDriver(guest, { size: 256, features });
  io.publishTxTo(tx);
  io.attachRx(rx);
  const place = (d: TestDriver) => {
    const c = d.config("user");
    return { size: c.size, desc: c.desc, avail: c.avail, used: c.used, base: 0 };
  };
  dev.start(place(rx), place(tx), io.buffers, 0x6000_0000_0000);
  try {
    await fn({ guest, io, dev, rx, tx, faults });
  } finally {
    await dev.stop();
  }
}

/** Runs the fake writer and poller and waits until `cond` holds (the device loop runs meanwhile). */
async function until(io: FakeIo, cond: () => boolean, what: string): Promise<void> {
  const end = Date.now() + 3000;
  for (;;) {
    io.writerStep();
    if (io.rx !== null) io.pollerStep();
    if (cond()) return;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 1));
  }
}

function netHdr(
  f: {
    flags?: number;
    gsoType?: number;
    hdrLen?: number;
    gsoSize?: number;
    csumStart?: number;
    csumOffset?: number;
  },
): Uint8Array {
  const h = new Uint8Array(12);
  const v = new DataView(h.buffer);
  h[0] = f.flags ?? 0;
  h[1] = f.gsoType ?? 0;
  v.setUint16(2, f.hdrLen ?? 0, true);
  v.setUint16(4, f.gsoSize ?? 0, true);
  v.setUint16(6, f.csumStart ?? 0, true);
  v.setUint16(8, f.csumOffset ?? 0, true);
  return h;
}

function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

Deno.test("TX pass-through: header and frame reach the writer as the guest wrote them, chain used with len 0", async () => {
  await withRig(BASE | TX_OFFLOADS, "auto", async ({ io, tx }) => {
    const { frame } = buildFrame({ payload: new Uint8Array(100).fill(7) });
    const head = tx.post([{ data: netHdr({}) }, { data: frame.subarray(0, 30) }, {
      data: frame.subarray(30),
    }]);
    io.kick("tx");
    await until(io, () => io.sent.length === 1 && tx.usedIdx() === 1, "one frame sent and used");
    assert.deepEqual(io.sent[0].frame, frame);
    assert.deepEqual(io.sent[0].hdr, netHdr({}));
    assert.deepEqual(tx.readUsed().map((u) => [u.id, u.len]), [[head, 0]]);
    assert.ok(io.calls.tx >= 1, "the guest was interrupted");
  });
});

Deno.test("TX pass-through of a GSO frame keeps the validated header, header and data sharing a descriptor, or indirect", async () => {
  await withRig(BASE | TX_OFFLOADS, "auto", async ({ io, tx }) => {
    const rand = prng(3);
    for (const [v6, indirect] of [[false, false], [true, true]] as const) {
      const b = buildFrame({
        ipVersion: v6 ? 6 : 4,
        payload: randomBytes(rand, 30000),
        checksum: "partial",
      });
      const hdr = netHdr({
        flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
        gsoType: v6 ? VIRTIO_NET_HDR_GSO_TCPV6 : VIRTIO_NET_HDR_GSO_TCPV4,
        hdrLen: b.payloadOffset,
        gsoSize: 1448,
        csumStart: b.l4Offset,
        csumOffset: 16,
      });
      const all = concat(hdr, b.frame);
      tx.post([{ data: all.subarray(0, 1000) }, { data: all.subarray(1000) }], { indirect });
    }
    io.kick("tx");
    await until(io, () => io.sent.length === 2, "two GSO frames");
    assert.equal(io.sent[0].hdr[1], VIRTIO_NET_HDR_GSO_TCPV4);
    assert.equal(io.sent[1].hdr[1], VIRTIO_NET_HDR_GSO_TCPV6);
    assert.equal(new DataView(io.sent[0].hdr.buffer).getUint16(4, true), 1448);
  });
});

Deno.test("TX drops a GSO frame with gso_size 0, counts it, and completes the chain", async () => {
  await withRig(BASE | TX_OFFLOADS, "auto", async ({ io, tx, dev }) => {
    const b = buildFrame({ payload: new Uint8Array(3000), checksum: "partial" });
    const hdr = netHdr({
      flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
      gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
      gsoSize: 0,
      csumStart: b.l4Offset,
      csumOffset: 16,
    });
    const head = tx.post([{ data: concat(hdr, b.frame) }]);
    io.kick("tx");
    await until(io, () => tx.usedIdx() === 1, "the chain back");
    assert.equal(io.sent.length, 0);
    assert.deepEqual(tx.readUsed().map((u) => u.id), [head]);
    assert.equal(dev.counters().tx0.drop_GSO_SIZE_ZERO, 1);
  });
});

Deno.test("TX the seed's bug: a NEEDS_CSUM UDP frame is not mistaken for TSO (flags is not gso_type)", async () => {
  await withRig(BASE | TX_OFFLOADS, "auto", async ({ io, tx }) => {
    const b = buildFrame({ l4: "udp", payload: new Uint8Array(200), checksum: "partial" });
    const hdr = netHdr({
      flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
      csumStart: b.l4Offset,
      csumOffset: 6,
    });
    tx.post([{ data: concat(hdr, b.frame) }]);
    io.kick("tx");
    await until(io, () => io.sent.length === 1, "the UDP frame");
    assert.equal(io.sent[0].hdr[1], 0, "gso_type stays NONE");
    assert.equal(io.sent[0].hdr[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
  });
});

Deno.test("--offload off: the device completes checksums and segments TSO frames itself", async () => {
  await withRig(BASE | TX_OFFLOADS, "off", async ({ io, tx }) => {
    const rand = prng(9);
    const csum = buildFrame({ payload: randomBytes(rand, 500), checksum: "partial" });
    tx.post([{
      data: concat(netHdr({ flags: 1, csumStart: csum.l4Offset, csumOffset: 16 }), csum.frame),
    }]);
    const payload = randomBytes(rand, 10_000);
    const gso = buildFrame({ payload, checksum: "partial", seq: 5000 });
    tx.post([{
      data: concat(
        netHdr({
          flags: 1,
          gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
          gsoSize: 1448,
          csumStart: gso.l4Offset,
          csumOffset: 16,
        }),
        gso.frame,
      ),
    }]);
    io.kick("tx");
    const segments = Math.ceil(10_000 / 1448);
    await until(
      io,
      () => io.sent.length === 1 + segments && tx.usedIdx() === 2,
      "csum frame and segments",
    );
    for (const s of io.sent) {
      assert.deepEqual(s.hdr, new Uint8Array(12), "software frames go out with a zero header");
      assert.ok(l4ChecksumOk(s.frame, 14, 34, s.frame.length, 6), "checksum completed");
    }
    const got = concat(...io.sent.slice(1).map((s) => s.frame.subarray(54)));
    assert.deepEqual(got, payload);
    assert.equal(get32(io.sent[2].frame, 34 + 4), 5000 + 1448, "sequence advanced");
  });
});

Deno.test("--offload off: a TSO frame is segmented in place from a fragmented chain, or copied when the ring cannot hold its segments", async () => {
  await withRig(BASE | TX_OFFLOADS, "off", async ({ io, tx, dev }) => {
    const rand = prng(11);
    // Odd split points: payload pieces start at odd offsets of their segments,
    // so their checksums pair bytes the other way round.
    const cases = [
      { v6: false, mss: 1448, cuts: [12, 40, 54, 55, 1000, 1503, 3001, 7777] },
      { v6: true, mss: 1440, cuts: [5, 12, 75, 76, 2049, 2050, 9001] },
      // 1201 segments: more than the 256-record TX ring holds, so the copying path.
      { v6: false, mss: 50, cuts: [12] },
    ];
    let sentBefore = 0;
    for (const [n, c] of cases.entries()) {
      const payload = randomBytes(rand, c.mss === 50 ? 60_000 : 20_000);
      const b = buildFrame({ ipVersion: c.v6 ? 6 : 4, payload, checksum: "partial", seq: 7 });
      const all = concat(
        netHdr({
          flags: 1,
          gsoType: c.v6 ? VIRTIO_NET_HDR_GSO_TCPV6 : VIRTIO_NET_HDR_GSO_TCPV4,
          gsoSize: c.mss,
          csumStart: b.l4Offset,
          csumOffset: 16,
        }),
        b.frame,
      );
      const bounds = [0, ...c.cuts, all.length];
      tx.post(bounds.slice(1).map((end, i) => ({ data: all.subarray(bounds[i], end) })));
      io.kick("tx");
      const count = Math.ceil(payload.length / c.mss);
      await until(
        io,
        () => io.sent.length === sentBefore + count && tx.usedIdx() === n + 1,
        `case ${n}: ${count} segments`,
      );
      const segs = io.sent.slice(sentBefore);
      sentBefore = io.sent.length;
      const l4 = b.l4Offset;
      for (const [i, s] of segs.entries()) {
        assert.deepEqual(s.hdr, new Uint8Array(12), "segments go out with a zero header");
        assert.ok(s.frame.length - b.payloadOffset <= c.mss, `case ${n} segment ${i} size`);
        assert.ok(
          l4ChecksumOk(s.frame, b.l3Offset, l4, s.frame.length, 6),
          `case ${n} segment ${i} TCP checksum`,
        );
        assert.equal(get32(s.frame, l4 + 4), 7 + i * c.mss, `case ${n} segment ${i} sequence`);
      }
      assert.deepEqual(concat(...segs.map((s) => s.frame.subarray(b.payloadOffset))), payload);
    }
    const t = dev.counters().tx0;
    assert.equal(t.segmented, 3);
    assert.equal(t.segmentedInPlace, 2, "the two that fit the ring were segmented in place");
  });
});

Deno.test("RX without MRG_RXBUF: frame lands in one chain, num_buffers is exactly 1", async () => {
  await withRig(BASE | VIRTIO_NET_F_GUEST_CSUM, "auto", async ({ io, rx }) => {
    for (let i = 0; i < 4; i++) {
      rx.post([{ len: 12, writable: true }, { len: 1514, writable: true }]);
    }
    io.kick("rx");
    await until(io, () => io.postedChains === 4, "four chains posted");
    const { frame } = buildFrame({ payload: new Uint8Array(600).fill(0xab) });
    const hdr = netHdr({});
    hdr[10] = 0x55; // the tap leaves num_buffers alone; the device must set it
    assert.equal(io.receive(concat(hdr, frame)), 1);
    await until(io, () => rx.usedIdx() === 1, "one used entry");
    const [u] = rx.readUsed();
    assert.equal(u.len, 12 + frame.length);
    const data = rx.readWritten(u.chain!, u.len);
    assert.equal(get16le(data, 10), 1, "num_buffers");
    assert.deepEqual(data.subarray(12), frame);
    assert.ok(io.calls.rx >= 1);
  });
});

Deno.test("RX with MRG_RXBUF: a large frame spans several chains, num_buffers counts them", async () => {
  const f = BASE | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MRG_RXBUF;
  await withRig(f, "auto", async ({ io, rx }) => {
    for (let i = 0; i < 8; i++) rx.post([{ len: 1536, writable: true }]);
    io.kick("rx");
    await until(io, () => io.postedChains === 8, "eight chains posted");
    const payload = randomBytes(prng(4), 4000);
    const { frame } = buildFrame({ payload });
    assert.equal(io.receive(concat(netHdr({}), frame)), 3);
    await until(io, () => rx.usedIdx() === 3, "three used entries");
    const used = rx.readUsed();
    const total = 12 + frame.length;
    assert.deepEqual(used.map((u) => u.len), [1536, 1536, total - 3072]);
    const bytes = concat(...used.map((u) => rx.readWritten(u.chain!, u.len)));
    assert.equal(get16le(bytes, 10), 3);
    assert.deepEqual(bytes.subarray(12), frame);
  });
});

Deno.test("RX without GUEST_CSUM: a partial checksum the guest cannot finish is dropped, counted; DATA_VALID is cleared", async () => {
  await withRig(BASE, "auto", async ({ io, rx, dev }) => {
    rx.post([{ len: 2048, writable: true }]);
    io.kick("rx");
    await until(io, () => io.postedChains === 1, "a chain posted");
    // TUNSCAP keeps the tap from writing partial checksums to such a guest; one that comes is dropped.
    const b = buildFrame({ payload: randomBytes(prng(5), 700), checksum: "partial" });
    const partial = netHdr({ flags: 1, csumStart: b.l4Offset, csumOffset: 16 });
    assert.equal(io.receive(concat(partial, b.frame)), 0, "dropped, the chain kept");
    const good = buildFrame({ payload: randomBytes(prng(6), 700) });
    assert.equal(io.receive(concat(netHdr({ flags: 2 }), good.frame)), 1);
    await until(io, () => rx.usedIdx() === 1, "delivery");
    const [u] = rx.readUsed();
    const data = rx.readWritten(u.chain!, u.len);
    assert.equal(data[0], 0, "§5.1.6.3.1: flags 0 without GUEST_CSUM");
    assert.deepEqual(data.subarray(12), good.frame);
    assert.equal(dev.counters().rx0.drop_HEADER_NOT_TAKEN, 1);
  });
});

Deno.test("RX: any legal layout receives frames: the header over twelve one-byte buffers, more segments than an inline record takes, an indirect table of 300", async () => {
  const f = BASE | VIRTIO_NET_F_GUEST_CSUM;
  await withRig(f, "auto", async ({ io, rx, dev, faults }) => {
    const { frame } = buildFrame({ payload: new Uint8Array(30).fill(0x5c) });
    const need = 12 + frame.length;
    const ones = (n: number) => Array.from({ length: n }, () => ({ len: 1, writable: true }));
    // virtio 1.2 §2.7.4: the device must not assume a layout.
    const a = rx.post([...ones(12), { len: 2048, writable: true }]);
    const b = rx.post(ones(need + 8)); // one byte a descriptor: more than RX_MAX_IOV segments
    const c = rx.post(ones(300), { indirect: true }); // an indirect table of 300 one-byte buffers
    io.kick("rx");
    await until(io, () => io.postedChains === 3, "three chains posted");
    for (let i = 0; i < 3; i++) {
      assert.equal(io.receive(concat(netHdr({}), frame)), 1, `frame ${i}`);
    }
    await until(io, () => rx.usedIdx() === 3, "three frames used");
    const used = rx.readUsed();
    assert.deepEqual(used.map((u) => u.id), [a, b, c]);
    for (const u of used) {
      assert.equal(u.len, need);
      const data = rx.readWritten(u.chain!, u.len);
      assert.equal(get16le(data, 10), 1, "num_buffers written across one-byte buffers");
      assert.deepEqual(data.subarray(12), frame);
    }
    assert.deepEqual(faults, []);
    assert.equal(dev.counters().rx0.frames, 3);
  });
});

Deno.test("RX: a bad chain among good ones is completed empty, in order; used->idx only moves forward", async () => {
  await withRig(BASE, "auto", async ({ io, rx, dev, faults }) => {
    const good1 = rx.post([{ len: 2048, writable: true }]);
    const bad = rx.post([{ len: 2048, writable: false }]); // device-readable on RX: §2.7.4.2
    const short = rx.post([{ len: 8, writable: true }]); // shorter than the header: §5.1.6.3
    const good2 = rx.post([{ len: 2048, writable: true }]);
    io.kick("rx");
    // The chain in front of the discards was given back and posted again behind them.
    await until(io, () => rx.usedIdx() === 2, "the discards completed without any frame");
    await until(io, () => io.postedChains === 2, "the two good chains posted");
    const { frame } = buildFrame({ payload: new Uint8Array(100) });
    assert.equal(io.receive(concat(netHdr({}), frame)), 1);
    assert.equal(io.receive(concat(netHdr({}), frame)), 1);
    await until(io, () => rx.usedIdx() === 4, "four used");
    const used = rx.readUsed();
    const byId = new Map(used.map((u) => [u.id, u.len]));
    assert.equal(byId.get(bad), 0);
    assert.equal(byId.get(short), 0);
    assert.equal(byId.get(good1), 12 + frame.length);
    assert.equal(byId.get(good2), 12 + frame.length);
    assert.deepEqual(faults, []);
    assert.equal(dev.counters().rx0.drop_CHAIN_SHORTER_THAN_HEADER, 1);
    assert.equal(dev.counters().rx0.error_UNEXPECTED_READABLE, 1);
  });
});

Deno.test("RX: chains the poller gives back unfilled are posted again at the back; frames go on", async () => {
  await withRig(BASE, "auto", async ({ io, rx, faults }) => {
    const heads = [0, 1, 2].map(() => rx.post([{ len: 2048, writable: true }]));
    io.kick("rx");
    await until(io, () => io.postedChains === 3, "three chains posted");
    io.giveBack(2); // a batch whose first two reads found nothing, the third a frame
    const { frame } = buildFrame({ payload: new Uint8Array(100) });
    assert.equal(io.receive(concat(netHdr({}), frame)), 1);
    await until(io, () => io.postedChains === 2, "the two given back are posted again");
    const used = rx.readUsed();
    assert.deepEqual(used.map((u) => u.id), [heads[2]], "the frame used the third chain only");
    // The next two frames take the chains given back, oldest first.
    assert.equal(io.receive(concat(netHdr({}), frame)), 1);
    assert.equal(io.receive(concat(netHdr({}), frame)), 1);
    await until(io, () => rx.readUsed().length === 2, "two more used");
    assert.deepEqual(faults, []);
    // A give-back with bytes, or of more chains than are posted, is the poller's fault.
    io.pushDoneRaw(1, 5, RX_UNUSED);
    await until(io, () => faults.length > 0, "a queue fault");
    assert.match(faults[0], /^0: rx-done gives back 1 chains with 5 bytes/);
  });
});

Deno.test("RX: a give-back of chains whose post records the poller still holds is a queue fault, not a lost chain", async () => {
  await withRig(BASE, "auto", async ({ io, rx, faults }) => {
    // Four records fill this rx-post ring; the poller has read none of them.
    for (let i = 0; i < 6; i++) rx.post([{ len: 2048, writable: true }]);
    io.kick("rx");
    await until(io, () => io.postedChains === 4, "four chains posted, the ring full");
    io.pushDoneRaw(1, 0, RX_UNUSED); // gives one back without releasing its record
    await until(io, () => faults.length > 0, "a queue fault");
    assert.match(faults[0], /^0: rx-done returned chains whose records are still held/);
  }, 4);
});

Deno.test("RX: chains given back by a poller that then starved are posted again and the poller is woken", async () => {
  await withRig(BASE, "auto", async ({ io, rx, faults }) => {
    // 128 chains posted: plenty, so the device turns RX kicks off and only
    // the poller's signals move it (the bench's RX 64 B stalled here).
    for (let i = 0; i < 128; i++) rx.post([{ len: 2048, writable: true }]);
    io.kick("rx");
    await until(io, () => io.postedChains === 128, "128 chains posted");
    // A batch of reads found nothing: every chain comes back, and the poller,
    // with no room left, announces that it starved.
    const wakes = io.pollerWakes;
    Atomics.store(io.ctl, CTL.POLLER_STARVED, 1);
    io.giveBack(128);
    io.starve();
    await until(io, () => io.postedChains === 128, "the 128 posted again");
    await until(io, () => io.pollerWakes > wakes, "the starved poller woken");
    assert.deepEqual(faults, []);
  });
});

Deno.test("RX kicks: the device stops asking for them while it has plenty posted, and asks again when the poller runs low or starves", async () => {
  await withRig(BASE, "auto", async ({ io, rx, faults }) => {
    // Ring of 256: rxSignalChains(256) = 64, so 128 posted chains are plenty.
    const post = (n: number) => {
      for (let i = 0; i < n; i++) rx.post([{ len: 2048, writable: true }]);
    };
    post(150);
    io.kick("rx");
    await until(io, () => io.postedChains === 150, "150 chains posted");
    // Notifications off: adding buffers would not kick, and the device does not see them yet.
    const before = rx.availIdx;
    post(10);
    assert.equal(rx.kickNeeded(before, rx.availIdx), false, "plenty posted: no kick asked for");
    await new Promise((r) => setTimeout(r, 20));
    assert.equal(io.postedChains, 150, "no kick came, so nothing new was posted");
    // The poller says it ran out of room: the device posts what the guest added.
    io.starve();
    await until(io, () => io.postedChains === 160, "the 10 posted after a starvation signal");
    // Frames take chains; the poller wakes the device every rxSignalChains(256) = 64
    // published chains, and then fewer than 128 remain posted: kicks are asked for again.
    const { frame } = buildFrame({ payload: new Uint8Array(100) });
    for (let i = 0; i < 64; i++) assert.equal(io.receive(concat(netHdr({}), frame)), 1);
    let used = 0;
    await until(io, () => (used += rx.readUsed().length) === 64, "64 frames used");
    await until(io, () => rx.kickNeeded(rx.availIdx, rx.availIdx + 1), "kicks asked for again");
    assert.deepEqual(faults, []);
  });
});

Deno.test("a lost TX kick: chains offered with notifications on and never kicked are sent within a few grace periods, and counted", async () => {
  await withRig(BASE | TX_OFFLOADS, "auto", async ({ io, dev, tx, faults }) => {
    const { frame } = buildFrame({ payload: new Uint8Array(64).fill(1) });
    tx.post([{ data: netHdr({}) }, { data: frame }]);
    io.kick("tx");
    await until(io, () => tx.usedIdx() === 1, "the kicked frame used");
    // The device, just done, asked for a kick on the next chain. The guest
    // publishes one and, as if it had read a stale avail_event, does not kick.
    const before = tx.availIdx;
    tx.post([{ data: netHdr({}) }, { data: frame }]);
    assert.equal(tx.kickNeeded(before, tx.availIdx), true, "a kick was due");
    const t0 = performance.now();
    await until(io, () => tx.usedIdx() === 2 && io.sent.length === 2, "the unkicked frame used");
    const ms = performance.now() - t0;
    assert.equal(dev.txq.counters.kicksMissed, 1);
    assert.equal(dev.rxq.counters.kicksMissed, 0);
    // Not the idle wait (1 s): the device had just worked, so it looked again soon.
    assert.ok(ms < 500, `took ${ms.toFixed(0)} ms`);
    // A kick that merely comes late is not a lost one.
    tx.post([{ data: netHdr({}) }, { data: frame }]);
    await new Promise((r) => setTimeout(r, 1));
    io.kick("tx");
    await until(io, () => tx.usedIdx() === 3, "the late-kicked frame used");
    assert.equal(dev.txq.counters.kicksMissed, 1);
    assert.deepEqual(faults, []);
  });
});

Deno.test("RX publication: the device retires what the poller published, takes re-offered heads, and resumes used->idx from the poller's at stop", async () => {
  const guest = new TestGuest([{ gpa: 0x100000, size: 4 << 20 }]);
  const io = new FakeIo(guest);
  const faults: string[] = [];
  const dev = new NetDevice((q, reason) => faults.push(`${q}: ${reason}`));
  dev.grant(io.regionGrants());
  dev.setFeatures(BASE | VIRTIO_NET_F_MRG_RXBUF, "auto");
  // A 4-entry RX ring: every chain is re-offered while the device may not have retired it yet.
  const rx = new TestDriver(guest, { size: 4, features: BASE });
  const tx = new TestDriver(guest, { size: 64, features: BASE });
  io.publishTxTo(tx);
  io.attachRx(rx);
  const p = (d: TestDriver) => ({ ...d.config("user"), base: 0 });
  dev.start(p(rx), p(tx), io.buffers, 0x6000_0000_0000);
  const { frame } = buildFrame({ payload: new Uint8Array(100) });
  try {
    assert.equal(Atomics.load(io.ctl, CTL.RX_TAKES) & RXT_MERGEABLE, RXT_MERGEABLE);
    const offer = () => rx.post([{ len: 2048, writable: true }]);
    for (let i = 0; i < 4; i++) offer();
    io.kick("rx");
    await until(io, () => io.postedChains === 4, "four chains posted");
    let published = 0;
    for (let round = 0; round < 5; round++) {
      // The poller publishes all four; the driver takes them and offers the buffers again at once.
      for (let i = 0; i < 4; i++) assert.equal(io.receive(concat(netHdr({}), frame)), 1);
      published += 4;
      const used = rx.readUsed();
      assert.equal(used.length, 4, `round ${round}: four used elements`);
      assert.ok(used.every((u) => u.len === 12 + frame.length));
      for (let i = 0; i < 4; i++) offer();
      io.kick("rx");
      await until(io, () => io.postedChains === 4, `round ${round}: the re-offered chains posted`);
      assert.deepEqual(faults, [], `round ${round}`);
    }
    assert.equal(dev.counters().rx0.frames, published, "counted from the records");
    assert.equal(rx.usedIdx(), published, "the device never wrote RX used->idx itself");
  } finally {
    const bases = await dev.stop();
    // The four posted, unfilled chains are un-popped; used->idx stays the poller's.
    assert.equal(bases.rx, 20);
    assert.equal(rx.usedIdx(), 20);
    assert.equal(rx.readUsed().length, 0);
  }
  // A record that neither publishes nor gives back chains is the poller's fault.
  const io2 = new FakeIo(guest);
  io2.publishTxTo(tx);
  io2.attachRx(rx);
  dev.start({ ...rx.config("user"), base: 20 }, p(tx), io2.buffers, 0x6000_0000_0000);
  try {
    io2.kick("rx");
    await until(io2, () => io2.postedChains === 4, "posted again after the restart");
    io2.pushDoneRaw(1, 100, 0);
    await until(io2, () => faults.length > 0, "a queue fault");
    assert.match(faults[0], /rx-done status 0 with 1 chains/);
  } finally {
    await dev.stop();
  }
});

Deno.test("RX: a poller that claims more chains than were posted faults the queue, not the device", async () => {
  await withRig(BASE, "auto", async ({ io, rx, faults, dev }) => {
    rx.post([{ len: 2048, writable: true }]);
    io.kick("rx");
    await until(io, () => io.postedChains === 1, "a chain posted");
    io.pushDoneRaw(5, 100, RX_PUBLISHED);
    await until(io, () => faults.length > 0, "a queue fault");
    assert.match(faults[0], /^0: rx-done publishes 5 chains, 1 were posted/);
    assert.equal(rx.usedIdx(), 0, "nothing was written to the guest");
    assert.ok(dev.running);
  });
});

Deno.test("an RX queue faulted by a bad rx-done record takes no more chains from the guest and is reported once", async () => {
  // Seen while replaying net_device_fuzz_test.ts seed 41529250: the pass that found the
  // bad record went on to pop and post the guest's next chains, and reported the fault twice.
  await withRig(BASE, "auto", async ({ io, rx, dev, faults }) => {
    rx.post([{ len: 2048, writable: true }]);
    io.kick("rx");
    await until(io, () => io.postedChains === 1, "a chain posted");
    rx.post([{ len: 2048, writable: true }]); // offered; the device looks at it on its next pass
    io.pushDoneRaw(5, 100, RX_PUBLISHED); // more chains than were posted: the poller is broken
    await until(io, () => faults.length > 0, "a queue fault");
    for (let i = 0; i < 20; i++) {
      io.kick("rx");
      io.writerStep();
      await new Promise((r) => setTimeout(r, 1));
    }
    assert.deepEqual(faults, ["0: rx-done publishes 5 chains, 1 were posted"]);
    assert.equal(dev.rxq.lastAvailIdx, 1, "the second chain is still the guest's");
  });
});

/**
 * A device started on fresh rings (64 entries) with three 2 KiB RX chains
 * posted to its (fake) poller: the start of the stop tests.
 */
async function startedWithThreePosted() {
  const guest = new TestGuest([{ gpa: 0x100000, size: 4 << 20 }]);
  const io = new FakeIo(guest);
  const dev = new NetDevice(() => {});
  dev.grant(io.regionGrants());
  dev.setFeatures(BASE, "auto");
  const rx = new TestDriver(guest, { size: 64, features: BASE });
  const tx = new TestDriver(guest, { size: 64, features: BASE });
  io.publishTxTo(tx);
  io.attachRx(rx);
  const p = (d: TestDriver, base = 0) => ({ ...d.config("user"), base });
  dev.start(p(rx), p(tx), io.buffers, 0x6000_0000_0000);
  for (let i = 0; i < 3; i++) rx.post([{ len: 2048, writable: true }]);
  io.kick("rx");
  await until(io, () => io.postedChains === 3, "posted");
  return { guest, io, dev, rx, tx, p };
}

Deno.test("stop() reports last_avail_idx for GET_VRING_BASE; unfilled RX chains stay available", async () => {
  const { guest, io, dev, rx, tx, p } = await startedWithThreePosted();
  // One chain filled, two not: the filled one is used, the others are un-popped.
  const { frame } = buildFrame({ payload: new Uint8Array(100) });
  assert.equal(io.receive(concat(netHdr({}), frame)), 1);
  await until(io, () => rx.readUsed().length === 1, "the first chain used");
  const bases = await dev.stop();
  assert.deepEqual(bases, { rx: 1, tx: 0 }, "last_avail_idx moved back past the unfilled chains");
  assert.equal(rx.readUsed().length, 0, "no 0-byte completions for the unfilled chains");
  // Restarted from that base, the device takes the same two chains again.
  const io2 = new FakeIo(guest); // fresh data-path rings, as every start gets
  io2.publishTxTo(tx);
  io2.attachRx(rx);
  dev.start({ ...rx.config("user"), base: 1 }, p(tx), io2.buffers, 0x6000_0000_0000);
  io2.kick("rx");
  await until(io2, () => io2.postedChains === 2, "the two chains posted again");
  assert.deepEqual((await dev.stop()).rx, 1);
  assert.equal(rx.readUsed().length, 0);
  assert.throws(
    () => dev.revoke([{ guestPhysAddr: 1, size: 1, userAddr: 1 }]),
    /no granted region/,
  );
  const all = guest.regions.map((r) => ({ guestPhysAddr: r.gpa, size: r.size, userAddr: r.user }));
  assert.throws(() => dev.revoke([all[0], all[0]]), /named twice/);
  assert.equal(dev.revoke(all).length, 1);
});

Deno.test("an overlapped stop waits for both I/O workers' loops to end (CTL.IO_ENDED) and retires what the poller published meanwhile; if they do not end in time it throws, and a plain stop() finishes", async () => {
  const { guest, io, dev, rx, tx, p } = await startedWithThreePosted();
  const ctl = new Int32Array(io.buffers.control);
  const end = (bit: number) => {
    Atomics.or(ctl, CTL.IO_ENDED, bit);
    Atomics.notify(ctl, CTL.IO_ENDED);
  };
  const tick = () => new Promise((r) => setTimeout(r, 30));
  let settled = false;
  const stopping = dev.stop(5000).finally(() => settled = true);
  await tick();
  assert.equal(settled, false, "the device waits while both workers run");
  // The poller fills a chain after the device's loop stopped, then ends.
  const { frame } = buildFrame({ payload: new Uint8Array(100) });
  assert.equal(io.receive(concat(netHdr({}), frame)), 1);
  end(IO_ENDED_POLLER);
  await tick();
  assert.equal(settled, false, "the writer still runs");
  end(IO_ENDED_WRITER);
  assert.deepEqual(await stopping, { rx: 1, tx: 0 }, "the chain filled meanwhile counts");
  assert.equal(rx.readUsed().length, 1, "it is used; the two unfilled ones stay available");

  // Workers that do not end in time: the stop throws, the queues stay half
  // stopped (no start), and a plain stop once they are gone finishes.
  const io2 = new FakeIo(guest);
  io2.publishTxTo(tx);
  io2.attachRx(rx);
  dev.start(p(rx, 1), p(tx), io2.buffers, 0x6000_0000_0000);
  io2.kick("rx");
  await until(io2, () => io2.postedChains === 2, "the two chains posted again");
  new Int32Array(io2.buffers.control)[CTL.IO_ENDED] = IO_ENDED_POLLER;
  await assert.rejects(dev.stop(50), /I\/O workers did not end in 50 ms/);
  assert.throws(() => dev.start(p(rx, 1), p(tx), io2.buffers, 0x6000_0000_0000), /stopping/);
  assert.deepEqual(await dev.stop(), { rx: 1, tx: 0 });
  assert.equal(rx.readUsed().length, 0, "nothing completed for the unfilled chains");
});

/**
 * {@link startedWithThreePosted}, and a TX frame the device has taken and
 * the (fake) writer has not written yet.
 */
async function startedWithTxTaken() {
  const started = await startedWithThreePosted();
  const { io, tx } = started;
  const { frame } = buildFrame({ payload: new Uint8Array(100).fill(5) });
  tx.post([{ data: netHdr({}) }, { data: frame }]);
  io.kick("tx");
  const end = Date.now() + 3000;
  while (io.tx.available() === 0) {
    if (Date.now() > end) throw new Error("the device took no TX chain");
    await new Promise((r) => setTimeout(r, 1));
  }
  return { ...started, ctl: new Int32Array(io.buffers.control), frame };
}

Deno.test("a stop with quiesce: a TX frame the device took is written and completed first, then CTL.TX_CLOSED lets the writer end, and the answer waits for the I/O workers", async () => {
  const { io, dev, tx, ctl, frame } = await startedWithTxTaken();
  let settled = false;
  const stopping = dev.stop(5000, true).finally(() => settled = true);
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(Atomics.load(ctl, CTL.TX_CLOSED), 0, "not closed while a taken frame is unwritten");
  await until(io, () => Atomics.load(ctl, CTL.TX_CLOSED) === 1, "TX closed once written");
  assert.equal(io.sent.length, 1, "the frame in flight went out");
  assert.deepEqual(io.sent[0].frame, frame);
  assert.equal(settled, false, "the stop waits for the workers' loops");
  Atomics.store(ctl, CTL.IO_ENDED, IO_ENDED_POLLER | IO_ENDED_WRITER);
  Atomics.notify(ctl, CTL.IO_ENDED);
  assert.deepEqual(await stopping, { rx: 0, tx: 1 }, "the TX chain counts as taken");
  assert.equal(tx.usedIdx(), 1, "and is completed, as sent");
});

Deno.test("a stop asked in the control block (CTL.STOP_ASKED) is the loop's own: the taken TX frame goes out, TX closes, and once the I/O workers ended the bases are in CTL.STOP_BASES and CTL.STOPPED; the stop-queues request after it gets the same", async () => {
  const { io, dev, tx, ctl } = await startedWithTxTaken();
  // As the parent asks: the word, then its doorbell (the message comes later).
  Atomics.store(ctl, CTL.STOP_ASKED, 5000);
  signal(ctl, CTL.DEVICE_EVENTS, 0, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(Atomics.load(ctl, CTL.TX_CLOSED), 0, "not closed while a taken frame is unwritten");
  await until(io, () => Atomics.load(ctl, CTL.TX_CLOSED) === 1, "TX closed once written");
  assert.equal(io.sent.length, 1, "the frame in flight went out");
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(Atomics.load(ctl, CTL.STOPPED), 0, "not stopped while the workers' loops run");
  Atomics.store(ctl, CTL.IO_ENDED, IO_ENDED_POLLER | IO_ENDED_WRITER);
  Atomics.notify(ctl, CTL.IO_ENDED);
  await until(io, () => Atomics.load(ctl, CTL.STOPPED) === 1, "the stop published");
  assert.equal(Atomics.load(ctl, CTL.STOP_BASES), 0 | (1 << 16), "rx 0, tx 1");
  assert.equal(tx.usedIdx(), 1, "the TX chain is completed, as sent");
  assert.deepEqual(await dev.stop(5000, true), { rx: 0, tx: 1 }, "the request's answer");
});

function get16le(b: Uint8Array, at: number): number {
  return b[at] | (b[at + 1] << 8);
}

Deno.test("--offload off: a frame without offloads reaches the tap with an all-zero header, not the guest's leftover fields", async () => {
  // Found by net_device_fuzz_test.ts: csum_start/csum_offset/hdr_len/num_buffers went to the kernel.
  await withRig(BASE | TX_OFFLOADS, "off", async ({ io, tx }) => {
    const { frame } = buildFrame({ payload: new Uint8Array(64) });
    const hdr = netHdr({ hdrLen: 20, gsoSize: 999, csumStart: 14, csumOffset: 0xffff });
    hdr[10] = 0x34;
    tx.post([{ data: concat(hdr, frame) }]);
    io.kick("tx");
    await until(io, () => io.sent.length === 1 && tx.usedIdx() === 1, "the frame");
    assert.deepEqual(io.sent[0].hdr, new Uint8Array(12));
    assert.deepEqual(io.sent[0].frame, frame);
  });
});

Deno.test("RX drops tap headers no driver may take: flags beyond NEEDS_CSUM/DATA_VALID on a GSO frame, the ECN bit without a GSO type", async () => {
  // Found by net_device_fuzz_test.ts: both reached the guest (Linux answers -EINVAL to the second).
  const f = BASE | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4;
  await withRig(f, "auto", async ({ io, rx, dev }) => {
    for (let i = 0; i < 3; i++) rx.post([{ len: 4096, writable: true }]);
    io.kick("rx");
    await until(io, () => io.postedChains === 3, "three chains posted");
    const gso = buildFrame({ payload: new Uint8Array(2000), checksum: "partial" });
    const gsoHdr = {
      gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
      hdrLen: gso.payloadOffset,
      gsoSize: 1448,
      csumStart: gso.l4Offset,
      csumOffset: 16,
    };
    const rsc = concat(netHdr({ ...gsoHdr, flags: VIRTIO_NET_HDR_F_NEEDS_CSUM | 4 }), gso.frame);
    assert.equal(io.receive(rsc), 0);
    const plain = buildFrame({ payload: new Uint8Array(100) });
    assert.equal(io.receive(concat(netHdr({ gsoType: 0x80 }), plain.frame)), 0);
    const ok = concat(netHdr({ ...gsoHdr, flags: VIRTIO_NET_HDR_F_NEEDS_CSUM }), gso.frame);
    assert.equal(io.receive(ok), 1);
    await until(io, () => rx.usedIdx() === 1, "the valid GSO frame");
    const used = rx.readUsed();
    assert.equal(used.length, 1);
    assert.equal(used[0].len, 12 + gso.frame.length);
    const h = rx.readWritten(used[0].chain!, 12);
    assert.equal(h[0], VIRTIO_NET_HDR_F_NEEDS_CSUM);
    assert.equal(h[1], VIRTIO_NET_HDR_GSO_TCPV4);
    assert.equal(dev.counters().rx0.drop_HEADER_NOT_TAKEN, 2);
  });
});

Deno.test("after an RX I/O fault the device writes nothing more into the RX used ring: nothing is completed twice", async () => {
  // Found by net_device_fuzz_test.ts: stop() delivered a frame into the wrong chain with the wrong length.
  const guest = new TestGuest([{ gpa: 0x100000, size: 4 << 20 }]);
  const io = new FakeIo(guest);
  const faults: string[] = [];
  const dev = new NetDevice((q, reason) => faults.push(`${q}: ${reason}`));
  dev.grant(io.regionGrants());
  dev.setFeatures(BASE, "auto");
  const rx = new TestDriver(guest, { size: 64, features: BASE });
  const tx = new TestDriver(guest, { size: 64, features: BASE });
  io.publishTxTo(tx);
  io.attachRx(rx);
  const p = (d: TestDriver) => ({ ...d.config("user"), base: 0 });
  dev.start(p(rx), p(tx), io.buffers, 0x6000_0000_0000);
  for (let i = 0; i < 2; i++) rx.post([{ len: 2048, writable: true }]);
  io.kick("rx");
  await until(io, () => io.postedChains === 2, "posted");
  const { frame } = buildFrame({ payload: new Uint8Array(300) });
  assert.equal(io.receive(concat(netHdr({}), frame)), 1, "before the fault: delivered");
  await until(io, () => rx.usedIdx() === 1, "one used");
  io.pushDoneRaw(1, 100, 7); // a status no poller sends with a chain: it broke the protocol
  await until(io, () => faults.length > 0, "an RX fault");
  // The queue needs a reset: the poller stops too (CTL.RX_STOPPED).
  assert.equal(io.receive(concat(netHdr({}), frame)), 0, "after the fault: nothing read");
  await dev.stop();
  const used = rx.readUsed();
  assert.deepEqual(used.map((u) => u.len), [12 + frame.length], "the one publication");
  assert.equal(rx.usedIdx(), 1, "and nothing from the device or the poller after the fault");
});

const GUEST_MAC = [0x52, 0x54, 0, 0x12, 0x34, 0x56];

Deno.test("TX with --mac: frames from that source pass; any other source, a group or all-zero one, is dropped as SPOOFED_MAC", async (t) => {
  for (const mode of ["auto", "off"] as const) {
    await t.step(
      `--offload ${mode}`,
      () =>
        withRig(BASE | TX_OFFLOADS, mode, async ({ io, tx, dev }) => {
          dev.configure({ mac: GUEST_MAC, mtu: 1500 });
          assert.equal(dev.counters().tx0.drop_SPOOFED_MAC, 0, "the counter shows the check is on");
          const rand = prng(5);
          const good = buildFrame({ srcMac: GUEST_MAC, payload: new Uint8Array(64).fill(1) });
          const tso = buildFrame({
            srcMac: GUEST_MAC,
            payload: randomBytes(rand, 5000),
            checksum: "partial",
          });
          const gsoHdr = netHdr({
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
            gsoSize: 1448,
            hdrLen: tso.payloadOffset,
            csumStart: tso.l4Offset,
            csumOffset: 16,
          });
          const spoofed = [
            [0x52, 0x54, 0, 0x12, 0x34, 0x57], // one bit off
            [0x02, 0, 0, 0, 0, 0x0a],
            [0xff, 0xff, 0xff, 0xff, 0xff, 0xff], // broadcast
            [0x53, 0x54, 0, 0x12, 0x34, 0x56], // the guest's MAC with the group bit
            [0, 0, 0, 0, 0, 0],
          ];
          tx.post([{ data: netHdr({}) }, { data: good.frame }]);
          for (const srcMac of spoofed) {
            tx.post([{ data: netHdr({}) }, { data: buildFrame({ srcMac }).frame }]);
          }
          // A TSO frame (segmented in software or in place with --offload off) from a spoofed source.
          const bad = buildFrame({ srcMac: spoofed[1], payload: randomBytes(rand, 5000) });
          tx.post([{ data: gsoHdr }, { data: bad.frame }]);
          tx.post([{ data: concat(gsoHdr, tso.frame) }]);
          io.kick("tx");
          const segments = mode === "off" ? Math.ceil(5000 / 1448) : 1;
          await until(
            io,
            () => tx.usedIdx() === 2 + spoofed.length + 1 && io.sent.length === 1 + segments,
            "every chain used, the good frames sent",
          );
          for (const s of io.sent) assert.deepEqual([...s.frame.subarray(6, 12)], GUEST_MAC);
          assert.deepEqual(io.sent[0].frame, good.frame);
          const c = dev.counters().tx0;
          assert.equal(c.drop_SPOOFED_MAC, spoofed.length + 1, JSON.stringify(c));
          assert.equal(c.frames, 1 + segments);
        }),
    );
  }
});

Deno.test("TX with --mac: a guest that rewrites its source after the check still gets only the checked one out", async (t) => {
  for (const mode of ["auto", "off"] as const) {
    await t.step(
      `--offload ${mode}`,
      () =>
        withRig(BASE | TX_OFFLOADS, mode, async ({ io, tx, dev, guest }) => {
          dev.configure({ mac: GUEST_MAC, mtu: 1500 });
          const rand = prng(8);
          const plain = buildFrame({ srcMac: GUEST_MAC, payload: new Uint8Array(200).fill(3) });
          const tso = buildFrame({
            srcMac: GUEST_MAC,
            payload: randomBytes(rand, 4000),
            checksum: "partial",
          });
          const heads = [
            tx.post([{ data: netHdr({}) }, { data: plain.frame }]),
            tx.post([
              {
                data: netHdr({
                  flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                  gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
                  gsoSize: 1448,
                  hdrLen: tso.payloadOffset,
                  csumStart: tso.l4Offset,
                  csumOffset: 16,
                }),
              },
              { data: tso.frame },
            ]),
          ];
          io.kick("tx");
          // The device makes its records; the writer has not run yet.
          const end = Date.now() + 3000;
          while (io.tx.available() < (mode === "off" ? 4 : 2)) {
            if (Date.now() > end) throw new Error("the device made no records");
            await new Promise((r) => setTimeout(r, 1));
          }
          // Now the guest rewrites both frames' source in its memory.
          for (const h of heads) {
            guest.write(tx.posted.get(h)!.buffers[1].gpa + 6, new Uint8Array(6));
          }
          await until(io, () => tx.usedIdx() === 2, "both chains used");
          assert.ok(io.sent.length >= 2);
          for (const s of io.sent) {
            assert.deepEqual(
              [...s.frame.subarray(6, 12)],
              GUEST_MAC,
              "the checked source went out",
            );
          }
        }),
    );
  }
});

Deno.test("TX: a frame without GSO longer than the MTU allows is dropped as OVER_MTU; a GSO frame is not", async () => {
  await withRig(BASE | TX_OFFLOADS, "auto", async ({ io, tx, dev }) => {
    dev.configure({ mac: null, mtu: 1000 });
    // 1000 + 14 + 8 (two VLAN tags) = 1022 bytes pass; 1023 do not.
    const fits = buildFrame({ payload: new Uint8Array(1022 - 54) });
    const over = buildFrame({ payload: new Uint8Array(1023 - 54) });
    assert.equal(fits.frame.length, 1022);
    assert.equal(over.frame.length, 1023);
    const tso = buildFrame({ payload: new Uint8Array(3000), checksum: "partial" });
    tx.post([{ data: netHdr({}) }, { data: fits.frame }]);
    tx.post([{ data: netHdr({}) }, { data: over.frame }]);
    tx.post([{
      data: concat(
        netHdr({
          flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
          gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
          gsoSize: 900,
          hdrLen: tso.payloadOffset,
          csumStart: tso.l4Offset,
          csumOffset: 16,
        }),
        tso.frame,
      ),
    }]);
    io.kick("tx");
    await until(io, () => tx.usedIdx() === 3 && io.sent.length === 2, "two sent, one dropped");
    assert.equal(io.sent[0].frame.length, 1022);
    assert.equal(io.sent[1].frame.length, tso.frame.length);
    const c = dev.counters().tx0;
    assert.equal(c.drop_OVER_MTU, 1);
    assert.equal(c.drop_SPOOFED_MAC, undefined, "no MAC check without --mac");
  });
});
