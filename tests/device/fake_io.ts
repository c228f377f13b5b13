/**
 * Test helper: the parent's I/O side of the data path, played in TypeScript
 * without system calls. "Host addresses" are fake: guest memory is placed at
 * FAKE_HOST + GPA, the bounce arena at FAKE_BOUNCE, and the fake translates
 * iovecs back to bytes, checking each lies inside one of them (as the real
 * writer and poller must).
 */

import { tryPush } from "../ipc/spsc_ring_helpers.ts";
import {
  BOUNCE_BYTES,
  CTL,
  CTL_BYTES,
  type DatapathBuffers,
  EV_KICK_RX,
  EV_KICK_TX,
  EV_RX_DONE,
  EV_RX_STARVED,
  EV_TX_DONE,
  IOVEC_WORDS,
  NET_HDR_BYTES,
  RX_DONE,
  RX_DONE_RECORD_WORDS,
  RX_DONE_RING_RECORDS,
  RX_LONG_RECORD_WORDS,
  RX_LONG_RING_RECORDS,
  RX_POST,
  RX_POST_RECORD_WORDS,
  RX_POST_RING_RECORDS,
  RX_PUBLISHED,
  RX_UNUSED,
  RXF_DISCARD,
  signal,
  TX_REC,
  TX_RECORD_WORDS,
  TX_RING_RECORDS,
  TXF_COMPLETE_ONLY,
  WEV_WAKE_POLLER,
} from "../../ipc/datapath.ts";
import type { DatapathGrant } from "../../ipc/protocol.ts";
import { SPSC_RING_WORD, SpscRing } from "../../ipc/spsc_ring.ts";
import type { TestDriver, TestGuest } from "./driver.ts";
import type { HostMemory } from "../../parent/io/regions.ts";
import { RX_FRAME_ROOM_MAX } from "../../parent/io/protocol.ts";
import { RxPublisher } from "../../parent/io/rx_publisher.ts";
import {
  BATCH_SLOT_WORDS,
  RX_BATCH,
  type RxBatchReader,
  type RxReadEngine,
  RxReceiver,
} from "../../parent/io/rx_receiver.ts";
import { usedNotifyWanted } from "../../ipc/vring_notify.ts";
import { VIRTIO_RING_F_EVENT_IDX } from "../../ipc/features.ts";

export const FAKE_HOST = 0x5000_0000_0000;
export const FAKE_BOUNCE = 0x6000_0000_0000;
/** Where the fake poller's overflow buffer is. */
export const FAKE_OVERFLOW = 0x7000_0000_0000;

/** {@link HostMemory} over fake host addresses: guest memory at FAKE_HOST + GPA, the bounce arena, the overflow. */
export class FakeHostMemory implements HostMemory {
  readonly #starts: number[] = [];
  readonly #bytes: Uint8Array[] = [];
  readonly overflow = new Uint8Array(RX_FRAME_ROOM_MAX);

  constructor(guest: TestGuest, bounce: Uint8Array) {
    const ranges: Array<[number, Uint8Array]> = [
      ...guest.regions.map((r): [number, Uint8Array] => [FAKE_HOST + r.gpa, r.bytes]),
      [FAKE_BOUNCE, bounce],
      [FAKE_OVERFLOW, this.overflow],
    ];
    ranges.sort((x, y) => x[0] - y[0]);
    for (const [start, bytes] of ranges) {
      this.#starts.push(start);
      this.#bytes.push(bytes);
    }
  }

