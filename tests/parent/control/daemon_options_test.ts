/**
 * The options that decide what the daemon sets up, each checked where it
 * shows (issue 28): `--socket-group`/`--socket-mode` on the socket and its
 * directory, and whether an unprivileged user can connect; `--mtu` on the
 * tap, kept from a persistent tap without it, refused for an inherited tap
 * it cannot set; the QEMU options printed with `--mac`, `--mtu` and `--fd`.
 */
import assert from "node:assert/strict";
import { attachText, QEMU_RECONNECT_NOTE, startDaemon } from "../../../parent/control/daemon.ts";
import { parseOptions } from "../../../parent/control/cli.ts";
import { createTap } from "../../../parent/host/tap.ts";
import * as libc from "../../../parent/host/libc.ts";
import { exec, type Netns, run, tapTestsUnavailable, withNetns } from "../../net_ns.ts";
import { quietLogger, ROOT, startTaskFlags } from "../../helpers.ts";

const skip = tapTestsUnavailable();
const QEMU_USER = "libvirt-qemu";
const noQemuUser = (await run(["id", "-u", QEMU_USER]).catch(() => ({ code: 1 }))).code !== 0
  ? `needs the ${QEMU_USER} user (apt-get install -y libvirt-daemon-system)`
  : undefined;
if (skip ?? noQemuUser) {
  console.warn(
    `tests/parent/control/daemon_options_test.ts: some tests skipped: ${skip ?? noQemuUser}`,
  );
}

/**
 * The user the daemon becomes after set-up (`--user`, given to every run
 * here): the socket's directories vionet made are handed to it, keeping the
 * socket's group.
 */
const DAEMON_USER = "nobody";
const DAEMON_GROUP = (await run(["id", "-gn", DAEMON_USER]).catch(() => ({ stdout: "" }))).stdout
  .trim();

function tapName(): string {
  return `vo${crypto.randomUUID().replaceAll("-", "").slice(0, 8)}`;
}

/** The daemon as `deno task start` runs it, in `ns`; stopped with SIGTERM when `fn` ends. */
async function withMain(
  ns: Netns,
  args: string[],
  fn: (out: { stdout: () => string; stderr: () => string }) => Promise<void>,
  env: Record<string, string> = {},
): Promise<void> {
  const argv = [Deno.execPath(), "run", ...startTaskFlags(), `${ROOT}main.ts`, ...args];
  const child = ns.spawn([...argv, "--user", DAEMON_USER], {
    stdout: "piped",
    stderr: "piped",
    env,
    cwd: ROOT,
  });
  const stdout = collect(child.stdout);
  const stderr = collect(child.stderr);
  try {
    const end = Date.now() + 30_000;
    // Set-up is done when it logged where it serves and printed how to attach.
    while (
      !/listening on|serving vhost-user/.test(stderr.text()) || !/^vionet: tap /.test(stdout.text())
    ) {
      if (Date.now() > end) assert.fail(`the daemon did not start:\n${stderr.text()}`);
      const done = await Promise.race([child.status, new Promise((r) => setTimeout(r, 50))]);
      if (done) assert.fail(`the daemon exited:\n${stderr.text()}`);
    }
    await fn({ stdout: stdout.text, stderr: stderr.text });
  } finally {
    try {
      child.kill("SIGTERM");
    } catch { /* gone */ }
    const status = await child.status;
    assert.equal(status.code, 0, stderr.text());
  }
}

function collect(stream: ReadableStream<Uint8Array>) {
  let buf = "";
  const dec = new TextDecoder();
  (async () => {
    for await (const chunk of stream) buf += dec.decode(chunk, { stream: true });
  })();
  return { text: () => buf };
}

/** Owner, group and mode of `path`, as `stat` prints them. */
async function stat(path: string): Promise<string> {
  return (await exec(["stat", "-c", "%U:%G %a", path])).trim();
}

/** Connects to the unix socket at `path` as `user`; "ok" or the error's name. */
async function connectAs(user: string, path: string): Promise<string> {
  const denoDir = await Deno.makeTempDir({ prefix: "vionet-deno-" });
  try {
    await Deno.chmod(denoDir, 0o777);
    const r = await run([
      "runuser",
      "-u",
      user,
      "--",
      "env",
      `DENO_DIR=${denoDir}`,
      `HOME=${denoDir}`,
      Deno.execPath(),
      "eval",
      `try { (await Deno.connect({ transport: "unix", path: ${
        JSON.stringify(path)
      } })).close(); console.log("ok"); } catch (e) { console.log(e.name); }`,
    ]);
    return r.stdout.trim() || r.stderr.trim();
  } finally {
    await Deno.remove(denoDir, { recursive: true });
  }
}

