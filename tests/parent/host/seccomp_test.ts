/**
 * The seccomp allowlist as a program: what the assembled filter answers for
 * each kind of call, run through the same interpreter semantics the kernel
 * uses (`evaluate`), and the table's numbers checked against the kernel's
 * own header. That the kernel runs exactly this program on every thread,
 * and refuses what it should, is `sandbox_test.ts`'s job.
 */
import assert from "node:assert/strict";
import {
  assemble,
  AUDIT_ARCH_X86_64,
  evaluate,
  retErrno,
  SECCOMP_RET_ALLOW,
  SECCOMP_RET_KILL_PROCESS,
  SECCOMP_RET_LOG,
  type SeccompProgram,
  X32_SYSCALL_BIT,
} from "../../../parent/host/seccomp.ts";
import {
  NOTABLY_DENIED,
  type PolicyContext,
  seccompPolicy,
  type SyscallEntry,
} from "../../../parent/host/seccomp_policy.ts";
import { TAP_IOCTLS } from "../../../parent/host/tap.ts";

const PID = 4242;
const SERVER: PolicyContext = { client: false, accepts: true, ioUring: "auto", pid: PID };
const CLIENT: PolicyContext = { client: true, accepts: false, ioUring: "auto", pid: PID };
const NO_URING: PolicyContext = { ...SERVER, ioUring: "off" };

const EPERM = retErrno(1);
const ENOSYS = retErrno(38);

function program(ctx: PolicyContext = SERVER): SeccompProgram {
  return assemble(seccompPolicy(ctx));
}

function nr(name: string, ctx: PolicyContext = SERVER): number {
  const e = seccompPolicy(ctx).entries.find((e: SyscallEntry) => e.name === name);
  return e?.nr ?? NOTABLY_DENIED[name]?.nr ?? (() => {
    throw new Error(`no number for ${name}`);
  })();
}

function run(p: SeccompProgram, name: string, args: (number | bigint)[] = [], ctx = SERVER) {
  return evaluate(p, { nr: nr(name, ctx), arch: AUDIT_ARCH_X86_64, args });
}

// x86-64 values the cases use.
const O_RDONLY = 0, O_WRONLY = 1, O_RDWR = 2, O_CREAT = 0o100, O_TRUNC = 0o1000;
const O_APPEND = 0o2000, O_CLOEXEC = 0o2000000, O_DIRECTORY = 0o200000, O_PATH = 0o10000000;
const O_TMPFILE = 0o20200000;
const AF_UNIX = 1, AF_INET = 2, AF_INET6 = 10, AF_NETLINK = 16, AF_PACKET = 17;
const SOCK_STREAM = 1, SOCK_DGRAM = 2, SOCK_RAW = 3, SOCK_NONBLOCK = 0o4000;
const SOCK_CLOEXEC = 0o2000000;
/** glibc's pthread_create flags (nptl/pthread_create.c). */
const PTHREAD_CLONE = 0x3d0f00;
const SIGCHLD = 17;
const CLONE_VM = 0x100, CLONE_VFORK = 0x4000, CLONE_NEWUSER = 0x10000000, CLONE_NEWNET = 0x40000000;

Deno.test("the filter kills calls of another architecture and x32 numbers, before any entry", () => {
  const p = program();
  const AUDIT_ARCH_I386 = 0x40000003;
  assert.equal(evaluate(p, { nr: 1, arch: AUDIT_ARCH_I386 }), SECCOMP_RET_KILL_PROCESS);
  assert.equal(
    evaluate(p, { nr: X32_SYSCALL_BIT | 1, arch: AUDIT_ARCH_X86_64 }),
    SECCOMP_RET_KILL_PROCESS,
  );
  assert.equal(evaluate(p, { nr: 1, arch: AUDIT_ARCH_X86_64 }), SECCOMP_RET_ALLOW, "write");
});

Deno.test("every call that is not listed fails with EPERM, the notable ones included", () => {
  const p = program();
  const listed = new Set(seccompPolicy(SERVER).entries.map((e) => e.nr));
  for (let n = 0; n < 512; n++) {
    if (listed.has(n)) continue;
    assert.equal(evaluate(p, { nr: n, arch: AUDIT_ARCH_X86_64 }), EPERM, `syscall ${n}`);
  }
  for (const [name, d] of Object.entries(NOTABLY_DENIED)) {
    for (const ctx of [SERVER, CLIENT, NO_URING]) {
      assert.ok(
        !seccompPolicy(ctx).entries.some((e) => e.nr === d.nr),
        `${name} (${d.nr}) is both notably denied and allowed`,
      );
    }
  }
});

