/**
 * The Landlock ruleset the daemon runs under after set-up: which files it
 * may still read, the one directory it may remove a file from, no TCP at
 * all, and the scopes that keep it from abstract unix sockets and from
 * signalling processes outside its own.
 *
 * ## Theory of operation
 *
 * Landlock (Linux 5.13+) is an unprivileged access-control layer: a process
 * builds a ruleset (`landlock_create_ruleset`), names what it *handles*
 * (every access right the ABI offers: whatever is handled and not granted by
 * a rule is denied), grants rights beneath some paths (`landlock_add_rule`),
 * and restricts itself (`landlock_restrict_self`). Like seccomp and the
 * credentials, the domain is per thread and is copied into every thread the
 * restricted thread creates; unlike seccomp there is no flag that restricts
 * the other threads of the process (ABI 7, this kernel's). So the ruleset is
 * built here on the main thread, and `privileges.ts` makes every thread call
 * `landlock_restrict_self` on it from the same signal handler that drops the
 * capabilities and switches the user. Each thread then has a domain of its
 * own, all enforcing the same rules.
 *
 * Landlock only checks what a path open asks for when the file is opened:
 * descriptors opened during set-up (the tap, the listening socket) keep
 * working, and memfds, eventfds and sockets received later are not paths.
 * It does not cover stat, readlink, or connecting to a *pathname* unix socket
 * (no ABI up to 7 does), which is how `--client` reconnects; the seccomp
 * filter and the unprivileged user bound those.
 *
 * Older kernels: the rights a kernel's ABI lacks are simply not handled, so
 * the ruleset enforces what it can; with no Landlock at all (not built, or
 * not in the `lsm=` list) the daemon says so in one log line and goes on
 * under the user switch and the seccomp filter. `LANDLOCK_SCOPE_SIGNAL` is
 * only used where the kernel has the fix that lets the threads of one
 * process signal each other from different domains (erratum 2 of ABI 6),
 * because the drop itself and Deno's runtime signal their own threads.
 *
 * @module
 */

import * as libc from "./libc.ts";

const SYS_landlock_create_ruleset = 444n;
const SYS_landlock_add_rule = 445n;
const LANDLOCK_CREATE_RULESET_VERSION = 1;
const LANDLOCK_CREATE_RULESET_ERRATA = 2;
const LANDLOCK_RULE_PATH_BENEATH = 1;
/** Erratum 2 (ABI 6): threads of one process in different domains may signal each other. */
const ERRATUM_SIGNAL_THREADS = 1 << 1;

/** A filesystem access right: its bit and the ABI that introduced it. */
interface Right {
  bit: bigint;
  abi: number;
  /** Whether the right applies to a file (a rule on a file may hold only these). */
  file: boolean;
}

/** include/uapi/linux/landlock.h: `LANDLOCK_ACCESS_FS_*`. */
export const FS_RIGHTS = {
  EXECUTE: { bit: 1n << 0n, abi: 1, file: true },
  WRITE_FILE: { bit: 1n << 1n, abi: 1, file: true },
  READ_FILE: { bit: 1n << 2n, abi: 1, file: true },
  READ_DIR: { bit: 1n << 3n, abi: 1, file: false },
  REMOVE_DIR: { bit: 1n << 4n, abi: 1, file: false },
  REMOVE_FILE: { bit: 1n << 5n, abi: 1, file: false },
  MAKE_CHAR: { bit: 1n << 6n, abi: 1, file: false },
  MAKE_DIR: { bit: 1n << 7n, abi: 1, file: false },
  MAKE_REG: { bit: 1n << 8n, abi: 1, file: false },
  MAKE_SOCK: { bit: 1n << 9n, abi: 1, file: false },
  MAKE_FIFO: { bit: 1n << 10n, abi: 1, file: false },
  MAKE_BLOCK: { bit: 1n << 11n, abi: 1, file: false },
  MAKE_SYM: { bit: 1n << 12n, abi: 1, file: false },
  REFER: { bit: 1n << 13n, abi: 2, file: false },
  TRUNCATE: { bit: 1n << 14n, abi: 3, file: true },
  IOCTL_DEV: { bit: 1n << 15n, abi: 5, file: true },
} as const satisfies Record<string, Right>;

/** A filesystem right's name. */
export type FsRight = keyof typeof FS_RIGHTS;

/** `LANDLOCK_ACCESS_NET_*` (ABI 4): no rule grants either, so no TCP bind or connect at all. */
export const NET_RIGHTS = {
  BIND_TCP: { bit: 1n << 0n, abi: 4 },
  CONNECT_TCP: { bit: 1n << 1n, abi: 4 },
} as const;

