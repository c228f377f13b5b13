/**
 * A device that lies when guest memory is taken back (tests/parent/control/lying_device.ts)
 * cannot keep a view of memory the parent unmaps: the parent accepts a
 * region only as the very buffer it lent, ends a device that answers with
 * anything else, retires what it held (zero pages, the range kept), and a new
 * device serves the next VM. Retired ranges are unmapped once no thread that
 * could hold them is left, and the reserved address space stays bounded.
 * Real memfd mappings, the real backend and device port, real workers.
 */

import assert from "node:assert/strict";
import { DeviceHost } from "../../../parent/control/device_host.ts";
import { VionetDevicePort } from "../../../parent/control/device_port.ts";
import { type MappedRegion, mapRegion } from "../../../parent/control/guest_memory_map.ts";
import * as libc from "../../../parent/host/libc.ts";
import { RetiredMemory, retiredMemory } from "../../../parent/control/retired_memory.ts";
import { VhostUserBackend } from "../../../parent/control/vhost_user_backend.ts";
import {
  decodeHeader,
  type MemoryRegionDesc,
  VHOST_USER_SET_MEM_TABLE,
} from "../../../parent/control/vhost_user_messages.ts";
import { encodeMemTable, encodeRequest } from "./vhost_user_encode.ts";
import { LIBC_BACKEND_SYSTEM } from "../../../parent/control/vhost_user_socket.ts";
import { workerCensus } from "../../../parent/control/worker_census.ts";
import { quietLogger, testConfig } from "../../helpers.ts";
import { makeMemfd, openFdsMatching, readAt, writeAt } from "./vhost_user_frontend.ts";
import { NESTED_MS } from "./lying_device.ts";

const SIZE = 64 * 1024;
const MEMFD_NAME = "vionet-lying-test";

function guestFile(fill: number): number {
  const fd = makeMemfd(SIZE, MEMFD_NAME);
  writeAt(fd, 0, new Uint8Array(SIZE).fill(fill));
  return fd;
}

/** The line of /proc/self/maps whose range holds `addr` (zero-page ranges merge with neighbours). */
function mapsLine(addr: bigint): string | undefined {
  return Deno.readTextFileSync("/proc/self/maps").split("\n").filter((l) => l !== "").find((l) => {
    const [start, end] = l.split(" ")[0].split("-").map((h) => BigInt(`0x${h}`));
    return start <= addr && addr < end;
  });
}

/** Whether `base` is one of the ranges the process's retired memory keeps. */
function retired(base: bigint): boolean {
  return retiredMemory.ranges().some((r) => r.base === base);
}

function fdOpen(fd: number): boolean {
  return openFdsMatching(`memfd:${MEMFD_NAME}`).includes(fd);
}

async function until(what: string, ok: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) {
      throw new Error(
        `timed out waiting for ${what}; strays: ${JSON.stringify(workerCensus.strays())}`,
      );
    }
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The connection of one VM: a backend on the port, and SET_MEM_TABLE with fresh memfds. */
class Vm {
  readonly backend: VhostUserBackend;
  /** dup()s of the memfds of each table sent, to look at the guest's memory afterwards. */
  readonly files: number[][] = [];
  #gpa = 0n;

  constructor(port: VionetDevicePort, logger: ReturnType<typeof quietLogger>) {
    this.backend = new VhostUserBackend(port, LIBC_BACKEND_SYSTEM, { logger });
  }

  /** Sends a table of `n` fresh regions. */
  setMemTable(n: number) {
    const regions: MemoryRegionDesc[] = [];
    const fds: number[] = [];
    for (let i = 0; i < n; i++) {
      const gpa = this.#gpa;
      this.#gpa += 0x100_0000n;
      regions.push({
        guestPhysAddr: gpa,
        size: BigInt(SIZE),
        userAddr: 0x7f00_0000_0000n + gpa,
        mmapOffset: 0n,
      });
      fds.push(guestFile(0));
    }
    this.files.push(fds.map((fd) => libc.dup(fd)));
    const table = encodeMemTable(regions);
    const msg = encodeRequest(VHOST_USER_SET_MEM_TABLE, table);
    return this.backend.handleMessage(decodeHeader(msg), table, fds);
  }

  /** The host addresses of the regions mapped now. */
  bases(): bigint[] {
    return this.backend.regions.map((r: MappedRegion) => Deno.UnsafePointer.value(r.mapBase));
  }

  closeFiles(): void {
    for (const fd of this.files.flat()) libc.close(fd);
  }
}

/** Reads the guest's files twice, 100 ms apart: nobody may write them any more. */
async function assertFrozen(fds: number[]): Promise<void> {
  const first = fds.map((fd) => readAt(fd, 0, SIZE));
  await new Promise((r) => setTimeout(r, 100));
  fds.forEach((fd, i) => assert.deepEqual(readAt(fd, 0, SIZE), first[i], "guest memory changed"));
}

