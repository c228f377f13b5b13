/**
 * The seccomp filter: classic BPF assembled here from the one table in
 * `seccomp_policy.ts`, installed on every thread of the process at once.
 *
 * ## Theory of operation
 *
 * A seccomp filter is per thread, like credentials, but unlike them it can be
 * put on every thread of the process in one system call:
 * `seccomp(SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, prog)` attaches
 * the filter to the caller and synchronises all its other threads to it,
 * atomically under the process's signal lock, the same lock `clone` takes to
 * copy the filter into a new thread. So no thread escapes: one that exists is
 * synchronised, one created later is created by a filtered thread and
 * inherits the filter (filters are inherited across clone and kept across
 * execve). TSYNC fails, naming a thread, only if some thread already has a
 * filter that is not an ancestor of the caller's: vionet installs none
 * before this one, and {@link installSeccomp} fails loudly if that happens.
 * The result is read back from `/proc/self/task/<tid>/status` (`Seccomp: 2`,
 * `Seccomp_filters: 1`) for every thread.
 *
 * The program checks, in this order: the architecture is x86-64 (an i386
 * `int 0x80` call from a 64-bit process would otherwise be read with the
 * wrong numbers), the number is not an x32 one (bit 30), then compares the
 * number with each table entry in turn. An entry either allows the call,
 * allows it only when every argument check passes, or answers with a fixed
 * errno (ENOSYS, so that glibc falls back to a call the filter can inspect).
 * A call matching no entry gets the table's default action.
 *
 * Argument checks read the low 32 bits of an argument: every argument
 * checked is an `int` or `unsigned int` in the kernel (ioctl's request,
 * socket's domain and type, open flags, clone's flags are cut to 32 bits by
 * the kernel too), so the high half is ignored by the kernel as by the filter.
 *
 * Speed: since Linux 5.11 the kernel runs the filter once per system call
 * number in advance, and a number whose answer depends on neither arguments
 * nor instruction pointer is allowed from a bitmap without running BPF
 * again. Every call on the data path (writev, readv, io_uring_enter,
 * epoll_wait, futex, read, write) is such a call; they also come first, for
 * older kernels.
 *
 * @module
 */

import * as libc from "./libc.ts";
import { listThreadIds, readProc } from "./proc_self.ts";
import type { SeccompPolicy, SyscallEntry } from "./seccomp_policy.ts";

// linux/filter.h, linux/bpf_common.h: classic BPF opcodes.
const BPF_LD = 0x00;
const BPF_ALU = 0x04;
const BPF_JMP = 0x05;
const BPF_RET = 0x06;
const BPF_W = 0x00;
const BPF_ABS = 0x20;
const BPF_AND = 0x50;
const BPF_JEQ = 0x10;
const BPF_JGE = 0x30;
const BPF_K = 0x00;

// linux/seccomp.h
/** Kill the whole process (every thread), as if by an uncatchable SIGSYS. */
export const SECCOMP_RET_KILL_PROCESS = 0x8000_0000;
/** Fail the call with errno `ret & 0xffff`. */
export const SECCOMP_RET_ERRNO = 0x0005_0000;
/** Run the call. */
export const SECCOMP_RET_ALLOW = 0x7fff_0000;
/** Run the call and log it (measuring only). */
export const SECCOMP_RET_LOG = 0x7ffc_0000;
const SECCOMP_SET_MODE_FILTER = 1;
const SECCOMP_FILTER_FLAG_TSYNC = 1;
const SYS_seccomp = 317n;

/** linux/audit.h: AUDIT_ARCH_X86_64 = EM_X86_64 | __AUDIT_ARCH_64BIT | __AUDIT_ARCH_LE. */
export const AUDIT_ARCH_X86_64 = 0xc000_003e;
/** asm/unistd.h: x32 system calls are the x86-64 numbers with this bit set. */
export const X32_SYSCALL_BIT = 0x4000_0000;

// struct seccomp_data: int nr @0, u32 arch @4, u64 instruction_pointer @8, u64 args[6] @16.
const DATA_NR = 0;
const DATA_ARCH = 4;
const DATA_ARGS = 16;