/** `LANDLOCK_SCOPE_*` (ABI 6): IPC that may not leave the daemon's own domain. */
export const SCOPES = {
  ABSTRACT_UNIX_SOCKET: { bit: 1n << 0n, abi: 6 },
  SIGNAL: { bit: 1n << 1n, abi: 6 },
} as const;

/** One rule of the ruleset: rights beneath a path (or on a file). */
export interface LandlockRule {
  path: string;
  access: readonly FsRight[];
  why: string;
}

/** Where the daemon's rules point: its own code, and the socket it created. */
export interface LandlockContext {
  /** The repository root: the modules a new worker loads. */
  root: string;
  /** The directory of the socket the daemon created and removes at exit, or null. */
  socketDir: string | null;
  /** The directory of the `--metrics` socket, which it removes at exit too; or null. */
  metricsDir?: string | null;
}

/**
 * The one table of what the daemon may still touch by path after set-up.
 * Everything else Landlock handles is denied: writing, creating, removing,
 * renaming, linking, truncating, executing, device ioctls, TCP. Measured
 * with `strace` on the end-to-end suite (see `scripts/syscalls.ts`).
 */
export function landlockRules(ctx: LandlockContext): LandlockRule[] {
  const rules: LandlockRule[] = [
    {
      path: ctx.root,
      access: ["READ_FILE", "READ_DIR"],
      why: "load the modules of the workers started after set-up: a new device worker after " +
        "a disconnect or a device that died, the I/O workers at each queue start",
    },
    {
      path: "/proc",
      access: ["READ_FILE", "READ_DIR"],
      why: "the daemon's threads (/proc/self/task/*/status, comm: the drop's check, the " +
        "worker census); Deno reads /proc/self/{cgroup,mountinfo,maps} and /proc/meminfo " +
        "when it starts a worker; the tap's counters in /proc/net/dev (--metrics). Only " +
        "what the daemon's user may read anyway",
    },
    {
      path: "/dev/urandom",
      access: ["READ_FILE"],
      why: "V8 seeds each new worker's random number generator from it",
    },
    {
      path: "/sys/devices/system/cpu/online",
      access: ["READ_FILE"],
      why: "the number of CPUs, read by glibc's sysconf(_SC_NPROCESSORS_ONLN) when a worker starts",
    },
  ];
  if (ctx.socketDir !== null) {
    rules.push({
      path: ctx.socketDir,
      access: ["REMOVE_FILE"],
      why: "remove the daemon's own vhost-user socket at exit",
    });
  }
  const metricsDir = ctx.metricsDir ?? null;
  if (metricsDir !== null && metricsDir !== ctx.socketDir) {
    rules.push({
      path: metricsDir,
      access: ["REMOVE_FILE"],
      why: "remove the daemon's own metrics socket (--metrics) at exit",
    });
  }
  return rules;
}

/** What this kernel offers. */
export interface LandlockSupport {
  /** 0: no Landlock (not built, or not enabled at boot). */
  abi: number;
  /** Errata fixed in this kernel (a bitmask; 0 before ABI 6 kernels report them). */
  errata: number;
  /** Why there is none, when abi is 0. */
  missing?: string;
}

/** Asks the kernel which Landlock ABI it implements. */
export function landlockSupport(): LandlockSupport {
  const abi = Number(
    libc.sys.landlock_create_ruleset(
      SYS_landlock_create_ruleset,
      null,
      0n,
      LANDLOCK_CREATE_RULESET_VERSION,
    ),
  );
  if (abi < 0) {
    const e = libc.errno();
    return {
      abi: 0,
      errata: 0,
      missing: e === libc.Errno.EOPNOTSUPP
        ? "Landlock is built but not enabled (add landlock to the kernel's lsm= list)"
        : e === libc.Errno.ENOSYS
        ? "this kernel has no Landlock"
        : `landlock_create_ruleset: ${libc.errnoName(e)}`,
    };
  }
  const errata = Number(
    libc.sys.landlock_create_ruleset(
      SYS_landlock_create_ruleset,
      null,
      0n,
      LANDLOCK_CREATE_RULESET_ERRATA,
    ),
  );
  return { abi, errata: errata < 0 ? 0 : errata };
}

/** The ruleset as it will be (or was) created on a kernel. */
export interface LandlockPlan {
  abi: number;
  errata: number;
  /** Filesystem rights handled (denied unless a rule grants them). */
  handledFs: FsRight[];
  /** TCP rights handled (granted by no rule). */
  handledNet: (keyof typeof NET_RIGHTS)[];
  /** IPC scopes. */
  scoped: (keyof typeof SCOPES)[];
  rules: LandlockRule[];
  /** What this kernel lacks, one line each (empty on a kernel with everything). */
  notes: string[];
}

