import assert from "node:assert/strict";
import {
  type Audit,
  AUDITED_WORKERS,
  buildAudit,
  formatAudit,
  type Grant,
  type PartAudit,
  permissionsFromFlags,
  permissionsFromWorkerOptions,
} from "../../../parent/host/audit.ts";
import { DeviceHost } from "../../../parent/control/device_host.ts";
import { LIBC_NAME, sys } from "../../../parent/host/libc.ts";
import { PERMISSION_NAMES } from "../../../ipc/protocol.ts";
import { quietLogger, ROOT, startTaskFlags, testConfig } from "../../helpers.ts";
import { withNetns } from "../../net_ns.ts";
import { seccompPolicy } from "../../../parent/host/seccomp_policy.ts";
import { landlockRules } from "../../../parent/host/landlock.ts";
import { MODULE_ROOT } from "../../../parent/host/sandbox.ts";

const LISTENING = {
  socketPath: "/run/vionet/vionet0.sock",
  listenFd: null,
  client: false,
  tap: "vionet0",
  tapFd: null,
};
const INHERITED = { socketPath: null, listenFd: 3, client: false, tap: null, tapFd: 4 };

const PROBE = new URL("./privileges_probe.ts", import.meta.url).pathname;

type Queried = Record<string, { state: string; items: Record<string, string> }>;

function part(audit: Audit, name: string): PartAudit {
  const p = audit.parts.find((p) => p.name === name);
  assert.ok(p, `the audit has no part ${name}`);
  return p;
}

/** A grant matches what was queried inside the thread: all, none, or exactly the listed items. */
function assertHolds(grant: Grant, queried: Queried[string], where: string): void {
  if (grant === true) {
    assert.equal(queried.state, "granted", `${where}: audit says granted`);
    return;
  }
  assert.notEqual(
    queried.state,
    "granted",
    `${where}: granted, audit says ${JSON.stringify(grant)}`,
  );
  for (const item of grant === false ? [] : grant) {
    assert.equal(queried.items[item], "granted", `${where}: ${item} not granted`);
  }
}

/** Every module under parent/ (its folders too), by repository path. */
function parentSources(): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (dir: string) => {
    for (const entry of Deno.readDirSync(`${ROOT}${dir}`)) {
      const path = `${dir}/${entry.name}`;
      if (entry.isDirectory) walk(path);
      else if (entry.name.endsWith(".ts")) out.set(path, Deno.readTextFileSync(`${ROOT}${path}`));
    }
  };
  walk("parent");
  return out;
}

Deno.test("the audit's parent flags are deno.json's start task flags", () => {
  const parent = part(buildAudit(LISTENING), "parent");
  assert.deepEqual(parent.flags, startTaskFlags());
  assert.equal(parent.module, "main.ts");
  assert.equal(parent.source, "deno.json tasks.start");
});

Deno.test("under the start task's flags, the main thread and each worker hold what the audit says", async () => {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...startTaskFlags(), PROBE, "permissions"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 0, stderr);
  const queried = JSON.parse(new TextDecoder().decode(out.stdout)) as {
    main: Queried;
    workers: Record<string, Queried>;
  };
  const audit = buildAudit(LISTENING);
  for (const name of PERMISSION_NAMES) {
    assertHolds(part(audit, "parent").permissions[name], queried.main[name], `parent ${name}`);
  }
  assert.deepEqual(
    Object.keys(queried.workers).sort(),
    audit.parts.filter((p) => p.kind === "worker").map((p) => p.name).sort(),
  );
  for (const [worker, states] of Object.entries(queried.workers)) {
    for (const name of PERMISSION_NAMES) {
      assertHolds(part(audit, worker).permissions[name], states[name], `${worker} ${name}`);
    }
  }
});

Deno.test("the device worker's own getPermissions() matches its audit entry: nothing", async () => {
  const entry = part(buildAudit(LISTENING), "vionet-device");
  const host = await DeviceHost.start({
    config: testConfig(),
    handlers: { tunscap: () => 0n },
    logger: quietLogger(),
  });
  try {
    const states = await host.getPermissions();
    for (const name of PERMISSION_NAMES) {
      assert.equal(entry.permissions[name], false, `audit grants the device ${name}`);
      assertHolds(entry.permissions[name], { state: states[name], items: {} }, name);
    }
  } finally {
    host.terminate();
  }
});

