/**
 * `--pcap` against a real guest: the daemon starts with capture off; frames
 * sent then are not in the file. `POST /capture?state=on` on the metrics
 * socket starts it; a transfer of random data each way (sha256 known at both
 * ends) is captured, and the TCP stream reassembled from the file's frames
 * hashes to the same sha256 in each direction. Every frame has its
 * direction (outbound: guest to tap; inbound: tap to guest) and a vnet_hdr
 * comment; the guest's TSO superframes carry gso_type TCPV4, a gso_size,
 * NEEDS_CSUM with csum_start/csum_offset pointing at the TCP checksum;
 * received frames carry num_buffers. `state=off` stops it: frames after
 * that are not in the file. `tcpdump -r` reads the same number of frames as
 * the test's reader and the daemon's counters (GET /capture, /metrics,
 * SIGUSR2). Bad requests get 400 with the reason.
 */

import assert from "node:assert/strict";
import { GUEST_IP, HOST_IP, Rig, rigUnavailable } from "./vionet_rig.ts";
import {
  direction,
  haveTcpdump,
  type PcapngPacket,
  readPcapng,
  tcpdumpRead,
  vnetFields,
} from "../parent/io/pcapng_reader.ts";
import { parseExposition, valueOf } from "../parent/control/exposition_parser.ts";

const unavailable = rigUnavailable() ??
  (haveTcpdump() ? undefined : "needs tcpdump (scripts/setup.sh --test)");

/** One HTTP/1.1 request on the unix socket; status and body. */
async function http(
  path: string,
  method: string,
  target: string,
  body = "",
): Promise<{ status: number; body: string }> {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    const bytes = new TextEncoder().encode(body);
    await conn.write(new TextEncoder().encode(
      `${method} ${target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: ${bytes.length}\r\n\r\n${body}`,
    ));
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
    }
    const text = new TextDecoder().decode(new Uint8Array(chunks.flatMap((c) => [...c])));
    const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(text)?.[1]);
    return { status, body: text.slice(text.indexOf("\r\n\r\n") + 4) };
  } finally {
    try {
      conn.close();
    } catch { /* closed */ }
  }
}

interface Status {
  state: string;
  packets: number;
  txPackets: number;
  rxPackets: number;
  bytes: number;
  fileBytes: number;
  droppedBehind: number;
  droppedOverMax: number;
}

async function status(path: string): Promise<Status> {
  const r = await http(path, "GET", "/capture");
  assert.equal(r.status, 200, r.body);
  return JSON.parse(r.body);
}

/** Waits until the writer has taken everything (the packet count stops moving). */
async function settled(path: string): Promise<Status> {
  let last = await status(path);
  for (let i = 0; i < 50; i++) {
    await new Promise((r) => setTimeout(r, 100));
    const now = await status(path);
    if (now.packets === last.packets && now.fileBytes === last.fileBytes) return now;
    last = now;
  }
  return last;
}

/** IPv4 TCP fields of an Ethernet frame, or null. */
function tcpOf(f: Uint8Array) {
  const v = new DataView(f.buffer, f.byteOffset, f.byteLength);
  if (f.length < 54 || v.getUint16(12) !== 0x0800 || f[23] !== 6) return null;
  const ihl = (f[14] & 15) * 4;
  const t = 14 + ihl;
  const dataOff = (f[t + 12] >> 4) * 4;
  const totalLen = v.getUint16(16);
  return {
    src: f.slice(26, 30).join("."),
    dst: f.slice(30, 34).join("."),
    sport: v.getUint16(t),
    dport: v.getUint16(t + 2),
    seq: v.getUint32(t + 4),
    l4: t,
    payload: f.subarray(t + dataOff, 14 + totalLen),
  };
}

/**
 * The largest TCP stream from `src` to `dst` among `packets`, reassembled by
 * sequence number: its bytes (every byte must have been captured).
 */
