/**
 * The parent's policy for the device's TUNSCAP request: which guest receive
 * offloads the tap may use, checked, mapped to TUN_F_* and applied with
 * TUNSETOFFLOAD.
 *
 * Trust: `requested` comes from the device worker, which derives it from what
 * the guest driver acknowledged. Treat it as untrusted: it is checked against
 * GUEST_OFFLOAD_FEATURES, the operator's `allowed` set and the spec's
 * dependency rules before anything touches the tap. A refused request leaves
 * the tap exactly as it was.
 *
 * Mapping (the GUEST_* bits describe what the *reader* of the tap accepts, as
 * QEMU, cloud-hypervisor and Firecracker map them): GUEST_CSUM→TUN_F_CSUM,
 * GUEST_TSO4→TUN_F_TSO4, GUEST_TSO6→TUN_F_TSO6, GUEST_ECN→TUN_F_TSO_ECN,
 * GUEST_UFO→TUN_F_UFO, GUEST_USO4→TUN_F_USO4, GUEST_USO6→TUN_F_USO6.
 *
 * @module
 */

import {
  featureNames,
  GUEST_OFFLOAD_FEATURES,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_GUEST_UFO,
  VIRTIO_NET_F_GUEST_USO4,
  VIRTIO_NET_F_GUEST_USO6,
} from "../../ipc/features.ts";
import {
  type Tap,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  TUN_F_UFO,
  TUN_F_USO4,
  TUN_F_USO6,
} from "./tap.ts";

/** Guest feature bit → TUN_F_* flag. */
const GUEST_TO_TUN: ReadonlyArray<readonly [bigint, number]> = [
  [VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM],
  [VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4],
  [VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6],
  [VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN],
  [VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO],
  [VIRTIO_NET_F_GUEST_USO4, TUN_F_USO4],
  [VIRTIO_NET_F_GUEST_USO6, TUN_F_USO6],
];

/** The bits that virtio 1.2 §5.1.3.1 says require VIRTIO_NET_F_GUEST_CSUM. */
const NEEDS_GUEST_CSUM = VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 |
  VIRTIO_NET_F_GUEST_ECN | VIRTIO_NET_F_GUEST_UFO | VIRTIO_NET_F_GUEST_USO4 |
  VIRTIO_NET_F_GUEST_USO6;

const U64_MAX = (1n << 64n) - 1n;

/** Maps guest offload bits to TUN_F_* flags; bits without a tap flag are ignored. */
export function guestFeaturesToTunFlags(bits: bigint): number {
  let flags = 0;
  for (const [guest, tun] of GUEST_TO_TUN) if (bits & guest) flags |= tun;
  return flags;
}

/** Maps TUN_F_* flags back to the guest offload bits they stand for. */
export function tunFlagsToGuestFeatures(tunFlags: number): bigint {
  let bits = 0n;
  for (const [guest, tun] of GUEST_TO_TUN) if (tunFlags & tun) bits |= guest;
  return bits;
}

/** TUNSCAP was applied. */
export interface TunscapApplied {
  ok: true;
  /** Guest offload bits now in force on the tap (a subset of the request). */
  inForce: bigint;
  /** The TUN_F_* flags given to TUNSETOFFLOAD. */
  tunFlags: number;
  /**
   * Requested and allowed, but not in force because this kernel lacks them
   * (or lacks a partner: USO4 only with USO6, ECN only with TSO). Dropping an
   * offload is always safe: the tap simply never sends such frames.
   */
  dropped: bigint;
}

/**
 * TUNSCAP was refused; the tap is unchanged.
 * - `malformed`: `requested` is not a 64-bit feature set.
 * - `not-offload`: bits that are not guest receive offloads (GUEST_OFFLOAD_FEATURES).
 * - `not-allowed`: offload bits the operator's policy does not allow.
 * - `inconsistent`: bits whose required bit is missing (virtio 1.2 §5.1.3.1).
 */
