/**
 * TUNSCAP end to end on a real tap: the driver's acknowledged features reach
 * the device, the device asks the parent, the parent applies TUNSETOFFLOAD,
 * and `ethtool -k` on the tap shows the result. Refusals change nothing.
 */
import assert from "node:assert/strict";
import { allowedTapOffloads, startDaemon, tunscapHandler } from "../../../parent/control/daemon.ts";
import { DeviceHost } from "../../../parent/control/device_host.ts";
import { IpcError } from "../../../ipc/endpoint.ts";
import { parseOptions } from "../../../parent/control/cli.ts";
import {
  VIRTIO_F_VERSION_1,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_ECN,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
  VIRTIO_NET_F_HOST_TSO4,
} from "../../../ipc/features.ts";
import { exec, type Netns, withNetns } from "../../net_ns.ts";
import { quietLogger, testConfig } from "../../helpers.ts";

const ignore = Deno.uid() !== 0;

function tapName(): string {
  return `vd${crypto.randomUUID().replaceAll("-", "").slice(0, 8)}`;
}

/** The tap offloads as ethtool names them: on/off per feature line. */
async function ethtoolOffloads(ns: Netns, ifname: string) {
  const text = await ns.exec(["ethtool", "-k", ifname]);
  const on = (name: string) => {
    const m = new RegExp(`^\\s*${name}: (on|off)`, "m").exec(text);
    if (!m) throw new Error(`ethtool -k ${ifname} has no ${name} line:\n${text}`);
    return m[1] === "on";
  };
  return {
    csum: on("tx-checksum-ip-generic"),
    tso4: on("tx-tcp-segmentation"),
    tso6: on("tx-tcp6-segmentation"),
    ecn: on("tx-tcp-ecn-segmentation"),
  };
}

async function withDaemon(
  ns: Netns,
  args: string[],
  fn: (d: Awaited<ReturnType<typeof startDaemon>>) => Promise<void>,
) {
  const logger = quietLogger();
  const daemon = await startDaemon(parseOptions(["--tap", tapName(), ...args]), logger);
  try {
    await exec(["ip", "link", "set", "dev", daemon.tap.name, "netns", ns.name]);
    await fn(daemon);
  } finally {
    daemon.stop();
  }
}

const ALL_GUEST = VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6 |
  VIRTIO_NET_F_GUEST_ECN;
const BASE = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4;

Deno.test({
  name: "the driver's GUEST_* features become the tap's offloads, as ethtool -k reports",
  ignore,
  fn: () =>
    withNetns((ns) =>
      withDaemon(ns, [], async ({ tap, port }) => {
        const device = await port.device(0);
        assert.deepEqual(await ethtoolOffloads(ns, tap.name), {
          csum: false,
          tso4: false,
          tso6: false,
          ecn: false,
        });
        await device.setFeatures(BASE | ALL_GUEST);
        assert.deepEqual(await ethtoolOffloads(ns, tap.name), {
          csum: true,
          tso4: true,
          tso6: true,
          ecn: true,
        });
        await device.setFeatures(BASE | VIRTIO_NET_F_GUEST_CSUM);
        assert.deepEqual(await ethtoolOffloads(ns, tap.name), {
          csum: true,
          tso4: false,
          tso6: false,
          ecn: false,
        });
        await device.reset();
        assert.equal((await ethtoolOffloads(ns, tap.name)).csum, false);
      })
    ),
});

Deno.test({
  name: "--offload off: the device asks the tap for nothing while the guest keeps its offloads",
  ignore,
  fn: () =>
    withNetns((ns) =>
      withDaemon(ns, ["--offload", "off"], async ({ tap, port }) => {
        const device = await port.device(0);
        assert.equal(device.offered & ALL_GUEST, ALL_GUEST, "guest still offered receive offloads");
        await device.setFeatures(BASE | ALL_GUEST);
        assert.deepEqual(await ethtoolOffloads(ns, tap.name), {
          csum: false,
          tso4: false,
          tso6: false,
          ecn: false,
        });
        assert.equal(tap.offloads, 0);
      })
    ),
});

