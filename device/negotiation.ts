/**
 * virtio-net feature negotiation: what the device offers, and the checks on
 * what the driver acknowledges (virtio 1.2 §5.1.3.1 "Feature bit requirements").
 *
 * @module
 */

import {
  featureNames,
  GUEST_OFFLOAD_FEATURES,
  VIRTIO_F_VERSION_1,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_ANNOUNCE,
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
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MQ,
  VIRTIO_NET_F_MRG_RXBUF,
  VIRTIO_NET_F_MTU,
  VIRTIO_NET_F_STATUS,
  VIRTIO_RING_F_EVENT_IDX,
  VIRTIO_RING_F_INDIRECT_DESC,
} from "../ipc/features.ts";

/**
 * Every feature this device implements and offers to the driver. Under
 * QEMU's vhost-user, MAC and MTU are QEMU's to give (its mac= and host_mtu=,
 * in the config space it keeps): QEMU passes through only the bits in its
 * hw/net/vhost_net.c user_feature_bits, which has MTU and not MAC, and
 * (x-mtu-bypass-backend, on by default) offers MTU to the guest even when a
 * back-end does not; the back-end hears the MTU as VHOST_USER_NET_SET_MTU.
 */
export const DEVICE_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS |
  VIRTIO_NET_F_MTU | VIRTIO_NET_F_MRG_RXBUF | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM |
  VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN |
  VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 | VIRTIO_NET_F_GUEST_ECN |
  VIRTIO_RING_F_EVENT_IDX | VIRTIO_RING_F_INDIRECT_DESC |
  // Needs nothing of the device: QEMU serves the announce request on the
  // control queue, which it keeps (the device never sees CTRL_VQ, so §5.1.3.1's
  // "GUEST_ANNOUNCE requires CTRL_VQ" is QEMU's to check).
  VIRTIO_NET_F_GUEST_ANNOUNCE |
  // Each queue pair is its own device worker (the parent routes rings 2i,
  // 2i + 1 to pair i's): nothing for one pair's device to do. QEMU serves
  // VIRTIO_NET_CTRL_MQ on the control queue and enables pairs with
  // SET_VRING_ENABLE; the back-end offers MQ only with more than one pair.
  VIRTIO_NET_F_MQ;

/**
 * virtio 1.2 §5.1.3.1: "The driver MUST NOT negotiate <feature> without <one of these>".
 * Each entry: a feature and the features of which at least one must come with it.
 */
const REQUIRES: ReadonlyArray<readonly [bigint, bigint]> = [
  [VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_CSUM],
  [VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_CSUM],
  [VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6],
  [VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_GUEST_CSUM],
  [VIRTIO_NET_F_GUEST_USO4, VIRTIO_NET_F_GUEST_CSUM],
  [VIRTIO_NET_F_GUEST_USO6, VIRTIO_NET_F_GUEST_CSUM],
  [VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_CSUM],
  [VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_CSUM],
  [VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6],
  [VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_CSUM],
  [VIRTIO_NET_F_HOST_USO, VIRTIO_NET_F_CSUM],
];

/** Why a driver's feature set is not acceptable, or null when it is. */
export function checkDriverFeatures(acked: bigint, offered = DEVICE_FEATURES): string | null {
  const unknown = acked & ~offered;
  if (unknown !== 0n) {
    return `driver acknowledged features the device did not offer: ${
      featureNames(unknown).join(", ")
    }`;
  }
  // The 12-byte header and little-endian rings of virtio 1.x are all this device speaks.
  if ((acked & VIRTIO_F_VERSION_1) === 0n) {
    return "driver did not acknowledge VERSION_1; legacy (virtio 0.9) drivers are not supported";
  }
  for (const [feature, needs] of REQUIRES) {
    if ((acked & feature) !== 0n && (acked & needs) === 0n) {
      return `${featureNames(feature)[0]} requires ${
        featureNames(needs).join(" or ")
      } (virtio 1.2 §5.1.3.1)`;
    }
  }
  return null;
}

/**
 * The guest receive offloads the tap should deliver for these acknowledged
 * features: the GUEST_* bits the driver took, or none when the operator chose
 * `--offload off` (the device then never receives offloaded frames).
 */
export function wantedTapOffloads(acked: bigint, offloadMode: "auto" | "off"): bigint {
  return offloadMode === "off" ? 0n : acked & GUEST_OFFLOAD_FEATURES;
}
