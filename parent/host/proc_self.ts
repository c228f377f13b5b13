/**
 * The process's own /proc files, read through libc: Deno's file API wants
 * --allow-all for /proc, and the daemon holds only --allow-ffi and a read
 * permission for its own modules.
 *
 * @module
 */

import * as libc from "./libc.ts";

/** Reads a small /proc file; null if it does not exist (a thread that has exited). */
export function readProc(path: string): string | null {
  let fd: number;
  try {
    fd = libc.open(path, libc.O_RDONLY | libc.O_CLOEXEC);
  } catch (e) {
    if (e instanceof libc.SyscallError && e.errno === libc.Errno.ENOENT) return null;
    throw e;
  }
  try {
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(4096);
    for (let n; (n = libc.read(fd, buf)) > 0;) chunks.push(buf.slice(0, n));
    return new TextDecoder().decode(concat(chunks));
  } catch (e) {
    // A thread that exits between open and read: its status reads as ESRCH.
    if (e instanceof libc.SyscallError && e.errno === libc.Errno.ESRCH) return null;
    throw e;
  } finally {
    libc.close(fd);
  }
}

function concat(chunks: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) {
    out.set(c, at);
    at += c.length;
  }
  return out;
}

/** The thread ids in /proc/self/task, listed with getdents64(2). */
export function listThreadIds(): number[] {
  const fd = libc.open("/proc/self/task", libc.O_RDONLY | libc.O_CLOEXEC | libc.O_DIRECTORY);
  try {
    const tids: number[] = [];
    const buf = new Uint8Array(8192);
    const view = new DataView(buf.buffer);
    for (;;) {
      const n = libc.checkSize(
        libc.sys.getdents64(fd, buf, BigInt(buf.byteLength)),
        "getdents64",
        "/proc/self/task",
      );
      if (n === 0) return tids;
      // struct linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen @16, u8 d_type, name @19.
      for (let at = 0; at < n;) {
        const reclen = view.getUint16(at + 16, true);
        const end = buf.indexOf(0, at + 19);
        const name = new TextDecoder().decode(buf.subarray(at + 19, end));
        if (/^\d+$/.test(name)) tids.push(Number(name));
        at += reclen;
      }
    }
  } finally {
    libc.close(fd);
  }
}

/** A thread's name (`/proc/self/task/<tid>/comm`), or null once it has exited. */
export function threadName(tid: number): string | null {
  return readProc(`/proc/self/task/${tid}/comm`)?.trim() ?? null;
}
