/**
 * Split virtqueue (virtio 1.2 §2.7), device side.
 *
 * Trust: the descriptor table, the avail ring and the used ring live in guest
 * memory, and the guest may change any of it at any time. Ring indices are
 * read with `Atomics.load` and the used index published with `Atomics.store`
 * (guest memory is an ordinary, non-shared ArrayBuffer, on which Atomics
 * still order accesses), so the JIT cannot reorder or hoist them. Chains are walked and
 * validated by `walkChain()` (chain.ts) only.
 *
 * Failure policy (STYLE.md habit 5):
 * - A bad chain (address outside memory, wrong direction, readable after
 *   writable, indirect misuse, too long, ...) is the guest's problem with one
 *   request. Its head is a valid, unused index, so the device returns it with
 *   used length 0 (the buffer is consumed, nothing was written), counts the
 *   reason, and carries on: `popAvail()` returns POP_DROPPED.
 * - A corrupt ring is different: the device can no longer tell which
 *   descriptors the driver owns. That covers avail->idx moving so far that
 *   more than queue-size chains would be outstanding (offered + in flight +
 *   completed but unpublished; §2.7.6.1: the driver MUST NOT decrement idx,
 *   and each chain holds one of the queue-size descriptors), a head or a
 *   next index >= queue size
 *   (§2.7.5), a chain longer than the queue size, i.e. a loop (§2.7.5.2:
 *   loops are forbidden; §2.7.5.3.1: no chain longer than the queue size), an
 *   avail entry naming a head the device still holds, and ring memory that
 *   was revoked. The queue enters `needs-reset` with a recorded reason, stops
 *   touching the rings (no more used entries are published), and refuses work
 *   until `reset()`/`configure()`. The caller should then set
 *   DEVICE_NEEDS_RESET and raise the config interrupt (§2.1.2: "The device
 *   SHOULD set DEVICE_NEEDS_RESET when it enters an error state that a reset
 *   is needed"). QEMU does the same by marking the device broken
 *   (`virtio_error`); unlike QEMU, vionet keeps the per-chain class local.
 *   Loops and bad next indices inside an indirect table are per-chain: the
 *   table belongs to one request and the main ring stays consistent.
 * - A bug on our side (completing a head that is not in flight, bad config
 *   arguments, writing a used ring handed over to another publisher) throws.
 *
 * Another publisher: a queue whose used ring another thread writes (the
 * poller for RX, `ipc/datapath.ts`) is handed over with `handOverUsed()`.
 * From then on the device writes nothing in that ring: a bad chain stays in
 * flight and `popAvail()` returns it as POP_DROPPED for the caller to hand
 * to the publisher, and any attempt to write or publish a used element
 * throws, until `takeBackUsed()`.
 *
 * @module
 */

import { hex } from "../ipc/hex.ts";
import {
  CHAIN_ERROR_NAMES,
  CHAIN_OK,
  type ChainDirection,
  type ChainWalkConfig,
  DEFAULT_MAX_INDIRECT_ENTRIES,
  DEFAULT_MAX_SEGMENTS,
  DescriptorChain,
  FIRST_RING_ERROR,
  MAX_CHAIN_BYTES,
  VIRTQ_DESC_SIZE,
  walkChain,
} from "./chain.ts";
import { type GuestMemory, NO_REGION } from "./guest_memory.ts";
import {
  createQueueCounters,
  type QueueCounters,
  type QueueErrorReason,
} from "./queue_counters.ts";
import { VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC } from "../ipc/features.ts";
import { fullBarrier, usedNotifyWanted } from "../ipc/vring_notify.ts";

/** virtio 1.2 §2.7: the largest queue size. */
export const VIRTQ_MAX_SIZE = 32768;
/** virtio 1.2 §2.7 table: minimum alignment of each part. */
export const VIRTQ_DESC_ALIGN = 16;
export const VIRTQ_AVAIL_ALIGN = 2;
export const VIRTQ_USED_ALIGN = 4;

/** virtio 1.2 §2.7.6: struct virtq_avail { le16 flags; le16 idx; le16 ring[N]; le16 used_event; } */
export const VIRTQ_AVAIL_OFF_FLAGS = 0;
export const VIRTQ_AVAIL_OFF_IDX = 2;
export const VIRTQ_AVAIL_OFF_RING = 4;
export { VIRTQ_AVAIL_F_NO_INTERRUPT, vringNeedEvent } from "../ipc/vring_notify.ts";

/**
 * virtio 1.2 §2.7.8: struct virtq_used { le16 flags; le16 idx;
 * struct virtq_used_elem { le32 id; le32 len; } ring[N]; le16 avail_event; }
 */
