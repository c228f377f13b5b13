/**
 * The vhost-user transport: a SOCK_STREAM unix socket to the VMM, carrying
 * messages with file descriptors in SCM_RIGHTS ancillary data.
 *
 * Three ways to get a connection (vhost-user.rst "Backend program conventions"):
 * - {@link VhostUserServer.listen}: listen at `--socket-path` (a stale socket
 *   there is removed; anything else that is not a socket is left alone);
 * - {@link VhostUserServer.fromFd}: `--fd N`, an inherited listening socket
 *   (or an already connected one, served once);
 * - {@link VhostUserClient.connect}: connect to a VMM that listens, and
 *   reconnect with backoff after each disconnect.
 *
 * One connection at a time. A second connection while one is active is
 * accepted and closed at once, with a warning. Each connection gets a fresh
 * {@link VhostUserBackend}; when the connection ends, for whatever reason, the
 * backend is closed, which releases every mapping and descriptor. A bad message
 * ends its connection, never the daemon.
 *
 * Nothing here blocks the event loop for long: every wait is a `poll` run on
 * another thread (`libc.pollOneAsync`) with a short timeout, so the loops
 * notice `stop()`, except the first millisecond after a reply, when the next
 * message is waited for on this thread ({@link FOLLOW_UP_WAIT_MS}); the reads
 * and writes themselves are non-blocking. vhost-user control traffic is a few
 * hundred small messages per connection.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import { mapLog, mapRegion, unmapRegion } from "./guest_memory_map.ts";
import { retiredMemory } from "./retired_memory.ts";
import {
  type BackendLogger,
  type BackendSystem,
  type DevicePort,
  VhostUserBackend,
  type VhostUserBackendOptions,
} from "./vhost_user_backend.ts";
import {
  decodeHeader,
  describeRegion,
  ProtocolError,
  requestName,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_FDS,
  type VhostUserHeader,
} from "./vhost_user_messages.ts";

/** msg_flags: control data was truncated (descriptors were dropped). Linux value. */
const MSG_CTRUNC = 0x8;
/** getsockopt(SOL_SOCKET, SO_ACCEPTCONN): the socket is listening. Linux value. */
const SO_ACCEPTCONN = 30;
/** getsockopt(SOL_SOCKET, SO_TYPE). Linux value. */
const SO_TYPE = 3;

// ---------------------------------------------------------------------------
// sendmsg/recvmsg with SCM_RIGHTS (x86-64 layouts).
//
// struct msghdr (56 bytes): name @0, namelen @8 (u32), iov @16, iovlen @24,
//   control @32, controllen @40, flags @48 (i32).
// struct iovec (16 bytes): base @0, len @8.
// struct cmsghdr: len @0 (u64), level @8 (i32), type @12 (i32), data @16.

const MSGHDR_SIZE = 56;
const CMSG_HDR_SIZE = 16;

function align8(n: number): number {
  return (n + 7) & ~7;
}

function addressOf(buf: Uint8Array<ArrayBuffer>): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf)));
}

/** Received bytes and descriptors. */
export interface Received {
  /** Bytes read; 0 means the peer closed the connection. */
  bytes: number;
  fds: number[];
}

/**
 * One non-blocking recvmsg(2) into `into`, collecting SCM_RIGHTS descriptors
 * (close-on-exec). More descriptors than `maxFds` (the kernel drops them and
 * sets MSG_CTRUNC) is a ProtocolError, after closing the ones that did arrive.
 * Returns null when nothing is ready (EAGAIN).
 */
export function recvWithFds(
  fd: number,
  into: Uint8Array<ArrayBuffer>,
  maxFds = VHOST_USER_MAX_FDS,
): Received | null {
  // The msghdr holds raw addresses of iov, into and control: all three stay
  // referenced by this frame until recvmsg returns.
  const control = new Uint8Array(CMSG_HDR_SIZE + align8(4 * maxFds));
  const iov = new Uint8Array(16);
  const iovView = new DataView(iov.buffer);
  iovView.setBigUint64(0, addressOf(into), true);
  iovView.setBigUint64(8, BigInt(into.byteLength), true);
  const msghdr = new Uint8Array(MSGHDR_SIZE);
  const mv = new DataView(msghdr.buffer);
  mv.setBigUint64(16, addressOf(iov), true);
  mv.setBigUint64(24, 1n, true);
  mv.setBigUint64(32, addressOf(control), true);
  mv.setBigUint64(40, BigInt(control.byteLength), true);
  let n: number;
  try {
    n = libc.recvmsg(fd, msghdr, libc.MSG_DONTWAIT | libc.MSG_CMSG_CLOEXEC);
  } catch (e) {
    if (e instanceof libc.SyscallError && e.errno === libc.Errno.EAGAIN) return null;
    throw e;
  }
  const fds = parseRights(control, Number(mv.getBigUint64(40, true)));
  if ((mv.getInt32(48, true) & MSG_CTRUNC) !== 0) {
    for (const f of fds) closeQuietly(f);
    throw new ProtocolError(
      `A message came with more than ${maxFds} file descriptors (the rest were dropped)`,
    );
  }
  return { bytes: n, fds };
}

