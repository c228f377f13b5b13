/// <reference lib="deno.worker" />
/**
 * The writer: the privileged I/O worker that `writev`s the device's TX
 * records to the tap straight from guest memory, publishes their TX
 * completions (used->idx) and the TX interrupt the driver asked for, writes
 * the RX call eventfd when the device asks, and wakes the poller
 * (`ipc/datapath.ts`).
 *
 * Runs with FFI only (`IO_WRITER_OPTIONS` in `datapath_host.ts`).
 *
 * Loop: announce WRITER_SLEEPING, load the doorbell, re-check events, the
 * TX ring and the mailbox, and only then block in `Atomics.wait` on
 * CTL.WRITER_DOORBELL (a futex wake-up; `waitAsync` costs several times
 * more and does not keep Deno's event loop turning). The parent bumps the
 * mailbox before each control message and rings the doorbell after it, and
 * the loop yields to the event loop whenever its mailbox says a message is
 * waiting (`io_protocol.ts`), busy or not.
 *
 * Trust: TX records are hostile (the device parses guest memory and could be
 * subverted). Each record is copied out of shared memory into private
 * buffers before any check, and `writev` runs on the private copy: the
 * 12-byte virtio_net_hdr from a private buffer (iov[0]), then the record's
 * iovecs, each checked to lie inside one granted region (`io_regions.ts`).
 * Failure policy for a bad record: do not write it, count CTL.IO_BAD_RECORD,
 * release it with the rest of the batch (so the ring moves) and raise
 * EV_IO_FAULT; the device resets the queue. A `writev` the kernel refuses
 * counts CTL.WRITER_ERRORS and the frame is dropped (released as sent).
 *
 * Engines: with `ioUring: "auto"` (the default) a batch of up to TX_BATCH
 * records is queued as IORING_OP_WRITEV and submitted with one
 * io_uring_enter that returns when every write completed (`io_uring.ts`):
 * one system call per batch instead of one per frame, the figure that sets
 * the TX rate here. If the kernel refuses io_uring (disabled by sysctl,
 * seccomp, old kernel), or with `ioUring: "off"`, each frame is one `writev`;
 * the worker says which in a notice and in CTL.WRITER_ENGINE. Each record
 * in a batch owns a private slot (header copy + iovec array) that stays
 * unchanged until the batch completed.
 *
 * TX completions: after a batch's writes completed, the writer stores the
 * last record's USED_IDX into the TX used->idx (where: `txUsed` in init, from
 * the parent, checked against the granted regions), reads the driver's
 * used_event (EVENT_IDX) or avail flags after that store, and writes the TX
 * call eventfd if the driver asked (vring_need_event, virtio 1.2 §2.7.10).
 * Then it releases the records, and raises EV_TX_DONE only when the device
 * asked for it (CTL.TX_WANT_DONE). The device is not woken per frame.
 *
 * EAGAIN: the tap fd is O_NONBLOCK (the poller needs that, and both share one
 * open file). tun's write side has no queue to fill: `tun_get_user()` only
 * waits for socket send buffer, which is INT_MAX unless TUNSETSNDBUF lowered
 * it. So EAGAIN is not expected; if it happens the frame is dropped and
 * counted like any other writev error, as a NIC drops on a full TX ring.
 *
 * @module
 */

import * as libc from "./libc.ts";
import { IoUring } from "./io_uring.ts";
import { fullBarrier, usedNotifyWanted } from "../ipc/vring_notify.ts";
import { macrotask } from "../ipc/macrotask.ts";
import { CorruptRingError, SpscRing } from "../ipc/spsc_ring.ts";
import {
  CTL,
  EV_IO_FAULT,
  EV_TX_DONE,
  IOVEC_WORDS,
  MAX_FRAME_BYTES,
  NET_HDR_BYTES,
  RX_QUEUE,
  signal,
  TX_MAX_IOV,
  TX_QUEUE,
  TX_REC,
  TXF_COMPLETE_ONLY,
  WEV_CALL_RX,
  WEV_CALL_TX,
  WEV_WAKE_POLLER,
  WRITER_ENGINE_IO_URING,
  WRITER_ENGINE_WRITEV,
} from "../ipc/datapath.ts";
import { IoRegions } from "./io_regions.ts";
import type { TxUsedPlace } from "./io_protocol.ts";
import { WorkerControl } from "./io_worker_control.ts";

