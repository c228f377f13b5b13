import assert from "node:assert/strict";
import { createParsedFrame, FrameParse, parseFrame } from "../../device/frame_parse.ts";
import { NetDrop } from "../../device/net_header.ts";
import { segmentCount, segmentTcp } from "../../device/segment.ts";
import {
  buildFrame,
  type FrameSpec,
  get16,
  get32,
  ipv4HeaderChecksumOk,
  l4ChecksumOk,
  prng,
  randomBytes,
  TCP_ACK,
  TCP_CWR,
  TCP_ECE,
  TCP_FIN,
  TCP_PSH,
  TCP_URG,
  tcpTimestampOption,
} from "./frames.ts";

/** Segments `spec`'s frame (partial checksum) and returns copies of the segments. */
function segmentSpec(
  spec: FrameSpec,
  mss: number,
): { segs: Uint8Array[]; built: ReturnType<typeof buildFrame> } {
  const built = buildFrame({ ...spec, checksum: "partial" });
  const parsed = createParsedFrame();
  assert.equal(parseFrame(built.frame, parsed), FrameParse.OK);
  const segs: Uint8Array[] = [];
  const scratch = new Uint8Array(70000);
  const r = segmentTcp(built.frame, parsed, mss, scratch, (buf, len, i) => {
    assert.equal(i, segs.length);
    assert.equal(buf, scratch);
    segs.push(buf.slice(0, len));
  });
  assert.equal(r, NetDrop.OK);
  return { segs, built };
}

/** Checks every rule a segment list must follow against the original frame. */
function checkSegments(
  built: ReturnType<typeof buildFrame>,
  segs: Uint8Array[],
  mss: number,
): void {
  const { frame, l3Offset: l3, l4Offset: l4, payloadOffset: hlen, l3End } = built;
  const v4 = frame[l3] >> 4 === 4;
  const payload = frame.subarray(hlen, l3End);
  assert.equal(segs.length, segmentCount(payload.length, mss));
  const flags = frame[l4 + 13];
  const seq0 = get32(frame, l4 + 4);
  let off = 0;
  segs.forEach((s, i) => {
    const last = i === segs.length - 1;
    const n = s.length - hlen;
    assert.equal(n, last ? payload.length - off : mss, `segment ${i} payload length`);
    assert.deepEqual(s.subarray(hlen), payload.subarray(off, off + n));
    // Headers other than the fields GSO rewrites are copied unchanged.
    assert.deepEqual(s.subarray(0, l3), frame.subarray(0, l3));
    if (v4) {
      assert.equal(get16(s, l3 + 2), s.length - l3, "IPv4 total length");
      assert.equal(get16(s, l3 + 4), (get16(frame, l3 + 4) + i) & 0xffff, "IPv4 ID");
      assert.ok(ipv4HeaderChecksumOk(s, l3), `segment ${i} IPv4 header checksum`);
      assert.deepEqual(s.subarray(l3 + 6, l3 + 10), frame.subarray(l3 + 6, l3 + 10));
      assert.deepEqual(s.subarray(l3 + 12, l4), frame.subarray(l3 + 12, l4));
    } else {
      assert.equal(get16(s, l3 + 4), s.length - l3 - 40, "IPv6 payload length");
      assert.deepEqual(s.subarray(l3 + 6, l4), frame.subarray(l3 + 6, l4));
    }
    assert.equal(get32(s, l4 + 4), (seq0 + off) % 2 ** 32, "sequence number");
    assert.ok(l4ChecksumOk(s, l3, l4, s.length, 6), `segment ${i} TCP checksum`);
    let want = flags;
    if (!last) want &= ~(TCP_FIN | TCP_PSH);
    if (i > 0) want &= ~TCP_CWR;
    assert.equal(s[l4 + 13], want, `segment ${i} flags`);
    assert.deepEqual(s.subarray(l4 + 8, l4 + 13), frame.subarray(l4 + 8, l4 + 13));
    assert.deepEqual(s.subarray(l4 + 18, hlen), frame.subarray(l4 + 18, hlen));
    off += n;
  });
  assert.equal(off, payload.length);
}

Deno.test("segmentTcp() splits 3000 bytes at MSS 1448 into 1448+1448+104 with hand-checked fields", () => {
  const payload = randomBytes(prng(1), 3000);
  const { segs, built } = segmentSpec(
    { payload, seq: 0xfffffc00, ipId: 0xffff, tcpFlags: TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR },
    1448,
  );
  const l3 = built.l3Offset;
  const l4 = built.l4Offset;
  assert.deepEqual(segs.map((s) => s.length), [14 + 40 + 1448, 14 + 40 + 1448, 14 + 40 + 104]);
  assert.deepEqual(segs.map((s) => get16(s, l3 + 2)), [1488, 1488, 144]);
  // The ID wraps from 0xffff to 0; the sequence number wraps past 2^32.
  assert.deepEqual(segs.map((s) => get16(s, l3 + 4)), [0xffff, 0, 1]);
  assert.deepEqual(segs.map((s) => get32(s, l4 + 4)), [0xfffffc00, 0x1a8, 0x750]);
  assert.deepEqual(segs.map((s) => s[l4 + 13]), [
    TCP_ACK | TCP_CWR,
    TCP_ACK,
    TCP_ACK | TCP_PSH | TCP_FIN,
  ]);
  checkSegments(built, segs, 1448);
});