function parseRights(control: Uint8Array<ArrayBuffer>, length: number): number[] {
  const fds: number[] = [];
  const v = new DataView(control.buffer);
  let at = 0;
  while (at + CMSG_HDR_SIZE <= length) {
    const len = Number(v.getBigUint64(at, true));
    if (len < CMSG_HDR_SIZE || at + len > length) break;
    if (
      v.getInt32(at + 8, true) === libc.SOL_SOCKET && v.getInt32(at + 12, true) === libc.SCM_RIGHTS
    ) {
      for (let p = at + CMSG_HDR_SIZE; p + 4 <= at + len; p += 4) fds.push(v.getInt32(p, true));
    }
    at += align8(len);
  }
  return fds;
}

/**
 * One sendmsg(2) of `bytes` with `fds` as SCM_RIGHTS (none if empty), with
 * MSG_NOSIGNAL. Returns the bytes sent, or null when the socket is full (EAGAIN).
 */
export function sendWithFds(
  fd: number,
  bytes: Uint8Array<ArrayBuffer>,
  fds: readonly number[] = [],
): number | null {
  const iov = new Uint8Array(16);
  const iovView = new DataView(iov.buffer);
  iovView.setBigUint64(0, addressOf(bytes), true);
  iovView.setBigUint64(8, BigInt(bytes.byteLength), true);
  const msghdr = new Uint8Array(MSGHDR_SIZE);
  const mv = new DataView(msghdr.buffer);
  mv.setBigUint64(16, addressOf(iov), true);
  mv.setBigUint64(24, 1n, true);
  // Kept referenced by this frame until sendmsg returns.
  let control: Uint8Array<ArrayBuffer> | null = null;
  if (fds.length > 0) {
    const len = CMSG_HDR_SIZE + 4 * fds.length;
    control = new Uint8Array(align8(len));
    const cv = new DataView(control.buffer);
    cv.setBigUint64(0, BigInt(len), true);
    cv.setInt32(8, libc.SOL_SOCKET, true);
    cv.setInt32(12, libc.SCM_RIGHTS, true);
    fds.forEach((f, i) => cv.setInt32(CMSG_HDR_SIZE + 4 * i, f, true));
    mv.setBigUint64(32, addressOf(control), true);
    mv.setBigUint64(40, BigInt(control.byteLength), true);
  }
  try {
    return libc.sendmsg(fd, msghdr, libc.MSG_DONTWAIT | libc.MSG_NOSIGNAL);
  } catch (e) {
    if (e instanceof libc.SyscallError && e.errno === libc.Errno.EAGAIN) return null;
    throw e;
  }
}

/** struct sockaddr_un for `path` (family u16, then the NUL-terminated path). */
export function sockaddrUn(path: string): Uint8Array<ArrayBuffer> {
  const bytes = new TextEncoder().encode(path);
  // sun_path is 108 bytes, NUL included.
  if (bytes.byteLength === 0 || bytes.byteLength > 107 || bytes.includes(0)) {
    throw new RangeError(`Unix socket path must be 1 to 107 bytes without NUL: ${path}`);
  }
  const out = new Uint8Array(2 + bytes.byteLength + 1);
  new DataView(out.buffer).setUint16(0, libc.AF_UNIX, true);
  out.set(bytes, 2);
  return out;
}

/** close(2), errors ignored: the descriptor is being let go of. */
function closeQuietly(fd: number): void {
  libc.closeQuietly(fd);
}

// ---------------------------------------------------------------------------
// The system calls the backend needs, done with libc.

