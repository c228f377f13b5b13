/**
 * A subprocess for sandbox_test.ts: it sets up like the daemon (a tap, a
 * listening socket in a directory it creates), enters the real sandbox
 * (`enterSandbox`: user, Landlock, seccomp), and then tries, from its main
 * thread and from FFI workers started before and after, what a compromised
 * daemon would try, and what the daemon itself must still do.
 *
 * `deno run -A sandbox_probe.ts <dir> <on|off> <user>`, as root, inside a
 * network namespace the test made. It speaks JSON lines on stdout:
 * `{"step":"offloads-on"}` and `{"step":"offloads-off"}` each wait for a
 * line on stdin (the test reads `ethtool -k` meanwhile), `{"step":"accept"}`
 * waits for the test to connect to the socket, `{"step":"done", ...}`
 * carries every outcome. Loaded with `?worker` it is the FFI worker that
 * runs the same attempts when asked.
 *
 * @module
 */

import * as libc from "../../../parent/host/libc.ts";
import {
  createTap,
  TAP_IOCTLS,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
} from "../../../parent/host/tap.ts";
import { enterSandbox } from "../../../parent/host/sandbox.ts";
import { resolveUser } from "../../../parent/host/users.ts";
import { threadCapabilities } from "../../../parent/host/privileges.ts";
import { threadSeccomp } from "../../../parent/host/seccomp.ts";
import { handDirectories } from "../../../parent/control/daemon.ts";
import { DeviceHost } from "../../../parent/control/device_host.ts";
import { sockaddrUn } from "../../../parent/control/vhost_user_socket.ts";
import { quietLogger, testConfig } from "../../helpers.ts";

/** Calls the product's libc table does not have: a compromised daemon's wishes. */
const evil = Deno.dlopen("libc.so.6", {
  execve: { parameters: ["buffer", "buffer", "buffer"], result: "i32" },
  fork: { parameters: [], result: "i32" },
  _exit: { parameters: ["i32"], result: "void" },
  mount: { parameters: ["buffer", "buffer", "buffer", "u64", "pointer"], result: "i32" },
  unshare: { parameters: ["i32"], result: "i32" },
  setuid: { parameters: ["u32"], result: "i32" },
});

const AF_INET = 2;
const AF_NETLINK = 16;
const SOCK_RAW = 3;
const CLONE_NEWUSER = 0x10000000;
const TCGETS = 0x5401n;

/** "ok", or the errno's name. */
function outcome(fn: () => number | bigint | void): string {
  try {
    const r = fn();
    if (r === -1 || r === -1n) return libc.errnoName(libc.errno());
    return "ok";
  } catch (e) {
    return e instanceof libc.SyscallError
      ? e.code
      : `${(e as Error).name}: ${(e as Error).message}`;
  }
}

/** Opens `path` with `flags`; "ok" (and closed) or the errno. */
function tryOpen(path: string, flags: number): string {
  return outcome(() => {
    const fd = libc.sys.open(libc.cstr(path), flags, 0o600);
    if (fd >= 0) libc.close(fd);
    return fd;
  });
}

function sockaddrIn(port: number): Uint8Array {
  const a = new Uint8Array(16);
  const v = new DataView(a.buffer);
  v.setUint16(0, AF_INET, true);
  v.setUint16(2, port, false);
  a.set([127, 0, 0, 1], 4);
  return a;
}

function abstractAddr(name: string): Uint8Array {
  const bytes = new TextEncoder().encode(name);
  const a = new Uint8Array(2 + 1 + bytes.length);
  new DataView(a.buffer).setUint16(0, libc.AF_UNIX, true);
  a.set(bytes, 3); // sun_path[0] = 0: the abstract namespace
  return a;
}

/** What the attempts need to know. */
interface Target {
  dir: string;
  tapFd: number;
  abstract: string;
  moduleFile: string;
}

