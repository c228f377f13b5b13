/**
 * The capture ring (parent/io/capture_ring.ts) and writer
 * (parent/io/capture_writer.ts): frames copied through scattered iovecs come
 * out whole and in order; a full ring drops and counts instead of waiting;
 * wrap-around keeps records contiguous; a malformed record is refused and
 * counted; the file never grows past its maximum (the capture stops, and
 * later frames count as dropped over max); a failed write ends the capture.
 */

import assert from "node:assert/strict";
import {
  CAPTURE_FAILED,
  CAPTURE_FULL,
  CAPTURE_OFF,
  CAPTURE_ON,
  CAPTURE_RING_HEADER_BYTES,
  CAPTURE_STATE,
  CAPTURE_STATE_BYTES,
  CAPTURE_STATS,
  CaptureConsumer,
  CaptureProducer,
  createCaptureRing,
  RECORD_HEAD_BYTES,
  ringCounters,
} from "../../../parent/io/capture_ring.ts";
import {
  type CaptureInit,
  CaptureWriter,
  parseCaptureRequest,
} from "../../../parent/io/capture_writer.ts";
import { DIR_RX, DIR_TX, EPB_INBOUND, EPB_OUTBOUND } from "../../../parent/io/pcapng.ts";
import type { HostMemory } from "../../../parent/io/regions.ts";
import { readPcapng, vnetFields } from "./pcapng_reader.ts";
import { udpFrame, vnetHdr } from "./capture_frames.ts";

/** Guest memory stand-in: one range at a fake host address. */
class FakeMemory implements HostMemory {
  constructor(readonly base: number, readonly mem: Uint8Array) {}
  find(addr: number, len: number): number {
    return len > 0 && addr >= this.base && addr + len <= this.base + this.mem.length ? 0 : -1;
  }
  contains(addr: number, len: number): boolean {
    return this.find(addr, len) === 0;
  }
  start(): number {
    return this.base;
  }
  guestAddress(): number {
    return -1;
  }
  bytes(): Uint8Array {
    return this.mem;
  }
  window(): { buffer: ArrayBufferLike; byteOffset: number } {
    throw new Error("not used");
  }
}

const BASE = 0x7f00_0000_1000;

/** Iovec words for pieces [offset, len] of the fake memory. */
function iovecs(pieces: Array<[number, number]>): Uint32Array {
  const w = new Uint32Array(pieces.length * 4);
  pieces.forEach(([off, len], i) => {
    const a = BASE + off;
    w[i * 4] = a % 0x1_0000_0000;
    w[i * 4 + 1] = Math.floor(a / 0x1_0000_0000);
    w[i * 4 + 2] = len;
  });
  return w;
}

function setup(ringBytes = 128 * 1024) {
  const ring = createCaptureRing(ringBytes);
  const state = new SharedArrayBuffer(CAPTURE_STATE_BYTES);
  Atomics.store(new Int32Array(state), CAPTURE_STATE.STATE, CAPTURE_ON);
  return {
    ring,
    state,
    producer: new CaptureProducer(ring, state),
    consumer: new CaptureConsumer(ring),
  };
}

/** Drains everything: [dir, header bytes, frame bytes, frameLen]. */
function drainAll(
  c: CaptureConsumer,
): Array<{ dir: number; hdr: number[]; frame: Uint8Array; len: number; t: number }> {
  const out: Array<{ dir: number; hdr: number[]; frame: Uint8Array; len: number; t: number }> = [];
  c.drain((r) => {
    out.push({
      dir: r.dir,
      hdr: [...r.bytes.subarray(r.hdrAt, r.hdrAt + 12)],
      frame: r.frame.slice(),
      len: r.frameLen,
      t: r.timeUs,
    });
    return true;
  });
  return out;
}

