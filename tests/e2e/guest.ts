/**
 * QEMU harness for the end-to-end tests: boots the test guest built by
 * scripts/build_guest.sh and runs shell commands in it.
 *
 * Theory of operation. QEMU gets two serial ports. ttyS0 is the console
 * (kernel and /init messages), piped to us and kept as a tail for error
 * messages. ttyS1 is a raw control channel: QEMU connects it to a unix socket
 * we listen on, and the guest's /init (scripts/guest_init.sh) speaks a line
 * protocol on it — `__VIONET_READY__ <net-status>` once after boot, then for
 * each `__VIONET_RUN__ <id> <seconds> <base64 script>` it answers
 * `__VIONET_OUT__ <id>`, the base64 of the output, `__VIONET_DONE__ <id> <status>`;
 * to a line that is not a command (one that arrived garbled) `__VIONET_BAD__
 * <length>`, which fails the pending command at once.
 * A unix socket is reachable from any network namespace, so the guest may run
 * inside one (`ip netns exec`) while the test process stays outside.
 *
 * Guest memory is a shared memfd (`memory-backend-memfd,share=on`), as
 * vhost-user backends must map it. Accelerator: KVM only when kvm_intel or
 * kvm_amd is loaded (a PVM-backed /dev/kvm cannot boot a stock kernel), TCG
 * otherwise. Every virtio-net-pci device should carry `vectors=0`: QEMU 7.2
 * under TCG crashes when a vhost-user device's driver enables MSI-X.
 *
 * @module
 */

import { cpuSeconds } from "../../bench/proc.ts";

const MARK_READY = "__VIONET_READY__";
const MARK_OUT = "__VIONET_OUT__";
const MARK_DONE = "__VIONET_DONE__";
const MARK_BAD = "__VIONET_BAD__";
const CONSOLE_TAIL_CHARS = 16_384;
/** How long an exited QEMU's console pipes may take to reach their end (ms). */
const CONSOLE_DRAIN_MS = 2000;

/** Paths of the guest kernel and initramfs. */
export interface GuestAssets {
  kernel: string;
  initrd: string;
  dir: string;
}

/** The directory build_guest.sh writes to: $VIONET_GUEST_DIR, else <repo>/.cache/guest. */
export function guestAssetsDir(): string {
  const fromEnv = Deno.env.get("VIONET_GUEST_DIR");
  if (fromEnv) return fromEnv;
  return new URL("../../.cache/guest", import.meta.url).pathname;
}

/**
 * The built guest's paths.
 * @throws {Error} when the kernel or initramfs is missing, saying how to build them.
 */
export function guestAssets(): GuestAssets {
  const dir = guestAssetsDir();
  const kernel = `${dir}/vmlinuz`;
  const initrd = `${dir}/initramfs.gz`;
  for (const path of [kernel, initrd]) {
    if (!isFile(path)) {
      throw new Error(
        `Cannot find the test guest: ${path} is missing; run scripts/build_guest.sh ${dir}`,
      );
    }
  }
  return { kernel, initrd, dir };
}

/** Why the guest assets are unusable, or undefined when they are there. */
export function guestAssetsMissing(): string | undefined {
  try {
    guestAssets();
    return undefined;
  } catch (e) {
    return (e as Error).message;
  }
}

/**
 * Whether QEMU may use KVM: /dev/kvm exists and a hardware module (kvm_intel or
 * kvm_amd) is loaded. PVM-backed KVM (kvm_pvm alone) does not boot a stock kernel.
 */
export function kvmUsable(): boolean {
  const hardware = isDir("/sys/module/kvm_intel") || isDir("/sys/module/kvm_amd");
  return hardware && exists("/dev/kvm");
}

/** QEMU's -machine and -cpu arguments for this host. */
export function accelArgs(kvm = kvmUsable()): string[] {
  return kvm
    ? ["-machine", "q35,accel=kvm", "-cpu", "host"]
    : ["-machine", "q35,accel=tcg", "-cpu", "max"];
}

