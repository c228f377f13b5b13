/**
 * The check between a device's `memory-returned` and the unmapping of guest
 * memory: a region counts as given back only if the device returned the
 * very buffer the parent lent for it.
 *
 * Why identity and not shape: a device that keeps its view and answers with
 * an empty list, or with fresh ArrayBuffers of the right sizes, or hands the
 * real one to a worker of its own first, would otherwise keep reading and
 * writing the range after the parent unmapped it, when the next privileged
 * mapping (the next guest's memory, an io_uring ring, a V8 page) may land
 * there. A buffer over a mapping is identified by its backing address
 * (`Deno.UnsafePointer.of`) and length; JavaScript cannot make a second
 * ArrayBuffer over the same memory (a structured clone copies; only a
 * transfer moves the backing store, and detaches the sender's), so a returned
 * buffer with the lent address is one the device no longer holds.
 *
 * @module
 */

/** A region the parent lent, as the check needs it. */
export interface LentRegion {
  /** The mapping's first byte, as lent. */
  pointer: Deno.PointerObject;
  size: number;
  /** For messages: the region in the front-end's terms. */
  what: string;
}

/**
 * Why `returned` is not exactly the buffers lent for `regions`, in the same
 * order, or null when it is.
 */
export function returnedMemoryProblem(
  regions: readonly LentRegion[],
  returned: readonly ArrayBuffer[],
): string | null {
  if (returned.length !== regions.length) {
    return `the device returned ${returned.length} buffers for ${regions.length} regions ` +
      `(${regions.map((r) => r.what).join("; ") || "none"})`;
  }
  for (let i = 0; i < regions.length; i++) {
    const r = regions[i];
    const b = returned[i];
    const at = b.detached ? null : Deno.UnsafePointer.of(b);
    const address = at === null ? 0n : Deno.UnsafePointer.value(at);
    if (b.byteLength !== r.size || address !== Deno.UnsafePointer.value(r.pointer)) {
      return `buffer ${i} the device returned for ${r.what} is not the one lent ` +
        `(${b.byteLength} bytes at 0x${address.toString(16)}, lent ${r.size} bytes at 0x${
          Deno.UnsafePointer.value(r.pointer).toString(16)
        })`;
    }
  }
  return null;
}