Deno.test("capture ring: TX frames through scattered iovecs and RX frames (header first) come out whole, in order", () => {
  const { producer, consumer } = setup();
  const mem = new Uint8Array(8192);
  const frame = udpFrame(1000, 0x44);
  // The frame in three pieces at scattered places.
  mem.set(frame.subarray(0, 14), 100);
  mem.set(frame.subarray(14, 514), 3000);
  mem.set(frame.subarray(514), 6000);
  const memory = new FakeMemory(BASE, mem);
  const hdr = new Uint8Array(20);
  hdr.set(vnetHdr({ flags: 1, gsoType: 1, gsoSize: 1448, hdrLen: 54 }), 4);
  const before = Date.now() * 1000;
  producer.stamp(); // once per batch, as the drainer does
  producer.tx(hdr, 4, iovecs([[100, 14], [3000, 500], [6000, 486]]), 0, 3, 1000, memory);
  // RX: header + frame as the tap wrote them into two buffers.
  const rxHdr = vnetHdr({ numBuffers: 2 });
  const rxFrame = udpFrame(300, 0x66);
  mem.set(rxHdr, 7000);
  mem.set(rxFrame.subarray(0, 100), 7012);
  mem.set(rxFrame.subarray(100), 7500);
  const iov = iovecs([[7000, 112], [7500, 400]]); // the second buffer is longer than the frame
  producer.rx(iov, 0, iov.length, 312, memory);
  const got = drainAll(consumer);
  assert.equal(got.length, 2);
  assert.equal(got[0].dir, DIR_TX);
  assert.deepEqual(got[0].hdr, [...hdr.subarray(4, 16)]);
  assert.deepEqual(got[0].frame, frame);
  assert.equal(got[0].len, 1000);
  assert.ok(
    got[0].t >= before - 1000 && got[0].t <= Date.now() * 1000 + 1000,
    `timestamp ${got[0].t}`,
  );
  assert.equal(got[1].dir, DIR_RX);
  assert.deepEqual(got[1].hdr, [...rxHdr]);
  assert.deepEqual(got[1].frame, rxFrame);
  assert.equal(ringCounters(consumer.ring).queued, 2);
  assert.equal(ringCounters(consumer.ring).queuedBytes, 1300);
  assert.equal(consumer.pending(), 0);
});

Deno.test("capture ring: when full it drops and counts, never overwrites; space freed is used again across the wrap", () => {
  const { producer, consumer, ring } = setup(128 * 1024);
  const mem = new Uint8Array(70_000);
  for (let i = 0; i < mem.length; i++) mem[i] = i * 7;
  const memory = new FakeMemory(BASE, mem);
  const hdr = new Uint8Array(12);
  const len = 50_000; // two fit in 128 KiB, a third does not
  const send = (start: number) => producer.tx(hdr, 0, iovecs([[start, len]]), 0, 1, len, memory);
  send(0);
  send(1);
  send(2);
  assert.equal(ringCounters(ring).droppedBehind, 1);
  assert.equal(ringCounters(ring).queued, 2);
  let got = drainAll(consumer);
  assert.deepEqual(got.map((g) => g.frame[0]), [mem[0], mem[1]]);
  // Head is now at 100 000 of 131 072: the next record wraps to the start.
  send(3);
  send(4);
  got = drainAll(consumer);
  assert.equal(got.length, 2);
  assert.deepEqual(got[0].frame, mem.slice(3, 3 + len));
  assert.deepEqual(got[1].frame, mem.slice(4, 4 + len));
  for (let i = 0; i < 20; i++) {
    send(i);
    assert.equal(drainAll(consumer).length, 1);
  }
  assert.equal(ringCounters(ring).droppedBehind, 1);
});

