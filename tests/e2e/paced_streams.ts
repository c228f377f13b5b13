/**
 * TCP streams of known content that last: paced, so that they run across
 * an event the test makes happen (a migration's switch-over, the daemon
 * killed and restarted), and recording when data arrived, for the longest
 * stall. Host -> guest, the guest samples the size of the file it receives
 * into every 10 ms (busybox `usleep`, /proc/uptime); guest -> host, the
 * receiver in the namespace notes each chunk's arrival. Both ends hash
 * what they sent and got (sha256).
 *
 * @module
 */

import type { Guest } from "./guest.ts";
import type { NetnsProcess } from "./vionet_rig.ts";

/** Starts a helper process in the test's namespace (killed by the rig's cleanup). */
export type Spawn = (argv: string[]) => NetnsProcess;

/** What a paced stream delivered. */
export interface StreamResult {
  sentBytes: number;
  sentSha256: string;
  receivedBytes: number;
  receivedSha256: string;
  /** The longest time the receiver got nothing while the stream ran (ms). */
  longestStallMs: number;
}

export interface PacedStream {
  /** The end in the namespace: the sender (host -> guest) or the receiver (guest -> host). */
  readonly helper: NetnsProcess;
  /** Waits for both ends; `now` is the guest at the end (a migrated guest's new QEMU). */
  finish(now: Guest): Promise<StreamResult>;
}

/**
 * Host -> guest: a paced sender in the namespace on `host:port` (`mib` MiB
 * of random data at `mibPerSecond`), the guest receiving it with nc into a
 * tmpfs file in the background while sampling the file's size.
 */
