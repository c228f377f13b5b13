/**
 * The command line, following the "Backend program conventions" of QEMU's
 * docs/interop/vhost-user.rst (`--socket-path`, `--fd`, `--print-capabilities`)
 * so that VMMs and libvirt can start vionet like any other vhost-user backend.
 *
 * Parsing is complete before anything is created: a bad option leaves no tap
 * and no socket behind.
 *
 * @module
 */

import { parseArgs } from "node:util";
import type { LogLevel, OffloadMode } from "../../ipc/protocol.ts";
import { LOG_LEVELS } from "./log.ts";
import type { IoUringMode } from "../io/protocol.ts";
import { type ListenEnv, ListenFdsError, type PassedSocket, passedSocket } from "./listen_fds.ts";
import { parseRateLimit, type RateLimitChange, RateLimitSyntaxError } from "./rate_limit_spec.ts";

/** A command line that cannot be run; main prints the message and exits 2. */
export class UsageError extends Error {
  override name = "UsageError";
}

/** What the daemon was asked to do. */
export interface Options {
  help: boolean;
  printCapabilities: boolean;
  printPermissions: boolean;
  /** Where to listen (or, with `client`, connect); null when `listenFd` is used. */
  socketPath: string | null;
  /**
   * The socket's directory is vionet's own (`<runtime dir>/vionet`, from the
   * default socket path): its mode and group are set at every start.
   */
  ownSocketDir: boolean;
  /** A listening socket inherited from the supervisor (`--fd`, or systemd's `LISTEN_FDS`). */
  listenFd: number | null;
  /** The socket systemd passed (`LISTEN_FDS`, `listen_fds.ts`), when `listenFd` is that one. */
  socketActivated: PassedSocket | null;
  /** `--metrics`: where to serve Prometheus metrics over HTTP, a unix socket path; or null. */
  metricsPath: string | null;
  /** Connect to a VMM that listens on `socketPath`, and reconnect when it goes. */
  client: boolean;
  /** The tap to create or attach to; null when `tapFd` is used. */
  tap: string | null;
  /** A tap descriptor inherited from the supervisor (`--tap-fd`): the first queue's. */
  tapFd: number | null;
  /** Every `--tap-fd` descriptor, one per queue pair (empty without `--tap-fd`). */
  tapFds: number[];
  /** Queue pairs the VMM may use (`--queues`): GET_QUEUE_NUM's answer, the tap's queues. */
  queues: number;
  /** `--queues` was given (else a single-queue persistent tap lowers the default to 1). */
  queuesExplicit: boolean;
  /**
   * `--mac`: the only Ethernet source address the guest may send from (the
   * device drops and counts every other frame); null when not given, and
   * then nothing is enforced.
   */
  mac: number[] | null;
  /**
   * `--mtu`: the tap's MTU, set at start, and the largest MTU a front-end may
   * give the guest (VHOST_USER_NET_SET_MTU); null when not given: the tap's
   * MTU as found (1500 for a tap vionet creates).
   */
  mtu: number | null;
  /** `--socket-group`: the group (name or number) the listening socket is given; null: root's. */
  socketGroup: string | null;
  /** `--socket-mode`: the listening socket's permission bits; null: 0600, or 0660 with a group. */
  socketMode: number | null;
  offload: OffloadMode;
  /** Whether the I/O workers may batch tap writes and reads through io_uring. */
  ioUring: IoUringMode;
  /**
   * `--steering`: how a multi-queue tap picks the pair of each frame for the
   * guest: `hash`, vionet's flow-hash program (`tap_steering.ts`), or
   * `kernel`, tun's own automq, which also hashes every frame the guest sends.
   */
  steering: "hash" | "kernel";
  logLevel: LogLevel;
  /** `--user`: the user to become after set-up; null: the default (`users.ts`). */
  user: string | null;
  /**
   * `--seccomp`: whether every thread runs the seccomp allowlist after
   * set-up (`log`: it runs, but a call outside it is only logged by the kernel).
   */
  seccomp: "on" | "off" | "log";
  /**
   * `--rate-limit`: the limits of this NIC at start (`rate_limit_spec.ts`);
   * a direction it does not name is not limited. Empty without the option.
   */
  rateLimit: RateLimitChange;
  /** `--pcap`: the capture file (opened during set-up), or null: no capture at all. */
  pcapPath: string | null;
  /** `--pcap-max`: the most bytes the capture file may hold; capture stops there. */
  pcapMax: number;
  /** `--pcap-snaplen`: the most bytes of each frame captured; 0: whole frames. */
  pcapSnaplen: number;
  /** `--pcap-start`: capture from the start (else only after `POST /capture?state=on`). */
  pcapStart: boolean;
}

