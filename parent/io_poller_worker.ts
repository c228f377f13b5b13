/// <reference lib="deno.worker" />
/**
 * The poller: the privileged I/O worker that blocks in `epoll_wait` on the
 * tap, the queues' kick eventfds and its own wake eventfd (`wait_set.ts`);
 * `readv`s frames from the tap straight into the guest buffers the device
 * posted, and turns kicks into device events (`ipc/datapath.ts`). Kicks are
 * edge-triggered and never read as they come (one system call less per
 * guest kick); the poller reads each kick eventfd once when it lets go of
 * it, so its counter is left at zero as if every kick had been read.
 *
 * TX after a kick: the poller announces CTL.POLLER_AWAITS_TX before it
 * raises EV_KICK_TX, waits (at most {@link TX_ANSWER_WAIT_MS}) for the
 * device's answer, and writes the records itself with its own
 * `TxDrainer` (`tx_drain.ts`), in turns with the writer, which writes what
 * the device publishes at other times. A guest's frame then wakes two
 * threads, not three (kick -> poller -> device -> poller), and the TCP ACK
 * the host's stack sends back during the write is read by the wait that
 * follows at once, without a wake-up of its own. Measured with the e2e rig
 * (guest -> host iperf3, offloads on): the writer's ~2000 wake-ups per
 * second went to ~100, the poller's stayed ~3200-3600.
 *
 * Runs with FFI only (`IO_POLLER_OPTIONS` in `datapath_host.ts`).
 *
 * A thread blocked in `epoll_wait` sees neither Atomics nor postMessage. So:
 * - the tap is polled only while RX chains are posted; otherwise the poller
 *   sets CTL.POLLER_STARVED and re-checks the rx-post ring (Dekker with the
 *   device, which publishes and then reads POLLER_STARVED and asks the writer
 *   for WEV_WAKE_POLLER);
 * - the parent posts a control message and then writes the wake eventfd; on
 *   waking the poller drains it and, while its mailbox (`io_protocol.ts`)
 *   says messages are waiting, yields to the event loop, which serves them.
 *   Control messages are served only there, between batches, so an ack
 *   means the old regions/descriptors are out of use.
 *
 * Trust: rx-post records are hostile. Each chain is copied into private
 * memory and checked (iovec count 1..RX_MAX_IOV, every iovec inside one
 * granted region, capacity equal to the sum) before its iovecs reach `readv`.
 * A refused chain is consumed with an rx-done {chains: 1, bytes: 0,
 * RX_STATUS_BAD_POST}, counted in CTL.IO_BAD_RECORD, and raises EV_IO_FAULT.
 *
 * Receiving: one chain per frame, or (RXF_MERGEABLE) consecutive chains until
 * they can hold the tap's longest frame (`frameRoom`: what the parent says,
 * from the tap's MTU and offloads; the maximum, 64 KiB GSO, until then),
 * then a private overflow iovec: a frame that does not fit shows as
 * `n > capacity` instead of being truncated; it is dropped
 * (CTL.POLLER_TOO_BIG, rx-done {0, n, RX_STATUS_TOO_BIG}) and no chain is
 * consumed; a frame longer than `frameRoom` also makes the poller assume the
 * maximum from then on. Otherwise the chains the n bytes touched are
 * consumed: rx-done {chains, n, RX_OK}. Per batch (up to {@link RX_BATCH}
 * frames) rx-post is released and rx-done published once, and EV_RX_DONE
 * raised once.
 *
 * RX publication (`ipc/datapath.ts`): when the parent gave the RX used ring
 * (`rxUsed`) and the device turned it on, each frame is completed here
 * (header checked against what the guest takes, num_buffers, used elements,
 * used->idx, RX interrupt) and the device only retires chains from
 * RX_PUBLISHED records, woken for them every 128 chains: an RX frame then
 * costs this thread alone.
 *
 * Batched reads (`ioUring: "auto"`): while the leading posted chains can each
 * take a whole frame, one io_uring_enter carries one nowait `readv` per
 * chain ({@link readBurst}); reads run in order and each one finds the tap's
 * next frame or nothing. A chain whose read found nothing while a later read
 * found a frame is given back (rx-done {k, 0, RX_UNUSED}; the device posts it
 * again). Measured (bench/profile.ts-style, RX of 64 B frames from DPDK's
 * virtio-user with 2 KiB mergeable buffers): the poller's CPU for the same
 * 0.15 Mpps fell from 0.32 to 0.11 of a core; one `readv` (a system call
 * costs more than the copy on this kind of machine) had been most of it.
 *
 * @module
 */

import * as libc from "./libc.ts";
import { IoUring } from "./io_uring.ts";
import { macrotask } from "../ipc/macrotask.ts";
import { CorruptRingError, SpscRing } from "../ipc/spsc_ring.ts";
import {
  CTL,
  EV_IO_FAULT,
  EV_KICK_RX,
  EV_KICK_TX,
  EV_RX_DONE,
  EV_RX_STARVED,
  IOVEC_WORDS,
  NET_HDR_BYTES,
  POLLER_ENGINE_IO_URING,
  POLLER_ENGINE_READV,
  RX_DONE,
  RX_MAX_IOV,
  RX_OK,
  RX_POST,
  RX_PUBLISHED,
  RX_QUEUE,
  RX_UNUSED,
  RXF_MERGEABLE,
  rxSignalChains,
  RXT_CSUM,
  RXT_ECN,
  RXT_MERGEABLE,
  signal,
  TX_QUEUE,
  WEV_TX,
} from "../ipc/datapath.ts";
import { IoRegions } from "./io_regions.ts";
import { TxDrainer } from "./tx_drain.ts";
import { WaitSet } from "./wait_set.ts";
import {
  type IoUringMode,
  RX_FRAME_ROOM_MAX,
  RX_STATUS_BAD_HEADER,
  RX_STATUS_BAD_POST,
  RX_STATUS_TOO_BIG,
  type RxUsedPlace,
} from "./io_protocol.ts";
import { fullBarrier, usedNotifyWanted } from "../ipc/vring_notify.ts";
import { WorkerControl } from "./io_worker_control.ts";

