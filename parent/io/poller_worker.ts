/// <reference lib="deno.worker" />
/**
 * The poller worker: runs one queue pair's {@link PairPoller}
 * (`pair_poller.ts`) and wires the parent's control messages
 * (`worker_control.ts`, `protocol.ts`) to it. Nothing else lives here.
 *
 * Runs with FFI only (`IO_POLLER_OPTIONS` in `control/datapath_host.ts`).
 *
 * @module
 */

import { IoRegions } from "./regions.ts";
import { WorkerControl, type WorkerHooks } from "./worker_control.ts";
import { PairPoller } from "./pair_poller.ts";
import { warmTimers } from "../../ipc/macrotask.ts";

// A message the mailbox announced is waited for on timer turns (`messageTurn`):
// the isolate's first timer is paid now, before the worker serves a start.
warmTimers();

/** The pair this worker polls, once `init` came. */
let poller: PairPoller | null = null;

const hooks: WorkerHooks = {
  init(msg, ctl) {
    const p = new PairPoller(msg, ctl, IoRegions.from(msg.ranges), control);
    poller = p;
    return async () => {
      await p.run();
      poller = null;
      control.finish();
      control.awaitRelease(); // the rest of the stop first (io/protocol.ts)
      p.release();
      control.released();
    };
  },
  setRxFrameRoom(bytes) {
    if (poller) poller.frameRoom = bytes;
  },
  setRegions(r) {
    poller?.setRegions(r);
  },
  setLog(log) {
    if (!poller) throw new Error("setLog: not initialised");
    poller.setLog(log);
  },
  setFd(slot, fd) {
    if (!poller) throw new Error(`setFd ${slot}: not initialised`);
    poller.setFd(slot, fd);
  },
  // The parent writes the wake eventfd with every message; epoll_wait returns then.
  wake() {},
};

const control = new WorkerControl("poller", hooks);
