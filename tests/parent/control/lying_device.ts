/// <reference lib="deno.worker" />
/**
 * A device worker for tests that lies when the parent takes guest memory
 * back: a device taken over by an attacker, who wants to keep a view of
 * memory the parent is about to unmap. It answers hello, features and grants
 * as the real device does; `{ kind: "lie", how }` chooses its answer to every
 * later revoke-memory:
 *
 *   empty    no buffers at all
 *   fresh    new ArrayBuffers of the right sizes
 *   swapped  the right buffers, in reverse order
 *   twice    the first buffer in every place (transferred once)
 *   nested   the real buffers go to a worker of its own first, which keeps
 *            writing into them for NESTED_MS; fresh stand-ins answer
 *   honest   the right buffers, in order
 *
 * After a lie it spins for HOLD_MS, writing into every view it kept: a
 * worker busy in JavaScript outlives `terminate()` until it returns to its
 * event loop (Deno 2.9.6), so the parent must not unmap under it.
 *
 * Unlike the real device (device/worker.ts) it keeps its `Worker` global:
 * the "nested" case shows what the parent does when a device escaped that.
 */

/** How long the device spins after a lie, writing into what it kept (ms). */
export const HOLD_MS = 800;
/** How long the nested worker keeps writing (ms). */
export const NESTED_MS = 1500;

type Region = { guestPhysAddr: number; size: number; userAddr: number; buffer: ArrayBuffer };
const held: Region[] = [];
let how = "honest";

const nestedCode = `self.onmessage = (e) => {
  const views = e.data.buffers.map((b) => new Uint8Array(b));
  const end = Date.now() + e.data.ms;
  for (let n = 1; Date.now() < end; n++) for (const v of views) v.fill(n & 0xff);
  if (e.data.clock) new Float64Array(e.data.clock)[0] = Date.now();
  self.close();
};`;
/** Where the last write into kept memory is timed (Date.now()), for the test to compare. */
let clock: SharedArrayBuffer | null = null;

function take(names: Array<{ guestPhysAddr: number; size: number; userAddr: number }>): Region[] {
  return names.map((n) => {
    const i = held.findIndex((r) =>
      r.guestPhysAddr === n.guestPhysAddr && r.size === n.size && r.userAddr === n.userAddr
    );
    return held.splice(i, 1)[0];
  });
}

/** Answers a revoke as `how` says; returns the buffers it kept a hold of. */
function answer(id: number, regions: Region[]): ArrayBuffer[] {
  const real = regions.map((r) => r.buffer);
  const fresh = () => regions.map((r) => new ArrayBuffer(r.size));
  const send = (buffers: ArrayBuffer[], transfer: ArrayBuffer[] = []) =>
    self.postMessage({ kind: "memory-returned", id, buffers }, transfer);
  switch (how) {
    case "empty":
      send([]);
      return real;
    case "fresh":
      send(fresh());
      return real;
    case "swapped":
      send([...real].reverse(), real);
      return [];
    case "twice":
      send(real.map(() => real[0]), [real[0]]);
      return real.slice(1);
    case "nested": {
      const url = "data:application/javascript," + encodeURIComponent(nestedCode);
      const w = new Worker(url, { type: "module" });
      w.postMessage({ buffers: real, ms: NESTED_MS, clock }, real);
      send(fresh());
      return [];
    }
    default:
      send(real, real);
      return [];
  }
}

/** Spins for `ms`, writing into `kept`: the parent has ended this worker by then. */
function hold(kept: ArrayBuffer[], ms: number): void {
  const views = kept.map((b) => new Uint8Array(b));
  const end = Date.now() + ms;
  for (let n = 1; Date.now() < end; n++) for (const v of views) v.fill(n & 0xff);
  if (clock !== null && views.length > 0) new Float64Array(clock)[0] = Date.now();
}

self.onmessage = (e: MessageEvent) => {
  const m = e.data;
  switch (m?.kind) {
    case "hello":
      self.postMessage({ kind: "ready", version: m.version, features: 0n });
      return;
    case "lie":
      how = m.how;
      clock = m.clock ?? null;
      return;
    case "grant-memory":
      held.push(...m.regions);
      self.postMessage({ kind: "done", id: m.id });
      return;
    case "revoke-memory": {
      const kept = answer(m.id, take(m.regions));
      if (how !== "honest") hold(kept, how === "nested" ? NESTED_MS : HOLD_MS);
      return;
    }
    case "get-features":
      self.postMessage({ kind: "features", id: m.id, features: 0n });
      return;
    case "stop-queues":
      self.postMessage({ kind: "queue-bases", id: m.id, rx: 0, tx: 0 });
      return;
    default:
      if (typeof m?.id === "number") self.postMessage({ kind: "done", id: m.id });
  }
};
