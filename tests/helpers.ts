/** Small helpers shared by tests. */

import type { DeviceConfig } from "../ipc/protocol.ts";
import type { Logger } from "../parent/control/log.ts";

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
export { startTaskEnv, startTaskFlags } from "../parent/host/audit.ts";

/** Absolute path of the repository's root. */
export const ROOT = new URL("..", import.meta.url).pathname;
