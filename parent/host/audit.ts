/**
 * The permission audit: what every part of vionet may do, built from the
 * definitions the code itself uses, never from a separate list:
 *
 * - the parent's main thread: the Deno flags of deno.json's `start` task
 *   (imported here, so the audit and the task cannot disagree);
 * - each worker: the Worker options it is started with
 *   (`DEVICE_WORKER_OPTIONS`, `IO_WRITER_OPTIONS`, `IO_POLLER_OPTIONS`);
 * - the library and every symbol of libc.ts's `Deno.dlopen` table;
 * - every ioctl in tap.ts's `TAP_IOCTLS`;
 * - the Linux capabilities kept after set-up (privileges.ts);
 * - the user the daemon becomes (users.ts);
 * - the seccomp allowlist, each call with its argument rule, from the very
 *   table the filter is assembled from (seccomp_policy.ts);
 * - the Landlock rules (landlock.ts) and what this kernel's ABI handles.
 *
 * The files and sockets the parent opens have no single table in the code:
 * {@link buildAudit} lists them per source file, and a test scans `parent/`
 * for the calls that open something and fails when a file that opens
 * something is missing from the list.
 *
 * @module
 */

import { hex } from "../../ipc/hex.ts";
import denoConfig from "../../deno.json" with { type: "json" };
import { PERMISSION_NAMES, type PermissionName } from "../../ipc/protocol.ts";
import type { Options } from "../control/cli.ts";
import {
  IO_POLLER_OPTIONS,
  IO_POLLER_URL,
  IO_WRITER_OPTIONS,
  IO_WRITER_URL,
} from "../control/datapath_host.ts";
import { DEVICE_WORKER_OPTIONS, DEVICE_WORKER_URL } from "../control/device_host.ts";
import { CAPTURE_WORKER_OPTIONS, CAPTURE_WORKER_URL } from "../control/capture_host.ts";
import { LIBC_NAME, LIBC_SYMBOLS } from "./libc.ts";
import {
  CAPABILITIES_KEPT_AFTER_SETUP,
  CAPABILITIES_NOT_NEEDED_AFTER_SETUP,
  type CapabilityState,
  currentCapabilities,
} from "./privileges.ts";
import { TAP_IOCTLS } from "./tap.ts";
import {
  type ArgCheck,
  NOTABLY_DENIED,
  type PolicyContext,
  seccompPolicy,
  type SyscallRule,
} from "./seccomp_policy.ts";
import { landlockRules, landlockSupport, planLandlock } from "./landlock.ts";
import { MODULE_ROOT } from "./sandbox.ts";
import { DEFAULT_USERS } from "./users.ts";
import { defaultSocketMode, socketDirMode } from "../control/socket_access.ts";

/** A Deno permission: not granted, granted for everything, or for these paths/hosts/names. */
export type Grant = boolean | string[];

/** One Deno permission set, all {@link PERMISSION_NAMES} present. */
export type PermissionSet = Record<PermissionName, Grant>;

/** The Worker options a part is started with (the `deno.permissions` part matters here). */
interface WorkerOptionsLike {
  readonly name?: string;
  readonly deno?: { readonly permissions?: unknown };
}

/** A worker the audit covers: its module and the exported options it is started with. */
export interface AuditedWorker {
  url: URL;
  options: WorkerOptionsLike;
  /** Where the options are defined, e.g. "DEVICE_WORKER_OPTIONS in parent/control/device_host.ts". */
  source: string;
  /** What the worker does, one line. */
  role: string;
}

/** Every worker vionet starts. A new worker belongs here (the audit test checks the options). */
export const AUDITED_WORKERS: readonly AuditedWorker[] = [
  {
    url: DEVICE_WORKER_URL,
    options: DEVICE_WORKER_OPTIONS,
    source: "DEVICE_WORKER_OPTIONS in parent/control/device_host.ts",
    role: "virtio-net device: parses everything the guest controls",
  },
  {
    url: IO_WRITER_URL,
    options: IO_WRITER_OPTIONS,
    source: "IO_WRITER_OPTIONS in parent/control/datapath_host.ts",
    role: "TX: writev of validated records from guest memory to the tap, those the poller " +
      "left; TX call eventfd",
  },
  {
    url: IO_POLLER_URL,
    options: IO_POLLER_OPTIONS,
    source: "IO_POLLER_OPTIONS in parent/control/datapath_host.ts",
    role: "RX: readv from the tap into posted guest buffers, RX used ring and call; " +
      "waits on kicks, tap and wake (epoll); writes the TX records of the kicks it reads",
  },
  {
    url: CAPTURE_WORKER_URL,
    options: CAPTURE_WORKER_OPTIONS,
    source: "CAPTURE_WORKER_OPTIONS in parent/control/capture_host.ts",
    role: "--pcap only: write(2) of the I/O workers' capture rings to the capture file the " +
      "parent opened during set-up (pcapng), up to --pcap-max",
  },
];