Deno.test("every option set in parent/ that starts a worker is an audited worker", async () => {
  const audited = new Set(AUDITED_WORKERS.map((w) => w.options));
  let found = 0;
  for (const [file, text] of parentSources()) {
    for (
      const m of text.matchAll(/export const (\w+) = \{[^;]*?\} as const satisfies WorkerOptions/gs)
    ) {
      const mod = await import(`${ROOT}${file}`);
      assert.ok(audited.has(mod[m[1]]), `${m[1]} in ${file} is not in AUDITED_WORKERS`);
      found++;
    }
  }
  assert.equal(found, AUDITED_WORKERS.length, "an audited worker's options are not exported");
});

Deno.test("the audit lists exactly the symbols libc.so.6 was opened with", () => {
  const [lib] = buildAudit(LISTENING).libraries;
  assert.equal(lib.name, LIBC_NAME);
  assert.deepEqual(lib.symbols.map((s) => s.key).sort(), Object.keys(sys).sort());
  assert.equal(lib.symbols.find((s) => s.key === "write_p")?.symbol, "write");
  assert.equal(lib.symbols.find((s) => s.key === "poll_async")?.nonblocking, true);
  assert.ok(lib.loadedBy.includes("parent"));
  assert.ok(!lib.loadedBy.includes("vionet-device"), "the device worker cannot load libc");
});

