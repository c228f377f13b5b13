/**
 * Guest receive: chains the guest offers on the RX virtqueue are posted to
 * the poller (rx-post ring), which `readv`s frames from the tap straight into
 * them; each rx-done record then becomes used-ring entries with the header
 * fixed up: num_buffers (exactly 1 without MRG_RXBUF, virtio 1.2 §5.1.6.3.1)
 * and, when the guest did not negotiate GUEST_CSUM, a completed checksum.
 *
 * Under RX publication (`ipc/datapath.ts`) the poller completes frames
 * itself; RX_PUBLISHED records then only retire chains and count here, and
 * a chain the device cannot post faults the queue (the used ring is the
 * poller's to write).
 *
 * Trust: rx-done records come from the privileged poller but are checked
 * anyway (counts against what was posted, bytes against capacity); a record
 * that does not fit is an I/O fault: counted, and the queue is reset rather
 * than guest memory written from a bad count.
 *
 * @module
 */

import type { GuestMemory } from "./guest_memory.ts";
import { type DeviceIoRings, putIovec } from "./io_rings.ts";
import {
  createNetHdr,
  gsoOffload,
  NET_DROP_COUNT,
  NET_DROP_NAMES,
  NET_OFFLOAD_CSUM,
  NetDrop,
  readNetHdr,
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  type VirtioNetHdr,
  writeNetHdr,
} from "./net_header.ts";
import { createNetOffloadContext, processRx, takesGso } from "./offload.ts";
import { POP_CHAIN, POP_DROPPED, type Virtqueue } from "./virtqueue.ts";
import {
  CTL,
  IOVEC_WORDS,
  MAX_FRAME_BYTES,
  NET_HDR_BYTES,
  RX_DONE,
  RX_MAX_IOV,
  RX_OK,
  RX_POST,
  RX_PUBLISHED,
  RX_UNUSED,
  RXF_MERGEABLE,
  WEV_WAKE_POLLER,
} from "../ipc/datapath.ts";

/** Drop reasons of the RX path beside NetDrop's. */
export const RX_DROP_CHAIN_TOO_SHORT = "CHAIN_SHORTER_THAN_HEADER";
export const RX_DROP_CHAIN_FRAGMENTED = "CHAIN_TOO_FRAGMENTED";

/**
 * A tap header that no driver may see, whatever it negotiated, and that
 * cannot be fixed up: flags beyond NEEDS_CSUM/DATA_VALID (virtio 1.2
 * §5.1.6.4: RSC_INFO only with GUEST_RSC*, never offered; checked here
 * because GSO headers the driver takes are otherwise passed through), or the
 * ECN bit without a GSO type (Linux virtio_net_hdr_to_skb: -EINVAL).
 */
function rxHeaderUnfixable(hdr: VirtioNetHdr): boolean {
  return (hdr.flags & ~(VIRTIO_NET_HDR_F_NEEDS_CSUM | VIRTIO_NET_HDR_F_DATA_VALID)) !== 0 ||
    hdr.gsoType === VIRTIO_NET_HDR_GSO_ECN;
}

/** One receive queue's data path. Single-threaded: the device loop calls it. */
export class RxPath {
  frames = 0;
  bytes = 0;
  readonly drops: Record<string, number> = {};
  /** Why the I/O side was last found misbehaving, if it was. */
  ioFault: string | null = null;

  /**
   * RX publication (`ipc/datapath.ts`): the poller completes frames itself;
   * rx-done RX_PUBLISHED records only retire chains here. Set at start.
   */
  publish = false;
  /** Why a chain the guest offered could not be posted under RX publication (the queue faults). */
  postFault: string | null = null;

  /** MRG_RXBUF negotiated. */
  mergeable = false;
  /** NET_OFFLOAD_* the driver takes (from GUEST_* features). */
  guestOffloads = 0;

  readonly #hdr: VirtioNetHdr = createNetHdr();
  readonly #hdrBytes = new Uint8Array(NET_HDR_BYTES);
  readonly #frame = new Uint8Array(MAX_FRAME_BYTES);
  readonly #ctx = createNetOffloadContext();