/** One part of the process: a thread running JavaScript. */
export interface PartAudit {
  name: string;
  kind: "main thread" | "worker";
  /** How many run: "1", or one per queue pair in use (up to `--queues`). */
  count: string;
  /** Its module, relative to the repository root. */
  module: string;
  role: string;
  /** Where its permissions come from. */
  source: string;
  permissions: PermissionSet;
  /** For the main thread: every flag of the start task, permission flags or not. */
  flags?: string[];
  notes: string[];
}

/** One FFI symbol: the key code calls, the C symbol, its signature. */
export interface SymbolAudit {
  key: string;
  symbol: string;
  parameters: string[];
  result: string;
  nonblocking: boolean;
}

export interface LibraryAudit {
  name: string;
  /** The parts that load it (those holding FFI). */
  loadedBy: string[];
  symbols: SymbolAudit[];
}

export interface IoctlAudit {
  name: string;
  /** The request number, hex. */
  number: string;
  /** The descriptor it is issued on. */
  on: string;
  purpose: string;
}

/** A file, socket or descriptor the parent opens, receives or maps. */
export interface FileAudit {
  what: string;
  /** A path, or how the descriptor arrives. */
  path: string;
  access: string;
  /** "set-up" (before the drop), "serving" (after), or "drop" (during it). */
  when: "set-up" | "serving" | "drop";
  /** The source file that does it. */
  source: string;
}

export interface CapabilityAudit {
  /** Capabilities the set-up itself uses (before the drop), with the reason. */
  neededForSetup: { name: string; why: string }[];
  /** Kept after set-up, with the justification (empty: none). */
  keptAfterSetup: { name: string; why: string }[];
  /** Considered and not kept, with the reason. */
  notKept: { name: string; why: string }[];
  /** What else the drop does. */
  drop: string[];
  /** The main thread's sets when the audit was built, if observed. */
  now?: CapabilityState;
}

/** The user every thread becomes after set-up. */
export interface UserAudit {
  /** `--user`, or null for the default. */
  option: string | null;
  /** The users tried, in order, when `--user` is not given. */
  defaults: string[];
  /** What changes in every thread. */
  switch: string[];
  /** The main thread's ids when the audit was built, if observed. */
  now?: { uids: number[]; gids: number[]; groups: number[] };
}

/** One allowlisted system call and its rule. */
export interface SyscallAudit {
  name: string;
  nr: number;
  /** "allow", "ENOSYS", or the argument checks in words. */
  rule: string;
  why: string;
}

/** The seccomp filter every thread runs after set-up. */
export interface SeccompAudit {
  /** `--seccomp`. */
  mode: "on" | "off" | "log";
  /** How it is put on the threads. */
  install: string;
  /** For a call not listed. */
  otherwise: string;
  /** For another architecture's call or an x32 number. */
  wrongArch: string;
  allowed: SyscallAudit[];
  /** Calls a compromised daemon would want, and why they are not listed. */
  notablyDenied: { name: string; nr: number; why: string }[];
}

/** The Landlock ruleset every thread runs under after set-up. */
export interface LandlockAudit {
  /** This kernel's ABI (0: none). */
  abi: number;
  handledFs: string[];
  handledNet: string[];
  scoped: string[];
  rules: { path: string; access: string[]; why: string }[];
  /** What this kernel lacks. */
  notes: string[];
}

/** The whole audit. JSON-able: numbers as hex strings, no bigints. */
export interface Audit {
  program: "vionet";
  auditVersion: 2;
  parts: PartAudit[];
  libraries: LibraryAudit[];
  ioctls: IoctlAudit[];
  files: FileAudit[];
  capabilities: CapabilityAudit;
  user: UserAudit;
  seccomp: SeccompAudit;
  landlock: LandlockAudit;
}

/** The options that decide what the parent opens, and its sandbox (these default as the CLI's do). */
export type AuditOptions =
  & Pick<Options, "socketPath" | "listenFd" | "client" | "tap" | "tapFd">
  & Partial<
    Pick<
      Options,
      | "ioUring"
      | "user"
      | "seccomp"
      | "queues"
      | "steering"
      | "metricsPath"
      | "socketActivated"
      | "pcapPath"
    >
  >
  & Partial<Pick<Options, "mtu" | "socketGroup" | "socketMode">>;

// ---------------------------------------------------------------------------
// The main thread's flags

const ENV_WORD = /^([A-Z_][A-Z0-9_]*)=(.*)$/;

/** The `start` task of deno.json, split into words, without its leading `NAME=value` words. */
export function startTaskWords(): string[] {
  const words = denoConfig.tasks.start.trim().split(/\s+/);
  return words.slice(words.findIndex((w) => !ENV_WORD.test(w)));
}

