/** Small helpers shared by tests. */

import type { DeviceConfig } from "../ipc/protocol.ts";
import type { Logger } from "../parent/log.ts";

/** A device configuration for tests. */
export function testConfig(overrides: Partial<DeviceConfig> = {}): DeviceConfig {
  return {
    mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
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
export function startTaskFlags(): string[] {
  const config = JSON.parse(
    Deno.readTextFileSync(new URL("../deno.json", import.meta.url)),
  ) as { tasks: { start: string } };
  const words = config.tasks.start.split(/\s+/);
  const run = words.indexOf("run");
  const main = words.indexOf("main.ts");
  if (run < 0 || main < 0) {
    throw new Error(`cannot read flags from start task "${config.tasks.start}"`);
  }
  return words.slice(run + 1, main);
}

/** Absolute path of the repository's root. */
export const ROOT = new URL("..", import.meta.url).pathname;
