/**
 * vionet end to end: an unmodified Linux guest under QEMU, with nothing but
 * `-netdev vhost-user` on the daemon's socket, in a private network namespace
 * (issue 4, item 4). Each test starts its own daemon (`deno run` with the start
 * task's flags) and namespace through tests/e2e/vionet_rig.ts:
 *
 * - offloads on (the daemon's defaults): link, ping, ethtool in the guest and
 *   on the tap, 200 MB each way with sha256, iperf3 each way; then, on the same
 *   daemon, the guest reloads virtio_net and traffic resumes; then QEMU is
 *   SIGKILLed mid-transfer and a second VM on the same socket moves data;
 * - offloads off in the guest (QEMU's virtio-net-pci properties);
 * - `--offload off` in the daemon with the guest's offloads on (the device
 *   checksums and segments in software).
 *
 * Needs root, QEMU, iperf3, ethtool and the guest built by
 * scripts/build_guest.sh; skips with the reason otherwise. Sizes are for TCG
 * (about 0.7-0.9 Gbit/s; sha256sum in the guest about 20-40 MB/s).
 */
import assert from "node:assert/strict";
import type { Guest } from "./guest.ts";
import {
  GUEST_IP,
  HOST_IP,
  NIC_OFFLOADS_OFF,
  parseEthtoolFeatures,
  Rig,
  rigUnavailable,
  type TransferResult,
} from "./vionet_rig.ts";
import { assertSandboxed } from "../helpers.ts";
import { resolveUser } from "../../parent/host/users.ts";

const skip = rigUnavailable();
if (skip) console.warn(`tests/e2e/vionet_e2e_test.ts skipped: ${skip}`);

/** Guest RAM: the 200 MB transfers go through a tmpfs file. */
const GUEST_MIB = 768;
const BIG_MIB = 200;
const SMALL_MIB = 50;

/** The largest frame without offloads: MTU 1500 plus the Ethernet header. */
const MAX_FRAME = 1514;

/** The TUNSCAP-controlled features of a tap, as `ethtool -k` names them. */
const TAP_OFFLOADS = ["tx-checksum-ip-generic", "tx-tcp-segmentation", "tx-tcp6-segmentation"];

async function guestFeatures(guest: Guest): Promise<Map<string, string>> {
  const r = await guest.run("ethtool -k eth0", 20_000);
  assert.equal(r.status, 0, r.output);
  return parseEthtoolFeatures(r.output);
}

function assertIntact(r: TransferResult, what: string): void {
  assert.equal(r.receivedBytes, r.bytes, `${what}: ${r.receivedBytes} of ${r.bytes} bytes arrived`);
  assert.match(r.sentSha256, /^[0-9a-f]{64}$/, `${what}: sender's sha256`);
  assert.equal(r.receivedSha256, r.sentSha256, `${what}: sha256 differs`);
  const mbit = (r.bytes * 8 / 1e6) / (r.ms / 1000);
  console.log(
    `  ${what}: ${r.bytes / 2 ** 20} MiB intact in ${r.ms} ms (${mbit.toFixed(0)} Mbit/s)`,
  );
}

/** Runs `fn` and returns the tap's average frame size each way while it ran. */
async function framesDuring<T>(
  rig: Rig,
  fn: () => Promise<T>,
): Promise<{ result: T; rxAvg: number; txAvg: number }> {
  const a = await rig.tapCounters();
  const result = await fn();
  const b = await rig.tapCounters();
  const avg = (bytes: number, packets: number) => packets > 0 ? Math.round(bytes / packets) : 0;
  return {
    result,
    rxAvg: avg(b.rxBytes - a.rxBytes, b.rxPackets - a.rxPackets),
    txAvg: avg(b.txBytes - a.txBytes, b.txPackets - a.txPackets),
  };
}

async function ping(guest: Guest, count = 3): Promise<void> {
  const r = await guest.run(`ping -c ${count} -W 5 ${HOST_IP}`, 30_000);
  assert.equal(r.status, 0, r.output);
  assert.match(r.output, new RegExp(`${count} packets transmitted, ${count} packets received`));
}

