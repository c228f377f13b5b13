/**
 * Giving up Linux privileges after set-up: `PR_SET_NO_NEW_PRIVS`, the ambient
 * set cleared, the bounding set and the effective/permitted/inheritable sets
 * cut down to what must stay ({@link CAPABILITIES_KEPT_AFTER_SETUP}, which is
 * nothing), the Landlock ruleset (`landlock.ts`) applied, and the user and
 * group ids switched to an unprivileged user (`users.ts`) with no
 * supplementary groups, in **every thread of the process**.
 *
 * ## Theory of operation
 *
 * Linux keeps credentials per thread: capset(2), prctl(PR_CAPBSET_DROP),
 * prctl(PR_SET_NO_NEW_PRIVS), landlock_restrict_self(2) and, at the system
 * call level, setresuid(2)/setresgid(2)/setgroups(2) change only the calling
 * thread. A Deno process
 * has threads before the first line of JavaScript runs (measured on Deno
 * 2.9.6: the main thread, two "V8 DefaultWorker" threads and three
 * "tokio-runtime-w" threads, the blocking pool that runs `nonblocking` FFI
 * calls). Dropping on the main thread alone leaves them all privileged, and
 * code holding FFI reaches them trivially: a `nonblocking` call runs its
 * syscall on a pool thread. Threads created later inherit their creator's
 * credentials, so the question is only the threads that exist at the drop.
 *
 * glibc broadcasts set*id(2) to all threads it created (SIGSETXID; Deno's
 * Rust, tokio and V8 threads are all pthreads, measured: every thread shows
 * the new ids) but not capset, prctl or landlock_restrict_self; libpsx does
 * the same for any syscall, but knows only the threads created through its
 * pthread_create wrapper, which Deno's are not. So this module does what
 * libpsx does, by hand, and switches the ids in the same pass, so that one
 * check covers all of it:
 *
 * 1. A 250-byte signal handler, assembled below, makes the calls with raw
 *    `syscall` instructions (async-signal-safe: no libc, no stack, no errno;
 *    every register is restored by rt_sigreturn), in this order: no_new_privs,
 *    ambient set, bounding set (these three are checked in /proc afterwards),
 *    then landlock_restrict_self, setgroups(0), setresgid, setresuid, capset,
 *    stopping at the first that fails. It records the thread, the step it
 *    reached and the errno in a slot, then increments an acknowledgement
 *    counter. Its code lives in a memfd mapped read+exec (never writable and
 *    executable at once), its arguments and slots in a private page.
 * 2. It is installed on a real-time signal nobody else handles, and sent with
 *    tgkill(2) to every thread in `/proc/self/task`, the caller included.
 * 3. The result is not trusted but read back: each thread's
 *    `/proc/self/task/<tid>/status` must show the expected sets and ids.
 *    Landlock leaves no trace in /proc, so the order of the steps carries
 *    it: a thread shows the new ids and the empty sets only if its
 *    landlock_restrict_self succeeded first (or if it was created by a thread
 *    that had done it all, and inherited the lot). Threads that do not show
 *    them (not yet run, or created meanwhile by a thread that had not yet
 *    dropped) are signalled again, until a pass finds every thread dropped
 *    and the thread list unchanged. From then on every new thread is created
 *    by a dropped one and inherits the dropped sets, the ids and the Landlock
 *    domain (they all live in the thread's credentials, which clone copies).
 * 4. The signal is set to SIG_IGN (discarding any duplicate still queued).
 *    The two pages stay mapped for the life of the process: a thread may
 *    still be between its acknowledgement and its `ret`.
 *
 * Why nothing is kept: TUNSETOFFLOAD on the tap descriptor we hold is served
 * by tun.c without a capability check (tested: it succeeds with every set
 * empty, as another user), and so is everything else the daemon does after
 * set-up (read and write the tap, accept on the listening socket, mmap
 * memfds, eventfds, removing its own socket from a directory the daemon
 * user may write, closing the tap it created, which removes it). CAP_NET_ADMIN
 * would only be needed to create or reconfigure interfaces, which is exactly
 * what a compromised parent must not be able to do.
 *
 * @module
 */