/** A temporary directory everyone may enter (mkdtemp makes 0700), removed after `fn`. */
async function withOpenTmp(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vionet-sock-" });
  try {
    await Deno.chmod(dir, 0o755);
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test({
  name: "--socket-group libvirt-qemu: socket 0660 and directories 0750 in that group; " +
    "that user connects, and without the option it cannot",
  ignore: (skip ?? noQemuUser) !== undefined,
  fn: () =>
    withNetns((ns) =>
      withOpenTmp(async (tmp) => {
        const sock = `${tmp}/run/vionet/v.sock`;
        await withMain(
          ns,
          ["--tap", tapName(), "--socket-path", sock, "--socket-group", QEMU_USER],
          async ({ stdout, stderr }) => {
            assert.equal(await stat(sock), `root:${QEMU_USER} 660`);
            assert.equal(await stat(`${tmp}/run/vionet`), `${DAEMON_USER}:${QEMU_USER} 750`);
            assert.equal(await stat(`${tmp}/run`), `${DAEMON_USER}:${QEMU_USER} 750`);
            assert.match(stderr(), new RegExp(`mode 0660, group ${QEMU_USER} \\(\\d+\\)`));
            assert.match(stdout(), new RegExp(`path=${sock},reconnect=1`));
            assert.equal(await connectAs(QEMU_USER, sock), "ok");
          },
        );
        assert.equal(libc.lstat(sock), null, "the socket is removed at exit");
        await Deno.remove(`${tmp}/run`, { recursive: true });
        await withMain(ns, ["--tap", tapName(), "--socket-path", sock], async () => {
          assert.equal(await stat(sock), "root:root 600");
          assert.equal(await stat(`${tmp}/run/vionet`), `${DAEMON_USER}:${DAEMON_GROUP} 700`);
          assert.equal(await connectAs(QEMU_USER, sock), "PermissionDenied");
        });
      })
    ),
});

Deno.test({
  name: "--socket-mode 0666 opens the socket and its new directory to everyone; " +
    "vionet's default directory is set anew, an operator's is left alone with a warning",
  ignore: (skip ?? noQemuUser) !== undefined,
  fn: () =>
    withNetns((ns) =>
      withOpenTmp(async (tmp) => {
        const sock = `${tmp}/new/v.sock`;
        await withMain(
          ns,
          ["--tap", tapName(), "--socket-path", sock, "--socket-mode", "0666"],
          async () => {
            assert.equal(await stat(sock), "root:root 666");
            assert.equal(await stat(`${tmp}/new`), `${DAEMON_USER}:${DAEMON_GROUP} 755`);
            assert.equal(await connectAs(QEMU_USER, sock), "ok");
          },
        );

        // <XDG_RUNTIME_DIR>/vionet is vionet's own: left 0700 by an earlier run, it is fixed.
        await Deno.mkdir(`${tmp}/xdg/vionet`, { recursive: true, mode: 0o700 });
        await Deno.chmod(`${tmp}/xdg`, 0o755);
        await Deno.chmod(`${tmp}/xdg/vionet`, 0o700);
        const tap = tapName();
        await withMain(
          ns,
          ["--tap", tap, "--socket-group", QEMU_USER],
          async () => {
            assert.equal(await stat(`${tmp}/xdg/vionet`), `${DAEMON_USER}:${QEMU_USER} 750`);
            assert.equal(await connectAs(QEMU_USER, `${tmp}/xdg/vionet/${tap}.sock`), "ok");
          },
          { XDG_RUNTIME_DIR: `${tmp}/xdg` },
        );

        // A directory the operator made is theirs: a warning says what keeps the group out.
        await Deno.mkdir(`${tmp}/mine`, { mode: 0o700 });
        await Deno.chmod(`${tmp}/mine`, 0o700);
        await withMain(
          ns,
          ["--tap", tapName(), "--socket-path", `${tmp}/mine/v.sock`, "--socket-group", QEMU_USER],
          async ({ stderr }) => {
            assert.equal(await stat(`${tmp}/mine`), "root:root 700");
            assert.match(
              stderr(),
              new RegExp(
                `warn: the socket's directory ${tmp}/mine \\(mode 0700, gid 0\\) does not let ` +
                  `group ${QEMU_USER} through: .*\\(chgrp ${QEMU_USER} ${tmp}/mine and chmod g\\+x, ` +
                  `or chmod o\\+x; or choose another --socket-path\\)`,
              ),
            );
          },
        );
      })
    ),
});

Deno.test({
  name: "an unknown --socket-group fails at start with its name, before any tap exists",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const r = await ns.run([
        Deno.execPath(),
        "run",
        ...startTaskFlags(),
        `${ROOT}main.ts`,
        "--tap",
        "vgrp0",
        "--socket-path",
        "/tmp/vionet-nogroup.sock",
        "--socket-group",
        "no-such-group-vionet",
      ]);
      assert.equal(r.code, 1, r.stderr);
      assert.match(r.stderr, /error: --socket-group no-such-group-vionet: no such group/);
      assert.doesNotMatch(await ns.exec(["ip", "-o", "link"]), /vgrp0/);
    }),
});

