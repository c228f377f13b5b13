/**
 * Per-queue counters: plain objects of numbers, cheap to bump on the hot path
 * and to copy into a stats message.
 *
 * @module
 */

import { CHAIN_ERROR_NAMES } from "./chain.ts";

/**
 * Queue-level reasons that are not about one chain (see virtqueue.ts):
 * - AVAIL_IDX_CORRUPT: avail->idx moved so far that more than queue-size chains
 *   would be outstanding (§2.7.6.1), e.g. it went backwards.
 * - AVAIL_HEAD_IN_USE: the avail ring offers a head the device still holds.
 * - RING_UNMAPPED: the memory holding a ring was revoked and could not be re-translated.
 */
export const QUEUE_ERROR_NAMES = [
  "AVAIL_IDX_CORRUPT",
  "AVAIL_HEAD_IN_USE",
  "RING_UNMAPPED",
] as const;

/** Every reason a chain is dropped or a queue needs a reset, as counter keys. */
export const QUEUE_ERROR_REASONS = [
  ...CHAIN_ERROR_NAMES.slice(1),
  ...QUEUE_ERROR_NAMES,
] as const;

/** One of QUEUE_ERROR_REASONS. */
export type QueueErrorReason = typeof QUEUE_ERROR_REASONS[number];

/** Counters of one virtqueue. All are monotonic. */
export interface QueueCounters {
  /** Valid chains handed to the device by `popAvail()`. */
  chains: number;
  /** Sum of used lengths reported through `pushUsed()` (bytes written into RX buffers). */
  bytes: number;
  /** Bytes in valid chains popped (device-readable plus device-writable). */
  chainBytes: number;
  /** Used ring entries published (including dropped chains). */
  used: number;
  /** Bad chains returned to the guest with used length 0. */
  dropped: number;
  /** Times `needsInterrupt()` said yes. */
  interrupts: number;
  /** Times the queue entered the needs-reset state. */
  ringErrors: number;
  /**
   * Times the device found buffers the driver had made available, with
   * notifications on, and no kick had come for them (device/kick_watch.ts).
   */
  kicksMissed: number;
  /** Errors by reason (per-chain drops and ring-fatal ones). */
  errors: Record<QueueErrorReason, number>;
}

/** A zeroed counter object. */
export function createQueueCounters(): QueueCounters {
  const errors = {} as Record<QueueErrorReason, number>;
  for (const name of QUEUE_ERROR_REASONS) errors[name] = 0;
  return {
    chains: 0,
    bytes: 0,
    chainBytes: 0,
    used: 0,
    dropped: 0,
    interrupts: 0,
    ringErrors: 0,
    kicksMissed: 0,
    errors,
  };
}
