/**
 * The Linux kernel as the oracle for device/segment.ts.
 *
 * Topology, all in two throw-away namespaces (addresses from 198.18.0.0/15 and
 * the IPv6 benchmarking prefix 2001:2::/48):
 *
 *     this process ── tap (IFF_VNET_HDR) ──[router ns, forwarding on]── vr ═══ vp ──[peer ns]
 *                      198.18.0.1            198.18.1.1                       198.18.1.2
 *
 * Each GSO frame (12-byte virtio_net_hdr with NEEDS_CSUM, GSO TCPV4/TCPV6)
 * written to the tap is forwarded out of `vr`, which has TSO, GSO and TX
 * checksumming off, so the kernel segments it in software (tcp_gso_segment)
 * and computes every checksum. tcpdump captures the segments arriving on `vp`
 * (GRO off there). The same frame goes through our processTx() with a sink that
 * takes no offloads, and the two segment lists are compared field by field
 * from the IP header on. Forwarding decrements the TTL / hop limit (and so
 * changes the IPv4 header checksum): our segments are adjusted the same way
 * before the comparison. The Ethernet header is rewritten by forwarding and
 * not compared. A TCP checksum of 0 and 0xffff are the same value.
 *
 * Needs root, /dev/net/tun, ip, ethtool and tcpdump; skips with the reason
 * otherwise.
 */

import assert from "node:assert/strict";
import { createTap, type Tap, VNET_HDR_LEN } from "../../parent/host/tap.ts";
import { exec, type Netns, tapTestsUnavailable, withNetns } from "../net_ns.ts";
import { createNetOffloadContext, processTx } from "../../device/offload.ts";
import {
  createNetHdr,
  NET_OFFLOAD_CSUM,
  NET_OFFLOAD_TSO4,
  NET_OFFLOAD_TSO6,
  NET_OFFLOAD_TSO_ECN,
  NetDrop,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_ECN,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_TCPV6,
  writeNetHdr,
} from "../../device/net_header.ts";
import {
  buildFrame,
  type FrameSpec,
  get16,
  IP4_A,
  IP4_B,
  IP6_A,
  IP6_B,
  ipv4HeaderChecksumOk,
  l4ChecksumOk,
  prng,
  randomBytes,
  refSum,
  TCP_ACK,
  TCP_CWR,
  TCP_ECE,
  TCP_FIN,
  TCP_PSH,
  tcpTimestampOption,
} from "./frames.ts";

const skip = tapTestsUnavailable(["ip", "ethtool", "tcpdump"], "iproute2 ethtool tcpdump");
if (skip) console.warn(`tests/device/segment_oracle_test.ts skipped: ${skip}`);

/** One oracle case: a frame spec (partial checksum is forced) and its GSO header. */
interface OracleCase {
  name: string;
  spec: FrameSpec;
  mss: number;
  ecn?: boolean;
}

const TS = tcpTimestampOption(0x01020304, 0x0a0b0c0d);
const MTU = 9000;

