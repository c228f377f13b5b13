/**
 * The frames every backend-bound test moves: small and full-size UDP frames
 * like testpmd's `txonly` engine sends, and one large TCP frame for TSO (in a
 * pcap for testpmd's `net_pcap`, and with a GSO virtio_net_hdr for the raw
 * tap writer). Addresses are from 198.18.0.0/15; the destination MAC is not
 * the tap's, so the host stack drops every frame early (in `ip_rcv`), the same
 * way for every backend.
 *
 * @module
 */

/** Destination MAC of bench frames: locally administered, not any tap's. */
export const DST_MAC = [0x02, 0, 0, 0, 0, 0x02];
/** Source MAC of bench frames. */
export const SRC_MAC = [0x02, 0, 0, 0, 0, 0x01];
/** MSS of the TSO test (`tso set 1448 0`). */
export const TSO_MSS = 1448;
/** Segments in the TSO frame: 45 × 1448 B of payload, 65214 B on the wire, within one 64 KiB mbuf. */
export const TSO_SEGMENTS = 45;

const ETH_LEN = 14;
const IP_LEN = 20;
const UDP_LEN = 8;
const TCP_LEN = 20;

/** virtio 1.2 §5.1.6: the 12-byte virtio_net_hdr with num_buffers. */
export const VNET_HDR_LEN = 12;
const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
const VIRTIO_NET_HDR_GSO_TCPV4 = 1;

function sum16(bytes: Uint8Array, start: number, end: number, acc = 0): number {
  for (let i = start; i + 1 < end; i += 2) acc += (bytes[i] << 8) | bytes[i + 1];
  if ((end - start) & 1) acc += bytes[end - 1] << 8;
  return acc;
}

function fold(acc: number): number {
  while (acc > 0xffff) acc = (acc & 0xffff) + Math.floor(acc / 0x10000);
  return acc;
}

function ethIp(frame: Uint8Array, proto: number): DataView {
  const v = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  frame.set(DST_MAC, 0);
  frame.set(SRC_MAC, 6);
  v.setUint16(12, 0x0800);
  v.setUint8(14, 0x45);
  v.setUint16(16, frame.byteLength - ETH_LEN);
  v.setUint8(22, 64);
  v.setUint8(23, proto);
  frame.set([198, 18, 0, 1], 26);
  frame.set([198, 18, 0, 2], 30);
  v.setUint16(24, (~fold(sum16(frame, ETH_LEN, ETH_LEN + IP_LEN))) & 0xffff);
  return v;
}

/** An Ethernet/IPv4/UDP frame of `length` bytes (no FCS), 198.18.0.1:9 → 198.18.0.2:9. */
export function udpFrame(length: number): Uint8Array {
  if (length < ETH_LEN + IP_LEN + UDP_LEN) {
    throw new RangeError(`frame of ${length} B is too short`);
  }
  const f = new Uint8Array(length);
  const v = ethIp(f, 17);
  v.setUint16(34, 9);
  v.setUint16(36, 9);
  v.setUint16(38, length - ETH_LEN - IP_LEN);
  return f;
}

/** The TSO frame: Ethernet/IPv4/TCP with TSO_SEGMENTS × TSO_MSS bytes of payload. */
export function tsoFrame(pseudoOnly = false): Uint8Array {
  const length = ETH_LEN + IP_LEN + TCP_LEN + TSO_SEGMENTS * TSO_MSS;
  const f = new Uint8Array(length);
  const v = ethIp(f, 6);
  const t = ETH_LEN + IP_LEN;
  v.setUint16(t, 40000);
  v.setUint16(t + 2, 5001);
  v.setUint32(t + 4, 1);
  v.setUint32(t + 8, 1);
  v.setUint8(t + 12, 5 << 4);
  v.setUint8(t + 13, 0x18); // PSH|ACK
  v.setUint16(t + 14, 65535);
  for (let i = t + TCP_LEN; i < length; i++) f[i] = i & 0xff;
  // Pseudo header: addresses, protocol, TCP length.
  let acc = sum16(f, 26, 34) + 6 + (length - t);
  if (pseudoOnly) {
    v.setUint16(t + 16, fold(acc)); // partial checksum, as VIRTIO_NET_HDR_F_NEEDS_CSUM wants
  } else {
    acc = sum16(f, t, length, acc);
    v.setUint16(t + 16, (~fold(acc)) & 0xffff);
  }
  return f;
}

/** A virtio_net_hdr for `frame`: all zero, or GSO TCPV4 with NEEDS_CSUM for the TSO frame. */
export function vnetHeader(gso: boolean): Uint8Array {
  const h = new Uint8Array(VNET_HDR_LEN);
  if (!gso) return h;
  const v = new DataView(h.buffer);
  v.setUint8(0, VIRTIO_NET_HDR_F_NEEDS_CSUM);
  v.setUint8(1, VIRTIO_NET_HDR_GSO_TCPV4);
  v.setUint16(2, ETH_LEN + IP_LEN + TCP_LEN, true); // hdr_len
  v.setUint16(4, TSO_MSS, true); // gso_size
  v.setUint16(6, ETH_LEN + IP_LEN, true); // csum_start
  v.setUint16(8, 16, true); // csum_offset of the TCP checksum
  return h;
}

/** A classic pcap file (microsecond timestamps, LINKTYPE_ETHERNET) holding `frames`. */
export function pcapFile(frames: Uint8Array[]): Uint8Array {
  const size = 24 + frames.reduce((n, f) => n + 16 + f.byteLength, 0);
  const out = new Uint8Array(size);
  const v = new DataView(out.buffer);
  v.setUint32(0, 0xa1b2c3d4, true);
  v.setUint16(4, 2, true);
  v.setUint16(6, 4, true);
  v.setUint32(16, 262144, true); // snaplen
  v.setUint32(20, 1, true); // LINKTYPE_ETHERNET
  let p = 24;
  for (const f of frames) {
    v.setUint32(p + 8, f.byteLength, true);
    v.setUint32(p + 12, f.byteLength, true);
    out.set(f, p + 16);
    p += 16 + f.byteLength;
  }
  return out;
}
