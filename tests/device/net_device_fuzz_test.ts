/**
 * Deterministic fuzzing of the net device on top of its virtqueues (STYLE.md
 * habit 14): random and mutated virtio-net headers, frames and descriptor
 * chains thrown at the real NetDevice loop, TX and RX at once, under random
 * negotiated features and offload modes. The ring-level fuzz
 * (virtqueue_fuzz_test.ts) covers descriptor walking in depth; this one is
 * about what the device does with what the rings carry.
 *
 * One case: guest memory (one or two regions), random features (repaired
 * until negotiation.ts accepts them) and `--offload auto|off`, queue sizes
 * and start indices; then rounds of
 *   driver:  TX chains (valid frames with valid headers, mutated headers,
 *            mutated frames, junk; random split points, header-only and
 *            zero-length descriptors, indirect tables; now and then a
 *            malicious descriptor: out of memory, device-writable on TX,
 *            device-readable on RX, a loop, next out of range); RX chains
 *            (1..4096-byte buffers, some shorter than the header, some too
 *            fragmented, indirect); kicks only when the ring asks for them;
 *   tap:     frames of 14..65550 bytes with tap-like headers (plain,
 *            DATA_VALID, partial checksum, GSO) or junk, through FakeIo;
 *            hostile rx-done records;
 *   settle:  the fake writer runs until every TX chain is back and every
 *            RX chain is used or posted.
 *
 * Invariants, checked after every round and at the end of every case:
 * - nothing escapes the device: no exception from its API, no rejected
 *   loop promise (observed as an unhandled rejection), FakeIo never sees an
 *   iovec outside guest memory or the bounce arena;
 * - every used entry names a chain the driver offered and has not had back;
 *   every offered chain comes back (TX at once, RX by stop(), which may
 *   instead leave unfilled RX chains available again, between the
 *   last_avail_idx it reports and avail->idx) unless its queue reported
 *   needs-reset; the device never stalls when the driver
 *   kicks only where the ring asks it to; an interrupt follows new used
 *   entries the driver asked to hear about;
 * - every guest byte that changed lies in a posted, valid RX buffer or in a
 *   used ring (with avail_event);
 * - TX: TX used lengths are 0; each frame the writer got comes, in avail
 *   order, from one offered chain (a tag in the source MAC says which) whose
 *   descriptors were sound and whose header an independent check accepts;
 *   `auto`: the header is the guest's except hdr_len (the parsed header
 *   length for GSO) and the frame is the guest's; `off`: the header is all
 *   zero, a completed checksum verifies, segments carry valid IPv4 and TCP
 *   checksums and together the original payload; a valid frame is sent;
 *   the tx0.frames counter equals what the writer got;
 * - RX: used lengths never exceed the chain's capacity; chains with bad
 *   descriptors come back with 0; num_buffers is 1 without MRG_RXBUF and
 *   otherwise counts the used entries of the frame; flags carry nothing but
 *   NEEDS_CSUM/DATA_VALID, and nothing at all without GUEST_CSUM; gso_type
 *   is one the driver negotiated; the frame is the tap's (a completed
 *   checksum verifies); a frame the guest can take is delivered.
 *
 * A last test runs the same traffic against the real zero-permission device
 * worker (DeviceHost), guest memory mmap'd once and viewed twice: one view
 * transferred to the worker, one kept to play the driver.
 *
 * Seeds: VIONET_FUZZ_SEED (first seed), VIONET_FUZZ_CASES (how many random
 * cases; default 45, ~5-8 s), VIONET_FUZZ_ONLY (replay one seed; a failure
 * names its seed and prints the device's counters and queue faults).
 * Seeds that once broke something live in tests/testdata/net_device_fuzz_seeds.json
 * and run first.
 *
 * @module
 */

