import assert from "node:assert/strict";
import { formatLogLine, logStyleFor } from "../../../parent/control/log.ts";
import { ROOT, startTaskFlags } from "../../helpers.ts";

const AT = new Date(Date.UTC(2026, 11, 6, 21, 30, 0, 123));
/** RFC 3339, UTC, milliseconds, then the part and the level. */
const STAMPED =
  /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z vionet\[[a-z-]+\] (error|warn|info|debug): /;

Deno.test("a log line carries an RFC 3339 UTC time with milliseconds", () => {
  assert.equal(
    formatLogLine("time", "warn", "vhost-user", "front-end gone", AT),
    "2026-12-06T21:30:00.123Z vionet[vhost-user] warn: front-end gone\n",
  );
  assert.match(formatLogLine("time", "info", "parent", "x"), STAMPED);
});

Deno.test("under the journal a log line has no time, and its level as a syslog priority", () => {
  const cases = [["error", "<3>"], ["warn", "<4>"], ["info", "<6>"], ["debug", "<7>"]] as const;
  for (const [level, prefix] of cases) {
    assert.equal(
      formatLogLine("journal", level, "device", "m", AT),
      `${prefix}vionet[device] ${level}: m\n`,
    );
  }
  assert.equal(logStyleFor({ JOURNAL_STREAM: "8:12345" }), "journal");
  assert.equal(logStyleFor({ JOURNAL_STREAM: "" }), "time");
  assert.equal(logStyleFor({}), "time");
});

/** main.ts under the start task's flags, failing at set-up (fd 99 is no tap): one logged error. */
async function failingStart(env: Record<string, string>): Promise<string> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...startTaskFlags(), `${ROOT}main.ts`, "--tap-fd", "99"],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const stderr = new TextDecoder().decode(out.stderr);
  assert.equal(out.code, 1, stderr);
  return stderr;
}

Deno.test("the daemon stamps its log lines, and uses journal priorities when JOURNAL_STREAM is set", async () => {
  const plain = (await failingStart({ JOURNAL_STREAM: "" })).trimEnd().split("\n");
  assert.ok(plain.length > 0);
  for (const line of plain) assert.match(line, STAMPED);
  assert.match(plain.at(-1)!, /vionet\[parent\] error: fd 99 is not an open descriptor/);

  const journal = (await failingStart({ JOURNAL_STREAM: "8:4242" })).trimEnd().split("\n");
  for (const line of journal) assert.match(line, /^<[3467]>vionet\[[a-z-]+\] [a-z]+: /);
  assert.match(journal.at(-1)!, /^<3>vionet\[parent\] error: fd 99/);
});
