/**
 * Entry point of the device worker. It runs with `permissions: "none"`: it can
 * open no file or socket, call no FFI, read no environment. The parent grants
 * it guest memory and rings and answers its typed requests; nothing else.
 *
 * The handler is installed before any `await`, so no message is missed.
 *
 * @module
 */

import type { MessagePortLike } from "../ipc/endpoint.ts";
import { DeviceControl } from "./control.ts";
import { DeviceMailbox } from "./mailbox.ts";
import { warmTimers } from "../ipc/macrotask.ts";

// A device that is taken over must not outlive its termination. A Worker it
// started would: terminating this worker does not stop a nested one, which
// keeps every buffer it was handed (measured on Deno 2.9.6). The device
// starts none, so the constructor goes before any input is read.
delete (globalThis as { Worker?: unknown }).Worker;

// The isolate's first timer costs 12-15 ms (`warmTimers`). Here that was
// the device's first request (TUNSCAP, inside set-features), which a
// migration's destination makes with the VM waiting. Paid now, while the
// worker starts, before any front-end speaks.
warmTimers();

const mailbox = new DeviceMailbox();
const control = new DeviceControl(mailbox.wrap(self as unknown as MessagePortLike), mailbox);

// A bug on our side must not vanish silently: report it, then let the worker die.
self.addEventListener("error", (e) => {
  control.log("error", `device worker crashed: ${(e as ErrorEvent).message}`);
});
self.addEventListener("unhandledrejection", (e) => {
  control.log(
    "error",
    `device worker: unhandled rejection: ${(e as PromiseRejectionEvent).reason}`,
  );
});