export interface TunscapRefused {
  ok: false;
  reason: "malformed" | "not-offload" | "not-allowed" | "inconsistent";
  /** The offending bits (0n for `malformed`). */
  refused: bigint;
  /** Their feature names, e.g. ["GUEST_TSO4"]. */
  refusedNames: string[];
  /** One sentence for logs and for the `error` reply. */
  message: string;
}

/** What {@link applyTunscap} returns. */
export type TunscapResult = TunscapApplied | TunscapRefused;

function refuse(reason: TunscapRefused["reason"], refused: bigint, text: string): TunscapRefused {
  const refusedNames = featureNames(refused);
  return {
    ok: false,
    reason,
    refused,
    refusedNames,
    message: `TUNSCAP refused: ${text}${refusedNames.length ? `: ${refusedNames.join(", ")}` : ""}`,
  };
}

/** Checks `requested` without touching anything; null when it may be applied. */
export function checkTunscap(requested: bigint, allowed: bigint): TunscapRefused | null {
  if (typeof requested !== "bigint" || requested < 0n || requested > U64_MAX) {
    return refuse("malformed", 0n, `${String(requested)} is not a 64-bit feature set`);
  }
  const notOffload = requested & ~GUEST_OFFLOAD_FEATURES;
  if (notOffload) return refuse("not-offload", notOffload, "not guest receive offloads");
  const notAllowed = requested & ~(allowed & GUEST_OFFLOAD_FEATURES);
  if (notAllowed) return refuse("not-allowed", notAllowed, "not allowed by this parent");
  // virtio 1.2 §5.1.3.1: TSO4, TSO6, UFO, USO4, USO6 require GUEST_CSUM;
  // ECN requires TSO4 or TSO6 (and so GUEST_CSUM as well).
  if (!(requested & VIRTIO_NET_F_GUEST_CSUM) && (requested & NEEDS_GUEST_CSUM)) {
    return refuse("inconsistent", requested & NEEDS_GUEST_CSUM, "these need GUEST_CSUM");
  }
  if (
    (requested & VIRTIO_NET_F_GUEST_ECN) &&
    !(requested & (VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6))
  ) {
    return refuse("inconsistent", VIRTIO_NET_F_GUEST_ECN, "this needs GUEST_TSO4 or GUEST_TSO6");
  }
  return null;
}

/** The TUN_F_* subset of `wanted` that set_offload() in tun.c accepts as a whole. */
function kernelAcceptable(wanted: number, kernelOffloads: number): number {
  let flags = wanted & kernelOffloads;
  if (!(flags & TUN_F_CSUM)) return 0; // every other flag is taken only with CSUM
  if (!(flags & (TUN_F_TSO4 | TUN_F_TSO6))) flags &= ~TUN_F_TSO_ECN;
  if ((flags & (TUN_F_USO4 | TUN_F_USO6)) !== (TUN_F_USO4 | TUN_F_USO6)) {
    flags &= ~(TUN_F_USO4 | TUN_F_USO6); // "USO4 and USO6 should work simultaneously"
  }
  return flags;
}

/**
 * Applies a TUNSCAP request: `requested` guest offload bits, checked against
 * `allowed` (the operator's policy) and the spec, then set on the tap as far
 * as the kernel supports them. Refusals come back as a value and change
 * nothing; a TUNSETOFFLOAD failure after the checks is a bug and throws.
 */
export function applyTunscap(
  tap: Pick<Tap, "kernelOffloads" | "setOffload">,
  requested: bigint,
  allowed: bigint,
): TunscapResult {
  const refused = checkTunscap(requested, allowed);
  if (refused) return refused;
  const tunFlags = kernelAcceptable(guestFeaturesToTunFlags(requested), tap.kernelOffloads);
  tap.setOffload(tunFlags);
  const inForce = tunFlagsToGuestFeatures(tunFlags);
  return { ok: true, inForce, tunFlags, dropped: requested & ~inForce };
}
