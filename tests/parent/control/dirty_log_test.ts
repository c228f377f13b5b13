/**
 * Live migration's dirty log, end to end in one process (frontend_rig.ts:
 * the real backend, device worker, I/O workers and a real tap; the test
 * plays QEMU and the guest's driver): with VHOST_F_LOG_ALL on, every guest
 * page vionet changes has its bit set before the guest can see the change,
 * and no bit is set for a page vionet was not given to write (RX buffers,
 * the used rings); logging turned off (a cancelled migration) marks
 * nothing; a new SET_LOG_BASE takes over from the old bitmap; after
 * GET_VRING_BASE nothing in guest memory changes and no call is signalled.
 */

import assert from "node:assert/strict";
import * as libc from "../../../parent/host/libc.ts";
import { RX_QUEUE, TX_QUEUE } from "../../../ipc/datapath.ts";
import { VHOST_USER_SET_VRING_ADDR } from "../../../parent/control/vhost_user_messages.ts";
import { withNetns } from "../../net_ns.ts";
import { FrontendRig, GUEST_BYTES, GUEST_IP, RX_BUFFER_BYTES } from "./frontend_rig.ts";

const PAGE = 4096;
const PAGES = GUEST_BYTES / PAGE;
/** RX buffers live in their own part of guest memory, away from rings and TX data. */
const RX_AREA = 2 << 20;
const RX_AREA_BYTES = 1 << 20;
const TX_AREA = 3 << 20;

function pagesOf(gpa: number, len: number): number[] {
  const out: number[] = [];
  for (let p = Math.floor(gpa / PAGE); p <= Math.floor((gpa + len - 1) / PAGE); p++) out.push(p);
  return out;
}

function logged(log: Uint8Array): Set<number> {
  const out = new Set<number>();
  for (let p = 0; p < log.length * 8; p++) if (log[p >> 3] & (1 << (p & 7))) out.add(p);
  return out;
}

function changedPages(before: Uint8Array, after: Uint8Array): Set<number> {
  const out = new Set<number>();
  for (let p = 0; p < PAGES; p++) {
    const a = before.subarray(p * PAGE, (p + 1) * PAGE);
    const b = after.subarray(p * PAGE, (p + 1) * PAGE);
    for (let i = 0; i < PAGE; i++) {
      if (a[i] !== b[i]) {
        out.add(p);
        break;
      }
    }
  }
  return out;
}

/** The driver side of the traffic: RX buffers in RX_AREA, TX frames in TX_AREA. */
class Traffic {
  #nextRx = 0;
  #nextTx = 0;
  rxFrames = 0;
  txDone = 0;
  constructor(readonly rig: FrontendRig) {}