interface OptionSpec {
  type: "string" | "boolean";
  arg?: string;
  help: string;
  /** The default as shown in --help. */
  shown?: string;
}

/** The default `--pcap-max`: 1 GiB. */
export const DEFAULT_PCAP_MAX = 1024 ** 3;
/** The least `--pcap-max`: room for the header and a few frames. */
export const MIN_PCAP_MAX = 64 * 1024;

/** The largest default `--queues`: more pairs than this rarely help one NIC. */
export const DEFAULT_MAX_QUEUES = 8;
/** vhost-user ring indices have 8 bits (SET_VRING_KICK); 64 pairs is what QEMU accepts too. */
export const MAX_QUEUES = 64;

/**
 * The default `--queues`: one pair per host CPU (more pairs than CPUs
 * cannot run in parallel, and each pair costs three threads), at most
 * {@link DEFAULT_MAX_QUEUES}.
 */
export function defaultQueues(cpus = navigator.hardwareConcurrency || 1): number {
  return Math.max(1, Math.min(DEFAULT_MAX_QUEUES, cpus));
}

/** Every option, in --help order. */
export const OPTIONS: Record<string, OptionSpec> = {
  "socket-path": {
    type: "string",
    arg: "PATH",
    help: "vhost-user socket to listen on (or connect to, with --client)",
    shown: "$XDG_RUNTIME_DIR/vionet/<tap>.sock, or /run/vionet/<tap>.sock",
  },
  "fd": {
    type: "string",
    arg: "N",
    help: "use the inherited listening socket N instead of --socket-path " +
      "(a socket systemd passes, LISTEN_FDS, is used without it)",
  },
  "client": {
    type: "boolean",
    help: "connect to a VMM that listens on --socket-path; reconnect when it goes",
  },
  "metrics": {
    type: "string",
    arg: "PATH",
    help: "serve GET /metrics (Prometheus text format) over HTTP on a unix socket at PATH",
  },
  "pcap": {
    type: "string",
    arg: "FILE",
    help: "capture the frames of every queue pair, both ways, to FILE (pcapng, created 0600, " +
      "truncated; the virtio_net_hdr of each frame in its comment); on/off at run time: " +
      "POST /capture?state=on|off on the --metrics socket",
  },
  "pcap-max": {
    type: "string",
    arg: "BYTES",
    help: "the most bytes FILE may hold (K, M, G suffixes: powers of 1024); capture STOPS " +
      "there (no rotation): later frames are only counted as dropped",
    shown: "1G",
  },
  "pcap-snaplen": {
    type: "string",
    arg: "BYTES",
    help: "capture at most BYTES of each frame (64 and up; its length is kept): headers only",
    shown: "whole frames",
  },
  "pcap-start": {
    type: "string",
    arg: "on|off",
    help: "on: capture from the start; off: only once POST /capture?state=on asks",
    shown: "on",
  },
  "tap": {
    type: "string",
    arg: "IFNAME",
    help: "tap interface to create (or attach to)",
    shown: "vionet0",
  },
  "tap-fd": {
    type: "string",
    arg: "N[,N...]",
    help: "use the inherited tap descriptor N (opened with IFF_VNET_HDR); " +
      "one per queue pair for a multi-queue tap (IFF_MULTI_QUEUE)",
  },
  "queues": {
    type: "string",
    arg: "N",
    help: "queue pairs the VMM may use (1..64), each with its own tap queue and workers",
    shown: `one per host CPU, at most ${DEFAULT_MAX_QUEUES}; with --tap-fd, one per descriptor`,
  },
  "socket-group": {
    type: "string",
    arg: "GROUP",
    help: "give the listening socket (and a socket directory vionet creates) this group, " +
      "e.g. libvirt-qemu",
    shown: "none: root's",
  },
  "socket-mode": {
    type: "string",
    arg: "MODE",
    help: "the listening socket's permissions, octal (0600..0777)",
    shown: "0600, or 0660 with --socket-group",
  },
  "mac": {
    type: "string",
    arg: "MAC",
    help: "the guest's MAC: frames from any other source MAC are dropped (give the VMM the same; " +
      "without it nothing is checked and the QEMU line suggests 52:54:00:xx:xx:xx from the tap name)",
    shown: "none enforced",
  },
  "mtu": {
    type: "string",
    arg: "N",
    help: "set the tap's MTU to N (68..65521), the most a VMM's host_mtu may be",
    shown: "the tap's MTU as found, 1500 for a new tap",
  },
  "offload": {
    type: "string",
    arg: "auto|off",
    help: "auto: use the tap's offloads; off: never, checksum and segment in software",
    shown: "auto",
  },
  "io-uring": {
    type: "string",
    arg: "auto|off",
    help: "auto: batch tap writes and reads through io_uring when the kernel allows; " +
      "off: one writev/readv each",
    shown: "auto",
  },
  "steering": {
    type: "string",
    arg: "hash|kernel",
    help: "with several queue pairs, which pair the host's frames go to: hash: by a hash of " +
      "the flow (an eBPF program, needs CAP_BPF at set-up); kernel: the pair the flow last " +
      "came from (tun's automq, which hashes every frame the guest sends)",
    shown: "hash",
  },
  "user": {
    type: "string",
    arg: "NAME",
    help: "become this user once the tap and the socket exist (a name, or UID:GID); " +
      "root keeps uid 0 and says so",
    shown: "vionet if it exists, else nobody",
  },
  "seccomp": {
    type: "string",
    arg: "on|off|log",
    help: "on: every thread runs the system-call allowlist after set-up; off: no filter; " +
      "log: calls outside the list are allowed and logged by the kernel (both said loudly)",
    shown: "on",
  },
  "rate-limit": {
    type: "string",
    arg: "SPEC",
    help: "limit what the guest sends (tx) and receives (rx), for the whole NIC: " +
      "tx=RATE[,burst=SIZE],rx=RATE[,burst=SIZE]; RATE in bits (100Mbit), bytes (12.5MB, " +
      "MiB) or frames (10kpps) a second, or off; over the limit vionet stops taking frames " +
      "(back-pressure), it does not drop; change it at run time with POST /rate-limit on --metrics",
    shown: "none",
  },
  "log-level": { type: "string", arg: "LEVEL", help: LOG_LEVELS.join("|"), shown: "info" },
  "print-capabilities": {
    type: "boolean",
    help: "print the backend's capabilities as JSON and exit",
  },
  "print-permissions": {
    type: "boolean",
    help: "print what each part of vionet may do (JSON, or a table on a terminal) and exit",
  },
  "help": { type: "boolean", help: "show this help and exit" },
};