/** Frames read per batch before rx-done is published. */
const RX_BATCH = 64;
/** UIO_MAXIOV: readv takes at most this many iovecs. */
const UIO_MAXIOV = 1024;
/** Chain iovecs staged for one readv (the overflow iovec takes the last slot). */
const STAGE_MAX_IOV = UIO_MAXIOV - 1;
/** Reads in one batch start at this many and double while batches come back full. */
const BURST_MIN = 4;
/** Poll timeout while rx-done is full: the device's release cannot wake us. */
const RX_DONE_FULL_RETRY_MS = 1;

const sys = libc.sys;
const { EAGAIN, EINTR } = libc.Errno;

// ---- state --------------------------------------------------------------------

let rxPost: SpscRing | null = null;
let rxDone: SpscRing | null = null;
let rxDead = false;
let regions = IoRegions.EMPTY;
let tapFd = -1;
/** Set when the wait set reported the tap invalid; cleared by a new setFd tap. */
let tapBroken = false;
const kickFd = [-1, -1]; // indexed by RX_QUEUE / TX_QUEUE
let wakeFd = -1;
/**
 * The longest frame the tap can hand us, net header included: what the
 * parent said (`rxFrameRoom`), or the maximum once a longer frame came.
 */
let frameRoom = RX_FRAME_ROOM_MAX;
/** Batches of reads, or null: one `readv` per frame (`--io-uring off`, or refused). */
let uring: IoUring | null = null;
/** Reads queued in the next batch (see {@link readBurst}). */
let burstSize = BURST_MIN;
/** Longest the poller yields for a message the mailbox announced (the parent retries anyway). */
const MAIL_WAIT_MS = 100;

// ---- private buffers ------------------------------------------------------------

/** The control block (set at init). */
let ctlBlock: Int32Array | null = null;
/** What the poller waits on (`wait_set.ts`), by tag. */
let waits: WaitSet | null = null;
const TAG_WAKE = 0;
const TAG_KICK = [1, 2]; // indexed by RX_QUEUE / TX_QUEUE
const TAG_TAP = 3;
/** Kicks are edge-triggered: each guest kick is reported once, and the eventfd is not read. */
const KICK_EVENTS = libc.EPOLLIN | libc.EPOLLET;
const BAD_FD = libc.EPOLLERR | libc.EPOLLHUP;

/** u64 counter of an eventfd read. */
const counter = new Uint8Array(new ArrayBuffer(8));

/** Staged (validated, private) chains: their iovecs back to back, plus one spare slot. */
const stIov = new Uint32Array((STAGE_MAX_IOV + 1) * IOVEC_WORDS);
const stIovBytes = new Uint8Array(stIov.buffer);
const stCount = new Uint32Array(UIO_MAXIOV); // iovecs per staged chain
const stCap = new Float64Array(UIO_MAXIOV); // capacity per staged chain
const stFlags = new Uint32Array(UIO_MAXIOV);
const stToken = new Uint32Array(UIO_MAXIOV); // head index per staged chain (its used element id)
let stChains = 0;
let stIovs = 0;
let stTotal = 0;

/**
 * The overflow buffer: a frame's bytes beyond the chains land here and are
 * discarded. receiveBatch reads its address from this holder at each readv,
 * which is what keeps the buffer alive (libc.addressed: a cached address
 * alone let V8 free it, and readv then wrote over a free malloc chunk).
 */
const overflow = libc.addressed(new Uint8Array(RX_FRAME_ROOM_MAX));

/**
 * A batch's iovec arrays: read i's at word i * BURST_SLOT_WORDS, its chain's
 * iovecs then the overflow iovec. They stay unchanged until its completion.
 */
const BURST_SLOT_WORDS = (RX_MAX_IOV + 1) * IOVEC_WORDS;
const burstIov = libc.addressed(new Uint32Array(RX_BATCH * BURST_SLOT_WORDS));
const burstLo = new Uint32Array(RX_BATCH);
const burstHi = new Uint32Array(RX_BATCH);
for (let i = 0; i < RX_BATCH; i++) {
  const a = burstIov.address + BigInt(i * BURST_SLOT_WORDS * 4);
  burstLo[i] = Number(a & 0xffff_ffffn);
  burstHi[i] = Number(a >> 32n);
}
/** Each read's result: bytes, or -errno. */
const burstResult = new Int32Array(RX_BATCH);

/** Reads an eventfd's counter without blocking; true if it was non-zero. */
function readEventfd(fd: number): boolean {
  return Number(sys.read(fd, counter, 8n)) === 8;
}

// ---- staging --------------------------------------------------------------------

/**
 * Copies the rx-post record at word `off` into the staging area and checks it.
 * Returns 1 when staged, 0 when it is bad, -1 when it would not fit.
 */
function stage(words: Uint32Array, off: number): number {
  const count = words[off + RX_POST.IOV_COUNT];
  const capacity = words[off + RX_POST.CAPACITY];
  const flags = words[off + RX_POST.FLAGS];
  // datapath.ts rx-post record: 1..RX_MAX_IOV iovecs, capacity >= 1.
  if (count < 1 || count > RX_MAX_IOV || capacity < 1) return 0;
  if (stIovs + count > STAGE_MAX_IOV) return -1;
  const dst = stIovs * IOVEC_WORDS;
  const src = off + RX_POST.IOV;
  const n = count * IOVEC_WORDS;
  for (let i = 0; i < n; i++) stIov[dst + i] = words[src + i];
  let sum = 0;
  for (let w = dst; w < dst + n; w += IOVEC_WORDS) {
    const len = stIov[w + 2];
    if (stIov[w + 3] !== 0) return 0; // high word of the u64 length
    if (!regions.contains(stIov[w + 1] * 0x1_0000_0000 + stIov[w], len)) return 0;
    sum += len;
  }
  if (sum !== capacity) return 0;
  stCount[stChains] = count;
  stCap[stChains] = capacity;
  stFlags[stChains] = flags;
  stToken[stChains] = words[off + RX_POST.TOKEN];
  stChains++;
  stIovs += count;
  stTotal += capacity;
  return 1;
}

