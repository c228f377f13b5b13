/**
 * The daemon: opens or adopts the tap, starts the device worker, serves the
 * device's requests (TUNSCAP) under the operator's policy, and shuts down
 * cleanly on SIGINT/SIGTERM. It never daemonizes itself (vhost-user backend
 * program conventions): a supervisor or a terminal owns it.
 *
 * @module
 */

import { featureNames, GUEST_OFFLOAD_FEATURES } from "../../ipc/features.ts";
import type { DeviceConfig } from "../../ipc/protocol.ts";
import { RefusedError } from "../../ipc/endpoint.ts";
import { defaultMac, formatMac, type Options } from "./cli.ts";
import { DeviceHost } from "./device_host.ts";
import type { Logger } from "./log.ts";
import { adoptTap, createTap, type Tap, TapError, tunFlagNames } from "../host/tap.ts";
import { attachSteering, SteeringError } from "../host/tap_steering.ts";
import { applyTunscap } from "../host/tunscap.ts";
import { enterSandbox, planUser } from "../host/sandbox.ts";
import { currentCapabilities } from "../host/privileges.ts";
import { type DaemonUser, resolveUser } from "../host/users.ts";
import { retiredMemory } from "./retired_memory.ts";
import * as libc from "../host/libc.ts";
import { VionetDevicePort } from "./device_port.ts";
import { RingPool } from "./ring_pool.ts";
import { VhostUserClient, VhostUserServer } from "./vhost_user_socket.ts";
import {
  applySocketAccess,
  describeSocketAccess,
  prepareSocketDir,
  resolveSocketAccess,
  type SocketAccess,
} from "./socket_access.ts";
import { HttpServer } from "./http_server.ts";
import { controlRoutes, MetricsEndpoint } from "./control_api.ts";
import { NicRateLimits } from "./rate_limits.ts";
import { CaptureHost } from "./capture_host.ts";

/** The guest offloads the parent lets TUNSCAP put on the tap, by `--offload` mode. */
export function allowedTapOffloads(mode: Options["offload"]): bigint {
  return mode === "auto" ? GUEST_OFFLOAD_FEATURES : 0n;
}

/** Serves TUNSCAP against `tap` under `allowed`; a refusal becomes a typed error. */
export function tunscapHandler(
  tap: Tap,
  allowed: bigint,
  logger: Logger,
  onApplied: () => void = () => {},
) {
  return (offloads: bigint): bigint => {
    const result = applyTunscap(tap, offloads, allowed);
    if (!result.ok) {
      logger.log("warn", "parent", result.message);
      throw new RefusedError(result.message, "offloads");
    }
    onApplied();
    logger.log(
      "info",
      "parent",
      `TUNSCAP: tap ${tap.name} offloads now ${tunFlagNames(result.tunFlags).join(" ") || "none"}` +
        (result.dropped ? ` (kernel lacks ${featureNames(result.dropped).join(" ")})` : ""),
    );
    return result.inForce;
  };
}

/** Where the VMM finds vionet's socket, for {@link qemuOptions}. */
export type QemuSocket =
  /** vionet listens at this path (QEMU is the client and reconnects). */
  | { listen: string }
  /** vionet connects (`--client`): QEMU listens at this path. */
  | { connect: string };

/**
 * The QEMU options that attach a VM to this backend: shared guest memory of
 * the VM's size (a placeholder: QEMU must be told its -m), the chardev with
 * the reconnect option of QEMU before 9.2 (`reconnect=1`; 9.2 renamed it
 * `reconnect-ms=1000`, see {@link QEMU_RECONNECT_NOTE}), the vhost-user
 * netdev, and the NIC with `mac` and, when it is not 1500, `host_mtu`.
 */
