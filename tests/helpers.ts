/** Small helpers shared by tests. */

import assert from "node:assert/strict";
import type { DeviceConfig } from "../ipc/protocol.ts";
import type { Logger } from "../parent/control/log.ts";

/** A device configuration for tests: no source MAC enforced (as without `--mac`). */
export function testConfig(overrides: Partial<DeviceConfig> = {}): DeviceConfig {
  return {
    mac: null,
    mtu: 1500,
    offloadMode: "auto",
    logLevel: "debug",
    ...overrides,
  };
}

/** A logger that keeps lines in memory, for assertions. */
export function quietLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return {
    level: "debug",
    lines,
    log(level, source, message) {
      lines.push(`${source} ${level}: ${message}`);
    },
  };
}

/** The Deno flags of the `start` task in deno.json: tests run the daemon's code under them. */
export { startTaskEnv, startTaskFlags } from "../parent/host/audit.ts";

/** Absolute path of the repository's root. */
export const ROOT = new URL("..", import.meta.url).pathname;

export interface ThreadIds {
  tid: string;
  name: string;
  uid: string;
  gid: string;
  groups: string;
  seccomp: string;
  noNewPrivs: string;
}

/** Every thread's ids and seccomp state (`/proc/<pid>/task/<tid>/status`), read from outside. */
export function threadsOf(pid: number): ThreadIds[] {
  const out: ThreadIds[] = [];
  for (const e of Deno.readDirSync(`/proc/${pid}/task`)) {
    let status: string;
    try {
      status = Deno.readTextFileSync(`/proc/${pid}/task/${e.name}/status`);
    } catch {
      continue; // exited meanwhile
    }
    const field = (k: string) => new RegExp(`^${k}:[ \\t]*(.*)$`, "m").exec(status)?.[1].trim();
    out.push({
      tid: e.name,
      name: field("Name") ?? "?",
      uid: field("Uid")!.split(/\s+/).join(" "),
      gid: field("Gid")!.split(/\s+/).join(" "),
      groups: field("Groups") ?? "",
      seccomp: `${field("Seccomp")}/${field("Seccomp_filters")}`,
      noNewPrivs: field("NoNewPrivs")!,
    });
  }
  return out;
}

/**
 * Asserts that every thread of `pid` runs as `uid`/`gid` (all four ids), with
 * no supplementary groups, no_new_privs, and one seccomp filter.
 */
export function assertSandboxed(pid: number, uid: number, gid: number, when: string): ThreadIds[] {
  const threads = threadsOf(pid);
  assert.ok(threads.length >= 8, `${when}: ${threads.length} threads`);
  for (const t of threads) {
    const where = `${when}: thread ${t.tid} (${t.name})`;
    assert.equal(t.uid, `${uid} ${uid} ${uid} ${uid}`, `${where} Uid`);
    assert.equal(t.gid, `${gid} ${gid} ${gid} ${gid}`, `${where} Gid`);
    assert.equal(t.groups, "", `${where} Groups`);
    assert.equal(t.seccomp, "2/1", `${where} Seccomp/Seccomp_filters`);
    assert.equal(t.noNewPrivs, "1", `${where} NoNewPrivs`);
  }
  return threads;
}
