/**
 * A small pcapng reader for the tests, written from the format's draft
 * (draft-ietf-opsawg-pcapng), independent of `parent/io/pcapng.ts`: it
 * checks every block's framing (both lengths, 4-byte alignment, the
 * section's byte-order magic) and decodes the blocks vionet writes.
 */

export interface PcapngInterface {
  linkType: number;
  snapLen: number;
  name: string | null;
  description: string | null;
}

export interface PcapngPacket {
  interfaceId: number;
  /** Microseconds since the epoch (if_tsresol 6, the default). */
  timestampUs: number;
  data: Uint8Array;
  origLen: number;
  /** epb_flags, or null when absent. */
  flags: number | null;
  comments: string[];
}

export interface PcapngFile {
  userAppl: string | null;
  interfaces: PcapngInterface[];
  packets: PcapngPacket[];
}

const decoder = new TextDecoder("utf-8", { fatal: true });

/** Options from `at` to `end`: code → values. Throws on a malformed list. */
function readOptions(
  v: DataView,
  u8: Uint8Array,
  at: number,
  end: number,
): Map<number, Uint8Array[]> {
  const out = new Map<number, Uint8Array[]>();
  while (at < end) {
    if (at + 4 > end) throw new Error(`option header at ${at} runs past the block`);
    const code = v.getUint16(at, true);
    const len = v.getUint16(at + 2, true);
    if (code === 0) {
      if (len !== 0) throw new Error("opt_endofopt with a length");
      return out;
    }
    const padded = (len + 3) & ~3;
    if (at + 4 + padded > end) throw new Error(`option ${code} runs past the block`);
    const list = out.get(code) ?? [];
    list.push(u8.slice(at + 4, at + 4 + len));
    out.set(code, list);
    at += 4 + padded;
  }
  return out;
}

/** Parses a whole little-endian pcapng file of one section. Throws naming what is wrong. */
export function readPcapng(bytes: Uint8Array): PcapngFile {
  const v = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const file: PcapngFile = { userAppl: null, interfaces: [], packets: [] };
  let at = 0;
  let sections = 0;
  while (at < bytes.length) {
    if (at + 12 > bytes.length) throw new Error(`a truncated block at ${at}`);
    const type = v.getUint32(at, true);
    const len = v.getUint32(at + 4, true);
    if (len % 4 !== 0 || len < 12 || at + len > bytes.length) {
      throw new Error(`block at ${at}: bad length ${len}`);
    }
    if (v.getUint32(at + len - 4, true) !== len) {
      throw new Error(`block at ${at}: trailing length differs`);
    }
    const end = at + len - 4;
    switch (type) {
      case 0x0a0d0d0a: {
        if (v.getUint32(at + 8, true) !== 0x1a2b3c4d) {
          throw new Error("not a little-endian section");
        }
        if (v.getUint16(at + 12, true) !== 1) throw new Error("not pcapng version 1");
        const opts = readOptions(v, bytes, at + 24, end);
        const appl = opts.get(4)?.[0];
        file.userAppl = appl ? decoder.decode(appl) : null;
        sections++;
        break;
      }
      case 1: {
        const opts = readOptions(v, bytes, at + 16, end);
        const text = (code: number) => {
          const b = opts.get(code)?.[0];
          return b ? decoder.decode(b) : null;
        };
        file.interfaces.push({
          linkType: v.getUint16(at + 8, true),
          snapLen: v.getUint32(at + 12, true),
          name: text(2),
          description: text(3),
        });
        break;
      }
      case 6: {
        const interfaceId = v.getUint32(at + 8, true);
        if (interfaceId >= file.interfaces.length) {
          throw new Error(`packet at ${at} names interface ${interfaceId}, not described`);
        }
        const capLen = v.getUint32(at + 20, true);
        const origLen = v.getUint32(at + 24, true);
        if (capLen > origLen) throw new Error(`packet at ${at}: captured more than its length`);
        const dataEnd = at + 28 + ((capLen + 3) & ~3);
        if (dataEnd > end) throw new Error(`packet at ${at}: data runs past the block`);
        const opts = readOptions(v, bytes, dataEnd, end);
        const flags = opts.get(2)?.[0];
        file.packets.push({
          interfaceId,
          timestampUs: v.getUint32(at + 12, true) * 0x1_0000_0000 + v.getUint32(at + 16, true),
          data: bytes.slice(at + 28, at + 28 + capLen),
          origLen,
          flags: flags ? new DataView(flags.buffer).getUint32(0, true) : null,
          comments: (opts.get(1) ?? []).map((c) => decoder.decode(c)),
        });
        break;
      }
      default:
        throw new Error(`block at ${at}: type 0x${type.toString(16)} is not one vionet writes`);
    }
    at += len;
  }
  if (sections !== 1) throw new Error(`${sections} section headers, not 1`);
  return file;
}

/** The direction bits of epb_flags: 1 inbound, 2 outbound. */
export function direction(p: PcapngPacket): "inbound" | "outbound" | "unknown" {
  const d = (p.flags ?? 0) & 3;
  return d === 1 ? "inbound" : d === 2 ? "outbound" : "unknown";
}

/** Fields of a comment `vnet_hdr k=v ...`. */
export function vnetFields(comment: string): Record<string, string> {
  if (!comment.startsWith("vnet_hdr ")) throw new Error(`not a vnet_hdr comment: ${comment}`);
  return Object.fromEntries(
    comment.slice(9).split(" ").map((kv) => kv.split("=", 2) as [string, string]),
  );
}

/** `tcpdump -r FILE ARGS` (-nn): its lines; throws when it fails. */
export async function tcpdumpRead(path: string, args: string[] = []): Promise<string[]> {
  const out = await new Deno.Command("tcpdump", {
    args: ["-r", path, "-nn", ...args],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const err = new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`tcpdump -r ${path} failed: ${err}`);
  return new TextDecoder().decode(out.stdout).split("\n").filter((l) => l !== "");
}

/** Whether tcpdump is installed (scripts/setup.sh --test). */
export function haveTcpdump(): boolean {
  try {
    new Deno.Command("tcpdump", { args: ["--version"], stdout: "null", stderr: "null" })
      .outputSync();
    return true;
  } catch {
    return false;
  }
}
