/**
 * parent/io/io_uring.ts on a pipe: batched writes land in order, a failing write
 * reports its own -errno without stopping the others, a closed ring refuses;
 * a nowait read of nothing completes at once with -EAGAIN.
 *
 * @module
 */

import assert from "node:assert/strict";
import * as libc from "../../../parent/host/libc.ts";
import { IoUring } from "../../../parent/io/io_uring.ts";

function ringOrSkip(): IoUring | string {
  try {
    return IoUring.setup(8);
  } catch (e) {
    return (e as Error).message;
  }
}

const probe = ringOrSkip();
const skip = typeof probe === "string" ? `io_uring unavailable here: ${probe}` : undefined;
if (typeof probe !== "string") probe.close();
if (skip) console.warn(`tests/parent/io/io_uring_test.ts skipped: ${skip}`);

/** A pipe: [read end, write end]. */
function pipe(): Int32Array {
  const fds = new Int32Array(2);
  assert.equal(libc.sys.pipe2(new Uint8Array(fds.buffer), libc.O_CLOEXEC), 0);
  return fds;
}

/** One iovec per message, each message kept alive by its holder. */
function iovFor(text: string) {
  const bytes = libc.addressed(new TextEncoder().encode(text));
  const iov = libc.addressed(new BigUint64Array([bytes.address, BigInt(bytes.view.byteLength)]));
  return { bytes, iov };
}

Deno.test({
  name: "io_uring: a batch of writev lands in order; a bad descriptor fails alone; closed refuses",
  ignore: skip !== undefined,
  fn() {
    const ring = IoUring.setup(8);
    const fds = pipe();
    try {
      const parts = ["one ", "two ", "three ", "four "].map(iovFor);
      parts.forEach((p, i) => ring.queueWritev(fds[1], p.iov.lo, p.iov.hi, 1, i));
      const bad = iovFor("never ");
      ring.queueWritev(-1, bad.iov.lo, bad.iov.hi, 1, 4);
      const results = new Int32Array(8).fill(7777);
      assert.equal(ring.submitAndWait(results), 5);
      assert.deepEqual([...results.subarray(0, 5)], [4, 4, 6, 5, -libc.Errno.EBADF]);
      const buf = new Uint8Array(64);
      const n = Number(libc.sys.read(fds[0], buf, 64n));
      assert.equal(new TextDecoder().decode(buf.subarray(0, n)), "one two three four ");
      // More than fits in one batch is refused, not written past the ring.
      for (let i = 0; i < ring.entries; i++) {
        ring.queueWritev(fds[1], parts[0].iov.lo, parts[0].iov.hi, 1, 0);
      }
      assert.throws(() => ring.queueWritev(fds[1], parts[0].iov.lo, parts[0].iov.hi, 1, 0), /full/);
      ring.submitAndWait(results);
    } finally {
      ring.close();
      libc.close(fds[0]);
      libc.close(fds[1]);
    }
    assert.throws(() => ring.queueWritev(1, 0, 0, 1, 0), /closed/);
    assert.throws(() => ring.submitAndWait(new Int32Array(1)), /closed/);
    ring.close(); // idempotent
  },
});

Deno.test({
  name:
    "io_uring: a nowait readv on an empty pipe completes at once with -EAGAIN; with data it reads",
  ignore: skip !== undefined,
  fn() {
    const ring = IoUring.setup(8);
    const fds = pipe();
    try {
      const bufs = [0, 1].map(() => iovFor("........"));
      const results = new Int32Array(2).fill(7777);
      // A blocking descriptor: without RWF_NOWAIT this read would wait for a writer forever.
      ring.queueReadvNowait(fds[0], bufs[0].iov.lo, bufs[0].iov.hi, 1, 0);
      assert.equal(ring.submitAndWait(results), 1);
      assert.equal(results[0], -libc.Errno.EAGAIN);
      const msg = new TextEncoder().encode("hello");
      assert.equal(Number(libc.sys.write(fds[1], msg, 5n)), 5);
      bufs.forEach((b, i) => ring.queueReadvNowait(fds[0], b.iov.lo, b.iov.hi, 1, i));
      assert.equal(ring.submitAndWait(results), 2);
      assert.deepEqual(
        [...results],
        [5, -libc.Errno.EAGAIN],
        "in order: the first read took it all",
      );
      assert.equal(new TextDecoder().decode(bufs[0].bytes.view.subarray(0, 5)), "hello");
    } finally {
      ring.close();
      libc.close(fds[0]);
      libc.close(fds[1]);
    }
  },
});