/** Everything a compromised daemon would try, and the reads it must still do. */
function attempts(t: Target): Record<string, string> {
  const r: Record<string, string> = {};
  const argv = new BigUint64Array(2);
  const path = libc.cstr("/bin/true");
  argv[0] = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(path)));
  r.execve = outcome(() =>
    evil.symbols.execve(path, new Uint8Array(argv.buffer), new Uint8Array(8))
  );
  r.readOutsideRules = tryOpen("/etc/hostname", libc.O_RDONLY | libc.O_CLOEXEC);
  r.readShadow = tryOpen("/etc/shadow", libc.O_RDONLY | libc.O_CLOEXEC);
  r.writeFile = tryOpen(`${t.dir}/written`, libc.O_WRONLY | libc.O_CREAT | libc.O_CLOEXEC);
  r.readModule = tryOpen(t.moduleFile, libc.O_RDONLY | libc.O_CLOEXEC);
  r.readProc = tryOpen("/proc/self/status", libc.O_RDONLY | libc.O_CLOEXEC);
  r.socketInet = outcome(() => {
    const fd = libc.sys.socket(AF_INET, libc.SOCK_STREAM | libc.SOCK_CLOEXEC, 0);
    if (fd < 0) return fd;
    // Landlock's own verdict on TCP, where seccomp lets the socket be made.
    r.tcpConnect = outcome(() => libc.sys.connect(fd, sockaddrIn(9), 16));
    libc.close(fd);
  });
  r.socketNetlink = outcome(() => {
    const fd = libc.sys.socket(AF_NETLINK, SOCK_RAW | libc.SOCK_CLOEXEC, 0);
    if (fd >= 0) libc.close(fd);
    return fd;
  });
  r.unixDgram = outcome(() => {
    const fd = libc.sys.socket(libc.AF_UNIX, libc.SOCK_DGRAM | libc.SOCK_CLOEXEC, 0);
    if (fd >= 0) libc.close(fd);
    return fd;
  });
  r.abstractConnect = outcome(() => {
    const fd = libc.sys.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC, 0);
    if (fd < 0) return fd;
    const addr = abstractAddr(t.abstract);
    const c = libc.sys.connect(fd, addr, addr.byteLength);
    const e = libc.errno();
    libc.close(fd);
    if (c < 0) throw new libc.SyscallError("connect", e);
  });
  const req = new Uint8Array(40);
  req.set(new TextEncoder().encode("vsbx"));
  new DataView(req.buffer).setUint16(16, 0x1002 | 0x4000, true);
  r.ioctlTunsetiff = outcome(() => libc.sys.ioctl(t.tapFd, TAP_IOCTLS.TUNSETIFF.number, req));
  r.ioctlTcgets = outcome(() => libc.sys.ioctl(0, TCGETS, new Uint8Array(64)));
  r.memfd = outcome(() => {
    const fd = libc.sys.memfd_create(libc.cstr("probe"), libc.MFD_CLOEXEC);
    if (fd >= 0) libc.close(fd);
    return fd;
  });
  // A fresh io_uring would run operations seccomp never sees: not after set-up.
  r.ioUringSetup = outcome(() => {
    const fd = libc.sys.io_uring_setup(425n, 4, new Uint32Array(30));
    if (fd >= 0) libc.close(fd);
    return fd;
  });
  r.mount = outcome(() =>
    evil.symbols.mount(libc.cstr("none"), libc.cstr(t.dir), libc.cstr("tmpfs"), 0n, null)
  );
  r.setuid0 = outcome(() => evil.symbols.setuid(0));
  return r;
}

/** Attempts that would change the probe itself if they succeeded: only under seccomp. */
function seccompOnlyAttempts(): Record<string, string> {
  return {
    fork: outcome(() => {
      const pid = evil.symbols.fork();
      if (pid === 0) evil.symbols._exit(0); // the child, had fork succeeded
      return pid;
    }),
    unshareUser: outcome(() => evil.symbols.unshare(CLONE_NEWUSER)),
  };
}

// ---------------------------------------------------------------------------
// The FFI worker

/** `ping` only answers (before the sandbox nothing may be tried: execve would succeed). */
type Ask = { ping: true } | { target: Target; seccompOn: boolean };

function startWorker(): Worker {
  return new Worker(new URL(`${import.meta.url}?worker`), {
    type: "module",
    deno: { permissions: { ffi: true } },
  });
}

function ask(worker: Worker, message: Ask): Promise<Record<string, string>> {
  return new Promise((resolve, reject) => {
    worker.onmessage = (e) => resolve(e.data);
    worker.onerror = (e) => {
      e.preventDefault();
      reject(new Error(e.message));
    };
    worker.postMessage(message);
  });
}

// ---------------------------------------------------------------------------
// The main thread

const lines = (async function* () {
  let buf = "";
  for await (const chunk of Deno.stdin.readable.pipeThrough(new TextDecoderStream())) {
    buf += chunk;
    let nl;
    while ((nl = buf.indexOf("\n")) >= 0) {
      yield buf.slice(0, nl);
      buf = buf.slice(nl + 1);
    }
  }
})();

