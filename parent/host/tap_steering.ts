/**
 * The multi-queue tap's queue steering: a small eBPF program, loaded once at
 * set-up and attached with TUNSETSTEERINGEBPF, that picks the queue for each
 * frame the host sends to the guest from a hash of its flow.
 *
 * Why: without a steering program, tun's "automq" hashes every frame a
 * queue *writes* (flow dissection and siphash in `tun_get_user`) to learn
 * which queue each flow's replies should go to, and every frame the host
 * sends, to look that up. With two queues that cost 0.05 µs of vionet's
 * 1.06 µs a 64-byte TX frame (`bench/profile.ts --perf --test tx64q2`,
 * `__siphash_unaligned` and `__skb_flow_dissect`), a cost one queue never
 * pays. With a program attached, `tun_get_user` skips the hash entirely and
 * queue selection runs the program instead (Linux `drivers/net/tun.c`:
 * `tun_ebpf_select_queue` takes the program's 16-bit result modulo the
 * attached queues). QEMU attaches a program the same way for virtio-net RSS.
 *
 * What changes for the guest: a flow the host sends always lands on one
 * queue pair, chosen by the hash below, rather than on the pair its last
 * guest-sent frame came from. Both keep a flow on one pair.
 *
 * The hash (a reference in {@link flowHash}, the same in the program):
 * IPv4 source ^ destination address, IPv6 the XOR of the eight words of
 * both addresses, then ^ (source port ^ destination port) for TCP and
 * UDP (not for IPv4 fragments), ^ the protocol; multiplied by 0x9e3779b1 (32
 * bits) and shifted right by 16. Symmetric in source and destination.
 * Anything else (ARP, VLAN-tagged, too short) goes to queue 0.
 *
 * Loading needs CAP_BPF (or CAP_SYS_ADMIN) where `kernel.unprivileged_bpf_disabled`
 * is set, as on most distributions; the daemon holds it only during set-up.
 * Without it the tap keeps automq and the daemon says so.
 *
 * @module
 */

import * as libc from "./libc.ts";
import { TAP_IOCTLS } from "./tap.ts";

/** bpf(2) on x86-64. */
const SYS_bpf = 321n;
const BPF_PROG_LOAD = 5;
const BPF_PROG_TEST_RUN = 10;
const BPF_PROG_TYPE_SOCKET_FILTER = 1;
const TUNSETSTEERINGEBPF = TAP_IOCTLS.TUNSETSTEERINGEBPF.number;
/** The size of union bpf_attr we pass: the fields we set, zeros after. */
const ATTR_SIZE = 128;

// ---- eBPF encoding (linux/bpf.h, linux/bpf_common.h) ----------------------

const BPF_LD = 0x00;
const BPF_JMP = 0x05;
const BPF_ALU = 0x04;
const BPF_ALU64 = 0x07;
const BPF_W = 0x00;
const BPF_H = 0x08;
const BPF_B = 0x10;
const BPF_ABS = 0x20;
const BPF_IND = 0x40;
const BPF_K = 0x00;
const BPF_X = 0x08;
const BPF_MOV = 0xb0;
const BPF_XOR = 0xa0;
const BPF_AND = 0x50;
const BPF_LSH = 0x60;
const BPF_RSH = 0x70;
const BPF_MUL = 0x20;
const BPF_JEQ = 0x10;
const BPF_JNE = 0x50;
const BPF_JA = 0x00;
const BPF_EXIT = 0x90;

/** One instruction, or a jump whose target is a label resolved at assembly. */
type Insn =
  | { code: number; dst: number; src: number; off: number; imm: number }
  | { code: number; dst: number; src: number; label: string; imm: number }
  | { label: string };

