/**
 * A small HTTP/1.1 server on a unix socket, for the operator's endpoints
 * (`--metrics`: `GET /metrics`, and the routes of `control_api.ts`), served
 * through libc from the parent's main thread: no Deno net permission, and a
 * socket bound during set-up like the vhost-user one.
 *
 * ## Theory of operation
 *
 * Whoever can connect to the socket is untrusted here in one respect: a slow
 * or hostile client must not stall the vhost-user socket, which the same
 * thread serves, nor the data path (whose workers never wait for the main
 * thread). So:
 *
 * - One loop serves every client: a single `poll` over the listening socket
 *   and the clients, run on a pool thread (`poll_async`), at most
 *   `pollIntervalMs` long so that `stop()` and the deadlines are noticed.
 *   Every descriptor is non-blocking; reads and writes never wait.
 * - One request per connection (`Connection: close`), at most
 *   `maxRequestBytes` (8 KiB: request line, headers and body), and at most
 *   `requestTimeoutMs` (2 s) from accept to the last byte of the response:
 *   a client that sends nothing, or never reads, is closed then.
 * - At most `maxClients` (8) at once. Beyond that the listening socket is not
 *   polled, so further clients wait in its backlog (which the kernel bounds)
 *   until a slot frees, at the latest when the oldest client's time is up.
 * - A malformed request gets `400 Bad Request` (431 when its head is too
 *   long, 413 when its body is, 501 for a `Transfer-Encoding`) and the
 *   connection is closed; nothing the client sends reaches a handler unless
 *   it parsed as a request whose route exists.
 * - Descriptors a client sends with SCM_RIGHTS are never received: requests
 *   are read with read(2), and the kernel closes what it cannot deliver.
 * - Before a connection is closed, what the client sent past its request is
 *   read and dropped (a bounded amount), so that the close does not reset
 *   the connection under a response the client has not read yet.
 *
 * Routes are a table (`Route[]`): method, path and handler; an unknown path
 * is 404, a known path with another method 405 with `Allow`.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import type { Logger } from "./log.ts";
import { removeStaleSocket, sendWithFds, sockaddrUn } from "./vhost_user_socket.ts";

/** A parsed request. Header names are lower case; the target is not percent-decoded. */
export interface HttpRequest {
  method: string;
  /** The request target as sent (origin form, or the path of an absolute form). */
  target: string;
  /** The target's path, before any `?`. */
  path: string;
  /** What follows `?` in the target ("" when nothing does). */
  query: string;
  /** "1.0" or "1.1". */
  version: string;
  headers: Map<string, string>;
  body: Uint8Array;
}

/** A response: status, optional headers, body (a string is sent as UTF-8). */
export interface HttpResponse {
  status: number;
  /** Content-Type (default `text/plain; charset=utf-8`). */
  contentType?: string;
  /** More headers; Content-Length and Connection are set by the server. */
  headers?: Record<string, string>;
  body: string | Uint8Array;
}

/** One route: requests with this method and exactly this path go to `handle`. */
export interface Route {
  method: string;
  path: string;
  /** Never given anything but a parsed request; may throw (500). */
  handle(request: HttpRequest): HttpResponse | Promise<HttpResponse>;
}

/** Reason phrases of the statuses the server and its routes send. */
export const STATUS_TEXT: Readonly<Record<number, string>> = {
  200: "OK",
  400: "Bad Request",
  404: "Not Found",
  405: "Method Not Allowed",
  409: "Conflict",
  413: "Content Too Large",
  431: "Request Header Fields Too Large",
  500: "Internal Server Error",
  501: "Not Implemented",
  503: "Service Unavailable",
};

/** What {@link parseRequest} made of the bytes so far. */
export type ParseResult =
  | { kind: "incomplete" }
  | { kind: "request"; request: HttpRequest }
  | { kind: "error"; status: number; reason: string };

/** RFC 9110 §5.6.2 token characters. */
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
/** A request line: method, origin-form or absolute-form target, HTTP/1.0 or 1.1 (RFC 9112 §3). */
const REQUEST_LINE = /^(\S+) (\S+) HTTP\/1\.([01])$/;
/** Bytes that may appear in a request head besides CR and LF: visible ASCII, space, tab, obs-text. */
const HEAD_BYTE_OK = (b: number) => b === 0x09 || (b >= 0x20 && b !== 0x7f);

function error(status: number, reason: string): ParseResult {
  return { kind: "error", status, reason };
}

/**
 * Parses one HTTP/1.x request from the start of `bytes` (RFC 9112, strictly:
 * CRLF line ends, no folded headers, no control characters). Returns
 * "incomplete" while more bytes could still make a valid request.
 */
