/**
 * The real daemon (`main.ts` under the start task's flags and environment)
 * after set-up: every thread runs as the unprivileged user under one seccomp
 * filter, before and after a VMM came and went; what it still has to do as
 * that user works: TUNSCAP (seen with `ethtool -k`), a VMM reconnecting,
 * `--client` reconnecting, removing its socket and its tap at exit.
 */
import assert from "node:assert/strict";
import { type Netns, tapTestsUnavailable, withNetns } from "../../net_ns.ts";
import { assertSandboxed, ROOT, startTaskEnv, startTaskFlags, threadsOf } from "../../helpers.ts";
import { lookupUser } from "../../../parent/host/users.ts";
import { TestFrontend, TestListener } from "./vhost_user_frontend.ts";
import {
  VHOST_USER_GET_FEATURES,
  VHOST_USER_SET_FEATURES,
} from "../../../parent/control/vhost_user_messages.ts";
import {
  VIRTIO_F_VERSION_1,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_GUEST_TSO6,
} from "../../../ipc/features.ts";

const unavailable = tapTestsUnavailable(["ip", "ethtool"], "iproute2 ethtool") ??
  (lookupUser("nobody") === null ? "needs user nobody" : undefined);

/** True when process `pid` has a handler for signal number `signo` (its SigCgt mask). */
function catchesSignal(pid: number, signo: number): boolean {
  const m = /^SigCgt:\s*([0-9a-f]+)$/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  return m !== null && (BigInt(`0x${m[1]}`) & (1n << BigInt(signo - 1))) !== 0n;
}

/** The daemon in `ns`, its output collected. */
class Daemon {
  readonly child: Deno.ChildProcess;
  #out = "";
  readonly #pump: Promise<void>;

  constructor(ns: Netns, args: string[]) {
    this.child = ns.spawn(
      [Deno.execPath(), "run", ...startTaskFlags(), `${ROOT}main.ts`, ...args],
      { stdout: "piped", stderr: "piped", env: startTaskEnv(), cwd: ROOT },
    );
    const read = async (s: ReadableStream<Uint8Array>) => {
      for await (const t of s.pipeThrough(new TextDecoderStream())) this.#out += t;
    };
    this.#pump = Promise.all([read(this.child.stdout), read(this.child.stderr)]).then(() => {});
  }

  get output(): string {
    return this.#out;
  }