Deno.test({
  name: "features that break virtio's dependency rules are refused and leave the tap as it was",
  ignore,
  fn: () =>
    withNetns((ns) =>
      withDaemon(ns, [], async ({ tap, port }) => {
        const device = await port.device(0);
        await device.setFeatures(BASE | VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4);
        const before = await ethtoolOffloads(ns, tap.name);
        await assert.rejects(
          device.setFeatures(VIRTIO_F_VERSION_1 | VIRTIO_NET_F_GUEST_TSO6),
          (e: unknown) =>
            e instanceof IpcError && e.code === "refused" && e.field === "features" &&
            /GUEST_TSO6 requires GUEST_CSUM/.test(e.message),
        );
        assert.deepEqual(await ethtoolOffloads(ns, tap.name), before);
      })
    ),
});

Deno.test({
  name: "a TUNSCAP outside the parent's mask is refused with a typed error and changes nothing",
  ignore,
  fn: () =>
    withNetns((ns) =>
      withDaemon(ns, [], async ({ tap }) => {
        for (const mode of ["auto", "off"] as const) {
          const logger = quietLogger();
          const applied: number[] = []; // the tap's read room after each applied TUNSCAP
          const rogue = await DeviceHost.start({
            config: testConfig(),
            handlers: {
              tunscap: tunscapHandler(
                tap,
                allowedTapOffloads(mode),
                logger,
                () => applied.push(tap.readRoom()),
              ),
            },
            logger,
            workerUrl: new URL("../../ipc/rogue_device.ts", import.meta.url),
          });
          try {
            const allowedFirst = mode === "auto"
              ? VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4
              : 0n;
            const bad = mode === "auto"
              ? VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
              : VIRTIO_NET_F_GUEST_CSUM;
            rogue.sendRaw({
              kind: "rogue-send",
              messages: [
                { kind: "tunscap", id: 1, offloads: allowedFirst },
                { kind: "tunscap", id: 2, offloads: bad },
              ],
            });
            const end = Date.now() + 5000;
            while (!logger.lines.some((l) => l.includes('"id":2')) && Date.now() < end) {
              await new Promise((r) => setTimeout(r, 10));
            }
            const first = logger.lines.find((l) => l.includes('"id":1'));
            assert.match(first ?? "", /"kind":"tunscap-result"/, `${mode}: ${first}`);
            const before = await ethtoolOffloads(ns, tap.name);
            assert.equal(before.tso4, mode === "auto");
            const second = logger.lines.find((l) => l.includes('"id":2'));
            assert.match(
              second ?? "",
              /"code":"refused".*"field":"offloads"/,
              `${mode}: ${second}`,
            );
            assert.deepEqual(await ethtoolOffloads(ns, tap.name), before);
            // Only the applied request told the poller's side; with TSO on a frame may be 64 KiB.
            assert.deepEqual(applied, [mode === "auto" ? 65_550 + 12 : tap.readRoom()]);
          } finally {
            rogue.terminate();
          }
        }
      })
    ),
});

Deno.test({
  name: "set-features is answered once the parent applied the device's TUNSCAP (the device " +
    "does not wait for the result); a refused TUNSCAP becomes a fault of the data path",
  fn: async () => {
    for (const refuse of [false, true]) {
      const events: string[] = [];
      const faults: Array<[number, string]> = [];
      const host = await DeviceHost.start({
        config: testConfig(),
        handlers: {
          tunscap: (offloads) => {
            events.push(`tunscap ${offloads}`);
            if (refuse) throw new Error("TUNSETOFFLOAD failed: EINVAL");
            return offloads;
          },
        },
        logger: quietLogger(),
        onQueueFault: (queue, reason) => faults.push([queue, reason]),
      });
      try {
        await host.setFeatures(BASE | ALL_GUEST);
        events.push("done");
        assert.equal(events.length, 2, events.join(", "));
        assert.match(events[0], /^tunscap [1-9]/, "the tap's offloads first");
        assert.equal(events[1], "done");
        const end = Date.now() + 5000;
        while (refuse && faults.length === 0 && Date.now() < end) {
          await new Promise((r) => setTimeout(r, 10));
        }
        if (refuse) {
          assert.equal(faults.length, 1);
          assert.equal(faults[0][0], -1, "the data path as a whole");
          assert.match(faults[0][1], /TUNSCAP GUEST_CSUM.*TUNSETOFFLOAD failed: EINVAL/);
        } else {
          await new Promise((r) => setTimeout(r, 50));
          assert.deepEqual(faults, []);
        }
      } finally {
        host.terminate();
      }
    }
  },
});
