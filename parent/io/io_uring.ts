/**
 * A minimal io_uring for the I/O workers: many `writev`s to the tap (writer)
 * or `readv`s from it (poller) per system call instead of one.
 *
 * Why: a system call can cost more than the tap's own work on a frame, and
 * there is no batched write for a tap otherwise (tun's sendmsg batching is
 * for vhost-net in the kernel only); `bench/tap_ceiling.ts` measures both
 * ways on the machine at hand.
 *
 * Only what the I/O workers need: no SQPOLL (it would spin a core the guest
 * needs), no registered buffers, one batch in flight.
 *
 * Restricted rings ({@link IoUring.prepareRestricted}): an io_uring's
 * operations are not system calls, so a seccomp filter cannot see them, and
 * a thread that may call io_uring_setup could open files or sockets of any
 * family through a ring. So the daemon makes its rings during set-up,
 * disabled, limits each with IORING_REGISTER_RESTRICTIONS to READV and
 * WRITEV (with a registered file or a plain descriptor) and to registering
 * and unregistering files, then enables it; after set-up io_uring_setup is
 * no longer allowed, and the I/O workers adopt these rings
 * ({@link IoUring.adopt}) at each queue start and hand them back at the
 * stop. Such a ring has no SINGLE_ISSUER or DEFER_TASKRUN: its submitter
 * changes from one worker to the next. The tap is a
 * registered file ({@link useFixedFile}), which spares the kernel a
 * descriptor lookup and reference per request.
 * {@link submitAndWait} returns only when the kernel has completed every queued write, so the
 * guest memory that the iovecs name is no longer read once it returns: the
 * writer may then release the records, and a revocation served after it is
 * safe.
 *
 * Ordering: tun is pollable and always writable, so io_uring issues each
 * write inline during io_uring_enter, in submission order (it punts to a
 * worker thread only files that cannot take a non-blocking attempt). Frames
 * leave in the order they were queued. Reads are queued with RWF_NOWAIT
 * (tun supports it): each is tried inline, in order, and one that finds no
 * frame completes at once with -EAGAIN instead of waiting for one, so a
 * batch's frames are the tap's next frames in order, each read's frame
 * later than the previous read's.
 *
 * Layout facts (include/uapi/linux/io_uring.h): struct io_uring_params is 120
 * bytes (sq_off at 40, cq_off at 80); an SQE is 64 bytes, a CQE 16; the
 * three regions are mapped at IORING_OFF_SQ_RING, IORING_OFF_CQ_RING and
 * IORING_OFF_SQES of the ring's descriptor.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import { IO_URING_PARAMS_BYTES, type PreparedRing } from "./protocol.ts";

export type { PreparedRing };

const SYS_io_uring_setup = 425n;
const SYS_io_uring_enter = 426n;
const SYS_io_uring_register = 427n;
const IORING_REGISTER_FILES = 2;
const IORING_UNREGISTER_FILES = 3;
const IORING_REGISTER_RESTRICTIONS = 11;
const IORING_REGISTER_ENABLE_RINGS = 12;
/** struct io_uring_restriction: u16 opcode, u8 register_op/sqe_op/sqe_flags, u8, u32[3]. */
const RESTRICTION_BYTES = 16;
const IORING_RESTRICTION_REGISTER_OP = 0;
const IORING_RESTRICTION_SQE_OP = 1;
const IORING_RESTRICTION_SQE_FLAGS_ALLOWED = 2;
/** SQE flag: `fd` is an index into the registered files. */
const IOSQE_FIXED_FILE = 1;

const IORING_OFF_SQ_RING = 0n;
const IORING_OFF_CQ_RING = 0x8000000n;
const IORING_OFF_SQES = 0x10000000n;

const IORING_SETUP_R_DISABLED = 1 << 6;
const IORING_SETUP_SUBMIT_ALL = 1 << 7;
const IORING_SETUP_COOP_TASKRUN = 1 << 8;
const IORING_SETUP_SINGLE_ISSUER = 1 << 12;
const IORING_SETUP_DEFER_TASKRUN = 1 << 13;
const IORING_ENTER_GETEVENTS = 1;
const IORING_OP_READV = 1;
const IORING_OP_WRITEV = 2;
/** RWF_NOWAIT (include/uapi/linux/fs.h): fail with EAGAIN instead of waiting for data. */
const RWF_NOWAIT = 0x8;