export const VIRTQ_USED_OFF_FLAGS = 0;
export const VIRTQ_USED_OFF_IDX = 2;
export const VIRTQ_USED_OFF_RING = 4;
export const VIRTQ_USED_ELEM_SIZE = 8;
/** virtio 1.2 §2.7.10: the device does not want available buffer notifications. */
export const VIRTQ_USED_F_NO_NOTIFY = 1;

/** virtio 1.2 §2.7 table: 16 * N bytes. */
export function descTableSize(size: number): number {
  return VIRTQ_DESC_SIZE * size;
}
/** virtio 1.2 §2.7 table: 6 + 2 * N bytes (used_event included). */
export function availRingSize(size: number): number {
  return 6 + 2 * size;
}
/** virtio 1.2 §2.7 table: 6 + 8 * N bytes (avail_event included). */
export function usedRingSize(size: number): number {
  return 6 + VIRTQ_USED_ELEM_SIZE * size;
}

/** `popAvail()` found nothing new. */
export const POP_EMPTY = 0;
/** `popAvail()` put a validated chain in `queue.chain`; complete it with `pushUsed()`. */
export const POP_CHAIN = 1;
/** `popAvail()` returned a bad chain to the guest (used len 0, counted); call again. */
export const POP_DROPPED = 2;
/** The queue is in `needs-reset`; see `resetReason`. */
export const POP_NEEDS_RESET = 3;
/** The queue is not configured (or was stopped). */
export const POP_DISABLED = 4;
/** One of the POP_* codes. */
export type PopResult = 0 | 1 | 2 | 3 | 4;

/** Which address space the ring addresses are in. */
export type RingAddressSpace = "guest-physical" | "user";

/** Ring placement and negotiated features (virtio-pci queue registers, or vhost-user SET_VRING_*). */
export interface VirtqueueConfig {
  /** Queue size: a power of 2, 1..32768 (§2.7). */
  size: number;
  /** Descriptor table address (16-byte aligned). */
  desc: number;
  /** Avail ring address (2-byte aligned). */
  avail: number;
  /** Used ring address (4-byte aligned). */
  used: number;
  /** "user" for vhost-user SET_VRING_ADDR (VMM virtual addresses); default "guest-physical". */
  addressSpace?: RingAddressSpace;
  /** Negotiated feature bits; VIRTIO_RING_F_EVENT_IDX and VIRTIO_RING_F_INDIRECT_DESC matter here. */
  features: bigint;
}

/** Fixed properties of a queue's role. */
export interface VirtqueueOptions {
  /** For messages ("rx0", "tx0"). */
  name?: string;
  /** CHAIN_DEVICE_READABLE for TX, CHAIN_DEVICE_WRITABLE for RX, CHAIN_ANY otherwise. */
  direction: ChainDirection;
  /** Cap on a chain's total bytes (default and maximum 2^32 - 1). */
  maxChainBytes?: number;
  /** Cap on entries in one indirect table (default 1024). */
  maxIndirectEntries?: number;
  /** Cap on segments per chain (default 2048). */
  maxSegments?: number;
}

/** "disabled": not configured or stopped; "ready": running; "needs-reset": saw a corrupt ring. */
export type VirtqueueState = "disabled" | "ready" | "needs-reset";

interface RingPlace {
  view: DataView;
  offset: number;
  buffer: ArrayBuffer;
}

/**
 * One split virtqueue. Single-threaded: only the device worker calls it.
 *
 * Typical TX loop:
 * ```ts
 * for (;;) {
 *   const r = q.popAvail();
 *   if (r === POP_DROPPED) continue;
 *   if (r !== POP_CHAIN) break;        // EMPTY, NEEDS_RESET, DISABLED
 *   ... use q.chain with chainRead() ...
 *   q.pushUsed(q.chain.head, 0);
 * }
 * q.flushUsed();
 * if (q.needsInterrupt()) signal();
 * ```
 */
export class Virtqueue {
  /** Counters; a plain object the caller may read or copy at any time. */
  readonly counters: QueueCounters = createQueueCounters();
  /** The chain filled by the last successful `popAvail()` (reused storage). */
  readonly chain: DescriptorChain;
  readonly name: string;
  readonly direction: ChainDirection;
  readonly maxChainBytes: number;
  readonly maxIndirectEntries: number;

  #memory: GuestMemory;
  #state: VirtqueueState = "disabled";
  #resetReason: string | null = null;
  #config: VirtqueueConfig | null = null;
  #size = 0;
  #mask = 0;
  #eventIdx = false;
  #indirect = false;
  #epoch = -1;
  #walk: ChainWalkConfig | null = null;
  #avail: RingPlace | null = null;
  #used: RingPlace | null = null;
  #availU16: Uint16Array = new Uint16Array(0);
  #usedU16: Uint16Array = new Uint16Array(0);
  #lastAvail = 0;
  #shadowAvail = 0;
  #usedIdx = 0;
  #pending = 0;
  #signalled = 0;
  #signalledValid = false;
  #notify = true;
  #inFlight: Uint8Array = new Uint8Array(0);
  #inFlightCount = 0;
  #lastDrop: QueueErrorReason | null = null;
  /** The used ring is another publisher's (`handOverUsed()`). */
  #usedByOther = false;
  /** Head popped at each avail position (by position & mask), -1 once completed or dropped. */
  #popped: Int32Array = new Int32Array(0);
  /** Avail position each in-flight head was popped at. */
  #positionOf: Uint16Array = new Uint16Array(0);