function say(step: string, more: Record<string, unknown> = {}): void {
  console.log(JSON.stringify({ step, ...more }));
}

async function main(dir: string, seccomp: "on" | "off", userSpec: string) {
  const user = resolveUser(userSpec);
  const tap = createTap("vsb0");
  const socketDir = `${dir}/run`;
  const created = libc.mkdirs(socketDir, 0o700);
  if (user.uid !== 0) handDirectories(created, user);
  const socketPath = `${socketDir}/s.sock`;
  const listenFd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  libc.bind(listenFd, sockaddrUn(socketPath));
  libc.listen(listenFd, 4);
  // An abstract socket made before the sandbox: outside its Landlock domain.
  const abstract = `vionet-probe-${Deno.pid}`;
  const abstractFd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  libc.bind(abstractFd, abstractAddr(abstract));
  libc.listen(abstractFd, 4);
  const target: Target = {
    dir,
    tapFd: tap.fd,
    abstract,
    moduleFile: new URL("../../../deno.json", import.meta.url).pathname,
  };
  const early = startWorker();
  await ask(early, { ping: true }); // running before the sandbox

  const report = enterSandbox({
    user,
    seccomp,
    ioUring: "auto",
    client: false,
    socketDir,
  });

  // Started after: a new I/O-style FFI worker and a new device worker load their modules.
  const late = startWorker();
  const device = await DeviceHost.start({
    config: testConfig(),
    handlers: { tunscap: (o) => o },
    logger: quietLogger(),
  });
  const devicePermissions = await device.getPermissions();
  device.terminate();

  const seccompOn = seccomp === "on";
  const results = {
    main: { ...attempts(target), ...(seccompOn ? seccompOnlyAttempts() : {}) },
    early: await ask(early, { target, seccompOn }),
    late: await ask(late, { target, seccompOn }),
  };

  // What the daemon must still do as its user, under its filter.
  const frame = new Uint8Array(12 + 60);
  frame.fill(0xff, 12, 18);
  const tapWrite = tap.write(frame);
  tap.setOffload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
  say("offloads-on");
  await lines.next();
  tap.setOffload(0);
  say("offloads-off");
  await lines.next();
  const mtu = tap.mtu();
  say("accept");
  let accept = "no connection";
  if ((await libc.pollOneAsync(listenFd, libc.POLLIN, 10_000)) & libc.POLLIN) {
    accept = outcome(() => libc.close(libc.accept4(listenFd, libc.SOCK_CLOEXEC)));
  }
  // Each read rule the audit prints, tried: a directory is listed, a file read.
  const { buildAudit } = await import("../../../parent/host/audit.ts");
  const audit = buildAudit({ socketPath, listenFd: null, client: false, tap: "vsb0", tapFd: null });
  const auditedRules: Record<string, string> = {};
  for (const rule of audit.landlock.rules.filter((r) => r.access.includes("READ_FILE"))) {
    const isDir = rule.access.includes("READ_DIR");
    auditedRules[rule.path] = tryOpen(
      rule.path,
      libc.O_RDONLY | libc.O_CLOEXEC | (isDir ? libc.O_DIRECTORY : 0),
    );
  }
  const unlinkSocket = outcome(() => libc.unlink(socketPath));
  const threads = threadCapabilities();
  const filters = threadSeccomp();
  early.terminate();
  late.terminate();
  say("done", {
    log: report.log,
    results,
    devicePermissions,
    tapWrite,
    mtu,
    accept,
    auditedRules,
    unlinkSocket,
    threads,
    filters,
    user,
  });
  // Closing the tap it created removes it, as the daemon's exit does.
  tap.close();
  libc.close(listenFd);
  libc.close(abstractFd);
}

// Dispatch last: everything above is initialised by now.
if (new URL(import.meta.url).search === "?worker") {
  const scope = self as unknown as {
    onmessage: (e: MessageEvent<Ask>) => void;
    postMessage(message: unknown): void;
  };
  scope.onmessage = (e) => {
    const m = e.data;
    scope.postMessage(
      "ping" in m ? {} : { ...attempts(m.target), ...(m.seccompOn ? seccompOnlyAttempts() : {}) },
    );
  };
} else {
  await main(Deno.args[0], Deno.args[1] as "on" | "off", Deno.args[2]);
  Deno.exit(0);
}
