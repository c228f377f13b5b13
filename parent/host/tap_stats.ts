/**
 * The tap's kernel counters, for the metrics: the 16 columns of
 * `/proc/net/dev` for one interface.
 *
 * Why `/proc/net/dev` and not `/sys/class/net/<tap>/statistics/`: after
 * set-up the daemon runs under a Landlock ruleset that lets it read `/proc`
 * (its threads' status, the worker census) and no part of `/sys` but one
 * file (`landlock.ts`); a rule for `/sys/devices/virtual/net/<tap>` would
 * widen it, and which network namespace `/sys` shows depends on who mounted
 * it (`ip netns exec` remounts it, a plain `setns` does not), while
 * `/proc/net` is always the reading thread's own namespace, the tap's. A
 * netlink socket (RTM_GETLINK) would need `socket(AF_NETLINK)`, which the
 * seccomp filter refuses. The kernel prints these counters from the same
 * `rtnl_link_stats64` as sysfs and netlink, as 64-bit numbers.
 *
 * Directions are the kernel's: the tap *receives* what vionet writes (guest
 * → host) and *transmits* what vionet reads (host → guest).
 *
 * @module
 */

import * as libc from "./libc.ts";

/** The receive columns of /proc/net/dev, in order (net/core/net-procfs.c dev_seq_printf_stats). */
export const NET_DEV_RECEIVE = [
  "bytes",
  "packets",
  "errs",
  "drop",
  "fifo",
  "frame",
  "compressed",
  "multicast",
] as const;

/** The transmit columns, in order. */
export const NET_DEV_TRANSMIT = [
  "bytes",
  "packets",
  "errs",
  "drop",
  "fifo",
  "colls",
  "carrier",
  "compressed",
] as const;

/** One interface's counters, by direction and column name. */
export interface NetDevCounters {
  receive: Record<typeof NET_DEV_RECEIVE[number], number>;
  transmit: Record<typeof NET_DEV_TRANSMIT[number], number>;
}

/**
 * The counters of `ifname` in the text of /proc/net/dev, or null when it has
 * no such line. Numbers beyond 2^53 lose precision (a counter that large is
 * decades of line rate).
 * @throws {SyntaxError} when the interface's line does not have 16 numbers.
 */
export function parseNetDev(text: string, ifname: string): NetDevCounters | null {
  for (const line of text.split("\n")) {
    const colon = line.indexOf(":");
    if (colon < 0 || line.slice(0, colon).trim() !== ifname) continue;
    const fields = line.slice(colon + 1).trim().split(/\s+/);
    if (fields.length !== 16 || !fields.every((f) => /^\d+$/.test(f))) {
      throw new SyntaxError(`/proc/net/dev: the line of ${ifname} is not 16 numbers: ${line}`);
    }
    const n = fields.map(Number);
    return {
      receive: Object.fromEntries(NET_DEV_RECEIVE.map((k, i) => [k, n[i]])) as NetDevCounters[
        "receive"
      ],
      transmit: Object.fromEntries(NET_DEV_TRANSMIT.map((k, i) => [k, n[8 + i]])) as NetDevCounters[
        "transmit"
      ],
    };
  }
  return null;
}

/** Longest /proc/net/dev read: 128 bytes a line, thousands of interfaces. */
const MAX_NET_DEV_BYTES = 1 << 20;

/**
 * Reads `ifname`'s counters from /proc/net/dev (the calling thread's network
 * namespace), through libc; null when the interface is not there (a tap
 * adopted from another namespace, or gone).
 */
export function readTapCounters(ifname: string): NetDevCounters | null {
  const fd = libc.open("/proc/net/dev", libc.O_RDONLY | libc.O_CLOEXEC);
  const chunks: Uint8Array[] = [];
  let total = 0;
  try {
    for (;;) {
      const buf = new Uint8Array(16384);
      const n = libc.read(fd, buf);
      if (n === 0) break;
      chunks.push(buf.subarray(0, n));
      total += n;
      if (total > MAX_NET_DEV_BYTES) throw new RangeError("/proc/net/dev is larger than 1 MiB");
    }
  } finally {
    libc.closeQuietly(fd);
  }
  const all = new Uint8Array(total);
  let at = 0;
  for (const c of chunks) {
    all.set(c, at);
    at += c.byteLength;
  }
  return parseNetDev(new TextDecoder().decode(all), ifname);
}
