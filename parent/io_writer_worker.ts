/// <reference lib="deno.worker" />
/**
 * The writer: the privileged I/O worker that `writev`s the device's TX
 * records to the tap straight from guest memory, writes the queues' call
 * eventfds when the device asks, and wakes the poller (`ipc/datapath.ts`).
 *
 * Runs with FFI only (`IO_WRITER_OPTIONS` in `datapath_host.ts`).
 *
 * Loop: announce WRITER_SLEEPING, load the doorbell, re-check events and the
 * TX ring, and only then `Atomics.waitAsync` on CTL.WRITER_DOORBELL: the
 * event loop stays free, so the parent's control messages are handled while
 * the writer sleeps; while busy it yields one macrotask after a batch
 * whenever its mailbox says a message is waiting (`io_protocol.ts`).
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
 * EAGAIN: the tap fd is O_NONBLOCK (the poller needs that, and both share one
 * open file). tun's write side has no queue to fill: `tun_get_user()` only
 * waits for socket send buffer, which is INT_MAX unless TUNSETSNDBUF lowered
 * it. So EAGAIN is not expected; if it happens the frame is dropped and
 * counted like any other writev error, as a NIC drops on a full TX ring.
 *
 * @module
 */

import * as libc from "./libc.ts";
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
  WEV_CALL_RX,
  WEV_CALL_TX,
  WEV_WAKE_POLLER,
} from "../ipc/datapath.ts";
import { IoRegions } from "./io_regions.ts";
import {
  errorReply,
  type IoReply,
  type IoRequest,
  MAILBOX,
  parseIoRequest,
  ROLE_SLOTS,
} from "./io_protocol.ts";

/** Records written before they are released and the device is signalled. */
const TX_BATCH = 64;
/** ETH_HLEN: tun_get_user() refuses shorter frames. */
const ETH_HLEN = 14;

const sys = libc.sys;

// ---- state (set by control messages, read by the loop) -----------------------

let ctl: Int32Array | null = null;
let tx: SpscRing | null = null;
let txDead = false;
let regions = IoRegions.EMPTY;
let tapFd = -1;
const callFd = [-1, -1]; // indexed by RX_QUEUE / TX_QUEUE
let wakeFd = -1;
let stopId: number | null = null;
/** Messages the parent posted (its word) and this worker served. */
let mailbox: Int32Array | null = null;
let served = 0;

// ---- private buffers (never shared, so the device cannot change them) ---------

/** iov[0] is the private header copy; iov[1..] the record's iovecs. */
const iov = new Uint32Array((TX_MAX_IOV + 1) * IOVEC_WORDS);
const iovBytes = new Uint8Array(iov.buffer);
/**
 * The private header copy, named by iov[0]. Its address is taken once, with
 * libc.addressed: the records' code reads the buffer through the same holder,
 * so the buffer cannot be collected while iov[0] names it.
 */
const hdr = libc.addressed(new Uint8Array(new ArrayBuffer(16), 0, NET_HDR_BYTES));
const hdrWords = new Uint32Array(hdr.view.buffer);
iov[0] = hdr.lo;
iov[1] = hdr.hi;
iov[2] = NET_HDR_BYTES;
iov[3] = 0;
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
function checkTxHeader(h: Uint8Array, frameLen: number): boolean {
  const flags = h[0];
  // §5.1.6.2: the driver MUST NOT set DATA_VALID or RSC_INFO on transmit.
  if ((flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) return false;
  const gsoType = h[1];
  const gsoSize = h[4] | (h[5] << 8);
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
    const csumStart = h[6] | (h[7] << 8);
    const csumOffset = h[8] | (h[9] << 8);
    if (csumStart + csumOffset + 2 > frameLen) return false;
  }
  return true;
}

function post(reply: IoReply): void {
  self.postMessage(reply);
}

/**
 * Copies, checks and writes the record at word `off`. Returns false for a bad
 * record (nothing was written). The checks read only the private copies.
 */
function writeRecord(words: Uint32Array, off: number): boolean {
  const count = words[off + TX_REC.IOV_COUNT];
  const frameLen = words[off + TX_REC.FRAME_LEN];
  // datapath.ts TX record: 1..TX_MAX_IOV iovecs.
  if (count < 1 || count > TX_MAX_IOV) return false;
  hdrWords[0] = words[off + TX_REC.HDR];
  hdrWords[1] = words[off + TX_REC.HDR + 1];
  hdrWords[2] = words[off + TX_REC.HDR + 2];
  const src = off + TX_REC.IOV;
  const n = count * IOVEC_WORDS;
  for (let i = 0; i < n; i++) iov[IOVEC_WORDS + i] = words[src + i];
  if (frameLen < ETH_HLEN || frameLen > MAX_FRAME_BYTES) return false;
  let sum = 0;
  for (let w = IOVEC_WORDS; w <= n; w += IOVEC_WORDS) {
    const len = iov[w + 2];
    // The iovec's length is a u64: its high word must be 0.
    if (iov[w + 3] !== 0) return false;
    if (!regions.contains(iov[w + 1] * 0x1_0000_0000 + iov[w], len)) return false;
    sum += len;
  }
  if (sum !== frameLen) return false;
  if (!checkTxHeader(hdr.view, frameLen)) return false;
  const r = sys.writev(tapFd, iovBytes, count + 1);
  if (Number(r) !== NET_HDR_BYTES + frameLen) Atomics.add(ctl!, CTL.WRITER_ERRORS, 1);
  return true;
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
    post({ kind: "fault", message: `tx ring: ${(e as Error).message}` });
    return e instanceof CorruptRingError ? EV_IO_FAULT : 0;
  }
  if (n === 0) return 0;
  if (n > TX_BATCH) n = TX_BATCH;
  const words = ring.words;
  let bits = EV_TX_DONE;
  let bad = 0;
  for (let i = 0; i < n; i++) {
    if (!writeRecord(words, ring.peek(i))) bad++;
  }
  ring.release(n);
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

