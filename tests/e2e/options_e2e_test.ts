/**
 * The options an operator sets, seen from a real Linux guest under QEMU
 * (issue 28): `--mac` is the only source the guest may send from, `--mtu`
 * is the tap's MTU and the most QEMU's `host_mtu=` may give the guest, and
 * the QEMU line the daemon prints says both.
 *
 * One daemon, one guest booted with the MAC and `host_mtu` the daemon asks
 * for, then a second QEMU with a `host_mtu` above `--mtu`, which the daemon
 * refuses. Needs what tests/e2e/vionet_rig.ts needs, and iputils `ping` on
 * the host for its don't-fragment option; skips with the reason otherwise.
 */
import assert from "node:assert/strict";
import { GUEST_IP, GUEST_MAC, HOST_IP, Rig, rigUnavailable } from "./vionet_rig.ts";
import { run } from "../net_ns.ts";

async function hostPingMissing(): Promise<string | undefined> {
  try {
    const r = await run(["ping", "-V"]);
    return /iputils/.test(r.stdout + r.stderr) ? undefined : "needs iputils ping (-M do)";
  } catch {
    return "needs ping from iputils-ping (apt-get install -y iputils-ping)";
  }
}

const skip = rigUnavailable() ?? await hostPingMissing();
if (skip) console.warn(`tests/e2e/options_e2e_test.ts skipped: ${skip}`);

const MTU = 9000;
/** ICMP payload that makes a packet of exactly MTU bytes: IPv4 20, ICMP 8. */
const PING_FITS = MTU - 28;
const SPOOFED_MAC = "52:54:00:99:99:99";