/** The --help text. */
export function usage(): string {
  const lines = [
    "vionet: a virtio-net device backend (vhost-user) on a Linux tap",
    "",
    "usage: deno task start [--socket-path PATH | --fd N] [--client] [--metrics PATH]",
    "                       [--pcap FILE [--pcap-max BYTES] [--pcap-snaplen BYTES] [--pcap-start on|off]]",
    "                       [--tap IFNAME | --tap-fd N[,N...]] [--queues N] [--steering hash|kernel]",
    "                       [--socket-group GROUP] [--socket-mode MODE]",
    "                       [--mac MAC] [--mtu N] [--offload auto|off] [--io-uring auto|off]",
    "                       [--user NAME] [--seccomp on|off|log] [--rate-limit SPEC]",
    "                       [--log-level LEVEL]",
    "                       [--print-capabilities] [--print-permissions] [--help]",
    "",
    "options:",
  ];
  for (const [name, spec] of Object.entries(OPTIONS)) {
    const left = `  --${name}${spec.arg ? ` ${spec.arg}` : ""}`;
    lines.push(`${left.padEnd(28)} ${spec.help}`);
    if (spec.shown) lines.push(`${"".padEnd(28)} (default: ${spec.shown})`);
  }
  return lines.join("\n");
}

/** The JSON the vhost-user backend conventions ask for from --print-capabilities. */
export function capabilities(): string {
  return JSON.stringify({ type: "net" });
}

