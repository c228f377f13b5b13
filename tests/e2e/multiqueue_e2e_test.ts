/**
 * Multiqueue with a real guest: two vCPUs, `queues=2` on QEMU's
 * virtio-net-pci (`mq=on`, `vectors=0` as QEMU 7.2 under TCG needs), the
 * daemon with `--queues 2`. The guest's driver uses both pairs
 * (`ethtool -l` says 2 combined), parallel TCP streams and sha256-checked
 * transfers move data, both pairs carry frames both ways (the daemon's
 * per-queue counters, and the guest's `ethtool -S`), and going down to one
 * pair and back (`ethtool -L eth0 combined 1`, then 2) while a stream runs
 * loses no connection.
 */

import assert from "node:assert/strict";
import { Rig, rigUnavailable } from "./vionet_rig.ts";

const unavailable = rigUnavailable();

/** The daemon's counters of queue `name` (rx0, tx1, ...) from its SIGUSR2 dump. */
async function queueCounters(rig: Rig, name: string): Promise<Record<string, number>> {
  const from = rig.daemon.lines().length;
  rig.daemon.signal("SIGUSR2");
  const line = await rig.daemon.waitFor(new RegExp(` ${name} \\{`), 5000, from);
  return JSON.parse(line.slice(line.indexOf("{")));
}

/** `ethtool -S eth0` in the guest, as name -> value. */
function ethtoolStats(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split("\n")) {
    const m = /^\s*([\w.]+):\s*(\d+)/.exec(line);
    if (m) out.set(m[1], Number(m[2]));
  }
  return out;
}

Deno.test({
  name: "multiqueue e2e: a 2-vCPU guest with queues=2 uses both pairs both ways; " +
    "ethtool -L 1 then 2 under traffic loses no connection",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: () =>
    Rig.run({ daemonArgs: ["--queues", "2"] }, async (rig) => {
      const { guest } = await rig.bootGuest({ cpus: 2, queues: 2 });
      const channels = await guest.run("ethtool -l eth0", 30_000);
      assert.match(
        channels.output,
        /Current hardware settings:[\s\S]*Combined:\s+2/,
        channels.output,
      );

      // Parallel streams both ways, then transfers checked end to end.
      const up = await rig.iperf3(guest, { reverse: false, seconds: 4, parallel: 4 });
      const down = await rig.iperf3(guest, { reverse: true, seconds: 4, parallel: 4 });
      assert.ok(up.bytes > 0 && down.bytes > 0);
      for (const r of [await rig.sendFromGuest(guest, 16), await rig.sendToGuest(guest, 16)]) {
        assert.equal(r.receivedBytes, r.bytes);
        assert.equal(r.receivedSha256, r.sentSha256);
      }

      // Both pairs carried frames both ways, as the daemon and the guest count them.
      for (const q of ["rx0", "rx1", "tx0", "tx1"]) {
        const c = await queueCounters(rig, q);
        assert.ok(c.used > 0, `${q} moved nothing: ${JSON.stringify(c)}`);
      }
      const stats = ethtoolStats((await guest.run("ethtool -S eth0", 30_000)).output);
      for (const k of ["rx_queue_0_packets", "rx_queue_1_packets"]) {
        assert.ok((stats.get(k) ?? 0) > 0, `${k}: ${JSON.stringify([...stats])}`);
      }

      // One pair, then two again, while a stream runs: no connection lost.
      const port = rig.port();
      const server = rig.spawn([
        "iperf3",
        "-s",
        "-1",
        "--forceflush",
        "-B",
        "198.18.0.1",
        "-p",
        String(port),
      ]);
      await server.waitFor(/Server listening/, 10_000);
      const stream = guest.run(`iperf3 -c 198.18.0.1 -p ${port} -t 8 -P 2 -J`, 60_000);
      await new Promise((r) => setTimeout(r, 2000));
      const down1 = await guest.run("ethtool -L eth0 combined 1 && ethtool -l eth0", 30_000);
      assert.equal(down1.status, 0, down1.output);
      await new Promise((r) => setTimeout(r, 2000));
      const up2 = await guest.run("ethtool -L eth0 combined 2 && ethtool -l eth0", 30_000);
      assert.equal(up2.status, 0, up2.output);
      const r = await stream;
      assert.equal(r.status, 0, `the stream broke across ethtool -L: ${r.output.slice(0, 2000)}`);
      const report = JSON.parse(r.output);
      assert.ok(report.end.sum_received.bytes > 0);
      const ping = await guest.run("ping -c 3 -W 2 198.18.0.1", 30_000);
      assert.equal(ping.status, 0, ping.output);
      console.log(
        `multiqueue: iperf3 -P 4 up ${(up.bitsPerSecond / 1e9).toFixed(2)} Gbit/s, down ` +
          `${(down.bitsPerSecond / 1e9).toFixed(2)} Gbit/s; across ethtool -L ` +
          `${(report.end.sum_received.bits_per_second / 1e9).toFixed(2)} Gbit/s`,
      );
    }),
});