Deno.test({
  name: "vionet e2e, --mac and --mtu 9000: the guest gets MTU 9000 from host_mtu, 9000-byte " +
    "packets pass unfragmented both ways, and frames from another source MAC are dropped and counted",
  ignore: skip !== undefined,
  async fn(t) {
    await Rig.run({ daemonArgs: ["--mac", GUEST_MAC, "--mtu", String(MTU)] }, async (rig) => {
      const d = rig.daemon;
      const withLog = async (fn: () => Promise<void>) => {
        try {
          await fn();
        } catch (e) {
          (e as Error).message += `\n--- daemon log (tail) ---\n${d.lines().slice(-40).join("\n")}`;
          throw e;
        }
      };

      await t.step(
        "the printed QEMU line has the enforced MAC, host_mtu and both reconnect spellings",
        () =>
          withLog(async () => {
            // Printed once set-up is done, just after the socket appears.
            await d.waitFor(/reconnect-ms=1000 in place of reconnect=1/, 15_000);
            const out = d.output();
            assert.match(
              out,
              new RegExp(`-device virtio-net-pci,netdev=net0,mac=${GUEST_MAC},host_mtu=${MTU}`),
            );
            assert.match(out, /memory-backend-memfd,id=mem0,size=<guest RAM>,share=on/);
            assert.match(out, /,reconnect=1 \\/);
            assert.match(out, /QEMU 9\.2 and later: reconnect-ms=1000 in place of reconnect=1/);
            const link = JSON.parse(await rig.exec(["ip", "-j", "link", "show", rig.tap]));
            assert.equal(link[0].mtu, MTU, "the tap's MTU is --mtu");
          }),
      );

      const { guest, boot, logFrom } = await rig.bootGuest({
        mac: GUEST_MAC,
        nicProps: [`host_mtu=${MTU}`],
      });
      assert.equal(boot.netStatus, "ok", guest.console());

      await t.step(
        "QEMU's host_mtu reached the daemon (NET_SET_MTU) and the guest's eth0",
        () =>
          withLog(async () => {
            assert.ok(
              d.lines().slice(logFrom).some((l) => l.includes(`guest MTU ${MTU} (NET_SET_MTU)`)),
              "no NET_SET_MTU in the daemon's log",
            );
            const r = await guest.run("cat /sys/class/net/eth0/mtu", 10_000);
            assert.equal(r.output.trim(), String(MTU));
          }),
      );

      await t.step(
        `${MTU}-byte packets pass with DF set; ${MTU + 1} cannot leave the host`,
        () =>
          withLog(async () => {
            const fits = await rig.exec(
              ["ping", "-c", "3", "-W", "5", "-M", "do", "-s", String(PING_FITS), GUEST_IP],
            ).catch((e) => assert.fail(`DF ping of ${MTU} bytes failed: ${e.message}`));
            assert.match(fits, new RegExp(`${PING_FITS + 8} bytes from ${GUEST_IP}`));
            assert.match(fits, /3 packets transmitted, 3 received/);
            const over = await run([
              "ip",
              "netns",
              "exec",
              rig.netns,
              "ping",
              "-c",
              "1",
              "-W",
              "2",
              "-M",
              "do",
              "-s",
              String(PING_FITS + 1),
              GUEST_IP,
            ]);
            assert.notEqual(over.code, 0, over.stdout);
            assert.match(over.stdout + over.stderr, /message too long, mtu=9000/i);
            const fromGuest = await guest.run(`ping -c 2 -W 5 -s ${PING_FITS} ${HOST_IP}`, 30_000);
            assert.equal(fromGuest.status, 0, fromGuest.output);
            const tx = await d.queueCounters("tx0");
            assert.equal(tx.drop_OVER_MTU ?? 0, 0, JSON.stringify(tx));
          }),
      );

      await t.step(
        "with --mac, bulk TCP (each frame's checked addresses from the bounce arena, the rest " +
          "from guest memory) reaches the host intact",
        () =>
          withLog(async () => {
            const before = await rig.tapCounters();
            const r = await rig.sendFromGuest(guest, 20);
            const after = await rig.tapCounters();
            assert.equal(r.receivedBytes, r.bytes);
            assert.equal(r.receivedSha256, r.sentSha256);
            const avg = (after.rxBytes - before.rxBytes) / (after.rxPackets - before.rxPackets);
            console.log(
              `  20 MiB guest -> host intact, ${avg.toFixed(0)} bytes a frame on the tap`,
            );
          }),
      );

      await t.step(
        "with its own MAC the guest talks; from another source MAC nothing gets out, counted",
        () =>
          withLog(async () => {
            const before = await d.queueCounters("tx0");
            assert.equal(before.drop_SPOOFED_MAC, 0, JSON.stringify(before));
            const ok = await guest.run(`ping -c 2 -W 5 ${HOST_IP}`, 30_000);
            assert.equal(ok.status, 0, ok.output);

            const spoof = await guest.run(
              [
                `ip link set eth0 address ${SPOOFED_MAC} || exit 11`,
                `ip neigh flush dev eth0`,
                `ping -c 3 -W 2 ${HOST_IP}`,
              ].join("\n"),
              30_000,
            );
            assert.notEqual(spoof.status, 11, spoof.output);
            assert.notEqual(spoof.status, 0, `the spoofing guest got through:\n${spoof.output}`);
            const after = await d.queueCounters("tx0");
            assert.ok(
              after.drop_SPOOFED_MAC >= 3,
              `drop_SPOOFED_MAC ${after.drop_SPOOFED_MAC}: ${JSON.stringify(after)}`,
            );
            const neigh = await rig.exec(["ip", "neigh", "show", "dev", rig.tap]);
            assert.doesNotMatch(neigh, new RegExp(SPOOFED_MAC), "the host learnt the spoofed MAC");

            const back = await guest.run(
              `ip link set eth0 address ${GUEST_MAC} && ping -c 2 -W 5 ${HOST_IP}`,
              30_000,
            );
            assert.equal(back.status, 0, back.output);
            console.log(`  drop_SPOOFED_MAC: ${after.drop_SPOOFED_MAC}`);
          }),
      );

      await guest.shutdown();
      await d.waitFor(/front-end disconnected/, 15_000, logFrom);

      await t.step(
        `a QEMU with host_mtu=${MTU + 1}, above --mtu, is refused with a clear error`,
        () =>
          withLog(async () => {
            const from = d.lines().length;
            const second = await rig.startGuest({
              mac: GUEST_MAC,
              nicProps: [`host_mtu=${MTU + 1}`],
            });
            try {
              const line = await d.waitFor(/NET_SET_MTU \(20\) refused/, 120_000, from);
              assert.match(
                line,
                new RegExp(
                  `guest MTU ${
                    MTU + 1
                  } \\(QEMU: host_mtu\\), above tap ${rig.tap}'s MTU \\(--mtu\\), ${MTU}; ` +
                    `give the VMM host_mtu=${MTU} or less, or start vionet with --mtu ${MTU + 1}`,
                ),
              );
              // QEMU 7.2 (hw/net/virtio-net.c) then does not start the device.
              const end = Date.now() + 10_000;
              while (!/MTU not supported by the backend/.test(second.console())) {
                if (Date.now() > end) assert.fail(`QEMU said nothing:\n${second.console()}`);
                await new Promise((r) => setTimeout(r, 100));
              }
              assert.match(
                second.console(),
                new RegExp(`${MTU + 1}Bytes MTU not supported by the backend`),
              );
              assert.ok(d.running, "the daemon keeps serving");
            } finally {
              second.kill();
              await second.closed;
            }
          }),
      );
    });
  },
});