Deno.test("capture ring: a malformed record is refused and counted, and the ring goes on after it", () => {
  const { producer, consumer, ring } = setup();
  const memory = new FakeMemory(BASE, new Uint8Array(2000));
  const hdr = new Uint8Array(12);
  producer.tx(hdr, 0, iovecs([[0, 100]]), 0, 1, 100, memory);
  // A hostile or stale writer: a record whose captured length exceeds its frame length.
  const u32 = new Uint32Array(ring, CAPTURE_RING_HEADER_BYTES);
  u32[2] = 5000;
  assert.equal(drainAll(consumer).length, 0);
  assert.equal(ringCounters(ring).corrupt, 1);
  producer.tx(hdr, 0, iovecs([[0, 60]]), 0, 1, 60, memory);
  const got = drainAll(consumer);
  assert.equal(got.length, 1);
  assert.equal(got[0].len, 60);
});

Deno.test("capture ring: a record names its length, so RECORD_HEAD_BYTES + frame, 8-aligned", () => {
  const { producer, ring } = setup();
  producer.tx(
    new Uint8Array(12),
    0,
    iovecs([[0, 61]]),
    0,
    1,
    61,
    new FakeMemory(BASE, new Uint8Array(100)),
  );
  const u32 = new Uint32Array(ring, CAPTURE_RING_HEADER_BYTES);
  assert.equal(u32[0], (RECORD_HEAD_BYTES + 61 + 7) & ~7);
});

/** A writer over rings, its "file" an array of writes. */
function writerWith(maxBytes: number, rings: number, fail = false) {
  const state = new SharedArrayBuffer(CAPTURE_STATE_BYTES);
  const word = new Int32Array(state);
  Atomics.store(word, CAPTURE_STATE.STATE, CAPTURE_ON);
  const ringBufs = Array.from({ length: rings }, () => createCaptureRing(128 * 1024));
  const init: CaptureInit = parseCaptureRequest({
    kind: "init",
    fd: 99,
    state,
    rings: ringBufs.map((ring, i) => ({ pair: i, ring })),
    interfaces: ringBufs.map((_, i) => ({ name: `t/pair${i}`, description: `pair ${i}` })),
    maxBytes,
  }) as CaptureInit;
  const chunks: Uint8Array[] = [];
  const notices: string[] = [];
  let failing = false;
  const writer = new CaptureWriter(init, (b) => {
    if (failing) throw new Error("ENOSPC: No space left on device");
    chunks.push(b.slice());
  }, (_level, m) => notices.push(m));
  failing = fail;
  const file = () => {
    const total = chunks.reduce((n, c) => n + c.length, 0);
    const out = new Uint8Array(total);
    let at = 0;
    for (const c of chunks) {
      out.set(c, at);
      at += c.length;
    }
    return out;
  };
  const producers = ringBufs.map((r) => new CaptureProducer(r, state));
  const stats = new Float64Array(state);
  return { writer, file, producers, word, stats, notices, rings: ringBufs };
}

Deno.test("capture writer: records become packets with direction, interface and the vnet_hdr comment", () => {
  const w = writerWith(1 << 20, 2);
  const mem = new Uint8Array(4000);
  const memory = new FakeMemory(BASE, mem);
  const f1 = udpFrame(200, 1);
  mem.set(f1, 0);
  const tso = vnetHdr({
    flags: 1,
    gsoType: 1,
    hdrLen: 66,
    gsoSize: 1448,
    csumStart: 34,
    csumOffset: 16,
  });
  w.producers[0].tx(tso, 0, iovecs([[0, 200]]), 0, 1, 200, memory);
  const f2 = udpFrame(100, 2);
  mem.set(vnetHdr({ numBuffers: 1 }), 1000);
  mem.set(f2, 1012);
  w.producers[1].rx(iovecs([[1000, 112]]), 0, 4, 112, memory);
  assert.equal(w.writer.drain(), 2);
  const file = readPcapng(w.file());
  assert.equal(file.interfaces.length, 2);
  assert.equal(file.packets.length, 2);
  const [tx, rx] = file.packets;
  assert.equal(tx.interfaceId, 0);
  assert.equal(tx.flags, EPB_OUTBOUND);
  assert.deepEqual(tx.data, f1);
  assert.deepEqual(vnetFields(tx.comments[0]), {
    flags: "NEEDS_CSUM",
    gso_type: "TCPV4",
    hdr_len: "66",
    gso_size: "1448",
    csum_start: "34",
    csum_offset: "16",
  });
  assert.equal(rx.interfaceId, 1);
  assert.equal(rx.flags, EPB_INBOUND);
  assert.deepEqual(rx.data, f2);
  assert.equal(vnetFields(rx.comments[0]).num_buffers, "1");
  assert.equal(w.stats[CAPTURE_STATS.PACKETS], 2);
  assert.equal(w.stats[CAPTURE_STATS.TX_PACKETS], 1);
  assert.equal(w.stats[CAPTURE_STATS.RX_PACKETS], 1);
  assert.equal(w.stats[CAPTURE_STATS.BYTES], 300);
  assert.equal(w.stats[CAPTURE_STATS.FILE_BYTES], w.file().length);
});

