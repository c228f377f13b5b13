/**
 * The daemon's log: one line per event on stderr, with a level filter.
 * Standard output is kept for what the operator asked to see (capabilities,
 * the QEMU command line).
 *
 * @module
 */

import type { LogLevel } from "../../ipc/protocol.ts";

export const LOG_LEVELS: readonly LogLevel[] = ["error", "warn", "info", "debug"];

/** A logger; `source` names the part that speaks (parent, device, vhost-user). */
export interface Logger {
  level: LogLevel;
  log(level: LogLevel, source: string, message: string): void;
}

/** Logs to stderr as `vionet[source] level: message`. */
export function stderrLogger(level: LogLevel): Logger {
  const enc = new TextEncoder();
  return {
    level,
    log(at, source, message) {
      if (LOG_LEVELS.indexOf(at) > LOG_LEVELS.indexOf(this.level)) return;
      Deno.stderr.writeSync(enc.encode(`vionet[${source}] ${at}: ${message}\n`));
    },
  };
}
