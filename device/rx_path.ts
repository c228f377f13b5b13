/**
 * Guest receive, the device's part: every chain the guest offers on the RX
 * virtqueue is posted to the poller (rx-post ring), which reads frames from
 * the tap straight into them and completes them itself (RX publication,
 * `ipc/datapath.ts`): num_buffers, the used ring, used->idx and the
 * interrupt are the poller's. The device never writes the RX used ring while
 * the queues run (its Virtqueue throws if asked to); from the poller's
 * RX_PUBLISHED records it only retires chains and counts.
 *
 * A chain the device cannot use (bad descriptors, virtio 1.2 §2.7.4; fewer
 * writable bytes than the net header, §5.1.6.3; more segments than one read
 * takes) is posted as a discard record: the poller completes it with used
 * length 0 in post order with the others, so RX used->idx only ever moves
 * forward. Any other layout is accepted (§2.7.4: the device must not assume
 * one): a chain of more than RX_MAX_IOV segments, the net header spread
 * over one-byte buffers included, goes with its iovecs in the rx-long ring.
 *
 * Trust: rx-done records come from the privileged poller but are checked
 * anyway (counts against what was posted); a record that does not fit is an
 * I/O fault: counted, and the queue is reset.
 *
 * @module
 */

import { type DeviceIoRings, putIovec } from "./io_rings.ts";
import { POP_CHAIN, POP_DROPPED, type Virtqueue } from "./virtqueue.ts";
import {
  CTL,
  IOVEC_WORDS,
  NET_HDR_BYTES,
  RX_DONE,
  RX_LONG_MAX_IOV,
  RX_MAX_IOV,
  RX_POST,
  RX_PUBLISHED,
  RX_STATUS_BAD_HEADER,
  RX_STATUS_TOO_BIG,
  RX_UNUSED,
  RXF_DISCARD,
  RXF_LONG,
  RXF_MERGEABLE,
  WEV_WAKE_POLLER,
} from "../ipc/datapath.ts";

/** Drop reasons of the RX path, beside the queue's own (bad descriptors). */
export const RX_DROP_CHAIN_TOO_SHORT = "CHAIN_SHORTER_THAN_HEADER";
export const RX_DROP_CHAIN_FRAGMENTED = "CHAIN_TOO_FRAGMENTED";

/** Names of the poller's drop statuses, for the counters. */
const IO_DROP_NAMES: Record<number, string> = {
  [RX_STATUS_TOO_BIG]: "FRAME_TOO_BIG",
  [RX_STATUS_BAD_HEADER]: "HEADER_NOT_TAKEN",
};

/** A chain's segments, kept to post it again. */
interface Segments {
  region: Uint16Array;
  offset: Float64Array;
  length: Uint32Array;
}

/** One receive queue's data path. Single-threaded: the device loop calls it. */
export class RxPath {
  frames = 0;
  bytes = 0;
  readonly drops: Record<string, number> = {};
  /** Why the I/O side was last found misbehaving, if it was. */
  ioFault: string | null = null;

  /** MRG_RXBUF negotiated. */
  mergeable = false;

  // Posted chains, oldest first: head, capacity (0: a discard), flags, and
  // their segments (copied, since the queue's chain storage is reused by
  // the next pop): up to RX_MAX_IOV in the shared arrays, more in #long.
  readonly #head: Int32Array;
  readonly #cap: Uint32Array;
  readonly #flags: Uint8Array;
  readonly #segCount: Uint16Array;
  readonly #seg: Segments;
  readonly #long: Array<Segments | undefined>;
  #start = 0;
  #count = 0;

