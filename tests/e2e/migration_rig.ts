/**
 * Two "hosts" in one network namespace for live-migration tests: a bridge
 * (br0, 198.18.0.1/24, where the test's TCP peers run) with one tap per
 * host, each served by its own vionet daemon; QEMUs boot the test guest on
 * one host's daemon and migrate it (QMP, over a unix socket) to a fresh
 * QEMU started with `-incoming` on the other's. Also used by the bench's
 * migration part, against QEMU's own tap backend on the same bridge.
 *
 * Streams that span a switch-over are paced (so they last), and record
 * when data arrived, for the longest stall: host -> guest, the guest
 * samples the size of the file it receives into every 10 ms (busybox
 * `usleep`, /proc/uptime); guest -> host, the receiver in the namespace
 * notes each chunk's arrival.
 *
 * Cleanup is by PID and complete even after a failure: every QEMU and
 * helper is killed, the daemons stopped, the namespace and temporary
 * directory removed.
 *
 * @module
 */

import { bootGuest, type BootInfo, type Guest, guestAssets, netKernelArgs } from "./guest.ts";
import { NetnsProcess, startDaemon, vhostUserNetdevArgs, type VionetDaemon } from "./vionet_rig.ts";
import { Qmp } from "./qmp.ts";
import { exec as sh } from "../net_ns.ts";
import { type PacedStream, streamFromGuest, streamToGuest } from "./paced_streams.ts";

export type { PacedStream, StreamResult } from "./paced_streams.ts";

export const BRIDGE_IP = "198.18.0.1";
export const GUEST_IP = "198.18.0.2";
export const MIGRATING_MAC = "52:54:00:12:34:56";

/** One QEMU running (or waiting for) the migrating guest. */
export interface Vm {
  guest: Guest;
  qmp: Qmp;
  /** Index of the host (daemon/tap) its NIC is on; -1 for QEMU's own tap backend. */
  host: number;
  boot: BootInfo;
  /** Where a migration to it goes, when it was started to receive one. */
  incomingUri?: string;
  /** The file QEMU writes its trace to (see {@link qemuTraceArgs}), if it traces. */
  tracePath?: string;
}

/** What QEMU's query-migrate said once the migration ended. */
export interface MigrationResult {
  status: string;
  /** Downtime QEMU reports (ms). */
  downtimeMs: number;
  totalMs: number;
  /** Date.now() when the test saw it completed. */
  endedAt: number;
}

export interface MigrationRigOptions {
  /** Options for both daemons (e.g. ["--offload", "off"]). */
  daemonArgs?: string[];
  /** More virtio-net-pci properties (the same on both sides, as migration requires). */
  nicProps?: readonly string[];
  memoryMiB?: number;
  /** Hosts served by vionet (default 2); `qemuTapHosts` more taps for QEMU's own backend. */
  qemuTapHosts?: number;
  /**
   * Each QEMU writes its switch-over trace (see {@link qemuTraceArgs}) into
   * the rig's directory, for {@link Vm.tracePath}; with
   * VIONET_QEMU_TRACE_DIR set, there instead, and kept.
   */
  trace?: boolean;
}

let nextRig = 0;

/**
 * QEMU's trace of a migration's switch-over, written to `path`: the run
 * state, the completion, vhost's start and stop, every vhost-user message,
 * with microsecond timestamps, to see where a downtime goes
 * (`bench/qemu_trace.ts` reads it).
 */
function qemuTraceArgs(path: string): string[] {
  const events = [
    "runstate_set",
    "vm_state_notify",
    "migration_completion_vm_stop",
    "savevm_state_complete_precopy",
    "migrate_set_state",
    "vhost_dev_start",
    "vhost_dev_stop",
    "vhost_user_write",
    "vhost_user_read",
    "qemu_loadvm_state_post_main",
    "migration_bitmap_sync_start",
    "migration_bitmap_sync_end",
    "savevm_section_start",
    "savevm_section_end",
  ];
  return [
    ...events.flatMap((e) => ["-trace", `enable=${e}`]),
    ...["-msg", "timestamp=on", "-D", path],
  ];
}

export class MigrationRig {
  readonly netns: string;
  readonly tmpDir: string;
  readonly daemons: VionetDaemon[] = [];
  /** Tap names: one per vionet host, then the ones for QEMU's own backend. */
  readonly taps: string[] = [];
  readonly #vms: Vm[] = [];
  readonly #procs: NetnsProcess[] = [];
  readonly #opts: MigrationRigOptions;
  #nextPort = 5300;
  #nextVm = 0;

