/**
 * What to do with a frame's offloads, in both directions.
 *
 * TX (guest → tap): the guest's header is validated ({@link validateTxHeader}),
 * then, by what the sink takes (`sinkOffloads`, NET_OFFLOAD_* bits: a Linux
 * tap with IFF_VNET_HDR takes NET_OFFLOAD_ALL, a tap without it takes 0):
 * - pass the frame and its (validated, copied) header through;
 * - complete the checksum in software and send with a zero header;
 * - segment the TCP stream in software, each segment with a zero header.
 * UFO/USO have no software fallback here: such frames are dropped, counted.
 *
 * RX (tap → guest) needs nothing here: TUNSCAP keeps the tap from writing
 * what the guest did not negotiate, and the poller checks each header
 * against what the guest takes (`parent/io/rx_publisher.ts`).
 *
 * Failure policy: a bad frame is dropped and `drops[reason]` counted; nothing
 * here throws on frame contents. Software work on a TX frame happens on a
 * private copy (the guest's buffers are device-readable only, virtio 1.2
 * §2.7.4, and may change under us), which is parsed and checked again.
 *
 * @module
 */

import { completeChecksum } from "./checksum.ts";
import { createParsedFrame, FrameParse, type ParsedFrame, parseFrame } from "./frame_parse.ts";
import {
  clearNetHdr,
  createNetHdr,
  gsoOffload,
  NET_DROP_COUNT,
  NET_OFFLOAD_CSUM,
  NET_OFFLOAD_TSO4,
  NET_OFFLOAD_TSO6,
  NET_OFFLOAD_TSO_ECN,
  NetDrop,
  type NetDropCode,
  validateGsoFrame,
  validateTxHeader,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  type VirtioNetHdr,
} from "./net_header.ts";
import { segmentTcp } from "./segment.ts";

/** The largest frame handled in software: 64 KiB IP packet + L2 headers, rounded up. */
export const MAX_OFFLOAD_FRAME = 65536 + 256;

/** What {@link decideTx} chose. */
export const TxAction = {
  /** UFO/USO the sink cannot take: drop, counted as OFFLOAD_UNSUPPORTED. */
  DROP: 0,
  /** Send frame and header as they are. */
  PASS_THROUGH: 1,
  /** Complete the partial checksum, send with a zero header. */
  COMPLETE_CSUM: 2,
  /** Segment in software, each segment with a zero header. */
  SEGMENT: 3,
} as const;
/** One value of {@link TxAction}. */
export type TxActionCode = typeof TxAction[keyof typeof TxAction];

/** Receives one frame to send on: header (to serialize if the sink takes one) and `bytes[0..length)`. */
export type NetSink = (hdr: VirtioNetHdr, bytes: Uint8Array, length: number) => void;

/** Per-queue state: reusable header/parse objects, buffers and counters. */
export interface NetOffloadContext {
  /** Parse result of the last frame. */
  readonly parsed: ParsedFrame;
  /** All-zero header given with completed or segmented frames. */
  readonly zeroHdr: VirtioNetHdr;
  /** Private copy of a TX frame that needs software work. */
  readonly frameCopy: Uint8Array;
  /** Where segments are built. */
  readonly scratch: Uint8Array;
  /** Drop counters indexed by NetDrop code. */
  readonly drops: Uint32Array;
  /** Frames passed through / checksummed / segmented, and segments made. */
  readonly stats: {
    passThrough: number;
    csumCompleted: number;
    segmented: number;
    segments: number;
  };
  /** The sink of the frame being segmented (set per call, so no closure per frame). */
  sink: NetSink;
  /** Hands each segment to `sink` with the zero header. */
  readonly segmentSink: (buffer: Uint8Array, length: number, index: number) => void;
}

/** Buffers sized for frames up to `maxFrame` bytes. */
export function createNetOffloadContext(maxFrame: number = MAX_OFFLOAD_FRAME): NetOffloadContext {
  const ctx: NetOffloadContext = {
    parsed: createParsedFrame(),
    zeroHdr: createNetHdr(),
    frameCopy: new Uint8Array(maxFrame),
    scratch: new Uint8Array(maxFrame),
    drops: new Uint32Array(NET_DROP_COUNT),
    stats: { passThrough: 0, csumCompleted: 0, segmented: 0, segments: 0 },
    sink: () => {},
    segmentSink: (buffer, length) => {
      ctx.stats.segments++;
      ctx.sink(ctx.zeroHdr, buffer, length);
    },
  };
  return ctx;
}

/**
 * Whether a sink (or a guest) with `offloads` takes a GSO frame of `gsoType`
 * whole: the type's bit, NEEDS_CSUM support (Linux tun: TSO/USO only with
 * TUN_F_CSUM; virtio 1.2 §5.1.3.1: GUEST_TSO* require GUEST_CSUM), and
 * TSO_ECN when the ECN bit is set. For USO either of USO4/USO6 counts (Linux
 * accepts them only together).
 */
