/**
 * The privileged I/O workers (parent/io/writer_worker.ts, io/poller_worker.ts)
 * through parent/control/datapath_host.ts, against a real tap in a throw-away network
 * namespace, with tests/parent/io/fake_device_side.ts playing the device and a
 * mapped memfd standing in for guest memory. Needs root and /dev/net/tun.
 *
 * Network: the tap is created down here, moved into the namespace, given
 * 198.18.0.1/24 with IPv6 off (so the kernel sends nothing on its own), and a
 * permanent neighbour 198.18.0.2 = {@link GUEST_MAC}; frames "from the
 * host" are UDP datagrams a child process in the namespace sends to it.
 */

import assert from "node:assert/strict";
import * as libc from "../../../parent/host/libc.ts";
import { createTap, type Tap } from "../../../parent/host/tap.ts";
import {
  createDatapathBuffers,
  DatapathHost,
  IO_POLLER_OPTIONS,
  IO_WRITER_OPTIONS,
  IO_WRITER_URL,
  IoWorkerPair,
} from "../../../parent/control/datapath_host.ts";
import { RingPool, RINGS_PER_DATAPATH } from "../../../parent/control/ring_pool.ts";
import { IO_PROTOCOL_VERSION, type IoUringMode } from "../../../parent/io/protocol.ts";
import { IoRegions } from "../../../parent/io/regions.ts";
import { createRateLimitBuffer, DIR_TX, RateLimiter } from "../../../parent/io/rate_limiter.ts";
import {
  CTL,
  EV_IO_FAULT,
  EV_KICK_RX,
  EV_KICK_TX,
  EV_RX_DONE,
  EV_RX_STARVED,
  EV_TX_DONE,
  IO_ENDED_BOTH,
  IO_ENDED_POLLER,
  IO_ENDED_WRITER,
  MAX_FRAME_BYTES,
  NET_HDR_BYTES,
  POLLER_ENGINE_IO_URING,
  POLLER_ENGINE_READV,
  RX_PUBLISHED,
  RX_QUEUE,
  RX_STATUS_BAD_POST,
  RX_STATUS_TOO_BIG,
  RX_UNUSED,
  RXF_MERGEABLE,
  RXT_CSUM,
  RXT_MERGEABLE,
  signal,
  TX_MAX_IOV,
  TX_QUEUE,
  TXF_COMPLETE_ONLY,
  WEV_TX,
} from "../../../ipc/datapath.ts";
import type { Logger } from "../../../parent/control/log.ts";
import { exec, type Netns, tapTestsUnavailable, withNetns } from "../../net_ns.ts";
import { FakeDeviceSide, GuestMemory, type Iov, type RxDoneRecord } from "./fake_device_side.ts";

/** The RX used ring the poller publishes into unless a test says otherwise. */
const RX_USED_DEFAULT = {
  ringOffset: (4 << 20) - 0x8000,
  size: 1024,
  eventOffset: (4 << 20) - 0x200,
  eventIdx: true,
};

const LIBC_MODULE = new URL("../../../parent/host/libc.ts", import.meta.url).href;

const skip = tapTestsUnavailable(["ip", "tcpdump"], "iproute2 tcpdump");
if (skip) console.warn(`tests/parent/io/io_workers_test.ts skipped: ${skip}`);

const TAP_IP = "198.18.0.1";
const GUEST_IP = "198.18.0.2";
const GUEST_MAC = [0x02, 0, 0, 0, 0, 0x02];
const OTHER_MAC = [0x02, 0, 0, 0, 0, 0x99];
const GUEST_BYTES = 4 << 20;

const quietLogger: Logger = {
  level: "warn",
  log(level, source, message) {
    if (level === "error") console.error(`[${source}] ${message}`);
  },
};

function tapName(): string {
  const hex = Array.from(crypto.getRandomValues(new Uint8Array(4)), (b) => b.toString(16));
  return `vt${hex.join("").slice(0, 8)}`;
}

interface Rig {
  ns: Netns;
  tap: Tap;
  tapMac: number[];
  guest: GuestMemory;
  host: DatapathHost;
  dev: FakeDeviceSide;
}

/** A tap in a namespace, guest memory, the data path started on both, torn down after. */
async function withRig(
  fn: (rig: Rig) => Promise<void>,
  ioUring: IoUringMode = "auto",
  txUsed?: { idxOffset: number; eventOffset: number; eventIdx: boolean },
  rxFrameRoom?: number,
  rxUsed: { ringOffset: number; size: number; eventOffset: number; eventIdx: boolean } =
    RX_USED_DEFAULT,
  rateLimit?: SharedArrayBuffer,
  workers?: IoWorkerPair,
  rings?: RingPool,
): Promise<void> {
  await withNetns(async (ns) => {
    const tap = createTap(tapName(), { up: false });
    const guest = new GuestMemory(GUEST_BYTES);
    let host: DatapathHost | undefined;
    try {
      await exec(["ip", "link", "set", "dev", tap.name, "netns", ns.name]);
      await ns.exec(["sysctl", "-qw", `net.ipv6.conf.${tap.name}.disable_ipv6=1`]);
      await ns.exec(["ip", "addr", "add", `${TAP_IP}/24`, "dev", tap.name]);
      await ns.exec(["ip", "link", "set", "dev", tap.name, "up"]);
      await ns.exec([
        "ip",
        "neigh",
        "add",
        GUEST_IP,
        "lladdr",
        GUEST_MAC.map((b) => b.toString(16).padStart(2, "0")).join(":"),
        "dev",
        tap.name,
        "nud",
        "permanent",
      ]);
      const buffers = createDatapathBuffers();
      host = await DatapathHost.start({
        tapFd: tap.fd,
        buffers,
        logger: quietLogger,
        ranges: [guest.range()],
        ioUring,
        txUsed: txUsed && {
          idxAddr: guest.base + BigInt(txUsed.idxOffset),
          eventAddr: guest.base + BigInt(txUsed.eventOffset),
          eventIdx: txUsed.eventIdx,
        },
        rxFrameRoom,
        rxUsed: {
          ringAddr: guest.base + BigInt(rxUsed.ringOffset),
          size: rxUsed.size,
          eventAddr: guest.base + BigInt(rxUsed.eventOffset),
          eventIdx: rxUsed.eventIdx,
        },
        rateLimit,
        workers,
        rings,
      });
      const dev = new FakeDeviceSide(buffers, {
        guest,
        ringOffset: rxUsed.ringOffset,
        size: rxUsed.size,
      });
      await fn({ ns, tap, tapMac: Array.from(tap.macBytes), guest, host, dev });
    } finally {
      await host?.stop();
      guest.unmap();
      tap.close();
    }
  });
}

/** {@link withRig} with the rings lent from a pool of one set, as the daemon lends them. */
async function withPooledRig(fn: (rig: Rig, pool: RingPool) => Promise<void>): Promise<void> {
  const { pool, refused } = RingPool.prepare(1);
  assert.equal(refused, null, "the daemon's io_uring rings can be made here");
  try {
    await withRig(
      (rig) => fn(rig, pool),
      "auto",
      undefined,
      undefined,
      RX_USED_DEFAULT,
      undefined,
      undefined,
      pool,
    );
  } finally {
    pool.close();
  }
}

async function tapCounter(ns: Netns, tap: Tap, which: string): Promise<number> {
  return Number(await ns.exec(["cat", `/sys/class/net/${tap.name}/statistics/${which}`]));
}

async function tcpInSegs(ns: Netns): Promise<number> {
  const lines = (await ns.exec(["cat", "/proc/net/snmp"])).split("\n").filter((l) =>
    l.startsWith("Tcp:")
  );
  const names = lines[0].split(/\s+/);
  const values = lines[1].split(/\s+/);
  return Number(values[names.indexOf("InSegs")]);
}

/** Polls `probe` until it returns true or `ms` pass. */
async function eventually(probe: () => Promise<boolean> | boolean, ms = 3000): Promise<boolean> {
  const deadline = performance.now() + ms;
  while (performance.now() < deadline) {
    if (await probe()) return true;
    await new Promise((r) => setTimeout(r, 10));
  }
  return probe();
}

// ---- frames ---------------------------------------------------------------------

function ipChecksum(b: Uint8Array, start: number, len: number): number {
  let sum = 0;
  for (let i = 0; i < len; i += 2) sum += (b[start + i] << 8) | b[start + i + 1];
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  return ~sum & 0xffff;
}

function ipv4(a: string): number[] {
  return a.split(".").map(Number);
}

/** Ethernet + IPv4 + UDP with `payload` bytes of pattern, from the guest to the tap's IP. */
function udpFrame(dstMac: number[], payload: number, seed = 1): Uint8Array {
  const f = new Uint8Array(14 + 20 + 8 + payload);
  f.set(dstMac, 0);
  f.set(GUEST_MAC, 6);
  f[12] = 0x08;
  f[13] = 0x00;
  const ipLen = 20 + 8 + payload;
  f.set([0x45, 0, ipLen >> 8, ipLen & 0xff, 0, 1, 0x40, 0, 64, 17, 0, 0], 14);
  f.set(ipv4(GUEST_IP), 26);
  f.set(ipv4(TAP_IP), 30);
  const c = ipChecksum(f, 14, 20);
  f[24] = c >> 8;
  f[25] = c & 0xff;
  f.set([0x30, 0x39, 0, 9, (8 + payload) >> 8, (8 + payload) & 0xff, 0, 0], 34);
  for (let i = 0; i < payload; i++) f[42 + i] = (i * 7 + seed) & 0xff;
  return f;
}

