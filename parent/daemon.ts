/**
 * The daemon: opens or adopts the tap, starts the device worker, serves the
 * device's requests (TUNSCAP) under the operator's policy, and shuts down
 * cleanly on SIGINT/SIGTERM. It never daemonizes itself (vhost-user backend
 * program conventions): a supervisor or a terminal owns it.
 *
 * @module
 */

import { featureNames, GUEST_OFFLOAD_FEATURES } from "../ipc/features.ts";
import type { DeviceConfig } from "../ipc/protocol.ts";
import { RefusedError } from "../ipc/endpoint.ts";
import { formatMac, type Options } from "./cli.ts";
import { DeviceHost } from "./device_host.ts";
import type { Logger } from "./log.ts";
import { adoptTap, createTap, type Tap, tunFlagNames } from "./tap.ts";
import { applyTunscap } from "./tunscap.ts";

/** The guest offloads the parent lets TUNSCAP put on the tap, by `--offload` mode. */
export function allowedTapOffloads(mode: Options["offload"]): bigint {
  return mode === "auto" ? GUEST_OFFLOAD_FEATURES : 0n;
}

/** Serves TUNSCAP against `tap` under `allowed`; a refusal becomes a typed error. */
export function tunscapHandler(tap: Tap, allowed: bigint, logger: Logger) {
  return (offloads: bigint): bigint => {
    const result = applyTunscap(tap, offloads, allowed);
    if (!result.ok) {
      logger.log("warn", "parent", result.message);
      throw new RefusedError(result.message, "offloads");
    }
    logger.log(
      "info",
      "parent",
      `TUNSCAP: tap ${tap.name} offloads now ${tunFlagNames(result.tunFlags).join(" ") || "none"}` +
        (result.dropped ? ` (kernel lacks ${featureNames(result.dropped).join(" ")})` : ""),
    );
    return result.inForce;
  };
}

/** The QEMU options that attach a VM to this backend. */
export function qemuOptions(socketPath: string, mac: readonly number[]): string {
  return [
    "-object memory-backend-memfd,id=mem0,size=1G,share=on -numa node,memdev=mem0",
    `-chardev socket,id=vionet0,path=${socketPath}`,
    "-netdev vhost-user,id=net0,chardev=vionet0",
    `-device virtio-net-pci,netdev=net0,mac=${formatMac(mac)}`,
  ].join(" \\\n  ");
}

/** A running daemon; `stop()` undoes everything it set up. */
export interface Daemon {
  tap: Tap;
  device: DeviceHost;
  config: DeviceConfig;
  stop(): void;
}

/** Sets everything up; on failure, whatever was already set up is undone before it throws. */
export async function startDaemon(opts: Options, logger: Logger): Promise<Daemon> {
  const tap = opts.tapFd !== null ? adoptTap(opts.tapFd) : createTap(opts.tap!);
  const config: DeviceConfig = {
    mac: opts.mac,
    mtu: opts.mtu,
    offloadMode: opts.offload,
    logLevel: opts.logLevel,
  };
  let device: DeviceHost;
  try {
    device = await startDevice(tap, config, opts, logger);
  } catch (e) {
    tap.close();
    throw e;
  }
  const daemon: Daemon = {
    tap,
    device,
    config,
    stop() {
      daemon.device.terminate();
      tap.close();
    },
  };
  return daemon;
}

function startDevice(tap: Tap, config: DeviceConfig, opts: Options, logger: Logger) {
  return DeviceHost.start({
    config,
    handlers: { tunscap: tunscapHandler(tap, allowedTapOffloads(opts.offload), logger) },
    logger,
  });
}

/** Runs until SIGINT or SIGTERM; returns the exit status. */
export async function runDaemon(opts: Options, logger: Logger): Promise<number> {
  const daemon = await startDaemon(opts, logger);
  const { tap } = daemon;
  logger.log(
    "info",
    "parent",
    `tap ${tap.name} ${tap.created ? "created" : "attached"}; kernel offloads: ${
      tunFlagNames(tap.kernelOffloads).join(" ") || "none"
    }; --offload ${opts.offload}`,
  );
  logger.log("info", "parent", "device worker started with no permissions");

  const stopped = new Promise<string>((resolve) => {
    for (const sig of ["SIGINT", "SIGTERM"] as const) {
      Deno.addSignalListener(sig, () => resolve(sig));
    }
  });
  const signal = await stopped;
  logger.log("info", "parent", `${signal}: shutting down`);
  daemon.stop();
  if (tap.created) logger.log("info", "parent", `tap ${tap.name} removed`);
  return 0;
}