  postRx(n: number): void {
    for (let i = 0; i < n; i++) {
      const gpa = RX_AREA + (this.#nextRx++ % (RX_AREA_BYTES / RX_BUFFER_BYTES)) * RX_BUFFER_BYTES;
      this.rig.rx.post([{ len: RX_BUFFER_BYTES, writable: true, gpa }]);
    }
    this.rig.kickQueue(RX_QUEUE);
  }

  sendUdp(n: number): void {
    // frontend_rig's frames, at fixed places in TX_AREA (the driver's own pages).
    for (let i = 0; i < n; i++) {
      const gpa = TX_AREA + (this.#nextTx++ % 256) * 2048;
      const data = new Uint8Array(12 + 242).fill(i & 0xff);
      udpFrame(this.rig, data.subarray(12));
      this.rig.tx.post([{ data, gpa }]);
    }
    this.rig.kickQueue(TX_QUEUE);
  }

  /** Reads used entries; refills RX buffers one for one. */
  reap(): void {
    const rx = this.rig.rx.readUsed();
    this.rxFrames += rx.filter((e) => e.len > 0).length;
    if (rx.length > 0) this.postRx(rx.length);
    this.txDone += this.rig.tx.readUsed().length;
  }

  /** Pings the guest `n` times from the namespace (nobody answers) and sends `n` frames. */
  async both(n: number): Promise<void> {
    const rx0 = this.rxFrames, tx0 = this.txDone;
    this.sendUdp(n);
    await this.rig.ns.run(["ping", "-c", String(n), "-i", "0.01", "-W", "1", GUEST_IP]);
    await this.rig.until(`${n} frames each way`, () => {
      this.reap();
      return this.rxFrames - rx0 >= n && this.txDone - tx0 >= n;
    });
  }
}

/** A UDP frame from the guest to the tap's address, written into `out` (242 bytes). */
function udpFrame(rig: FrontendRig, out: Uint8Array): void {
  const mac = rig.tap.macBytes;
  out.set(mac, 0);
  out.set([0x52, 0x54, 0x00, 0x12, 0x34, 0x56], 6);
  out.set([0x08, 0x00], 12);
  const ip = out.subarray(14);
  const total = out.length - 14;
  ip.set([
    0x45,
    0,
    total >> 8,
    total & 0xff,
    0,
    0,
    0x40,
    0,
    64,
    17,
    0,
    0,
    198,
    18,
    0,
    2,
    198,
    18,
    0,
    1,
  ]);
  let sum = 0;
  for (let i = 0; i < 20; i += 2) sum += (ip[i] << 8) | ip[i + 1];
  while (sum > 0xffff) sum = (sum & 0xffff) + (sum >> 16);
  ip[10] = (~sum >> 8) & 0xff;
  ip[11] = ~sum & 0xff;
  const udp = ip.subarray(20);
  const ulen = total - 20;
  udp.set([0x9c, 0x40, 0, 9, ulen >> 8, ulen & 0xff, 0, 0]); // no UDP checksum (IPv4)
}

/** Pages only the driver writes: rings' avail and descriptors, TX frames. */
function driverPages(rig: FrontendRig): Set<number> {
  const out = new Set<number>();
  for (const d of [rig.rx, rig.tx]) {
    for (const p of pagesOf(d.descGpa, 16 * d.size)) out.add(p);
    for (const p of pagesOf(d.availGpa, 6 + 2 * d.size)) out.add(p);
  }
  for (const p of pagesOf(TX_AREA, 256 * 2048)) out.add(p);
  return out;
}

/** Pages vionet may write: RX buffers and the used rings. */
function vionetPages(rig: FrontendRig): Set<number> {
  const out = new Set<number>(pagesOf(RX_AREA, RX_AREA_BYTES));
  for (const d of [rig.rx, rig.tx]) for (const p of pagesOf(d.usedGpa, 6 + 8 * d.size)) out.add(p);
  return out;
}

function setLogAddr(rig: FrontendRig, on: boolean): Promise<unknown> {
  return Promise.all([
    rig.send(VHOST_USER_SET_VRING_ADDR, rig.vringAddr(RX_QUEUE, on)),
    rig.send(VHOST_USER_SET_VRING_ADDR, rig.vringAddr(TX_QUEUE, on)),
  ]);
}

Deno.test({
  name:
    "dirty log: every page vionet changes is logged, nothing else; logging off marks nothing; " +
    "a new log takes over; after GET_VRING_BASE guest memory stays still and no call comes",
  ignore: Deno.uid() !== 0,
  fn: () =>
    withNetns(async (ns) => {
      const rig = await FrontendRig.open(ns);
      try {
        await rig.start();
        const traffic = new Traffic(rig);
        traffic.postRx(128);
        await traffic.both(10); // the data path runs, without a log
        const own = driverPages(rig);
        const allowed = vionetPages(rig);
        const logBytes = PAGES / 8;

        // Migration starts: the log, then LOG_ALL, then VHOST_VRING_F_LOG (QEMU's order).
        const first = await rig.setLogBase(logBytes);
        await rig.setFeatures(true);
        await setLogAddr(rig, true);
        let before = rig.guest.snapshot()[0];
        await traffic.both(40);
        let after = rig.guest.snapshot()[0];
        let bits = logged(first);
        const changed = changedPages(before, after);
        const rxPagesChanged = [...changed].filter((p) => !own.has(p) && allowed.has(p));
        assert.ok(rxPagesChanged.length >= 5, `vionet changed ${rxPagesChanged.length} pages`);
        for (const p of changed) {
          if (own.has(p)) continue; // the driver's own writes: not vionet's to log
          assert.ok(
            bits.has(p),
            `page ${p} (GPA 0x${(p * PAGE).toString(16)}) changed, not logged`,
          );
        }
        for (const p of bits) {
          assert.ok(allowed.has(p), `page ${p} logged, but vionet was given nothing there`);
        }
        for (const d of [rig.rx, rig.tx]) {
          assert.ok(bits.has(Math.floor(d.usedGpa / PAGE)), "the used rings are logged");
        }

        // A cancelled migration: logging off, the bitmap cleared; nothing more is marked.
        await rig.setFeatures(false);
        await setLogAddr(rig, false);
        first.fill(0);
        await traffic.both(20);
        assert.deepEqual([...logged(first)], [], "logging off marks nothing");

        // Again, with a new log: the old bitmap is no longer written.
        const second = await rig.setLogBase(logBytes);
        await rig.setFeatures(true);
        await setLogAddr(rig, true);
        before = rig.guest.snapshot()[0];
        await traffic.both(20);
        after = rig.guest.snapshot()[0];
        bits = logged(second);
        for (const p of changedPages(before, after)) {
          if (!own.has(p)) assert.ok(bits.has(p), `page ${p} changed, not in the new log`);
        }
        assert.deepEqual([...logged(first)], [], "the replaced log is not written");

        // Switch-over: the rings stop. The log is complete; then nothing moves.
        await rig.stop();
        after = rig.guest.snapshot()[0];
        bits = logged(second);
        for (const p of changedPages(before, after)) {
          if (!own.has(p)) assert.ok(bits.has(p), `page ${p} changed by the stop, not logged`);
        }
        for (const fd of rig.call) libc.eventfdDrain(fd);
        traffic.sendUdp(10);
        traffic.postRx(10);
        await ns.run(["ping", "-c", "10", "-i", "0.01", "-W", "1", GUEST_IP]);
        await new Promise((r) => setTimeout(r, 300));
        const later = rig.guest.snapshot()[0];
        for (const p of changedPages(after, later)) {
          assert.ok(own.has(p), `page ${p} changed after GET_VRING_BASE`);
        }
        for (const fd of rig.call) {
          assert.equal(libc.eventfdDrain(fd), false, "no call after GET_VRING_BASE");
        }
      } finally {
        await rig.close();
      }
    }),
});