/** Drops the first `c` staged chains (consumed), moving the rest to the front. */
function unstage(c: number): void {
  let iovs = 0;
  let cap = 0;
  for (let i = 0; i < c; i++) {
    iovs += stCount[i];
    cap += stCap[i];
  }
  stIov.copyWithin(0, iovs * IOVEC_WORDS, stIovs * IOVEC_WORDS);
  stCount.copyWithin(0, c, stChains);
  stCap.copyWithin(0, c, stChains);
  stFlags.copyWithin(0, c, stChains);
  stToken.copyWithin(0, c, stChains);
  stChains -= c;
  stIovs -= iovs;
  stTotal -= cap;
}

function clearStage(): void {
  stChains = stIovs = stTotal = 0;
}

function pushDone(ring: SpscRing, chains: number, bytes: number, status: number, w3 = 0): void {
  // Under RX publication records stay in chain order: the run of published chains goes first.
  if (pubRunChains !== 0) flushPublished(ring);
  pushRecord(ring, chains, bytes, status, w3);
  pushed++;
  pushedOthers++;
}

function pushRecord(ring: SpscRing, chains: number, bytes: number, status: number, w3: number) {
  const off = ring.reserve(); // the caller checked for space
  const w = ring.words;
  w[off + RX_DONE.CHAINS] = chains;
  w[off + RX_DONE.BYTES] = bytes;
  w[off + RX_DONE.STATUS] = status;
  w[off + 3] = w3;
}

// ---- RX publication -------------------------------------------------------------------

/**
 * RX publication (`ipc/datapath.ts`): while the device set CTL.RX_PUBLISH and
 * the parent gave the ring's place, the poller completes each frame itself:
 * checks the tap's header against what the guest takes (CTL.RX_TAKES; one
 * it cannot take is dropped, its chains kept), writes num_buffers, writes
 * one used element per chain at used->idx onwards, and after the batch
 * stores used->idx and signals the RX call eventfd when the driver asked
 * (`ipc/vring_notify.ts`). The device learns afterwards, from RX_PUBLISHED
 * records, which chains to retire; it is woken for them only every
 * `rxSignalChains(ring size)` chains (or for any other record), not per
 * frame: the device tops up RX buffers then (`ipc/datapath.ts`).
 *
 * Trust: the ring's place comes from the parent and is checked against the
 * granted regions; RX_TAKES, RX_USED_IDX and the chains' tokens come from
 * the device, which could write the same guest memory itself.
 */
interface RxUsedViews {
  /** The used ring's elements: id at 2i, len at 2i + 1. */
  elems: Uint32Array;
  idx: Uint16Array;
  event: Uint16Array;
  eventIdx: boolean;
  mask: number;
}
let rxUsedPlace: RxUsedPlace | null = null;
let rxUsed: RxUsedViews | null = null;
let callRxFd = -1;
let callTxFd = -1;
/** Writes TX records after the kicks this worker read (null: the writer alone does). */
let txDrainer: TxDrainer | null = null;
/** This batch publishes (set at its start). */
let pub = false;
let pubTakes = 0;
/** The next used->idx (u16) while a batch publishes. */
let pubIdx = 0;
/** used->idx at the last interrupt decision; -1: none since the loop started. */
let pubSignalled = -1;
/** Published chains (and their frames and bytes) not yet in an RX_PUBLISHED record. */
let pubRunChains = 0;
let pubRunFrames = 0;
let pubRunBytes = 0;
/** Chains published since the device was last woken for RX_PUBLISHED records. */
let pubUnsignalled = 0;
/** Records pushed in the current batch, and those of them that are not RX_PUBLISHED. */
let pushed = 0;
let pushedOthers = 0;

/** Views of the RX used ring and the driver's word, after checking they lie in `granted`. */
function rxUsedViews(place: RxUsedPlace, granted: IoRegions): RxUsedViews {
  const view = (addr: bigint, bytes: number, what: string) => {
    if (!granted.contains(Number(addr), bytes)) {
      throw new RangeError(`rxUsed.${what} 0x${addr.toString(16)} is not in guest memory`);
    }
    return Deno.UnsafePointerView.getArrayBuffer(Deno.UnsafePointer.create(addr)!, bytes);
  };
  view(place.ringAddr, 4 + 8 * place.size, "ringAddr");
  return {
    elems: new Uint32Array(view(place.ringAddr + 4n, 8 * place.size, "ringAddr")),
    idx: new Uint16Array(view(place.ringAddr + 2n, 2, "ringAddr")),
    event: new Uint16Array(view(place.eventAddr, 2, "eventAddr")),
    eventIdx: place.eventIdx,
    mask: place.size - 1,
  };
}

/** The view {@link hdrIndex} found the header byte in. */
let hdrView: Uint8Array = new Uint8Array(0);

/**
 * Byte `pos` of the staged chain whose `count` iovecs start at word `iovw`
 * of stIov: sets {@link hdrView} and returns the index in it, or -1.
 */
function hdrIndex(iovw: number, count: number, pos: number): number {
  for (let i = 0; i < count; i++) {
    const w = iovw + i * IOVEC_WORDS;
    const len = stIov[w + 2];
    if (pos < len) {
      const addr = stIov[w + 1] * 0x1_0000_0000 + stIov[w];
      const r = regions.find(addr, len);
      if (r < 0) return -1;
      hdrView = regions.bytes(r);
      return addr - regions.start(r) + pos;
    }
    pos -= len;
  }
  return -1;
}