  constructor(memory: GuestMemory, options: VirtqueueOptions) {
    const d = options.direction;
    if (d !== 0 && d !== 1 && d !== 2) {
      throw new RangeError(`Virtqueue direction ${d} is not a ChainDirection`);
    }
    const maxBytes = options.maxChainBytes ?? MAX_CHAIN_BYTES;
    if (!Number.isInteger(maxBytes) || maxBytes < 1 || maxBytes > MAX_CHAIN_BYTES) {
      throw new RangeError(`maxChainBytes ${maxBytes} must be in [1, 2^32 - 1]`);
    }
    const maxIndirect = options.maxIndirectEntries ?? DEFAULT_MAX_INDIRECT_ENTRIES;
    if (!Number.isInteger(maxIndirect) || maxIndirect < 1 || maxIndirect > 0xffff) {
      throw new RangeError(`maxIndirectEntries ${maxIndirect} must be in [1, 65535]`);
    }
    this.#memory = memory;
    this.name = options.name ?? "vq";
    this.direction = d;
    this.maxChainBytes = maxBytes;
    this.maxIndirectEntries = maxIndirect;
    this.chain = new DescriptorChain(options.maxSegments ?? DEFAULT_MAX_SEGMENTS);
  }

  /** Current state. */
  get state(): VirtqueueState {
    return this.#state;
  }
  /** True after a corrupt ring was seen, until `reset()` or `configure()`. */
  get needsReset(): boolean {
    return this.#state === "needs-reset";
  }
  /** Why the queue needs a reset ("LOOP: ..."), or null. */
  get resetReason(): string | null {
    return this.#resetReason;
  }
  /** Reason of the last dropped chain, or null. */
  get lastDropReason(): QueueErrorReason | null {
    return this.#lastDrop;
  }
  /** Configured queue size (0 when not configured). */
  get size(): number {
    return this.#size;
  }
  /** VIRTIO_RING_F_EVENT_IDX in effect. */
  get eventIdx(): boolean {
    return this.#eventIdx;
  }
  /** VIRTIO_RING_F_INDIRECT_DESC in effect. */
  get indirect(): boolean {
    return this.#indirect;
  }
  /** Chains popped and not yet completed. */
  get inFlight(): number {
    return this.#inFlightCount;
  }
  /** Used entries written but not yet published by `flushUsed()`. */
  get pendingUsed(): number {
    return this.#pending;
  }
  /** Whether the device currently asks the driver for kicks. */
  get notificationsEnabled(): boolean {
    return this.#notify;
  }