  find(base: number, len: number): number {
    if (!(len > 0)) return -1;
    for (let i = 0; i < this.#starts.length; i++) {
      const s = this.#starts[i];
      if (base >= s && base + len <= s + this.#bytes[i].length) return i;
    }
    return -1;
  }
  contains(base: number, len: number): boolean {
    // The overflow buffer is the poller's own, never guest memory.
    const i = this.find(base, len);
    return i >= 0 && this.#bytes[i] !== this.overflow;
  }
  start(i: number): number {
    return this.#starts[i];
  }
  guestAddress(i: number): number {
    const s = this.#starts[i];
    return s < FAKE_BOUNCE ? s - FAKE_HOST : -1;
  }
  bytes(i: number): Uint8Array {
    return this.#bytes[i];
  }
  window(addr: number, len: number): { buffer: ArrayBufferLike; byteOffset: number } {
    const i = this.find(addr, len);
    if (i < 0) throw new RangeError(`0x${addr.toString(16)} is not in guest memory`);
    const b = this.#bytes[i];
    return { buffer: b.buffer, byteOffset: b.byteOffset + addr - this.#starts[i] };
  }
}

/** A tap for the fake poller: frames queued by the test, read by `readv` as the kernel would. */
export class FakeTap implements RxReadEngine {
  readonly frames: Uint8Array[] = [];
  batch: RxBatchReader | null = null;
  readonly overflowLo = FAKE_OVERFLOW % 0x1_0000_0000;
  readonly overflowHi = Math.floor(FAKE_OVERFLOW / 0x1_0000_0000);
  readonly overflowLen = RX_FRAME_ROOM_MAX;

  constructor(readonly memory: FakeHostMemory) {}

  /** Scatters the next frame over `count` iovecs; -EAGAIN (-11) when none waits. */
  readv(iov: Uint8Array, count: number): number {
    const frame = this.frames.shift();
    if (frame === undefined) return -11;
    const w = new Uint32Array(iov.buffer, iov.byteOffset, count * IOVEC_WORDS);
    let at = 0;
    for (let i = 0; i < count && at < frame.length; i++) {
      const addr = w[i * 4] + w[i * 4 + 1] * 0x1_0000_0000;
      const len = w[i * 4 + 2];
      const r = this.memory.find(addr, len);
      if (r < 0) {
        throw new Error(`the poller read into 0x${addr.toString(16)} (+${len}), outside memory`);
      }
      const n = Math.min(len, frame.length - at);
      this.memory.bytes(r).set(frame.subarray(at, at + n), addr - this.memory.start(r));
      at += n;
    }
    return at;
  }
}

/** Batched reads on the fake tap: each queued read in order, as io_uring issues them. */
class FakeBatch implements RxBatchReader {
  readonly iov = new Uint32Array(RX_BATCH * BATCH_SLOT_WORDS);
  readonly #counts = new Uint32Array(RX_BATCH);
  #queued = 0;
  constructor(private readonly tap: FakeTap) {}
  queue(i: number, count: number): void {
    this.#counts[i] = count;
    this.#queued = Math.max(this.#queued, i + 1);
  }
  submit(results: Int32Array): void {
    const bytes = new Uint8Array(this.iov.buffer);
    for (let i = 0; i < this.#queued; i++) {
      const slot = bytes.subarray(i * BATCH_SLOT_WORDS * 4);
      results[i] = this.tap.readv(slot, this.#counts[i]);
    }
    this.#queued = 0;
  }
}

/** A frame the fake writer took from the TX ring. */
export interface SentFrame {
  hdr: Uint8Array;
  frame: Uint8Array;
}

export class FakeIo {
  readonly buffers: DatapathBuffers;
  readonly ctl: Int32Array;
  readonly tx: SpscRing;
  readonly rxPost: SpscRing;
  readonly rxLong: SpscRing;
  readonly rxDone: SpscRing;
  /** Fake host addresses of guest memory, the bounce arena and the poller's overflow buffer. */
  readonly hostMemory: FakeHostMemory;
  /** The tap the fake poller reads. */
  readonly tap: FakeTap;
  /** The poller's real receive code, once `attachRx` was called. */
  rx: RxReceiver | null = null;
  /** What the receiver said to the operator, and its faults. */
  readonly notices: string[] = [];
  readonly faults: string[] = [];
  readonly bounce: Uint8Array;
  readonly sent: SentFrame[] = [];
  calls = { rx: 0, tx: 0 };
  pollerWakes = 0;
  badRecords = 0;
  /** The TX queue whose used->idx the fake writer publishes (see `publishTxTo`). */
  #txDriver: TestDriver | null = null;
  #txPublished = -1;

  /** `rxPostRecords`: a smaller rx-post ring than the data path's, to fill it in tests. */
  constructor(readonly guest: TestGuest, rxPostRecords = RX_POST_RING_RECORDS) {
    this.tx = SpscRing.create({ capacity: TX_RING_RECORDS, recordWords: TX_RECORD_WORDS });
    this.rxPost = SpscRing.create({
      capacity: rxPostRecords,
      recordWords: RX_POST_RECORD_WORDS,
    });
    this.rxLong = SpscRing.create({
      capacity: RX_LONG_RING_RECORDS,
      recordWords: RX_LONG_RECORD_WORDS,
    });
    this.rxDone = SpscRing.create({
      capacity: RX_DONE_RING_RECORDS,
      recordWords: RX_DONE_RECORD_WORDS,
    });
    const control = new SharedArrayBuffer(CTL_BYTES);
    const bounce = new SharedArrayBuffer(BOUNCE_BYTES);
    this.buffers = {
      control,
      tx: this.tx.buffer,
      rxPost: this.rxPost.buffer,
      rxLong: this.rxLong.buffer,
      rxDone: this.rxDone.buffer,
      bounce,
    };
    this.ctl = new Int32Array(control);
    this.bounce = new Uint8Array(bounce);
    this.hostMemory = new FakeHostMemory(guest, this.bounce);
    this.tap = new FakeTap(this.hostMemory);
  }

  /** What the device's `start-queues` carries. */
  grant(): DatapathGrant {
    return { ...this.buffers, bounceHost: FAKE_BOUNCE };
  }

  /** Region grants for the NetDevice, with fake host addresses. */
  regionGrants() {
    return this.guest.regions.map((r) => ({
      guestPhysAddr: r.gpa,
      size: r.size,
      userAddr: r.user,
      hostAddr: FAKE_HOST + r.gpa,
      buffer: r.buffer,
    }));
  }

  /** The bytes an iovec names, or null if it is outside guest memory and the bounce arena. */
  #resolve(addr: number, len: number): Uint8Array | null {
    if (addr >= FAKE_BOUNCE && addr + len <= FAKE_BOUNCE + this.bounce.length) {
      return this.bounce.subarray(addr - FAKE_BOUNCE, addr - FAKE_BOUNCE + len);
    }
    const gpa = addr - FAKE_HOST;
    for (const r of this.guest.regions) {
      if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) {
        return r.bytes.subarray(gpa - r.gpa, gpa - r.gpa + len);
      }
    }
    return null;
  }

  #iovec(words: Uint32Array, at: number): Uint8Array | null {
    const addr = words[at] + words[at + 1] * 0x1_0000_0000;
    return this.#resolve(addr, words[at + 2]);
  }