import assert from "node:assert/strict";
import { NetDevice } from "../../device/net_device.ts";
import { checkDriverFeatures, DEVICE_FEATURES } from "../../device/negotiation.ts";
import { VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_SIZE } from "../../device/chain.ts";
import { usedRingSize, VIRTQ_AVAIL_F_NO_INTERRUPT } from "../../device/virtqueue.ts";
import {
  CTL,
  MAX_FRAME_BYTES,
  NET_HDR_BYTES,
  RX_MAX_IOV,
  RX_POST,
  RX_PUBLISHED,
  RX_UNUSED,
  RXF_LONG,
  rxSignalChains,
} from "../../ipc/datapath.ts";
import { RX_FRAME_ROOM_MAX } from "../../parent/io/protocol.ts";
import {
  VIRTIO_F_VERSION_1,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../../ipc/features.ts";
import { DeviceHost } from "../../parent/control/device_host.ts";
import * as libc from "../../parent/host/libc.ts";
import { quietLogger, testConfig } from "../helpers.ts";
import { type PostedChain, TestDriver, TestGuest, type TestRegionSpec } from "./driver.ts";
import { FAKE_BOUNCE, FAKE_HOST, FakeIo } from "./fake_io.ts";
import {
  buildFrame,
  type FrameSpec,
  ipv4HeaderChecksumOk,
  type Ipv6Ext,
  l4ChecksumOk,
  prng,
  randomBytes,
  refSum,
  tcpTimestampOption,
} from "./frames.ts";

const FIRST_SEED = Number(Deno.env.get("VIONET_FUZZ_SEED") ?? 0x6e3d);
const CASES = Number(Deno.env.get("VIONET_FUZZ_CASES") ?? 45);
const SETTLE_MS = 3000;

// ------------------------------------------------------------------ randomness

class Rand {
  readonly next: () => number;
  constructor(seed: number) {
    this.next = prng(seed);
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  pick<T>(xs: readonly T[]): T {
    return xs[this.int(xs.length)];
  }
  bytes(n: number): Uint8Array {
    return randomBytes(this.next, n);
  }
}

// ------------------------------------------------------------------ net header

/** virtio 1.2 §5.1.6 struct virtio_net_hdr, decoded by the test itself. */
interface Hdr {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
  numBuffers: number;
}

const ZERO_HDR: Hdr = {
  flags: 0,
  gsoType: 0,
  hdrLen: 0,
  gsoSize: 0,
  csumStart: 0,
  csumOffset: 0,
  numBuffers: 0,
};

function encodeHdr(h: Hdr): Uint8Array {
  const b = new Uint8Array(NET_HDR_BYTES);
  const v = new DataView(b.buffer);
  b[0] = h.flags;
  b[1] = h.gsoType;
  v.setUint16(2, h.hdrLen, true);
  v.setUint16(4, h.gsoSize, true);
  v.setUint16(6, h.csumStart, true);
  v.setUint16(8, h.csumOffset, true);
  v.setUint16(10, h.numBuffers, true);
  return b;
}

function decodeHdr(b: Uint8Array): Hdr {
  const v = new DataView(b.buffer, b.byteOffset, NET_HDR_BYTES);
  return {
    flags: b[0],
    gsoType: b[1],
    hdrLen: v.getUint16(2, true),
    gsoSize: v.getUint16(4, true),
    csumStart: v.getUint16(6, true),
    csumOffset: v.getUint16(8, true),
    numBuffers: v.getUint16(10, true),
  };
}

function showHdr(h: Hdr): string {
  return `{flags ${h.flags} gso ${h.gsoType} hdr_len ${h.hdrLen} gso_size ${h.gsoSize} ` +
    `csum ${h.csumStart}+${h.csumOffset} nb ${h.numBuffers}}`;
}

const NEEDS_CSUM = 1;
const DATA_VALID = 2;
const GSO_TCPV4 = 1;
const GSO_TCPV6 = 4;
const GSO_ECN = 0x80;

// ------------------------------------------------------------------ an independent frame parse

interface MiniParse {
  ethertype: number;
  l3: number;
  /** One past the IP packet. */
  end: number;
  proto: number;
  l4: number;
  /** Where the L4 payload starts. */
  payload: number;
}

function be16(b: Uint8Array, at: number): number {
  return (b[at] << 8) | b[at + 1];
}

/**
 * Ethernet (one 802.1Q/802.1ad tag), IPv4 (no fragments) or IPv6 (up to 8
 * hop-by-hop/routing/destination-options headers, no fragment header), then
 * TCP or UDP; null when any of it does not hold. Written for this test from
 * the RFCs, not from device/frame_parse.ts.
 */
function miniParse(f: Uint8Array): MiniParse | null {
  const len = f.length;
  if (len < 14) return null;
  let l3 = 14;
  let type = be16(f, 12);
  if (type === 0x8100 || type === 0x88a8) {
    if (len < 18) return null;
    type = be16(f, 16);
    l3 = 18;
  }
  let proto: number;
  let l4: number;
  let end: number;
  if (type === 0x0800) {
    if (l3 + 20 > len || f[l3] >> 4 !== 4) return null;
    const ihl = (f[l3] & 15) * 4;
    const total = be16(f, l3 + 2);
    if (ihl < 20 || total < ihl || l3 + total > len) return null;
    if ((be16(f, l3 + 6) & 0x3fff) !== 0) return null;
    proto = f[l3 + 9];
    l4 = l3 + ihl;
    end = l3 + total;
  } else if (type === 0x86dd) {
    if (l3 + 40 > len || f[l3] >> 4 !== 6) return null;
    const pl = be16(f, l3 + 4);
    if (pl === 0 || l3 + 40 + pl > len) return null;
    end = l3 + 40 + pl;
    proto = f[l3 + 6];
    l4 = l3 + 40;
    let n = 0;
    while (proto === 0 || proto === 43 || proto === 60) {
      if (++n > 8 || l4 + 8 > end) return null;
      const extLen = (f[l4 + 1] + 1) * 8;
      if (l4 + extLen > end) return null;
      proto = f[l4];
      l4 += extLen;
    }
  } else {
    return null;
  }
  let payload: number;
  if (proto === 6) {
    if (l4 + 20 > end) return null;
    const doff = (f[l4 + 12] >> 4) * 4;
    if (doff < 20 || l4 + doff > end) return null;
    payload = l4 + doff;
  } else if (proto === 17) {
    if (l4 + 8 > end) return null;
    payload = l4 + 8;
  } else {
    return null;
  }
  return { ethertype: type, l3, end, proto, l4, payload };
}

/**
 * Why a guest TX header must not reach the tap, or null when it may
 * (virtio 1.2 §5.1.6.2, §5.1.6.2.1; Linux virtio_net_hdr_to_skb). Only
 * CSUM/HOST_TSO4/HOST_TSO6/HOST_ECN can be negotiated: UFO and USO are
 * never offered.
 */
function txHeaderProblem(h: Hdr, frame: Uint8Array, features: bigint): string | null {
  const len = frame.length;
  if ((h.flags & ~NEEDS_CSUM) !== 0) return "flags other than NEEDS_CSUM";
  if (h.flags === NEEDS_CSUM) {
    if (!(features & VIRTIO_NET_F_CSUM)) return "NEEDS_CSUM without CSUM";
    if (h.csumStart < 14) return "csum_start inside the Ethernet header";
    if (h.csumStart + h.csumOffset + 2 > len) return "checksum field past the frame";
  }
  if (h.hdrLen > len) return "hdr_len past the frame";
  const gso = h.gsoType & ~GSO_ECN;
  const ecn = (h.gsoType & GSO_ECN) !== 0;
  if (gso === 0) return ecn ? "ECN without GSO" : null;
  if (gso !== GSO_TCPV4 && gso !== GSO_TCPV6) return `gso_type ${h.gsoType} never negotiated`;
  if (!(features & (gso === GSO_TCPV4 ? VIRTIO_NET_F_HOST_TSO4 : VIRTIO_NET_F_HOST_TSO6))) {
    return "TSO not negotiated";
  }
  if (ecn && !(features & VIRTIO_NET_F_HOST_ECN)) return "ECN without HOST_ECN";
  if (h.gsoSize === 0) return "gso_size 0";
  if (h.flags !== NEEDS_CSUM) return "GSO without NEEDS_CSUM";
  if (h.csumOffset !== 16) return "GSO csum_offset is not TCP's";
  const p = miniParse(frame);
  if (!p) return "GSO frame does not parse";
  if (p.ethertype !== (gso === GSO_TCPV4 ? 0x0800 : 0x86dd)) return "GSO L3 mismatch";
  if (p.proto !== 6) return "GSO frame is not TCP";
  if (h.csumStart !== p.l4) return "csum_start is not the TCP header";
  return null;
}

/** Whether the driver takes RX frames of this gso_type (virtio 1.2 §5.1.6.3.1). */
function guestTakesGso(gsoType: number, features: bigint): boolean {
  const gso = gsoType & ~GSO_ECN;
  if (gso === 0) return (gsoType & GSO_ECN) === 0;
  if (!(features & VIRTIO_NET_F_GUEST_CSUM)) return false;
  if ((gsoType & GSO_ECN) && !(features & VIRTIO_NET_F_GUEST_ECN)) return false;
  if (gso === GSO_TCPV4) return (features & VIRTIO_NET_F_GUEST_TSO4) !== 0n;
  if (gso === GSO_TCPV6) return (features & VIRTIO_NET_F_GUEST_TSO6) !== 0n;
  return false; // UFO/USO are never offered; unknown types never valid
}

// ------------------------------------------------------------------ features

const FUZZED_FEATURES = [
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_STATUS,
  VIRTIO_NET_F_MTU,
];

/**
 * Random acknowledged features. Sets that break §5.1.3.1 dependencies are
 * drawn on purpose; negotiation refuses them (checked here), so the device
 * only ever sees the set repaired by dropping the features that lack theirs.
 */
function randomFeatures(r: Rand): { features: bigint; refused: boolean } {
  let f = VIRTIO_F_VERSION_1;
  for (const bit of FUZZED_FEATURES) if (r.chance(0.5)) f |= bit;
  const refused = checkDriverFeatures(f) !== null;
  const needs: [bigint, bigint][] = [
    [VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6],
    [VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CSUM],
    [VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_CSUM],
    [VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6],
    [VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_CSUM],
    [VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_CSUM],
  ];
  for (let changed = true; changed;) {
    changed = false;
    for (const [bit, need] of needs) {
      if ((f & bit) && !(f & need)) {
        f &= ~bit;
        changed = true;
      }
    }
  }
  const problem = checkDriverFeatures(f);
  if (problem !== null) throw new Error(`test bug: repaired features refused: ${problem}`);
  if ((f & ~DEVICE_FEATURES) !== 0n) throw new Error("test bug: feature not offered");
  return { features: f, refused };
}

// ------------------------------------------------------------------ frames

/** Source MAC 02:f0:tt:tt:tt:tt names the TX chain a frame (or segment) came from. */
function tagMac(tag: number): number[] {
  return [0x02, 0xf0, (tag >>> 24) & 0xff, (tag >>> 16) & 0xff, (tag >>> 8) & 0xff, tag & 0xff];
}

function readTag(f: Uint8Array): number {
  if (f.length < 12 || f[6] !== 0x02 || f[7] !== 0xf0) return -1;
  return ((f[8] << 24) | (f[9] << 16) | (f[10] << 8) | f[11]) >>> 0;
}

function concat(parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((s, p) => s + p.length, 0));
  let o = 0;
  for (const p of parts) {
    out.set(p, o);
    o += p.length;
  }
  return out;
}

interface Generated {
  hdr: Hdr;
  frame: Uint8Array;
  /** Set for frames built valid (not mutated): where things are. */
  built?: { l3: number; l4: number; payload: number; end: number; tcp: boolean };
  /** Header kind the generator chose, for messages. */
  kind: string;
}

function randomExts(r: Rand): Ipv6Ext[] {
  const n = r.chance(0.1) ? 9 : r.range(1, 3);
  const out: Ipv6Ext[] = [];
  for (let i = 0; i < n; i++) {
    const type = r.chance(0.05) ? 44 : r.pick([0, 43, 60]);
    out.push({ type, body: new Uint8Array(r.pick([6, 14, 22])) });
  }
  return out;
}

/** A frame as a driver or a tap would produce it, with the header that goes with it. */
function validFrame(
  r: Rand,
  mac: number[],
  opts: { gso: boolean; csum: boolean; maxPayload: number },
): Generated {
  const v6 = r.chance(0.4);
  const tcp = opts.gso || r.chance(0.75);
  const payloadLen = opts.gso
    ? (r.chance(0.15) ? r.int(200) : r.range(1000, opts.maxPayload))
    : (r.chance(0.1) ? r.range(1400, 9000) : r.int(1400));
  const spec: FrameSpec = {
    ipVersion: v6 ? 6 : 4,
    srcMac: mac,
    l4: tcp ? "tcp" : "udp",
    payload: r.bytes(payloadLen),
    checksum: opts.csum || opts.gso ? "partial" : "full",
    seq: r.int(0x1_0000_0000),
    ipId: r.int(0x10000),
  };
  if (r.chance(0.15)) spec.vlan = r.int(4096);
  if (v6 && r.chance(0.2)) spec.ipv6Ext = randomExts(r);
  if (tcp && r.chance(0.3)) spec.tcpOptions = tcpTimestampOption(r.int(1e9), r.int(1e9));
  if (r.chance(0.1)) spec.padding = r.range(1, 30);
  if (opts.gso && r.chance(0.2)) spec.tos = 2;
  const b = buildFrame(spec);
  const built = {
    l3: b.l3Offset,
    l4: b.l4Offset,
    payload: b.payloadOffset,
    end: b.l3End,
    tcp,
  };
  let hdr: Hdr = { ...ZERO_HDR };
  let kind = "plain";
  if (opts.gso && tcp) {
    kind = "gso";
    hdr = {
      flags: NEEDS_CSUM,
      gsoType: v6 ? GSO_TCPV6 : GSO_TCPV4,
      hdrLen: r.chance(0.5) ? b.payloadOffset : r.int(b.frame.length + 1),
      gsoSize: r.chance(0.1) ? r.range(200, 600) : r.range(536, 9000),
      csumStart: b.l4Offset,
      csumOffset: 16,
      numBuffers: 0,
    };
  } else if (opts.csum) {
    kind = "csum";
    hdr = { ...ZERO_HDR, flags: NEEDS_CSUM, csumStart: b.l4Offset, csumOffset: tcp ? 16 : 6 };
  }
  return { hdr, frame: b.frame, built, kind };
}

/** Changes 1..3 header fields to something random or close to a boundary. */
function mutateHdr(r: Rand, h: Hdr, len: number): Hdr {
  const m = { ...h };
  for (let n = r.range(1, 3); n > 0; n--) {
    switch (r.int(7)) {
      case 0:
        m.flags = r.pick([0, 1, 2, 3, 4, 5, 0x80, r.int(256)]);
        break;
      case 1:
        m.gsoType = r.pick([0, 1, 3, 4, 5, 6, 0x80, 0x81, 0x84, 0x85, r.int(256)]);
        break;
      case 2:
        m.gsoSize = r.pick([0, 1, 1448, 0xffff, r.int(0x10000)]);
        break;
      case 3:
        m.csumStart = r.pick([0, 13, 14, len - 2, len - 1, len, r.int(0x10000)]) & 0xffff;
        break;
      case 4:
        m.csumOffset = r.pick([0, 6, 16, 0xffff, r.int(0x10000)]);
        break;
      case 5:
        m.hdrLen = r.pick([0, len, len + 1, 0xffff, r.int(0x10000)]) & 0xffff;
        break;
      default:
        m.numBuffers = r.int(0x10000);
    }
  }
  return m;
}

/** Breaks the frame's L2/L3/L4 headers (never the tag in bytes 6..11). */
function mutateFrame(r: Rand, g: Generated): Uint8Array {
  let f = g.frame.slice();
  const b = g.built!;
  const poke = (at: number, v: number) => {
    if (at >= 12 && at < f.length) f[at] = v;
  };
  switch (r.int(9)) {
    case 0:
      f = f.slice(0, r.int(f.length));
      break;
    case 1:
      poke(b.l3 - 2, r.int(256));
      poke(b.l3 - 1, r.int(256));
      break;
    case 2:
      poke(b.l3, (r.int(16) << 4) | (f[b.l3] & 15));
      break;
    case 3:
      poke(b.l3, (f[b.l3] & 0xf0) | r.int(16)); // IHL, or IPv6 traffic class bits
      break;
    case 4:
      poke(b.l3 + 2, r.int(256)); // IPv4 total length / IPv6 flow label
      poke(b.l3 + 3, r.int(256));
      break;
    case 5:
      poke(b.l3 + 4, r.int(256)); // IPv4 id / IPv6 payload length
      poke(b.l3 + 5, r.int(256));
      break;
    case 6:
      poke(b.l3 + 6, r.pick([0x20, 0x1f, 0x40, r.int(256)])); // IPv4 MF/offset / IPv6 next header
      break;
    case 7:
      poke(b.l3 + 9, r.pick([6, 17, 1, 0, 44, r.int(256)])); // IPv4 protocol
      break;
    default:
      if (b.tcp) poke(b.l4 + 12, r.int(256)); // TCP data offset
      else poke(b.l4 + 4, r.int(256)); // UDP length
  }
  return f;
}

function junkFrame(r: Rand, mac: number[], maxLen: number): Uint8Array {
  const len = r.chance(0.05)
    ? r.int(14)
    : r.chance(0.1)
    ? r.range(2000, maxLen)
    : r.range(14, 2000);
  const f = r.bytes(len);
  if (len >= 12) f.set(mac, 6);
  return f;
}

// ------------------------------------------------------------------ the device under test

/** What the case needs from the device, in this thread or in the worker. */
interface DeviceUnderTest {
  /** Faults reported, by queue (0 rx, 1 tx); -1 (I/O) counted in `ioFaults`. */
  faults: [string[], string[]];
  ioFaults: string[];
  /**
   * Used-ring index (free-running, mod 2^16) of the first entry the device
   * could not have pushed before the queue's fault, when the DUT can tell.
   */
  faultUsedLimit: [number | null, number | null];
  /** Lets the device run. */
  tick(): Promise<void>;
  counters(): Promise<Record<string, Record<string, number>>>;
  /** Stops the queues; resolves with each queue's last_avail_idx. */
  stop(): Promise<{ rx: number; tx: number }>;
}

/** Rejections nobody handled while a case ran: a device loop that threw. */
const escaped: unknown[] = [];
globalThis.addEventListener("unhandledrejection", (e) => {
  escaped.push(e.reason);
  e.preventDefault();
});

// ------------------------------------------------------------------ one case

interface TxItem {
  tag: number;
  head: number;
  /** Position in avail order, for the order check. */
  serial: number;
  hdr: Hdr;
  frame: Uint8Array;
  gen: Generated;
  mutatedHdr: boolean;
  mutatedFrame: boolean;
  /** A descriptor was made invalid: the chain must come back unsent. */
  badDescriptors: string | null;
  sent: { hdr: Hdr; frame: Uint8Array }[];
}

interface RxFed {
  hdr: Hdr;
  frame: Uint8Array;
  heads: number[];
  /** Frames from hostile rx-done records: contents are whatever was there. */
  raw: boolean;
  valid: boolean;
  built?: Generated["built"];
  kind: string;
}

export interface Stats {
  cases: number;
  refusedFeatureSets: number;
  txChains: number;
  txSent: number;
  txBadDescriptors: number;
  rxChains: number;
  rxFrames: number;
  rxDelivered: number;
  /** Frames delivered into a chain of more than RX_MAX_IOV segments (the rx-long ring). */
  rxLongDelivered: number;
  /** Frames whose net header was spread over one-byte buffers. */
  rxSplitHeaderDelivered: number;
  /** RX chains the poller completed empty (discards: bad or too short). */
  rxDiscarded: number;
  hostileDone: number;
  queueFaults: number;
  rounds: number;
}

export function newStats(): Stats {
  return {
    cases: 0,
    refusedFeatureSets: 0,
    txChains: 0,
    txSent: 0,
    txBadDescriptors: 0,
    rxChains: 0,
    rxFrames: 0,
    rxDelivered: 0,
    rxLongDelivered: 0,
    rxSplitHeaderDelivered: 0,
    rxDiscarded: 0,
    hostileDone: 0,
    queueFaults: 0,
    rounds: 0,
  };
}

class FuzzCase {
  readonly rx: TestDriver;
  readonly tx: TestDriver;
  readonly io: FakeIo;
  readonly txItems = new Map<number, TxItem>();
  /** TX items in avail order not yet known to be finished. */
  readonly txOrder: TxItem[] = [];
  #nextTag = 1;
  #serial = 0;
  #sentSeen = 0;
  #lastSentSerial = -1;
  /** RX chains with bad descriptors (no writes allowed), by head. */
  readonly rxBad = new Set<number>();
  /** Capacity of each RX chain offered, by head. */
  readonly rxCap = new Map<number, number>();
  /** Each RX chain offered, by head. */
  readonly rxPostedChain = new Map<number, PostedChain>();
  /** Frames handed to the fake poller, by the head of their first chain. */
  readonly rxFed = new Map<number, RxFed>();
  /** A MRG_RXBUF frame whose used entries are still coming. */
  #group: { hdr: Hdr; heads: number[]; lens: number[]; bytes: Uint8Array[]; n: number } | null =
    null;
  /** Heads the driver has offered and not had back (the ledger). */
  readonly offered = [new Set<number>(), new Set<number>()];
  /** used->idx of each queue when last looked at. */
  readonly lastUsedIdx: [number, number];
  /** A hostile rx-done record claimed chains published that nobody completed: they are lost. */
  pollerLied = false;
  dut!: DeviceUnderTest;

  constructor(
    readonly r: Rand,
    readonly seed: number,
    readonly guest: TestGuest,
    readonly features: bigint,
    readonly mode: "auto" | "off",
    readonly stats: Stats,
    sizes: [number, number],
    startIdx: [number, number],
  ) {
    this.rx = new TestDriver(guest, { size: sizes[0], features, startIdx: startIdx[0] });
    this.tx = new TestDriver(guest, { size: sizes[1], features, startIdx: startIdx[1] });
    this.io = new FakeIo(guest);
    this.io.publishTxTo(this.tx);
    // The poller's own receive code, reading one frame a system call or in batches,
    // with the room the parent would give (the tap's MTU) or the largest.
    this.io.attachRx(this.rx, {
      batch: r.chance(0.5),
      frameRoom: r.chance(0.5) ? RX_FRAME_ROOM_MAX : NET_HDR_BYTES + 1514,
    });
    this.lastUsedIdx = [startIdx[0], startIdx[1]];
    // A queue resumed at a base (vhost-user SET_VRING_BASE) finds avail_event
    // where the previous device left it: at that base.
    for (const [d, start] of [[this.rx, startIdx[0]], [this.tx, startIdx[1]]] as const) {
      this.guest.setU16(d.usedGpa + usedRingSize(d.size) - 2, start);
    }
  }

  fail(what: string): never {
    const faults = this.dut ? `\nqueue faults: ${JSON.stringify(this.dut.faults)}` : "";
    const f = this.features.toString(16);
    throw new Error(
      `seed ${this.seed} (features 0x${f}, --offload ${this.mode}): ${what}${faults}`,
    );
  }

  get has(): (bit: bigint) => boolean {
    return (bit) => (this.features & bit) !== 0n;
  }

  faulted(q: 0 | 1): boolean {
    return this.dut.faults[q].length > 0;
  }

  // ---------------------------------------------------------------- driver side

  /** Out-of-memory addresses for malicious descriptors: [lo, hi] u32 words. */
  #outside(): [number, number] {
    const last = this.guest.regions[this.guest.regions.length - 1];
    const end = last.gpa + last.size;
    const gaps: number[] = [0x1000, end + this.r.int(0x100000)];
    const rs = this.guest.regions;
    if (rs.length > 1 && rs[0].gpa + rs[0].size < rs[1].gpa) gaps.push(rs[0].gpa + rs[0].size);
    if (this.r.chance(0.3)) return [this.r.int(0x1_0000_0000), 0x200000 + this.r.int(0xffe00000)];
    const a = this.r.pick(gaps);
    return [a % 0x1_0000_0000, Math.floor(a / 0x1_0000_0000)];
  }

  /** GPAs of the chain's data descriptors (main table or indirect table). */
  #dataDescGpas(d: TestDriver, c: PostedChain, indirect: boolean, prefix: number): number[] {
    const out: number[] = [];
    const direct = indirect ? prefix : c.buffers.length;
    for (let i = 0; i < direct; i++) out.push(d.descGpa + c.descriptors[i] * VIRTQ_DESC_SIZE);
    if (indirect) {
      const table = c.allocations[c.allocations.length - 1][0];
      for (let i = 0; i < c.buffers.length - prefix; i++) out.push(table + i * VIRTQ_DESC_SIZE);
    }
    return out;
  }

  /**
   * Makes one descriptor of a just-posted (unpublished) chain invalid.
   * Returns what was done; `ringKill` ones put the queue in needs-reset.
   */
  #malicious(d: TestDriver, q: 0 | 1, c: PostedChain, indirect: boolean, prefix: number): string {
    const g = this.guest;
    const data = this.#dataDescGpas(d, c, indirect, prefix);
    const at = this.r.pick(data);
    // Ring-level corruption ends the queue's part in the case: keep it rare.
    const choice = !indirect && this.r.chance(0.2) ? 3 + this.r.int(2) : this.r.int(3);
    if (choice === 0) {
      const [lo, hi] = this.#outside();
      g.setU32(at, lo);
      g.setU32(at + 4, hi);
      if (g.u32(at + 8) === 0) g.setU32(at + 8, 1);
      return "address outside guest memory";
    }
    if (choice === 1) {
      g.setU32(at + 8, 0xfffffff0);
      return "length past guest memory";
    }
    if (choice === 2) {
      // TX: device-writable; RX: device-readable.
      g.setU16(at + 12, g.u16(at + 12) ^ VIRTQ_DESC_F_WRITE);
      return q === 1 ? "device-writable descriptor on TX" : "device-readable descriptor on RX";
    }
    const last = d.descGpa + c.descriptors[c.descriptors.length - 1] * VIRTQ_DESC_SIZE;
    g.setU16(last + 12, g.u16(last + 12) | VIRTQ_DESC_F_NEXT);
    if (choice === 3) {
      g.setU16(last + 14, c.head);
      return "loop (queue needs reset)";
    }
    g.setU16(last + 14, d.size + this.r.int(0x10000 - d.size));
    return "next out of range (queue needs reset)";
  }

  /** Splits `bytes` into descriptor-sized pieces, with header-only and zero-length ones. */
  #split(bytes: Uint8Array, maxPieces: number): Uint8Array[] {
    const r = this.r;
    const cuts: number[] = [];
    const style = r.int(10);
    if (style < 4) {
      // whole
    } else if (style < 6) {
      cuts.push(NET_HDR_BYTES); // header-only first descriptor
      if (r.chance(0.5)) cuts.push(r.int(bytes.length + 1));
    } else if (style < 7) {
      cuts.push(r.int(NET_HDR_BYTES)); // the header itself split
      cuts.push(r.int(bytes.length + 1));
    } else if (style < 9) {
      for (let n = r.range(1, 7); n > 0; n--) cuts.push(r.int(bytes.length + 1));
    } else {
      for (let n = r.range(60, 90); n > 0; n--) cuts.push(r.int(bytes.length + 1));
    }
    cuts.sort((a, b) => a - b);
    const pieces: Uint8Array[] = [];
    let from = 0;
    for (const c of cuts.slice(0, maxPieces - 1)) {
      pieces.push(bytes.subarray(from, Math.max(from, c)));
      from = Math.max(from, c);
    }
    pieces.push(bytes.subarray(from));
    if (r.chance(0.1) && pieces.length < maxPieces) {
      pieces.splice(r.int(pieces.length + 1), 0, new Uint8Array(0));
    }
    return pieces;
  }

  /** Chooses direct or indirect; returns null when descriptors ran out. */
  #layout(d: TestDriver, pieces: number): { indirect: boolean; prefix: number } | null {
    const r = this.r;
    const negotiated = this.has(VIRTIO_RING_F_INDIRECT_DESC);
    const indirect = negotiated ? r.chance(0.3) : r.chance(0.03);
    if (indirect) {
      const prefix = r.chance(0.5) ? 0 : r.int(Math.min(3, pieces));
      if (prefix + 1 <= d.freeDescriptors) return { indirect, prefix };
    }
    if (pieces <= d.freeDescriptors) return { indirect: false, prefix: 0 };
    return null;
  }

  postTx(): void {
    const r = this.r;
    const tag = this.#nextTag++;
    const mac = tagMac(tag);
    const csumOk = this.has(VIRTIO_NET_F_CSUM);
    const tso = this.has(VIRTIO_NET_F_HOST_TSO4) || this.has(VIRTIO_NET_F_HOST_TSO6);
    let gen: Generated;
    let mutatedHdr = false;
    let mutatedFrame = false;
    const kind = r.int(10);
    if (kind < 7) {
      const gso = r.chance(tso ? 0.35 : 0.05);
      gen = validFrame(r, mac, {
        gso,
        csum: !gso && r.chance(csumOk ? 0.5 : 0.05),
        maxPayload: r.chance(0.2) ? 64000 : 16000,
      });
      if (gen.kind === "gso" && gen.hdr.gsoType === GSO_TCPV4 && this.has(VIRTIO_NET_F_HOST_ECN)) {
        if (r.chance(0.3)) gen.hdr.gsoType |= GSO_ECN;
      }
      if (r.chance(0.25)) {
        gen = { ...gen, hdr: mutateHdr(r, gen.hdr, gen.frame.length) };
        mutatedHdr = true;
      }
      if (r.chance(0.2)) {
        gen = { ...gen, frame: mutateFrame(r, gen) };
        mutatedFrame = true;
      }
    } else {
      const frame = junkFrame(r, mac, MAX_FRAME_BYTES + 40);
      gen = { hdr: mutateHdr(r, ZERO_HDR, frame.length), frame, kind: "junk" };
      mutatedHdr = mutatedFrame = true;
    }
    const all = concat([encodeHdr(gen.hdr), gen.frame]);
    const pieces = this.#split(all, Math.min(100, this.tx.size));
    const lay = this.#layout(this.tx, pieces.length);
    if (!lay) return;
    const head = this.tx.post(pieces.map((p) => ({ data: p })), {
      indirect: lay.indirect,
      directPrefix: lay.prefix,
      publish: false,
    });
    if (head < 0) return;
    const chain = this.tx.posted.get(head)!;
    let bad: string | null = null;
    if (lay.indirect && !this.has(VIRTIO_RING_F_INDIRECT_DESC)) {
      bad = "indirect descriptor without INDIRECT_DESC";
    } else if (r.chance(0.05)) {
      bad = this.#malicious(this.tx, 1, chain, lay.indirect, lay.prefix);
    }
    if (bad !== null) this.stats.txBadDescriptors++;
    const item: TxItem = {
      tag,
      head,
      serial: this.#serial++,
      hdr: gen.hdr,
      frame: gen.frame,
      gen,
      mutatedHdr,
      mutatedFrame,
      badDescriptors: bad,
      sent: [],
    };
    this.txItems.set(tag, item);
    this.txOrder.push(item);
    this.offer(1, head);
    this.stats.txChains++;
  }

  postRx(): void {
    const r = this.r;
    let sizes: number[];
    const style = r.int(20);
    if (style < 9) sizes = [r.range(1, 4096)];
    else if (style < 13) sizes = [NET_HDR_BYTES, r.range(1, 4096)];
    else if (style < 18) sizes = Array.from({ length: r.range(2, 6) }, () => r.range(1, 2048));
    else if (style < 19) {
      // One-byte buffers, the net header spread over twelve of them (virtio 1.2 §2.7.4:
      // the device must not assume a layout), or a chain shorter than the header.
      sizes = r.chance(0.8)
        ? [...new Array(12).fill(1), ...Array.from({ length: r.range(0, 40) }, () => r.range(1, 3))]
        : [r.range(1, 11)];
    } else {
      // More segments than an inline rx-post record takes (RX_MAX_IOV): the rx-long ring.
      sizes = Array.from({ length: r.range(30, 120) }, () => r.range(1, 64));
    }
    if (r.chance(0.05)) sizes.splice(r.int(sizes.length + 1), 0, 0);
    const lay = this.#layout(this.rx, sizes.length);
    if (!lay) return;
    const head = this.rx.post(sizes.map((len) => ({ len, writable: true })), {
      indirect: lay.indirect,
      directPrefix: lay.prefix,
      publish: false,
    });
    if (head < 0) return;
    const chain = this.rx.posted.get(head)!;
    // Stale bytes from an earlier use would pass for a header: start from junk.
    for (const b of chain.buffers) this.guest.write(b.gpa, r.bytes(b.len));
    let bad = lay.indirect && !this.has(VIRTIO_RING_F_INDIRECT_DESC);
    if (!bad && r.chance(0.04)) {
      this.#malicious(this.rx, 0, chain, lay.indirect, lay.prefix);
      bad = true;
    }
    if (bad) this.rxBad.add(head);
    else this.rxBad.delete(head);
    this.rxPostedChain.set(head, chain);
    this.rxCap.set(head, sizes.reduce((s, n) => s + n, 0));
    this.offer(0, head);
    this.stats.rxChains++;
  }

  offer(q: 0 | 1, head: number): void {
    if (this.offered[q].has(head)) this.fail(`test bug: head ${head} offered twice`);
    this.offered[q].add(head);
  }

  /** Publishes and kicks when the ring asks for it (or, now and then, anyway). */
  publish(q: 0 | 1): void {
    const d = q === 0 ? this.rx : this.tx;
    const kick = d.publish();
    if (kick || this.r.chance(0.05)) this.io.kick(q === 0 ? "rx" : "tx");
  }

  /** Tap side: one frame as a tap would hand it over, or junk. */
  feedRx(): void {
    const r = this.r;
    const io = this.io;
    const avail = io.rxPost.available();
    if (avail === 0) return;
    const mac = tagMac(0);
    let g: Generated;
    const k = r.int(10);
    if (k < 6) {
      const gso = r.chance(0.25);
      g = validFrame(r, mac, {
        gso,
        csum: !gso && r.chance(0.4),
        maxPayload: r.chance(0.3) ? 64000 : 8000,
      });
      if (g.kind === "plain" && r.chance(0.3)) g.hdr.flags = DATA_VALID;
      if (g.kind === "gso" && r.chance(0.2)) g.hdr.gsoType |= GSO_ECN;
      if (g.kind === "gso") g.hdr.hdrLen = g.built!.payload;
      if (r.chance(0.15)) g = { ...g, hdr: mutateHdr(r, g.hdr, g.frame.length), kind: "mutated" };
    } else if (k < 9) {
      const frame = junkFrame(r, mac, MAX_FRAME_BYTES);
      g = {
        hdr: r.chance(0.5) ? { ...ZERO_HDR } : mutateHdr(r, ZERO_HDR, frame.length),
        frame,
        kind: "junk",
      };
    } else {
      const frame = r.bytes(r.range(14, MAX_FRAME_BYTES));
      g = { hdr: { ...ZERO_HDR }, frame, kind: "big" };
    }
    if (g.frame.length < 14) return; // a tap never hands over less than an Ethernet header
    g.hdr.numBuffers = r.int(0x10000); // the tap leaves it; the device sets it
    const { heads } = io.receiveFrame(concat([encodeHdr(g.hdr), g.frame]));
    this.stats.rxFrames++;
    this.checkUsedIdx("after a tap frame");
    if (heads.length === 0) return;
    const valid = this.#rxDeliverable(g.hdr, g.frame.length);
    if (!valid) {
      this.fail(`RX: a tap header ${showHdr(g.hdr)} the driver cannot take was delivered`);
    }
    this.rxFed.set(heads[0], {
      hdr: g.hdr,
      frame: g.frame,
      heads,
      raw: false,
      valid,
      built: g.built,
      kind: g.kind,
    });
  }

  /**
   * used->idx of both queues only ever moves forward, and never past what
   * the driver made available (virtio 1.2 §2.7.8, §2.7.6.1).
   */
  checkUsedIdx(when: string): void {
    const drivers = [this.rx, this.tx];
    for (const q of [0, 1] as const) {
      const d = drivers[q];
      const now = d.usedIdx();
      const prev = this.lastUsedIdx[q];
      const moved = (now - prev) & 0xffff;
      const outstanding = (d.availIdx - prev) & 0xffff;
      if (moved > outstanding) {
        this.fail(
          `${when}: queue ${q} used->idx went from ${prev} to ${now} with avail->idx ` +
            `${d.availIdx} (backwards, or past what was made available)`,
        );
      }
      this.lastUsedIdx[q] = now;
    }
  }

  /**
   * Whether the driver may be handed a tap frame with this header (virtio 1.2
   * §5.1.6.3.1, §5.1.6.4): the poller delivers exactly these (a partial
   * checksum toward a driver without GUEST_CSUM is dropped: TUNSCAP keeps
   * the tap from writing one).
   */
  #rxDeliverable(h: Hdr, _frameLen: number): boolean {
    if ((h.flags & ~(NEEDS_CSUM | DATA_VALID)) !== 0) return false;
    if (h.gsoType !== 0) return guestTakesGso(h.gsoType, this.features);
    return (h.flags & NEEDS_CSUM) === 0 || this.has(VIRTIO_NET_F_GUEST_CSUM);
  }

  /**
   * A poller that lies: a drop record, chains given back or claimed
   * published, counts of its choosing. A lie about published chains loses
   * them (the device cannot tell); everything else must keep every invariant.
   */
  hostileDone(): void {
    const r = this.r;
    const io = this.io;
    const avail = io.rxPost.available();
    this.stats.hostileDone++;
    const c = r.int(10);
    if (c < 4 || avail === 0) {
      io.pushDoneRaw(0, r.int(100000), r.range(1, 0xffffffff));
      return;
    }
    const plausible = c < 8;
    const chains = plausible
      ? r.range(1, Math.min(avail, 8))
      : r.pick([avail + 1, r.int(0x1_0000_0000)]);
    const status = r.pick([RX_UNUSED, RX_UNUSED, RX_PUBLISHED, r.range(0, 9)]);
    const bytes = status === RX_UNUSED && plausible ? 0 : r.int(0x1_0000_0000);
    // The lie is in the rx-done record. The records it consumes it releases as
    // the poller must (ipc/datapath.ts): a long chain's rx-long record with its
    // rx-post record; left behind, it would pair with the next long chain's
    // post and the poller's own stage would refuse that record (an I/O fault
    // of the test's making, not the device's).
    const released = Math.min(chains, avail);
    let longs = 0;
    for (let i = 0; i < released; i++) {
      if (io.rxPost.words[io.rxPost.peek(i) + RX_POST.FLAGS] & RXF_LONG) longs++;
    }
    io.rxPost.release(released);
    if (longs > 0) io.rxLong.release(Math.min(longs, io.rxLong.available()));
    io.pushDoneRaw(chains >>> 0, bytes >>> 0, status);
    if (status === RX_PUBLISHED) this.pollerLied = true;
  }

  /** A driver that moves avail->idx where it must not (the queue needs a reset). */
  corruptAvail(q: 0 | 1): void {
    const d = q === 0 ? this.rx : this.tx;
    d.setAvailIdx(d.availIdx + d.size + 1 + this.r.int(1000));
    this.io.kick(q === 0 ? "rx" : "tx");
  }

  // ---------------------------------------------------------------- checks

  /** Which guest bytes the device may change now: valid posted RX buffers, used rings. */
  allowedMask(): Uint8Array[] {
    const masks = this.guest.regions.map((r) => new Uint8Array(r.size));
    const allow = (gpa: number, len: number) => {
      for (let i = 0; i < this.guest.regions.length; i++) {
        const r = this.guest.regions[i];
        const s = Math.max(gpa, r.gpa);
        const e = Math.min(gpa + len, r.gpa + r.size);
        if (s < e) masks[i].fill(1, s - r.gpa, e - r.gpa);
      }
    };
    for (const d of [this.rx, this.tx]) allow(d.usedGpa, usedRingSize(d.size));
    for (const [head, c] of this.rx.posted) {
      if (this.rxBad.has(head)) continue;
      for (const b of c.buffers) if (b.writable) allow(b.gpa, b.len);
    }
    return masks;
  }

  checkMemory(before: Uint8Array[], masks: Uint8Array[], when: string): void {
    this.guest.regions.forEach((r, i) => {
      const a = new Uint32Array(before[i].buffer);
      const b = new Uint32Array(r.buffer);
      const m = masks[i];
      for (let w = 0; w < a.length; w++) {
        if (a[w] === b[w]) continue;
        for (let k = w * 4; k < w * 4 + 4; k++) {
          if (before[i][k] !== r.bytes[k] && m[k] === 0) {
            this.fail(
              `${when}: guest byte at GPA 0x${(r.gpa + k).toString(16)} changed ` +
                `${before[i][k]} -> ${r.bytes[k]} outside every posted RX buffer and used ring`,
            );
          }
        }
      }
    });
  }

  /** Every new frame the fake writer took: where it came from and what it may be. */
  checkSent(): void {
    const sent = this.io.sent;
    for (; this.#sentSeen < sent.length; this.#sentSeen++) {
      const s = sent[this.#sentSeen];
      const hdr = decodeHdr(s.hdr);
      const tag = readTag(s.frame);
      const item = this.txItems.get(tag);
      if (!item) {
        this.fail(`the writer got a frame from no chain (tag ${tag}, ${s.frame.length} bytes)`);
      }
      const what = `TX chain ${item.tag} (${item.gen.kind}${
        item.mutatedHdr ? ", mutated header" : ""
      }${item.mutatedFrame ? ", mutated frame" : ""}) guest header ${showHdr(item.hdr)}`;
      if (item.badDescriptors) this.fail(`${what} was sent despite ${item.badDescriptors}`);
      if (item.serial < this.#lastSentSerial) this.fail(`${what} was sent out of avail order`);
      this.#lastSentSerial = item.serial;
      const problem = txHeaderProblem(item.hdr, item.frame, this.features);
      if (problem) this.fail(`${what} was sent although ${problem}`);
      item.sent.push({ hdr, frame: s.frame });
      this.stats.txSent++;
      const gso = (item.hdr.gsoType & ~GSO_ECN) !== 0;
      if (this.mode === "auto") {
        const want = { ...item.hdr };
        if (gso) want.hdrLen = miniParse(item.frame)!.payload;
        if (showHdr(want) !== showHdr(hdr)) {
          this.fail(`${what} reached the tap with header ${showHdr(hdr)}, want ${showHdr(want)}`);
        }
        if (item.sent.length > 1) this.fail(`${what} was sent ${item.sent.length} times`);
        if (!equalBytes(s.frame, item.frame)) this.fail(`${what}: the frame changed on the way`);
        continue;
      }
      if (showHdr(hdr) !== showHdr(ZERO_HDR)) {
        this.fail(`${what} reached a tap without offloads with header ${showHdr(hdr)}`);
      }
      if (gso) {
        const p = miniParse(s.frame);
        if (!p || p.proto !== 6) this.fail(`${what}: a segment does not parse as TCP`);
        // Segments build on the guest's pseudo-header sum: only a frame whose
        // lengths agree with that sum (not mutated) must give valid checksums.
        if (!item.mutatedFrame && !l4ChecksumOk(s.frame, p.l3, p.l4, p.end, 6)) {
          this.fail(`${what}: segment TCP checksum`);
        }
        if (p.ethertype === 0x0800 && !ipv4HeaderChecksumOk(s.frame, p.l3)) {
          this.fail(`${what}: segment IPv4 header checksum`);
        }
        if (p.end - p.payload > item.hdr.gsoSize) {
          this.fail(`${what}: segment larger than gso_size`);
        }
        continue;
      }
      if (item.sent.length > 1) this.fail(`${what} was sent ${item.sent.length} times`);
      if (item.hdr.flags === 0) {
        if (!equalBytes(s.frame, item.frame)) this.fail(`${what}: the frame changed on the way`);
        continue;
      }
      // Checksum completed: only the checksum field may differ, and it must verify.
      const at = item.hdr.csumStart + item.hdr.csumOffset;
      const a = s.frame.slice();
      const b = item.frame.slice();
      a[at] =
        a[at + 1] =
        b[at] =
        b[at + 1] =
          0;
      if (!equalBytes(a, b)) this.fail(`${what}: bytes other than the checksum changed`);
      const p = miniParse(s.frame);
      const ends = [s.frame.length];
      if (p) ends.push(p.end);
      // virtio 1.2 §5.1.6.2 (Linux skb_checksum_help): the ones' complement of
      // the sum from csum_start to the end, the guest's partial sum in the
      // field, stored big-endian at csum_start + csum_offset (0 as 0xffff).
      const cs = item.hdr.csumStart;
      const stored = (s.frame[at] << 8) | s.frame[at + 1];
      const want = ends.map((e) => (~refSum(item.frame, cs, e) & 0xffff) || 0xffff);
      if (!want.includes(stored)) {
        this.fail(
          `${what}: the completed checksum is 0x${stored.toString(16)}, want ` +
            want.map((w) => `0x${w.toString(16)}`).join(" or "),
        );
      }
      // Then it verifies: the guest's partial sum (the pseudo-header) sits in
      // the field before completion and outside the summed range after it, so
      // add it back. Only for a field 16-bit aligned in the summed range
      // (csum_offset even, as every L4 checksum is): at an odd offset the
      // stored bytes fall across two summed words and cannot verify.
      if (item.hdr.csumOffset % 2 === 0) {
        const partial = new Uint8Array(s.frame.length);
        partial[at] = item.frame[at];
        partial[at + 1] = item.frame[at + 1];
        if (!ends.some((e) => fold(refSum(s.frame, cs, e) + refSum(partial, cs, e)) === 0xffff)) {
          this.fail(`${what}: the completed checksum does not verify`);
        }
      }
      if (item.gen.built && !item.mutatedFrame && !item.mutatedHdr) {
        const bt = item.gen.built;
        if (!l4ChecksumOk(s.frame, bt.l3, bt.l4, bt.end, bt.tcp ? 6 : 17)) {
          this.fail(`${what}: the completed L4 checksum does not verify`);
        }
      }
    }
  }

  /** TX chains whose used entry came: a valid one must have been sent, whole. */
  finishTx(item: TxItem): void {
    const what = `TX chain ${item.tag} (${item.gen.kind}) header ${showHdr(item.hdr)} ` +
      `${item.frame.length}-byte frame`;
    if (item.badDescriptors) return;
    const valid = txHeaderProblem(item.hdr, item.frame, this.features) === null &&
      item.frame.length >= 14 && item.frame.length <= MAX_FRAME_BYTES;
    const gso = (item.hdr.gsoType & ~GSO_ECN) !== 0;
    const pristine = !item.mutatedHdr && !item.mutatedFrame;
    if (valid && (!gso || this.mode === "auto" || pristine) && item.sent.length === 0) {
      this.fail(`${what} is valid but was dropped`);
    }
    if (gso && this.mode === "off" && pristine && valid) {
      const bt = item.gen.built!;
      const payload = item.frame.subarray(bt.payload, bt.end);
      const got = concat(item.sent.map((s) => {
        const p = miniParse(s.frame)!;
        return s.frame.subarray(p.payload, p.end);
      }));
      if (!equalBytes(got, payload)) {
        this.fail(
          `${what}: the segments do not carry the payload (${got.length} of ${payload.length} bytes)`,
        );
      }
    }
  }

  /** Reads every used entry of both queues and checks each. */
  readUsed(): void {
    let at = this.tx.lastUsed;
    for (const e of this.tx.readUsed()) {
      this.#afterFault(1, at++, e.len);
      if (!this.offered[1].delete(e.id)) {
        this.fail(`TX used entry for head ${e.id}, which is not out`);
      }
      if (e.len !== 0) this.fail(`TX used entry for head ${e.id} has len ${e.len}, want 0`);
    }
    // TX items are finished in avail order once their chain is back (drops come back early).
    while (this.txOrder.length > 0 && !this.offered[1].has(this.txOrder[0].head)) {
      this.finishTx(this.txOrder.shift()!);
    }
    at = this.rx.lastUsed;
    for (const e of this.rx.readUsed()) {
      this.#afterFault(0, at++, e.len);
      if (!this.offered[0].delete(e.id)) {
        this.fail(`RX used entry for head ${e.id}, which is not out`);
      }
      const cap = this.rxCap.get(e.id)!;
      if (e.len > cap) this.fail(`RX used len ${e.len} exceeds chain ${e.id}'s ${cap} bytes`);
      const bytes = e.chain ? this.rx.readWritten(e.chain, e.len) : new Uint8Array(0);
      if (this.rxBad.has(e.id) && e.len !== 0) {
        this.fail(`RX chain ${e.id} with a bad descriptor came back with len ${e.len}`);
      }
      this.#rxEntry(e.id, e.len, cap, bytes);
    }
  }

  /** After needs-reset a queue may only hand chains back unused. */
  #afterFault(q: 0 | 1, index: number, len: number): void {
    const limit = this.dut.faultUsedLimit[q];
    if (limit === null || len === 0) return;
    if (((index - limit) & 0xffff) < 0x8000) {
      this.fail(
        `queue ${q} used entry ${index & 0xffff} has len ${len} after the queue reported ` +
          `needs-reset (${this.dut.faults[q][0]})`,
      );
    }
  }

  #rxEntry(head: number, len: number, cap: number, bytes: Uint8Array): void {
    const g = this.#group;
    if (g) {
      // A continuation of a MRG_RXBUF frame: the next chains, all but the last full.
      if (len === 0) this.fail(`RX: frame over ${g.n} buffers broken by an empty used entry`);
      g.heads.push(head);
      g.lens.push(len);
      g.bytes.push(bytes);
      if (g.heads.length < g.n && len !== cap) {
        this.fail(`RX: buffer ${g.heads.length} of ${g.n} holds ${len} of ${cap} bytes`);
      }
      if (g.heads.length === g.n) this.#rxFrame();
      return;
    }
    if (len === 0) {
      this.stats.rxDiscarded++;
      this.rxFed.delete(head);
      return;
    }
    if (len < NET_HDR_BYTES) this.fail(`RX used len ${len} is shorter than the net header`);
    const hdr = decodeHdr(bytes);
    const mrg = this.has(VIRTIO_NET_F_MRG_RXBUF);
    if (!mrg && hdr.numBuffers !== 1) {
      this.fail(`RX num_buffers ${hdr.numBuffers} without MRG_RXBUF (virtio 1.2 §5.1.6.3.1)`);
    }
    if (hdr.numBuffers < 1) this.fail(`RX num_buffers 0`);
    this.#group = { hdr, heads: [head], lens: [len], bytes: [bytes], n: hdr.numBuffers };
    if (hdr.numBuffers > 1 && len !== cap) {
      this.fail(`RX: first of ${hdr.numBuffers} buffers holds ${len} of ${cap} bytes`);
    }
    if (hdr.numBuffers === 1) this.#rxFrame();
  }

  /** A whole delivered frame: its header and its bytes against what the tap gave. */
  #rxFrame(): void {
    const g = this.#group!;
    this.#group = null;
    this.stats.rxDelivered++;
    const chains = g.heads.map((h) => this.rxPostedChain.get(h));
    if (chains.some((c) => c !== undefined && c.buffers.length > RX_MAX_IOV)) {
      this.stats.rxLongDelivered++;
    }
    if ((chains[0]?.buffers[0]?.len ?? NET_HDR_BYTES) < NET_HDR_BYTES) {
      this.stats.rxSplitHeaderDelivered++;
    }
    const h = g.hdr;
    const where = `RX frame in chains ${g.heads.join(",")} header ${showHdr(h)}`;
    if ((h.flags & ~(NEEDS_CSUM | DATA_VALID)) !== 0) {
      this.fail(`${where}: flags the driver cannot have negotiated`);
    }
    if (!this.has(VIRTIO_NET_F_GUEST_CSUM) && h.flags !== 0) {
      this.fail(`${where}: flags set without GUEST_CSUM (virtio 1.2 §5.1.6.3.1)`);
    }
    if (!guestTakesGso(h.gsoType, this.features)) {
      this.fail(`${where}: gso_type the driver did not negotiate`);
    }
    const fed = this.rxFed.get(g.heads[0]);
    this.rxFed.delete(g.heads[0]);
    if (!fed) this.fail(`${where}: no frame was received into these chains`);
    if (fed.heads.join(",") !== g.heads.join(",")) {
      this.fail(`${where}: the poller filled chains ${fed.heads.join(",")}`);
    }
    const total = g.lens.reduce((s, n) => s + n, 0);
    if (fed.raw) return;
    if (!fed.valid) {
      this.fail(
        `${where}: delivered although the tap header ${showHdr(fed.hdr)} is not for this driver`,
      );
    }
    if (total !== NET_HDR_BYTES + fed.frame.length) {
      this.fail(`${where}: ${total} bytes used for a ${fed.frame.length}-byte frame`);
    }
    const frame = concat(g.bytes).subarray(NET_HDR_BYTES);
    const want = { ...fed.hdr, numBuffers: g.n };
    // §5.1.6.3.1: without GUEST_CSUM flags are 0 (DATA_VALID cleared).
    if (!this.has(VIRTIO_NET_F_GUEST_CSUM)) want.flags = 0;
    if (showHdr(want) !== showHdr(h)) this.fail(`${where}: want header ${showHdr(want)}`);
    if (!equalBytes(frame, fed.frame)) this.fail(`${where}: the frame changed on the way`);
  }

  /** After a settle: every frame handed to the poller was judged. */
  checkRxFedDone(): void {
    if (this.faulted(0) || this.pollerLied) return;
    for (const [head, fed] of this.rxFed) {
      if (this.offered[0].has(head) && fed.valid) {
        this.fail(
          `RX: a ${fed.frame.length}-byte frame with header ${showHdr(fed.hdr)} the driver can ` +
            `take was not delivered into chains ${fed.heads.join(",")}`,
        );
      }
      if (!fed.valid) this.rxFed.delete(head);
    }
  }

  /** Runs the device until both queues are quiet (or faulted). */
  async settle(when: string): Promise<void> {
    const io = this.io;
    const end = Date.now() + SETTLE_MS;
    for (;;) {
      await this.dut.tick();
      io.writerStep();
      // The poller's loop: it completes the discards the device posted.
      io.pollerStep();
      this.checkUsedIdx(when);
      if (escaped.length > 0) this.fail(`${when}: the device loop threw: ${escaped[0]}`);
      if (io.badRecords > 0) this.fail(`${when}: the device wrote a TX record outside memory`);
      const txDone = this.faulted(1) || this.tx.usedIdx() === this.tx.availIdx;
      // Every chain offered is posted, or enough are: the device waits for
      // the poller's word, which comes every rxSignalChains published chains,
      // before it takes more (it asked for no kick while 2 x that many were posted).
      const offered = (this.rx.availIdx - this.rx.usedIdx()) & 0xffff;
      const posted = io.rxPost.available();
      // Chains published but not yet retired by the device are used already (the poller
      // stored used->idx); the device takes the records when it next looks.
      const rxDone = this.faulted(0) || this.pollerLied ||
        offered === posted || posted >= rxSignalChains(this.rx.size);
      if (txDone && rxDone && io.tx.available() === 0) return;
      if (Date.now() > end) {
        this.fail(
          `${when}: the device stalled: TX avail ${this.tx.availIdx} used ${this.tx.usedIdx()}, ` +
            `RX avail ${this.rx.availIdx} used ${this.rx.usedIdx()} posted ${io.rxPost.available()} ` +
            `done-pending ${io.rxDone.capacity - io.rxDone.freeSpace()}; faults ${
              JSON.stringify(this.dut.faults)
            }; ` +
            `counters ${JSON.stringify(await this.dut.counters())}`,
        );
      }
    }
  }

  /** Interrupt requests: used_event at what the driver has read, or NO_INTERRUPT now and then. */
  armInterrupts(): [boolean, boolean] {
    return [this.rx, this.tx].map((d) => {
      if (this.r.chance(0.1)) {
        d.setAvailFlags(VIRTQ_AVAIL_F_NO_INTERRUPT);
        d.setUsedEvent(d.lastUsed + 1000);
        return false;
      }
      d.setAvailFlags(0);
      d.setUsedEvent(d.lastUsed);
      return true;
    }) as [boolean, boolean];
  }

  async round(n: number): Promise<void> {
    const r = this.r;
    this.stats.rounds++;
    const wantIrq = this.armInterrupts();
    const calls = { ...this.io.calls };
    const used = [this.rx.usedIdx(), this.tx.usedIdx()];
    if (!this.faulted(1)) {
      for (let i = r.int(9); i > 0; i--) this.postTx();
      this.publish(1);
    }
    if (!this.faulted(0)) {
      for (let i = r.int(13); i > 0; i--) this.postRx();
      this.publish(0);
    }
    if (r.chance(0.02)) this.corruptAvail(r.pick([0, 1] as const));
    const before = this.guest.snapshot();
    const masks = this.allowedMask();
    await this.settle(`round ${n}, posting`);
    if (!this.faulted(0)) {
      for (let i = r.int(9); i > 0; i--) {
        if (r.chance(0.08)) this.hostileDone();
        else this.feedRx();
        if (r.chance(0.3)) await this.dut.tick();
      }
    }
    await this.settle(`round ${n}, receiving`);
    this.checkMemory(before, masks, `round ${n}`);
    this.checkSent();
    this.readUsed();
    this.checkRxFedDone();
    const drivers = [this.rx, this.tx];
    for (const q of [0, 1] as const) {
      const d = drivers[q];
      const crossed = ((d.usedIdx() - used[q]) & 0xffff) > 0;
      const got = q === 0 ? this.io.calls.rx > calls.rx : this.io.calls.tx > calls.tx;
      if (wantIrq[q] && crossed && !this.faulted(q) && !got) {
        this.fail(
          `round ${n}: queue ${q} published used entries the driver asked to hear of, no interrupt`,
        );
      }
    }
  }

  /** stop(): everything offered comes back, unless the queue needs a reset. */
  async finish(): Promise<void> {
    const before = this.guest.snapshot();
    const masks = this.allowedMask();
    const stats = await this.dut.counters();
    const bases = await this.dut.stop();
    if (escaped.length > 0) this.fail(`stop: the device loop threw: ${escaped[0]}`);
    this.checkMemory(before, masks, "stop");
    this.checkSent();
    this.readUsed();
    // RX chains the poller never filled may be un-popped rather than used:
    // they are the avail entries from the reported base up to avail->idx.
    if (!this.faulted(0)) {
      const stillAvail = this.rx.availableFrom(bases.rx);
      if (stillAvail === null) this.fail(`stop: rx last_avail_idx ${bases.rx} is past avail->idx`);
      for (const head of stillAvail ?? []) this.offered[0].delete(head);
    }
    if (this.io.sent.length !== stats.tx0.frames) {
      this.fail(`tx0.frames counts ${stats.tx0.frames}, the writer got ${this.io.sent.length}`);
    }
    for (const q of [0, 1] as const) {
      if (this.faulted(q)) {
        this.stats.queueFaults++;
        continue;
      }
      if (q === 0 && this.pollerLied) continue;
      if (this.offered[q].size > 0) {
        this.fail(`queue ${q}: chains ${[...this.offered[q]].join(",")} never came back`);
      }
    }
    // After needs-reset the rest of the ring was never looked at.
    if (!this.faulted(1)) { for (const item of this.txOrder) this.finishTx(item); }
    if (this.#group) this.fail(`RX: a frame over ${this.#group.n} buffers was cut short`);
  }
}