/** A broadcast ARP request from the guest for the tap's IP. */
function arpFrame(): Uint8Array {
  const f = new Uint8Array(42);
  f.fill(0xff, 0, 6);
  f.set(GUEST_MAC, 6);
  f.set([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1], 12);
  f.set(GUEST_MAC, 22);
  f.set(ipv4(GUEST_IP), 28);
  f.set(ipv4(TAP_IP), 38);
  return f;
}

/**
 * A 64 KiB TCP segment (ACK, to a closed port of the tap's IP) for
 * VIRTIO_NET_HDR_F_NEEDS_CSUM | GSO_TCPV4: the TCP checksum field holds the
 * pseudo-header sum, as a driver leaves it for the device to complete.
 */
function gsoTcpFrame(dstMac: number[], payload: number): { frame: Uint8Array; hdr: Uint8Array } {
  const f = new Uint8Array(14 + 20 + 20 + payload);
  f.set(dstMac, 0);
  f.set(GUEST_MAC, 6);
  f[12] = 0x08;
  const ipLen = 40 + payload;
  f.set([0x45, 0, ipLen >> 8, ipLen & 0xff, 0, 2, 0x40, 0, 64, 6, 0, 0], 14);
  f.set(ipv4(GUEST_IP), 26);
  f.set(ipv4(TAP_IP), 30);
  const c = ipChecksum(f, 14, 20);
  f[24] = c >> 8;
  f[25] = c & 0xff;
  // sport 40000, dport 9, seq 1, ack 1, data offset 5, ACK, window 0xffff
  f.set([0x9c, 0x40, 0, 9, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x10, 0xff, 0xff, 0, 0, 0, 0], 34);
  // Pseudo-header sum (not complemented) into the checksum field.
  let sum = 0;
  for (const i of [26, 28, 30, 32]) sum += (f[i] << 8) | f[i + 1];
  sum += 6 + 20 + payload;
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >>> 16);
  f[50] = sum >> 8;
  f[51] = sum & 0xff;
  for (let i = 0; i < payload; i++) f[54 + i] = i & 0xff;
  const hdr = new Uint8Array(NET_HDR_BYTES);
  const v = new DataView(hdr.buffer);
  hdr[0] = 1; // VIRTIO_NET_HDR_F_NEEDS_CSUM
  hdr[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
  v.setUint16(2, 54, true); // hdr_len
  v.setUint16(4, 1448, true); // gso_size
  v.setUint16(6, 34, true); // csum_start
  v.setUint16(8, 16, true); // csum_offset
  return { frame: f, hdr };
}

/** Copies `frame` into guest memory at `offset`, split into `pieces` iovecs. */
function place(guest: GuestMemory, offset: number, frame: Uint8Array, pieces = 1): Iov[] {
  guest.bytes.set(frame, offset);
  const iovs: Iov[] = [];
  const step = Math.ceil(frame.length / pieces);
  for (let at = 0; at < frame.length; at += step) {
    iovs.push({ addr: guest.addr(offset + at), len: Math.min(step, frame.length - at) });
  }
  return iovs;
}

/** Waits for tcpdump's "listening on" on stderr, then keeps stderr drained. */
async function tcpdumpListening(stream: ReadableStream<Uint8Array>): Promise<void> {
  const reader = stream.getReader();
  const dec = new TextDecoder();
  let text = "";
  while (!text.includes("listening on")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`tcpdump exited before it listened: ${text}`);
    text += dec.decode(value);
  }
  (async () => {
    while (!(await reader.read()).done) { /* discard */ }
  })();
}

// ---- a UDP sender inside the namespace ------------------------------------------------

/**
 * Sends `count` UDP datagrams of `payload` bytes to the guest's address from a
 * child Deno in the namespace (a connected socket, libc write), or for
 * `seconds` when count is 0. Resolves with the number sent.
 */
async function sendUdp(ns: Netns, payload: number, count: number, seconds = 0): Promise<number> {
  const [a, b, c, d] = ipv4(GUEST_IP);
  const code = `import * as libc from ${JSON.stringify(LIBC_MODULE)};
const fd = libc.socket(libc.AF_INET, libc.SOCK_DGRAM);
const sa = new Uint8Array(16); sa[0] = libc.AF_INET; sa[2] = 0x30; sa[3] = 0x39;
sa.set([${a}, ${b}, ${c}, ${d}], 4);
libc.connect(fd, sa);
const buf = new Uint8Array(${payload});
const len = BigInt(buf.length);
let n = 0;
const end = performance.now() + ${seconds * 1000};
for (;;) {
  if (${count} > 0 ? n >= ${count} : (n & 255) === 0 && performance.now() > end) break;
  buf[0] = n & 0xff;
  if (Number(libc.sys.write(fd, buf, len)) > 0) n++;
}
console.log(n);`;
  return Number(await ns.exec([Deno.execPath(), "eval", "--quiet", code]));
}

// ---- tests ------------------------------------------------------------------------------

const opts = { ignore: skip !== undefined, sanitizeOps: false, sanitizeResources: false };

Deno.test("the I/O workers' options grant FFI and nothing else", async () => {
  const probe = `const names = ["read", "write", "net", "env", "run", "sys", "ffi", "import"];
    const out = {};
    for (const name of names) out[name] = (await Deno.permissions.query({ name })).state;
    self.postMessage(out);`;
  for (const options of [IO_WRITER_OPTIONS, IO_POLLER_OPTIONS]) {
    const worker = new Worker(`data:application/javascript,${encodeURIComponent(probe)}`, options);
    try {
      const states = await new Promise((resolve, reject) => {
        worker.onmessage = (e) => resolve(e.data);
        worker.onerror = (e) => {
          e.preventDefault();
          reject(new Error(e.message));
        };
      });
      assert.deepEqual(states, {
        read: "prompt",
        write: "prompt",
        net: "prompt",
        env: "prompt",
        run: "prompt",
        sys: "prompt",
        ffi: "granted",
        import: "prompt",
      }, options.name);
    } finally {
      worker.terminate();
    }
  }
});

Deno.test("IoRegions.contains() grants only whole iovecs inside one range", async (t) => {
  const r = IoRegions.from([
    { base: 0x20000n, size: 0x1000 },
    { base: 0x10000n, size: 0x1000n },
    { base: 0x11000n, size: 0x800 }, // adjacent to the one before: still two ranges
  ]);
  const cases: Array<[string, number, number, boolean]> = [
    ["inside the first range", 0x10000, 0x1000, true],
    ["the last byte of a range", 0x10fff, 1, true],
    ["crossing from one adjacent range into the next", 0x10fff, 2, false],
    ["inside the adjacent range", 0x11000, 0x800, true],
    ["one past a range's end", 0x11800, 1, false],
    ["below every range", 0xffff, 1, false],
    ["in a gap", 0x18000, 16, false],
    ["the unsorted third range", 0x20800, 0x800, true],
    ["length 0", 0x10000, 0, false],
    ["negative length", 0x10000, -1, false],
    ["NaN base", NaN, 16, false],
    ["beyond 2^53", 2 ** 53 + 2, 1, false],
  ];
  for (const [name, base, len, expected] of cases) {
    await t.step(name, () => assert.equal(r.contains(base, len), expected));
  }
  assert.equal(IoRegions.EMPTY.contains(0x10000, 1), false);
  assert.throws(() => IoRegions.from([{ base: 0x1000n, size: 0 }]), RangeError);
  assert.throws(() => IoRegions.from([{ base: 0n, size: 10 }]), RangeError);
  assert.throws(() => IoRegions.from([{ base: 2n ** 53n - 4n, size: 8 }]), RangeError);
  assert.throws(
    () => IoRegions.from([{ base: 0x1000n, size: 0x1000 }, { base: 0x1800n, size: 16 }]),
    /overlap/,
  );
});

for (const [ioUring, engine] of [["auto", "io_uring"], ["off", "writev"]] as const) {
  Deno.test({
    ...opts,
    name: `writer (${engine}): plain and GSO frames reach the tap; tail advances; EV_TX_DONE`,
    fn: () =>
      withRig(async ({ ns, tap, tapMac, guest, host, dev }) => {
        assert.equal(host.counters().writerEngine, engine);
        const before = await tapCounter(ns, tap, "rx_packets");
        const bytesBefore = await tapCounter(ns, tap, "rx_bytes");
        const segsBefore = await tcpInSegs(ns);
        const frames = [arpFrame(), udpFrame(tapMac, 18), udpFrame(tapMac, 1472), arpFrame()];
        let offset = 0;
        let bytes = 0;
        for (const [i, f] of frames.entries()) {
          assert.ok(dev.writeTx({ iovs: place(guest, offset, f, 1 + (i % 3)) }));
          offset += 2048;
          bytes += f.length;
        }
        const gso = gsoTcpFrame(tapMac, 65536 - 54);
        assert.ok(dev.writeTx({ iovs: place(guest, 1 << 20, gso.frame, 5), hdr: gso.hdr }));
        bytes += gso.frame.length;
        const tail0 = dev.txTail();
        dev.kickWriter();
        const ev = await dev.waitFor(EV_TX_DONE);
        assert.ok(ev & EV_TX_DONE, "EV_TX_DONE arrived");
        assert.equal(ev & EV_IO_FAULT, 0);
        assert.equal((dev.txTail() - tail0) >>> 0, frames.length + 1);
        assert.ok(
          await eventually(async () =>
            (await tapCounter(ns, tap, "rx_packets")) - before === frames.length + 1
          ),
          "tap rx_packets rose by the number of frames",
        );
        assert.equal((await tapCounter(ns, tap, "rx_bytes")) - bytesBefore, bytes);
        // TCP saw the GSO frame as one 64 KiB segment (and answered it with a RST).
        assert.ok(await eventually(async () => (await tcpInSegs(ns)) - segsBefore >= 1));
        assert.equal(dev.counter(CTL.IO_BAD_RECORD), 0);
        assert.equal(dev.counter(CTL.WRITER_ERRORS), 0);
      }, ioUring),
  });
}

