/**
 * A vhost-user front-end that plays QEMU for tests: it connects to (or is
 * connected from) a back-end, sends requests with descriptors in SCM_RIGHTS,
 * and reads and checks replies. It also makes the memfds and eventfds a VMM
 * would pass. Uses the project's libc wrappers and the transport's
 * sendmsg/recvmsg helpers; nothing here is trusted by the code under test.
 *
 * @module
 */

import * as libc from "../../../parent/host/libc.ts";
import { recvWithFds, sendWithFds, sockaddrUn } from "../../../parent/control/vhost_user_socket.ts";
import {
  encodeVringState,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_HDR_SIZE,
} from "../../../parent/control/vhost_user_messages.ts";
import { decodeReplyHeader, encodeRequest } from "./vhost_user_encode.ts";

/** A reply: its payload, and any descriptors that came with it. */
export interface Reply {
  payload: Uint8Array;
  fds: number[];
}

export class TestFrontend {
  readonly fd: number;
  #closed = false;

  constructor(fd: number) {
    this.fd = fd;
  }

  /** Connects to a back-end listening at `path`. */
  static connect(path: string): TestFrontend {
    const fd = libc.socket(
      libc.AF_UNIX,
      libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC,
    );
    try {
      libc.connect(fd, sockaddrUn(path));
    } catch (e) {
      libc.close(fd);
      throw e;
    }
    return new TestFrontend(fd);
  }

  /** Sends raw bytes (a whole message, or a deliberately broken one) with `fds`. */
  async sendRaw(bytes: Uint8Array, fds: readonly number[] = []): Promise<void> {
    const data = new Uint8Array(bytes);
    let sent = 0;
    let pending = fds;
    const deadline = Date.now() + 5000;
    while (sent < data.byteLength) {
      const n = sendWithFds(this.fd, data.subarray(sent), pending);
      if (n === null) {
        if (Date.now() > deadline) throw new Error("back-end does not read");
        await libc.pollOneAsync(this.fd, libc.POLLOUT, 100);
        continue;
      }
      pending = [];
      sent += n;
    }
  }

  /** Sends a request (version 1; need_reply when asked). */
  send(
    request: number,
    payload?: Uint8Array,
    options: { fds?: number[]; needReply?: boolean } = {},
  ): Promise<void> {
    return this.sendRaw(encodeRequest(request, payload, options.needReply), options.fds);
  }

  /** Reads exactly `n` bytes; null if the back-end closed the connection first. */
  async #read(n: number, fds: number[], timeoutMs: number): Promise<Uint8Array | null> {
    const buf = new Uint8Array(n);
    let have = 0;
    const deadline = Date.now() + timeoutMs;
    while (have < n) {
      const r = recvWithFds(this.fd, buf.subarray(have));
      if (r === null) {
        if (Date.now() > deadline) throw new Error(`no reply within ${timeoutMs} ms`);
        await libc.pollOneAsync(this.fd, libc.POLLIN, 50);
        continue;
      }
      fds.push(...r.fds);
      if (r.bytes === 0) return null;
      have += r.bytes;
    }
    return buf;
  }

  /** Reads the reply to `request` and checks its header. */
  async reply(request: number, timeoutMs = 5000): Promise<Reply> {
    const fds: number[] = [];
    const header = await this.#read(VHOST_USER_HDR_SIZE, fds, timeoutMs);
    if (header === null) throw new Error(`connection closed instead of a reply to ${request}`);
    const h = decodeReplyHeader(header, request);
    const payload = h.size === 0 ? new Uint8Array(0) : await this.#read(h.size, fds, timeoutMs);
    if (payload === null) throw new Error("connection closed in the middle of a reply");
    return { payload, fds };
  }

  /** Reads a u64 reply (GET_* or a REPLY_ACK). */
  async replyU64(request: number): Promise<bigint> {
    const { payload } = await this.reply(request);
    if (payload.byteLength !== 8) throw new Error(`u64 reply has ${payload.byteLength} bytes`);
    return new DataView(payload.buffer).getBigUint64(0, true);
  }

  /** Sends a request and reads its u64 reply. */
  async requestU64(
    request: number,
    payload?: Uint8Array,
    options: { fds?: number[]; needReply?: boolean } = {},
  ): Promise<bigint> {
    await this.send(request, payload, options);
    return await this.replyU64(request);
  }

  /** GET_VRING_BASE and its vring-state reply. */
  async getVringBase(index: number): Promise<number> {
    await this.send(VHOST_USER_GET_VRING_BASE, encodeVringState(index, 0));
    const { payload } = await this.reply(VHOST_USER_GET_VRING_BASE);
    const v = new DataView(payload.buffer);
    if (v.getUint32(0, true) !== index) throw new Error("GET_VRING_BASE reply for another ring");
    return v.getUint32(4, true);
  }

  /**
   * Waits until the back-end closes the connection, discarding anything it
   * sends (for example a failure REPLY_ACK). Throws after `timeoutMs`.
   */
  async expectClosed(timeoutMs = 5000): Promise<void> {
    const fds: number[] = [];
    const deadline = Date.now() + timeoutMs;
    const sink = new Uint8Array(256);
    while (Date.now() < deadline) {
      let r;
      try {
        r = recvWithFds(this.fd, sink);
      } catch (e) {
        // Closed with our bytes unread: the kernel resets the connection.
        if (e instanceof libc.SyscallError && e.errno === libc.Errno.ECONNRESET) return;
        throw e;
      }
      if (r !== null) {
        fds.push(...r.fds);
        if (r.bytes === 0) {
          for (const f of fds) libc.close(f);
          return;
        }
        continue;
      }
      await libc.pollOneAsync(this.fd, libc.POLLIN, 50);
    }
    throw new Error(`back-end kept the connection open for ${timeoutMs} ms`);
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    libc.close(this.fd);
  }
}

