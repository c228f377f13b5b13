/**
 * Tests for parent/host/tunscap.ts: the policy on a stand-in tap (no privileges),
 * then on a real tap in a throw-away namespace, read back with `ethtool -k`.
 *
 * For a tap, TUNSETOFFLOAD sets the device's features (tun.c set_offload):
 * TUN_F_CSUM → NETIF_F_HW_CSUM ("tx-checksum-ip-generic"), TSO4 → NETIF_F_TSO
 * ("tx-tcp-segmentation"), TSO6 → NETIF_F_TSO6 ("tx-tcp6-segmentation"),
 * TSO_ECN → NETIF_F_TSO_ECN ("tx-tcp-ecn-segmentation"), USO4+USO6 →
 * NETIF_F_GSO_UDP_L4 ("tx-udp-segmentation"). UFO has no feature any more.
 */

import assert from "node:assert/strict";
import {
  GUEST_OFFLOAD_FEATURES,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM as CSUM,
  VIRTIO_NET_F_GUEST_ECN as ECN,
  VIRTIO_NET_F_GUEST_TSO4 as TSO4,
  VIRTIO_NET_F_GUEST_TSO6 as TSO6,
  VIRTIO_NET_F_GUEST_UFO as UFO,
  VIRTIO_NET_F_GUEST_USO4 as USO4,
  VIRTIO_NET_F_GUEST_USO6 as USO6,
  VIRTIO_NET_F_MRG_RXBUF,
} from "../../../ipc/features.ts";
import {
  createTap,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUN_F_TSO_ECN,
  TUN_F_UFO,
  TUN_F_USO4,
  TUN_F_USO6,
} from "../../../parent/host/tap.ts";
import {
  applyTunscap,
  guestFeaturesToTunFlags,
  tunFlagsToGuestFeatures,
  type TunscapApplied,
  type TunscapRefused,
} from "../../../parent/host/tunscap.ts";
import { exec, type Netns, tapTestsUnavailable, withNetns } from "../../net_ns.ts";

const ALL_TUN = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO | TUN_F_USO4 |
  TUN_F_USO6;

/** A stand-in tap that records TUNSETOFFLOAD calls. */
function fakeTap(kernelOffloads = ALL_TUN) {
  const calls: number[] = [];
  return { kernelOffloads, calls, setOffload: (flags: number) => void calls.push(flags) };
}

function applied(r: ReturnType<typeof applyTunscap>): TunscapApplied {
  assert.ok(r.ok, `expected success, got ${(r as TunscapRefused).message}`);
  return r;
}

function refused(r: ReturnType<typeof applyTunscap>): TunscapRefused {
  assert.ok(!r.ok, `expected a refusal, got ${JSON.stringify(r, (_, v) => String(v))}`);
  return r;
}

Deno.test("guest offload bits map to TUN_F_* and back, bit for bit", () => {
  const pairs: Array<[bigint, number]> = [
    [CSUM, TUN_F_CSUM],
    [TSO4, TUN_F_TSO4],
    [TSO6, TUN_F_TSO6],
    [ECN, TUN_F_TSO_ECN],
    [UFO, TUN_F_UFO],
    [USO4, TUN_F_USO4],
    [USO6, TUN_F_USO6],
  ];
  for (const [guest, tun] of pairs) {
    assert.equal(guestFeaturesToTunFlags(guest), tun);
    assert.equal(tunFlagsToGuestFeatures(tun), guest);
  }
  for (let mask = 0; mask < 1 << pairs.length; mask++) {
    let guest = 0n;
    pairs.forEach(([g], i) => {
      if (mask & (1 << i)) guest |= g;
    });
    assert.equal(tunFlagsToGuestFeatures(guestFeaturesToTunFlags(guest)), guest);
  }
  assert.equal(guestFeaturesToTunFlags(VIRTIO_NET_F_CSUM | VIRTIO_NET_F_MRG_RXBUF), 0);
});