/**
 * The environment the start task sets for Deno (its leading `NAME=value`
 * words): `DENO_DIR` where nothing can be created, so the daemon keeps no
 * cache on disk and holds no descriptor to a cache file that other Deno
 * processes, root's among them, would later trust; `DENO_NO_UPDATE_CHECK`,
 * so Deno never looks up and fetches its release list from the daemon.
 * Whoever starts the daemon another way sets the same (the tests do).
 */
export function startTaskEnv(): Record<string, string> {
  const env: Record<string, string> = {};
  for (const word of denoConfig.tasks.start.trim().split(/\s+/)) {
    const m = ENV_WORD.exec(word);
    if (!m) break;
    env[m[1]] = m[2];
  }
  return env;
}

/** The Deno flags of the start task: the words between `run` and the main module. */
export function startTaskFlags(): string[] {
  const words = startTaskWords();
  const run = words.indexOf("run");
  const main = words.findIndex((w, i) => i > run && !w.startsWith("-"));
  if (words[0] !== "deno" || run < 0 || main < 0) {
    throw new Error(`deno.json: cannot read Deno flags from the start task "${words.join(" ")}"`);
  }
  return words.slice(run + 1, main);
}

/** The main module the start task runs, relative to the repository root. */
export function startTaskModule(): string {
  const words = startTaskWords();
  return words[words.indexOf("run") + 1 + startTaskFlags().length];
}

function noPermissions(): PermissionSet {
  return Object.fromEntries(PERMISSION_NAMES.map((n) => [n, false])) as PermissionSet;
}

function isPermissionName(s: string): s is PermissionName {
  return (PERMISSION_NAMES as readonly string[]).includes(s);
}

/**
 * The permission set that `deno run` flags grant the main thread.
 * `--deny-*` wins over `--allow-*`: a bare deny removes the permission, a
 * scoped one is kept as a note. Without `--allow-import`, Deno 2 grants the
 * main thread import permission (measured: `Deno.permissions.query` says
 * "granted" for any host), so it is reported as granted.
 */
export function permissionsFromFlags(flags: readonly string[]): {
  permissions: PermissionSet;
  notes: string[];
} {
  const permissions = noPermissions();
  const notes: string[] = [];
  let importGiven = false;
  const denies: [PermissionName, string | undefined][] = [];
  for (const flag of flags) {
    if (flag === "-A" || flag === "--allow-all") {
      for (const n of PERMISSION_NAMES) permissions[n] = true;
      importGiven = true;
      continue;
    }
    const m = /^--(allow|deny)-([a-z]+)(?:=(.*))?$/.exec(flag);
    if (!m || !isPermissionName(m[2])) continue;
    const [, verb, name, value] = m;
    if (verb === "deny") {
      denies.push([name, value]);
      continue;
    }
    if (name === "import") importGiven = true;
    permissions[name] = value === undefined ? true : value.split(",").filter((v) => v !== "");
  }
  if (!importGiven) {
    permissions.import = true;
    notes.push(
      "import: Deno's default without --allow-import grants it; " +
        (flags.includes("--cached-only")
          ? "--cached-only keeps any module not already cached from being fetched"
          : "nothing stops a remote import from being fetched"),
    );
  }
  for (const [name, value] of denies) {
    if (value === undefined) permissions[name] = false;
    else notes.push(`${name}: denied for ${value.split(",").join(", ")}`);
  }
  return { permissions, notes };
}

/**
 * A worker's permission set from its options. `"none"` grants nothing, an
 * object grants what it lists (an omitted key is not granted: measured on Deno
 * 2.9.6), `"inherit"` (anywhere) takes the main thread's.
 */
export function permissionsFromWorkerOptions(
  options: WorkerOptionsLike,
  parent: PermissionSet,
): PermissionSet {
  const p = options.deno?.permissions ?? "inherit";
  if (p === "none") return noPermissions();
  if (p === "inherit") return { ...parent };
  if (typeof p !== "object" || p === null) {
    throw new TypeError(`Worker ${options.name}: deno.permissions ${String(p)} is not understood`);
  }
  const set = noPermissions();
  for (const [key, value] of Object.entries(p)) {
    if (!isPermissionName(key)) {
      throw new TypeError(`Worker ${options.name}: unknown permission ${key}`);
    }
    if (value === "inherit") set[key] = parent[key];
    else if (typeof value === "boolean") set[key] = value;
    else if (Array.isArray(value)) set[key] = value.map(String);
    else throw new TypeError(`Worker ${options.name}: permission ${key} is ${String(value)}`);
  }
  return set;
}

// ---------------------------------------------------------------------------
// Building it

const ROOT = new URL("../../", import.meta.url);

function relative(url: URL): string {
  return url.href.startsWith(ROOT.href) ? url.href.slice(ROOT.href.length) : url.href;
}

