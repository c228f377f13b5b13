/**
 * The pcapng blocks `--pcap` writes (draft-ietf-opsawg-pcapng, "PCAP Next
 * Generation (pcapng) Capture File Format"), little-endian:
 *
 * - one Section Header Block (§4.1) with `shb_userappl`;
 * - one Interface Description Block (§4.2) per queue pair: LINKTYPE_ETHERNET,
 *   no snap length limit, microsecond timestamps (the default `if_tsresol`),
 *   `if_name` "<tap>/pair<N>" and an `if_description`;
 * - one Enhanced Packet Block (§4.3) per frame: the Ethernet frame as it
 *   crossed the device (without its virtio_net_hdr), `epb_flags` with the
 *   direction (bits 0-1: 01 inbound = tap to guest, 10 outbound = guest to
 *   tap, the guest NIC's point of view), and an `opt_comment` holding the
 *   virtio_net_hdr fields ({@link vnetHeaderComment}).
 *
 * Pure functions over byte arrays: the capture worker and the tests share them.
 *
 * @module
 */

import {
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_F_RSC_INFO,
  VIRTIO_NET_HDR_GSO_ECN,
  VNH_CSUM_OFFSET,
  VNH_CSUM_START,
  VNH_FLAGS,
  VNH_GSO_SIZE,
  VNH_GSO_TYPE,
  VNH_HDR_LEN,
  VNH_NUM_BUFFERS,
} from "../../ipc/virtio_net_hdr.ts";

/** §4.1: Section Header Block type, and the byte-order magic. */
export const PCAPNG_SHB = 0x0a0d0d0a;
export const PCAPNG_BYTE_ORDER_MAGIC = 0x1a2b3c4d;
/** §4.2: Interface Description Block type. */
export const PCAPNG_IDB = 0x00000001;
/** §4.3: Enhanced Packet Block type. */
export const PCAPNG_EPB = 0x00000006;
/** LINKTYPE_ETHERNET (tcpdump.org link-layer header types). */
export const LINKTYPE_ETHERNET = 1;

/** §3.5 options: opt_endofopt, opt_comment; shb_userappl; if_name, if_description; epb_flags. */
export const OPT_ENDOFOPT = 0;
export const OPT_COMMENT = 1;
export const SHB_USERAPPL = 4;
export const IF_NAME = 2;
export const IF_DESCRIPTION = 3;
export const EPB_FLAGS = 2;

/** §4.3.1 epb_flags bits 0-1: the direction. */
export const EPB_INBOUND = 1;
export const EPB_OUTBOUND = 2;

/** What a captured frame did: the guest sent it (TX) or received it (RX). */
export const DIR_TX = 1;
export const DIR_RX = 2;

/** EPB fixed part before the packet data: type, length, interface, ts hi/lo, cap len, orig len. */
export const EPB_HEAD_BYTES = 28;
/** epb_flags option (4 + 4), opt_endofopt (4), trailing block length (4). */
const EPB_TAIL_FIXED = 8 + 4 + 4;

const pad4 = (n: number) => (n + 3) & ~3;
const encoder = new TextEncoder();

/** Writes one option (code, length, value, padding) at `at`; returns the next offset. */
function option(v: DataView, u8: Uint8Array, at: number, code: number, value: Uint8Array): number {
  v.setUint16(at, code, true);
  v.setUint16(at + 2, value.length, true);
  u8.set(value, at + 4);
  u8.fill(0, at + 4 + value.length, at + 4 + pad4(value.length));
  return at + 4 + pad4(value.length);
}

/** A block with string options: type, body (fixed fields), options, end, trailing length. */
function block(type: number, body: Uint8Array, options: Array<[number, string]>): Uint8Array {
  const values = options.map(([code, text]) => [code, encoder.encode(text)] as const);
  const optBytes = values.reduce((n, [, v]) => n + 4 + pad4(v.length), 0) + 4;
  const total = 8 + body.length + optBytes + 4;
  const u8 = new Uint8Array(total);
  const v = new DataView(u8.buffer);
  v.setUint32(0, type, true);
  v.setUint32(4, total, true);
  u8.set(body, 8);
  let at = 8 + body.length;
  for (const [code, value] of values) at = option(v, u8, at, code, value);
  v.setUint32(at, 0, true); // opt_endofopt
  v.setUint32(total - 4, total, true);
  return u8;
}

/** §4.1: a Section Header Block, version 1.0, section length unknown (-1). */
export function sectionHeaderBlock(userAppl: string): Uint8Array {
  const body = new Uint8Array(16);
  const v = new DataView(body.buffer);
  v.setUint32(0, PCAPNG_BYTE_ORDER_MAGIC, true);
  v.setUint16(4, 1, true);
  v.setUint16(6, 0, true);
  v.setBigInt64(8, -1n, true);
  return block(PCAPNG_SHB, body, [[SHB_USERAPPL, userAppl]]);
}