Deno.test({
  ...opts,
  name: "writer: frames in the bounce arena (a SharedArrayBuffer, always granted) reach the tap",
  fn: () =>
    withRig(async ({ ns, tap, tapMac, host, dev }) => {
      const bounce = new Uint8Array(host.buffers.bounce);
      // The SAB's backing store does not move: a second view has the same address.
      assert.equal(
        Deno.UnsafePointer.value(Deno.UnsafePointer.of(new Uint8Array(host.buffers.bounce))),
        host.bounceRange.base,
      );
      const base = Number(host.bounceRange.base);
      const before = await tapCounter(ns, tap, "rx_bytes");
      const frames = [udpFrame(tapMac, 200), udpFrame(tapMac, 1000)];
      let at = 0x7000;
      for (const f of frames) {
        bounce.set(f, at);
        dev.writeTx({
          iovs: [{ addr: base + at, len: 20 }, { addr: base + at + 20, len: f.length - 20 }],
        });
        at += 0x1000;
      }
      // The last byte of the arena is granted; one past it is not.
      bounce.set(arpFrame(), bounce.length - 42);
      dev.writeTx({ iovs: [{ addr: base + bounce.length - 42, len: 42 }] });
      dev.writeTx({ iovs: [{ addr: base + bounce.length - 41, len: 42 }] });
      dev.kickWriter();
      const ev = await dev.waitFor(EV_TX_DONE | EV_IO_FAULT);
      assert.ok(ev & EV_TX_DONE);
      assert.equal(dev.counter(CTL.IO_BAD_RECORD), 1);
      const expected = frames[0].length + frames[1].length + 42;
      assert.ok(
        await eventually(async () => (await tapCounter(ns, tap, "rx_bytes")) - before === expected),
      );
    }),
});

/** `n` chains of `size` bytes (each split into `pieces` iovecs), `stride` apart from `offset`. */
function chains(
  guest: GuestMemory,
  offset: number,
  n: number,
  size: number,
  flags = 0,
  pieces = 1,
  stride = 0x4000,
) {
  return Array.from({ length: n }, (_, i) => {
    const at = offset + i * stride;
    const step = Math.ceil(size / pieces);
    const iovs: Iov[] = [];
    for (let o = 0; o < size; o += step) {
      iovs.push({ addr: guest.addr(at + o), len: Math.min(step, size - o) });
    }
    return { iovs, flags, at, size };
  });
}

/**
 * Collects what the poller did, frame by frame (`FakeDeviceSide.takeRx`),
 * until `n` entries arrived (or the wait times out). The poller publishes
 * without waking the device for each frame, so this looks every few ms.
 */
async function rxDone(dev: FakeDeviceSide, n: number, timeoutMs = 3000) {
  const out = dev.takeRx();
  const deadline = performance.now() + timeoutMs;
  while (out.length < n && performance.now() < deadline) {
    await dev.waitFor(EV_RX_DONE, Math.min(10, deadline - performance.now()));
    out.push(...dev.takeRx());
  }
  return out;
}

/** The 12-byte header + frame a UDP datagram of `payload` bytes arrives as. */
const udpRxBytes = (payload: number) => NET_HDR_BYTES + 14 + 20 + 8 + payload;

Deno.test({
  ...opts,
  name: "writer (io_uring): frames leave in ring order across batches, bad records among them",
  fn: () =>
    withRig(async ({ ns, tap, tapMac, guest, host, dev }) => {
      assert.equal(host.counters().writerEngine, "io_uring");
      const total = 200; // more than three io_uring batches of 64
      const isBad = (i: number) => i % 10 === 7;
      const good = Array.from({ length: total }, (_, i) => i).filter((i) => !isBad(i));
      // tcpdump prints one line per datagram; the source port carries the index.
      const dump = ns.spawn(
        ["tcpdump", "-l", "-n", "-i", tap.name, "-c", String(good.length), "udp"],
        { stdout: "piped", stderr: "piped" },
      );
      const stdout = new Response(dump.stdout).text();
      try {
        await tcpdumpListening(dump.stderr);
        for (let i = 0; i < total; i++) {
          const f = udpFrame(tapMac, 18);
          f[34] = (20000 + i) >> 8; // UDP source port (no UDP checksum to fix)
          f[35] = (20000 + i) & 0xff;
          const iovs = isBad(i) ? [{ addr: 0x1000, len: f.length }] : place(guest, i * 128, f, 2);
          assert.ok(dev.writeTx({ iovs }), `record ${i} fits the ring`);
        }
        dev.kickWriter();
        assert.ok(
          await eventually(() => Promise.resolve(dev.counter(CTL.IO_BAD_RECORD) === 20)),
          "every bad record was refused",
        );
        const timer = setTimeout(() => dump.kill("SIGTERM"), 10_000);
        await dump.status;
        clearTimeout(timer);
        const ports = [...(await stdout).matchAll(/198\.18\.0\.2\.(\d+) > /g)].map((m) =>
          Number(m[1]) - 20000
        );
        assert.deepEqual(ports, good, "the tap saw the good frames once each, in ring order");
        assert.equal(dev.counter(CTL.WRITER_ERRORS), 0);
      } finally {
        try {
          dump.kill("SIGKILL");
        } catch { /* already gone */ }
        await dump.status;
      }
    }),
});

Deno.test({
  ...opts,
  name:
    "poller: after a TX kick it writes the records the device answers with; it and the writer take turns, in ring order",
  fn: () =>
    withRig(async ({ ns, tap, tapMac, guest, host, dev }) => {
      const kickTx = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
      const one = new Uint8Array(new BigUint64Array([1n]).buffer);
      const total = 200;
      const dump = ns.spawn(
        ["tcpdump", "-l", "-n", "-i", tap.name, "-c", String(total), "udp"],
        { stdout: "piped", stderr: "piped" },
      );
      const stdout = new Response(dump.stdout).text();
      try {
        await host.setKickFd(TX_QUEUE, kickTx);
        await tcpdumpListening(dump.stderr);
        const tail0 = dev.txTail();
        let next = 0;
        let answered = 0;
        let writerRangAnyway = 0;
        for (let round = 0; next < total; round++) {
          for (let k = 0; k < 1 + (round % 7) && next < total; k++, next++) {
            const f = udpFrame(tapMac, 18);
            f[34] = (20000 + next) >> 8; // UDP source port (no UDP checksum to fix)
            f[35] = (20000 + next) & 0xff;
            assert.ok(dev.writeTx({ iovs: place(guest, next * 128, f, 2) }), `record ${next}`);
          }
          if (round % 3 === 2) {
            dev.kickWriter(); // records the device found without a kick: the writer's
            continue;
          }
          libc.write(kickTx, one);
          assert.ok((await dev.waitFor(EV_KICK_TX)) & EV_KICK_TX);
          const rang = Atomics.load(dev.ctl, CTL.WRITER_DOORBELL);
          if (dev.handOverTx()) {
            answered++;
            if (Atomics.load(dev.ctl, CTL.WRITER_DOORBELL) !== rang) writerRangAnyway++;
          }
        }
        assert.ok(
          await eventually(() => Promise.resolve(((dev.txTail() - tail0) >>> 0) === total)),
          "every record released",
        );
        const timer = setTimeout(() => dump.kill("SIGTERM"), 10_000);
        await dump.status;
        clearTimeout(timer);
        const ports = [...(await stdout).matchAll(/198\.18\.0\.2\.(\d+) > /g)].map((m) =>
          Number(m[1]) - 20000
        );
        assert.deepEqual(
          ports,
          Array.from({ length: total }, (_, i) => i),
          "the tap saw each frame once, in ring order",
        );
        // The poller waits 2 ms for an answer; this test answers from a busy thread.
        assert.ok(answered >= 1, "the poller waited for an answer at least once");
        assert.equal(writerRangAnyway, 0, "an answered poller leaves the writer asleep");
        assert.ok(dev.counter(CTL.POLLER_TX_BATCHES) >= 1, "the poller wrote batches");
        assert.equal(dev.counter(CTL.IO_BAD_RECORD), 0);
        assert.equal(dev.counter(CTL.WRITER_ERRORS), 0);
      } finally {
        try {
          dump.kill("SIGKILL");
        } catch { /* already gone */ }
        await dump.status;
        await host.setKickFd(TX_QUEUE, null);
        libc.close(kickTx);
      }
    }),
});

