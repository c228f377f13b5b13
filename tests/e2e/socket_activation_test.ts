/**
 * Socket activation the way contrib/systemd/vionet@.service runs the daemon,
 * without a systemd to run it: `systemd-socket-activate` makes the listening
 * socket and, on QEMU's first connection, execs the daemon with LISTEN_FDS,
 * LISTEN_PID and LISTEN_FDNAMES=vhost-user; `setpriv` stands in for the
 * unit's `User=`, `AmbientCapabilities=CAP_NET_ADMIN CAP_BPF`,
 * `CapabilityBoundingSet=CAP_NET_ADMIN CAP_BPF` and `NoNewPrivileges=yes` (as
 * `nobody`, since this machine has no `vionet` user), and a directory the
 * user owns stands in for `RuntimeDirectory=`. A real guest boots against it
 * and pings the host through the tap the daemon created with that one
 * capability; the daemon then holds none, on every thread, under its own
 * sandbox; curl reads its metrics; SIGTERM removes the tap and the metrics
 * socket.
 */

import assert from "node:assert/strict";
import { bootGuest, type Guest, guestAssets, netKernelArgs } from "./guest.ts";
import {
  GUEST_IP,
  GUEST_MAC,
  HOST_IP,
  NetnsProcess,
  rigUnavailable,
  vhostUserNetdevArgs,
} from "./vionet_rig.ts";
import { assertSandboxed, ROOT, startTaskEnv, startTaskFlags } from "../helpers.ts";

const TOOLS = ["/usr/bin/systemd-socket-activate", "/usr/bin/setpriv", "/usr/bin/curl"];
const missing = TOOLS.find((t) => {
  try {
    return !Deno.statSync(t).isFile;
  } catch {
    return true;
  }
});
const unavailable = rigUnavailable() ??
  (missing ? `needs ${missing} (scripts/setup.sh --test: systemd, util-linux, curl)` : undefined);

const NOBODY = 65534;
const TAP = "vionet-sa";

async function sh(argv: string[]): Promise<{ code: number; out: string }> {
  const o = await new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const dec = new TextDecoder();
  return { code: o.code, out: dec.decode(o.stdout) + dec.decode(o.stderr) };
}

/** Every thread's capability sets of `pid`, as /proc shows them. */
function threadCaps(pid: number): { tid: string; caps: string }[] {
  const out = [];
  for (const t of Deno.readDirSync(`/proc/${pid}/task`)) {
    let status: string;
    try {
      status = Deno.readTextFileSync(`/proc/${pid}/task/${t.name}/status`);
    } catch {
      continue;
    }
    const caps = ["CapInh", "CapPrm", "CapEff", "CapAmb"]
      .map((k) => new RegExp(`^${k}:\\s*(\\S+)`, "m").exec(status)?.[1]).join(" ");
    out.push({ tid: t.name, caps });
  }
  return out;
}

