import assert from "node:assert/strict";
import { DEVICE_WORKER_OPTIONS, DeviceHost } from "../../parent/control/device_host.ts";
import { PERMISSION_NAMES } from "../../ipc/protocol.ts";
import { quietLogger, startTaskFlags, testConfig } from "../helpers.ts";
import { withNetns } from "../net_ns.ts";

Deno.test("device worker options say permissions none", () => {
  assert.equal(DEVICE_WORKER_OPTIONS.deno.permissions, "none");
});

Deno.test("inside the device worker no permission is granted", async () => {
  const host = await DeviceHost.start({
    config: testConfig(),
    handlers: { tunscap: () => 0n },
    logger: quietLogger(),
  });
  try {
    const states = await host.getPermissions();
    assert.deepEqual(Object.keys(states).sort(), [...PERMISSION_NAMES].sort());
    for (const name of PERMISSION_NAMES) {
      assert.notEqual(states[name], "granted", `device worker holds ${name}`);
    }
  } finally {
    host.terminate();
  }
});

Deno.test("the device worker cannot start a worker of its own (it would outlive terminate())", async () => {
  const worker = new Worker(
    new URL("./device_globals_probe.ts", import.meta.url),
    DEVICE_WORKER_OPTIONS,
  );
  try {
    const report = await new Promise<{ worker: string }>((resolve, reject) => {
      worker.onmessage = (e) => {
        if (e.data?.kind === "globals-probe") resolve(e.data);
      };
      worker.onerror = (e) => {
        e.preventDefault();
        reject(new Error(e.message));
      };
    });
    assert.equal(report.worker, "undefined", "Worker is still reachable in the device");
  } finally {
    worker.terminate();
  }
});

Deno.test({
  name: "under the daemon's own flags, every privileged operation in the device worker fails",
  ignore: Deno.uid() !== 0,
  async fn() {
    // In a fresh namespace: should anything get out of the sandbox, it still reaches nothing.
    await withNetns(async (ns) => {
      const probe = new URL("./permission_probe_main.ts", import.meta.url).pathname;
      const r = await ns.run([Deno.execPath(), "run", ...startTaskFlags(), probe]);
      assert.equal(r.code, 0, r.stderr);
      assert.doesNotMatch(r.stderr, /Download/, "the device worker made the runtime fetch code");
      const results = JSON.parse(r.stdout) as Record<
        string,
        { query: string; request: string; attempt: string }
      >;
      for (const name of [...PERMISSION_NAMES, "import-npm"]) {
        const res = results[name];
        assert.ok(res, `probe did not try ${name}`);
        assert.notEqual(res.query, "granted", `${name} is granted`);
        assert.equal(res.request, "denied", `${name} could be requested`);
        assert.doesNotMatch(res.attempt, /^succeeded/, `${name} succeeded`);
      }
      for (const name of ["read", "write", "net", "env", "run", "ffi", "sys"]) {
        assert.match(
          results[name].attempt,
          /^NotCapable: Requires/,
          `${name}: ${results[name].attempt}`,
        );
      }
      assert.match(results.import.attempt, /Requires import access/);
      assert.match(results["import-npm"].attempt, /Failed loading/);
    });
  },
});
