/**
 * Both ends of the control channel take random and mutated messages from the
 * other and keep working: every bad message gets a typed error, none kills
 * the receiver, and a well-formed request afterwards is still served.
 */
import assert from "node:assert/strict";
import { DeviceHost } from "../../parent/control/device_host.ts";
import { RefusedError } from "../../ipc/endpoint.ts";
import { PROTOCOL_VERSION } from "../../ipc/protocol.ts";
import { DEVICE_FEATURES } from "../../device/negotiation.ts";
import { VIRTIO_NET_F_GUEST_CSUM } from "../../ipc/features.ts";
import { quietLogger, testConfig } from "../helpers.ts";
import { fuzzMessage, rng } from "./message_fuzz.ts";

const ROUNDS = 3000;
const SEED = Number(Deno.env.get("VIONET_FUZZ_SEED") ?? 0x5eed);

async function until(cond: () => boolean, what: string, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

Deno.test("the device survives random and mutated parent messages and still answers", async () => {
  const logger = quietLogger();
  const host = await DeviceHost.start({
    config: testConfig({ logLevel: "warn" }),
    handlers: { tunscap: (o) => o },
    logger,
  });
  try {
    const next = rng(SEED);
    const valid: Record<string, unknown>[] = [
      { kind: "hello", version: PROTOCOL_VERSION, config: testConfig() },
      { kind: "get-features", id: 100 },
      { kind: "set-features", id: 101, features: DEVICE_FEATURES },
      { kind: "reset", id: 102 },
      { kind: "get-stats", id: 103 },
      { kind: "get-permissions", id: 104 },
      { kind: "tunscap-result", id: 105, inForce: 0n },
      { kind: "error", id: 106, code: "refused", message: "no" },
    ];
    for (let i = 0; i < ROUNDS; i++) host.sendRaw(fuzzMessage(valid, next));
    // The device answered bad messages with typed errors naming the field.
    await until(
      () => logger.lines.some((l) => /peer reported malformed in [\w.[\]]+:/.test(l)),
      "a malformed-field error from the device",
    );
    assert.ok(logger.lines.some((l) => l.includes("peer reported unknown-kind")));
    assert.equal(await host.getFeatures(), DEVICE_FEATURES);
    assert.ok(host.alive, "device worker died");
  } finally {
    host.terminate();
  }
});

Deno.test("the parent survives a rogue device, refuses its bad requests and serves good ones", async () => {
  const logger = quietLogger();
  let refusedCount = 0;
  const host = await DeviceHost.start({
    config: testConfig(),
    handlers: {
      tunscap(offloads) {
        if (offloads & ~VIRTIO_NET_F_GUEST_CSUM) {
          refusedCount++;
          throw new RefusedError("outside the allowed mask", "offloads");
        }
        return offloads;
      },
    },
    logger,
    workerUrl: new URL("./rogue_device.ts", import.meta.url),
  });
  try {
    const next = rng(SEED + 1);
    const valid: Record<string, unknown>[] = [
      { kind: "ready", version: PROTOCOL_VERSION, features: 1n },
      { kind: "log", level: "info", message: "hi" },
      { kind: "tunscap", id: 1, offloads: VIRTIO_NET_F_GUEST_CSUM },
      { kind: "features", id: 2, features: 3n },
      { kind: "done", id: 3 },
      { kind: "stats", id: 4, queues: { rx: { frames: 1 } } },
      { kind: "permissions", id: 5, states: { read: "denied" } },
      { kind: "error", id: 6, code: "failed", message: "x" },
    ];
    const messages = Array.from({ length: ROUNDS }, () => fuzzMessage(valid, next));
    host.sendRaw({ kind: "rogue-send", messages });
    // Then a request outside the mask, and a good one.
    host.sendRaw({
      kind: "rogue-send",
      messages: [
        { kind: "tunscap", id: 900001, offloads: 0xffn },
        { kind: "tunscap", id: 900002, offloads: VIRTIO_NET_F_GUEST_CSUM },
      ],
    });
    await until(
      () =>
        logger.lines.some((l) => l.includes('"kind":"tunscap-result","inForce":"2n","id":900002')),
      "the parent's answer to a good TUNSCAP",
    );
    const refusal = logger.lines.find((l) => l.includes('"id":900001'));
    assert.match(refusal ?? "", /"kind":"error".*"code":"refused".*"field":"offloads"/);
    assert.ok(refusedCount >= 1);
    // The rogue's bad messages came back as typed errors naming fields.
    assert.ok(logger.lines.some((l) => /"code":"malformed","message":"[\w.[\]]+ /.test(l)));
    assert.ok(host.alive);
  } finally {
    host.terminate();
  }
});
