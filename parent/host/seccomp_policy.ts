/**
 * The one table of system calls the daemon may make once set-up is over,
 * with the argument rule of each that needs one. `seccomp.ts` assembles it
 * into the filter every thread runs; the permission audit prints it; the
 * tests check both against what the kernel does.
 *
 * How the list was found: `strace -f -c` attached to the daemon once it had
 * set up, through the whole end-to-end suite (a real guest: link, ping,
 * transfers both ways with offloads on and off, iperf3, driver reloads,
 * QEMU killed mid-transfer, reconnects, three boots in a row, SIGUSR2,
 * SIGTERM), then the same calls traced with their arguments for the rules
 * (`VIONET_TEST_STRACE`, `scripts/syscalls.ts`). Calls seen only in Deno's
 * background update check (a DNS lookup and an HTTPS fetch: `socket`
 * AF_INET, `setsockopt`, `sendto` to port 53) and in its on-disk caches
 * (`pwrite64`, `rename`) are gone because the start task turns both off;
 * they are not allowed. A few calls the runtime makes only on paths the
 * suite cannot provoke are allowed on purpose and say so (`exit`,
 * `clock_gettime` when the vDSO cannot serve it).
 *
 * What a call outside the list gets: **EPERM** (SECCOMP_RET_ERRNO), not
 * death (SECCOMP_RET_KILL_PROCESS, which passt uses). passt is C that its
 * authors fully control; vionet runs on a runtime (V8, tokio, Deno) that may
 * make a new call in a rare path or a new release, and killing the process
 * there would take every guest's network down for what is a bug in the
 * list, not an attack. A failed call is what the runtime already handles
 * (an unreadable cache, an unavailable feature) and the daemon keeps
 * serving; an attacker gains nothing from EPERM that KILL would have
 * stopped, since either way the call does not run. Two things do kill:
 * a system call made with another architecture's numbers (i386 `int 0x80`)
 * and an x32 number, which no code of vionet or Deno ever makes.
 *
 * @module
 */

import { Errno } from "./libc.ts";
import { TAP_IOCTLS } from "./tap.ts";
import { retErrno, SECCOMP_RET_KILL_PROCESS, SECCOMP_RET_LOG } from "./seccomp.ts";

/** A check on one argument: its low 32 bits must be one of `oneOf`. */
export interface OneOfCheck {
  arg: number;
  /** The argument's name in the manual page. */
  name: string;
  oneOf: readonly { value: number; name: string }[];
}

/** A check on one argument: `(low 32 bits & mask) === equals`. */
export interface MaskCheck {
  arg: number;
  name: string;
  mask: number;
  equals: number;
  /** What the check means, for the audit ("no write, create or truncate flag"). */
  meaning: string;
}

export type ArgCheck = OneOfCheck | MaskCheck;

/** What the filter does with a call that matches an entry. */
export type SyscallRule =
  | { action: "allow" }
  /** Allowed only when every check passes; otherwise the default action. */
  | { action: "allow-if"; checks: readonly ArgCheck[] }
  /** Answered with this errno without running (e.g. ENOSYS, so that glibc falls back). */
  | { action: "errno"; errno: number };

/** One system call in the table. */
export interface SyscallEntry {
  name: string;
  /** The x86-64 number (arch/x86/entry/syscalls/syscall_64.tbl). */
  nr: number;
  rule: SyscallRule;
  /** Who needs it, and what for. */
  why: string;
}

/** The whole filter: entries in program order, and the two fallback actions. */
export interface SeccompPolicy {
  entries: readonly SyscallEntry[];
  /** For a call matching no entry: EPERM. */
  defaultAction: number;
  /** For another architecture's call or an x32 number: kill the process. */
  wrongArchAction: number;
}

