/**
 * The multi-queue tap's steering program (parent/host/tap_steering.ts): its
 * reference hash, the kernel's run of the program against that reference
 * (BPF_PROG_TEST_RUN), and a real two-queue tap whose host-sent frames each
 * arrive on the queue the hash picks. The kernel parts need root.
 */

import assert from "node:assert/strict";
import * as libc from "../../../parent/host/libc.ts";
import { createTap, VNET_HDR_LEN } from "../../../parent/host/tap.ts";
import {
  assemble,
  attachSteering,
  flowHash,
  loadSteeringProgram,
  testRun,
} from "../../../parent/host/tap_steering.ts";
import { exec, tapTestsUnavailable, withNetns } from "../../net_ns.ts";

const skip = tapTestsUnavailable();
if (skip) console.warn(`tests/parent/host/tap_steering_test.ts skipped: ${skip}`);

interface FrameSpec {
  v6?: boolean;
  src?: number[];
  dst?: number[];
  proto?: number;
  sport?: number;
  dport?: number;
  /** IPv4 flags and fragment offset (the 16-bit field). */
  frag?: number;
  /** IPv4 header words (5 to 15). */
  ihl?: number;
}

/** An Ethernet frame with an IPv4 or IPv6 header and 8 bytes of transport header. */
function frame(s: FrameSpec): Uint8Array {
  const ihl = s.ihl ?? 5;
  const l3 = s.v6 ? 40 : ihl * 4;
  const f = new Uint8Array(14 + l3 + 8);
  const v = new DataView(f.buffer);
  f.set([2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1]);
  const proto = s.proto ?? 6;
  if (s.v6) {
    v.setUint16(12, 0x86dd);
    f[14] = 0x60;
    f[14 + 6] = proto;
    f.set(s.src ?? new Array(16).fill(1), 14 + 8);
    f.set(s.dst ?? new Array(16).fill(2), 14 + 24);
  } else {
    v.setUint16(12, 0x0800);
    f[14] = 0x40 | ihl;
    v.setUint16(14 + 6, s.frag ?? 0);
    f[14 + 9] = proto;
    f.set(s.src ?? [198, 18, 0, 1], 14 + 12);
    f.set(s.dst ?? [198, 18, 0, 2], 14 + 16);
  }
  v.setUint16(14 + l3, s.sport ?? 40000);
  v.setUint16(14 + l3 + 2, s.dport ?? 5201);
  return f;
}

function randomBytes(n: number): number[] {
  return [...crypto.getRandomValues(new Uint8Array(n))];
}

/** Frames of every kind the program tells apart, and random flows of each. */
function corpus(): Uint8Array[] {
  const out: Uint8Array[] = [
    frame({}),
    frame({ proto: 17 }),
    frame({ proto: 1 }),
    frame({ frag: 0x2000 }), // more fragments: no ports
    frame({ frag: 0x0010 }), // a later fragment
    frame({ frag: 0x4000 }), // don't fragment: ports count
    frame({ ihl: 7 }),
    frame({ v6: true }),
    frame({ v6: true, proto: 17 }),
    frame({ v6: true, proto: 58 }),
    frame({}).subarray(0, 14 + 20 + 2), // ports cut short
    frame({}).subarray(0, 14 + 19), // IPv4 header cut short
    frame({ v6: true }).subarray(0, 14 + 39),
    frame({}).subarray(0, 14),
  ];
  const arp = new Uint8Array(42);
  arp.set([0x08, 0x06], 12);
  out.push(arp);
  const vlan = frame({});
  vlan.set([0x81, 0x00], 12);
  out.push(vlan);
  for (let i = 0; i < 200; i++) {
    const v6 = i % 2 === 1;
    out.push(frame({
      v6,
      src: randomBytes(v6 ? 16 : 4),
      dst: randomBytes(v6 ? 16 : 4),
      proto: [6, 17, 1][i % 3],
      sport: randomBytes(2)[0] << 8 | randomBytes(1)[0],
      dport: randomBytes(2)[0] << 8 | randomBytes(1)[0],
      ihl: v6 ? undefined : 5 + (i % 4),
    }));
  }
  return out;
}