const PARAMS_BYTES = IO_URING_PARAMS_BYTES;
const SQE_BYTES = 64;
const SQE_WORDS = SQE_BYTES / 4;
const CQE_BYTES = 16;

/**
 * Set-up flags, best first: SUBMIT_ALL keeps submitting past an SQE that
 * fails at once (its CQE carries the error), SINGLE_ISSUER/DEFER_TASKRUN/
 * COOP_TASKRUN spare the writer thread interrupts for task work. Older
 * kernels refuse newer flags with EINVAL; the next set is tried.
 */
const SETUP_FLAG_SETS = [
  IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SINGLE_ISSUER |
  IORING_SETUP_DEFER_TASKRUN,
  IORING_SETUP_SUBMIT_ALL,
  0,
];

/**
 * Set-up flags of a restricted ring, best first: the same as above but for
 * SINGLE_ISSUER and DEFER_TASKRUN, which would tie it to its first submitter.
 */
const RESTRICTED_FLAG_SETS = [
  IORING_SETUP_SUBMIT_ALL | IORING_SETUP_COOP_TASKRUN,
  IORING_SETUP_SUBMIT_ALL,
  0,
];

/** What a restricted ring allows: READV, WRITEV, a registered file, and (un)registering one. */
const RESTRICTIONS: ReadonlyArray<readonly [number, number]> = [
  [IORING_RESTRICTION_SQE_OP, IORING_OP_READV],
  [IORING_RESTRICTION_SQE_OP, IORING_OP_WRITEV],
  [IORING_RESTRICTION_SQE_FLAGS_ALLOWED, IOSQE_FIXED_FILE],
  [IORING_RESTRICTION_REGISTER_OP, IORING_REGISTER_FILES],
  [IORING_RESTRICTION_REGISTER_OP, IORING_UNREGISTER_FILES],
];

/** One mapped region and the words over it. */
interface Region {
  pointer: Deno.PointerObject;
  bytes: number;
  words: Uint32Array;
}

function mapRegion(fd: number, bytes: number, offset: bigint, what: string): Region {
  let pointer: Deno.PointerObject;
  try {
    pointer = libc.mmap(
      bytes,
      libc.PROT_READ | libc.PROT_WRITE,
      libc.MAP_SHARED | libc.MAP_POPULATE,
      fd,
      offset,
    );
  } catch (e) {
    throw new Error(`io_uring: mapping the ${what} failed: ${(e as Error).message}`);
  }
  const buffer = Deno.UnsafePointerView.getArrayBuffer(pointer, bytes);
  return { pointer, bytes, words: new Uint32Array(buffer) };
}

/** An io_uring instance for batches of `writev` or nowait `readv`. Used by one thread only. */
export class IoUring {
  readonly fd: number;
  /** Submission slots: at most this many writes per batch. */
  readonly entries: number;
  /** The set-up flags the kernel accepted. */
  readonly flags: number;
  #regions: Region[];
  #sq: Uint32Array;
  #sqTail: number;
  #sqMask: number;
  #sqes: Uint32Array;
  #cq: Uint32Array;
  #cqHead: number;
  #cqTail: number;
  #cqMask: number;
  #cqes: number;
  /** SQEs written since the last submit. */
  #queued = 0;
  /** The descriptor registered as fixed file 0, or -1. */
  #fixedFd = -1;
  #closed = false;
  /** Whether closing closes the descriptor (false: an adopted ring goes back to its owner). */
  readonly #owned: boolean;

