/**
 * A rig for end-to-end runs of vionet against a real Linux guest: a private
 * network namespace, the daemon started in it as a subprocess (with the start
 * task's Deno flags), guests booted by QEMU with `-netdev vhost-user` on the
 * daemon's socket, and host-side helpers (iperf3, sha256-checked TCP
 * transfers) running in the same namespace. Used by the end-to-end tests,
 * `deno task demo` and the benchmark.
 *
 * ```ts
 * await Rig.run({ offload: "auto" }, async (rig) => {
 *   const { guest } = await rig.bootGuest();
 *   console.log(await rig.iperf3(guest, { reverse: false, seconds: 3 }));
 * }); // closed whatever happened; throws if the daemon did not exit cleanly
 * ```
 *
 * Cleanup is by PID and always complete: close() kills every guest and helper
 * process it started (SIGKILL), stops the daemon (SIGTERM, then SIGKILL),
 * deletes the namespace (and with it the tap) and removes its temporary
 * directory, also after a failure half-way through. Every wait is bounded.
 *
 * Addresses come from 198.18.0.0/15 (reserved for benchmarking): the tap's
 * side is {@link HOST_IP}, the guest's {@link GUEST_IP}.
 *
 * @module
 */

import { bootGuest, type BootInfo, type Guest, guestAssets, netKernelArgs } from "./guest.ts";
import { ROOT, startTaskEnv, startTaskFlags } from "../helpers.ts";
import { exec as sh } from "../net_ns.ts";
import { type PacedStream, streamFromGuest, streamToGuest } from "./paced_streams.ts";

/** The tap's address in the rig's namespace. */
export const HOST_IP = "198.18.0.1";
/** The guest's eth0 address. */
export const GUEST_IP = "198.18.0.2";
/** The guest NIC's MAC address (first guest; later ones count up). */
export const GUEST_MAC = "52:54:00:12:34:56";

const MAIN_TS = new URL("../../main.ts", import.meta.url).pathname;
const LOG_TAIL_CHARS = 65_536;

/** Why the end-to-end rig cannot run here, or undefined when it can. */
export function rigUnavailable(): string | undefined {
  if (Deno.build.os !== "linux") return "needs Linux";
  if (Deno.uid() !== 0) return "needs root (network namespaces, taps)";
  for (const tool of ["qemu-system-x86_64", "ip", "iperf3", "ethtool"]) {
    if (!onPath(tool)) return `needs ${tool} on PATH`;
  }
  try {
    guestAssets();
  } catch (e) {
    return (e as Error).message;
  }
  return undefined;
}

/** A process running in a namespace whose output lines are kept. */
export class NetnsProcess {
  readonly pid: number;
  readonly argv: readonly string[];
  /** Resolves when the process has exited and its output is read. */
  readonly exited: Promise<Deno.CommandStatus>;
  #child: Deno.ChildProcess;
  #lines: string[] = [];
  #chars = 0;
  #done = false;
  #status: Deno.CommandStatus | undefined;
  #wake: () => void = () => {};

