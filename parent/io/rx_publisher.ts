/**
 * RX publication (`ipc/datapath.ts`): the poller completes every RX chain
 * itself, frames and discards alike, and is the only writer of the RX used
 * ring while the queues run. Per frame: the tap's header is checked against
 * what the guest takes (CTL.RX_TAKES), num_buffers is written, and one used
 * element per chain goes in at used->idx onwards; per batch: the
 * RX_PUBLISHED record that tells the device which chains to retire, then
 * used->idx (and CTL.RX_USED_IDX), then, after a full barrier, the
 * interrupt the driver asked for (virtio 1.2 §2.7.10, `ipc/vring_notify.ts`).
 *
 * What it writes in guest memory, and why that is safe: used elements and
 * used->idx in the used ring, whose place the parent computed from the
 * front-end's ring addresses and checked against the granted ranges; and in
 * each frame's first chain the header's flags byte (cleared for a guest
 * without GUEST_CSUM) and num_buffers, inside iovecs the stage checked
 * (`rx_stage.ts`). The header bytes it reads there were written by the tap
 * a moment before, but the guest can change them at any time: each byte is
 * read once and only decides whether the frame is dropped and what is
 * written back into the same guest-owned header, so a guest racing with it
 * can only spoil its own frame. The values it takes from the device
 * (RX_TAKES, RX_USED_IDX, the chains' tokens) are values the device could
 * write into the same guest memory itself.
 *
 * @module
 */

import {
  CTL,
  IOVEC_WORDS,
  NET_HDR_BYTES,
  RX_DONE,
  RX_PUBLISHED,
  RXT_CSUM,
  RXT_ECN,
  RXT_MERGEABLE,
} from "../../ipc/datapath.ts";
import type { SpscRing } from "../../ipc/spsc_ring.ts";
import {
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_UDP_L4,
  VNH_FLAGS,
  VNH_GSO_TYPE,
  VNH_NUM_BUFFERS,
} from "../../ipc/virtio_net_hdr.ts";
import { fullBarrier, usedNotifyWanted } from "../../ipc/vring_notify.ts";
import type { DirtyLog } from "./dirty_log.ts";
import type { HostMemory } from "./regions.ts";
import { CAPTURE_FULL, CAPTURE_OFF, CAPTURE_ON, type CaptureProducer } from "./capture_ring.ts";
import type { RxUsedPlace } from "./protocol.ts";
import type { RxStage } from "./rx_stage.ts";

/** The flags a received header may carry (virtio 1.2 §5.1.6.4). */
const RX_HDR_FLAGS = VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID;

/** The RX used ring and the driver's word, as typed views. */
interface UsedViews {
  /** The used ring's elements: id at 2i, len at 2i + 1. */
  elems: Uint32Array;
  idx: Uint16Array;
  event: Uint16Array;
}

/** Views of the RX used ring and the driver's word; throws RangeError outside `memory`. */
function usedViews(place: RxUsedPlace, memory: HostMemory): UsedViews {
  const window = (addr: bigint, bytes: number, what: string) => {
    try {
      return memory.window(Number(addr), bytes);
    } catch {
      throw new RangeError(`rxUsed.${what} 0x${addr.toString(16)} is not in guest memory`);
    }
  };
  const ring = window(place.ringAddr, 4 + 8 * place.size, "ringAddr");
  const event = window(place.eventAddr, 2, "eventAddr");
  return {
    elems: new Uint32Array(ring.buffer, ring.byteOffset + 4, 2 * place.size),
    idx: new Uint16Array(ring.buffer, ring.byteOffset + 2, 1),
    event: new Uint16Array(event.buffer, event.byteOffset, 1),
  };
}