/** A listening socket at `path`, for tests where the back-end is the client. */
export class TestListener {
  readonly fd: number;
  constructor(readonly path: string) {
    this.fd = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
    libc.bind(this.fd, sockaddrUn(path));
    libc.listen(this.fd, 4);
  }

  /** Waits for the back-end to connect. */
  async accept(timeoutMs = 5000): Promise<TestFrontend> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      const revents = await libc.pollOneAsync(this.fd, libc.POLLIN, 50);
      if ((revents & libc.POLLIN) === 0) continue;
      return new TestFrontend(libc.accept4(this.fd, libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC));
    }
    throw new Error(`no connection within ${timeoutMs} ms`);
  }

  close(): void {
    libc.close(this.fd);
    try {
      Deno.removeSync(this.path);
    } catch {
      // already gone
    }
  }
}

/** A memfd of `size` bytes named `vhost-test` (findable in /proc/self/fd). */
export function makeMemfd(size: number, name = "vhost-test"): number {
  const fd = libc.memfdCreate(name, libc.MFD_CLOEXEC);
  libc.ftruncate(fd, size);
  return fd;
}

/** Writes `bytes` into `fd` at `offset`. */
export function writeAt(fd: number, offset: number, bytes: Uint8Array): void {
  libc.lseek(fd, offset, libc.SEEK_SET);
  if (libc.write(fd, bytes) !== bytes.byteLength) throw new Error("short write");
}

/** Reads `length` bytes of `fd` at `offset`. */
export function readAt(fd: number, offset: number, length: number): Uint8Array {
  libc.lseek(fd, offset, libc.SEEK_SET);
  const out = new Uint8Array(length);
  if (libc.read(fd, out) !== length) throw new Error("short read");
  return out;
}

/** Reads an eventfd's counter (0 when nothing was signalled; it must be non-blocking). */
export function readEventfd(fd: number): bigint {
  const buf = new Uint8Array(8);
  try {
    libc.read(fd, buf);
  } catch (e) {
    if (e instanceof libc.SyscallError && e.errno === libc.Errno.EAGAIN) return 0n;
    throw e;
  }
  return new DataView(buf.buffer).getBigUint64(0, true);
}

/** Descriptors of this process whose /proc/self/fd link contains `needle`. */
export function openFdsMatching(needle: string): number[] {
  const out: number[] = [];
  for (const entry of Deno.readDirSync("/proc/self/fd")) {
    try {
      if (Deno.readLinkSync(`/proc/self/fd/${entry.name}`).includes(needle)) {
        out.push(Number(entry.name));
      }
    } catch {
      // closed while listing
    }
  }
  return out;
}
