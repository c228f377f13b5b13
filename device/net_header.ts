/**
 * The virtio-net header in front of every frame, and its validation.
 *
 * virtio 1.2 §5.1.6 "Device Operation", struct virtio_net_hdr (12 bytes with
 * VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF):
 *
 *     u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
 *     le16 csum_start; le16 csum_offset; le16 num_buffers;
 *
 * Trust: on TX the header is guest memory. {@link readNetHdr} copies it once
 * into a plain object the caller reuses; every later decision reads that copy,
 * never guest memory again (no double fetch). {@link validateTxHeader} is the
 * one boundary that checks it against the negotiated features and the frame;
 * it returns a {@link NetDrop} code naming the reason and never throws.
 *
 * @module
 */

import {
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_GUEST_USO4,
  VIRTIO_NET_F_GUEST_USO6,
  VIRTIO_NET_F_HOST_ECN,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
  VIRTIO_NET_F_HOST_UFO,
  VIRTIO_NET_F_HOST_USO,
} from "../ipc/features.ts";
import {
  ETH_HLEN,
  ETH_P_IP,
  ETH_P_IPV6,
  FrameParse,
  IPPROTO_TCP,
  IPPROTO_UDP,
  type ParsedFrame,
  parseFrame,
} from "./frame_parse.ts";

import {
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_F_RSC_INFO,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
  VIRTIO_NET_HDR_SIZE,
  VNH_CSUM_OFFSET,
  VNH_CSUM_START,
  VNH_FLAGS,
  VNH_GSO_SIZE,
  VNH_GSO_TYPE,
  VNH_HDR_LEN,
  VNH_NUM_BUFFERS,
} from "../ipc/virtio_net_hdr.ts";

export {
  VIRTIO_NET_HDR_F_DATA_VALID,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_F_RSC_INFO,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_NONE,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  VIRTIO_NET_HDR_GSO_UDP,
  VIRTIO_NET_HDR_GSO_UDP_L4,
  VIRTIO_NET_HDR_SIZE,
};

/** RFC 9293 §3.1: offset of the checksum in the TCP header. */
export const TCP_CSUM_OFFSET = 16;
/** RFC 768: offset of the checksum in the UDP header. */
export const UDP_CSUM_OFFSET = 6;
/** Linux `UDP_MAX_SEGMENTS`: most segments one USO frame may become. */
export const UDP_MAX_SEGMENTS = 128;

/**
 * Offload bitmask, one shape for three uses: what the driver negotiated
 * (host side: {@link hostOffloads}; guest side: {@link guestOffloads}) and
 * what a tap takes. The values are Linux's TUN_F_* (`if_tun.h`), so the same
 * number goes to TUNSETOFFLOAD.
 */
export const NET_OFFLOAD_CSUM = 0x01;
export const NET_OFFLOAD_TSO4 = 0x02;
export const NET_OFFLOAD_TSO6 = 0x04;
export const NET_OFFLOAD_TSO_ECN = 0x08;
export const NET_OFFLOAD_UFO = 0x10;
export const NET_OFFLOAD_USO4 = 0x20;
export const NET_OFFLOAD_USO6 = 0x40;
/** Everything: a Linux tap opened with IFF_VNET_HDR takes all of it on write. */
export const NET_OFFLOAD_ALL = 0x7f;

/**
 * What the device accepts from the driver (guest TX), from the negotiated
 * feature bits (virtio 1.2 §5.1.3). Compute once per SET_FEATURES.
 */
export function hostOffloads(features: bigint): number {
  let m = 0;
  if (features & VIRTIO_NET_F_CSUM) m |= NET_OFFLOAD_CSUM;
  if (features & VIRTIO_NET_F_HOST_TSO4) m |= NET_OFFLOAD_TSO4;
  if (features & VIRTIO_NET_F_HOST_TSO6) m |= NET_OFFLOAD_TSO6;
  if (features & VIRTIO_NET_F_HOST_ECN) m |= NET_OFFLOAD_TSO_ECN;
  if (features & VIRTIO_NET_F_HOST_UFO) m |= NET_OFFLOAD_UFO;
  if (features & VIRTIO_NET_F_HOST_USO) m |= NET_OFFLOAD_USO4 | NET_OFFLOAD_USO6;
  return m;
}

/**
 * What the driver accepts from the device (guest RX), from the negotiated
 * feature bits. This is also the TUNSETOFFLOAD value for the tap.
 */
