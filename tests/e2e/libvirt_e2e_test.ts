/**
 * The README's libvirt recipe, for real (issue 28): a private libvirtd
 * (tests/e2e/libvirt.ts) runs QEMU as `libvirt-qemu`, libvirt's default,
 * with `<interface type='vhostuser'>` on the socket of a vionet started
 * with `--socket-group libvirt-qemu`, in a directory vionet creates. The
 * guest gets a link and pings the tap's side. (That the same user cannot
 * connect without the option is checked in
 * tests/parent/control/daemon_options_test.ts.)
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
import { GUEST_IP, GUEST_MAC, HOST_IP, Rig, rigUnavailable } from "./vionet_rig.ts";

const skip = rigUnavailable() ?? await libvirtUnavailable();
if (skip) console.warn(`tests/e2e/libvirt_e2e_test.ts skipped: ${skip}`);

Deno.test({
  name: "libvirt running QEMU as libvirt-qemu attaches a guest to vionet --socket-group " +
    "libvirt-qemu: link, ping; destroying the domain frees the daemon for the next",
  ignore: skip !== undefined,
  async fn(t) {
    const libvirtd = await PrivateLibvirtd.start();
    try {
      await Rig.run(
        { daemonArgs: ["--socket-group", QEMU_USER, "--mac", GUEST_MAC] },
        async (rig) => {
          const assets = guestAssets();
          const guestDir = `${libvirtd.dir}/guest`;
          await Deno.mkdir(guestDir, { mode: 0o755 });
          for (const f of [assets.kernel, assets.initrd]) {
            await Deno.copyFile(f, `${guestDir}/${f.slice(f.lastIndexOf("/") + 1)}`);
          }
          const name = `vionet-test-${crypto.randomUUID().slice(0, 8)}`;
          const control = await openControlChannel(true);
          const from = rig.daemon.lines().length;
          const proc = await libvirtd.startDomain({
            name,
            memoryMiB: 384,
            kernel: `${guestDir}/vmlinuz`,
            initrd: `${guestDir}/initramfs.gz`,
            cmdline: guestKernelCommandLine(netKernelArgs({ ip: `${GUEST_IP}/24`, gw: HOST_IP })),
            consolePath: `${libvirtd.dir}/console.log`,
            controlPath: control.path,
            socketPath: rig.socketPath,
            mac: GUEST_MAC,
          });
          const guest = attachGuest(proc, control);
          const context = async () =>
            `\n--- daemon log ---\n${rig.daemon.lines().slice(from).join("\n")}` +
            `\n--- QEMU log ---\n${await libvirtd.qemuLog(
              name,
            )}\n--- console ---\n${guest.console()}`;
          try {
            await t.step("QEMU runs as libvirt-qemu, with the recipe's reconnect", async () => {
              const uid = new TextDecoder().decode(
                (await new Deno.Command("id", { args: ["-u", QEMU_USER] }).output()).stdout,
              ).trim();
              assert.equal(processUid(proc.pid), Number(uid));
              assert.match(
                await libvirtd.qemuLog(name),
                new RegExp(`-chardev socket,id=charnet0,path=${rig.socketPath},reconnect=1`),
              );
            });
            const boot = await guest.waitForBoot(120_000).catch(async (e) => {
              throw new Error(`${(e as Error).message}${await context()}`);
            });
            await t.step("the guest has a link and pings the tap's side", async () => {
              assert.equal(boot.netStatus, "ok", await context());
              assert.ok(rig.daemon.negotiated(from), `no negotiation${await context()}`);
              const r = await guest.run(`ping -c 3 -W 5 ${HOST_IP}`, 30_000);
              assert.equal(r.status, 0, `${r.output}${await context()}`);
            });
          } finally {
            guest.kill(); // virsh destroy
            await guest.closed;
          }
          await t.step("destroying the domain disconnects it; the daemon goes on", async () => {
            await rig.daemon.waitFor(/front-end disconnected/, 15_000, from);
            assert.ok(rig.daemon.running);
          });
        },
      );
    } finally {
      await libvirtd.stop();
    }
  },
});
