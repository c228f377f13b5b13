/**
 * Real-tap tests for parent/host/tap.ts. They need root and /dev/net/tun.
 *
 * Taps made in this process are created *down* (no traffic, no addresses) and
 * moved into a throw-away namespace before anything is configured or sent;
 * code that must create a tap inside the namespace runs in a child `deno eval`
 * started with `ip netns exec`. Addresses come from 198.18.0.0/15.
 */

import assert from "node:assert/strict";
import * as libc from "../../../parent/host/libc.ts";
import {
  adoptTap,
  createTap,
  IFF_NO_PI,
  IFF_TAP,
  IFF_TUN,
  IFF_VNET_HDR,
  type Tap,
  TapError,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  VNET_HDR_LEN,
} from "../../../parent/host/tap.ts";
import { exec, type Netns, tapTestsUnavailable, withNetns } from "../../net_ns.ts";

const TAP_MODULE = new URL("../../../parent/host/tap.ts", import.meta.url).href;

const skip = tapTestsUnavailable();
if (skip) console.warn(`tests/parent/host/tap_test.ts skipped: ${skip}`);

function tapName(): string {
  const hex = Array.from(crypto.getRandomValues(new Uint8Array(4)), (b) => b.toString(16));
  return `vt${hex.join("").slice(0, 8)}`;
}

/** A tap created down in this process and moved into `ns`; closed afterwards. */
async function withTapIn(ns: Netns, fn: (tap: Tap) => Promise<void>): Promise<void> {
  const tap = createTap(tapName(), { up: false });
  try {
    await exec(["ip", "link", "set", "dev", tap.name, "netns", ns.name]);
    await fn(tap);
  } finally {
    tap.close();
  }
}

interface LinkInfo {
  ifname: string;
  address: string;
  flags: string[];
}

async function linkInfo(ns: Netns, name: string): Promise<LinkInfo> {
  const [info] = JSON.parse(await ns.exec(["ip", "-j", "link", "show", "dev", name]));
  return info;
}

async function counter(ns: Netns, name: string, which: string): Promise<number> {
  return Number(await ns.exec(["cat", `/sys/class/net/${name}/statistics/${which}`]));
}

/** Runs `body` (JS using `createTap`) in a child Deno inside `ns`; returns its printed JSON. */
async function evalInNs(ns: Netns, body: string): Promise<unknown> {
  const code = `import { createTap } from ${JSON.stringify(TAP_MODULE)};\n` +
    `const sh = async (...cmd) => { const o = await new Deno.Command(cmd[0], { args: cmd.slice(1) }).output();` +
    ` return { code: o.code, out: new TextDecoder().decode(o.stdout) }; };\n` +
    `const result = await (async () => { ${body} })();\n` +
    `console.log(JSON.stringify(result));`;
  return JSON.parse(await ns.exec([Deno.execPath(), "eval", code]));
}

/** A tun fd attached with raw TUNSETIFF flags, bypassing createTap's checks. */
function rawTun(name: string, flags: number): number {
  const fd = libc.open("/dev/net/tun", libc.O_RDWR | libc.O_CLOEXEC);
  const req = new Uint8Array(40);
  req.set(new TextEncoder().encode(name));
  new DataView(req.buffer).setUint16(16, flags, true);
  try {
    libc.ioctl(fd, 0x400454can, req, "TUNSETIFF");
  } catch (e) {
    libc.close(fd);
    throw e;
  }
  return fd;
}

Deno.test({
  name: "createTap() makes a non-persistent vnet-header tap with no offloads in force",
  ignore: skip !== undefined,
  fn: () =>
    withNetns((ns) =>
      withTapIn(ns, async (tap) => {
        assert.equal(tap.created, true);
        assert.equal(
          tap.iffFlags & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR),
          IFF_TAP | IFF_NO_PI |
            IFF_VNET_HDR,
        );
        assert.ok(tap.ifindex > 0);
        assert.equal(tap.offloads, 0);
        // A 6.x kernel takes at least checksum and TCP segmentation offloads.
        const base = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
        assert.equal(tap.kernelOffloads & base, base);
        const info = await linkInfo(ns, tap.name);
        assert.equal(info.address, tap.mac);
        assert.deepEqual(
          Array.from(tap.macBytes, (b) => b.toString(16).padStart(2, "0")),
          tap.mac
            .split(":"),
        );
        const features = await ns.exec(["ethtool", "-k", tap.name]);
        assert.match(features, /^\s*tx-checksum-ip-generic: off/m);
        assert.match(features, /^\s*tx-tcp-segmentation: off/m);
      })
    ),
});