/**
 * Publishes a frame of `r` bytes read into `chains` staged chains from
 * staged index `k0` (its iovecs from word `iovw`): the header checked and
 * fixed, a used element per chain. Returns false when the guest cannot take
 * the header as the tap wrote it: nothing is written and the chains stay
 * unused (the caller drops the frame).
 */
function publishFrame(k0: number, iovw: number, chains: number, r: number): boolean {
  const u = rxUsed!;
  const takes = pubTakes;
  const count = stCount[k0];
  const iFlags = hdrIndex(iovw, count, 0);
  if (iFlags < 0) return false;
  const flagsView = hdrView;
  const flags = flagsView[iFlags];
  const iGso = hdrIndex(iovw, count, 1);
  if (iGso < 0) return false;
  const gso = hdrView[iGso];
  const type = gso & 0x7f;
  // virtio 1.2 §5.1.6.4: flags NEEDS_CSUM (1) and DATA_VALID (2) only; GSO by the guest's features.
  if ((flags & ~3) !== 0) return false;
  if (gso !== 0) {
    if (type === 0 || type > 5 || (takes & (1 << type)) === 0) return false;
    if ((gso & 0x80) !== 0 && (takes & RXT_ECN) === 0) return false;
  }
  if ((takes & RXT_CSUM) === 0) {
    if ((flags & 1) !== 0) return false; // a partial checksum it cannot finish: the device's slow path
    if (flags !== 0) flagsView[iFlags] = 0; // §5.1.6.3.1: flags 0 without GUEST_CSUM
  }
  const nb = (takes & RXT_MERGEABLE) !== 0 ? chains : 1;
  const i10 = hdrIndex(iovw, count, 10);
  if (i10 < 0) return false;
  hdrView[i10] = nb & 0xff;
  const i11 = hdrIndex(iovw, count, 11);
  if (i11 < 0) return false;
  hdrView[i11] = nb >>> 8;
  let left = r;
  let idx = pubIdx;
  const elems = u.elems;
  for (let c = k0; c < k0 + chains; c++) {
    const len = Math.min(left, stCap[c]);
    const e = (idx & u.mask) * 2;
    elems[e] = stToken[c];
    elems[e + 1] = len;
    left -= len;
    idx = (idx + 1) & 0xffff;
  }
  pubIdx = idx;
  return true;
}

/** Adds a published frame of `r` bytes in `chains` chains to the run of the next RX_PUBLISHED record. */
function pubAdd(chains: number, r: number): void {
  pubRunChains += chains;
  pubRunFrames++;
  pubRunBytes += r - NET_HDR_BYTES;
}

/** Pushes the run of published chains as one RX_PUBLISHED record. */
function flushPublished(ring: SpscRing): void {
  pushRecord(ring, pubRunChains, pubRunBytes, RX_PUBLISHED, pubRunFrames);
  pushed++;
  pubUnsignalled += pubRunChains;
  pubRunChains = pubRunFrames = pubRunBytes = 0;
}

/**
 * Ends a publishing batch: stores used->idx (the elements were written
 * before), then, after a full barrier, reads the driver's word and signals
 * the RX call eventfd if it asked (§2.7.10).
 */
function publishUsed(c: Int32Array): void {
  const u = rxUsed!;
  const idx = pubIdx;
  if (idx === (Atomics.load(c, CTL.RX_USED_IDX) & 0xffff)) return;
  Atomics.store(u.idx, 0, idx);
  Atomics.store(c, CTL.RX_USED_IDX, idx);
  fullBarrier();
  const old = pubSignalled;
  pubSignalled = idx;
  if (usedNotifyWanted(u.eventIdx, Atomics.load(u.event, 0), idx, old) && callRxFd >= 0) {
    if (Number(sys.write(callRxFd, one, 8n)) === 8) Atomics.add(c, CTL.RX_INTERRUPTS, 1);
    else Atomics.add(c, CTL.POLLER_ERRORS, 1);
  }
}

/** The u64 1 an eventfd write adds. */
const one = new Uint8Array(new BigUint64Array([1n]).buffer);

// ---- receiving --------------------------------------------------------------------

/** A frame longer than `frameRoom` came: assume the largest from now on (until the parent says). */
function roomExceeded(bytes: number): void {
  if (frameRoom === RX_FRAME_ROOM_MAX) return;
  control.post({
    kind: "notice",
    message: `a ${bytes}-byte frame is longer than the ${frameRoom} bytes the tap's frames ` +
      `were said to take; it was dropped, and frames are read with room for ` +
      `${RX_FRAME_ROOM_MAX} bytes from now on`,
  });
  frameRoom = RX_FRAME_ROOM_MAX;
}

/** What the last {@link readBurst} did. */
let burstChains = 0; // posted chains consumed (filled, or given back)
let burstDrained = false; // a read found the tap empty

/**
 * Reads a batch of frames with one io_uring_enter: one non-blocking `readv`
 * per posted chain, for the leading chains (from record `first`) that can
 * each take the longest frame (`frameRoom`), at most `limit` of them. Each
 * read either fills its chain or finds nothing (EAGAIN, in order: io_uring
 * issues them inline, in submission order, on a tap). A chain left unfilled
 * (no frame, a frame too long, or a header the guest cannot take) before a
 * chain that got a frame is given back (RX_UNUSED); chains after the last
 * frame stay posted. Returns the frames read, or -1 when fewer than two
 * chains qualify (then one `readv` does better).
 */
