/**
 * Test helper: plays the device worker's side of the data path
 * (`ipc/datapath.ts`) in the test's own thread, against the real I/O
 * workers. It writes TX and rx-post records, raw, so tests can also write
 * hostile ones; waits for device events; reads rx-done records. And a guest
 * memory stand-in: a memfd mapped into this process, with an ArrayBuffer view.
 *
 * @module
 */

import { DeviceIoRings } from "../../../device/io_rings.ts";
import * as libc from "../../../parent/host/libc.ts";
import { SpscRing } from "../../../ipc/spsc_ring.ts";
import {
  CTL,
  type DatapathBuffers,
  NET_HDR_BYTES,
  RX_DONE,
  RX_POST,
  RX_POST_RECORD_WORDS,
  RX_PUBLISHED,
  RXT_CSUM,
  RXT_ECN,
  RXT_MERGEABLE,
  signal,
  TX_REC,
  TX_RECORD_WORDS,
  WEV_TX,
  WEV_WAKE_POLLER,
} from "../../../ipc/datapath.ts";

/** A memfd of `size` bytes mapped shared into this process: guest memory for tests. */
/** RX_TAKES of a guest that takes every header the tap may write. */
const RXT_ALL = (1 << 1) | (1 << 3) | (1 << 4) | (1 << 5) | RXT_ECN | RXT_CSUM | RXT_MERGEABLE;

export class GuestMemory {
  readonly fd: number;
  readonly size: number;
  readonly pointer: Deno.PointerObject;
  /** Host address of byte 0. */
  readonly base: bigint;
  /** A view of all of it. Do not touch after {@link unmap}. */
  readonly bytes: Uint8Array;
  #mapped = true;

  constructor(size: number) {
    this.size = size;
    this.fd = libc.memfdCreate("vionet-test-guest", libc.MFD_CLOEXEC);
    libc.ftruncate(this.fd, size);
    this.pointer = libc.mmap(size, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, this.fd);
    this.base = Deno.UnsafePointer.value(this.pointer);
    this.bytes = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(this.pointer, size));
  }

  /** Host address of byte `offset`, as a Number (for iovec words). */
  addr(offset: number): number {
    return Number(this.base) + offset;
  }

  /** The range to grant. */
  range(): { base: bigint; size: number } {
    return { base: this.base, size: this.size };
  }

  /** Unmaps and closes (idempotent). */
  unmap(): void {
    if (!this.#mapped) return;
    this.#mapped = false;
    libc.munmap(this.pointer, this.size);
    libc.close(this.fd);
  }
}

/** One iovec of a record, as the device writes it. */
export interface Iov {
  addr: number;
  len: number;
  /** The iovec's 4th word (high half of the u64 length); 0 unless a test lies. */
  lenHigh?: number;
}

/** A TX record; the optional fields let a test write lies. */
export interface TxSpec {
  iovs: Iov[];
  /** The 12-byte virtio_net_hdr (default all zero). */
  hdr?: Uint8Array;
  /** Default: the sum of the iovec lengths. */
  frameLen?: number;
  /** Default: iovs.length. */
  iovCount?: number;
  token?: number;
  /** TX_REC.USED_IDX: the TX used->idx to publish once the record is done (default 0). */
  usedIdx?: number;
  /** TX_REC.FLAGS (e.g. TXF_COMPLETE_ONLY; default 0). */
  flags?: number;
}

/** An rx-post record. */
export interface RxPostSpec {
  iovs: Iov[];
  flags?: number;
  /** Default: the sum of the iovec lengths. */
  capacity?: number;
  iovCount?: number;
  token?: number;
}

/** An rx-done record as read back. */
export interface RxDoneRecord {
  chains: number;
  bytes: number;
  status: number;
  /** RX_PUBLISHED only: the frames the record publishes (word 3). */
  frames?: number;
}

/**
 * What the poller did, one entry per frame or drop, in chain order: an
 * RX_PUBLISHED record is read back from the used ring as its frames
 * (`bytes` = header + frame, the used lengths' sum; `chains` = num_buffers).
 */
export interface RxEvent {
  chains: number;
  bytes: number;
  status: number;
}

/** An {@link RxEvent}'s status for a chain completed empty (a discard). */
export const RX_DISCARDED = -1;

/** Where the poller publishes RX frames: a used ring inside the test's guest memory. */
export interface RxUsedSpec {
  guest: GuestMemory;
  /** Byte offset of the used ring (flags, idx, elements) in guest memory. */
  ringOffset: number;
  size: number;
}

/** The device's end of the four rings and the control block. */
export class FakeDeviceSide {
  readonly ctl: Int32Array;
  readonly tx: SpscRing;
  readonly rxPost: SpscRing;
  readonly rxDone: SpscRing;
  #pending = 0;
  readonly #txHeader: Int32Array;
  readonly #deviceRings: DeviceIoRings;

