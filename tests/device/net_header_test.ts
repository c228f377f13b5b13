import assert from "node:assert/strict";
import {
  VIRTIO_F_VERSION_1,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_USO4,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_USO,
  VIRTIO_NET_F_MRG_RXBUF,
} from "../../ipc/features.ts";
import { createParsedFrame, FrameParse, parseFrame } from "../../device/frame_parse.ts";
import {
  createNetHdr,
  guestOffloads,
  hostOffloads,
  NET_DROP_COUNT,
  NET_DROP_NAMES,
  NET_OFFLOAD_ALL,
  NET_OFFLOAD_CSUM,
  NET_OFFLOAD_TSO4,
  NET_OFFLOAD_TSO6,
  NET_OFFLOAD_TSO_ECN,
  NET_OFFLOAD_USO4,
  NET_OFFLOAD_USO6,
  NetDrop,
  readNetHdr,
  validateTxHeader,
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_F_RSC_INFO,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
  type VirtioNetHdr,
  writeNetHdr,
} from "../../device/net_header.ts";
import { createNetOffloadContext, decideTx, processTx, TxAction } from "../../device/offload.ts";
import {
  buildFrame,
  type BuiltFrame,
  type FrameSpec,
  l4ChecksumOk,
  prng,
  randomBytes,
  TCP_ACK,
  TCP_FIN,
  TCP_PSH,
} from "./frames.ts";

const ALL_HOST = VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 |
  VIRTIO_NET_F_HOST_ECN | VIRTIO_NET_F_HOST_USO | VIRTIO_F_VERSION_1;

function hdrOf(fields: Partial<VirtioNetHdr>): VirtioNetHdr {
  return { ...createNetHdr(), ...fields };
}

/** A GSO header that fits frame `b` (TCPV4/TCPV6 by its IP version). */
function gsoHdr(b: BuiltFrame, mss: number, extra: Partial<VirtioNetHdr> = {}): VirtioNetHdr {
  const v4 = b.frame[b.l3Offset] >> 4 === 4;
  return hdrOf({
    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gsoType: v4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6,
    gsoSize: mss,
    hdrLen: b.payloadOffset,
    csumStart: b.l4Offset,
    csumOffset: 16,
    ...extra,
  });
}

function partial(spec: FrameSpec): BuiltFrame {
  return buildFrame({ payload: randomBytes(prng(9), 3000), ...spec, checksum: "partial" });
}

Deno.test("readNetHdr() copies the 12 little-endian bytes once; writeNetHdr() writes them back", () => {
  const src = new Uint8Array([
    9,
    0x01,
    0x80,
    0x02,
    0x36,
    0x42,
    0xa8,
    0x05,
    0x22,
    0x00,
    0x10,
    0x00,
    0xcc,
  ]);
  const hdr = createNetHdr();
  assert.equal(readNetHdr(src, 1, hdr), true);
  assert.deepEqual(hdr, {
    flags: 0x01,
    gsoType: 0x80,
    hdrLen: 0x3602,
    gsoSize: 0xa842,
    csumStart: 0x2205,
    csumOffset: 0x1000,
    numBuffers: 0xcc00,
  });
  // The copy does not follow later changes to the source (no double fetch).
  src.fill(0);
  assert.equal(hdr.gsoSize, 0xa842);
  const out = new Uint8Array(13);
  writeNetHdr(hdr, out, 1);
  assert.deepEqual(
    out.subarray(1),
    new Uint8Array([1, 0x80, 2, 0x36, 0x42, 0xa8, 5, 0x22, 0, 0x10, 0, 0xcc]),
  );
});

Deno.test("readNetHdr() refuses fewer than 12 bytes and leaves the header untouched", () => {
  const hdr = hdrOf({ gsoSize: 7 });
  assert.equal(readNetHdr(new Uint8Array(11), 0, hdr), false);
  assert.equal(readNetHdr(new Uint8Array(20), 9, hdr), false);
  assert.equal(hdr.gsoSize, 7);
  assert.throws(() => writeNetHdr(hdr, new Uint8Array(11), 0), RangeError);
});