  // Posted chains, oldest first: head, capacity, and their segments (copied,
  // since the queue's chain storage is reused by the next pop).
  readonly #head: Int32Array;
  readonly #cap: Uint32Array;
  readonly #segCount: Uint8Array;
  readonly #segRegion: Uint16Array;
  readonly #segOffset: Float64Array;
  readonly #segLen: Uint32Array;
  #start = 0;
  #count = 0;

  constructor(
    private readonly memory: GuestMemory,
    private readonly queue: Virtqueue,
    private readonly rings: DeviceIoRings,
    private readonly hostBase: Float64Array,
  ) {
    const n = rings.rxPost.capacity;
    this.#head = new Int32Array(n);
    this.#cap = new Uint32Array(n);
    this.#segCount = new Uint8Array(n);
    this.#segRegion = new Uint16Array(n * RX_MAX_IOV);
    this.#segOffset = new Float64Array(n * RX_MAX_IOV);
    this.#segLen = new Uint32Array(n * RX_MAX_IOV);
  }

  /** Chains posted to the poller and not yet filled. */
  get posted(): number {
    return this.#count;
  }

  /** Posts every chain the guest made available, as far as the ring has room. */
  post(): number {
    const ring = this.rings.rxPost;
    let n = 0;
    while (this.#count < this.#head.length && ring.freeSpace() > 0 && this.postFault === null) {
      const r = this.queue.popAvail();
      if (r === POP_DROPPED) continue;
      if (r !== POP_CHAIN) break;
      const chain = this.queue.chain;
      // virtio 1.2 §5.1.6.3: the buffers must hold at least the header; a
      // chain that cannot is returned unused.
      if (chain.writableBytes < NET_HDR_BYTES) {
        this.#drop(RX_DROP_CHAIN_TOO_SHORT, chain.head);
        continue;
      }
      const segs = chain.count - chain.readableCount;
      if (segs > RX_MAX_IOV) {
        this.#drop(RX_DROP_CHAIN_FRAGMENTED, chain.head);
        continue;
      }
      const slot = (this.#start + this.#count) % this.#head.length;
      this.#head[slot] = chain.head;
      this.#cap[slot] = chain.writableBytes;
      this.#segCount[slot] = segs;
      const base = slot * RX_MAX_IOV;
      for (let i = 0; i < segs; i++) {
        const s = chain.readableCount + i;
        this.#segRegion[base + i] = chain.region[s];
        this.#segOffset[base + i] = chain.offset[s];
        this.#segLen[base + i] = chain.length[s];
      }
      this.#count++;
      this.#write(slot);
      n++;
    }
    if (n > 0) this.#publishPosts();
    return n;
  }

  /**
   * Publishes the rx-post records written so far, and wakes the poller if it
   * starved: it stops polling the tap when it runs dry and waits to be told
   * there is room again (nothing else would tell it while RX kicks are off).
   */
  #publishPosts(): void {
    this.rings.rxPost.publish();
    if (Atomics.load(this.rings.ctl, CTL.POLLER_STARVED) !== 0) {
      this.rings.signalWriter(WEV_WAKE_POLLER);
    }
  }