/** Records written before they are released and the device is signalled. */
const TX_BATCH = 64;
/** ETH_HLEN: tun_get_user() refuses shorter frames. */
const ETH_HLEN = 14;

const sys = libc.sys;

// ---- state (set by control messages, read by the loop) -----------------------

let tx: SpscRing | null = null;
let txDead = false;
let regions = IoRegions.EMPTY;
let tapFd = -1;
const callFd = [-1, -1]; // indexed by RX_QUEUE / TX_QUEUE
let wakeFd = -1;

/** The TX queue's used->idx and the driver's event word, when the parent gave them. */
interface TxUsedViews {
  place: TxUsedPlace;
  idx: Uint16Array;
  event: Uint16Array;
  eventIdx: boolean;
}
let txUsed: TxUsedViews | null = null;
/** used->idx as last stored, and so at the last interrupt decision (-1: neither yet). */
let txPublished = -1;

// ---- private buffers (never shared, so the device cannot change them) ---------

/** Words of one slot's iovec array: iov[0] is the header copy, iov[1..] the record's iovecs. */
const SLOT_WORDS = (TX_MAX_IOV + 1) * IOVEC_WORDS;
/** Bytes reserved per slot for the header copy (12 used). */
const HDR_SLOT_BYTES = 16;
/**
 * The slots. Their addresses are taken once, with libc.addressed: the code
 * reads the buffers through the same holders, so they cannot be collected
 * while an iovec or an SQE names them.
 */
const iovs = libc.addressed(new Uint32Array(TX_BATCH * SLOT_WORDS));
const hdrs = libc.addressed(new Uint8Array(TX_BATCH * HDR_SLOT_BYTES));
const hdrWords = new Uint32Array(hdrs.view.buffer);
/** Each slot's iovec array address (lo, hi words), for the SQEs. */
const slotLo = new Uint32Array(TX_BATCH);
const slotHi = new Uint32Array(TX_BATCH);
/** Each slot's bytes for `writev`: header + frame. */
const slotExpected = new Int32Array(TX_BATCH);
/** Each slot's completion result (bytes or -errno). */
const slotResult = new Int32Array(TX_BATCH);
/** Slot 0's iovec array as bytes, for the `writev` engine. */
const slot0Bytes = new Uint8Array(iovs.view.buffer, 0, SLOT_WORDS * 4);
for (let slot = 0; slot < TX_BATCH; slot++) {
  const iovAddr = iovs.address + BigInt(slot * SLOT_WORDS * 4);
  slotLo[slot] = Number(iovAddr & 0xffff_ffffn);
  slotHi[slot] = Number(iovAddr >> 32n);
  const hdrAddr = hdrs.address + BigInt(slot * HDR_SLOT_BYTES);
  const w = slot * SLOT_WORDS;
  iovs.view[w] = Number(hdrAddr & 0xffff_ffffn);
  iovs.view[w + 1] = Number(hdrAddr >> 32n);
  iovs.view[w + 2] = NET_HDR_BYTES;
  iovs.view[w + 3] = 0;
}
/** The batching engine, or null for one `writev` per frame. */
let uring: IoUring | null = null;
/** The u64 1 an eventfd write adds. */
const eventfdOne = new Uint8Array(new BigUint64Array([1n]).buffer);

// virtio 1.2 §5.1.6: struct virtio_net_hdr; flags @0, gso_type @1, hdr_len @2,
// gso_size @4, csum_start @6, csum_offset @8, num_buffers @10 (le16).
const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
const VIRTIO_NET_HDR_GSO_NONE = 0;
const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
const VIRTIO_NET_HDR_GSO_UDP = 3;
const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
const VIRTIO_NET_HDR_GSO_UDP_L4 = 5;
const VIRTIO_NET_HDR_GSO_ECN = 0x80;

/**
 * A light second look at the header the device validated (`device/net_header.ts`
 * does the real check); the kernel checks it again in virtio_net_hdr_to_skb().
 */