Deno.test("hostOffloads() and guestOffloads() map the feature bits to TUN_F_* values", () => {
  assert.equal(
    hostOffloads(ALL_HOST),
    NET_OFFLOAD_CSUM | NET_OFFLOAD_TSO4 | NET_OFFLOAD_TSO6 |
      NET_OFFLOAD_TSO_ECN | NET_OFFLOAD_USO4 | NET_OFFLOAD_USO6,
  );
  // Guest bits do not count as host bits and the other way round.
  assert.equal(
    hostOffloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MRG_RXBUF),
    0,
  );
  assert.equal(guestOffloads(ALL_HOST), 0);
  assert.equal(
    guestOffloads(
      VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 |
        VIRTIO_NET_F_GUEST_ECN | VIRTIO_NET_F_GUEST_USO4,
    ),
    0x01 | 0x02 | 0x04 | 0x08 | 0x20,
  );
});

Deno.test("NET_DROP_NAMES names every NetDrop code in one counter array", () => {
  for (const [name, code] of Object.entries(NetDrop)) {
    assert.ok(code < NET_DROP_COUNT, name);
    assert.equal(NET_DROP_NAMES[code], name);
  }
});

Deno.test("validateTxHeader() drops each invalid header with the reason that names it", async (t) => {
  const v4 = partial({});
  const v6 = partial({ ipVersion: 6 });
  const udp = partial({ l4: "udp" });
  const host = hostOffloads(ALL_HOST);
  const cases: [string, BuiltFrame, VirtioNetHdr, number, number][] = [
    [
      "DATA_VALID on TX",
      v4,
      hdrOf({ flags: VIRTIO_NET_HDR_F_DATA_VALID }),
      host,
      NetDrop.HDR_FLAGS_INVALID,
    ],
    [
      "RSC_INFO on TX (== GSO_TCPV6 value)",
      v4,
      hdrOf({ flags: VIRTIO_NET_HDR_F_RSC_INFO }),
      host,
      NetDrop.HDR_FLAGS_INVALID,
    ],
    ["NEEDS_CSUM without CSUM", v4, gsoHdr(v4, 0, { gsoType: 0 }), 0, NetDrop.CSUM_NOT_NEGOTIATED],
    [
      "csum_start inside the Ethernet header",
      v4,
      gsoHdr(v4, 0, { gsoType: 0, csumStart: 13 }),
      host,
      NetDrop.CSUM_START_TOO_SMALL,
    ],
    [
      "checksum field past the end",
      v4,
      gsoHdr(v4, 0, { gsoType: 0, csumStart: v4.frame.length - 1, csumOffset: 0 }),
      host,
      NetDrop.CSUM_OUT_OF_FRAME,
    ],
    [
      "csum_offset overflowing the frame",
      v4,
      gsoHdr(v4, 0, { gsoType: 0, csumOffset: 0xffff }),
      host,
      NetDrop.CSUM_OUT_OF_FRAME,
    ],
    [
      "hdr_len past the frame",
      v4,
      hdrOf({ hdrLen: v4.frame.length + 1 }),
      host,
      NetDrop.HDR_LEN_TOO_LONG,
    ],
    ["gso_type 2", v4, gsoHdr(v4, 1448, { gsoType: 2 }), host, NetDrop.GSO_TYPE_UNKNOWN],
    [
      "gso_type 0x10 (AccECN, not in virtio 1.2)",
      v4,
      gsoHdr(v4, 1448, { gsoType: 0x11 }),
      host,
      NetDrop.GSO_TYPE_UNKNOWN,
    ],
    [
      "ECN bit without GSO",
      v4,
      hdrOf({ gsoType: VIRTIO_NET_HDR_GSO_ECN }),
      host,
      NetDrop.GSO_ECN_INVALID,
    ],
    [
      "TSO4 without HOST_TSO4",
      v4,
      gsoHdr(v4, 1448),
      host & ~NET_OFFLOAD_TSO4,
      NetDrop.GSO_NOT_NEGOTIATED,
    ],
    [
      "TSO6 without HOST_TSO6",
      v6,
      gsoHdr(v6, 1448),
      host & ~NET_OFFLOAD_TSO6,
      NetDrop.GSO_NOT_NEGOTIATED,
    ],
    [
      "UFO without HOST_UFO",
      udp,
      gsoHdr(udp, 1000, { gsoType: VIRTIO_NET_HDR_GSO_UDP, csumOffset: 6 }),
      host,
      NetDrop.GSO_NOT_NEGOTIATED,
    ],
    [
      "ECN without HOST_ECN",
      v4,
      gsoHdr(v4, 1448, { gsoType: 0x81 }),
      host & ~NET_OFFLOAD_TSO_ECN,
      NetDrop.GSO_ECN_INVALID,
    ],
    [
      "ECN on USO",
      udp,
      gsoHdr(udp, 1000, { gsoType: 0x85, csumOffset: 6 }),
      host,
      NetDrop.GSO_ECN_INVALID,
    ],
    ["gso_size 0", v4, gsoHdr(v4, 0), host, NetDrop.GSO_SIZE_ZERO],
    [
      "GSO without NEEDS_CSUM",
      v4,
      gsoHdr(v4, 1448, { flags: 0 }),
      host,
      NetDrop.GSO_WITHOUT_NEEDS_CSUM,
    ],
    [
      "TCPV4 on an IPv6 frame",
      v6,
      gsoHdr(v6, 1448, { gsoType: VIRTIO_NET_HDR_GSO_TCPV4 }),
      host,
      NetDrop.GSO_PROTO_MISMATCH,
    ],
    [
      "TCPV6 on an IPv4 frame",
      v4,
      gsoHdr(v4, 1448, { gsoType: VIRTIO_NET_HDR_GSO_TCPV6 }),
      host,
      NetDrop.GSO_PROTO_MISMATCH,
    ],
    [
      "TCPV4 on a UDP frame",
      udp,
      gsoHdr(udp, 1448, { csumOffset: 6 }),
      host,
      NetDrop.GSO_L4_MISMATCH,
    ],
    [
      "csum_start not at the TCP header",
      v4,
      gsoHdr(v4, 1448, { csumStart: v4.l4Offset + 4, csumOffset: 12 }),
      host,
      NetDrop.GSO_CSUM_START_NOT_L4,
    ],
    [
      "csum_offset not the TCP checksum",
      v4,
      gsoHdr(v4, 1448, { csumOffset: 14 }),
      host,
      NetDrop.GSO_CSUM_OFFSET_WRONG,
    ],
    [
      "USO making more than 128 segments",
      udp,
      gsoHdr(udp, 20, { gsoType: VIRTIO_NET_HDR_GSO_UDP_L4, csumOffset: 6 }),
      host,
      NetDrop.GSO_TOO_MANY_SEGMENTS,
    ],
  ];
  for (const [name, b, hdr, offloads, want] of cases) {
    await t.step(`${name} -> ${NET_DROP_NAMES[want]}`, () => {
      const got = validateTxHeader(hdr, offloads, b.frame, b.frame.length, createParsedFrame());
      assert.equal(NET_DROP_NAMES[got], NET_DROP_NAMES[want]);
    });
  }
});