Deno.test("openat is allowed read-only only: any write, create, truncate or append flag is EPERM", async (t) => {
  const p = program();
  const cases: [string, number, number][] = [
    ["O_RDONLY", O_RDONLY, SECCOMP_RET_ALLOW],
    ["O_RDONLY|O_CLOEXEC|O_DIRECTORY", O_RDONLY | O_CLOEXEC | O_DIRECTORY, SECCOMP_RET_ALLOW],
    ["O_PATH", O_PATH | O_CLOEXEC, SECCOMP_RET_ALLOW],
    ["O_WRONLY", O_WRONLY, EPERM],
    ["O_RDWR", O_RDWR, EPERM],
    ["O_CREAT alone", O_CREAT, EPERM],
    ["O_TRUNC alone", O_TRUNC, EPERM],
    ["O_APPEND alone", O_APPEND, EPERM],
    ["O_TMPFILE", O_TMPFILE | O_RDWR, EPERM],
    ["O_WRONLY|O_CREAT|O_TRUNC", O_WRONLY | O_CREAT | O_TRUNC, EPERM],
  ];
  for (const [name, flags, want] of cases) {
    await t.step(name, () => {
      // openat(dirfd, path, flags): flags are argument 2, not 1.
      assert.equal(run(p, "openat", [-100, 0x1000, flags]), want);
    });
  }
  // The high half of the register is not what the kernel reads.
  assert.equal(run(p, "openat", [-100, 0x1000, (1n << 40n) | BigInt(O_RDONLY)]), SECCOMP_RET_ALLOW);
});

Deno.test("ioctl: only TUNSETOFFLOAD, TUNSETQUEUE, SIOCGIFINDEX and SIOCGIFMTU", async (t) => {
  const p = program();
  for (const [name, d] of Object.entries(TAP_IOCTLS)) {
    const want = ["TUNSETOFFLOAD", "TUNSETQUEUE", "SIOCGIFINDEX", "SIOCGIFMTU"].includes(name)
      ? SECCOMP_RET_ALLOW
      : EPERM;
    await t.step(name, () => assert.equal(run(p, "ioctl", [21, d.number, 0]), want));
  }
  const refused: [string, number][] = [["TCGETS", 0x5401], ["FIONBIO", 0x5421], [
    "TIOCSTI",
    0x5412,
  ]];
  for (const [name, request] of refused) {
    await t.step(`${name} is refused`, () => assert.equal(run(p, "ioctl", [0, request]), EPERM));
  }
});

Deno.test("socket: AF_UNIX stream sockets only; socketpair AF_UNIX only", () => {
  const p = program();
  assert.equal(run(p, "socket", [AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0]), SECCOMP_RET_ALLOW);
  assert.equal(
    run(p, "socket", [AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0]),
    SECCOMP_RET_ALLOW,
  );
  for (
    const [domain, type] of [
      [AF_UNIX, SOCK_DGRAM],
      [AF_INET, SOCK_STREAM],
      [AF_INET, SOCK_DGRAM],
      [AF_INET6, SOCK_STREAM],
      [AF_NETLINK, SOCK_DGRAM],
      [AF_PACKET, SOCK_RAW],
    ]
  ) {
    assert.equal(run(p, "socket", [domain, type, 0]), EPERM, `socket(${domain}, ${type})`);
  }
  assert.equal(run(p, "socketpair", [AF_UNIX, SOCK_STREAM, 0, 0]), SECCOMP_RET_ALLOW);
  assert.equal(run(p, "socketpair", [AF_INET, SOCK_STREAM, 0, 0]), EPERM);
});

Deno.test("connect only with --client, accept4 only when the daemon accepts", () => {
  const server = program(SERVER);
  const client = program(CLIENT);
  const CONNECT = 42, ACCEPT4 = 288;
  assert.equal(evaluate(server, { nr: CONNECT, arch: AUDIT_ARCH_X86_64 }), EPERM);
  assert.equal(evaluate(client, { nr: CONNECT, arch: AUDIT_ARCH_X86_64 }), SECCOMP_RET_ALLOW);
  assert.equal(evaluate(server, { nr: ACCEPT4, arch: AUDIT_ARCH_X86_64 }), SECCOMP_RET_ALLOW);
  assert.equal(evaluate(client, { nr: ACCEPT4, arch: AUDIT_ARCH_X86_64 }), EPERM);
});

