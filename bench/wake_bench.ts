/**
 * What one cross-thread wake-up costs: two workers ping-pong a counter in a
 * SharedArrayBuffer, each waiting for its turn with `Atomics.wait` (sync) or
 * `Atomics.waitAsync` (async). Prints the mean round trip. This is the
 * measurement behind the device loop and the writer blocking in
 * `Atomics.wait` (`device/mailbox.ts`).
 *
 * ```
 * taskset -c 0 deno run bench/wake_bench.ts [sync|async] [round trips]
 * ```
 *
 * @module
 */

const mode = Deno.args[0] ?? "sync";
if (mode !== "sync" && mode !== "async") {
  console.error(`wake_bench: mode must be sync or async, not ${mode}`);
  Deno.exit(2);
}
const trips = Number(Deno.args[1] ?? 20_000);

// The worker's source, as a data module: it needs no file and no permission.
const source = `
const mode = ${JSON.stringify(mode)};
self.onmessage = async (e) => {
  const [sab, me, n] = e.data;
  const c = new Int32Array(sab);
  const t0 = performance.now();
  for (let i = 0; i < n; i++) {
    if (me === 0) { Atomics.store(c, 0, 2 * i + 1); Atomics.notify(c, 0); }
    const want = me === 0 ? 2 * i + 2 : 2 * i + 1;
    for (let cur = Atomics.load(c, 0); cur !== want; cur = Atomics.load(c, 0)) {
      if (mode === "sync") Atomics.wait(c, 0, cur, 50);
      else { const r = Atomics.waitAsync(c, 0, cur, 50); if (r.async) await r.value; }
    }
    if (me === 1) { Atomics.store(c, 0, 2 * i + 2); Atomics.notify(c, 0); }
  }
  self.postMessage((performance.now() - t0) / n * 1000);
};`;
const url = `data:text/javascript,${encodeURIComponent(source)}`;
const sab = new SharedArrayBuffer(64);
const [a, b] = [new Worker(url, { type: "module" }), new Worker(url, { type: "module" })];
const done = (w: Worker) => new Promise<number>((r) => w.onmessage = (e) => r(e.data));
const pa = done(a);
const pb = done(b);
b.postMessage([sab, 1, trips]);
await new Promise((r) => setTimeout(r, 100));
a.postMessage([sab, 0, trips]);
const us = await pa;
await pb;
console.log(`${mode}: ${us.toFixed(1)} µs per round trip (${trips} round trips)`);
a.terminate();
b.terminate();