/** {@link BackendSystem} over libc: mmap with the fstat check, eventfd signalling. */
export const LIBC_BACKEND_SYSTEM: BackendSystem = {
  mapRegion,
  mapLog,
  unmapRegion(region) {
    const error = unmapRegion(region);
    if (error !== null) throw error;
  },
  retireRegion(region) {
    const error = retiredMemory.retire(region, describeRegion(region));
    if (error !== null) throw error;
  },
  closeFd: closeQuietly,
  fileId(fd) {
    try {
      const st = libc.fstat(fd);
      return `${st.dev}:${st.ino}`;
    } catch {
      return null;
    }
  },
  signalCall(fd) {
    const st = libc.fstat(fd);
    const type = st.mode & libc.S_IFMT;
    // An eventfd is an anonymous inode (no type bits); QEMU falls back to pipes.
    if (type !== 0 && type !== libc.S_IFIFO) {
      throw new Error(`fd ${fd} is neither an eventfd nor a pipe (mode 0o${st.mode.toString(8)})`);
    }
    // Never block on it: a full pipe must not stall the control path. A pipe
    // with no reader fails with EPIPE (it ends the connection; see
    // libc.eventfdSignal on SIGPIPE).
    libc.setNonBlocking(fd, true);
    if (libc.eventfdSignal(fd)) return;
    const errno = libc.errno();
    // A full counter or pipe is already signalled.
    if (errno !== libc.Errno.EAGAIN) throw new libc.SyscallError("write", errno, `fd ${fd}`);
  },
};

// ---------------------------------------------------------------------------
// One connection.

/** Why a connection ended. */
export interface DisconnectInfo {
  reason: "eof" | "protocol" | "io" | "stopped";
  /** The error for "protocol" and "io". */
  error?: Error;
  /** Messages handled on this connection. */
  messages: number;
}

/**
 * After a reply, how long the connection waits for the next message on this
 * thread, blocking it, before it waits on another (`libc.pollOneAsync`).
 * A front-end that waits for a reply sends its next message a fraction of a
 * millisecond after reading it (QEMU: its second GET_VRING_BASE inside a
 * migration's downtime, 0.27 ms later), and a wait on another thread costs
 * a hand-off of each wake-up back to this one.
 */
export const FOLLOW_UP_WAIT_MS = 1;

/** Timing knobs; the defaults suit QEMU. */
export interface TransportTiming {
  /** poll timeout: how soon a loop notices stop(). Default 100 ms. */
  pollIntervalMs?: number;
  /** Once a message has begun, the rest must arrive within this. Default 5000 ms. */
  messageTimeoutMs?: number;
}

/** A received message: header, payload, and the descriptors that came with it. */
export interface RawMessage {
  header: VhostUserHeader;
  payload: Uint8Array;
  fds: number[];
}

/** Message framing over a connected, non-blocking stream socket. */
export class VhostUserConnection {
  readonly fd: number;
  readonly #pollMs: number;
  readonly #messageMs: number;
  readonly #stopping: () => boolean;
  #closed = false;
  /** A reply went out and no message has begun since (see {@link FOLLOW_UP_WAIT_MS}). */
  #replied = false;

  constructor(fd: number, timing: TransportTiming = {}, stopping: () => boolean = () => false) {
    this.fd = fd;
    this.#pollMs = timing.pollIntervalMs ?? 100;
    this.#messageMs = timing.messageTimeoutMs ?? 5000;
    this.#stopping = stopping;
  }

  /**
   * Reads one message. Returns null at end of stream (or when stopping before
   * a message began). Descriptors are returned to the caller, who owns them;
   * on a thrown error none are left open.
   * @throws ProtocolError for a bad header, a truncated message or too many fds.
   */
  async read(): Promise<RawMessage | null> {
    const headerBytes = new Uint8Array(VHOST_USER_HDR_SIZE);
    const fds: number[] = [];
    try {
      const got = await this.#fill(headerBytes, fds, true);
      if (!got) return null;
      const header = decodeHeader(headerBytes);
      const payload = new Uint8Array(header.size);
      if (header.size > 0 && !await this.#fill(payload, fds, false)) {
        throw new ProtocolError(
          `${requestName(header.request)}: connection closed in the middle of its payload`,
        );
      }
      return { header, payload, fds };
    } catch (e) {
      for (const f of fds) closeQuietly(f);
      throw e;
    }
  }