Deno.test("threads only: clone with pthread's flags, not fork, vfork or namespaces; clone3 is ENOSYS", () => {
  const p = program();
  assert.equal(run(p, "clone", [PTHREAD_CLONE]), SECCOMP_RET_ALLOW);
  assert.equal(run(p, "clone", [SIGCHLD]), EPERM, "fork()");
  assert.equal(run(p, "clone", [CLONE_VM | CLONE_VFORK | SIGCHLD]), EPERM, "vfork/posix_spawn");
  assert.equal(run(p, "clone", [PTHREAD_CLONE | CLONE_NEWNET]), EPERM);
  assert.equal(run(p, "clone", [PTHREAD_CLONE | CLONE_NEWUSER]), EPERM);
  assert.equal(run(p, "clone", [PTHREAD_CLONE & ~0x10000]), EPERM, "without CLONE_THREAD");
  assert.equal(run(p, "clone3", [0, 88]), ENOSYS);
});

Deno.test("prctl only names threads; tgkill reaches only the daemon's own threads", () => {
  const p = program();
  assert.equal(run(p, "prctl", [15, 0]), SECCOMP_RET_ALLOW, "PR_SET_NAME");
  for (const option of [4, /* SET_DUMPABLE */ 22, /* SET_SECCOMP */ 38 /* NO_NEW_PRIVS */]) {
    assert.equal(run(p, "prctl", [option, 1]), EPERM, `prctl ${option}`);
  }
  assert.equal(run(p, "tgkill", [PID, PID + 1, 6]), SECCOMP_RET_ALLOW);
  assert.equal(run(p, "tgkill", [1, 1, 9]), EPERM);
});

Deno.test("io_uring_setup is never allowed (rings are made during set-up); --io-uring off leaves enter and register out; --seccomp log only logs the rest", () => {
  const off = program(NO_URING);
  for (const n of [425, 426, 427]) {
    assert.equal(evaluate(off, { nr: n, arch: AUDIT_ARCH_X86_64 }), EPERM, `io_uring ${n}`);
  }
  const IO_URING_SETUP = 425;
  assert.equal(evaluate(program(), { nr: IO_URING_SETUP, arch: AUDIT_ARCH_X86_64 }), EPERM);
  for (const n of [426, 427]) {
    assert.equal(evaluate(program(), { nr: n, arch: AUDIT_ARCH_X86_64 }), SECCOMP_RET_ALLOW);
  }
  const logging = program({ ...SERVER, logOnly: true });
  assert.equal(evaluate(logging, { nr: 59, arch: AUDIT_ARCH_X86_64 }), SECCOMP_RET_LOG);
  assert.equal(
    evaluate(logging, { nr: 1, arch: 0x40000003 }),
    SECCOMP_RET_KILL_PROCESS,
    "another architecture is still killed",
  );
});

Deno.test("every entry is one x86-64 number; the program fits the kernel's limit", () => {
  for (const ctx of [SERVER, CLIENT, NO_URING]) {
    const entries = seccompPolicy(ctx).entries;
    assert.equal(new Set(entries.map((e) => e.nr)).size, entries.length);
    assert.equal(new Set(entries.map((e) => e.name)).size, entries.length);
    assert.ok(entries.every((e) => e.why.length > 10), "an entry without a reason");
    assert.ok(program(ctx).insns.length < 4096);
  }
});

const UNISTD = "/usr/include/x86_64-linux-gnu/asm/unistd_64.h";
const unistdMissing = (() => {
  try {
    Deno.statSync(UNISTD);
    return false;
  } catch {
    return true;
  }
})();

Deno.test({
  name: "the table's numbers are the kernel's: asm/unistd_64.h agrees for every name",
  // scripts/setup.sh --test installs linux-libc-dev, which has the header.
  ignore: unistdMissing,
  fn() {
    const header = Deno.readTextFileSync(UNISTD);
    const numbers = new Map<string, number>();
    for (const m of header.matchAll(/^#define __NR_(\w+) (\d+)$/gm)) {
      numbers.set(m[1], Number(m[2]));
    }
    const named = [
      ...[SERVER, CLIENT].flatMap((ctx) => seccompPolicy(ctx).entries),
      ...Object.entries(NOTABLY_DENIED).map(([name, d]) => ({ name, nr: d.nr })),
    ];
    for (const e of named) assert.equal(numbers.get(e.name), e.nr, e.name);
  },
});
