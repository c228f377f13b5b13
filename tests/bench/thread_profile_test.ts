import assert from "node:assert/strict";
import {
  layerOf,
  parsePerfReport,
  profileTable,
  roleOf,
  shortSymbol,
  threadProfiles,
} from "../../bench/thread_profile.ts";

// What `perf report --no-children --sort pid,dso,sym --stdio -g none -t '|'` printed here.
const REPORT = `# To display the perf.data header info, please use --header/--header-only options.
#
# Samples: 6K of event 'cpu-clock:ppp'
#
 20.00%  |  11:worker-1       |[JIT] tid 10        |[.] JS:*'walkChain file:///r/main/device/chain.ts:148:30
 10.00%  |  11:worker-1       |[kernel.kallsyms]   |[k] pvm_irq_enable
 10.00%  |  11:worker-1       |deno                |[.] 0x0000000003764415
 30.00%  |  12:worker-2       |[kernel.kallsyms]   |[k] _copy_from_iter
  5.00%  |  12:worker-2       |[JIT] tid 10        |[.] JS:o*loop file:///r/main/parent/io/writer_worker.ts:45:20
  5.00%  |  12:worker-2       |[JIT] tid 10        |[.] JS:*'#prepare file:///r/main/parent/io/tx_drain.ts:375:15
 15.00%  |  13:worker-3       |[kernel.kallsyms]   |[k] tun_get_user
  4.00%  |  13:worker-3       |[JIT] tid 10        |[.] JS:o*run file:///r/main/parent/io/pair_poller.ts:167:96
  1.00%  |  13:worker-3       |libc.so.6           |[.] syscall

`;

Deno.test("parsePerfReport reads each thread's samples and skips the comments", () => {
  const lines = parsePerfReport(REPORT);
  assert.equal(lines.length, 9);
  assert.deepEqual(lines[0], {
    percent: 20,
    tid: 11,
    comm: "worker-1",
    dso: "[JIT] tid 10",
    symbol: "JS:*'walkChain file:///r/main/device/chain.ts:148:30",
  });
  assert.equal(lines[1].symbol, "pvm_irq_enable");
  assert.throws(() => parsePerfReport(" 1.00% | nonsense | x | y\n"), /not understood/);
});

Deno.test("layerOf and roleOf tell the kernel, JIT, runtime and each worker apart", () => {
  assert.equal(layerOf("[kernel.kallsyms]", "x"), "kernel");
  assert.equal(layerOf("[JIT] tid 3", "JS:*'f file:///a.ts:1:1"), "js");
  assert.equal(layerOf("deno", "0x1"), "runtime");
  assert.equal(layerOf("/usr/bin/deno", "0x1"), "runtime");
  assert.equal(layerOf("libc.so.6", "syscall"), "libc");
  assert.equal(layerOf("libfoo.so", "f"), "other");
  const lines = parsePerfReport(REPORT);
  assert.equal(roleOf(lines.filter((l) => l.tid === 11), "worker-1"), "device");
  // The writer runs tx_drain.ts as the poller does: its own entry file decides.
  assert.equal(roleOf(lines.filter((l) => l.tid === 12), "worker-2"), "writer");
  assert.equal(roleOf(lines.filter((l) => l.tid === 13), "worker-3"), "poller");
  assert.equal(roleOf([], "deno"), "main");
  assert.equal(roleOf([], "V8 DefaultWorke"), "V8 helper");
});

Deno.test("threadProfiles splits each thread's CPU per frame by its own samples", () => {
  const cpu = new Map([
    [11, { comm: "worker-1", seconds: 0.4 }],
    [12, { comm: "worker-2", seconds: 0.3 }],
    [13, { comm: "worker-3", seconds: 0.2 }],
    [14, { comm: "idle", seconds: 0.001 }],
  ]);
  const p = threadProfiles(parsePerfReport(REPORT), cpu, 1, 1_000_000);
  assert.deepEqual(p.map((t) => t.role), ["device", "poller", "writer"]);
  const device = p[0];
  assert.equal(device.cores, 0.4);
  assert.ok(Math.abs(device.microseconds - 0.4) < 1e-12);
  // 20 : 10 : 10 of the device's 40 % of samples.
  assert.ok(Math.abs(device.layers.js - 0.2) < 1e-12);
  assert.ok(Math.abs(device.layers.kernel - 0.1) < 1e-12);
  assert.ok(Math.abs(device.layers.runtime - 0.1) < 1e-12);
  assert.equal(device.top[0].symbol, "walkChain device/chain.ts:148");
  const sum = (t: typeof device) => Object.values(t.layers).reduce((a, b) => a + b, 0);
  for (const t of p) assert.ok(Math.abs(sum(t) - t.microseconds) < 1e-9, t.role);
  const table = profileTable(p);
  assert.match(table.at(-1)!, /^\| \*\*all\*\* \| 0\.90 \| 0\.900 \|/);
  assert.throws(() => threadProfiles([], cpu, 1, 0), /no frames/);
});

Deno.test("shortSymbol keeps a JIT symbol's function and repository path", () => {
  assert.equal(
    shortSymbol("JS:*'#prepare file:///work/x/parent/io/tx_drain.ts:375:15"),
    "#prepare parent/io/tx_drain.ts:375",
  );
  assert.equal(shortSymbol("_copy_from_iter"), "_copy_from_iter");
});
