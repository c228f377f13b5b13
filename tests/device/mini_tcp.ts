/**
 * A tiny TCP client on raw Ethernet frames, for tests that play a guest
 * driver: it opens one connection (SYN with full checksum, the SYN-ACK read
 * back through whatever carries received frames, ACK), sends a byte stream
 * cut into frames the way a Linux guest hands them to virtio-net (GSO
 * TCPV4/TCPV6 super-frames with NEEDS_CSUM and the partial pseudo-header
 * checksum, single NEEDS_CSUM segments, fully checksummed segments), reads a
 * stream the peer sends, and closes with FIN.
 *
 * Deliberately small: no SACK, no timestamps, no congestion control (the
 * peer's window bounds what is in flight), go-back-N retransmission from the
 * oldest unacknowledged byte after {@link RTO_MS} without progress, and
 * in-order receive only (out-of-order data is dropped and the ACK repeated).
 * Every wait is bounded by the caller's timeout.
 *
 * @module
 */

import {
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
} from "../../device/net_header.ts";
import {
  buildFrame,
  ETH_P_IP,
  ETH_P_IPV6,
  get16,
  get32,
  TCP_ACK,
  TCP_FIN,
  TCP_PSH,
  TCP_RST,
  TCP_SYN,
} from "./frames.ts";

/** Retransmit from the oldest unacknowledged byte after this long without progress. */
export const RTO_MS = 1000;
/** Our window scale (RFC 7323): we advertise 0xffff << 7, about 8 MiB. */
const OUR_WSCALE = 7;

/** The fields of a 12-byte virtio 1.x virtio_net_hdr (num_buffers left 0). */
export interface NetHdrFields {
  flags?: number;
  gsoType?: number;
  hdrLen?: number;
  gsoSize?: number;
  csumStart?: number;
  csumOffset?: number;
}

/** virtio 1.2 §5.1.6: u8 flags, u8 gso_type, le16 hdr_len, gso_size, csum_start, csum_offset, num_buffers. */
export function netHdr(f: NetHdrFields = {}): Uint8Array {
  const h = new Uint8Array(12);
  const v = new DataView(h.buffer);
  h[0] = f.flags ?? 0;
  h[1] = f.gsoType ?? 0;
  v.setUint16(2, f.hdrLen ?? 0, true);
  v.setUint16(4, f.gsoSize ?? 0, true);
  v.setUint16(6, f.csumStart ?? 0, true);
  v.setUint16(8, f.csumOffset ?? 0, true);
  return h;
}

/** A frame received by the guest: its virtio_net_hdr and the Ethernet frame. */
export interface ReceivedFrame {
  hdr: Uint8Array;
  frame: Uint8Array;
}

/** The guest's network card, as the client sees it. */
export interface FrameLink {
  /** Queues one frame with its 12-byte virtio_net_hdr for transmission. */
  send(hdr: Uint8Array, frame: Uint8Array): Promise<void>;
  /**
   * Takes the oldest received frame that `match` accepts, waiting up to
   * `timeoutMs` (0: only what is there now). Null on timeout.
   */
  receive(match: (frame: Uint8Array) => boolean, timeoutMs: number): Promise<ReceivedFrame | null>;
}

/** The two ends of the connection. */
export interface TcpFlow {
  ipVersion: 4 | 6;
  localMac: number[];
  remoteMac: number[];
  /** 4 or 16 bytes. */
  local: number[];
  remote: number[];
  localPort: number;
  remotePort: number;
}

/**
 * How the stream is cut into frames, one shape per frame, cycled:
 * - `gso`: a GSO super-frame of up to `bytes` payload (NEEDS_CSUM, gso_type
 *   TCPV4/TCPV6, gso_size from the options, partial checksum);
 * - `csum`: one segment with NEEDS_CSUM and the partial checksum;
 * - `full`: one segment with a complete checksum and no offload.
 * Single segments are capped at the peer's MSS.
 */
export type FrameShape = { kind: "gso" | "csum" | "full"; bytes: number };

export interface MiniTcpOptions {
  /** gso_size for GSO frames (capped at the peer's MSS). Default 1448. */
  gsoSize?: number;
  /** Initial send sequence number. Default random. */
  iss?: number;
}

/** What the client did, for assertions and reports. */
export interface MiniTcpStats {
  gsoFrames: number;
  csumFrames: number;
  fullFrames: number;
  /** Pure ACKs sent (alternately with NEEDS_CSUM and a full checksum). */
  acks: number;
  retransmits: number;
  segmentsIn: number;
  bytesIn: number;
  /** Received frames that arrived as GSO super-frames (the header said so). */
  gsoFramesIn: number;
}