Deno.test("io_uring: entries outside 1..4096 are refused before any system call", () => {
  assert.throws(() => IoUring.setup(0), RangeError);
  assert.throws(() => IoUring.setup(4097), RangeError);
  assert.throws(() => IoUring.setup(1.5), RangeError);
});

Deno.test({
  name: "io_uring: a registered file takes the writes on its descriptor until another replaces it",
  ignore: skip !== undefined,
  fn() {
    const ring = IoUring.setup(8);
    const a = pipe();
    const b = pipe();
    const results = new Int32Array(2);
    const drain = (fd: number) => {
      const buf = new Uint8Array(64);
      const n = Number(libc.sys.read(fd, buf, 64n));
      return new TextDecoder().decode(buf.subarray(0, n));
    };
    try {
      const x = iovFor("x");
      const y = iovFor("yy");
      assert.equal(ring.useFixedFile(a[1]), true);
      assert.equal(ring.fixedFd, a[1]);
      ring.queueWritev(a[1], x.iov.lo, x.iov.hi, 1, 0);
      ring.queueWritev(b[1], y.iov.lo, y.iov.hi, 1, 1); // not registered: by descriptor
      ring.submitAndWait(results);
      assert.deepEqual([...results], [1, 2]);
      assert.equal(drain(a[0]), "x");
      assert.equal(drain(b[0]), "yy");
      // Replacing the registration moves the fixed slot to the new file.
      ring.queueWritev(a[1], x.iov.lo, x.iov.hi, 1, 0);
      assert.throws(() => ring.useFixedFile(b[1]), /batch is queued/);
      ring.submitAndWait(results);
      assert.equal(drain(a[0]), "x");
      assert.equal(ring.useFixedFile(b[1]), true);
      assert.equal(ring.fixedFd, b[1]);
      ring.queueWritev(b[1], y.iov.lo, y.iov.hi, 1, 0);
      ring.queueWritev(a[1], x.iov.lo, x.iov.hi, 1, 1);
      ring.submitAndWait(results);
      assert.deepEqual([...results], [2, 1]);
      assert.equal(drain(b[0]), "yy");
      assert.equal(drain(a[0]), "x");
      // -1 drops it; a queued -1 is still a bad descriptor, not fixed slot 0.
      assert.equal(ring.useFixedFile(-1), false);
      assert.equal(ring.fixedFd, -1);
      ring.queueWritev(-1, x.iov.lo, x.iov.hi, 1, 0);
      ring.submitAndWait(results);
      assert.equal(results[0], -libc.Errno.EBADF);
    } finally {
      ring.close();
      for (const fd of [...a, ...b]) libc.close(fd);
    }
  },
});

/**
 * Submits one raw SQE of `opcode` on ring `fd` (its params from the kernel)
 * and returns the CQE's result: how a compromised worker would use a ring
 * for something else than the queue methods offer.
 */
function rawSubmit(fd: number, params: Uint32Array, opcode: number, sqeFd: number): number {
  const sqOff = (i: number) => params[10 + i];
  const cqOff = (i: number) => params[20 + i];
  const sqBytes = sqOff(6) + params[0] * 4;
  const cqBytes = cqOff(5) + params[1] * 16;
  const flags = libc.MAP_SHARED | libc.MAP_POPULATE;
  const rw = libc.PROT_READ | libc.PROT_WRITE;
  const sqPtr = libc.mmap(sqBytes, rw, flags, fd, 0n);
  const cqPtr = libc.mmap(cqBytes, rw, flags, fd, 0x8000000n);
  const sqePtr = libc.mmap(params[0] * 64, rw, flags, fd, 0x10000000n);
  try {
    const sq = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(sqPtr, sqBytes));
    const cq = new Int32Array(Deno.UnsafePointerView.getArrayBuffer(cqPtr, cqBytes));
    const sqes = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(sqePtr, params[0] * 64));
    const path = libc.addressed(libc.cstr("/etc/hostname"));
    const tail = sq[sqOff(1) / 4];
    const slot = tail & sq[sqOff(2) / 4];
    sqes.fill(0, slot * 16, slot * 16 + 16);
    sqes[slot * 16] = opcode;
    sqes[slot * 16 + 1] = sqeFd >>> 0;
    sqes[slot * 16 + 4] = path.lo;
    sqes[slot * 16 + 5] = path.hi;
    sq[sqOff(6) / 4 + slot] = slot;
    Atomics.store(sq, sqOff(1) / 4, tail + 1);
    assert.equal(libc.sys.io_uring_enter(426n, fd, 1, 1, 1, null, 0n), 1, "submitted");
    const head = cq[cqOff(0) / 4];
    const res = cq[cqOff(5) / 4 + (head & cq[cqOff(2) / 4]) * 4 + 2];
    Atomics.store(cq, cqOff(0) / 4, head + 1);
    void path.view;
    return res;
  } finally {
    libc.munmap(sqePtr, params[0] * 64);
    libc.munmap(cqPtr, cqBytes);
    libc.munmap(sqPtr, sqBytes);
  }
}