  /**
   * Starts `argv` with `ip netns exec <netns>` (which execs it: the PID is
   * argv[0]'s), in directory `cwd` (default: this process's).
   */
  constructor(netns: string, argv: string[], cwd?: string, env?: Record<string, string>) {
    this.argv = argv;
    this.#child = new Deno.Command("ip", {
      args: ["netns", "exec", netns, ...argv],
      cwd,
      env,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const child = this.#child;
    this.pid = child.pid;
    const pumps = Promise.all([this.#pump(child.stdout), this.#pump(child.stderr)]);
    this.exited = (async () => {
      const status = await child.status;
      await pumps;
      this.#status = status;
      this.#done = true;
      this.#wake();
      return status;
    })();
  }

  /** Whether the process has not exited yet. */
  get running(): boolean {
    return !this.#done;
  }

  /** How it ended ("running" while it runs): "exit code N" or "killed by SIGNAL". */
  describeStatus(): string {
    const s = this.#status;
    if (!s) return "running";
    return s.signal ? `killed by ${s.signal}` : `exit code ${s.code}`;
  }

  /** The output lines so far (stdout and stderr interleaved; the oldest dropped past 64 KiB). */
  lines(): string[] {
    return [...this.#lines];
  }

  /** The output so far as one text. */
  output(): string {
    return this.#lines.join("\n");
  }

  /**
   * Waits for an output line matching `pattern` (searching from line `from`)
   * and returns it; rejects with the output when the process exits first or
   * `timeoutMs` passes.
   */
  async waitFor(pattern: RegExp, timeoutMs: number, from = 0): Promise<string> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const hit = this.#lines.slice(from).find((l) => pattern.test(l));
      if (hit !== undefined) return hit;
      if (this.#done || Date.now() >= deadline) {
        throw new Error(
          `${this.argv[0]} ${
            this.#done
              ? `ended (${this.describeStatus()}) before printing ${pattern}`
              : `printed no ${pattern} in ${timeoutMs} ms`
          }` +
            ` (pid ${this.pid}); its output:\n${this.output()}`,
        );
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, Math.max(1, deadline - Date.now()));
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  /** Sends `signal` to the process (by PID) if it still runs. */
  signal(signal: Deno.Signal): void {
    if (this.#done) return;
    try {
      this.#child.kill(signal);
    } catch { /* already exited */ }
  }

  /** SIGKILL (by PID) if it still runs, then waits for it. */
  async kill(): Promise<Deno.CommandStatus> {
    this.signal("SIGKILL");
    return await this.exited;
  }

  /** SIGTERM, then SIGKILL when it has not exited after `timeoutMs`. */
  async stop(timeoutMs = 10_000): Promise<Deno.CommandStatus> {
    this.signal("SIGTERM");
    const timer = setTimeout(() => this.signal("SIGKILL"), timeoutMs);
    try {
      return await this.exited;
    } finally {
      clearTimeout(timer);
    }
  }

  async #pump(stream: ReadableStream<Uint8Array>): Promise<void> {
    let buf = "";
    const push = (line: string) => {
      this.#lines.push(line);
      this.#chars += line.length + 1;
      while (this.#chars > LOG_TAIL_CHARS && this.#lines.length > 1) {
        this.#chars -= this.#lines.shift()!.length + 1;
      }
      this.#wake();
    };
    try {
      for await (const text of stream.pipeThrough(new TextDecoderStream())) {
        buf += text;
        let nl: number;
        while ((nl = buf.indexOf("\n")) >= 0) {
          push(buf.slice(0, nl));
          buf = buf.slice(nl + 1);
        }
      }
    } catch { /* the stream ends with the process */ }
    if (buf) push(buf);
  }
}

/** How to start the daemon. */
export interface DaemonOptions {
  /** The namespace it runs in (the tap is created there). */
  netns: string;
  tap: string;
  socketPath: string;
  /** `--offload` (default: not passed, i.e. the daemon's default, auto). */
  offload?: "auto" | "off";
  /** `--log-level` (default info: the tests read "negotiated" and "disconnected" lines). */
  logLevel?: "error" | "warn" | "info" | "debug";
  /** More daemon options. */
  extraArgs?: string[];
  /** How long to wait for the socket to appear (default 30 s: the first run type-checks). */
  startTimeoutMs?: number;
}

/** The daemon, running as `deno run <start task flags> main.ts ...` in a namespace. */
export class VionetDaemon extends NetnsProcess {
  readonly socketPath: string;
  readonly tap: string;

  /** @internal use startDaemon(). */
  constructor(opts: DaemonOptions) {
    // As the start task: from the repository's root (its --allow-read=. means
    // that), with the environment it sets.
    super(
      opts.netns,
      [
        Deno.execPath(),
        "run",
        ...startTaskFlags(),
        MAIN_TS,
        "--socket-path",
        opts.socketPath,
        "--tap",
        opts.tap,
        "--log-level",
        opts.logLevel ?? "info",
        ...(opts.offload ? ["--offload", opts.offload] : []),
        ...(opts.extraArgs ?? []),
        // VIONET_TEST_DAEMON_ARGS: more options for every daemon of a run (any
        // rig), e.g. "--seccomp log" to find calls the allowlist lacks.
        ...(Deno.env.get("VIONET_TEST_DAEMON_ARGS")?.split(/\s+/).filter((a) => a) ?? []),
      ],
      ROOT,
      startTaskEnv(),
    );
    this.socketPath = opts.socketPath;
    this.tap = opts.tap;
  }

  /** The daemon's log (stderr) and stdout so far. */
  log(): string {
    return this.output();
  }

  /**
   * The data path's counters now: asks with SIGUSR2 and parses the
   * "datapath {...}" line it logs (null while the queues do not run).
   */
  async datapathCounters(): Promise<Record<string, unknown> | null> {
    const from = this.lines().length;
    this.signal("SIGUSR2");
    const line = await this.waitFor(/ datapath (\{.*\}|not running)$/, 5000, from);
    const json = / datapath (\{.*\})$/.exec(line)?.[1];
    return json === undefined ? null : JSON.parse(json);
  }

  /**
   * One queue's device counters now (`rx0`, `tx0`): asks with SIGUSR2 and
   * parses the "<name> {...}" line it logs.
   */
  async queueCounters(name: "rx0" | "tx0"): Promise<Record<string, number>> {
    const from = this.lines().length;
    this.signal("SIGUSR2");
    const line = await this.waitFor(new RegExp(` ${name} \\{.*\\}$`), 5000, from);
    return JSON.parse(line.slice(line.indexOf("{")));
  }

  /** The feature names of the last "negotiated ..." log line at or after line `from`. */
  negotiated(from = 0): string[] | undefined {
    const line = this.lines().slice(from).findLast((l) => / negotiated /.test(l));
    return line?.replace(/^.* negotiated /, "").split(/\s+/).filter((w) => w !== "");
  }
}

/**
 * Starts the daemon and waits until its vhost-user socket exists (so its tap
 * exists too: the tap is opened first). Rejects with the daemon's log when it
 * exits or does not listen within the timeout; it is killed in that case.
 */
export async function startDaemon(opts: DaemonOptions): Promise<VionetDaemon> {
  const daemon = new VionetDaemon(opts);
  const timeoutMs = opts.startTimeoutMs ?? 30_000;
  const deadline = Date.now() + timeoutMs;
  while (!isSocket(opts.socketPath)) {
    if (!daemon.running || Date.now() >= deadline) {
      await daemon.kill();
      throw new Error(
        `The daemon ${
          daemon.running ? `did not listen on ${opts.socketPath} within ${timeoutMs} ms` : "exited"
        }; its log:\n${daemon.log()}`,
      );
    }
    await sleep(50);
  }
  return daemon;
}

/** QEMU's -chardev, -netdev and -device arguments for a virtio-net-pci NIC on a vhost-user socket. */
export function vhostUserNetdevArgs(
  socketPath: string,
  opts: { mac?: string; nicProps?: readonly string[]; queues?: number; reconnect?: number } = {},
): string[] {
  const queues = opts.queues ?? 1;
  // vectors=0: QEMU 7.2 under TCG crashes when a vhost-user device's driver enables MSI-X.
  const props = [
    "netdev=n0",
    "vectors=0",
    "romfile=",
    `mac=${opts.mac ?? GUEST_MAC}`,
    ...(queues > 1 ? ["mq=on"] : []),
    ...(opts.nicProps ?? []),
  ];
  return [
    "-chardev",
    `socket,id=c0,path=${socketPath}${opts.reconnect ? `,reconnect=${opts.reconnect}` : ""}`,
    "-netdev",
    `vhost-user,id=n0,chardev=c0${queues > 1 ? `,queues=${queues}` : ""}`,
    "-device",
    `virtio-net-pci,${props.join(",")}`,
  ];
}

/** `virtio-net-pci` properties that switch off every checksum and TSO offload (QEMU 7.2 names). */
export const NIC_OFFLOADS_OFF: readonly string[] = [
  "csum=off",
  "guest_csum=off",
  "host_tso4=off",
  "host_tso6=off",
  "guest_tso4=off",
  "guest_tso6=off",
  "host_ecn=off",
  "guest_ecn=off",
  "host_ufo=off",
  "guest_ufo=off",
];

/** Parses `ethtool -k` output into feature name -> "on" | "off" (" [fixed]" dropped). */
export function parseEthtoolFeatures(text: string): Map<string, string> {
  const features = new Map<string, string>();
  for (const line of text.split("\n")) {
    const m = /^\s*([\w-]+):\s+(on|off)\b/.exec(line);
    if (m) features.set(m[1], m[2]);
  }
  return features;
}

/** A guest booted by the rig, with what it reported at boot. */
export interface RigGuest {
  guest: Guest;
  boot: BootInfo;
  /** Index of the daemon's first log line after this guest started (for negotiated()). */
  logFrom: number;
}

/** Options of {@link Rig.create}. */
export interface RigOptions {
  /** The daemon's --offload (default: the daemon's default). */
  offload?: "auto" | "off";
  /** The tap's name (default vionet-e2e). */
  tap?: string;
  logLevel?: DaemonOptions["logLevel"];
  /** More daemon options. */
  daemonArgs?: string[];
  /**
   * Create the tap persistent (`ip tuntap add`) before the daemon starts,
   * so that it attaches to it and the tap outlives the daemon (a restart).
   */
  persistentTap?: boolean;
}

/** Options of {@link Rig.bootGuest}. */
export interface GuestOptions {
  /** Extra virtio-net-pci properties, e.g. NIC_OFFLOADS_OFF or ["mrg_rxbuf=off"]. */
  nicProps?: readonly string[];
  mac?: string;
  memoryMiB?: number;
  cpus?: number;
  /** Queue pairs of the NIC (`queues=N` on the netdev, `mq=on`); default 1. */
  queues?: number;
  /** QEMU reconnects to the daemon's socket every this many seconds when it goes (`reconnect=`). */
  reconnect?: number;
  /** How long to wait for the guest's ready line (default 120 s). */
  bootTimeoutMs?: number;
}

/** Results of a sha256-checked transfer. */
export interface TransferResult {
  bytes: number;
  /** sha256 computed where the data was generated. */
  sentSha256: string;
  /** sha256 computed where it arrived. */
  receivedSha256: string;
  /** Bytes the receiver counted. */
  receivedBytes: number;
  /** Wall time of the network transfer alone, in ms. */
  ms: number;
}

/** A tap's byte and packet counters, as `ip -s link` shows them. */
export interface TapCounters {
  rxBytes: number;
  rxPackets: number;
  txBytes: number;
  txPackets: number;
}

/** Results of one iperf3 run. */
export interface IperfResult {
  /** Receiver's goodput in bit/s. */
  bitsPerSecond: number;
  bytes: number;
  seconds: number;
  /** TCP retransmits the sender counted. */
  retransmits: number;
}

/** One namespace, one daemon in it, and the guests and helpers attached to it. */
export class Rig {
  readonly netns: string;
  readonly tap: string;
  readonly tmpDir: string;
  readonly socketPath: string;
  /** The daemon (a new one after {@link restartDaemon}). */
  daemon: VionetDaemon;
  readonly #opts: RigOptions;
  #guests: Guest[] = [];
  #procs: NetnsProcess[] = [];
  /** `strace -c` attached to the daemon after its set-up (VIONET_TEST_STRACE), or null. */
  #strace: Deno.ChildProcess | null = null;
  #nextPort = 5201;
  #nextMac = 0;

  private constructor(
    netns: string,
    tap: string,
    tmpDir: string,
    daemon: VionetDaemon,
    opts: RigOptions,
  ) {
    this.#opts = opts;
    this.netns = netns;
    this.tap = tap;
    this.tmpDir = tmpDir;
    this.socketPath = daemon.socketPath;
    this.daemon = daemon;
  }

  /**
   * Creates a namespace `vionet-test-<random>`, starts the daemon in it, and
   * gives the tap {@link HOST_IP}/24. Everything is undone if a step fails.
   */
  static async create(opts: RigOptions = {}): Promise<Rig> {
    const netns = `vionet-test-${crypto.randomUUID().slice(0, 8)}`;
    const tap = opts.tap ?? "vionet-e2e";
    await sh(["ip", "netns", "add", netns]);
    let tmpDir: string | undefined;
    let daemon: VionetDaemon | undefined;
    try {
      await sh(["ip", "-n", netns, "link", "set", "lo", "up"]);
      tmpDir = await Deno.makeTempDir({ prefix: "vionet-e2e-" });
      // Like /run: others may pass through. The daemon creates run/ itself
      // and hands it to the user it becomes, which can then remove its socket.
      await Deno.chmod(tmpDir, 0o755);
      if (opts.persistentTap) {
        await sh(["ip", "-n", netns, "tuntap", "add", "dev", tap, "mode", "tap", "vnet_hdr"]);
      }
      daemon = await startDaemon({
        netns,
        tap,
        socketPath: `${tmpDir}/run/vionet.sock`,
        offload: opts.offload,
        logLevel: opts.logLevel,
        extraArgs: opts.daemonArgs,
      });
      await sh(["ip", "-n", netns, "addr", "add", `${HOST_IP}/24`, "dev", tap]);
      await sh(["ip", "-n", netns, "link", "set", tap, "up"]);
      const rig = new Rig(netns, tap, tmpDir, daemon, opts);
      rig.#strace = await attachStrace(daemon);
      return rig;
    } catch (e) {
      await daemon?.stop().catch(() => {});
      if (tmpDir) await Deno.remove(tmpDir, { recursive: true }).catch(() => {});
      await sh(["ip", "netns", "del", netns]).catch(() => {});
      throw e;
    }
  }

  /**
   * Boots a guest on the daemon's socket, eth0 at {@link GUEST_IP}/24, and
   * waits for its ready line. Rejects with the guest console and the daemon's
   * log when it does not boot; the guest is then killed.
   */
  async bootGuest(opts: GuestOptions = {}): Promise<RigGuest> {
    const logFrom = this.daemon.lines().length;
    const guest = await this.startGuest(opts);
    try {
      const boot = await guest.waitForBoot(opts.bootTimeoutMs ?? 120_000);
      return { guest, boot, logFrom };
    } catch (e) {
      guest.kill();
      await guest.closed;
      throw new Error(`${(e as Error).message}\n--- daemon log ---\n${this.daemon.log()}`);
    }
  }

  /**
   * Starts QEMU with a guest on the daemon's socket and returns at once (it
   * may not boot, e.g. when the daemon refuses it); close() kills it.
   */
  async startGuest(opts: GuestOptions = {}): Promise<Guest> {
    const assets = guestAssets();
    const mac = opts.mac ?? nthMac(this.#nextMac++);
    const guest = await bootGuest({
      kernel: assets.kernel,
      initrd: assets.initrd,
      netns: this.netns,
      memoryMiB: opts.memoryMiB ?? 512,
      cpus: opts.cpus,
      netdevArgs: vhostUserNetdevArgs(this.socketPath, {
        mac,
        nicProps: opts.nicProps,
        queues: opts.queues,
        reconnect: opts.reconnect,
      }),
      kernelArgs: netKernelArgs({ ip: `${GUEST_IP}/24`, gw: HOST_IP }),
    });
    this.#guests.push(guest);
    return guest;
  }

  /**
   * Ends the daemon (`SIGKILL`: a crash; `SIGTERM`: a graceful stop) and
   * starts it again with the same options. Resolves once the new one
   * listens; returns when the old one was gone (Date.now()).
   */
  async restartDaemon(signal: "SIGKILL" | "SIGTERM"): Promise<number> {
    if (signal === "SIGKILL") await this.daemon.kill();
    else await this.daemon.stop(10_000);
    const gone = Date.now();
    // A killed daemon leaves its socket file: wait for the new one's, not the stale one.
    await Deno.remove(this.socketPath).catch(() => {});
    this.daemon = await startDaemon({
      netns: this.netns,
      tap: this.tap,
      socketPath: this.socketPath,
      offload: this.#opts.offload,
      logLevel: this.#opts.logLevel,
      extraArgs: this.#opts.daemonArgs,
    });
    return gone;
  }

  /** A host -> guest paced stream (`paced_streams.ts`). */
  streamToGuest(guest: Guest, mib: number, mibPerSecond: number): Promise<PacedStream> {
    return streamToGuest((a) => this.spawn(a), guest, HOST_IP, this.port(), mib, mibPerSecond);
  }

  /** A guest -> host paced stream (`paced_streams.ts`). */
  streamFromGuest(guest: Guest, mib: number, mibPerSecond: number): Promise<PacedStream> {
    return streamFromGuest((a) => this.spawn(a), guest, HOST_IP, this.port(), mib, mibPerSecond);
  }

  /** Starts a helper process in the namespace; close() kills it if it still runs. */
  spawn(argv: string[]): NetnsProcess {
    const p = new NetnsProcess(this.netns, argv);
    this.#procs.push(p);
    return p;
  }

  /** Runs a command in the namespace and returns its stdout; throws with its stderr on failure. */
  async exec(argv: string[]): Promise<string> {
    return await sh(["ip", "netns", "exec", this.netns, ...argv]);
  }

  /** `ethtool -k` of the tap, parsed. */
  async tapFeatures(): Promise<Map<string, string>> {
    return parseEthtoolFeatures(await this.exec(["ethtool", "-k", this.tap]));
  }

  /**
   * The tap's counters. rx: frames the daemon wrote (guest -> host); tx: frames
   * the kernel gave it (host -> guest). A GSO frame counts as one packet, so
   * bytes per packet above the MTU show offloaded frames.
   */
  async tapCounters(): Promise<TapCounters> {
    const json = JSON.parse(
      await sh(["ip", "-n", this.netns, "-j", "-s", "link", "show", "dev", this.tap]),
    );
    const stats = json[0]?.stats64 ?? json[0]?.stats;
    if (!stats) throw new Error(`ip -s link show ${this.tap} printed no statistics`);
    return {
      rxBytes: stats.rx.bytes,
      rxPackets: stats.rx.packets,
      txBytes: stats.tx.bytes,
      txPackets: stats.tx.packets,
    };
  }

  /** A fresh TCP port for a helper server. */
  port(): number {
    return this.#nextPort++;
  }

  /**
   * Runs iperf3 in the guest against a server in the namespace; `reverse`
   * (iperf3 -R) measures host -> guest.
   */
  async iperf3(
    guest: Guest,
    opts: { reverse: boolean; seconds?: number; parallel?: number },
  ): Promise<IperfResult> {
    const seconds = opts.seconds ?? 3;
    const port = this.port();
    const server = this.spawn([
      "iperf3",
      "-s",
      "-1",
      "--forceflush",
      "-B",
      HOST_IP,
      "-p",
      String(port),
    ]);
    try {
      await server.waitFor(/Server listening/, 10_000);
      const r = await guest.run(
        `iperf3 -c ${HOST_IP} -p ${port} -t ${seconds} -i 0 -J ${opts.reverse ? "-R" : ""}` +
          (opts.parallel ? ` -P ${opts.parallel}` : ""),
        seconds * 1000 + 30_000,
      );
      let report;
      try {
        report = JSON.parse(r.output);
      } catch {
        throw new Error(`iperf3 in the guest exited ${r.status}: ${r.output.slice(0, 2000)}`);
      }
      if (r.status !== 0 || report.error) {
        throw new Error(`iperf3 in the guest failed (${r.status}): ${report.error ?? r.output}`);
      }
      const received = report.end.sum_received;
      return {
        bitsPerSecond: received.bits_per_second,
        bytes: received.bytes,
        seconds: received.seconds,
        retransmits: report.end.sum_sent.retransmits ?? 0,
      };
    } finally {
      await server.kill();
    }
  }

  /**
   * Runs a transfer; if it fails, asks the daemon for its counters (SIGUSR2)
   * and adds them and the rest of its log to the error: a stall then says
   * which queue stopped moving.
   */
  async #diagnosed<T>(what: string, fn: () => Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (e) {
      const from = this.daemon.lines().length;
      this.daemon.signal("SIGUSR2");
      await new Promise((r) => setTimeout(r, 1000));
      const tail = this.daemon.lines().slice(Math.max(0, from - 20)).join("\n");
      throw new Error(
        `${what}: ${(e as Error).message}\n--- daemon log, counters at the end ---\n${tail}`,
      );
    }
  }

  /**
   * Guest -> host: the guest fills a tmpfs file with `mib` MiB from
   * /dev/urandom, hashes it and sends it with nc to a receiver in the
   * namespace, which hashes what arrives. (Files, not pipes: busybox's small
   * pipe reads cost more than the network under TCG.) The guest needs RAM
   * for the file.
   */
  sendFromGuest(guest: Guest, mib: number, timeoutMs = 240_000): Promise<TransferResult> {
    return this.#diagnosed(
      `guest -> host ${mib} MiB`,
      () => this.#sendFromGuest(guest, mib, timeoutMs),
    );
  }

  sendToGuest(guest: Guest, mib: number, timeoutMs = 240_000): Promise<TransferResult> {
    return this.#diagnosed(
      `host -> guest ${mib} MiB`,
      () => this.#sendToGuest(guest, mib, timeoutMs),
    );
  }