/** Kernel command line words that configure the guest's eth0 (see scripts/guest_init.sh). */
export function netKernelArgs(
  opts: { ip?: string; gw?: string; ethtool?: string },
): string[] {
  const args: string[] = [];
  if (opts.ip) args.push(`vionet.ip=${noSpace("ip", opts.ip)}`);
  if (opts.gw) args.push(`vionet.gw=${noSpace("gw", opts.gw)}`);
  if (opts.ethtool) {
    if (opts.ethtool.includes('"')) {
      throw new TypeError(`Cannot pass ethtool arguments with a double quote: ${opts.ethtool}`);
    }
    args.push(`vionet.ethtool="${opts.ethtool}"`);
  }
  return args;
}

/** What bootGuest needs. */
export interface BootOptions {
  kernel: string;
  initrd: string;
  /** QEMU -netdev and -device arguments, e.g. ["-netdev", "tap,...", "-device", "virtio-net-pci,...,vectors=0"]. */
  netdevArgs: string[];
  /** Guest RAM, shared memfd (default 512). */
  memoryMiB?: number;
  /** Run QEMU inside this network namespace (`ip netns exec`). */
  netns?: string;
  /** Extra kernel command line words, e.g. from netKernelArgs(). */
  kernelArgs?: string[];
  /** vCPUs (default 1). */
  cpus?: number;
  /** Force KVM on or off (default: kvmUsable()). */
  kvm?: boolean;
  /** QEMU binary (default qemu-system-x86_64). */
  qemu?: string;
  /** More QEMU arguments, appended last. */
  extraArgs?: string[];
  /**
   * Start as a live migration's destination (`-incoming <uri>`): the guest
   * has booted elsewhere, so it is ready once QEMU connects the control
   * channel (the guest's /init keeps serving it after the switch-over).
   */
  incoming?: string;
}

/** The result of one command run in the guest. */
export interface RunResult {
  /** Exit status of the script; 137 when the guest-side timeout killed it. */
  status: number;
  /** stdout and stderr, interleaved, exactly as written. */
  output: string;
}

/** What the guest reported once booted. */
export interface BootInfo {
  /** "ok"; "no-carrier" when eth0 is configured but has no link after 10 s; "failed" when /init could not load a module or configure eth0. */
  netStatus: string;
  /** Milliseconds from starting QEMU to the guest's ready line. */
  bootMs: number;
}

interface Pending {
  id: number;
  resolve: (r: RunResult) => void;
  reject: (e: Error) => void;
  collecting: boolean;
  chunks: string[];
}

/**
 * The process that runs a guest's QEMU, as a {@link Guest} uses it: a
 * `Deno.ChildProcess` for a QEMU the test started, or a stand-in for one a
 * VMM manager started (tests/e2e/libvirt.ts). `stdout` and `stderr` are
 * kept as the guest's console.
 */
export interface GuestProcess {
  readonly pid: number;
  readonly status: Promise<Deno.CommandStatus>;
  readonly stdout: ReadableStream<Uint8Array>;
  readonly stderr: ReadableStream<Uint8Array>;
  kill(signal?: Deno.Signal): void;
}

/** The unix socket a guest's control serial port (ttyS1) connects to, and the directory it is in. */
export interface ControlChannel {
  path: string;
  listener: Deno.Listener;
  tmpDir: string;
}

/**
 * Listens for a guest's control channel in a fresh temporary directory.
 * `anyUser`: directory 0755 and socket 0777, for a QEMU that runs as
 * another user (libvirt's); else as mkdtemp makes them (root only).
 */
export async function openControlChannel(anyUser = false): Promise<ControlChannel> {
  const tmpDir = await Deno.makeTempDir({ prefix: "vionet-guest-" });
  const path = `${tmpDir}/control.sock`;
  const listener = Deno.listen({ transport: "unix", path });
  if (anyUser) {
    await Deno.chmod(tmpDir, 0o755);
    await Deno.chmod(path, 0o777);
  }
  return { path, listener, tmpDir };
}

/** A Guest for a QEMU someone else started, its ttyS1 on `control`. */
export function attachGuest(process: GuestProcess, control: ControlChannel): Guest {
  return new Guest(process, control.listener, control.tmpDir, Date.now());
}

