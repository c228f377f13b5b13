/**
 * The capture writer: drains every I/O worker's capture ring
 * (`capture_ring.ts`), turns each record into a pcapng Enhanced Packet Block
 * (`pcapng.ts`) and appends them to the `--pcap` file, never beyond
 * `--pcap-max`. It runs in its own worker (`capture_worker.ts`), so a slow
 * disk stalls only this thread: the data path keeps going and counts the
 * frames that found no room in a ring.
 *
 * One file for every queue pair: the section header, then one interface per
 * pair (interface id = pair index), then the packets. Records are written
 * ring by ring as they come (each ring in order); pcapng does not require
 * packets of different interfaces, or of the two workers of a pair, to be
 * in time order, and readers sort by time when asked (`tshark -2`,
 * `reordercap`).
 *
 * The size limit stops the capture (it does not rotate): the block that
 * would take the file past `maxBytes` is not written, the state becomes
 * FULL, and every frame from then on is counted as dropped over max. The
 * file always ends with a whole block. A write the kernel refuses (ENOSPC,
 * EIO) ends the capture the same way with FAILED.
 *
 * Message protocol with the parent (structured clone, validated here):
 * `init` → `ready` (or `error`), `stop` → `stopped` (after a last drain);
 * unsolicited `notice` lines for the log.
 *
 * @module
 */

import {
  CAPTURE_FAILED,
  CAPTURE_FULL,
  CAPTURE_ON,
  CAPTURE_STATE,
  CAPTURE_STATE_BYTES,
  CAPTURE_STATS,
  CaptureConsumer,
  type CaptureRecord,
} from "./capture_ring.ts";
import {
  DIR_RX,
  epbLength,
  interfaceDescriptionBlock,
  sectionHeaderBlock,
  vnetHeaderComment,
  writeEpb,
} from "./pcapng.ts";

/** The parent's first message. */
export interface CaptureInit {
  kind: "init";
  /** The file, opened for writing during set-up (this worker cannot open one). */
  fd: number;
  /** The shared state and statistics (CAPTURE_STATE, CAPTURE_STATS). */
  state: SharedArrayBuffer;
  /** Every I/O worker's ring, with the pair it belongs to. */
  rings: Array<{ pair: number; ring: SharedArrayBuffer }>;
  /** One interface per pair: its if_name and if_description. */
  interfaces: Array<{ name: string; description: string }>;
  /** The most bytes the file may hold. */
  maxBytes: number;
  /** The interfaces' snap length (`--pcap-snaplen`); 0: none. */
  snapLen?: number;
}

export type CaptureRequest = CaptureInit | { kind: "stop" };
export type CaptureReply =
  | { kind: "ready" }
  | { kind: "stopped" }
  | { kind: "error"; message: string }
  | { kind: "notice"; level: "warn" | "info"; message: string };

/** Validates a message from the parent. @throws {TypeError} naming the first bad field. */
export function parseCaptureRequest(data: unknown): CaptureRequest {
  if (typeof data !== "object" || data === null) throw new TypeError("message must be an object");
  const m = data as Record<string, unknown>;
  if (m.kind === "stop") return { kind: "stop" };
  if (m.kind !== "init") throw new TypeError(`unknown kind ${String(m.kind)}`);
  if (!Number.isInteger(m.fd) || (m.fd as number) < 0) {
    throw new TypeError("fd must be a descriptor");
  }
  if (!(m.state instanceof SharedArrayBuffer) || m.state.byteLength < CAPTURE_STATE_BYTES) {
    throw new TypeError("state must be the capture state buffer");
  }
  if (!Array.isArray(m.rings) || !Array.isArray(m.interfaces)) {
    throw new TypeError("rings and interfaces must be lists");
  }
  const interfaces = m.interfaces.map((i, k) => {
    const r = i as Record<string, unknown>;
    if (typeof r?.name !== "string" || typeof r?.description !== "string") {
      throw new TypeError(`interfaces[${k}] needs a name and a description`);
    }
    return { name: r.name, description: r.description };
  });
  const rings = m.rings.map((x, k) => {
    const r = x as Record<string, unknown>;
    if (
      !(r?.ring instanceof SharedArrayBuffer) || !Number.isInteger(r.pair) ||
      (r.pair as number) < 0 || (r.pair as number) >= interfaces.length
    ) {
      throw new TypeError(`rings[${k}] needs a ring and the pair of an interface`);
    }
    return { pair: r.pair as number, ring: r.ring };
  });
  if (!Number.isSafeInteger(m.maxBytes) || (m.maxBytes as number) < 1) {
    throw new TypeError("maxBytes must be a positive integer");
  }
  const snapLen = m.snapLen ?? 0;
  if (!Number.isInteger(snapLen) || (snapLen as number) < 0 || (snapLen as number) > 0x7fff_ffff) {
    throw new TypeError("snapLen must be a length (0: whole frames)");
  }
  return {
    kind: "init",
    fd: m.fd as number,
    state: m.state,
    rings,
    interfaces,
    maxBytes: m.maxBytes as number,
    snapLen: snapLen as number,
  };
}

/** Bytes gathered before a write(2): one write per this much, or per drain. */
const OUT_BYTES = 1024 * 1024;
/** The most one block takes: a 64 KiB GSO frame (MAX_FRAME_BYTES 65550) and a comment. */
const MAX_BLOCK_BYTES = 66 * 1024;

/** Writes all of `buf` to the file (loops over short writes); throws on an error. */
export type WriteAll = (buf: Uint8Array) => void;

/** What {@link CaptureWriter} reports for the log. */
export type Notice = (level: "warn" | "info", message: string) => void;