function hasFfi(p: PermissionSet): boolean {
  return p.ffi !== false;
}

function libraries(parts: PartAudit[]): LibraryAudit[] {
  const symbols = Object.entries(LIBC_SYMBOLS).map(([key, def]): SymbolAudit => {
    const d = def as {
      name?: string;
      parameters: readonly string[];
      result: string;
      nonblocking?: boolean;
    };
    return {
      key,
      symbol: d.name ?? key,
      parameters: [...d.parameters],
      result: d.result,
      nonblocking: d.nonblocking ?? false,
    };
  });
  return [{
    name: LIBC_NAME,
    loadedBy: parts.filter((p) => hasFfi(p.permissions)).map((p) => p.name),
    symbols,
  }];
}

function ioctls(): IoctlAudit[] {
  return Object.entries(TAP_IOCTLS).map(([name, d]) => ({
    name,
    number: hex(d.number),
    on: d.on === "tun" ? "the tap's /dev/net/tun descriptor" : d.on,
    purpose: d.purpose,
  }));
}

/** What the parent opens, receives and maps, for these options. */
function files(opts: AuditOptions): FileAudit[] {
  const out: FileAudit[] = [];
  if (opts.tapFd !== null) {
    out.push(
      {
        what: "tap (inherited)",
        path: `descriptor ${opts.tapFd} (--tap-fd)`,
        access: "ioctl TUNGETIFF, TUNSETVNETHDRSZ, TUNSETOFFLOAD; read, write",
        when: "set-up",
        source: "parent/host/tap.ts",
      },
      {
        what: "own network namespace",
        path: "/proc/thread-self/ns/net",
        access: "read-only open, compared by inode with TUNGETDEVNETNS",
        when: "set-up",
        source: "parent/host/tap.ts",
      },
    );
  } else {
    out.push(
      {
        what: "tap",
        path: "/dev/net/tun",
        access: `read-write; TUNSETIFF creates or attaches tap ${opts.tap}`,
        when: "set-up",
        source: "parent/host/tap.ts",
      },
      {
        what: "link flags socket",
        path: "socket(AF_INET, SOCK_DGRAM), closed at once",
        access: "ioctl SIOCGIFFLAGS, SIOCSIFFLAGS (link up)",
        when: "set-up",
        source: "parent/host/tap.ts",
      },
    );
  }
  out.push({
    what: "link MTU socket",
    path: "socket(AF_INET, SOCK_DGRAM), closed at once",
    access: `ioctl SIOCGIFMTU${
      opts.mtu != null ? `, SIOCSIFMTU (--mtu ${opts.mtu}, at set-up)` : ""
    }; SIOCGIFMTU again whenever the tap's longest frame is asked`,
    when: opts.mtu != null ? "set-up" : "serving",
    source: "parent/host/tap.ts",
  });
  out.push({
    what: "tap flags",
    path: `/sys/class/net/${opts.tap ?? "<tap>"}/{ifindex,tun_flags}`,
    access: "read-only",
    when: "set-up",
    source: "parent/host/tap.ts",
  });
  if (opts.listenFd !== null) {
    out.push({
      what: "vhost-user socket (inherited)",
      path: `descriptor ${opts.listenFd} (${opts.socketActivated ? "LISTEN_FDS" : "--fd"})`,
      access: "accept4, recvmsg/sendmsg with SCM_RIGHTS",
      when: "serving",
      source: "parent/control/vhost_user_socket.ts",
    });
  } else if (opts.client) {
    out.push({
      what: "vhost-user socket (client)",
      path: opts.socketPath ?? "<socket>",
      access: "socket(AF_UNIX, SOCK_STREAM), connect, reconnect after each disconnect",
      when: "serving",
      source: "parent/control/vhost_user_socket.ts",
    });
  } else {
    const path = opts.socketPath ?? "<socket>";
    const group = opts.socketGroup ?? null;
    const mode = opts.socketMode ?? defaultSocketMode(group);
    const modeText = (m: number) => `0${m.toString(8)}`;
    out.push(
      {
        what: "vhost-user socket directory",
        path: path.slice(0, Math.max(1, path.lastIndexOf("/"))),
        access:
          `created with mode ${modeText(socketDirMode(mode))}${
            group !== null ? ` and group ${group}` : ""
          } if missing (vionet's default directory: set so at every start); ` +
          "else left alone, lstat to warn when it keeps the socket's group out",
        when: "set-up",
        source: "parent/control/socket_access.ts",
      },
      {
        what: "vhost-user socket",
        path,
        access: "socket(AF_UNIX, SOCK_STREAM), bind, " +
          `${group !== null ? `lchown to group ${group}, ` : ""}chmod ${modeText(mode)}, ` +
          "listen 4, accept4; a stale socket there is probed with connect and unlinked; " +
          "removed at exit",
        when: "set-up",
        source: "parent/control/vhost_user_socket.ts",
      },
    );
  }
  out.push(
    {
      what: "guest memory",
      path: "memfds received from the VMM (SET_MEM_TABLE, ADD_MEM_REG, SCM_RIGHTS)",
      access: "fstat, mmap MAP_SHARED read-write, munmap",
      when: "serving",
      source: "parent/control/guest_memory_map.ts",
    },
    {
      what: "queue eventfds",
      path: "kick, call and err eventfds received from the VMM (SCM_RIGHTS)",
      access: "checked through readlink /proc/self/fd/N; kicks waited on by the poller " +
        "(epoll) and read once when let go; calls written by the writer and the poller",
      when: "serving",
      source: "parent/control/datapath_host.ts",
    },
    {
      what: "poller wake eventfd",
      path: "eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)",
      access: "written by the main thread and the writer, waited on by the poller (epoll)",
      when: "serving",
      source: "parent/control/datapath_host.ts",
    },
    {
      what: "epoll instance (poller)",
      path: "epoll_create1(EPOLL_CLOEXEC): an anonymous descriptor, per queue start",
      access: "epoll_ctl ADD/DEL of the wake eventfd, the kick eventfds and the tap; " +
        "epoll_wait, nothing else",
      when: "serving",
      source: "parent/io/wait_set.ts",
    },
    {
      what: "eBPF program (multi-queue tap's steering)",
      path: "bpf(BPF_PROG_LOAD): one socket-filter program of 57 instructions, at set-up, " +
        "only for a tap with more than one queue",
      access: "attached to the tap (TUNSETSTEERINGEBPF), its descriptor closed at once: " +
        "picks the queue of each frame the host sends to the guest",
      when: "set-up",
      source: "parent/host/tap_steering.ts",
    },
    {
      what: "io_uring rings, made",
      path: "io_uring_setup(64), six times during set-up (none with --io-uring off): each " +
        "created disabled, restricted by the kernel (IORING_REGISTER_RESTRICTIONS) to READV, " +
        "WRITEV and registering a file, then enabled. No ring can be made after set-up",
      access: "descriptors kept by the parent's ring pool, closed at exit",
      when: "set-up",
      source: "parent/io/io_uring.ts",
    },
    {
      what: "io_uring rings, lent",
      path: "three rings of the pool per data path: the writer's TX ring, the poller's TX and " +
        "RX rings",
      access: "mapped by the worker (mmap MAP_SHARED read-write), the tap registered, " +
        "IORING_OP_WRITEV to the tap or IORING_OP_READV (RWF_NOWAIT) from it; taken back at a " +
        "clean stop, closed otherwise",
      when: "serving",
      source: "parent/control/ring_pool.ts",
    },
    {
      what: "capability state",
      path: "/proc/self/status, /proc/self/task/*/{status,comm}, /proc/sys/kernel/cap_last_cap",
      access: "read-only",
      when: "drop",
      source: "parent/host/proc_self.ts",
    },
    {
      what: "worker threads (worker_census.ts)",
      path: "/proc/self/task, /proc/self/task/*/comm",
      access: "read-only: at each worker start, and while retired guest memory waits for " +
        "the threads of ended workers to exit",
      when: "serving",
      source: "parent/host/proc_self.ts",
    },
    {
      what: "drop handler",
      path: 'memfd "vionet-capdrop" (one page of code) and one anonymous page',
      access: "code mapped read+exec, never writable; arguments read-write, private",
      when: "drop",
      source: "parent/host/privileges.ts",
    },
    {
      what: "the user to become",
      path: "getpwnam(3): /etc/passwd or whatever NSS is configured with",
      access: "read-only lookup of --user (or vionet, then nobody); none for UID:GID",
      when: "set-up",
      source: "parent/host/users.ts",
    },
    {
      what: "Landlock rule paths",
      path: "each path of the Landlock rules (below), opened O_PATH",
      access: "no access: the descriptor only names the path to landlock_add_rule, then closed",
      when: "drop",
      source: "parent/host/landlock.ts",
    },
  );
  if (opts.metricsPath) {
    const path = opts.metricsPath;
    out.push(
      {
        what: "metrics socket directory",
        path: path.slice(0, Math.max(1, path.lastIndexOf("/"))),
        access: "created with mode 0755 if missing (who may connect is the socket's mode)",
        when: "set-up",
        source: "parent/control/daemon.ts",
      },
      {
        what: "metrics socket (--metrics)",
        path,
        access: "socket(AF_UNIX, SOCK_STREAM), bind, listen 16, accept4 (at most 8 clients, " +
          "8 KiB and 2 s each), read, sendmsg; a stale socket there is probed with connect and " +
          "unlinked; removed at exit",
        when: "set-up",
        source: "parent/control/http_server.ts",
      },
      {
        what: "tap counters",
        path: "/proc/net/dev (the daemon's network namespace, the tap's)",
        access: "read-only, at each scrape",
        when: "serving",
        source: "parent/host/tap_stats.ts",
      },
    );
  }
  if (opts.pcapPath) {
    out.push({
      what: "capture file (--pcap)",
      path: opts.pcapPath,
      access: "opened O_WRONLY|O_CREAT|O_TRUNC|O_NOFOLLOW, mode 0600, a regular file only; " +
        "the capture worker write()s pcapng to the descriptor, up to --pcap-max; closed at exit",
      when: "set-up",
      source: "parent/control/capture_host.ts",
    });
  }
  if ((opts.listenFd === null && !opts.client) || opts.metricsPath) {
    out.push({
      what: "socket directories created",
      path: "the directories created for the socket (none if they existed)",
      access: "opened O_NOFOLLOW and fchown()ed to the daemon's user, so that it can remove " +
        "the socket at exit",
      when: "set-up",
      source: "parent/control/daemon.ts",
    });
  }
  return out;
}

