/**
 * L2/L3/L4 parsing of one Ethernet frame, with every bounds check in this one
 * place (passt's `packet.c` habit). Everything after {@link parseFrame} reads
 * header fields only at the offsets it recorded, which are proven to lie inside
 * the frame.
 *
 * Trust: `frame` may be guest memory that the guest can change while we read
 * it. Each field is read once here; a caller that acts on the bytes afterwards
 * (checksum completion, segmentation) works on a private copy of the frame and
 * parses that copy, so what it acts on is what was checked.
 *
 * Never throws on frame contents: the result is a {@link FrameParse} code.
 *
 * @module
 */

/** IEEE 802.3: destination MAC, source MAC, ethertype. */
export const ETH_HLEN = 14;
/** IEEE 802.1Q: TPID + TCI in front of the real ethertype. */
export const VLAN_HLEN = 4;
export const ETH_P_IP = 0x0800;
export const ETH_P_IPV6 = 0x86dd;
export const ETH_P_8021Q = 0x8100;
export const ETH_P_8021AD = 0x88a8;

/** RFC 791: the fixed part of the IPv4 header. */
export const IPV4_MIN_HLEN = 20;
/** RFC 8200 §3: the fixed IPv6 header. */
export const IPV6_HLEN = 40;
/** RFC 9293 §3.1: TCP header without options. */
export const TCP_MIN_HLEN = 20;
/** RFC 768: UDP header. */
export const UDP_HLEN = 8;

export const IPPROTO_HOPOPTS = 0;
export const IPPROTO_TCP = 6;
export const IPPROTO_UDP = 17;
export const IPPROTO_ROUTING = 43;
export const IPPROTO_FRAGMENT = 44;
export const IPPROTO_DSTOPTS = 60;

/** At most this many IPv6 extension headers are walked before giving up. */
export const IPV6_MAX_EXT_HEADERS = 8;

/** Outcome of {@link parseFrame}: OK or the reason the frame cannot be used. */
export const FrameParse = {
  OK: 0,
  /** Shorter than an Ethernet header (plus VLAN tag when tagged). */
  ETH_TRUNCATED: 1,
  /** Neither IPv4 nor IPv6 (after at most one VLAN tag). */
  L3_UNSUPPORTED: 2,
  IPV4_TRUNCATED: 3,
  /** Version is not 4 or IHL < 5. */
  IPV4_BAD_HEADER: 4,
  /** Total length smaller than the header or larger than the frame. */
  IPV4_BAD_TOTAL_LENGTH: 5,
  /** MF set or a fragment offset: no L4 header to work on. */
  IPV4_FRAGMENT: 6,
  IPV6_TRUNCATED: 7,
  IPV6_BAD_VERSION: 8,
  /** Payload length larger than the frame, or 0 (jumbogram). */
  IPV6_BAD_PAYLOAD_LENGTH: 9,
  /** An extension header runs past the packet. */
  IPV6_EXT_TRUNCATED: 10,
  /** A Fragment header: no segmentation or checksum on fragments. */
  IPV6_FRAGMENT: 11,
  /** More than {@link IPV6_MAX_EXT_HEADERS} extension headers. */
  IPV6_EXT_TOO_MANY: 12,
  /** The L4 protocol is neither TCP nor UDP. */
  L4_UNSUPPORTED: 13,
  TCP_TRUNCATED: 14,
  /** TCP data offset < 5 or the options run past the packet. */
  TCP_BAD_DATA_OFFSET: 15,
  UDP_TRUNCATED: 16,
  /**
   * The headers run past the bytes at hand: `frame` is a copied prefix shorter
   * than `length`. Not a verdict on the frame; parse a longer copy.
   */
  PREFIX_SHORT: 17,
} as const;
/** One value of {@link FrameParse}. */
export type FrameParseCode = typeof FrameParse[keyof typeof FrameParse];

/**
 * Where the headers of one frame are. Filled by {@link parseFrame}; create
 * one per queue with {@link createParsedFrame} and reuse it.
 */
export interface ParsedFrame {
  /** Offset of the ethertype field that names the L3 protocol (12 or 16). */
  ethertypeOffset: number;
  /** ETH_P_IP or ETH_P_IPV6. */
  ethertype: number;
  /** Offset of the IP header. */
  l3Offset: number;
  /** One past the last byte of the IP packet (bytes after it are L2 padding). */
  l3End: number;
  /** IPPROTO_TCP or IPPROTO_UDP (the last next-header for IPv6). */
  l4Proto: number;
  /** Offset of the TCP/UDP header. */
  l4Offset: number;
  /** TCP: data offset * 4; UDP: 8. */
  l4HeaderLength: number;
  /** l4Offset + l4HeaderLength: where the L4 payload starts. */
  payloadOffset: number;
}

/** A zeroed {@link ParsedFrame} to be filled by {@link parseFrame}. */
export function createParsedFrame(): ParsedFrame {
  return {
    ethertypeOffset: 0,
    ethertype: 0,
    l3Offset: 0,
    l3End: 0,
    l4Proto: 0,
    l4Offset: 0,
    l4HeaderLength: 0,
    payloadOffset: 0,
  };
}

function be16(b: Uint8Array, at: number): number {
  return (b[at] << 8) | b[at + 1];
}

/**
 * Reads the ethertype after at most one 802.1Q/802.1ad tag.
 * Fills `out.ethertypeOffset`, `out.ethertype`, `out.l3Offset`.
 */