function fold(s: number): number {
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 65536);
  return s;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

// ------------------------------------------------------------------ in-thread cases

function regionSpecs(r: Rand): TestRegionSpec[] {
  const k = r.int(3);
  if (k === 0) return [{ gpa: 0x100000, size: 8 << 20 }];
  if (k === 1) {
    return [{ gpa: 0x100000, size: 4 << 20 }, {
      gpa: 0x500000,
      size: 4 << 20,
      user: 0x7e0000000000,
    }];
  }
  return [{ gpa: 0x100000, size: 4 << 20 }, { gpa: 0x4000_0000, size: 4 << 20 }];
}

function randomQueues(r: Rand): { sizes: [number, number]; start: [number, number] } {
  const size = () => r.pick([8, 32, 128, 256]);
  const start = () => r.chance(0.3) ? 0xffff - r.int(40) : r.int(0x10000);
  return { sizes: [size(), size()], start: [start(), start()] };
}

export async function runCase(seed: number, stats: Stats): Promise<void> {
  const r = new Rand(seed);
  const { features, refused } = randomFeatures(r);
  if (refused) stats.refusedFeatureSets++;
  const mode = r.chance(0.5) ? "auto" : "off";
  const guest = new TestGuest(regionSpecs(r));
  const q = randomQueues(r);
  const c = new FuzzCase(r, seed, guest, features, mode, stats, q.sizes, q.start);
  const faults: [string[], string[]] = [[], []];
  const ioFaults: string[] = [];
  const faultUsedLimit: [number | null, number | null] = [null, null];
  const dev = new NetDevice((queue, reason) => {
    if (queue === 0 || queue === 1) {
      faults[queue].push(reason);
      // Entries pushed so far (published or not) came before the fault; the
      // RX used ring is the poller's, which stops at the fault (CTL.RX_STOPPED).
      faultUsedLimit[queue] ??= queue === 0
        ? Atomics.load(c.io.ctl, CTL.RX_USED_IDX) & 0xffff
        : dev.txq.usedIdx + dev.txq.pendingUsed;
    } else {
      ioFaults.push(reason);
    }
  });
  let stopped = false;
  c.dut = {
    faults,
    ioFaults,
    faultUsedLimit,
    tick: () => new Promise((res) => setTimeout(res, 0)),
    counters: () => Promise.resolve(dev.counters()),
    stop: () => {
      stopped = true;
      return dev.stop();
    },
  };
  escaped.length = 0;
  dev.grant(c.io.regionGrants());
  dev.setFeatures(features, mode);
  const place = (d: TestDriver, base: number) => ({ ...d.config("user"), base });
  dev.start(place(c.rx, q.start[0]), place(c.tx, q.start[1]), c.io.buffers, FAKE_BOUNCE);
  stats.cases++;
  try {
    const rounds = r.range(2, 6);
    for (let n = 0; n < rounds; n++) await c.round(n);
    await c.finish();
    assert.deepEqual(ioFaults, [], "the fake I/O never reports a fault");
    for (const q of [0, 1] as const) {
      assert.ok(faults[q].length <= 1, `queue ${q}'s fault is reported once: ${faults[q]}`);
    }
  } catch (e) {
    // Say what the device counted: it usually names the reason at once.
    (e as Error).message += `\ndevice counters: ${JSON.stringify(dev.counters())}`;
    throw e;
  } finally {
    if (!stopped) await dev.stop().catch(() => {});
  }
}