import * as libc from "./libc.ts";
import { listThreadIds, readProc, threadName } from "./proc_self.ts";

/** Linux capability names by number (include/uapi/linux/capability.h, up to Linux 6.x). */
export const CAP_NAMES = [
  "CAP_CHOWN",
  "CAP_DAC_OVERRIDE",
  "CAP_DAC_READ_SEARCH",
  "CAP_FOWNER",
  "CAP_FSETID",
  "CAP_KILL",
  "CAP_SETGID",
  "CAP_SETUID",
  "CAP_SETPCAP",
  "CAP_LINUX_IMMUTABLE",
  "CAP_NET_BIND_SERVICE",
  "CAP_NET_BROADCAST",
  "CAP_NET_ADMIN",
  "CAP_NET_RAW",
  "CAP_IPC_LOCK",
  "CAP_IPC_OWNER",
  "CAP_SYS_MODULE",
  "CAP_SYS_RAWIO",
  "CAP_SYS_CHROOT",
  "CAP_SYS_PTRACE",
  "CAP_SYS_PACCT",
  "CAP_SYS_ADMIN",
  "CAP_SYS_BOOT",
  "CAP_SYS_NICE",
  "CAP_SYS_RESOURCE",
  "CAP_SYS_TIME",
  "CAP_SYS_TTY_CONFIG",
  "CAP_MKNOD",
  "CAP_LEASE",
  "CAP_AUDIT_WRITE",
  "CAP_AUDIT_CONTROL",
  "CAP_SETFCAP",
  "CAP_MAC_OVERRIDE",
  "CAP_MAC_ADMIN",
  "CAP_SYSLOG",
  "CAP_WAKE_ALARM",
  "CAP_BLOCK_SUSPEND",
  "CAP_AUDIT_READ",
  "CAP_PERFMON",
  "CAP_BPF",
  "CAP_CHECKPOINT_RESTORE",
] as const;

/** A capability's name; bits newer than {@link CAP_NAMES} read as `CAP_<n>`. */
export type CapName = typeof CAP_NAMES[number] | `CAP_${number}`;

/** A capability the process keeps after set-up, and why it must. */
export interface KeptCapability {
  name: CapName;
  why: string;
}

/**
 * What the process keeps once the tap is open and up and the vhost-user
 * socket exists: nothing. The audit prints this list; the drop uses it.
 */
export const CAPABILITIES_KEPT_AFTER_SETUP: readonly KeptCapability[] = [];

/**
 * Capabilities one might expect the daemon to keep, and why it does not:
 * printed by the audit next to the (empty) kept list.
 */
export const CAPABILITIES_NOT_NEEDED_AFTER_SETUP: Readonly<Partial<Record<CapName, string>>> = {
  CAP_NET_ADMIN: "needed to create the tap (TUNSETIFF) and bring it up (SIOCSIFFLAGS) only; " +
    "TUNSETOFFLOAD (TUNSCAP), TUNSETVNETHDRSZ, reads and writes on the open tap fd " +
    "need no capability (tested after the drop)",
  CAP_DAC_OVERRIDE: "the socket's directory, when vionet creates it, is handed to the " +
    "daemon's user, which can then remove the socket at exit; memfds and eventfds arrive " +
    "as descriptors",
  CAP_BPF: "needed once, to load a multi-queue tap's steering program; the tap holds it " +
    "from then on",
  CAP_SETUID: "needed once, to switch to the unprivileged user during the drop itself",
  CAP_SETPCAP: "needed once, to shrink the bounding set during the drop itself",
};

/** One set of capabilities, and the ids, as read from `/proc/.../status`. */
export interface CapabilityState {
  effective: CapName[];
  permitted: CapName[];
  inheritable: CapName[];
  bounding: CapName[];
  ambient: CapName[];
  /** The `NoNewPrivs` flag: execve(2) can grant no privilege. */
  noNewPrivs: boolean;
  /** `Uid:` real, effective, saved, filesystem. */
  uids: number[];
  /** `Gid:` real, effective, saved, filesystem. */
  gids: number[];
  /** `Groups:` the supplementary groups. */
  groups: number[];
}