  readonly #rxUsed: RxUsedSpec | null;
  /** Each token's chain, for reading published frames back. */
  readonly #chainOf = new Map<number, { addr: number }>();
  #nextToken = 1;
  /** The next used element to read back. */
  #usedNext = 0;

  /**
   * `rxUsed`: where the poller publishes (the rig gives the same place to the
   * poller); the device's start is played here: RX_TAKES says the guest
   * takes everything (num_buffers always written), RX_USED_IDX starts at 0.
   */
  constructor(buffers: DatapathBuffers, rxUsed: RxUsedSpec | null = null) {
    this.ctl = new Int32Array(buffers.control);
    this.tx = SpscRing.attach(buffers.tx);
    this.rxPost = SpscRing.attach(buffers.rxPost);
    this.rxDone = SpscRing.attach(buffers.rxDone);
    this.#rxUsed = rxUsed;
    Atomics.store(this.ctl, CTL.RX_TAKES, RXT_ALL);
    this.#txHeader = new Int32Array(buffers.tx, 0, 96);
    // The device's own signalling code (the bounce arena is not used here).
    this.#deviceRings = new DeviceIoRings(buffers, 1);
  }

  /** Writes one TX record (unpublished); false when the ring is full. Call {@link kickWriter}. */
  writeTx(spec: TxSpec): boolean {
    const off = this.tx.reserve();
    if (off < 0) return false;
    const w = this.tx.words;
    w.fill(0, off, off + TX_RECORD_WORDS);
    w[off + TX_REC.IOV_COUNT] = spec.iovCount ?? spec.iovs.length;
    w[off + TX_REC.FRAME_LEN] = spec.frameLen ?? spec.iovs.reduce((s, v) => s + v.len, 0);
    w[off + TX_REC.TOKEN] = spec.token ?? 0;
    w[off + TX_REC.FLAGS] = spec.flags ?? 0;
    w[off + TX_REC.USED_IDX] = spec.usedIdx ?? 0;
    if (spec.hdr) {
      const h = new Uint8Array(w.buffer, w.byteOffset + (off + TX_REC.HDR) * 4, NET_HDR_BYTES);
      h.set(spec.hdr.subarray(0, NET_HDR_BYTES));
    }
    writeIovs(w, off + TX_REC.IOV, spec.iovs, TX_RECORD_WORDS - TX_REC.IOV);
    return true;
  }

