/// <reference lib="deno.worker" />
/**
 * A worker for `message_turn_test.ts`: on `{ go, kind }` it says it waits
 * (`{ waiting }`), turns its event loop (`macrotask` or `messageTurn`) until
 * the next message arrives, then posts how many turns that took. With `kind: "order"` it reports whether a
 * waiting `messageTurn` ended before the handler's awaits had run.
 */

import { macrotask, messageArrived, messageTurn, warmTimers } from "../../ipc/macrotask.ts";

warmTimers();

let arrived = false;
let handlerDone = false;

self.onmessage = (e: MessageEvent) => {
  const msg = e.data as { go?: boolean; kind?: string };
  try {
    if (msg.go) {
      arrived = false;
      handlerDone = false;
      wait(msg.kind ?? "").catch((err) => self.postMessage({ error: String(err) }));
    } else {
      arrived = true;
      // A handler with awaits: its end is two microtasks after the event.
      (async () => {
        await null;
        await null;
        handlerDone = true;
      })();
    }
  } finally {
    messageArrived();
  }
};

async function wait(kind: string): Promise<void> {
  let turns = 0;
  self.postMessage({ waiting: true });
  while (!arrived && turns < 100_000) {
    await (kind === "macrotask" ? macrotask() : messageTurn());
    turns++;
  }
  self.postMessage({ turns, handlerDone });
}