function regressionSeeds(): number[] {
  try {
    const text = Deno.readTextFileSync(
      new URL("../testdata/net_device_fuzz_seeds.json", import.meta.url),
    );
    return (JSON.parse(text) as { seeds: number[] }).seeds;
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) return [];
    throw e;
  }
}

Deno.test("net device fuzz: random rings, headers and frames on both paths keep every invariant", async () => {
  const stats = newStats();
  const t0 = performance.now();
  const seeds = [...regressionSeeds()];
  for (let i = 0; i < CASES; i++) seeds.push((FIRST_SEED + i * 0x9e3779b1) >>> 0);
  const only = Deno.env.get("VIONET_FUZZ_ONLY");
  for (const seed of only ? [Number(only)] : seeds) await runCase(seed, stats);
  const ms = Math.round(performance.now() - t0);
  console.log(`net device fuzz: ${JSON.stringify(stats)} in ${ms} ms`);
  if (only) return;
  // The generator must actually reach what it claims to.
  assert.ok(stats.txSent > 0 && stats.rxDelivered > 0, "frames flowed both ways");
  assert.ok(stats.txBadDescriptors > 0, "malicious descriptors were tried");
  assert.ok(stats.rxLongDelivered > 0, "frames went into chains of many segments");
  assert.ok(stats.rxSplitHeaderDelivered > 0, "frames went into one-byte header buffers");
  assert.ok(stats.rxDiscarded > 0, "bad RX chains were completed empty");
});