export function qemuOptions(
  socket: QemuSocket,
  mac: readonly number[],
  mtu: number | null = null,
): string {
  const chardev = "listen" in socket
    ? `path=${socket.listen},reconnect=1`
    : `path=${socket.connect},server=on,wait=off`;
  return [
    "-object memory-backend-memfd,id=mem0,size=<guest RAM>,share=on -numa node,memdev=mem0",
    `-chardev socket,id=vionet0,${chardev}`,
    "-netdev vhost-user,id=net0,chardev=vionet0",
    `-device virtio-net-pci,netdev=net0,mac=${formatMac(mac)}${
      mtu !== null && mtu !== 1500 ? `,host_mtu=${mtu}` : ""
    }`,
  ].join(" \\\n  ");
}

/** What the QEMU line's reader must know that one line cannot say. */
export const QEMU_RECONNECT_NOTE = "QEMU 9.2 and later: reconnect-ms=1000 in place of reconnect=1.";

/**
 * The MTU limit when the tap's MTU cannot be read (an inherited tap in
 * another network namespace): virtio's 16-bit `mtu` field, QEMU's host_mtu.
 */
const UNKNOWN_MTU_LIMIT = 65535;

/** A running daemon; `stop()` undoes everything it set up. */
export interface Daemon {
  tap: Tap;
  config: DeviceConfig;
  port: VionetDevicePort;
  /** The NIC's rate limits (`--rate-limit`, `POST /rate-limit`). */
  limits: NicRateLimits;
  /** The socket's group and mode (listening at --socket-path), else null. */
  socketAccess: SocketAccess | null;
  /** The tap's MTU as set or found: the most NET_SET_MTU may ask; null when unknown. */
  mtu: number | null;
  /** The vhost-user service (null until `serve()`). */
  service: VhostUserServer | VhostUserClient | null;
  /** The `--metrics` HTTP server (null without `--metrics`, and until `serve()`). */
  metrics: HttpServer | null;
  /** `--pcap`: the capture (its file opened during set-up); null without. */
  capture: CaptureHost | null;
  /** vhost-user connections refused because one was active. */
  refused: number;
  /** Directories `serve()` created for the sockets, outermost first. */
  createdDirs: string[];
  /** Starts serving vhost-user as the options say. */
  serve(): void;
  /** Gives glibc's free pages back to the kernel in {@link TRIM_DELAY_MS} (once, however often asked). */
  trimSoon(): void;
  stop(): Promise<void>;
}