/** What decides which entries are in: the daemon's options. */
export interface PolicyContext {
  /** `--client`: the daemon connects (and reconnects) to the VMM's socket. */
  client: boolean;
  /** The daemon accepts connections (it listens, or serves an inherited listening socket). */
  accepts: boolean;
  /** `--metrics`: the daemon accepts HTTP clients on its metrics socket. */
  metrics?: boolean;
  /** `--io-uring`: with `off`, no io_uring call is allowed at all. */
  ioUring: "auto" | "off";
  /** The daemon's process id: signals go to its own threads only. */
  pid: number;
  /**
   * `--seccomp log`: a call outside the list runs and the kernel logs it
   * (audit type 1326 in the kernel log): for measuring what a new Deno needs.
   */
  logOnly?: boolean;
}

/** The action for a call outside the list. */
export const DEFAULT_ACTION = retErrno(Errno.EPERM);
/** The action for a call with another architecture's numbering. */
export const WRONG_ARCH_ACTION = SECCOMP_RET_KILL_PROCESS;

// Flags the argument rules name (x86-64 values).
const O_WRONLY = 0o1;
const O_RDWR = 0o2;
const O_CREAT = 0o100;
const O_TRUNC = 0o1000;
const O_APPEND = 0o2000;
const O_TMPFILE_BIT = 0o20000000;
const OPEN_WRITE_FLAGS = O_WRONLY | O_RDWR | O_CREAT | O_TRUNC | O_APPEND | O_TMPFILE_BIT;
const AF_UNIX = 1;
const SOCK_STREAM = 1;
/** socket(2) type: the kind in the low 4 bits, flags (NONBLOCK, CLOEXEC) above. */
const SOCK_TYPE_MASK = 0xf;
const CLONE_VM = 0x100;
const CLONE_FS = 0x200;
const CLONE_FILES = 0x400;
const CLONE_SIGHAND = 0x800;
const CLONE_THREAD = 0x10000;
const CLONE_SYSVSEM = 0x40000;
const CLONE_SETTLS = 0x80000;
const CLONE_PARENT_SETTID = 0x100000;
const CLONE_CHILD_CLEARTID = 0x200000;
const CLONE_CHILD_SETTID = 0x1000000;
/** What glibc's pthread_create passes, less the optional tid/TLS bits: a thread, nothing else. */
const CLONE_A_THREAD = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD |
  CLONE_SYSVSEM;
const CLONE_THREAD_OPTIONS = CLONE_SETTLS | CLONE_PARENT_SETTID | CLONE_CHILD_CLEARTID |
  CLONE_CHILD_SETTID;
const PR_SET_NAME = 15;
const PR_GET_NAME = 16;

const allow = { action: "allow" } as const;

function ioctlRequest(name: keyof typeof TAP_IOCTLS): { value: number; name: string } {
  return { value: Number(TAP_IOCTLS[name].number), name };
}

/**
 * The allowlist for a daemon started with `ctx`, hottest calls first (for
 * kernels without the seccomp action cache; see `seccomp.ts`).
 */