  /**
   * The ring words as they are now, for a stalled queue's diagnosis (who
   * waits on whom): avail->idx and flags, used->idx and flags in guest
   * memory, used_event and avail_event (EVENT_IDX), and the device's own
   * last_avail_idx and used index. Empty when the queue is not started.
   */
  ringState(): Record<string, number> {
    if (this.#availU16.length === 0 || this.#usedU16.length === 0) return {};
    const a = this.#availU16, u = this.#usedU16, n = this.#size;
    const out: Record<string, number> = {
      ring_availIdx: Atomics.load(a, VIRTQ_AVAIL_OFF_IDX >> 1),
      ring_lastAvail: this.#lastAvail,
      ring_usedIdx: Atomics.load(u, VIRTQ_USED_OFF_IDX >> 1),
      ring_deviceUsedIdx: this.#usedIdx,
      ring_availFlags: Atomics.load(a, VIRTQ_AVAIL_OFF_FLAGS >> 1),
      ring_usedFlags: Atomics.load(u, VIRTQ_USED_OFF_FLAGS >> 1),
      ring_inFlight: this.#inFlightCount,
    };
    if (this.#eventIdx) {
      out.ring_usedEvent = Atomics.load(a, (VIRTQ_AVAIL_OFF_RING >> 1) + n);
      out.ring_availEvent = Atomics.load(u, (VIRTQ_USED_OFF_RING >> 1) + 4 * n);
    }
    return out;
  }

  /**
   * Next avail ring position the device will read (vhost-user SET/GET_VRING_BASE).
   * Setting it makes the next `popAvail()` re-read avail->idx.
   */
  get lastAvailIdx(): number {
    return this.#lastAvail;
  }
  set lastAvailIdx(v: number) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffff) {
      throw new RangeError(`last_avail_idx ${v} must be in [0, 65535]`);
    }
    this.#lastAvail = v;
    this.#shadowAvail = v;
  }

  /** The used->idx value the device last published (or will publish from). */
  get usedIdx(): number {
    return this.#usedIdx;
  }
  set usedIdx(v: number) {
    if (!Number.isInteger(v) || v < 0 || v > 0xffff) {
      throw new RangeError(`used_idx ${v} must be in [0, 65535]`);
    }
    if (this.#pending !== 0) {
      throw new RangeError(
        `Cannot set used_idx of ${this.name}: ${this.#pending} entries unflushed`,
      );
    }
    this.#usedIdx = v;
    this.#signalledValid = false;
  }

  /**
   * Places the rings and starts the queue. Validates the size (power of 2,
   * 1..32768), each address (integer, aligned per §2.7.1, whole part inside
   * one granted region, aligned inside the region's buffer), and that the
   * used ring, which the device writes, overlaps neither the descriptor
   * table nor the avail ring (§2.7.5.1: the device MUST NOT write to any
   * descriptor table entry). Keeps `lastAvailIdx`; reads `usedIdx` from the
   * ring's used->idx. Throws RangeError naming what was wrong; the queue is
   * then left disabled.
   */
  configure(config: VirtqueueConfig): void {
    this.#state = "disabled";
    this.#config = null;
    const size = config.size;
    if (!Number.isInteger(size) || size < 1 || size > VIRTQ_MAX_SIZE || (size & (size - 1)) !== 0) {
      throw new RangeError(
        `Cannot configure ${this.name}: queue size ${size} is not a power of 2 in [1, 32768]`,
      );
    }
    if (typeof config.features !== "bigint") {
      throw new TypeError(`Cannot configure ${this.name}: features must be a bigint`);
    }
    const space = config.addressSpace ?? "guest-physical";
    if (space !== "guest-physical" && space !== "user") {
      throw new RangeError(`Cannot configure ${this.name}: unknown address space ${space}`);
    }
    const parts: [string, number, number, number][] = [
      ["descriptor table", config.desc, descTableSize(size), VIRTQ_DESC_ALIGN],
      ["avail ring", config.avail, availRingSize(size), VIRTQ_AVAIL_ALIGN],
      ["used ring", config.used, usedRingSize(size), VIRTQ_USED_ALIGN],
    ];
    for (const [what, addr, , align] of parts) {
      if (typeof addr !== "number" || !Number.isSafeInteger(addr) || addr < 0) {
        throw new RangeError(`Cannot configure ${this.name}: ${what} address ${addr} is invalid`);
      }
      // §2.7.1: the first byte of each part is aligned.
      if (addr % align !== 0) {
        throw new RangeError(
          `Cannot configure ${this.name}: ${what} address ${
            hex(addr)
          } is not ${align}-byte aligned`,
        );
      }
    }
    const [, uAddr, uLen] = parts[2];
    for (const [what, addr, len] of parts.slice(0, 2)) {
      if (uAddr < addr + len && addr < uAddr + uLen) {
        throw new RangeError(
          `Cannot configure ${this.name}: used ring ${hex(uAddr)} overlaps the ${what} at ${
            hex(addr)
          }`,
        );
      }
    }
    this.#size = size;
    this.#mask = size - 1;
    this.#eventIdx = (config.features & VIRTIO_RING_F_EVENT_IDX) !== 0n;
    this.#indirect = (config.features & VIRTIO_RING_F_INDIRECT_DESC) !== 0n;
    this.#config = { ...config, addressSpace: space };
    const err = this.#map();
    if (err !== null) {
      this.#config = null;
      this.#size = 0;
      throw new RangeError(`Cannot configure ${this.name}: ${err}`);
    }
    if (this.#inFlight.length !== size) {
      this.#inFlight = new Uint8Array(size);
      this.#popped = new Int32Array(size);
      this.#positionOf = new Uint16Array(size);
    } else {
      this.#inFlight.fill(0);
    }
    this.#popped.fill(-1);
    this.#inFlightCount = 0;
    this.#pending = 0;
    this.#shadowAvail = this.#lastAvail;
    this.#usedIdx = Atomics.load(this.#usedU16, VIRTQ_USED_OFF_IDX >> 1);
    this.#signalledValid = false;
    this.#notify = true;
    this.#resetReason = null;
    this.#state = "ready";
  }

  /**
   * Re-translates the ring addresses against the current memory table (after
   * SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG). Done automatically on the
   * next ring access when `GuestMemory.epoch` changed; a failure puts the
   * queue in needs-reset (RING_UNMAPPED). Returns whether the queue is ready.
   */
  remap(): boolean {
    if (this.#state !== "ready") return false;
    const err = this.#map();
    if (err !== null) {
      this.#fail("RING_UNMAPPED", err);
      return false;
    }
    return true;
  }

  /** Translates the three parts; returns an error message or null. */
  #map(): string | null {
    const c = this.#config!;
    const size = this.#size;
    const desc = this.#place("descriptor table", c.desc, descTableSize(size), VIRTQ_DESC_ALIGN);
    if (typeof desc === "string") return desc;
    const avail = this.#place("avail ring", c.avail, availRingSize(size), VIRTQ_AVAIL_ALIGN);
    if (typeof avail === "string") return avail;
    const used = this.#place("used ring", c.used, usedRingSize(size), VIRTQ_USED_ALIGN);
    if (typeof used === "string") return used;
    this.#avail = avail;
    this.#used = used;
    this.#availU16 = new Uint16Array(avail.buffer, avail.offset, availRingSize(size) >> 1);
    this.#usedU16 = new Uint16Array(used.buffer, used.offset, usedRingSize(size) >> 1);
    this.#walk = {
      memory: this.#memory,
      tableView: desc.view,
      tableOffset: desc.offset,
      queueSize: size,
      indirect: this.#indirect,
      direction: this.direction,
      maxChainBytes: this.maxChainBytes,
      maxIndirectEntries: this.maxIndirectEntries,
    };
    this.#epoch = this.#memory.epoch;
    return null;
  }

  #place(what: string, addr: number, len: number, align: number): RingPlace | string {
    const m = this.#memory;
    const user = this.#config!.addressSpace === "user";
    const slot = user ? m.lookupUser(addr, len) : m.lookupGpa(addr, len);
    if (slot === NO_REGION) {
      return `${what} at ${user ? "user address" : "GPA"} ${hex(addr)} (${len} bytes) ` +
        `is not inside one guest memory region`;
    }
    const r = m.region(slot)!;
    if (r.buffer.detached) return `${what}: guest memory region ${slot} is detached`;
    const offset = addr - (user ? r.userAddr : r.guestPhysAddr);
    // Typed-array views need the alignment inside the buffer too.
    if (offset % align !== 0) {
      return `${what} at ${hex(addr)} is misaligned inside its region (offset ${hex(offset)})`;
    }
    return { view: r.view, offset, buffer: r.buffer };
  }

  #fail(reason: QueueErrorReason, detail: string): void {
    this.#state = "needs-reset";
    this.#resetReason = `${reason}: ${this.name}: ${detail}`;
    this.#pending = 0; // never publish into a ring we no longer understand
    this.counters.errors[reason]++;
    this.counters.ringErrors++;
  }

  /** Ready and mapped under the current memory epoch (remaps when needed). */
  #usable(): boolean {
    if (this.#state !== "ready") return false;
    if (this.#epoch !== this.#memory.epoch) return this.remap();
    return true;
  }

  /**
   * Takes the next available chain. On POP_CHAIN, `out` (default
   * `this.chain`) holds its validated segments and the head is in flight
   * until `pushUsed()`. A bad chain is returned to the guest at once with
   * used length 0 (POP_DROPPED; reason in `lastDropReason` and the
   * counters). A corrupt ring gives POP_NEEDS_RESET. Never throws on guest
   * input. Pass your own `DescriptorChain` to hold several chains at once
   * (e.g. MRG_RXBUF gathering RX buffers for one frame).
   */
  popAvail(out: DescriptorChain = this.chain): PopResult {
    if (!this.#usable()) return this.#state === "needs-reset" ? POP_NEEDS_RESET : POP_DISABLED;
    if (this.#lastAvail === this.#shadowAvail) {
      const idx = Atomics.load(this.#availU16, VIRTQ_AVAIL_OFF_IDX >> 1);
      // Chains another publisher completed are retired now, before the heads
      // this idx offers are checked: the driver may offer them again already.
      this.onAvailIdx?.();
      const ahead = (idx - this.#lastAvail) & 0xffff;
      // §2.7.6.1: idx only grows. Each outstanding chain holds at least one of
      // the queue-size descriptors, so chains offered, in flight and completed
      // but unpublished together never exceed the queue size; more would also
      // make used entries overwrite each other.
      if (ahead + this.#inFlightCount + this.#pending > this.#size) {
        this.#fail(
          "AVAIL_IDX_CORRUPT",
          `avail->idx ${idx} is ${ahead} ahead of last_avail_idx ${this.#lastAvail} with ` +
            `${this.#inFlightCount} chains in flight and ${this.#pending} unpublished (queue size ${this.#size})`,
        );
        return POP_NEEDS_RESET;
      }
      this.#shadowAvail = idx;
      if (ahead === 0) return POP_EMPTY;
    }
    const avail = this.#avail!;
    const slot = this.#lastAvail & this.#mask;
    const head = avail.view.getUint16(avail.offset + VIRTQ_AVAIL_OFF_RING + 2 * slot, true);
    const position = this.#lastAvail;
    this.#lastAvail = (this.#lastAvail + 1) & 0xffff;
    if (head < this.#size && this.#inFlight[head] !== 0) {
      this.#fail(
        "AVAIL_HEAD_IN_USE",
        `avail ring entry ${position} offers head ${head}, which the device still holds`,
      );
      return POP_NEEDS_RESET;
    }
    const chain = out;
    const code = walkChain(this.#walk!, head, chain);
    if (code === CHAIN_OK) {
      this.#inFlight[head] = 1;
      this.#inFlightCount++;
      this.#popped[position & this.#mask] = head;
      this.#positionOf[head] = position;
      this.counters.chains++;
      this.counters.chainBytes += chain.readableBytes + chain.writableBytes;
      return POP_CHAIN;
    }
    const reason = CHAIN_ERROR_NAMES[code] as QueueErrorReason;
    if (code >= FIRST_RING_ERROR) {
      this.#fail(
        reason,
        `descriptor chain at head ${head} (avail entry ${position}, ${chain.descriptors} descriptors walked)`,
      );
      return POP_NEEDS_RESET;
    }
    this.counters.errors[reason]++;
    this.counters.dropped++;
    this.#lastDrop = reason;
    if (this.#usedByOther) {
      // The publisher completes it (length 0): it stays in flight until retired.
      this.#inFlight[head] = 1;
      this.#inFlightCount++;
      this.#popped[position & this.#mask] = head;
      this.#positionOf[head] = position;
      return POP_DROPPED;
    }
    this.#popped[position & this.#mask] = -1;
    this.#writeUsed(head, 0);
    return POP_DROPPED;
  }

  /**
   * Gives back the last `count` chains taken, as if never popped:
   * last_avail_idx moves back by `count` and their heads leave flight, so
   * the next `popAvail()` returns them again. For a device that needs
   * several buffers for one frame (MRG_RXBUF) and found too few. Each of the
   * last `count` avail entries must have been popped with POP_CHAIN and not
   * completed since; otherwise this throws RangeError (a device bug).
   */
  unpopAvail(count = 1): void {
    if (this.#state !== "ready") return;
    if (!(Number.isInteger(count) && count >= 0 && count <= this.#size)) {
      throw new RangeError(`unpopAvail(${count}) on ${this.name}: count out of range`);
    }
    for (let i = 1; i <= count; i++) {
      const h = this.#popped[(this.#lastAvail - i) & this.#mask];
      if (h < 0 || this.#inFlight[h] !== 1) {
        throw new RangeError(
          `unpopAvail(${count}) on ${this.name}: avail entry ${
            (this.#lastAvail - i) & 0xffff
          } is not a chain still in flight`,
        );
      }
    }
    for (let i = 1; i <= count; i++) {
      const slot = (this.#lastAvail - i) & this.#mask;
      const h = this.#popped[slot];
      this.#popped[slot] = -1;
      this.#inFlight[h] = 0;
      this.#inFlightCount--;
      this.counters.chains--;
    }
    this.#lastAvail = (this.#lastAvail - count) & 0xffff;
  }

  /**
   * Completes an in-flight chain: writes its used ring entry (`len` = bytes
   * written into its device-writable part; §2.7.8.2: len is set before the
   * used idx moves). Published by `flushUsed()`. Returns false (and forgets
   * the head) when the queue is not ready. Throws RangeError when `head` is
   * not in flight or `len` is not a u32: that is a device bug.
   */
  pushUsed(head: number, len: number): boolean {
    this.#mustOwnUsed("pushUsed");
    if (this.#state !== "ready") {
      if (head >= 0 && head < this.#inFlight.length && this.#inFlight[head] !== 0) {
        this.#inFlight[head] = 0;
        this.#inFlightCount--;
      }
      return false;
    }
    if (!(head >= 0 && head < this.#size && this.#inFlight[head] === 1)) {
      throw new RangeError(`pushUsed(${head}) on ${this.name}: head is not in flight`);
    }
    if (!(Number.isInteger(len) && len >= 0 && len <= 0xffffffff)) {
      throw new RangeError(`pushUsed(${head}, ${len}) on ${this.name}: len is not a u32`);
    }
    this.#inFlight[head] = 0;
    this.#inFlightCount--;
    this.#popped[this.#positionOf[head] & this.#mask] = -1;
    if (!this.#usable()) return false;
    this.counters.bytes += len;
    this.#writeUsed(head, len);
    return true;
  }

  /**
   * Called by `popAvail()` each time it has read avail->idx, before it
   * checks the offered heads. With another publisher of this queue's used
   * ring (the poller, RX publication) the owner retires here what was
   * published: the publisher made its record visible before it stored
   * used->idx, and the driver re-offers a head only after it saw that, so
   * every head this idx re-offers is retired by then.
   */
  onAvailIdx: (() => void) | null = null;

  /**
   * Forgets an in-flight chain that another publisher completed (the poller,
   * RX publication: `ipc/datapath.ts`): its used element is written and
   * published already, so nothing is written here. Counts it as used.
   * Throws RangeError when `head` is not in flight.
   */
  retireUsed(head: number): void {
    if (!(head >= 0 && head < this.#inFlight.length && this.#inFlight[head] === 1)) {
      throw new RangeError(`retireUsed(${head}) on ${this.name}: head is not in flight`);
    }
    this.#inFlight[head] = 0;
    this.#inFlightCount--;
    if (this.#size !== 0) this.#popped[this.#positionOf[head] & this.#mask] = -1;
    this.counters.used++;
  }

  /**
   * From now on another publisher writes this queue's used ring (the
   * poller, RX publication): the device writes no used element and no
   * used->idx; a chain it cannot use comes back from `popAvail()` as
   * POP_DROPPED, still in flight, for the publisher to complete.
   */
  handOverUsed(): void {
    if (this.#pending !== 0) {
      throw new Error(`${this.name}: cannot hand over a used ring with unpublished entries`);
    }
    this.#usedByOther = true;
  }

  /** The used ring is the device's again, from used->idx `idx` (what the publisher stored last). */
  takeBackUsed(idx: number): void {
    this.#usedByOther = false;
    this.usedIdx = idx;
  }

  /** Whether another publisher writes the used ring now. */
  get usedByOther(): boolean {
    return this.#usedByOther;
  }

  #mustOwnUsed(what: string): void {
    if (this.#usedByOther) {
      throw new Error(
        `${what} on ${this.name}: its used ring is another publisher's (a device bug)`,
      );
    }
  }

  #writeUsed(head: number, len: number): void {
    this.#mustOwnUsed("writing a used element");
    // Never overwrite an unpublished entry (only a misbehaving driver gets here).
    if (this.#pending === this.#size) this.#publish();
    const used = this.#used!;
    const slot = (this.#usedIdx + this.#pending) & this.#mask;
    const o = used.offset + VIRTQ_USED_OFF_RING + VIRTQ_USED_ELEM_SIZE * slot;
    used.view.setUint32(o, head, true);
    used.view.setUint32(o + 4, len, true);
    this.#pending++;
    this.counters.used++;
  }

  #publish(): number {
    const n = this.#pending;
    const idx = (this.#usedIdx + n) & 0xffff;
    // Entries were written above; the seq-cst store orders them before idx.
    Atomics.store(this.#usedU16, VIRTQ_USED_OFF_IDX >> 1, idx);
    this.#usedIdx = idx;
    this.#pending = 0;
    return n;
  }

  /**
   * Hands the pending used entries to another publisher: returns the
   * used->idx value that makes them (and every earlier one) visible and
   * counts them as published, without storing it. Whoever gets the value
   * stores it later, in order (the writer, once the frames are out:
   * `ipc/datapath.ts`); meanwhile the device must not `flushUsed()` this
   * queue, and must keep fewer than `size` entries unpublished (an entry
   * past that would overwrite one the driver has not seen).
   * `storeUsedIdx()` takes publishing back.
   */
  handOffUsed(): number {
    this.#mustOwnUsed("handOffUsed");
    const idx = (this.#usedIdx + this.#pending) & 0xffff;
    this.#usedIdx = idx;
    this.#pending = 0;
    return idx;
  }

  /** Stores used->idx from the device's own count (after a hand-off ended, e.g. at stop). */
  storeUsedIdx(): void {
    this.#mustOwnUsed("storeUsedIdx");
    if (!this.#usable()) return;
    Atomics.store(this.#usedU16, VIRTQ_USED_OFF_IDX >> 1, this.#usedIdx);
  }

  /** Publishes pending used entries with one used->idx store; returns how many. */
  flushUsed(): number {
    this.#mustOwnUsed("flushUsed");
    if (this.#pending === 0 || !this.#usable()) return 0;
    return this.#publish();
  }

  /**
   * Whether to send a used buffer notification now (call after `flushUsed()`).
   * With EVENT_IDX: when used->idx crossed used_event since the last call
   * (§2.7.7.2, vring_need_event). Without: when something was published
   * since the last call and the driver did not set VIRTQ_AVAIL_F_NO_INTERRUPT.
   * The first call after (re)configuration answers yes when anything is
   * published (a spurious notification is allowed, §2.7.7.1).
   */
  needsInterrupt(): boolean {
    if (!this.#usable()) return false;
    const now = this.#usedIdx;
    const old = this.#signalled;
    const valid = this.#signalledValid;
    this.#signalled = now;
    this.#signalledValid = true;
    let yes = false;
    if (!valid || now !== old) {
      // The load of the driver's word must not pass the idx store in #publish.
      fullBarrier();
      const word = Atomics.load(
        this.#availU16,
        this.#eventIdx ? (VIRTQ_AVAIL_OFF_RING >> 1) + this.#size : VIRTQ_AVAIL_OFF_FLAGS >> 1,
      );
      yes = usedNotifyWanted(this.#eventIdx, word, now, valid ? old : -1);
    }
    if (yes) this.counters.interrupts++;
    return yes;
  }

  /**
   * Stops asking the driver for kicks while the device is polling. Without
   * EVENT_IDX sets VIRTQ_USED_F_NO_NOTIFY; with EVENT_IDX (where flags MUST
   * be 0, §2.7.10.2) leaves avail_event behind, so the driver kicks at most
   * once more.
   */
  disableNotifications(): void {
    if (!this.#usable()) return;
    this.#notify = false;
    if (!this.#eventIdx) {
      Atomics.store(this.#usedU16, VIRTQ_USED_OFF_FLAGS >> 1, VIRTQ_USED_F_NO_NOTIFY);
    }
  }

  /**
   * Asks the driver for a kick on the next available buffer (clears
   * VIRTQ_USED_F_NO_NOTIFY, or sets avail_event = last_avail_idx), then
   * re-reads avail->idx: buffers offered before the driver could see the
   * request would never be kicked. Returns true when such buffers are
   * already there: the caller must keep polling (and may disable again)
   * instead of sleeping.
   */
  enableNotifications(): boolean {
    if (!this.#usable()) return false;
    this.#notify = true;
    if (this.#eventIdx) {
      Atomics.store(this.#usedU16, (VIRTQ_USED_OFF_RING >> 1) + 4 * this.#size, this.#lastAvail);
    } else {
      Atomics.store(this.#usedU16, VIRTQ_USED_OFF_FLAGS >> 1, 0);
    }
    // Store then load: the re-check must not move before the store.
    fullBarrier();
    return this.#availAhead();
  }

  /**
   * Whether the driver has made buffers available that the device has not
   * taken yet while it asks for kicks (notifications on): a kick is due, on
   * its way, or lost. See device/kick_watch.ts.
   */
  get awaitsKick(): boolean {
    return this.#usable() && this.#notify && this.#availAhead();
  }

  /** avail->idx as the driver wrote it differs from last_avail_idx. */
  #availAhead(): boolean {
    return Atomics.load(this.#availU16, VIRTQ_AVAIL_OFF_IDX >> 1) !== this.#lastAvail;
  }

  /**
   * Stops the queue (vhost-user GET_VRING_BASE): returns every chain still in
   * flight with used length 0, publishes, and disables. Returns
   * last_avail_idx. The caller must have stopped all I/O into those chains.
   */
  stop(): number {
    this.#mustOwnUsed("stop");
    if (this.#usable()) {
      for (let h = 0; h < this.#size; h++) {
        if (this.#inFlight[h] !== 0) {
          this.#inFlight[h] = 0;
          this.#writeUsed(h, 0);
        }
      }
      this.#inFlightCount = 0;
      this.flushUsed();
    }
    this.#inFlight.fill(0);
    this.#inFlightCount = 0;
    this.#pending = 0;
    this.#state = "disabled";
    return this.#lastAvail;
  }

  /**
   * Stops the queue without writing anything into its rings (a queue whose
   * other publisher broke the protocol: what is in flight cannot be told
   * from what was completed). Returns last_avail_idx.
   */
  abandon(): number {
    this.#inFlight.fill(0);
    this.#inFlightCount = 0;
    this.#pending = 0;
    this.#usedByOther = false;
    this.#state = "disabled";
    return this.#lastAvail;
  }

  /**
   * Back to the initial state (device reset, or recovery from needs-reset):
   * forgets the rings, in-flight chains and indices (both become 0). Does not
   * touch guest memory. Counters are kept.
   */
  reset(): void {
    this.#state = "disabled";
    this.#resetReason = null;
    this.#config = null;
    this.#walk = null;
    this.#avail = null;
    this.#used = null;
    this.#availU16 = new Uint16Array(0);
    this.#usedU16 = new Uint16Array(0);
    this.#size = 0;
    this.#mask = 0;
    this.#lastAvail = 0;
    this.#shadowAvail = 0;
    this.#usedIdx = 0;
    this.#pending = 0;
    this.#signalledValid = false;
    this.#notify = true;
    this.#inFlight = new Uint8Array(0);
    this.#popped = new Int32Array(0);
    this.#positionOf = new Uint16Array(0);
    this.#inFlightCount = 0;
    this.#lastDrop = null;
    this.#usedByOther = false;
  }
}
