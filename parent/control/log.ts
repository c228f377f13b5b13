/**
 * The daemon's log: one line per event on stderr, with a level filter.
 * Standard output is kept for what the operator asked to see (capabilities,
 * the QEMU command line).
 *
 * Line format (docs/operations.md, "Logs"):
 * - on a terminal, a file or a pipe: `2026-12-06T21:30:00.123Z vionet[source] level: message`,
 *   the time in RFC 3339, UTC, with milliseconds;
 * - under systemd's journal (`JOURNAL_STREAM` set: systemd connected stderr
 *   to journald): `<3>vionet[source] error: message`, without a time (the
 *   journal stamps each line itself) and with the syslog priority prefix of
 *   sd-daemon(3), so that `journalctl -p` filters by level.
 *
 * @module
 */

import type { LogLevel } from "../../ipc/protocol.ts";

export const LOG_LEVELS: readonly LogLevel[] = ["error", "warn", "info", "debug"];

/** sd-daemon(3) priority prefixes: SD_ERR, SD_WARNING, SD_INFO, SD_DEBUG. */
const SD_PRIORITY: Record<LogLevel, string> = {
  error: "<3>",
  warn: "<4>",
  info: "<6>",
  debug: "<7>",
};

/** A logger; `source` names the part that speaks (parent, device, vhost-user). */
export interface Logger {
  level: LogLevel;
  log(level: LogLevel, source: string, message: string): void;
}

/** How each line is stamped: a UTC time (`time`), or a journal priority prefix (`journal`). */
export type LogStyle = "time" | "journal";

/**
 * The style for an environment: `journal` when systemd set `JOURNAL_STREAM`
 * (systemd.exec(5): stderr or stdout goes to the journal), else `time`.
 */
export function logStyleFor(env: { JOURNAL_STREAM?: string }): LogStyle {
  return env.JOURNAL_STREAM ? "journal" : "time";
}

/** One log line, newline included. `now` is for tests. */
export function formatLogLine(
  style: LogStyle,
  level: LogLevel,
  source: string,
  message: string,
  now: Date = new Date(),
): string {
  const head = style === "journal" ? SD_PRIORITY[level] : `${now.toISOString()} `;
  return `${head}vionet[${source}] ${level}: ${message}\n`;
}

/** Logs to stderr in `style` (see the module comment). */
export function stderrLogger(level: LogLevel, style: LogStyle = "time"): Logger {
  const enc = new TextEncoder();
  return {
    level,
    log(at, source, message) {
      if (LOG_LEVELS.indexOf(at) > LOG_LEVELS.indexOf(this.level)) return;
      Deno.stderr.writeSync(enc.encode(formatLogLine(style, at, source, message)));
    },
  };
}