  async waitFor(re: RegExp, ms = 30_000): Promise<void> {
    const end = Date.now() + ms;
    while (!re.test(this.#out)) {
      if (Date.now() > end) throw new Error(`no ${re} in ${ms} ms; the daemon said:\n${this.#out}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }

  async stop(): Promise<Deno.CommandStatus> {
    this.child.kill("SIGTERM");
    const status = await this.child.status;
    await this.#pump;
    return status;
  }
}

async function tapOffloads(ns: Netns, tap: string): Promise<string> {
  const text = await ns.exec(["ethtool", "-k", tap]);
  return ["tx-checksum-ip-generic", "tx-tcp-segmentation", "tx-tcp6-segmentation"]
    .map((n) => new RegExp(`^\\s*${n}: (on|off)`, "m").exec(text)?.[1] ?? "?").join(" ");
}

async function until(what: string, ok: () => Promise<boolean>, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** A VMM's feature negotiation: the acked GUEST_* bits become TUNSCAP, and the tap's offloads. */
async function negotiate(vmm: TestFrontend, guestOffloads: boolean): Promise<void> {
  const offered = await vmm.requestU64(VHOST_USER_GET_FEATURES);
  const wanted = VIRTIO_F_VERSION_1 |
    (guestOffloads
      ? VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
      : 0n);
  const value = new Uint8Array(new BigUint64Array([offered & wanted]).buffer);
  await vmm.send(VHOST_USER_SET_FEATURES, value);
  await vmm.requestU64(VHOST_USER_GET_FEATURES); // answered once SET_FEATURES is done
}

Deno.test({
  name: "the daemon runs as nobody under seccomp on every thread, before and after a VMM " +
    "reconnects; TUNSCAP still reaches the tap; SIGUSR1 opens no inspector; at SIGTERM its " +
    "socket and tap are removed",
  ignore: unavailable !== undefined,
  async fn() {
    const nobody = lookupUser("nobody")!;
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-sbd-" });
      await Deno.chmod(dir, 0o755);
      const socket = `${dir}/run/sub/v.sock`; // both directories made by the daemon
      const daemon = new Daemon(ns, ["--tap", "vsd0", "--socket-path", socket, "--user", "nobody"]);
      try {
        await daemon.waitFor(/listening on /);
        assert.match(daemon.output, /running as user nobody \(uid 65534/);
        assert.match(daemon.output, /seccomp filter on all \d+ threads/);
        assert.match(daemon.output, /Landlock ABI \d+ on every thread/);
        assert.doesNotMatch(daemon.output, /socket will stay behind/);
        const first = assertSandboxed(daemon.child.pid, nobody.uid, nobody.gid, "after set-up");
        for (const d of [`${dir}/run`, `${dir}/run/sub`]) {
          const st = Deno.statSync(d);
          assert.deepEqual([st.uid, st.gid], [nobody.uid, nobody.gid], `${d} handed over`);
        }

        // SIGUSR1 makes Deno open its inspector on 127.0.0.1:9229 (README): in
        // the sandbox it cannot make the socket, and the daemon keeps serving.
        // Deno installs that handler a moment after start (measured: after
        // "listening on" is printed); a SIGUSR1 before it ends the process.
        await until(
          "Deno to catch SIGUSR1",
          () => Promise.resolve(catchesSignal(daemon.child.pid, 10)),
        );
        daemon.child.kill("SIGUSR1");
        await daemon.waitFor(/Failed to start inspector server/, 10_000);
        assert.doesNotMatch(await ns.exec(["ss", "-Hltn"]), /9229/, "nothing listens");

        const vmm = TestFrontend.connect(socket);
        await negotiate(vmm, true);
        await until("the offloads on", async () => (await tapOffloads(ns, "vsd0")) === "on on on");
        vmm.close();
        // The VMM comes back (QEMU's reconnect): served as nobody, TUNSCAP again.
        await until(
          "the daemon to see the disconnect",
          () => Promise.resolve(/front-end disconnected/.test(daemon.output)),
        );
        const again = TestFrontend.connect(socket);
        await negotiate(again, false);
        await until(
          "the offloads off",
          async () => (await tapOffloads(ns, "vsd0")) === "off off off",
        );
        again.close();
        const later = assertSandboxed(daemon.child.pid, nobody.uid, nobody.gid, "after reconnect");
        assert.ok(later.length >= first.length - 2, "threads came and went, all of them checked");

        const status = await daemon.stop();
        assert.equal(status.code, 0, daemon.output);
        assert.doesNotMatch(daemon.output, /cannot remove/);
        assert.throws(() => Deno.lstatSync(socket), Deno.errors.NotFound, "the socket is gone");
        assert.doesNotMatch(await ns.exec(["ip", "-o", "link"]), /vsd0/, "the tap is gone");
      } finally {
        try {
          daemon.child.kill("SIGKILL");
        } catch { /* gone */ }
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});

Deno.test({
  name: "--client as nobody: the daemon reconnects to a VMM socket it may write, and says " +
    "why when it may not",
  ignore: unavailable !== undefined,
  async fn() {
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-sbc-" });
      await Deno.chmod(dir, 0o755);
      const path = `${dir}/vmm.sock`;
      const listener = new TestListener(path);
      await Deno.chmod(path, 0o777);
      const daemon = new Daemon(ns, ["--tap", "vsc0", "--socket-path", path, "--client"]);
      try {
        const first = await listener.accept(30_000);
        await daemon.waitFor(/seccomp filter on all/);
        assert.match(daemon.output, /running as user (vionet|nobody)/);
        first.close();
        // Reconnected after set-up: socket() and connect() as nobody, under the filter.
        const second = await listener.accept(10_000);
        await negotiate(second, true);
        await until("the offloads on", async () => (await tapOffloads(ns, "vsc0")) === "on on on");
        // A socket the daemon's user may not write: refused, and the log says so once.
        await Deno.chmod(path, 0o755);
        second.close();
        await daemon.waitFor(/must be writable by the daemon's user/, 10_000);
        await Deno.chmod(path, 0o777);
        const third = await listener.accept(15_000);
        third.close();
        const status = await daemon.stop();
        assert.equal(status.code, 0, daemon.output);
      } finally {
        try {
          daemon.child.kill("SIGKILL");
        } catch { /* gone */ }
        listener.close();
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});

Deno.test({
  name: "--user: an unknown user stops the daemon before anything exists; root keeps uid 0 " +
    "and says so loudly, as --seccomp off does",
  ignore: unavailable !== undefined,
  async fn() {
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-sbu-" });
      try {
        const unknown = new Daemon(ns, [
          "--tap",
          "vsu0",
          "--socket-path",
          `${dir}/u.sock`,
          "--user",
          "no-such-user-here",
        ]);
        const status = await unknown.child.status;
        await unknown.stop().catch(() => {});
        assert.equal(status.code, 1, unknown.output);
        assert.match(unknown.output, /--user no-such-user-here: there is no such user/);
        assert.doesNotMatch(await ns.exec(["ip", "-o", "link"]), /vsu0/, "no tap was created");

        const root = new Daemon(ns, [
          "--tap",
          "vsr0",
          "--socket-path",
          `${dir}/r.sock`,
          "--user",
          "root",
          "--seccomp",
          "off",
        ]);
        try {
          await root.waitFor(/listening on /);
          assert.match(root.output, /warn: --user root: KEEPING UID 0/);
          assert.match(root.output, /warn: SECCOMP IS OFF/);
          for (const t of threadsOf(root.child.pid)) {
            assert.equal(t.uid, "0 0 0 0", `thread ${t.tid}`);
            assert.equal(t.seccomp, "0/0", `thread ${t.tid}`);
            assert.equal(t.noNewPrivs, "1", `thread ${t.tid}: capabilities dropped all the same`);
          }
          assert.equal((await root.stop()).code, 0, root.output);
        } finally {
          try {
            root.child.kill("SIGKILL");
          } catch { /* gone */ }
        }
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});

/** One HTTP request on a unix socket: the status and the body. */
async function httpUnix(path: string, method: string, target: string) {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    await conn.write(
      new TextEncoder().encode(`${method} ${target} HTTP/1.1\r\nContent-Length: 0\r\n\r\n`),
    );
    let text = "";
    const buf = new Uint8Array(8192);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    return { status: Number(text.slice(9, 12)), body: text.slice(text.indexOf("\r\n\r\n") + 4) };
  } finally {
    conn.close();
  }
}

Deno.test({
  name: "--pcap: the file is opened before the sandbox (root's, 0600) and written after it " +
    "through its descriptor; every thread, the capture worker's too, is sandboxed; " +
    "POST /capture works as nobody",
  ignore: unavailable !== undefined,
  async fn() {
    const nobody = lookupUser("nobody")!;
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-sbp-" });
      await Deno.chmod(dir, 0o755);
      const pcap = `${dir}/c.pcapng`;
      const sock = `${dir}/m.sock`;
      const daemon = new Daemon(ns, [
        "--tap",
        "vsp0",
        "--socket-path",
        `${dir}/v.sock`,
        "--user",
        "nobody",
        "--metrics",
        sock,
        "--pcap",
        pcap,
        "--pcap-start",
        "off",
      ]);
      try {
        await daemon.waitFor(/listening on /);
        assert.match(daemon.output, /seccomp filter on all \d+ threads/);
        assert.match(daemon.output, /capture off/);
        assertSandboxed(daemon.child.pid, nobody.uid, nobody.gid, "with --pcap");
        const st = Deno.statSync(pcap);
        assert.equal(st.uid, 0, "opened by root during set-up");
        assert.equal(st.mode! & 0o777, 0o600);
        assert.ok(st.size > 0, "the header is written");
        for (const state of ["on", "off", "on"]) {
          const r = await httpUnix(sock, "POST", `/capture?state=${state}`);
          assert.equal(r.status, 200, r.body);
          assert.equal(JSON.parse(r.body).state, state);
        }
        const s = JSON.parse((await httpUnix(sock, "GET", "/capture")).body);
        assert.equal(s.fileBytes, Deno.statSync(pcap).size);
        assert.equal(s.writeErrors, 0);
        const status = await daemon.stop();
        assert.equal(status.code, 0, daemon.output);
        assert.match(daemon.output, /capture started/);
      } finally {
        try {
          daemon.child.kill("SIGKILL");
        } catch { /* gone */ }
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});