function cases(): OracleCase[] {
  const rand = prng(0x5eed);
  const pay = (n: number) => randomBytes(rand, n);
  const v6 = { ipVersion: 6 as const, src: IP6_A, dst: IP6_B };
  return [
    { name: "IPv4, last segment shorter", spec: { payload: pay(4000) }, mss: 1448 },
    {
      name: "IPv4, FIN+PSH+CWR+ECE with the ECN bit, ID wraps",
      spec: {
        payload: pay(5000),
        tcpFlags: TCP_ACK | TCP_PSH | TCP_FIN | TCP_CWR | TCP_ECE,
        tos: 0x02,
        ipId: 0xfffe,
      },
      mss: 1448,
      ecn: true,
    },
    {
      name: "IPv4, CWR without the ECN bit",
      spec: { payload: pay(3000), tcpFlags: TCP_ACK | TCP_CWR | TCP_PSH },
      mss: 1000,
    },
    {
      name: "IPv4, timestamps and IP options (NOPs), payload a multiple of MSS",
      spec: { payload: pay(2 * 1436), tcpOptions: TS, ipOptions: new Uint8Array([1, 1, 1, 1]) },
      mss: 1436,
    },
    {
      name: "IPv4, payload within one MSS (not really GSO)",
      spec: { payload: pay(700), tcpFlags: TCP_ACK | TCP_PSH | TCP_CWR },
      mss: 1448,
    },
    { name: "IPv4, jumbo MSS, 60000 bytes", spec: { payload: pay(60000) }, mss: 8948 },
    { name: "IPv4, small MSS 100", spec: { payload: pay(1050), seq: 0xffffff00 }, mss: 100 },
    {
      name: "IPv6, FIN+PSH, timestamps",
      spec: { ...v6, payload: pay(5000), tcpFlags: TCP_ACK | TCP_PSH | TCP_FIN, tcpOptions: TS },
      mss: 1428,
    },
    {
      name: "IPv6, CWR with the ECN bit, traffic class ECT(1)",
      spec: { ...v6, payload: pay(4321), tcpFlags: TCP_ACK | TCP_CWR | TCP_ECE, tos: 0x01 },
      mss: 1200,
      ecn: true,
    },
    {
      name: "IPv6, hop-by-hop and destination options headers",
      spec: {
        ...v6,
        ipv6Ext: [
          { type: 0, body: new Uint8Array([1, 4, 0, 0, 0, 0]) },
          { type: 60, body: new Uint8Array([1, 12, ...new Array(12).fill(0)]) },
        ],
        payload: pay(3500),
        tcpFlags: TCP_ACK | TCP_PSH,
      },
      mss: 1400,
    },
  ];
}

/** Frames in a classic pcap file (tcpdump -w), link type Ethernet. */
function parsePcap(file: Uint8Array): Uint8Array[] {
  const view = new DataView(file.buffer, file.byteOffset, file.byteLength);
  const magic = view.getUint32(0, true);
  const le = magic === 0xa1b2c3d4 || magic === 0xa1b23c4d;
  if (!le && view.getUint32(0, false) !== 0xa1b2c3d4 && view.getUint32(0, false) !== 0xa1b23c4d) {
    throw new Error(`not a pcap file (magic 0x${magic.toString(16)})`);
  }
  assert.equal(view.getUint32(20, le), 1, "pcap link type must be Ethernet");
  const frames: Uint8Array[] = [];
  for (let at = 24; at + 16 <= file.length;) {
    const incl = view.getUint32(at + 8, le);
    frames.push(file.slice(at + 16, at + 16 + incl));
    at += 16 + incl;
  }
  return frames;
}

/** Sets up router ns `r` (tap, forwarding, vr) and peer ns `p` (vp). */
async function setUp(r: Netns, p: Netns, tap: Tap): Promise<void> {
  await exec(["ip", "link", "set", "dev", tap.name, "netns", r.name]);
  await r.exec(["ip", "link", "add", "vr", "type", "veth", "peer", "name", "vp", "netns", p.name]);
  for (const [ns, dev] of [[r, "vr"], [p, "vp"]] as const) {
    await ns.exec(["ip", "link", "set", "dev", dev, "mtu", String(MTU), "up"]);
  }
  await r.exec(["ip", "link", "set", "dev", tap.name, "mtu", String(MTU), "up"]);
  await r.exec(["ip", "addr", "add", "198.18.0.1/24", "dev", tap.name]);
  await r.exec(["ip", "addr", "add", "2001:2::1/64", "dev", tap.name, "nodad"]);
  await r.exec(["ip", "addr", "add", "198.18.1.1/24", "dev", "vr"]);
  await r.exec(["ip", "addr", "add", "2001:2:0:1::1/64", "dev", "vr", "nodad"]);
  await p.exec(["ip", "addr", "add", "198.18.1.2/24", "dev", "vp"]);
  await p.exec(["ip", "addr", "add", "2001:2:0:1::2/64", "dev", "vp", "nodad"]);
  for (
    const s of [
      "net.ipv4.ip_forward=1",
      "net.ipv6.conf.all.forwarding=1",
      "net.ipv4.conf.all.rp_filter=0",
      `net.ipv4.conf.${tap.name}.rp_filter=0`,
    ]
  ) {
    await r.exec(["sysctl", "-qw", s]);
  }
  // Segment in software with full checksums on the way out; no GRO on the way in.
  await r.exec(["ethtool", "-K", "vr", "tso", "off", "gso", "off", "tx", "off"]);
  await p.exec(["ethtool", "-K", "vp", "gro", "off"]);
  const vpMac = (await p.exec(["cat", "/sys/class/net/vp/address"])).trim();
  await r.exec([
    "ip",
    "neigh",
    "replace",
    "198.18.1.2",
    "lladdr",
    vpMac,
    "dev",
    "vr",
    "nud",
    "permanent",
  ]);
  await r.exec([
    "ip",
    "-6",
    "neigh",
    "replace",
    "2001:2:0:1::2",
    "lladdr",
    vpMac,
    "dev",
    "vr",
    "nud",
    "permanent",
  ]);
}