/** The state of one thread. */
export interface ThreadCapabilityState extends CapabilityState {
  tid: number;
  /** The thread's name (`comm`), e.g. "tokio-runtime-w" or "vionet-device". */
  name: string;
}

/** The user and group a drop switches every thread to. */
export interface DropUser {
  uid: number;
  gid: number;
}

/** What {@link dropPrivileges} is asked to do besides the capabilities. */
export interface DropOptions {
  /** Give up after this long (default 2000 ms). */
  timeoutMs?: number;
  /** Switch every thread to these ids, with no supplementary groups; absent: keep the ids. */
  user?: DropUser;
  /** A Landlock ruleset descriptor to restrict every thread with (`landlock.ts`); absent: none. */
  landlockFd?: number;
}

/** What {@link dropPrivileges} did. */
export interface DropResult {
  /** Capabilities still effective and permitted in every thread. */
  kept: CapName[];
  /** Capabilities that were permitted before and are gone now. */
  dropped: CapName[];
  /** Whether the bounding set was cut to `kept` (needs CAP_SETPCAP at the time). */
  boundingDropped: boolean;
  /** Threads checked in the final pass. */
  threads: number;
  /** Signal rounds it took. */
  rounds: number;
  /** The ids every thread now has (unchanged when no user was given). */
  uid: number;
  gid: number;
  /** Whether every thread is under the Landlock ruleset. */
  landlocked: boolean;
  /** Threads that ran the handler; the others inherited everything from one that did. */
  signalled: number;
}

/** The drop did not reach every thread. */
export class PrivilegeDropError extends Error {
  override name = "PrivilegeDropError";
}

// ---------------------------------------------------------------------------
// Masks and names

/** The bit of a capability. */
export function capBit(name: CapName): bigint {
  const known = (CAP_NAMES as readonly string[]).indexOf(name);
  const n = known >= 0 ? known : Number(/^CAP_(\d+)$/.exec(name)?.[1] ?? NaN);
  if (!Number.isInteger(n) || n < 0 || n > 63) throw new RangeError(`Unknown capability ${name}`);
  return 1n << BigInt(n);
}

/** The names of the bits set in `mask`, lowest first. */
export function capNames(mask: bigint): CapName[] {
  const out: CapName[] = [];
  for (let n = 0; n < 64; n++) {
    if ((mask >> BigInt(n)) & 1n) out.push(CAP_NAMES[n] ?? `CAP_${n}`);
  }
  return out;
}

function maskOf(names: readonly CapName[]): bigint {
  return names.reduce((m, n) => m | capBit(n), 0n);
}

interface Masks {
  eff: bigint;
  prm: bigint;
  inh: bigint;
  bnd: bigint;
  amb: bigint;
  nnp: boolean;
  uids: number[];
  gids: number[];
  groups: number[];
}

function parseStatus(text: string, path: string): Masks {
  const field = (key: string): string => {
    const m = new RegExp(`^${key}:\\s*(\\S+)`, "m").exec(text);
    if (!m) throw new Error(`${path} has no ${key} line`);
    return m[1];
  };
  const hex = (key: string) => BigInt(`0x${field(key)}`);
  const numbers = (key: string) => {
    const m = new RegExp(`^${key}:([ \\t\\d]*)$`, "m").exec(text);
    if (!m) throw new Error(`${path} has no ${key} line`);
    return m[1].trim() === "" ? [] : m[1].trim().split(/\s+/).map(Number);
  };
  return {
    eff: hex("CapEff"),
    prm: hex("CapPrm"),
    inh: hex("CapInh"),
    bnd: hex("CapBnd"),
    amb: hex("CapAmb"),
    nnp: field("NoNewPrivs") === "1",
    uids: numbers("Uid"),
    gids: numbers("Gid"),
    groups: numbers("Groups"),
  };
}

