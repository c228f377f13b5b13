/**
 * The sandbox on a real process: `sandbox_probe.ts` sets up like the daemon,
 * enters the real sandbox, and tries what a compromised daemon would try from
 * its main thread and from FFI workers started before and after; the tap it
 * holds must still take TUNSCAP's offloads (seen from outside with
 * `ethtool -k`), accept a VMM, and lose its socket at exit.
 */
import assert from "node:assert/strict";
import { type Netns, tapTestsUnavailable, withNetns } from "../../net_ns.ts";
import { startTaskEnv } from "../../helpers.ts";
import { lookupUser } from "../../../parent/host/users.ts";
import { TestFrontend } from "../control/vhost_user_frontend.ts";
import type { ThreadCapabilityState } from "../../../parent/host/privileges.ts";
import { assemble, type ThreadSeccomp } from "../../../parent/host/seccomp.ts";
import { buildAudit } from "../../../parent/host/audit.ts";
import { seccompPolicy } from "../../../parent/host/seccomp_policy.ts";

const PROBE = new URL("./sandbox_probe.ts", import.meta.url).pathname;
const unavailable = tapTestsUnavailable(["ip", "ethtool"], "iproute2 ethtool") ??
  (lookupUser("nobody") === null ? "needs user nobody" : undefined);

interface Done {
  log: { level: string; message: string }[];
  results: Record<"main" | "early" | "late", Record<string, string>>;
  devicePermissions: Record<string, string>;
  tapWrite: number;
  mtu: number | null;
  accept: string;
  auditedRules: Record<string, string>;
  unlinkSocket: string;
  threads: ThreadCapabilityState[];
  filters: ThreadSeccomp[];
  user: { uid: number; gid: number };
}

/**
 * The seccomp program the kernel runs for thread `tid` of another process,
 * as the kernel hands it out (PTRACE_SECCOMP_GET_FILTER: needs CAP_SYS_ADMIN,
 * and a ptrace stop, made and undone here). A thread other than the process's
 * leader, so that no wait of Deno's own child reaper sees the stop.
 */
function installedFilter(tid: number): Uint8Array {
  const lib = Deno.dlopen("libc.so.6", {
    ptrace: { parameters: ["i64", "i32", "u64", "buffer"], result: "i64" },
    waitpid: { parameters: ["i32", "buffer", "i32"], result: "i32" },
  });
  const PTRACE_DETACH = 17n, PTRACE_SEIZE = 0x4206n, PTRACE_INTERRUPT = 0x4207n;
  const PTRACE_SECCOMP_GET_FILTER = 0x420cn, WALL = 0x40000000;
  const { ptrace, waitpid } = lib.symbols;
  try {
    assert.equal(ptrace(PTRACE_SEIZE, tid, 0n, null), 0n, "PTRACE_SEIZE");
    try {
      assert.equal(ptrace(PTRACE_INTERRUPT, tid, 0n, null), 0n, "PTRACE_INTERRUPT");
      assert.equal(waitpid(tid, new Uint8Array(4), WALL), tid, "waitpid");
      const n = Number(ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0n, null));
      assert.ok(n > 0, `PTRACE_SECCOMP_GET_FILTER: ${n}`);
      const program = new Uint8Array(n * 8);
      assert.equal(Number(ptrace(PTRACE_SECCOMP_GET_FILTER, tid, 0n, program)), n);
      return program;
    } finally {
      ptrace(PTRACE_DETACH, tid, 0n, null);
    }
  } finally {
    lib.close();
  }
}

async function offloads(ns: Netns): Promise<Record<string, string>> {
  const text = await ns.exec(["ethtool", "-k", "vsb0"]);
  const on = (name: string) => new RegExp(`^\\s*${name}: (on|off)`, "m").exec(text)?.[1] ?? "?";
  return { csum: on("tx-checksum-ip-generic"), tso4: on("tx-tcp-segmentation") };
}

