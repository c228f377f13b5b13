/**
 * The TX path validates a GSO frame's headers on a copied prefix, so a 64 KiB
 * frame is not copied whole: the prefix must give exactly the full frame's
 * verdict, and headers beyond the prefix must ask for a longer copy.
 */
import assert from "node:assert/strict";
import { createParsedFrame, FrameParse, parseFrame } from "../../device/frame_parse.ts";
import {
  createNetHdr,
  NET_OFFLOAD_ALL,
  NetDrop,
  validateTxHeader,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
} from "../../device/net_header.ts";
import { buildFrame, prng, randomBytes } from "./frames.ts";

function gsoHeader(built: ReturnType<typeof buildFrame>, v6: boolean) {
  const hdr = createNetHdr();
  hdr.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
  hdr.gsoType = v6 ? VIRTIO_NET_HDR_GSO_TCPV6 : VIRTIO_NET_HDR_GSO_TCPV4;
  hdr.gsoSize = 1448;
  hdr.csumStart = built.l4Offset;
  hdr.csumOffset = 16;
  return hdr;
}

Deno.test("a 256-byte prefix gives the same verdict and offsets as the whole GSO frame", () => {
  const rand = prng(7);
  for (const v6 of [false, true]) {
    const built = buildFrame({
      ipVersion: v6 ? 6 : 4,
      payload: randomBytes(rand, 60_000),
      checksum: "partial",
    });
    const full = createParsedFrame();
    const part = createParsedFrame();
    const h1 = gsoHeader(built, v6);
    const h2 = gsoHeader(built, v6);
    assert.equal(validateTxHeader(h1, NET_OFFLOAD_ALL, built.frame, built.frame.length, full), 0);
    const prefix = built.frame.slice(0, 256);
    assert.equal(validateTxHeader(h2, NET_OFFLOAD_ALL, prefix, built.frame.length, part), 0);
    assert.deepEqual(part, full);
    assert.deepEqual(h2, h1);
  }
});

Deno.test("a prefix that a bad frame's lengths exceed still fails like the whole frame", () => {
  const built = buildFrame({ payload: new Uint8Array(5000), checksum: "partial" });
  // The frame claims 5000 payload bytes but is cut to 4000: IPv4 total length is now too long.
  const cut = built.frame.length - 1000;
  const hdr = gsoHeader(built, false);
  assert.equal(
    validateTxHeader(hdr, NET_OFFLOAD_ALL, built.frame.slice(0, 256), cut, createParsedFrame()),
    NetDrop.IPV4_BAD_TOTAL_LENGTH,
  );
});

Deno.test("headers that run past the prefix give PREFIX_SHORT, never a verdict", () => {
  const ext = [0, 60, 43].map((type) => ({ type, body: new Uint8Array(6 + 8 * 15) }));
  const built = buildFrame({ ipVersion: 6, ipv6Ext: ext, payload: new Uint8Array(3000) });
  assert.ok(built.l4Offset > 256);
  const out = createParsedFrame();
  assert.equal(
    parseFrame(built.frame.subarray(0, 256), out, built.frame.length),
    FrameParse.PREFIX_SHORT,
  );
  assert.equal(parseFrame(built.frame, out), FrameParse.OK);
  for (const cut of [0, 5, 13, 20, 33, 53, 60]) {
    assert.equal(
      parseFrame(built.frame.subarray(0, cut), out, built.frame.length),
      FrameParse.PREFIX_SHORT,
      `cut at ${cut}`,
    );
  }
});