/** A parsed TCP segment of this flow. */
interface Segment {
  seq: number;
  ack: number;
  flags: number;
  window: number;
  payload: Uint8Array;
  mss?: number;
  wscale?: number;
  gso: boolean;
}

/** a - b in sequence space (RFC 793 arithmetic mod 2^32). */
function seqDiff(a: number, b: number): number {
  return (a - b) | 0;
}

const add = (a: number, n: number) => (a + n) >>> 0;

/** One client connection. */
export class MiniTcp {
  readonly stats: MiniTcpStats = {
    gsoFrames: 0,
    csumFrames: 0,
    fullFrames: 0,
    acks: 0,
    retransmits: 0,
    segmentsIn: 0,
    bytesIn: 0,
    gsoFramesIn: 0,
  };
  readonly #link: FrameLink;
  readonly #flow: TcpFlow;
  readonly #gsoSize: number;
  readonly #iss: number;
  #sndUna = 0;
  #sndNxt = 0;
  #rcvNxt = 0;
  #peerWnd = 0;
  #peerWscale = 0;
  #peerMss = 536;
  #ipId = 1;
  #peerFin = false;
  #received: Uint8Array[] = [];

  constructor(link: FrameLink, flow: TcpFlow, options: MiniTcpOptions = {}) {
    this.#link = link;
    this.#flow = flow;
    this.#gsoSize = options.gsoSize ?? 1448;
    this.#iss = options.iss ?? crypto.getRandomValues(new Uint32Array(1))[0];
    this.#sndUna = this.#iss;
    this.#sndNxt = this.#iss;
  }

  /** The peer's MSS from its SYN-ACK. */
  get peerMss(): number {
    return this.#peerMss;
  }

  /** True once the peer's FIN arrived in order. */
  get peerFinished(): boolean {
    return this.#peerFin;
  }

  /** Whether `frame` is a TCP segment of this flow, from the peer. */
  readonly matches = (frame: Uint8Array): boolean => {
    const f = this.#flow;
    if (frame.length < 14) return false;
    const type = get16(frame, 12);
    let l4: number;
    if (f.ipVersion === 4) {
      if (type !== ETH_P_IP || frame.length < 34 || frame[23] !== 6) return false;
      if (!sameBytes(frame, 26, f.remote) || !sameBytes(frame, 30, f.local)) return false;
      l4 = 14 + (frame[14] & 0x0f) * 4;
    } else {
      if (type !== ETH_P_IPV6 || frame.length < 54 || frame[20] !== 6) return false;
      if (!sameBytes(frame, 22, f.remote) || !sameBytes(frame, 38, f.local)) return false;
      l4 = 54;
    }
    return frame.length >= l4 + 20 && get16(frame, l4) === f.remotePort &&
      get16(frame, l4 + 2) === f.localPort;
  };