/** An interface name the kernel accepts (dev_valid_name): 1..15 bytes, no '/', ':' or space. */
export function validIfname(name: string): boolean {
  return /^[A-Za-z0-9_.@+-]{1,15}$/.test(name) && name !== "." && name !== "..";
}

/** Parses `AA:BB:CC:DD:EE:FF` into octets; null if it is not a unicast MAC. */
export function parseMac(text: string): number[] | null {
  const m = /^([0-9a-fA-F]{2})(?::([0-9a-fA-F]{2})){5}$/.test(text) ? text.split(":") : null;
  if (!m) return null;
  const octets = m.map((h) => parseInt(h, 16));
  if ((octets[0] & 1) !== 0 || octets.every((b) => b === 0)) return null;
  return octets;
}

/**
 * The MTUs `--mtu` accepts: Linux's ETH_MIN_MTU (RFC 791's 68 bytes every
 * IPv4 host must take) up to 65521, the most a tap takes (tun's max_mtu:
 * 65535 less its 14-byte Ethernet header; the kernel answers EINVAL above).
 * Both paths carry such frames: the poller reads up to the MTU plus 22
 * bytes (Ethernet header, two VLAN tags) and the TX path passes frames of
 * up to MAX_FRAME_BYTES (65550).
 */
export const MIN_MTU = 68;
export const MAX_MTU = 65521;

