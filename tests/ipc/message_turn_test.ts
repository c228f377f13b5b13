/**
 * `ipc/macrotask.ts`: a loop that waits for a message the parent posted
 * gets it on the next `messageTurn`, where a chain of MessageChannel turns
 * (`macrotask`) does not get it for over a hundred turns (Deno's behaviour
 * that made every control message to a running data path wait 1-11 ms).
 * Counted in turns, not timed.
 */

import assert from "node:assert/strict";

interface Report {
  turns: number;
  handlerDone: boolean;
  error?: string;
}

/** Starts the worker's wait, posts one message once it is waiting, returns its report. */
async function turnsUntilMessage(kind: "macrotask" | "messageTurn"): Promise<Report> {
  const w = new Worker(new URL("./message_turn_worker.ts", import.meta.url), {
    type: "module",
    deno: { permissions: "none" },
  });
  try {
    let waiting!: () => void;
    const begun = new Promise<void>((resolve) => waiting = resolve);
    const report = new Promise<Report>((resolve) =>
      w.onmessage = (e) => e.data.waiting ? waiting() : resolve(e.data)
    );
    w.postMessage({ go: true, kind });
    // The message goes only once the wait has begun, as when the parent
    // posts while the loop runs (posted at once, it could reach a worker
    // still starting in the same batch as `go`, and be seen at the first turn).
    await begun;
    await new Promise((r) => setTimeout(r, 5));
    w.postMessage({ hello: true });
    const r = await report;
    assert.equal(r.error, undefined, r.error);
    return r;
  } finally {
    w.terminate();
  }
}

Deno.test("messageTurn: a posted message arrives within a few turns", async () => {
  for (let i = 0; i < 3; i++) {
    const r = await turnsUntilMessage("messageTurn");
    assert.ok(r.turns <= 40, `the message took ${r.turns} turns (20 ms of timer turns is ~20)`);
  }
});

Deno.test("messageTurn: the wait ends after the handler's awaits ran", async () => {
  const r = await turnsUntilMessage("messageTurn");
  assert.ok(r.handlerDone, "the loop went on before the message's handler finished its awaits");
});

Deno.test("macrotask: the premise, a chain of MessageChannel turns starves the worker's messages", async () => {
  // If this fails, Deno now polls a worker's messages between MessageChannel
  // turns: messageTurn's timer is no longer needed (ipc/macrotask.ts).
  const r = await turnsUntilMessage("macrotask");
  assert.ok(r.turns > 100, `the message arrived after ${r.turns} MessageChannel turns`);
});
