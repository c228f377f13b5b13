import assert from "node:assert/strict";
import {
  CAP_NAMES,
  CAPABILITIES_KEPT_AFTER_SETUP,
  capBit,
  capNames,
  currentCapabilities,
  type DropResult,
  threadCapabilities,
  type ThreadCapabilityState,
} from "../../../parent/host/privileges.ts";
import { type ExecResult, run, withNetns } from "../../net_ns.ts";

const PROBE = new URL("./privileges_probe.ts", import.meta.url).pathname;
const KEPT = CAPABILITIES_KEPT_AFTER_SETUP.map((c) => c.name);

function statusField(text: string, key: string): string {
  const m = new RegExp(`^${key}:\\s*(\\S+)`, "m").exec(text);
  assert.ok(m, `no ${key} in status`);
  return m[1];
}

function mask(names: readonly string[]): bigint {
  return names.reduce((m, n) => m | capBit(n as typeof CAP_NAMES[number]), 0n);
}

Deno.test("capBit() and capNames() agree with capability.h numbering", () => {
  assert.equal(capBit("CAP_NET_ADMIN"), 1n << 12n);
  assert.equal(capBit("CAP_SETPCAP"), 1n << 8n);
  assert.equal(capBit("CAP_CHECKPOINT_RESTORE"), 1n << 40n);
  assert.deepEqual(capNames((1n << 12n) | (1n << 0n)), ["CAP_CHOWN", "CAP_NET_ADMIN"]);
  assert.deepEqual(capNames(1n << 45n), ["CAP_45"]);
  assert.equal(capBit("CAP_45"), 1n << 45n);
  for (let n = 0; n < CAP_NAMES.length; n++) {
    assert.deepEqual(capNames(capBit(CAP_NAMES[n])), [CAP_NAMES[n]]);
  }
  assert.throws(() => capBit("CAP_NONSENSE" as "CAP_CHOWN"), RangeError);
});

Deno.test("currentCapabilities() reads what /proc/self/status says", () => {
  const text = Deno.readTextFileSync("/proc/self/status");
  const now = currentCapabilities();
  assert.equal(mask(now.effective), BigInt(`0x${statusField(text, "CapEff")}`));
  assert.equal(mask(now.permitted), BigInt(`0x${statusField(text, "CapPrm")}`));
  assert.equal(mask(now.bounding), BigInt(`0x${statusField(text, "CapBnd")}`));
  assert.equal(mask(now.ambient), BigInt(`0x${statusField(text, "CapAmb")}`));
  assert.equal(now.noNewPrivs, statusField(text, "NoNewPrivs") === "1");
});

Deno.test("threadCapabilities() covers every thread in /proc/self/task", () => {
  const listed = [...Deno.readDirSync("/proc/self/task")].map((e) => Number(e.name)).sort();
  const read = threadCapabilities().map((t) => t.tid).sort();
  // Threads come and go (the blocking pool): most must be the same ones.
  const common = read.filter((tid) => listed.includes(tid));
  assert.ok(read.includes(Deno.pid), "the main thread is missing");
  assert.ok(common.length >= Math.min(listed.length, read.length) - 1, `${read} vs ${listed}`);
  assert.ok(read.length > 1, "a Deno process has more than one thread");
});

/** Runs the probe (on the host, or with `ns.run` in a namespace) and parses its JSON. */
async function probe(args: string[], runner: (cmd: string[]) => Promise<ExecResult> = run) {
  const r = await runner([
    Deno.execPath(),
    "run",
    "--unstable-worker-options",
    "-A",
    PROBE,
    ...args,
  ]);
  assert.equal(r.code, 0, r.stderr);
  return JSON.parse(r.stdout);
}

Deno.test({
  name: "capset(2) on the main thread alone leaves Deno's other threads privileged",
  ignore: Deno.uid() !== 0,
  async fn() {
    const r = await probe(["main-only"]) as { mainTid: number; threads: ThreadCapabilityState[] };
    const main = r.threads.find((t) => t.tid === r.mainTid)!;
    assert.deepEqual(main.effective, []);
    const others = r.threads.filter((t) => t.tid !== r.mainTid);
    assert.ok(
      others.some((t) => t.effective.includes("CAP_NET_ADMIN")),
      "every other thread lost CAP_NET_ADMIN too: capset would be process-wide",
    );
  },
});

interface DropReport {
  result: DropResult;
  earlyBefore: string;
  before: ThreadCapabilityState[];
  after: ThreadCapabilityState[];
  afterMore: ThreadCapabilityState[];
  lateCreate: string;
  earlyAfter: string;
  offload: string;
  offloadInvalid: string;
  offloadOff: string;
  tapWrite: number;
  mainCreate: string;
  linkFlags: string;
  accept: string;
}

function assertDropped(threads: ThreadCapabilityState[], when: string): void {
  for (const t of threads) {
    const where = `${when}: thread ${t.tid} (${t.name})`;
    assert.deepEqual(t.effective, KEPT, `${where} effective`);
    assert.deepEqual(t.permitted, KEPT, `${where} permitted`);
    assert.deepEqual(t.inheritable, [], `${where} inheritable`);
    assert.deepEqual(t.ambient, [], `${where} ambient`);
    assert.deepEqual(t.bounding.filter((c) => !KEPT.includes(c)), [], `${where} bounding`);
    assert.equal(t.noNewPrivs, true, `${where} NoNewPrivs`);
  }
}

Deno.test({
  name:
    "dropPrivileges() reaches every thread; the tap still serves and TUNSCAP works, nothing new can be created",
  ignore: Deno.uid() !== 0,
  async fn() {
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-priv-" });
      try {
        const r = await probe(["drop", `${dir}/v.sock`], ns.run) as DropReport;
        // Before: Deno's own threads, an FFI worker and pool threads, all privileged.
        assert.equal(r.earlyBefore, "ok", "the worker could not create a tap before the drop");
        assert.ok(r.before.length >= 5, `only ${r.before.length} threads before the drop`);
        assert.ok(r.before.every((t) => t.effective.includes("CAP_NET_ADMIN")));
        assert.ok(r.result.dropped.includes("CAP_NET_ADMIN"));
        assert.deepEqual(r.result.kept, KEPT);
        assert.equal(r.result.boundingDropped, true);
        assertDropped(r.after, "after the drop");
        assert.deepEqual(r.after.map((t) => t.tid).sort(), r.before.map((t) => t.tid).sort());
        // Threads created afterwards (a worker, pool threads) inherit the dropped sets.
        const born = r.afterMore.filter((t) => !r.before.some((b) => b.tid === t.tid));
        assert.ok(born.length >= 1, "no thread was created after the drop");
        assertDropped(r.afterMore, "later");
        // What the daemon still does works; what a compromised parent wants does not.
        assert.equal(r.offload, "ok", "TUNSETOFFLOAD after the drop");
        assert.equal(r.offloadInvalid, "EINVAL", "TUNSETOFFLOAD reached set_offload()");
        assert.equal(r.offloadOff, "ok");
        assert.equal(r.tapWrite, 72);
        assert.equal(r.accept, "ok", "the listening socket still accepts");
        assert.equal(r.mainCreate, "EPERM", "the main thread created a tap");
        assert.equal(r.earlyAfter, "EPERM", "a worker started before the drop created a tap");
        assert.equal(r.lateCreate, "EPERM", "a worker started after the drop created a tap");
        assert.equal(r.linkFlags, "EPERM", "SIOCSIFFLAGS reconfigured the link");
      } finally {
        await Deno.remove(dir, { recursive: true });
      }
    });
  },
});
