/**
 * A restart the guest survives: the daemon serves a persistent tap (made
 * with `ip tuntap add` before it starts; it attaches, and the tap and its
 * addresses outlive it), QEMU's chardev has `reconnect=1`; the daemon is
 * killed (SIGKILL, a crash) or stopped (SIGTERM, an upgrade) in the middle
 * of TCP transfers both ways and started again with the same options. Both
 * transfers complete intact (sha256) after a stall, which the test prints:
 * QEMU's reconnect interval and the daemon's start-up, and little more.
 *
 * What happens to frames in flight: the tap drops what arrives while no
 * daemon holds it, and a frame the dead daemon had taken from the guest
 * but not yet written is lost or, when QEMU resumes the ring from its used
 * index, sent again; TCP retransmits and discards as usual.
 */

import assert from "node:assert/strict";
import type { Guest } from "./guest.ts";
import type { PacedStream } from "./paced_streams.ts";
import { Rig, rigUnavailable, type VionetDaemon } from "./vionet_rig.ts";

const unavailable = rigUnavailable();

for (const signal of ["SIGKILL", "SIGTERM"] as const) {
  Deno.test({
    name: `a daemon ${signal === "SIGKILL" ? "killed" : "stopped"} (${signal}) mid-transfer and ` +
      "started again: TCP streams both ways complete intact after a stall",
    ignore: unavailable !== undefined,
    sanitizeOps: false,
    sanitizeResources: false,
    fn: () =>
      Rig.run({ persistentTap: true }, async (rig) => {
        await rig.daemon.waitFor(/tap \S+ attached/, 10_000); // the persistent tap, not a new one
        const { guest } = await rig.bootGuest({ reconnect: 1 });
        const old = rig.daemon;
        const streams: [string, PacedStream][] = [];
        try {
          const up = await rig.streamFromGuest(guest, 16, 4);
          streams.push(["guest -> host receiver", up]);
          const down = await rig.streamToGuest(guest, 16, 4);
          streams.push(["host -> guest sender", down]);
          await new Promise((r) => setTimeout(r, 1500));
          const gone = await rig.restartDaemon(signal);
          const back = await rig.daemon.waitFor(/queues running/, 30_000);
          const servedMs = Date.now() - gone;
          const fromGuest = await up.finish(guest);
          const toGuest = await down.finish(guest);
          for (
            const [what, r] of [["guest -> host", fromGuest], ["host -> guest", toGuest]] as const
          ) {
            assert.equal(r.receivedBytes, r.sentBytes, `${what}: bytes`);
            assert.equal(r.receivedSha256, r.sentSha256, `${what}: sha256`);
          }
          assert.ok(back);
          console.log(
            `${signal}: queues running again ${servedMs} ms after the old daemon was gone; ` +
              `longest stall guest -> host ${fromGuest.longestStallMs.toFixed(0)} ms, ` +
              `host -> guest ${toGuest.longestStallMs.toFixed(0)} ms`,
          );
        } catch (e) {
          throw new Error(
            `${(e as Error).message}\n${await failureReport(rig, old, guest, streams)}`,
            { cause: e },
          );
        }
      }),
  });
}

/**
 * What a failed run leaves to diagnose it: both daemons' log tails (the new
 * one's counters asked for with SIGUSR2), the guest console's tail, and each
 * stream helper's output and exit status.
 */
async function failureReport(
  rig: Rig,
  old: VionetDaemon,
  guest: Guest,
  streams: [string, PacedStream][],
): Promise<string> {
  const tail = (text: string, lines: number) => text.split("\n").slice(-lines).join("\n");
  const parts: string[] = [];
  if (rig.daemon !== old) {
    parts.push(`--- old daemon (${old.describeStatus()}), log tail ---\n${tail(old.log(), 30)}`);
  }
  if (rig.daemon.running) {
    rig.daemon.signal("SIGUSR2");
    await new Promise((r) => setTimeout(r, 1000));
  }
  parts.push(
    `--- ${rig.daemon === old ? "daemon" : "new daemon"} (${rig.daemon.describeStatus()}), ` +
      `log tail, counters at the end ---\n${tail(rig.daemon.log(), 40)}`,
  );
  parts.push(`--- guest console, tail ---\n${tail(guest.console().trimEnd(), 40)}`);
  for (const [what, stream] of streams) {
    parts.push(
      `--- ${what} (${stream.helper.describeStatus()}), output ---\n${
        tail(stream.helper.output(), 20)
      }`,
    );
  }
  return parts.join("\n");
}