function toState(m: Masks): CapabilityState {
  return {
    effective: capNames(m.eff),
    permitted: capNames(m.prm),
    inheritable: capNames(m.inh),
    bounding: capNames(m.bnd),
    ambient: capNames(m.amb),
    noNewPrivs: m.nnp,
    uids: m.uids,
    gids: m.gids,
    groups: m.groups,
  };
}

function readMasks(path: string): Masks | null {
  const text = readProc(path);
  return text === null ? null : parseStatus(text, path);
}

/** The main thread's capabilities (`/proc/self/status`). */
export function currentCapabilities(): CapabilityState {
  const m = readMasks("/proc/self/status");
  if (m === null) throw new Error("/proc/self/status is missing (is /proc mounted?)");
  return toState(m);
}

/** Every thread's capabilities, from `/proc/self/task/<tid>/status`. */
export function threadCapabilities(): ThreadCapabilityState[] {
  const out: ThreadCapabilityState[] = [];
  for (const tid of listThreadIds()) {
    const m = readMasks(`/proc/self/task/${tid}/status`);
    const name = threadName(tid);
    if (m === null || name === null) continue; // exited meanwhile
    out.push({ tid, name, ...toState(m) });
  }
  return out;
}

// ---------------------------------------------------------------------------
// The all-thread drop

const SYS_SETGROUPS = 116;
const SYS_SETRESUID = 117;
const SYS_SETRESGID = 119;
const SYS_CAPSET = 126;
const SYS_PRCTL = 157;
const SYS_GETTID = 186;
const SYS_LANDLOCK_RESTRICT_SELF = 446;
const PR_CAP_AMBIENT = 47;
const PR_CAP_AMBIENT_CLEAR_ALL = 4;
/** capability.h: _LINUX_CAPABILITY_VERSION_3 (two 32-bit words per set). */
const LINUX_CAPABILITY_VERSION_3 = 0x20080522;
const SA_RESTART = 0x10000000;
const SIG_IGN = 1n;
/** glibc struct sigaction: handler @0, sa_mask @8 (128 bytes), sa_flags @136, restorer @144. */
const SIGACTION_SIZE = 152;
const MFD_EXEC = 0x10;
const PAGE = 4096;

// The argument page:
//   ack counter @0 (i32, incremented last), bounding-set bits to drop @8 (u64),
//   capset header @16 (version, pid 0 = the calling thread), capset data @24
//   (effective, permitted, inheritable) x 2 words, uid @48, gid @52,
//   flags @56 (FLAG_*), Landlock ruleset fd @60, slot counter @64,
//   slots from @128: 16 bytes each (tid i32, step i32, errno i32, unused).
const ARG_ACK = 0;
const ARG_BOUNDING = 8;
const ARG_HEADER = 16;
const ARG_DATA = 24;
const ARG_UID = 48;
const ARG_GID = 52;
const ARG_FLAGS = 56;
const ARG_LANDLOCK_FD = 60;
const ARG_SLOT_COUNT = 64;
const ARG_SLOTS = 128;
const SLOT_BYTES = 16;
const MAX_SLOTS = (PAGE - ARG_SLOTS) / SLOT_BYTES;
const FLAG_SWITCH_IDS = 1;
const FLAG_LANDLOCK = 2;

/** The steps a thread's handler stops at when a call fails (slot `step`; 0: all done). */
const STEP_NAMES: Record<number, string> = {
  1: "landlock_restrict_self",
  2: "setgroups",
  3: "setresgid",
  4: "setresuid",
  5: "capset",
};

function le32(n: number): number[] {
  return [n & 0xff, (n >>> 8) & 0xff, (n >>> 16) & 0xff, (n >>> 24) & 0xff];
}

function le64(n: bigint): number[] {
  return [...le32(Number(n & 0xffffffffn)), ...le32(Number(n >> 32n))];
}

/** A byte, a label, or a short jump (opcode, rel8) to a label, resolved by {@link link}. */
type Piece = number | { label: string } | { jump: number; to: string };