const ins = (code: number, dst: number, src: number, imm = 0): Insn => ({
  code,
  dst,
  src,
  off: 0,
  imm,
});
const movReg = (dst: number, src: number) => ins(BPF_ALU64 | BPF_MOV | BPF_X, dst, src);
const movImm = (dst: number, imm: number) => ins(BPF_ALU64 | BPF_MOV | BPF_K, dst, 0, imm);
const xorReg = (dst: number, src: number) => ins(BPF_ALU64 | BPF_XOR | BPF_X, dst, src);
/** r0 = packet[off] (network order, made host order), size BPF_W/H/B; r6 holds the context. */
const ldAbs = (size: number, off: number) => ins(BPF_LD | BPF_ABS | size, 0, 0, off);
/** r0 = packet[src + off]. */
const ldInd = (size: number, src: number, off: number) => ins(BPF_LD | BPF_IND | size, 0, src, off);
/** A conditional jump to `label` when register `dst` compares (`op`) with `imm`. */
const jumpIf = (op: number) => (dst: number, imm: number, label: string): Insn => ({
  code: BPF_JMP | op | BPF_K,
  dst,
  src: 0,
  label,
  imm,
});
const jeq = jumpIf(BPF_JEQ);
const jne = jumpIf(BPF_JNE);
const ja = (label: string): Insn => ({ code: BPF_JMP | BPF_JA, dst: 0, src: 0, label, imm: 0 });
const exit = () => ins(BPF_JMP | BPF_EXIT, 0, 0);
const label = (name: string): Insn => ({ label: name });

const ETH_HLEN = 14;
const ETH_P_IP = 0x0800;
const ETH_P_IPV6 = 0x86dd;
const IPPROTO_TCP = 6;
const IPPROTO_UDP = 17;
/** Knuth's multiplicative constant (2^32 / golden ratio), as a signed 32-bit immediate. */
const GOLDEN = 0x9e3779b1 | 0;

/**
 * The steering program. Registers: r6 the skb (LD_ABS/LD_IND need it), r7
 * the running hash, r8 the protocol, r9 the IPv4 header length.
 */
function steeringProgram(): Insn[] {
  const p: Insn[] = [
    movReg(6, 1),
    ldAbs(BPF_H, 12),
    jeq(0, ETH_P_IP, "v4"),
    jeq(0, ETH_P_IPV6, "v6"),
    movImm(0, 0),
    exit(),

    label("v4"),
    ldAbs(BPF_W, ETH_HLEN + 12),
    movReg(7, 0),
    ldAbs(BPF_W, ETH_HLEN + 16),
    xorReg(7, 0),
    ldAbs(BPF_B, ETH_HLEN + 9),
    movReg(8, 0),
    ldAbs(BPF_H, ETH_HLEN + 6),
    ins(BPF_ALU64 | BPF_AND | BPF_K, 0, 0, 0x3fff), // MF or a fragment offset: no ports
    jne(0, 0, "mix"),
    ldAbs(BPF_B, ETH_HLEN),
    ins(BPF_ALU64 | BPF_AND | BPF_K, 0, 0, 0x0f),
    ins(BPF_ALU64 | BPF_LSH | BPF_K, 0, 0, 2),
    movReg(9, 0),
    jeq(8, IPPROTO_TCP, "v4ports"),
    jeq(8, IPPROTO_UDP, "v4ports"),
    ja("mix"),
    label("v4ports"),
    ldInd(BPF_H, 9, ETH_HLEN),
    xorReg(7, 0),
    ldInd(BPF_H, 9, ETH_HLEN + 2),
    xorReg(7, 0),
    ja("mix"),

    label("v6"),
    ldAbs(BPF_W, ETH_HLEN + 8),
    movReg(7, 0),
  ];
  for (let i = 1; i < 8; i++) {
    p.push(ldAbs(BPF_W, ETH_HLEN + 8 + 4 * i), xorReg(7, 0));
  }
  p.push(
    ldAbs(BPF_B, ETH_HLEN + 6),
    movReg(8, 0),
    jeq(8, IPPROTO_TCP, "v6ports"),
    jeq(8, IPPROTO_UDP, "v6ports"),
    ja("mix"),
    label("v6ports"),
    ldAbs(BPF_H, ETH_HLEN + 40),
    xorReg(7, 0),
    ldAbs(BPF_H, ETH_HLEN + 42),
    xorReg(7, 0),
    label("mix"),
    xorReg(7, 8),
    movReg(0, 7),
    ins(BPF_ALU | BPF_MUL | BPF_K, 0, 0, GOLDEN),
    ins(BPF_ALU | BPF_RSH | BPF_K, 0, 0, 16),
    exit(),
  );
  return p;
}