export function seccompPolicy(ctx: PolicyContext): SeccompPolicy {
  const entries: SyscallEntry[] = [
    // The data path: each of these runs per frame or per batch.
    { name: "writev", nr: 20, rule: allow, why: "frames to the tap (writer, poller)" },
    { name: "readv", nr: 19, rule: allow, why: "frames from the tap (poller)" },
    {
      name: "read",
      nr: 0,
      rule: allow,
      why: "eventfds, /proc files, module files; metrics requests",
    },
    { name: "write", nr: 1, rule: allow, why: "call and wake eventfds; the log on stderr" },
    { name: "futex", nr: 202, rule: allow, why: "Atomics.wait, V8 and tokio locks" },
    { name: "epoll_wait", nr: 232, rule: allow, why: "the poller's wait set; tokio's reactor" },
    ...(ctx.ioUring === "off" ? [] : [
      {
        name: "io_uring_enter",
        nr: 426,
        rule: allow,
        why: "batches of tap writes and nowait reads on the rings made during set-up " +
          "(--io-uring auto)",
      },
    ]),
    {
      name: "poll",
      nr: 7,
      rule: allow,
      why: "the accept loop's and the vhost-user socket's waits; the metrics server's",
    },
    // Memory: V8's heap and JIT, malloc, guest memory, retired ranges.
    { name: "mmap", nr: 9, rule: allow, why: "guest memory, io_uring rings, V8 and malloc" },
    { name: "munmap", nr: 11, rule: allow, why: "guest memory given back; V8 and malloc" },
    {
      name: "mprotect",
      nr: 10,
      rule: allow,
      why: "V8 switches its JIT pages between writable and executable",
    },
    { name: "madvise", nr: 28, rule: allow, why: "V8 and malloc give pages back" },
    { name: "mremap", nr: 25, rule: allow, why: "malloc grows large blocks" },
    { name: "brk", nr: 12, rule: allow, why: "malloc's main heap (glibc)" },
    // Descriptors.
    { name: "close", nr: 3, rule: allow, why: "every descriptor the daemon is done with" },
    {
      name: "openat",
      nr: 257,
      rule: {
        action: "allow-if",
        checks: [{
          arg: 2,
          name: "flags",
          mask: OPEN_WRITE_FLAGS,
          equals: 0,
          meaning: "read-only: no O_WRONLY, O_RDWR, O_CREAT, O_TRUNC, O_APPEND, O_TMPFILE",
        }],
      },
      why: "module files of a new worker, /proc/self/task, /proc/net/dev for the metrics " +
        "(Landlock says which paths)",
    },
    { name: "fcntl", nr: 72, rule: allow, why: "O_NONBLOCK on the tap and eventfds; CLOEXEC" },
    {
      name: "newfstatat",
      nr: 262,
      rule: allow,
      why: "fstat and lstat (glibc): memory regions' sizes, the socket's inode at exit",
    },
    { name: "statx", nr: 332, rule: allow, why: "Deno checks module files before loading them" },
    { name: "lseek", nr: 8, rule: allow, why: "Deno reads module files" },
    { name: "getdents64", nr: 217, rule: allow, why: "listing /proc/self/task" },
    { name: "readlink", nr: 89, rule: allow, why: "/proc/self/fd/N: is a descriptor an eventfd" },
    { name: "eventfd2", nr: 290, rule: allow, why: "the poller's wake eventfd, per queue start" },
    { name: "epoll_create1", nr: 291, rule: allow, why: "the poller's wait set, per queue start" },
    { name: "epoll_ctl", nr: 233, rule: allow, why: "the poller's wait set; tokio's reactor" },
    {
      name: "ioctl",
      nr: 16,
      rule: {
        action: "allow-if",
        checks: [{
          arg: 1,
          name: "request",
          oneOf: [
            ioctlRequest("TUNSETOFFLOAD"),
            ioctlRequest("TUNSETQUEUE"),
            ioctlRequest("SIOCGIFINDEX"),
            ioctlRequest("SIOCGIFMTU"),
          ],
        }],
      },
      why: "TUNSCAP on the tap; a queue pair's tap queue attached or detached as the driver " +
        "enables or disables the pair (TUNSETQUEUE, on a descriptor the tap already has); " +
        "the tap's MTU by name (Tap.mtu()). No other request: " +
        "in particular no TUNSETIFF, SIOCSIF*, and no terminal ioctls",
    },
    // vhost-user.
    { name: "recvmsg", nr: 47, rule: allow, why: "vhost-user messages with SCM_RIGHTS" },
    { name: "sendmsg", nr: 46, rule: allow, why: "vhost-user replies; metrics responses" },
    ...(ctx.accepts || ctx.metrics
      ? [{
        name: "accept4",
        nr: 288,
        rule: allow,
        why: [
          ...(ctx.accepts ? ["the next VMM on the listening socket"] : []),
          ...(ctx.metrics ? ["HTTP clients on the metrics socket (--metrics)"] : []),
        ].join("; "),
      }]
      : []),
    {
      name: "socket",
      nr: 41,
      rule: {
        action: "allow-if",
        checks: [
          { arg: 0, name: "domain", oneOf: [{ value: AF_UNIX, name: "AF_UNIX" }] },
          {
            arg: 1,
            name: "type",
            mask: SOCK_TYPE_MASK,
            equals: SOCK_STREAM,
            meaning: "SOCK_STREAM (flags aside)",
          },
        ],
      },
      why: "Tap.mtu()'s ioctl socket" + (ctx.client ? "; --client's reconnects" : ""),
    },
    ...(ctx.client
      ? [{
        name: "connect",
        nr: 42,
        rule: allow,
        why: "--client: reconnect to the VMM's unix socket (socket() allows AF_UNIX only)",
      }]
      : []),
    {
      name: "socketpair",
      nr: 53,
      rule: {
        action: "allow-if",
        checks: [{ arg: 0, name: "domain", oneOf: [{ value: AF_UNIX, name: "AF_UNIX" }] }],
      },
      why: "tokio makes its signal driver's wake-up pair when the first signal listener is " +
        "registered, which can come after set-up (measured once in four daemons)",
    },
    {
      name: "sendto",
      nr: 44,
      rule: allow,
      why: "tokio's signal handler wakes its driver through a unix socket pair " +
        "(SIGINT, SIGTERM, SIGUSR2)",
    },
    { name: "recvfrom", nr: 45, rule: allow, why: "tokio's signal driver reads that wake-up" },
    {
      name: "unlink",
      nr: 87,
      rule: allow,
      why: "removing the daemon's own sockets at exit",
    },
    ...(ctx.ioUring === "off" ? [] : [
      {
        name: "io_uring_register",
        nr: 427,
        rule: allow,
        why: "the tap as the registered file of the rings made during set-up, each of which " +
          "the kernel restricts to registering and unregistering files (--io-uring auto)",
      },
    ]),
    // Threads: a new worker (device restart, I/O workers per queue start) and
    // tokio's blocking pool create threads; nothing may create a process.
    {
      name: "clone3",
      nr: 435,
      rule: { action: "errno", errno: Errno.ENOSYS },
      why: "its flags are in memory the filter cannot read: ENOSYS makes glibc fall back " +
        "to clone, whose flags it can",
    },
    {
      name: "clone",
      nr: 56,
      rule: {
        action: "allow-if",
        checks: [{
          arg: 0,
          name: "flags",
          mask: ~CLONE_THREAD_OPTIONS,
          equals: CLONE_A_THREAD,
          meaning: "a thread of this process (CLONE_VM|FS|FILES|SIGHAND|THREAD|SYSVSEM, " +
            "TLS and tid bits aside): no new process, no namespace",
        }],
      },
      why: "pthread_create: Deno workers, tokio and V8 threads",
    },
    { name: "set_robust_list", nr: 273, rule: allow, why: "every new thread (glibc)" },
    { name: "rseq", nr: 334, rule: allow, why: "every new thread (glibc)" },
    { name: "sigaltstack", nr: 131, rule: allow, why: "every new Rust thread's overflow stack" },
    {
      name: "prctl",
      nr: 157,
      rule: {
        action: "allow-if",
        checks: [{
          arg: 0,
          name: "option",
          oneOf: [{ value: PR_SET_NAME, name: "PR_SET_NAME" }, {
            value: PR_GET_NAME,
            name: "PR_GET_NAME",
          }],
        }],
      },
      why: "naming a new thread (worker-N); nothing else: no PR_SET_DUMPABLE, no PR_SET_SECCOMP",
    },
    { name: "sched_getaffinity", nr: 204, rule: allow, why: "Deno sizes a new worker's runtime" },
    { name: "sched_getparam", nr: 143, rule: allow, why: "pthread_create (inherited attributes)" },
    {
      name: "sched_getscheduler",
      nr: 145,
      rule: allow,
      why: "pthread_create (inherited attributes)",
    },
    { name: "sched_yield", nr: 24, rule: allow, why: "V8 and tokio spin locks" },
    { name: "sysinfo", nr: 99, rule: allow, why: "V8 sizes a new worker's heap" },
    { name: "getrandom", nr: 318, rule: allow, why: "V8 and Deno random numbers" },
    { name: "exit", nr: 60, rule: allow, why: "a thread ends (a worker, a pool thread)" },
    { name: "exit_group", nr: 231, rule: allow, why: "the daemon exits" },
    // Signals, only the daemon's own.
    { name: "rt_sigreturn", nr: 15, rule: allow, why: "return from a signal handler" },
    { name: "rt_sigprocmask", nr: 14, rule: allow, why: "new threads; signal handling" },
    { name: "rt_sigaction", nr: 13, rule: allow, why: "Deno installs signal handlers lazily" },
    { name: "restart_syscall", nr: 219, rule: allow, why: "a call interrupted by a signal" },
    {
      name: "tgkill",
      nr: 234,
      rule: {
        action: "allow-if",
        checks: [{ arg: 0, name: "tgid", oneOf: [{ value: ctx.pid, name: "the daemon" }] }],
      },
      why: "abort() and the runtime signal the daemon's own threads, no other process",
    },
    { name: "getpid", nr: 39, rule: allow, why: "the runtime; signals to itself" },
    { name: "gettid", nr: 186, rule: allow, why: "the runtime names its threads" },
    // Time, normally served by the vDSO without a system call.
    { name: "clock_nanosleep", nr: 230, rule: allow, why: "timers, sleeps" },
    {
      name: "clock_gettime",
      nr: 228,
      rule: allow,
      why: "the vDSO answers it without a system call, except on clock sources it cannot read",
    },
    {
      name: "gettimeofday",
      nr: 96,
      rule: allow,
      why: "the same as clock_gettime, for the same reason",
    },
  ];
  return {
    entries,
    defaultAction: ctx.logOnly ? SECCOMP_RET_LOG : DEFAULT_ACTION,
    wrongArchAction: WRONG_ARCH_ACTION,
  };
}