/** A running guest. Call shutdown() or kill() when done; both clean up everything. */
export class Guest {
  /** PID of the QEMU process (of `ip netns exec`, which execs QEMU). */
  readonly pid: number;
  /** Resolves when QEMU has exited and every resource of this guest is released. */
  readonly closed: Promise<Deno.CommandStatus>;

  #child: GuestProcess;
  #listener!: Deno.Listener;
  #conn: Deno.Conn | undefined;
  #tmpDir!: string;
  #started: number;
  #console = "";
  #exitStatus: Deno.CommandStatus | undefined;
  #ready: Promise<BootInfo>;
  #resolveReady!: (b: BootInfo) => void;
  #rejectReady!: (e: Error) => void;
  #pending: Pending | undefined;
  #queue: Promise<unknown> = Promise.resolve();
  #nextId = 1;
  #encoder = new TextEncoder();

  /** Ready once the control channel connects (a migration's destination): see BootOptions.incoming. */
  readonly #incoming: boolean;

  /** @internal use bootGuest(). */
  constructor(
    child: GuestProcess,
    listener: Deno.Listener,
    tmpDir: string,
    started: number,
    incoming = false,
  ) {
    this.#incoming = incoming;
    this.#child = child;
    this.pid = child.pid;
    this.#listener = listener;
    this.#tmpDir = tmpDir;
    this.#started = started;
    this.#ready = new Promise((resolve, reject) => {
      this.#resolveReady = resolve;
      this.#rejectReady = reject;
    });
    this.#ready.catch(() => {}); // observed through waitForBoot()
    const consoleDone = Promise.all([
      this.#pumpConsole(child.stdout),
      this.#pumpConsole(child.stderr),
    ]);
    const controlDone = this.#serveControl();
    this.closed = (async () => {
      const status = await child.status;
      this.#exitStatus = status;
      // What QEMU wrote last (its error) may still be in the pipes: read them
      // to the end first (bounded: nothing else should hold them open).
      let timer: ReturnType<typeof setTimeout> | undefined;
      await Promise.race([
        consoleDone,
        new Promise((r) => timer = setTimeout(r, CONSOLE_DRAIN_MS)),
      ]);
      clearTimeout(timer);
      const why = new Error(
        `QEMU exited (code ${status.code}${status.signal ? `, ${status.signal}` : ""})` +
          this.#consoleTail(),
      );
      this.#rejectReady(why);
      this.#pending?.reject(why);
      this.#pending = undefined;
      try {
        this.#listener.close();
      } catch { /* already closed */ }
      try {
        this.#conn?.close();
      } catch { /* already closed */ }
      await Promise.allSettled([consoleDone, controlDone]);
      await Deno.remove(this.#tmpDir, { recursive: true }).catch(() => {});
      return status;
    })();
  }

  /** Everything QEMU printed on the console so far (the last 16 KiB). */
  console(): string {
    return this.#console;
  }

  /** Waits for the guest's /init to report ready on the control channel. */
  async waitForBoot(timeoutMs = 60_000): Promise<BootInfo> {
    return await withTimeout(
      this.#ready,
      timeoutMs,
      () => `Guest did not boot within ${timeoutMs} ms${this.#consoleTail()}`,
    );
  }

  /**
   * Runs a sh script in the guest and returns its status and output. Commands run
   * one at a time, in call order. The guest kills the script after
   * ceil(timeoutMs / 1000) s (status 137); the promise rejects only when the
   * guest does not answer at all within timeoutMs plus a margin.
   */
  run(cmd: string, timeoutMs = 60_000): Promise<RunResult> {
    const result = this.#queue.then(() => this.#runNow(cmd, timeoutMs));
    this.#queue = result.catch(() => {});
    return result;
  }

  /** Asks the guest to power off, waits for QEMU to exit, kills it if it does not. */
  async shutdown(timeoutMs = 10_000): Promise<Deno.CommandStatus> {
    if (this.#exitStatus === undefined && this.#conn) {
      await this.#conn.write(this.#encoder.encode("__VIONET_POWEROFF__\n")).catch(() => {});
    }
    if (this.#exitStatus === undefined && this.#conn === undefined) this.kill();
    const timer = setTimeout(() => this.kill(), timeoutMs);
    try {
      return await this.closed;
    } finally {
      clearTimeout(timer);
    }
  }

  /** Kills QEMU (SIGKILL, by PID) if it still runs. Resources are released via `closed`. */
  kill(): void {
    if (this.#exitStatus !== undefined) return;
    try {
      this.#child.kill("SIGKILL");
    } catch { /* already gone */ }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.shutdown();
  }

  async #runNow(cmd: string, timeoutMs: number): Promise<RunResult> {
    await this.waitForBoot(timeoutMs);
    if (this.#exitStatus !== undefined || !this.#conn) {
      throw new Error(`Cannot run a command: the guest is not running${this.#consoleTail()}`);
    }
    const id = this.#nextId++;
    const seconds = Math.max(1, Math.ceil(timeoutMs / 1000));
    const script = bytesToBase64(this.#encoder.encode(cmd));
    const answer = new Promise<RunResult>((resolve, reject) => {
      this.#pending = { id, resolve, reject, collecting: false, chunks: [] };
    });
    await this.#conn.write(this.#encoder.encode(`__VIONET_RUN__ ${id} ${seconds} ${script}\n`));
    const sent = { at: performance.now(), cpu: this.#cpuSeconds() };
    try {
      return await withTimeout(
        answer,
        timeoutMs + 15_000,
        () =>
          `Guest did not answer command ${id} (${cmd}) in time; ${this.#cpuSince(sent)}` +
          this.#consoleTail(),
      );
    } finally {
      if (this.#pending?.id === id) this.#pending = undefined;
    }
  }

  async #serveControl(): Promise<void> {
    let conn: Deno.Conn;
    try {
      conn = await this.#listener.accept();
    } catch {
      return; // listener closed because QEMU exited first
    }
    this.#conn = conn;
    try {
      this.#listener.close();
    } catch { /* closed */ }
    if (this.#incoming) {
      this.#resolveReady({ netStatus: "incoming", bootMs: Date.now() - this.#started });
    }
    let buffered = "";
    const decoder = new TextDecoder();
    try {
      for await (const chunk of conn.readable) {
        buffered += decoder.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = buffered.indexOf("\n")) >= 0) {
          this.#onLine(buffered.slice(0, nl).replace(/\r$/, ""));
          buffered = buffered.slice(nl + 1);
        }
      }
    } catch { /* connection closed at exit */ }
  }

  #onLine(line: string): void {
    const words = line.split(" ");
    const p = this.#pending;
    if (words[0] === MARK_READY) {
      this.#resolveReady({ netStatus: words[1] ?? "", bootMs: Date.now() - this.#started });
    } else if (words[0] === MARK_OUT) {
      if (p && Number(words[1]) === p.id) p.collecting = true;
    } else if (words[0] === MARK_DONE) {
      if (p && Number(words[1]) === p.id) {
        this.#pending = undefined;
        const output = new TextDecoder().decode(base64ToBytes(p.chunks.join("")));
        p.resolve({ status: Number(words[2]), output });
      }
    } else if (words[0] === MARK_BAD) {
      // The agent read a line that is not a command: the pending one arrived
      // garbled and will never be answered; say so now instead of timing out.
      if (p) {
        this.#pending = undefined;
        p.reject(
          new Error(
            `the guest's agent got a garbled line (${words[1]} characters) ` +
              `instead of command ${p.id}${this.#consoleTail()}`,
          ),
        );
      }
    } else if (p?.collecting) {
      p.chunks.push(line.trim());
    }
  }

  async #pumpConsole(stream: ReadableStream<Uint8Array>): Promise<void> {
    const decoder = new TextDecoder();
    for await (const chunk of stream) {
      this.#console += decoder.decode(chunk, { stream: true });
      if (this.#console.length > 2 * CONSOLE_TAIL_CHARS) {
        this.#console = this.#console.slice(-CONSOLE_TAIL_CHARS);
      }
    }
  }

  /** QEMU's CPU time so far (utime+stime, seconds), or NaN if it cannot be read. */
  #cpuSeconds(): number {
    try {
      return cpuSeconds(this.pid);
    } catch {
      return NaN;
    }
  }

  /**
   * How busy QEMU was since `from`: a guest that hangs spinning keeps its
   * vCPU near 100 %, one that waits for an interrupt that never came sits
   * near 0 %. Tells the two apart after a command times out.
   */
  #cpuSince(from: { at: number; cpu: number }): string {
    const seconds = (performance.now() - from.at) / 1000;
    const cpu = this.#cpuSeconds() - from.cpu;
    if (!Number.isFinite(cpu)) return "QEMU's CPU time is unreadable (it exited?)";
    return `QEMU used ${cpu.toFixed(1)} s of CPU in the ${
      seconds.toFixed(0)
    } s since the command ` +
      `was sent (${(100 * cpu / seconds).toFixed(0)} % of a core)`;
  }

  #consoleTail(): string {
    const tail = this.#console.slice(-4096).trimEnd();
    return tail ? `\n--- guest console (tail) ---\n${tail}` : " (no console output)";
  }
}

