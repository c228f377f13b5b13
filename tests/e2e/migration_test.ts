/**
 * Live migration of a real guest between two vionet daemons (two "hosts"
 * on one bridge, tests/e2e/migration_rig.ts), with QEMU doing what it does
 * in production: a TCP stream of known content runs host -> guest across a
 * migration from host 0 to host 1, then guest -> host across a migration
 * back to a fresh QEMU on host 0 (whose daemon then serves its second
 * front-end). Both streams arrive intact (sha256), QEMU reports
 * `completed`, the bridge forwards the guest's MAC to the new host's tap
 * right after the switch-over, and both daemons stay up. With offloads on
 * and no `--mac` the guest announces itself (GUEST_ANNOUNCE, which vionet
 * offers; QEMU 7.2 then sends the back-end no SEND_RARP) and the bridge
 * learns from it; with `--offload off` and `--mac` the destination daemon
 * announces the guest itself at the first SET_FEATURES of its connection
 * (as the VM resumes there), and the NIC has guest_announce=off, so QEMU
 * asks for a RARP (VHOST_USER_SEND_RARP) too.
 *
 * And the failures an operator meets: a migration cancelled half-way, and
 * one whose destination dies, leave the source serving, logging off.
 */

import assert from "node:assert/strict";
import { rigUnavailable } from "./vionet_rig.ts";
import { MIGRATING_MAC, MigrationRig, type StreamResult } from "./migration_rig.ts";

const unavailable = rigUnavailable();
const MIB = 24;
const RATE = 6; // MiB/s: the streams last ~4 s, longer than a migration here

function assertIntact(what: string, r: StreamResult): void {
  assert.equal(r.receivedBytes, r.sentBytes, `${what}: bytes`);
  assert.equal(r.receivedSha256, r.sentSha256, `${what}: sha256`);
}

for (const mode of ["auto", "off"] as const) {
  Deno.test({
    name: `live migration, offloads ${mode}: TCP streams survive a migration there and back; ` +
      "the bridge follows the guest; both daemons stay up",
    ignore: unavailable !== undefined,
    sanitizeOps: false,
    sanitizeResources: false,
    fn: async () => {
      const rig = await MigrationRig.create({
        daemonArgs: mode === "off" ? ["--offload", "off", "--mac", MIGRATING_MAC] : [],
        nicProps: mode === "off" ? ["guest_announce=off"] : [],
      });
      try {
        const a = await rig.startVm(0);
        const ping = await a.guest.run(`ping -c 2 -W 2 198.18.0.1`, 30_000);
        assert.equal(ping.status, 0, ping.output);

        // Host 0 -> host 1 while a stream runs host -> guest.
        const down = await rig.streamToGuest(a, MIB, RATE);
        const b = await rig.startVm(1, true);
        await new Promise((r) => setTimeout(r, 500)); // let the stream get going
        const there = await rig.migrate(a, b);
        assert.equal(there.status, "completed", rig.logs());
        const movedMs = await rig.fdbMovesTo(rig.taps[1], there.endedAt);
        await rig.kill(a);
        const toGuest = await down.finish(b.guest);
        assertIntact("host -> guest", toGuest);

        // Host 1 -> host 0 (a fresh QEMU: daemon 0's second front-end) while
        // a stream runs guest -> host.
        const up = await rig.streamFromGuest(b, MIB, RATE);
        const c = await rig.startVm(0, true);
        await new Promise((r) => setTimeout(r, 500));
        const back = await rig.migrate(b, c);
        assert.equal(back.status, "completed", rig.logs());
        const backMs = await rig.fdbMovesTo(rig.taps[0], back.endedAt);
        await rig.kill(b);
        const fromGuest = await up.finish(c.guest);
        assertIntact("guest -> host", fromGuest);

        for (const d of rig.daemons) assert.ok(d.running, `a daemon exited:\n${rig.logs()}`);
        const log1 = rig.daemons[1].log();
        if (mode === "off") {
          assert.match(
            log1,
            /sent a RARP for 52:54:00:12:34:56 \(the guest's NIC starts on this port/,
            "the destination announced the guest as the VM resumed",
          );
          assert.match(
            log1,
            /sent a RARP for 52:54:00:12:34:56 \(SEND_RARP/,
            "QEMU asked for a RARP",
          );
        } else {
          assert.match(log1, /negotiated .*GUEST_ANNOUNCE/, "the guest announces itself");
          assert.match(log1, /without --mac vionet cannot announce it/);
          assert.doesNotMatch(log1, /sent a RARP/, "QEMU sends no SEND_RARP with GUEST_ANNOUNCE");
        }
        assert.match(rig.daemons[0].log(), /dirty logging on/);
        console.log(
          `offloads ${mode}: there: downtime ${there.downtimeMs} ms, bridge moved after ` +
            `${movedMs} ms, host -> guest longest stall ${toGuest.longestStallMs.toFixed(0)} ms; ` +
            `back: downtime ${back.downtimeMs} ms, bridge moved after ${backMs} ms, ` +
            `guest -> host longest stall ${fromGuest.longestStallMs.toFixed(0)} ms`,
        );
      } finally {
        await rig.close();
      }
    },
  });
}

Deno.test({
  name: "live migration cancelled half-way, or to a destination that dies: the source keeps " +
    "serving, logging off, and the daemons stay up",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: async () => {
    const rig = await MigrationRig.create();
    try {
      const a = await rig.startVm(0);
      // Slow enough that the migration is still under way when we step in.
      await a.qmp.execute("migrate-set-parameters", { "max-bandwidth": 8 * 1024 * 1024 });

      const b = await rig.startVm(1, true);
      await a.qmp.execute("migrate", { uri: b.incomingUri });
      await rig.daemons[0].waitFor(/dirty logging on/, 30_000);
      await a.qmp.execute("migrate_cancel");
      const cancelled = await rig.waitMigration(a);
      assert.equal(cancelled.status, "cancelled");
      await rig.daemons[0].waitFor(/dirty logging off/, 10_000);
      let ping = await a.guest.run("ping -c 3 -W 2 198.18.0.1", 30_000);
      assert.equal(ping.status, 0, `the source stopped serving after a cancel:\n${ping.output}`);
      await rig.kill(b);

      const c = await rig.startVm(1, true);
      const from = rig.daemons[0].lines().length;
      await a.qmp.execute("migrate", { uri: c.incomingUri });
      await rig.daemons[0].waitFor(/dirty logging on/, 30_000, from);
      await rig.kill(c); // the destination dies
      const failed = await rig.waitMigration(a);
      assert.equal(failed.status, "failed");
      await rig.daemons[0].waitFor(/dirty logging off/, 10_000, from);
      ping = await a.guest.run("ping -c 3 -W 2 198.18.0.1", 30_000);
      assert.equal(ping.status, 0, `the source stopped serving after a failure:\n${ping.output}`);
      for (const d of rig.daemons) assert.ok(d.running, `a daemon exited:\n${rig.logs()}`);
    } finally {
      await rig.close();
    }
  },
});