/** Reads `stream` until `marker` appears (tcpdump's "listening on"), keeping the rest flowing. */
async function waitFor(stream: ReadableStream<Uint8Array>, marker: string): Promise<void> {
  const reader = stream.getReader();
  const dec = new TextDecoder();
  let text = "";
  while (!text.includes(marker)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`tcpdump exited before "${marker}": ${text}`);
    text += dec.decode(value);
  }
  // Drain the rest in the background so the child never blocks on stderr.
  (async () => {
    while (!(await reader.read()).done) { /* discard */ }
  })();
}

/** Our segments of `c`, in order, as the kernel should forward them (TTL/hop limit - 1). */
function ourSegments(c: OracleCase, frame: Uint8Array, l3: number, l4: number): Uint8Array[] {
  const hdr = createNetHdr();
  hdr.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
  hdr.gsoType = (frame[l3] >> 4 === 4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6) |
    (c.ecn ? VIRTIO_NET_HDR_GSO_ECN : 0);
  hdr.gsoSize = c.mss;
  hdr.csumStart = l4;
  hdr.csumOffset = 16;
  const ctx = createNetOffloadContext();
  const host = NET_OFFLOAD_CSUM | NET_OFFLOAD_TSO4 | NET_OFFLOAD_TSO6 | NET_OFFLOAD_TSO_ECN;
  const out: Uint8Array[] = [];
  const r = processTx(ctx, hdr, frame, frame.length, host, 0, (h, bytes, length) => {
    assert.equal(h.gsoType, 0);
    assert.equal(h.flags, 0);
    const s = bytes.slice(0, length);
    if (s[l3] >> 4 === 4) {
      s[l3 + 8]--;
      s[l3 + 10] = 0;
      s[l3 + 11] = 0;
      const c = ~refSum(s, l3, l4) & 0xffff;
      s[l3 + 10] = c >>> 8;
      s[l3 + 11] = c & 0xff;
    } else {
      s[l3 + 7]--;
    }
    out.push(s);
  });
  assert.equal(r, NetDrop.OK, `processTx() dropped ${c.name}: ${r}`);
  return out;
}

/** Compares one kernel segment with ours from the IP header on; returns a difference or "". */
function compare(kernel: Uint8Array, ours: Uint8Array, l3: number, l4: number): string {
  const k = kernel.subarray(14);
  const o = ours.subarray(l3);
  const kl4 = l4 - l3;
  if (k.length !== o.length) return `length ${k.length} != ours ${o.length}`;
  for (let i = 0; i < k.length; i++) {
    if (k[i] === o[i]) continue;
    if (i === kl4 + 16 || i === kl4 + 17) {
      const kc = get16(k, kl4 + 16);
      const oc = get16(o, kl4 + 16);
      if ((kc === 0 || kc === 0xffff) && (oc === 0 || oc === 0xffff)) continue;
    }
    return `byte ${i} of the IP packet: kernel 0x${k[i].toString(16)} ours 0x${o[i].toString(16)}`;
  }
  return "";
}