function readBurst(
  c: Int32Array,
  ring: IoUring,
  postRing: SpscRing,
  done: SpscRing,
  first: number,
  limit: number,
): number {
  const words = postRing.words;
  const avail = postRing.available();
  const max = Math.min(limit, burstSize, avail - first);
  let k = 0;
  while (k < max) {
    const off = postRing.peek(first + k);
    if (words[off + RX_POST.CAPACITY] < frameRoom) break;
    if (stage(words, off) !== 1) break; // a bad record is refused when it comes first
    k++;
  }
  if (k < 2) {
    clearStage();
    return -1;
  }
  const iov = burstIov.view;
  let src = 0;
  for (let i = 0; i < k; i++) {
    const n = stCount[i] * IOVEC_WORDS;
    const w = i * BURST_SLOT_WORDS;
    for (let j = 0; j < n; j++) iov[w + j] = stIov[src + j];
    src += n;
    iov[w + n] = overflow.lo;
    iov[w + n + 1] = overflow.hi;
    iov[w + n + 2] = overflow.view.byteLength;
    iov[w + n + 3] = 0;
    ring.queueReadvNowait(tapFd, burstLo[i], burstHi[i], stCount[i] + 1, i);
  }
  burstResult.fill(-EAGAIN, 0, k);
  try {
    ring.submitAndWait(burstResult);
    Atomics.add(c, CTL.POLLER_BATCHES, 1);
  } catch (e) {
    // Reads it did not report are lost frames; their chains stay posted.
    uring = null;
    Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_READV);
    control.post({
      kind: "notice",
      message: `io_uring failed (${(e as Error).message}); one readv per frame from now on`,
    });
  }
  // Which reads delivered a frame (published or to be completed by the device).
  let last = -1;
  let iovw = 0;
  for (let i = 0; i < k; i++) {
    const r = burstResult[i];
    if (r > 0 && r <= stCap[i]) {
      if (pub && !publishFrame(i, iovw, 1, r)) {
        burstResult[i] = -RESULT_BAD_HEADER - r; // dropped below, its chain unused
      } else {
        last = i;
      }
    }
    iovw += stCount[i] * IOVEC_WORDS;
  }
  let frames = 0;
  let run = 0; // chains to give back before the next frame
  let unused = 0;
  let drained = false;
  for (let i = 0; i < k; i++) {
    const r = burstResult[i];
    if (r > 0 && r <= stCap[i]) {
      if (run !== 0) {
        pushDone(done, run, 0, RX_UNUSED);
        unused += run;
        run = 0;
      }
      // Published above (it joins the run of the next RX_PUBLISHED record), or the device's.
      if (pub) pubAdd(1, r);
      else pushDone(done, 1, r, RX_OK);
      frames++;
      continue;
    }
    if (r > 0) {
      // Longer than its chain (and frameRoom): dropped, as readv's overflow shows.
      Atomics.add(c, CTL.POLLER_TOO_BIG, 1);
      pushDone(done, 0, r, RX_STATUS_TOO_BIG);
      roomExceeded(r);
    } else if (r <= -RESULT_BAD_HEADER) {
      pushDone(done, 0, -r - RESULT_BAD_HEADER, RX_STATUS_BAD_HEADER);
      frames++;
    } else {
      drained = true;
      if (r !== -EAGAIN && r !== -EINTR) Atomics.add(c, CTL.POLLER_ERRORS, 1);
    }
    if (i < last) run++;
  }
  if (unused !== 0) Atomics.add(c, CTL.POLLER_UNUSED, unused);
  clearStage();
  // Full batches double the next; otherwise size it to what came.
  burstSize = drained ? Math.max(BURST_MIN, frames * 2) : Math.min(RX_BATCH, k * 2);
  burstChains = last + 1;
  burstDrained = drained;
  return frames;
}

/** A result below -RESULT_BAD_HEADER marks a frame of (-result - RESULT_BAD_HEADER) bytes dropped for its header. */
const RESULT_BAD_HEADER = 1 << 20;

/**
 * Frames often come one per wake (a TCP ACK per segment the guest sent, one
 * GSO frame per wake towards it): then a batch reads one frame and leaves
 * the rest to the (level-triggered) wait set, instead of a second `readv`
 * that finds nothing: one system call less per frame. Every
 * {@link READ_ONE_BATCHES}+1-th batch reads until the tap runs dry again,
 * to see whether frames still come one at a time.
 */
let readOne = false;
let readOneLeft = 0;
const READ_ONE_BATCHES = 3;