/** Sets everything up; on failure, whatever was already set up is undone before it throws. */
export async function startDaemon(opts: Options, logger: Logger): Promise<Daemon> {
  retiredMemory.configure({ logger });
  fixMmapThreshold(logger);
  // The group is resolved before anything exists: an unknown one leaves nothing behind.
  const listening = opts.listenFd === null && !opts.client;
  const socketAccess = listening ? resolveSocketAccess(opts.socketGroup, opts.socketMode) : null;
  const tap = openTap(opts, logger);
  let mtu: number | null;
  try {
    mtu = settleMtu(tap, opts.mtu, logger);
  } catch (e) {
    tap.close();
    throw e;
  }
  const config: DeviceConfig = {
    mac: opts.mac,
    mtu: mtu ?? UNKNOWN_MTU_LIMIT,
    offloadMode: opts.offload,
    logLevel: opts.logLevel,
  };
  // --pcap: the file must be opened now, before the sandbox forbids it.
  let capture: CaptureHost | null = null;
  if (opts.pcapPath !== null) {
    try {
      capture = await CaptureHost.open({
        path: opts.pcapPath,
        maxBytes: opts.pcapMax,
        snapLen: opts.pcapSnaplen,
        start: opts.pcapStart,
        pairs: tap.queues,
        tapName: tap.name,
        logger,
      });
    } catch (e) {
      tap.close();
      throw e;
    }
  }
  // Device workers start when a VM needs them (device_port.ts); queue faults and deaths reach
  // the port through this.
  const late: { port?: VionetDevicePort } = {};
  const onOffloads = () => late.port?.tapOffloadsChanged();
  let stopping = false;
  /** Pair `pair`'s device worker; one that dies is replaced (its connection has ended then). */
  const pairDevice = async (pair: number): Promise<DeviceHost> => {
    const d = await startDevice(
      tap,
      config,
      opts,
      logger,
      pair,
      (queue) => late.port?.queueFault(pair, queue),
      onOffloads,
    );
    d.onDeath = (reason) => {
      if (stopping) return;
      logger.log("error", "parent", `${reason}; starting a new device worker`);
      pairDevice(pair).then(
        (next) => late.port?.replaceDevice(pair, next),
        (e) => logger.log("error", "parent", `cannot restart the device: ${(e as Error).message}`),
      );
    };
    return d;
  };
  // The I/O workers' io_uring rings, made now: after set-up the seccomp
  // filter allows no io_uring_setup (ring_pool.ts). A set per queue pair,
  // and one more, so that a pair can start while another set comes back.
  const rings = opts.ioUring === "auto" ? RingPool.prepare(tap.queues + 1) : null;
  if (rings?.refused) {
    logger.log("info", "parent", `no io_uring rings (${rings.refused}): writev and readv`);
  } else if (rings) {
    logger.log(
      "info",
      "parent",
      `made ${rings.pool.made} io_uring rings for the I/O workers, each restricted by the ` +
        "kernel to READV and WRITEV",
    );
  }
  // One set of buckets for the NIC, whatever the number of queue pairs.
  const limits = new NicRateLimits();
  limits.apply(opts.rateLimit);
  if (limits.any) {
    logger.log(
      "info",
      "parent",
      `rate limits ${limits.describe()} (tx: what the guest sends; back-pressure, no drops)`,
    );
  }
  const port = new VionetDevicePort({
    tapFd: tap.fd,
    logger,
    ioUring: opts.ioUring,
    tapReadRoom: () => tap.readRoom(),
    queuePairs: tap.queues,
    tapQueueFd: (pair) => tap.queueFd(pair),
    setTapQueueAttached: (pair, on) => tap.setQueueAttached(pair, on),
    startDevice: pairDevice,
    rings: rings?.pool,
    sourceMac: opts.mac,
    rateLimit: limits.buffer,
    capture: capture === null ? undefined : (pair) => capture.pair(pair),
  });
  late.port = port;
  let trimTimer: ReturnType<typeof setTimeout> | null = null;
  const trimSoon = () => {
    if (trimTimer !== null) clearTimeout(trimTimer);
    trimTimer = setTimeout(() => {
      trimTimer = null;
      trimFreeMemory(logger);
    }, TRIM_DELAY_MS);
  };
  const daemon: Daemon = {
    tap,
    config,
    port,
    limits,
    socketAccess,
    mtu,
    service: null,
    metrics: null,
    capture,
    refused: 0,
    createdDirs: [],
    trimSoon,
    serve() {
      const serveOpts = {
        device: port,
        backendOptions: {
          queuePairs: tap.queues,
          maxMtu: mtu ?? UNKNOWN_MTU_LIMIT,
          maxMtuSource: mtu === null
            ? "the largest a tap takes"
            : `tap ${tap.name}'s MTU${opts.mtu !== null ? " (--mtu)" : ""}`,
        },
        logger,
        onDisconnect: (info: { reason: string; error?: Error; messages: number }) => {
          // The session's workers end on their own threads over the next moments;
          // then what their isolates and threads freed goes back to the kernel.
          trimSoon();
          logger.log(
            info.reason === "eof" || info.reason === "stopped" ? "info" : "warn",
            "vhost-user",
            `front-end disconnected (${info.reason}${
              info.error ? `: ${info.error.message}` : ""
            }); ` +
              `waiting for the next one`,
          );
        },
        onRefused: () => {
          daemon.refused++;
        },
      };
      if (opts.listenFd !== null) {
        daemon.service = VhostUserServer.fromFd(opts.listenFd, serveOpts);
      } else if (opts.client) {
        daemon.service = VhostUserClient.connect(opts.socketPath!, serveOpts);
      } else {
        const access = socketAccess!;
        daemon.createdDirs = prepareSocketDir(
          dirname(opts.socketPath!),
          access,
          opts.ownSocketDir,
          logger,
        );
        daemon.service = VhostUserServer.listen(
          opts.socketPath!,
          serveOpts,
          (path) => applySocketAccess(path, access),
        );
      }
      if (opts.metricsPath !== null) {
        // 0755: who may scrape is the socket file's mode (the umask's) and owner.
        daemon.createdDirs.push(...libc.mkdirs(dirname(opts.metricsPath), 0o755));
        const endpoint = new MetricsEndpoint({
          port,
          tap,
          service: () => daemon.service,
          refused: () => daemon.refused,
          httpResponses: () => daemon.metrics?.responses ?? new Map(),
          rateLimits: () => limits.snapshot(),
          capture: () => capture?.status() ?? null,
        });
        daemon.metrics = HttpServer.listen(opts.metricsPath, {
          routes: controlRoutes(() => endpoint.scrape(), limits, capture),
          logger,
          label: "metrics",
        });
      }
    },
    async stop() {
      stopping = true;
      if (trimTimer !== null) clearTimeout(trimTimer);
      // Each server removes its own socket file as it stops.
      await daemon.metrics?.stop();
      await daemon.service?.stop();
      for (const p of port.pairs()) p.device.terminate();
      // After the queues: what the rings still hold is written before the file is closed.
      await capture?.stop();
      rings?.pool.close();
      tap.close();
    },
  };
  // A device worker that dies (a bug: it never throws on guest input) ends the
  // connection, since every request to it now fails; a new one serves the next.
  return daemon;
}

