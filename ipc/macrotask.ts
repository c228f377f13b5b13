/**
 * Turns of a worker's event loop, for loops that run in a worker and must
 * let its queued messages (control requests, acks) be served between
 * batches. `await null` is not enough: it lets only microtasks run.
 *
 * Two kinds, because Deno (2.9.6, measured) does not deliver a worker's
 * incoming `postMessage` on every turn. A MessageChannel turn costs about
 * 12 µs, but a chain of them is served without the runtime polling the
 * worker's message channel: a message posted by the parent arrived only
 * after 129 such turns, every time (likely the async runtime's cooperative
 * budget of 128; not traced), 1-6 ms of spinning on this machine and up to
 * 11 ms under load.
 * A timer turn polls everything: the message arrives in the first one that
 * follows its post (0.3-0.8 ms after it, as in an idle worker).
 *
 * @module
 */

const channel = new MessageChannel();
const waiters: Array<() => void> = [];
channel.port1.onmessage = () => waiters.shift()?.();

/**
 * Resolves after one turn of the event loop's message queue: lets queued
 * macrotasks (a reply to post, a timer due) run. Not enough to receive a
 * message the parent posted: {@link messageTurn}.
 */
export function macrotask(): Promise<void> {
  return new Promise((resolve) => {
    waiters.push(resolve);
    channel.port2.postMessage(0);
  });
}

/** Ends of the {@link messageTurn}s waiting now. */
const turns: Array<() => void> = [];

/**
 * For a loop whose mailbox says the parent posted a message that has not
 * arrived yet: resolves once a message has arrived and been handled
 * ({@link messageArrived}), or after a timer's turn of the event loop
 * (which polls the worker's messages), whichever comes first. A timer turn
 * takes about 1 ms here, so the arrival ends most waits. Call
 * {@link warmTimers} as the worker loads, or the first call pays the
 * isolate's timer set-up.
 */
export function messageTurn(): Promise<void> {
  return new Promise((resolve) => {
    const end = () => {
      clearTimeout(timer);
      const i = turns.indexOf(end);
      if (i >= 0) turns.splice(i, 1);
      resolve();
    };
    const timer = setTimeout(end, 0);
    turns.push(end);
  });
}

/**
 * A message arrived and its handler was called: the waiting
 * {@link messageTurn}s end one macrotask later, so that what the handler
 * started (its awaits, in microtasks) runs before the loop goes on; a loop
 * that went on first could block in `Atomics.wait` under a handler that has
 * not reached the point where it wakes it.
 */
export function messageArrived(): void {
  if (turns.length === 0) return;
  const ending = turns.splice(0);
  macrotask().then(() => {
    for (const end of ending) end();
  });
}

/**
 * Sets up this isolate's timers now. Deno does so at an isolate's first
 * timer: 12-15 ms on this machine (measured on Deno 2.9.6), paid by
 * whatever uses one first; a worker calls this as it loads, before any
 * request it serves can need a timer.
 */
export function warmTimers(): void {
  clearTimeout(setTimeout(() => {}, 0));
}
