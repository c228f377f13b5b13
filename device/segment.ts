/**
 * Software TCP segmentation (TSO) for IPv4 and IPv6, the fallback when the
 * sink of a GSO frame cannot take it whole: guest TX to a tap without the
 * offload, or tap RX to a guest without GUEST_TSO4/6.
 *
 * It does what Linux's GSO does for the same frame (net/ipv4/af_inet.c
 * `inet_gso_segment`, net/ipv6/ip6_offload.c `ipv6_gso_segment`,
 * net/ipv4/tcp_offload.c `tcp_gso_segment`, Linux 6.18), so the kernel can be
 * the oracle in tests:
 *
 * - every segment carries a copy of all headers (Ethernet, VLAN tag, IPv4 with
 *   options / IPv6 with extension headers, TCP with options) and at most
 *   gso_size bytes of payload; the last one may be shorter;
 * - IPv4: total length per segment, ID incremented per segment from the
 *   original (the first keeps it; virtio has no FIXEDID), header checksum
 *   recomputed. IPv6: payload length per segment;
 * - TCP: sequence number advanced by the payload before it; FIN and PSH only
 *   on the last segment; CWR only on the first. Linux clears CWR on all but
 *   the first segment whether or not the header carried
 *   VIRTIO_NET_HDR_GSO_ECN (that bit becomes SKB_GSO_TCP_ECN, which only
 *   decides whether hardware may segment); only AccECN (not in virtio 1.2)
 *   keeps it. So CWR without the ECN bit is segmented the same way; whether
 *   such a frame is accepted at all is net_header.ts's business (Linux
 *   accepts it);
 * - the TCP checksum: the frame comes with VIRTIO_NET_HDR_F_NEEDS_CSUM, so the
 *   checksum field holds the driver's pseudo-header sum over the whole L4
 *   length (virtio 1.2 §5.1.6.2). Like Linux we take that sum, replace the old
 *   L4 length by the segment's, and add the segment's TCP header and payload.
 *   A driver that put a wrong pseudo-header sum there gets wrong checksums,
 *   exactly as with the kernel;
 * - a frame whose payload fits in one gso_size is "not really GSO" (Linux
 *   `virtio_net_hdr_to_skb`): one segment, flags untouched, checksum completed;
 * - URG, the urgent pointer, TOS/traffic class and TTL/hop limit are copied
 *   unchanged, as Linux does.
 *
 * Output goes through one caller-provided scratch buffer: each segment is
 * built in it and handed to `emit(scratch, length, index)`, which must consume
 * (write or copy) it before returning. Nothing is allocated per segment
 * except one `subarray` view for the payload copy.
 *
 * @module
 */

import { finishChecksum, putBe16, sumBytes } from "./checksum.ts";
import { ETH_P_IP, IPPROTO_TCP, type ParsedFrame } from "./frame_parse.ts";
import { NetDrop, type NetDropCode, TCP_CSUM_OFFSET } from "./net_header.ts";

/** RFC 9293 §3.1 / RFC 3168 §6.1: flag bits in byte 13 of the TCP header. */
export const TCP_FLAG_FIN = 0x01;
export const TCP_FLAG_SYN = 0x02;
export const TCP_FLAG_RST = 0x04;
export const TCP_FLAG_PSH = 0x08;
export const TCP_FLAG_ACK = 0x10;
export const TCP_FLAG_URG = 0x20;
export const TCP_FLAG_ECE = 0x40;
export const TCP_FLAG_CWR = 0x80;

/** Receives one finished segment: `buffer[0..length)`, valid until it returns. */
export type SegmentSink = (buffer: Uint8Array, length: number, index: number) => void;

/** How many segments `payloadLength` bytes make with `gsoSize` (at least 1). */
export function segmentCount(payloadLength: number, gsoSize: number): number {
  return payloadLength <= gsoSize ? 1 : Math.ceil(payloadLength / gsoSize);
}

function be16(b: Uint8Array, at: number): number {
  return (b[at] << 8) | b[at + 1];
}

function be32(b: Uint8Array, at: number): number {
  return ((b[at] << 24) | (b[at + 1] << 16) | (b[at + 2] << 8) | b[at + 3]) >>> 0;
}

function putBe32(b: Uint8Array, at: number, v: number): void {
  b[at] = v >>> 24;
  b[at + 1] = (v >>> 16) & 0xff;
  b[at + 2] = (v >>> 8) & 0xff;
  b[at + 3] = v & 0xff;
}

/**
 * What every segment of one TCP frame shares, read once from the frame's
 * (private) headers by {@link planTcpSegments}; {@link writeSegmentHeaders}
 * then makes each segment's headers from it.
 */
export interface TcpSegmentPlan {
  l3: number;
  l4: number;
  /** Bytes of headers (Ethernet to the end of TCP options) each segment starts with. */
  hlen: number;
  /** End of the IP packet in the frame: payload runs from `hlen` to here. */
  end: number;
  isV4: boolean;
  gsoSize: number;
  count: number;
  /** The driver's pseudo-header sum with the old L4 length taken out. */
  pseudoWithoutLength: number;
  flags: number;
  seq: number;
  id: number;
}

export function createTcpSegmentPlan(): TcpSegmentPlan {
  return {
    l3: 0,
    l4: 0,
    hlen: 0,
    end: 0,
    isV4: false,
    gsoSize: 0,
    count: 0,
    pseudoWithoutLength: 0,
    flags: 0,
    seq: 0,
    id: 0,
  };
}