Deno.test({
  name: "--mtu sets a persistent tap's MTU; without it the tap's MTU is kept and becomes host_mtu",
  ignore: skip !== undefined,
  fn: () =>
    withNetns((ns) =>
      withOpenTmp(async (tmp) => {
        await ns.exec(["ip", "tuntap", "add", "dev", "vpmtu0", "mode", "tap", "vnet_hdr"]);
        await ns.exec(["ip", "link", "set", "dev", "vpmtu0", "mtu", "4000"]);
        const mtu = async () =>
          JSON.parse(await ns.exec(["ip", "-j", "link", "show", "vpmtu0"]))[0].mtu;
        const sock = `${tmp}/v.sock`;
        await withMain(
          ns,
          ["--tap", "vpmtu0", "--socket-path", sock],
          async ({ stdout, stderr }) => {
            assert.equal(await mtu(), 4000, "no --mtu: the operator's MTU stays");
            assert.match(stdout(), /mac=52:54:00:[0-9a-f:]{8},host_mtu=4000$/m);
            assert.match(stderr(), /tap vpmtu0 attached; MTU 4000;/);
          },
        );
        await withMain(
          ns,
          ["--tap", "vpmtu0", "--socket-path", sock, "--mtu", "1500"],
          async ({ stdout }) => {
            assert.equal(await mtu(), 1500);
            assert.doesNotMatch(stdout(), /host_mtu/, "1500 is QEMU's default: no host_mtu");
          },
        );
        await withMain(
          ns,
          ["--tap", "vpmtu0", "--socket-path", sock, "--mtu", "65521"],
          async () => {
            assert.equal(await mtu(), 65521, "the top of the range works");
          },
        );
      })
    ),
});

Deno.test({
  name: "--mtu with an inherited tap that lives in another namespace is refused, naming why",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const tap = createTap(tapName(), { up: false });
      try {
        await exec(["ip", "link", "set", "dev", tap.name, "netns", ns.name]);
        const fd = libc.dup(tap.fd);
        let closed = false;
        try {
          await assert.rejects(
            startDaemon(parseOptions(["--tap-fd", String(fd), "--mtu", "9000"]), quietLogger()),
            new RegExp(
              `cannot set tap ${tap.name}'s MTU to 9000: it is not in this network namespace`,
            ),
          );
          closed = true; // startDaemon closed the adopted tap
        } finally {
          if (!closed) libc.close(fd);
        }
        assert.throws(() => libc.fstat(fd), /EBADF/, "the failed start closed what it adopted");
      } finally {
        tap.close();
      }
    }),
});

Deno.test("the printed QEMU options: the enforced MAC, host_mtu, a RAM placeholder, both reconnect spellings; --fd and --client too", () => {
  const mac = [0x52, 0x54, 0, 0xaa, 0xbb, 0xcc];
  const base = { listenFd: null, client: false, socketPath: "/run/vionet/t.sock", mac, mtu: 9000 };
  const listen = attachText(base, "t", 9000, null);
  assert.match(listen, /^vionet: tap t, vhost-user socket \/run\/vionet\/t.sock\n/);
  assert.match(listen, /size=<guest RAM>,share=on/);
  assert.match(listen, /-chardev socket,id=vionet0,path=\/run\/vionet\/t.sock,reconnect=1 \\\n/);
  assert.match(listen, /-device virtio-net-pci,netdev=net0,mac=52:54:00:aa:bb:cc,host_mtu=9000\n/);
  assert.ok(listen.endsWith(QEMU_RECONNECT_NOTE), listen);
  assert.match(QEMU_RECONNECT_NOTE, /9\.2.*reconnect-ms=1000.*reconnect=1/);

  const fd = attachText({ ...base, listenFd: 3, socketPath: null }, "t", 1500, "/srv/vm1.sock");
  assert.match(fd, /vhost-user socket \/srv\/vm1.sock \(inherited fd 3\)/);
  assert.match(fd, /path=\/srv\/vm1.sock,reconnect=1/);
  assert.doesNotMatch(fd, /host_mtu/);
  const unnamed = attachText({ ...base, listenFd: 3, socketPath: null }, "t", 9000, null);
  assert.match(
    unnamed,
    /inherited fd 3, a socket with no path: .*mac=52:54:00:aa:bb:cc,host_mtu=9000/,
  );

  const client = attachText({ ...base, client: true, mac: null }, "t", null, null);
  assert.match(client, /path=\/run\/vionet\/t.sock,server=on,wait=off/);
  assert.doesNotMatch(client, /reconnect/);
  assert.match(client, /mac=52:54:00:[0-9a-f:]{8}$/m, "no --mac: the tap's stable MAC");
});

Deno.test("libc.socketPath names the path an inherited listening socket is bound to", async () => {
  const dir = await Deno.makeTempDir();
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  try {
    const addr = new Uint8Array(110);
    new DataView(addr.buffer).setUint16(0, libc.AF_UNIX, true);
    addr.set(new TextEncoder().encode(`${dir}/s.sock`), 2);
    libc.bind(fd, addr);
    libc.listen(fd, 1);
    assert.equal(libc.socketPath(fd), `${dir}/s.sock`);
    const unnamed = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
    assert.equal(libc.socketPath(unnamed), null);
    libc.close(unnamed);
  } finally {
    libc.close(fd);
    await Deno.remove(dir, { recursive: true });
  }
});
