/**
 * virtio-net feature bits, shared by the device (which negotiates them) and the
 * parent (which maps the guest offload bits onto the tap with TUNSETOFFLOAD).
 *
 * Bit numbers are from the virtio 1.2 specification §5.1.3 "Feature bits" and
 * §6 "Reserved Feature Bits". They are 64-bit, so they are carried as bigint.
 *
 * @module
 */

/** virtio 1.2 §5.1.3: device handles packets with partial checksum. */
export const VIRTIO_NET_F_CSUM = 1n << 0n;
/** Driver handles packets with partial checksum. */
export const VIRTIO_NET_F_GUEST_CSUM = 1n << 1n;
/** Control channel offloads reconfiguration support. */
export const VIRTIO_NET_F_CTRL_GUEST_OFFLOADS = 1n << 2n;
/** Device maximum MTU reporting is supported. */
export const VIRTIO_NET_F_MTU = 1n << 3n;
/** Device has given MAC address. */
export const VIRTIO_NET_F_MAC = 1n << 5n;
/** Driver can receive TSOv4. */
export const VIRTIO_NET_F_GUEST_TSO4 = 1n << 7n;
/** Driver can receive TSOv6. */
export const VIRTIO_NET_F_GUEST_TSO6 = 1n << 8n;
/** Driver can receive TSO with ECN. */
export const VIRTIO_NET_F_GUEST_ECN = 1n << 9n;
/** Driver can receive UFO. */
export const VIRTIO_NET_F_GUEST_UFO = 1n << 10n;
/** Device can receive TSOv4. */
export const VIRTIO_NET_F_HOST_TSO4 = 1n << 11n;
/** Device can receive TSOv6. */
export const VIRTIO_NET_F_HOST_TSO6 = 1n << 12n;
/** Device can receive TSO with ECN. */
export const VIRTIO_NET_F_HOST_ECN = 1n << 13n;
/** Device can receive UFO. */
export const VIRTIO_NET_F_HOST_UFO = 1n << 14n;
/** Driver can merge receive buffers. */
export const VIRTIO_NET_F_MRG_RXBUF = 1n << 15n;
/** Configuration status field is available. */
export const VIRTIO_NET_F_STATUS = 1n << 16n;
/** Control channel is available. */
export const VIRTIO_NET_F_CTRL_VQ = 1n << 17n;
/**
 * Driver can send gratuitous packets when asked (virtio 1.2 §5.1.6.5.4):
 * QEMU then announces a migrated guest through the guest's own driver
 * instead of asking the back-end for a RARP (VHOST_USER_SEND_RARP).
 */
export const VIRTIO_NET_F_GUEST_ANNOUNCE = 1n << 21n;
/** Device supports multiqueue with automatic receive steering. */
export const VIRTIO_NET_F_MQ = 1n << 22n;
/** Driver can receive USOv4 packets. */
export const VIRTIO_NET_F_GUEST_USO4 = 1n << 54n;
/** Driver can receive USOv6 packets. */
export const VIRTIO_NET_F_GUEST_USO6 = 1n << 55n;
/** Device can receive USO packets. */
export const VIRTIO_NET_F_HOST_USO = 1n << 56n;

/** virtio 1.2 §6: descriptors with VIRTQ_DESC_F_INDIRECT. */
export const VIRTIO_RING_F_INDIRECT_DESC = 1n << 28n;
/** virtio 1.2 §6: used_event / avail_event fields. */
export const VIRTIO_RING_F_EVENT_IDX = 1n << 29n;
/** virtio 1.2 §6: compliance with the 1.x specification. */
export const VIRTIO_F_VERSION_1 = 1n << 32n;

/** vhost-user: the backend supports GET/SET_PROTOCOL_FEATURES (bit 30). */
export const VHOST_USER_F_PROTOCOL_FEATURES = 1n << 30n;

/**
 * The guest *receive* offloads: what the tap may hand the device unsegmented or
 * with a partial checksum. TUNSCAP carries a subset of these and nothing else.
 */
export const GUEST_OFFLOAD_FEATURES = VIRTIO_NET_F_GUEST_CSUM |
  VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN |
  VIRTIO_NET_F_GUEST_UFO | VIRTIO_NET_F_GUEST_USO4 | VIRTIO_NET_F_GUEST_USO6;

/** Feature names by bit, for logs, errors and the demo's output. */
export const FEATURE_NAMES: ReadonlyMap<bigint, string> = new Map([
  [VIRTIO_NET_F_CSUM, "CSUM"],
  [VIRTIO_NET_F_GUEST_CSUM, "GUEST_CSUM"],
  [VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"],
  [VIRTIO_NET_F_MTU, "MTU"],
  [VIRTIO_NET_F_MAC, "MAC"],
  [VIRTIO_NET_F_GUEST_TSO4, "GUEST_TSO4"],
  [VIRTIO_NET_F_GUEST_TSO6, "GUEST_TSO6"],
  [VIRTIO_NET_F_GUEST_ECN, "GUEST_ECN"],
  [VIRTIO_NET_F_GUEST_UFO, "GUEST_UFO"],
  [VIRTIO_NET_F_HOST_TSO4, "HOST_TSO4"],
  [VIRTIO_NET_F_HOST_TSO6, "HOST_TSO6"],
  [VIRTIO_NET_F_HOST_ECN, "HOST_ECN"],
  [VIRTIO_NET_F_HOST_UFO, "HOST_UFO"],
  [VIRTIO_NET_F_MRG_RXBUF, "MRG_RXBUF"],
  [VIRTIO_NET_F_STATUS, "STATUS"],
  [VIRTIO_NET_F_CTRL_VQ, "CTRL_VQ"],
  [VIRTIO_NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE"],
  [VIRTIO_NET_F_MQ, "MQ"],
  [VIRTIO_NET_F_GUEST_USO4, "GUEST_USO4"],
  [VIRTIO_NET_F_GUEST_USO6, "GUEST_USO6"],
  [VIRTIO_NET_F_HOST_USO, "HOST_USO"],
  [VIRTIO_RING_F_INDIRECT_DESC, "RING_INDIRECT_DESC"],
  [VIRTIO_RING_F_EVENT_IDX, "RING_EVENT_IDX"],
  [VIRTIO_F_VERSION_1, "VERSION_1"],
  [VHOST_USER_F_PROTOCOL_FEATURES, "PROTOCOL_FEATURES"],
]);

/** Names of the set bits, unknown ones as `bit<N>`, lowest first. */
export function featureNames(bits: bigint): string[] {
  const names: string[] = [];
  for (let i = 0n; i < 64n; i++) {
    const bit = 1n << i;
    if ((bits & bit) !== 0n) names.push(FEATURE_NAMES.get(bit) ?? `bit${i}`);
  }
  return names;
}
