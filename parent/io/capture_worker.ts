/// <reference lib="deno.worker" />
/**
 * The capture worker: runs the {@link CaptureWriter} (`capture_writer.ts`)
 * over the `--pcap` file's descriptor, which the parent opened during
 * set-up. It looks at the rings every {@link POLL_MS} ms, and straight away
 * again while a ring is more than a quarter full, every {@link IDLE_POLL_MS}
 * ms while capture is off; the data path never wakes it.
 *
 * Runs with FFI only (`CAPTURE_WORKER_OPTIONS` in
 * `control/capture_host.ts`): write(2) on the file is all it does.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import { macrotask } from "../../ipc/macrotask.ts";
import { type CaptureReply, CaptureWriter, parseCaptureRequest } from "./capture_writer.ts";

/** How long the writer sleeps when the rings were empty (ms). */
const POLL_MS = 5;
/** ... and while capture is not on (what a ring still holds is written within this). */
const IDLE_POLL_MS = 50;
const EINTR = 4;

let writer: CaptureWriter | null = null;
let stopping = false;

function post(m: CaptureReply): void {
  self.postMessage(m);
}

async function run(): Promise<void> {
  while (!stopping) {
    // Records waited: look again at once only while a ring is over a quarter
    // full; otherwise sleep, so that each pass writes more per system call.
    const n = writer!.drain();
    if (n === 0 || writer!.fullest() < 0.25) {
      const ms = n === 0 && !writer!.capturing() ? IDLE_POLL_MS : POLL_MS;
      await new Promise((r) => setTimeout(r, ms));
    } else await macrotask();
  }
  writer!.drain();
  post({ kind: "stopped" });
}

self.onmessage = (e: MessageEvent) => {
  let msg;
  try {
    msg = parseCaptureRequest(e.data);
  } catch (err) {
    post({ kind: "error", message: (err as Error).message });
    return;
  }
  if (msg.kind === "stop") {
    stopping = true;
    if (writer === null) post({ kind: "stopped" });
    return;
  }
  if (writer !== null) {
    post({ kind: "error", message: "init: already running" });
    return;
  }
  const fd = msg.fd;
  const writeAll = (buf: Uint8Array) => {
    let at = 0;
    while (at < buf.length) {
      const r = Number(libc.sys.write(fd, buf.subarray(at), BigInt(buf.length - at)));
      if (r < 0) {
        const err = libc.errno();
        if (err === EINTR) continue;
        throw new libc.SyscallError("write", err, `the capture file (fd ${fd})`);
      }
      if (r === 0) throw new Error("write returned 0");
      at += r;
    }
  };
  try {
    writer = new CaptureWriter(
      msg,
      writeAll,
      (level, message) => post({ kind: "notice", level, message }),
    );
  } catch (err) {
    post({ kind: "error", message: (err as Error).message });
    return;
  }
  post({ kind: "ready" });
  run().catch((err) =>
    post({ kind: "error", message: `capture writer: ${(err as Error).message}` })
  );
};
