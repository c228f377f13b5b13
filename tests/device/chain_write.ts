/**
 * Writes into the device-writable part of a validated chain, as a device
 * that completes RX frames itself would. vionet's device never does (the
 * poller reads frames straight into guest buffers, `parent/io/rx_receiver.ts`);
 * the virtqueue tests use it to play such a device.
 *
 * @module
 */

import type { DescriptorChain } from "../../device/chain.ts";
import type { GuestMemory } from "../../device/guest_memory.ts";

/**
 * Copies `src` into the device-writable part of `chain`, starting `to` bytes
 * into it. Returns the number of bytes written (short when the writable part
 * ends first), or -1 when the chain is stale or `to` is not a non-negative
 * integer. It never writes outside writable segments.
 */
export function chainWrite(
  memory: GuestMemory,
  chain: DescriptorChain,
  to: number,
  src: Uint8Array,
): number {
  if (chain.epoch !== memory.epoch) return -1;
  if (!(Number.isSafeInteger(to) && to >= 0)) return -1;
  let skip = to;
  let done = 0;
  for (let i = chain.readableCount; i < chain.count && done < src.length; i++) {
    const len = chain.length[i];
    if (skip >= len) {
      skip -= len;
      continue;
    }
    const n = Math.min(len - skip, src.length - done);
    const start = chain.offset[i] + skip;
    const bytes = memory.region(chain.region[i])!.bytes;
    bytes.set(src.subarray(done, done + n), start);
    done += n;
    skip = 0;
  }
  return done;
}