function checkTxHeader(h: Uint8Array, at: number, frameLen: number): boolean {
  const flags = h[at];
  // §5.1.6.2: the driver MUST NOT set DATA_VALID or RSC_INFO on transmit.
  if ((flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) return false;
  const gsoType = h[at + 1];
  const gsoSize = h[at + 4] | (h[at + 5] << 8);
  const base = gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  if (gsoType === VIRTIO_NET_HDR_GSO_NONE) {
    // no GSO: nothing more to say about gso_size
  } else if (
    base === VIRTIO_NET_HDR_GSO_TCPV4 || base === VIRTIO_NET_HDR_GSO_TCPV6 ||
    (gsoType === VIRTIO_NET_HDR_GSO_UDP || gsoType === VIRTIO_NET_HDR_GSO_UDP_L4)
  ) {
    // §5.1.6.2: gso_size is the segment size for a GSO frame; 0 makes no segments.
    if (gsoSize === 0) return false;
  } else {
    return false;
  }
  if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
    // §5.1.6.2: the checksum field lies at csum_start + csum_offset, inside the frame.
    const csumStart = h[at + 6] | (h[at + 7] << 8);
    const csumOffset = h[at + 8] | (h[at + 9] << 8);
    if (csumStart + csumOffset + 2 > frameLen) return false;
  }
  return true;
}

/**
 * Copies the record at word `off` into `slot` and checks the copy. Returns
 * the iovec count for `writev` (header + frame pieces), or 0 for a bad
 * record. The checks read only the private copy.
 */
function prepareRecord(words: Uint32Array, off: number, slot: number): number {
  const count = words[off + TX_REC.IOV_COUNT];
  const frameLen = words[off + TX_REC.FRAME_LEN];
  // datapath.ts TX record: 1..TX_MAX_IOV iovecs.
  if (count < 1 || count > TX_MAX_IOV) return 0;
  if (frameLen < ETH_HLEN || frameLen > MAX_FRAME_BYTES) return 0;
  const h = slot * (HDR_SLOT_BYTES / 4);
  hdrWords[h] = words[off + TX_REC.HDR];
  hdrWords[h + 1] = words[off + TX_REC.HDR + 1];
  hdrWords[h + 2] = words[off + TX_REC.HDR + 2];
  const iov = iovs.view;
  const base = slot * SLOT_WORDS;
  const src = off + TX_REC.IOV;
  const n = count * IOVEC_WORDS;
  for (let i = 0; i < n; i++) iov[base + IOVEC_WORDS + i] = words[src + i];
  let sum = 0;
  for (let w = base + IOVEC_WORDS; w <= base + n; w += IOVEC_WORDS) {
    const len = iov[w + 2];
    // The iovec's length is a u64: its high word must be 0.
    if (iov[w + 3] !== 0) return 0;
    if (!regions.contains(iov[w + 1] * 0x1_0000_0000 + iov[w], len)) return 0;
    sum += len;
  }
  if (sum !== frameLen) return 0;
  if (!checkTxHeader(hdrs.view, slot * HDR_SLOT_BYTES, frameLen)) return 0;
  slotExpected[slot] = NET_HDR_BYTES + frameLen;
  return count + 1;
}

/** Writes the record prepared in slot 0 with one `writev` (the fallback engine). */
function writeOne(c: Int32Array, iovcnt: number): void {
  const r = sys.writev(tapFd, slot0Bytes, iovcnt);
  if (Number(r) !== slotExpected[0]) Atomics.add(c, CTL.WRITER_ERRORS, 1);
}

/**
 * Submits the `queued` slots to io_uring and waits for all of them. If the
 * ring itself fails, the writer falls back to `writev` for good; the batch's
 * frames count as errors (whether they were written is unknown).
 */
function flushRing(c: Int32Array, ring: IoUring, queued: number): void {
  slotResult.fill(-1_000_000, 0, queued);
  try {
    ring.submitAndWait(slotResult);
  } catch (e) {
    uring = null;
    Atomics.store(c, CTL.WRITER_ENGINE, WRITER_ENGINE_WRITEV);
    control.post({
      kind: "notice",
      message: `io_uring failed (${(e as Error).message}); one writev per frame from now on`,
    });
  }
  let errors = 0;
  for (let slot = 0; slot < queued; slot++) {
    if (slotResult[slot] !== slotExpected[slot]) errors++;
  }
  if (errors !== 0) Atomics.add(c, CTL.WRITER_ERRORS, errors);
}