export async function streamToGuest(
  spawn: Spawn,
  guest: Guest,
  host: string,
  port: number,
  mib: number,
  mibPerSecond: number,
): Promise<PacedStream> {
  const sender = spawn([Deno.execPath(), "eval", pacedSender(host, port, mib, mibPerSecond)]);
  await sender.waitFor(/^listening$/, 30_000);
  const r = await guest.run(
    `rm -f /tmp/rx.blob /tmp/rx.samples /tmp/rx.done; (nc ${host} ${port} >/tmp/rx.blob; echo done >/tmp/rx.done) </dev/null >/dev/null 2>&1 &\n` +
      `(while [ ! -e /tmp/rx.done ]; do echo "$(cut -d' ' -f1 /proc/uptime) $(stat -c %s /tmp/rx.blob 2>/dev/null || echo 0)"; usleep 10000; done >/tmp/rx.samples) </dev/null >/dev/null 2>&1 &`,
    30_000,
  );
  if (r.status !== 0) throw new Error(`the guest could not start receiving: ${r.output}`);
  return {
    helper: sender,
    finish: async (now: Guest) => {
      const sent = JSON.parse(await sender.waitFor(/^\{/, 240_000));
      const done = await now.run(
        "while [ ! -e /tmp/rx.done ]; do usleep 50000; done; stat -c %s /tmp/rx.blob; " +
          "sha256sum /tmp/rx.blob; cat /tmp/rx.samples",
        240_000,
      );
      const [count, sha, , ...samples] = done.output.trim().split(/\s+/);
      return {
        sentBytes: sent.bytes,
        sentSha256: sent.sha256,
        receivedBytes: Number(count),
        receivedSha256: sha,
        longestStallMs: longestStall(samples, 1000),
      };
    },
  };
}

/**
 * Guest -> host: the guest makes `mib` MiB of random data, then sends it
 * paced (a MiB every 1/mibPerSecond s) with nc in the background to a
 * receiver in the namespace on `host:port`, which hashes it and notes when
 * data arrived.
 */
export async function streamFromGuest(
  spawn: Spawn,
  guest: Guest,
  host: string,
  port: number,
  mib: number,
  mibPerSecond: number,
): Promise<PacedStream> {
  const receiver = spawn([Deno.execPath(), "eval", stampedReceiver(host, port)]);
  await receiver.waitFor(/^listening$/, 30_000);
  const prep = await guest.run(
    `dd if=/dev/urandom of=/tmp/tx.blob bs=1M count=${mib} 2>/dev/null && sha256sum /tmp/tx.blob`,
    120_000,
  );
  if (prep.status !== 0) throw new Error(`the guest could not make its data: ${prep.output}`);
  const sentSha256 = prep.output.trim().split(/\s+/)[0];
  const pause = Math.max(1, Math.round(1_000_000 / mibPerSecond));
  const r = await guest.run(
    `(i=0; while [ $i -lt ${mib} ]; do dd if=/tmp/tx.blob bs=1M skip=$i count=1 2>/dev/null; ` +
      `i=$((i+1)); usleep ${pause}; done | nc ${host} ${port}) </dev/null >/dev/null 2>&1 &`,
    30_000,
  );
  if (r.status !== 0) throw new Error(`the guest could not start sending: ${r.output}`);
  return {
    helper: receiver,
    finish: async () => {
      const got = JSON.parse(await receiver.waitFor(/^\{/, 240_000));
      return {
        sentBytes: mib * 1024 * 1024,
        sentSha256,
        receivedBytes: got.bytes,
        receivedSha256: got.sha256,
        longestStallMs: got.longestGapMs,
      };
    },
  };
}

/** From "uptime size" samples: the longest time the size stood still before the end. */
export function longestStall(words: string[], scale: number): number {
  let longest = 0;
  let since = NaN;
  let last = -1;
  for (let i = 0; i + 1 < words.length; i += 2) {
    const t = Number(words[i]) * scale;
    const size = Number(words[i + 1]);
    if (!Number.isFinite(t) || !Number.isFinite(size)) continue;
    if (size !== last) {
      if (last > 0 && Number.isFinite(since)) longest = Math.max(longest, t - since);
      since = t;
      last = size;
    }
  }
  return longest;
}

/**
 * A sender for `deno eval`: `mib` MiB of random data at `rate` MiB/s to one
 * connection. It says when it accepted, and on a failure (a reset, a write
 * error) prints "failed after N bytes: <error>" and exits 1.
 */
function pacedSender(host: string, port: number, mib: number, rate: number): string {
  return `
import { createHash } from "node:crypto";
const listener = Deno.listen({ hostname: "${host}", port: ${port} });
console.log("listening");
const conn = await listener.accept();
listener.close();
console.log("accepted " + JSON.stringify(conn.remoteAddr));
const hash = createHash("sha256");
const chunk = new Uint8Array(64 * 1024);
const total = ${mib} * 1024 * 1024;
const started = performance.now();
let sent = 0;
try {
  while (sent < total) {
    const due = started + (sent / (${rate} * 1024 * 1024)) * 1000;
    const wait = due - performance.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    crypto.getRandomValues(chunk);
    hash.update(chunk);
    let off = 0;
    while (off < chunk.length) off += await conn.write(chunk.subarray(off));
    sent += chunk.length;
  }
  conn.close();
} catch (e) {
  console.log("failed after " + sent + " bytes: " + (e?.stack ?? e));
  Deno.exit(1);
}
console.log(JSON.stringify({ bytes: total, sha256: hash.digest("hex") }));
`;
}

/**
 * A receiver for `deno eval`: hashes one connection and notes the longest
 * gap between reads. On a failure (a reset) it prints "failed after N bytes:
 * <error>" and exits 1.
 */
function stampedReceiver(host: string, port: number): string {
  return `
import { createHash } from "node:crypto";
const listener = Deno.listen({ hostname: "${host}", port: ${port} });
console.log("listening");
const conn = await listener.accept();
listener.close();
console.log("accepted " + JSON.stringify(conn.remoteAddr));
const hash = createHash("sha256");
let bytes = 0;
let last = NaN;
let longestGapMs = 0;
try {
  for await (const chunk of conn.readable) {
    const now = performance.now();
    if (Number.isFinite(last)) longestGapMs = Math.max(longestGapMs, now - last);
    last = now;
    hash.update(chunk);
    bytes += chunk.length;
  }
} catch (e) {
  console.log("failed after " + bytes + " bytes: " + (e?.stack ?? e));
  Deno.exit(1);
}
console.log(JSON.stringify({ bytes, sha256: hash.digest("hex"), longestGapMs }));
`;
}