/** §4.2: an Interface Description Block for Ethernet, µs timestamps; snap length 0: no limit. */
export function interfaceDescriptionBlock(
  name: string,
  description: string,
  snapLen = 0,
): Uint8Array {
  const body = new Uint8Array(8);
  const v = new DataView(body.buffer);
  v.setUint16(0, LINKTYPE_ETHERNET, true);
  v.setUint32(4, snapLen, true);
  return block(PCAPNG_IDB, body, [[IF_NAME, name], [IF_DESCRIPTION, description]]);
}

/** Bytes of an EPB for `capLen` bytes of frame and a comment of `commentBytes` bytes. */
export function epbLength(capLen: number, commentBytes: number): number {
  return EPB_HEAD_BYTES + pad4(capLen) + (commentBytes > 0 ? 4 + pad4(commentBytes) : 0) +
    EPB_TAIL_FIXED;
}

/**
 * Writes an Enhanced Packet Block at `out[at]`: the frame `data` (its
 * original length `origLen` >= data.length), the direction's `epb_flags`
 * and the comment's bytes (may be empty: no comment). Returns its length;
 * the caller made sure {@link epbLength} bytes fit.
 */
export function writeEpb(
  out: Uint8Array,
  view: DataView,
  at: number,
  interfaceId: number,
  timestampUs: number,
  data: Uint8Array,
  origLen: number,
  dir: number,
  comment: Uint8Array,
): number {
  const total = epbLength(data.length, comment.length);
  view.setUint32(at, PCAPNG_EPB, true);
  view.setUint32(at + 4, total, true);
  view.setUint32(at + 8, interfaceId, true);
  const hi = Math.floor(timestampUs / 0x1_0000_0000);
  view.setUint32(at + 12, hi, true);
  view.setUint32(at + 16, timestampUs - hi * 0x1_0000_0000, true);
  view.setUint32(at + 20, data.length, true);
  view.setUint32(at + 24, origLen, true);
  out.set(data, at + EPB_HEAD_BYTES);
  let o = at + EPB_HEAD_BYTES + data.length;
  const padded = at + EPB_HEAD_BYTES + pad4(data.length);
  out.fill(0, o, padded);
  o = padded;
  // epb_flags: code 2, length 4, the direction in bits 0-1.
  view.setUint16(o, EPB_FLAGS, true);
  view.setUint16(o + 2, 4, true);
  view.setUint32(o + 4, dir === DIR_RX ? EPB_INBOUND : EPB_OUTBOUND, true);
  o += 8;
  if (comment.length > 0) o = option(view, out, o, OPT_COMMENT, comment);
  view.setUint32(o, 0, true);
  view.setUint32(o + 4, total, true);
  return total;
}

/** gso_type names (virtio 1.2 §5.1.6), without the ECN bit. */
const GSO_NAMES: Readonly<Record<number, string>> = {
  0: "NONE",
  1: "TCPV4",
  3: "UDP",
  4: "TCPV6",
  5: "UDP_L4",
};

/** The names of the set `flags` bits (virtio 1.2 §5.1.6). */
function flagNames(flags: number): string {
  const names: string[] = [];
  if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) names.push("NEEDS_CSUM");
  if (flags & VIRTIO_NET_HDR_F_DATA_VALID) names.push("DATA_VALID");
  if (flags & VIRTIO_NET_HDR_F_RSC_INFO) names.push("RSC_INFO");
  const rest = flags & ~7;
  if (rest) names.push(`0x${rest.toString(16)}`);
  return names.length === 0 ? "0" : names.join("|");
}

/**
 * The packet comment: the virtio_net_hdr fields of the 12 bytes at
 * `h[at]`, e.g. `vnet_hdr flags=NEEDS_CSUM gso_type=TCPV4 hdr_len=66
 * gso_size=1448 csum_start=34 csum_offset=16` (and `num_buffers=N` for a
 * received frame: the driver reads it only on RX, §5.1.6.4).
 */
export function vnetHeaderComment(h: Uint8Array, at: number, dir: number): string {
  const u16 = (o: number) => h[at + o] | (h[at + o + 1] << 8);
  const gso = h[at + VNH_GSO_TYPE];
  const base = gso & ~VIRTIO_NET_HDR_GSO_ECN;
  const gsoName = (GSO_NAMES[base] ?? `0x${base.toString(16)}`) +
    (gso & VIRTIO_NET_HDR_GSO_ECN ? "|ECN" : "");
  let text = `vnet_hdr flags=${flagNames(h[at + VNH_FLAGS])} gso_type=${gsoName}` +
    ` hdr_len=${u16(VNH_HDR_LEN)} gso_size=${u16(VNH_GSO_SIZE)}` +
    ` csum_start=${u16(VNH_CSUM_START)} csum_offset=${u16(VNH_CSUM_OFFSET)}`;
  if (dir === DIR_RX) text += ` num_buffers=${u16(VNH_NUM_BUFFERS)}`;
  return text;
}