// ------------------------------------------------------------------ the real device worker

Deno.test("the zero-permission device worker survives random traffic and garbage on guest memory it shares with the test", async () => {
  // One mapping, two views: one transferred to the worker (it detaches
  // here), one kept to play the driver and the fake I/O workers.
  const size = 8 << 20;
  const gpa = 0x100000;
  const user = 0x7f00_0000_0000 + gpa;
  const map = libc.mmap(
    size,
    libc.PROT_READ | libc.PROT_WRITE,
    libc.MAP_SHARED | libc.MAP_ANONYMOUS,
    -1,
  );
  let host: DeviceHost | null = null;
  let returned = false;
  try {
    const granted = Deno.UnsafePointerView.getArrayBuffer(map, size);
    const kept = Deno.UnsafePointerView.getArrayBuffer(map, size);
    const guest = new TestGuest([{ gpa, size, user, buffer: kept }]);

    const features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 |
      VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN | VIRTIO_NET_F_GUEST_CSUM |
      VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_RING_F_EVENT_IDX |
      VIRTIO_RING_F_INDIRECT_DESC;
    const seed = FIRST_SEED ^ 0x5a5a;
    const r = new Rand(seed);
    const stats = newStats();
    const c = new FuzzCase(r, seed, guest, features, "auto", stats, [256, 256], [0, 0]);
    const faults: [string[], string[]] = [[], []];
    const ioFaults: string[] = [];
    let died: string | null = null;
    host = await DeviceHost.start({
      config: testConfig({ logLevel: "error" }),
      handlers: { tunscap: (o) => o },
      logger: quietLogger(),
      onQueueFault: (q, reason) => (q === 0 || q === 1 ? faults[q] : ioFaults).push(reason),
      onDeath: (reason) => died = reason,
    });
    const h = host;
    await h.setFeatures(features);
    await h.grantMemory([{
      guestPhysAddr: gpa,
      size,
      userAddr: user,
      hostAddr: FAKE_HOST + gpa,
      buffer: granted,
    }]);
    assert.ok(granted.detached, "the granted view went to the worker");
    const place = (d: TestDriver) => ({ ...d.config("user"), base: 0 });
    await h.startQueues(place(c.rx), place(c.tx), c.io.grant());
    c.dut = {
      faults,
      ioFaults,
      faultUsedLimit: [null, null],
      tick: () => new Promise((res) => setTimeout(res, 1)),
      counters: () => h.getStats(),
      stop: () => h.stopQueues(),
    };
    for (let n = 0; n < 12; n++) await c.round(n);
    // Garbage on the control channel too: the device answers it and goes on.
    for (let i = 0; i < 50; i++) {
      h.sendRaw(
        r.pick([null, 7, "x", { kind: "start-queues", id: 9000 + i }, { kind: r.bytes(3) }]),
      );
    }
    // The paths' counters live while the queues run: read them before stop.
    const counters = await h.getStats();
    assert.ok(h.alive, `the device worker died: ${died}`);
    await c.finish();
    assert.equal(died, null, "the device worker died");
    assert.ok(h.alive);
    const drops = (q: Record<string, number>) =>
      Object.entries(q).filter(([k]) => k.startsWith("drop_") || k.startsWith("error_"))
        .reduce((s, [, v]) => s + v, 0);
    assert.ok(stats.txSent > 0 && stats.rxDelivered > 0, "frames flowed both ways");
    assert.ok(drops(counters.tx0) > 0, `TX drops counted: ${JSON.stringify(counters.tx0)}`);
    assert.ok(drops(counters.rx0) > 0, `RX drops counted: ${JSON.stringify(counters.rx0)}`);
    const back = await h.revokeMemory([{ guestPhysAddr: gpa, size, userAddr: user }]);
    returned = back.length === 1;
    assert.equal(back.length, 1);
    assert.equal(back[0].byteLength, size, "the region came back");
  } finally {
    host?.terminate();
    // Only a region the worker gave back may go. terminate() does not wait
    // for the worker's thread: unmapped under it, it would crash the whole
    // test run (a segfault in the worker) instead of reporting this failure.
    if (returned) libc.munmap(map, size);
  }
});