/** Runs the probe in `ns` and plays its side of the conversation. */
async function runProbe(ns: Netns, dir: string, seccomp: "on" | "off") {
  const child = ns.spawn(
    [Deno.execPath(), "run", "--unstable-worker-options", "-A", PROBE, dir, seccomp, "nobody"],
    { stdin: "piped", stdout: "piped", stderr: "piped", env: startTaskEnv() },
  );
  const stderr = new Response(child.stderr).text();
  const writer = child.stdin.getWriter();
  const seen: Record<string, unknown> = {};
  let done: Done | null = null;
  let buf = "";
  for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
    buf += chunk;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      const line = JSON.parse(buf.slice(0, nl)) as { step: string } & Done;
      buf = buf.slice(nl + 1);
      if (line.step === "offloads-on" || line.step === "offloads-off") {
        seen[line.step] = await offloads(ns);
        if (line.step === "offloads-on" && seccomp === "on") {
          const tid = [...Deno.readDirSync(`/proc/${child.pid}/task`)].map((e) => Number(e.name))
            .find((t) => t !== child.pid)!;
          seen.filter = installedFilter(tid);
        }
        await writer.write(new TextEncoder().encode("next\n"));
      } else if (line.step === "accept") {
        const vmm = TestFrontend.connect(`${dir}/run/s.sock`);
        seen.accepted = true;
        setTimeout(() => vmm.close(), 2000);
      } else if (line.step === "done") {
        done = line;
      }
    }
  }
  await writer.close().catch(() => {});
  const status = await child.status;
  assert.equal(status.code, 0, await stderr);
  assert.ok(done, `the probe did not finish: ${await stderr}`);
  return { done: done!, seen, pid: child.pid };
}

function assertEveryThread(done: Done, seccompOn: boolean): void {
  const nobody = lookupUser("nobody")!;
  assert.ok(done.threads.length >= 8, `${done.threads.length} threads`);
  for (const t of done.threads) {
    const where = `thread ${t.tid} (${t.name})`;
    assert.deepEqual(t.uids, [nobody.uid, nobody.uid, nobody.uid, nobody.uid], `${where} Uid`);
    assert.deepEqual(t.gids, [nobody.gid, nobody.gid, nobody.gid, nobody.gid], `${where} Gid`);
    assert.deepEqual(t.groups, [], `${where} Groups`);
    assert.deepEqual(t.effective, [], `${where} CapEff`);
    assert.deepEqual(t.permitted, [], `${where} CapPrm`);
    assert.equal(t.noNewPrivs, true, `${where} NoNewPrivs`);
  }
  for (const f of done.filters) {
    assert.deepEqual(
      [f.mode, f.filters],
      seccompOn ? [2, 1] : [0, 0],
      `thread ${f.tid}: Seccomp ${f.mode}, ${f.filters} filters`,
    );
  }
  // The workers started after the sandbox have threads of their own, covered above.
  assert.ok(done.threads.filter((t) => /^worker-\d+$/.test(t.name)).length >= 2);
}