/** Runs `fn`; on failure adds the daemon's log to the error. */
async function withLog(rig: Rig, fn: () => Promise<void>): Promise<void> {
  try {
    await fn();
  } catch (e) {
    const err = e as Error;
    err.message += `\n--- daemon log (tail) ---\n${rig.daemon.lines().slice(-40).join("\n")}`;
    throw err;
  }
}

/** With no GSO on the tap the poller batched its reads (SIGUSR2's datapath counters). */
async function assertBatchedReads(rig: Rig): Promise<void> {
  const c = await rig.daemon.datapathCounters();
  assert.ok(c, "the data path runs");
  assert.equal(c.pollerEngine, "io_uring");
  assert.ok(
    (c.pollerBatches as number) > 0,
    `no batch of reads: ${JSON.stringify(c)} (Linux's mergeable buffers take MTU frames)`,
  );
  assert.equal(c.pollerTooBig, 0);
  console.log(`  poller: ${c.pollerBatches} batches, ${c.pollerUnused} chains given back`);
}

Deno.test({
  name: "vionet e2e, offloads on: link, ping, ethtool, 200 MB each way, iperf3, " +
    "driver reload, QEMU killed mid-transfer then a second VM",
  ignore: skip !== undefined,
  async fn(t) {
    await Rig.run({}, async (rig) => {
      const first = await rig.bootGuest({ memoryMiB: GUEST_MIB });
      const g = first.guest;
      console.log(`  guest booted in ${first.boot.bootMs} ms`);

      await t.step(
        "the guest's eth0 has a link and the driver negotiated the offloads",
        () =>
          withLog(rig, async () => {
            assert.equal(first.boot.netStatus, "ok", g.console());
            const r = await g.run("cat /sys/class/net/eth0/operstate", 10_000);
            assert.equal(r.output, "up\n");
            const features = rig.daemon.negotiated(first.logFrom);
            assert.ok(features, `no "negotiated" line in the daemon's log`);
            for (const f of ["CSUM", "GUEST_CSUM", "HOST_TSO4", "HOST_TSO6", "GUEST_TSO4"]) {
              assert.ok(features.includes(f), `${f} not negotiated: ${features.join(" ")}`);
            }
          }),
      );

      await t.step("the guest pings the host side of the tap", () => withLog(rig, () => ping(g)));

      await t.step(
        "ethtool -k eth0 in the guest shows TSO and tx checksumming on",
        () =>
          withLog(rig, async () => {
            const f = await guestFeatures(g);
            assert.equal(f.get("tcp-segmentation-offload"), "on");
            assert.equal(f.get("tx-checksumming"), "on");
          }),
      );

      await t.step(
        "ethtool -k on the tap shows the offloads TUNSCAP set",
        () =>
          withLog(rig, async () => {
            const f = await rig.tapFeatures();
            for (const name of TAP_OFFLOADS) assert.equal(f.get(name), "on", name);
            assert.ok(
              rig.daemon.lines().some((l) =>
                /TUNSCAP: .* offloads now TUN_F_CSUM TUN_F_TSO4/.test(l)
              ),
            );
          }),
      );

      await t.step(`${BIG_MIB} MB guest -> host arrive intact`, () =>
        withLog(rig, async () => {
          const { result, rxAvg } = await framesDuring(rig, () => rig.sendFromGuest(g, BIG_MIB));
          assertIntact(result, "guest -> host");
          console.log(`  the tap took ${rxAvg}-byte frames on average from the daemon`);
          // Without GSO no frame exceeds MAX_FRAME, so an average above it proves
          // TSO frames reached the tap whole. How far above depends on the guest's
          // TCP under TCG (2.8-4 KB here: small autosized bursts), not on vionet.
          assert.ok(
            rxAvg > MAX_FRAME,
            `no TSO frames passed to the tap (${rxAvg} bytes/frame)`,
          );
        }));

      await t.step(`${BIG_MIB} MB host -> guest arrive intact`, () =>
        withLog(rig, async () => {
          const { result, txAvg } = await framesDuring(rig, () => rig.sendToGuest(g, BIG_MIB));
          assertIntact(result, "host -> guest");
          console.log(`  the tap gave the daemon ${txAvg}-byte frames on average`);
          assert.ok(txAvg > 2 * MAX_FRAME, `the tap gave no GSO frames (${txAvg} bytes/frame)`);
        }));

      await t.step("iperf3 moves data both ways", () =>
        withLog(rig, async () => {
          for (const reverse of [false, true]) {
            const r = await rig.iperf3(g, { reverse, seconds: 3 });
            console.log(
              `  iperf3 ${reverse ? "host -> guest" : "guest -> host"}: ` +
                `${(r.bitsPerSecond / 1e9).toFixed(2)} Gbit/s (${r.retransmits} retransmits)`,
            );
            assert.ok(r.bytes > 10 * 2 ** 20, `iperf3 moved only ${r.bytes} bytes`);
          }
        }));

      await t.step(
        "after the guest reloads virtio_net, the link and traffic resume",
        () =>
          withLog(rig, async () => {
            const from = rig.daemon.lines().length;
            const r = await g.run(
              [
                "rmmod virtio_net || exit 11",
                "[ ! -e /sys/class/net/eth0 ] || exit 12",
                "modprobe virtio_net || exit 13",
                "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done",
                "ip link set eth0 up || exit 14",
                `ip addr add ${GUEST_IP}/24 dev eth0 || exit 15`,
                `ip route add default via ${HOST_IP} || exit 16`,
                'i=0; while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done',
                "cat /sys/class/net/eth0/operstate",
              ].join("\n"),
              60_000,
            );
            assert.equal(r.status, 0, r.output);
            assert.equal(r.output, "up\n");
            const features = rig.daemon.negotiated(from);
            assert.ok(features?.includes("HOST_TSO4"), `no new negotiation after the reload`);
            await ping(g);
            assert.equal((await rig.tapFeatures()).get("tx-tcp-segmentation"), "on");
            assertIntact(await rig.sendFromGuest(g, SMALL_MIB), "guest -> host after reload");
            assertIntact(await rig.sendToGuest(g, SMALL_MIB), "host -> guest after reload");
          }),
      );

      await t.step(
        "QEMU SIGKILLed mid-transfer: the daemon keeps running and serves a second VM",
        () =>
          withLog(rig, async () => {
            const from = rig.daemon.lines().length;
            const port = rig.port();
            const server = rig.spawn([
              "iperf3",
              "-s",
              "-1",
              "--forceflush",
              "-B",
              HOST_IP,
              "-p",
              String(port),
            ]);
            await server.waitFor(/Server listening/, 10_000);
            const before = await rig.tapCounters();
            const transfer = g.run(`iperf3 -c ${HOST_IP} -p ${port} -t 60 --bidir`, 90_000);
            transfer.catch(() => {}); // QEMU dies under it
            // Mid-transfer: at least 20 MB each way went through the tap.
            const deadline = Date.now() + 30_000;
            for (;;) {
              const now = await rig.tapCounters();
              const rx = now.rxBytes - before.rxBytes;
              const tx = now.txBytes - before.txBytes;
              if (rx > 20e6 && tx > 20e6) break;
              if (Date.now() > deadline) {
                throw new Error(`no bulk traffic within 30 s: rx ${rx}, tx ${tx} bytes`);
              }
              await new Promise((r) => setTimeout(r, 200));
            }
            Deno.kill(g.pid, "SIGKILL"); // QEMU (ip netns exec execs it)
            const status = await withTimeout(g.closed, 10_000, "QEMU did not exit after SIGKILL");
            assert.equal(status.signal, "SIGKILL");
            await server.kill();

            await rig.daemon.waitFor(/front-end disconnected/, 15_000, from);
            await new Promise((r) => setTimeout(r, 1000));
            assert.ok(rig.daemon.running, `the daemon exited:\n${rig.daemon.log()}`);
            assert.ok(Deno.statSync(`/proc/${rig.daemon.pid}`).isDirectory);

            const second = await rig.bootGuest({ memoryMiB: 512 });
            console.log(`  second guest booted in ${second.boot.bootMs} ms`);
            assert.equal(second.boot.netStatus, "ok", second.guest.console());
            assert.ok(rig.daemon.negotiated(second.logFrom), "the second VM did not negotiate");
            await ping(second.guest);
            assertIntact(
              await rig.sendFromGuest(second.guest, SMALL_MIB),
              "second VM: guest -> host",
            );
            assertIntact(
              await rig.sendToGuest(second.guest, SMALL_MIB),
              "second VM: host -> guest",
            );
            // Every thread, those of the workers started for the second VM
            // included, runs as the daemon's user under the one filter.
            const user = resolveUser(null);
            assertSandboxed(rig.daemon.pid, user.uid, user.gid, "after the second VM");
          }),
      );
    });
  },
});