export function guestOffloads(features: bigint): number {
  let m = 0;
  if (features & VIRTIO_NET_F_GUEST_CSUM) m |= NET_OFFLOAD_CSUM;
  if (features & VIRTIO_NET_F_GUEST_TSO4) m |= NET_OFFLOAD_TSO4;
  if (features & VIRTIO_NET_F_GUEST_TSO6) m |= NET_OFFLOAD_TSO6;
  if (features & VIRTIO_NET_F_GUEST_ECN) m |= NET_OFFLOAD_TSO_ECN;
  if (features & VIRTIO_NET_F_GUEST_UFO) m |= NET_OFFLOAD_UFO;
  if (features & VIRTIO_NET_F_GUEST_USO4) m |= NET_OFFLOAD_USO4;
  if (features & VIRTIO_NET_F_GUEST_USO6) m |= NET_OFFLOAD_USO6;
  return m;
}

/** The header, copied out of guest memory once. Field names follow the spec. */
export interface VirtioNetHdr {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
  numBuffers: number;
}

/** A zeroed header object, to be reused by one queue. */
export function createNetHdr(): VirtioNetHdr {
  return {
    flags: 0,
    gsoType: 0,
    hdrLen: 0,
    gsoSize: 0,
    csumStart: 0,
    csumOffset: 0,
    numBuffers: 0,
  };
}

/** Sets every field to 0 (GSO_NONE, no flags). */
export function clearNetHdr(hdr: VirtioNetHdr): void {
  hdr.flags = 0;
  hdr.gsoType = 0;
  hdr.hdrLen = 0;
  hdr.gsoSize = 0;
  hdr.csumStart = 0;
  hdr.csumOffset = 0;
  hdr.numBuffers = 0;
}

function le16(b: Uint8Array, at: number): number {
  return b[at] | (b[at + 1] << 8);
}

/**
 * Copies the 12-byte header at `src[offset]` into `out`, each byte read once.
 * Returns false, leaving `out` untouched, when fewer than 12 bytes are there.
 */
export function readNetHdr(src: Uint8Array, offset: number, out: VirtioNetHdr): boolean {
  if (offset < 0 || src.length - offset < VIRTIO_NET_HDR_SIZE) return false;
  out.flags = src[offset + VNH_FLAGS];
  out.gsoType = src[offset + VNH_GSO_TYPE];
  out.hdrLen = le16(src, offset + VNH_HDR_LEN);
  out.gsoSize = le16(src, offset + VNH_GSO_SIZE);
  out.csumStart = le16(src, offset + VNH_CSUM_START);
  out.csumOffset = le16(src, offset + VNH_CSUM_OFFSET);
  out.numBuffers = le16(src, offset + VNH_NUM_BUFFERS);
  return true;
}

/** Writes `hdr` as 12 little-endian bytes at `dst[offset]`. Throws RangeError if it does not fit. */
export function writeNetHdr(hdr: VirtioNetHdr, dst: Uint8Array, offset: number): void {
  if (offset < 0 || dst.length - offset < VIRTIO_NET_HDR_SIZE) {
    throw new RangeError(
      `Cannot write virtio_net_hdr at ${offset}: buffer holds ${dst.length} bytes`,
    );
  }
  dst[offset + VNH_FLAGS] = hdr.flags;
  dst[offset + VNH_GSO_TYPE] = hdr.gsoType;
  putLe16(dst, offset + VNH_HDR_LEN, hdr.hdrLen);
  putLe16(dst, offset + VNH_GSO_SIZE, hdr.gsoSize);
  putLe16(dst, offset + VNH_CSUM_START, hdr.csumStart);
  putLe16(dst, offset + VNH_CSUM_OFFSET, hdr.csumOffset);
  putLe16(dst, offset + VNH_NUM_BUFFERS, hdr.numBuffers);
}

function putLe16(b: Uint8Array, at: number, v: number): void {
  b[at] = v & 0xff;
  b[at + 1] = (v >>> 8) & 0xff;
}

/**
 * Why a frame was dropped, for counters. Codes 1..16 are the
 * {@link FrameParse} reasons with the same numbers; the rest are header
 * checks. Index {@link NET_DROP_NAMES} with a code for its name.
 */
