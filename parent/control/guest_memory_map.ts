/**
 * Maps and unmaps the guest memory regions a vhost-user front-end hands over
 * as file descriptors (VHOST_USER_SET_MEM_TABLE, VHOST_USER_ADD_MEM_REG).
 *
 * Trust: the region description comes from the front-end and has passed the
 * codec's syntax checks (non-zero size, no 2^64 wrap). The descriptor may
 * still name a file that is too small: mapping past the end of a file works,
 * but the first touch of such a page raises SIGBUS and kills the daemon, so
 * the file's size is checked with fstat(2) before anything is mapped.
 *
 * A file that stays that size is a promise of the front-end's: a memfd it
 * shrinks (ftruncate) after we mapped it makes the next touch of a page past
 * the new end SIGBUS the daemon just the same. QEMU seals its memfds against
 * that by default (`memory-backend-memfd,seal=on`: F_SEAL_SHRINK|F_SEAL_GROW);
 * {@link MappedRegion.shrinkSealed} says whether this one is, so that the
 * backend can warn about one that is not (hugetlbfs files cannot be sealed,
 * so refusing them would lock out real set-ups).
 *
 * Lifetime: a {@link MappedRegion} owns its mapping and its descriptor until
 * {@link unmapRegion} or {@link retireRegion}. Anything that made an
 * ArrayBuffer over the mapping (the device worker) must have given it back
 * before it is unmapped; the backend (`vhost_user_backend.ts`) waits for that.
 * A region that a worker took and never gave back (it did not answer and was
 * terminated, and a terminated worker's thread may still be running) is
 * retired instead: its range stays mapped, with zero pages.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import {
  checkRegionWithinFile,
  describeRegion,
  type LogDesc,
  type MemoryRegionDesc,
  ProtocolError,
} from "./vhost_user_messages.ts";

/** mmap offsets must be page aligned; the host page size on x86-64. */
const PAGE_SIZE = 4096n;

/** A guest memory region mapped into the parent's address space. */
export interface MappedRegion extends MemoryRegionDesc {
  /** The region's first byte (the mapping base plus the offset's sub-page part). */
  pointer: Deno.PointerObject;
  /** The descriptor the region came with; owned by this region. */
  fd: number;
  /** Start of the whole mapping (page aligned), for munmap. */
  mapBase: Deno.PointerObject;
  /** Length of the whole mapping in bytes. */
  mapLength: number;
  /** The file is sealed against shrinking (F_SEAL_SHRINK): the front-end cannot make a page SIGBUS. */
  shrinkSealed: boolean;
}

/** Whether `fd`'s file carries F_SEAL_SHRINK (false for a file that cannot be sealed). */
export function sealedAgainstShrinking(fd: number): boolean {
  try {
    return (libc.fcntl(fd, libc.F_GET_SEALS) & libc.F_SEAL_SHRINK) !== 0;
  } catch {
    return false; // EINVAL: not a file that takes seals (hugetlbfs, a regular file)
  }
}

/**
 * Maps `desc.size` bytes of `fd` from `desc.mmapOffset`, shared and writable.
 * Takes ownership of `fd`: on success the region holds it, on failure it is closed.
 * @throws ProtocolError when the file is not a regular file or is too small,
 *   SyscallError when fstat or mmap fail.
 */
export function mapRegion(desc: MemoryRegionDesc, fd: number): MappedRegion {
  try {
    const st = libc.fstat(fd);
    if ((st.mode & libc.S_IFMT) !== libc.S_IFREG) {
      throw new ProtocolError(
        `Memory region ${describeRegion(desc)}: fd ${fd} is not a regular file (mode 0o${
          st.mode.toString(8)
        })`,
      );
    }
    checkRegionWithinFile(desc, BigInt(st.size), `Memory region fd ${fd}`);
    const alignedOffset = desc.mmapOffset - (desc.mmapOffset % PAGE_SIZE);
    const delta = desc.mmapOffset - alignedOffset;
    // Within the file's size, so below 2^53.
    const mapLength = Number(desc.size + delta);
    const mapBase = libc.mmap(
      mapLength,
      libc.PROT_READ | libc.PROT_WRITE,
      libc.MAP_SHARED | libc.MAP_NORESERVE,
      fd,
      alignedOffset,
    );
    const pointer = Deno.UnsafePointer.offset(mapBase, Number(delta));
    if (pointer === null) throw new Error("mmap returned a mapping at address 0");
    return { ...desc, pointer, fd, mapBase, mapLength, shrinkSealed: sealedAgainstShrinking(fd) };
  } catch (e) {
    libc.closeQuietly(fd);
    throw e;
  }
}

/**
 * Maps a dirty log bitmap (VHOST_USER_SET_LOG_BASE) as a region: `mmapSize`
 * bytes of `fd` from `mmapOffset`, shared and writable, after the same check
 * of the file's size (a bitmap past the end of its file would SIGBUS the
 * first worker that marks a page there). The region's guest address is 0:
 * the bitmap is not guest memory, only released like it. Takes ownership of `fd`.
 * @throws ProtocolError naming the log when the file is too small or not a file.
 */
export function mapLog(desc: LogDesc, fd: number): MappedRegion {
  try {
    return mapRegion({
      guestPhysAddr: 0n,
      size: desc.mmapSize,
      userAddr: 0n,
      mmapOffset: desc.mmapOffset,
    }, fd);
  } catch (e) {
    if (!(e instanceof ProtocolError)) throw e;
    throw new ProtocolError(
      `SET_LOG_BASE: the log (0x${desc.mmapSize.toString(16)} bytes at offset 0x${
        desc.mmapOffset.toString(16)
      }) does not fit its file: ${e.message}`,
    );
  }
}

/** Unmaps the region and closes its descriptor. Errors are returned, not thrown. */
export function unmapRegion(region: MappedRegion): Error | null {
  return release(region, () => libc.munmap(region.mapBase, region.mapLength));
}

/**
 * Releases the guest's memory without freeing the address range: maps private
 * anonymous zero pages over the whole mapping (MAP_FIXED, so the range is
 * never without a mapping) and closes the descriptor. A stale ArrayBuffer view
 * then reads zeros instead of killing the process with SIGSEGV, and a stale
 * system call writes into pages nobody reads, since nothing else can be
 * mapped there. The range (address space, no memory until touched) is never
 * given back. Errors are returned, not thrown.
 */
export function retireRegion(region: MappedRegion): Error | null {
  return release(region, () =>
    libc.mmap(
      region.mapLength,
      libc.PROT_READ | libc.PROT_WRITE,
      libc.MAP_PRIVATE | libc.MAP_ANONYMOUS | libc.MAP_FIXED | libc.MAP_NORESERVE,
      -1,
      0n,
      region.mapBase,
    ));
}

/** Runs `dropMapping`, then closes the region's fd whatever happened; the first error is returned. */
function release(region: MappedRegion, dropMapping: () => unknown): Error | null {
  let error: Error | null = null;
  try {
    dropMapping();
  } catch (e) {
    error = e as Error;
  }
  const closeError = libc.closeQuietly(region.fd);
  return error ?? closeError;
}