/**
 * Views of the TX ring's two words, after checking each lies inside one
 * granted region. Throws RangeError naming the bad one.
 */
function txUsedViews(place: TxUsedPlace, granted: IoRegions): TxUsedViews {
  const view = (addr: bigint, what: string) => {
    const a = Number(addr);
    if (!granted.contains(a, 2)) {
      throw new RangeError(`txUsed.${what} 0x${addr.toString(16)} is not in guest memory`);
    }
    return new Uint16Array(
      Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(addr)!, 2),
    );
  };
  return {
    place,
    idx: view(place.idxAddr, "idxAddr"),
    event: view(place.eventAddr, "eventAddr"),
    eventIdx: place.eventIdx,
  };
}

/**
 * Stores the TX used->idx and decides the interrupt (virtio 1.2 §2.7.10:
 * with EVENT_IDX, when the index passed used_event since the last decision;
 * without, unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT;
 * `ipc/vring_notify.ts`). Returns whether to write the TX call eventfd.
 */
function publishTx(idx: number): boolean {
  const u = txUsed;
  if (u === null || idx === txPublished) return false;
  Atomics.store(u.idx, 0, idx);
  const old = txPublished;
  txPublished = idx;
  // The load of the driver's word must not pass this store (§2.7.10).
  fullBarrier();
  return usedNotifyWanted(u.eventIdx, Atomics.load(u.event, 0), idx, old);
}

/** Writes one batch of TX records; returns the device event bits to raise. */
function drainTx(c: Int32Array): number {
  const ring = tx;
  if (ring === null || txDead) return 0;
  let n: number;
  try {
    n = ring.available();
  } catch (e) {
    txDead = true;
    control.post({ kind: "fault", message: `tx ring: ${(e as Error).message}` });
    return e instanceof CorruptRingError ? EV_IO_FAULT : 0;
  }
  if (n === 0) return 0;
  if (n > TX_BATCH) n = TX_BATCH;
  const words = ring.words;
  const batcher = uring;
  let bits = 0;
  let bad = 0;
  let queued = 0;
  let usedIdx = 0;
  for (let i = 0; i < n; i++) {
    const slot = batcher === null ? 0 : queued;
    const off = ring.peek(i);
    usedIdx = words[off + TX_REC.USED_IDX] & 0xffff;
    if (words[off + TX_REC.FLAGS] === TXF_COMPLETE_ONLY) continue; // no frame, only completions
    const iovcnt = prepareRecord(words, off, slot);
    if (iovcnt === 0) {
      bad++;
    } else if (batcher === null) {
      writeOne(c, iovcnt);
    } else {
      batcher.queueWritev(tapFd, slotLo[slot], slotHi[slot], iovcnt, slot);
      queued++;
    }
  }
  if (queued !== 0) flushRing(c, batcher!, queued);
  // Every frame of the batch is with the kernel: its chains may go back.
  const call = publishTx(usedIdx);
  ring.release(n);
  // Release, then look (Dekker with the device's want-then-reap).
  if (Atomics.load(c, CTL.TX_WANT_DONE) !== 0 && Atomics.exchange(c, CTL.TX_WANT_DONE, 0) !== 0) {
    bits |= EV_TX_DONE;
  }
  if (call) {
    writeEventfd(c, callFd[TX_QUEUE]);
    Atomics.add(c, CTL.TX_INTERRUPTS, 1);
  }
  if (bad !== 0) {
    Atomics.add(c, CTL.IO_BAD_RECORD, bad);
    bits |= EV_IO_FAULT;
  }
  return bits;
}

function writeEventfd(c: Int32Array, fd: number): void {
  if (fd < 0) return;
  if (Number(sys.write(fd, eventfdOne, 8n)) !== 8) Atomics.add(c, CTL.WRITER_ERRORS, 1);
}

function txPending(): boolean {
  if (tx === null || txDead) return false;
  try {
    return tx.available() !== 0;
  } catch {
    return true; // drainTx reports it
  }
}