/** Reads up to RX_BATCH frames into posted chains; returns the device event bits. */
function receiveBatch(c: Int32Array, postRing: SpscRing, done: SpscRing): number {
  let bits = 0;
  let used = 0; // rx-post records consumed in this batch
  let bad = 0;
  let avail = postRing.available();
  const free = done.freeSpace();
  const words = postRing.words;
  pushed = pushedOthers = 0;
  pub = rxUsed !== null && Atomics.load(c, CTL.RX_PUBLISH) === 1;
  if (pub) {
    pubTakes = Atomics.load(c, CTL.RX_TAKES);
    pubIdx = Atomics.load(c, CTL.RX_USED_IDX) & 0xffff;
  }
  clearStage();
  // One readv per wake while frames come one at a time (see readOne).
  const one = readOne && readOneLeft-- > 0;
  let readvFrames = 0;
  // Records: a frame needs at most a run flush and one record; a read in a burst three.
  for (let frames = 0; frames < RX_BATCH && free - pushed >= 4;) {
    const ring = uring;
    if (ring !== null && stChains === 0) {
      const limit = Math.min(RX_BATCH - frames, Math.floor((free - pushed - 1) / 3));
      const got = readBurst(c, ring, postRing, done, used, limit);
      if (got >= 0) {
        frames += Math.max(got, 1);
        used += burstChains;
        if (burstDrained) break;
        avail = postRing.available();
        continue;
      }
    }
    if (one && readvFrames !== 0) break; // the wait set says if another came
    // The first chain (starved when there is none: the kernel queues, then drops).
    if (stChains === 0) {
      if (used === avail && (avail = postRing.available()) === used) break;
      if (stage(words, postRing.peek(used)) !== 1) {
        pushDone(done, 1, 0, RX_STATUS_BAD_POST);
        used++;
        bad++;
        continue;
      }
    }
    let chains = 1;
    if (stFlags[0] & RXF_MERGEABLE) {
      // Stage more mergeable chains until they hold a largest frame, or none are left.
      while (stTotal < frameRoom && used + stChains < avail) {
        const next = postRing.peek(used + stChains);
        if ((words[next + RX_POST.FLAGS] & RXF_MERGEABLE) === 0) break;
        if (stage(words, next) !== 1) break; // a bad one is refused when it comes first
      }
      // Only the leading mergeable run; stage() keeps flags, so count it.
      while (chains < stChains && (stFlags[chains] & RXF_MERGEABLE) !== 0) chains++;
      // Not room for a largest frame yet: wait for the guest's next buffers
      // rather than read a frame that may not fit (it would be dropped).
      if (stTotal < frameRoom && frames > 0) break;
    }
    let iovs = 0;
    let capacity = 0;
    for (let i = 0; i < chains; i++) {
      iovs += stCount[i];
      capacity += stCap[i];
    }
    // The overflow iovec goes after the used chains; save the slot it covers.
    const o = iovs * IOVEC_WORDS;
    const s0 = stIov[o], s1 = stIov[o + 1], s2 = stIov[o + 2], s3 = stIov[o + 3];
    stIov[o] = overflow.lo;
    stIov[o + 1] = overflow.hi;
    stIov[o + 2] = overflow.view.byteLength;
    stIov[o + 3] = 0;
    const r = Number(sys.readv(tapFd, stIovBytes, iovs + 1));
    const err = r < 0 ? libc.errno() : 0;
    stIov[o] = s0;
    stIov[o + 1] = s1;
    stIov[o + 2] = s2;
    stIov[o + 3] = s3;
    if (r <= 0) {
      if (r < 0 && err !== EAGAIN && err !== EINTR) Atomics.add(c, CTL.POLLER_ERRORS, 1);
      if (!one) {
        // Read until the tap ran dry: one frame or none means they come one at a time.
        readOne = readvFrames <= 1;
        readOneLeft = READ_ONE_BATCHES;
      }
      break;
    }
    frames++;
    readvFrames++;
    if (r > capacity) {
      // Too big for the chains: drop it, keep the chains for the next frame.
      Atomics.add(c, CTL.POLLER_TOO_BIG, 1);
      if (r > frameRoom) roomExceeded(r);
      pushDone(done, 0, r, RX_STATUS_TOO_BIG);
      continue;
    }
    let consumed = 0;
    for (let seen = 0; seen < r; consumed++) seen += stCap[consumed];
    if (pub) {
      if (!publishFrame(0, 0, consumed, r)) {
        // A header the guest cannot take: dropped, the chains keep for the next frame.
        pushDone(done, 0, r, RX_STATUS_BAD_HEADER);
        continue;
      }
      pubAdd(consumed, r);
    } else {
      pushDone(done, consumed, r, RX_OK);
    }
    used += consumed;
    unstage(consumed);
  }
  clearStage();
  if (pubRunChains !== 0) flushPublished(done);
  if (used !== 0) postRing.release(used);
  if (pushed !== 0) {
    // Records before used->idx: the driver may offer a chain again once it
    // sees it used, and the device must find it retired then (Virtqueue.onAvailIdx).
    done.publish();
    if (!pub || pushedOthers !== 0 || pubUnsignalled >= rxSignalChains(rxUsed!.mask + 1)) {
      bits |= EV_RX_DONE;
      pubUnsignalled = 0;
    }
  }
  if (pub) publishUsed(c);
  if (bad !== 0) {
    Atomics.add(c, CTL.IO_BAD_RECORD, bad);
    bits |= EV_IO_FAULT;
  }
  return bits;
}

// ---- the loop ---------------------------------------------------------------------

/**
 * How long to wait for enough mergeable buffers before reading with fewer
 * (ms). The clock restarts whenever the guest posts more, so a guest that is
 * refilling its ring is waited for; only one whose whole ring holds less than
 * a largest frame pays this delay (and may see such frames dropped).
 */
const ROOM_WAIT_MS = 20;
/** When the poller last had room for a largest frame, or saw the guest post more. */
let roomWaitSince = 0;
/** Posted chains seen while waiting for room. */
let roomWaitPosted = 0;

/**
 * Whether the posted chains can take a largest frame: any one chain unless
 * mergeable, else consecutive mergeable chains adding up to frameRoom.
 */
function hasRoom(ring: SpscRing): boolean {
  const avail = ring.available();
  if (avail === 0) return false;
  if (avail !== roomWaitPosted) {
    roomWaitPosted = avail;
    roomWaitSince = performance.now();
  }
  const words = ring.words;
  let total = 0;
  for (let i = 0; i < avail; i++) {
    const off = ring.peek(i);
    if ((words[off + RX_POST.FLAGS] & RXF_MERGEABLE) === 0) return true;
    total += words[off + RX_POST.CAPACITY];
    if (total >= frameRoom) {
      roomWaitSince = performance.now();
      return true;
    }
  }
  return false;
}

