/**
 * Stopping and starting the rings the way a live migration does
 * (frontend_rig.ts: the real backend, device, I/O workers and tap; the
 * test plays QEMU and the driver): GET_VRING_BASE sends what the device
 * took and gives unfilled RX buffers back, so each base equals its used
 * index (QEMU's "inuse" is 0 and nothing is lost or sent twice on the
 * destination); the queues start again within milliseconds; SEND_RARP,
 * and with --mac the first SET_FEATURES of a connection, announce the
 * guest's MAC on the tap, where a bridge learns it.
 */

import assert from "node:assert/strict";
import { RX_QUEUE, TX_QUEUE } from "../../../ipc/datapath.ts";
import {
  encodeU64,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_SEND_RARP,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
} from "../../../parent/control/vhost_user_messages.ts";
import { rarpFrame } from "../../../parent/control/device_port.ts";
import { VIONET_PROTOCOL_FEATURES } from "../../../parent/control/vhost_user_backend.ts";
import { type Netns, withNetns } from "../../net_ns.ts";
import { FrontendRig, GUEST_IP, GUEST_MAC, RIG_FEATURES } from "./frontend_rig.ts";
import { buildFrame } from "../../device/frames.ts";
import { VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4 } from "../../../ipc/features.ts";

const ignore = Deno.uid() !== 0;

/**
 * Frames vionet wrote to the tap: what the kernel took in, and what it
 * dropped on the way in (a burst can overflow its backlog).
 */
async function tapRxPackets(ns: Netns, tap: string): Promise<number> {
  const [link] = JSON.parse(await ns.exec(["ip", "-s", "-j", "link", "show", "dev", tap]));
  return link.stats64.rx.packets + link.stats64.rx.dropped;
}

/** Reads used entries until `n` TX chains came back; refills RX one for one. */
async function reap(rig: FrontendRig, txWanted: number): Promise<{ tx: number; rx: number }> {
  let tx = 0, rx = 0;
  await rig.until(`${txWanted} TX completions`, () => {
    tx += rig.tx.readUsed().length;
    const got = rig.rx.readUsed();
    rx += got.length;
    if (got.length > 0) rig.postRx(got.length);
    return tx >= txWanted;
  });
  return { tx, rx };
}

/** Segments of each GSO frame the test sends (1448 bytes of TCP payload each). */
const SEGMENTS = 10;

/**
 * `n` TCP frames of {@link SEGMENTS} segments from the guest, as GSO
 * super-frames with a partial checksum (virtio 1.2 §5.1.6.2), and a kick.
 */
function sendGso(rig: FrontendRig, n: number): void {
  for (let i = 0; i < n; i++) {
    const { frame } = buildFrame({
      srcMac: GUEST_MAC,
      dstMac: Array.from(rig.tap.macBytes),
      src: [198, 18, 0, 2],
      dst: [198, 18, 0, 1],
      l4: "tcp",
      srcPort: 40001,
      dstPort: 9,
      seq: 1 + i * SEGMENTS * 1448,
      payload: new Uint8Array(SEGMENTS * 1448).fill(i & 0xff),
      checksum: "partial",
    });
    const data = new Uint8Array(12 + frame.length);
    const h = new DataView(data.buffer);
    data[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
    data[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
    h.setUint16(2, 54, true); // hdr_len
    h.setUint16(4, 1448, true); // gso_size
    h.setUint16(6, 34, true); // csum_start
    h.setUint16(8, 16, true); // csum_offset
    data.set(frame, 12);
    rig.tx.post([{ data }]);
  }
  rig.kickQueue(TX_QUEUE);
}

/**
 * A rig whose device segments each GSO frame in software (`--offload off`),
 * so that segments wait behind a full TX ring, in flight when a stop comes;
 * started, with 200 RX buffers posted. `before`: the tap's count of frames in.
 */
async function openSegmenting(ns: Netns): Promise<{ rig: FrontendRig; before: number }> {
  const rig = await FrontendRig.open(ns, {
    offload: "off",
    features: RIG_FEATURES | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4,
  });
  try {
    await rig.start();
    rig.postRx(200);
    await reap(rig, 0);
    return { rig, before: await tapRxPackets(ns, rig.tap.name) };
  } catch (e) {
    await rig.close();
    throw e;
  }
}

Deno.test({
  name: "GET_VRING_BASE sends every TX frame the device took and un-pops unfilled RX buffers: " +
    "each base equals its used index, and every completed frame reached the tap in full",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const { rig, before } = await openSegmenting(ns);
      try {
        const frames = 100;
        sendGso(rig, frames);
        const pings = ns.run(["ping", "-c", "20", "-i", "0.01", "-W", "1", GUEST_IP]);
        const bases = await rig.stop();
        await pings;
        const completed = rig.tx.readUsed().length;
        const sent = (await tapRxPackets(ns, rig.tap.name)) - before;
        assert.equal(
          sent,
          completed * SEGMENTS,
          `${completed} TX chains completed, ${sent} segments sent`,
        );
        assert.equal(bases[TX_QUEUE], rig.tx.usedIdx(), "TX base = used index: nothing in flight");
        assert.equal(
          bases[RX_QUEUE],
          rig.rx.usedIdx(),
          "RX base = used index: unfilled given back",
        );
        // The rest goes out once the rings run again, from where they stopped.
        await rig.restart(bases);
        const rest = await reap(rig, frames - completed);
        assert.equal(rest.tx, frames - completed);
        assert.equal(
          (await tapRxPackets(ns, rig.tap.name)) - before,
          frames * SEGMENTS,
          "each frame once",
        );
      } finally {
        await rig.close();
      }
    }),
});