/** One classic BPF instruction (struct sock_filter). */
export interface BpfInsn {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

/** The assembled program and what it holds. */
export interface SeccompProgram {
  /** The instructions, in order. */
  insns: BpfInsn[];
  /** struct sock_filter[]: 8 bytes each (u16 code, u8 jt, u8 jf, u32 k). */
  bytes: Uint8Array<ArrayBuffer>;
  /** The entries it was built from, in program order. */
  entries: readonly SyscallEntry[];
}

/** The filter could not be built or installed, or a thread does not show it. */
export class SeccompError extends Error {
  override name = "SeccompError";
}

function stmt(code: number, k: number): BpfInsn {
  return { code, jt: 0, jf: 0, k: k >>> 0 };
}

function jump(code: number, k: number, jt: number, jf: number): BpfInsn {
  if (jt > 255 || jf > 255) throw new SeccompError(`BPF jump too long (${jt}/${jf})`);
  return { code, jt, jf, k: k >>> 0 };
}

/** The action word for "fail with `errno`". */
export function retErrno(errno: number): number {
  return (SECCOMP_RET_ERRNO | (errno & 0xffff)) >>> 0;
}

/** The instructions after the number matched `entry` (A holds the number). */
function entryBlock(entry: SyscallEntry, deny: number): BpfInsn[] {
  const rule = entry.rule;
  if (rule.action === "allow") return [stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)];
  if (rule.action === "errno") return [stmt(BPF_RET | BPF_K, retErrno(rule.errno))];
  const out: BpfInsn[] = [];
  for (const check of rule.checks) {
    if (!Number.isInteger(check.arg) || check.arg < 0 || check.arg > 5) {
      throw new SeccompError(`${entry.name}: there is no argument ${check.arg}`);
    }
    // The low 32 bits of the argument (x86-64 is little-endian).
    out.push(stmt(BPF_LD | BPF_W | BPF_ABS, DATA_ARGS + 8 * check.arg));
    if ("oneOf" in check) {
      const n = check.oneOf.length;
      if (n === 0) throw new SeccompError(`${entry.name}: argument ${check.arg} allows nothing`);
      // jeq v_i: to the next check (past the remaining compares and the deny); else on.
      check.oneOf.forEach((v, i) => out.push(jump(BPF_JMP | BPF_JEQ | BPF_K, v.value, n - i, 0)));
    } else {
      out.push(stmt(BPF_ALU | BPF_AND | BPF_K, check.mask));
      out.push(jump(BPF_JMP | BPF_JEQ | BPF_K, check.equals & check.mask, 1, 0));
    }
    out.push(stmt(BPF_RET | BPF_K, deny));
  }
  out.push(stmt(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
  return out;
}

/**
 * Assembles `policy` into a classic BPF program for x86-64.
 * @throws {SeccompError} for an entry listed twice, an argument that does
 *   not exist, or a program longer than the kernel's 4096 instructions.
 */
export function assemble(policy: SeccompPolicy): SeccompProgram {
  const seen = new Map<number, string>();
  for (const e of policy.entries) {
    if (!Number.isInteger(e.nr) || e.nr < 0 || e.nr >= X32_SYSCALL_BIT) {
      throw new SeccompError(`${e.name}: ${e.nr} is not an x86-64 system call number`);
    }
    const twin = seen.get(e.nr);
    if (twin !== undefined) throw new SeccompError(`${e.name} and ${twin} are both ${e.nr}`);
    seen.set(e.nr, e.name);
  }
  const deny = policy.defaultAction >>> 0;
  const wrongArch = policy.wrongArchAction >>> 0;
  const insns: BpfInsn[] = [
    stmt(BPF_LD | BPF_W | BPF_ABS, DATA_ARCH),
    jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
    stmt(BPF_RET | BPF_K, wrongArch),
    stmt(BPF_LD | BPF_W | BPF_ABS, DATA_NR),
    jump(BPF_JMP | BPF_JGE | BPF_K, X32_SYSCALL_BIT, 0, 1),
    stmt(BPF_RET | BPF_K, wrongArch),
  ];
  for (const entry of policy.entries) {
    const block = entryBlock(entry, deny);
    // Argument checks overwrite A: reload the number before each comparison.
    insns.push(stmt(BPF_LD | BPF_W | BPF_ABS, DATA_NR));
    insns.push(jump(BPF_JMP | BPF_JEQ | BPF_K, entry.nr, 0, block.length));
    insns.push(...block);
  }
  insns.push(stmt(BPF_RET | BPF_K, deny));
  if (insns.length > 4096) {
    throw new SeccompError(`the filter has ${insns.length} instructions; the kernel takes 4096`);
  }
  const bytes = new Uint8Array(insns.length * 8);
  const v = new DataView(bytes.buffer);
  insns.forEach((insn, i) => {
    v.setUint16(i * 8, insn.code, true);
    v.setUint8(i * 8 + 2, insn.jt);
    v.setUint8(i * 8 + 3, insn.jf);
    v.setUint32(i * 8 + 4, insn.k, true);
  });
  return { insns, bytes, entries: policy.entries };
}

/** A system call as the filter sees it (struct seccomp_data). */
export interface SeccompData {
  nr: number;
  arch: number;
  /** Up to six arguments; missing ones are 0. Only the low 32 bits are read. */
  args?: readonly (number | bigint)[];
}

/**
 * Runs `program` on `data` the way the kernel would, and returns the action
 * word (for tests, and for the audit's own check of the table).
 */
export function evaluate(program: SeccompProgram, data: SeccompData): number {
  const word = (offset: number): number => {
    if (offset === DATA_NR) return data.nr >>> 0;
    if (offset === DATA_ARCH) return data.arch >>> 0;
    const i = (offset - DATA_ARGS) / 8;
    if (!Number.isInteger(i) || i < 0 || i > 5) throw new SeccompError(`load at ${offset}`);
    return Number(BigInt(data.args?.[i] ?? 0) & 0xffff_ffffn);
  };
  let a = 0;
  for (let pc = 0; pc < program.insns.length;) {
    const { code, jt, jf, k } = program.insns[pc];
    switch (code) {
      case BPF_LD | BPF_W | BPF_ABS:
        a = word(k);
        pc++;
        break;
      case BPF_ALU | BPF_AND | BPF_K:
        a = (a & k) >>> 0;
        pc++;
        break;
      case BPF_JMP | BPF_JEQ | BPF_K:
        pc += 1 + (a === k ? jt : jf);
        break;
      case BPF_JMP | BPF_JGE | BPF_K:
        pc += 1 + (a >= k ? jt : jf);
        break;
      case BPF_RET | BPF_K:
        return k;
      default:
        throw new SeccompError(`opcode 0x${code.toString(16)} at ${pc}`);
    }
  }
  throw new SeccompError("the program fell off its end");
}

/** One thread's seccomp state from /proc. */
export interface ThreadSeccomp {
  tid: number;
  /** `Seccomp:` 0 none, 1 strict, 2 filter. */
  mode: number;
  /** `Seccomp_filters:` how many filters the thread runs. */
  filters: number;
}

/** Every thread's `Seccomp` and `Seccomp_filters` lines. */
export function threadSeccomp(): ThreadSeccomp[] {
  const out: ThreadSeccomp[] = [];
  for (const tid of listThreadIds()) {
    const text = readProc(`/proc/self/task/${tid}/status`);
    if (text === null) continue;
    const field = (key: string) => Number(new RegExp(`^${key}:\\s*(\\d+)`, "m").exec(text)?.[1]);
    out.push({ tid, mode: field("Seccomp"), filters: field("Seccomp_filters") });
  }
  return out;
}

/**
 * Installs `program` on every thread of the process (TSYNC), then checks
 * that every thread shows exactly one filter. Needs no_new_privs on the
 * calling thread (set by the privilege drop) or CAP_SYS_ADMIN.
 * @returns the number of threads checked.
 * @throws {SeccompError} if the kernel refuses, a thread could not be
 *   synchronised, or a thread does not show the filter afterwards.
 */
export function installSeccomp(program: SeccompProgram): number {
  const before = threadSeccomp().find((t) => t.tid === libc.gettid())?.filters ?? 0;
  // struct sock_fprog: u16 len, 6 bytes padding, u64 filter. The program's
  // bytes are copied by the kernel during the call; both buffers live until it returns.
  const fprog = new Uint8Array(16);
  const v = new DataView(fprog.buffer);
  v.setUint16(0, program.insns.length, true);
  v.setBigUint64(8, BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(program.bytes))), true);
  const r = Number(
    libc.sys.seccomp(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, fprog),
  );
  if (r < 0) throw new SeccompError(new libc.SyscallError("seccomp", libc.errno()).message);
  if (r > 0) {
    throw new SeccompError(
      `seccomp: thread ${r} runs a filter of its own; the process's threads are not all filtered`,
    );
  }
  void program.bytes; // keeps the program alive across the call above
  const threads = threadSeccomp();
  // A filter put on the process before vionet started (a container's) stays under ours.
  const bad = threads.filter((t) => t.mode !== 2 || t.filters !== before + 1);
  if (bad.length > 0) {
    throw new SeccompError(
      `after TSYNC, threads ${
        bad.map((t) => `${t.tid} (Seccomp ${t.mode}, ${t.filters} filters)`).join(", ")
      } do not run exactly ${before + 1} filter(s)`,
    );
  }
  return threads.length;
}