Deno.test("validateTxHeader() drops GSO frames that do not parse, with the parse reason", async (t) => {
  const host = hostOffloads(ALL_HOST);
  const v4 = partial({});
  const short = v4.frame.slice(0, 30);
  const frag = partial({ ipVersion: 6, ipv6Ext: [{ type: 44, body: new Uint8Array(6) }] });
  const ipFrag = partial({});
  ipFrag.frame[ipFrag.l3Offset + 6] |= 0x20; // MF
  const badDoff = partial({});
  badDoff.frame[badDoff.l4Offset + 12] = 0x40;
  const cases: [string, Uint8Array, VirtioNetHdr, number][] = [
    [
      "truncated IPv4 header",
      short,
      gsoHdr(v4, 1448, { csumStart: 14, csumOffset: 0, hdrLen: 0 }),
      FrameParse.IPV4_TRUNCATED,
    ],
    ["IPv6 fragment header", frag.frame, gsoHdr(frag, 1000), FrameParse.IPV6_FRAGMENT],
    ["IPv4 fragment", ipFrag.frame, gsoHdr(ipFrag, 1000), FrameParse.IPV4_FRAGMENT],
    ["TCP data offset 4", badDoff.frame, gsoHdr(badDoff, 1000), FrameParse.TCP_BAD_DATA_OFFSET],
  ];
  for (const [name, frame, hdr, want] of cases) {
    await t.step(name, () => {
      const got = validateTxHeader(hdr, host, frame, frame.length, createParsedFrame());
      assert.equal(NET_DROP_NAMES[got], NET_DROP_NAMES[want]);
    });
  }
});