Deno.test("every ioctl request issued in parent/ is in the audit with its number", () => {
  const audited = new Map(buildAudit(LISTENING).ioctls.map((i) => [i.name, i.number]));
  const used = new Set<string>();
  for (const text of parentSources().values()) {
    const calls = /(?:ioctl|ioctlValue|ioctl_value|readInt)\(\s*[\w.]+,\s*([A-Z][A-Z0-9_]+)\b/g;
    for (const m of text.matchAll(calls)) used.add(m[1]);
  }
  assert.ok(used.has("TUNSETIFF") && used.has("TUNSETOFFLOAD"), "the scan found no ioctl");
  for (const name of used) assert.ok(audited.has(name), `${name} is issued but not audited`);
  assert.equal(audited.get("TUNSETOFFLOAD"), "0x400454d0");
  assert.equal(audited.get("TUNSETIFF"), "0x400454ca");
});

Deno.test("every file in parent/ that opens, creates or maps something is a source in the audit", () => {
  const sources = new Set(
    buildAudit({
      ...LISTENING,
      metricsPath: "/run/vionet/metrics.sock",
      pcapPath: "/var/tmp/vionet.pcapng",
    }).files.map((f) => f.source),
  );
  const opening =
    /libc\.(open|socket|eventfd|memfdCreate|mmap|readlink|socketpair|pipe2)\(|sys\.(epoll_create1|io_uring_setup)\(|Deno\.(mkdir|open|create|readFile|readTextFile|writeFile|writeTextFile|readLink|readDir)\w*\(/;
  const exempt = new Set(["parent/host/libc.ts", "parent/host/audit.ts"]);
  let checked = 0;
  for (const [file, text] of parentSources()) {
    if (exempt.has(file) || !opening.test(text)) continue;
    checked++;
    assert.ok(sources.has(file), `${file} opens something the audit does not list`);
  }
  assert.ok(checked >= 4, `only ${checked} files found opening anything: the scan is broken`);
});

Deno.test("with --tap-fd and --fd the audit opens no /dev/net/tun and needs no capability", () => {
  const audit = buildAudit(INHERITED);
  assert.ok(!audit.files.some((f) => f.path.includes("/dev/net/tun")));
  assert.ok(audit.files.some((f) => f.path === "descriptor 4 (--tap-fd)"));
  assert.ok(audit.files.some((f) => f.path === "descriptor 3 (--fd)"));
  assert.deepEqual(audit.capabilities.neededForSetup, []);
  const created = buildAudit(LISTENING);
  // CAP_BPF: the steering program of a multi-queue tap (the default on more than one CPU).
  assert.deepEqual(created.capabilities.neededForSetup.map((c) => c.name), [
    "CAP_NET_ADMIN",
    "CAP_BPF",
  ]);
  for (const only of [{ queues: 1 }, { steering: "kernel" as const }]) {
    assert.deepEqual(
      buildAudit({ ...LISTENING, ...only }).capabilities.neededForSetup.map((c) => c.name),
      ["CAP_NET_ADMIN"],
    );
  }
  assert.ok(created.files.some((f) => f.path === "/dev/net/tun"));
});

Deno.test("the audit names every kept capability with a reason, and the ones not kept", () => {
  const caps = buildAudit(LISTENING).capabilities;
  for (const c of [...caps.keptAfterSetup, ...caps.notKept]) {
    assert.match(c.name, /^CAP_[A-Z_]+$/);
    assert.ok(c.why.length > 20, `${c.name} has no real justification`);
  }
  assert.ok(caps.notKept.some((c) => c.name === "CAP_NET_ADMIN"));
});

Deno.test("permissionsFromFlags() reads Deno's permission flags", async (t) => {
  const cases: [string, string[], Partial<Record<string, Grant>>][] = [
    ["bare allow", ["--allow-ffi"], { ffi: true, read: false, import: true }],
    ["scoped allow", ["--allow-read=/dev/net/tun,/run/vionet"], {
      read: ["/dev/net/tun", "/run/vionet"],
    }],
    ["allow-all", ["-A"], { run: true, net: true, sys: true }],
    ["a bare deny wins", ["--allow-env", "--deny-env"], { env: false }],
    ["explicit import list", ["--allow-import=example.com"], { import: ["example.com"] }],
    ["unknown flags ignored", ["--cached-only", "--no-prompt"], { write: false, ffi: false }],
  ];
  for (const [name, flags, want] of cases) {
    await t.step(name, () => {
      const { permissions } = permissionsFromFlags(flags);
      for (const [perm, grant] of Object.entries(want)) {
        assert.deepEqual(permissions[perm as keyof typeof permissions], grant, perm);
      }
    });
  }
});

Deno.test("permissionsFromWorkerOptions(): none, a listed set, inherit; unknown names throw", () => {
  const parent = permissionsFromFlags(["--allow-ffi", "--allow-read"]).permissions;
  const none = permissionsFromWorkerOptions({ deno: { permissions: "none" } }, parent);
  assert.ok(PERMISSION_NAMES.every((n) => none[n] === false));
  const ffi = permissionsFromWorkerOptions({ deno: { permissions: { ffi: true } } }, parent);
  assert.equal(ffi.ffi, true);
  assert.equal(ffi.read, false, "an omitted permission is not granted");
  assert.deepEqual(
    permissionsFromWorkerOptions({ deno: { permissions: "inherit" } }, parent),
    parent,
  );
  assert.throws(
    () => permissionsFromWorkerOptions({ deno: { permissions: { disk: true } } }, parent),
    /unknown permission disk/,
  );
});

Deno.test("the audit survives JSON, and formatAudit() names every part, symbol and ioctl", () => {
  const audit = buildAudit(LISTENING, { observe: true });
  assert.deepEqual(JSON.parse(JSON.stringify(audit)), audit);
  const text = formatAudit(audit);
  for (const p of audit.parts) assert.ok(text.includes(p.name), p.name);
  for (const s of audit.libraries[0].symbols) assert.ok(text.includes(`${s.symbol}(`), s.key);
  for (const i of audit.ioctls) assert.ok(text.includes(i.name), i.name);
  assert.match(text, /kept after set-up: none/);
});

Deno.test({
  name: "main.ts without --allow-ffi or --allow-env fails naming the missing permission",
  // In a fresh namespace: should a run get as far as creating its tap, it lands there.
  ignore: Deno.uid() !== 0,
  async fn(t) {
    await withNetns(async (ns) => {
      for (
        const [flag, pattern] of [
          ["--allow-ffi", /^vionet: missing Deno permission --allow-ffi \(libc/],
          ["--allow-env", /^vionet: missing Deno permission --allow-env=XDG_RUNTIME_DIR/],
          [
            "--allow-env=XDG_RUNTIME_DIR",
            /^vionet: missing Deno permission --allow-env=\S*JOURNAL_STREAM\S* \(whether the log goes to systemd's journal/,
          ],
          ["--allow-read", /^vionet: missing Deno permission --allow-read=\. /],
        ] as const
      ) {
        await t.step(`${flag.includes("=") ? "with only" : "without"} ${flag}`, async () => {
          // A flag with a value stands for itself: the start task's flag is cut down to it.
          const name = flag.split("=")[0];
          const flags = startTaskFlags().flatMap((f) =>
            f.split("=")[0] !== name ? [f] : flag.includes("=") ? [flag] : []
          );
          assert.notDeepEqual(flags, startTaskFlags(), `${flag} is not in the start task`);
          const r = await ns.run([Deno.execPath(), "run", ...flags, `${ROOT}main.ts`]);
          assert.equal(r.code, 1, r.stderr);
          assert.match(r.stderr, pattern);
          assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
        });
      }
    });
  },
});

Deno.test("the audit's allowlist and Landlock rules are the tables the sandbox installs", () => {
  const audit = buildAudit(LISTENING);
  const ctx = { client: false, accepts: true, ioUring: "auto" as const, pid: Deno.pid };
  const policy = seccompPolicy(ctx);
  assert.deepEqual(audit.seccomp.allowed.map((c) => [c.name, c.nr, c.why]), [
    ...policy.entries.map((e) => [e.name, e.nr, e.why]),
  ]);
  assert.match(audit.seccomp.allowed.find((c) => c.name === "openat")!.rule, /O_WRONLY/);
  assert.match(audit.seccomp.allowed.find((c) => c.name === "ioctl")!.rule, /TUNSETOFFLOAD/);
  assert.match(audit.seccomp.otherwise, /EPERM/);
  // Mode-dependent entries follow the options, as the filter does.
  const client = buildAudit({ ...LISTENING, client: true });
  assert.ok(client.seccomp.allowed.some((c) => c.name === "connect"));
  assert.ok(!audit.seccomp.allowed.some((c) => c.name === "connect"));
  const strict = buildAudit({ ...LISTENING, ioUring: "off" });
  assert.ok(!strict.seccomp.allowed.some((c) => c.name.startsWith("io_uring")));
  assert.deepEqual(
    audit.landlock.rules,
    landlockRules({ root: MODULE_ROOT, socketDir: "/run/vionet" }).map((r) => ({
      path: r.path,
      access: [...r.access],
      why: r.why,
    })),
  );
  assert.ok(!buildAudit(INHERITED).landlock.rules.some((r) => r.access.includes("REMOVE_FILE")));
  const text = formatAudit(audit);
  for (const c of audit.seccomp.allowed) assert.ok(text.includes(`  ${c.name} `), c.name);
  for (const r of audit.landlock.rules) assert.ok(text.includes(`  ${r.path}: `), r.path);
});

Deno.test("--metrics: the audit lists its socket and /proc/net/dev, a Landlock rule for its directory, and accept4 even with --client", () => {
  const metricsPath = "/run/vionet-metrics/vionet0.sock";
  const audit = buildAudit({ ...LISTENING, metricsPath });
  assert.ok(audit.files.some((f) => f.path === metricsPath && f.when === "set-up"));
  assert.ok(audit.files.some((f) => f.path.startsWith("/proc/net/dev")));
  assert.deepEqual(
    audit.landlock.rules.filter((r) => r.access.includes("REMOVE_FILE")).map((r) => r.path),
    ["/run/vionet", "/run/vionet-metrics"],
  );
  assert.deepEqual(
    audit.landlock.rules,
    landlockRules({
      root: MODULE_ROOT,
      socketDir: "/run/vionet",
      metricsDir: "/run/vionet-metrics",
    })
      .map((r) => ({ path: r.path, access: [...r.access], why: r.why })),
  );
  // The same directory for both sockets: one rule.
  const same = buildAudit({ ...LISTENING, metricsPath: "/run/vionet/m.sock" });
  assert.equal(same.landlock.rules.filter((r) => r.access.includes("REMOVE_FILE")).length, 1);
  // --client accepts nothing on vhost-user, but --metrics still needs accept4.
  const client = { ...LISTENING, client: true };
  assert.ok(!buildAudit(client).seccomp.allowed.some((c) => c.name === "accept4"));
  const clientMetrics = buildAudit({ ...client, metricsPath });
  const accept4 = clientMetrics.seccomp.allowed.find((c) => c.name === "accept4");
  assert.match(accept4?.why ?? "", /^HTTP clients on the metrics socket/);
  const ctx = {
    client: true,
    accepts: false,
    metrics: true,
    ioUring: "auto" as const,
    pid: Deno.pid,
  };
  assert.deepEqual(
    clientMetrics.seccomp.allowed.map((c) => [c.name, c.nr, c.why]),
    seccompPolicy(ctx).entries.map((e) => [e.name, e.nr, e.why]),
  );
});

Deno.test("socket activation: the audit names the descriptor LISTEN_FDS passed", () => {
  const audit = buildAudit({
    ...INHERITED,
    socketActivated: { fd: 3, name: null, count: 1 },
  });
  assert.ok(audit.files.some((f) => f.path === "descriptor 3 (LISTEN_FDS)"));
  assert.deepEqual(
    part(audit, "parent").permissions.env,
    ["XDG_RUNTIME_DIR", "JOURNAL_STREAM", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"],
  );
});
