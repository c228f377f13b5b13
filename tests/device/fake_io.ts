/**
 * Test helper: the parent's I/O side of the data path, played in TypeScript
 * without system calls. "Host addresses" are fake: guest memory is placed at
 * FAKE_HOST + GPA, the bounce arena at FAKE_BOUNCE, and the fake translates
 * iovecs back to bytes, checking each lies inside one of them (as the real
 * writer and poller must).
 */

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
  RX_OK,
  RX_POST,
  RX_POST_RECORD_WORDS,
  RX_POST_RING_RECORDS,
  RX_PUBLISHED,
  RX_UNUSED,
  RXF_MERGEABLE,
  signal,
  TX_REC,
  TX_RECORD_WORDS,
  TX_RING_RECORDS,
  TXF_COMPLETE_ONLY,
  WEV_CALL_RX,
  WEV_CALL_TX,
  WEV_WAKE_POLLER,
} from "../../ipc/datapath.ts";
import type { DatapathGrant } from "../../ipc/protocol.ts";
import { SpscRing } from "../../ipc/spsc_ring.ts";
import type { TestDriver, TestGuest } from "./driver.ts";
import { usedNotifyWanted } from "../../ipc/vring_notify.ts";
import { VIRTIO_RING_F_EVENT_IDX } from "../../ipc/features.ts";

export const FAKE_HOST = 0x5000_0000_0000;
export const FAKE_BOUNCE = 0x6000_0000_0000;

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
  readonly rxDone: SpscRing;
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
      rxDone: this.rxDone.buffer,
      bounce,
    };
    this.ctl = new Int32Array(control);
    this.bounce = new Uint8Array(bounce);
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
    if (ev & WEV_CALL_RX) this.calls.rx++;
    if (ev & WEV_CALL_TX) this.calls.tx++;
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
   * Plays the poller for one frame (net header included): fills chains from
   * the front of rx-post like readv would. Returns the chains used, or 0 when
   * the frame did not fit (reported as a drop) or nothing was posted.
   */
  receive(hdrAndFrame: Uint8Array): number {
    const w = this.rxPost.words;
    const avail = this.rxPost.available();
    if (avail === 0) return 0;
    const mergeable = (w[this.rxPost.peek(0) + RX_POST.FLAGS] & RXF_MERGEABLE) !== 0;
    let pos = 0;
    let chains = 0;
    const limit = mergeable ? avail : 1;
    const targets: Uint8Array[][] = [];
    let capacity = 0;
    for (; chains < limit && capacity < hdrAndFrame.length; chains++) {
      const at = this.rxPost.peek(chains);
      const iovs: Uint8Array[] = [];
      for (let k = 0; k < w[at + RX_POST.IOV_COUNT]; k++) {
        const b = this.#iovec(w, at + RX_POST.IOV + k * IOVEC_WORDS);
        if (!b) throw new Error("device posted an iovec outside guest memory");
        iovs.push(b);
        capacity += b.length;
      }
      targets.push(iovs);
    }
    if (capacity < hdrAndFrame.length) {
      this.#pushDone(0, hdrAndFrame.length, 1);
      return 0;
    }
    let used = 0;
    for (const iovs of targets) {
      if (pos >= hdrAndFrame.length) break;
      for (const b of iovs) {
        const n = Math.min(b.length, hdrAndFrame.length - pos);
        b.set(hdrAndFrame.subarray(pos, pos + n));
        pos += n;
      }
      used++;
    }
    this.rxPost.release(used);
    this.#pushDone(used, hdrAndFrame.length, RX_OK);
    return used;
  }

  /**
   * Plays the poller under RX publication for one frame of `len` bytes
   * (header included) into the front posted chain: writes its used element
   * into `driver`'s used ring at CTL.RX_USED_IDX, pushes the RX_PUBLISHED
   * record (without waking the device, as the poller does), and only then
   * stores used->idx. Returns the chain's token.
   */
  publishRx(driver: TestDriver, len: number): number {
    const at = this.rxPost.peek(0);
    const token = this.rxPost.words[at + RX_POST.TOKEN];
    this.rxPost.release(1);
    const idx = Atomics.load(this.ctl, CTL.RX_USED_IDX) & 0xffff;
    const e = driver.usedGpa + 4 + 8 * (idx & (driver.size - 1));
    this.guest.setU32(e, token);
    this.guest.setU32(e + 4, len);
    const rec = new Array(RX_DONE_RECORD_WORDS).fill(0);
    rec[RX_DONE.CHAINS] = 1;
    rec[RX_DONE.BYTES] = len - NET_HDR_BYTES;
    rec[RX_DONE.STATUS] = RX_PUBLISHED;
    rec[3] = 1;
    if (!this.rxDone.tryPush(rec)) throw new Error("rx-done ring full");
    const next = (idx + 1) & 0xffff;
    this.guest.atomicSetU16(driver.usedGpa + 2, next);
    Atomics.store(this.ctl, CTL.RX_USED_IDX, next);
    return token;
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
    if (!this.rxDone.tryPush(rec)) throw new Error("rx-done ring full");
    this.#signalDevice(EV_RX_DONE);
  }
}