/** One RX queue's publication, owned by the poller. */
export class RxPublisher {
  readonly #ctl: Int32Array;
  readonly #place: RxUsedPlace;
  readonly #mask: number;
  readonly #signalCall: () => boolean;
  #views: UsedViews;
  /** What the guest takes (RX_TAKES), loaded at each batch's start. */
  #takes = 0;
  /** The next used->idx (u16) of this batch. */
  #next = 0;
  /** used->idx at the last interrupt decision; -1: none yet. */
  #signalled = -1;
  /** Published chains (and their frames and bytes) not yet in an RX_PUBLISHED record. */
  #runChains = 0;
  #runFrames = 0;
  #runBytes = 0;
  /** Chains published since the device was last woken for RX_PUBLISHED records. */
  unsignalled = 0;
  /** The dirty log while the front-end migrates the guest (`dirty_log.ts`), else null. */
  log: DirtyLog | null = null;
  /** `--pcap`: where copies of the received frames go (`capture_ring.ts`); null: no capture. */
  capture: CaptureProducer | null = null;
  /** The capture state, loaded at each batch's start (CAPTURE_OFF without a capture). */
  #capState = CAPTURE_OFF;

  /**
   * @param signalCall writes the RX call eventfd; returns whether it was written
   * @throws {RangeError} when the ring is not inside `memory`
   */
  constructor(
    ctl: Int32Array,
    place: RxUsedPlace,
    memory: HostMemory,
    signalCall: () => boolean,
  ) {
    this.#ctl = ctl;
    this.#place = place;
    this.#mask = place.size - 1;
    this.#signalCall = signalCall;
    this.#views = usedViews(place, memory);
  }

  /** The queue size. */
  get size(): number {
    return this.#mask + 1;
  }

  /**
   * New ranges: views of the ring inside them. The parent stops the queues
   * before it takes their memory away; if the ring is not inside them this
   * throws RangeError and the caller stops publishing.
   */
  setMemory(memory: HostMemory): void {
    this.#views = usedViews(this.#place, memory);
  }