Deno.test({
  name: "vionet e2e, offloads off in the guest (QEMU csum=off ... guest_tso6=off): " +
    "the tap's offloads are off and data moves intact",
  ignore: skip !== undefined,
  async fn(t) {
    await Rig.run({}, async (rig) => {
      const { guest: g, boot, logFrom } = await rig.bootGuest({ nicProps: NIC_OFFLOADS_OFF });
      console.log(`  guest booted in ${boot.bootMs} ms`);
      assert.equal(boot.netStatus, "ok", g.console());

      await t.step("the driver negotiated no checksum or TSO feature", () =>
        withLog(rig, () => {
          const features = rig.daemon.negotiated(logFrom);
          assert.ok(features, `no "negotiated" line in the daemon's log`);
          for (const f of ["CSUM", "GUEST_CSUM", "HOST_TSO4", "HOST_TSO6", "GUEST_TSO4"]) {
            assert.ok(!features.includes(f), `${f} negotiated: ${features.join(" ")}`);
          }
          return Promise.resolve();
        }));

      await t.step(
        "ethtool -k eth0 in the guest shows TSO and checksumming off",
        () =>
          withLog(rig, async () => {
            const f = await guestFeatures(g);
            assert.equal(f.get("tcp-segmentation-offload"), "off");
            assert.equal(f.get("tx-checksumming"), "off");
          }),
      );

      await t.step("ethtool -k on the tap shows every offload off", () =>
        withLog(rig, async () => {
          const f = await rig.tapFeatures();
          for (const name of TAP_OFFLOADS) assert.equal(f.get(name), "off", name);
        }));

      await t.step(
        `${SMALL_MIB} MB move intact both ways in MTU-sized frames`,
        () =>
          withLog(rig, async () => {
            await ping(g, 1);
            const up = await framesDuring(rig, () => rig.sendFromGuest(g, SMALL_MIB));
            assertIntact(up.result, "guest -> host");
            assert.ok(up.rxAvg <= MAX_FRAME, `the tap took ${up.rxAvg}-byte frames on average`);
            const down = await framesDuring(rig, () => rig.sendToGuest(g, SMALL_MIB));
            assertIntact(down.result, "host -> guest");
            assert.ok(down.txAvg <= MAX_FRAME, `the tap gave ${down.txAvg}-byte frames on average`);
            console.log(
              `  frames on the tap: ${up.rxAvg} bytes (in), ${down.txAvg} bytes (out) on average`,
            );
          }),
      );

      await t.step(
        "with no GSO on the tap the poller reads frames in io_uring batches into the guest's buffers",
        () => withLog(rig, () => assertBatchedReads(rig)),
      );
    });
  },
});