export const NetDrop = {
  ...FrameParse,
  /** Fewer than 12 header bytes in the chain. */
  HDR_TRUNCATED: 20,
  /** TX flags other than NEEDS_CSUM (virtio 1.2 §5.1.6.2.1: DATA_VALID, RSC_INFO MUST NOT be set). */
  HDR_FLAGS_INVALID: 21,
  /** NEEDS_CSUM without VIRTIO_NET_F_CSUM negotiated. */
  CSUM_NOT_NEGOTIATED: 22,
  /** csum_start inside the Ethernet header. */
  CSUM_START_TOO_SMALL: 23,
  /** csum_start + csum_offset + 2 past the end of the frame. */
  CSUM_OUT_OF_FRAME: 24,
  /** gso_type not one of NONE, TCPV4, UDP, TCPV6, UDP_L4 (+ ECN). */
  GSO_TYPE_UNKNOWN: 25,
  /** GSO type whose HOST_* feature was not negotiated. */
  GSO_NOT_NEGOTIATED: 26,
  /** ECN bit without VIRTIO_NET_F_HOST_ECN, or on a non-TCP / non-GSO frame. */
  GSO_ECN_INVALID: 27,
  /** GSO with gso_size 0 (Linux: -EINVAL; a divide-by-zero elsewhere). */
  GSO_SIZE_ZERO: 28,
  /** GSO without NEEDS_CSUM: we need csum_start to find the L4 header. */
  GSO_WITHOUT_NEEDS_CSUM: 29,
  /** hdr_len larger than the frame (Linux tun: -EINVAL). */
  HDR_LEN_TOO_LONG: 30,
  /** The frame's L3 protocol does not match gso_type (virtio_net_hdr_match_proto). */
  GSO_PROTO_MISMATCH: 31,
  /** The frame's L4 protocol does not match gso_type. */
  GSO_L4_MISMATCH: 32,
  /** csum_start is not where the parsed L4 header starts. */
  GSO_CSUM_START_NOT_L4: 33,
  /** csum_offset is not the TCP (16) or UDP (6) checksum field. */
  GSO_CSUM_OFFSET_WRONG: 34,
  /** USO frame that would make more than UDP_MAX_SEGMENTS segments. */
  GSO_TOO_MANY_SEGMENTS: 35,
  /** No software fallback for this offload (UFO, USO) and the sink lacks it. */
  OFFLOAD_UNSUPPORTED: 36,
  /** A segment or completed frame does not fit the scratch buffer. */
  SCRATCH_TOO_SMALL: 37,
  /** An RX frame from the tap whose header the guest cannot take and we cannot fix. */
  RX_HDR_INVALID: 38,
} as const;
/** One value of {@link NetDrop}. */
export type NetDropCode = typeof NetDrop[keyof typeof NetDrop];

/** Number of counter slots a `Uint32Array` of drop counters needs. */
export const NET_DROP_COUNT = 39;

/** Names by code (unused slots are ""), for counters and logs. */
export const NET_DROP_NAMES: readonly string[] = (() => {
  const names = new Array<string>(NET_DROP_COUNT).fill("");
  for (const [name, code] of Object.entries(NetDrop)) names[code] = name;
  return names;
})();

/**
 * Checks a guest TX header against the negotiated host offloads
 * ({@link hostOffloads}) and the frame `frame[0..length)` (virtio 1.2
 * §5.1.6.2, mirroring Linux `virtio_net_hdr_to_skb`). For GSO frames it
 * parses the frame into `parsed` (see {@link validateGsoFrame}) and sets
 * `hdr.hdrLen` to the real header length. Returns NetDrop.OK (0) or the reason
 * to drop. `frame` may be a copied prefix of a `length`-byte frame (see
 * parseFrame): NetDrop.PREFIX_SHORT then asks for a longer copy.
 */