/**
 * Opens the tap `--tap` names (with `--queues` queues) or adopts the
 * `--tap-fd` descriptors. A persistent tap made single-queue cannot take
 * more queues: with `--queues` not given, the daemon then serves one pair.
 */
function openTap(opts: Options, logger: Logger): Tap {
  const tap = openTapQueues(opts, logger);
  try {
    if (tap.queues > 1 && opts.steering === "hash") steerQueues(tap, logger);
  } catch (e) {
    tap.close();
    throw e;
  }
  return tap;
}

/**
 * Attaches the flow-hash steering program to a multi-queue tap, so the
 * kernel does not hash every frame a queue writes (`tap_steering.ts`). A tap
 * that refuses keeps the kernel's automq, which works, at that cost.
 */
function steerQueues(tap: Tap, logger: Logger): void {
  try {
    attachSteering(tap.fd);
    logger.log("debug", "parent", `tap ${tap.name}: queues steered by flow hash (eBPF)`);
  } catch (e) {
    if (!(e instanceof SteeringError)) throw e;
    logger.log(
      "warn",
      "parent",
      `${e.message}; tap ${tap.name} keeps the kernel's automq steering, which hashes every ` +
        "frame the guest sends (two pairs then move about 10 % fewer 64-byte frames; " +
        "--steering kernel chooses it without this warning)",
    );
  }
}

function openTapQueues(opts: Options, logger: Logger): Tap {
  if (opts.tapFd !== null) return adoptTap(opts.tapFds);
  try {
    return createTap(opts.tap!, { queues: opts.queues });
  } catch (e) {
    if (opts.queuesExplicit || opts.queues === 1 || !(e instanceof TapError)) throw e;
    const tap = createTap(opts.tap!, { queues: 1 });
    logger.log(
      "info",
      "parent",
      `tap ${tap.name} takes one queue (a persistent single-queue tap?): serving one queue pair`,
    );
    return tap;
  }
}