Deno.test({
  name: "vionet e2e, daemon --offload off with the guest's offloads on: " +
    "the device checksums and segments in software, data intact",
  ignore: skip !== undefined,
  async fn(t) {
    await Rig.run({ offload: "off" }, async (rig) => {
      const { guest: g, boot, logFrom } = await rig.bootGuest();
      console.log(`  guest booted in ${boot.bootMs} ms`);
      assert.equal(boot.netStatus, "ok", g.console());

      await t.step(
        "the guest uses TSO and checksum offload; the tap has none",
        () =>
          withLog(rig, async () => {
            const features = rig.daemon.negotiated(logFrom);
            assert.ok(features?.includes("HOST_TSO4"), `HOST_TSO4 not negotiated: ${features}`);
            assert.ok(features?.includes("CSUM"), `CSUM not negotiated: ${features}`);
            const f = await guestFeatures(g);
            assert.equal(f.get("tcp-segmentation-offload"), "on");
            assert.equal(f.get("tx-checksumming"), "on");
            const tap = await rig.tapFeatures();
            for (const name of TAP_OFFLOADS) assert.equal(tap.get(name), "off", name);
          }),
      );

      await t.step(
        `${SMALL_MIB} MB move intact both ways; the device segments the TSO frames to MTU size`,
        () =>
          withLog(rig, async () => {
            await ping(g, 1);
            const up = await framesDuring(rig, () => rig.sendFromGuest(g, SMALL_MIB));
            assertIntact(up.result, "guest -> host");
            assert.ok(up.rxAvg <= MAX_FRAME, `the tap took ${up.rxAvg}-byte frames on average`);
            const down = await framesDuring(rig, () => rig.sendToGuest(g, SMALL_MIB));
            assertIntact(down.result, "host -> guest");
            assert.ok(down.txAvg <= MAX_FRAME, `the tap gave ${down.txAvg}-byte frames on average`);
            console.log(
              `  frames on the tap: ${up.rxAvg} bytes (in), ${down.txAvg} bytes (out) on average`,
            );
          }),
      );

      await t.step(
        "with no GSO on the tap the poller reads frames in io_uring batches into the guest's buffers",
        () => withLog(rig, () => assertBatchedReads(rig)),
      );
    });
  },
});