async function loop(c: Int32Array): Promise<void> {
  const ws = waits!;
  while (control.stopId === null) {
    let watchTap = false;
    let timeout = -1;
    let bits = 0;
    const postRing = rxPost!;
    const done = rxDone!;
    if (tapFd >= 0 && !tapBroken && !rxDead) {
      try {
        if (done.freeSpace() === 0) {
          timeout = RX_DONE_FULL_RETRY_MS;
        } else if (hasRoom(postRing)) {
          Atomics.store(c, CTL.POLLER_STARVED, 0);
          watchTap = true;
        } else {
          // Starved: announce, then re-check (the device publishes, then reads the flag).
          const fresh = Atomics.exchange(c, CTL.POLLER_STARVED, 1) === 0;
          if (fresh) Atomics.add(c, CTL.POLLER_STARVATIONS, 1);
          if (hasRoom(postRing)) {
            Atomics.store(c, CTL.POLLER_STARVED, 0);
            watchTap = true;
          } else if (fresh) {
            // The device may not be asking the guest for RX kicks while it
            // thought we had plenty (rxSignalChains): have it top up now.
            // It posts what the guest offers (and then has the writer wake
            // us), or asks for the guest's kick.
            bits |= EV_RX_STARVED;
          } else if (postRing.available() !== 0) {
            // Some mergeable buffers, not enough for a largest frame: a guest
            // with a small ring may never post more, so look again shortly
            // and then read with what there is.
            timeout = ROOM_WAIT_MS;
            if (performance.now() - roomWaitSince > ROOM_WAIT_MS) {
              Atomics.store(c, CTL.POLLER_STARVED, 0);
              watchTap = true;
            }
          }
        }
      } catch (e) {
        bits |= ringFault(e);
      }
    }
    // Level-triggered: watched while there is room, quiet otherwise.
    if (!ws.set(TAG_TAP, tapFd >= 0 && !tapBroken ? tapFd : -1, watchTap ? libc.EPOLLIN : 0)) {
      tapBroken = true;
      Atomics.add(c, CTL.POLLER_ERRORS, 1);
    }
    if (bits === 0) {
      const r = ws.wait(timeout);
      if (r < 0) {
        if (libc.errno() !== EINTR) {
          Atomics.add(c, CTL.POLLER_ERRORS, 1);
          await macrotask(); // do not spin on a persistent error
        }
        continue;
      }
    } else {
      ws.clear();
    }
    // Kicks first: edge-triggered, a kick reported now is never reported again.
    bits |= kick(c, ws, RX_QUEUE, EV_KICK_RX);
    bits |= kick(c, ws, TX_QUEUE, EV_KICK_TX);
    if (ws.ready(TAG_WAKE) !== 0) {
      // Woken for control messages (or by the writer for new RX buffers): drain,
      // let the event loop serve messages, and look at everything again.
      readEventfd(wakeFd);
      if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
      const deadline = performance.now() + MAIL_WAIT_MS;
      while (control.mailPending() && control.stopId === null && performance.now() < deadline) {
        await macrotask();
      }
      continue;
    }
    // A TX kick: wait for the device's answer and write its records here
    // (announced before the device can see the kick; it answers either way).
    const awaitTx = (bits & EV_KICK_TX) !== 0 && txDrainer !== null;
    let answerSeen = 0;
    if (awaitTx) {
      answerSeen = Atomics.load(c, CTL.POLLER_DOORBELL);
      Atomics.store(c, CTL.POLLER_AWAITS_TX, 1);
    }
    const tapEv = ws.ready(TAG_TAP);
    if (watchTap && (tapEv & libc.EPOLLIN)) {
      try {
        bits |= receiveBatch(c, postRing, done);
      } catch (e) {
        bits |= ringFault(e);
      }
    } else if (tapEv & BAD_FD) {
      // Reported even while the tap is quiet: stop watching it (next pass) or we would spin.
      tapBroken = true;
      Atomics.add(c, CTL.POLLER_ERRORS, 1);
    }
    if (bits !== 0) signal(c, CTL.DEVICE_EVENTS, bits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
    if (awaitTx) {
      const txBits = writeKickedTx(c, answerSeen);
      if (txBits !== 0) {
        signal(c, CTL.DEVICE_EVENTS, txBits, CTL.DEVICE_DOORBELL, CTL.DEVICE_SLEEPING);
      }
      // The next wait finds at once what the writes brought back (a TCP
      // ACK from the host's stack, typically): no sleep, no wake-up.
    }
  }
  uring?.close();
  uring = null;
  txDrainer?.close();
  for (const q of [RX_QUEUE, TX_QUEUE]) letGoOfKick(q);
  waits?.close();
  waits = null;
  control.finish();
}

/**
 * How long the poller waits for the device's answer to a TX kick (ms)
 * before it leaves the records to the writer. The device answers as soon as
 * its pass over the TX queue is done, records or not; this bounds the delay
 * RX and control messages see when it is slow to wake.
 */
const TX_ANSWER_WAIT_MS = 2;
/** Batches the poller writes per kick at most; a longer run is the writer's. */
const TX_BATCHES_PER_KICK = 4;

/**
 * After a TX kick: waits for the device's answer (CTL.POLLER_AWAITS_TX),
 * then writes the TX records it finds, taking turns with the writer
 * (`tx_drain.ts`). One thread fewer per kick than handing them to the
 * writer: kick -> poller -> device -> poller. Returns device event bits.
 */
function writeKickedTx(c: Int32Array, seen: number): number {
  const d = txDrainer!;
  if (Atomics.load(c, CTL.POLLER_AWAITS_TX) !== 0) {
    Atomics.wait(c, CTL.POLLER_DOORBELL, seen, TX_ANSWER_WAIT_MS);
  }
  // Answered, or given up: from now on the device wakes the writer.
  Atomics.store(c, CTL.POLLER_AWAITS_TX, 0);
  let bits = 0;
  for (let i = 0; i < TX_BATCHES_PER_KICK; i++) {
    bits |= d.drain();
    if (d.lastCount === 0) return bits; // empty, or the writer holds the ring and looks again
    Atomics.add(c, CTL.POLLER_TX_BATCHES, 1);
  }
  // Stopped with records perhaps left: they are the writer's (it may have
  // found the ring taken and gone to sleep).
  if (d.pending()) signal(c, CTL.WRITER_EVENTS, WEV_TX, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
  return bits;
}

/** Picks the engine: io_uring batches when allowed and the kernel agrees, else `readv`. */
function startEngine(c: Int32Array, mode: IoUringMode): void {
  if (mode === "auto") {
    try {
      uring = IoUring.setup(RX_BATCH);
      const fixed = uring.useFixedFile(tapFd);
      Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_IO_URING);
      control.post({
        kind: "notice",
        message: `tap reads: io_uring, up to ${RX_BATCH} frames per system call into ` +
          `buffers that take ${frameRoom} bytes; else one readv per frame` +
          (fixed ? "" : " (the tap is not a registered file: the kernel refused)"),
      });
      return;
    } catch (e) {
      control.post({
        kind: "notice",
        message: `tap reads: one readv per frame (io_uring unavailable: ${(e as Error).message})`,
      });
    }
  } else {
    control.post({ kind: "notice", message: "tap reads: one readv per frame (--io-uring off)" });
  }
  Atomics.store(c, CTL.POLLER_ENGINE, POLLER_ENGINE_READV);
}

function kick(c: Int32Array, ws: WaitSet, queue: number, bit: number): number {
  const ev = ws.ready(TAG_KICK[queue]);
  if (ev & libc.EPOLLIN) {
    Atomics.add(c, queue === RX_QUEUE ? CTL.RX_KICKS : CTL.TX_KICKS, 1);
    return bit;
  }
  if (ev & BAD_FD) {
    // Not an fd we can wait on: stop watching it until the parent sets another.
    ws.set(TAG_KICK[queue], -1, 0);
    kickFd[queue] = -1;
    Atomics.add(c, CTL.POLLER_ERRORS, 1);
  }
  return 0;
}

/** Watches `fd` for the queue's kicks (-1: none). A descriptor the kernel refuses counts as an error. */
function watchKick(queue: number, fd: number): void {
  letGoOfKick(queue);
  kickFd[queue] = fd;
  if (fd >= 0 && !waits!.set(TAG_KICK[queue], fd, KICK_EVENTS)) {
    kickFd[queue] = -1;
    Atomics.add(ctlBlock!, CTL.POLLER_ERRORS, 1);
  }
}

/**
 * Stops watching the queue's kick eventfd and reads it once: kicks are not
 * read as they come (edge-triggered), so this leaves its counter at zero, as
 * if each had been read, for whoever watches it next (the VMM, or the next
 * start, which looks at the rings anyway).
 */
function letGoOfKick(queue: number): void {
  const fd = kickFd[queue];
  if (fd < 0) return;
  waits?.set(TAG_KICK[queue], -1, 0);
  readEventfd(fd);
  kickFd[queue] = -1;
}

function ringFault(e: unknown): number {
  if (!(e instanceof CorruptRingError)) throw e;
  rxDead = true;
  control.post({ kind: "fault", message: `rx rings: ${e.message}` });
  return EV_IO_FAULT;
}

// ---- control messages ----------------------------------------------------------------

const control = new WorkerControl("poller", {
  init(msg, c) {
    const p = SpscRing.attach(msg.rxPost);
    const d = SpscRing.attach(msg.rxDone);
    regions = IoRegions.from(msg.ranges);
    rxPost = p;
    rxDone = d;
    tapFd = msg.tapFd;
    wakeFd = msg.wakeFd;
    frameRoom = msg.rxFrameRoom;
    ctlBlock = c;
    const ws = new WaitSet();
    if (!ws.set(TAG_WAKE, wakeFd, libc.EPOLLIN)) {
      ws.close();
      throw new Error(`wake fd ${wakeFd} cannot be waited on`);
    }
    waits = ws;
    if (msg.txShared !== null) {
      // TX frames after kicks it read (tx_drain.ts), in turns with the writer.
      const t = new TxDrainer(
        c,
        msg.txShared,
        (n) => control.post(n),
        -1,
        "tap writes after the poller's kicks",
      );
      t.ring = SpscRing.attach(msg.tx);
      t.regions = regions;
      t.tapFd = msg.tapFd;
      t.setTxUsed(msg.txUsed);
      t.callFd = callTxFd;
      t.start(msg.ioUring);
      txDrainer = t;
    }
    rxUsedPlace = msg.rxUsed;
    rxUsed = msg.rxUsed === null ? null : rxUsedViews(msg.rxUsed, regions);
    pubSignalled = -1;
    startEngine(c, msg.ioUring);
    return () => loop(c);
  },
  setRxFrameRoom(bytes) {
    frameRoom = bytes;
  },
  setRegions(r) {
    regions = r;
    txDrainer?.setRegions(r);
    // The RX used ring outside the new regions is not touched again (the
    // parent stops the queues before it unmaps them, so this is a fault).
    if (rxUsedPlace !== null) {
      try {
        rxUsed = rxUsedViews(rxUsedPlace, r);
      } catch (e) {
        rxUsed = null;
        rxUsedPlace = null;
        rxDead = true;
        control.post({ kind: "fault", message: `RX publication stopped: ${(e as Error).message}` });
      }
    }
  },
  setFd(slot, fd) {
    if (slot === "tap") {
      tapFd = fd;
      tapBroken = false;
      uring?.useFixedFile(fd);
      if (txDrainer) txDrainer.tapFd = fd;
    } else if (slot === "callRx") {
      callRxFd = fd;
    } else if (slot === "callTx") {
      callTxFd = fd;
      if (txDrainer) txDrainer.callFd = fd;
    } else {
      watchKick(slot === "kickRx" ? RX_QUEUE : TX_QUEUE, fd);
    }
  },
  // The parent writes the wake eventfd with every message; epoll_wait returns then.
  wake() {},
});