  async #sendFromGuest(guest: Guest, mib: number, timeoutMs: number): Promise<TransferResult> {
    const port = this.port();
    const receiver = this.spawn([Deno.execPath(), "eval", receiverScript(HOST_IP, port)]);
    try {
      await receiver.waitFor(/^listening$/, 30_000);
      const prep = await guest.run(
        `dd if=/dev/urandom of=/tmp/tx.blob bs=1M count=${mib} 2>/dev/null && ` +
          "sha256sum /tmp/tx.blob",
        timeoutMs,
      );
      if (prep.status !== 0) {
        throw new Error(`the guest could not make its data (${prep.status}): ${prep.output}`);
      }
      const started = Date.now();
      const r = await guest.run(
        `nc ${HOST_IP} ${port} </tmp/tx.blob; s=$?; rm /tmp/tx.blob; exit $s`,
        timeoutMs,
      );
      if (r.status !== 0) throw new Error(`the guest's nc exited ${r.status}: ${r.output}`);
      const line = await receiver.waitFor(/^\{/, 30_000);
      const ms = Date.now() - started;
      const got = JSON.parse(line) as { bytes: number; sha256: string };
      return {
        bytes: mib * 1024 * 1024,
        sentSha256: prep.output.trim().split(/\s+/)[0],
        receivedSha256: got.sha256,
        receivedBytes: got.bytes,
        ms,
      };
    } finally {
      await receiver.kill();
    }
  }