/** Logs the device's counters per queue and the data path's, one line each. */
async function logStats(daemon: Daemon, logger: Logger): Promise<void> {
  const queues = await daemon.port.stats();
  for (const [name, counters] of Object.entries(queues)) {
    logger.log("info", "stats", `${name} ${JSON.stringify(counters)}`);
  }
  // Pair 0's line is "datapath {...}" as with one pair; pair N's "datapath pairN {...}".
  const io = daemon.port.datapathCounters();
  if (io.size === 0) logger.log("info", "stats", "datapath not running");
  for (const [pair, c] of io) {
    logger.log("info", "stats", `datapath ${pair === 0 ? "" : `pair${pair} `}${JSON.stringify(c)}`);
  }
  // The NIC's rate limits: what is in force, and how often and how long each direction was held.
  const rl = daemon.limits.snapshot();
  logger.log(
    "info",
    "stats",
    `rate limits ${daemon.limits.describe()} ${
      JSON.stringify({
        tx: {
          throttles: rl.tx.counters.throttles,
          throttledMs: Math.round(rl.tx.counters.throttledMs),
        },
        rx: {
          throttles: rl.rx.counters.throttles,
          throttledMs: Math.round(rl.rx.counters.throttledMs),
        },
      })
    }`,
  );
  if (daemon.capture !== null) {
    logger.log("info", "stats", `capture ${JSON.stringify(daemon.capture.status())}`);
  }
  logger.log(
    "info",
    "stats",
    `retired memory ${
      JSON.stringify({
        reservedBytes: retiredMemory.reservedBytes,
        ranges: retiredMemory.ranges().length,
        retiredEver: retiredMemory.retiredCount,
        reclaimedBytes: retiredMemory.reclaimedBytes,
      })
    }`,
  );
}

/**
 * `--mtu`: sets the tap's MTU (at set-up, while vionet holds CAP_NET_ADMIN)
 * and returns it. Without `--mtu`, the tap's MTU as found (1500 for a tap
 * vionet creates; a persistent or inherited tap keeps the MTU its owner
 * gave it), or null when it cannot be read (an inherited tap in another
 * network namespace). Throws TapError when `--mtu` cannot be applied: an
 * inherited tap elsewhere, or without the capability, is refused rather
 * than left at an MTU that differs from what the operator asked.
 */
function settleMtu(tap: Tap, wanted: number | null, logger: Logger): number | null {
  const found = tap.mtu();
  if (wanted === null) {
    if (found === null) {
      logger.log(
        "warn",
        "parent",
        `tap ${tap.name}'s MTU cannot be read from here (it lives in another network ` +
          `namespace): a VMM may ask for any MTU up to ${UNKNOWN_MTU_LIMIT}`,
      );
    }
    return found;
  }
  if (found !== wanted) tap.setMtu(wanted);
  const now = tap.mtu();
  if (now !== wanted) {
    throw new TapError(`tap ${tap.name}'s MTU is ${now} after setting it to ${wanted}`);
  }
  return wanted;
}

function dirname(path: string): string {
  const i = path.lastIndexOf("/");
  return i <= 0 ? "/" : path.slice(0, i);
}

function startDevice(
  tap: Tap,
  config: DeviceConfig,
  opts: Options,
  logger: Logger,
  pair: number,
  onQueueFault: (queue: number) => void,
  onOffloads: () => void,
) {
  return DeviceHost.start({
    config,
    handlers: {
      tunscap: tunscapHandler(tap, allowedTapOffloads(opts.offload), logger, onOffloads),
    },
    logger,
    label: pair === 0 ? "device" : `device ${pair}`,
    onQueueFault: (queue, reason) => {
      logger.log("error", "device", `pair ${pair} queue ${queue} needs a reset: ${reason}`);
      onQueueFault(queue);
    },
  });
}

/**
 * How long after a front-end goes the daemon gives free memory back: its
 * I/O and device workers' threads have exited by then (milliseconds,
 * measured; up to a second on a loaded machine).
 */
export const TRIM_DELAY_MS = 2000;

/**
 * Gives the free pages of glibc's arenas back to the kernel
 * (`malloc_trim(0)`: madvise of every whole free page, in every arena).
 * Without it a daemon keeps, as RSS, the high-water mark of every worker
 * isolate and thread it ever ran: idle after start 29 MB of anonymous memory
 * instead of 20, and after VMs came and went, tens of MB more (docs/operations.md).
 */
