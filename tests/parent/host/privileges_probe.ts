/**
 * A subprocess for audit_test.ts and privileges_test.ts, so that nothing is
 * dropped in the test runner itself. Prints one JSON object on stdout.
 *
 * Modes (first argument):
 * - `permissions`: run under the start task's flags; reports the Deno
 *   permission states of the main thread and of a worker started with each
 *   audited worker's options, as queried inside each.
 * - `main-only`: capset(2) to nothing on the main thread alone, then every
 *   thread's capabilities (the reason a drop must reach every thread).
 * - `drop <socket path>`: as root, inside a network namespace the test made:
 *   creates tap vpd0 and a listening socket, starts an FFI worker and
 *   blocking-pool threads, calls dropPrivileges(), then records what every
 *   thread holds and what still works.
 *
 * Loaded with `?worker` as the FFI worker of `drop`: it answers
 * `createTap` requests, to show that a thread started before the drop lost
 * its privileges too.
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
import {
  CAPABILITIES_KEPT_AFTER_SETUP,
  dropPrivileges,
  threadCapabilities,
} from "../../../parent/host/privileges.ts";

/** errno name of a failure (or "ok"), unwrapping TapError causes. */
function outcome(fn: () => unknown): string {
  try {
    fn();
    return "ok";
  } catch (e) {
    const cause = (e as Error).cause ?? e;
    return cause instanceof libc.SyscallError ? cause.code : `${(e as Error).name}: ${e}`;
  }
}

type Queried = Record<string, { state: string; items: Record<string, string> }>;

/** The descriptor field that scopes each permission. */
const SCOPE_KEY: Record<string, string> = {
  read: "path",
  write: "path",
  net: "host",
  env: "variable",
  run: "command",
  ffi: "path",
  sys: "kind",
  import: "host",
};

/** Queries every permission, and each listed item of a scoped one, in the calling thread. */
async function query(names: string[], items: Record<string, string[]>): Promise<Queried> {
  const out: Queried = {};
  for (const name of names) {
    const per: Record<string, string> = {};
    for (const item of items[name] ?? []) {
      const desc = { name, [SCOPE_KEY[name]]: item } as unknown as Deno.PermissionDescriptor;
      per[item] = (await Deno.permissions.query(desc)).state;
    }
    const desc = { name } as Deno.PermissionDescriptor;
    out[name] = { state: (await Deno.permissions.query(desc)).state, items: per };
  }
  return out;
}

/** The same function as a module a worker with no permissions at all can load. */
const QUERY_WORKER_URL = `data:application/javascript,${
  encodeURIComponent(
    `const SCOPE_KEY = ${JSON.stringify(SCOPE_KEY)};\n${query.toString()}\n` +
      "self.onmessage = async (e) => self.postMessage(await query(e.data.names, e.data.items));",
  )
}`;

async function permissions(): Promise<{ main: Queried; workers: Record<string, Queried> }> {
  const { buildAudit, AUDITED_WORKERS } = await import("../../../parent/host/audit.ts");
  const { PERMISSION_NAMES } = await import("../../../ipc/protocol.ts");
  const audit = buildAudit({
    socketPath: "/tmp/x.sock",
    listenFd: null,
    client: false,
    tap: "x",
    tapFd: null,
  });
  const names = [...PERMISSION_NAMES];
  const scoped = (part: string) =>
    Object.fromEntries(
      Object.entries(audit.parts.find((p) => p.name === part)!.permissions)
        .filter(([, v]) => Array.isArray(v)),
    ) as Record<string, string[]>;
  const main = await query(names, scoped("parent"));
  const workers: Record<string, Queried> = {};
  for (const w of AUDITED_WORKERS) {
    const name = w.options.name!;
    const worker = new Worker(QUERY_WORKER_URL, w.options as WorkerOptions);
    workers[name] = await new Promise<Queried>((resolve, reject) => {
      worker.onmessage = (e) => resolve(e.data);
      worker.onerror = (e) => {
        e.preventDefault();
        reject(new Error(`${name}: ${e.message}`));
      };
      worker.postMessage({ names, items: scoped(name) });
    });
    worker.terminate();
  }
  return { main, workers };
}

function mainOnly() {
  const header = new Uint32Array([0x20080522, 0]);
  const data = new Uint32Array(6);
  libc.capset(new Uint8Array(header.buffer), new Uint8Array(data.buffer));
  return { mainTid: libc.getpid(), threads: threadCapabilities() };
}

function startFfiWorker(): Promise<Worker> {
  const worker = new Worker(new URL(`${import.meta.url}?worker`), {
    type: "module",
    deno: { permissions: { ffi: true } },
  });
  return Promise.resolve(worker);
}

