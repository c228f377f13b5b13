/**
 * bench/tap_ceiling.ts: the C program's line is parsed strictly, the table
 * has one row per frame, the bench report shows it only when measured, the
 * program builds and writes every frame kind to a real tap in a netns (one
 * system call a frame and in io_uring batches), and its two readers take
 * what the kernel sends out of the tap.
 *
 * @module
 */

import assert from "node:assert/strict";
import {
  ceilingBinary,
  type CeilingSample,
  ceilingTable,
  ceilingUnavailable,
  measureTapCeiling,
  parseCeilingLine,
  rxCeilingLines,
} from "../../bench/tap_ceiling.ts";
import { markdown, type Results } from "../../bench/report.ts";
import { type BackendSample, RX_CEILING_BACKENDS } from "../../bench/dpdk.ts";
import { linkStats, Netns, sleep } from "../../bench/proc.ts";

Deno.test("parseCeilingLine() reads frames, seconds, errors, CPU seconds if given, and names a bad line", () => {
  assert.deepEqual(parseCeilingLine("3300000 2.000417 0\n"), {
    frames: 3300000,
    seconds: 2.000417,
    errors: 0,
  });
  assert.deepEqual(parseCeilingLine("3300000 2.000417 0 1.5\n"), {
    frames: 3300000,
    seconds: 2.000417,
    errors: 0,
    cpuSeconds: 1.5,
  });
  assert.throws(
    () => parseCeilingLine("tap_ceiling: TUNSETIFF: Operation not permitted"),
    /not "frames seconds errors \[cpu\]"/,
  );
  assert.throws(() => parseCeilingLine("10 0.000000 0"), /ran for 0.000000 s/);
  assert.throws(() => parseCeilingLine("10 1.0 0 extra"), /not "frames seconds errors \[cpu\]"/);
  assert.throws(() => parseCeilingLine("10 1.0 0 1.0 2"), /not "frames seconds errors \[cpu\]"/);
});

function sample(
  frame: CeilingSample["frame"],
  call: CeilingSample["call"],
  nonBlocking: boolean,
  mpps: number,
): CeilingSample {
  return { frame, call, nonBlocking, mpps, microseconds: 1 / mpps, errors: 0 };
}

Deno.test("ceilingTable() has a row per frame and a column per call and blocking mode", () => {
  const lines = ceilingTable([
    sample("64", "write", true, 1.646),
    sample("64", "writev", false, 1.365),
    { ...sample("64", "uring-writev", true, 3.5), cpuMicroseconds: 0.2 },
    { ...sample("tso", "write", true, 0.488), cpuMicroseconds: 2 },
  ]);
  assert.equal(lines.length, 2 + 3);
  assert.match(
    lines[0],
    /`write` header\+frame, O_NONBLOCK \| `write` header\+frame, blocking \| `writev` header, frame, O_NONBLOCK \| `writev` header, frame, blocking \| io_uring, 64 `WRITEV` \(header, frame\) a call, O_NONBLOCK \|$/,
  );
  assert.match(
    lines[2],
    /^\| 64 B \| 1\.646 Mpps \(0\.61 µs\) \| {2}\| {2}\| 1\.365 Mpps \(0\.73 µs\) \| 3\.500 Mpps \(0\.29 µs; 0\.20 µs CPU\) \|$/,
  );
  assert.match(lines[3], /^\| 1514 B \|/);
  assert.match(
    lines[4],
    /^\| 64 KiB TSO \| 0\.488 Mpps \(2\.05 µs\) \|/,
    "CPU not shown: ~ the wall time",
  );
});

function results(ceiling?: CeilingSample[]): Results {
  return {
    machine: {
      cpus: 2,
      cpuModel: "test",
      kernel: "6",
      accelerator: "TCG",
      deno: "Deno 2",
      dpdk: "22.11",
      qemu: "7.2",
      date: "2026-12-05 19:00 UTC",
      loadBefore: "0 0 0",
    },
    command: "deno task bench",
    options: {},
    backend: [],
    guest: [],
    idle: [],
    ...(ceiling ? { ceiling } : {}),
    notes: [],
  };
}