  /**
   * Where TX completions go: the real writer gets the TX ring's used->idx
   * and used_event from the parent; the fake gets the test's driver.
   */
  publishTxTo(driver: TestDriver): void {
    this.#txDriver = driver;
    this.#txPublished = -1;
  }

  /** What the real writer does after a batch: store used->idx, decide the interrupt. */
  #publishTx(idx: number): void {
    const d = this.#txDriver;
    if (d === null || idx === this.#txPublished) return;
    this.guest.setU16(d.usedGpa + 2, idx);
    const old = this.#txPublished;
    this.#txPublished = idx;
    const eventIdx = (d.features & VIRTIO_RING_F_EVENT_IDX) !== 0n;
    const word = this.guest.u16(eventIdx ? d.availGpa + 4 + 2 * d.size : d.availGpa);
    const call = usedNotifyWanted(eventIdx, word, idx, old);
    if (call) this.calls.tx++;
  }

  kick(queue: "rx" | "tx"): void {
    this.#signalDevice(queue === "rx" ? EV_KICK_RX : EV_KICK_TX);
  }

  #signalDevice(bits: number): void {
    signal(this.ctl, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
  }

  /** Plays the writer once: sends every TX record, answers call and wake requests. */
  writerStep(): number {
    const ev = Atomics.exchange(this.ctl, CTL.WRITER_EVENTS, 0);
    if (ev & WEV_WAKE_POLLER) this.pollerWakes++;
    const w = this.tx.words;
    const n = this.tx.available();
    let usedIdx = -1;
    for (let i = 0; i < n; i++) {
      const at = this.tx.peek(i);
      usedIdx = w[at + TX_REC.USED_IDX] & 0xffff;
      if (w[at + TX_REC.FLAGS] === TXF_COMPLETE_ONLY) continue;
      const count = w[at + TX_REC.IOV_COUNT];
      const hdr = new Uint8Array(
        new Uint32Array(w.slice(at + TX_REC.HDR, at + TX_REC.HDR + 3)).buffer,
      );
      const parts: Uint8Array[] = [];
      let ok = count >= 1;
      for (let k = 0; k < count && ok; k++) {
        const b = this.#iovec(w, at + TX_REC.IOV + k * IOVEC_WORDS);
        if (!b) ok = false;
        else parts.push(b.slice());
      }
      const total = parts.reduce((s, p) => s + p.length, 0);
      if (!ok || total !== w[at + TX_REC.FRAME_LEN]) {
        this.badRecords++;
        continue;
      }
      const frame = new Uint8Array(total);
      let o = 0;
      for (const p of parts) {
        frame.set(p, o);
        o += p.length;
      }
      this.sent.push({ hdr: hdr.slice(0, NET_HDR_BYTES), frame });
    }
    if (n > 0) {
      this.#publishTx(usedIdx);
      this.tx.release(n);
      if (Atomics.exchange(this.ctl, CTL.TX_WANT_DONE, 0) !== 0) this.#signalDevice(EV_TX_DONE);
    }
    return n;
  }

  /** Chains posted and not yet filled. */
  get postedChains(): number {
    return this.rxPost.available();
  }