Deno.test({
  name: "twenty stops and restarts in a row, each with frames in flight both ways: every base " +
    "equals its used index, every TX frame reaches the tap once, and the stops are answered " +
    "from the control block",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const { rig, before } = await openSegmenting(ns);
      try {
        const rounds = 20;
        const perRound = 20;
        let completed = 0;
        for (let round = 0; round < rounds; round++) {
          sendGso(rig, perRound);
          const pings = ns.run(["ping", "-c", "5", "-i", "0.01", "-W", "1", GUEST_IP]);
          await new Promise((r) => setTimeout(r, round % 4)); // stop at different points
          const bases = await rig.stop();
          await pings;
          completed += rig.tx.readUsed().length;
          const received = rig.rx.readUsed().length;
          assert.equal(bases[TX_QUEUE], rig.tx.usedIdx(), `round ${round}: TX base = used index`);
          assert.equal(bases[RX_QUEUE], rig.rx.usedIdx(), `round ${round}: RX base = used index`);
          await rig.restart(bases);
          if (received > 0) rig.postRx(received);
        }
        const rest = await reap(rig, rounds * perRound - completed);
        assert.equal(completed + rest.tx, rounds * perRound, "every TX chain completed once");
        assert.equal(
          (await tapRxPackets(ns, rig.tap.name)) - before,
          rounds * perRound * SEGMENTS,
          "each frame once",
        );
        const fromWords = rig.logger.lines.filter((l) => /read from the control block/.test(l));
        console.log(`${fromWords.length} of ${rounds} stops answered from the control block`);
        assert.ok(
          fromWords.length >= rounds / 2,
          `${fromWords.length} of ${rounds} stops answered from the control block`,
        );
      } finally {
        await rig.close();
      }
    }),
});

Deno.test({
  name: "the queues start again within milliseconds of the message that starts them " +
    "(I/O workers started ahead), and move frames at once",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns);
      try {
        const firstMs = await rig.start();
        rig.postRx(64);
        rig.sendUdp(10);
        await reap(rig, 10);
        const s0 = performance.now();
        const bases = await rig.stop();
        const stopMs = performance.now() - s0;
        await new Promise((r) => setTimeout(r, 500)); // the front-end's own pause
        const againMs = await rig.restart(bases);
        const t0 = performance.now();
        rig.sendUdp(1);
        await reap(rig, 1);
        const frameMs = performance.now() - t0;
        console.log(
          `queue start: ${firstMs.toFixed(1)} ms first, ${againMs.toFixed(1)} ms again; ` +
            `first frame after it ${frameMs.toFixed(1)} ms; stop (GET_VRING_BASE both) ` +
            `${stopMs.toFixed(1)} ms`,
        );
        // Was ~1000 ms (the device answered start-queues from its blocked loop
        // only when its 1 s slice ended), plus 100-300 ms to start two workers.
        assert.ok(againMs < 500, `the queues took ${againMs.toFixed(1)} ms to start again`);
      } finally {
        await rig.close();
      }
    }),
});