export function parseEthernet(frame: Uint8Array, length: number, out: ParsedFrame): FrameParseCode {
  if (length < ETH_HLEN) return FrameParse.ETH_TRUNCATED;
  let typeAt = 12;
  let type = be16(frame, typeAt);
  if (type === ETH_P_8021Q || type === ETH_P_8021AD) {
    if (length < ETH_HLEN + VLAN_HLEN) return FrameParse.ETH_TRUNCATED;
    typeAt += VLAN_HLEN;
    type = be16(frame, typeAt);
  }
  out.ethertypeOffset = typeAt;
  out.ethertype = type;
  out.l3Offset = typeAt + 2;
  return FrameParse.OK;
}

/**
 * Parses Ethernet (one VLAN tag allowed), IPv4 or IPv6 (walking hop-by-hop,
 * routing and destination-options headers), then the TCP or UDP header.
 * `length` is the frame's length and defaults to `frame.length`. `frame` may
 * be a copied prefix, shorter than `length`, so that a 64 KiB frame need not
 * be copied whole to check its headers: reads stay inside
 * `frame[0 .. min(length, frame.length))`, and headers that run past the
 * prefix give PREFIX_SHORT.
 */
export function parseFrame(
  frame: Uint8Array,
  out: ParsedFrame,
  length: number = frame.length,
): FrameParseCode {
  const avail = Math.min(length, frame.length);
  if (avail < ETH_HLEN + VLAN_HLEN && avail < length) return FrameParse.PREFIX_SHORT;
  const eth = parseEthernet(frame, length, out);
  if (eth !== FrameParse.OK) return eth;
  const l3 = out.l3Offset;
  let proto: number;
  let l4: number;
  let end: number;
  if (out.ethertype === ETH_P_IP) {
    // RFC 791 §3.1: version, IHL, total length, flags/fragment offset.
    if (length - l3 < IPV4_MIN_HLEN) return FrameParse.IPV4_TRUNCATED;
    if (l3 + IPV4_MIN_HLEN > avail) return FrameParse.PREFIX_SHORT;
    const vihl = frame[l3];
    const ihl = (vihl & 0x0f) * 4;
    if (vihl >> 4 !== 4 || ihl < IPV4_MIN_HLEN) return FrameParse.IPV4_BAD_HEADER;
    const total = be16(frame, l3 + 2);
    if (total < ihl || total > length - l3) return FrameParse.IPV4_BAD_TOTAL_LENGTH;
    if ((be16(frame, l3 + 6) & 0x3fff) !== 0) return FrameParse.IPV4_FRAGMENT;
    proto = frame[l3 + 9];
    l4 = l3 + ihl;
    end = l3 + total;
  } else if (out.ethertype === ETH_P_IPV6) {
    // RFC 8200 §3: version, payload length, next header.
    if (length - l3 < IPV6_HLEN) return FrameParse.IPV6_TRUNCATED;
    if (l3 + IPV6_HLEN > avail) return FrameParse.PREFIX_SHORT;
    if (frame[l3] >> 4 !== 6) return FrameParse.IPV6_BAD_VERSION;
    const payload = be16(frame, l3 + 4);
    if (payload === 0 || payload > length - l3 - IPV6_HLEN) {
      return FrameParse.IPV6_BAD_PAYLOAD_LENGTH;
    }
    end = l3 + IPV6_HLEN + payload;
    proto = frame[l3 + 6];
    l4 = l3 + IPV6_HLEN;
    // RFC 8200 §4: extension headers, each "next header, length in 8-octet
    // units not counting the first 8".
    for (let n = 0;; n++) {
      if (proto === IPPROTO_FRAGMENT) return FrameParse.IPV6_FRAGMENT;
      if (proto !== IPPROTO_HOPOPTS && proto !== IPPROTO_ROUTING && proto !== IPPROTO_DSTOPTS) {
        break;
      }
      if (n === IPV6_MAX_EXT_HEADERS) return FrameParse.IPV6_EXT_TOO_MANY;
      if (end - l4 < 8) return FrameParse.IPV6_EXT_TRUNCATED;
      if (l4 + 2 > avail) return FrameParse.PREFIX_SHORT;
      const extLen = (frame[l4 + 1] + 1) * 8;
      if (end - l4 < extLen) return FrameParse.IPV6_EXT_TRUNCATED;
      proto = frame[l4];
      l4 += extLen;
    }
  } else {
    return FrameParse.L3_UNSUPPORTED;
  }
  out.l3End = end;
  out.l4Proto = proto;
  out.l4Offset = l4;
  if (proto === IPPROTO_TCP) {
    // RFC 9293 §3.1: data offset in 32-bit words, at byte 12 of the header.
    if (end - l4 < TCP_MIN_HLEN) return FrameParse.TCP_TRUNCATED;
    if (l4 + TCP_MIN_HLEN > avail) return FrameParse.PREFIX_SHORT;
    const thlen = (frame[l4 + 12] >> 4) * 4;
    if (thlen < TCP_MIN_HLEN || thlen > end - l4) return FrameParse.TCP_BAD_DATA_OFFSET;
    out.l4HeaderLength = thlen;
  } else if (proto === IPPROTO_UDP) {
    if (end - l4 < UDP_HLEN) return FrameParse.UDP_TRUNCATED;
    out.l4HeaderLength = UDP_HLEN;
  } else {
    return FrameParse.L4_UNSUPPORTED;
  }
  out.payloadOffset = l4 + out.l4HeaderLength;
  return FrameParse.OK;
}