/** The guest kernel's command line: console on ttyS0, no reboot on panic, then `extra`. */
export function guestKernelCommandLine(extra: readonly string[] = []): string {
  return ["console=ttyS0", "panic=-1", "loglevel=4", "edd=off", ...extra].join(" ");
}

/**
 * Starts QEMU with the test guest. Returns at once; call waitForBoot() next.
 * The guest's console is ttyS0, its control channel ttyS1 (see Guest).
 */
export async function bootGuest(opts: BootOptions): Promise<Guest> {
  const memoryMiB = opts.memoryMiB ?? 512;
  const control = await openControlChannel();
  const { tmpDir, listener, path: socketPath } = control;
  const append = guestKernelCommandLine(opts.kernelArgs);
  const qemuArgs = [
    "-nodefaults",
    "-nographic",
    "-no-reboot",
    ...accelArgs(opts.kvm),
    "-smp",
    String(opts.cpus ?? 1),
    "-m",
    `${memoryMiB}M`,
    "-object",
    `memory-backend-memfd,id=mem,size=${memoryMiB}M,share=on`,
    "-numa",
    "node,memdev=mem",
    "-kernel",
    opts.kernel,
    "-initrd",
    opts.initrd,
    "-append",
    append,
    "-chardev",
    "stdio,id=con,signal=off",
    "-serial",
    "chardev:con",
    "-chardev",
    `socket,id=ctl,path=${socketPath},server=off`,
    "-serial",
    "chardev:ctl",
    ...opts.netdevArgs,
    ...(opts.incoming ? ["-incoming", opts.incoming] : []),
    ...(opts.extraArgs ?? []),
  ];
  const qemu = opts.qemu ?? "qemu-system-x86_64";
  const [cmd, args] = opts.netns
    ? ["ip", ["netns", "exec", opts.netns, qemu, ...qemuArgs]]
    : [qemu, qemuArgs];
  let child: Deno.ChildProcess;
  try {
    child = new Deno.Command(cmd, { args, stdin: "null", stdout: "piped", stderr: "piped" })
      .spawn();
  } catch (e) {
    listener.close();
    await Deno.remove(tmpDir, { recursive: true }).catch(() => {});
    throw new Error(`Cannot start ${qemu}: ${(e as Error).message}`);
  }
  return new Guest(child, listener, tmpDir, Date.now(), opts.incoming !== undefined);
}

function withTimeout<T>(p: Promise<T>, ms: number, why: () => string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(why())), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

function noSpace(name: string, value: string): string {
  if (/\s|"/.test(value)) {
    throw new TypeError(`Cannot pass ${name} "${value}": it has a space or quote`);
  }
  return value;
}

function bytesToBase64(bytes: Uint8Array): string {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) {
    s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  }
  return btoa(s);
}

function base64ToBytes(b64: string): Uint8Array {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes;
}

function isFile(path: string): boolean {
  try {
    return Deno.statSync(path).isFile;
  } catch {
    return false;
  }
}

function isDir(path: string): boolean {
  try {
    return Deno.statSync(path).isDirectory;
  } catch {
    return false;
  }
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}
