/**
 * A device worker for tests that will not give guest memory back, like a
 * wedged device: it answers hello, takes a grant, and then writes into every
 * granted buffer without end, so it answers nothing more until it is
 * terminated, and it still touches the memory after the parent gave up on
 * it. A revoke while it holds nothing is answered. After
 * `{ kind: "hoard-silently" }` it does not answer the grant either; after
 * `{ kind: "refuse-grants" }` it refuses every grant, holding nothing.
 *
 * `terminate()` does not stop a worker busy in JavaScript (Deno 2.9.6), so
 * a test ends the endless writing through `{ kind: "stop-word", word }`: a
 * SharedArrayBuffer whose first Int32 the loop reads on every pass. Without
 * it the worker would spin for the rest of the test process.
 */

const held: Uint8Array[] = [];
let answerGrant = true;
let refuseGrants = false;
let stop: Int32Array | null = null;

self.onmessage = (e: MessageEvent) => {
  const m = e.data;
  if (m?.kind === "hello") {
    self.postMessage({ kind: "ready", version: m.version, features: 0n });
  } else if (m?.kind === "stop-word") {
    stop = new Int32Array(m.word);
  } else if (m?.kind === "hoard-silently") {
    answerGrant = false;
  } else if (m?.kind === "refuse-grants") {
    refuseGrants = true;
  } else if (m?.kind === "grant-memory" && refuseGrants) {
    const message = "Cannot add guest memory region: no room for it";
    self.postMessage({ kind: "error", id: m.id, code: "refused", field: "regions", message });
  } else if (m?.kind === "revoke-memory" && held.length === 0) {
    self.postMessage({ kind: "memory-returned", id: m.id, buffers: [] });
  } else if (m?.kind === "grant-memory") {
    for (const r of m.regions) held.push(new Uint8Array(r.buffer));
    if (answerGrant) self.postMessage({ kind: "done", id: m.id });
    self.postMessage({ kind: "log", level: "info", message: "hoarding" });
    // After the replies are out: write until terminated.
    setTimeout(() => {
      for (let n = 1; stop === null || Atomics.load(stop, 0) === 0; n++) {
        for (const bytes of held) bytes.fill(n & 0xff);
      }
    }, 0);
  }
};