/** Resolves labels and rel8 jumps into machine code. */
function link(pieces: Piece[]): Uint8Array {
  const at = new Map<string, number>();
  let pc = 0;
  for (const p of pieces) {
    if (typeof p === "number") pc++;
    else if ("label" in p) at.set(p.label, pc);
    else pc += 2;
  }
  const out: number[] = [];
  for (const p of pieces) {
    if (typeof p === "number") out.push(p);
    else if ("jump" in p) {
      const target = at.get(p.to);
      if (target === undefined) throw new Error(`drop handler: no label ${p.to}`);
      const rel = target - (out.length + 2);
      if (rel < -128 || rel > 127) throw new Error(`drop handler: jump to ${p.to} too far`);
      out.push(p.jump, rel & 0xff);
    }
  }
  return new Uint8Array(out);
}

const JNC = 0x73;
const JB = 0x72;
const JZ = 0x74;
const JS = 0x78;
const JAE = 0x73;
const SYSCALL = [0x0f, 0x05];

/** `prctl(option, arg2, 0, 0, 0)` as a raw syscall; arg2 from a register or an immediate. */
function rawPrctl(option: number, arg2: number | "r13"): number[] {
  return [
    0xb8,
    ...le32(SYS_PRCTL), // mov eax, SYS_prctl
    0xbf,
    ...le32(option), // mov edi, option
    ...(arg2 === "r13" ? [0x4c, 0x89, 0xee] : [0xbe, ...le32(arg2)]), // mov rsi, r13 | mov esi, imm
    0x31,
    0xd2, // xor edx, edx
    0x4d,
    0x31,
    0xd2, // xor r10, r10
    0x4d,
    0x31,
    0xc0, // xor r8, r8
    ...SYSCALL,
  ];
}

/** After a call: r14d = step; a negative rax (-errno) ends the handler's calls. */
function failsAs(step: number): Piece[] {
  return [
    0x41,
    0xbe,
    ...le32(step), // mov r14d, step
    0x48,
    0x85,
    0xc0, // test rax, rax
    { jump: JS, to: "record" },
  ];
}

/** `test dword [rbx + ARG_FLAGS], flag` then jz `to`. */
function unlessFlag(flag: number, to: string): Piece[] {
  return [0xf7, 0x43, ARG_FLAGS, ...le32(flag), { jump: JZ, to }];
}

/**
 * The handler `void handler(int sig)`, x86-64. rbx holds the argument page;
 * r12 the bounding bits to drop, r13 the capability number in the loop;
 * r14 the step reached, r15 the failing call's result.
 */
