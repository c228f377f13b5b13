/**
 * The one `Deno.dlopen("libc.so.6")` table of vionet, and small typed wrappers.
 *
 * Every FFI symbol the project uses is declared here and nowhere else (STYLE §10).
 * Two layers:
 *
 * - `sys`: the raw symbols, for the hot path (tap `write_p`/`readv`, eventfd kicks).
 *   The caller checks the result itself and, on -1, calls {@link errno} at once,
 *   before any other FFI call can overwrite it.
 * - The wrappers below (`open`, `ioctl`, `mmap`, ...): they check -1, read errno
 *   immediately and throw a {@link SyscallError}. Use them off the hot path.
 *
 * Buffer lifetimes: a `"buffer"` argument is a pointer to the typed array's bytes
 * for the duration of the call only; no call declared here keeps it afterwards.
 * Structures that hold *raw addresses* of other buffers (an iovec array, a
 * msghdr pointing at iovecs and a cmsg buffer) are different: the addresses come
 * from `Deno.UnsafePointer.of()`, and every buffer they name must stay reachable
 * (and not be transferred or detached) until the call returns. V8 never moves
 * an ArrayBuffer's backing store, so such an address stays valid while the
 * buffer lives, and not a moment longer: a cached address is not a reference.
 * An address kept for later calls is taken with {@link addressed}, which ties
 * the buffer's life to the address's. A `nonblocking` call runs on another
 * thread: its buffers must stay alive until its promise settles.
 *
 * Layout assumptions: x86-64 Linux with glibc (struct stat, ioctl numbers);
 * checked once when this module loads.
 *
 * @module
 */

if (Deno.build.os !== "linux" || Deno.build.arch !== "x86_64") {
  throw new Error(
    `parent/host/libc.ts supports x86_64 Linux only (this is ${Deno.build.arch} ${Deno.build.os})`,
  );
}

/** The one library vionet opens. */
export const LIBC_NAME = "libc.so.6";

/**
 * The symbol table handed to `Deno.dlopen`, exported so that the permission
 * audit (`audit.ts`) lists exactly these symbols.
 */