/** A group as getgrnam(3) or a number takes it: POSIX portable name characters, or digits. */
export function validGroup(text: string): boolean {
  return /^[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?$/.test(text) || /^\d{1,9}$/.test(text);
}

/**
 * An octal socket mode, `0660` or `660`: the owner keeps read and write
 * (0600 at least, or vionet's own supervisor could not reach it), nothing
 * beyond 0777 (no setuid, setgid or sticky bits on a socket). Null when not.
 */
export function parseMode(text: string): number | null {
  if (!/^0?[0-7]{3}$/.test(text)) return null;
  const mode = parseInt(text, 8);
  return (mode & 0o600) === 0o600 ? mode : null;
}

/** Formats six octets as `aa:bb:cc:dd:ee:ff`. */
export function formatMac(mac: readonly number[]): string {
  return mac.map((b) => b.toString(16).padStart(2, "0")).join(":");
}

/** A stable, locally administered MAC for a tap name: the same tap, the same guest MAC. */
export function defaultMac(tap: string): number[] {
  let h = 0x811c9dc5; // FNV-1a
  for (const c of new TextEncoder().encode(tap)) h = Math.imul(h ^ c, 0x01000193) >>> 0;
  return [0x52, 0x54, 0x00, (h >>> 16) & 0xff, (h >>> 8) & 0xff, h & 0xff];
}

/** The socket path used when none is given. */
export function defaultSocketPath(tap: string, env: { XDG_RUNTIME_DIR?: string }): string {
  return `${env.XDG_RUNTIME_DIR || "/run"}/vionet/${tap}.sock`;
}

function parseFd(flag: string, text: string): number {
  if (!/^\d{1,9}$/.test(text)) {
    throw new UsageError(`--${flag} wants a descriptor number, got "${text}"`);
  }
  const fd = Number(text);
  if (fd < 3) throw new UsageError(`--${flag} ${fd}: descriptors 0-2 are stdin, stdout and stderr`);
  return fd;
}

/** The environment the command line reads: the default socket's directory, socket activation. */
export type OptionsEnv = { XDG_RUNTIME_DIR?: string } & ListenEnv;

/**
 * Parses argv; throws UsageError naming the first thing wrong. `pid` is this
 * process's: socket activation's `LISTEN_PID` must name it.
 */
export function parseOptions(argv: string[], env: OptionsEnv = {}, pid = 0): Options {
  let values: Record<string, string | boolean | undefined>;
  try {
    const spec = Object.fromEntries(
      Object.entries(OPTIONS).map(([k, v]) => [k, { type: v.type }]),
    ) as Record<string, { type: "string" | "boolean" }>;
    ({ values } = parseArgs({ args: argv, options: spec, strict: true, allowPositionals: false }));
  } catch (e) {
    throw new UsageError(describeParseError(e as Error));
  }
  const str = (k: string) => values[k] as string | undefined;
  const flag = (k: string) => values[k] === true;

  if (str("socket-path") !== undefined && str("fd") !== undefined) {
    throw new UsageError("--socket-path and --fd are mutually exclusive");
  }
  if (str("tap") !== undefined && str("tap-fd") !== undefined) {
    throw new UsageError("--tap and --tap-fd are mutually exclusive");
  }
  if (flag("client") && str("fd") !== undefined) {
    throw new UsageError("--client connects to --socket-path; it cannot use an inherited --fd");
  }

  const tapFds = str("tap-fd") === undefined
    ? []
    : str("tap-fd")!.split(",").map((t) => parseFd("tap-fd", t));
  if (new Set(tapFds).size !== tapFds.length) {
    throw new UsageError(`--tap-fd ${str("tap-fd")} names a descriptor twice`);
  }
  const tapFd = tapFds[0] ?? null;
  const tap = tapFd === null ? str("tap") ?? "vionet0" : null;
  const queuesText = str("queues");
  let queues = tapFds.length > 0 ? tapFds.length : defaultQueues();
  if (queuesText !== undefined) {
    queues = /^\d{1,3}$/.test(queuesText) ? Number(queuesText) : NaN;
    if (!(queues >= 1 && queues <= MAX_QUEUES)) {
      throw new UsageError(`--queues "${queuesText}" is not in 1..${MAX_QUEUES}`);
    }
    if (tapFds.length > 0 && queues !== tapFds.length) {
      throw new UsageError(
        `--queues ${queues} with ${tapFds.length} --tap-fd descriptor(s): give one per queue pair`,
      );
    }
  }
  if (tap !== null && !validIfname(tap)) {
    throw new UsageError(
      `--tap "${tap}" is not a valid interface name (1-15 of A-Z a-z 0-9 _ . @ + -)`,
    );
  }

  let activated: PassedSocket | null;
  try {
    activated = passedSocket(env, pid);
  } catch (e) {
    if (e instanceof ListenFdsError) throw new UsageError(`socket activation: ${e.message}`);
    throw e;
  }
  if (activated !== null) {
    const other = ["socket-path", "fd"].find((k) => str(k) !== undefined) ??
      (flag("client") ? "client" : undefined);
    if (other !== undefined) {
      throw new UsageError(
        `--${other} and a socket passed by the supervisor (LISTEN_FDS) are mutually exclusive`,
      );
    }
  }
  const listenFd = activated !== null
    ? activated.fd
    : str("fd") === undefined
    ? null
    : parseFd("fd", str("fd")!);
  let socketPath = str("socket-path") ?? null;
  if (socketPath === "") throw new UsageError("--socket-path is empty");
  if (socketPath !== null && new TextEncoder().encode(socketPath).length > 107) {
    throw new UsageError(`--socket-path is longer than the 107 bytes a unix socket address holds`);
  }
  const ownSocketDir = socketPath === null && listenFd === null;
  if (ownSocketDir) socketPath = defaultSocketPath(tap ?? `fd${tapFd}`, env);

  const metricsPath = str("metrics") ?? null;
  if (metricsPath !== null) {
    if (metricsPath === "") throw new UsageError("--metrics is empty");
    if (new TextEncoder().encode(metricsPath).length > 107) {
      throw new UsageError(`--metrics is longer than the 107 bytes a unix socket address holds`);
    }
    if (metricsPath === socketPath) {
      throw new UsageError("--metrics and the vhost-user socket cannot be the same path");
    }
  }

  const macText = str("mac");
  const mac = macText === undefined ? null : parseMac(macText);
  if (macText !== undefined && mac === null) {
    throw new UsageError(`--mac "${macText}" is not a unicast MAC address like 52:54:00:12:34:56`);
  }

  const mtuText = str("mtu");
  let mtu: number | null = null;
  if (mtuText !== undefined) {
    mtu = /^\d{1,5}$/.test(mtuText) ? Number(mtuText) : NaN;
    if (!(mtu >= MIN_MTU && mtu <= MAX_MTU)) {
      throw new UsageError(`--mtu "${mtuText}" is not in ${MIN_MTU}..${MAX_MTU}`);
    }
  }

  const socketGroup = str("socket-group") ?? null;
  if (socketGroup !== null && !validGroup(socketGroup)) {
    throw new UsageError(`--socket-group "${socketGroup}" is not a group name or number`);
  }
  const modeText = str("socket-mode");
  const socketMode = modeText === undefined ? null : parseMode(modeText);
  if (socketMode === null && modeText !== undefined) {
    throw new UsageError(
      `--socket-mode "${modeText}" is not an octal mode from 0600 to 0777 (e.g. 0660)`,
    );
  }
  const notOurSocket = listenFd !== null || flag("client");
  if (notOurSocket && (socketGroup !== null || socketMode !== null)) {
    throw new UsageError(
      `--socket-group and --socket-mode apply to the socket vionet listens on; ` +
        `with ${listenFd !== null ? "--fd" : "--client"} it makes none`,
    );
  }

  const offload = str("offload") ?? "auto";
  if (offload !== "auto" && offload !== "off") {
    throw new UsageError(`--offload "${offload}" must be auto or off`);
  }
  const ioUring = str("io-uring") ?? "auto";
  if (ioUring !== "auto" && ioUring !== "off") {
    throw new UsageError(`--io-uring "${ioUring}" must be auto or off`);
  }
  const steering = str("steering") ?? "hash";
  if (steering !== "hash" && steering !== "kernel") {
    throw new UsageError(`--steering "${steering}" must be hash or kernel`);
  }
  const user = str("user") ?? null;
  if (user !== null && !/^([a-z_][a-z0-9_.-]{0,31}\$?|\d{1,10}:\d{1,10})$/i.test(user)) {
    throw new UsageError(`--user "${user}" is not a user name or UID:GID`);
  }
  const seccomp = str("seccomp") ?? "on";
  if (seccomp !== "on" && seccomp !== "off" && seccomp !== "log") {
    throw new UsageError(`--seccomp "${seccomp}" must be on, off or log`);
  }
  const pcapPath = str("pcap") ?? null;
  if (pcapPath === null) {
    for (const k of ["pcap-max", "pcap-snaplen", "pcap-start"]) {
      if (str(k) !== undefined) throw new UsageError(`--${k} needs --pcap FILE`);
    }
  } else if (pcapPath === "") {
    throw new UsageError("--pcap is empty");
  } else if (pcapPath === socketPath || pcapPath === metricsPath) {
    throw new UsageError(`--pcap ${pcapPath} is the path of a socket vionet serves`);
  }
  const pcapMaxText = str("pcap-max");
  const pcapMax = pcapMaxText === undefined ? DEFAULT_PCAP_MAX : parseBytes(pcapMaxText);
  if (!(pcapMax >= MIN_PCAP_MAX && pcapMax <= Number.MAX_SAFE_INTEGER)) {
    throw new UsageError(
      `--pcap-max "${pcapMaxText}" is not a size from ${MIN_PCAP_MAX} bytes (64K) up, ` +
        "in bytes or with a K, M or G suffix",
    );
  }
  const snapText = str("pcap-snaplen");
  const pcapSnaplen = snapText === undefined ? 0 : parseBytes(snapText);
  if (
    !(pcapSnaplen === 0 && snapText === undefined) && !(pcapSnaplen >= 64 && pcapSnaplen <= 1 << 20)
  ) {
    throw new UsageError(`--pcap-snaplen "${snapText}" is not a length from 64 bytes to 1M`);
  }
  const pcapStart = str("pcap-start") ?? "on";
  if (pcapStart !== "on" && pcapStart !== "off") {
    throw new UsageError(`--pcap-start "${pcapStart}" must be on or off`);
  }

  const logLevel = str("log-level") ?? "info";
  if (!(LOG_LEVELS as readonly string[]).includes(logLevel)) {
    throw new UsageError(`--log-level "${logLevel}" must be one of ${LOG_LEVELS.join(", ")}`);
  }

  const rateText = str("rate-limit");
  let rateLimit: RateLimitChange = {};
  if (rateText !== undefined) {
    try {
      rateLimit = parseRateLimit(rateText);
    } catch (e) {
      if (e instanceof RateLimitSyntaxError) {
        throw new UsageError(`--rate-limit "${rateText}": ${e.message}`);
      }
      throw e;
    }
  }

  return {
    help: flag("help"),
    printCapabilities: flag("print-capabilities"),
    printPermissions: flag("print-permissions"),
    socketPath,
    ownSocketDir,
    listenFd,
    socketActivated: activated,
    metricsPath,
    client: flag("client"),
    tap,
    tapFd,
    tapFds,
    queues,
    queuesExplicit: queuesText !== undefined,
    mac,
    mtu,
    socketGroup,
    socketMode,
    offload,
    ioUring,
    steering,
    logLevel: logLevel as LogLevel,
    user,
    seccomp,
    rateLimit,
    pcapPath,
    pcapMax,
    pcapSnaplen,
    pcapStart: pcapStart === "on",
  };
}

/** `1048576`, `64K`, `100M`, `2G` (powers of 1024); NaN when it is none of these. */
export function parseBytes(text: string): number {
  const m = /^(\d{1,16})([KMG]?)$/i.exec(text);
  if (!m) return NaN;
  const unit =
    { "": 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[m[2].toUpperCase() as "" | "K" | "M" | "G"];
  return Number(m[1]) * unit;
}

/** Turns node:util's parseArgs messages into one line naming the option. */
function describeParseError(e: Error): string {
  const code = (e as { code?: string }).code;
  const opt = /'(-[^' ]+)/.exec(e.message)?.[1];
  switch (code) {
    case "ERR_PARSE_ARGS_UNKNOWN_OPTION":
      return `unknown option ${opt ?? e.message} (see --help)`;
    case "ERR_PARSE_ARGS_UNEXPECTED_POSITIONAL":
      return `unexpected argument ${
        /'([^']*)'/.exec(e.message)?.[1] ?? ""
      } (options start with --)`;
    case "ERR_PARSE_ARGS_INVALID_OPTION_VALUE":
      return opt
        ? `option ${opt.split(" ")[0]} ${
          /argument missing/.test(e.message) ? "needs a value" : "takes no value"
        }`
        : e.message.split("\n")[0];
    default:
      return e.message.split("\n")[0];
  }
}
