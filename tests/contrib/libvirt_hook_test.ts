/**
 * contrib/libvirt/vionet-hook, fed the domain XML and hook arguments
 * directly, as libvirt would: which interfaces it acts on, what it asks of
 * systemd (a stub `systemctl` records it), and, without systemd, a real
 * daemon started detached in a network namespace, reused on a second
 * `prepare begin`, and stopped on `release end`.
 */

import assert from "node:assert/strict";
import { ROOT, startTaskEnv, startTaskFlags } from "../helpers.ts";
import { tapTestsUnavailable } from "../net_ns.ts";

const HOOK = `${ROOT}contrib/libvirt/vionet-hook`;
const dec = new TextDecoder();

/** Runs the hook with `args`, `xml` on stdin, `env` added; optionally inside netns `netns`. */
async function hook(
  args: string[],
  xml: string,
  env: Record<string, string>,
  netns?: string,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const argv = netns ? ["ip", "netns", "exec", netns, "/bin/sh", HOOK] : ["/bin/sh", HOOK];
  const child = new Deno.Command(argv[0], {
    args: [...argv.slice(1), ...args],
    env,
    stdin: "piped",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const w = child.stdin.getWriter();
  await w.write(new TextEncoder().encode(xml));
  await w.close();
  const out = await child.output();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/** A domain as libvirt writes it, with `interfaces` inside <devices>. */
function domain(name: string, interfaces: string): string {
  return `<domain type='qemu' id='3'>
  <name>${name}</name>
  <uuid>0b6d6e2a-6b1e-4d7a-9c4e-5f2a1b3c4d5e</uuid>
  <memory unit='KiB'>262144</memory>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
${interfaces}
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>
`;
}

const MIXED = domain(
  "mixed",
  `    <interface type='vhostuser'>
      <mac address='52:54:00:00:00:01'/>
      <source type='unix' path='/run/vionet/a.sock' mode='client'/>
      <model type='virtio'/>
    </interface>
    <interface type="vhostuser">
      <source
          mode="client" path="/run/vionet/b-0.sock"
          type="unix">
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type="virtio"/>
    </interface>
    <interface type='vhostuser'>
      <source type='unix' path='/run/other/c.sock' mode='client'/>
    </interface>
    <interface type='vhostuser'>
      <source type='unix' path='/run/vionet/listening.sock' mode='server'/>
    </interface>
    <interface type='vhostuser'>
      <source type='unix' path='/run/vionet/sixteen-chars-xx.sock' mode='client'/>
    </interface>
    <interface type='vhostuser'>
      <source type='unix' path='/run/vionet/sub/d.sock' mode='client'/>
    </interface>
    <interface type='network'>
      <source network='default' path='/run/vionet/e.sock'/>
    </interface>
    <!-- <interface type='vhostuser'> in a comment is still read as a tag: harmless here -->`,
);

/** A stub `systemctl` that records its arguments; exits with $STUB_STATUS. */
async function stubSystemctl(dir: string): Promise<string> {
  const log = `${dir}/systemctl.log`;
  await Deno.writeTextFile(
    `${dir}/systemctl`,
    `#!/bin/sh\necho "$*" >>'${log}'\nexit "\${STUB_STATUS:-0}"\n`,
    { mode: 0o755 },
  );
  return log;
}

Deno.test("vionet-hook with systemd: starts vionet@NAME.socket for each client-mode vhost-user socket in its directory, stops socket and service at release", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vionet-hook-" });
  try {
    const log = await stubSystemctl(dir);
    await Deno.writeTextFile(`${dir}/hook.conf`, "VIONET_START=systemd\n");
    const env = {
      PATH: `${dir}:/usr/bin:/bin`,
      VIONET_HOOK_CONF: `${dir}/hook.conf`,
    };
    const calls = async (args: string[], xml = MIXED, extra: Record<string, string> = {}) => {
      await Deno.remove(log).catch(() => {});
      const r = await hook(args, xml, { ...env, ...extra });
      const text = await Deno.readTextFile(log).catch(() => "");
      return { ...r, calls: text.split("\n").filter((l) => l !== "") };
    };
    const started = await calls(["mixed", "prepare", "begin", "-"]);
    assert.equal(started.code, 0, started.stderr);
    assert.deepEqual(started.calls, ["start vionet@a.socket", "start vionet@b-0.socket"]);
    assert.deepEqual(
      (await calls(["mixed", "migrate", "begin", "-"])).calls,
      ["start vionet@a.socket", "start vionet@b-0.socket"],
      "a migration's destination",
    );
    assert.deepEqual((await calls(["mixed", "release", "end", "-"])).calls, [
      "stop vionet@a.socket vionet@a.service",
      "stop vionet@b-0.socket vionet@b-0.service",
    ]);
    for (const op of [["started", "begin"], ["stopped", "end"], ["prepare", "end"]]) {
      const r = await calls(["mixed", ...op, "-"]);
      assert.equal(r.code, 0);
      assert.deepEqual(r.calls, [], op.join(" "));
    }
    assert.deepEqual(
      (await calls(["plain", "prepare", "begin", "-"], domain("plain", ""))).calls,
      [],
    );
    const failed = await calls(["mixed", "prepare", "begin", "-"], MIXED, { STUB_STATUS: "1" });
    assert.equal(failed.code, 1, "a unit that does not start fails the hook (and the domain)");

    // VIONET_MAC=yes: each interface's <mac> reaches its unit through NAME.env.
    const runDir = `${dir}/run`;
    await Deno.writeTextFile(
      `${dir}/hook.conf`,
      `VIONET_START=systemd\nVIONET_MAC=yes\nVIONET_RUN_DIR='${runDir}'\n`,
    );
    const withMac = domain(
      "macs",
      `    <interface type='vhostuser'>
      <source type='unix' path='/run/vionet/m1.sock' mode='client'/>
      <mac address="52:54:00:AB:cd:02"/>
    </interface>
    <interface type='vhostuser'>
      <mac address='52:54:00:00:00:zz'/>
      <source type='unix' path='/run/vionet/m2.sock' mode='client'/>
    </interface>
    <interface type='vhostuser'>
      <source type='unix' path='/run/vionet/m3.sock' mode='client'/>
    </interface>`,
    );
    const up = await calls(["macs", "prepare", "begin", "-"], withMac);
    assert.equal(up.code, 0, up.stderr);
    assert.deepEqual(up.calls, [
      "start vionet@m1.socket",
      "start vionet@m2.socket",
      "start vionet@m3.socket",
    ]);
    assert.equal(
      await Deno.readTextFile(`${runDir}/m1.env`),
      "VIONET_MAC_ARGS=--mac 52:54:00:AB:cd:02\n",
      "a <mac> after <source> counts too",
    );
    assert.match(up.stderr, /ignoring MAC address '52:54:00:00:00:zz'/);
    assert.throws(() => Deno.lstatSync(`${runDir}/m2.env`), Deno.errors.NotFound);
    assert.throws(() => Deno.lstatSync(`${runDir}/m3.env`), Deno.errors.NotFound);
    assert.equal((await calls(["macs", "release", "end", "-"], withMac)).code, 0);
    assert.throws(
      () => Deno.lstatSync(`${runDir}/m1.env`),
      Deno.errors.NotFound,
      "removed at release",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("vionet-hook runs the start task's flags and environment", async () => {
  const text = await Deno.readTextFile(HOOK);
  const flags = /^deno_flags="([^"]*)"$/m.exec(text)?.[1].split(" ");
  assert.deepEqual(flags, startTaskFlags());
  const env = /^deno_env="([^"]*)"$/m.exec(text)?.[1].split(" ")
    .map((w) => w.split("=", 2) as [string, string]);
  assert.deepEqual(Object.fromEntries(env ?? []), startTaskEnv());
  const code = text.split("\n").filter((l) => !l.trimStart().startsWith("#")).join("\n");
  assert.doesNotMatch(code, /\bvirsh\b/, "a hook never calls back into libvirt");
});

const unavailable = tapTestsUnavailable(["ip", "setsid"], "iproute2 util-linux");

async function sh(argv: string[]): Promise<{ code: number; out: string }> {
  const o = await new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  return { code: o.code, out: dec.decode(o.stdout) + dec.decode(o.stderr) };
}

function alive(pid: number): boolean {
  try {
    const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
    return !/^\d+ \(.*\) Z /.test(stat);
  } catch {
    return false;
  }
}

Deno.test({
  name: "vionet-hook without systemd: prepare begin starts a detached daemon and returns once it " +
    "listens (socket group and mode set); a second one reuses it; release end stops it",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const netns = `vionet-hk-${crypto.randomUUID().slice(0, 8)}`;
    const dir = await Deno.makeTempDir({ prefix: "vionet-hook-" });
    const pids: number[] = [];
    try {
      await Deno.chmod(dir, 0o755);
      assert.equal((await sh(["ip", "netns", "add", netns])).code, 0);
      const socketDir = `${dir}/sock`;
      const runDir = `${dir}/run`;
      const name = "vhk0";
      const sock = `${socketDir}/${name}.sock`;
      const metrics = `${dir}/metrics/${name}.sock`;
      const settings = (args: string) =>
        [
          "VIONET_START=direct",
          `VIONET_DIR='${ROOT}'`,
          `VIONET_DENO='${Deno.execPath()}'`,
          `VIONET_SOCKET_DIR='${socketDir}'`,
          `VIONET_RUN_DIR='${runDir}'`,
          "VIONET_SOCKET_GROUP=kvm",
          `VIONET_ARGS='${args}'`,
          "VIONET_MAC=yes",
        ].join("\n") + "\n";
      await Deno.writeTextFile(`${dir}/hook.conf`, settings(`--metrics ${dir}/metrics/%n.sock`));
      const env = { VIONET_HOOK_CONF: `${dir}/hook.conf`, PATH: "/usr/sbin:/usr/bin:/sbin:/bin" };
      const xml = domain(
        "direct",
        `    <interface type='vhostuser'>
      <mac address='52:54:00:12:34:56'/>
      <source type='unix' path='${sock}' mode='client'/>
    </interface>`,
      );

      const t0 = Date.now();
      const up = await hook(["direct", "prepare", "begin", "-"], xml, env, netns);
      assert.equal(up.code, 0, up.stderr);
      console.log(`  prepare begin returned after ${Date.now() - t0} ms`);
      const pid = Number(await Deno.readTextFile(`${runDir}/${name}.pid`));
      pids.push(pid);
      assert.ok(alive(pid), "the daemon runs after the hook returned");
      const st = Deno.statSync(sock);
      assert.ok(st.isSocket, "the socket listens when the hook returns");
      assert.equal(st.mode! & 0o777, 0o660);
      const kvm = /^kvm:x:(\d+):/m.exec(await Deno.readTextFile("/etc/group"))?.[1];
      assert.equal(String(st.gid), kvm, "the socket's group is kvm");
      assert.equal(Deno.statSync(socketDir).mode! & 0o777, 0o755, "QEMU can reach it");
      assert.ok(Deno.statSync(metrics).isSocket, "%n in VIONET_ARGS is the name");
      assert.equal((await sh(["ip", "-n", netns, "link", "show", name])).code, 0, "its tap");
      const log = await Deno.readTextFile(`${runDir}/${name}.log`);
      assert.match(log, /running as user nobody|running as user vionet/);
      // Its own session: not in the hook's (nor libvirtd's) process group.
      const stat = (await Deno.readTextFile(`/proc/${pid}/stat`)).replace(/^.*\) /, "").split(" ");
      assert.equal(stat[3], String(pid), "session leader");
      const cmdline = (await Deno.readTextFile(`/proc/${pid}/cmdline`)).split("\0");
      assert.equal(cmdline[cmdline.indexOf("--mac") + 1], "52:54:00:12:34:56", "VIONET_MAC=yes");

      const again = await hook(["direct", "prepare", "begin", "-"], xml, env, netns);
      assert.equal(again.code, 0, again.stderr);
      assert.equal(Number(await Deno.readTextFile(`${runDir}/${name}.pid`)), pid, "reused");

      const down = await hook(["direct", "release", "end", "-"], xml, env, netns);
      assert.equal(down.code, 0, down.stderr);
      assert.ok(!alive(pid), "the daemon is gone when the hook returns");
      assert.throws(() => Deno.lstatSync(sock), Deno.errors.NotFound);
      assert.throws(() => Deno.lstatSync(`${runDir}/${name}.pid`), Deno.errors.NotFound);
      assert.throws(() => Deno.lstatSync(metrics), Deno.errors.NotFound);
      assert.notEqual((await sh(["ip", "-n", netns, "link", "show", name])).code, 0, "tap gone");
      assert.match(await Deno.readTextFile(`${runDir}/${name}.log`), /SIGTERM: shutting down/);

      // A daemon that cannot start fails the hook, with its reason.
      await Deno.writeTextFile(`${dir}/hook.conf`, settings("--no-such-option"));
      const bad = await hook(["direct", "prepare", "begin", "-"], xml, env, netns);
      assert.equal(bad.code, 1);
      assert.match(
        bad.stderr,
        /vionet for vhk0 did not start[\s\S]*unknown option --no-such-option/,
      );
      assert.throws(() => Deno.lstatSync(`${runDir}/${name}.pid`), Deno.errors.NotFound);
    } finally {
      for (const pid of pids) {
        if (alive(pid)) Deno.kill(pid, "SIGKILL");
      }
      await sh(["ip", "netns", "del", netns]);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