  private constructor(netns: string, tmpDir: string, opts: MigrationRigOptions) {
    this.netns = netns;
    this.tmpDir = tmpDir;
    this.#opts = opts;
  }

  static async create(opts: MigrationRigOptions = {}): Promise<MigrationRig> {
    const netns = `vionet-mig-${crypto.randomUUID().slice(0, 8)}`;
    await sh(["ip", "netns", "add", netns]);
    const tmpDir = await Deno.makeTempDir({ prefix: "vionet-mig-" });
    const rig = new MigrationRig(netns, tmpDir, opts);
    try {
      await rig.exec(["ip", "link", "set", "lo", "up"]);
      await rig.exec(["ip", "link", "add", "br0", "type", "bridge"]);
      await rig.exec(["ip", "addr", "add", `${BRIDGE_IP}/24`, "dev", "br0"]);
      await rig.exec(["ip", "link", "set", "br0", "up"]);
      for (let i = 0; i < 2; i++) {
        const tap = `vmig${nextRig}h${i}`;
        const daemon = await startDaemon({
          netns,
          tap,
          socketPath: `${tmpDir}/host${i}.sock`,
          extraArgs: opts.daemonArgs,
        });
        rig.daemons.push(daemon);
        rig.taps.push(tap);
        await rig.#enslave(tap);
      }
      for (let i = 0; i < (opts.qemuTapHosts ?? 0); i++) {
        const tap = `vmig${nextRig}q${i}`;
        await rig.exec(["ip", "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
        rig.taps.push(tap);
        await rig.#enslave(tap);
      }
      nextRig++;
      return rig;
    } catch (e) {
      await rig.close();
      throw e;
    }
  }

  async #enslave(tap: string): Promise<void> {
    await this.exec(["ip", "link", "set", tap, "master", "br0"]);
    await this.exec(["ip", "link", "set", tap, "up"]);
  }

  async exec(argv: string[]): Promise<string> {
    return await sh(["ip", "netns", "exec", this.netns, ...argv]);
  }

  spawn(argv: string[]): NetnsProcess {
    const p = new NetnsProcess(this.netns, argv);
    this.#procs.push(p);
    return p;
  }

  port(): number {
    return this.#nextPort++;
  }

  /**
   * Starts a QEMU for the guest on `host`: booting it, or with `incoming`
   * waiting for a migration. Host indices past the vionet hosts are taps of
   * QEMU's own backend (`-netdev tap,vhost=off`).
   */
  async startVm(host: number, incoming = false): Promise<Vm> {
    const n = this.#nextVm++;
    const qmpPath = `${this.tmpDir}/qmp${n}.sock`;
    const assets = guestAssets();
    const nicProps = this.#opts.nicProps ?? [];
    const netdevArgs = host < this.daemons.length
      ? vhostUserNetdevArgs(`${this.tmpDir}/host${host}.sock`, { mac: MIGRATING_MAC, nicProps })
      : [
        "-netdev",
        `tap,id=n0,ifname=${this.taps[host]},script=no,downscript=no,vhost=off`,
        "-device",
        [
          "virtio-net-pci",
          "netdev=n0",
          "vectors=0",
          "romfile=",
          `mac=${MIGRATING_MAC}`,
          ...nicProps,
        ]
          .join(","),
      ];
    const keptTraces = Deno.env.get("VIONET_QEMU_TRACE_DIR");
    const tracePath = keptTraces
      ? `${keptTraces}/${this.netns}-vm${n}.trace`
      : this.#opts.trace
      ? `${this.tmpDir}/vm${n}.trace`
      : undefined;
    const guest = await bootGuest({
      kernel: assets.kernel,
      initrd: assets.initrd,
      netns: this.netns,
      memoryMiB: this.#opts.memoryMiB ?? 256,
      netdevArgs,
      kernelArgs: netKernelArgs({ ip: `${GUEST_IP}/24`, gw: BRIDGE_IP }),
      incoming: incoming ? `unix:${this.tmpDir}/migrate${n}.sock` : undefined,
      extraArgs: [
        "-qmp",
        `unix:${qmpPath},server=on,wait=off`,
        ...(tracePath === undefined ? [] : qemuTraceArgs(tracePath)),
      ],
    });
    const incomingUri = incoming ? `unix:${this.tmpDir}/migrate${n}.sock` : undefined;
    const vm: Vm = {
      guest,
      host,
      qmp: null as unknown as Qmp,
      boot: null as unknown as BootInfo,
      incomingUri,
      tracePath,
    };
    this.#vms.push(vm);
    try {
      vm.qmp = await Qmp.connect(qmpPath);
      vm.boot = await guest.waitForBoot(120_000);
    } catch (e) {
      guest.kill();
      throw new Error(`${(e as Error).message}\n${this.logs()}`);
    }
    return vm;
  }

  /** Migrates `from` to `to` (started with incoming); resolves when QEMU says it ended. */
  async migrate(from: Vm, to: Vm, timeoutMs = 120_000): Promise<MigrationResult> {
    if (to.incomingUri === undefined) throw new Error("the destination was not started incoming");
    await from.qmp.execute("migrate", { uri: to.incomingUri });
    return await this.waitMigration(from, timeoutMs);
  }

  /** Polls query-migrate on the source until the migration is no longer under way. */
  async waitMigration(from: Vm, timeoutMs = 120_000): Promise<MigrationResult> {
    const end = Date.now() + timeoutMs;
    let endedAt: number | null = null;
    for (;;) {
      const st = await from.qmp.execute<Record<string, unknown>>("query-migrate");
      const status = String(st.status);
      const underWay = ["setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"];
      if (!underWay.includes(status)) {
        endedAt ??= Date.now();
        // QEMU 7.2 says "completed" a moment before it computes the times
        // (migration_calculate_complete): a query in between reads 0 for both.
        if (status !== "completed" || Number(st["total-time"] ?? 0) > 0) {
          return {
            status,
            downtimeMs: Number(st.downtime ?? NaN),
            totalMs: Number(st["total-time"] ?? NaN),
            endedAt,
          };
        }
      }
      if (Date.now() > end) throw new Error(`migration still ${status} after ${timeoutMs} ms`);
      await sleep(20);
    }
  }

  /** The tap the bridge forwards `mac` to now, or null. */
  async fdbTap(mac = MIGRATING_MAC): Promise<string | null> {
    const out = await this.exec(["bridge", "fdb", "show", "br", "br0"]);
    const line = out.split("\n").find((l) => l.startsWith(`${mac} dev `));
    return line?.split(" ")[2] ?? null;
  }

  /** Waits until the bridge forwards `mac` to `tap`; returns how long after `since` (ms). */
  async fdbMovesTo(tap: string, since: number, timeoutMs = 5000): Promise<number> {
    const end = since + timeoutMs;
    for (;;) {
      if (await this.fdbTap() === tap) return Date.now() - since;
      if (Date.now() > end) {
        throw new Error(`the bridge does not forward to ${tap} (it says ${await this.fdbTap()})`);
      }
      await sleep(20);
    }
  }

  /** A host -> guest paced stream on `vm` (`paced_streams.ts`). */
  streamToGuest(vm: Vm, mib: number, mibPerSecond: number): Promise<PacedStream> {
    return streamToGuest(
      (argv) => this.spawn(argv),
      vm.guest,
      BRIDGE_IP,
      this.port(),
      mib,
      mibPerSecond,
    );
  }

  /** A guest -> host paced stream from `vm` (`paced_streams.ts`). */
  streamFromGuest(vm: Vm, mib: number, mibPerSecond: number): Promise<PacedStream> {
    return streamFromGuest(
      (argv) => this.spawn(argv),
      vm.guest,
      BRIDGE_IP,
      this.port(),
      mib,
      mibPerSecond,
    );
  }

  /** The daemons' logs, for failure messages. */
  logs(): string {
    return this.daemons.map((d, i) => `--- daemon ${i} ---\n${d.log()}`).join("\n");
  }

  /** Kills a QEMU (by PID) and waits for it. */
  async kill(vm: Vm): Promise<void> {
    vm.guest.kill();
    await vm.qmp.close().catch(() => {});
    await vm.guest.closed;
  }

  async close(): Promise<void> {
    for (const vm of this.#vms) vm.guest.kill();
    await Promise.allSettled(this.#vms.map((vm) => vm.qmp?.close()));
    await Promise.allSettled(this.#vms.map((vm) => vm.guest.closed));
    await Promise.allSettled(this.#procs.map((p) => p.kill()));
    await Promise.allSettled(this.daemons.map((d) => d.stop(10_000)));
    await sh(["ip", "netns", "del", this.netns]).catch(() => {});
    await Deno.remove(this.tmpDir, { recursive: true }).catch(() => {});
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
