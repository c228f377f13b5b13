/**
 * What a vhost-user front-end sends, encoded, and its check of the back-end's
 * reply headers: the tests' front-end (`vhost_user_frontend.ts`) and the
 * tests that feed the back-end messages directly. The daemon only decodes
 * requests and encodes replies (`parent/control/vhost_user_messages.ts`).
 *
 * @module
 */

import {
  encodeMessage,
  encodeU64,
  MEMORY_REGION_SIZE,
  MEMORY_TABLE_HEADER_SIZE,
  type MemoryRegionDesc,
  ProtocolError,
  requestName,
  SINGLE_MEMORY_REGION_SIZE,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_VERSION,
  VHOST_USER_VERSION_MASK,
  VHOST_USER_VRING_NOFD_MASK,
  type VhostUserHeader,
  VRING_ADDR_SIZE,
  type VringAddr,
} from "../../../parent/control/vhost_user_messages.ts";

/** A front-end request (version 1, need_reply when asked). */
export function encodeRequest(
  request: number,
  payload?: Uint8Array,
  needReply = false,
): Uint8Array<ArrayBuffer> {
  const flags = VHOST_USER_VERSION | (needReply ? VHOST_USER_NEED_REPLY_MASK : 0);
  return encodeMessage(request, flags, payload);
}

/** vring address payload. */
export function encodeVringAddr(a: VringAddr): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(VRING_ADDR_SIZE);
  const v = new DataView(out.buffer);
  v.setUint32(0, a.index, true);
  v.setUint32(4, a.flags, true);
  v.setBigUint64(8, a.descUser, true);
  v.setBigUint64(16, a.usedUser, true);
  v.setBigUint64(24, a.availUser, true);
  v.setBigUint64(32, a.logGuest, true);
  return out;
}

/** SET_VRING_KICK/CALL/ERR payload: index in bits 0-7, NOFD in bit 8. */
export function encodeVringFd(index: number, noFd: boolean): Uint8Array<ArrayBuffer> {
  return encodeU64(BigInt(index) | (noFd ? VHOST_USER_VRING_NOFD_MASK : 0n));
}

function writeRegion(v: DataView, at: number, r: MemoryRegionDesc): void {
  v.setBigUint64(at, r.guestPhysAddr, true);
  v.setBigUint64(at + 8, r.size, true);
  v.setBigUint64(at + 16, r.userAddr, true);
  v.setBigUint64(at + 24, r.mmapOffset, true);
}

/** SET_MEM_TABLE payload: exactly as long as its regions need. */
export function encodeMemTable(regions: readonly MemoryRegionDesc[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(MEMORY_TABLE_HEADER_SIZE + regions.length * MEMORY_REGION_SIZE);
  const v = new DataView(out.buffer);
  v.setUint32(0, regions.length, true);
  regions.forEach((r, i) => writeRegion(v, MEMORY_TABLE_HEADER_SIZE + i * MEMORY_REGION_SIZE, r));
  return out;
}

/** ADD_MEM_REG / REM_MEM_REG payload: u64 padding, one region. */
export function encodeMemRegion(r: MemoryRegionDesc): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(SINGLE_MEMORY_REGION_SIZE);
  writeRegion(new DataView(out.buffer), 8, r);
  return out;
}

/**
 * Decodes a reply header (for a front-end, the tests' one): version 1, the
 * reply flag, the expected request, a bounded size.
 * @throws ProtocolError otherwise.
 */
export function decodeReplyHeader(bytes: Uint8Array, expectedRequest: number): VhostUserHeader {
  if (bytes.byteLength < VHOST_USER_HDR_SIZE) {
    throw new ProtocolError(`Reply header is ${bytes.byteLength} bytes`);
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, VHOST_USER_HDR_SIZE);
  const h = {
    request: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    size: v.getUint32(8, true),
  };
  if (h.request !== expectedRequest) {
    throw new ProtocolError(
      `Reply is for ${requestName(h.request)}, expected ${requestName(expectedRequest)}`,
    );
  }
  if ((h.flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
    throw new ProtocolError(`Reply has version ${h.flags & VHOST_USER_VERSION_MASK}`);
  }
  if ((h.flags & VHOST_USER_REPLY_MASK) === 0) {
    throw new ProtocolError("Reply lacks the reply flag");
  }
  if (h.size > VHOST_USER_MAX_PAYLOAD_SIZE) {
    throw new ProtocolError(`Reply payload size ${h.size} is too large`);
  }
  return h;
}