function askWorker(worker: Worker, name: string): Promise<string> {
  return new Promise((resolve, reject) => {
    worker.onmessage = (e) => resolve(e.data.createTap);
    worker.onerror = (e) => {
      e.preventDefault();
      reject(new Error(e.message));
    };
    worker.postMessage({ op: "createTap", name });
  });
}

/** Puts some calls on Deno's blocking pool, so that its threads exist. */
async function usePool(): Promise<void> {
  await Promise.all([1, 2, 3, 4].map(() => libc.pollOneAsync(0, libc.POLLIN, 20)));
}

function listen(path: string): number {
  const addr = new Uint8Array(110);
  new DataView(addr.buffer).setUint16(0, libc.AF_UNIX, true);
  addr.set(new TextEncoder().encode(path), 2);
  const fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  libc.bind(fd, addr);
  libc.listen(fd, 4);
  return fd;
}

function connectAndAccept(path: string, listenFd: number): string {
  return outcome(() => {
    const addr = new Uint8Array(110);
    new DataView(addr.buffer).setUint16(0, libc.AF_UNIX, true);
    addr.set(new TextEncoder().encode(path), 2);
    const client = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
    libc.connect(client, addr);
    const served = libc.accept4(listenFd, libc.SOCK_CLOEXEC);
    libc.close(served);
    libc.close(client);
  });
}

/** SIOCSIFFLAGS with the tap's current flags: a host reconfiguration. */
function setLinkFlags(name: string): string {
  return outcome(() => {
    const sock = libc.socket(libc.AF_INET, libc.SOCK_DGRAM | libc.SOCK_CLOEXEC);
    try {
      const req = new Uint8Array(40);
      req.set(new TextEncoder().encode(name));
      libc.ioctl(sock, TAP_IOCTLS.SIOCGIFFLAGS.number, req, "SIOCGIFFLAGS");
      libc.ioctl(sock, TAP_IOCTLS.SIOCSIFFLAGS.number, req, "SIOCSIFFLAGS");
    } finally {
      libc.close(sock);
    }
  });
}

async function drop(socketPath: string) {
  const tap = createTap("vpd0");
  const listenFd = listen(socketPath);
  const early = await startFfiWorker();
  // The worker is running once it answers; before the drop it can create a tap.
  const earlyBefore = await askWorker(early, "vpd2");
  await usePool();
  const before = threadCapabilities();

  const result = dropPrivileges(CAPABILITIES_KEPT_AFTER_SETUP.map((c) => c.name));
  const after = threadCapabilities();

  const late = await startFfiWorker();
  const lateCreate = await askWorker(late, "vpd3");
  const earlyAfter = await askWorker(early, "vpd4");
  await usePool();
  const afterMore = threadCapabilities();

  const offload = outcome(() => tap.setOffload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6));
  // TSO4 without CSUM: set_offload() itself answers EINVAL, so the call got past any permission check.
  const offloadInvalid = libc.sys.ioctl_value(tap.fd, TAP_IOCTLS.TUNSETOFFLOAD.number, 0x02n) === 0
    ? "ok"
    : libc.errnoName(libc.errno());
  const offloadOff = outcome(() => tap.setOffload(0));
  const frame = new Uint8Array(12 + 60);
  frame.fill(0xff, 12, 18); // broadcast destination
  const tapWrite = tap.write(frame);
  const mainCreate = outcome(() => createTap("vpd1").close());
  const linkFlags = setLinkFlags(tap.name);
  const accept = connectAndAccept(socketPath, listenFd);
  early.terminate();
  late.terminate();
  tap.close();
  libc.close(listenFd);
  return {
    result,
    earlyBefore,
    before,
    after,
    afterMore,
    lateCreate,
    earlyAfter,
    offload,
    offloadInvalid,
    offloadOff,
    tapWrite,
    mainCreate,
    linkFlags,
    accept,
  };
}

// Dispatch last: everything above is initialised by now.
if (new URL(import.meta.url).search === "?worker") {
  // This module is also a main module, so its globals are typed as Window's.
  const scope = self as unknown as {
    onmessage: (e: MessageEvent<{ op: string; name: string }>) => void;
    postMessage(message: unknown): void;
  };
  scope.onmessage = (e) => {
    scope.postMessage({ createTap: outcome(() => createTap(e.data.name).close()) });
  };
} else {
  const mode = Deno.args[0];
  const result = mode === "permissions"
    ? await permissions()
    : mode === "main-only"
    ? mainOnly()
    : mode === "drop"
    ? await drop(Deno.args[1])
    : (() => {
      throw new Error(`unknown mode ${mode}`);
    })();
  console.log(JSON.stringify(result));
}