function assembleHandler(args: bigint): Uint8Array {
  const dropOne = rawPrctl(libc.PR_CAPBSET_DROP, "r13");
  const pieces: Piece[] = [
    0x48,
    0xbb,
    ...le64(args), // mov rbx, args
    ...rawPrctl(libc.PR_SET_NO_NEW_PRIVS, 1),
    ...rawPrctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL),
    0x4c,
    0x8b,
    0x63,
    ARG_BOUNDING, // mov r12, [rbx + ARG_BOUNDING]
    0x4d,
    0x31,
    0xed, // xor r13, r13
    { label: "loop" },
    0x4d,
    0x0f,
    0xa3,
    0xec, // bt r12, r13
    { jump: JNC, to: "skip" },
    ...dropOne, // prctl(PR_CAPBSET_DROP, r13)
    { label: "skip" },
    0x49,
    0xff,
    0xc5, // inc r13
    0x49,
    0x83,
    0xfd,
    0x40, // cmp r13, 64
    { jump: JB, to: "loop" },
    // landlock_restrict_self(fd, 0): needs no_new_privs, set above.
    ...unlessFlag(FLAG_LANDLOCK, "ids"),
    0xb8,
    ...le32(SYS_LANDLOCK_RESTRICT_SELF), // mov eax, SYS_landlock_restrict_self
    0x48,
    0x63,
    0x7b,
    ARG_LANDLOCK_FD, // movsxd rdi, dword [rbx + ARG_LANDLOCK_FD]
    0x31,
    0xf6, // xor esi, esi
    ...SYSCALL,
    ...failsAs(1),
    { label: "ids" },
    // setgroups(0, NULL), setresgid(g, g, g), setresuid(u, u, u): while CAP_SETGID/SETUID last.
    ...unlessFlag(FLAG_SWITCH_IDS, "caps"),
    0xb8,
    ...le32(SYS_SETGROUPS), // mov eax, SYS_setgroups
    0x31,
    0xff, // xor edi, edi
    0x31,
    0xf6, // xor esi, esi
    ...SYSCALL,
    ...failsAs(2),
    0xb8,
    ...le32(SYS_SETRESGID), // mov eax, SYS_setresgid
    0x8b,
    0x7b,
    ARG_GID, // mov edi, [rbx + ARG_GID]
    0x89,
    0xfe, // mov esi, edi
    0x89,
    0xfa, // mov edx, edi
    ...SYSCALL,
    ...failsAs(3),
    0xb8,
    ...le32(SYS_SETRESUID), // mov eax, SYS_setresuid
    0x8b,
    0x7b,
    ARG_UID, // mov edi, [rbx + ARG_UID]
    0x89,
    0xfe, // mov esi, edi
    0x89,
    0xfa, // mov edx, edi
    ...SYSCALL,
    ...failsAs(4),
    { label: "caps" },
    0xb8,
    ...le32(SYS_CAPSET), // mov eax, SYS_capset
    0x48,
    0x8d,
    0x7b,
    ARG_HEADER, // lea rdi, [rbx + ARG_HEADER]
    0x48,
    0x8d,
    0x73,
    ARG_DATA, // lea rsi, [rbx + ARG_DATA]
    ...SYSCALL,
    ...failsAs(5),
    0x45,
    0x31,
    0xf6, // xor r14d, r14d: every step done
    { label: "record" },
    0x49,
    0x89,
    0xc7, // mov r15, rax
    0xb9,
    ...le32(1), // mov ecx, 1
    0xf0,
    0x0f,
    0xc1,
    0x4b,
    ARG_SLOT_COUNT, // lock xadd [rbx + ARG_SLOT_COUNT], ecx
    0x81,
    0xf9,
    ...le32(MAX_SLOTS), // cmp ecx, MAX_SLOTS
    { jump: JAE, to: "ack" },
    0xc1,
    0xe1,
    0x04, // shl ecx, 4
    0x48,
    0x8d,
    0x94,
    0x0b,
    ...le32(ARG_SLOTS), // lea rdx, [rbx + rcx + ARG_SLOTS]
    0xb8,
    ...le32(SYS_GETTID), // mov eax, SYS_gettid
    ...SYSCALL,
    0x89,
    0x02, // mov [rdx], eax
    0x44,
    0x89,
    0x72,
    0x04, // mov [rdx + 4], r14d
    0x49,
    0xf7,
    0xdf, // neg r15
    0x44,
    0x89,
    0x7a,
    0x08, // mov [rdx + 8], r15d
    { label: "ack" },
    0xf0,
    0xff,
    0x03, // lock inc dword [rbx + ARG_ACK]
    0xc3, // ret
  ];
  return link(pieces);
}

/** Maps `code` read+exec from a memfd: at no time writable and executable. */
function mapCode(code: Uint8Array): Deno.PointerObject {
  let fd: number;
  try {
    fd = libc.memfdCreate("vionet-capdrop", libc.MFD_CLOEXEC | MFD_EXEC);
  } catch (e) {
    // MFD_EXEC is Linux 6.3+; older kernels refuse the flag and allow exec anyway.
    if (!(e instanceof libc.SyscallError && e.errno === libc.Errno.EINVAL)) throw e;
    fd = libc.memfdCreate("vionet-capdrop", libc.MFD_CLOEXEC);
  }
  try {
    libc.ftruncate(fd, PAGE);
    if (libc.write(fd, code) !== code.length) throw new Error("short write of the drop handler");
    return libc.mmap(PAGE, libc.PROT_READ | PROT_EXEC, libc.MAP_PRIVATE, fd);
  } finally {
    libc.close(fd);
  }
}

const PROT_EXEC = 4;