/** Resolves labels into offsets and encodes struct bpf_insn (8 bytes each). */
export function assemble(program: readonly Insn[]): Uint8Array {
  const at = new Map<string, number>();
  let n = 0;
  for (const i of program) {
    if ("code" in i) n++;
    else if (at.has(i.label)) throw new Error(`eBPF label ${i.label} defined twice`);
    else at.set(i.label, n);
  }
  const out = new Uint8Array(n * 8);
  const view = new DataView(out.buffer);
  let pc = 0;
  for (const i of program) {
    if (!("code" in i)) continue;
    let off = 0;
    if ("label" in i) {
      const target = at.get(i.label);
      if (target === undefined) throw new Error(`eBPF label ${i.label} is not defined`);
      off = target - (pc + 1);
      if (off < 0) throw new Error(`eBPF jump to ${i.label} goes backwards`);
    } else {
      off = i.off;
    }
    view.setUint8(pc * 8, i.code);
    view.setUint8(pc * 8 + 1, (i.src << 4) | i.dst);
    view.setInt16(pc * 8 + 2, off, true);
    view.setInt32(pc * 8 + 4, i.imm, true);
    pc++;
  }
  return out;
}

/** The assembled steering program (see the module comment). */
export const STEERING_PROGRAM: Uint8Array = assemble(steeringProgram());

/**
 * The program's result for one Ethernet frame, computed here: the reference
 * the tests hold the kernel's run of the program to. Queue = result % queues.
 */
export function flowHash(frame: Uint8Array): number {
  const v = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
  const need = (n: number) => frame.byteLength >= n;
  if (!need(ETH_HLEN)) return 0;
  const type = v.getUint16(12);
  let h: number;
  let proto: number;
  if (type === ETH_P_IP) {
    if (!need(ETH_HLEN + 20)) return 0;
    h = v.getUint32(ETH_HLEN + 12) ^ v.getUint32(ETH_HLEN + 16);
    proto = v.getUint8(ETH_HLEN + 9);
    const frag = v.getUint16(ETH_HLEN + 6) & 0x3fff;
    const ihl = (v.getUint8(ETH_HLEN) & 0x0f) << 2;
    if (frag === 0 && (proto === IPPROTO_TCP || proto === IPPROTO_UDP)) {
      if (!need(ETH_HLEN + ihl + 4)) return 0;
      h ^= v.getUint16(ETH_HLEN + ihl) ^ v.getUint16(ETH_HLEN + ihl + 2);
    }
  } else if (type === ETH_P_IPV6) {
    if (!need(ETH_HLEN + 40)) return 0;
    h = 0;
    for (let i = 0; i < 8; i++) h ^= v.getUint32(ETH_HLEN + 8 + 4 * i);
    proto = v.getUint8(ETH_HLEN + 6);
    if (proto === IPPROTO_TCP || proto === IPPROTO_UDP) {
      if (!need(ETH_HLEN + 44)) return 0;
      h ^= v.getUint16(ETH_HLEN + 40) ^ v.getUint16(ETH_HLEN + 42);
    }
  } else {
    return 0;
  }
  h = (h ^ proto) >>> 0;
  return Math.imul(h, GOLDEN) >>> 16;
}

/** Why loading or attaching the steering program failed. */
export class SteeringError extends Error {
  override name = "SteeringError";
}

function pointerValue(buf: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf as Uint8Array<ArrayBuffer>)));
}

