/**
 * The poller's private copies of the RX chains it is about to read into:
 * each rx-post record (and, for a long chain, its rx-long record) is copied
 * out of shared memory and then checked (`ipc/datapath.ts` record layout;
 * every iovec inside one granted range, the capacity their sum) before its
 * iovecs reach a `readv`. The device wrote those records and may be hostile;
 * nothing here reads them again after the copy.
 *
 * The staged chains' iovecs lie back to back in {@link RxStage.iov}, with one
 * spare slot after them for the overflow iovec a read adds, so the array is
 * a `readv` iovec array as it stands.
 *
 * @module
 */

import { IOVEC_WORDS, RX_LONG_MAX_IOV, RX_MAX_IOV, RX_POST, RXF_LONG } from "../../ipc/datapath.ts";
import { copyCheckedIovecs, type HostMemory } from "./regions.ts";

/** UIO_MAXIOV: readv takes at most this many iovecs. */
export const UIO_MAXIOV = 1024;
/** Chain iovecs staged for one readv (the overflow iovec takes the last slot). */
export const STAGE_MAX_IOV = UIO_MAXIOV - 1;

/** What {@link RxStage.stage} made of a record. */
export const STAGED = 1;
/** The record is bad: the chain must be refused. */
export const STAGE_BAD = 0;
/** The chain does not fit the stage beside those staged already. */
export const STAGE_FULL = -1;

/** Validated, private RX chains, oldest first. */
export class RxStage {
  /** The staged chains' iovecs, then one spare slot ([base lo, base hi, len, 0] each). */
  readonly iov = new Uint32Array((STAGE_MAX_IOV + 1) * IOVEC_WORDS);
  /** {@link iov} as bytes, for `readv`. */
  readonly iovBytes = new Uint8Array(this.iov.buffer);
  /** Per staged chain: its iovec count, capacity, rx-post flags and token (head index). */
  readonly count = new Uint32Array(UIO_MAXIOV);
  readonly capacity = new Float64Array(UIO_MAXIOV);
  readonly flags = new Uint32Array(UIO_MAXIOV);
  readonly token = new Uint32Array(UIO_MAXIOV);
  /** Chains, iovecs and bytes staged. */
  chains = 0;
  iovs = 0;
  total = 0;
  /** Staged chains that came with an rx-long record. */
  longs = 0;
  /** Where staged iovecs may point. */
  memory: HostMemory;

  constructor(memory: HostMemory) {
    this.memory = memory;
  }

  /**
   * Copies the rx-post record at `words[off]` into the stage and checks it.
   * A long chain's iovecs are read from `longWords[longOff]` (its rx-long
   * record); pass -1 when the caller has none to give (the record is bad
   * then). Returns {@link STAGED}, {@link STAGE_BAD} or {@link STAGE_FULL}.
   */
  stage(words: Uint32Array, off: number, longWords: Uint32Array, longOff: number): number {
    const count = words[off + RX_POST.IOV_COUNT];
    const capacity = words[off + RX_POST.CAPACITY];
    const flags = words[off + RX_POST.FLAGS];
    const token = words[off + RX_POST.TOKEN];
    const long = (flags & RXF_LONG) !== 0;
    // ipc/datapath.ts rx-post record: 1..RX_MAX_IOV iovecs inline, or up to
    // RX_LONG_MAX_IOV in an rx-long record; capacity >= 1.
    if (count < 1 || count > (long ? RX_LONG_MAX_IOV : RX_MAX_IOV) || capacity < 1) {
      return STAGE_BAD;
    }
    if (long && longOff < 0) return STAGE_BAD;
    if (this.iovs + count > STAGE_MAX_IOV) return STAGE_FULL;
    const sum = copyCheckedIovecs(
      long ? longWords : words,
      long ? longOff : off + RX_POST.IOV,
      this.iov,
      this.iovs * IOVEC_WORDS,
      count,
      this.memory,
    );
    if (sum !== capacity) return STAGE_BAD;
    const c = this.chains;
    this.count[c] = count;
    this.capacity[c] = capacity;
    this.flags[c] = flags;
    this.token[c] = token;
    this.chains = c + 1;
    this.iovs += count;
    this.total += capacity;
    if (long) this.longs++;
    return STAGED;
  }

  /** Iovecs and capacity of the first `chains` staged chains. */
  sumOf(chains: number): { iovs: number; capacity: number } {
    let iovs = 0;
    let capacity = 0;
    for (let i = 0; i < chains; i++) {
      iovs += this.count[i];
      capacity += this.capacity[i];
    }
    return { iovs, capacity };
  }

  /** Drops the first `c` staged chains (consumed); returns how many of them were long. */
  unstage(c: number): number {
    let iovs = 0;
    let cap = 0;
    let longs = 0;
    for (let i = 0; i < c; i++) {
      iovs += this.count[i];
      cap += this.capacity[i];
      if (this.flags[i] & RXF_LONG) longs++;
    }
    this.iov.copyWithin(0, iovs * IOVEC_WORDS, this.iovs * IOVEC_WORDS);
    this.count.copyWithin(0, c, this.chains);
    this.capacity.copyWithin(0, c, this.chains);
    this.flags.copyWithin(0, c, this.chains);
    this.token.copyWithin(0, c, this.chains);
    this.chains -= c;
    this.iovs -= iovs;
    this.total -= cap;
    this.longs -= longs;
    return longs;
  }

  /** Forgets every staged chain (they stay posted: the records were not released). */
  clear(): void {
    this.chains =
      this.iovs =
      this.total =
      this.longs =
        0;
  }

  /**
   * Byte `pos` of the staged chain whose `count` iovecs start at word
   * `iovw` of {@link iov}: sets {@link at} and returns the index in it, or -1.
   */
  byteAt(iovw: number, count: number, pos: number): number {
    const iov = this.iov;
    for (let i = 0; i < count; i++) {
      const w = iovw + i * IOVEC_WORDS;
      const len = iov[w + 2];
      if (pos < len) {
        const addr = iov[w + 1] * 0x1_0000_0000 + iov[w];
        const r = this.memory.find(addr, len);
        if (r < 0) return -1;
        this.at = this.memory.bytes(r);
        return addr - this.memory.start(r) + pos;
      }
      pos -= len;
    }
    return -1;
  }
  /** The bytes {@link byteAt} found its byte in. */
  at: Uint8Array = new Uint8Array(0);
}