function sigaction(sig: number, handler: bigint | null): bigint {
  const act = new Uint8Array(SIGACTION_SIZE);
  const old = new Uint8Array(SIGACTION_SIZE);
  if (handler !== null) {
    const v = new DataView(act.buffer);
    v.setBigUint64(0, handler, true);
    act.fill(0xff, 8, 136); // block every signal while the handler runs
    v.setInt32(136, SA_RESTART, true);
  }
  libc.check(libc.sys.sigaction(sig, handler === null ? null : act, old), "sigaction", `${sig}`);
  return new DataView(old.buffer).getBigUint64(0, true);
}

/** The highest real-time signal whose disposition is still SIG_DFL. */
function freeRealtimeSignal(): number {
  // glibc keeps 32 and 33 for itself; SIGRTMIN() is 34 and SIGRTMAX 64.
  for (let sig = 64; sig >= 35; sig--) {
    if (sigaction(sig, null) === 0n) return sig;
  }
  throw new PrivilegeDropError("no free real-time signal to reach every thread with");
}

const NO_FDS = new Uint8Array(8);

/** Sleeps on the calling thread (poll with no descriptors). */
function sleepMs(ms: number): void {
  libc.sys.poll(NO_FDS, 0n, ms);
}

/** What one run of the handler on one thread recorded. */
interface SlotRecord {
  tid: number;
  /** 0: every step done; else the step that failed ({@link STEP_NAMES}). */
  step: number;
  errno: number;
}

function readSlots(args: DataView): SlotRecord[] {
  const n = Math.min(args.getInt32(ARG_SLOT_COUNT, true), MAX_SLOTS);
  const out: SlotRecord[] = [];
  for (let i = 0; i < n; i++) {
    const at = ARG_SLOTS + i * SLOT_BYTES;
    out.push({
      tid: args.getInt32(at, true),
      step: args.getInt32(at + 4, true),
      errno: args.getInt32(at + 8, true),
    });
  }
  return out;
}

/**
 * Gives up every privilege the process does not need any more, in every
 * thread (see the module comment for how): sets NO_NEW_PRIVS, clears the
 * ambient and inheritable sets, cuts the bounding set (when CAP_SETPCAP is
 * held), applies the Landlock ruleset `options.landlockFd` if given,
 * switches to `options.user` (with no supplementary groups) if given, and
 * cuts the effective and permitted sets down to `keep`. Capabilities in
 * `keep` that are not permitted now are not kept. Then checks every thread's
 * `/proc` status and returns only when all of them show exactly that.
 *
 * @throws {PrivilegeDropError} if some thread still shows more after
 *   `timeoutMs` (default 2000), naming the call that failed there: the
 *   process must not go on serving then.
 * @throws {RangeError} when asked to keep capabilities across a user switch
 *   (the kernel clears them at setresuid; nothing needs that today).
 */
