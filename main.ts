/**
 * vionet: a virtio-net device backend for virtual machines, served over
 * vhost-user and connected to a Linux tap. See README.md.
 *
 * @module
 */

import { capabilities, type Options, parseOptions, usage, UsageError } from "./parent/cli.ts";
import { runDaemon } from "./parent/daemon.ts";
import { buildAudit, formatAudit } from "./parent/audit.ts";
import { stderrLogger } from "./parent/log.ts";

async function main(argv: string[]): Promise<number> {
  let opts: Options;
  try {
    opts = parseOptions(argv, { XDG_RUNTIME_DIR: Deno.env.get("XDG_RUNTIME_DIR") });
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
    const audit = buildAudit(opts, { observe: true });
    console.log(Deno.stdout.isTerminal() ? formatAudit(audit) : JSON.stringify(audit, null, 2));
    return 0;
  }
  const logger = stderrLogger(opts.logLevel);
  try {
    return await runDaemon(opts, logger);
  } catch (e) {
    logger.log("error", "parent", (e as Error).message);
    return 1;
  }
}

if (import.meta.main) Deno.exit(await main(Deno.args));
