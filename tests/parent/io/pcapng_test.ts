/**
 * The pcapng encoder (parent/io/pcapng.ts): blocks read back through the
 * test's own reader (pcapng_reader.ts) field by field, and through
 * `tcpdump -r`; the virtio_net_hdr comment names every field.
 */

import assert from "node:assert/strict";
import {
  DIR_RX,
  DIR_TX,
  EPB_INBOUND,
  EPB_OUTBOUND,
  epbLength,
  interfaceDescriptionBlock,
  LINKTYPE_ETHERNET,
  sectionHeaderBlock,
  vnetHeaderComment,
  writeEpb,
} from "../../../parent/io/pcapng.ts";
import { haveTcpdump, readPcapng, tcpdumpRead, vnetFields } from "./pcapng_reader.ts";
import { udpFrame, vnetHdr } from "./capture_frames.ts";

interface TestPacket {
  iface: number;
  ts: number;
  data: Uint8Array;
  orig?: number;
  dir: number;
  comment: string;
}

function encodeFile(ifaces: number, packets: TestPacket[]): Uint8Array {
  const parts = [
    sectionHeaderBlock("vionet-test"),
    ...Array.from(
      { length: ifaces },
      (_, i) => interfaceDescriptionBlock(`vt0/pair${i}`, `pair ${i}`),
    ),
  ];
  for (const p of packets) {
    const comment = new TextEncoder().encode(p.comment);
    const out = new Uint8Array(epbLength(p.data.length, comment.length) + 8).fill(0xee);
    const n = writeEpb(
      out,
      new DataView(out.buffer),
      4,
      p.iface,
      p.ts,
      p.data,
      p.orig ?? p.data.length,
      p.dir,
      comment,
    );
    assert.equal(n, epbLength(p.data.length, comment.length));
    // Nothing written outside the block.
    assert.deepEqual([...out.subarray(0, 4)], [0xee, 0xee, 0xee, 0xee]);
    assert.deepEqual([...out.subarray(4 + n)], [0xee, 0xee, 0xee, 0xee]);
    parts.push(out.subarray(4, 4 + n));
  }
  const total = parts.reduce((s, b) => s + b.length, 0);
  const file = new Uint8Array(total);
  let at = 0;
  for (const b of parts) {
    file.set(b, at);
    at += b.length;
  }
  return file;
}

const PACKETS: TestPacket[] = [
  { iface: 0, ts: 1_796_600_000_123_456, data: udpFrame(60), dir: DIR_TX, comment: "a" },
  // odd lengths exercise the padding of data and comment
  { iface: 1, ts: 1_796_600_000_123_999, data: udpFrame(61, 0x11), dir: DIR_RX, comment: "abc" },
  { iface: 0, ts: 2 ** 32 + 5, data: udpFrame(1514, 0x22), dir: DIR_RX, comment: "" },
  {
    iface: 1,
    ts: 1_796_600_001_000_000,
    data: udpFrame(999, 0x33),
    dir: DIR_TX,
    comment: "vnet_hdr x=1",
  },
];

Deno.test("pcapng: a section, interfaces and packets read back field by field", () => {
  const file = readPcapng(encodeFile(2, PACKETS));
  assert.equal(file.userAppl, "vionet-test");
  assert.deepEqual(file.interfaces, [
    { linkType: LINKTYPE_ETHERNET, snapLen: 0, name: "vt0/pair0", description: "pair 0" },
    { linkType: LINKTYPE_ETHERNET, snapLen: 0, name: "vt0/pair1", description: "pair 1" },
  ]);
  assert.equal(file.packets.length, PACKETS.length);
  file.packets.forEach((p, i) => {
    const want = PACKETS[i];
    assert.equal(p.interfaceId, want.iface, `packet ${i}`);
    assert.equal(p.timestampUs, want.ts, `packet ${i}`);
    assert.deepEqual(p.data, want.data, `packet ${i}`);
    assert.equal(p.origLen, want.data.length);
    assert.equal(p.flags, want.dir === DIR_RX ? EPB_INBOUND : EPB_OUTBOUND, `packet ${i}`);
    assert.deepEqual(p.comments, want.comment === "" ? [] : [want.comment]);
  });
});