/**
 * Calls that are not in the list, named because a compromised daemon would
 * want them: the audit prints them, and a test holds the table to it.
 */
export const NOTABLY_DENIED: Readonly<Record<string, { nr: number; why: string }>> = {
  execve: { nr: 59, why: "no program can be run" },
  execveat: { nr: 322, why: "no program can be run" },
  fork: { nr: 57, why: "no process can be created" },
  vfork: { nr: 58, why: "no process can be created" },
  ptrace: { nr: 101, why: "no other process can be read or controlled" },
  process_vm_writev: { nr: 311, why: "no other process's memory" },
  open: { nr: 2, why: "openat only, read-only" },
  pwrite64: { nr: 18, why: "Deno's on-disk caches wrote with it; the start task keeps none" },
  io_uring_setup: {
    nr: 425,
    why: "a ring's operations escape seccomp: the rings are made during set-up, restricted to " +
      "READV and WRITEV, and lent to the workers (ring_pool.ts)",
  },
  openat2: { nr: 437, why: "its flags are in memory the filter cannot read" },
  creat: { nr: 85, why: "no file can be created" },
  rename: { nr: 82, why: "nothing can be renamed" },
  mkdir: { nr: 83, why: "nothing can be created" },
  bind: { nr: 49, why: "no new address to listen on" },
  listen: { nr: 50, why: "no new listening socket" },
  mount: { nr: 165, why: "no mount" },
  umount2: { nr: 166, why: "no mount" },
  unshare: { nr: 272, why: "no new namespace" },
  setns: { nr: 308, why: "no other namespace" },
  bpf: { nr: 321, why: "no BPF program: the tap's steering program is loaded during set-up" },
  perf_event_open: { nr: 298, why: "no perf events" },
  keyctl: { nr: 250, why: "no keyrings" },
  memfd_create: { nr: 319, why: "no new executable memory file" },
  kill: { nr: 62, why: "no signal to another process" },
  setuid: { nr: 105, why: "the ids are final" },
  setresuid: { nr: 117, why: "the ids are final" },
  capset: { nr: 126, why: "the capabilities are final" },
  seccomp: { nr: 317, why: "the filter is final" },
  landlock_restrict_self: { nr: 446, why: "the ruleset is final" },
};