export function takesGso(offloads: number, gsoType: number): boolean {
  const need = gsoOffload(gsoType);
  if (need <= 0) return need === 0;
  if ((offloads & NET_OFFLOAD_CSUM) === 0 || (offloads & need) === 0) return false;
  return (gsoType & VIRTIO_NET_HDR_GSO_ECN) === 0 || (offloads & NET_OFFLOAD_TSO_ECN) !== 0;
}

/** True for TCPV4/TCPV6 (with or without ECN): the types we can segment. */
function isTcpGso(gsoType: number): boolean {
  return (gsoOffload(gsoType) & (NET_OFFLOAD_TSO4 | NET_OFFLOAD_TSO6)) !== 0;
}

/**
 * The TX decision for a header that {@link validateTxHeader} accepted, by
 * what the sink takes (`sinkOffloads`, NET_OFFLOAD_* bits). TxAction.DROP
 * means UFO/USO that the sink cannot take (no software fallback).
 */
export function decideTx(hdr: VirtioNetHdr, sinkOffloads: number): TxActionCode {
  if (gsoOffload(hdr.gsoType) === 0) {
    if ((hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) === 0) return TxAction.PASS_THROUGH;
    return (sinkOffloads & NET_OFFLOAD_CSUM) !== 0 ? TxAction.PASS_THROUGH : TxAction.COMPLETE_CSUM;
  }
  if (takesGso(sinkOffloads, hdr.gsoType)) return TxAction.PASS_THROUGH;
  return isTcpGso(hdr.gsoType) ? TxAction.SEGMENT : TxAction.DROP;
}

function drop(ctx: NetOffloadContext, reason: NetDropCode): NetDropCode {
  ctx.drops[reason]++;
  return reason;
}

/** End of the checksummed range: the IP packet's end when the frame parses, else the frame's. */
function checksumEnd(
  hdr: VirtioNetHdr,
  frame: Uint8Array,
  length: number,
  parsed: ParsedFrame,
): number {
  if (parseFrame(frame, parsed, length) !== FrameParse.OK) return length;
  const end = parsed.l3End;
  return hdr.csumStart >= parsed.l3Offset && hdr.csumStart + hdr.csumOffset + 2 <= end
    ? end
    : length;
}

function copyFrame(ctx: NetOffloadContext, frame: Uint8Array, length: number): boolean {
  if (length > ctx.frameCopy.length) return false;
  ctx.frameCopy.set(length === frame.length ? frame : frame.subarray(0, length), 0);
  return true;
}

/**
 * Guest TX: validates `hdr` (already copied out of guest memory with
 * readNetHdr) against `hostOffloads` and `frame[0..length)`, decides by
 * `sinkOffloads`, and hands the result to `sink` once per frame to send.
 * Returns NetDrop.OK or the (counted) drop reason.
 */
export function processTx(
  ctx: NetOffloadContext,
  hdr: VirtioNetHdr,
  frame: Uint8Array,
  length: number,
  hostOffloads: number,
  sinkOffloads: number,
  sink: NetSink,
): NetDropCode {
  if (length > frame.length) length = frame.length;
  const v = validateTxHeader(hdr, hostOffloads, frame, length, ctx.parsed);
  if (v !== NetDrop.OK) return drop(ctx, v);
  const action = decideTx(hdr, sinkOffloads);
  if (action === TxAction.DROP) return drop(ctx, NetDrop.OFFLOAD_UNSUPPORTED);
  if (action === TxAction.PASS_THROUGH) {
    ctx.stats.passThrough++;
    sink(hdr, frame, length);
    return NetDrop.OK;
  }
  if (!copyFrame(ctx, frame, length)) return drop(ctx, NetDrop.SCRATCH_TOO_SMALL);
  const copy = ctx.frameCopy;
  if (action === TxAction.COMPLETE_CSUM) {
    // The header fields were checked against `length`, which the copy keeps.
    completeChecksum(
      copy,
      hdr.csumStart,
      hdr.csumOffset,
      checksumEnd(hdr, copy, length, ctx.parsed),
    );
    ctx.stats.csumCompleted++;
    clearNetHdr(ctx.zeroHdr);
    sink(ctx.zeroHdr, copy, length);
    return NetDrop.OK;
  }
  // SEGMENT: check the private copy again, it is what gets segmented.
  const again = validateGsoFrame(hdr, copy, length, ctx.parsed);
  if (again !== NetDrop.OK) return drop(ctx, again);
  return segment(ctx, hdr, copy, sink);
}

function segment(
  ctx: NetOffloadContext,
  hdr: VirtioNetHdr,
  frame: Uint8Array,
  sink: NetSink,
): NetDropCode {
  clearNetHdr(ctx.zeroHdr);
  ctx.sink = sink;
  const r = segmentTcp(frame, ctx.parsed, hdr.gsoSize, ctx.scratch, ctx.segmentSink);
  if (r !== NetDrop.OK) return drop(ctx, r);
  ctx.stats.segmented++;
  return NetDrop.OK;
}