export function parseRequest(bytes: Uint8Array, maxBytes: number): ParseResult {
  let end = -1;
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes[i];
    if (b === 0x0a) {
      // Every LF ends a line and must follow a CR (no bare LF).
      if (i === 0 || bytes[i - 1] !== 0x0d) return error(400, "a line ends without CR");
      if (i >= 3 && bytes[i - 2] === 0x0a && bytes[i - 3] === 0x0d) {
        end = i - 3;
        break;
      }
    } else if (b === 0x0d) {
      if (i + 1 < bytes.length && bytes[i + 1] !== 0x0a) return error(400, "a CR without LF");
    } else if (!HEAD_BYTE_OK(b)) {
      return error(400, `a control byte 0x${b.toString(16).padStart(2, "0")} in the request head`);
    }
  }
  if (end < 0) {
    return bytes.length > maxBytes
      ? error(431, `the request head is longer than ${maxBytes} bytes`)
      : { kind: "incomplete" };
  }
  const lines = String.fromCharCode(...bytes.subarray(0, end)).split("\r\n");
  const m = REQUEST_LINE.exec(lines[0]);
  if (!m || !TOKEN.test(m[1])) return error(400, "not an HTTP/1.x request line");
  const [, method, target, minor] = m;
  let path: string;
  if (target.startsWith("/")) path = target;
  else {
    const abs = /^https?:\/\/[^/?#]+(\/[^#]*)?$/i.exec(target);
    if (!abs) return error(400, "the request target is neither a path nor an absolute URL");
    path = abs[1] ?? "/";
  }
  const q = path.indexOf("?");
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const colon = line.indexOf(":");
    const name = colon > 0 ? line.slice(0, colon) : "";
    if (!TOKEN.test(name)) return error(400, "a header line without a valid name");
    const key = name.toLowerCase();
    const value = line.slice(colon + 1).replace(/^[ \t]+|[ \t]+$/g, "");
    const had = headers.get(key);
    if (had !== undefined && key === "content-length" && had !== value) {
      return error(400, "two different Content-Length headers");
    }
    headers.set(key, had !== undefined && key !== "content-length" ? `${had}, ${value}` : value);
  }
  if (headers.has("transfer-encoding")) {
    return error(501, "Transfer-Encoding is not supported; send Content-Length");
  }
  const lengthText = headers.get("content-length") ?? "0";
  if (!/^\d{1,9}$/.test(lengthText)) return error(400, "Content-Length is not a number");
  const bodyAt = end + 4;
  const length = Number(lengthText);
  if (bodyAt + length > maxBytes) {
    return error(413, `the request is longer than ${maxBytes} bytes`);
  }
  if (bytes.length < bodyAt + length) return { kind: "incomplete" };
  return {
    kind: "request",
    request: {
      method,
      target,
      path: q < 0 ? path : path.slice(0, q),
      query: q < 0 ? "" : path.slice(q + 1),
      version: `1.${minor}`,
      headers,
      body: bytes.slice(bodyAt, bodyAt + length),
    },
  };
}

/** The route for `request`, or the 404/405 response. */
export function route(routes: readonly Route[], request: HttpRequest): Route | HttpResponse {
  const here = routes.filter((r) => r.path === request.path);
  const hit = here.find((r) => r.method === request.method);
  if (hit) return hit;
  if (here.length === 0) return { status: 404, body: `no such path: ${request.path}\n` };
  const allow = [...new Set(here.map((r) => r.method))].join(", ");
  return {
    status: 405,
    headers: { Allow: allow },
    body: `${request.path} takes ${allow}, not ${request.method}\n`,
  };
}

/** The bytes of `response`, with Content-Length and `Connection: close`. */
export function formatResponse(response: HttpResponse): Uint8Array<ArrayBuffer> {
  const body = typeof response.body === "string"
    ? new TextEncoder().encode(response.body)
    : response.body;
  const head = [
    `HTTP/1.1 ${response.status} ${STATUS_TEXT[response.status] ?? "Unknown"}`,
    `Content-Type: ${response.contentType ?? "text/plain; charset=utf-8"}`,
    `Content-Length: ${body.byteLength}`,
    "Connection: close",
    ...Object.entries(response.headers ?? {}).map(([k, v]) => `${k}: ${v}`),
    "",
    "",
  ].join("\r\n");
  const out = new Uint8Array(head.length + body.byteLength);
  out.set(new TextEncoder().encode(head));
  out.set(body, head.length);
  return out;
}