export function dropPrivileges(
  keep: readonly CapName[] = CAPABILITIES_KEPT_AFTER_SETUP.map((c) => c.name),
  options: DropOptions = {},
): DropResult {
  const before = readMasks("/proc/thread-self/status")!;
  const keepMask = maskOf(keep) & before.prm;
  const user = options.user;
  if (user !== undefined && keepMask !== 0n) {
    throw new RangeError("keeping capabilities across a switch of user is not supported");
  }
  const lastCap = Number(readProc("/proc/sys/kernel/cap_last_cap")?.trim() ?? "40");
  const allCaps = (1n << BigInt(lastCap + 1)) - 1n;
  const boundingDropped = (before.eff & capBit("CAP_SETPCAP")) !== 0n;
  const boundingDrop = boundingDropped ? allCaps & ~keepMask : 0n;
  const uid = user?.uid ?? before.uids[1];
  const gid = user?.gid ?? before.gids[1];
  const sameIds = (ids: number[], id: number) => ids.length === 4 && ids.every((i) => i === id);
  const done = (m: Masks) =>
    m.eff === keepMask && m.prm === keepMask && m.inh === 0n && m.amb === 0n && m.nnp &&
    (m.bnd & boundingDrop) === 0n &&
    (user === undefined || (sameIds(m.uids, uid) && sameIds(m.gids, gid) && m.groups.length === 0));

  // The handler's argument page (read-write, private) and code page (read-exec).
  const argsPtr = libc.mmap(
    PAGE,
    libc.PROT_READ | libc.PROT_WRITE,
    libc.MAP_PRIVATE | libc.MAP_ANONYMOUS,
    -1,
  );
  const argsBuf = Deno.UnsafePointerView.getArrayBuffer(argsPtr, PAGE);
  const args = new DataView(argsBuf);
  const ack = new Int32Array(argsBuf, ARG_ACK, 1);
  args.setBigUint64(ARG_BOUNDING, boundingDrop, true);
  args.setUint32(ARG_HEADER, LINUX_CAPABILITY_VERSION_3, true);
  args.setInt32(ARG_HEADER + 4, 0, true);
  const lo = Number(keepMask & 0xffffffffn);
  const hi = Number(keepMask >> 32n);
  [lo, lo, 0, hi, hi, 0].forEach((word, i) => args.setUint32(ARG_DATA + 4 * i, word, true));
  args.setUint32(ARG_UID, uid, true);
  args.setUint32(ARG_GID, gid, true);
  const flags = (user !== undefined ? FLAG_SWITCH_IDS : 0) |
    (options.landlockFd !== undefined ? FLAG_LANDLOCK : 0);
  args.setUint32(ARG_FLAGS, flags, true);
  args.setInt32(ARG_LANDLOCK_FD, options.landlockFd ?? -1, true);
  const code = mapCode(assembleHandler(BigInt(Deno.UnsafePointer.value(argsPtr))));

  const sig = freeRealtimeSignal();
  sigaction(sig, BigInt(Deno.UnsafePointer.value(code)));
  const pid = libc.getpid();
  const deadline = Date.now() + (options.timeoutMs ?? 2000);
  let rounds = 0;
  try {
    for (;;) {
      const tids = listThreadIds();
      const behind = tids.filter((tid) => {
        const m = readMasks(`/proc/self/task/${tid}/status`);
        return m !== null && !done(m);
      });
      // Every thread read as dropped and none appeared meanwhile: a thread
      // created from now on is created by a dropped one.
      if (behind.length === 0 && sameThreads(tids, listThreadIds())) {
        const slots = readSlots(args);
        return {
          kept: capNames(keepMask),
          dropped: capNames(before.prm & ~keepMask),
          boundingDropped,
          threads: tids.length,
          rounds,
          uid,
          gid,
          landlocked: options.landlockFd !== undefined,
          signalled: new Set(slots.filter((s) => s.step === 0).map((s) => s.tid)).size,
        };
      }
      if (Date.now() > deadline) {
        const failed = readSlots(args).filter((s) => s.step !== 0 && behind.includes(s.tid))
          .map((s) => `${s.tid}: ${STEP_NAMES[s.step]} failed with ${libc.errnoName(s.errno)}`);
        throw new PrivilegeDropError(
          `threads ${behind.join(", ")} still hold privileges after ${rounds} rounds` +
            (failed.length ? ` (${[...new Set(failed)].join("; ")})` : ""),
        );
      }
      rounds++;
      const target = Atomics.load(ack, 0) + behind.length;
      let sent = 0;
      for (const tid of behind) {
        if (libc.sys.tgkill(pid, tid, sig) === 0) sent++;
        else if (libc.errno() !== libc.Errno.ESRCH) libc.check(-1, "tgkill", `thread ${tid}`);
      }
      const wanted = target - (behind.length - sent);
      while (Atomics.load(ack, 0) < wanted && Date.now() <= deadline) sleepMs(1);
    }
  } finally {
    sigaction(sig, SIG_IGN);
  }
}

function sameThreads(a: number[], b: number[]): boolean {
  const sa = [...a].sort((x, y) => x - y);
  const sb = [...b].sort((x, y) => x - y);
  return sa.length === sb.length && sa.every((v, i) => v === sb[i]);
}