export function trimFreeMemory(logger: Logger): void {
  const t0 = performance.now();
  const released = libc.sys.malloc_trim(0n) === 1;
  logger.log(
    "debug",
    "parent",
    `malloc_trim: ${released ? "gave pages back" : "nothing to give back"} in ${
      (performance.now() - t0).toFixed(1)
    } ms`,
  );
}

/** glibc's `M_MMAP_THRESHOLD` parameter (malloc.h). */
const M_MMAP_THRESHOLD = -3;
/** Allocations from this size on get mappings of their own (bytes). */
export const MMAP_THRESHOLD_BYTES = 1 << 20;

/**
 * Fixes glibc's mmap threshold, which otherwise rises to the size of every
 * mapped block freed (up to 32 MiB). Each VM's data path allocates an
 * 8 MiB SharedArrayBuffer (the bounce arena, `ipc/datapath.ts`) and V8
 * zero-fills a backing store that comes from an arena with memset, so once
 * the first one was freed every later one was touched whole, and stayed
 * resident until the isolates holding it collected it: RSS between VMs
 * wandered 130-180 MB and grew for tens of connections. With the threshold
 * fixed each such buffer is a fresh mapping, untouched pages are not
 * resident, and freeing it unmaps it: 111-123 MB over 300 connections
 * (`bench/footprint.ts`, docs/benchmarks.md "What one NIC costs").
 */
export function fixMmapThreshold(logger: Logger): void {
  if (libc.sys.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) !== 1) {
    logger.log("warn", "parent", "mallopt(M_MMAP_THRESHOLD) refused; RSS between VMs may wander");
  }
}

/** Exit status when a worker the daemon ended keeps running (`retired_memory.ts`). */
export const EXIT_UNCONTAINED = 3;
const UNCONTAINED = "uncontained";

/**
 * What the daemon prints on stdout at start: where it serves, and the QEMU
 * options that attach a VM (with `--fd`, at the path the inherited socket is
 * bound to; a socket without one is the supervisor's to attach). The MAC is
 * `--mac`'s, which the device enforces, else a stable one for the tap.
 */
export function attachText(
  opts: Pick<Options, "listenFd" | "client" | "socketPath" | "mac" | "mtu">,
  tapName: string,
  tapMtu: number | null,
  fdPath: string | null,
): string {
  const mac = opts.mac ?? defaultMac(tapName);
  let socket: QemuSocket;
  if (opts.listenFd !== null) {
    if (fdPath === null) {
      return `vionet: tap ${tapName}, vhost-user on inherited fd ${opts.listenFd}, ` +
        `a socket with no path: whoever passed it attaches the VM ` +
        `(virtio-net-pci mac=${formatMac(mac)}${
          tapMtu !== null && tapMtu !== 1500 ? `,host_mtu=${tapMtu}` : ""
        })`;
    }
    socket = { listen: fdPath };
  } else {
    socket = opts.client ? { connect: opts.socketPath! } : { listen: opts.socketPath! };
  }
  const where = "listen" in socket ? socket.listen : socket.connect;
  return `vionet: tap ${tapName}, vhost-user socket ${where}` +
    `${opts.listenFd !== null ? ` (inherited fd ${opts.listenFd})` : ""}\n` +
    `Attach a VM with these QEMU options (<guest RAM>: the same size as its -m):\n  ${
      qemuOptions(socket, mac, tapMtu)
    }` +
    ("listen" in socket ? `\n${QEMU_RECONNECT_NOTE}` : "");
}

/** The path an inherited listening socket is bound to, or null (unnamed, or not a socket we can ask). */
function boundPath(fd: number): string | null {
  try {
    return libc.socketPath(fd);
  } catch {
    return null;
  }
}

/**
 * Hands the directories the daemon created for its socket to `user`, so that
 * it can still remove the socket at exit once it runs as that user. Opened
 * without following a symbolic link, so a name swapped meanwhile is not
 * followed elsewhere. `gid`: the group they keep (`--socket-group`, which
 * must still pass through them), else the user's.
 */
