/**
 * Test helpers: build Ethernet/IPv4/IPv6/TCP/UDP frames byte by byte, and
 * check them with a deliberately naive reference checksum that shares no code
 * with device/checksum.ts.
 *
 * @module
 */

export const ETH_P_IP = 0x0800;
export const ETH_P_IPV6 = 0x86dd;
export const ETH_P_8021Q = 0x8100;

export const TCP_FIN = 0x01;
export const TCP_SYN = 0x02;
export const TCP_RST = 0x04;
export const TCP_PSH = 0x08;
export const TCP_ACK = 0x10;
export const TCP_URG = 0x20;
export const TCP_ECE = 0x40;
export const TCP_CWR = 0x80;

/** An IPv6 extension header: its type (0, 43, 44, 60) and body after the 2-byte prefix. */
export interface Ipv6Ext {
  type: number;
  /** Bytes after next-header/length; with the 2 prefix bytes a multiple of 8. */
  body: Uint8Array;
}

/** What to build. Defaults make a valid IPv4 TCP frame with an ACK and no payload. */
export interface FrameSpec {
  ipVersion?: 4 | 6;
  dstMac?: number[];
  srcMac?: number[];
  /** Add one 802.1Q tag with this VLAN ID. */
  vlan?: number;
  /** IPv4 source/destination (4 bytes) or IPv6 (16 bytes). */
  src?: number[];
  dst?: number[];
  /** IPv4 TOS / IPv6 traffic class, including the ECN bits. */
  tos?: number;
  ttl?: number;
  ipId?: number;
  df?: boolean;
  /** IPv4 options (multiple of 4 bytes). */
  ipOptions?: Uint8Array;
  /** IPv6 extension headers, in order. */
  ipv6Ext?: Ipv6Ext[];
  l4?: "tcp" | "udp";
  srcPort?: number;
  dstPort?: number;
  seq?: number;
  ack?: number;
  tcpFlags?: number;
  window?: number;
  urgent?: number;
  /** TCP options (multiple of 4 bytes). */
  tcpOptions?: Uint8Array;
  payload?: Uint8Array;
  /**
   * L4 checksum field: "full" (correct), "partial" (the folded pseudo-header
   * sum, as a driver leaves it with NEEDS_CSUM), or "zero".
   */
  checksum?: "full" | "partial" | "zero";
  /** Extra bytes after the IP packet (L2 padding). */
  padding?: number;
}

/** A built frame and where its headers are. */
export interface BuiltFrame {
  frame: Uint8Array;
  l3Offset: number;
  l4Offset: number;
  payloadOffset: number;
  /** One past the IP packet. */
  l3End: number;
}

export const MAC_A = [0x02, 0, 0, 0, 0, 0x0a];
export const MAC_B = [0x02, 0, 0, 0, 0, 0x0b];
export const IP4_A = [198, 18, 0, 2];
export const IP4_B = [198, 18, 1, 2];
export const IP6_A = [0x20, 0x01, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02];
export const IP6_B = [0x20, 0x01, 0, 0x02, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x02];

function put16(b: Uint8Array, at: number, v: number): void {
  b[at] = (v >>> 8) & 0xff;
  b[at + 1] = v & 0xff;
}

function put32(b: Uint8Array, at: number, v: number): void {
  put16(b, at, (v >>> 16) & 0xffff);
  put16(b, at + 2, v & 0xffff);
}

export function get16(b: Uint8Array, at: number): number {
  return b[at] * 256 + b[at + 1];
}

export function get32(b: Uint8Array, at: number): number {
  return get16(b, at) * 65536 + get16(b, at + 2);
}

/** Naive RFC 1071 sum: one byte at a time, folded at the end. */
export function refSum(b: Uint8Array, start: number, end: number): number {
  let s = 0;
  for (let i = start; i < end; i++) s += (i - start) % 2 === 0 ? b[i] * 256 : b[i];
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 65536);
  return s;
}

function fold(s: number): number {
  while (s > 0xffff) s = (s & 0xffff) + Math.floor(s / 65536);
  return s;
}

/** Pseudo-header sum (folded) for the IP packet at `l3`, upper-layer protocol and length. */
export function refPseudo(b: Uint8Array, l3: number, proto: number, l4Length: number): number {
  const v6 = b[l3] >> 4 === 6;
  const addrs = v6 ? refSum(b, l3 + 8, l3 + 40) : refSum(b, l3 + 12, l3 + 20);
  return fold(addrs + proto + (l4Length >>> 16) + (l4Length & 0xffff));
}

/** True when the IPv4 header at `l3` has a correct header checksum. */
export function ipv4HeaderChecksumOk(b: Uint8Array, l3: number): boolean {
  const ihl = (b[l3] & 0x0f) * 4;
  return refSum(b, l3, l3 + ihl) === 0xffff;
}

/** True when the TCP/UDP segment `b[l4..end)` checksums to all ones with its pseudo-header. */
export function l4ChecksumOk(
  b: Uint8Array,
  l3: number,
  l4: number,
  end: number,
  proto: number,
): boolean {
  return fold(refSum(b, l4, end) + refPseudo(b, l3, proto, end - l4)) === 0xffff;
}

