/**
 * Guest memory that a worker never gave back is retired, not unmapped: a
 * stale view then reads zeros instead of killing the daemon with SIGSEGV.
 * Real mappings of a memfd, the real backend and device port, and a device
 * worker that keeps writing into its grant after the parent gave up on it.
 */

import assert from "node:assert/strict";
import { NoAnswerError } from "../../../ipc/endpoint.ts";
import { DeviceHost } from "../../../parent/control/device_host.ts";
import { VionetDevicePort } from "../../../parent/control/device_port.ts";
import { mapRegion, retireRegion } from "../../../parent/control/guest_memory_map.ts";
import * as libc from "../../../parent/host/libc.ts";
import {
  VhostUserBackend,
  VIONET_PROTOCOL_FEATURES,
} from "../../../parent/control/vhost_user_backend.ts";
import {
  decodeHeader,
  encodeU64,
  VHOST_USER_ADD_MEM_REG,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_PROTOCOL_FEATURES,
} from "../../../parent/control/vhost_user_messages.ts";
import { encodeMemRegion, encodeMemTable, encodeRequest } from "./vhost_user_encode.ts";
import { LIBC_BACKEND_SYSTEM } from "../../../parent/control/vhost_user_socket.ts";
import { quietLogger, testConfig } from "../../helpers.ts";
import { retiredMemory } from "../../../parent/control/retired_memory.ts";
import { makeMemfd, openFdsMatching, readAt, writeAt } from "./vhost_user_frontend.ts";

const SIZE = 64 * 1024;

const MEMFD_NAME = "vionet-retire-test";

/** A memfd of SIZE bytes filled with `fill`; returns its fd. */
function guestFile(fill: number): number {
  const fd = makeMemfd(SIZE, MEMFD_NAME);
  writeAt(fd, 0, new Uint8Array(SIZE).fill(fill));
  return fd;
}

/** The line of /proc/self/maps whose range starts at `addr`. */
function mapsLine(addr: bigint): string | undefined {
  const start = addr.toString(16);
  return Deno.readTextFileSync("/proc/self/maps").split("\n").find((l) =>
    l.split("-")[0] === start
  );
}

/** Whether `fd` is (still) open on a guest file of this test. */
function fdOpen(fd: number): boolean {
  return openFdsMatching(`memfd:${MEMFD_NAME}`).includes(fd);
}

Deno.test("retireRegion: a stale view reads zeros, the guest's file is let go", () => {
  const fd = guestFile(0xab);
  const keep = libc.dup(fd); // to look at the file afterwards
  try {
    const region = mapRegion({
      guestPhysAddr: 0n,
      size: BigInt(SIZE),
      userAddr: 0n,
      mmapOffset: 0n,
    }, fd);
    const base = Deno.UnsafePointer.value(region.mapBase);
    const stale = new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(region.pointer, SIZE));
    assert.equal(stale[100], 0xab);
    assert.match(mapsLine(base) ?? "", /memfd:vionet-retire-test/);

    assert.equal(retireRegion(region), null);
    // Zero pages where the guest's were; writing is harmless and reaches nobody.
    assert.equal(stale[100], 0);
    stale.fill(0x55);
    const line = mapsLine(base) ?? "";
    assert.doesNotMatch(line, /memfd/, line);
    assert.match(line, /^[0-9a-f]+-[0-9a-f]+ rw-p /, line);
    assert.equal(fdOpen(fd), false, "the region's fd is closed");
    const file = readAt(keep, 0, SIZE);
    assert.ok(file.every((b) => b === 0xab), "the guest's memory is untouched");
  } finally {
    libc.close(keep);
  }
});

/** The real backend and port over a hoarding device worker; closes all at the end. */
async function withHoarder(
  fn: (rig: {
    device: DeviceHost;
    backend: VhostUserBackend;
    logger: ReturnType<typeof quietLogger>;
    deaths: string[];
    setMemTable: (fd: number, gpa: bigint) => ReturnType<VhostUserBackend["handleMessage"]>;
    /** ADD_MEM_REG (CONFIGURE_MEM_SLOTS negotiated first). */
    addMemRegion: (fd: number, gpa: bigint) => ReturnType<VhostUserBackend["handleMessage"]>;
  }) => Promise<void>,
): Promise<void> {
  const logger = quietLogger();
  const deaths: string[] = [];
  const device = await DeviceHost.start({
    config: testConfig(),
    handlers: { tunscap: (o) => o },
    logger,
    onDeath: (reason) => deaths.push(reason),
    timeoutMs: 2000,
    workerUrl: new URL("./hoarding_device.ts", import.meta.url),
  });
  // The test's end stops its endless writing (terminate() alone would not).
  const stop = new Int32Array(new SharedArrayBuffer(4));
  device.sendRaw({ kind: "stop-word", word: stop.buffer });
  const port = new VionetDevicePort({ device, tapFd: -1, logger });
  const backend = new VhostUserBackend(port, LIBC_BACKEND_SYSTEM, { logger });
  const setMemTable = (fd: number, gpa: bigint) => {
    const table = encodeMemTable([
      { guestPhysAddr: gpa, size: BigInt(SIZE), userAddr: 0x7f00_0000_0000n + gpa, mmapOffset: 0n },
    ]);
    const msg = encodeRequest(VHOST_USER_SET_MEM_TABLE, table);
    return backend.handleMessage(decodeHeader(msg), table, [fd]);
  };
  const addMemRegion = async (fd: number, gpa: bigint) => {
    const features = encodeU64(VIONET_PROTOCOL_FEATURES);
    const set = encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, features);
    const negotiated = await backend.handleMessage(decodeHeader(set), features, []);
    if (!negotiated.ok) throw negotiated.error;
    const region = encodeMemRegion(
      { guestPhysAddr: gpa, size: BigInt(SIZE), userAddr: 0x7f00_0000_0000n + gpa, mmapOffset: 0n },
    );
    const msg = encodeRequest(VHOST_USER_ADD_MEM_REG, region);
    return backend.handleMessage(decodeHeader(msg), region, [fd]);
  };
  try {
    await fn({ device, backend, logger, deaths, setMemTable, addMemRegion });
  } finally {
    Atomics.store(stop, 0, 1);
    device.terminate();
    await backend.close();
  }
}