function ruleText(rule: SyscallRule): string {
  if (rule.action === "allow") return "allow";
  if (rule.action === "errno") return `fails with ${errnoLabel(rule.errno)} (not run)`;
  return "only if " + rule.checks.map(checkText).join(" and ");
}

function checkText(c: ArgCheck): string {
  if ("oneOf" in c) {
    // A process id reads best in decimal; flags and request numbers in hex.
    const show = (v: number) => c.name === "tgid" ? String(v) : hex(v);
    return `${c.name} (arg ${c.arg}) is ${
      c.oneOf.map((v) => `${v.name} (${show(v.value)})`).join(" or ")
    }`;
  }
  return `${c.name} (arg ${c.arg}): ${c.meaning}`;
}

function errnoLabel(n: number): string {
  return n === 38 ? "ENOSYS" : n === 1 ? "EPERM" : `errno ${n}`;
}

/** The seccomp policy context the audit describes for `opts` (pid: this process's). */
export function auditPolicyContext(opts: AuditOptions): PolicyContext {
  return {
    client: opts.client,
    accepts: !opts.client,
    metrics: Boolean(opts.metricsPath),
    ioUring: opts.ioUring ?? "auto",
    pid: Deno.pid,
    logOnly: opts.seccomp === "log",
  };
}

