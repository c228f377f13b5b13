/**
 * The host address ranges an I/O worker's iovec may point into: the guest
 * memory mappings and the bounce arena. Nothing else.
 *
 * Trust: the ranges come from the parent's main thread (trusted); the
 * addresses checked against them come from data-path records, which the
 * device wrote and which are hostile (`ipc/datapath.ts`). {@link IoRegions.contains}
 * is the one check between a record and a `writev`/`readv`: an iovec passes
 * only if `len > 0` and `[base, base + len)` lies inside one granted range.
 *
 * Addresses are Numbers: x86-64 user space ends below 2^47, so every address
 * and every `base + len` (len < 2^32) is exact in a double. Ranges are kept
 * sorted and disjoint in two Float64Arrays; lookup is a binary search, so a
 * table of a few regions (the usual case) costs a handful of compares.
 *
 * @module
 */

/** A host address range: the parent's description of a mapping. */
export interface HostRange {
  /** Host virtual address of the first byte. */
  base: bigint;
  /** Bytes. */
  size: number | bigint;
  /** Guest-physical address of the first byte, for guest memory (dirty logging); absent otherwise. */
  gpa?: bigint;
}

/**
 * What an I/O worker's checks and views need of the memory an iovec may
 * name: {@link IoRegions} over real mappings; tests supply fakes.
 */
export interface HostMemory {
  /** Whether `[base, base + len)` lies inside one range, with len > 0. */
  contains(base: number, len: number): boolean;
  /** The index of the range holding `[base, base + len)` (len > 0), or -1. */
  find(base: number, len: number): number;
  /** Where range `i` starts. */
  start(i: number): number;
  /** The guest-physical address of range `i`'s first byte, or -1 when it is not guest memory. */
  guestAddress(i: number): number;
  /** The bytes of range `i`. */
  bytes(i: number): Uint8Array;
  /**
   * `len` bytes at `addr`, which must lie inside one range, for typed views:
   * a buffer and the offset of `addr` in it.
   * @throws {RangeError} when they do not.
   */
  window(addr: number, len: number): { buffer: ArrayBufferLike; byteOffset: number };
}

/**
 * The one copy-and-check between a data-path record and a system call:
 * copies `count` iovecs ([base lo, base hi, len lo, len hi] words) from
 * `src[from]` into the private `dst[to]`, then checks the copies (never the
 * shared words again): each length's high word 0 and each iovec inside one
 * range of `memory`. Returns the sum of the lengths, or -1 for a bad iovec.
 */
export function copyCheckedIovecs(
  src: Uint32Array,
  from: number,
  dst: Uint32Array,
  to: number,
  count: number,
  memory: HostMemory,
): number {
  const n = count * 4;
  for (let i = 0; i < n; i++) dst[to + i] = src[from + i];
  let sum = 0;
  for (let w = to; w < to + n; w += 4) {
    const len = dst[w + 2];
    if (dst[w + 3] !== 0) return -1;
    if (!memory.contains(dst[w + 1] * 0x1_0000_0000 + dst[w], len)) return -1;
    sum += len;
  }
  return sum;
}

/** x86-64 user addresses are below 2^47 (4-level paging) or 2^56 (5-level); both fit 2^53. */
export const MAX_HOST_ADDRESS = 2 ** 53;

/** An immutable, validated table of ranges. */
export class IoRegions implements HostMemory {
  /** Range starts, ascending. */
  readonly #starts: Float64Array;
  /** Range ends (exclusive), parallel to #starts. */
  readonly #ends: Float64Array;
  /** Guest-physical addresses of the starts, parallel to #starts; -1: not guest memory. */
  readonly #gpas: Float64Array;

  private constructor(starts: Float64Array, ends: Float64Array, gpas: Float64Array) {
    this.#starts = starts;
    this.#ends = ends;
    this.#gpas = gpas;
  }

  /** The table that grants nothing. */
  static readonly EMPTY: IoRegions = new IoRegions(
    new Float64Array(0),
    new Float64Array(0),
    new Float64Array(0),
  );