/** Builds a frame from `spec` (see {@link FrameSpec} for defaults). */
export function buildFrame(spec: FrameSpec = {}): BuiltFrame {
  const v = spec.ipVersion ?? 4;
  const l4Kind = spec.l4 ?? "tcp";
  const payload = spec.payload ?? new Uint8Array(0);
  const ipOpts = spec.ipOptions ?? new Uint8Array(0);
  const exts = spec.ipv6Ext ?? [];
  const tcpOpts = spec.tcpOptions ?? new Uint8Array(0);
  const l2 = spec.vlan === undefined ? 14 : 18;
  let l3Len = v === 4 ? 20 + ipOpts.length : 40;
  for (const e of exts) l3Len += 2 + e.body.length;
  const l4h = l4Kind === "tcp" ? 20 + tcpOpts.length : 8;
  const l3 = l2;
  const l4 = l3 + l3Len;
  const pay = l4 + l4h;
  const end = pay + payload.length;
  const frame = new Uint8Array(end + (spec.padding ?? 0));
  frame.set(spec.dstMac ?? MAC_B, 0);
  frame.set(spec.srcMac ?? MAC_A, 6);
  const etherType = v === 4 ? ETH_P_IP : ETH_P_IPV6;
  if (spec.vlan !== undefined) {
    put16(frame, 12, ETH_P_8021Q);
    put16(frame, 14, spec.vlan);
    put16(frame, 16, etherType);
  } else {
    put16(frame, 12, etherType);
  }
  const proto = l4Kind === "tcp" ? 6 : 17;
  if (v === 4) {
    frame[l3] = 0x40 | ((20 + ipOpts.length) / 4);
    frame[l3 + 1] = spec.tos ?? 0;
    put16(frame, l3 + 2, end - l3);
    put16(frame, l3 + 4, spec.ipId ?? 0x1234);
    put16(frame, l3 + 6, spec.df === false ? 0 : 0x4000);
    frame[l3 + 8] = spec.ttl ?? 64;
    frame[l3 + 9] = proto;
    frame.set(spec.src ?? IP4_A, l3 + 12);
    frame.set(spec.dst ?? IP4_B, l3 + 16);
    frame.set(ipOpts, l3 + 20);
    put16(frame, l3 + 10, ~refSum(frame, l3, l4) & 0xffff);
  } else {
    const tc = spec.tos ?? 0;
    put32(frame, l3, (0x60000000 | (tc << 20) | 0x12345) >>> 0);
    put16(frame, l3 + 4, end - l3 - 40);
    frame[l3 + 6] = exts.length > 0 ? exts[0].type : proto;
    frame[l3 + 7] = spec.ttl ?? 64;
    frame.set(spec.src ?? IP6_A, l3 + 8);
    frame.set(spec.dst ?? IP6_B, l3 + 24);
    let at = l3 + 40;
    exts.forEach((e, i) => {
      frame[at] = i + 1 < exts.length ? exts[i + 1].type : proto;
      frame[at + 1] = (2 + e.body.length) / 8 - 1;
      frame.set(e.body, at + 2);
      at += 2 + e.body.length;
    });
  }
  put16(frame, l4, spec.srcPort ?? 40000);
  put16(frame, l4 + 2, spec.dstPort ?? 5201);
  if (l4Kind === "tcp") {
    put32(frame, l4 + 4, spec.seq ?? 1000);
    put32(frame, l4 + 8, spec.ack ?? 2000);
    frame[l4 + 12] = (l4h / 4) << 4;
    frame[l4 + 13] = spec.tcpFlags ?? TCP_ACK;
    put16(frame, l4 + 14, spec.window ?? 502);
    put16(frame, l4 + 18, spec.urgent ?? 0);
    frame.set(tcpOpts, l4 + 20);
  } else {
    put16(frame, l4 + 4, end - l4);
  }
  frame.set(payload, pay);
  const csumAt = l4 + (l4Kind === "tcp" ? 16 : 6);
  const mode = spec.checksum ?? "full";
  const pseudo = refPseudo(frame, l3, proto, end - l4);
  if (mode === "partial") {
    put16(frame, csumAt, pseudo);
  } else if (mode === "full") {
    const c = ~fold(refSum(frame, l4, end) + pseudo) & 0xffff;
    put16(frame, csumAt, c === 0 && l4Kind === "udp" ? 0xffff : c);
  }
  return { frame, l3Offset: l3, l4Offset: l4, payloadOffset: pay, l3End: end };
}

/** TCP timestamp option padded with two NOPs (12 bytes). */
export function tcpTimestampOption(tsval: number, tsecr: number): Uint8Array {
  const o = new Uint8Array(12);
  o[0] = 1;
  o[1] = 1;
  o[2] = 8;
  o[3] = 10;
  put32(o, 4, tsval);
  put32(o, 8, tsecr);
  return o;
}

/** A small deterministic PRNG (mulberry32) for property tests. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Random bytes from `rand`. */
export function randomBytes(rand: () => number, n: number): Uint8Array {
  const b = new Uint8Array(n);
  for (let i = 0; i < n; i++) b[i] = (rand() * 256) | 0;
  return b;
}