function reassemble(packets: PcapngPacket[], src: string, dst: string): Uint8Array {
  const byFlow = new Map<string, Array<{ seq: number; payload: Uint8Array }>>();
  for (const p of packets) {
    const t = tcpOf(p.data);
    if (!t || t.src !== src || t.dst !== dst || t.payload.length === 0) continue;
    const key = `${t.sport}>${t.dport}`;
    if (!byFlow.has(key)) byFlow.set(key, []);
    byFlow.get(key)!.push({ seq: t.seq, payload: t.payload });
  }
  let best: Array<{ seq: number; payload: Uint8Array }> = [];
  for (const segs of byFlow.values()) {
    const bytes = segs.reduce((n, s) => n + s.payload.length, 0);
    if (bytes > best.reduce((n, s) => n + s.payload.length, 0)) best = segs;
  }
  assert.ok(best.length > 0, `no TCP data from ${src} to ${dst} in the capture`);
  const first = best.reduce((m, s) => Math.min(m, s.seq), Infinity);
  let end = 0;
  for (const s of best) end = Math.max(end, ((s.seq - first) >>> 0) + s.payload.length);
  const out = new Uint8Array(end);
  const seen = new Uint8Array(end);
  for (const s of best) {
    const at = (s.seq - first) >>> 0;
    out.set(s.payload, at);
    seen.fill(1, at, at + s.payload.length);
  }
  const hole = seen.indexOf(0);
  assert.equal(hole, -1, `the captured stream ${src} -> ${dst} misses byte ${hole} of ${end}`);
  return out;
}