function seccompAudit(opts: AuditOptions): SeccompAudit {
  const policy = seccompPolicy(auditPolicyContext(opts));
  return {
    mode: opts.seccomp ?? "on",
    install: "once set-up is over, after the user switch and Landlock: one classic BPF " +
      "program on every thread at once (SECCOMP_FILTER_FLAG_TSYNC); threads created later " +
      "inherit it; each thread's /proc status is checked (Seccomp: 2)",
    otherwise: opts.seccomp === "log"
      ? "allowed and logged by the kernel (--seccomp log)"
      : "fails with EPERM (SECCOMP_RET_ERRNO): the runtime copes with a failed call; " +
        "killing the process would end every guest's network for a gap in the list",
    wrongArch: "the process is killed (SECCOMP_RET_KILL_PROCESS): i386 int 0x80 calls and " +
      "x32 numbers, which nothing in vionet or Deno makes",
    allowed: policy.entries.map((e) => ({
      name: e.name,
      nr: e.nr,
      rule: ruleText(e.rule),
      why: e.why,
    })),
    notablyDenied: Object.entries(NOTABLY_DENIED).map(([name, d]) => ({ name, ...d })),
  };
}

function landlockAudit(opts: AuditOptions): LandlockAudit {
  const socketDir = opts.listenFd === null && !opts.client && opts.socketPath !== null
    ? opts.socketPath.slice(0, Math.max(1, opts.socketPath.lastIndexOf("/")))
    : null;
  const metricsDir = opts.metricsPath
    ? opts.metricsPath.slice(0, Math.max(1, opts.metricsPath.lastIndexOf("/")))
    : null;
  const plan = planLandlock(
    landlockRules({ root: MODULE_ROOT, socketDir, metricsDir }),
    landlockSupport(),
  );
  return {
    abi: plan.abi,
    handledFs: plan.handledFs,
    handledNet: plan.handledNet,
    scoped: plan.scoped,
    rules: plan.rules.map((r) => ({ path: r.path, access: [...r.access], why: r.why })),
    notes: plan.notes,
  };
}