/**
 * How long one blocking wait lasts at most (ms); the event loop turns after
 * it even when nothing came (the parent rings the doorbell with each message).
 */
const WAIT_SLICE_MS = 1000;

async function loop(c: Int32Array): Promise<void> {
  while (control.stopId === null) {
    // Serve waiting control messages first (a revocation must not wait).
    if (control.mailPending()) {
      await macrotask();
      if (control.stopId !== null) break;
    }
    const ev = Atomics.exchange(c, CTL.WRITER_EVENTS, 0);
    if (ev & WEV_CALL_RX) writeEventfd(c, callFd[RX_QUEUE]);
    if (ev & WEV_CALL_TX) writeEventfd(c, callFd[TX_QUEUE]);
    if (ev & WEV_WAKE_POLLER) {
      writeEventfd(c, wakeFd);
      Atomics.add(c, CTL.POLLER_WAKE_ASKED, 1);
    }
    // WEV_TX only says "look"; the ring itself says how much.
    const bits = drainTx(c);
    if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
    if (ev !== 0 || bits !== 0) continue;
    // Sleep (Dekker with signal()): announce, load the doorbell, re-check, wait.
    // A blocking wait: a futex wake-up is several times cheaper than waitAsync's,
    // and the mailbox tells when the event loop must turn instead.
    Atomics.store(c, CTL.WRITER_SLEEPING, 1);
    const seen = Atomics.load(c, CTL.WRITER_DOORBELL);
    if (
      Atomics.load(c, CTL.WRITER_EVENTS) === 0 && !txPending() && !control.mailPending() &&
      control.stopId === null
    ) {
      if (Atomics.wait(c, CTL.WRITER_DOORBELL, seen, WAIT_SLICE_MS) === "timed-out") {
        Atomics.store(c, CTL.WRITER_SLEEPING, 0);
        await macrotask(); // timers and anything else the event loop holds
        continue;
      }
    }
    Atomics.store(c, CTL.WRITER_SLEEPING, 0);
  }
  uring?.close();
  uring = null;
  control.finish();
}

/** Picks the engine: io_uring when allowed and the kernel agrees, else `writev`. */
function startEngine(c: Int32Array, mode: "auto" | "off"): void {
  if (mode === "auto") {
    try {
      uring = IoUring.setup(TX_BATCH);
      Atomics.store(c, CTL.WRITER_ENGINE, WRITER_ENGINE_IO_URING);
      control.post({
        kind: "notice",
        message: `tap writes: io_uring, up to ${TX_BATCH} frames per system call`,
      });
      return;
    } catch (e) {
      control.post({
        kind: "notice",
        message: `tap writes: one writev per frame (io_uring unavailable: ${(e as Error).message})`,
      });
    }
  } else {
    control.post({ kind: "notice", message: "tap writes: one writev per frame (--io-uring off)" });
  }
  Atomics.store(c, CTL.WRITER_ENGINE, WRITER_ENGINE_WRITEV);
}

const control = new WorkerControl("writer", {
  init(msg, c) {
    const ring = SpscRing.attach(msg.tx);
    regions = IoRegions.from(msg.ranges);
    tx = ring;
    tapFd = msg.tapFd;
    wakeFd = msg.wakeFd;
    txUsed = msg.txUsed === null ? null : txUsedViews(msg.txUsed, regions);
    startEngine(c, msg.ioUring);
    return () => loop(c);
  },
  setRegions(r) {
    // A TX ring outside the new regions is not touched again (the parent
    // stops the queues before it takes their memory away; this is the
    // backstop): its completions are no longer published.
    if (txUsed !== null) {
      try {
        txUsed = txUsedViews(txUsed.place, r);
      } catch (e) {
        txUsed = null;
        control.post({ kind: "fault", message: `tx completions stopped: ${(e as Error).message}` });
      }
    }
    regions = r;
  },
  setFd(slot, fd) {
    if (slot === "tap") tapFd = fd;
    else callFd[slot === "callRx" ? RX_QUEUE : TX_QUEUE] = fd;
  },
  // The parent rings the writer's doorbell after every message (datapath_host.ts),
  // and the loop checks for a stop after each turn of the event loop.
  wake() {},
});
