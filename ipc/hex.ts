/**
 * How addresses, indices and masks are written in messages: `0x` and
 * lowercase hex. One helper for the device, the parent and the rings.
 *
 * @module
 */

/** `n` as `0x…`; a negative number is shown as its u32 (ring indices wrap). */
export function hex(n: number | bigint): string {
  if (typeof n === "number" && n < 0) n = n >>> 0;
  return `0x${n.toString(16)}`;
}