export function validateTxHeader(
  hdr: VirtioNetHdr,
  offloads: number,
  frame: Uint8Array,
  length: number,
  parsed: ParsedFrame,
): NetDropCode {
  // §5.1.6.2.1: the driver MUST NOT set DATA_VALID or RSC_INFO on TX.
  if ((hdr.flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) !== 0) return NetDrop.HDR_FLAGS_INVALID;
  if (hdr.flags === VIRTIO_NET_HDR_F_NEEDS_CSUM) {
    // §5.1.6.2.1: NEEDS_CSUM only if VIRTIO_NET_F_CSUM was negotiated.
    if ((offloads & NET_OFFLOAD_CSUM) === 0) return NetDrop.CSUM_NOT_NEGOTIATED;
    const c = checkCsumFields(hdr, length);
    if (c !== NetDrop.OK) return c;
  }
  // tun: hdr_len beyond the frame is -EINVAL.
  if (hdr.hdrLen > length) return NetDrop.HDR_LEN_TOO_LONG;

  // §5.1.6.2.1: gso_type, not flags, says what kind of GSO this is (the
  // seed's bug: GSO_TCPV4 == F_NEEDS_CSUM == 1, GSO_TCPV6 == F_RSC_INFO == 4).
  const ecn = (hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0;
  const need = gsoOffload(hdr.gsoType);
  if (need < 0) return NetDrop.GSO_TYPE_UNKNOWN;
  if (need === 0) return ecn ? NetDrop.GSO_ECN_INVALID : NetDrop.OK;
  // §5.1.6.2.1: TSO4/TSO6/UFO/USO only if HOST_TSO4/HOST_TSO6/HOST_UFO/HOST_USO.
  if ((offloads & need) === 0) return NetDrop.GSO_NOT_NEGOTIATED;
  // §5.1.6.2.1: the ECN bit only with VIRTIO_NET_F_HOST_ECN.
  if (ecn && (offloads & NET_OFFLOAD_TSO_ECN) === 0) return NetDrop.GSO_ECN_INVALID;
  return validateGsoFrame(hdr, frame, length, parsed);
}

/**
 * The offload a gso_type needs: 0 for GSO_NONE, a NET_OFFLOAD_* bit for a
 * known type, -1 for an unknown one. The ECN bit is ignored here.
 */
export function gsoOffload(gsoType: number): number {
  switch (gsoType & ~VIRTIO_NET_HDR_GSO_ECN) {
    case VIRTIO_NET_HDR_GSO_NONE:
      return 0;
    case VIRTIO_NET_HDR_GSO_TCPV4:
      return NET_OFFLOAD_TSO4;
    case VIRTIO_NET_HDR_GSO_TCPV6:
      return NET_OFFLOAD_TSO6;
    case VIRTIO_NET_HDR_GSO_UDP:
      return NET_OFFLOAD_UFO;
    case VIRTIO_NET_HDR_GSO_UDP_L4:
      return NET_OFFLOAD_USO4 | NET_OFFLOAD_USO6;
    default:
      return -1;
  }
}

/** §5.1.6.2.2: csum_start/csum_offset name a 16-bit field after the Ethernet header. */
function checkCsumFields(hdr: VirtioNetHdr, length: number): NetDropCode {
  if (hdr.csumStart < ETH_HLEN) return NetDrop.CSUM_START_TOO_SMALL;
  if (hdr.csumStart + hdr.csumOffset + 2 > length) return NetDrop.CSUM_OUT_OF_FRAME;
  return NetDrop.OK;
}

/**
 * The frame-side checks of a GSO header, whoever produced it (guest TX, or
 * the tap on RX): known type, ECN only on TCP, gso_size > 0, NEEDS_CSUM set
 * with the checksum on the parsed L4 header, and the frame's own L3/L4
 * protocols matching gso_type (Linux `virtio_net_hdr_match_proto`; one
 * 802.1Q tag allowed). Parses `frame[0..length)` into `parsed` and sets
 * `hdr.hdrLen` to the parsed header length (Linux treats it as a hint too).
 */
export function validateGsoFrame(
  hdr: VirtioNetHdr,
  frame: Uint8Array,
  length: number,
  parsed: ParsedFrame,
): NetDropCode {
  const gso = hdr.gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  let ethertype = 0;
  let l4Proto: number;
  let csumOffset: number;
  switch (gso) {
    case VIRTIO_NET_HDR_GSO_TCPV4:
      ethertype = ETH_P_IP;
      l4Proto = IPPROTO_TCP;
      csumOffset = TCP_CSUM_OFFSET;
      break;
    case VIRTIO_NET_HDR_GSO_TCPV6:
      ethertype = ETH_P_IPV6;
      l4Proto = IPPROTO_TCP;
      csumOffset = TCP_CSUM_OFFSET;
      break;
    case VIRTIO_NET_HDR_GSO_UDP:
    case VIRTIO_NET_HDR_GSO_UDP_L4:
      l4Proto = IPPROTO_UDP;
      csumOffset = UDP_CSUM_OFFSET;
      break;
    default:
      return NetDrop.GSO_TYPE_UNKNOWN;
  }
  // ECN (CWR handling) is a TCP notion: Linux rejects it on UDP_L4.
  if ((hdr.gsoType & VIRTIO_NET_HDR_GSO_ECN) !== 0 && l4Proto !== IPPROTO_TCP) {
    return NetDrop.GSO_ECN_INVALID;
  }
  if (hdr.gsoSize === 0) return NetDrop.GSO_SIZE_ZERO;
  if (hdr.flags !== VIRTIO_NET_HDR_F_NEEDS_CSUM) return NetDrop.GSO_WITHOUT_NEEDS_CSUM;
  const c = checkCsumFields(hdr, length);
  if (c !== NetDrop.OK) return c;

  const p = parseFrame(frame, parsed, length);
  if (p !== FrameParse.OK) return p;
  if (ethertype !== 0 && parsed.ethertype !== ethertype) return NetDrop.GSO_PROTO_MISMATCH;
  if (parsed.l4Proto !== l4Proto) return NetDrop.GSO_L4_MISMATCH;
  if (hdr.csumStart !== parsed.l4Offset) return NetDrop.GSO_CSUM_START_NOT_L4;
  if (hdr.csumOffset !== csumOffset) return NetDrop.GSO_CSUM_OFFSET_WRONG;
  if (
    gso === VIRTIO_NET_HDR_GSO_UDP_L4 &&
    parsed.l3End - parsed.payloadOffset > hdr.gsoSize * UDP_MAX_SEGMENTS
  ) {
    return NetDrop.GSO_TOO_MANY_SEGMENTS;
  }
  hdr.hdrLen = parsed.payloadOffset;
  return NetDrop.OK;
}
