/** Frames and virtio_net_hdrs for the capture tests. */

/** An Ethernet + IPv4 + UDP frame of `size` bytes (>= 42) from 198.18.0.1:4000 to 198.18.0.2:5000. */
export function udpFrame(size: number, fill = 0x5a): Uint8Array {
  const f = new Uint8Array(size).fill(fill);
  const v = new DataView(f.buffer);
  f.set([0x52, 0x54, 0, 0, 0, 2, 0x52, 0x54, 0, 0, 0, 1], 0);
  v.setUint16(12, 0x0800);
  f[14] = 0x45;
  f[15] = 0;
  v.setUint16(16, size - 14);
  v.setUint16(18, 0);
  v.setUint16(20, 0x4000);
  f[22] = 64;
  f[23] = 17;
  v.setUint16(24, 0);
  f.set([198, 18, 0, 1, 198, 18, 0, 2], 26);
  let sum = 0;
  for (let i = 14; i < 34; i += 2) sum += v.getUint16(i);
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  v.setUint16(24, ~sum & 0xffff);
  v.setUint16(34, 4000);
  v.setUint16(36, 5000);
  v.setUint16(38, size - 34);
  v.setUint16(40, 0); // no UDP checksum
  return f;
}

/** A 12-byte virtio_net_hdr. */
export function vnetHdr(
  h: {
    flags?: number;
    gsoType?: number;
    hdrLen?: number;
    gsoSize?: number;
    csumStart?: number;
    csumOffset?: number;
    numBuffers?: number;
  },
): Uint8Array {
  const b = new Uint8Array(12);
  const v = new DataView(b.buffer);
  b[0] = h.flags ?? 0;
  b[1] = h.gsoType ?? 0;
  v.setUint16(2, h.hdrLen ?? 0, true);
  v.setUint16(4, h.gsoSize ?? 0, true);
  v.setUint16(6, h.csumStart ?? 0, true);
  v.setUint16(8, h.csumOffset ?? 0, true);
  v.setUint16(10, h.numBuffers ?? 0, true);
  return b;
}