Deno.test({
  ...opts,
  name: "poller: frames from the host land in posted chains behind the 12-byte header",
  fn: () =>
    withRig(async ({ ns, tapMac, guest, dev }) => {
      const posted = chains(guest, 0x10000, 4, 2048, 0, 2);
      assert.equal(dev.postRx(posted), 4);
      assert.equal(await sendUdp(ns, 100, 3), 3);
      const done = await rxDone(dev, 3);
      assert.deepEqual(
        done,
        [0, 1, 2].map(() => ({ chains: 1, bytes: udpRxBytes(100), status: RX_PUBLISHED })),
      );
      for (let i = 0; i < 3; i++) {
        const b = guest.bytes.subarray(posted[i].at, posted[i].at + udpRxBytes(100));
        assert.equal(b[1], 0, "gso_type NONE");
        const eth = b.subarray(NET_HDR_BYTES);
        assert.deepEqual(Array.from(eth.subarray(0, 6)), GUEST_MAC, "dst MAC");
        assert.deepEqual(Array.from(eth.subarray(6, 12)), tapMac, "src MAC");
        assert.deepEqual(Array.from(eth.subarray(12, 14)), [0x08, 0x00]);
        assert.equal((eth[36] << 8) | eth[37], 12345, "UDP dst port");
        assert.equal(eth[42], i, "payload byte 0 is the datagram's sequence number");
      }
      assert.equal(dev.counter(CTL.IO_BAD_RECORD), 0);
    }),
});

Deno.test({
  ...opts,
  name: "poller: a frame spans consecutive mergeable chains; the next frame takes the next chain",
  fn: () =>
    withRig(async ({ ns, guest, dev }) => {
      const posted = chains(guest, 0x10000, 8, 256, RXF_MERGEABLE);
      dev.postRx(posted);
      await sendUdp(ns, 1000, 1);
      const [first] = await rxDone(dev, 1);
      const bytes = udpRxBytes(1000);
      assert.deepEqual(first, { chains: Math.ceil(bytes / 256), bytes, status: RX_PUBLISHED });
      // Reassemble from the chains: the UDP payload is zeros after byte 0 (sequence 0).
      const joined = new Uint8Array(first.chains * 256);
      for (let i = 0; i < first.chains; i++) {
        joined.set(guest.bytes.subarray(posted[i].at, posted[i].at + 256), i * 256);
      }
      const eth = joined.subarray(NET_HDR_BYTES, bytes);
      assert.equal((eth[16] << 8) | eth[17], 20 + 8 + 1000, "IP total length");
      assert.ok(eth.subarray(43).every((x) => x === 0), "payload intact across chains");
      await sendUdp(ns, 100, 1);
      const [second] = await rxDone(dev, 1);
      assert.deepEqual(second, { chains: 1, bytes: udpRxBytes(100), status: RX_PUBLISHED });
      const b = guest.bytes.subarray(posted[first.chains].at);
      assert.equal((b[NET_HDR_BYTES + 16] << 8) | b[NET_HDR_BYTES + 17], 20 + 8 + 100);
    }),
});

Deno.test({
  ...opts,
  name: "poller: a frame bigger than a non-mergeable chain is dropped and counted; the chain stays",
  fn: () =>
    withRig(async ({ ns, guest, dev }) => {
      const [chain] = chains(guest, 0x10000, 1, 200);
      dev.postRx([chain]);
      await sendUdp(ns, 1000, 1);
      const [drop] = await rxDone(dev, 1);
      assert.deepEqual(drop, { chains: 0, bytes: udpRxBytes(1000), status: RX_STATUS_TOO_BIG });
      assert.equal(dev.counter(CTL.POLLER_TOO_BIG), 1);
      await sendUdp(ns, 100, 1);
      const [ok] = await rxDone(dev, 1);
      assert.deepEqual(ok, { chains: 1, bytes: udpRxBytes(100), status: RX_PUBLISHED });
      assert.equal(
        guest.bytes[chain.at + NET_HDR_BYTES + 42],
        0,
        "the small frame is in the chain",
      );
    }),
});

Deno.test({
  ...opts,
  name:
    "poller: starved, frames wait in the tap; it tells the device; a post wakes it through the writer",
  fn: () =>
    withRig(async ({ ns, guest, dev }) => {
      assert.ok(await eventually(() => dev.counter(CTL.POLLER_STARVED) === 1), "starved at start");
      assert.ok((await dev.waitFor(EV_RX_STARVED, 2000)) !== 0, "the device is told to top up");
      await sendUdp(ns, 50, 2);
      assert.equal(await dev.waitFor(EV_RX_DONE, 200), 0, "nothing received without buffers");
      assert.equal(dev.rxDone.available(), 0);
      assert.equal(dev.counter(CTL.POLLER_STARVATIONS), 1);
      dev.postRx(chains(guest, 0x10000, 2, 1024));
      const done = await rxDone(dev, 2);
      assert.deepEqual(done.map((d) => d.bytes), [udpRxBytes(50), udpRxBytes(50)]);
      assert.ok(dev.counter(CTL.POLLER_WAKE_ASKED) >= 1, "the writer woke the poller");
      assert.ok(await eventually(() => dev.counter(CTL.POLLER_STARVED) === 1), "starved again");
      assert.equal(dev.counter(CTL.POLLER_STARVATIONS), 2);
      assert.ok(
        (await dev.waitFor(EV_RX_STARVED, 2000)) !== 0,
        "told again for the new starvation",
      );
    }),
});

Deno.test({
  ...opts,
  name:
    "poller (readv): frames one per wake, then a burst queued while starved: every frame read, in order",
  fn: () =>
    withRig(async ({ ns, guest, dev }) => {
      const posted = chains(guest, 0x10000, 64, 2048);
      let next = 0; // the next posted chain a frame lands in
      // Rounds of 1-4 single frames put the poller at each point of its
      // one-readv-per-wake cycle when a burst comes. Each round posts one
      // chain more than the singles take: a single's read is followed by one
      // that finds the tap empty (which is what teaches the poller that
      // frames come one at a time), and the burst's first frame takes it.
      for (let round = 0; round < 4; round++) {
        const singles = round + 1;
        dev.postRx(posted.slice(next, next + singles + 1));
        for (let i = 0; i < singles; i++) {
          assert.equal(await sendUdp(ns, 100, 1), 1);
          assert.deepEqual(await rxDone(dev, 1), [{
            chains: 1,
            bytes: udpRxBytes(100),
            status: RX_PUBLISHED,
          }], `round ${round}, single frame ${i}`);
        }
        next += singles;
        // The burst: one frame lands, the other nine wait in the tap while
        // the poller starves. The post wakes it once, and no new frame comes
        // to report the tap again: only a level-triggered wait brings the
        // frames behind the next one it reads.
        assert.equal(await sendUdp(ns, 100, 10), 10);
        assert.equal((await rxDone(dev, 1)).length, 1, `round ${round}: first of the burst`);
        assert.ok(
          await eventually(() => dev.counter(CTL.POLLER_STARVED) === 1),
          `round ${round}: starved`,
        );
        dev.postRx(posted.slice(next + 1, next + 10));
        const done = await rxDone(dev, 9);
        assert.equal(done.length, 9, `round ${round}: every frame of the burst read`);
        for (let i = 0; i < 10; i++) {
          assert.equal(
            guest.bytes[posted[next + i].at + NET_HDR_BYTES + 42],
            i,
            `round ${round}: datagram ${i} in its chain`,
          );
        }
        next += 10;
      }
      await new Promise((resolve) => setTimeout(resolve, 200));
      assert.deepEqual(dev.takeRxDone(), [], "nothing more came");
      assert.equal(dev.counter(CTL.POLLER_ENGINE), POLLER_ENGINE_READV);
      assert.equal(dev.counter(CTL.IO_BAD_RECORD), 0);
    }, "off"),
});

/** The room a tap with MTU 1500 and no GSO offload gives its frames (Tap.readRoom()). */
const ROOM_MTU_1500 = NET_HDR_BYTES + 14 + 8 + 1500;

Deno.test({
  ...opts,
  name: "poller (io_uring): frames queued in the tap are read in batches, in order, one chain each",
  fn: () =>
    withRig(
      async ({ ns, guest, dev }) => {
        assert.ok(await eventually(() => dev.counter(CTL.POLLER_STARVED) === 1), "starved");
        assert.equal(await sendUdp(ns, 100, 40), 40);
        const posted = chains(guest, 0x10000, 48, 2048, RXF_MERGEABLE);
        dev.postRx(posted);
        const done = await rxDone(dev, 40);
        assert.deepEqual(
          done,
          posted.slice(0, 40).map(() => ({
            chains: 1,
            bytes: udpRxBytes(100),
            status: RX_PUBLISHED,
          })),
        );
        for (let i = 0; i < 40; i++) {
          assert.equal(
            guest.bytes[posted[i].at + NET_HDR_BYTES + 42],
            i,
            `datagram ${i} in chain ${i}`,
          );
        }
        assert.equal(dev.counter(CTL.POLLER_ENGINE), POLLER_ENGINE_IO_URING);
        const batches = dev.counter(CTL.POLLER_BATCHES);
        assert.ok(batches >= 2 && batches <= 20, `40 frames in ${batches} batches`);
        assert.equal(
          dev.counter(CTL.POLLER_UNUSED),
          0,
          "nothing given back: no read ran dry early",
        );
        assert.equal(dev.counter(CTL.IO_BAD_RECORD), 0);
      },
      "auto",
      undefined,
      ROOM_MTU_1500,
    ),
});