Deno.test("pcapng: a frame captured short keeps its original length", () => {
  const file = readPcapng(
    encodeFile(1, [{ iface: 0, ts: 1, data: udpFrame(100), orig: 9000, dir: DIR_TX, comment: "" }]),
  );
  assert.equal(file.packets[0].data.length, 100);
  assert.equal(file.packets[0].origLen, 9000);
});

Deno.test("pcapng: the reader refuses a block whose trailing length differs (it can fail)", () => {
  const bytes = encodeFile(1, [PACKETS[0]]);
  bytes[bytes.length - 4] ^= 4;
  assert.throws(() => readPcapng(bytes), /trailing length/);
});

Deno.test({
  name: "pcapng: tcpdump -r reads every packet, in order, with its addresses and lengths",
  ignore: !haveTcpdump(),
  async fn() {
    const path = await Deno.makeTempFile({ suffix: ".pcapng" });
    try {
      await Deno.writeFile(path, encodeFile(2, PACKETS));
      const lines = await tcpdumpRead(path, ["-e", "-tt"]);
      assert.equal(lines.length, PACKETS.length, lines.join("\n"));
      lines.forEach((line, i) => {
        const p = PACKETS[i];
        assert.match(line, /^\d+\.\d{6} 52:54:00:00:00:01 > 52:54:00:00:00:02/, line);
        assert.ok(
          line.startsWith(`${Math.floor(p.ts / 1e6)}.${String(p.ts % 1e6).padStart(6, "0")} `),
          line,
        );
        assert.match(
          line,
          new RegExp(
            `length ${p.data.length}: 198\\.18\\.0\\.1\\.4000 > 198\\.18\\.0\\.2\\.5000: UDP, length ${
              p.data.length - 42
            }`,
          ),
          line,
        );
      });
    } finally {
      await Deno.remove(path);
    }
  },
});

Deno.test("vnetHeaderComment names every field, ECN and unknown values; num_buffers only on RX", async (t) => {
  const cases: Array<[string, Uint8Array, number, string]> = [
    [
      "TSO4 from the guest",
      vnetHdr({
        flags: 1,
        gsoType: 1,
        hdrLen: 66,
        gsoSize: 1448,
        csumStart: 34,
        csumOffset: 16,
        numBuffers: 7,
      }),
      DIR_TX,
      "vnet_hdr flags=NEEDS_CSUM gso_type=TCPV4 hdr_len=66 gso_size=1448 csum_start=34 csum_offset=16",
    ],
    [
      "TSO6 with ECN to the guest",
      vnetHdr({
        flags: 1,
        gsoType: 0x84,
        hdrLen: 86,
        gsoSize: 1428,
        csumStart: 54,
        csumOffset: 16,
        numBuffers: 3,
      }),
      DIR_RX,
      "vnet_hdr flags=NEEDS_CSUM gso_type=TCPV6|ECN hdr_len=86 gso_size=1428 csum_start=54 csum_offset=16 num_buffers=3",
    ],
    [
      "a plain frame",
      vnetHdr({ numBuffers: 1 }),
      DIR_RX,
      "vnet_hdr flags=0 gso_type=NONE hdr_len=0 gso_size=0 csum_start=0 csum_offset=0 num_buffers=1",
    ],
    [
      "DATA_VALID, UDP_L4, unknown bits",
      vnetHdr({ flags: 2 | 4 | 0x40, gsoType: 5 }),
      DIR_RX,
      "vnet_hdr flags=DATA_VALID|RSC_INFO|0x40 gso_type=UDP_L4 hdr_len=0 gso_size=0 csum_start=0 csum_offset=0 num_buffers=0",
    ],
    [
      "an unknown gso_type",
      vnetHdr({ gsoType: 9 }),
      DIR_TX,
      "vnet_hdr flags=0 gso_type=0x9 hdr_len=0 gso_size=0 csum_start=0 csum_offset=0",
    ],
  ];
  for (const [name, hdr, dir, want] of cases) {
    await t.step(name, () => {
      const padded = new Uint8Array(20);
      padded.set(hdr, 5);
      const text = vnetHeaderComment(padded, 5, dir);
      assert.equal(text, want);
      vnetFields(text); // the reader's parse works on it
    });
  }
});