  /**
   * Host -> guest: a sender in the namespace generates `mib` MiB of random
   * bytes and hashes them; the guest receives them into a tmpfs file with nc
   * and hashes the file.
   */
  async #sendToGuest(guest: Guest, mib: number, timeoutMs: number): Promise<TransferResult> {
    const port = this.port();
    const bytes = mib * 1024 * 1024;
    const sender = this.spawn([Deno.execPath(), "eval", senderScript(HOST_IP, port, bytes)]);
    try {
      await sender.waitFor(/^listening$/, 30_000);
      const started = Date.now();
      const r = await guest.run(`nc ${HOST_IP} ${port} >/tmp/rx.blob`, timeoutMs);
      const ms = Date.now() - started;
      if (r.status !== 0) throw new Error(`the guest's nc exited ${r.status}: ${r.output}`);
      const sum = await guest.run(
        "stat -c %s /tmp/rx.blob; sha256sum /tmp/rx.blob; s=$?; rm /tmp/rx.blob; exit $s",
        timeoutMs,
      );
      if (sum.status !== 0) throw new Error(`the guest could not hash its data: ${sum.output}`);
      const [count, receivedSha256] = sum.output.trim().split(/\s+/);
      const line = await sender.waitFor(/^\{/, 30_000);
      const sent = JSON.parse(line) as { bytes: number; sha256: string };
      return {
        bytes: sent.bytes,
        sentSha256: sent.sha256,
        receivedSha256,
        receivedBytes: Number(count),
        ms,
      };
    } finally {
      await sender.kill();
    }
  }