  /** Opens the connection; throws if no SYN-ACK comes in `timeoutMs`. */
  async connect(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    // MSS 1460 (or 1440), NOP, window scale.
    const mss = this.#flow.ipVersion === 4 ? 1460 : 1440;
    const options = new Uint8Array([2, 4, mss >> 8, mss & 0xff, 1, 3, 3, OUR_WSCALE]);
    for (;;) {
      await this.#send(TCP_SYN, this.#iss, 0, new Uint8Array(0), "full", options);
      const seg = await this.#next(Math.min(RTO_MS, deadline - Date.now()));
      if (seg && (seg.flags & (TCP_SYN | TCP_ACK)) === (TCP_SYN | TCP_ACK)) {
        if (seg.ack !== add(this.#iss, 1)) throw new Error(`SYN-ACK acknowledges ${seg.ack}`);
        this.#rcvNxt = add(seg.seq, 1);
        this.#sndUna = this.#sndNxt = add(this.#iss, 1);
        this.#peerMss = seg.mss ?? 536;
        this.#peerWscale = seg.wscale ?? 0;
        this.#peerWnd = seg.window; // never scaled in a SYN (RFC 7323 §2.2)
        await this.#ack();
        return;
      }
      if (seg && seg.flags & TCP_RST) throw new Error("connection refused (RST)");
      if (Date.now() >= deadline) throw new Error(`no SYN-ACK in ${timeoutMs} ms`);
      if (!seg) this.stats.retransmits++;
    }
  }

  /**
   * Sends `data`, cut into frames by `shapes` (cycled), and waits until the
   * peer acknowledged all of it. Throws on timeout or RST.
   */
  async write(data: Uint8Array, shapes: FrameShape[], timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const base = this.#sndNxt; // sequence number of data[0]
    let shape = 0;
    let lastProgress = Date.now();
    let lastUna = this.#sndUna;
    for (;;) {
      const sent = seqDiff(this.#sndNxt, base);
      const acked = seqDiff(this.#sndUna, base);
      if (acked >= data.length) return;
      if (Date.now() >= deadline) {
        throw new Error(
          `write timed out: ${acked} of ${data.length} bytes acknowledged, window ${this.#peerWnd}`,
        );
      }
      const inFlight = seqDiff(this.#sndNxt, this.#sndUna);
      const s = shapes[shape % shapes.length];
      const single = Math.min(this.#peerMss, s.bytes);
      const want = Math.min(s.kind === "gso" ? s.bytes : single, data.length - sent);
      const room = this.#peerWnd - inFlight;
      if (want > 0 && room >= Math.min(want, single)) {
        const n = Math.min(want, room);
        await this.#sendData(data.subarray(sent, sent + n), this.#sndNxt, s.kind);
        this.#sndNxt = add(this.#sndNxt, n);
        shape++;
        await this.#drain(0);
        continue;
      }
      // Window full (or all sent): wait for ACKs.
      await this.#drain(Math.min(50, Math.max(0, deadline - Date.now())));
      if (this.#sndUna !== lastUna) {
        lastUna = this.#sndUna;
        lastProgress = Date.now();
      } else if (Date.now() - lastProgress > RTO_MS) {
        // Go back N: resend from the oldest unacknowledged byte.
        this.stats.retransmits++;
        this.#sndNxt = this.#sndUna;
        lastProgress = Date.now();
      }
    }
  }

  /**
   * Receives the peer's stream until its FIN (acknowledging as it goes) and
   * returns the bytes. Throws on timeout or RST.
   */
  async readToEnd(timeoutMs: number): Promise<Uint8Array> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#peerFin) {
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`readToEnd timed out after ${this.stats.bytesIn} bytes`);
      }
      await this.#drain(Math.min(left, 200));
    }
    const out = new Uint8Array(this.#received.reduce((s, c) => s + c.length, 0));
    let o = 0;
    for (const c of this.#received) {
      out.set(c, o);
      o += c.length;
    }
    this.#received = [];
    return out;
  }

  /** Sends FIN and waits until it is acknowledged. */
  async close(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    const fin = this.#sndNxt;
    for (;;) {
      await this.#send(TCP_FIN | TCP_ACK, fin, this.#rcvNxt, new Uint8Array(0), "full");
      this.#sndNxt = add(fin, 1);
      const until = Math.min(deadline, Date.now() + RTO_MS);
      while (seqDiff(this.#sndUna, fin) < 1 && Date.now() < until) {
        await this.#drain(Math.max(0, Math.min(50, until - Date.now())));
      }
      if (seqDiff(this.#sndUna, fin) >= 1) return;
      if (Date.now() >= deadline) throw new Error(`FIN not acknowledged in ${timeoutMs} ms`);
      this.stats.retransmits++;
    }
  }

  /** Waits up to `timeoutMs` for the peer's FIN (after our close). */
  async awaitPeerFin(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#peerFin && Date.now() < deadline) {
      await this.#drain(Math.min(50, Math.max(0, deadline - Date.now())));
    }
    return this.#peerFin;
  }

  /**
   * Takes every segment that arrives within `timeoutMs` (then whatever is
   * queued) and answers with one ACK when data or FIN came in.
   */
  async #drain(timeoutMs: number): Promise<void> {
    let wait = timeoutMs;
    let needAck = false;
    for (;;) {
      const seg = await this.#next(wait);
      if (!seg) break;
      wait = 0;
      if (this.#handle(seg)) needAck = true;
    }
    if (needAck) await this.#ack();
  }

  async #next(timeoutMs: number): Promise<Segment | null> {
    const got = await this.#link.receive(this.matches, Math.max(0, timeoutMs));
    if (!got) return null;
    return this.#parse(got);
  }

  /** Applies one segment; returns whether it needs an ACK from us. */
  #handle(seg: Segment): boolean {
    if (seg.flags & TCP_RST) throw new Error("connection reset by the peer");
    if (seg.flags & TCP_SYN) return true; // a retransmitted SYN-ACK: our ACK was lost
    if (seg.flags & TCP_ACK) {
      const ahead = seqDiff(seg.ack, this.#sndUna);
      if (ahead > 0 && seqDiff(seg.ack, this.#sndNxt) <= 0) {
        this.#sndUna = seg.ack;
      } else if (ahead > 0) {
        // Acknowledges data we rolled back for a retransmission: it arrived after all.
        this.#sndUna = this.#sndNxt = seg.ack;
      }
      if (ahead >= 0) this.#peerWnd = seg.window << this.#peerWscale;
    }
    this.stats.segmentsIn++;
    if (seg.gso) this.stats.gsoFramesIn++;
    let ack = false;
    if (seg.payload.length > 0) {
      ack = true;
      if (seg.seq === this.#rcvNxt) {
        this.#received.push(seg.payload.slice());
        this.stats.bytesIn += seg.payload.length;
        this.#rcvNxt = add(this.#rcvNxt, seg.payload.length);
      }
    }
    if (seg.flags & TCP_FIN) {
      ack = true;
      if (add(seg.seq, seg.payload.length) === this.#rcvNxt && !this.#peerFin) {
        this.#rcvNxt = add(this.#rcvNxt, 1);
        this.#peerFin = true;
      }
    }
    return ack;
  }

  #parse(r: ReceivedFrame): Segment {
    const f = r.frame;
    const l3 = 14;
    let l4: number;
    let end: number;
    if (this.#flow.ipVersion === 4) {
      l4 = l3 + (f[l3] & 0x0f) * 4;
      end = l3 + get16(f, l3 + 2);
    } else {
      l4 = l3 + 40;
      end = l4 + get16(f, l3 + 4);
    }
    end = Math.min(end, f.length);
    const dataOff = l4 + (f[l4 + 12] >> 4) * 4;
    const seg: Segment = {
      seq: get32(f, l4 + 4),
      ack: get32(f, l4 + 8),
      flags: f[l4 + 13],
      window: get16(f, l4 + 14),
      payload: f.subarray(dataOff, end),
      gso: r.hdr[1] !== 0,
    };
    for (let o = l4 + 20; o < dataOff;) {
      const kind = f[o];
      if (kind === 0) break;
      if (kind === 1) {
        o++;
        continue;
      }
      const len = f[o + 1];
      if (len < 2) break;
      if (kind === 2 && len === 4) seg.mss = get16(f, o + 2);
      if (kind === 3 && len === 3) seg.wscale = Math.min(14, f[o + 2]);
      o += len;
    }
    return seg;
  }

  async #ack(): Promise<void> {
    const mode = this.stats.acks++ % 2 === 0 ? "full" : "csum";
    await this.#send(TCP_ACK, this.#sndNxt, this.#rcvNxt, new Uint8Array(0), mode);
  }

  async #sendData(payload: Uint8Array, seq: number, kind: FrameShape["kind"]): Promise<void> {
    const gso = this.#gsoSize > this.#peerMss ? this.#peerMss : this.#gsoSize;
    const k = kind === "gso" && payload.length <= gso ? "csum" : kind;
    if (k === "gso") this.stats.gsoFrames++;
    else if (k === "csum") this.stats.csumFrames++;
    else this.stats.fullFrames++;
    await this.#send(TCP_ACK | TCP_PSH, seq, this.#rcvNxt, payload, k, undefined, gso);
  }

  async #send(
    flags: number,
    seq: number,
    ack: number,
    payload: Uint8Array,
    kind: FrameShape["kind"],
    tcpOptions?: Uint8Array,
    gsoSize = 0,
  ): Promise<void> {
    const f = this.#flow;
    const b = buildFrame({
      ipVersion: f.ipVersion,
      dstMac: f.remoteMac,
      srcMac: f.localMac,
      src: f.local,
      dst: f.remote,
      srcPort: f.localPort,
      dstPort: f.remotePort,
      seq,
      ack: flags & TCP_ACK ? ack : 0,
      tcpFlags: flags,
      window: 0xffff,
      tcpOptions,
      payload,
      ipId: this.#ipId,
      checksum: kind === "full" ? "full" : "partial",
    });
    this.#ipId = (this.#ipId + Math.max(1, Math.ceil(payload.length / (gsoSize || 1)))) & 0xffff;
    const hdr = kind === "full" ? netHdr() : netHdr({
      flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
      gsoType: kind === "gso"
        ? (f.ipVersion === 4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6)
        : 0,
      hdrLen: kind === "gso" ? b.payloadOffset : 0,
      gsoSize: kind === "gso" ? gsoSize : 0,
      csumStart: b.l4Offset,
      csumOffset: 16,
    });
    await this.#link.send(hdr, b.frame);
  }
}

function sameBytes(frame: Uint8Array, at: number, want: number[]): boolean {
  for (let i = 0; i < want.length; i++) if (frame[at + i] !== want[i]) return false;
  return true;
}