Deno.test({
  name: "closing a created tap removes the interface, even after a move to another netns",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const tap = createTap(tapName(), { up: false });
      try {
        await exec(["ip", "link", "set", "dev", tap.name, "netns", ns.name]);
        assert.equal((await linkInfo(ns, tap.name)).ifname, tap.name);
      } finally {
        tap.close();
      }
      assert.equal(tap.fd, -1);
      const after = await ns.run(["ip", "link", "show", "dev", tap.name]);
      assert.notEqual(after.code, 0, `${tap.name} still exists after close: ${after.stdout}`);
      tap.close(); // idempotent
      assert.throws(() => tap.read(new Uint8Array(64)), TapError);
    }),
});

Deno.test({
  name: "createTap() brings the link up and reports its index, inside a namespace",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const r = await evalInNs(
        ns,
        `const tap = createTap("vup0");
         const link = await sh("ip", "-j", "link", "show", "dev", "vup0");
         tap.close();
         const gone = await sh("ip", "link", "show", "dev", "vup0");
         return { name: tap.name, ifindex: tap.ifindex, mac: tap.mac, created: tap.created,
                  link: JSON.parse(link.out)[0], goneCode: gone.code };`,
      ) as {
        name: string;
        ifindex: number;
        mac: string;
        created: boolean;
        link: { ifindex: number; address: string; flags: string[] };
        goneCode: number;
      };
      assert.equal(r.name, "vup0");
      assert.equal(r.created, true);
      assert.ok(r.link.flags.includes("UP"), `flags ${r.link.flags}`);
      assert.equal(r.ifindex, r.link.ifindex);
      assert.equal(r.mac, r.link.address);
      assert.notEqual(r.goneCode, 0);
    }),
});

Deno.test({
  name: "setMtu() sets the MTU ip link shows, and readRoom() follows; the kernel's EINVAL and a " +
    "tap elsewhere are TapErrors saying why",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const r = await evalInNs(
        ns,
        `const tap = createTap("vmtu0");
         tap.setMtu(4000);
         const shown = JSON.parse((await sh("ip", "-j", "link", "show", "vmtu0")).out)[0].mtu;
         const room = tap.readRoom();
         let refused = "";
         try { tap.setMtu(65522); } catch (e) { refused = e.name + ": " + e.message; }
         const after = tap.mtu();
         tap.close();
         return { shown, room, refused, after };`,
      ) as { shown: number; room: number; refused: string; after: number };
      assert.equal(r.shown, 4000);
      assert.equal(r.room, VNET_HDR_LEN + 14 + 8 + 4000);
      assert.match(
        r.refused,
        /^TapError: cannot set tap vmtu0's MTU to 65522 \(SIOCSIFMTU: EINVAL\)/,
      );
      assert.equal(r.after, 4000, "a refused MTU changes nothing");
      await withTapIn(ns, (tap) => {
        assert.throws(
          () => tap.setMtu(1400),
          (e: unknown) =>
            e instanceof TapError &&
            /not in this network namespace under that name/.test(e.message),
        );
        return Promise.resolve();
      });
    }),
});

Deno.test({
  name:
    "readRoom(): the MTU plus Ethernet and two VLAN tags, until a GSO offload is on; the largest for a tap elsewhere",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const r = await evalInNs(
        ns,
        `const tap = createTap("vroom0");
         const rooms = [tap.readRoom()];
         await sh("ip", "link", "set", "dev", "vroom0", "mtu", "9000");
         rooms.push(tap.readRoom());
         tap.setOffload(${TUN_F_CSUM});
         rooms.push(tap.readRoom());
         tap.setOffload(${TUN_F_CSUM | TUN_F_TSO4});
         rooms.push(tap.readRoom());
         tap.close();
         return rooms;`,
      ) as number[];
      const hdr = VNET_HDR_LEN + 14 + 8;
      assert.deepEqual(r, [hdr + 1500, hdr + 9000, hdr + 9000, 65_550 + VNET_HDR_LEN]);
      // A tap moved to another namespace: its MTU cannot be asked by name here.
      await withTapIn(ns, (tap) => {
        assert.equal(tap.mtu(), null);
        assert.equal(tap.readRoom(), 65_550 + VNET_HDR_LEN);
        return Promise.resolve();
      });
    }),
});