/** Bounds and timing; the defaults are the ones the module comment names. */
export interface HttpServerOptions {
  routes: readonly Route[];
  logger?: Logger;
  /** The log's source name (default "http"). */
  label?: string;
  /** Largest request, head and body (default 8192). */
  maxRequestBytes?: number;
  /** From accept to the response's last byte (default 2000 ms). */
  requestTimeoutMs?: number;
  /** Clients served at once; more wait in the backlog (default 8). */
  maxClients?: number;
  /** Longest single poll (default 100 ms). */
  pollIntervalMs?: number;
}

interface Client {
  fd: number;
  deadline: number;
  buf: Uint8Array<ArrayBuffer>;
  have: number;
  state: "reading" | "handling" | "writing" | "closed";
  out: Uint8Array<ArrayBuffer> | null;
  sent: number;
}

/** An HTTP server on a listening unix socket (see the module comment). */
export class HttpServer {
  /** The socket path this server created, or null (an inherited descriptor). */
  readonly path: string | null;
  /** Resolves once stopped: every client closed, the socket closed and removed. */
  readonly done: Promise<void>;
  /** Responses sent, by status. */
  readonly responses = new Map<number, number>();
  /** Connections accepted, and those closed because their time was up. */
  accepted = 0;
  timedOut = 0;
  readonly #listenFd: number;
  readonly #clients = new Set<Client>();
  readonly #routes: readonly Route[];
  readonly #logger?: Logger;
  readonly #label: string;
  readonly #maxBytes: number;
  readonly #timeoutMs: number;
  readonly #maxClients: number;
  readonly #pollMs: number;
  #pathIno: bigint | null = null;
  #stopping = false;
  #acceptPausedUntil = 0;

  private constructor(listenFd: number, path: string | null, opts: HttpServerOptions) {
    this.#listenFd = listenFd;
    this.path = path;
    this.#routes = opts.routes;
    this.#logger = opts.logger;
    this.#label = opts.label ?? "http";
    this.#maxBytes = opts.maxRequestBytes ?? 8192;
    this.#timeoutMs = opts.requestTimeoutMs ?? 2000;
    this.#maxClients = opts.maxClients ?? 8;
    this.#pollMs = opts.pollIntervalMs ?? 100;
    if (path !== null) this.#pathIno = libc.lstat(path)?.ino ?? null;
    this.done = this.#loop();
  }

  /**
   * Listens at `path`. A stale socket there (nobody accepts on it) is
   * replaced; a live one, or anything that is not a socket, is an error.
   */
  static listen(path: string, opts: HttpServerOptions): HttpServer {
    const addr = sockaddrUn(path);
    removeStaleSocket(path, addr);
    const fd = libc.socket(
      libc.AF_UNIX,
      libc.SOCK_STREAM | libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC,
    );
    try {
      libc.bind(fd, addr);
      libc.listen(fd, 16);
      return new HttpServer(fd, path, opts);
    } catch (e) {
      libc.closeQuietly(fd);
      throw e;
    }
  }

  /** Clients being served now. */
  get clients(): number {
    return this.#clients.size;
  }

  /** Stops: closes every client, the socket, and removes the socket file it created. */
  async stop(): Promise<void> {
    this.#stopping = true;
    await this.done;
  }