Deno.test({
  ...opts,
  name:
    "poller (io_uring): a frame longer than the room it was told is dropped, its chain given back; it then reads with the largest room",
  fn: () =>
    withRig(
      async ({ ns, tap, guest, dev, host }) => {
        // The operator raises the MTU after the parent measured the room.
        await ns.exec(["ip", "link", "set", "dev", tap.name, "mtu", "9000"]);
        assert.ok(await eventually(() => dev.counter(CTL.POLLER_STARVED) === 1), "starved");
        await sendUdp(ns, 100, 1);
        await sendUdp(ns, 3000, 1);
        await sendUdp(ns, 100, 1);
        const posted = chains(guest, 0x10000, 48, 2048, RXF_MERGEABLE);
        dev.postRx(posted);
        const done = await rxDone(dev, 4);
        assert.deepEqual(done, [
          { chains: 1, bytes: udpRxBytes(100), status: RX_PUBLISHED },
          { chains: 0, bytes: udpRxBytes(3000), status: RX_STATUS_TOO_BIG },
          { chains: 1, bytes: 0, status: RX_UNUSED },
          { chains: 1, bytes: udpRxBytes(100), status: RX_PUBLISHED },
        ]);
        assert.equal(dev.counter(CTL.POLLER_UNUSED), 1);
        assert.equal(dev.counter(CTL.POLLER_TOO_BIG), 1);
        // Now frames get room for the largest: a long one spans two chains.
        await sendUdp(ns, 3000, 1);
        assert.deepEqual(await rxDone(dev, 1), [
          { chains: 2, bytes: udpRxBytes(3000), status: RX_PUBLISHED },
        ]);
        // Told the room again, it batches again.
        const before = dev.counter(CTL.POLLER_BATCHES);
        await host.setRxFrameRoom(ROOM_MTU_1500);
        await sendUdp(ns, 100, 5);
        assert.equal((await rxDone(dev, 5)).filter((d) => d.status === RX_PUBLISHED).length, 5);
        assert.ok(dev.counter(CTL.POLLER_BATCHES) > before, "batched again");
      },
      "auto",
      undefined,
      ROOM_MTU_1500,
    ),
});

/** Takes rx-done records (without waiting for EV_RX_DONE) until they name `chains` chains. */
async function recordsFor(dev: FakeDeviceSide, chains: number, timeoutMs = 3000) {
  const out: RxDoneRecord[] = [];
  const deadline = performance.now() + timeoutMs;
  while (out.reduce((n, r) => n + r.chains, 0) < chains && performance.now() < deadline) {
    out.push(...dev.takeRxDone());
    await new Promise((r) => setTimeout(r, 5));
  }
  return out;
}

Deno.test({
  ...opts,
  name:
    "poller (RX publication): frames become used elements with num_buffers; used->idx and the call eventfd follow used_event; the device is not woken per frame",
  fn: () => {
    const USED = 0x1000, EVENT = 0x3000, SIZE = 256;
    return withRig(
      async ({ ns, guest, dev, host }) => {
        const callRx = libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC);
        const fired = () => {
          if ((libc.pollOne(callRx, libc.POLLIN, 0) & libc.POLLIN) === 0) return false;
          libc.read(callRx, new Uint8Array(8));
          return true;
        };
        const u16 = (o: number) => guest.bytes[o] | (guest.bytes[o + 1] << 8);
        const elem = (i: number) => {
          const v = new DataView(guest.bytes.buffer, USED + 4 + 8 * (i & (SIZE - 1)), 8);
          return { id: v.getUint32(0, true), len: v.getUint32(4, true) };
        };
        try {
          await host.setCallFd(RX_QUEUE, callRx);
          // What the device does at start: what the guest takes, where used->idx resumes (it wraps).
          Atomics.store(dev.ctl, CTL.RX_TAKES, RXT_MERGEABLE | RXT_CSUM);
          Atomics.store(dev.ctl, CTL.RX_USED_IDX, 65534);
          assert.ok(await eventually(() => dev.counter(CTL.POLLER_STARVED) === 1), "starved");
          assert.equal(await sendUdp(ns, 100, 3), 3);
          const posted = chains(guest, 0x10000, 6, 2048, RXF_MERGEABLE)
            .map((p, i) => ({ ...p, token: 40 + i }));
          dev.takeEvents();
          dev.postRx(posted);
          const bytes = udpRxBytes(100);
          assert.deepEqual(await recordsFor(dev, 3), [
            { chains: 3, bytes: 3 * (bytes - NET_HDR_BYTES), status: RX_PUBLISHED, frames: 3 },
          ]);
          for (let i = 0; i < 3; i++) {
            assert.deepEqual(elem(65534 + i), { id: 40 + i, len: bytes }, `used element ${i}`);
            const hdr = guest.bytes.subarray(posted[i].at, posted[i].at + NET_HDR_BYTES);
            assert.equal(hdr[10] | (hdr[11] << 8), 1, "num_buffers");
            assert.equal(guest.bytes[posted[i].at + NET_HDR_BYTES + 42], i, "datagram in order");
          }
          assert.ok(await eventually(() => u16(USED + 2) === 1), "used->idx 65534 + 3");
          assert.equal(dev.counter(CTL.RX_USED_IDX), 1);
          assert.ok(fired(), "the first publication notifies");
          assert.equal(dev.counter(CTL.RX_INTERRUPTS), 1);
          assert.equal(dev.takeEvents() & EV_RX_DONE, 0, "the device was not woken for them");
          // used_event 5: the driver wants a notification once used->idx passes 5, not at 2.
          guest.bytes[EVENT] = 5;
          guest.bytes[EVENT + 1] = 0;
          await sendUdp(ns, 100, 1);
          assert.equal((await recordsFor(dev, 1)).length, 1);
          assert.ok(await eventually(() => u16(USED + 2) === 2));
          assert.equal(fired(), false, "suppressed by used_event");
          guest.bytes[EVENT] = 2;
          await sendUdp(ns, 100, 1);
          await recordsFor(dev, 1);
          assert.ok(await eventually(() => u16(USED + 2) === 3));
          assert.ok(await eventually(fired), "used->idx passed used_event 2");
          assert.equal(dev.counter(CTL.RX_INTERRUPTS), 2);
          assert.equal(dev.counter(CTL.IO_BAD_RECORD), 0);
        } finally {
          libc.close(callRx);
        }
      },
      "auto",
      undefined,
      ROOM_MTU_1500,
      { ringOffset: USED, size: SIZE, eventOffset: EVENT, eventIdx: true },
    );
  },
});

Deno.test({
  ...opts,
  name: "kicks become EV_KICK_*; a kick fd let go of is read to zero and no longer watched",
  fn: () =>
    withRig(async ({ host, dev }) => {
      const flags = libc.EFD_CLOEXEC | libc.EFD_NONBLOCK;
      const [kickRx, kickTx, callRx, callTx] = [0, 1, 2, 3].map(() => libc.eventfd(0, flags));
      const one = new Uint8Array(new BigUint64Array([1n]).buffer);
      try {
        await host.setKickFd(RX_QUEUE, kickRx);
        await host.setKickFd(TX_QUEUE, kickTx);
        await host.setCallFd(RX_QUEUE, callRx);
        await host.setCallFd(TX_QUEUE, callTx);
        libc.write(kickTx, one);
        assert.ok((await dev.waitFor(EV_KICK_TX)) & EV_KICK_TX);
        libc.write(kickRx, one);
        assert.ok((await dev.waitFor(EV_KICK_RX)) & EV_KICK_RX);
        // Kicks are edge-triggered: each write is seen, without the poller reading the fd.
        libc.write(kickRx, one);
        assert.ok((await dev.waitFor(EV_KICK_RX)) & EV_KICK_RX, "a second kick is seen too");
        assert.equal(dev.counter(CTL.RX_KICKS), 2);

        // Cleared slots are no longer used: a kick on the old fd raises nothing.
        await host.setKickFd(TX_QUEUE, null);
        assert.equal(
          libc.sys.read(kickTx, new Uint8Array(8), 8n),
          -1n,
          "the poller read the counter to zero when it let go of the fd",
        );
        await host.setCallFd(RX_QUEUE, null);
        dev.takeEvents();
        libc.write(kickTx, one);
        assert.equal(await dev.waitFor(EV_KICK_TX, 200), 0);

        const [r, w] = libc.pipe2(libc.O_CLOEXEC);
        try {
          assert.throws(() => host.setCallFd(TX_QUEUE, w), TypeError);
          assert.throws(() => host.setKickFd(RX_QUEUE, r), TypeError);
        } finally {
          libc.close(r);
          libc.close(w);
        }
      } finally {
        await host.setKickFd(RX_QUEUE, null);
        await host.setCallFd(TX_QUEUE, null);
        for (const fd of [kickRx, kickTx, callRx, callTx]) libc.close(fd);
      }
    }),
});

/** Where the TX completion tests put the used ring's idx and the driver's event word. */
const USED_IDX_OFFSET = GUEST_BYTES - 64;
const EVENT_OFFSET = GUEST_BYTES - 32;