Deno.test("flowHash: one flow, one value, either direction; non-IP and short frames go to 0", () => {
  const a = frame({ src: [198, 18, 0, 1], dst: [198, 18, 0, 2], sport: 1000, dport: 2000 });
  const b = frame({ src: [198, 18, 0, 2], dst: [198, 18, 0, 1], sport: 2000, dport: 1000 });
  assert.equal(flowHash(a), flowHash(b));
  assert.notEqual(flowHash(a), flowHash(frame({ sport: 1001, dport: 2000 })));
  assert.ok(flowHash(a) <= 0xffff);
  const arp = new Uint8Array(42);
  arp.set([0x08, 0x06], 12);
  assert.equal(flowHash(arp), 0);
  assert.equal(flowHash(frame({}).subarray(0, 20)), 0);
  // Fragments hash on addresses only, so every fragment of a datagram goes one way.
  assert.equal(flowHash(frame({ frag: 0x2000, sport: 1 })), flowHash(frame({ frag: 5, sport: 2 })));
  // Over many flows both of two queues are used, about evenly.
  const counts = [0, 0];
  for (let i = 0; i < 1000; i++) counts[flowHash(frame({ sport: 1024 + i })) % 2]++;
  assert.ok(counts[0] > 350 && counts[1] > 350, `queue shares ${counts}`);
});

Deno.test("assemble() refuses an undefined label and a backward jump", () => {
  const ja = (label: string) => ({ code: 0x05, dst: 0, src: 0, label, imm: 0 });
  assert.throws(() => assemble([ja("nowhere")]), /label nowhere is not defined/);
  assert.throws(
    () => assemble([{ label: "top" }, { code: 0x95, dst: 0, src: 0, off: 0, imm: 0 }, ja("top")]),
    /backwards/,
  );
});

Deno.test({
  name: "the kernel's run of the steering program equals flowHash on every kind of frame",
  ignore: skip !== undefined,
  fn: () => {
    const prog = loadSteeringProgram();
    try {
      for (const f of corpus()) {
        const hex = Array.from(f.subarray(0, 64), (b) => b.toString(16).padStart(2, "0")).join("");
        assert.equal(testRun(prog, f), flowHash(f), `frame ${hex} (${f.byteLength} bytes)`);
      }
    } finally {
      libc.closeQuietly(prog);
    }
  },
});

Deno.test({
  name: "a two-queue tap with the program: each frame the host sends lands on the queue " +
    "its flow hash picks, and both queues get flows",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const hex = Array.from(crypto.getRandomValues(new Uint8Array(3)), (b) => b.toString(16));
      const tap = createTap(`vs${hex.join("").padEnd(6, "0")}`, { queues: 2, up: false });
      try {
        tap.setQueueAttached(1, true);
        attachSteering(tap.fd);
        await exec(["ip", "link", "set", "dev", tap.name, "netns", ns.name]);
        await ns.exec(["sysctl", "-qw", `net.ipv6.conf.${tap.name}.disable_ipv6=1`]);
        await ns.exec(["ip", "addr", "add", "198.18.0.1/24", "dev", tap.name]);
        await ns.exec([
          "ip",
          "neigh",
          "add",
          "198.18.0.2",
          "lladdr",
          "02:00:00:00:00:02",
          "dev",
          tap.name,
          "nud",
          "permanent",
        ]);
        await ns.exec(["ip", "link", "set", "dev", tap.name, "up"]);
        for (let q = 0; q < 2; q++) {
          const fd = tap.queueFd(q);
          libc.fcntl(fd, libc.F_SETFL, libc.fcntl(fd, libc.F_GETFL) | libc.O_NONBLOCK);
        }
        // 48 UDP flows (a fresh source port each), from the host's stack to the "guest".
        const flows = 48;
        await ns.exec([
          "bash",
          "-c",
          `for p in $(seq 6000 ${6000 + flows - 1}); do echo x > /dev/udp/198.18.0.2/$p; done`,
        ]);
        const seen = [0, 0];
        const buf = new Uint8Array(VNET_HDR_LEN + 1514);
        for (let q = 0; q < 2; q++) {
          for (;;) {
            const n = libc.sys.read(tap.queueFd(q), buf, BigInt(buf.length));
            if (n <= 0) break;
            const eth = buf.subarray(VNET_HDR_LEN, Number(n));
            const want = flowHash(eth) % 2;
            assert.equal(q, want, `a frame with flow hash ${flowHash(eth)} came on queue ${q}`);
            if (eth[12] === 0x08 && eth[13] === 0x00 && eth[14 + 9] === 17) seen[q]++;
          }
        }
        assert.equal(seen[0] + seen[1], flows, `UDP frames per queue: ${seen}`);
        assert.ok(seen[0] > 0 && seen[1] > 0, `both queues get flows: ${seen}`);
      } finally {
        tap.close();
      }
    }),
});