function userAudit(opts: AuditOptions, observe: boolean): UserAudit {
  const audit: UserAudit = {
    option: opts.user ?? null,
    defaults: [...DEFAULT_USERS],
    switch: [
      "once the tap and the socket exist, in every thread (the drop's signal handler): " +
      "setgroups(0), setresgid(gid, gid, gid), setresuid(uid, uid, uid)",
      "threads created later inherit the ids; each thread's Uid:, Gid: and Groups: are checked",
      "a user whose uid is 0 (--user root) keeps uid 0, said loudly in the log",
    ],
  };
  if (observe) {
    const now = currentCapabilities();
    audit.now = { uids: now.uids, gids: now.gids, groups: now.groups };
  }
  return audit;
}

function capabilities(opts: AuditOptions, observe: boolean): CapabilityAudit {
  const neededForSetup = opts.tapFd === null || opts.mtu != null
    ? [{
      name: "CAP_NET_ADMIN",
      why: opts.tapFd === null
        ? `create tap ${opts.tap} (TUNSETIFF), bring it up (SIOCSIFFLAGS)` +
          `${opts.mtu != null ? ` and set its MTU (SIOCSIFMTU)` : ""}; ` +
          "none at all with --tap-fd and --fd (and no --mtu)"
        : `set the inherited tap's MTU (SIOCSIFMTU, --mtu ${opts.mtu}) when it differs`,
    }]
    : [];
  // The CLI's default is one pair per CPU (so maybe several); with --tap-fd, one per descriptor.
  const queues = opts.queues ?? (opts.tapFd !== null ? 1 : undefined);
  if ((queues === undefined || queues > 1) && opts.steering !== "kernel") {
    neededForSetup.push({
      name: "CAP_BPF",
      why: "load a multi-queue tap's flow-hash steering program (bpf BPF_PROG_LOAD, " +
        "then TUNSETSTEERINGEBPF) where kernel.unprivileged_bpf_disabled is set; without " +
        "it the tap keeps the kernel's automq steering (tap_steering.ts). Not with --queues 1 " +
        "or --steering kernel",
    });
  }
  if (opts.socketGroup != null && opts.listenFd === null && !opts.client) {
    neededForSetup.push({
      name: "CAP_CHOWN",
      why: `give the socket (and a directory vionet creates) group ${opts.socketGroup}`,
    });
  }
  const audit: CapabilityAudit = {
    neededForSetup,
    keptAfterSetup: CAPABILITIES_KEPT_AFTER_SETUP.map((c) => ({ name: c.name, why: c.why })),
    notKept: Object.entries(CAPABILITIES_NOT_NEEDED_AFTER_SETUP).map(([name, why]) => ({
      name,
      why: why!,
    })),
    drop: [
      "once the tap is open and up and the socket exists, before any guest connects",
      "together with the user switch and the Landlock ruleset, in the same handler",
      "in every thread: signalled one by one, then each /proc/self/task/<tid>/status checked",
      "PR_SET_NO_NEW_PRIVS: execve can grant nothing",
      "ambient and inheritable sets cleared; effective and permitted cut to the kept set",
      "bounding set cut to the kept set (when CAP_SETPCAP is held at the drop)",
    ],
  };
  if (observe) audit.now = currentCapabilities();
  return audit;
}

/**
 * The audit for a daemon started with `opts`.
 * `observe: true` adds the main thread's capabilities as they are now.
 */
export function buildAudit(opts: AuditOptions, options: { observe?: boolean } = {}): Audit {
  const flags = startTaskFlags();
  const main = permissionsFromFlags(flags);
  const parts: PartAudit[] = [{
    name: "parent",
    kind: "main thread",
    count: "1",
    module: startTaskModule(),
    role: "set-up, vhost-user, guest memory mapping, TUNSCAP; starts the workers",
    source: "deno.json tasks.start",
    permissions: main.permissions,
    flags,
    notes: main.notes,
  }];
  for (const w of AUDITED_WORKERS) {
    parts.push({
      name: w.options.name ?? relative(w.url),
      kind: "worker",
      count: (w.options.name ?? "").startsWith("vionet-io-")
        ? `one per queue pair the VMM uses, and one started ahead per pair while a front-end ` +
          `is connected (it holds nothing until its pair starts); at most --queues pairs, ` +
          `here ${opts.queues ?? 1}`
        : w.options === CAPTURE_WORKER_OPTIONS
        ? "1 with --pcap, else none"
        : `one per queue pair the VMM uses (at most --queues, here ${opts.queues ?? 1})`,
      module: relative(w.url),
      role: w.role,
      source: w.source,
      permissions: permissionsFromWorkerOptions(w.options, main.permissions),
      notes: [],
    });
  }
  return {
    program: "vionet",
    auditVersion: 2,
    parts,
    libraries: libraries(parts),
    ioctls: ioctls(),
    files: files(opts),
    capabilities: capabilities(opts, options.observe ?? false),
    user: userAudit(opts, options.observe ?? false),
    seccomp: seccompAudit(opts),
    landlock: landlockAudit(opts),
  };
}

// ---------------------------------------------------------------------------
// Rendering