Deno.test({
  name: "createTap() attaches to an existing persistent tap with created=false",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      await ns.exec(["ip", "tuntap", "add", "dev", "vpers0", "mode", "tap", "vnet_hdr"]);
      const r = await evalInNs(
        ns,
        `const tap = createTap("vpers0", { up: false });
         const created = tap.created; tap.close();
         const still = await sh("ip", "link", "show", "dev", "vpers0");
         return { created, stillCode: still.code };`,
      ) as { created: boolean; stillCode: number };
      assert.equal(r.created, false);
      assert.equal(r.stillCode, 0, "a persistent tap must survive our close");
    }),
});

Deno.test({
  name: "createTap() on a name that is not a tap fails with a clear TapError",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const r = await evalInNs(
        ns,
        `try { createTap("lo"); return { ok: true }; }
         catch (e) { return { ok: false, name: e.name, message: e.message }; }`,
      ) as { ok: boolean; name: string; message: string };
      assert.equal(r.ok, false);
      assert.equal(r.name, "TapError");
      assert.match(r.message, /interface lo exists and is not a tap.*TUNSETIFF: EINVAL/);
    }),
});

Deno.test({
  name: "createTap({ queues: 3 }): a multi-queue tap with one descriptor per queue; only queue 0 " +
    "attached until a pair is enabled; attach and detach follow",
  ignore: skip !== undefined,
  fn: () =>
    withNetns(async (ns) => {
      const r = await evalInNs(
        ns,
        `const tap = createTap("vmq0", { up: false, queues: 3 });
         // tun keeps real_num_tx_queues at the queues attached: sysfs lists one tx-N each.
         const txq = async () => (await sh("ls", "/sys/class/net/vmq0/queues")).out.split("\\n")
           .filter((l) => l.startsWith("tx-")).length;
         const flags = (await sh("cat", "/sys/class/net/vmq0/tun_flags")).out.trim();
         const fds = [0, 1, 2].map((i) => tap.queueFd(i));
         const at0 = await txq();
         tap.setQueueAttached(2, true);
         const at1 = await txq();
         const attached = [0, 1, 2].map((i) => tap.queueAttached(i));
         tap.setQueueAttached(2, false);
         const at2 = await txq();
         tap.setQueueAttached(0, false); // queue 0 stays: a tap with no queue drops everything
         const at3 = await txq();
         tap.close();
         const gone = (await sh("ip", "link", "show", "dev", "vmq0")).code !== 0;
         return { queues: tap.queues, flags, fds, at0, at1, attached, at2, at3, gone };`,
      ) as {
        queues: number;
        flags: string;
        fds: number[];
        at0: number;
        at1: number;
        attached: boolean[];
        at2: number;
        at3: number;
        gone: boolean;
      };
      assert.equal(r.queues, 3);
      assert.ok((parseInt(r.flags, 16) & 0x100) !== 0, `IFF_MULTI_QUEUE in tun_flags ${r.flags}`);
      assert.equal(new Set(r.fds).size, 3, "a descriptor per queue");
      assert.equal(r.at0, 1, "only queue 0 attached at first");
      assert.equal(r.at1, 2);
      assert.deepEqual(r.attached, [true, false, true]);
      assert.equal(r.at2, 1);
      assert.equal(r.at3, 1);
      assert.equal(r.gone, true, "closing every queue removes the tap");
    }),
});

Deno.test("createTap() rejects invalid interface names before any system call", () => {
  assert.throws(() => createTap("x".repeat(16)), RangeError);
  assert.throws(() => createTap("a/b"), TypeError);
  assert.throws(() => createTap(".."), TypeError);
});