Deno.test("an ADD_MEM_REG grant the device refuses fails ADD_MEM_REG with the device's reason; the region, held by no one, is unmapped", async () => {
  await withHoarder(async ({ device, backend, addMemRegion }) => {
    device.sendRaw({ kind: "refuse-grants" });
    const fd = guestFile(0);
    const retiredBefore = retiredMemory.ranges().length;
    const result = await addMemRegion(fd, 0n);
    assert.equal(result.ok, false);
    if (!result.ok) assert.match(result.error.message, /no room for it/);
    assert.equal(device.alive, true, "a refusal is an answer: the device lives on");
    assert.equal(backend.regions.length, 0);
    assert.equal(fdOpen(fd), false, "the region's fd is closed");
    assert.equal(retiredMemory.ranges().length, retiredBefore, "unmapped, not retired");
  });
});

/** Reads the whole file twice, 100 ms apart: the guest's memory must have stopped changing. */
async function assertFrozen(fd: number): Promise<void> {
  const read = () => readAt(fd, 0, SIZE);
  const first = read();
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(read(), first, "the guest's memory no longer changes");
}

Deno.test("a device that took memory and wedged is ended; the memory is retired, the daemon lives", async () => {
  await withHoarder(async ({ device, backend, logger, deaths, setMemTable }) => {
    const fd = guestFile(0);
    const keep = libc.dup(fd);
    try {
      const first = await setMemTable(fd, 0n);
      assert.ok(first.ok, first.ok ? "" : first.error.message);
      const base = Deno.UnsafePointer.value(backend.regions[0].mapBase);
      // The device writes into the guest's memory (through its grant).
      const end = Date.now() + 5000;
      while (!logger.lines.some((l) => l.includes("hoarding")) && Date.now() < end) {
        await new Promise((r) => setTimeout(r, 10));
      }
      await new Promise((r) => setTimeout(r, 50));
      const file = readAt(keep, 0, SIZE);
      assert.notEqual(file[0], 0, "the device writes into its grant");

      // A new table: the device does not give the old one back.
      const next = guestFile(0);
      const second = await setMemTable(next, 0x100_0000n);
      assert.equal(second.ok, false);
      if (!second.ok) assert.match(second.error.message, /revoke-memory request \d+ timed out/);
      assert.equal(fdOpen(next), false, "the refused table's region is released");
      assert.equal(device.alive, false);
      assert.equal(deaths.length, 1);
      assert.match(deaths[0], /did not give back guest memory \(revoke-memory: .*timed out/);

      // The connection ends: the old region is retired, not unmapped.
      await backend.close();
      assert.ok(
        logger.lines.some((l) => /never given back by a worker that was ended/.test(l)),
        logger.lines.join("\n"),
      );
      assert.doesNotMatch(mapsLine(base) ?? "", /memfd/);
      assert.equal(fdOpen(fd), false, "the region's fd is closed");
      await assertFrozen(keep);
    } finally {
      libc.close(keep);
    }
  });
});

Deno.test("a grant the device never answers is retired, not unmapped", async () => {
  await withHoarder(async ({ device, logger, deaths, setMemTable }) => {
    device.sendRaw({ kind: "hoard-silently" });
    const fd = guestFile(0);
    const keep = libc.dup(fd);
    try {
      const result = await setMemTable(fd, 0n);
      assert.equal(result.ok, false);
      if (!result.ok) {
        assert.ok(result.error instanceof NoAnswerError, String(result.error));
        assert.match(result.error.message, /grant-memory request \d+ timed out/);
      }
      assert.ok(logger.lines.some((l) => l.includes("hoarding")), logger.lines.join("\n"));
      assert.equal(device.alive, false);
      assert.match(deaths[0] ?? "", /did not give back guest memory \(grant-memory: /);
      assert.ok(
        logger.lines.some((l) => /never given back by a worker that was ended/.test(l)),
        logger.lines.join("\n"),
      );
      assert.equal(fdOpen(fd), false, "the region's fd is closed");
      await assertFrozen(keep);
    } finally {
      libc.close(keep);
    }
  });
});