export const LIBC_SYMBOLS = {
  open: { parameters: ["buffer", "i32", "u32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  read: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  /** read straight into mapped memory: pass a cached pointer, length as BigInt. */
  read_p: { name: "read", parameters: ["i32", "pointer", "usize"], result: "isize" },
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  write_p: { name: "write", parameters: ["i32", "pointer", "usize"], result: "isize" },
  /** iov: `struct iovec[]` = u64 base, u64 len per entry (16 bytes each). */
  readv: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  writev: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  /** ioctl is variadic; fixed arguments work on x86-64. Pointer argument form. */
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  /** ioctl with its argument passed by value (TUNSETOFFLOAD, TUNSETPERSIST). */
  ioctl_value: { name: "ioctl", parameters: ["i32", "u64", "u64"], result: "i32" },
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  accept4: { parameters: ["i32", "buffer", "buffer", "i32"], result: "i32" },
  connect: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  socketpair: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  shutdown: { parameters: ["i32", "i32"], result: "i32" },
  getsockopt: { parameters: ["i32", "i32", "i32", "buffer", "buffer"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  /** msghdr (56 bytes) holds raw addresses of the iovecs and the cmsg buffer. */
  recvmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  sendmsg: { parameters: ["i32", "buffer", "i32"], result: "isize" },
  mmap: {
    parameters: ["pointer", "usize", "i32", "i32", "i32", "i64"],
    result: "pointer",
  },
  munmap: { parameters: ["pointer", "usize"], result: "i32" },
  memfd_create: { parameters: ["buffer", "u32"], result: "i32" },
  ftruncate: { parameters: ["i32", "i64"], result: "i32" },
  /** struct stat is 144 bytes on x86-64 (glibc >= 2.33 exports fstat itself). */
  fstat: { parameters: ["i32", "buffer"], result: "i32" },
  lseek: { parameters: ["i32", "i64", "i32"], result: "i64" },
  /** fcntl is variadic; the third argument as a long covers F_GETFL/F_SETFL/F_DUPFD. */
  fcntl: { parameters: ["i32", "i32", "i64"], result: "i32" },
  dup: { parameters: ["i32"], result: "i32" },
  eventfd: { parameters: ["u32", "i32"], result: "i32" },
  /** pollfd[] = i32 fd, i16 events, i16 revents (8 bytes each); nfds as BigInt. */
  poll: { parameters: ["buffer", "u64", "i32"], result: "i32" },
  /** The same on a worker thread, for rare waits that must not block the isolate. */
  poll_async: {
    name: "poll",
    parameters: ["buffer", "u64", "i32"],
    result: "i32",
    nonblocking: true,
  },
  /** The poller's wait set (`wait_set.ts`). struct epoll_event is packed: u32 events, u64 data. */
  epoll_create1: { parameters: ["i32"], result: "i32" },
  epoll_ctl: { parameters: ["i32", "i32", "i32", "buffer"], result: "i32" },
  epoll_wait: { parameters: ["i32", "buffer", "i32", "i32"], result: "i32" },
  pipe2: { parameters: ["buffer", "i32"], result: "i32" },
  getpid: { parameters: [], result: "i32" },
  prctl: { parameters: ["i32", "u64", "u64", "u64", "u64"], result: "i32" },
  capget: { parameters: ["buffer", "buffer"], result: "i32" },
  capset: { parameters: ["buffer", "buffer"], result: "i32" },
  unlink: { parameters: ["buffer"], result: "i32" },
  /** struct stat as for fstat; the path is not followed if it is a symbolic link. */
  lstat: { parameters: ["buffer", "buffer"], result: "i32" },
  mkdir: { parameters: ["buffer", "u32"], result: "i32" },
  /** The vhost-user socket's and its directory's permissions (after bind, before listen). */
  chmod: { parameters: ["buffer", "u32"], result: "i32" },
  /** Their group (--socket-group); -1 (0xffffffff) leaves the owner as it is. */
  lchown: { parameters: ["buffer", "u32", "u32"], result: "i32" },
  /**
   * --socket-group NAME to a gid: name, struct group (32 bytes), its string
   * buffer and length, struct group ** (8 bytes). Returns 0 or an errno value.
   */
  getgrnam_r: { parameters: ["buffer", "buffer", "buffer", "usize", "buffer"], result: "i32" },
  /** The path an inherited --fd socket is bound to, for the QEMU line. */
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  readlink: { parameters: ["buffer", "buffer", "usize"], result: "isize" },
  /** Returns 0 (not -1) on failure, with errno set. */
  if_nametoindex: { parameters: ["buffer"], result: "u32" },
  /** struct passwd * (static storage): pw_uid @16, pw_gid @20; NULL if there is no such user. */
  getpwnam: { parameters: ["buffer"], result: "pointer" },
  fchown: { parameters: ["i32", "u32", "u32"], result: "i32" },
  gettid: { parameters: [], result: "i32" },
  /** clock_gettime(2) into a struct timespec (16 bytes); the vDSO answers CLOCK_MONOTONIC. */
  clock_gettime: { parameters: ["i32", "buffer"], result: "i32" },
  /**
   * seccomp(2) through syscall(2): operation, flags, argument (a struct
   * sock_fprog for SECCOMP_SET_MODE_FILTER). With SECCOMP_FILTER_FLAG_TSYNC a
   * positive result is the id of a thread that could not be synchronised.
   */
  seccomp: { name: "syscall", parameters: ["i64", "u32", "u32", "buffer"], result: "i64" },
  /** landlock_create_ruleset(2): attr (or NULL), its size, flags. A descriptor or -1. */
  landlock_create_ruleset: {
    name: "syscall",
    parameters: ["i64", "buffer", "usize", "u32"],
    result: "i64",
  },
  /** landlock_add_rule(2): ruleset fd, rule type, rule attr, flags (0). */
  landlock_add_rule: {
    name: "syscall",
    parameters: ["i64", "i32", "u32", "buffer", "u32"],
    result: "i64",
  },
  /**
   * landlock_restrict_self(2): ruleset fd, flags. The calling thread only;
   * `privileges.ts` runs the same call on every thread from its handler.
   */
  landlock_restrict_self: { name: "syscall", parameters: ["i64", "i32", "u32"], result: "i64" },
  __errno_location: { parameters: [], result: "pointer" },
  strerror: { parameters: ["i32"], result: "pointer" },
  /** glibc struct sigaction (152 bytes); privileges.ts installs its one-shot handler. */
  sigaction: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  tgkill: { parameters: ["i32", "i32", "i32"], result: "i32" },
  /** Lists a directory (/proc/self/task) without Deno's --allow-all for /proc. */
  getdents64: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  /**
   * Gives the pages glibc's allocator holds free, in every arena, back to
   * the kernel (madvise); `pad` 0. Returns 1 if it released any.
   */
  malloc_trim: { parameters: ["usize"], result: "i32" },
  /** Sets one of glibc's allocator parameters (M_MMAP_THRESHOLD, ...); returns 1 on success. */
  mallopt: { parameters: ["i32", "i32"], result: "i32" },
  /**
   * io_uring_setup(2) and io_uring_enter(2) through syscall(2) (glibc has no
   * wrappers): the number, then the arguments, each passed in a full register.
   * struct io_uring_params is 120 bytes; the result is a descriptor or -1.
   */
  io_uring_setup: { name: "syscall", parameters: ["i64", "u32", "buffer"], result: "i32" },
  /** to_submit, min_complete, flags; no signal mask (NULL, 0). Returns how many were submitted. */
  io_uring_enter: {
    name: "syscall",
    parameters: ["i64", "i32", "u32", "u32", "u32", "pointer", "usize"],
    result: "i32",
  },
  /**
   * bpf(2) through syscall(2): command, union bpf_attr, its size. Used once,
   * at set-up, to load the tap's queue-steering program (`tap_steering.ts`).
   */
  bpf: { name: "syscall", parameters: ["i64", "i32", "buffer", "u32"], result: "i64" },
  /** io_uring_register(2): ring fd, opcode, argument (NULL or an array), its count. */
  io_uring_register: {
    name: "syscall",
    parameters: ["i64", "i32", "u32", "buffer", "u32"],
    result: "i32",
  },
} as const;

const lib = Deno.dlopen(LIBC_NAME, LIBC_SYMBOLS);

/** Raw libc symbols. Check results yourself; read {@link errno} right after a -1. */
export const sys = lib.symbols;

/**
 * errno lives in thread-local storage. Each Deno Worker runs on its own OS
 * thread and loads its own copy of this module, so the cached location is the
 * calling thread's. (A `nonblocking` call runs elsewhere: its errno is lost.)
 */
const errnoView = new Deno.UnsafePointerView(
  sys.__errno_location() ?? (() => {
    throw new Error("__errno_location() returned NULL");
  })(),
);

/** The calling thread's errno. Read it before any other FFI call. */
export function errno(): number {
  return errnoView.getInt32(0);
}

// ---------------------------------------------------------------------------
// errno names (Linux x86-64 asm-generic numbers)

/** errno values by name, for callers that test for one (`e.errno === Errno.EAGAIN`). */
export const Errno = Object.freeze({
  EPERM: 1,
  ENOENT: 2,
  ESRCH: 3,
  EINTR: 4,
  EIO: 5,
  ENXIO: 6,
  E2BIG: 7,
  ENOEXEC: 8,
  EBADF: 9,
  ECHILD: 10,
  EAGAIN: 11,
  ENOMEM: 12,
  EACCES: 13,
  EFAULT: 14,
  EBUSY: 16,
  EEXIST: 17,
  EXDEV: 18,
  ENODEV: 19,
  ENOTDIR: 20,
  EISDIR: 21,
  EINVAL: 22,
  ENFILE: 23,
  EMFILE: 24,
  ENOTTY: 25,
  EFBIG: 27,
  ENOSPC: 28,
  ESPIPE: 29,
  EROFS: 30,
  EPIPE: 32,
  ERANGE: 34,
  EDEADLK: 35,
  ENAMETOOLONG: 36,
  ENOSYS: 38,
  ELOOP: 40,
  ENODATA: 61,
  EPROTO: 71,
  EBADMSG: 74,
  EOVERFLOW: 75,
  EBADFD: 77,
  ENOTSOCK: 88,
  EMSGSIZE: 90,
  EPROTOTYPE: 91,
  ENOPROTOOPT: 92,
  EPROTONOSUPPORT: 93,
  EOPNOTSUPP: 95,
  EAFNOSUPPORT: 97,
  EADDRINUSE: 98,
  EADDRNOTAVAIL: 99,
  ENETDOWN: 100,
  ENETUNREACH: 101,
  ECONNABORTED: 103,
  ECONNRESET: 104,
  ENOBUFS: 105,
  EISCONN: 106,
  ENOTCONN: 107,
  ETIMEDOUT: 110,
  ECONNREFUSED: 111,
  EHOSTUNREACH: 113,
  EALREADY: 114,
  EINPROGRESS: 115,
  ECANCELED: 125,
});

const ERRNO_NAMES = new Map<number, string>(
  Object.entries(Errno).map(([name, value]) => [value, name]),
);

/** "EINVAL" for 22; `errno<N>` for numbers without a name here. */
export function errnoName(n: number): string {
  return ERRNO_NAMES.get(n) ?? `errno${n}`;
}

/** libc's text for an errno ("Invalid argument"). */
export function strerror(n: number): string {
  const p = sys.strerror(n);
  return p === null ? `errno ${n}` : Deno.UnsafePointerView.getCString(p);
}

/** A failed system call: which call, its errno and errno's name. */
export class SyscallError extends Error {
  /** The call that failed, e.g. "ioctl(TUNSETIFF)". */
  readonly syscall: string;
  /** errno as a number. */
  readonly errno: number;
  /** errno's name, e.g. "EINVAL". */
  readonly code: string;

  constructor(syscall: string, errnoValue: number, detail?: string) {
    const code = errnoName(errnoValue);
    super(
      `${syscall}${detail ? ` on ${detail}` : ""} failed: ${code} (${strerror(errnoValue)})`,
    );
    this.name = "SyscallError";
    this.syscall = syscall;
    this.errno = errnoValue;
    this.code = code;
  }
}

/** Throws a SyscallError with the current errno when `result` is -1. */
export function check(result: number, syscall: string, detail?: string): number {
  if (result === -1) throw new SyscallError(syscall, errno(), detail);
  return result;
}

/** The same for `isize`/`i64` results; returns a Number (sizes here stay < 2^53). */
export function checkSize(result: number | bigint, syscall: string, detail?: string): number {
  if (result === -1n || result === -1) throw new SyscallError(syscall, errno(), detail);
  return Number(result);
}

const encoder = new TextEncoder();

/**
 * A private buffer together with its host address, for raw structures that
 * name it in later calls (an iovec set up once and passed to many `readv`s).
 *
 * A cached address does not keep its buffer alive. V8 frees an ArrayBuffer's
 * backing store (back to malloc) once nothing references the buffer, and a
 * module-level `const buf = new Uint8Array(n)` that no function reads is
 * such a buffer as soon as the module has run: a top-level binding no
 * closure uses is not kept. Measured on Deno 2.9.6: the poller's overflow
 * buffer was collected within seconds while its iovec still named it; the
 * kernel then wrote frame bytes over a free malloc chunk (glibc: "unsorted
 * double linked list corrupted", a fault in unlink_chunk, the daemon dead).
 *
 * So code that keeps an address reads it from this object and never copies
 * it elsewhere for good: wherever the address is still reachable, so is the
 * buffer. The object is frozen; the buffer must not be transferred.
 */
export interface AddressedBuffer<T extends ArrayBufferView<ArrayBuffer>> {
  /** The buffer; reading it through this object is what keeps it alive. */
  readonly view: T;
  /** Host address of `view`'s first byte (its byteOffset included). */
  readonly address: bigint;
  /** Low 32 bits of `address`, for iovec words. */
  readonly lo: number;
  /** High 32 bits of `address`. */
  readonly hi: number;
}

/**
 * Takes `view`'s address once and keeps it with the buffer (see {@link AddressedBuffer}).
 * @throws {RangeError} for an empty buffer (it has no address).
 */
export function addressed<T extends ArrayBufferView<ArrayBuffer>>(view: T): AddressedBuffer<T> {
  if (view.byteLength === 0) throw new RangeError("An empty buffer has no address to keep");
  const address = BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(view)));
  if (address === 0n) throw new RangeError("Deno.UnsafePointer.of() returned NULL");
  return Object.freeze({
    view,
    address,
    lo: Number(address & 0xffff_ffffn),
    hi: Number(address >> 32n),
  });
}

/** A NUL-terminated copy of `s`. It lives as long as the caller keeps it. */
export function cstr(s: string): Uint8Array<ArrayBuffer> {
  const bytes = encoder.encode(s);
  if (bytes.includes(0)) throw new TypeError(`String contains a NUL byte: ${JSON.stringify(s)}`);
  const out = new Uint8Array(bytes.length + 1);
  out.set(bytes);
  return out;
}

// ---------------------------------------------------------------------------
// Constants (x86-64 Linux values)

export const O_RDONLY = 0;
export const O_WRONLY = 1;
export const O_RDWR = 2;
export const O_CREAT = 0o100;
export const O_TRUNC = 0o1000;
export const O_APPEND = 0o2000;
export const O_NONBLOCK = 0o4000;
export const O_DIRECTORY = 0o200000;
export const O_NOFOLLOW = 0o400000;
export const O_CLOEXEC = 0o2000000;
export const O_PATH = 0o10000000;
/** O_TMPFILE without O_DIRECTORY (fcntl.h __O_TMPFILE). */
export const O_TMPFILE_BIT = 0o20000000;

export const F_GETFD = 1;
export const F_SETFD = 2;
export const F_GETFL = 3;
export const F_SETFL = 4;
export const F_DUPFD_CLOEXEC = 1030;
/** fcntl: memfd seals (include/uapi/linux/fcntl.h, F_LINUX_SPECIFIC_BASE + 9 / + 10). */
export const F_ADD_SEALS = 1033;
export const F_GET_SEALS = 1034;
export const F_SEAL_SEAL = 0x1;
export const F_SEAL_SHRINK = 0x2;
export const F_SEAL_GROW = 0x4;
export const FD_CLOEXEC = 1;

export const SEEK_SET = 0;
export const SEEK_END = 2;

export const AF_UNIX = 1;
export const AF_INET = 2;
export const SOCK_STREAM = 1;
export const SOCK_DGRAM = 2;
export const SOCK_SEQPACKET = 5;
export const SOCK_NONBLOCK = 0o4000;
export const SOCK_CLOEXEC = 0o2000000;
export const SOL_SOCKET = 1;
export const SO_PEERCRED = 17;
export const SCM_RIGHTS = 1;
export const MSG_DONTWAIT = 0x40;
export const MSG_NOSIGNAL = 0x4000;
export const MSG_CMSG_CLOEXEC = 0x40000000;
export const SHUT_RDWR = 2;

export const PROT_NONE = 0;
export const PROT_READ = 1;
export const PROT_WRITE = 2;
export const MAP_SHARED = 0x01;
export const MAP_POPULATE = 0x8000;
export const MAP_PRIVATE = 0x02;
export const MAP_FIXED = 0x10;
export const MAP_ANONYMOUS = 0x20;
export const MAP_NORESERVE = 0x4000;
export const MFD_CLOEXEC = 1;
export const MFD_ALLOW_SEALING = 2;

export const EFD_SEMAPHORE = 1;
export const EFD_NONBLOCK = 0o4000;
export const EFD_CLOEXEC = 0o2000000;

export const POLLIN = 0x001;
export const POLLPRI = 0x002;
export const POLLOUT = 0x004;
export const POLLERR = 0x008;
export const POLLHUP = 0x010;
export const POLLNVAL = 0x020;

export const EPOLL_CLOEXEC = 0o2000000;
export const EPOLL_CTL_ADD = 1;
export const EPOLL_CTL_DEL = 2;
export const EPOLL_CTL_MOD = 3;
export const EPOLLIN = 0x001;
export const EPOLLERR = 0x008;
export const EPOLLHUP = 0x010;
/** Edge-triggered: one report per change (for an eventfd, per write), never repeated. */
export const EPOLLET = 0x8000_0000;

export const PR_SET_PDEATHSIG = 1;
export const PR_CAPBSET_DROP = 24;
export const PR_SET_NO_NEW_PRIVS = 38;

/** struct stat (x86-64): st_ino @8, st_mode @24 (u32), st_uid @28, st_gid @32, st_size @48 (i64). */
const STAT_SIZE = 144;
export const S_IFMT = 0o170000;
export const S_IFREG = 0o100000;
export const S_IFCHR = 0o020000;
export const S_IFIFO = 0o010000;
export const S_IFSOCK = 0o140000;
export const S_IFDIR = 0o040000;

// ---------------------------------------------------------------------------
// Checked wrappers. Each throws SyscallError; `detail` names the object in the message.

/** open(2). */
export function open(path: string, flags: number, mode = 0): number {
  return check(sys.open(cstr(path), flags, mode), "open", path);
}

/** close(2). */
export function close(fd: number): void {
  check(sys.close(fd), "close", `fd ${fd}`);
}

/**
 * close(2) for releasing: never throws. Returns the error (an fd already
 * closed, or never valid), or null.
 */
export function closeQuietly(fd: number): Error | null {
  try {
    close(fd);
    return null;
  } catch (e) {
    return e as Error;
  }
}

/** The u64 1 an eventfd write adds (read-only; shared by every write). */
const EVENTFD_ONE = new Uint8Array(new BigUint64Array([1n]).buffer);
/** Where an eventfd read puts the counter (its value is not needed). */
const eventfdCounter = new Uint8Array(8);

/**
 * Adds 1 to eventfd `fd` (8 bytes into a pipe, which QEMU may give instead);
 * returns whether it was written, never throws (errno() says why not). A
 * pipe whose reader is gone fails with EPIPE rather than killing the process
 * only because Deno ignores SIGPIPE (tests/parent/control/vhost_user_socket_test.ts
 * checks it).
 */
export function eventfdSignal(fd: number): boolean {
  return Number(sys.write(fd, EVENTFD_ONE, 8n)) === 8;
}

/** Reads, and so clears, the counter of O_NONBLOCK eventfd `fd`; true if it was non-zero. */
export function eventfdDrain(fd: number): boolean {
  return Number(sys.read(fd, eventfdCounter, 8n)) === 8;
}

/** read(2) into `buf`; returns the byte count (0 at end of file). */
export function read(fd: number, buf: Uint8Array): number {
  return checkSize(sys.read(fd, buf, BigInt(buf.byteLength)), "read", `fd ${fd}`);
}

/** write(2) of all of `buf` in one call; returns the byte count written. */
export function write(fd: number, buf: Uint8Array): number {
  return checkSize(sys.write(fd, buf, BigInt(buf.byteLength)), "write", `fd ${fd}`);
}

/** readv(2); `iov` holds `count` 16-byte iovecs whose bases must stay alive. */
export function readv(fd: number, iov: Uint8Array, count: number): number {
  return checkSize(sys.readv(fd, iov, count), "readv", `fd ${fd}`);
}

/** writev(2); `iov` holds `count` 16-byte iovecs whose bases must stay alive. */
export function writev(fd: number, iov: Uint8Array, count: number): number {
  return checkSize(sys.writev(fd, iov, count), "writev", `fd ${fd}`);
}

/** ioctl(2) with a pointer argument (`arg` may be read and written by the kernel). */
export function ioctl(
  fd: number,
  request: bigint,
  arg: Uint8Array | null,
  name = `0x${request.toString(16)}`,
): number {
  return check(sys.ioctl(fd, request, arg), `ioctl(${name})`, `fd ${fd}`);
}

/** ioctl(2) with its argument passed by value. */
export function ioctlValue(
  fd: number,
  request: bigint,
  value: bigint,
  name = `0x${request.toString(16)}`,
): number {
  return check(sys.ioctl_value(fd, request, value), `ioctl(${name})`, `fd ${fd}`);
}

/** socket(2). */
export function socket(domain: number, type: number, protocol = 0): number {
  return check(sys.socket(domain, type, protocol), "socket");
}

/** bind(2); `addr` is a complete sockaddr. */
export function bind(fd: number, addr: Uint8Array): void {
  check(sys.bind(fd, addr, addr.byteLength), "bind", `fd ${fd}`);
}

/** listen(2). */
export function listen(fd: number, backlog: number): void {
  check(sys.listen(fd, backlog), "listen", `fd ${fd}`);
}

/** accept4(2) without the peer address; returns the new descriptor. */
export function accept4(fd: number, flags: number): number {
  return check(sys.accept4(fd, null, null, flags), "accept4", `fd ${fd}`);
}

/** connect(2); `addr` is a complete sockaddr. */
export function connect(fd: number, addr: Uint8Array): void {
  check(sys.connect(fd, addr, addr.byteLength), "connect", `fd ${fd}`);
}

/** socketpair(2); returns both descriptors. */
export function socketpair(domain: number, type: number, protocol = 0): [number, number] {
  const fds = new Int32Array(2);
  check(sys.socketpair(domain, type, protocol, new Uint8Array(fds.buffer)), "socketpair");
  return [fds[0], fds[1]];
}

/** shutdown(2). */
export function shutdown(fd: number, how: number): void {
  check(sys.shutdown(fd, how), "shutdown", `fd ${fd}`);
}

/** getsockopt(2) into `value`; returns the length the kernel wrote. */
export function getsockopt(fd: number, level: number, option: number, value: Uint8Array): number {
  const len = new Uint32Array([value.byteLength]);
  check(
    sys.getsockopt(fd, level, option, value, new Uint8Array(len.buffer)),
    "getsockopt",
    `fd ${fd}`,
  );
  return len[0];
}

/** setsockopt(2). */
export function setsockopt(fd: number, level: number, option: number, value: Uint8Array): void {
  check(sys.setsockopt(fd, level, option, value, value.byteLength), "setsockopt", `fd ${fd}`);
}

/** recvmsg(2); `msghdr` is 56 bytes of raw addresses (see the module comment). */
export function recvmsg(fd: number, msghdr: Uint8Array, flags: number): number {
  return checkSize(sys.recvmsg(fd, msghdr, flags), "recvmsg", `fd ${fd}`);
}

/** sendmsg(2); `msghdr` is 56 bytes of raw addresses (see the module comment). */
export function sendmsg(fd: number, msghdr: Uint8Array, flags: number): number {
  return checkSize(sys.sendmsg(fd, msghdr, flags), "sendmsg", `fd ${fd}`);
}

const MAP_FAILED = 0xffff_ffff_ffff_ffffn;

/**
 * mmap(2). Check the descriptor's size with {@link fstat} first: touching a
 * mapping beyond the end of its file raises SIGBUS and kills the process.
 * The mapping lives until {@link munmap}; any ArrayBuffer made over it must be
 * given back (detached) before then, or touching it is a SIGSEGV.
 */
export function mmap(
  length: number,
  prot: number,
  flags: number,
  fd: number,
  offset = 0n,
  addr: Deno.PointerValue = null,
): Deno.PointerObject {
  const p = sys.mmap(addr, BigInt(length), prot, flags, fd, offset);
  if (p === null || Deno.UnsafePointer.value(p) === MAP_FAILED) {
    throw new SyscallError("mmap", errno(), `fd ${fd}, ${length} bytes`);
  }
  return p;
}

/** munmap(2). */
export function munmap(addr: Deno.PointerObject, length: number): void {
  check(sys.munmap(addr, BigInt(length)), "munmap", `${length} bytes`);
}

/** memfd_create(2). */
export function memfdCreate(name: string, flags: number): number {
  return check(sys.memfd_create(cstr(name), flags), "memfd_create", name);
}

/** ftruncate(2). */
export function ftruncate(fd: number, length: number | bigint): void {
  check(sys.ftruncate(fd, BigInt(length)), "ftruncate", `fd ${fd}`);
}

/** The parts of fstat(2) that vionet uses. */
export interface FileStat {
  /** st_mode: type (S_IFMT bits) and permissions. */
  mode: number;
  /** st_size in bytes (for a memfd or file: what may be mapped). */
  size: number;
  /** st_ino, as a bigint. */
  ino: bigint;
  /** st_dev, as a bigint. */
  dev: bigint;
  /** st_uid and st_gid: the owner. */
  uid: number;
  gid: number;
}

/** fstat(2). The stat buffer is local to this call. */
export function fstat(fd: number): FileStat {
  const buf = new Uint8Array(STAT_SIZE);
  check(sys.fstat(fd, buf), "fstat", `fd ${fd}`);
  return statFields(buf);
}

/**
 * lstat(2), or null when nothing is at `path` (ENOENT). Through libc, so the
 * daemon needs no Deno read permission for the socket's directory.
 */
export function lstat(path: string): FileStat | null {
  const buf = new Uint8Array(STAT_SIZE);
  if (sys.lstat(cstr(path), buf) !== 0) {
    const err = errno();
    if (err === Errno.ENOENT) return null;
    throw new SyscallError("lstat", err, path);
  }
  return statFields(buf);
}

/**
 * mkdir -p: creates `path` and its missing parents with `mode`; existing ones
 * are fine. Returns the directories it created, outermost first.
 */
export function mkdirs(path: string, mode: number): string[] {
  const created: string[] = [];
  let at = 0;
  while (at >= 0) {
    at = path.indexOf("/", at + 1);
    const part = at < 0 ? path : path.slice(0, at);
    if (part === "" || part === "/") continue;
    if (sys.mkdir(cstr(part), mode) === 0) created.push(part);
    else if (errno() !== Errno.EEXIST) throw new SyscallError("mkdir", errno(), part);
  }
  return created;
}

function statFields(buf: Uint8Array): FileStat {
  const v = new DataView(buf.buffer);
  return {
    dev: v.getBigUint64(0, true),
    ino: v.getBigUint64(8, true),
    mode: v.getUint32(24, true),
    uid: v.getUint32(28, true),
    gid: v.getUint32(32, true),
    size: Number(v.getBigInt64(48, true)),
  };
}

/** lseek(2); returns the new offset. */
export function lseek(fd: number, offset: number | bigint, whence: number): number {
  return checkSize(sys.lseek(fd, BigInt(offset), whence), "lseek", `fd ${fd}`);
}

/** fcntl(2) with an integer argument (0 for the getters). */
export function fcntl(fd: number, cmd: number, arg = 0): number {
  return check(sys.fcntl(fd, cmd, BigInt(arg)), "fcntl", `fd ${fd}`);
}

/** Sets or clears O_NONBLOCK on `fd`. */
export function setNonBlocking(fd: number, on: boolean): void {
  const flags = fcntl(fd, F_GETFL);
  const next = on ? flags | O_NONBLOCK : flags & ~O_NONBLOCK;
  if (next !== flags) fcntl(fd, F_SETFL, next);
}

/** dup(2). */
export function dup(fd: number): number {
  return check(sys.dup(fd), "dup", `fd ${fd}`);
}

/** eventfd(2). */
export function eventfd(initval: number, flags: number): number {
  return check(sys.eventfd(initval, flags), "eventfd");
}

/** pipe2(2); returns [read end, write end]. */
export function pipe2(flags: number): [number, number] {
  const fds = new Int32Array(2);
  check(sys.pipe2(new Uint8Array(fds.buffer), flags), "pipe2");
  return [fds[0], fds[1]];
}

/** An 8-byte `struct pollfd` for one descriptor; revents is `view[3]` (Int16Array). */
function pollfd(fd: number, events: number): Int16Array<ArrayBuffer> {
  const v = new Int16Array(4);
  new Int32Array(v.buffer, 0, 1)[0] = fd;
  v[2] = events;
  return v;
}

/** poll(2) on a raw pollfd array; returns how many entries have revents. */
export function poll(fds: Uint8Array, nfds: number, timeoutMs: number): number {
  return check(sys.poll(fds, BigInt(nfds), timeoutMs), "poll");
}

/** Waits up to `timeoutMs` (-1: forever) for `events` on one fd; returns revents (0: timeout). */
export function pollOne(fd: number, events: number, timeoutMs: number): number {
  const v = pollfd(fd, events);
  check(sys.poll(new Uint8Array(v.buffer), 1n, timeoutMs), "poll", `fd ${fd}`);
  return v[3] & 0xffff;
}

/**
 * The same without blocking the isolate, for rare waits (costs ~20 µs).
 * The call runs on another thread, so its errno is lost: on -1 the poll is
 * repeated synchronously with timeout 0, which reports the real error (or,
 * after a spurious EINTR, the current readiness).
 */
export async function pollOneAsync(fd: number, events: number, timeoutMs: number): Promise<number> {
  const v = pollfd(fd, events);
  const bytes = new Uint8Array(v.buffer); // kept alive by this frame until the promise settles
  const n = await sys.poll_async(bytes, 1n, timeoutMs);
  if (n === -1) check(sys.poll(bytes, 1n, 0), "poll", `fd ${fd}`);
  return v[3] & 0xffff;
}

/** getpid(2). */
export function getpid(): number {
  return sys.getpid();
}

const CLOCK_MONOTONIC = 1;
const timespec = new Uint32Array(4);

/**
 * CLOCK_MONOTONIC in milliseconds (fractional): the same clock in every
 * thread, unlike `performance.now()`, whose origin is each worker's start.
 * The vDSO answers it without a system call.
 */
export function monotonicMs(): number {
  sys.clock_gettime(CLOCK_MONOTONIC, timespec);
  return (timespec[0] + timespec[1] * 0x1_0000_0000) * 1000 + timespec[2] / 1e6;
}

/** gettid(2): the calling thread's id. */
export function gettid(): number {
  return sys.gettid();
}

/** fchown(2). */
export function fchown(fd: number, uid: number, gid: number): void {
  check(sys.fchown(fd, uid, gid), "fchown", `fd ${fd}`);
}

/** prctl(2). */
export function prctl(option: number, a2 = 0n, a3 = 0n, a4 = 0n, a5 = 0n): number {
  return check(sys.prctl(option, a2, a3, a4, a5), "prctl", `option ${option}`);
}

/** capget(2): `header` is cap_user_header_t (8 bytes), `data` 2 × 12 bytes for v3. */
export function capget(header: Uint8Array, data: Uint8Array): void {
  check(sys.capget(header, data), "capget");
}

/** capset(2), same layouts as {@link capget}. */
export function capset(header: Uint8Array, data: Uint8Array): void {
  check(sys.capset(header, data), "capset");
}

/** chmod(2). */
export function chmod(path: string, mode: number): void {
  check(sys.chmod(cstr(path), mode), "chmod", path);
}

/** lchown(2) of the group only (a symbolic link itself, never what it points to). */
export function lchgrp(path: string, gid: number): void {
  check(sys.lchown(cstr(path), 0xffff_ffff, gid), "lchown", path);
}

/**
 * getgrnam_r(3): the gid of group `name`, or null when there is no such
 * group. Through NSS, as `chgrp` would resolve it (/etc/group, or whatever
 * nsswitch.conf names).
 */
export function groupId(name: string): number | null {
  const grp = new Uint8Array(32); // struct group: name, passwd, gid (at 16), members
  const result = new BigUint64Array(1);
  for (let size = 1024; size <= 1 << 20; size *= 4) {
    const strings = new Uint8Array(size);
    const r = sys.getgrnam_r(
      cstr(name),
      grp,
      strings,
      BigInt(size),
      new Uint8Array(result.buffer),
    );
    if (r === Errno.ERANGE) continue;
    if (r !== 0) throw new SyscallError("getgrnam_r", r, name);
    return result[0] === 0n ? null : new DataView(grp.buffer).getUint32(16, true);
  }
  throw new SyscallError("getgrnam_r", Errno.ERANGE, name);
}

/** The filesystem path a unix socket is bound to; null for an unnamed or abstract one. */
export function socketPath(fd: number): string | null {
  const addr = new Uint8Array(110); // struct sockaddr_un: family, then 108 bytes of path
  const len = new Uint32Array([addr.length]);
  check(sys.getsockname(fd, addr, new Uint8Array(len.buffer)), "getsockname", `fd ${fd}`);
  const family = new DataView(addr.buffer).getUint16(0, true);
  if (family !== AF_UNIX || len[0] <= 2 || addr[2] === 0) return null;
  const end = addr.indexOf(0, 2);
  return new TextDecoder().decode(addr.subarray(2, end < 0 ? Math.min(len[0], 110) : end));
}

/** unlink(2). */
export function unlink(path: string): void {
  check(sys.unlink(cstr(path)), "unlink", path);
}

/**
 * readlink(2): what a symbolic link points to (for /proc/self/fd/N, what a
 * descriptor is). Through FFI because Deno's own readLink on /proc needs
 * more than --allow-read.
 */
export function readlink(path: string): string {
  const buf = new Uint8Array(4096);
  const n = checkSize(sys.readlink(cstr(path), buf, BigInt(buf.length)), "readlink", path);
  return new TextDecoder().decode(buf.subarray(0, n));
}

/** if_nametoindex(3) in the calling thread's network namespace. */
export function ifNametoindex(name: string): number {
  const index = sys.if_nametoindex(cstr(name));
  if (index === 0) throw new SyscallError("if_nametoindex", errno(), name);
  return index;
}