  /**
   * Runs `fn` on a new rig and always closes it; then fails if the daemon
   * did not exit cleanly (status 0 on SIGTERM), with its log. `fn`'s own
   * failure comes first.
   */
  static async run(opts: RigOptions, fn: (rig: Rig) => Promise<void>): Promise<void> {
    const rig = await Rig.create(opts);
    let status: Deno.CommandStatus;
    try {
      await fn(rig);
    } finally {
      status = await rig.close();
    }
    if (status.code !== 0) {
      throw new Error(`the daemon did not stop cleanly (${status.code}):\n${rig.daemon.log()}`);
    }
  }

  /**
   * Undoes everything: kills the guests and helpers (SIGKILL, by PID), stops
   * the daemon (SIGTERM, then SIGKILL), deletes the namespace and the
   * temporary directory. Returns the daemon's exit status.
   */
  async close(): Promise<Deno.CommandStatus> {
    for (const g of this.#guests) g.kill();
    await Promise.allSettled(this.#guests.map((g) => g.closed));
    await Promise.allSettled(this.#procs.map((p) => p.kill()));
    const status = await this.daemon.stop(10_000);
    await this.#strace?.status;
    await sh(["ip", "netns", "del", this.netns]).catch(() => {});
    await Deno.remove(this.tmpDir, { recursive: true }).catch(() => {});
    return status;
  }
}

/**
 * Measuring what the daemon asks of the kernel once it serves: with
 * `VIONET_TEST_STRACE=DIR` in the environment, `strace -f -c` is attached to
 * each daemon the rig starts once its set-up is over (its sandbox line), and
 * writes the count of every system call it makes from then on, on any thread
 * (threads started later included), to `DIR/daemon-<pid>.txt`.
 * `scripts/syscalls.ts` merges these files and compares them with the
 * seccomp allowlist. With `VIONET_TEST_STRACE_CALLS=ioctl,socket,...` it
 * writes those calls with their arguments instead (`-e trace=`), to see
 * which requests, families and flags the argument rules must let through.
 * Off (null) without the variable.
 */
async function attachStrace(daemon: VionetDaemon): Promise<Deno.ChildProcess | null> {
  const dir = Deno.env.get("VIONET_TEST_STRACE");
  if (!dir) return null;
  await daemon.waitFor(/sandbox|dropped \d+ capabilities/, 30_000);
  await Deno.mkdir(dir, { recursive: true });
  const calls = Deno.env.get("VIONET_TEST_STRACE_CALLS");
  const what = calls ? ["-yy", "-e", `trace=${calls}`] : ["-c"];
  const strace = new Deno.Command("strace", {
    args: ["-f", ...what, "-o", `${dir}/daemon-${daemon.pid}.txt`, "-p", String(daemon.pid)],
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  await sleep(1000); // strace attaches to every thread before it counts
  return strace;
}

/** A TCP receiver for `deno eval`: prints "listening", then {"bytes","sha256"} of one connection. */
function receiverScript(host: string, port: number): string {
  return `
import { createHash } from "node:crypto";
const listener = Deno.listen({ hostname: "${host}", port: ${port} });
console.log("listening");
const conn = await listener.accept();
listener.close();
const hash = createHash("sha256");
let bytes = 0;
for await (const chunk of conn.readable) { hash.update(chunk); bytes += chunk.length; }
console.log(JSON.stringify({ bytes, sha256: hash.digest("hex") }));
`;
}

/**
 * A TCP sender for \`deno eval\`: prints "listening", sends \`bytes\` random bytes
 * to the first connection, closes it, then prints {"bytes","sha256"} of what it sent.
 */
function senderScript(host: string, port: number, bytes: number): string {
  return `
import { createHash } from "node:crypto";
const listener = Deno.listen({ hostname: "${host}", port: ${port} });
console.log("listening");
const conn = await listener.accept();
listener.close();
const hash = createHash("sha256");
const chunk = new Uint8Array(256 * 1024);
let left = ${bytes};
while (left > 0) {
  const n = Math.min(left, chunk.length);
  for (let i = 0; i < n; i += 65536) crypto.getRandomValues(chunk.subarray(i, Math.min(n, i + 65536)));
  const piece = chunk.subarray(0, n);
  hash.update(piece);
  let off = 0;
  while (off < n) off += await conn.write(piece.subarray(off));
  left -= n;
}
conn.close();
console.log(JSON.stringify({ bytes: ${bytes}, sha256: hash.digest("hex") }));
`;
}

function nthMac(n: number): string {
  const last = (0x56 + n) & 0xff;
  return `${GUEST_MAC.slice(0, -2)}${last.toString(16).padStart(2, "0")}`;
}

function isSocket(path: string): boolean {
  try {
    return Deno.statSync(path).isSocket === true;
  } catch {
    return false;
  }
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function onPath(tool: string): boolean {
  const dirs = (Deno.env.get("PATH") ?? "").split(":").concat(["/usr/sbin", "/sbin"]);
  return dirs.some((d) => {
    try {
      return Deno.statSync(`${d}/${tool}`).isFile;
    } catch {
      return false;
    }
  });
}
