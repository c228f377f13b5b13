/**
 * Used buffer notifications (virtio 1.2 §2.7.7, §2.7.10), shared by the two
 * threads that decide them: the device for its queues (`device/virtqueue.ts`)
 * and the writer for the TX completions it publishes
 * (`parent/io/writer_worker.ts`). Pure functions and one barrier; no
 * guest-memory access of its own.
 *
 * @module
 */

/** virtio 1.2 §2.7.7: the driver does not want used buffer notifications. */
export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;

/**
 * virtio 1.2 §2.7.7.2 / Linux `vring_need_event`: true when moving the index
 * from `oldIdx` to `newIdx` crossed `eventIdx` (all mod 2^16).
 */
export function vringNeedEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

/**
 * Whether the driver wants a notification now that used->idx moved from
 * `oldIdx` to `newIdx`. `driverWord` is avail->used_event with EVENT_IDX
 * (§2.7.10: when the index crossed it), else avail->flags (unless
 * VIRTQ_AVAIL_F_NO_INTERRUPT). `oldIdx` -1: no decision since the queue
 * started; with EVENT_IDX the answer is then yes (a spurious notification
 * is allowed, §2.7.7.1). Load `driverWord` after the used->idx store and a
 * {@link fullBarrier}.
 */
export function usedNotifyWanted(
  eventIdx: boolean,
  driverWord: number,
  newIdx: number,
  oldIdx: number,
): boolean {
  if (!eventIdx) return (driverWord & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
  return oldIdx < 0 || vringNeedEvent(driverWord, newIdx, oldIdx);
}

const word = new Int32Array(new SharedArrayBuffer(4));

/**
 * A full memory barrier for the handshakes that store one ring word and then
 * load one the other side stores (used->idx then used_event or avail->flags;
 * avail_event then avail->idx). Guest memory is seen through ArrayBuffers
 * over external mappings, not SharedArrayBuffers, and the language promises
 * nothing across threads for those; a sequentially consistent
 * read-modify-write on a SharedArrayBuffer is a locked instruction on x86-64
 * (a full barrier) whatever the JIT does with atomics on the other views.
 * About 20 cycles.
 */
export function fullBarrier(): void {
  Atomics.exchange(word, 0, 0);
}
