/**
 * The raw tap ceiling: one thread, one tap, nothing else. Creates tap
 * `--tap` (with a 12-byte vnet header, through parent/host/tap.ts and
 * parent/host/libc.ts), prints `ready`, then loops until killed:
 *
 * - `--mode write`: `write()`s the same frame the backends carry (vnet header
 *   first) as fast as it can; the bench counts the tap's rx counters. The fd
 *   is O_NONBLOCK, as vionet's and DPDK's are: tun builds the skb of a small
 *   frame straight in a page fragment (`tun_build_skb()`) only for a
 *   non-blocking write, which here makes a 64 B write about 7 % cheaper
 *   (`bench/tap_ceiling.ts`); tun's write never waits either way;
 * - `--mode read`: non-blocking `read()`s in a busy loop (as DPDK's net_tap
 *   polls) of whatever the host side injects; the bench counts the tap's tx
 *   counters (frames handed to this reader). A blocking reader pays a
 *   cross-CPU wake-up for most frames on this kind of VM and measures that
 *   instead.
 *
 * Run by bench/dpdk.ts inside the bench's namespace, pinned to one core:
 * `deno run -A bench/raw_tap.ts --tap vb0 --mode write --frame 64|1514|tso`.
 *
 * @module
 */

import { parseArgs } from "node:util";
import * as libc from "../parent/host/libc.ts";
import { createTap } from "../parent/host/tap.ts";
import { tsoFrame, udpFrame, VNET_HDR_LEN, vnetHeader } from "./frames.ts";

/** The bytes one `write()` hands the tap for frame kind `kind`. */
export function rawWriteBuffer(kind: string): Uint8Array<ArrayBuffer> {
  const gso = kind === "tso";
  const frame = gso ? tsoFrame(true) : udpFrame(Number(kind));
  const buf = new Uint8Array(VNET_HDR_LEN + frame.byteLength);
  buf.set(vnetHeader(gso), 0);
  buf.set(frame, VNET_HDR_LEN);
  return buf;
}

function main(): void {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      tap: { type: "string" },
      mode: { type: "string" },
      frame: { type: "string", default: "64" },
    },
  });
  if (!values.tap || (values.mode !== "write" && values.mode !== "read")) {
    console.error("usage: raw_tap.ts --tap NAME --mode write|read [--frame 64|1514|tso]");
    Deno.exit(2);
  }
  const tap = createTap(values.tap, { nonBlocking: true });
  const fd = tap.fd;
  if (values.mode === "write") {
    const buf = rawWriteBuffer(values.frame!);
    // The buffer lives as long as this loop; its pointer is taken once.
    const ptr = Deno.UnsafePointer.of(buf);
    const len = BigInt(buf.byteLength);
    console.log("ready");
    let failures = 0;
    while (true) {
      if (libc.sys.write_p(fd, ptr, len) < 0n && ++failures === 1) {
        console.error(`write failed: ${libc.errnoName(libc.errno())}`);
      }
    }
  } else {
    const buf = new Uint8Array(VNET_HDR_LEN + 65550);
    const ptr = Deno.UnsafePointer.of(buf);
    const len = BigInt(buf.byteLength);
    console.log("ready");
    while (true) libc.sys.read_p(fd, ptr, len);
  }
}

if (import.meta.main) main();
