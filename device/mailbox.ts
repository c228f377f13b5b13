/**
 * The device worker's mailbox count: how many messages the worker has
 * received since the parent started the queues, so that the data-path loop
 * can block in a plain `Atomics.wait` and still serve control messages.
 *
 * Why block at all: a futex wake through `Atomics.wait` costs a quarter of
 * an `Atomics.waitAsync` one here (a round trip between two workers on one
 * core: 17 µs against 66 µs), and a pending `waitAsync` does not keep
 * Deno's event loop turning, which delayed wake-ups by up to the loop's
 * timer. But a worker blocked in `Atomics.wait` runs no event loop: a
 * message from the parent would wait. So the parent counts what it posts
 * while the queues run (CTL.DEVICE_MAIL, bumped right after each
 * `postMessage`) and rings the device's doorbell; the worker counts what it
 * receives; while the two differ, the loop yields to the event loop instead
 * of working or sleeping. (The I/O workers do the same with their own
 * mailbox word: `parent/io/protocol.ts`.)
 *
 * The parent starts counting with the first message after `start-queues`,
 * so the count here starts again when the device accepts one
 * ({@link DeviceMailbox.markStart}, called by `NetDevice.start`). That runs
 * synchronously inside the handler of that very message, so "received so
 * far" is exactly the messages up to and including it; a malformed or
 * refused `start-queues` does not move the base.
 *
 * @module
 */

import { CTL } from "../ipc/datapath.ts";
import type { MessagePortLike } from "../ipc/endpoint.ts";
import { messageArrived } from "../ipc/macrotask.ts";

export class DeviceMailbox {
  #received = 0;
  #base = 0;

  /**
   * Wraps the worker's port: each message is counted as it arrives, before
   * anything handles it.
   */
  wrap(port: MessagePortLike): MessagePortLike {
    const count = () => this.#count();
    return {
      postMessage: (message: unknown, transfer?: Transferable[]) =>
        port.postMessage(message, transfer),
      get onmessage() {
        return port.onmessage;
      },
      set onmessage(handler: ((event: MessageEvent) => void) | null) {
        port.onmessage = handler === null ? null : (event: MessageEvent) => {
          count();
          try {
            handler(event);
          } finally {
            messageArrived();
          }
        };
      },
    };
  }

  #count(): void {
    this.#received++;
  }

  /** The queues start: the parent counts its posts from the next message on. */
  markStart(): void {
    this.#base = this.#received;
  }

  /** Messages received since the queues last started. */
  get sinceStart(): number {
    return this.#received - this.#base;
  }

  /** Whether the parent posted a message (counted in `ctl`) that has not arrived yet. */
  pending(ctl: Int32Array): boolean {
    return Atomics.load(ctl, CTL.DEVICE_MAIL) !== this.#received - this.#base;
  }
}