Deno.test({
  name: "sandbox on: every thread is nobody under one filter; what a compromised daemon " +
    "tries fails, from the main thread and from FFI workers started before and after; " +
    "TUNSCAP, accept and removing its socket still work",
  ignore: unavailable !== undefined,
  async fn() {
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-sandbox-" });
      try {
        await Deno.chmod(dir, 0o755);
        const { done, seen, pid } = await runProbe(ns, dir, "on");
        assertEveryThread(done, true);
        // The program the kernel runs is, byte for byte, the one the audit's
        // table assembles to, for a daemon listening on a socket (as the probe).
        const audit = buildAudit({
          socketPath: `${dir}/run/s.sock`,
          listenFd: null,
          client: false,
          tap: "vsb0",
          tapFd: null,
        });
        const policy = seccompPolicy({ client: false, accepts: true, ioUring: "auto", pid });
        assert.deepEqual(
          audit.seccomp.allowed.map((a) => [a.name, a.nr]),
          policy.entries.map((e) => [e.name, e.nr]),
        );
        assert.deepEqual(seen.filter, assemble(policy).bytes, "the installed filter");
        for (const [where, r] of Object.entries(done.results)) {
          // Refused by the seccomp filter: EPERM, whatever Landlock or the user would say.
          for (
            const call of [
              "execve",
              "writeFile",
              "socketInet",
              "socketNetlink",
              "unixDgram",
              "abstractConnect",
              "ioctlTunsetiff",
              "ioctlTcgets",
              "memfd",
              "ioUringSetup",
              "mount",
              "setuid0",
              "fork",
              "unshareUser",
            ]
          ) {
            assert.equal(r[call], "EPERM", `${where}: ${call} gave ${r[call]}`);
          }
          // Allowed by the filter, refused by Landlock: a file outside its rules.
          assert.equal(r.readOutsideRules, "EACCES", `${where}: /etc/hostname`);
          assert.equal(r.readShadow, "EACCES", `${where}: /etc/shadow`);
          assert.equal(r.readModule, "ok", `${where}: a module file`);
          assert.equal(r.readProc, "ok", `${where}: /proc/self/status`);
        }
        assert.deepEqual(seen["offloads-on"], { csum: "on", tso4: "on" }, "TUNSCAP as nobody");
        assert.deepEqual(seen["offloads-off"], { csum: "off", tso4: "off" });
        assert.equal(done.tapWrite, 72);
        assert.equal(done.mtu, 1500, "the MTU through an AF_UNIX socket's ioctl");
        assert.equal(done.accept, "ok");
        assert.equal(done.unlinkSocket, "ok", "nobody removes its socket from the directory");
        // Every read rule the audit prints holds; what no rule names was refused above.
        assert.deepEqual(
          Object.keys(done.auditedRules).sort(),
          audit.landlock.rules.filter((r) => r.access.includes("READ_FILE")).map((r) => r.path)
            .sort(),
        );
        for (const [path, got] of Object.entries(done.auditedRules)) {
          assert.equal(got, "ok", `audited read rule ${path}`);
        }
        assert.ok(
          audit.landlock.rules.some((r) =>
            r.path === `${dir}/run` && r.access.join() === "REMOVE_FILE"
          ),
          "the audit names the socket directory's one right",
        );
        assert.ok(Object.values(done.devicePermissions).every((s) => s !== "granted"));
        assert.match(done.log.map((l) => l.message).join("\n"), /seccomp filter on all \d+/);
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});

Deno.test({
  name: "sandbox with --seccomp off: Landlock alone still refuses exec, writes, TCP and " +
    "abstract sockets; the log says seccomp is off",
  ignore: unavailable !== undefined,
  async fn() {
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-sandbox-" });
      try {
        await Deno.chmod(dir, 0o755);
        const { done } = await runProbe(ns, dir, "off");
        assertEveryThread(done, false);
        for (const [where, r] of Object.entries(done.results)) {
          assert.equal(r.execve, "EACCES", `${where}: exec outside the rules`);
          assert.equal(r.writeFile, "EACCES", `${where}: a write`);
          assert.equal(r.socketInet, "ok", `${where}: no filter, so the socket is made`);
          assert.equal(r.tcpConnect, "EACCES", `${where}: but Landlock refuses TCP connect`);
          assert.equal(r.abstractConnect, "EPERM", `${where}: abstract sockets are scoped`);
          assert.equal(r.readOutsideRules, "EACCES", `${where}`);
          assert.equal(r.memfd, "ok", `${where}: what only the filter stops`);
          assert.equal(r.ioUringSetup, "ok", `${where}: the same`);
          assert.equal(r.readModule, "ok", `${where}`);
        }
        assert.match(
          done.log.map((l) => `${l.level} ${l.message}`).join("\n"),
          /warn SECCOMP IS OFF/,
        );
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});