  /** Starts a batch: what the guest takes, and the used->idx to go on from. */
  begin(): void {
    this.#takes = Atomics.load(this.#ctl, CTL.RX_TAKES);
    this.#next = Atomics.load(this.#ctl, CTL.RX_USED_IDX) & 0xffff;
    this.#capState = this.capture === null ? CAPTURE_OFF : this.capture.state();
    if (this.#capState === CAPTURE_ON) this.capture!.stamp();
  }

  /**
   * A frame of `bytes` read into `chains` staged chains from staged index
   * `k0` (its iovecs from word `iovw` of the stage): checks and fixes its
   * header and writes a used element per chain; {@link add} then puts it in
   * the next RX_PUBLISHED record, in chain order. Returns false when the
   * guest cannot take the header as the tap wrote it: nothing is written
   * then, and the caller drops the frame and keeps the chains.
   */
  frame(stage: RxStage, k0: number, iovw: number, chains: number, bytes: number): boolean {
    const takes = this.#takes;
    const count = stage.count[k0];
    const iFlags = stage.byteAt(iovw, count, VNH_FLAGS);
    if (iFlags < 0) return false;
    const flagsAt = stage.at;
    const flags = flagsAt[iFlags];
    const iGso = stage.byteAt(iovw, count, VNH_GSO_TYPE);
    if (iGso < 0) return false;
    const gso = stage.at[iGso];
    const type = gso & ~VIRTIO_NET_HDR_GSO_ECN;
    // virtio 1.2 §5.1.6.4: NEEDS_CSUM and DATA_VALID only; GSO as the guest negotiated.
    if ((flags & ~RX_HDR_FLAGS) !== 0) return false;
    if (gso !== 0) {
      if (type === 0 || type > VIRTIO_NET_HDR_GSO_UDP_L4 || (takes & (1 << type)) === 0) {
        return false;
      }
      if ((gso & VIRTIO_NET_HDR_GSO_ECN) !== 0 && (takes & RXT_ECN) === 0) return false;
    }
    if ((takes & RXT_CSUM) === 0) {
      // §5.1.6.3.1: flags 0 without GUEST_CSUM; a partial checksum cannot be finished here.
      if ((flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) return false;
      if (flags !== 0) flagsAt[iFlags] = 0;
    }
    // §5.1.6.3.1: num_buffers is 1 without MRG_RXBUF.
    const nb = (takes & RXT_MERGEABLE) !== 0 ? chains : 1;
    const iLo = stage.byteAt(iovw, count, VNH_NUM_BUFFERS);
    if (iLo < 0) return false;
    stage.at[iLo] = nb & 0xff;
    const iHi = stage.byteAt(iovw, count, VNH_NUM_BUFFERS + 1);
    if (iHi < 0) return false;
    stage.at[iHi] = nb >>> 8;
    if (this.log !== null) logFrame(this.log, stage, iovw, bytes);
    if (this.#capState !== CAPTURE_OFF) {
      // The frame as the guest gets it: the header with num_buffers (and flags) as written above.
      if (this.#capState === CAPTURE_ON) {
        this.capture!.rx(stage.iov, iovw, stage.iov.length & ~3, bytes, stage.memory);
      } else if (this.#capState === CAPTURE_FULL) {
        this.capture!.overMax();
      }
    }
    let left = bytes;
    let idx = this.#next;
    const elems = this.#views.elems;
    const mask = this.#mask;
    for (let c = k0; c < k0 + chains; c++) {
      const len = Math.min(left, stage.capacity[c]);
      const e = (idx & mask) * 2;
      elems[e] = stage.token[c];
      elems[e + 1] = len;
      left -= len;
      idx = (idx + 1) & 0xffff;
    }
    this.#next = idx;
    return true;
  }

  /** Adds a published frame of `bytes` in `chains` chains to the next RX_PUBLISHED record. */
  add(chains: number, bytes: number): void {
    this.#runChains += chains;
    this.#runFrames++;
    this.#runBytes += bytes - NET_HDR_BYTES;
  }

  /** A chain the device could not use (RXF_DISCARD): its used element, length 0. */
  discard(token: number): void {
    const e = (this.#next & this.#mask) * 2;
    this.#views.elems[e] = token;
    this.#views.elems[e + 1] = 0;
    this.#next = (this.#next + 1) & 0xffff;
    this.#runChains++;
  }

  /** Chains published and not yet in an RX_PUBLISHED record. */
  get pending(): number {
    return this.#runChains;
  }

  /** Pushes the published chains as one RX_PUBLISHED record (the caller checked for room). */
  flush(done: SpscRing): void {
    if (this.#runChains === 0) return;
    const off = done.reserve();
    const w = done.words;
    w[off + RX_DONE.CHAINS] = this.#runChains;
    w[off + RX_DONE.BYTES] = this.#runBytes;
    w[off + RX_DONE.STATUS] = RX_PUBLISHED;
    w[off + RX_DONE.FRAMES] = this.#runFrames;
    this.unsignalled += this.#runChains;
    this.#runChains = this.#runFrames = this.#runBytes = 0;
  }

  /**
   * Ends a batch: stores used->idx (its elements were written before, and
   * the RX_PUBLISHED records pushed), then after a full barrier reads the
   * driver's word and signals the RX call eventfd when it asked (§2.7.10).
   */
  end(): void {
    const idx = this.#next;
    const c = this.#ctl;
    if (idx === (Atomics.load(c, CTL.RX_USED_IDX) & 0xffff)) return;
    const v = this.#views;
    // The elements and the device's words in the ring are logged before the index shows them.
    this.log?.markUsed(this.log.rxUsed);
    Atomics.store(v.idx, 0, idx);
    Atomics.store(c, CTL.RX_USED_IDX, idx);
    fullBarrier();
    const old = this.#signalled;
    this.#signalled = idx;
    if (usedNotifyWanted(this.#place.eventIdx, Atomics.load(v.event, 0), idx, old)) {
      if (this.#signalCall()) Atomics.add(c, CTL.RX_INTERRUPTS, 1);
    }
  }
}

/** Marks the guest pages a frame of `bytes` read into the iovecs from word `iovw` of `stage` covers. */
function logFrame(log: DirtyLog, stage: RxStage, iovw: number, bytes: number): void {
  const iov = stage.iov;
  let left = bytes;
  for (let w = iovw; left > 0 && w + 3 < iov.length; w += IOVEC_WORDS) {
    const len = Math.min(iov[w + 2], left);
    log.markHost(stage.memory, iov[w + 1] * 0x1_0000_0000 + iov[w], len);
    left -= len;
  }
}
