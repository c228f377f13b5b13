import assert from "node:assert/strict";
import { parseDeviceMessage, parseParentMessage, ValidationError } from "../../ipc/validate.ts";
import { PROTOCOL_VERSION } from "../../ipc/protocol.ts";

function rejects(fn: () => unknown, code: string, field?: string) {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof ValidationError, `threw ${e}`);
    assert.equal(e.code, code, e.message);
    if (field !== undefined) assert.equal(e.field, field, e.message);
    return e;
  }
  assert.fail("did not throw");
}

const hello = {
  kind: "hello",
  version: PROTOCOL_VERSION,
  config: { mac: [0x52, 0x54, 0, 1, 2, 3], mtu: 1500, offloadMode: "auto", logLevel: "info" },
};

Deno.test("parseParentMessage accepts a well-formed hello", () => {
  assert.deepEqual(parseParentMessage(hello), hello);
  const open = { ...hello, config: { ...hello.config, mac: null } };
  assert.deepEqual(parseParentMessage(open), open);
});

Deno.test("parseParentMessage names the bad field of a nested config", async (t) => {
  const cases: [string, unknown, string][] = [
    ["mac octet over 255", { ...hello.config, mac: [1, 2, 3, 4, 5, 256] }, "config.mac[5]"],
    ["mac too short", { ...hello.config, mac: [1, 2, 3] }, "config.mac"],
    ["mtu not an integer", { ...hello.config, mtu: 1500.5 }, "config.mtu"],
    ["mtu below 68", { ...hello.config, mtu: 67 }, "config.mtu"],
    ["mac missing (null means: not enforced)", { ...hello.config, mac: undefined }, "config.mac"],
    ["mac a group address", { ...hello.config, mac: [1, 2, 3, 4, 5, 6] }, "config.mac"],
    ["mac all zeros", { ...hello.config, mac: [0, 0, 0, 0, 0, 0] }, "config.mac"],
    ["unknown offload mode", { ...hello.config, offloadMode: "maybe" }, "config.offloadMode"],
    ["log level missing", { ...hello.config, logLevel: undefined }, "config.logLevel"],
  ];
  for (const [name, config, field] of cases) {
    await t.step(name, () => {
      rejects(() => parseParentMessage({ ...hello, config }), "malformed", field);
    });
  }
});

Deno.test("parseDeviceMessage checks tunscap's 64-bit offloads", async (t) => {
  assert.deepEqual(parseDeviceMessage({ kind: "tunscap", id: 3, offloads: 2n }), {
    kind: "tunscap",
    id: 3,
    offloads: 2n,
  });
  for (const offloads of [-1n, 2n ** 64n, 2, "2", null]) {
    await t.step(`rejects ${String(offloads)}`, () => {
      const e = rejects(
        () => parseDeviceMessage({ kind: "tunscap", id: 3, offloads }),
        "malformed",
        "offloads",
      );
      assert.equal(e.id, 3, "the error keeps the request id so the sender can match it");
    });
  }
});

Deno.test("an unknown kind is unknown-kind, not malformed", () => {
  rejects(() => parseDeviceMessage({ kind: "format-disk", id: 1 }), "unknown-kind", "kind");
  rejects(() => parseParentMessage({ kind: "tunscap", id: 1, offloads: 0n }), "unknown-kind");
});

Deno.test("non-objects and missing kinds are malformed", () => {
  for (const raw of [null, 3, "hello", [], new Uint8Array(2), { id: 1 }]) {
    rejects(() => parseDeviceMessage(raw), "malformed");
  }
});

Deno.test("request ids must be non-negative 31-bit integers", () => {
  for (const id of [-1, 1.5, 2 ** 31, "1", null]) {
    rejects(() => parseParentMessage({ kind: "get-features", id }), "malformed", "id");
  }
});

Deno.test("an error may carry id null; its text is bounded", () => {
  assert.deepEqual(
    parseDeviceMessage({ kind: "error", id: null, code: "malformed", message: "x" }),
    { kind: "error", id: null, code: "malformed", field: undefined, message: "x" },
  );
  rejects(
    () =>
      parseDeviceMessage({ kind: "error", id: 1, code: "malformed", message: "x".repeat(5000) }),
    "malformed",
    "message",
  );
  rejects(
    () => parseDeviceMessage({ kind: "error", id: 1, code: "boom", message: "x" }),
    "malformed",
    "code",
  );
});

Deno.test("stats counters must be non-negative numbers", () => {
  rejects(
    () => parseDeviceMessage({ kind: "stats", id: 1, queues: { rx: { frames: -1 } } }),
    "malformed",
    "queues.rx.frames",
  );
});