Deno.test({
  name: "after GET_VRING_BASE, spare I/O workers start only once the front-end is quiet: " +
    "starting them blocks the parent's thread, which must not delay the rest of a switch-over",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns);
      const spawned = () => rig.logger.lines.filter((l) => /spare I\/O workers spawned/.test(l));
      try {
        await rig.start();
        rig.postRx(16);
        rig.sendUdp(3);
        await reap(rig, 3);
        const before = spawned().length;
        // What QEMU sends in a migration's downtime, back to back.
        await rig.stop();
        await rig.enablePair(0, false);
        await new Promise((r) => setTimeout(r, 20));
        await rig.send(VHOST_USER_GET_FEATURES);
        assert.equal(spawned().length, before, "spare workers started inside the burst");
        await rig.until("spare workers started after the burst", () => spawned().length > before);
      } finally {
        await rig.close();
      }
    }),
});

Deno.test({
  name: "a stop with dirty logging on (a migration's switch-over) starts no spare I/O workers; " +
    "a restart after it (the migration cancelled) starts its own and runs",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns);
      const spawned = () => rig.logger.lines.filter((l) => /spare I\/O workers spawned/.test(l));
      try {
        await rig.start();
        await rig.setLogBase(4096);
        await rig.setFeatures(true);
        rig.postRx(16);
        rig.sendUdp(3);
        await reap(rig, 3);
        const before = spawned().length;
        const bases = await rig.stop();
        await new Promise((r) => setTimeout(r, 600));
        assert.equal(spawned().length, before, "spare workers started after a switch-over's stop");
        await rig.setFeatures(false); // migrate_cancel: logging off, the rings again
        await rig.restart(bases);
        rig.sendUdp(2);
        await reap(rig, 2);
        assert.match(rig.logger.lines.join("\n"), /start: .*, I\/O workers spawned now/);
      } finally {
        await rig.close();
      }
    }),
});

Deno.test({
  name: "SEND_RARP puts a RARP from the guest's MAC on the tap: the bridge learns it on that port",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns);
      try {
        await ns.exec(["ip", "link", "add", "br0", "type", "bridge"]);
        await ns.exec(["ip", "link", "set", rig.tap.name, "master", "br0"]);
        await ns.exec(["ip", "link", "set", "br0", "up"]);
        await rig.start();
        const mac = new Uint8Array([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        const payload = new Uint8Array(8);
        payload.set(mac);
        await rig.send(VHOST_USER_SEND_RARP, payload);
        const fdb = await ns.exec(["bridge", "fdb", "show", "br", "br0"]);
        assert.match(fdb, new RegExp(`^52:54:00:ab:cd:ef dev ${rig.tap.name} `, "m"), fdb);
        assert.ok(rig.logger.lines.some((l) => /sent a RARP for 52:54:00:ab:cd:ef/.test(l)));
      } finally {
        await rig.close();
      }
    }),
});

Deno.test({
  name: "with --mac, SEND_RARP for another MAC is not sent: the VMM cannot spoof either",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns, { sourceMac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56] });
      try {
        await rig.start();
        const before = Number(
          await ns.exec(["cat", `/sys/class/net/${rig.tap.name}/statistics/rx_packets`]),
        );
        const payload = new Uint8Array(8);
        payload.set([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]);
        await rig.send(VHOST_USER_SEND_RARP, payload);
        payload.set([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]);
        await rig.send(VHOST_USER_SEND_RARP, payload);
        const after = Number(
          await ns.exec(["cat", `/sys/class/net/${rig.tap.name}/statistics/rx_packets`]),
        );
        assert.equal(after - before, 1, "only the RARP from --mac reached the tap");
        assert.ok(
          rig.logger.lines.some((l) =>
            /RARP for 52:54:00:ab:cd:ef not sent: --mac is 52:54:00:12:34:56/.test(l)
          ),
          rig.logger.lines.join("\n"),
        );
        assert.ok(
          rig.logger.lines.some((l) => /sent a RARP for 52:54:00:12:34:56 \(SEND_RARP/.test(l)),
        );
      } finally {
        await rig.close();
      }
    }),
});

/** Frames the tap took in from vionet (RARPs included), read from sysfs. */
async function tapRxCount(ns: Netns, tap: string): Promise<number> {
  return Number(await ns.exec(["cat", `/sys/class/net/${tap}/statistics/rx_packets`]));
}

/** Lines of the rig's log that say vionet sent a RARP. */
function rarpLines(rig: FrontendRig): string[] {
  return rig.logger.lines.filter((l) => /sent a RARP for/.test(l));
}