  /**
   * Builds a table from the parent's ranges.
   * @throws {RangeError} naming the range if one is empty, starts at 0, ends
   *   beyond {@link MAX_HOST_ADDRESS}, overlaps another, or has a guest
   *   address whose range ends beyond 2^53.
   * @throws {TypeError} if a field has the wrong type.
   */
  static from(ranges: readonly HostRange[]): IoRegions {
    const list: Array<[number, number, number]> = [];
    ranges.forEach((r, i) => {
      if (typeof r.base !== "bigint") {
        throw new TypeError(`Range ${i}: base must be a bigint, got ${typeof r.base}`);
      }
      if (typeof r.size !== "bigint" && typeof r.size !== "number") {
        throw new TypeError(`Range ${i}: size must be a number or bigint, got ${typeof r.size}`);
      }
      const size = BigInt(r.size);
      if (r.base <= 0n || size <= 0n || r.base + size > BigInt(MAX_HOST_ADDRESS)) {
        throw new RangeError(
          `Range ${i} [0x${r.base.toString(16)}, +${size}) is empty, at address 0, ` +
            `or ends beyond 2^53`,
        );
      }
      let gpa = -1;
      if (r.gpa !== undefined) {
        if (typeof r.gpa !== "bigint" || r.gpa < 0n || r.gpa + size > BigInt(MAX_HOST_ADDRESS)) {
          throw new RangeError(
            `Range ${i}: guest address must be a bigint whose range ends below 2^53`,
          );
        }
        gpa = Number(r.gpa);
      }
      list.push([Number(r.base), Number(r.base + size), gpa]);
    });
    list.sort((a, b) => a[0] - b[0]);
    for (let i = 1; i < list.length; i++) {
      if (list[i][0] < list[i - 1][1]) {
        throw new RangeError(
          `Ranges overlap: 0x${list[i][0].toString(16)} starts before 0x${
            list[i - 1][1].toString(16)
          } ends`,
        );
      }
    }
    return new IoRegions(
      Float64Array.from(list, (r) => r[0]),
      Float64Array.from(list, (r) => r[1]),
      Float64Array.from(list, (r) => r[2]),
    );
  }

  /** Number of ranges. */
  get size(): number {
    return this.#starts.length;
  }

  /** Byte views over each range, made on first use (`bytes()`). */
  readonly #views: Array<Uint8Array | undefined> = [];

  /**
   * Whether `[base, base + len)` lies inside one granted range, with len > 0.
   * Both arguments are untrusted numbers (from a record's u32 words).
   */
  contains(base: number, len: number): boolean {
    return this.find(base, len) >= 0;
  }

  /** The index of the range holding `[base, base + len)` (len > 0), or -1. */
  find(base: number, len: number): number {
    if (!(len > 0)) return -1;
    const starts = this.#starts;
    // Last range whose start <= base.
    let lo = 0;
    let hi = starts.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (starts[mid] <= base) {
        found = mid;
        lo = mid + 1;
      } else {
        hi = mid - 1;
      }
    }
    return found >= 0 && base + len <= this.#ends[found] ? found : -1;
  }

  /** Where range `i` starts. */
  start(i: number): number {
    return this.#starts[i];
  }

  guestAddress(i: number): number {
    return this.#gpas[i];
  }

  /**
   * The bytes of range `i`, a view over the host memory (FFI; made once per
   * table). It must not be used once the range is revoked: a worker drops
   * the table with its views when the parent replaces it.
   */
  bytes(i: number): Uint8Array {
    let v = this.#views[i];
    if (v === undefined) {
      const size = this.#ends[i] - this.#starts[i];
      const ptr = Deno.UnsafePointer.create(BigInt(this.#starts[i]));
      if (ptr === null) throw new RangeError(`range ${i} starts at address 0`);
      v = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(ptr, size));
      this.#views[i] = v;
    }
    return v;
  }

  window(addr: number, len: number): { buffer: ArrayBuffer; byteOffset: number } {
    if (!this.contains(addr, len)) {
      throw new RangeError(`0x${addr.toString(16)} (+${len}) is not in guest memory`);
    }
    const ptr = Deno.UnsafePointer.create(BigInt(addr))!;
    return { buffer: Deno.UnsafePointerView.getArrayBuffer(ptr, len), byteOffset: 0 };
  }

  /** The ranges, for logs and tests. */
  toJSON(): Array<{ base: string; end: string }> {
    return Array.from(this.#starts, (s, i) => ({
      base: "0x" + s.toString(16),
      end: "0x" + this.#ends[i].toString(16),
    }));
  }
}
