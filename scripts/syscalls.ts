/**
 * What the daemon asks of the kernel once it serves, against what its
 * seccomp allowlist lets through: the measurement behind
 * `parent/host/seccomp_policy.ts`, to repeat after a Deno upgrade.
 *
 * ```sh
 * VIONET_TEST_STRACE=/tmp/sc deno test --unstable-worker-options -A tests/e2e/vionet_e2e_test.ts
 * deno run -A scripts/syscalls.ts /tmp/sc
 * ```
 *
 * The first command attaches `strace -f -c` to every daemon the end-to-end
 * suite starts, once its set-up is over (`tests/e2e/vionet_rig.ts`), and
 * writes one count per daemon. Add `VIONET_TEST_DAEMON_ARGS="--seccomp log"`
 * to run the daemons with the filter logging instead of refusing, and read
 * the kernel log (`dmesg | grep type=1326`) for calls the list lacks that the
 * suite's paths reach. This script prints the union of the counts, and for
 * each call whether the filter allows it (for a daemon that listens, with
 * io_uring), then the calls measured and refused, and those allowed though
 * the suite never made them, with the reason the table gives.
 *
 * @module
 */

import { NOTABLY_DENIED, seccompPolicy } from "../parent/host/seccomp_policy.ts";

const dir = Deno.args[0];
if (!dir) {
  console.error("usage: deno run -A scripts/syscalls.ts DIR (the VIONET_TEST_STRACE directory)");
  Deno.exit(2);
}

/** strace -c's table: "% time  seconds  usecs/call  calls  errors syscall". */
function parseCounts(text: string): Map<string, { calls: number; errors: number }> {
  const out = new Map<string, { calls: number; errors: number }>();
  for (const line of text.split("\n")) {
    const m = /^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(\d+)?\s*([a-z_0-9]+)\s*$/.exec(line);
    if (!m || m[3] === "total") continue;
    out.set(m[3], { calls: Number(m[1]), errors: Number(m[2] ?? 0) });
  }
  return out;
}

const measured = new Map<string, { calls: number; errors: number; daemons: number }>();
let daemons = 0;
for (const entry of Deno.readDirSync(dir)) {
  if (!/^daemon-\d+\.txt$/.test(entry.name)) continue;
  const counts = parseCounts(Deno.readTextFileSync(`${dir}/${entry.name}`));
  if (counts.size === 0) continue;
  daemons++;
  for (const [name, c] of counts) {
    const m = measured.get(name) ?? { calls: 0, errors: 0, daemons: 0 };
    measured.set(name, {
      calls: m.calls + c.calls,
      errors: m.errors + c.errors,
      daemons: m.daemons + 1,
    });
  }
}
if (daemons === 0) {
  console.error(`no strace counts in ${dir} (files daemon-<pid>.txt)`);
  Deno.exit(1);
}

const policy = seccompPolicy({ client: false, accepts: true, ioUring: "auto", pid: Deno.pid });
const allowed = new Map(policy.entries.map((e) => [e.name, e]));
const names = [...measured.keys()].sort();
console.log(`${names.length} system calls measured after set-up, over ${daemons} daemons:\n`);
for (const name of names) {
  const m = measured.get(name)!;
  const e = allowed.get(name);
  const verdict = e === undefined
    ? "REFUSED"
    : e.rule.action === "allow"
    ? "allowed"
    : e.rule.action === "errno"
    ? `answered errno ${e.rule.errno}`
    : "allowed by argument";
  console.log(
    `  ${name.padEnd(20)} ${String(m.calls).padStart(9)} calls ${
      String(m.errors).padStart(6)
    } errors  ${m.daemons}/${daemons} daemons  ${verdict}`,
  );
}
const refused = names.filter((n) => !allowed.has(n));
console.log(`\nmeasured, not in the allowlist (${refused.length}):`);
for (const n of refused) {
  console.log(`  ${n}${NOTABLY_DENIED[n] ? `: ${NOTABLY_DENIED[n].why}` : ""}`);
}
const unmeasured = policy.entries.filter((e) => !measured.has(e.name));
console.log(`\nin the allowlist (${policy.entries.length}), not measured (${unmeasured.length}):`);
for (const e of unmeasured) console.log(`  ${e.name}: ${e.why}`);
