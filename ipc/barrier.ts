/**
 * A full memory barrier for the virtqueue handshakes that store one word and
 * then load another the other side stores (virtio 1.2 §2.7.10: used->idx
 * then used_event; avail_event then avail->idx). Guest memory is seen
 * through ArrayBuffers over external mappings, not SharedArrayBuffers, and
 * the language promises nothing across threads for those; a sequentially
 * consistent read-modify-write on a SharedArrayBuffer is a locked
 * instruction on x86-64 (a full barrier) whatever the JIT does with atomics
 * on the other views. About 20 cycles.
 *
 * @module
 */

const word = new Int32Array(new SharedArrayBuffer(4));

/** Orders every memory access before it against every access after it. */
export function fullBarrier(): void {
  Atomics.exchange(word, 0, 0);
}
