/**
 * Reads QEMU's trace of a migration's source (`tests/e2e/migration_rig.ts`,
 * log backend with `-msg timestamp=on`: one `PID@SECONDS.MICROS:event args`
 * line per event) for the part of the downtime that the network backend
 * causes: QEMU stops the VM (run state `finish-migrate`), which stops every
 * device, vhost's rings with GET_VRING_BASE among them, and only then sends
 * what is left of RAM. The time from the first to `migration_completion_vm_stop`
 * is that stop; with QEMU's own tap backend it holds no message to anyone.
 *
 * @module
 */

/** One trace event: microseconds since the epoch, its name, and the rest of the line. */
export interface TraceEvent {
  us: number;
  event: string;
  args: string;
}

/** The events of `text`, in order; lines that are not events are skipped. */
export function traceEvents(text: string): TraceEvent[] {
  const out: TraceEvent[] = [];
  for (const line of text.split("\n")) {
    const m = /^\d+@(\d+)\.(\d{6}):(\w+)\s*(.*)$/.exec(line.trim());
    if (m === null) continue;
    out.push({ us: Number(m[1]) * 1e6 + Number(m[2]), event: m[3], args: m[4] });
  }
  return out;
}

/** RunState 7 in QEMU's qapi/run-state.json order, as `runstate_set` prints it. */
const FINISH_MIGRATE = "new_state 7 (finish-migrate)";

/**
 * The source's stop of the VM in its last migration, in ms: from the run
 * state `finish-migrate` to `migration_completion_vm_stop`. NaN when the
 * trace holds no complete stop (a migration that never reached it).
 */
export function sourceStopMs(text: string): number {
  const ev = traceEvents(text);
  let start = -1;
  let stopMs = NaN;
  for (const e of ev) {
    if (e.event === "runstate_set" && e.args.includes(FINISH_MIGRATE)) start = e.us;
    else if (e.event === "migration_completion_vm_stop" && start >= 0) {
      stopMs = (e.us - start) / 1000;
      start = -1;
    }
  }
  return stopMs;
}

/** RunState 9, `running`: on a destination, the VM resumes. */
const RUNNING = "new_state 9 (running)";

/**
 * When the VM last began to run, in µs since the epoch (on a migration's
 * destination: the moment it resumes there, before QEMU starts vhost's
 * rings); NaN if it never ran.
 */
export function resumedUs(text: string): number {
  let at = NaN;
  for (const e of traceEvents(text)) {
    if (e.event === "runstate_set" && e.args.includes(RUNNING)) at = e.us;
  }
  return at;
}