/**
 * Loads the steering program (BPF_PROG_TYPE_SOCKET_FILTER) and returns its
 * descriptor (close it once attached: the tap holds its own reference).
 * Throws {@link SteeringError} with the verifier's log on failure.
 */
export function loadSteeringProgram(): number {
  const license = new TextEncoder().encode("GPL\0");
  const log = new Uint8Array(4096);
  const attr = new Uint8Array(ATTR_SIZE);
  const v = new DataView(attr.buffer);
  v.setUint32(0, BPF_PROG_TYPE_SOCKET_FILTER, true);
  v.setUint32(4, STEERING_PROGRAM.byteLength / 8, true);
  v.setBigUint64(8, pointerValue(STEERING_PROGRAM), true);
  v.setBigUint64(16, pointerValue(license), true);
  v.setUint32(24, 1, true); // log_level
  v.setUint32(28, log.byteLength, true);
  v.setBigUint64(32, pointerValue(log), true);
  attr.set(new TextEncoder().encode("vionet_steer"), 48); // prog_name (16 bytes)
  const fd = Number(libc.sys.bpf(SYS_bpf, BPF_PROG_LOAD, attr, ATTR_SIZE));
  if (fd < 0) {
    const err = libc.errno();
    const end = log.indexOf(0);
    const text = new TextDecoder().decode(log.subarray(0, end < 0 ? log.length : end)).trim();
    throw new SteeringError(
      `cannot load the tap's steering program: bpf(BPF_PROG_LOAD): ${libc.errnoName(err)}` +
        (err === libc.Errno.EPERM ? " (needs CAP_BPF where unprivileged eBPF is off)" : "") +
        (text ? `; verifier: ${text}` : ""),
    );
  }
  return fd;
}

/**
 * Attaches the steering program to the tap that `tapFd` is a queue of (the
 * program is the device's, shared by every queue) and closes the program's
 * descriptor. Throws {@link SteeringError}.
 */
export function attachSteering(tapFd: number): void {
  const prog = loadSteeringProgram();
  try {
    const arg = new Uint8Array(4);
    new DataView(arg.buffer).setInt32(0, prog, true);
    if (libc.sys.ioctl(tapFd, TUNSETSTEERINGEBPF, arg) !== 0) {
      throw new SteeringError(
        `cannot attach the steering program to the tap: ioctl(TUNSETSTEERINGEBPF): ${
          libc.errnoName(libc.errno())
        }`,
      );
    }
  } finally {
    libc.closeQuietly(prog);
  }
}

/**
 * Runs the loaded program `progFd` on `frame` in the kernel
 * (BPF_PROG_TEST_RUN) and returns its result: how the tests check that the
 * program computes {@link flowHash}.
 */
export function testRun(progFd: number, frame: Uint8Array): number {
  // A socket filter's test run takes the first 14 bytes as the Ethernet
  // header and runs with the packet starting after them; tun runs the program
  // with the packet starting at the frame's own Ethernet header. So a dummy
  // header goes in front.
  const attr = new Uint8Array(ATTR_SIZE);
  const v = new DataView(attr.buffer);
  const data = new Uint8Array(ETH_HLEN + frame.byteLength);
  data.set(frame, ETH_HLEN);
  v.setUint32(0, progFd, true); // test.prog_fd
  v.setUint32(4, 0, true); // retval (out)
  v.setUint32(8, data.byteLength, true); // data_size_in
  v.setUint32(12, 0, true); // data_size_out
  v.setBigUint64(16, pointerValue(data), true); // data_in
  v.setBigUint64(24, 0n, true); // data_out
  v.setUint32(32, 1, true); // repeat
  if (Number(libc.sys.bpf(SYS_bpf, BPF_PROG_TEST_RUN, attr, ATTR_SIZE)) !== 0) {
    throw new SteeringError(`bpf(BPF_PROG_TEST_RUN): ${libc.errnoName(libc.errno())}`);
  }
  return v.getUint32(4, true);
}