/** Drains the rings into the file (see the module comment). */
export class CaptureWriter {
  readonly #state: Int32Array;
  readonly #stats: Float64Array;
  readonly #rings: Array<{ pair: number; consumer: CaptureConsumer }>;
  readonly #write: WriteAll;
  readonly #notice: Notice;
  readonly #max: number;
  readonly #out = new Uint8Array(OUT_BYTES + MAX_BLOCK_BYTES);
  readonly #view = new DataView(this.#out.buffer);
  readonly #enc = new TextEncoder();
  readonly #comment = new Uint8Array(512);
  /** The header (12 bytes) and direction the comment in #comment was made for; a stream repeats them. */
  readonly #commentFor = new Uint8Array(13);
  #commentLen = -1;
  #used = 0;
  /** No more writes: the file is full or a write failed. */
  #ended = false;

  constructor(init: CaptureInit, write: WriteAll, notice: Notice) {
    this.#state = new Int32Array(init.state, 0, CAPTURE_STATE_BYTES / 4);
    this.#stats = new Float64Array(init.state, 0, CAPTURE_STATE_BYTES / 8);
    this.#rings = init.rings.map((r) => ({ pair: r.pair, consumer: new CaptureConsumer(r.ring) }));
    this.#write = write;
    this.#notice = notice;
    this.#max = init.maxBytes;
    const head = [
      sectionHeaderBlock("vionet"),
      ...init.interfaces.map((i) =>
        interfaceDescriptionBlock(i.name, i.description, init.snapLen ?? 0)
      ),
    ];
    const bytes = head.reduce((n, b) => n + b.length, 0);
    if (bytes > this.#max) {
      throw new RangeError(
        `the file's header takes ${bytes} bytes, more than --pcap-max ${this.#max}`,
      );
    }
    for (const b of head) this.#append(b);
    this.flush();
  }

  /** One pass over every ring; returns the records taken. */
  drain(): number {
    let n = 0;
    for (const { pair, consumer } of this.#rings) {
      n += consumer.drain((r) => this.#record(pair, r));
    }
    this.flush();
    return n;
  }

  /** Writes what is gathered. */
  flush(): void {
    if (this.#used === 0 || this.#ended) {
      this.#used = 0;
      return;
    }
    try {
      this.#write(this.#out.subarray(0, this.#used));
      this.#stats[CAPTURE_STATS.FILE_BYTES] += this.#used;
    } catch (e) {
      this.#stats[CAPTURE_STATS.WRITE_ERRORS]++;
      this.#end(
        CAPTURE_FAILED,
        "warn",
        `capture ended: writing the file failed: ${(e as Error).message}`,
      );
    }
    this.#used = 0;
  }

  #append(b: Uint8Array): void {
    this.#out.set(b, this.#used);
    this.#used += b.length;
  }

  #end(state: number, level: "warn" | "info", message: string): void {
    this.#ended = true;
    Atomics.store(this.#state, CAPTURE_STATE.STATE, state);
    this.#notice(level, message);
  }

  /**
   * The comment of `r`'s header in #comment; its length. Made again only
   * when the header or the direction differ from the last record's (the
   * frames of one stream mostly repeat them).
   */
  #commentOf(r: CaptureRecord): number {
    const last = this.#commentFor;
    const b = r.bytes, at = r.hdrAt;
    let same = this.#commentLen >= 0 && last[12] === r.dir;
    for (let i = 0; same && i < 12; i++) same = last[i] === b[at + i];
    if (same) return this.#commentLen;
    for (let i = 0; i < 12; i++) last[i] = b[at + i];
    last[12] = r.dir;
    const text = vnetHeaderComment(b, at, r.dir);
    this.#commentLen = this.#enc.encodeInto(text, this.#comment).written!;
    return this.#commentLen;
  }

  /** Whether capture is on (CAPTURE_ON): off, the worker looks at the rings less often. */
  capturing(): boolean {
    return Atomics.load(this.#state, CAPTURE_STATE.STATE) === CAPTURE_ON;
  }

  /** The fullest ring's share of its space in use (0..1): the worker drains again at once above 1/4. */
  fullest(): number {
    let most = 0;
    for (const { consumer } of this.#rings) most = Math.max(most, consumer.fill());
    return most;
  }

  /** Appends one record's block; always consumes it. */
  #record(pair: number, r: CaptureRecord): boolean {
    const s = this.#stats;
    if (this.#ended) {
      if (Atomics.load(this.#state, CAPTURE_STATE.STATE) === CAPTURE_FULL) {
        s[CAPTURE_STATS.OVER_MAX]++;
      }
      return true;
    }
    const commentLen = this.#commentOf(r);
    const need = epbLength(r.frame.length, commentLen);
    if (s[CAPTURE_STATS.FILE_BYTES] + this.#used + need > this.#max) {
      this.flush();
      s[CAPTURE_STATS.OVER_MAX]++;
      if (!this.#ended) {
        this.#end(
          CAPTURE_FULL,
          "warn",
          `capture stopped: the file reached --pcap-max (${
            s[CAPTURE_STATS.FILE_BYTES]
          } of ${this.#max} bytes); ` +
            "further frames are counted as dropped over max",
        );
      }
      return true;
    }
    if (this.#used + need > this.#out.length) this.flush();
    this.#used += writeEpb(
      this.#out,
      this.#view,
      this.#used,
      pair,
      r.timeUs,
      r.frame,
      r.frameLen,
      r.dir,
      this.#comment.subarray(0, commentLen),
    );
    s[CAPTURE_STATS.PACKETS]++;
    s[CAPTURE_STATS.BYTES] += r.frameLen;
    s[r.dir === DIR_RX ? CAPTURE_STATS.RX_PACKETS : CAPTURE_STATS.TX_PACKETS]++;
    return true;
  }
}