Deno.test({
  name: "segmentTcp() via processTx() matches the kernel's own GSO, field by field",
  ignore: skip !== undefined,
  sanitizeResources: false,
  fn: () =>
    withNetns((r) =>
      withNetns(async (p) => {
        const tapName = `vo${
          Array.from(
            crypto.getRandomValues(new Uint8Array(3)),
            (b) => b.toString(16).padStart(2, "0"),
          ).join("")
        }`;
        const tap = createTap(tapName, { up: false });
        const pcapPath = await Deno.makeTempFile({ prefix: "vionet-oracle-", suffix: ".pcap" });
        try {
          await setUp(r, p, tap);
          const all = cases();
          const built = all.map((c, i) => {
            const dstMac = tap.macBytes;
            const spec: FrameSpec = {
              ...c.spec,
              dstMac: Array.from(dstMac),
              srcPort: 41000 + i,
              checksum: "partial",
            };
            if ((spec.ipVersion ?? 4) === 4) {
              spec.src = IP4_A;
              spec.dst = IP4_B;
            }
            return buildFrame(spec);
          });
          const ours = all.map((c, i) =>
            ourSegments(c, built[i].frame, built[i].l3Offset, built[i].l4Offset)
          );
          const expected = ours.reduce((n, s) => n + s.length, 0);

          const dump = p.spawn(
            [
              "tcpdump",
              "-n",
              "-i",
              "vp",
              "-Q",
              "in",
              "-U",
              "-s",
              "0",
              "-Z",
              "root",
              "-w",
              pcapPath,
              "-c",
              String(expected),
              // libpcap's "tcp" does not look past IPv6 extension headers: filter by source.
              "src host 198.18.0.2 or src host 2001:2::2",
            ],
            { stdout: "null", stderr: "piped" },
          );
          await waitFor(dump.stderr, "listening on");

          for (const [i, c] of all.entries()) {
            const { frame, l3Offset, l4Offset } = built[i];
            const hdr = createNetHdr();
            hdr.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
            hdr.gsoType =
              (frame[l3Offset] >> 4 === 4 ? VIRTIO_NET_HDR_GSO_TCPV4 : VIRTIO_NET_HDR_GSO_TCPV6) |
              (c.ecn ? VIRTIO_NET_HDR_GSO_ECN : 0);
            hdr.gsoSize = c.mss;
            hdr.hdrLen = built[i].payloadOffset;
            hdr.csumStart = l4Offset;
            hdr.csumOffset = 16;
            const buf = new Uint8Array(VNET_HDR_LEN + frame.length);
            writeNetHdr(hdr, buf, 0);
            buf.set(frame, VNET_HDR_LEN);
            assert.equal(tap.write(buf), buf.length, `tap write of ${c.name}`);
          }

          const timer = setTimeout(() => dump.kill("SIGTERM"), 10_000);
          await dump.status;
          clearTimeout(timer);
          const captured = parsePcap(await Deno.readFile(pcapPath));

          const problems: string[] = [];
          for (const [i, c] of all.entries()) {
            const port = 41000 + i;
            const kernel = captured.filter((f) => {
              const l3 = 14;
              const l4 = f[12] === 0x08 ? l3 + (f[l3] & 0xf) * 4 : l3 + 40 + extLength(f, l3);
              return get16(f, l4) === port;
            });
            const { l3Offset: l3, l4Offset: l4 } = built[i];
            for (const f of kernel) {
              const kl4 = 14 + (l4 - l3);
              if (f[12] === 0x08) {
                assert.ok(ipv4HeaderChecksumOk(f, 14), `${c.name}: kernel IPv4 checksum`);
              }
              assert.ok(l4ChecksumOk(f, 14, kl4, f.length, 6), `${c.name}: kernel TCP checksum`);
            }
            if (kernel.length !== ours[i].length) {
              problems.push(
                `${c.name}: kernel made ${kernel.length} segments, ours ${ours[i].length}`,
              );
              continue;
            }
            kernel.forEach((k, j) => {
              const d = compare(k, ours[i][j], l3, l4);
              if (d) {
                problems.push(`${c.name}, segment ${j}: ${d}`);
              }
            });
          }
          assert.deepEqual(problems, []);
          assert.equal(captured.length, expected);
        } finally {
          tap.close();
          await Deno.remove(pcapPath).catch(() => {});
        }
      })
    ),
});

/** Total length of IPv6 extension headers (hop-by-hop, routing, destination options) after `l3`. */
function extLength(f: Uint8Array, l3: number): number {
  let next = f[l3 + 6];
  let at = l3 + 40;
  while (next === 0 || next === 43 || next === 60) {
    next = f[at];
    at += (f[at + 1] + 1) * 8;
  }
  return at - l3 - 40;
}
