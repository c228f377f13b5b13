/**
 * DirtyLog (parent/io/dirty_log.ts): the bit of each 4 KiB guest page a
 * write touches, as vhost-user.rst "Migration" lays the bitmap out; nothing
 * outside the bitmap, whatever address it is asked to mark; host ranges
 * without a guest address (the bounce arena) mark nothing.
 */

import assert from "node:assert/strict";
import { DirtyLog, LOG_PAGE } from "../../../parent/io/dirty_log.ts";
import { IoRegions } from "../../../parent/io/regions.ts";

/** A bitmap of `bytes` with a guard byte on each side, and a DirtyLog over its middle. */
function logOf(bytes: number) {
  const backing = new Uint8Array(bytes + 2);
  const bits = backing.subarray(1, 1 + bytes);
  const log = new DirtyLog({
    base: Deno.UnsafePointer.value(Deno.UnsafePointer.of(bits)),
    size: bytes,
    rxUsed: { gpa: 0x3000, bytes: 6 + 8 * 256 },
    txUsed: null,
  });
  return { backing, bits, log };
}

function setPages(bits: Uint8Array): number[] {
  const out: number[] = [];
  for (let p = 0; p < bits.length * 8; p++) if (bits[p >> 3] & (1 << (p & 7))) out.push(p);
  return out;
}

Deno.test("markGuest sets one bit per page touched: page / 8, bit page % 8", () => {
  const { bits, log } = logOf(4);
  log.markGuest(0, 1);
  log.markGuest(LOG_PAGE * 9 + 100, 1);
  log.markGuest(LOG_PAGE * 12 - 1, 2); // straddles pages 11 and 12
  assert.deepEqual(setPages(bits), [0, 9, 11, 12]);
  assert.equal(bits[1], (1 << 1) | (1 << 3) | (1 << 4));
  log.markGuest(LOG_PAGE * 5, 0); // nothing written: nothing marked
  assert.deepEqual(setPages(bits), [0, 9, 11, 12]);
});

Deno.test("a page past the end of the bitmap is counted, never written", () => {
  const { backing, bits, log } = logOf(2); // 16 pages
  log.markGuest(LOG_PAGE * 15, LOG_PAGE * 3); // pages 15, 16, 17
  assert.deepEqual(setPages(bits), [15]);
  assert.equal(log.overflow, 2);
  log.markGuest(2 ** 52, 10); // a hostile region's guest address
  assert.equal(log.overflow, 3);
  assert.equal(backing[0], 0, "nothing before the bitmap");
  assert.equal(backing[3], 0, "nothing after it");
});

Deno.test("markUsed marks the whole used ring; a ring not logged marks nothing", () => {
  const { bits, log } = logOf(4);
  log.markUsed(log.rxUsed); // 0x3000 .. 0x3806: page 3
  log.markUsed(log.txUsed);
  assert.deepEqual(setPages(bits), [3]);
});

Deno.test("markHost translates host addresses with each range's guest address; the bounce arena marks nothing", () => {
  const { bits, log } = logOf(8);
  const guest = new Uint8Array(LOG_PAGE * 4);
  const bounce = new Uint8Array(LOG_PAGE);
  const g = Deno.UnsafePointer.value(Deno.UnsafePointer.of(guest));
  const b = Deno.UnsafePointer.value(Deno.UnsafePointer.of(bounce));
  const regions = IoRegions.from([
    { base: g, size: guest.length, gpa: BigInt(LOG_PAGE * 40) },
    { base: b, size: bounce.length },
  ]);
  log.markHost(regions, Number(g) + LOG_PAGE + 10, LOG_PAGE); // guest pages 41 and 42
  log.markHost(regions, Number(b), 100);
  assert.deepEqual(setPages(bits), [41, 42]);
});

Deno.test("IoRegions refuses a guest address whose range ends past 2^53", () => {
  assert.throws(
    () => IoRegions.from([{ base: 0x10000n, size: 0x1000, gpa: 2n ** 53n - 0x800n }]),
    /guest address/,
  );
});