for (const eventIdx of [true, false]) {
  Deno.test({
    ...opts,
    name: `writer publishes TX completions after the writes (${
      eventIdx ? "EVENT_IDX" : "NO_INTERRUPT flag"
    }): used->idx, the interrupt the driver asked for, completion-only records`,
    fn: () =>
      withRig(
        async ({ ns, tap, tapMac, guest, host, dev }) => {
          const callTx = libc.eventfd(0, libc.EFD_CLOEXEC | libc.EFD_NONBLOCK);
          const count = new BigUint64Array(1);
          const interrupts = () =>
            libc.sys.read(callTx, new Uint8Array(count.buffer), 8n) === 8n ? Number(count[0]) : 0;
          const usedIdx = new Uint16Array(guest.bytes.buffer, USED_IDX_OFFSET, 1);
          const event = new Uint16Array(guest.bytes.buffer, EVENT_OFFSET, 1);
          const before = await tapCounter(ns, tap, "rx_packets");
          let offset = 0;
          const frame = (idx: number) => {
            const iovs = place(guest, offset, udpFrame(tapMac, 100 + idx), 2);
            offset += 2048;
            return { iovs, usedIdx: idx };
          };
          const send = async (records: Parameters<FakeDeviceSide["writeTx"]>[0][]) => {
            for (const r of records) assert.ok(dev.writeTx(r));
            dev.kickWriter();
            assert.equal((await dev.waitFor(EV_TX_DONE)) & EV_IO_FAULT, 0);
          };
          try {
            await host.setCallFd(TX_QUEUE, callTx);
            // The first publication always notifies (a spurious one is allowed, §2.7.7.1).
            await send([frame(1), frame(2)]);
            assert.equal(usedIdx[0], 2, "used->idx is the last record's");
            assert.equal(interrupts(), 1);
            // The driver wants none: used_event 5 is not reached, or NO_INTERRUPT is set.
            event[0] = eventIdx ? 5 : 1;
            await send([frame(3), frame(4)]);
            assert.equal(usedIdx[0], 4);
            assert.equal(interrupts(), 0, "no interrupt the driver did not ask for");
            // A completion-only record (chains the device dropped) crosses used_event,
            // or the flag is cleared: one interrupt, and nothing is written to the tap.
            if (!eventIdx) event[0] = 0;
            await send([{
              iovs: [],
              iovCount: 0,
              frameLen: 0,
              flags: TXF_COMPLETE_ONLY,
              usedIdx: 6,
            }]);
            assert.equal(usedIdx[0], 6);
            assert.equal(interrupts(), 1);
            assert.equal(dev.counter(CTL.TX_INTERRUPTS), 2);
            assert.equal(dev.counter(CTL.IO_BAD_RECORD), 0);
            assert.ok(
              await eventually(async () =>
                (await tapCounter(ns, tap, "rx_packets")) - before === 4
              ),
              "four frames reached the tap",
            );
            // Without TX_WANT_DONE the writer does not wake the device for a release.
            dev.takeEvents();
            assert.ok(dev.writeTx(frame(7)));
            dev.tx.publish();
            // Ring the writer without asking for EV_TX_DONE (as the device does for WEV_TX).
            signal(dev.ctl, CTL.WRITER_EVENTS, WEV_TX, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
            assert.ok(await eventually(() => usedIdx[0] === 7));
            assert.equal(await dev.waitFor(EV_TX_DONE, 200), 0, "no EV_TX_DONE unasked");
            // A place outside the granted memory is refused when the writer starts.
            await assert.rejects(
              DatapathHost.start({
                tapFd: tap.fd,
                buffers: createDatapathBuffers(),
                logger: quietLogger,
                ranges: [guest.range()],
                txUsed: {
                  idxAddr: guest.base + BigInt(GUEST_BYTES),
                  eventAddr: guest.base,
                  eventIdx,
                },
                // A good RX place: the poller accepts, only the writer refuses.
                rxUsed: {
                  ringAddr: guest.base + BigInt(RX_USED_DEFAULT.ringOffset),
                  size: RX_USED_DEFAULT.size,
                  eventAddr: guest.base + BigInt(RX_USED_DEFAULT.eventOffset),
                  eventIdx,
                },
              }),
              /txUsed\.idxAddr 0x[0-9a-f]+ is not in guest memory/,
            );
          } finally {
            await host.setCallFd(TX_QUEUE, null);
            libc.close(callTx);
          }
        },
        "auto",
        { idxOffset: USED_IDX_OFFSET, eventOffset: EVENT_OFFSET, eventIdx },
      ),
  });
}

for (const [ioUring, engine] of [["auto", "io_uring"], ["off", "writev"]] as const) {
  Deno.test({
    ...opts,
    name: `writer (${engine}): hostile TX records are refused, counted, never written; it goes on`,
    fn: (t) =>
      withRig(async ({ ns, tap, guest, host, dev }) => {
        assert.equal(host.counters().writerEngine, engine);
        const frame = udpFrame(OTHER_MAC, 100);
        const good = place(guest, 0x1000, frame, 2);
        const end = guest.addr(GUEST_BYTES);
        const gso = (type: number, size: number) => {
          const h = new Uint8Array(NET_HDR_BYTES);
          h[1] = type;
          h[4] = size & 0xff;
          h[5] = size >> 8;
          return h;
        };
        const big = place(guest, 0x100000, new Uint8Array(MAX_FRAME_BYTES + 1));
        const cases = [
          {
            name: "iovec crossing the end of guest memory",
            spec: { iovs: [{ addr: end - 40, len: 142 }] },
          },
          { name: "iovec outside every region", spec: { iovs: [{ addr: 0x1000, len: 142 }] } },
          {
            name: "iovec below the region",
            spec: { iovs: [{ addr: guest.addr(0) - 1, len: 142 }] },
          },
          { name: "iovCount 0", spec: { iovs: good, iovCount: 0, frameLen: frame.length } },
          { name: `iovCount ${TX_MAX_IOV + 1}`, spec: { iovs: good, iovCount: TX_MAX_IOV + 1 } },
          { name: "iovCount 2^32-1", spec: { iovs: good, iovCount: 0xffff_ffff } },
          {
            name: "lengths not summing to frameLen",
            spec: { iovs: good, frameLen: frame.length + 1 },
          },
          {
            name: "an iovec of length 0",
            spec: { iovs: [...good, { addr: guest.addr(0), len: 0 }], frameLen: frame.length },
          },
          {
            name: "high word of an iovec length set",
            spec: { iovs: [{ ...good[0], lenHigh: 1 }, good[1]], frameLen: frame.length },
          },
          { name: "frame longer than MAX_FRAME_BYTES", spec: { iovs: big } },
          {
            name: "frame shorter than an Ethernet header",
            spec: { iovs: [{ ...good[0], len: 13 }] },
          },
          { name: "gso_type 2 (unknown)", spec: { iovs: good, hdr: gso(2, 1448) } },
          { name: "GSO_TCPV4 with gso_size 0", spec: { iovs: good, hdr: gso(1, 0) } },
          { name: "flags DATA_VALID on transmit", spec: { iovs: good, hdr: Uint8Array.of(2) } },
          {
            name: "NEEDS_CSUM with the checksum beyond the frame",
            spec: { iovs: good, hdr: Uint8Array.of(1, 0, 0, 0, 0, 0, 141, 0, 0, 0, 0, 0) },
          },
        ];
        const packets0 = await tapCounter(ns, tap, "rx_packets");
        for (const [i, c] of cases.entries()) {
          const ok = await t.step(c.name, async () => {
            const tail = dev.txTail();
            assert.ok(dev.writeTx(c.spec));
            dev.kickWriter();
            const ev = await dev.waitFor(EV_TX_DONE | EV_IO_FAULT);
            assert.ok(ev & EV_IO_FAULT, "EV_IO_FAULT raised");
            assert.equal((dev.txTail() - tail) >>> 0, 1, "the record was released");
            assert.equal(dev.counter(CTL.IO_BAD_RECORD), i + 1);
          });
          assert.ok(ok, c.name);
        }
        assert.equal(await tapCounter(ns, tap, "rx_packets"), packets0, "nothing reached the tap");
        assert.equal(dev.counter(CTL.WRITER_ERRORS), 0, "no writev was even tried");
        // Still working: a good record after the bad ones goes out.
        dev.writeTx({ iovs: good });
        dev.kickWriter();
        assert.equal((await dev.waitFor(EV_TX_DONE)) & EV_IO_FAULT, 0);
        assert.ok(
          await eventually(async () => (await tapCounter(ns, tap, "rx_packets")) === packets0 + 1),
        );
      }, ioUring),
  });
}

Deno.test({
  ...opts,
  name:
    "poller: a hostile rx-post chain is consumed as BAD_POST with 0 bytes; good chains still fill",
  fn: () =>
    withRig(async ({ ns, guest, dev }) => {
      const [good] = chains(guest, 0x10000, 1, 2048);
      const end = guest.addr(GUEST_BYTES);
      dev.postRx([
        { iovs: [{ addr: end - 100, len: 2048 }] },
        { iovs: good.iovs, iovCount: 0, capacity: 2048 },
        { iovs: good.iovs, capacity: 4096 },
        good,
      ]);
      await sendUdp(ns, 100, 1);
      const done = await rxDone(dev, 4);
      assert.deepEqual(done, [
        { chains: 1, bytes: 0, status: RX_STATUS_BAD_POST },
        { chains: 1, bytes: 0, status: RX_STATUS_BAD_POST },
        { chains: 1, bytes: 0, status: RX_STATUS_BAD_POST },
        { chains: 1, bytes: udpRxBytes(100), status: RX_PUBLISHED },
      ]);
      assert.equal(dev.counter(CTL.IO_BAD_RECORD), 3);
      assert.ok(dev.takeEvents() & EV_IO_FAULT);
    }),
});

Deno.test({
  ...opts,
  name: "a stopped worker takes its lent rings down only once released: the pool has them " +
    "back after that, not at the stop's ack",
  fn: () =>
    withPooledRig(async ({ host }, pool) => {
      assert.equal(pool.free, 0, "the data path took the set");
      assert.equal(await host.stop({ endLater: true }), true, "both acknowledged");
      // Acked: the rest of the stop runs; the workers wait, holding the rings.
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(pool.free, 0, "given back before the workers released them");
      host.release();
      assert.ok(
        await eventually(() => pool.free === RINGS_PER_DATAPATH, 2000),
        `${pool.free} of ${RINGS_PER_DATAPATH} rings back after the release`,
      );
      host.end();
    }),
});

Deno.test({
  ...opts,
  name: "a parent blocked for a stop hears of the workers' ends only from their own mailboxes: " +
    "a device that writes IO_ENDED, STOPPED and the bases in the control block does not end " +
    "the wait; the writer, told to run until TX closes, holds it until then",
  fn: () =>
    withRig(async ({ host, dev }) => {
      const ctl = dev.ctl;
      // What a device taken over can write, before and during the stop.
      const lie = () => {
        Atomics.store(ctl, CTL.IO_ENDED, IO_ENDED_POLLER | IO_ENDED_WRITER);
        Atomics.notify(ctl, CTL.IO_ENDED);
        Atomics.store(ctl, CTL.STOP_BASES, 0x1234_5678);
        Atomics.store(ctl, CTL.STOPPED, 1);
        Atomics.notify(ctl, CTL.STOPPED);
      };
      lie();
      assert.equal(host.loopsEndedBy(performance.now() + 50), false, "no stop asked yet");
      const stopping = host.stop({ endLater: true, untilTxClosed: true });
      lie();
      const t0 = performance.now();
      assert.equal(
        host.loopsEndedBy(t0 + 200),
        false,
        "the writer runs until TX closes, whatever the control block says of the workers",
      );
      assert.ok(performance.now() - t0 >= 195, "it blocked for its whole bound");
      Atomics.store(ctl, CTL.TX_CLOSED, 1);
      signal(ctl, CTL.WRITER_EVENTS, 0, CTL.WRITER_DOORBELL, CTL.WRITER_SLEEPING);
      assert.equal(
        host.loopsEndedBy(performance.now() + 3000),
        true,
        "both said so once TX closed",
      );
      assert.equal(await stopping, true, "and both acknowledged");
      host.end();
    }),
});

Deno.test({
  ...opts,
  name: "a start right after a stop, from a pool of one set, gets the rings the stopped " +
    "workers still held (it has them released first)",
  fn: () =>
    withPooledRig(async ({ tap, guest, host }, pool) => {
      assert.equal(await host.stop({ endLater: true }), true);
      assert.equal(pool.free, 0, "the stopped workers still hold the set");
      // As a memory table change does while the queues run: the next start at once.
      const lines: string[] = [];
      const logger = {
        log: (_level: string, _source: string, message: string) => lines.push(message),
      } as unknown as Logger;
      const next = await DatapathHost.start({
        tapFd: tap.fd,
        buffers: createDatapathBuffers(),
        logger,
        ranges: [guest.range()],
        ioUring: "auto",
        rxUsed: {
          ringAddr: guest.base + BigInt(RX_USED_DEFAULT.ringOffset),
          size: RX_USED_DEFAULT.size,
          eventAddr: guest.base + BigInt(RX_USED_DEFAULT.eventOffset),
          eventIdx: RX_USED_DEFAULT.eventIdx,
        },
        rings: pool,
      });
      try {
        // Short of rings, it would say so and make its own (allowed in a test, not
        // under the daemon's seccomp filter, where it would fall back to writev).
        assert.ok(
          !lines.some((l) => /io_uring rings left/.test(l)),
          `the start ran short of rings: ${lines.join("; ")}`,
        );
        assert.equal(pool.free, 0, "the new data path took the set back");
        assert.ok(
          await eventually(() => next.counters().writerEngine === "io_uring", 2000),
          `the writer runs ${next.counters().writerEngine}, not io_uring`,
        );
      } finally {
        await next.stop();
      }
      host.end();
    }),
});

Deno.test({
  ...opts,
  name: "a stop ends both loops on the mailbox's STOP word and is acknowledged before the " +
    "stop message is delivered; the message, when it comes, changes nothing",
  fn: async () => {
    // Each worker's stop message is held back: a worker's event loop is what
    // delivers it, and during a migration's switch-over that took 2-12 ms.
    const HOLD_MS = 400;
    const workers = IoWorkerPair.spawn({ logger: quietLogger });
    let delivered = 0;
    for (const w of [workers.writer.worker, workers.poller.worker]) {
      const post = w.postMessage.bind(w);
      w.postMessage = ((msg: { kind?: string }, transfer?: Transferable[]) => {
        if (msg?.kind !== "stop") return post(msg, transfer ?? []);
        setTimeout(() => {
          post(msg, transfer ?? []);
          delivered++;
        }, HOLD_MS);
      }) as typeof w.postMessage;
    }
    await withRig(
      async ({ host, dev }) => {
        assert.equal(Atomics.load(dev.ctl, CTL.IO_ENDED), 0);
        const t0 = performance.now();
        assert.equal(await host.stop({ endLater: true }), true, "both acknowledged");
        const ms = performance.now() - t0;
        assert.ok(ms < HOLD_MS / 2, `acknowledged in ${ms.toFixed(1)} ms, before the message`);
        assert.equal(delivered, 0);
        assert.equal(
          Atomics.load(dev.ctl, CTL.IO_ENDED) & IO_ENDED_BOTH,
          IO_ENDED_BOTH,
          "both loops said they ended",
        );
        // The messages come after all: acked again, ignored; both workers still answer.
        assert.ok(await eventually(() => delivered === 2, 2 * HOLD_MS));
        await new Promise((r) => setTimeout(r, 50));
        assert.ok(workers.usable, "neither worker failed");
        host.end();
      },
      "auto",
      undefined,
      undefined,
      RX_USED_DEFAULT,
      undefined,
      workers,
    );
  },
});

Deno.test({
  ...opts,
  name:
    "setRegions([]) resolves, then records into the old region are refused, RX stops, and it may be unmapped",
  fn: () =>
    withRig(async ({ ns, tap, guest, host, dev }) => {
      const frame = udpFrame(OTHER_MAC, 100);
      const iovs = place(guest, 0x1000, frame);
      const [chain] = chains(guest, 0x10000, 1, 2048);
      await host.setRegions([]);
      guest.unmap(); // safe now: neither worker will touch it
      const packets0 = await tapCounter(ns, tap, "rx_packets");
      dev.writeTx({ iovs });
      dev.kickWriter();
      assert.ok((await dev.waitFor(EV_TX_DONE | EV_IO_FAULT)) & EV_IO_FAULT);
      // The RX used ring was in the old region too: the poller stops receiving
      // for good rather than touch it (the parent stops the queues before it
      // takes their memory; this is the backstop).
      dev.postRx([chain]);
      await sendUdp(ns, 100, 1);
      assert.deepEqual(await rxDone(dev, 1, 300), [], "nothing read, nothing completed");
      assert.equal(dev.counter(CTL.IO_BAD_RECORD), 1);
      assert.equal(dev.counter(CTL.WRITER_ERRORS) + dev.counter(CTL.POLLER_ERRORS), 0);
      assert.equal(await tapCounter(ns, tap, "rx_packets"), packets0);

      // A new region works again, in both directions.
      dev.takeEvents();
      const fresh = new GuestMemory(1 << 20);
      try {
        await host.setRegions([fresh.range()]);
        dev.writeTx({ iovs: place(fresh, 0, frame) });
        dev.kickWriter();
        assert.equal((await dev.waitFor(EV_TX_DONE)) & EV_IO_FAULT, 0);
        await host.setRegions([]);
      } finally {
        fresh.unmap();
      }
    }),
});

Deno.test({
  ...opts,
  name: "an I/O worker answers malformed control messages with errors and keeps running",
  fn: async () => {
    const worker = new Worker(IO_WRITER_URL, IO_WRITER_OPTIONS);
    const replies: unknown[] = [];
    let wake: (() => void) | undefined;
    worker.onmessage = (e) => {
      replies.push(e.data);
      wake?.();
    };
    const next = async () => {
      while (replies.length === 0) await new Promise<void>((r) => (wake = r));
      return replies.shift() as { kind: string; id: number | null; message?: string };
    };
    try {
      const cases: Array<[unknown, number | null, RegExp]> = [
        ["hello", null, /must be an object/],
        [{ kind: "stop" }, null, /id/],
        [{ kind: "bogus", id: 3 }, 3, /unknown kind/],
        [{ kind: "setFd", id: 4, slot: "kickRx", fd: 5 }, 4, /no kickRx slot/],
        [{ kind: "setFd", id: 5, slot: "tap", fd: -1 }, 5, /descriptor/],
        [{ kind: "setRegions", id: 6, ranges: [{ base: 0n, size: 10 }] }, 6, /Range 0/],
        [{ kind: "setRegions", id: 7, ranges: [{ base: 1, size: 10 }] }, 7, /bigint/],
        [{ kind: "init", id: 8, version: 99 }, 8, /version/],
        [
          { kind: "init", id: 9, version: IO_PROTOCOL_VERSION, role: "poller" },
          9,
          /control is missing/,
        ],
        [{ kind: "setRxFrameRoom", id: 12, bytes: 70_000 }, 12, /bytes must be an integer/],
        [{ kind: "setRxFrameRoom", id: 13, bytes: 1534 }, 13, /the writer reads no frames/],
      ];
      for (const [msg, id, pattern] of cases) {
        worker.postMessage(msg);
        const reply = await next();
        assert.equal(reply.kind, "error", JSON.stringify(reply));
        assert.equal(reply.id, id);
        assert.match(reply.message ?? "", pattern);
      }
      worker.postMessage({ kind: "setFd", id: 10, slot: "callTx", fd: null });
      assert.deepEqual(await next(), { kind: "ack", id: 10 });
      worker.postMessage({ kind: "stop", id: 11 });
      assert.deepEqual(await next(), { kind: "ack", id: 11 });
    } finally {
      worker.terminate();
    }
  },
});

// ---- throughput -----------------------------------------------------------------------

/**
 * Pushes copies of one TX record for `ms` milliseconds, as fast as the writer
 * releases them; returns frames/s. Every frame must reach the tap.
 */
async function measureTx(rig: Rig, spec: Parameters<FakeDeviceSide["writeTx"]>[0], ms: number) {
  const { ns, tap, dev } = rig;
  const packets0 = await tapCounter(ns, tap, "rx_packets");
  const tail0 = dev.txTail();
  let written = 0;
  const t0 = performance.now();
  // Halfway, re-grant the same regions: the writer must ack while busy.
  let ackMs = NaN;
  setTimeout(() => {
    const s = performance.now();
    rig.host.setRegions([rig.guest.range()]).then(() => (ackMs = performance.now() - s));
  }, ms / 2);
  while (performance.now() - t0 < ms) {
    let k = 0;
    while (dev.writeTx(spec)) k++;
    if (k !== 0) dev.kickWriter();
    written += k;
    await dev.waitFor(EV_TX_DONE, 1000);
  }
  while (((dev.txTail() - tail0) >>> 0) !== written) await dev.waitFor(EV_TX_DONE, 1000);
  const seconds = (performance.now() - t0) / 1000;
  assert.equal(dev.counter(CTL.IO_BAD_RECORD) + dev.counter(CTL.WRITER_ERRORS), 0);
  assert.ok(
    await eventually(async () => (await tapCounter(ns, tap, "rx_packets")) - packets0 === written),
    "every frame reached the tap",
  );
  assert.ok(ackMs < 100, `setRegions under load was acknowledged in ${ackMs} ms`);
  console.log(`  setRegions acknowledged by both workers under TX load in ${ackMs.toFixed(2)} ms`);
  return written / seconds;
}

Deno.test({
  ...opts,
  name: "throughput: TX of 60 B, 1514 B and 64 KiB GSO frames, RX of 60 B frames (printed)",
  fn: () =>
    withRig(async (rig) => {
      const { ns, tap, guest, dev } = rig;
      const ms = 1500;
      const small = udpFrame(OTHER_MAC, 18); // 60 B: dropped in ip_rcv (not our MAC)
      const full = udpFrame(OTHER_MAC, 1472); // 1514 B
      const gso = gsoTcpFrame(OTHER_MAC, 65536 - 54);
      const tx60 = await measureTx(rig, { iovs: place(guest, 0, small) }, ms);
      const tx1514 = await measureTx(rig, { iovs: place(guest, 0x1000, full) }, ms);
      const txGso = await measureTx(
        rig,
        { iovs: place(guest, 0x100000, gso.frame, 2), hdr: gso.hdr },
        ms,
      );

      // RX: 512 chains of 2 KiB, re-posted as they come back; a sender in the namespace.
      const ring = chains(guest, 0x200000, 512, 2048, 0, 1, 2048);
      let next = 0;
      const repost = (n: number) => {
        const batch = [];
        for (let i = 0; i < n; i++) batch.push(ring[(next++) % ring.length]);
        dev.postRx(batch);
      };
      repost(ring.length);
      let received = 0;
      let first = 0;
      let last = 0;
      let running = true;
      const sender = sendUdp(ns, 18, 0, 2).finally(() => (running = false));
      const dropped0 = await tapCounter(ns, tap, "tx_dropped");
      while (running || dev.rxDone.available() !== 0) {
        await dev.waitFor(EV_RX_DONE, 5);
        const done = dev.takeRx();
        if (done.length === 0) continue;
        const now = performance.now();
        if (received === 0) first = now;
        last = now;
        for (const d of done) {
          assert.equal(d.status, RX_PUBLISHED);
          assert.equal(d.bytes, udpRxBytes(18));
        }
        received += done.length;
        repost(done.length);
      }
      const sent = await sender;
      const rx60 = received / ((last - first) / 1000);
      const dropped = (await tapCounter(ns, tap, "tx_dropped")) - dropped0;
      const k = (x: number) => `${(x / 1000).toFixed(0)}k`;
      console.log(
        `  TX 60 B: ${k(tx60)} frames/s; TX 1514 B: ${k(tx1514)} frames/s (${
          (tx1514 * 1514 * 8 / 1e9).toFixed(1)
        } Gbit/s); TX 64 KiB GSO: ${k(txGso)} frames/s (${
          (txGso * 65536 * 8 / 1e9).toFixed(1)
        } Gbit/s)\n  RX 60 B: ${
          k(rx60)
        } frames/s (${received} of ${sent} sent; tap dropped ${dropped})`,
      );
      assert.ok(received > 0 && received <= sent);
      assert.equal(dev.counter(CTL.POLLER_ERRORS), 0);
    }),
});

/** CPU time this process used so far (s): utime + stime of /proc/self/stat, at 100 ticks a second. */
function processCpuSeconds(): number {
  const stat = Deno.readTextFileSync("/proc/self/stat");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

Deno.test({
  ...opts,
  name: "rate limit: a device flooding the TX ring gets the limit onto the tap and no more; " +
    "the rest waits on the ring (nothing dropped) while the writer sleeps, and goes once lifted",
  fn: async () => {
    const limits = new RateLimiter(createRateLimitBuffer(), libc.monotonicMs);
    const RATE = 2_000_000, BURST = 100_000, MS = 2000;
    limits.configure(DIR_TX, { bytes: { rate: RATE, size: BURST }, frames: null });
    await withRig(
      async ({ ns, tap, guest, dev }) => {
        const frame = udpFrame(OTHER_MAC, 1472); // 1514 B, dropped in ip_rcv (not our MAC)
        const spec = { iovs: place(guest, 0x1000, frame) };
        const bytes0 = await tapCounter(ns, tap, "rx_bytes");
        const packets0 = await tapCounter(ns, tap, "rx_packets");
        const tail0 = dev.txTail();
        const cpu0 = processCpuSeconds();
        const t0 = performance.now();
        let written = 0;
        while (performance.now() - t0 < MS) {
          while (dev.writeTx(spec)) written++;
          dev.kickWriter();
          await dev.waitFor(EV_TX_DONE, 100);
        }
        const seconds = (performance.now() - t0) / 1000;
        const cores = (processCpuSeconds() - cpu0) / seconds;
        const released = (dev.txTail() - tail0) >>> 0;
        const sent = (await tapCounter(ns, tap, "rx_bytes")) - bytes0;
        const expected = BURST + RATE * seconds;
        console.log(
          `  limited to ${RATE} B/s: ${sent} bytes in ${seconds.toFixed(2)} s on the tap ` +
            `(expected ${expected.toFixed(0)}), ${written - released} records held, ` +
            `${cores.toFixed(2)} cores`,
        );
        assert.ok(
          Math.abs(sent - expected) <= 0.1 * expected,
          `${sent} bytes reached the tap, not ${expected.toFixed(0)} ±10 %`,
        );
        assert.ok(written - released > 100, "the ring held the frames over the limit");
        assert.ok(cores < 0.5, `the process used ${cores.toFixed(2)} cores while held: a spin`);
        assert.ok(limits.counters(DIR_TX).throttles > 0);

        // Lifted: what waited goes out, every frame, none dropped.
        limits.configure(DIR_TX, null);
        const t1 = performance.now();
        while (((dev.txTail() - tail0) >>> 0) !== written && performance.now() - t1 < 5000) {
          dev.kickWriter();
          await dev.waitFor(EV_TX_DONE, 200);
        }
        assert.equal((dev.txTail() - tail0) >>> 0, written, "the held frames went once lifted");
        assert.equal(dev.counter(CTL.IO_BAD_RECORD) + dev.counter(CTL.WRITER_ERRORS), 0);
        assert.ok(
          await eventually(async () =>
            (await tapCounter(ns, tap, "rx_packets")) - packets0 === written
          ),
          "every frame reached the tap",
        );
      },
      "auto",
      undefined,
      undefined,
      RX_USED_DEFAULT,
      limits.buffer,
    );
  },
});