  constructor(
    private readonly queue: Virtqueue,
    private readonly rings: DeviceIoRings,
    private readonly hostBase: Float64Array,
  ) {
    const n = rings.rxPost.capacity;
    this.#head = new Int32Array(n);
    this.#cap = new Uint32Array(n);
    this.#flags = new Uint8Array(n);
    this.#segCount = new Uint16Array(n);
    this.#seg = {
      region: new Uint16Array(n * RX_MAX_IOV),
      offset: new Float64Array(n * RX_MAX_IOV),
      length: new Uint32Array(n * RX_MAX_IOV),
    };
    this.#long = new Array(n);
    // Every time the queue reads avail->idx it first retires what the poller
    // published (Virtqueue.onAvailIdx).
    queue.onAvailIdx = () => {
      if (this.ioFault === null) this.complete();
    };
  }

  /** Chains posted to the poller and not yet completed. */
  get posted(): number {
    return this.#count;
  }

  /** Posts every chain the guest made available, as far as the rings have room. */
  post(): number {
    const post = this.rings.rxPost;
    let n = 0;
    let discards = 0;
    // A bad record found meanwhile (popAvail() retires first) ends the posting.
    while (this.ioFault === null && this.#count < this.#head.length && post.freeSpace() > 0) {
      const r = this.queue.popAvail();
      if (r !== POP_CHAIN && r !== POP_DROPPED) break;
      const chain = this.queue.chain;
      const segs = chain.count - chain.readableCount;
      if (r === POP_CHAIN && segs > RX_MAX_IOV && this.rings.rxLong.freeSpace() === 0) {
        // No rx-long room for it now: it stays the guest's until the poller frees some.
        this.queue.unpopAvail(1);
        break;
      }
      const slot = (this.#start + this.#count) % this.#head.length;
      this.#head[slot] = chain.head;
      this.#long[slot] = undefined;
      let reason: string | null = null;
      // virtio 1.2 §5.1.6.3: the buffers must hold at least the header.
      if (r === POP_DROPPED) reason = "";
      else if (chain.writableBytes < NET_HDR_BYTES) reason = RX_DROP_CHAIN_TOO_SHORT;
      else if (segs > RX_LONG_MAX_IOV) reason = RX_DROP_CHAIN_FRAGMENTED;
      if (reason !== null) {
        // The queue counted a bad chain itself; these two are the RX path's.
        if (reason !== "") this.#count1(reason);
        this.#cap[slot] = 0;
        this.#flags[slot] = RXF_DISCARD;
        this.#segCount[slot] = 0;
        discards++;
      } else {
        this.#cap[slot] = chain.writableBytes;
        this.#flags[slot] = (this.mergeable ? RXF_MERGEABLE : 0) |
          (segs > RX_MAX_IOV ? RXF_LONG : 0);
        this.#segCount[slot] = segs;
        const dst = segs > RX_MAX_IOV ? this.#longSegments(slot, segs) : this.#seg;
        const base = segs > RX_MAX_IOV ? 0 : slot * RX_MAX_IOV;
        for (let i = 0; i < segs; i++) {
          const s = chain.readableCount + i;
          dst.region[base + i] = chain.region[s];
          dst.offset[base + i] = chain.offset[s];
          dst.length[base + i] = chain.length[s];
        }
      }
      this.#count++;
      this.#write(slot);
      n++;
    }
    if (n > 0) this.#publishPosts(discards);
    return n;
  }

  #longSegments(slot: number, segs: number): Segments {
    const s = {
      region: new Uint16Array(segs),
      offset: new Float64Array(segs),
      length: new Uint32Array(segs),
    };
    this.#long[slot] = s;
    return s;
  }

  /**
   * Publishes the records written so far (and counts the discards among
   * them for the poller), and wakes the poller if it starved: it stops
   * polling the tap when it runs dry and waits to be told there is room
   * again (nothing else would tell it while RX kicks are off).
   */
  #publishPosts(discards: number): void {
    this.rings.rxLong.publish();
    this.rings.rxPost.publish();
    if (discards !== 0) Atomics.add(this.rings.ctl, CTL.RX_DISCARDS, discards);
    if (Atomics.load(this.rings.ctl, CTL.POLLER_STARVED) !== 0) {
      this.rings.signalWriter(WEV_WAKE_POLLER);
    }
  }

  /** Writes posted chain `slot` as an rx-post record (and its rx-long record). */
  #write(slot: number): void {
    const post = this.rings.rxPost;
    const w = post.words;
    const at = post.reserve();
    const segs = this.#segCount[slot];
    const flags = this.#flags[slot];
    w[at + RX_POST.IOV_COUNT] = segs;
    w[at + RX_POST.CAPACITY] = this.#cap[slot];
    w[at + RX_POST.TOKEN] = this.#head[slot];
    w[at + RX_POST.FLAGS] = flags;
    if (flags & RXF_LONG) {
      const long = this.rings.rxLong;
      this.#putIovecs(this.#long[slot]!, 0, segs, long.words, long.reserve());
    } else {
      this.#putIovecs(this.#seg, slot * RX_MAX_IOV, segs, w, at + RX_POST.IOV);
    }
  }

  #putIovecs(s: Segments, base: number, n: number, words: Uint32Array, at: number): void {
    for (let i = 0; i < n; i++) {
      const addr = this.hostBase[s.region[base + i]] + s.offset[base + i];
      putIovec(words, at + i * IOVEC_WORDS, addr, s.length[base + i]);
    }
  }

  /**
   * Takes every rx-done record: retires published chains, posts given-back
   * ones again, counts drops. Returns the number of frames delivered; -1 if
   * the I/O side misbehaved (see `ioFault`; the caller should reset the queue).
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
      const published = w[at + RX_DONE.FRAMES];
      ring.release(1);
      if (chains === 0) {
        this.#count1(IO_DROP_NAMES[status] ?? `io_status_${status}`);
        continue;
      }
      let problem: string | null;
      if (status === RX_PUBLISHED) {
        problem = this.#retire(chains, published, bytes);
        if (problem === null) frames += published;
      } else if (status === RX_UNUSED) {
        problem = this.#recycle(chains, bytes);
      } else {
        problem = `rx-done status ${status} with ${chains} chains`;
      }
      if (problem !== null) {
        this.ioFault = problem;
        return -1;
      }
    }
    return frames;
  }

  /**
   * The poller completed the first `chains` posted chains (`frames` frames
   * of `bytes` bytes without headers, and the discards among them). Retires
   * them; returns why the record cannot be right, or null.
   */
  #retire(chains: number, frames: number, bytes: number): string | null {
    if (chains > this.#count) {
      return `rx-done publishes ${chains} chains, ${this.#count} were posted`;
    }
    let discards = 0;
    for (let i = 0; i < chains; i++) {
      if (this.#flags[(this.#start + i) % this.#head.length] & RXF_DISCARD) discards++;
    }
    // Each frame takes at least one chain that is not a discard.
    if (frames > chains - discards || (frames === 0 && discards < chains)) {
      return `rx-done publishes ${frames} frames in ${chains} chains ` +
        `(${discards} discards), ${this.#count} were posted`;
    }
    for (let i = 0; i < chains; i++) {
      try {
        this.queue.retireUsed(this.#head[this.#start]);
      } catch (e) {
        return `rx-done RX_PUBLISHED: ${(e as Error).message}`;
      }
      this.#long[this.#start] = undefined;
      this.#start = (this.#start + 1) % this.#head.length;
      this.#count--;
    }
    this.frames += frames;
    this.bytes += bytes;
    this.queue.counters.bytes += bytes + frames * NET_HDR_BYTES;
    return null;
  }

  /**
   * The poller gave back the first `chains` posted chains unfilled: they go
   * to the back of the posted list and are posted again. Returns why the
   * record cannot be right, or null.
   */
  #recycle(chains: number, bytes: number): string | null {
    if (bytes !== 0 || chains > this.#count) {
      return `rx-done gives back ${chains} chains with ${bytes} bytes, ${this.#count} were posted`;
    }
    const post = this.rings.rxPost;
    const size = this.#head.length;
    let discards = 0;
    for (let i = 0; i < chains; i++) {
      const from = this.#start;
      this.#start = (from + 1) % size;
      // The slot just freed at the front is the same slot at the back: the list is full-size.
      const to = (this.#start + this.#count - 1) % size;
      if (to !== from) {
        this.#head[to] = this.#head[from];
        this.#cap[to] = this.#cap[from];
        this.#flags[to] = this.#flags[from];
        this.#segCount[to] = this.#segCount[from];
        this.#long[to] = this.#long[from];
        this.#long[from] = undefined;
        const s = this.#seg;
        s.region.copyWithin(to * RX_MAX_IOV, from * RX_MAX_IOV, (from + 1) * RX_MAX_IOV);
        s.offset.copyWithin(to * RX_MAX_IOV, from * RX_MAX_IOV, (from + 1) * RX_MAX_IOV);
        s.length.copyWithin(to * RX_MAX_IOV, from * RX_MAX_IOV, (from + 1) * RX_MAX_IOV);
      }
      // The poller releases a chain's records before it reports the chain
      // given back, so their room is free; a full ring means it did not.
      const long = (this.#flags[to] & RXF_LONG) !== 0;
      if (post.freeSpace() === 0 || (long && this.rings.rxLong.freeSpace() === 0)) {
        return `rx-done returned chains whose records are still held`;
      }
      if (this.#flags[to] & RXF_DISCARD) discards++;
      this.#write(to);
    }
    // The poller that gave them back may have starved meanwhile.
    this.#publishPosts(discards);
    return null;
  }

  #count1(reason: string): void {
    this.drops[reason] = (this.drops[reason] ?? 0) + 1;
  }

  /** Forgets every posted chain without completing it (queue stop: the guest re-offers them). */
  forgetPosted(): number {
    const n = this.#count;
    this.#start = 0;
    this.#count = 0;
    this.#long.fill(undefined);
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
    return out;
  }
}
