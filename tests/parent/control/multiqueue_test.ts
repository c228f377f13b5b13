/**
 * Multiqueue with every part of the daemon real but the VMM
 * (frontend_rig.ts: the backend, a device worker and two I/O workers per
 * pair, a multi-queue tap): with 2 and 4 queue pairs, frames go out on
 * every pair and come in on every pair (the kernel steers flows across
 * the attached tap queues); a pair the driver disables gets no more frames
 * (its tap queue is detached) while the others keep moving, and gets them
 * again once enabled; a ring past the pairs, or a pair enabled with rings
 * never set up, changes nothing for the rest.
 */

import assert from "node:assert/strict";
import { VIRTIO_NET_F_MQ } from "../../../ipc/features.ts";
import {
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_SET_VRING_NUM,
} from "../../../parent/control/vhost_user_messages.ts";
import { encodeVringState } from "../../../parent/control/vhost_user_messages.ts";
import { type Netns, withNetns } from "../../net_ns.ts";
import { FrontendRig, GUEST_IP, RIG_FEATURES } from "./frontend_rig.ts";

const ignore = Deno.uid() !== 0;

/** Sends `n` UDP datagrams to the guest from as many source ports (flows) in the namespace. */
async function flowsToGuest(ns: Netns, n: number): Promise<void> {
  const code = `
import dgram from "node:dgram";
for (let i = 0; i < ${n}; i++) {
  const s = dgram.createSocket("udp4");
  await new Promise((r) => s.send(Buffer.alloc(100, i), 9, "${GUEST_IP}", r));
  s.close();
}`;
  const r = await ns.run([Deno.execPath(), "eval", code]);
  assert.equal(r.code, 0, r.stderr);
}

/** Frames each pair's RX ring received (used entries with data); refills what it reads. */
function reapRx(rig: FrontendRig, got: number[]): void {
  rig.pairs.forEach((p, i) => {
    const used = p.rx.readUsed();
    got[i] += used.filter((e) => e.len > 0).length;
    if (used.length > 0) rig.postRx(used.length, i);
  });
}

/** Waits until the TX ring of each pair in `which` had `n` chains back. */
async function txDone(rig: FrontendRig, which: number[], n: number): Promise<void> {
  const got = which.map(() => 0);
  await rig.until(`${n} TX completions on pairs ${which}`, () => {
    which.forEach((p, i) => got[i] += rig.pairs[p].tx.readUsed().length);
    return got.every((g) => g >= n);
  });
}

for (const pairs of [2, 4]) {
  Deno.test({
    name: `multiqueue, ${pairs} pairs: frames both ways on every pair; a pair disabled and ` +
      "enabled again while traffic flows; a ring past the pairs is refused",
    ignore,
    fn: () =>
      withNetns(async (ns) => {
        const rig = await FrontendRig.open(ns, {
          pairs,
          features: RIG_FEATURES | VIRTIO_NET_F_MQ,
        });
        try {
          const q = await rig.send(VHOST_USER_GET_QUEUE_NUM);
          assert.equal(
            new DataView(q!.buffer, q!.byteOffset).getBigUint64(12, true),
            BigInt(pairs),
          );
          await rig.start();
          for (let i = 0; i < pairs; i++) rig.postRx(64, i);
          assert.equal(rig.port.pairs().length, pairs, "a device worker per pair");
          await rig.until("every pair running", () => rig.port.pairs().every((p) => p.running));

          // TX: every pair's ring sends.
          for (let i = 0; i < pairs; i++) rig.sendUdp(10, 200, i);
          await txDone(rig, [...rig.pairs.keys()], 10);

          // RX: many flows from the namespace; the kernel spreads them over the queues.
          const got = rig.pairs.map(() => 0);
          await flowsToGuest(ns, 64 * pairs);
          await rig.until("frames on every pair", () => {
            reapRx(rig, got);
            return got.every((g) => g > 0);
          });

          // The driver goes down to one pair (ethtool -L combined 1): QEMU disables the rest.
          for (let i = 1; i < pairs; i++) await rig.enablePair(i, false);
          assert.equal(rig.tap.queueAttached(1), false, "pair 1's tap queue detached");
          reapRx(rig, got); // what the disabled pairs published before they stopped
          const before = [...got];
          await flowsToGuest(ns, 64);
          await rig.until("the frames on pair 0", () => {
            reapRx(rig, got);
            return got[0] - before[0] >= 60;
          });
          for (let i = 1; i < pairs; i++) assert.equal(got[i], before[i], `pair ${i} is disabled`);
          rig.sendUdp(5, 200, 0);
          await txDone(rig, [0], 5);

          // And back up (ethtool -L combined N).
          for (let i = 1; i < pairs; i++) await rig.enablePair(i, true);
          assert.equal(rig.tap.queueAttached(1), true);
          await rig.until(
            "every pair running again",
            () => rig.port.pairs().every((p) => p.running),
          );
          const again = [...got];
          await flowsToGuest(ns, 64 * pairs);
          await rig.until("frames on every pair again", () => {
            reapRx(rig, got);
            return got.every((g, i) => g > again[i]);
          });

          // A ring past the pairs: refused, naming it; the connection would end, the pairs run on.
          const r = await rig.sendRaw(VHOST_USER_SET_VRING_NUM, encodeVringState(2 * pairs, 256));
          assert.equal(r.ok, false);
          if (!r.ok) assert.match(r.error.message, new RegExp(`ring ${2 * pairs} does not exist`));
          assert.ok(rig.port.pairs().every((p) => p.running));
          const stats = await rig.port.stats();
          for (let i = 0; i < pairs; i++) {
            assert.ok(
              (stats[`rx${i}`]?.used ?? 0) > 0,
              `rx${i} counters: ${JSON.stringify(stats)}`,
            );
            assert.ok((stats[`tx${i}`]?.used ?? 0) > 0, `tx${i} counters`);
            assert.ok(
              stats[`io${i}`] !== undefined,
              `io${i}: each pair's I/O side, none overwritten`,
            );
          }
        } finally {
          await rig.close();
        }
      }),
  });
}

Deno.test({
  name: "multiqueue, hostile front-end: enabling a pair whose rings were never set up starts " +
    "nothing there, and the pair that was set up runs on",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns, {
        pairs: 2,
        features: RIG_FEATURES | VIRTIO_NET_F_MQ,
      });
      try {
        await rig.start({ setUpPairs: 1 });
        rig.postRx(16, 0);
        rig.sendUdp(4, 200, 0);
        await txDone(rig, [0], 4);
        // Rings 2 and 3 exist (two pairs offered) but have no size, addresses or kick fds.
        await rig.enablePair(1, true);
        const [first, second] = rig.port.pairs();
        assert.equal(second.running, false, "pair 1 has nothing to run");
        rig.sendUdp(4, 200, 0);
        await txDone(rig, [0], 4);
        assert.ok(first.running, "pair 0 runs on");
      } finally {
        await rig.close();
      }
    }),
});
