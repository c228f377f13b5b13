/**
 * Buffer lifetimes across garbage collection in the privileged I/O workers.
 *
 * The poller once kept only the address of its overflow buffer: V8 freed the
 * buffer, and every frame bigger than the posted chains was then written by
 * readv over free malloc memory (heap corruption, the daemon killed). These
 * tests force the collector (subprocesses with `--v8-flags=--expose-gc`) and
 * check that what an iovec names stays alive.
 *
 * @module
 */

import { tapTestsUnavailable } from "../../net_ns.ts";
import assert from "node:assert/strict";
import { withNetns } from "../../net_ns.ts";
import { RX_STATUS_TOO_BIG } from "../../../ipc/datapath.ts";

const LIBC_MODULE = new URL("../../../parent/host/libc.ts", import.meta.url).href;
const PROBE = new URL("./poller_gc_probe.ts", import.meta.url).pathname;
/** The first word of poller_gc_worker.ts's report line. */
const SENTINEL_REPORT = "POLLER_GC_SENTINELS";

/** Runs `main` (which may start `worker.ts`) in a subprocess with the collector exposed. */
async function runWithGc(main: string, worker: string): Promise<string> {
  const dir = await Deno.makeTempDir({ prefix: "vionet-gc-" });
  try {
    await Deno.writeTextFile(`${dir}/main.ts`, main);
    await Deno.writeTextFile(`${dir}/worker.ts`, worker);
    const r = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-A", "--quiet", "--v8-flags=--expose-gc", `${dir}/main.ts`],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const err = new TextDecoder().decode(r.stderr);
    assert.ok(r.success, `subprocess failed (${r.code}, ${r.signal}): ${err}`);
    return new TextDecoder().decode(r.stdout).trim();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("libc.addressed() keeps a module-level buffer alive through GC; a bare cached address does not", async () => {
  // Both patterns at a worker module's top level; its functions use only the
  // holder's \`lo\` and the bare address. WeakRefs tell what survived.
  const worker = `
    import * as libc from ${JSON.stringify(LIBC_MODULE)};
    const held = libc.addressed(new Uint8Array(65562));
    const bare = new Uint8Array(65562);
    const BARE_ADDR = Deno.UnsafePointer.value(Deno.UnsafePointer.of(bare));
    const refs = { held: new WeakRef(held.view), bare: new WeakRef(bare) };
    self.onmessage = async () => {
      const use = held.lo + Number(BARE_ADDR & 1n);
      globalThis.gc();
      await new Promise((r) => setTimeout(r, 10));
      globalThis.gc();
      self.postMessage({ use, held: refs.held.deref() !== undefined, bare: refs.bare.deref() !== undefined });
    };`;
  const main = `
    const w = new Worker(new URL("./worker.ts", import.meta.url), { type: "module" });
    await new Promise((r) => setTimeout(r, 200));
    w.postMessage(0);
    const r = await new Promise((res) => (w.onmessage = (e) => res(e.data)));
    w.terminate();
    console.log(JSON.stringify(r));`;
  const r = JSON.parse(await runWithGc(main, worker)) as { held: boolean; bare: boolean };
  assert.equal(r.held, true, "the addressed buffer must survive while its holder is reachable");
  // The control: without the holder the same buffer is collected, which is
  // the failure this helper exists for (if V8 ever kept it, the first
  // assertion would no longer prove anything).
  assert.equal(r.bare, false, "control: a buffer known only by its cached address is collected");
});

Deno.test({
  name: "poller: frames too big for the chains spill into a live overflow buffer, not freed memory",
  ignore: tapTestsUnavailable([]) !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  fn: () =>
    withNetns(async (ns) => {
      const name = `vg${crypto.randomUUID().slice(0, 8)}`;
      const r = await ns.run([
        Deno.execPath(),
        "run",
        "-A",
        "--quiet",
        "--unstable-worker-options",
        "--v8-flags=--expose-gc",
        PROBE,
        name,
      ]);
      assert.equal(r.code, 0, `probe died (${r.code}); stderr:\n${r.stderr}`);
      const { done } = JSON.parse(r.stdout.trim()) as {
        done: Array<{ chains: number; bytes: number; status: number }>;
      };
      assert.equal(done.length, 20, "every datagram came back as an rx-done record");
      for (const d of done) {
        assert.deepEqual(d, {
          chains: 0,
          bytes: 12 + 14 + 20 + 8 + 1400,
          status: RX_STATUS_TOO_BIG,
        });
      }
      const line = r.stderr.split("\n").find((l) => l.startsWith(SENTINEL_REPORT));
      assert.ok(line, `the poller wrapper reported its sentinels; stderr:\n${r.stderr}`);
      const [, total, dirty] = line.split(" ").map(Number);
      assert.ok(total > 0);
      assert.equal(dirty, 0, "no frame bytes landed in memory the poller had freed");
    }),
});