Deno.test("validateTxHeader() reads gso_type, not flags: a NEEDS_CSUM UDP frame is checksum-only", () => {
  // The seed's bug: VIRTIO_NET_HDR_GSO_TCPV4 == VIRTIO_NET_HDR_F_NEEDS_CSUM == 1.
  const udp = partial({ l4: "udp" });
  const hdr = hdrOf({ flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, csumStart: udp.l4Offset, csumOffset: 6 });
  const host = hostOffloads(VIRTIO_NET_F_CSUM);
  assert.equal(
    validateTxHeader(hdr, host, udp.frame, udp.frame.length, createParsedFrame()),
    NetDrop.OK,
  );
  assert.equal(decideTx(hdr, 0), TxAction.COMPLETE_CSUM);
});

Deno.test("validateTxHeader() accepts TSO behind one 802.1Q tag and fixes hdr_len", () => {
  for (const ipVersion of [4, 6] as const) {
    const b = partial({ ipVersion, vlan: 100 });
    const hdr = gsoHdr(b, 1448, { hdrLen: 3 });
    const parsed = createParsedFrame();
    assert.equal(
      validateTxHeader(hdr, hostOffloads(ALL_HOST), b.frame, b.frame.length, parsed),
      NetDrop.OK,
    );
    assert.equal(parsed.l3Offset, 18);
    assert.equal(hdr.hdrLen, b.payloadOffset);
  }
});

Deno.test("validateTxHeader() accepts CWR without the ECN bit, as Linux does", () => {
  const b = partial({ tcpFlags: TCP_ACK | 0x80 });
  const host = hostOffloads(ALL_HOST) & ~NET_OFFLOAD_TSO_ECN;
  assert.equal(
    validateTxHeader(gsoHdr(b, 1448), host, b.frame, b.frame.length, createParsedFrame()),
    NetDrop.OK,
  );
});

Deno.test("parseFrame() finds TCP after an IPv6 routing header and stops at trailing padding", () => {
  const b = buildFrame({
    ipVersion: 6,
    ipv6Ext: [{ type: 43, body: new Uint8Array(6) }],
    payload: new Uint8Array(5),
    padding: 11,
  });
  const parsed = createParsedFrame();
  assert.equal(parseFrame(b.frame, parsed), FrameParse.OK);
  assert.equal(parsed.l4Offset, b.l4Offset);
  assert.equal(parsed.l3End, b.l3End);
  assert.equal(parsed.payloadOffset, b.payloadOffset);
});

Deno.test("parseFrame() never throws and never reports offsets outside the frame on random input", () => {
  const rand = prng(404);
  const parsed = createParsedFrame();
  const base = buildFrame({ ipVersion: 6, ipv6Ext: [{ type: 0, body: new Uint8Array(6) }] }).frame;
  for (let i = 0; i < 20000; i++) {
    const f = i % 2 === 0
      ? randomBytes(rand, (rand() * 120) | 0)
      : base.slice(0, (rand() * base.length) | 0);
    if (i % 4 === 1) f[(rand() * f.length) | 0] = (rand() * 256) | 0;
    if (f.length > 13 && i % 3 === 0) {
      f[12] = 0x86;
      f[13] = 0xdd;
    }
    if (parseFrame(f, parsed) === FrameParse.OK) {
      assert.ok(parsed.payloadOffset <= parsed.l3End && parsed.l3End <= f.length);
    }
  }
});

/** Collects what processTx hands to the sink. */
function collect(): {
  out: { hdr: VirtioNetHdr; bytes: Uint8Array }[];
  sink: (h: VirtioNetHdr, b: Uint8Array, n: number) => void;
} {
  const out: { hdr: VirtioNetHdr; bytes: Uint8Array }[] = [];
  return { out, sink: (h, b, n) => out.push({ hdr: { ...h }, bytes: b.slice(0, n) }) };
}

Deno.test("processTx() passes a TSO frame through unchanged to a sink that takes TSO", () => {
  const b = partial({});
  const ctx = createNetOffloadContext();
  const { out, sink } = collect();
  const hdr = gsoHdr(b, 1448, { hdrLen: 0 });
  assert.equal(
    processTx(ctx, hdr, b.frame, b.frame.length, hostOffloads(ALL_HOST), NET_OFFLOAD_ALL, sink),
    NetDrop.OK,
  );
  assert.equal(out.length, 1);
  assert.equal(out[0].hdr.gsoType, VIRTIO_NET_HDR_GSO_TCPV4);
  assert.equal(out[0].hdr.hdrLen, b.payloadOffset);
  assert.deepEqual(out[0].bytes, b.frame);
  assert.equal(ctx.stats.passThrough, 1);
});

