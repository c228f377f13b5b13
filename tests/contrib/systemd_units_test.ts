/**
 * contrib/systemd: `systemd-analyze verify` accepts both units as they are
 * (no warning either), and the units agree with the code they start: the
 * service runs the start task's flags and environment, holds exactly the
 * capabilities the audit says set-up needs, and the socket is where the
 * daemon would listen by itself, named as socket activation looks for it.
 */

import assert from "node:assert/strict";
import { ROOT, startTaskEnv, startTaskFlags } from "../helpers.ts";
import { buildAudit } from "../../parent/host/audit.ts";
import { defaultSocketPath } from "../../parent/control/cli.ts";
import { VHOST_USER_FD_NAME } from "../../parent/control/listen_fds.ts";

const DIR = `${ROOT}contrib/systemd`;
const ANALYZE = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"].find((p) => {
  try {
    return Deno.statSync(p).isFile;
  } catch {
    return false;
  }
});

/** The unit's `Key=value` lines by key, in order (comments and sections left out). */
function keys(text: string): Map<string, string[]> {
  const out = new Map<string, string[]>();
  for (const line of text.split("\n")) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) out.set(m[1], [...(out.get(m[1]) ?? []), m[2]]);
  }
  return out;
}

function one(unit: Map<string, string[]>, key: string): string {
  const v = unit.get(key);
  assert.equal(v?.length, 1, `${key}: ${JSON.stringify(v)}`);
  return v![0];
}

const service = keys(Deno.readTextFileSync(`${DIR}/vionet@.service`));
const socket = keys(Deno.readTextFileSync(`${DIR}/vionet@.socket`));

/** Runs systemd-analyze verify on instances of the units in `dir`; its status and output. */
async function verify(dir: string): Promise<{ code: number; output: string }> {
  const out = await new Deno.Command(ANALYZE!, {
    args: ["verify", `${dir}/vionet@tap0.socket`, `${dir}/vionet@tap0.service`],
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  return { code: out.code, output: (dec.decode(out.stdout) + dec.decode(out.stderr)).trim() };
}

Deno.test({
  name: "systemd-analyze verify accepts vionet@.service and vionet@.socket without a word",
  ignore: ANALYZE === undefined,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vionet-units-" });
    try {
      for (const f of ["vionet@.service", "vionet@.socket"]) {
        await Deno.copyFile(`${DIR}/${f}`, `${dir}/${f}`);
      }
      const good = await verify(dir);
      assert.equal(good.code, 0, good.output);
      assert.equal(good.output, "", "systemd-analyze had something to say");
      // The check can fail: a misspelt key is reported.
      const text = await Deno.readTextFile(`${dir}/vionet@.service`);
      await Deno.writeTextFile(
        `${dir}/vionet@.service`,
        text.replace("NoNewPrivileges=yes", "NoNewPrivilege=yes"),
      );
      assert.match((await verify(dir)).output, /Unknown key 'NoNewPrivilege'/);
    } finally {
      await Deno.remove(dir, { recursive: true });
    }
  },
});
if (ANALYZE === undefined) {
  console.log("systemd_units_test: systemd-analyze is missing (apt-get install systemd); skipped");
}

Deno.test("vionet@.service runs the start task: its flags, environment and module, socket-activated", () => {
  const words = one(service, "ExecStart").split(/\s+/);
  assert.deepEqual(words.slice(0, 2), ["deno", "run"]);
  const flags = words.slice(2, words.indexOf("main.ts"));
  assert.deepEqual(flags, startTaskFlags(), "the unit's Deno flags are the start task's");
  assert.ok(flags.some((f) => /^--allow-env=.*\bLISTEN_FDS\b/.test(f)));
  const env = Object.fromEntries(
    one(service, "Environment").split(/\s+/).map((w) => w.split("=", 2) as [string, string]),
  );
  assert.deepEqual(env, startTaskEnv());
  const args = words.slice(words.indexOf("main.ts") + 1);
  assert.ok(!args.includes("--socket-path") && !args.includes("--fd"), "the socket is passed");
  assert.deepEqual(args.slice(0, 2), ["--tap", "%i"]);
  // The libvirt hook's --mac (VIONET_MAC=yes), from the optional per-instance file.
  assert.equal(args.at(-1), "$VIONET_MAC_ARGS");
  assert.equal(one(service, "EnvironmentFile"), "-/run/vionet-hook/%i.env");
  const metrics = args[args.indexOf("--metrics") + 1];
  assert.equal(metrics, `/run/${one(service, "RuntimeDirectory")}/metrics.sock`);
  assert.equal(one(service, "WorkingDirectory"), "/opt/vionet", "--allow-read=. is the repository");
});

Deno.test("vionet@.service holds only the capabilities the audit says set-up needs, and no_new_privs", () => {
  const needed = buildAudit({
    socketPath: null,
    listenFd: 3,
    client: false,
    tap: "tap0",
    tapFd: null,
  }).capabilities.neededForSetup.map((c) => c.name);
  assert.deepEqual(one(service, "AmbientCapabilities").split(" "), needed);
  assert.deepEqual(one(service, "CapabilityBoundingSet").split(" "), needed);
  assert.equal(one(service, "NoNewPrivileges"), "yes");
  assert.equal(one(service, "User"), "vionet", "the daemon's default user");
  assert.deepEqual(one(service, "RestrictAddressFamilies").split(" ").sort(), [
    "AF_INET",
    "AF_UNIX",
  ]);
  assert.equal(service.has("MemoryDenyWriteExecute"), false, "V8's JIT needs W^X flips");
  assert.equal(service.has("ProcSubset"), false, "/proc/net/dev is read for the metrics");
});

Deno.test("vionet@.socket listens where the daemon would, for the VMM's group, named vhost-user", () => {
  assert.equal(one(socket, "ListenStream"), defaultSocketPath("%i", {}));
  assert.equal(one(socket, "FileDescriptorName"), VHOST_USER_FD_NAME);
  assert.equal(one(socket, "SocketMode"), "0660");
  assert.equal(one(socket, "SocketGroup"), "kvm");
  assert.equal(one(socket, "RemoveOnStop"), "yes");
  assert.equal(one(socket, "Service"), "vionet@%i.service");
});