/**
 * Fills `plan` for segmenting the TCP frame whose headers are in `headers`
 * (at least `parsed.payloadOffset` bytes; parsed into `parsed`, from a
 * private copy: see frame_parse.ts) into segments of at most `gsoSize`
 * payload bytes. Bytes after `parsed.l3End` (L2 padding) belong to no
 * segment. Returns NetDrop.OK, or why the frame cannot be segmented.
 */
export function planTcpSegments(
  headers: Uint8Array,
  parsed: ParsedFrame,
  gsoSize: number,
  plan: TcpSegmentPlan,
): NetDropCode {
  if (parsed.l4Proto !== IPPROTO_TCP) return NetDrop.GSO_L4_MISMATCH;
  if (gsoSize <= 0) return NetDrop.GSO_SIZE_ZERO;
  const l4 = parsed.l4Offset;
  const isV4 = parsed.ethertype === ETH_P_IP;
  plan.l3 = parsed.l3Offset;
  plan.l4 = l4;
  plan.hlen = parsed.payloadOffset;
  plan.end = parsed.l3End;
  plan.isV4 = isV4;
  plan.gsoSize = gsoSize;
  plan.count = segmentCount(parsed.l3End - parsed.payloadOffset, gsoSize);
  // Ones' complement subtraction of the old length is adding its complement.
  plan.pseudoWithoutLength = be16(headers, l4 + TCP_CSUM_OFFSET) +
    (~(parsed.l3End - l4) & 0xffff);
  plan.flags = headers[l4 + 13];
  plan.seq = be32(headers, l4 + 4);
  plan.id = isV4 ? be16(headers, plan.l3 + 4) : 0;
  return NetDrop.OK;
}

/**
 * Turns the copy of the frame's headers at `out[at..at+plan.hlen)` into
 * segment `i`'s, for a segment carrying `n` payload bytes whose ones'
 * complement sum (unfolded, big-endian pairing from the payload's first
 * byte) is `payloadSum`: IP lengths, IPv4 ID and header checksum, sequence
 * number, flags, and the TCP checksum over the TCP header and payload.
 */
export function writeSegmentHeaders(
  plan: TcpSegmentPlan,
  out: Uint8Array,
  at: number,
  i: number,
  n: number,
  payloadSum: number,
): void {
  const l3 = at + plan.l3;
  const l4 = at + plan.l4;
  const segEnd = plan.hlen + n; // relative to the segment's start
  if (plan.isV4) {
    // RFC 791: total length, identification, header checksum.
    putBe16(out, l3 + 2, segEnd - plan.l3);
    putBe16(out, l3 + 4, (plan.id + i) & 0xffff);
    putBe16(out, l3 + 10, 0);
    putBe16(out, l3 + 10, finishChecksum(sumBytes(out, l3, l4)));
  } else {
    // RFC 8200 §3: payload length counts extension headers too.
    putBe16(out, l3 + 4, segEnd - plan.l3 - 40);
  }
  putBe32(out, l4 + 4, (plan.seq + i * plan.gsoSize) >>> 0);
  let f = plan.flags;
  if (i !== plan.count - 1) f &= ~(TCP_FLAG_FIN | TCP_FLAG_PSH);
  if (i !== 0) f &= ~TCP_FLAG_CWR;
  out[l4 + 13] = f;
  putBe16(out, l4 + TCP_CSUM_OFFSET, 0);
  // The TCP header is a whole number of 32-bit words, so the payload's
  // pairing continues the header's.
  const sum = sumBytes(out, l4, at + plan.hlen, plan.pseudoWithoutLength + (segEnd - plan.l4)) +
    payloadSum;
  putBe16(out, l4 + TCP_CSUM_OFFSET, finishChecksum(sum));
}

/**
 * Splits the TCP frame `frame` (already parsed into `parsed`, from a private
 * copy: see frame_parse.ts) into segments of at most `gsoSize` payload bytes.
 * Bytes after `parsed.l3End` (L2 padding) are not copied. `scratch` must hold
 * the headers plus one segment's payload. Returns NetDrop.OK after emitting
 * every segment, or a reason without emitting any.
 */
export function segmentTcp(
  frame: Uint8Array,
  parsed: ParsedFrame,
  gsoSize: number,
  scratch: Uint8Array,
  emit: SegmentSink,
): NetDropCode {
  const plan = sharedPlan;
  const code = planTcpSegments(frame, parsed, gsoSize, plan);
  if (code !== NetDrop.OK) return code;
  const hlen = plan.hlen;
  const end = plan.end;
  if (scratch.length < hlen + Math.min(gsoSize, end - hlen)) return NetDrop.SCRATCH_TOO_SMALL;
  scratch.set(frame.subarray(0, hlen), 0);
  for (let i = 0; i < plan.count; i++) {
    const from = hlen + i * gsoSize;
    const n = Math.min(gsoSize, end - from);
    if (n > 0) scratch.set(frame.subarray(from, from + n), hlen);
    writeSegmentHeaders(plan, scratch, 0, i, n, sumBytes(scratch, hlen, hlen + n));
    emit(scratch, hlen + n, i);
  }
  return NetDrop.OK;
}

/** segmentTcp's plan: it finishes with it before it returns. */
const sharedPlan = createTcpSegmentPlan();