Deno.test("the bench report shows the kernel ceiling only when it was measured", () => {
  assert.doesNotMatch(markdown(results()), /kernel's own ceiling/);
  const md = markdown(results([sample("1514", "writev", true, 1.426)]));
  assert.match(md, /\*\*The kernel's own ceiling\*\*/);
  assert.match(md, /\| 1514 B \| {2}\| {2}\| 1\.426 Mpps \(0\.70 µs\) \| {2}\| {2}\|/);
});

function rxSample(backend: BackendSample["backend"], pps: number, error?: string): BackendSample {
  return {
    test: "rx64",
    backend,
    rep: 0,
    pps,
    gbps: pps * 64 * 8 / 1e9,
    backendCores: 1,
    tapDropped: 100,
    seconds: 2,
    ...(error ? { error } : {}),
  };
}

Deno.test("rxCeilingLines() gives each reader's median, range and drops, and says what failed", () => {
  const lines = rxCeilingLines([
    rxSample("c-readv", 400_000),
    rxSample("c-readv", 600_000),
    rxSample("c-readv", 500_000),
    rxSample("c-uring-readv", 0, "no frames delivered"),
    rxSample("vionet", 1),
  ]);
  assert.deepEqual(lines, [
    "rx64 c-readv: 0.500 Mpps [0.400–0.600] over 3, 300 frames dropped at the tap",
    "rx64 c-uring-readv: not measured (1 failed)",
  ]);
});

Deno.test({
  name: "tap_ceiling.c builds and puts every frame kind on a real tap, whole",
  ignore: Deno.uid() !== 0,
  async fn() {
    const why = await ceilingUnavailable();
    assert.equal(why, undefined, `scripts/setup.sh --test installs gcc: ${why}`);
    const samples = await measureTapCeiling({ cpu: 0, seconds: 0.05 });
    // write and writev in both blocking modes, io_uring non-blocking only, for 3 frames.
    assert.equal(samples.length, 3 * (2 * 2 + 1));
    for (const s of samples) {
      const what = `${s.frame} ${s.call} ${s.nonBlocking ? "non-blocking" : "blocking"}`;
      assert.equal(s.errors, 0, `${what}: short or failed writes`);
      assert.ok(s.mpps > 0.001, `${what}: ${s.mpps} Mpps`);
      assert.ok(
        s.cpuMicroseconds! > 0 && s.cpuMicroseconds! <= s.microseconds * 1.05,
        `${what}: ${s.cpuMicroseconds} µs of CPU against ${s.microseconds} µs of wall time`,
      );
    }
  },
});

Deno.test({
  name:
    "tap_ceiling.c's readers (readv, io_uring READV) take the frames the kernel sends out of the tap",
  ignore: Deno.uid() !== 0,
  async fn() {
    const why = await ceilingUnavailable();
    assert.equal(why, undefined, `scripts/setup.sh --test installs gcc: ${why}`);
    const bin = await ceilingBinary();
    for (const backend of RX_CEILING_BACKENDS) {
      const ns = await Netns.create();
      try {
        const reader = ns.spawn([bin, "vr0", "-", backend.slice(2), "nonblock", "0"], { cpu: 0 });
        await reader.waitFor(/ready/, 0, 10_000, `${backend} to open its tap`);
        // The kernel's ARP requests for a neighbour that never answers go out of the tap.
        await ns.exec(["ip", "addr", "add", "198.18.0.1/24", "dev", "vr0"]);
        await ns.exec(["ping", "-c", "3", "-i", "0.2", "-W", "1", "198.18.0.2"]).catch(() => {});
        await sleep(100);
        const s = await linkStats(ns.name, "vr0");
        assert.ok(s.txPackets >= 1, `${backend}: the tap handed over ${s.txPackets} frames`);
        assert.equal(s.txDropped, 0, `${backend}: the tap dropped ${s.txDropped} frames`);
        assert.equal(reader.done, false, `${backend} exited:\n${reader.tail()}`);
      } finally {
        await ns.close();
      }
    }
  },
});