Deno.test("capture writer: the file never passes its maximum; capture stops (FULL) and later frames count as over max", () => {
  const max = 64 * 1024;
  const w = writerWith(max, 1);
  const mem = new Uint8Array(2000);
  mem.set(udpFrame(1500), 0);
  const memory = new FakeMemory(BASE, mem);
  const hdr = new Uint8Array(12);
  let sent = 0;
  // More than fits: ~1.6 KB per block.
  for (let round = 0; round < 10; round++) {
    for (let i = 0; i < 10; i++) {
      if (w.producers[0].state() === CAPTURE_ON) {
        w.producers[0].tx(hdr, 0, iovecs([[0, 1500]]), 0, 1, 1500, memory);
      } else {
        w.producers[0].overMax(); // what the drainer does while FULL
      }
      sent++;
    }
    w.writer.drain();
  }
  const bytes = w.file();
  assert.ok(bytes.length <= max, `${bytes.length} > ${max}`);
  assert.ok(bytes.length > max - 2000, `only ${bytes.length} bytes written`);
  const file = readPcapng(bytes); // ends with a whole block
  assert.equal(Atomics.load(w.word, CAPTURE_STATE.STATE), CAPTURE_FULL);
  assert.ok(w.stats[CAPTURE_STATS.OVER_MAX] + producerOverMax(w) >= 1);
  assert.equal(w.notices.length, 1, w.notices.join("\n"));
  assert.match(w.notices[0], /--pcap-max/);
  assert.equal(file.packets.length + w.stats[CAPTURE_STATS.OVER_MAX] + producerOverMax(w), sent);
});

/** What the producers counted as over max (frames never copied). */
function producerOverMax(w: ReturnType<typeof writerWith>): number {
  return w.rings.reduce((n, r) => n + ringCounters(r).droppedOverMax, 0);
}

Deno.test("capture writer: a failed write ends the capture (FAILED), counted and said once", () => {
  const w = writerWith(1 << 20, 1, true);
  const memory = new FakeMemory(BASE, udpFrame(100));
  w.producers[0].tx(new Uint8Array(12), 0, iovecs([[0, 100]]), 0, 1, 100, memory);
  w.writer.drain();
  assert.equal(Atomics.load(w.word, CAPTURE_STATE.STATE), CAPTURE_FAILED);
  assert.equal(w.stats[CAPTURE_STATS.WRITE_ERRORS], 1);
  assert.equal(w.notices.length, 1);
  assert.match(w.notices[0], /ENOSPC/);
});

Deno.test("capture writer: a maximum below the file's header is refused", () => {
  assert.throws(() => writerWith(40, 1), /more than --pcap-max/);
});

Deno.test("capture state: OFF is what a producer reads when nobody turned it on", () => {
  const ring = createCaptureRing();
  const state = new SharedArrayBuffer(CAPTURE_STATE_BYTES);
  assert.equal(new CaptureProducer(ring, state).state(), CAPTURE_OFF);
});