Deno.test("processTx() segments TSO for a sink without it, never writing to the guest's frame", () => {
  const b = partial({ tcpFlags: TCP_ACK | TCP_PSH | TCP_FIN });
  const before = b.frame.slice();
  const ctx = createNetOffloadContext();
  const { out, sink } = collect();
  const r = processTx(
    ctx,
    gsoHdr(b, 1000),
    b.frame,
    b.frame.length,
    hostOffloads(ALL_HOST),
    NET_OFFLOAD_CSUM,
    sink,
  );
  assert.equal(r, NetDrop.OK);
  assert.equal(out.length, 3);
  for (const s of out) {
    assert.deepEqual(s.hdr, createNetHdr());
    assert.ok(l4ChecksumOk(s.bytes, b.l3Offset, b.l4Offset, s.bytes.length, 6));
  }
  assert.deepEqual(b.frame, before);
  assert.deepEqual({ ...ctx.stats }, {
    passThrough: 0,
    csumCompleted: 0,
    segmented: 1,
    segments: 3,
  });
});

Deno.test("processTx() segments ECN TSO for a sink that takes TSO but not TSO_ECN", () => {
  const b = partial({});
  assert.equal(
    decideTx(gsoHdr(b, 1000, { gsoType: 0x81 }), NET_OFFLOAD_CSUM | NET_OFFLOAD_TSO4),
    TxAction.SEGMENT,
  );
  assert.equal(
    decideTx(gsoHdr(b, 1000, { gsoType: 0x81 }), NET_OFFLOAD_ALL),
    TxAction.PASS_THROUGH,
  );
  assert.equal(decideTx(gsoHdr(b, 1000), NET_OFFLOAD_TSO4), TxAction.SEGMENT, "TSO needs CSUM too");
});

Deno.test("processTx() completes the checksum for a sink without CSUM, on a copy", () => {
  const b = partial({ l4: "udp", padding: 6 });
  const before = b.frame.slice();
  const ctx = createNetOffloadContext();
  const { out, sink } = collect();
  const hdr = hdrOf({ flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, csumStart: b.l4Offset, csumOffset: 6 });
  assert.equal(
    processTx(ctx, hdr, b.frame, b.frame.length, hostOffloads(ALL_HOST), 0, sink),
    NetDrop.OK,
  );
  assert.equal(out.length, 1);
  assert.equal(out[0].hdr.flags, 0);
  assert.equal(out[0].bytes.length, b.frame.length);
  assert.ok(l4ChecksumOk(out[0].bytes, b.l3Offset, b.l4Offset, b.l3End, 17));
  assert.deepEqual(b.frame, before);
});

Deno.test("processTx() drops USO for a sink without USO and counts it", () => {
  const b = partial({ l4: "udp" });
  const ctx = createNetOffloadContext();
  const hdr = gsoHdr(b, 1000, { gsoType: VIRTIO_NET_HDR_GSO_UDP_L4, csumOffset: 6 });
  const r = processTx(
    ctx,
    hdr,
    b.frame,
    b.frame.length,
    hostOffloads(ALL_HOST),
    NET_OFFLOAD_CSUM,
    () => assert.fail(),
  );
  assert.equal(r, NetDrop.OFFLOAD_UNSUPPORTED);
  assert.equal(ctx.drops[NetDrop.OFFLOAD_UNSUPPORTED], 1);
});

Deno.test("processTx() counts a drop per reason and sends nothing", () => {
  const b = partial({});
  const ctx = createNetOffloadContext();
  const hdr = gsoHdr(b, 0);
  for (let i = 0; i < 3; i++) {
    assert.equal(
      processTx(ctx, hdr, b.frame, b.frame.length, hostOffloads(ALL_HOST), 0, () => assert.fail()),
      NetDrop.GSO_SIZE_ZERO,
    );
  }
  assert.equal(ctx.drops[NetDrop.GSO_SIZE_ZERO], 3);
});