async function sha256(bytes: Uint8Array): Promise<string> {
  const d = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return [...new Uint8Array(d)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

Deno.test({
  name: "--pcap: a guest's transfers both ways are captured while on and not while off, " +
    "reassemble to the sent sha256, with directions and vnet_hdr comments tcpdump and the " +
    "counters agree on",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vionet-capture-" });
    await Deno.chmod(dir, 0o755);
    const sock = `${dir}/metrics.sock`;
    const pcap = `${dir}/capture.pcapng`;
    const MIB = 4;
    let sums: { up: string; down: string } | null = null;
    let final: Status | null = null;
    try {
      await Rig.run({
        daemonArgs: [
          "--metrics",
          sock,
          "--pcap",
          pcap,
          "--pcap-start",
          "off",
          "--pcap-max",
          "512M",
        ],
      }, async (rig) => {
        await rig.daemon.waitFor(/capture off \(POST \/capture\?state=on starts it\)/, 10_000);
        const { guest } = await rig.bootGuest();
        await rig.daemon.waitFor(/queues running/, 30_000);

        // Off: traffic is not captured.
        const ping = await guest.run(`ping -c 3 -W 5 ${HOST_IP} >/dev/null`, 30_000);
        assert.equal(ping.status, 0, ping.output);
        const s = await settled(sock);
        assert.equal(s.state, "off");
        assert.equal(s.packets, 0, "frames were captured while capture was off");

        // Bad requests: 400 with the reason; nothing changes.
        for (
          const [target, body, why] of [
            ["/capture?state=maybe", "", /must be on or off/],
            ["/capture", "", /say which state/],
            ["/capture?mode=on", "", /unknown parameter "mode"/],
            ["/capture?state=on", "state=off", /different states/],
          ] as const
        ) {
          const r = await http(sock, "POST", target, body);
          assert.equal(r.status, 400, `${target}: ${r.body}`);
          assert.match(JSON.parse(r.body).error, why);
        }
        assert.equal((await status(sock)).state, "off");

        const on = await http(sock, "POST", "/capture?state=on");
        assert.equal(on.status, 200, on.body);
        assert.equal(JSON.parse(on.body).state, "on");
        await rig.daemon.waitFor(/capture started/, 5000);

        const up = await rig.sendFromGuest(guest, MIB);
        assert.equal(up.receivedSha256, up.sentSha256, "guest -> host");
        const down = await rig.sendToGuest(guest, MIB);
        assert.equal(down.receivedSha256, down.sentSha256, "host -> guest");
        sums = { up: up.sentSha256, down: down.sentSha256 };

        const off = await http(sock, "POST", "/capture", JSON.stringify({ state: "off" }));
        assert.equal(off.status, 200, off.body);
        const atOff = await settled(sock);
        assert.equal(atOff.state, "off");
        assert.equal(atOff.droppedBehind, 0, "the capture writer fell behind");
        assert.ok(atOff.txPackets > 100 && atOff.rxPackets > 100, JSON.stringify(atOff));
        // Off again: more traffic, no more frames.
        const ping2 = await guest.run(`ping -c 3 -W 5 ${HOST_IP} >/dev/null`, 30_000);
        assert.equal(ping2.status, 0, ping2.output);
        final = await settled(sock);
        assert.equal(final.packets, atOff.packets, "frames were captured after state=off");

        // The same counters in /metrics and in the SIGUSR2 dump.
        const m = await http(sock, "GET", "/metrics");
        const e = parseExposition(m.body, { counterSuffix: true, requireHelp: true });
        assert.equal(
          valueOf(e, "vionet_capture_packets_total", { direction: "tx" }),
          final.txPackets,
        );
        assert.equal(
          valueOf(e, "vionet_capture_packets_total", { direction: "rx" }),
          final.rxPackets,
        );
        assert.equal(valueOf(e, "vionet_capture_dropped_total", { reason: "behind" }), 0);
        assert.equal(valueOf(e, "vionet_capture_active"), 0);
        assert.equal(valueOf(e, "vionet_capture_file_bytes"), final.fileBytes);
        const from = rig.daemon.lines().length;
        rig.daemon.signal("SIGUSR2");
        const line = await rig.daemon.waitFor(/\[stats\] info: capture \{/, 10_000, from);
        assert.equal(JSON.parse(line.slice(line.indexOf("{"))).packets, final.packets);
      });

      // The daemon is gone and the file closed: read it back.
      const bytes = await Deno.readFile(pcap);
      assert.equal(bytes.length, final!.fileBytes, "file size differs from the counter");
      const file = readPcapng(bytes);
      assert.equal(file.interfaces.length >= 1, true);
      assert.equal(file.packets.length, final!.packets);
      const lines = await tcpdumpRead(pcap);
      assert.equal(lines.length, final!.packets, "tcpdump -r reads a different number of frames");

      const out = file.packets.filter((p) => direction(p) === "outbound");
      const inb = file.packets.filter((p) => direction(p) === "inbound");
      assert.equal(out.length + inb.length, file.packets.length, "a frame without a direction");
      assert.equal(out.length, final!.txPackets);
      assert.equal(inb.length, final!.rxPackets);
      for (const p of file.packets) {
        assert.equal(p.comments.length, 1, "every frame has its vnet_hdr comment");
        assert.equal(p.data.length, p.origLen, "frames are captured whole");
      }
      // Directions by address: outbound frames are the guest's, inbound ones the host's.
      for (const p of out) {
        const t = tcpOf(p.data);
        if (t) assert.equal(t.src, GUEST_IP, "an outbound TCP frame not from the guest");
      }
      for (const p of inb) {
        const t = tcpOf(p.data);
        if (t) assert.equal(t.dst, GUEST_IP, "an inbound TCP frame not to the guest");
      }

      // The guest's TSO superframes as it sent them.
      const tso = out.filter((p) => vnetFields(p.comments[0]).gso_type === "TCPV4");
      assert.ok(tso.length > 0, "no TSO frame from the guest");
      for (const p of tso) {
        const f = vnetFields(p.comments[0]);
        const t = tcpOf(p.data)!;
        assert.ok(t, "a TCPV4 frame that is not IPv4 TCP");
        assert.ok(Number(f.gso_size) > 0 && Number(f.gso_size) <= 1460, f.gso_size);
        assert.equal(f.flags, "NEEDS_CSUM");
        assert.equal(Number(f.csum_start), t.l4, "csum_start is not the TCP header");
        assert.equal(Number(f.csum_offset), 16, "csum_offset is not the TCP checksum");
        assert.ok(!("num_buffers" in f), "num_buffers is for received frames only");
      }
      assert.ok(tso.some((p) => p.data.length > 1514), "no superframe longer than the MTU");
      // Received frames: num_buffers always, GSO ones with their type.
      for (const p of inb) assert.ok(Number(vnetFields(p.comments[0]).num_buffers) >= 1);
      assert.ok(
        inb.some((p) => vnetFields(p.comments[0]).gso_type === "TCPV4" && p.data.length > 1514),
        "no GSO frame towards the guest (GUEST_TSO4)",
      );

      // The content: each direction's stream, rebuilt from the capture, is what was sent.
      assert.equal(
        await sha256(reassemble(out, GUEST_IP, HOST_IP)),
        sums!.up,
        "guest -> host stream",
      );
      assert.equal(
        await sha256(reassemble(inb, HOST_IP, GUEST_IP)),
        sums!.down,
        "host -> guest stream",
      );
      console.log(
        `  ${file.packets.length} frames (${out.length} out, ${tso.length} TSO; ${inb.length} in), ` +
          `${bytes.length} bytes`,
      );
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});

Deno.test({
  name: "--pcap with --queues 2 and --pcap-snaplen: one file, one interface per pair, frames " +
    "of both pairs both ways, each cut to the snap length with its length kept",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vionet-capture-mq-" });
    await Deno.chmod(dir, 0o755);
    const pcap = `${dir}/mq.pcapng`;
    let packetsAtEnd = -1;
    try {
      await Rig.run({
        daemonArgs: ["--queues", "2", "--pcap", pcap, "--pcap-snaplen", "128"],
      }, async (rig) => {
        const { guest } = await rig.bootGuest({ cpus: 2, queues: 2 });
        await rig.daemon.waitFor(/queues running/, 30_000);
        const up = await rig.iperf3(guest, { reverse: false, seconds: 3, parallel: 4 });
        const down = await rig.iperf3(guest, { reverse: true, seconds: 3, parallel: 4 });
        assert.ok(up.bytes > 0 && down.bytes > 0);
        const from = rig.daemon.lines().length;
        rig.daemon.signal("SIGUSR2");
        const line = await rig.daemon.waitFor(/\[stats\] info: capture \{/, 10_000, from);
        const s = JSON.parse(line.slice(line.indexOf("{")));
        assert.equal(s.state, "on");
        assert.ok(s.packets > 0);
        packetsAtEnd = s.packets;
      });
      const file = readPcapng(await Deno.readFile(pcap));
      assert.deepEqual(file.interfaces.map((i) => [i.name?.replace(/^.*\//, ""), i.snapLen]), [
        ["pair0", 128],
        ["pair1", 128],
      ]);
      // What the rings held at the stop is written too: at least what SIGUSR2 counted.
      assert.ok(file.packets.length >= packetsAtEnd, `${file.packets.length} < ${packetsAtEnd}`);
      assert.equal((await tcpdumpRead(pcap)).length, file.packets.length);
      for (const pair of [0, 1]) {
        for (const dir of ["outbound", "inbound"] as const) {
          const n = file.packets.filter((p) =>
            p.interfaceId === pair && direction(p) === dir
          ).length;
          assert.ok(n > 0, `no ${dir} frame on pair ${pair}`);
        }
      }
      assert.ok(file.packets.every((p) => p.data.length <= 128 && p.data.length <= p.origLen));
      assert.ok(file.packets.some((p) => p.origLen > 1514), "no superframe's length kept");
      for (const p of file.packets) assert.equal(p.comments.length, 1);
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