Deno.test("capture ring: with a snap length a record holds the first bytes and keeps the frame's length", () => {
  const ring = createCaptureRing();
  const state = new SharedArrayBuffer(CAPTURE_STATE_BYTES);
  const word = new Int32Array(state);
  Atomics.store(word, CAPTURE_STATE.SNAPLEN, 100);
  Atomics.store(word, CAPTURE_STATE.STATE, CAPTURE_ON);
  const producer = new CaptureProducer(ring, state);
  const consumer = new CaptureConsumer(ring);
  const frame = udpFrame(1500, 9);
  const memory = new FakeMemory(BASE, frame);
  producer.tx(new Uint8Array(12), 0, iovecs([[0, 1500]]), 0, 1, 1500, memory);
  const rx = new Uint8Array(12 + 60);
  rx.set(udpFrame(60), 12);
  const m2 = new FakeMemory(BASE, rx);
  producer.rx(iovecs([[0, 72]]), 0, 4, 72, m2); // shorter than the snap length: whole
  const got = drainAll(consumer);
  assert.equal(got[0].len, 1500);
  assert.deepEqual(got[0].frame, frame.subarray(0, 100));
  assert.equal(got[1].len, 60);
  assert.deepEqual(got[1].frame, rx.subarray(12));
  assert.equal(ringCounters(ring).queuedBytes, 1560, "frame lengths, not captured bytes");
});

Deno.test("capture writer: each frame's comment is its own header's, when headers repeat and change", () => {
  const w = writerWith(1 << 20, 1);
  const frame = udpFrame(80);
  const memory = new FakeMemory(BASE, frame);
  const rxBuf = new Uint8Array(12 + 80);
  rxBuf.set(frame, 12);
  const rxMem = new FakeMemory(BASE, rxBuf);
  const a = vnetHdr({ flags: 1, csumStart: 34, csumOffset: 6 });
  const b = vnetHdr({ flags: 1, csumStart: 34, csumOffset: 16 });
  const sent: string[] = [];
  for (
    const [h, dir] of [[a, "tx"], [a, "tx"], [b, "tx"], [a, "rx"], [a, "rx"], [a, "tx"]] as const
  ) {
    if (dir === "tx") {
      w.producers[0].tx(h, 0, iovecs([[0, 80]]), 0, 1, 80, memory);
    } else {
      rxBuf.set(h, 0);
      w.producers[0].rx(iovecs([[0, 92]]), 0, 4, 92, rxMem);
    }
    sent.push(`${dir}:${h[8]}`);
  }
  w.writer.drain();
  const got = readPcapng(w.file()).packets.map((p) => {
    const f = vnetFields(p.comments[0]);
    return `${"num_buffers" in f ? "rx" : "tx"}:${f.csum_offset}`;
  });
  assert.deepEqual(got, sent);
});

Deno.test("capture writer: the init's snap length reaches every interface; a bad one is refused", () => {
  const state = new SharedArrayBuffer(CAPTURE_STATE_BYTES);
  const ring = createCaptureRing();
  const base = {
    kind: "init",
    fd: 9,
    state,
    rings: [{ pair: 0, ring }],
    interfaces: [{ name: "a/pair0", description: "x" }, { name: "a/pair1", description: "y" }],
    maxBytes: 1 << 20,
  };
  const chunks: Uint8Array[] = [];
  new CaptureWriter(
    parseCaptureRequest({ ...base, snapLen: 128 }) as CaptureInit,
    (b) => chunks.push(b.slice()),
    () => {},
  );
  assert.deepEqual(readPcapng(chunks[0]).interfaces.map((i) => i.snapLen), [128, 128]);
  assert.throws(() => parseCaptureRequest({ ...base, snapLen: -1 }), /snapLen/);
  assert.equal((parseCaptureRequest(base) as CaptureInit).snapLen, 0);
});