Deno.test({
  name: "vionet e2e, offloads on: three boots in a row, each moves bulk TCP both ways " +
    "from its first transfer",
  ignore: skip !== undefined,
  async fn(t) {
    // The first bulk TX after a boot is when the device first fills its TX
    // ring and the writer and poller first contend for it. A guest's TX
    // stopped for good in 4 of 17 boots of the bench's set-up: a lost
    // wake-up in that hand-over (fixed in tx_drain.ts), and a lost kick
    // (QEMU 7.2 under TCG drops the guest's barriers; the device now
    // recovers, device/kick_watch.ts). This rig did not show it in 9 boots of
    // the old code, so this guards the path rather than those races.
    await Rig.run({}, async (rig) => {
      for (let boot = 0; boot < 3; boot++) {
        await t.step(
          `boot ${boot}: iperf3 guest -> host, then host -> guest`,
          () =>
            withLog(rig, async () => {
              const from = rig.daemon.lines().length;
              const { guest, boot: info } = await rig.bootGuest({ memoryMiB: 512 });
              assert.equal(info.netStatus, "ok", guest.console());
              const up = await rig.iperf3(guest, { reverse: false, seconds: 3 });
              const down = await rig.iperf3(guest, { reverse: true, seconds: 3 });
              assert.ok(up.bytes > 10e6, `guest -> host moved ${up.bytes} bytes`);
              assert.ok(down.bytes > 10e6, `host -> guest moved ${down.bytes} bytes`);
              // Each boot's workers batch through io_uring rings made during set-up:
              // the daemon makes two sets, so the third boot's came back from the first.
              const c = await rig.daemon.datapathCounters();
              assert.equal(c?.writerEngine, "io_uring", JSON.stringify(c));
              assert.equal(c?.pollerEngine, "io_uring", JSON.stringify(c));
              console.log(
                `  boot ${boot}: ${(up.bitsPerSecond / 1e9).toFixed(2)} / ` +
                  `${(down.bitsPerSecond / 1e9).toFixed(2)} Gbit/s`,
              );
              await guest.shutdown();
              await rig.daemon.waitFor(/front-end disconnected/, 15_000, from);
            }),
        );
      }
    });
  },
});

function withTimeout<T>(p: Promise<T>, ms: number, why: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(why)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