  /** Writes posted chain `slot` as an rx-post record. */
  #write(slot: number): void {
    const ring = this.rings.rxPost;
    const w = ring.words;
    const at = ring.reserve();
    const segs = this.#segCount[slot];
    const base = slot * RX_MAX_IOV;
    w[at + RX_POST.IOV_COUNT] = segs;
    w[at + RX_POST.CAPACITY] = this.#cap[slot];
    w[at + RX_POST.TOKEN] = this.#head[slot];
    w[at + RX_POST.FLAGS] = this.mergeable ? RXF_MERGEABLE : 0;
    for (let i = 0; i < segs; i++) {
      const addr = this.hostBase[this.#segRegion[base + i]] + this.#segOffset[base + i];
      putIovec(w, at + RX_POST.IOV + i * IOVEC_WORDS, addr, this.#segLen[base + i]);
    }
  }

  /**
   * Takes every rx-done record: fixes headers, writes used entries. Returns
   * the number of frames delivered; -1 if the I/O side misbehaved (see
   * `ioFault`; the caller should reset the queue).
   */
  complete(): number {
    const ring = this.rings.rxDone;
    const w = ring.words;
    let frames = 0;
    let n = ring.available();
    while (n-- > 0) {
      const at = ring.peek(0);
      // Copy the words out before judging them.
      const chains = w[at + RX_DONE.CHAINS];
      const bytes = w[at + RX_DONE.BYTES];
      const status = w[at + RX_DONE.STATUS];
      const published = w[at + 3];
      ring.release(1);
      if (chains === 0) {
        this.drops[`io_status_${status}`] = (this.drops[`io_status_${status}`] ?? 0) + 1;
        continue;
      }
      if (status === RX_PUBLISHED) {
        const problem = this.#retire(chains, published, bytes);
        if (problem) {
          this.ioFault = problem;
          return -1;
        }
        frames += published;
        continue;
      }
      if (status === RX_UNUSED) {
        // Given back unfilled (a batch of reads ran dry before a later one hit): post again.
        if (bytes !== 0 || chains > this.#count) {
          this.ioFault = `rx-done gives back ${chains} chains with ${bytes} bytes, ` +
            `${this.#count} were posted`;
          return -1;
        }
        this.#recycle(chains);
        if (this.ioFault !== null) return -1;
        continue;
      }
      const problem = this.#check(chains, bytes, status);
      if (problem) {
        this.ioFault = problem;
        return -1;
      }
      this.#deliver(chains, bytes);
      if (this.ioFault !== null) return -1;
      frames++;
    }
    return frames;
  }

  /**
   * RX publication: the poller completed the first `chains` posted chains
   * (`frames` frames of `bytes` bytes without headers). Retires them; returns
   * why the record cannot be right, or null.
   */
  #retire(chains: number, frames: number, bytes: number): string | null {
    if (!this.publish) return `rx-done RX_PUBLISHED without RX publication`;
    if (chains > this.#count || frames > chains || frames === 0) {
      return `rx-done publishes ${frames} frames in ${chains} chains, ${this.#count} were posted`;
    }
    for (let i = 0; i < chains; i++) {
      try {
        this.queue.retireUsed(this.#head[this.#start]);
      } catch (e) {
        return `rx-done RX_PUBLISHED: ${(e as Error).message}`;
      }
      this.#start = (this.#start + 1) % this.#head.length;
      this.#count--;
    }
    this.frames += frames;
    this.bytes += bytes;
    this.queue.counters.bytes += bytes + frames * NET_HDR_BYTES;
    return null;
  }

  /**
   * Turns RX publication on (at start, before the first post): from then on
   * the poller completes frames, and every time the queue reads avail->idx
   * the rx-done records are taken first (see `Virtqueue.onAvailIdx`).
   */
  startPublishing(): void {
    this.publish = true;
    this.queue.onAvailIdx = () => {
      if (this.ioFault === null) this.complete();
    };
  }

  /** Why an rx-done record cannot be right, or null. */
  #check(chains: number, bytes: number, status: number): string | null {
    if (status !== RX_OK) return `rx-done status ${status} with ${chains} chains`;
    if (this.publish) return `rx-done RX_OK under RX publication (the poller completes frames)`;
    if (chains > this.#count) return `rx-done names ${chains} chains, ${this.#count} were posted`;
    if (!this.mergeable && chains !== 1) return `rx-done names ${chains} chains without MRG_RXBUF`;
    let before = 0;
    for (let i = 0; i < chains - 1; i++) before += this.#cap[(this.#start + i) % this.#head.length];
    const last = this.#cap[(this.#start + chains - 1) % this.#head.length];
    // readv fills chains in order: all but the last are full, the last is not empty.
    if (bytes <= before || bytes > before + last) {
      return `rx-done: ${bytes} bytes do not fit ${chains} chains of ${before + last} bytes`;
    }
    if (bytes < NET_HDR_BYTES) return `rx-done: ${bytes} bytes is less than the net header`;
    return null;
  }

  /** Turns `chains` filled chains holding `bytes` into used entries. */
  #deliver(chains: number, bytes: number): void {
    const first = this.#start;
    this.#readSlot(first, 0, this.#hdrBytes);
    const hdr = this.#hdr;
    readNetHdr(this.#hdrBytes, 0, hdr);
    const frameLen = bytes - NET_HDR_BYTES;
    let ok = true;
    if (rxHeaderUnfixable(hdr)) {
      this.#count1(NET_DROP_NAMES[NetDrop.RX_HDR_INVALID]);
      ok = false;
    } else if (this.#needsSoftware(hdr)) {
      ok = this.#software(chains, frameLen);
    }
    if (!ok) {
      // The frame cannot be delivered as it is: offer the same buffers again.
      this.#recycle(chains);
      return;
    }
    hdr.numBuffers = this.mergeable ? chains : 1;
    writeNetHdr(hdr, this.#hdrBytes, 0);
    this.#writeSlot(first, 0, this.#hdrBytes);
    let left = bytes;
    for (let i = 0; i < chains; i++) {
      const slot = this.#start;
      const len = Math.min(left, this.#cap[slot]);
      this.queue.pushUsed(this.#head[slot], len);
      left -= len;
      this.#start = (slot + 1) % this.#head.length;
      this.#count--;
    }
    this.frames++;
    this.bytes += frameLen;
  }

  /** Whether the tap's header asks for work the guest did not negotiate. */
  #needsSoftware(hdr: VirtioNetHdr): boolean {
    const guestCsum = (this.guestOffloads & NET_OFFLOAD_CSUM) !== 0;
    if (gsoOffload(hdr.gsoType) !== 0) return !takesGso(this.guestOffloads, hdr.gsoType);
    // Without GUEST_CSUM, flags must be 0 (§5.1.6.3.1): partial checksums get completed.
    return hdr.flags !== 0 && (!guestCsum || (hdr.flags & ~3) !== 0);
  }

  /**
   * The slow path (TUNSCAP should make it rare): gather the frame, let
   * processRx complete the checksum, write it back. GSO the guest cannot take
   * is dropped here, counted, rather than spread over buffers in flight.
   */
  #software(chains: number, frameLen: number): boolean {
    const hdr = this.#hdr;
    if (gsoOffload(hdr.gsoType) !== 0) {
      this.#count1(NET_DROP_NAMES[NetDrop.OFFLOAD_UNSUPPORTED]);
      return false;
    }
    const frame = this.#frame.subarray(0, frameLen);
    this.#gather(chains, frame);
    let delivered = false;
    const code = processRx(this.#ctx, hdr, frame, frameLen, this.guestOffloads, (h, b, l) => {
      if (b === frame && l === frameLen) {
        delivered = true;
        this.#scatter(chains, frame);
        if (h !== hdr) Object.assign(hdr, h);
      }
    });
    if (code !== NetDrop.OK || !delivered) {
      this.#count1(code < NET_DROP_COUNT ? NET_DROP_NAMES[code] || `code${code}` : `code${code}`);
      return false;
    }
    return true;
  }

  #count1(reason: string): void {
    this.drops[reason] = (this.drops[reason] ?? 0) + 1;
  }