Deno.test({
  name: "socket activation as vionet@.service does it: systemd-socket-activate passes the " +
    "listener to a daemon started unprivileged with CAP_NET_ADMIN and CAP_BPF; a guest pings through it",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const netns = `vionet-sa-${crypto.randomUUID().slice(0, 8)}`;
    const dir = await Deno.makeTempDir({ prefix: "vionet-sa-" });
    let activator: NetnsProcess | undefined;
    let guest: Guest | undefined;
    try {
      await Deno.chmod(dir, 0o755);
      assert.equal((await sh(["ip", "netns", "add", netns])).code, 0);
      await sh(["ip", "-n", netns, "link", "set", "lo", "up"]);
      // RuntimeDirectory=vionet/%i: the user's, mode 0750.
      const runDir = `${dir}/run-${TAP}`;
      await Deno.mkdir(runDir, { mode: 0o750 });
      await Deno.chown(runDir, NOBODY, NOBODY);
      const socketPath = `${dir}/${TAP}.sock`;
      const metricsPath = `${runDir}/metrics.sock`;
      activator = new NetnsProcess(
        netns,
        [
          "/usr/bin/systemd-socket-activate",
          "--listen",
          socketPath,
          "--fdname=vhost-user",
          "/usr/bin/setpriv",
          `--reuid=${NOBODY}`,
          `--regid=${NOBODY}`,
          "--clear-groups",
          "--inh-caps=+net_admin,+bpf",
          "--ambient-caps=+net_admin,+bpf",
          "--bounding-set=-all,+net_admin,+bpf",
          "--no-new-privs",
          Deno.execPath(),
          "run",
          ...startTaskFlags(),
          "main.ts",
          "--tap",
          TAP,
          "--metrics",
          metricsPath,
        ],
        ROOT,
        startTaskEnv(),
      );
      await activator.waitFor(/^Listening on .* as 3\./, 15_000);

      // QEMU's connection is what starts the daemon; its messages wait in the socket meanwhile.
      const assets = guestAssets();
      guest = await bootGuest({
        kernel: assets.kernel,
        initrd: assets.initrd,
        netns,
        memoryMiB: 256,
        netdevArgs: vhostUserNetdevArgs(socketPath, { mac: GUEST_MAC }),
        kernelArgs: netKernelArgs({ ip: `${GUEST_IP}/24`, gw: HOST_IP }),
      });
      await activator.waitFor(
        /serving vhost-user on the socket the supervisor passed \(LISTEN_FDS=1: fd 3, named vhost-user, [^)]*vionet-sa.sock\)/,
        60_000,
      );
      assert.equal(
        (await sh(["ip", "-n", netns, "addr", "add", `${HOST_IP}/24`, "dev", TAP])).code,
        0,
      );
      await sh(["ip", "-n", netns, "link", "set", TAP, "up"]);
      const boot = await guest.waitForBoot(120_000);
      assert.equal(boot.netStatus, "ok", guest.console());
      const ping = await guest.run(`ping -c 3 -W 5 ${HOST_IP}`, 30_000);
      assert.equal(ping.status, 0, `${ping.output}\n--- daemon ---\n${activator.output()}`);

      const log = activator.output();
      assert.match(log, new RegExp(`started unprivileged: keeps uid ${NOBODY}`));
      assert.match(log, /dropped \d+ capabilities on \d+ threads; kept none/);
      assert.match(log, /seccomp filter on all \d+ threads/);
      // CAP_BPF was enough for a multi-queue tap's steering program (none with one queue).
      assert.doesNotMatch(log, /steering program/);
      // The daemon is the process systemd-socket-activate became (LISTEN_PID).
      const pid = activator.pid;
      assertSandboxed(pid, NOBODY, NOBODY, "socket-activated daemon");
      for (const t of threadCaps(pid)) {
        assert.equal(
          t.caps,
          "0000000000000000 0000000000000000 0000000000000000 0000000000000000",
          `thread ${t.tid}: CapInh CapPrm CapEff CapAmb`,
        );
      }

      const scrape = await sh([
        "curl",
        "-sS",
        "--max-time",
        "10",
        "--unix-socket",
        metricsPath,
        "http://localhost/metrics",
      ]);
      assert.equal(scrape.code, 0, scrape.out);
      assert.match(scrape.out, /^vionet_connections_total 1$/m);
      assert.match(scrape.out, /^vionet_frontend_connected 1$/m);

      guest.kill();
      await guest.closed;
      const status = await activator.stop(10_000);
      assert.equal(status.code, 0, activator.output());
      assert.notEqual((await sh(["ip", "-n", netns, "link", "show", TAP])).code, 0, "tap removed");
      assert.throws(() => Deno.lstatSync(metricsPath), Deno.errors.NotFound, "metrics socket gone");
    } finally {
      guest?.kill();
      await guest?.closed;
      await activator?.kill();
      await sh(["ip", "netns", "del", netns]);
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
