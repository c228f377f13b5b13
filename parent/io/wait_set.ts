/**
 * The poller's wait set: an epoll instance over a few descriptors, each under
 * a small tag (0..{@link WAIT_TAGS}-1) that comes back with its events.
 * Registrations persist between waits, so a wait costs one `epoll_wait`
 * instead of `poll()`'s walk over every descriptor, and an edge-triggered
 * eventfd (EPOLLET: one report per write) need not be read at all: a guest
 * kick then costs the poller no `read`.
 *
 * @module
 */

import * as libc from "../host/libc.ts";

/** Tags a wait set takes: 0 .. WAIT_TAGS - 1. */
export const WAIT_TAGS = 4;

const sys = libc.sys;
/** Bytes of one packed struct epoll_event (x86-64): u32 events, u64 data. */
const EVENT_BYTES = 12;

export class WaitSet {
  readonly #ep: number;
  readonly #fd = new Int32Array(WAIT_TAGS).fill(-1);
  readonly #events = new Uint32Array(WAIT_TAGS);
  /** Events of each tag from the last wait (0: none). */
  readonly #ready = new Uint32Array(WAIT_TAGS);
  readonly #ctl = new Uint32Array(EVENT_BYTES / 4);
  readonly #ctlBytes = new Uint8Array(this.#ctl.buffer);
  readonly #out = new Uint32Array((WAIT_TAGS * EVENT_BYTES) / 4);
  readonly #outBytes = new Uint8Array(this.#out.buffer);

  /** @throws SyscallError when the kernel gives no epoll instance. */
  constructor() {
    this.#ep = libc.check(sys.epoll_create1(libc.EPOLL_CLOEXEC), "epoll_create1");
  }

  /**
   * Watches `fd` under `tag` for `events` (EPOLLIN, EPOLLET; 0 keeps it
   * registered but quiet), replacing what the tag watched; -1 watches
   * nothing. A system call only when something changes. Returns false when
   * the kernel refuses `fd` (not pollable, not open): the tag then watches
   * nothing.
   */
  set(tag: number, fd: number, events: number): boolean {
    const old = this.#fd[tag];
    if (old === fd && this.#events[tag] === events) return true;
    if (old === fd && fd >= 0) {
      if (this.#control(libc.EPOLL_CTL_MOD, fd, tag, events)) {
        this.#events[tag] = events;
        return true;
      }
    } else if (old >= 0) {
      this.#control(libc.EPOLL_CTL_DEL, old, tag, 0); // already closed: already gone
    }
    this.#fd[tag] = -1;
    this.#events[tag] = 0;
    if (fd < 0) return true;
    if (!this.#control(libc.EPOLL_CTL_ADD, fd, tag, events)) return false;
    this.#fd[tag] = fd;
    this.#events[tag] = events;
    return true;
  }

  /** The descriptor `tag` watches, or -1. */
  fd(tag: number): number {
    return this.#fd[tag];
  }

  /**
   * Waits up to `timeoutMs` (-1: no limit) for events; afterwards
   * {@link ready} gives each tag's. Returns how many tags have events, or -1
   * (see `libc.errno()`; EINTR is not an error).
   */
  wait(timeoutMs: number): number {
    this.clear();
    const n = sys.epoll_wait(this.#ep, this.#outBytes, WAIT_TAGS, timeoutMs);
    const out = this.#out;
    for (let i = 0; i < n; i++) {
      const tag = out[i * 3 + 1];
      if (tag < WAIT_TAGS) this.#ready[tag] = out[i * 3];
    }
    return n;
  }

  /** The events `tag` had in the last wait (EPOLLIN, EPOLLERR, EPOLLHUP bits). */
  ready(tag: number): number {
    return this.#ready[tag];
  }

  /** Forgets the last wait's events (when a pass skips the wait). */
  clear(): void {
    this.#ready.fill(0);
  }

  close(): void {
    sys.close(this.#ep);
    this.#fd.fill(-1);
  }

  #control(op: number, fd: number, tag: number, events: number): boolean {
    const c = this.#ctl;
    c[0] = events >>> 0;
    c[1] = tag;
    c[2] = 0;
    return sys.epoll_ctl(this.#ep, op, fd, this.#ctlBytes) === 0;
  }
}