Deno.test("segmentTcp() leaves a frame whose payload fits one MSS whole, flags untouched", () => {
  const flags = TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR | TCP_ECE;
  const { segs, built } = segmentSpec({ payload: new Uint8Array(100), tcpFlags: flags }, 100);
  assert.equal(segs.length, 1);
  assert.equal(segs[0][built.l4Offset + 13], flags);
  assert.deepEqual(
    segs[0].subarray(0, built.l4Offset + 16),
    built.frame.subarray(0, built.l4Offset + 16),
  );
  checkSegments(built, segs, 100);
});

Deno.test("segmentTcp() gives a frame without payload one segment with a valid checksum", () => {
  const { segs, built } = segmentSpec({ payload: new Uint8Array(0) }, 1);
  assert.equal(segs.length, 1);
  checkSegments(built, segs, 1);
});

Deno.test("segmentTcp() keeps URG and the urgent pointer on every segment, as Linux does", () => {
  const { segs, built } = segmentSpec(
    { payload: new Uint8Array(10), tcpFlags: TCP_ACK | TCP_URG, urgent: 7 },
    4,
  );
  for (const s of segs) {
    assert.equal(s[built.l4Offset + 13], TCP_ACK | TCP_URG);
    assert.equal(get16(s, built.l4Offset + 18), 7);
  }
});

Deno.test("segmentTcp() copies IPv4 options and VLAN tags into every segment", () => {
  const ipOptions = new Uint8Array([0x94, 0x04, 0, 0, 1, 1, 1, 0]); // router alert, NOPs, EOL
  const { segs, built } = segmentSpec(
    { payload: randomBytes(prng(2), 5000), ipOptions, vlan: 42 },
    1000,
  );
  assert.equal(segs.length, 5);
  checkSegments(built, segs, 1000);
});

Deno.test("segmentTcp() walks IPv6 hop-by-hop, routing and destination options headers", () => {
  const hbh = { type: 0, body: new Uint8Array([1, 4, 0, 0, 0, 0]) }; // PadN
  const rt = { type: 43, body: new Uint8Array([0, 0, 0, 0, 0, 0]) }; // type 0, segments left 0
  const dst = { type: 60, body: new Uint8Array([1, 12, ...new Array(12).fill(0)]) };
  const { segs, built } = segmentSpec(
    { ipVersion: 6, ipv6Ext: [hbh, rt, dst], payload: randomBytes(prng(3), 4000) },
    1200,
  );
  assert.equal(built.l4Offset, 14 + 40 + 8 + 8 + 16);
  checkSegments(built, segs, 1200);
});

Deno.test("segmentTcp() does not copy L2 padding after the IP packet", () => {
  const { segs, built } = segmentSpec({ payload: randomBytes(prng(4), 30), padding: 9 }, 16);
  assert.equal(segs.length, 2);
  checkSegments(built, segs, 16);
});

Deno.test("segmentTcp() refuses a UDP frame, MSS 0 and a too small scratch buffer", () => {
  const parsed = createParsedFrame();
  const none = () => assert.fail("no segment may be emitted");
  const udp = buildFrame({ l4: "udp", payload: new Uint8Array(100), checksum: "partial" });
  parseFrame(udp.frame, parsed);
  assert.equal(
    segmentTcp(udp.frame, parsed, 10, new Uint8Array(2000), none),
    NetDrop.GSO_L4_MISMATCH,
  );
  const tcp = buildFrame({ payload: new Uint8Array(100), checksum: "partial" });
  parseFrame(tcp.frame, parsed);
  assert.equal(segmentTcp(tcp.frame, parsed, 0, new Uint8Array(2000), none), NetDrop.GSO_SIZE_ZERO);
  assert.equal(
    segmentTcp(tcp.frame, parsed, 50, new Uint8Array(60), none),
    NetDrop.SCRATCH_TOO_SMALL,
  );
});

Deno.test("segmentTcp() property: random sizes, MSS, IP versions, options, ECN and flags", () => {
  const rand = prng(20260214);
  const flagBits = [TCP_FIN, TCP_PSH, TCP_CWR, TCP_ECE, TCP_URG];
  for (let trial = 0; trial < 300; trial++) {
    const ipVersion = rand() < 0.5 ? 4 : 6;
    // Payload 0..65535 but within one IP packet; a third of the trials small.
    const maxPayload = 65535 - (ipVersion === 4 ? 20 : 0) - 40;
    const size = rand() < 0.33 ? (rand() * 3000) | 0 : (rand() * (maxPayload + 1)) | 0;
    const mss = 1 + ((rand() < 0.1 ? rand() * 64 : rand() * 9000) | 0);
    let tcpFlags = TCP_ACK;
    for (const f of flagBits) if (rand() < 0.4) tcpFlags |= f;
    const spec: FrameSpec = {
      ipVersion,
      payload: randomBytes(rand, size),
      tcpFlags,
      tos: (rand() * 256) | 0,
      seq: (rand() * 2 ** 32) >>> 0,
      ipId: (rand() * 65536) | 0,
      tcpOptions: rand() < 0.5 ? tcpTimestampOption(trial, trial * 7) : undefined,
      vlan: rand() < 0.2 ? 7 : undefined,
    };
    if (mss < 8 && size > 2000) spec.payload = spec.payload!.subarray(0, 2000);
    const { segs, built } = segmentSpec(spec, mss);
    checkSegments(built, segs, mss);
  }
});