Deno.test({
  name: "a restricted ring: adopted twice in turn, it writes; the kernel refuses every other " +
    "operation (openat, socket, nop) and registration; its descriptor outlives the adopter",
  ignore: skip !== undefined,
  fn() {
    const prepared = IoUring.prepareRestricted(8);
    const fds = pipe();
    try {
      for (let round = 0; round < 2; round++) {
        // Adopted twice in a row, as by the workers of two data paths.
        const ring = IoUring.adopt(prepared, 8);
        assert.equal(ring.useFixedFile(fds[1]), true);
        const msg = iovFor(`round ${round} `);
        ring.queueWritev(fds[1], msg.iov.lo, msg.iov.hi, 1, 0);
        const results = new Int32Array(1);
        assert.equal(ring.submitAndWait(results), 1);
        assert.equal(results[0], 8);
        ring.close();
      }
      const buf = new Uint8Array(32);
      const n = Number(libc.sys.read(fds[0], buf, 32n));
      assert.equal(new TextDecoder().decode(buf.subarray(0, n)), "round 0 round 1 ");
      assert.equal(libc.fcntl(prepared.fd, libc.F_GETFD) & libc.FD_CLOEXEC, libc.FD_CLOEXEC);

      const params = new Uint32Array(new Uint8Array(prepared.params).buffer);
      const IORING_OP_NOP = 0, IORING_OP_OPENAT = 18, IORING_OP_SOCKET = 45;
      for (const op of [IORING_OP_OPENAT, IORING_OP_SOCKET, IORING_OP_NOP]) {
        assert.equal(rawSubmit(prepared.fd, params, op, -100), -libc.Errno.EACCES, `op ${op}`);
      }
      const IORING_REGISTER_BUFFERS = 0, IORING_REGISTER_PERSONALITY = 9;
      for (const op of [IORING_REGISTER_BUFFERS, IORING_REGISTER_PERSONALITY]) {
        assert.equal(libc.sys.io_uring_register(427n, prepared.fd, op, null, 0), -1);
        assert.equal(libc.errno(), libc.Errno.EACCES, `register op ${op}`);
      }
    } finally {
      libc.close(prepared.fd);
      libc.close(fds[0]);
      libc.close(fds[1]);
    }
  },
});

Deno.test({
  name: "a restricted ring whose last user left an entry the kernel did not take is not adopted",
  ignore: skip !== undefined,
  fn() {
    const prepared = IoUring.prepareRestricted(8);
    try {
      const params = new Uint32Array(new Uint8Array(prepared.params).buffer);
      const sqOff6 = params[10 + 6];
      const bytes = sqOff6 + params[0] * 4;
      const p = libc.mmap(bytes, libc.PROT_READ | libc.PROT_WRITE, libc.MAP_SHARED, prepared.fd);
      const sq = new Uint32Array(Deno.UnsafePointerView.getArrayBuffer(p, bytes));
      Atomics.add(sq, params[10 + 1] / 4, 1); // a queued entry never submitted
      libc.munmap(p, bytes);
      assert.throws(() => IoUring.adopt(prepared, 8), /not idle/);
    } finally {
      libc.close(prepared.fd);
    }
  },
});