/** Whether the parent posted a message this worker has not served yet. */
function mailPending(): boolean {
  return mailbox !== null && served !== Atomics.load(mailbox, MAILBOX.POSTED);
}

async function loop(c: Int32Array): Promise<void> {
  while (stopId === null) {
    const ev = Atomics.exchange(c, CTL.WRITER_EVENTS, 0);
    if (ev & WEV_CALL_RX) writeEventfd(c, callFd[RX_QUEUE]);
    if (ev & WEV_CALL_TX) writeEventfd(c, callFd[TX_QUEUE]);
    if (ev & WEV_WAKE_POLLER) writeEventfd(c, wakeFd);
    // WEV_TX only says "look"; the ring itself says how much.
    const bits = drainTx(c);
    if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
    if (ev !== 0 || bits !== 0) {
      // Busy: serve waiting control messages between batches (a revocation must not wait).
      while (mailPending() && stopId === null) await macrotask();
      continue;
    }
    // Sleep (Dekker with signal()): announce, load the doorbell, re-check, wait.
    Atomics.store(c, CTL.WRITER_SLEEPING, 1);
    const seen = Atomics.load(c, CTL.WRITER_DOORBELL);
    if (Atomics.load(c, CTL.WRITER_EVENTS) === 0 && !txPending() && stopId === null) {
      const r = Atomics.waitAsync(c, CTL.WRITER_DOORBELL, seen);
      if (r.async) await r.value;
    }
    Atomics.store(c, CTL.WRITER_SLEEPING, 0);
  }
  const id = stopId;
  post({ kind: "ack", id });
  self.close();
}

function wakeLoop(): void {
  if (ctl === null) return;
  Atomics.add(ctl, CTL.WRITER_DOORBELL, 1);
  Atomics.notify(ctl, CTL.WRITER_DOORBELL);
}

/**
 * Serves one control message. It runs only while the loop is suspended at an
 * `await` (never inside a batch), so its effects are complete before the loop
 * touches memory or a descriptor again: the ack is a true revocation.
 */
function serve(msg: IoRequest): void {
  switch (msg.kind) {
    case "init": {
      if (ctl !== null) throw new Error("init: already initialised");
      if (msg.role !== "writer") throw new Error(`init: this is the writer, not the ${msg.role}`);
      const c = new Int32Array(msg.control);
      const ring = SpscRing.attach(msg.tx);
      regions = IoRegions.from(msg.ranges);
      tx = ring;
      tapFd = msg.tapFd;
      wakeFd = msg.wakeFd;
      mailbox = new Int32Array(msg.mailbox);
      ctl = c;
      post({ kind: "ack", id: msg.id });
      loop(c).catch((e) => {
        post({ kind: "fault", message: `writer loop died: ${String(e)}` });
        throw e;
      });
      return;
    }
    case "setRegions":
      regions = IoRegions.from(msg.ranges);
      post({ kind: "ack", id: msg.id });
      return;
    case "setFd":
      if (!ROLE_SLOTS.writer.includes(msg.slot)) {
        throw new Error(`setFd: the writer has no ${msg.slot} slot`);
      }
      if (msg.slot === "tap") tapFd = msg.fd ?? -1;
      else callFd[msg.slot === "callRx" ? RX_QUEUE : TX_QUEUE] = msg.fd ?? -1;
      post({ kind: "ack", id: msg.id });
      return;
    case "stop":
      if (ctl === null) {
        post({ kind: "ack", id: msg.id });
        self.close();
        return;
      }
      stopId = msg.id;
      wakeLoop();
      return;
    default: {
      const never: never = msg;
      throw new Error(`unhandled ${(never as { kind: string }).kind}`);
    }
  }
}

self.onmessage = (e: MessageEvent) => {
  served++;
  let id: number | null = null;
  try {
    const msg = parseIoRequest(e.data);
    id = msg.id;
    if (stopId !== null) throw new Error("stopping");
    serve(msg);
  } catch (err) {
    post(errorReply(err, id ?? (err as { id?: number | null }).id ?? null));
  }
};
