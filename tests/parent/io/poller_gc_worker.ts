/// <reference lib="deno.worker" />
/**
 * Test helper for poller_gc_test.ts: the real poller module
 * (`parent/io/poller_worker.ts`), with the garbage collector run as soon as
 * the module has been evaluated and again at `init`. Needs
 * `--v8-flags=--expose-gc` (poller_gc_probe.ts runs with it).
 *
 * Any buffer of the poller that nothing references any more is freed here,
 * before a single frame is read. Then sentinels of the overflow buffer's size
 * are allocated and zero-filled: one of them is likely to take the memory of a
 * freed buffer. When the parent sends `setRegions`, this worker reports on
 * stderr (one line, through libc, since the worker has FFI only) how many
 * sentinels hold non-zero bytes. A poller whose iovec still names a freed
 * buffer writes frame bytes into a sentinel (reported) or over a free malloc
 * chunk (glibc aborts the process); either fails the test.
 *
 * @module
 */

import "../../../parent/io/poller_worker.ts";
import * as libc from "../../../parent/host/libc.ts";
import { MAX_FRAME_BYTES, NET_HDR_BYTES } from "../../../ipc/datapath.ts";

/** Printed first on the report line (poller_gc_test.ts looks for it). */
const SENTINEL_REPORT = "POLLER_GC_SENTINELS";

const gc = (globalThis as { gc?: () => void }).gc;
if (gc === undefined) throw new Error("poller_gc_worker.ts needs --v8-flags=--expose-gc");
gc();
gc();

const SENTINELS = 64;
const sentinels: Uint8Array[] = [];

function allocateSentinels(): void {
  gc!();
  gc!();
  for (let i = 0; i < SENTINELS; i++) {
    sentinels.push(new Uint8Array(MAX_FRAME_BYTES + NET_HDR_BYTES));
  }
}

function report(): void {
  let dirty = 0;
  for (const s of sentinels) if (s.some((b) => b !== 0)) dirty++;
  const line = new TextEncoder().encode(`${SENTINEL_REPORT} ${sentinels.length} ${dirty}\n`);
  libc.sys.write(2, line, BigInt(line.length));
}

// Runs before the poller's own handler, which it then calls.
const inner = self.onmessage as (e: MessageEvent) => void;
self.onmessage = (e: MessageEvent) => {
  const kind = (e.data as { kind?: unknown } | null)?.kind;
  if (kind === "init") allocateSentinels();
  if (kind === "setRegions") report();
  inner(e);
};
