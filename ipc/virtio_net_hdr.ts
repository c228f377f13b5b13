/**
 * struct virtio_net_hdr as it crosses every boundary of the data path: in
 * guest memory, in the device's TX records, on the tap (TUNSETVNETHDRSZ 12).
 * One vocabulary for the device, the I/O workers and the tests.
 *
 * virtio 1.2 §5.1.6, 12 bytes with VIRTIO_F_VERSION_1 or VIRTIO_NET_F_MRG_RXBUF:
 *
 *     u8 flags; u8 gso_type; le16 hdr_len; le16 gso_size;
 *     le16 csum_start; le16 csum_offset; le16 num_buffers;
 *
 * @module
 */

/** virtio 1.2 §5.1.6: size of struct virtio_net_hdr with VERSION_1. */
export const VIRTIO_NET_HDR_SIZE = 12;

/** Byte offsets of the fields. */
export const VNH_FLAGS = 0;
export const VNH_GSO_TYPE = 1;
export const VNH_HDR_LEN = 2;
export const VNH_GSO_SIZE = 4;
export const VNH_CSUM_START = 6;
export const VNH_CSUM_OFFSET = 8;
export const VNH_NUM_BUFFERS = 10;

/** virtio 1.2 §5.1.6: flags. */
export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VIRTIO_NET_HDR_F_RSC_INFO = 4;

/** virtio 1.2 §5.1.6: gso_type. */
export const VIRTIO_NET_HDR_GSO_NONE = 0;
export const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
export const VIRTIO_NET_HDR_GSO_UDP = 3;
export const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
export const VIRTIO_NET_HDR_GSO_UDP_L4 = 5;
/** The ECN bit ORed into gso_type (GUEST_ECN / HOST_ECN). */
export const VIRTIO_NET_HDR_GSO_ECN = 0x80;