  #drop(reason: string, head: number): void {
    this.#count1(reason);
    if (this.publish) {
      // The used ring is the poller's to write: such a chain cannot be returned from here.
      this.postFault = `RX chain ${head} cannot be used (${reason}) and RX completions are the ` +
        `poller's to publish`;
      return;
    }
    this.queue.pushUsed(head, 0);
  }

  /** Moves the first `chains` posted chains to the back of the posted list and re-posts them. */
  #recycle(chains: number): void {
    const ring = this.rings.rxPost;
    for (let i = 0; i < chains; i++) {
      const from = this.#start;
      this.#start = (from + 1) % this.#head.length;
      // The slot just freed at the front is the same slot at the back: the list is full-size.
      const to = (this.#start + this.#count - 1) % this.#head.length;
      if (to !== from) {
        this.#head[to] = this.#head[from];
        this.#cap[to] = this.#cap[from];
        this.#segCount[to] = this.#segCount[from];
        this.#segRegion.copyWithin(to * RX_MAX_IOV, from * RX_MAX_IOV, (from + 1) * RX_MAX_IOV);
        this.#segOffset.copyWithin(to * RX_MAX_IOV, from * RX_MAX_IOV, (from + 1) * RX_MAX_IOV);
        this.#segLen.copyWithin(to * RX_MAX_IOV, from * RX_MAX_IOV, (from + 1) * RX_MAX_IOV);
      }
      // The poller releases a chain's post record before it reports the chain
      // done, so its record's room is free; a full ring means it did not.
      if (ring.freeSpace() === 0) {
        this.ioFault ??= `rx-done returned chains whose rx-post records are still held`;
        return;
      }
      this.#write(to);
    }
    // The poller that gave them back may have starved meanwhile.
    this.#publishPosts();
  }

  /** Copies `dst.length` bytes from posted chain `slot`, starting `from` bytes in. */
  #readSlot(slot: number, from: number, dst: Uint8Array): void {
    this.#copySlot(slot, from, dst, false);
  }

  #writeSlot(slot: number, to: number, src: Uint8Array): void {
    this.#copySlot(slot, to, src, true);
  }

  #copySlot(slot: number, at: number, buf: Uint8Array, toGuest: boolean): number {
    const base = slot * RX_MAX_IOV;
    let skip = at;
    let done = 0;
    for (let i = 0; i < this.#segCount[slot] && done < buf.length; i++) {
      const len = this.#segLen[base + i];
      if (skip >= len) {
        skip -= len;
        continue;
      }
      const region = this.memory.region(this.#segRegion[base + i]);
      if (!region) return done;
      const n = Math.min(len - skip, buf.length - done);
      const start = this.#segOffset[base + i] + skip;
      if (toGuest) region.bytes.set(buf.subarray(done, done + n), start);
      else buf.set(region.bytes.subarray(start, start + n), done);
      done += n;
      skip = 0;
    }
    return done;
  }

  /** Gathers the frame (after the header) from the first `chains` posted chains. */
  #gather(chains: number, frame: Uint8Array): void {
    this.#walkFrame(chains, frame, false);
  }

  #scatter(chains: number, frame: Uint8Array): void {
    this.#walkFrame(chains, frame, true);
  }

  #walkFrame(chains: number, frame: Uint8Array, toGuest: boolean): void {
    let pos = 0;
    let skip = NET_HDR_BYTES;
    for (let c = 0; c < chains && pos < frame.length; c++) {
      const slot = (this.#start + c) % this.#head.length;
      const cap = this.#cap[slot];
      if (skip >= cap) {
        skip -= cap;
        continue;
      }
      const n = Math.min(cap - skip, frame.length - pos);
      pos += this.#copySlot(slot, skip, frame.subarray(pos, pos + n), toGuest);
      skip = 0;
    }
  }

  /** Forgets every posted chain without completing it (queue stop: the guest re-offers them). */
  forgetPosted(): number {
    const n = this.#count;
    this.#start = 0;
    this.#count = 0;
    return n;
  }

  /** Heads of the posted chains, oldest first. */
  postedHeads(): number[] {
    const out: number[] = [];
    for (let i = 0; i < this.#count; i++) {
      out.push(this.#head[(this.#start + i) % this.#head.length]);
    }
    return out;
  }

  counters(): Record<string, number> {
    const out: Record<string, number> = {
      frames: this.frames,
      bytes: this.bytes,
      posted: this.#count,
    };
    for (const [k, v] of Object.entries(this.drops)) out[`drop_${k}`] = v;
    out.csumCompleted = this.#ctx.stats.csumCompleted;
    return out;
  }
}