export function handDirectories(
  dirs: readonly string[],
  user: DaemonUser,
  gid: number | null = null,
): void {
  for (const dir of dirs) {
    const fd = libc.open(dir, libc.O_RDONLY | libc.O_DIRECTORY | libc.O_NOFOLLOW | libc.O_CLOEXEC);
    try {
      libc.fchown(fd, user.uid, gid ?? user.gid);
    } finally {
      libc.close(fd);
    }
  }
}

/**
 * Why `user` could not remove the daemon's socket (root's) from directory
 * `dir` at exit, or null when it can: search permission on every directory
 * above it, write and search permission on it (by the mode bits; ACLs are
 * not read), and in a sticky directory (/tmp) the directory must be the
 * user's.
 */
export function removableBy(dir: string, user: DaemonUser): string | null {
  if (user.uid === 0) return null;
  const allows = (path: string, want: number): boolean | null => {
    const st = libc.lstat(path);
    if (st === null) return null;
    const bits = st.uid === user.uid ? st.mode >> 6 : st.gid === user.gid ? st.mode >> 3 : st.mode;
    return (bits & want) === want;
  };
  const parts = dir.split("/").filter((p) => p !== "");
  for (let i = 0; i < parts.length; i++) {
    const above = `/${parts.slice(0, i).join("/")}`;
    if (allows(above, 0o1) === false) return `${above} is not searchable by ${user.name}`;
  }
  const ok = allows(dir, 0o3);
  if (ok === null) return `${dir} does not exist`;
  if (!ok) return `${dir} is not writable by ${user.name}`;
  const st = libc.lstat(dir)!;
  if ((st.mode & 0o1000) !== 0 && st.uid !== user.uid) {
    return `${dir} is sticky and not ${user.name}'s`;
  }
  return null;
}