Deno.test({
  name: "adoptTap() refuses descriptors that are not a vnet-header tap, naming why",
  ignore: skip !== undefined,
  fn: async (t) => {
    await t.step("/dev/null", () => {
      const fd = libc.open("/dev/null", libc.O_RDWR | libc.O_CLOEXEC);
      try {
        assert.throws(
          () => adoptTap(fd),
          (e: Error) =>
            e instanceof TapError &&
            e.message === `fd ${fd} is not a tun/tap device (TUNGETIFF: ENOTTY)`,
        );
      } finally {
        libc.close(fd);
      }
    });
    await t.step("a pipe", () => {
      const [r, w] = libc.pipe2(libc.O_CLOEXEC);
      try {
        assert.throws(() => adoptTap(r), /is not a tun\/tap device \(TUNGETIFF: ENOTTY\)/);
      } finally {
        libc.close(r);
        libc.close(w);
      }
    });
    await t.step("a closed descriptor", () => {
      const [r, w] = libc.pipe2(libc.O_CLOEXEC);
      libc.close(r);
      libc.close(w);
      assert.throws(() => adoptTap(r), new RegExp(`fd ${r} is not an open descriptor \\(EBADF\\)`));
    });
    await t.step("/dev/net/tun not attached to an interface", () => {
      const fd = libc.open("/dev/net/tun", libc.O_RDWR | libc.O_CLOEXEC);
      try {
        assert.throws(() => adoptTap(fd), /not attached to any interface \(TUNGETIFF: EBADFD\)/);
      } finally {
        libc.close(fd);
      }
    });
    await t.step("a tap without IFF_VNET_HDR", () => {
      const name = tapName();
      const fd = rawTun(name, IFF_TAP | IFF_NO_PI);
      try {
        assert.throws(
          () => adoptTap(fd),
          (e: Error) =>
            e.message ===
              `tap ${name} was opened without IFF_VNET_HDR; vionet needs the virtio-net header`,
        );
      } finally {
        libc.close(fd);
      }
    });
    await t.step("a tap without IFF_NO_PI", () => {
      const name = tapName();
      const fd = rawTun(name, IFF_TAP | IFF_VNET_HDR);
      try {
        assert.throws(() => adoptTap(fd), /without IFF_NO_PI/);
      } finally {
        libc.close(fd);
      }
    });
    await t.step("a tun (layer 3) device", () => {
      const name = tapName();
      const fd = rawTun(name, IFF_TUN | IFF_NO_PI | IFF_VNET_HDR);
      try {
        assert.throws(() => adoptTap(fd), new RegExp(`tun device ${name}, not a tap`));
      } finally {
        libc.close(fd);
      }
    });
  },
});

Deno.test({
  name: "adoptTap() takes over a tap fd: same device, vnet header 12, offloads reset to none",
  ignore: skip !== undefined,
  fn: () =>
    withNetns((ns) =>
      withTapIn(ns, async (tap) => {
        tap.setOffload(TUN_F_CSUM | TUN_F_TSO4);
        assert.match(await ns.exec(["ethtool", "-k", tap.name]), /^\s*tx-tcp-segmentation: on/m);
        const adopted = adoptTap(libc.dup(tap.fd), { nonBlocking: true });
        try {
          assert.equal(adopted.name, tap.name);
          assert.equal(adopted.mac, tap.mac);
          assert.equal(adopted.created, false);
          assert.equal(adopted.kernelOffloads, tap.kernelOffloads);
          assert.equal(adopted.offloads, 0);
          assert.equal(adopted.ifindex, 0, "the tap lives in another namespace now");
          const size = new Int32Array(1);
          libc.ioctl(adopted.fd, 0x800454d7n, new Uint8Array(size.buffer), "TUNGETVNETHDRSZ");
          assert.equal(size[0], VNET_HDR_LEN);
          assert.ok(libc.fcntl(adopted.fd, libc.F_GETFL) & libc.O_NONBLOCK);
          assert.ok(libc.fcntl(adopted.fd, libc.F_GETFD) & libc.FD_CLOEXEC);
          const features = await ns.exec(["ethtool", "-k", tap.name]);
          assert.match(features, /^\s*tx-tcp-segmentation: off/m);
          assert.match(features, /^\s*tx-checksum-ip-generic: off/m);
        } finally {
          adopted.close();
        }
        // The adopted copy was not the creator: the interface outlives it.
        assert.equal((await linkInfo(ns, tap.name)).ifname, tap.name);
      })
    ),
});

