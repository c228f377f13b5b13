import assert from "node:assert/strict";
import {
  completeChecksum,
  finishChecksum,
  foldSum,
  internetChecksum,
  pseudoHeaderSumIPv4,
  pseudoHeaderSumIPv6,
  sumBytes,
} from "../../device/checksum.ts";
import { buildFrame, l4ChecksumOk, prng, randomBytes, refSum } from "./frames.ts";

Deno.test("internetChecksum() matches the RFC 1071 §3 worked example", () => {
  // RFC 1071 §3: 00 01 f2 03 f4 f5 f6 f7 sums to ddf2, checksum 220d.
  const b = new Uint8Array([0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]);
  assert.equal(foldSum(sumBytes(b, 0, 8)), 0xddf2);
  assert.equal(internetChecksum(b, 0, 8), 0x220d);
});

Deno.test("internetChecksum() of a hand-checked IPv4 header is 0xb861", () => {
  // 45 00 00 73 00 00 40 00 40 11 [00 00] c0 a8 00 01 c0 a8 00 c7:
  // 4500+0073+0000+4000+4011+c0a8+0001+c0a8+00c7 = 0x2479c -> 0x479e, ~ = 0xb861.
  const h = new Uint8Array([
    0x45,
    0x00,
    0x00,
    0x73,
    0x00,
    0x00,
    0x40,
    0x00,
    0x40,
    0x11,
    0x00,
    0x00,
    0xc0,
    0xa8,
    0x00,
    0x01,
    0xc0,
    0xa8,
    0x00,
    0xc7,
  ]);
  assert.equal(internetChecksum(h, 0, 20), 0xb861);
  h[10] = 0xb8;
  h[11] = 0x61;
  assert.equal(internetChecksum(h, 0, 20), 0);
});

Deno.test("sumBytes() pads an odd trailing byte with a zero low byte", () => {
  const b = new Uint8Array([0x12, 0x34, 0x56]);
  assert.equal(foldSum(sumBytes(b, 0, 3)), 0x1234 + 0x5600);
});

Deno.test("sumBytes() agrees with the byte-wise reference at every alignment and length", () => {
  const rand = prng(1071);
  const buf = randomBytes(rand, 70000);
  for (let trial = 0; trial < 600; trial++) {
    const start = (rand() * 64) | 0;
    const len = trial < 300 ? (rand() * 300) | 0 : (rand() * 69000) | 0;
    assert.equal(foldSum(sumBytes(buf, start, start + len)), refSum(buf, start, start + len));
  }
  // A view that starts at an odd byte offset of its buffer.
  const odd = new Uint8Array(buf.buffer, 3, 5000);
  for (const [s, e] of [[0, 5000], [1, 4999], [2, 4001], [5, 70]]) {
    assert.equal(foldSum(sumBytes(odd, s, e)), refSum(odd, s, e), `range ${s}..${e}`);
  }
});

Deno.test("sumBytes() of all-0xff bytes folds to 0xffff, not 0", () => {
  const b = new Uint8Array(4096).fill(0xff);
  assert.equal(foldSum(sumBytes(b, 0, b.length)), 0xffff);
  assert.equal(finishChecksum(sumBytes(b, 0, b.length)), 0);
});

Deno.test("sums of adjacent even-length ranges add up to the sum of the whole", () => {
  const b = randomBytes(prng(7), 3000);
  const whole = foldSum(sumBytes(b, 0, 3000));
  assert.equal(foldSum(sumBytes(b, 1000, 3000, sumBytes(b, 0, 1000))), whole);
});

Deno.test("pseudoHeaderSumIPv4() adds addresses, protocol and length", () => {
  const { frame, l3Offset } = buildFrame({ src: [10, 1, 2, 3], dst: [192, 168, 0, 1] });
  // 0x0a01 + 0x0203 + 0xc0a8 + 0x0001 + 6 + 100
  const want = 0x0a01 + 0x0203 + 0xc0a8 + 0x0001 + 6 + 100;
  assert.equal(foldSum(pseudoHeaderSumIPv4(frame, l3Offset, 6, 100)), foldSum(want));
});

Deno.test("pseudoHeaderSumIPv6() adds both addresses, the 32-bit length and next header", () => {
  const src = new Array(16).fill(0);
  const dst = new Array(16).fill(0);
  src[0] = 0x20;
  src[15] = 1;
  dst[0] = 0xfe;
  dst[1] = 0x80;
  dst[15] = 2;
  const { frame, l3Offset } = buildFrame({ ipVersion: 6, src, dst });
  const want = 0x2000 + 0x0001 + 0xfe80 + 0x0002 + 17 + 1 + 0x0005; // length 0x10005
  assert.equal(foldSum(pseudoHeaderSumIPv6(frame, l3Offset, 17, 0x10005)), foldSum(want));
});

Deno.test("completeChecksum() turns a partial TCP checksum into a valid one", () => {
  for (const ipVersion of [4, 6] as const) {
    const payload = randomBytes(prng(ipVersion), 1401);
    const b = buildFrame({ ipVersion, payload, checksum: "partial" });
    assert.equal(l4ChecksumOk(b.frame, b.l3Offset, b.l4Offset, b.l3End, 6), false);
    completeChecksum(b.frame, b.l4Offset, 16);
    assert.ok(l4ChecksumOk(b.frame, b.l3Offset, b.l4Offset, b.l3End, 6));
  }
});

Deno.test("completeChecksum() stores 0xffff when a UDP checksum computes to 0", () => {
  // Choose the 2 payload bytes so that the ones' complement sum is 0xffff:
  // the checksum is then 0, which RFC 768 sends as 0xffff.
  const b = buildFrame({ l4: "udp", payload: new Uint8Array(2), checksum: "partial" });
  const rest = refSum(b.frame, b.l4Offset, b.l3End);
  const x = 0xffff - rest;
  b.frame[b.l3End - 2] = x >>> 8;
  b.frame[b.l3End - 1] = x & 0xff;
  assert.equal(refSum(b.frame, b.l4Offset, b.l3End), 0xffff);
  completeChecksum(b.frame, b.l4Offset, 6);
  assert.equal(b.frame[b.l4Offset + 6] * 256 + b.frame[b.l4Offset + 7], 0xffff);
  assert.ok(l4ChecksumOk(b.frame, b.l3Offset, b.l4Offset, b.l3End, 17));
});

Deno.test("completeChecksum() with an end before L2 padding ignores the padding", () => {
  const b = buildFrame({ payload: new Uint8Array([1, 2, 3]), checksum: "partial", padding: 7 });
  b.frame.fill(0xee, b.l3End);
  completeChecksum(b.frame, b.l4Offset, 16, b.l3End);
  assert.ok(l4ChecksumOk(b.frame, b.l3Offset, b.l4Offset, b.l3End, 6));
});

Deno.test("sumBytes() never reads bytes of the buffer outside the view", () => {
  const buf = new Uint8Array(4096).fill(0xab);
  const view = buf.subarray(100, 300).fill(0);
  assert.equal(foldSum(sumBytes(view, 0, 2000)), 0);
  assert.equal(foldSum(sumBytes(view, -50, 200)), 0);
});