  /**
   * Reads exactly `buf.byteLength` bytes. False on a clean end before any
   * byte (only allowed when `atBoundary`).
   */
  async #fill(buf: Uint8Array<ArrayBuffer>, fds: number[], atBoundary: boolean): Promise<boolean> {
    let have = 0;
    let deadline = atBoundary ? Infinity : Date.now() + this.#messageMs;
    while (have < buf.byteLength) {
      const r = recvWithFds(this.fd, buf.subarray(have) as Uint8Array<ArrayBuffer>);
      if (r === null) {
        if (atBoundary && have === 0 && this.#stopping()) return false;
        if (this.#replied) {
          // The front-end usually sends its next message as soon as it has read a
          // reply: wait for it here, where the kernel wakes this thread directly.
          this.#replied = false;
          try {
            libc.pollOne(this.fd, libc.POLLIN, FOLLOW_UP_WAIT_MS);
          } catch {
            // A signal (EINTR): the wait on the pool below takes over.
          }
          continue;
        }
        if (Date.now() > deadline) {
          throw new ProtocolError(
            `Message incomplete after ${this.#messageMs} ms (${have} of ${buf.byteLength} bytes)`,
          );
        }
        await libc.pollOneAsync(this.fd, libc.POLLIN, this.#pollMs);
        continue;
      }
      this.#replied = false;
      fds.push(...r.fds);
      if (r.bytes === 0) {
        if (atBoundary && have === 0) return false;
        throw new ProtocolError(`Connection closed in the middle of a message (${have} bytes)`);
      }
      if (have === 0 && atBoundary) deadline = Date.now() + this.#messageMs;
      have += r.bytes;
    }
    return true;
  }

  /** Sends all of `bytes` (and `fds` with the first byte). */
  async write(bytes: Uint8Array, fds: readonly number[] = []): Promise<void> {
    const data = new Uint8Array(bytes); // an owned copy: its address is taken
    let sent = 0;
    let pending = fds;
    const deadline = Date.now() + this.#messageMs;
    while (sent < data.byteLength) {
      const n = sendWithFds(this.fd, data.subarray(sent) as Uint8Array<ArrayBuffer>, pending);
      if (n === null) {
        if (Date.now() > deadline) throw new Error(`Peer did not read for ${this.#messageMs} ms`);
        await libc.pollOneAsync(this.fd, libc.POLLOUT, this.#pollMs);
        continue;
      }
      pending = [];
      sent += n;
    }
    this.#replied = true;
  }

  /** Closes the socket (once). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    closeQuietly(this.fd);
  }
}

/**
 * Serves one connection with one backend until it ends; always closes both.
 * Never throws.
 */
export async function serveConnection(
  conn: VhostUserConnection,
  backend: VhostUserBackend,
  stopping: () => boolean,
  logger?: BackendLogger,
  onEnding?: () => void,
): Promise<DisconnectInfo> {
  let messages = 0;
  let info: DisconnectInfo;
  try {
    for (;;) {
      const msg = await conn.read();
      if (msg === null) {
        info = { reason: stopping() ? "stopped" : "eof", messages };
        break;
      }
      messages++;
      const started = performance.now();
      const result = await backend.handleMessage(msg.header, msg.payload, msg.fds);
      logger?.log(
        "debug",
        "vhost-user",
        `${requestName(msg.header.request)} handled in ${
          (performance.now() - started).toFixed(1)
        } ms`,
      );
      if (!result.ok) {
        // Best effort: the failure REPLY_ACK, then the end of the connection.
        if (result.reply !== null) await conn.write(result.reply).catch(() => {});
        info = { reason: "protocol", error: result.error, messages };
        break;
      }
      if (result.reply !== null) await conn.write(result.reply);
    }
  } catch (e) {
    const error = e instanceof Error ? e : new Error(String(e));
    info = { reason: e instanceof ProtocolError ? "protocol" : "io", error, messages };
  }
  // The rings stop before the front-end sees the socket close: QEMU then
  // reads each used index to resume from (vhost_virtqueue_stop), and a
  // worker still publishing after that would complete chains twice ("id N
  // is not a head" in the guest) once a new back-end takes over.
  onEnding?.();
  await backend.close();
  conn.close();
  const level = info.reason === "protocol" || info.reason === "io" ? "warn" : "info";
  logger?.log(
    level,
    "vhost-user",
    `connection ended (${info.reason}) after ${messages} messages${
      info.error ? `: ${info.error.message}` : ""
    }`,
  );
  return info;
}

// ---------------------------------------------------------------------------
// Server and client.

/** What a server or client needs to serve connections. */
export interface VhostUserServeOptions extends TransportTiming {
  /** The device every connection's backend talks to. */
  device: DevicePort;
  backendOptions?: VhostUserBackendOptions;
  /** The backend's system calls; libc by default (tests may wrap it). */
  system?: BackendSystem;
  logger?: BackendLogger;
  /** Called after each connection has ended and released everything. */
  onDisconnect?: (info: DisconnectInfo) => void;
  /** Called when a second connection was refused because one is active. */
  onRefused?: () => void;
}

/**
 * Logs refused connections without flooding: the first at once, then one
 * line per interval counting the others. A front-end that retries in a
 * tight loop (QEMU's vhost-user init does until it starts) would otherwise
 * push everything else out of the log.
 */
class RefusalLog {
  #unlogged = 0;
  #lastLogged = -Infinity;
  readonly #describeActive: () => string;
  readonly #intervalMs: number;

  constructor(describeActive: () => string, intervalMs = 10_000) {
    this.#describeActive = describeActive;
    this.#intervalMs = intervalMs;
  }

  refused(logger: BackendLogger | undefined): void {
    const now = Date.now();
    if (now - this.#lastLogged < this.#intervalMs) {
      this.#unlogged++;
      return;
    }
    const more = this.#unlogged > 0
      ? `; ${this.#unlogged} more refused in the ${now - this.#lastLogged} ms before`
      : "";
    logger?.log(
      "warn",
      "vhost-user",
      "refusing a second connection: one front-end is already connected " +
        `(${this.#describeActive()})${more}`,
    );
    this.#unlogged = 0;
    this.#lastLogged = now;
  }
}

abstract class Service {
  protected readonly options: VhostUserServeOptions;
  protected stopping = false;
  #active: Promise<DisconnectInfo> | null = null;
  /** The active connection's socket is closed; its backend is releasing resources. */
  #ending = false;
  #activeFd = -1;
  #activeSince = 0;
  #served = 0;
  /** Resolves when the service has stopped (stop(), or a served --fd connection ended). */
  abstract readonly done: Promise<void>;

  constructor(options: VhostUserServeOptions) {
    this.options = options;
  }

  /** The active connection: its descriptor and how long it has been served. */
  protected get activeSummary(): string {
    return `fd ${this.#activeFd}, served for ${Date.now() - this.#activeSince} ms`;
  }

  /** True while a connection is being served. */
  get connected(): boolean {
    return this.#active !== null;
  }

  /** Connections served since the service started (the active one included). */
  get served(): number {
    return this.#served;
  }

  protected serve(fd: number): Promise<DisconnectInfo> {
    const backend = new VhostUserBackend(
      this.options.device,
      this.options.system ?? LIBC_BACKEND_SYSTEM,
      { logger: this.options.logger, ...this.options.backendOptions },
    );
    const conn = new VhostUserConnection(fd, this.options, () => this.stopping);
    this.options.logger?.log("info", "vhost-user", `connection on fd ${fd}`);
    this.#ending = false;
    this.#activeFd = fd;
    this.#activeSince = Date.now();
    this.#served++;
    const active = serveConnection(
      conn,
      backend,
      () => this.stopping,
      this.options.logger,
      () => this.#ending = true,
    )
      .then((info) => {
        this.#active = null;
        this.#ending = false;
        this.options.onDisconnect?.(info);
        return info;
      });
    this.#active = active;
    return active;
  }

  /**
   * True when the active connection's front-end is gone (it hung up, or the
   * connection is releasing its resources) but the backend has not finished.
   */
  protected get activePeerGone(): boolean {
    if (this.#active === null) return false;
    if (this.#ending) return true;
    try {
      return (libc.pollOne(this.#activeFd, libc.POLLIN, 0) & libc.POLLHUP) !== 0;
    } catch {
      return true; // the socket is being closed right now
    }
  }

  protected async waitActive(): Promise<void> {
    if (this.#active !== null) await this.#active;
  }

  /** Stops accepting, ends the active connection (releasing everything) and waits. */
  async stop(): Promise<void> {
    this.stopping = true;
    await this.done;
  }
}

/** Accepts connections from a VMM, one at a time. */
export class VhostUserServer extends Service {
  /** The socket path this server created, or null (--fd). */
  readonly path: string | null;
  readonly done: Promise<void>;
  readonly #listenFd: number | null;
  #pathIno: bigint | null = null;

  private constructor(
    options: VhostUserServeOptions,
    listenFd: number | null,
    connectedFd: number | null,
    path: string | null,
  ) {
    super(options);
    this.path = path;
    this.#listenFd = listenFd;
    if (path !== null) this.#pathIno = libc.lstat(path)?.ino ?? null;
    this.done = listenFd !== null ? this.#acceptLoop(listenFd) : this.#serveOnce(connectedFd!);
  }

  /**
   * Listens at `path` (vhost-user.rst `--socket-path`). A stale socket there
   * (nobody accepts on it) is removed first; a live one, or anything that is
   * not a socket, is an error and is left alone. `beforeListen` runs between
   * bind(2) and listen(2) (the socket's owner and mode); if it throws, the
   * socket is removed and the error passed on.
   */
  static listen(
    path: string,
    options: VhostUserServeOptions,
    beforeListen: (path: string) => void = () => {},
  ): VhostUserServer {
    const addr = sockaddrUn(path);
    removeStaleSocket(path, addr);
    const fd = libc.socket(
      libc.AF_UNIX,
      libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC,
    );
    try {
      libc.bind(fd, addr);
      try {
        // The socket's group and mode: nobody can connect before listen().
        beforeListen(path);
      } catch (e) {
        libc.unlink(path);
        throw e;
      }
      libc.listen(fd, 4);
      return new VhostUserServer(options, fd, null, path);
    } catch (e) {
      closeQuietly(fd);
      throw e;
    }
  }

  /**
   * Serves an inherited socket (vhost-user.rst `--fd`). A listening socket is
   * accepted on like {@link listen}'s; a connected one is served once, and the
   * server is done when it ends.
   */
  static fromFd(fd: number, options: VhostUserServeOptions): VhostUserServer {
    const st = libc.fstat(fd);
    if ((st.mode & libc.S_IFMT) !== libc.S_IFSOCK) {
      throw new Error(`--fd ${fd} is not a socket`);
    }
    if (getIntOption(fd, SO_TYPE) !== libc.SOCK_STREAM) {
      throw new Error(`--fd ${fd} is not a SOCK_STREAM socket`);
    }
    libc.fcntl(fd, libc.F_SETFD, libc.FD_CLOEXEC);
    libc.setNonBlocking(fd, true);
    return getIntOption(fd, SO_ACCEPTCONN) !== 0
      ? new VhostUserServer(options, fd, null, null)
      : new VhostUserServer(options, null, fd, null);
  }

  async #acceptLoop(listenFd: number): Promise<void> {
    const logger = this.options.logger;
    try {
      while (!this.stopping) {
        const revents = await libc.pollOneAsync(
          listenFd,
          libc.POLLIN,
          this.options.pollIntervalMs ?? 100,
        );
        if ((revents & libc.POLLIN) === 0 || this.stopping) continue;
        let fd: number;
        try {
          fd = libc.accept4(listenFd, libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
        } catch (e) {
          // EAGAIN (someone else took it), ECONNABORTED, EMFILE: keep serving.
          logger?.log("warn", "vhost-user", `accept failed: ${(e as Error).message}`);
          continue;
        }
        // A front-end that reconnects at once may find its old connection not
        // yet finished (unread EOF, memory still being released): it waits
        // for that instead of being refused.
        if (this.activePeerGone) await this.waitActive();
        if (this.connected) {
          this.#refusals.refused(logger);
          closeQuietly(fd);
          this.options.onRefused?.();
          continue;
        }
        this.serve(fd);
      }
    } finally {
      await this.waitActive();
      closeQuietly(listenFd);
      this.#removePath();
    }
  }

  readonly #refusals = new RefusalLog(() => this.activeSummary);

  async #serveOnce(fd: number): Promise<void> {
    await this.serve(fd);
  }

  #removePath(): void {
    if (this.path === null) return;
    try {
      // Only our own socket: someone may have replaced it since.
      if (libc.lstat(this.path)?.ino === this.#pathIno) libc.unlink(this.path);
    } catch (e) {
      // Gone already is fine; anything else (the daemon's user may not write
      // the directory) leaves a stale socket, which the next start replaces.
      if (!(e instanceof libc.SyscallError && e.errno === libc.Errno.ENOENT)) {
        this.options.logger?.log(
          "warn",
          "vhost-user",
          `cannot remove ${this.path}: ${(e as Error).message}; the next start replaces it`,
        );
      }
    }
  }

  /** The listening descriptor, or null when serving a connected --fd. */
  get listenFd(): number | null {
    return this.#listenFd;
  }
}

function getIntOption(fd: number, option: number): number {
  const value = new Uint8Array(4);
  libc.getsockopt(fd, libc.SOL_SOCKET, option, value);
  return new DataView(value.buffer).getInt32(0, true);
}

/**
 * Removes a socket file nobody listens on; refuses to touch anything else.
 * Liveness is probed with a connect: a live server sees the probe as a
 * connection that ends at once.
 */
export function removeStaleSocket(path: string, addr: Uint8Array): void {
  const info = libc.lstat(path);
  if (info === null) return;
  if ((info.mode & libc.S_IFMT) !== libc.S_IFSOCK) {
    throw new Error(`Refusing to replace ${path}: it exists and is not a socket`);
  }
  const probe = libc.socket(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  try {
    libc.connect(probe, addr);
  } catch (e) {
    if (e instanceof libc.SyscallError && e.errno === libc.Errno.ECONNREFUSED) {
      libc.unlink(path);
      return;
    }
    throw e;
  } finally {
    closeQuietly(probe);
  }
  throw new Error(`Refusing to replace ${path}: another process is listening on it`);
}

/** Reconnect backoff for client mode. */
export interface Backoff {
  /** First retry delay. Default 100 ms. */
  initialMs?: number;
  /** Longest delay; doubles up to this. Default 5000 ms. */
  maxMs?: number;
}

/** Connects to a VMM that listens (QEMU `server=on`), and reconnects after each disconnect. */
export class VhostUserClient extends Service {
  readonly path: string;
  readonly done: Promise<void>;
  /** Connections made so far. */
  connections = 0;
  readonly #backoff: Required<Backoff>;

  private constructor(path: string, options: VhostUserServeOptions & { backoff?: Backoff }) {
    super(options);
    this.path = path;
    this.#backoff = { initialMs: 100, maxMs: 5000, ...options.backoff };
    this.done = this.#loop();
  }

  /** Starts connecting to `path`; keeps trying until stop(). */
  static connect(
    path: string,
    options: VhostUserServeOptions & { backoff?: Backoff },
  ): VhostUserClient {
    sockaddrUn(path); // validate now, not in the loop
    return new VhostUserClient(path, options);
  }

  async #loop(): Promise<void> {
    const addr = sockaddrUn(this.path);
    let delay = this.#backoff.initialMs;
    let warned = false;
    while (!this.stopping) {
      const fd = libc.socket(
        libc.AF_UNIX,
        libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC,
      );
      try {
        libc.connect(fd, addr);
      } catch (e) {
        closeQuietly(fd);
        // Refused for want of permission: the VMM's socket (and its
        // directory) must be writable by the user the daemon runs as. Said
        // once per streak; a VMM not up yet is only debug.
        const denied = e instanceof libc.SyscallError &&
          (e.errno === libc.Errno.EACCES || e.errno === libc.Errno.EPERM);
        this.options.logger?.log(
          denied && !warned ? "warn" : "debug",
          "vhost-user",
          `connect to ${this.path} failed (${(e as Error).message}); retrying in ${delay} ms` +
            (denied ? "; the socket must be writable by the daemon's user" : ""),
        );
        warned ||= denied;
        await this.#sleep(delay);
        delay = Math.min(delay * 2, this.#backoff.maxMs);
        continue;
      }
      this.connections++;
      warned = false;
      delay = this.#backoff.initialMs;
      await this.serve(fd);
      if (!this.stopping) await this.#sleep(delay);
    }
  }

  /** Sleeps up to `ms`, waking early on stop(). */
  async #sleep(ms: number): Promise<void> {
    const step = this.options.pollIntervalMs ?? 100;
    const end = Date.now() + ms;
    while (!this.stopping && Date.now() < end) {
      await new Promise((r) => setTimeout(r, Math.min(step, end - Date.now())));
    }
  }
}