  private constructor(
    fd: number,
    entries: number,
    flags: number,
    params: Uint32Array,
    owned = true,
  ) {
    this.fd = fd;
    this.#owned = owned;
    this.flags = flags;
    const sqEntries = params[0];
    const cqEntries = params[1];
    this.entries = sqEntries;
    // struct io_sqring_offsets at byte 40: head tail ring_mask ring_entries flags dropped array
    const sqOff = (i: number) => params[10 + i];
    // struct io_cqring_offsets at byte 80: head tail ring_mask ring_entries overflow cqes flags
    const cqOff = (i: number) => params[20 + i];
    this.#regions = [];
    try {
      const sq = mapRegion(fd, sqOff(6) + sqEntries * 4, IORING_OFF_SQ_RING, "submission ring");
      this.#regions.push(sq);
      const cq = mapRegion(
        fd,
        cqOff(5) + cqEntries * CQE_BYTES,
        IORING_OFF_CQ_RING,
        "completion ring",
      );
      this.#regions.push(cq);
      const sqes = mapRegion(fd, sqEntries * SQE_BYTES, IORING_OFF_SQES, "submission entries");
      this.#regions.push(sqes);
      this.#sq = sq.words;
      this.#sqTail = sqOff(1) / 4;
      this.#sqMask = sq.words[sqOff(2) / 4];
      this.#cq = cq.words;
      this.#cqHead = cqOff(0) / 4;
      this.#cqTail = cqOff(1) / 4;
      this.#cqMask = cq.words[cqOff(2) / 4];
      this.#cqes = cqOff(5) / 4;
      this.#sqes = sqes.words;
      // The index array maps ring slot i to SQE i, once and for all.
      const array = sqOff(6) / 4;
      for (let i = 0; i < sqEntries; i++) sq.words[array + i] = i;
      if (sqEntries < entries || cqEntries < sqEntries) {
        throw new Error(`io_uring: asked for ${entries} entries, got ${sqEntries}/${cqEntries}`);
      }
      // An adopted ring must be idle: an entry its last user queued and the
      // kernel did not take would be run for us, with iovecs that are gone.
      if (
        !owned && (Atomics.load(sq.words, sqOff(0) / 4) !== sq.words[this.#sqTail] ||
          cq.words[this.#cqHead] !== Atomics.load(cq.words, this.#cqTail))
      ) {
        throw new Error("io_uring: the ring handed over is not idle");
      }
    } catch (e) {
      this.#release();
      throw e;
    }
  }

  /**
   * Creates a ring of at least `entries` submission slots (a power of two up
   * to 4096). Throws a {@link libc.SyscallError} when the kernel refuses
   * io_uring: ENOSYS (not built), EPERM (kernel.io_uring_disabled, or a
   * seccomp filter as container runtimes install), ENOMEM (locked-memory
   * limit).
   */
  static setup(entries: number): IoUring {
    if (!Number.isInteger(entries) || entries < 1 || entries > 4096) {
      throw new RangeError(`io_uring entries must be 1..4096, not ${entries}`);
    }
    let lastErrno = 0;
    for (const flags of SETUP_FLAG_SETS) {
      const params = new Uint32Array(PARAMS_BYTES / 4);
      params[2] = flags;
      const fd = libc.sys.io_uring_setup(SYS_io_uring_setup, entries, params);
      if (fd >= 0) return new IoUring(fd, entries, flags, params);
      lastErrno = libc.errno();
      if (lastErrno !== libc.Errno.EINVAL) break;
    }
    throw new libc.SyscallError("io_uring_setup", lastErrno, `${entries} entries`);
  }

  /**
   * Makes a ring of at least `entries` slots for a worker to adopt later
   * (see the module comment): created disabled, restricted to READV, WRITEV
   * and file registration, then enabled. Call it during set-up, while
   * io_uring_setup is allowed.
   * @throws {libc.SyscallError} when the kernel refuses io_uring or the restrictions.
   */
  static prepareRestricted(entries: number): PreparedRing {
    if (!Number.isInteger(entries) || entries < 1 || entries > 4096) {
      throw new RangeError(`io_uring entries must be 1..4096, not ${entries}`);
    }
    let lastErrno = 0;
    for (const flags of RESTRICTED_FLAG_SETS) {
      const params = new Uint32Array(PARAMS_BYTES / 4);
      params[2] = flags | IORING_SETUP_R_DISABLED;
      const fd = libc.sys.io_uring_setup(SYS_io_uring_setup, entries, params);
      if (fd < 0) {
        lastErrno = libc.errno();
        if (lastErrno !== libc.Errno.EINVAL) break;
        continue;
      }
      try {
        const list = new Uint8Array(RESTRICTIONS.length * RESTRICTION_BYTES);
        const v = new DataView(list.buffer);
        RESTRICTIONS.forEach(([opcode, arg], i) => {
          v.setUint16(i * RESTRICTION_BYTES, opcode, true);
          v.setUint8(i * RESTRICTION_BYTES + 2, arg);
        });
        const registered = libc.sys.io_uring_register(
          SYS_io_uring_register,
          fd,
          IORING_REGISTER_RESTRICTIONS,
          list,
          RESTRICTIONS.length,
        );
        libc.check(registered, "io_uring_register(RESTRICTIONS)", `fd ${fd}`);
        const enabled = libc.sys.io_uring_register(
          SYS_io_uring_register,
          fd,
          IORING_REGISTER_ENABLE_RINGS,
          null,
          0,
        );
        libc.check(enabled, "io_uring_register(ENABLE_RINGS)", `fd ${fd}`);
      } catch (e) {
        libc.closeQuietly(fd);
        throw e;
      }
      return { fd, params: [...new Uint8Array(params.buffer)] };
    }
    throw new libc.SyscallError("io_uring_setup", lastErrno, `${entries} entries`);
  }

  /**
   * Maps a ring made by {@link prepareRestricted} (in this process) for this
   * thread. {@link close} unmaps it and lets go of its registered file, but
   * leaves the descriptor to whoever handed the ring over. The ring must be
   * idle: nothing queued, every completion reaped (as {@link submitAndWait}
   * leaves it).
   */
  static adopt(ring: PreparedRing, entries: number): IoUring {
    if (ring.params.length !== PARAMS_BYTES) {
      throw new RangeError(`io_uring params are ${PARAMS_BYTES} bytes, not ${ring.params.length}`);
    }
    const params = new Uint32Array(new Uint8Array(ring.params).buffer);
    // A registration left behind by the ring's previous user (none after a clean stop).
    libc.sys.io_uring_register(SYS_io_uring_register, ring.fd, IORING_UNREGISTER_FILES, null, 0);
    return new IoUring(ring.fd, entries, params[2] & ~IORING_SETUP_R_DISABLED, params, false);
  }

  /**
   * Registers `fd` as the ring's one fixed file, in place of the one before
   * (-1: none). Queued operations on `fd` then name the registered file.
   * Returns false, with nothing registered, when the kernel refuses
   * (registration is an optimisation: plain descriptors still work).
   *
   * The registration holds its own reference to the open file: call this
   * again whenever the number `fd` may name another file (the tap was
   * replaced), and {@link close} lets go of it. Only between batches.
   */
  useFixedFile(fd: number): boolean {
    if (this.#closed) throw new Error("io_uring: the ring is closed");
    if (this.#queued !== 0) throw new Error("io_uring: a batch is queued");
    if (this.#fixedFd >= 0) {
      this.#fixedFd = -1;
      libc.sys.io_uring_register(SYS_io_uring_register, this.fd, IORING_UNREGISTER_FILES, null, 0);
    }
    if (fd < 0) return false;
    const r = libc.sys.io_uring_register(
      SYS_io_uring_register,
      this.fd,
      IORING_REGISTER_FILES,
      new Int32Array([fd]),
      1,
    );
    if (r < 0) return false;
    this.#fixedFd = fd;
    return true;
  }

  /** The descriptor registered by {@link useFixedFile}, or -1. */
  get fixedFd(): number {
    return this.#fixedFd;
  }

  /** SQEs queued and not yet submitted. */
  get queued(): number {
    return this.#queued;
  }

  /**
   * Queues `writev(fd, iov, iovcnt)` with `iov` at address hi:lo. `tag`
   * comes back with its result. The iovec array and every buffer it names
   * must stay alive and unchanged until {@link submitAndWait} returns.
   */
  queueWritev(fd: number, iovLo: number, iovHi: number, iovcnt: number, tag: number): void {
    this.#queue(IORING_OP_WRITEV, 0, fd, iovLo, iovHi, iovcnt, tag);
  }

  /**
   * Queues a `readv(fd, iov, iovcnt)` that never waits for data (RWF_NOWAIT):
   * with nothing to read it completes at once with -EAGAIN. The same rules
   * as {@link queueWritev} hold for the iovecs, which the kernel writes.
   */
  queueReadvNowait(fd: number, iovLo: number, iovHi: number, iovcnt: number, tag: number): void {
    this.#queue(IORING_OP_READV, RWF_NOWAIT, fd, iovLo, iovHi, iovcnt, tag);
  }

  #queue(
    opcode: number,
    rwFlags: number,
    fd: number,
    iovLo: number,
    iovHi: number,
    iovcnt: number,
    tag: number,
  ): void {
    if (this.#closed) throw new Error("io_uring: the ring is closed");
    if (this.#queued >= this.entries) throw new RangeError("io_uring: submission ring full");
    const tail = this.#sq[this.#sqTail] + this.#queued;
    const w = (tail & this.#sqMask) * SQE_WORDS;
    const s = this.#sqes;
    const fixed = fd >= 0 && fd === this.#fixedFd;
    s[w] = opcode | (fixed ? IOSQE_FIXED_FILE << 8 : 0); // ioprio 0
    s[w + 1] = fixed ? 0 : fd;
    s[w + 2] = 0; // off: the tap has no position
    s[w + 3] = 0;
    s[w + 4] = iovLo; // addr
    s[w + 5] = iovHi;
    s[w + 6] = iovcnt; // len
    s[w + 7] = rwFlags;
    s[w + 8] = tag; // user_data
    s[w + 9] = 0;
    for (let i = 10; i < SQE_WORDS; i++) s[w + i] = 0;
    this.#queued++;
  }

  /**
   * Submits what is queued and waits until all of it has completed, writing
   * each result (bytes written, or -errno) to `results[tag]`. Returns the
   * number of completions. A signal interrupting the wait is retried. If
   * io_uring_enter itself fails otherwise, the ring is closed (SQEs it did
   * not take are never submitted) and the error thrown: the caller must not
   * use this ring again, and cannot know which of the batch's writes ran.
   */
  submitAndWait(results: Int32Array): number {
    if (this.#closed) throw new Error("io_uring: the ring is closed");
    let toSubmit = this.#queued;
    // Plain stores suffice: without SQPOLL the kernel reads the tail only
    // inside io_uring_enter, on this thread, after this store.
    this.#sq[this.#sqTail] = (this.#sq[this.#sqTail] + toSubmit) >>> 0;
    this.#queued = 0;
    let outstanding = toSubmit;
    let done = 0;
    while (outstanding > 0) {
      const r = libc.sys.io_uring_enter(
        SYS_io_uring_enter,
        this.fd,
        toSubmit,
        outstanding,
        IORING_ENTER_GETEVENTS,
        null,
        0n,
      );
      if (r < 0) {
        const e = libc.errno();
        if (e !== libc.Errno.EINTR && e !== libc.Errno.EAGAIN && e !== libc.Errno.EBUSY) {
          done += this.#reap(results);
          this.close();
          throw new libc.SyscallError("io_uring_enter", e, `${toSubmit} writes`);
        }
      } else {
        toSubmit -= Math.min(r, toSubmit);
      }
      const got = this.#reap(results);
      done += got;
      outstanding -= got;
    }
    return done;
  }

  #reap(results: Int32Array): number {
    const cq = this.#cq;
    let head = cq[this.#cqHead];
    const tail = Atomics.load(cq, this.#cqTail);
    let n = 0;
    while (head !== tail) {
      const w = this.#cqes + (head & this.#cqMask) * (CQE_BYTES / 4);
      const tag = cq[w];
      if (tag < results.length) results[tag] = cq[w + 2] | 0;
      head = (head + 1) >>> 0;
      n++;
    }
    Atomics.store(cq, this.#cqHead, head);
    return n;
  }

  /** Unmaps the rings and closes the descriptor. Idempotent. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#release();
  }

  #release(): void {
    for (const r of this.#regions.splice(0)) {
      try {
        libc.munmap(r.pointer, r.bytes);
      } catch {
        // nothing more can be done for one mapping; the others still go
      }
    }
    if (!this.#owned) {
      // An adopted ring goes back as it came: no file registered, descriptor open.
      if (this.#fixedFd >= 0) {
        this.#fixedFd = -1;
        libc.sys.io_uring_register(
          SYS_io_uring_register,
          this.fd,
          IORING_UNREGISTER_FILES,
          null,
          0,
        );
      }
      return;
    }
    try {
      libc.close(this.fd);
    } catch {
      // already closed
    }
  }
}