  /**
   * Plays the poller with its real receive code (`parent/io/rx_receiver.ts`,
   * `parent/io/rx_publisher.ts`) over fake host addresses, publishing into
   * `driver`'s used ring. `batch`: read through a fake batch engine (as with
   * io_uring). Call before the first {@link receive}.
   */
  attachRx(driver: TestDriver, opts: { batch?: boolean; frameRoom?: number } = {}): void {
    const eventIdx = (driver.features & VIRTIO_RING_F_EVENT_IDX) !== 0n;
    const place = {
      ringAddr: BigInt(FAKE_HOST + driver.usedGpa),
      size: driver.size,
      eventAddr: BigInt(
        FAKE_HOST + (eventIdx ? driver.availGpa + 4 + 2 * driver.size : driver.availGpa),
      ),
      eventIdx,
    };
    const publisher = new RxPublisher(this.ctl, place, this.hostMemory, () => {
      this.calls.rx++;
      return true;
    });
    this.tap.batch = opts.batch ? new FakeBatch(this.tap) : null;
    this.rx = new RxReceiver({
      ctl: this.ctl,
      rxPost: this.rxPost,
      rxLong: this.rxLong,
      rxDone: this.rxDone,
      memory: this.hostMemory,
      publisher,
      engine: this.tap,
      frameRoom: opts.frameRoom ?? RX_FRAME_ROOM_MAX,
      notice: (m) => this.notices.push(m),
      fault: (m) => this.faults.push(m),
    });
  }

  /**
   * One pass of the poller's loop: completes discards, then reads what the
   * tap holds if there is room (or `force`), and raises the device events
   * the real loop would.
   */
  pollerStep(force = false): void {
    const rx = this.rx;
    if (rx === null) throw new Error("FakeIo.attachRx first");
    const look = rx.look(performance.now());
    let bits = look.bits;
    if ((look.watch || force) && this.tap.frames.length > 0) bits |= rx.receive();
    if (bits !== 0) this.#signalDevice(bits);
  }

  /**
   * A frame (net header included) arrives from the tap and the poller reads
   * it at once. Returns the chains the frame went into, by token (none: it
   * was dropped, `dropStatus` says why, or nothing was posted), read back
   * from the rx-done records the poller pushed.
   */
  receiveFrame(hdrAndFrame: Uint8Array): { heads: number[]; dropStatus: number | null } {
    const post = this.rxPost;
    const posted: Array<{ token: number; discard: boolean }> = [];
    for (let i = 0; i < post.available(); i++) {
      const at = post.peek(i);
      posted.push({
        token: post.words[at + RX_POST.TOKEN],
        discard: (post.words[at + RX_POST.FLAGS] & RXF_DISCARD) !== 0,
      });
    }
    const done = this.rxDone;
    const head0 = Atomics.load(new Int32Array(done.buffer, 0, 64), SPSC_RING_WORD.HEAD) >>> 0;
    this.tap.frames.push(hdrAndFrame);
    this.pollerStep(true);
    this.tap.frames.length = 0; // a frame the poller did not take is lost, as in a full tap
    const head1 = Atomics.load(new Int32Array(done.buffer, 0, 64), SPSC_RING_WORD.HEAD) >>> 0;
    const heads: number[] = [];
    let dropStatus: number | null = null;
    let next = 0;
    for (let i = head0; i !== head1; i = (i + 1) >>> 0) {
      const at = (i & (done.capacity - 1)) * RX_DONE_RECORD_WORDS;
      const chains = done.words[at + RX_DONE.CHAINS];
      const status = done.words[at + RX_DONE.STATUS];
      if (chains === 0) dropStatus = status;
      else if (status === RX_PUBLISHED) {
        for (let k = 0; k < chains; k++) {
          const p = posted[next++];
          if (p !== undefined && !p.discard) heads.push(p.token);
        }
      } else {
        next += chains; // given back (RX_UNUSED) or refused
      }
    }
    return { heads, dropStatus };
  }

  /** {@link receiveFrame}, counting the chains the frame went into. */
  receive(hdrAndFrame: Uint8Array): number {
    return this.receiveFrame(hdrAndFrame).heads.length;
  }

  /**
   * Plays a poller whose batch of reads left the first `n` posted chains
   * unfilled: consumes them and gives them back (rx-done RX_UNUSED).
   */
  giveBack(n: number): void {
    this.rxPost.release(n);
    this.#pushDone(n, 0, RX_UNUSED);
  }

  /** Plays a poller that ran out of room for a frame (EV_RX_STARVED). */
  starve(): void {
    this.#signalDevice(EV_RX_STARVED);
  }

  /** Pushes a raw rx-done record (tests of a misbehaving poller use it directly). */
  pushDoneRaw(chains: number, bytes: number, status: number): void {
    this.#pushDone(chains, bytes, status);
  }

  #pushDone(chains: number, bytes: number, status: number): void {
    const rec = new Array(RX_DONE_RECORD_WORDS).fill(0);
    rec[RX_DONE.CHAINS] = chains;
    rec[RX_DONE.BYTES] = bytes;
    rec[RX_DONE.STATUS] = status;
    if (!tryPush(this.rxDone, rec)) throw new Error("rx-done ring full");
    this.#signalDevice(EV_RX_DONE);
  }
}