Deno.test("applyTunscap() refuses bad requests by reason and leaves the tap alone", async (t) => {
  const cases: Array<{
    name: string;
    requested: bigint;
    allowed: bigint;
    reason: TunscapRefused["reason"];
    names: string[];
  }> = [
    {
      name: "a device-side bit (HOST csum) is not a guest offload",
      requested: CSUM | VIRTIO_NET_F_CSUM,
      allowed: GUEST_OFFLOAD_FEATURES,
      reason: "not-offload",
      names: ["CSUM"],
    },
    {
      name: "MRG_RXBUF is not an offload",
      requested: VIRTIO_NET_F_MRG_RXBUF,
      allowed: ~0n,
      reason: "not-offload",
      names: ["MRG_RXBUF"],
    },
    {
      name: "TSO when the parent allows only checksums",
      requested: CSUM | TSO4 | TSO6,
      allowed: CSUM,
      reason: "not-allowed",
      names: ["GUEST_TSO4", "GUEST_TSO6"],
    },
    {
      name: "TSO4 without GUEST_CSUM",
      requested: TSO4,
      allowed: GUEST_OFFLOAD_FEATURES,
      reason: "inconsistent",
      names: ["GUEST_TSO4"],
    },
    {
      name: "UFO and USO without GUEST_CSUM",
      requested: UFO | USO4 | USO6,
      allowed: GUEST_OFFLOAD_FEATURES,
      reason: "inconsistent",
      names: ["GUEST_UFO", "GUEST_USO4", "GUEST_USO6"],
    },
    {
      name: "ECN without TSO4 or TSO6",
      requested: CSUM | ECN,
      allowed: GUEST_OFFLOAD_FEATURES,
      reason: "inconsistent",
      names: ["GUEST_ECN"],
    },
    {
      name: "a negative number",
      requested: -1n,
      allowed: GUEST_OFFLOAD_FEATURES,
      reason: "malformed",
      names: [],
    },
    {
      name: "more than 64 bits",
      requested: 1n << 64n,
      allowed: GUEST_OFFLOAD_FEATURES,
      reason: "malformed",
      names: [],
    },
  ];
  for (const c of cases) {
    await t.step(c.name, () => {
      const tap = fakeTap();
      const r = refused(applyTunscap(tap, c.requested, c.allowed));
      assert.equal(r.reason, c.reason);
      assert.deepEqual(r.refusedNames, c.names);
      for (const name of c.names) assert.ok(r.message.includes(name), r.message);
      assert.deepEqual(tap.calls, [], "TUNSETOFFLOAD must not be called");
    });
  }
});

Deno.test("applyTunscap() applies the mapped flags and reports what the kernel lacks", async (t) => {
  await t.step("everything on a kernel that has everything", () => {
    const tap = fakeTap();
    const r = applied(applyTunscap(tap, GUEST_OFFLOAD_FEATURES, GUEST_OFFLOAD_FEATURES));
    assert.deepEqual(tap.calls, [ALL_TUN]);
    assert.equal(r.tunFlags, ALL_TUN);
    assert.equal(r.inForce, GUEST_OFFLOAD_FEATURES);
    assert.equal(r.dropped, 0n);
  });
  await t.step("nothing requested clears the offloads", () => {
    const tap = fakeTap();
    const r = applied(applyTunscap(tap, 0n, 0n));
    assert.deepEqual(tap.calls, [0]);
    assert.equal(r.inForce, 0n);
  });
  await t.step("USO dropped on a kernel without it", () => {
    const tap = fakeTap(ALL_TUN & ~(TUN_F_USO4 | TUN_F_USO6));
    const r = applied(applyTunscap(tap, CSUM | TSO4 | USO4 | USO6, GUEST_OFFLOAD_FEATURES));
    assert.equal(r.tunFlags, TUN_F_CSUM | TUN_F_TSO4);
    assert.equal(r.inForce, CSUM | TSO4);
    assert.equal(r.dropped, USO4 | USO6);
  });
  await t.step("USO4 alone is dropped: the kernel takes it only with USO6", () => {
    const tap = fakeTap();
    const r = applied(applyTunscap(tap, CSUM | USO4, GUEST_OFFLOAD_FEATURES));
    assert.equal(r.tunFlags, TUN_F_CSUM);
    assert.equal(r.dropped, USO4);
  });
  await t.step("no checksum offload in the kernel means nothing can be on", () => {
    const tap = fakeTap(0);
    const r = applied(applyTunscap(tap, CSUM | TSO4 | ECN, GUEST_OFFLOAD_FEATURES));
    assert.deepEqual(tap.calls, [0]);
    assert.equal(r.dropped, CSUM | TSO4 | ECN);
  });
  await t.step("ECN dropped when the kernel lacks the TSO it rides on", () => {
    const tap = fakeTap(TUN_F_CSUM | TUN_F_TSO6 | TUN_F_TSO_ECN);
    const r = applied(applyTunscap(tap, CSUM | TSO4 | ECN, GUEST_OFFLOAD_FEATURES));
    assert.equal(r.tunFlags, TUN_F_CSUM);
    assert.equal(r.dropped, TSO4 | ECN);
  });
});