const LIES = [
  ["empty", /returned 0 buffers for 2 regions/],
  ["fresh", /buffer 0 the device returned for GPA 0x0.* is not the one lent/],
  ["swapped", /buffer 0 the device returned for GPA 0x0.* is not the one lent/],
  ["twice", /buffer 1 the device returned for GPA 0x1000000.* is not the one lent/],
  ["nested", /buffer 0 the device returned for GPA 0x0.* is not the one lent/],
] as const;

for (const [how, refusal] of LIES) {
  Deno.test(`a device that answers revoke with ${how} buffers is ended; its memory is retired, not unmapped; a new device serves the next VM`, async () => {
    const logger = quietLogger();
    retiredMemory.configure({ logger });
    const reclaimedBefore = retiredMemory.reclaimedBytes;
    const deaths: string[] = [];
    const liar = await DeviceHost.start({
      config: testConfig(),
      handlers: { tunscap: (o) => o },
      logger,
      onDeath: (reason) => deaths.push(reason),
      timeoutMs: 2000,
      workerUrl: new URL("./lying_device.ts", import.meta.url),
    });
    const port = new VionetDevicePort({ device: liar, tapFd: -1, logger });
    const first = new Vm(port, logger);
    let next: DeviceHost | null = null;
    let second: Vm | null = null;
    try {
      // The liar times its last write into memory it kept (it, or its nested worker).
      const clock = new SharedArrayBuffer(8);
      liar.sendRaw({ kind: "lie", how, clock });
      const granted = await first.setMemTable(2);
      assert.ok(granted.ok, granted.ok ? "" : granted.error.message);
      const bases = first.bases();
      const heldFiles = first.files[0];

      // The next table makes the port take the first one back: the device lies.
      const refused = await first.setMemTable(1);
      const refusedAt = Date.now();
      assert.equal(refused.ok, false, "a table whose predecessor was not given back is refused");
      assert.equal(liar.alive, false, "the lying device is ended");
      assert.match(deaths[0] ?? "", /did not give back guest memory \(revoke-memory: /);
      assert.match(deaths[0], refusal);
      assert.ok(
        logger.lines.some((l) => /refused the device's memory-returned: /.test(l)),
        logger.lines.join("\n"),
      );

      // The connection ends: what the device held is retired, its range kept.
      await first.backend.close();
      for (const base of bases) {
        const line = mapsLine(base) ?? "";
        assert.match(line, /^[0-9a-f]+-[0-9a-f]+ rw-p /, `still mapped: ${line}`);
        assert.doesNotMatch(line, /memfd/, "the guest's file is no longer mapped there");
        assert.ok(retired(base), "kept as a retired range");
      }
      assert.ok(
        logger.lines.filter((l) => /was never given back by a worker that was ended/.test(l))
          .length >= 2,
        logger.lines.join("\n"),
      );
      for (const fd of heldFiles) assert.equal(fdOpen(fd), true); // our dup()s
      // Whatever the device (or its nested worker) still writes lands in zero pages.
      await assertFrozen(heldFiles);

      // A new device worker serves the next VM, and gives memory back for real.
      next = await DeviceHost.start({
        config: testConfig(),
        handlers: { tunscap: (o) => o },
        logger,
        timeoutMs: 2000,
      });
      port.replaceDevice(0, next);
      second = new Vm(port, logger);
      const a = await second.setMemTable(1);
      assert.ok(a.ok, a.ok ? "" : a.error.message);
      const secondBase = second.bases()[0];
      const b = await second.setMemTable(1);
      assert.ok(b.ok, b.ok ? "" : b.error.message);
      assert.doesNotMatch(mapsLine(secondBase) ?? "", /memfd/, "a region given back is unmapped");
      assert.equal(retired(secondBase), false, "and not retired");
      assert.equal(next.alive, true);

      // Once no thread that could hold the retired ranges is left, they are
      // unmapped (on a loaded machine that may have happened during the checks above).
      const heldFor = Date.now() - refusedAt;
      await until(
        "the retired ranges to be unmapped",
        () => bases.every((base) => !retired(base)),
        how === "nested" ? NESTED_MS + 10_000 : 10_000,
      );
      assert.ok(retiredMemory.reclaimedBytes >= reclaimedBefore + 2 * SIZE);
      // (Swapped: it gave the real buffers back, in the wrong order, and kept none.)
      const lastWrite = new Float64Array(clock)[0];
      assert.equal(lastWrite > 0, how !== "swapped", "the lying device wrote into what it kept");
      assert.ok(
        retiredMemory.lastReclaimAt >= lastWrite,
        `unmapped ${lastWrite - retiredMemory.lastReclaimAt} ms before the device's last ` +
          `write into it (checks took ${heldFor} ms)`,
      );
    } finally {
      liar.terminate();
      await first.backend.close();
      first.closeFiles();
      if (second) {
        await second.backend.close();
        second.closeFiles();
      }
      next?.terminate();
    }
  });
}

Deno.test("after many VMs whose device lied, the address space kept reserved does not grow", async () => {
  const logger = quietLogger();
  retiredMemory.configure({ logger });
  const before = retiredMemory.reservedBytes;
  const retiredBefore = retiredMemory.retiredCount;
  const CONNECTIONS = 8;
  for (let n = 0; n < CONNECTIONS; n++) {
    const liar = await DeviceHost.start({
      config: testConfig(),
      handlers: { tunscap: (o) => o },
      logger,
      timeoutMs: 2000,
      workerUrl: new URL("./lying_device.ts", import.meta.url),
    });
    const port = new VionetDevicePort({ device: liar, tapFd: -1, logger });
    const vm = new Vm(port, logger);
    try {
      liar.sendRaw({ kind: "lie", how: "empty" });
      assert.ok((await vm.setMemTable(2)).ok);
      assert.equal((await vm.setMemTable(1)).ok, false);
      await vm.backend.close();
      assert.equal(retiredMemory.reservedBytes - before, 2 * SIZE, `connection ${n}: retired`);
      // Before the next VM comes, the ended device's thread has exited and
      // its ranges are unmapped: nothing accumulates from one VM to the next.
      await until(`connection ${n}: reclaimed`, () => retiredMemory.reservedBytes === before);
    } finally {
      liar.terminate();
      vm.closeFiles();
    }
  }
  assert.equal(retiredMemory.retiredCount - retiredBefore, 2 * CONNECTIONS, "every lie retired");
});

Deno.test("retired ranges wait for every stray thread; past the limit the owner is told", () => {
  let strays = [{ tid: 1, name: "worker-99" }];
  const over: string[] = [];
  const unmapped: bigint[] = [];
  const memory = new RetiredMemory({
    limitBytes: 3 * SIZE,
    strays: () => strays,
    unmap: (base, length) => {
      unmapped.push(Deno.UnsafePointer.value(base));
      libc.munmap(base, length);
    },
  });
  memory.configure({ onUncontained: (reason) => over.push(reason) });
  const regions = [0, 1, 2, 3].map(() =>
    mapRegion({ guestPhysAddr: 0n, size: BigInt(SIZE), userAddr: 0n, mmapOffset: 0n }, guestFile(7))
  );
  for (const r of regions.slice(0, 3)) assert.equal(memory.retire(r, "test region"), null);
  assert.equal(memory.reservedBytes, 3 * SIZE);
  assert.deepEqual(over, [], "at the limit, not past it");
  assert.equal(memory.retire(regions[3], "test region"), null);
  assert.equal(over.length, 1, "past the limit the owner hears of it");
  assert.match(over[0], new RegExp(`${4 * SIZE} bytes .* reserved .*limit ${3 * SIZE}`));
  assert.deepEqual(unmapped, [], "nothing unmapped while a stray runs");
  const bases = regions.map((r) => Deno.UnsafePointer.value(r.mapBase));
  for (const base of bases) assert.match(mapsLine(base) ?? "", / rw-p /);
  strays = [];
  assert.equal(memory.reclaim(), 4 * SIZE);
  assert.equal(memory.reservedBytes, 0);
  assert.deepEqual(unmapped.sort(), bases.sort(), "every range unmapped once no stray is left");
});

Deno.test("a stray that outlives the grace period is named, and the owner told once", async () => {
  const told: string[] = [];
  const memory = new RetiredMemory({
    graceMs: 100,
    strays: () => [{ tid: 4242, name: "worker-7" }],
    unmap: () => assert.fail("nothing may be unmapped while a stray runs"),
  });
  memory.configure({ onUncontained: (reason) => told.push(reason) });
  const region = mapRegion(
    { guestPhysAddr: 0n, size: BigInt(SIZE), userAddr: 0n, mmapOffset: 0n },
    guestFile(1),
  );
  assert.equal(memory.retire(region, "test region"), null);
  assert.deepEqual(told, [], "not within the grace period");
  await until("the stray to be reported", () => told.length > 0, 2000);
  assert.match(told[0], /thread worker-7 \(tid 4242\) belongs to no worker the parent runs/);
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(told.length, 1, "reported once");
  assert.equal(memory.reservedBytes, SIZE, "still kept");
  libc.munmap(region.mapBase, region.mapLength);
});