  async #loop(): Promise<void> {
    try {
      while (!this.#stopping) {
        const now = Date.now();
        let next = now + this.#pollMs;
        for (const c of this.#clients) {
          if (now >= c.deadline) {
            this.timedOut++;
            this.#logger?.log("debug", this.#label, `closed a client after ${this.#timeoutMs} ms`);
            this.#close(c);
          } else next = Math.min(next, c.deadline);
        }
        const watched: (Client | null)[] = [];
        if (this.#clients.size < this.#maxClients && now >= this.#acceptPausedUntil) {
          watched.push(null);
        }
        for (const c of this.#clients) if (c.state !== "handling") watched.push(c);
        // struct pollfd[]: i32 fd, i16 events, i16 revents. Kept alive by this
        // frame while the poll runs on a pool thread.
        const fds = new Int16Array(4 * Math.max(1, watched.length));
        const words = new Int32Array(fds.buffer);
        watched.forEach((c, i) => {
          words[2 * i] = c === null ? this.#listenFd : c.fd;
          fds[4 * i + 2] = c?.state === "writing" ? libc.POLLOUT : libc.POLLIN;
        });
        const bytes = new Uint8Array(fds.buffer);
        const wait = Math.max(0, Math.min(this.#pollMs, next - now));
        const n = watched.length === 0
          ? (await new Promise((r) => setTimeout(r, wait)), 0)
          : await libc.sys.poll_async(bytes, BigInt(watched.length), wait);
        if (n <= 0 || this.#stopping) continue; // timeout, or EINTR (its errno is lost)
        watched.forEach((c, i) => {
          const revents = fds[4 * i + 3];
          if (revents === 0) return;
          if (c === null) this.#accept();
          else if (c.state === "reading") this.#read(c);
          else if (c.state === "writing") this.#flush(c);
        });
      }
    } finally {
      for (const c of this.#clients) this.#close(c);
      libc.closeQuietly(this.#listenFd);
      this.#removePath();
    }
  }

  #accept(): void {
    while (this.#clients.size < this.#maxClients) {
      let fd: number;
      try {
        fd = libc.accept4(this.#listenFd, libc.SOCK_NONBLOCK | libc.SOCK_CLOEXEC);
      } catch (e) {
        if (e instanceof libc.SyscallError && e.errno === libc.Errno.EAGAIN) return;
        // EMFILE and the like: the socket stays readable; look again in a second.
        this.#acceptPausedUntil = Date.now() + 1000;
        this.#logger?.log("warn", this.#label, `accept failed: ${(e as Error).message}`);
        return;
      }
      this.accepted++;
      this.#clients.add({
        fd,
        deadline: Date.now() + this.#timeoutMs,
        buf: new Uint8Array(this.#maxBytes + 1),
        have: 0,
        state: "reading",
        out: null,
        sent: 0,
      });
    }
  }

  #read(c: Client): void {
    while (c.state === "reading") {
      let n: number;
      try {
        n = libc.read(c.fd, c.buf.subarray(c.have));
      } catch (e) {
        if (e instanceof libc.SyscallError && e.errno === libc.Errno.EAGAIN) return;
        this.#close(c);
        return;
      }
      if (n === 0) {
        // The client ended before a whole request: nobody to answer.
        this.#close(c);
        return;
      }
      c.have += n;
      const parsed = parseRequest(c.buf.subarray(0, c.have), this.#maxBytes);
      if (parsed.kind === "incomplete") continue;
      if (parsed.kind === "error") {
        this.#logger?.log("debug", this.#label, `refused a request: ${parsed.reason}`);
        this.#respond(c, { status: parsed.status, body: `${parsed.reason}\n` });
        return;
      }
      this.#dispatch(c, parsed.request);
    }
  }

  #dispatch(c: Client, request: HttpRequest): void {
    c.state = "handling";
    const target = route(this.#routes, request);
    const result = "handle" in target
      ? Promise.resolve().then(() => target.handle(request))
      : Promise.resolve(target);
    result.then(
      (response) => this.#respond(c, response),
      (e) => {
        this.#logger?.log(
          "warn",
          this.#label,
          `${request.method} ${request.path} failed: ${(e as Error).message}`,
        );
        this.#respond(c, { status: 500, body: "internal error\n" });
      },
    );
  }

  #respond(c: Client, response: HttpResponse): void {
    if (c.state === "closed") return;
    this.responses.set(response.status, (this.responses.get(response.status) ?? 0) + 1);
    c.out = formatResponse(response);
    c.sent = 0;
    c.state = "writing";
    this.#flush(c);
  }

  #flush(c: Client): void {
    const out = c.out!;
    while (c.sent < out.byteLength) {
      let n: number | null;
      try {
        n = sendWithFds(c.fd, out.subarray(c.sent));
      } catch {
        this.#close(c); // EPIPE, ECONNRESET: the client is gone
        return;
      }
      if (n === null) return; // full: poll for POLLOUT
      c.sent += n;
    }
    this.#drain(c);
    this.#close(c);
  }

  /**
   * Reads and drops what the client sent beyond its request (the rest of a
   * refused one, say), up to the buffer's size: a unix socket closed with
   * unread data makes the peer's next read fail with ECONNRESET, which some
   * clients report instead of the response they already have.
   */
  #drain(c: Client): void {
    for (let left = 4; left > 0; left--) {
      try {
        if (libc.read(c.fd, c.buf) === 0) return;
      } catch {
        return; // EAGAIN: nothing more queued
      }
    }
  }

  #close(c: Client): void {
    if (c.state === "closed") return;
    c.state = "closed";
    this.#clients.delete(c);
    libc.closeQuietly(c.fd);
  }

  #removePath(): void {
    if (this.path === null) return;
    try {
      // Only our own socket: someone may have replaced it since.
      if (libc.lstat(this.path)?.ino === this.#pathIno) libc.unlink(this.path);
    } catch (e) {
      if (!(e instanceof libc.SyscallError && e.errno === libc.Errno.ENOENT)) {
        this.#logger?.log(
          "warn",
          this.#label,
          `cannot remove ${this.path}: ${(e as Error).message}; the next start replaces it`,
        );
      }
    }
  }
}