  /**
   * Publishes written TX records and rings the writer (WEV_TX). Like a
   * device that waits for ring space, it asks for EV_TX_DONE after the
   * release (CTL.TX_WANT_DONE): the tests wait for it.
   */
  kickWriter(): void {
    Atomics.store(this.ctl, CTL.TX_WANT_DONE, 1);
    this.tx.publish();
    signal(this.ctl, CTL.WRITER_EVENTS, WEV_TX, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
  }

  /**
   * Publishes written TX records and hands them over as the device does
   * (`DeviceIoRings.signalTx`): to a poller that waits after a TX kick, else
   * to the writer. Returns true when the poller got them.
   */
  handOverTx(): boolean {
    this.tx.publish();
    return this.#deviceRings.signalTx();
  }

  /** The TX ring's tail: records the writer released. */
  txTail(): number {
    return Atomics.load(this.#txHeader, 64) >>> 0;
  }

  /**
   * Writes and publishes rx-post records; then, as the device must, wakes a
   * starved poller through the writer (WEV_WAKE_POLLER). Returns how many fit.
   */
  postRx(specs: RxPostSpec[]): number {
    let n = 0;
    for (const spec of specs) {
      const off = this.rxPost.reserve();
      if (off < 0) break;
      const w = this.rxPost.words;
      w.fill(0, off, off + RX_POST_RECORD_WORDS);
      w[off + RX_POST.IOV_COUNT] = spec.iovCount ?? spec.iovs.length;
      w[off + RX_POST.CAPACITY] = spec.capacity ?? spec.iovs.reduce((s, v) => s + v.len, 0);
      const token = spec.token ?? (this.#nextToken++ & 0x7fff_ffff);
      this.#chainOf.set(token, { addr: spec.iovs[0]?.addr ?? 0 });
      w[off + RX_POST.TOKEN] = token;
      w[off + RX_POST.FLAGS] = spec.flags ?? 0;
      writeIovs(w, off + RX_POST.IOV, spec.iovs, RX_POST_RECORD_WORDS - RX_POST.IOV);
      n++;
    }
    if (n !== 0) this.rxPost.publish();
    if (Atomics.load(this.ctl, CTL.POLLER_STARVED) !== 0) {
      signal(
        this.ctl,
        CTL.WRITER_EVENTS,
        WEV_WAKE_POLLER,
        CTL.WRITER_DOORBELL,
        CTL.WRITER_SLEEPING,
      );
    }
    return n;
  }

  /** Reads and releases every published rx-done record. */
  takeRxDone(): RxDoneRecord[] {
    const n = this.rxDone.available();
    const out: RxDoneRecord[] = [];
    for (let i = 0; i < n; i++) {
      const off = this.rxDone.peek(i);
      const w = this.rxDone.words;
      const rec: RxDoneRecord = {
        chains: w[off + RX_DONE.CHAINS],
        bytes: w[off + RX_DONE.BYTES],
        status: w[off + RX_DONE.STATUS],
      };
      if (rec.status === RX_PUBLISHED) rec.frames = w[off + 3];
      out.push(rec);
    }
    if (n !== 0) this.rxDone.release(n);
    return out;
  }

  /**
   * Takes every rx-done record, RX_PUBLISHED ones read back from the used
   * ring as their frames (see {@link RxEvent}).
   */
  takeRx(): RxEvent[] {
    const out: RxEvent[] = [];
    for (const rec of this.takeRxDone()) {
      if (rec.status !== RX_PUBLISHED) {
        out.push({ chains: rec.chains, bytes: rec.bytes, status: rec.status });
        continue;
      }
      const u = this.#rxUsed;
      if (u === null) throw new Error("RX_PUBLISHED, but the test gave no used ring");
      const view = new DataView(u.guest.bytes.buffer, u.ringOffset);
      const elem = (i: number) => {
        const e = 4 + 8 * (i & (u.size - 1));
        return { id: view.getUint32(e, true), len: view.getUint32(e + 4, true) };
      };
      for (let left = rec.chains; left > 0;) {
        const first = elem(this.#usedNext);
        if (first.len === 0) {
          // A discard: one chain, nothing in it.
          out.push({ chains: 1, bytes: 0, status: RX_DISCARDED });
          this.#usedNext = (this.#usedNext + 1) & 0xffff;
          left--;
          continue;
        }
        const chain = this.#chainOf.get(first.id);
        if (!chain) throw new Error(`used element names token ${first.id}, never posted`);
        const at = chain.addr - Number(u.guest.base);
        const nb = u.guest.bytes[at + 10] | (u.guest.bytes[at + 11] << 8);
        let bytes = 0;
        for (let i = 0; i < nb; i++) bytes += elem(this.#usedNext + i).len;
        this.#usedNext = (this.#usedNext + nb) & 0xffff;
        left -= nb;
        out.push({ chains: nb, bytes, status: RX_PUBLISHED });
      }
    }
    return out;
  }

  /** Takes the device event bits raised so far (including ones seen by earlier waits). */
  takeEvents(): number {
    const bits = this.#pending | Atomics.exchange(this.ctl, CTL.DEVICE_EVENTS, 0);
    this.#pending = 0;
    return bits;
  }

  /**
   * Waits (Atomics.waitAsync, with the DEVICE_SLEEPING handshake) until every
   * bit of `bits` was raised, then clears those bits and returns all bits
   * raised so far; the others stay pending. Returns 0 on timeout.
   */
  async waitFor(bits: number, timeoutMs = 5000): Promise<number> {
    const deadline = performance.now() + timeoutMs;
    const c = this.ctl;
    for (;;) {
      this.#pending |= Atomics.exchange(c, CTL.DEVICE_EVENTS, 0);
      if ((this.#pending & bits) === bits) {
        const all = this.#pending;
        this.#pending &= ~bits;
        return all;
      }
      const remaining = deadline - performance.now();
      if (remaining <= 0) return 0;
      Atomics.store(c, CTL.DEVICE_SLEEPING, 1);
      const seen = Atomics.load(c, CTL.DEVICE_DOORBELL);
      if (Atomics.load(c, CTL.DEVICE_EVENTS) === 0) {
        const r = Atomics.waitAsync(c, CTL.DEVICE_DOORBELL, seen, remaining);
        if (r.async) {
          const keepAlive = setTimeout(() => {}, remaining + 100);
          try {
            await r.value;
          } finally {
            clearTimeout(keepAlive);
          }
        }
      }
      Atomics.store(c, CTL.DEVICE_SLEEPING, 0);
    }
  }

  /** A control block counter. */
  counter(word: number): number {
    return Atomics.load(this.ctl, word);
  }
}

function writeIovs(w: Uint32Array, at: number, iovs: Iov[], roomWords: number): void {
  const n = Math.min(iovs.length, roomWords / 4);
  for (let i = 0; i < n; i++) {
    const { addr, len, lenHigh = 0 } = iovs[i];
    w[at + i * 4] = addr % 0x1_0000_0000;
    w[at + i * 4 + 1] = Math.floor(addr / 0x1_0000_0000);
    w[at + i * 4 + 2] = len;
    w[at + i * 4 + 3] = lenHigh;
  }
}
