/**
 * contrib/libvirt/vionet-hook under a real libvirtd (the private one of
 * `libvirt.ts`, here in a network namespace of the test's): `virsh create`
 * of a domain whose interface is vhost-user on a socket in the hook's
 * directory makes libvirt run the hook (`prepare begin`), which starts
 * vionet in that namespace and returns once it listens; QEMU, as the
 * unprivileged libvirt-qemu, connects; the guest pings the tap's side.
 * `virsh destroy` makes libvirt run `release end`, and the daemon, its
 * socket and its tap are gone.
 */

import assert from "node:assert/strict";
import {
  attachGuest,
  guestAssets,
  guestKernelCommandLine,
  netKernelArgs,
  openControlChannel,
} from "./guest.ts";
import { libvirtUnavailable, PrivateLibvirtd, processUid, QEMU_USER } from "./libvirt.ts";
import { GUEST_IP, GUEST_MAC, HOST_IP, rigUnavailable } from "./vionet_rig.ts";
import { withNetns } from "../net_ns.ts";
import { ROOT } from "../helpers.ts";

const unavailable = rigUnavailable() ?? await libvirtUnavailable();
const TAP = "vlh0";

function alive(pid: number): boolean {
  try {
    return !/^\d+ \(.*\) Z /.test(Deno.readTextFileSync(`/proc/${pid}/stat`));
  } catch {
    return false;
  }
}

async function until(what: string, fn: () => boolean, ms: number, why: () => string) {
  const end = Date.now() + ms;
  while (!fn()) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms\n${why()}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

Deno.test({
  name: "libvirt runs vionet-hook: prepare begin starts vionet before QEMU (as libvirt-qemu) " +
    "connects, the guest pings through it, and release end after virsh destroy stops it",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: () =>
    withNetns(async (ns) => {
      const hook = await Deno.readTextFile(`${ROOT}contrib/libvirt/vionet-hook`);
      const lv = await PrivateLibvirtd.start({
        netns: ns.name,
        hooks: (dir) => [
          { path: "qemu.d/vionet-hook", content: hook, mode: 0o755 },
          {
            path: "vionet-hook.conf",
            mode: 0o644,
            content: [
              "VIONET_START=direct",
              `VIONET_DIR='${ROOT}'`,
              `VIONET_DENO='${Deno.execPath()}'`,
              `VIONET_SOCKET_DIR='${dir}/vionet'`,
              `VIONET_RUN_DIR='${dir}/hookrun'`,
              "VIONET_SOCKET_GROUP=kvm", // libvirt-qemu's primary group on Debian
              `VIONET_ARGS='--mac ${GUEST_MAC}'`,
              "",
            ].join("\n"),
          },
        ],
      });
      let daemonPid: number | null = null;
      const control = await openControlChannel(true);
      try {
        const name = `vionet-hook-${crypto.randomUUID().slice(0, 8)}`;
        const socketPath = `${lv.dir}/vionet/${TAP}.sock`;
        const daemonLog = () => {
          try {
            return Deno.readTextFileSync(`${lv.dir}/hookrun/${TAP}.log`);
          } catch {
            return "(no daemon log)";
          }
        };
        const assets = guestAssets();
        const guestDir = `${lv.dir}/guest`;
        await Deno.mkdir(guestDir, { mode: 0o755 });
        for (const f of [assets.kernel, assets.initrd]) {
          await Deno.copyFile(f, `${guestDir}/${f.slice(f.lastIndexOf("/") + 1)}`);
        }

        const t0 = Date.now();
        const proc = await lv.startDomain({
          name,
          memoryMiB: 384,
          kernel: `${guestDir}/vmlinuz`,
          initrd: `${guestDir}/initramfs.gz`,
          cmdline: guestKernelCommandLine(netKernelArgs({ ip: `${GUEST_IP}/24`, gw: HOST_IP })),
          consolePath: `${lv.dir}/console.log`,
          controlPath: control.path,
          socketPath,
          mac: GUEST_MAC,
        }).catch(async (e) => {
          throw new Error(
            `${(e as Error).message}\n--- daemon ---\n${daemonLog()}\n` +
              `--- libvirtd ---\n${await lv.log()}`,
          );
        });
        console.log(
          `  virsh create returned after ${Date.now() - t0} ms (the hook waits for vionet)`,
        );
        const guest = attachGuest(proc, control);
        const context = () => `--- daemon ---\n${daemonLog()}\n--- console ---\n${guest.console()}`;
        daemonPid = Number(await Deno.readTextFile(`${lv.dir}/hookrun/${TAP}.pid`));
        assert.ok(alive(daemonPid), "vionet runs");
        assert.match(daemonLog(), /running as user (nobody|vionet)/);
        const qemuUid = Number((await ns.exec(["id", "-u", QEMU_USER])).trim());
        assert.equal(processUid(proc.pid), qemuUid, "QEMU runs as libvirt-qemu");

        await ns.exec(["ip", "addr", "add", `${HOST_IP}/24`, "dev", TAP]);
        await ns.exec(["ip", "link", "set", TAP, "up"]);
        const boot = await guest.waitForBoot(120_000).catch((e) => {
          throw new Error(`${(e as Error).message}\n${context()}`);
        });
        assert.equal(boot.netStatus, "ok", context());
        const r = await guest.run(`ping -c 3 -W 5 ${HOST_IP}`, 30_000);
        assert.equal(r.status, 0, `${r.output}\n${context()}`);

        await lv.virsh("destroy", name);
        await guest.closed;
        await until("vionet stopped by release end", () => !alive(daemonPid!), 20_000, context);
        assert.match(daemonLog(), /SIGTERM: shutting down/);
        assert.throws(() => Deno.lstatSync(socketPath), Deno.errors.NotFound, "socket removed");
        assert.equal((await ns.run(["ip", "link", "show", TAP])).code, 1, "its tap is gone");
      } finally {
        if (daemonPid !== null && alive(daemonPid)) Deno.kill(daemonPid, "SIGKILL");
        await lv.stop();
        try {
          control.listener.close();
        } catch { /* the guest closed it */ }
      }
    }),
});