// Ethernet + ARP (RFC 826) for IPv4 over Ethernet.
const GUEST_MAC = [0x02, 0x00, 0x00, 0x00, 0x00, 0x02];
const TAP_IP = [198, 18, 0, 1];
const GUEST_IP = [198, 18, 0, 2];

function arpRequest(): Uint8Array {
  const frame = new Uint8Array(VNET_HDR_LEN + 42); // zero virtio_net_hdr: no offloads
  const eth = frame.subarray(VNET_HDR_LEN);
  eth.set([0xff, 0xff, 0xff, 0xff, 0xff, 0xff], 0);
  eth.set(GUEST_MAC, 6);
  eth.set([0x08, 0x06], 12); // ETH_P_ARP
  eth.set([0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01], 14); // Ethernet, IPv4, request
  eth.set(GUEST_MAC, 22);
  eth.set(GUEST_IP, 28);
  eth.set(TAP_IP, 38);
  return frame;
}

Deno.test({
  name: "a frame written to the tap reaches the host stack and its reply is read back",
  ignore: skip !== undefined,
  fn: () =>
    withNetns((ns) =>
      withTapIn(ns, async (tap) => {
        await ns.exec(["sysctl", "-qw", `net.ipv6.conf.${tap.name}.disable_ipv6=1`]);
        await ns.exec(["ip", "addr", "add", "198.18.0.1/24", "dev", tap.name]);
        await ns.exec(["ip", "link", "set", "dev", tap.name, "up"]);
        tap.setNonBlocking(true);
        const rx0 = await counter(ns, tap.name, "rx_packets");
        const tx0 = await counter(ns, tap.name, "tx_packets");

        const request = arpRequest();
        assert.equal(tap.write(request), request.length);
        assert.equal(await counter(ns, tap.name, "rx_packets"), rx0 + 1);

        const buf = new Uint8Array(VNET_HDR_LEN + 1514);
        let reply: Uint8Array | undefined;
        const deadline = Date.now() + 3000;
        while (!reply && Date.now() < deadline) {
          const n = tap.read(buf);
          if (n === 0) {
            await libc.pollOneAsync(tap.fd, libc.POLLIN, 200);
            continue;
          }
          const eth = buf.subarray(VNET_HDR_LEN, n);
          if (eth[12] === 0x08 && eth[13] === 0x06 && eth[21] === 2) reply = eth.slice();
        }
        assert.ok(reply, "no ARP reply was read from the tap");
        assert.deepEqual([...buf.subarray(0, 10)], new Array(10).fill(0), "vnet header");
        assert.deepEqual([...reply.subarray(0, 6)], GUEST_MAC, "reply goes to the guest MAC");
        assert.equal(
          Array.from(reply.subarray(22, 28), (b) => b.toString(16).padStart(2, "0"))
            .join(":"),
          tap.mac,
          "sender hardware address is the tap's",
        );
        assert.deepEqual([...reply.subarray(28, 32)], TAP_IP);
        assert.deepEqual([...reply.subarray(38, 42)], GUEST_IP);
        assert.ok(await counter(ns, tap.name, "tx_packets") > tx0);
        assert.equal(tap.read(buf), 0, "non-blocking read with nothing queued returns 0");
      })
    ),
});

Deno.test({
  name: "write() returns -errno for a frame the kernel refuses, without throwing",
  ignore: skip !== undefined,
  fn: () =>
    withNetns((ns) =>
      withTapIn(ns, async (tap) => {
        await ns.exec(["ip", "link", "set", "dev", tap.name, "up"]);
        const runt = new Uint8Array(VNET_HDR_LEN + 10); // shorter than an Ethernet header
        assert.equal(tap.write(runt), -libc.Errno.EINVAL);
        const badGso = arpRequest();
        badGso[1] = 0x7f; // gso_type: none of VIRTIO_NET_HDR_GSO_*
        assert.equal(tap.write(badGso), -libc.Errno.EINVAL);
        assert.equal(tap.write(arpRequest()), VNET_HDR_LEN + 42, "the tap still works");
      })
    ),
});
