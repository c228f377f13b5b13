/**
 * The bench's migration part: the same guest migrated between two hosts on
 * one bridge (tests/e2e/migration_rig.ts) with vionet (two daemons) and
 * with QEMU's own tap backend (`-netdev tap,vhost=off`, two taps on the same
 * bridge), in the same run, alternating. Per migration: the downtime QEMU
 * reports, and the longest stall each of two paced TCP streams running
 * across the switch-over saw (host -> guest measured in the guest, guest ->
 * host at the receiver), how long after the VM resumed on the destination
 * the bridge learned the guest's new port, and the source's stop of the VM
 * from QEMU's trace (`qemu_trace.ts`): the part of the downtime the
 * backend's stop takes.
 *
 * @module
 */

import { MIGRATING_MAC, MigrationRig, type Vm } from "../tests/e2e/migration_rig.ts";
import { resumedUs, sourceStopMs } from "./qemu_trace.ts";

export type MigrationBackend = "vionet" | "qemu";

/** One migration. */
export interface MigrationSample {
  backend: MigrationBackend;
  rep: number;
  status: string;
  /** The downtime QEMU reports (query-migrate `downtime`), ms. */
  downtimeMs: number;
  /**
   * Of it, the source's stop of the VM (its devices, vhost's rings among
   * them), from QEMU's trace, ms; absent in older runs.
   */
  stopMs?: number;
  totalMs: number;
  /** The longest time each stream's receiver got nothing, ms. */
  stallToGuestMs: number;
  stallFromGuestMs: number;
  /**
   * From the VM resuming on the destination (its QEMU's trace) to the first
   * frame from the guest's MAC that the backend puts into the bridge through
   * the new tap, which the bridge learns the port from (a capture's kernel
   * timestamp), ms: the RARP of QEMU's announcement or vionet's, or the
   * guest's own first frame. Runs before 2026-12-08 polled `bridge fdb
   * show` from QEMU's `completed` on, which measured the poll's own latency
   * on a busy machine more than the bridge.
   */
  bridgeMs: number;
  /** Both streams arrived intact (sha256). */
  intact: boolean;
  error?: string;
}

export interface MigrationOptions {
  log: (s: string) => void;
  /** MiB each stream carries, and its pace (MiB/s). */
  mib?: number;
  rate?: number;
  /** Where each vionet migration's two daemon logs are written (`--daemon-logs`), if anywhere. */
  daemonLogs?: string;
}

/** One migration with `backend`, streams both ways across it. */
export async function measureMigration(
  backend: MigrationBackend,
  rep: number,
  o: MigrationOptions,
): Promise<MigrationSample> {
  // --mac, as an operator gives it (libvirt's MAC): QEMU's tap backend knows
  // the MAC too, and announces the guest with it on every migration.
  const rig = await MigrationRig.create({
    qemuTapHosts: 2,
    daemonArgs: ["--mac", MIGRATING_MAC],
    trace: true,
  });
  const [from, to] = backend === "vionet" ? [0, 1] : [2, 3];
  const base: MigrationSample = {
    backend,
    rep,
    status: "not started",
    downtimeMs: NaN,
    stopMs: NaN,
    totalMs: NaN,
    stallToGuestMs: NaN,
    stallFromGuestMs: NaN,
    bridgeMs: NaN,
    intact: false,
  };
  try {
    const a: Vm = await rig.startVm(from);
    const b = await rig.startVm(to, true);
    const mib = o.mib ?? 36;
    const rate = o.rate ?? 6;
    const up = await rig.streamFromGuest(a, mib, rate);
    const down = await rig.streamToGuest(a, mib, rate);
    const learnt = await firstFrameInto(rig, rig.taps[to], MIGRATING_MAC).catch((e) => {
      o.log(`migration ${backend} rep ${rep}: no capture on the new tap: ${(e as Error).message}`);
      return () => Promise.resolve(NaN);
    });
    await new Promise((r) => setTimeout(r, 1000)); // both streams under way
    const m = await rig.migrate(a, b);
    const learntUs = await learnt(5000).catch(() => NaN);
    await rig.kill(a);
    const stopMs = a.tracePath === undefined
      ? NaN
      : sourceStopMs(await Deno.readTextFile(a.tracePath).catch(() => ""));
    const toGuest = await down.finish(b.guest);
    const fromGuest = await up.finish(b.guest);
    const resumed = b.tracePath === undefined
      ? NaN
      : resumedUs(await Deno.readTextFile(b.tracePath).catch(() => ""));
    const bridgeMs = (learntUs - resumed) / 1000;
    const intact = toGuest.receivedSha256 === toGuest.sentSha256 &&
      fromGuest.receivedSha256 === fromGuest.sentSha256;
    return {
      ...base,
      status: m.status,
      downtimeMs: m.downtimeMs,
      stopMs,
      totalMs: m.totalMs,
      stallToGuestMs: toGuest.longestStallMs,
      stallFromGuestMs: fromGuest.longestStallMs,
      bridgeMs,
      intact,
    };
  } catch (e) {
    o.log(`migration ${backend} rep ${rep} failed: ${(e as Error).message}`);
    return { ...base, status: "error", error: (e as Error).message.slice(0, 2000) };
  } finally {
    if (o.daemonLogs !== undefined && backend === "vionet") {
      await Deno.mkdir(o.daemonLogs, { recursive: true });
      await Deno.writeTextFile(`${o.daemonLogs}/migration-${rep}.log`, rig.logs());
    }
    await rig.close();
  }
}

/**
 * Captures the first frame from `mac` that the backend puts into the bridge
 * through `tap` (the tap's incoming direction, `tcpdump` in the rig's
 * namespace, ended with the rig); resolves once the capture runs, with a
 * function that waits for that frame and gives its kernel timestamp, µs
 * since the epoch (QEMU's trace uses the same clock).
 */
async function firstFrameInto(
  rig: MigrationRig,
  tap: string,
  mac: string,
): Promise<(timeoutMs: number) => Promise<number>> {
  const p = rig.spawn([
    "tcpdump",
    "-i",
    tap,
    "-Q",
    "in",
    "-nn",
    "-tt",
    "-l",
    "-c",
    "1",
    "ether",
    "src",
    mac,
  ]);
  await p.waitFor(/listening on/, 10_000);
  return async (timeoutMs: number) => {
    const line = await p.waitFor(/^\d+\.\d{6} /, timeoutMs);
    const [s, us] = line.split(" ")[0].split(".");
    return Number(s) * 1e6 + Number(us);
  };
}