/** The newest ABI whose rights this file knows; newer kernels get these. */
export const LANDLOCK_ABI_KNOWN = 7;

/** Builds the plan for `rules` on a kernel of `support`. */
export function planLandlock(rules: LandlockRule[], support: LandlockSupport): LandlockPlan {
  const abi = support.abi;
  const handledFs = (Object.keys(FS_RIGHTS) as FsRight[]).filter((r) => FS_RIGHTS[r].abi <= abi);
  const handledNet = (Object.keys(NET_RIGHTS) as (keyof typeof NET_RIGHTS)[])
    .filter((r) => NET_RIGHTS[r].abi <= abi);
  const scoped = (Object.keys(SCOPES) as (keyof typeof SCOPES)[])
    .filter((s) => SCOPES[s].abi <= abi)
    .filter((s) => s !== "SIGNAL" || (support.errata & ERRATUM_SIGNAL_THREADS) !== 0);
  const notes: string[] = [];
  if (abi === 0) notes.push(support.missing ?? "no Landlock");
  else {
    if (abi < 3) notes.push(`ABI ${abi}: truncating files is not handled`);
    if (abi < 4) notes.push(`ABI ${abi}: TCP bind and connect are not handled`);
    if (abi < 5) notes.push(`ABI ${abi}: device ioctls are not handled`);
    if (abi < 6) notes.push(`ABI ${abi}: abstract unix sockets and signals are not scoped`);
    else if (!scoped.includes("SIGNAL")) {
      notes.push(`ABI ${abi} without erratum 2: signals are not scoped`);
    }
  }
  return { abi, errata: support.errata, handledFs, handledNet, scoped, rules, notes };
}

function mask<K extends string>(names: readonly K[], table: Record<K, { bit: bigint }>): bigint {
  return names.reduce((m, n) => m | table[n].bit, 0n);
}

/** A rule that could not be added (its path is missing): logged, not fatal. */
export interface SkippedRule {
  rule: LandlockRule;
  reason: string;
}

/**
 * Creates the ruleset of `plan` and adds its rules; returns its descriptor
 * (close it once every thread is restricted) and the rules whose path does
 * not exist here. Call only when `plan.abi > 0`.
 * @throws {libc.SyscallError} when the kernel refuses the ruleset or a rule.
 */
export function createRuleset(plan: LandlockPlan): { fd: number; skipped: SkippedRule[] } {
  const handledFs = mask(plan.handledFs, FS_RIGHTS);
  // struct landlock_ruleset_attr: u64 handled_access_fs, u64 handled_access_net (ABI 4),
  // u64 scoped (ABI 6); the size given says which fields this kernel reads.
  const attr = new BigUint64Array([
    handledFs,
    mask(plan.handledNet, NET_RIGHTS),
    mask(plan.scoped, SCOPES),
  ]);
  const size = plan.abi >= 6 ? 24 : plan.abi >= 4 ? 16 : 8;
  const fd = libc.checkSize(
    libc.sys.landlock_create_ruleset(
      SYS_landlock_create_ruleset,
      new Uint8Array(attr.buffer),
      BigInt(size),
      0,
    ),
    "landlock_create_ruleset",
  );
  const skipped: SkippedRule[] = [];
  try {
    for (const rule of plan.rules) {
      let target: number;
      try {
        target = libc.open(rule.path, libc.O_PATH | libc.O_CLOEXEC);
      } catch (e) {
        skipped.push({ rule, reason: (e as Error).message });
        continue;
      }
      try {
        const isDir = (libc.fstat(target).mode & libc.S_IFMT) === S_IFDIR;
        // A rule on a file may hold only the rights that apply to files.
        const access = rule.access.filter((r) => isDir || FS_RIGHTS[r].file);
        // struct landlock_path_beneath_attr (packed): u64 allowed_access, s32 parent_fd.
        const attrBytes = new Uint8Array(12);
        const v = new DataView(attrBytes.buffer);
        v.setBigUint64(0, mask(access, FS_RIGHTS) & handledFs, true);
        v.setInt32(8, target, true);
        libc.checkSize(
          libc.sys.landlock_add_rule(
            SYS_landlock_add_rule,
            fd,
            LANDLOCK_RULE_PATH_BENEATH,
            attrBytes,
            0,
          ),
          "landlock_add_rule",
          rule.path,
        );
      } finally {
        libc.close(target);
      }
    }
  } catch (e) {
    libc.closeQuietly(fd);
    throw e;
  }
  return { fd, skipped };
}

const S_IFDIR = 0o040000;
