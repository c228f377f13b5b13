/**
 * vionet: a virtio-net device backend for virtual machines, served over
 * vhost-user and connected to a Linux tap. See README.md.
 *
 * Only modules without FFI are imported statically: the Deno permissions the
 * daemon needs are checked first, so that a missing one is a one-line error
 * naming it rather than a failure deep in an import.
 *
 * @module
 */

import {
  capabilities,
  type Options,
  parseOptions,
  usage,
  UsageError,
} from "./parent/control/cli.ts";
import { logStyleFor, stderrLogger } from "./parent/control/log.ts";
import { LISTEN_ENV } from "./parent/control/listen_fds.ts";

/** The start task's --allow-env: every variable the parent reads. */
const ENV_FLAG = "--allow-env=XDG_RUNTIME_DIR,JOURNAL_STREAM,LISTEN_FDS,LISTEN_PID,LISTEN_FDNAMES";

/** The Deno permissions the parent needs, and what for (the `start` task grants exactly these). */
const NEEDED: ReadonlyArray<[Deno.PermissionDescriptor, string, string]> = [
  [{ name: "ffi" }, "--allow-ffi", "libc: the tap, vhost-user, guest memory"],
  [
    { name: "read", path: new URL(".", import.meta.url).pathname },
    "--allow-read=.",
    "loading the workers' modules",
  ],
  [{ name: "env", variable: "XDG_RUNTIME_DIR" }, ENV_FLAG, "the socket path"],
  [
    { name: "env", variable: "JOURNAL_STREAM" },
    ENV_FLAG,
    "whether the log goes to systemd's journal",
  ],
  ...LISTEN_ENV.map((variable): [Deno.PermissionDescriptor, string, string] => [
    { name: "env", variable },
    ENV_FLAG,
    "a socket passed by systemd (socket activation)",
  ]),
];

/** The first needed permission not granted, as an error line, or null. */
function missingPermission(): string | null {
  for (const [desc, flag, why] of NEEDED) {
    if (Deno.permissions.querySync(desc).state !== "granted") {
      return `vionet: missing Deno permission ${flag} (${why}); start it with \`deno task start\``;
    }
  }
  return null;
}

async function main(argv: string[]): Promise<number> {
  const missing = missingPermission();
  if (missing) {
    console.error(missing);
    return 1;
  }
  let opts: Options;
  const env = Object.fromEntries(
    ["XDG_RUNTIME_DIR", ...LISTEN_ENV].map((k) => [k, Deno.env.get(k)]),
  );
  // Read once, then gone, as sd_listen_fds(1) does: nothing started later takes them for its own.
  for (const k of LISTEN_ENV) Deno.env.delete(k);
  try {
    opts = parseOptions(argv, env, Deno.pid);
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    console.error(`vionet: ${e.message}`);
    return 2;
  }
  if (opts.help) {
    console.log(usage());
    return 0;
  }
  if (opts.printCapabilities) {
    console.log(capabilities());
    return 0;
  }
  if (opts.printPermissions) {
    const { buildAudit, formatAudit } = await import("./parent/host/audit.ts");
    const audit = buildAudit(opts, { observe: true });
    console.log(Deno.stdout.isTerminal() ? formatAudit(audit) : JSON.stringify(audit, null, 2));
    return 0;
  }
  const logger = stderrLogger(
    opts.logLevel,
    logStyleFor({ JOURNAL_STREAM: Deno.env.get("JOURNAL_STREAM") }),
  );
  try {
    const { runDaemon } = await import("./parent/control/daemon.ts");
    return await runDaemon(opts, logger);
  } catch (e) {
    logger.log("error", "parent", (e as Error).message);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
