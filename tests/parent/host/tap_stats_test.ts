import assert from "node:assert/strict";
import { parseNetDev, readTapCounters } from "../../../parent/host/tap_stats.ts";

const SAMPLE = `Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:    1234      12    0    0    0     0          0         0     1234      12    0    0    0     0       0          0
vionet-e2e: 18446744073709551615 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16
  eth0: 1 2 3
`;

Deno.test("parseNetDev(): the 16 columns of one interface, by name", () => {
  const c = parseNetDev(SAMPLE, "vionet-e2e");
  assert.ok(c);
  assert.equal(c.receive.packets, 2);
  assert.equal(c.receive.multicast, 8);
  assert.equal(c.transmit.bytes, 9);
  assert.equal(c.transmit.colls, 14);
  assert.equal(c.transmit.compressed, 16);
  assert.equal(c.receive.bytes, 2 ** 64, "a 64-bit counter, to double precision");
  assert.equal(parseNetDev(SAMPLE, "lo")?.transmit.packets, 12);
  assert.equal(parseNetDev(SAMPLE, "vionet"), null, "a prefix is not the name");
  assert.throws(() => parseNetDev(SAMPLE, "eth0"), SyntaxError);
});

Deno.test("readTapCounters(): reads this namespace's /proc/net/dev through libc", () => {
  const lo = readTapCounters("lo");
  assert.ok(lo, "lo is in every namespace");
  assert.equal(typeof lo.receive.bytes, "number");
  assert.equal(readTapCounters("no-such-if0"), null);
});