// --- real tap ----------------------------------------------------------------

const skip = tapTestsUnavailable();
if (skip) console.warn(`tests/parent/host/tunscap_test.ts: real-tap tests skipped: ${skip}`);

/** The ethtool feature each TUN_F_* flag turns on for a tap. */
const ETHTOOL_FEATURE: ReadonlyArray<[number, string]> = [
  [TUN_F_CSUM, "tx-checksum-ip-generic"],
  [TUN_F_TSO4, "tx-tcp-segmentation"],
  [TUN_F_TSO6, "tx-tcp6-segmentation"],
  [TUN_F_TSO_ECN, "tx-tcp-ecn-segmentation"],
  [TUN_F_USO4 | TUN_F_USO6, "tx-udp-segmentation"],
];

async function ethtoolFeatures(ns: Netns, dev: string): Promise<Map<string, boolean>> {
  const features = new Map<string, boolean>();
  for (const line of (await ns.exec(["ethtool", "-k", dev])).split("\n")) {
    const m = /^\s*([\w-]+): (on|off)/.exec(line);
    if (m) features.set(m[1], m[2] === "on");
  }
  return features;
}

/** What `ethtool -k` must show for the guest bits `inForce`, worked out from the request. */
function expectedFeatures(guestBits: bigint): Map<string, boolean> {
  const expected = new Map<string, boolean>();
  const has = (b: bigint) => (guestBits & b) !== 0n;
  expected.set("tx-checksum-ip-generic", has(CSUM));
  expected.set("tx-tcp-segmentation", has(TSO4));
  expected.set("tx-tcp6-segmentation", has(TSO6));
  expected.set("tx-tcp-ecn-segmentation", has(ECN));
  expected.set("tx-udp-segmentation", has(USO4) && has(USO6));
  return expected;
}

async function assertFeatures(ns: Netns, dev: string, guestBits: bigint): Promise<void> {
  const actual = await ethtoolFeatures(ns, dev);
  for (const [name, on] of expectedFeatures(guestBits)) {
    assert.equal(actual.get(name), on, `ethtool -k ${dev}: ${name}`);
  }
}

Deno.test({
  name: "applyTunscap() on a real tap: ethtool -k shows exactly the offloads in force",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const tap = createTap(`vs${crypto.randomUUID().slice(0, 8)}`, { up: false });
      try {
        await exec(["ip", "link", "set", "dev", tap.name, "netns", ns.name]);
        assert.deepEqual(
          ETHTOOL_FEATURE.map(([f]) => f & tap.kernelOffloads),
          ETHTOOL_FEATURE.map((
            [f],
          ) => f),
          "this test expects a kernel with all of CSUM/TSO4/TSO6/TSO_ECN/USO",
        );
        await assertFeatures(ns, tap.name, 0n);

        const sets: Array<[string, bigint]> = [
          ["csum only", CSUM],
          ["csum + TSO4", CSUM | TSO4],
          ["csum + TSO6", CSUM | TSO6],
          ["csum + TSO4 + TSO6 + ECN", CSUM | TSO4 | TSO6 | ECN],
          ["csum + USO4 + USO6", CSUM | USO4 | USO6],
          ["csum + UFO (accepted, no feature of its own)", CSUM | UFO],
          ["all guest offloads", GUEST_OFFLOAD_FEATURES],
          ["none", 0n],
          ["csum + TSO4 again", CSUM | TSO4],
        ];
        for (const [what, requested] of sets) {
          const r = applied(applyTunscap(tap, requested, GUEST_OFFLOAD_FEATURES));
          assert.equal(r.inForce, requested, what);
          assert.equal(r.dropped, 0n, what);
          assert.equal(tap.offloads, r.tunFlags, what);
          await assertFeatures(ns, tap.name, requested);
        }

        // Refusals after "csum + TSO4": the tap keeps exactly that.
        const before = tap.offloads;
        const refusals: Array<[bigint, bigint]> = [
          [TSO6, GUEST_OFFLOAD_FEATURES], // inconsistent
          [CSUM | TSO4 | TSO6, CSUM | TSO4], // not allowed
          [CSUM | VIRTIO_NET_F_MRG_RXBUF, ~0n], // not an offload
        ];
        for (const [requested, allowed] of refusals) {
          refused(applyTunscap(tap, requested, allowed));
          assert.equal(tap.offloads, before);
          await assertFeatures(ns, tap.name, CSUM | TSO4);
        }
      } finally {
        tap.close();
      }
    }),
});