/** Runs until SIGINT or SIGTERM; returns the exit status. */
export async function runDaemon(opts: Options, logger: Logger): Promise<number> {
  // Before anything exists: an unknown --user, or one this process cannot become, creates nothing.
  const user = resolveUser(opts.user);
  const userPlan = planUser(user, currentCapabilities().uids[1]);
  const daemon = await startDaemon(opts, logger);
  const { tap } = daemon;
  let fdPath: string | null = null;
  try {
    daemon.serve();
    // Set-up is done: the tap is open and up, the socket exists. Nothing after
    // this needs a capability (TUNSETOFFLOAD works on the open tap without
    // CAP_NET_ADMIN) nor uid 0, so every thread gives them up, for good, and
    // takes on the Landlock ruleset and the seccomp filter.
    const socketDir = opts.listenFd === null && !opts.client ? dirname(opts.socketPath!) : null;
    const metricsDir = opts.metricsPath === null ? null : dirname(opts.metricsPath);
    if ("switchTo" in userPlan) {
      handDirectories(daemon.createdDirs, user, daemon.socketAccess?.gid ?? null);
    }
    for (const [dir, what] of [[socketDir, "socket"], [metricsDir, "metrics socket"]] as const) {
      const unremovable = dir === null || !("switchTo" in userPlan) ? null : removableBy(dir, user);
      if (unremovable !== null) {
        logger.log(
          "warn",
          "parent",
          `the ${what} will stay behind at exit: ${unremovable} (the next start replaces it)`,
        );
      }
    }
    // Asked now: getsockname is not among the calls the sandbox allows.
    fdPath = opts.listenFd !== null ? boundPath(opts.listenFd) : null;
    const sandbox = enterSandbox({
      user,
      seccomp: opts.seccomp,
      ioUring: opts.ioUring,
      client: opts.client,
      socketDir,
      metricsDir,
    });
    for (const line of sandbox.log) logger.log(line.level, "parent", line.message);
    // Set-up's garbage (transpiling and compiling the modules, on Deno's
    // blocking threads) stays in glibc's arenas unless given back: 9 MB
    // idle. Soon, not now: the trim takes tens of ms (183 ms measured on a
    // loaded machine) that the first VM's requests should not wait for.
    daemon.trimSoon();
  } catch (e) {
    await daemon.stop();
    throw e;
  }
  logger.log(
    "info",
    "parent",
    `tap ${tap.name} ${tap.created ? "created" : "attached"}; MTU ${daemon.mtu ?? "unknown"}${
      opts.mtu !== null ? " (--mtu)" : ""
    }; kernel offloads: ${
      tunFlagNames(tap.kernelOffloads).join(" ") || "none"
    }; --offload ${opts.offload}`,
  );
  logger.log(
    "info",
    "parent",
    `device workers start with no permissions when a VM needs them; ${
      opts.mac !== null
        ? `it drops frames whose source MAC is not ${formatMac(opts.mac)} (--mac)`
        : "source MACs are not checked (no --mac)"
    }`,
  );
  if (opts.metricsPath !== null) {
    logger.log(
      "info",
      "parent",
      `serving metrics on ${opts.metricsPath} (GET /metrics${
        daemon.capture ? "; POST /capture?state=on|off" : ""
      })`,
    );
  }
  if (daemon.capture !== null) {
    logger.log(
      "info",
      "parent",
      `capture ${opts.pcapStart ? "on" : "off (POST /capture?state=on starts it)"}: frames of ` +
        `${tap.queues} queue pair(s), both ways, to ${daemon.capture.path} (pcapng; ${
          opts.pcapSnaplen ? `first ${opts.pcapSnaplen} bytes of each; ` : ""
        }stops at --pcap-max ${daemon.capture.maxBytes} bytes)`,
    );
  }
  if (opts.socketActivated !== null) {
    const { fd, name, count } = opts.socketActivated;
    logger.log(
      "info",
      "parent",
      `serving vhost-user on the socket the supervisor passed (LISTEN_FDS=${count}: fd ${fd}` +
        `${name === null ? "" : `, named ${name}`}${fdPath ? `, ${fdPath}` : ""})`,
    );
  } else if (opts.listenFd !== null) {
    logger.log(
      "info",
      "parent",
      `serving vhost-user on inherited fd ${opts.listenFd}${fdPath ? ` (${fdPath})` : ""}`,
    );
  } else {
    logger.log(
      "info",
      "parent",
      opts.client
        ? `connecting to ${opts.socketPath}`
        : `listening on ${opts.socketPath}, ${describeSocketAccess(daemon.socketAccess!)}`,
    );
  }
  console.log(attachText(opts, tap.name, daemon.mtu, fdPath));

  // SIGUSR2: log every counter (per queue, and the I/O side's), e.g. for a
  // stalled guest: `kill -USR2 <pid>`. Not SIGUSR1: Deno (2.9.6, measured)
  // opens its inspector on 127.0.0.1:9229 at SIGUSR1, listener or not.
  const dumpStats = () => {
    logStats(daemon, logger).catch((e) =>
      logger.log("warn", "parent", `SIGUSR2: no stats: ${(e as Error).message}`)
    );
  };
  Deno.addSignalListener("SIGUSR2", dumpStats);
  const stopped = new Promise<string>((resolve) => {
    for (const sig of ["SIGINT", "SIGTERM"] as const) {
      Deno.addSignalListener(sig, () => resolve(sig));
    }
    // A worker the daemon ended and cannot stop (retired_memory.ts): only
    // ending the process stops it; the supervisor starts a fresh one.
    retiredMemory.configure({ onUncontained: () => resolve(UNCONTAINED) });
  });
  const signal = await stopped;
  Deno.removeSignalListener("SIGUSR2", dumpStats);
  logger.log(
    signal === UNCONTAINED ? "error" : "info",
    "parent",
    `${signal === UNCONTAINED ? "a worker that was ended still runs" : signal}: shutting down`,
  );
  await daemon.stop();
  if (tap.created) logger.log("info", "parent", `tap ${tap.name} removed`);
  return signal === UNCONTAINED ? EXIT_UNCONTAINED : 0;
}