function grantText(g: Grant): string {
  return g === true ? "all" : g === false ? "-" : g.join(", ");
}

/** A readable rendering of the audit for a terminal. */
export function formatAudit(audit: Audit): string {
  const lines: string[] = [];
  const section = (title: string) => lines.push("", title, "-".repeat(title.length));
  lines.push("vionet permission audit");
  section("Parts and their Deno permissions");
  for (const part of audit.parts) {
    lines.push(`${part.name} (${part.kind}, ${part.module}; ${part.count})`);
    lines.push(`  ${part.role}`);
    lines.push(`  from: ${part.source}`);
    const granted = PERMISSION_NAMES.filter((n) => part.permissions[n] !== false);
    if (granted.length === 0) lines.push("  permissions: none");
    for (const n of granted) lines.push(`  ${n.padEnd(7)} ${grantText(part.permissions[n])}`);
    if (part.flags) lines.push(`  flags: ${part.flags.join(" ")}`);
    for (const note of part.notes) lines.push(`  note: ${note}`);
  }
  section("Libraries and FFI symbols");
  for (const lib of audit.libraries) {
    lines.push(`${lib.name}, loaded by ${lib.loadedBy.join(", ") || "nobody"}:`);
    for (const s of lib.symbols) {
      const alias = s.symbol === s.key ? "" : ` (as ${s.key})`;
      const nb = s.nonblocking ? " nonblocking" : "";
      lines.push(`  ${s.symbol}(${s.parameters.join(", ")}) -> ${s.result}${alias}${nb}`);
    }
  }
  section("ioctls");
  for (const i of audit.ioctls) {
    lines.push(`  ${i.name.padEnd(16)} ${i.number.padEnd(11)} on ${i.on}: ${i.purpose}`);
  }
  section("Files, sockets and descriptors");
  for (const f of audit.files) {
    lines.push(`  [${f.when}] ${f.what}: ${f.path}`);
    lines.push(`      ${f.access} (${f.source})`);
  }
  section("Linux capabilities");
  const caps = audit.capabilities;
  const list = (title: string, items: { name: string; why: string }[]) => {
    lines.push(`${title}:${items.length === 0 ? " none" : ""}`);
    for (const c of items) lines.push(`  ${c.name}: ${c.why}`);
  };
  list("needed for set-up", caps.neededForSetup);
  list("kept after set-up", caps.keptAfterSetup);
  list("not kept", caps.notKept);
  lines.push("the drop:");
  for (const d of caps.drop) lines.push(`  ${d}`);
  if (caps.now) {
    lines.push("now (main thread):");
    lines.push(`  effective: ${caps.now.effective.join(" ") || "none"}`);
    lines.push(`  permitted: ${caps.now.permitted.join(" ") || "none"}`);
    lines.push(`  bounding:  ${caps.now.bounding.join(" ") || "none"}`);
    lines.push(`  NoNewPrivs: ${caps.now.noNewPrivs ? "1" : "0"}`);
  }
  section("User");
  const user = audit.user;
  lines.push(`--user ${user.option ?? `not given: the first of ${user.defaults.join(", ")}`}`);
  for (const l of user.switch) lines.push(`  ${l}`);
  if (user.now) {
    lines.push(
      `now (main thread): uids ${user.now.uids.join(" ")}, gids ${user.now.gids.join(" ")}`,
    );
  }
  section(`Seccomp allowlist (--seccomp ${audit.seccomp.mode})`);
  lines.push(audit.seccomp.install);
  lines.push(`any other call: ${audit.seccomp.otherwise}`);
  lines.push(`another architecture: ${audit.seccomp.wrongArch}`);
  lines.push(`${audit.seccomp.allowed.length} calls:`);
  for (const c of audit.seccomp.allowed) {
    lines.push(`  ${c.name.padEnd(18)} ${String(c.nr).padStart(3)}  ${c.rule}`);
    lines.push(`      ${c.why}`);
  }
  lines.push("not allowed, among others:");
  for (const d of audit.seccomp.notablyDenied) lines.push(`  ${d.name.padEnd(18)} ${d.why}`);
  section(`Landlock (ABI ${audit.landlock.abi} on this kernel)`);
  for (const n of audit.landlock.notes) lines.push(`note: ${n}`);
  lines.push(`handled, so denied unless a rule grants it: ${audit.landlock.handledFs.join(" ")}`);
  lines.push(`TCP, granted by no rule: ${audit.landlock.handledNet.join(" ") || "not handled"}`);
  lines.push(`scoped to the daemon: ${audit.landlock.scoped.join(" ") || "nothing"}`);
  for (const r of audit.landlock.rules) {
    lines.push(`  ${r.path}: ${r.access.join(" ")}`);
    lines.push(`      ${r.why}`);
  }
  return lines.join("\n").trimStart();
}