Deno.test({
  name: "with --mac, the first SET_FEATURES of each connection (a boot, a reconnect, a " +
    "migration's destination) announces the guest on the tap before its memory and rings " +
    "arrive; a second SET_FEATURES or a restart on the same connection does not",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns, { sourceMac: GUEST_MAC });
      try {
        await ns.exec(["ip", "link", "add", "br0", "type", "bridge"]);
        await ns.exec(["ip", "link", "set", rig.tap.name, "master", "br0"]);
        await ns.exec(["ip", "link", "set", "br0", "up"]);
        const macText = GUEST_MAC.map((b) => b.toString(16).padStart(2, "0")).join(":");
        const fdbHasGuest = async () =>
          new RegExp(`^${macText} dev ${rig.tap.name} `, "m")
            .test(await ns.exec(["bridge", "fdb", "show", "br", "br0"]));
        // QEMU's set-up at its start (and at an -incoming destination's):
        // no NIC runs yet, nothing is announced.
        let before = await tapRxCount(ns, rig.tap.name);
        await rig.send(VHOST_USER_GET_FEATURES);
        await rig.send(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES));
        await rig.send(VHOST_USER_SET_OWNER);
        assert.deepEqual(rarpLines(rig), [], "announced before SET_FEATURES");
        // SET_FEATURES, no memory yet: the RARP is on the tap and the bridge knows the port.
        await rig.setFeatures(false);
        assert.equal(rarpLines(rig).length, 1, rig.logger.lines.join("\n"));
        assert.match(rarpLines(rig)[0], new RegExp(`${macText} \\(the guest's NIC starts`));
        assert.equal(await tapRxCount(ns, rig.tap.name) - before, 1, "one frame: the RARP");
        assert.ok(await fdbHasGuest(), "the bridge did not learn the guest's port from the RARP");
        // The rest of the start (SET_FEATURES again among it), traffic, a stop
        // and a restart on the same connection (a VM paused and resumed, a
        // migration cancelled): the guest never left this port.
        await rig.start();
        rig.postRx(16);
        rig.sendUdp(5);
        await reap(rig, 5);
        const bases = await rig.stop();
        assert.ok(bases[TX_QUEUE] > 0);
        await rig.restart(bases);
        assert.equal(rarpLines(rig).length, 1, "the same connection announced twice");
        await rig.stop();
        // Another front-end connects and resumes the rings where they stopped.
        await ns.exec(["bridge", "fdb", "del", macText, "dev", rig.tap.name, "master"])
          .catch(() => {}); // learnt again from the UDP frames; gone now, so the RARP must teach it
        before = await tapRxCount(ns, rig.tap.name);
        await rig.reconnect();
        await rig.start();
        assert.equal(rarpLines(rig).length, 2, rig.logger.lines.join("\n"));
        assert.equal(await tapRxCount(ns, rig.tap.name) - before, 1, "one frame: the RARP");
        assert.ok(await fdbHasGuest());
        // Once per connection: a restart on it does not announce again.
        await rig.restart(await rig.stop());
        assert.equal(rarpLines(rig).length, 2);
      } finally {
        await rig.close();
      }
    }),
});

Deno.test({
  name: "without --mac, resumed rings announce nothing (vionet does not know the guest's MAC) " +
    "and say so",
  ignore,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns);
      try {
        await rig.start();
        rig.postRx(16);
        rig.sendUdp(3);
        await reap(rig, 3);
        await rig.stop();
        const before = await tapRxCount(ns, rig.tap.name);
        await rig.reconnect();
        await rig.start();
        assert.deepEqual(rarpLines(rig), []);
        assert.equal(await tapRxCount(ns, rig.tap.name) - before, 0, "nothing written to the tap");
        assert.ok(
          rig.logger.lines.some((l) => /without --mac vionet cannot announce it/.test(l)),
          rig.logger.lines.join("\n"),
        );
      } finally {
        await rig.close();
      }
    }),
});

Deno.test("rarpFrame(): a broadcast RARP request-reverse from the MAC, padded to 60 bytes", () => {
  const mac = new Uint8Array([2, 0, 0, 0, 0, 9]);
  const out = rarpFrame(mac);
  assert.equal(out.length, 12 + 60);
  assert.deepEqual([...out.subarray(0, 12)], new Array(12).fill(0), "a zero net header");
  const f = out.subarray(12);
  assert.deepEqual([...f.subarray(0, 6)], [255, 255, 255, 255, 255, 255]);
  assert.deepEqual([...f.subarray(6, 12)], [...mac]);
  assert.deepEqual([...f.subarray(12, 22)], [0x80, 0x35, 0, 1, 8, 0, 6, 4, 0, 3]);
  assert.deepEqual([...f.subarray(22, 28)], [...mac], "sender hardware address");
  assert.deepEqual([...f.subarray(32, 38)], [...mac], "target hardware address");
});
