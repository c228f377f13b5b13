/**
 * Process and namespace plumbing for the benchmark: a throw-away network
 * namespace, pinned child processes started inside it, their CPU time from
 * /proc, and an interface's packet counters.
 *
 * Every process the bench starts is tracked by PID and killed by PID when its
 * namespace goes; nothing is matched by name. On SIGINT or SIGTERM the bench
 * kills every process inside the namespaces it created (`ip netns pids`: the
 * guests, daemons and drivers it started there) and deletes them before it
 * exits, so an interrupted run leaves nothing behind.
 *
 * @module
 */

const decoder = new TextDecoder();

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Runs a command to completion; throws with its stderr when it fails. */
export async function sh(cmd: string[]): Promise<string> {
  const out = await new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  if (out.code !== 0) {
    throw new Error(
      `${cmd.join(" ")} exited with ${out.code}: ${decoder.decode(out.stderr).trim()}`,
    );
  }
  return decoder.decode(out.stdout);
}

/** A child process whose stdout and stderr are collected as text. */
export class Child {
  readonly pid: number;
  readonly argv: readonly string[];
  readonly exited: Promise<Deno.CommandStatus>;
  #child: Deno.ChildProcess;
  #out = "";
  #waiters: Array<() => void> = [];
  #writer: WritableStreamDefaultWriter<Uint8Array> | undefined;
  #done = false;

  constructor(argv: string[], opts: { stdin?: boolean; cwd?: string } = {}) {
    this.argv = argv;
    const child = new Deno.Command(argv[0], {
      args: argv.slice(1),
      cwd: opts.cwd,
      stdin: opts.stdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    this.pid = child.pid;
    if (opts.stdin) this.#writer = child.stdin.getWriter();
    const pumps = [this.#pump(child.stdout), this.#pump(child.stderr)];
    this.exited = (async () => {
      const status = await child.status;
      await Promise.all(pumps);
      this.#done = true;
      this.#wake();
      return status;
    })();
  }

  async #pump(stream: ReadableStream<Uint8Array>): Promise<void> {
    const d = new TextDecoder();
    for await (const chunk of stream) {
      this.#out += d.decode(chunk, { stream: true });
      if (this.#out.length > 4_000_000) this.#out = this.#out.slice(-1_000_000);
      this.#wake();
    }
  }

  #wake(): void {
    const w = this.#waiters;
    this.#waiters = [];
    for (const f of w) f();
  }

  /** Everything printed so far (stdout and stderr interleaved). */
  get output(): string {
    return this.#out;
  }

  /** The last `n` characters of the output, for error messages. */
  tail(n = 3000): string {
    return this.#out.slice(-n);
  }

  /** Whether the process has exited. */
  get done(): boolean {
    return this.#done;
  }

  /**
   * Waits until `test(output from position `from`)` holds; returns the output
   * position just past the match. Throws on timeout or exit.
   */
  async waitFor(re: RegExp, from: number, timeoutMs: number, what: string): Promise<number> {
    const deadline = Date.now() + timeoutMs;
    while (true) {
      const rest = this.#out.slice(from);
      const m = re.exec(rest);
      if (m) return from + m.index + m[0].length;
      if (this.#done) {
        throw new Error(`${this.argv.join(" ")} exited while waiting for ${what}:\n${this.tail()}`);
      }
      const left = deadline - Date.now();
      if (left <= 0) {
        throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}:\n${this.tail()}`);
      }
      await Promise.race([
        new Promise<void>((r) => this.#waiters.push(r)),
        sleep(Math.min(left, 200)),
      ]);
    }
  }

  /** Writes a line to the child's stdin. */
  async send(line: string): Promise<void> {
    if (!this.#writer) throw new Error("stdin was not piped");
    await this.#writer.write(new TextEncoder().encode(line + "\n"));
  }

  /** Sends `signal`, waits up to `ms`, then SIGKILL. Safe to call twice. */
  async stop(signal: Deno.Signal = "SIGTERM", ms = 5000): Promise<Deno.CommandStatus> {
    if (!this.#done) {
      try {
        this.#child.kill(signal);
      } catch { /* exited */ }
      const t = sleep(ms).then(() => "timeout" as const);
      if ((await Promise.race([this.exited, t])) === "timeout") {
        try {
          this.#child.kill("SIGKILL");
        } catch { /* exited */ }
      }
    }
    try {
      await this.#writer?.close();
    } catch { /* closed */ }
    return await this.exited;
  }
}

/** Namespaces created and not yet closed, for the signal handler. */
const liveNamespaces = new Set<Netns>();
const SIGNALS = ["SIGINT", "SIGTERM"] as const;

function onSignal(sig: typeof SIGNALS[number]): void {
  console.error(`bench: ${sig}: stopping what it started in its namespaces, and deleting them`);
  for (const ns of liveNamespaces) ns.destroySync();
  Deno.exit(sig === "SIGINT" ? 130 : 143);
}
const handlers = SIGNALS.map((sig) => [sig, () => onSignal(sig)] as const);

function track(ns: Netns): void {
  if (liveNamespaces.size === 0) {
    for (const [sig, h] of handlers) {
      Deno.addSignalListener(sig, h);
    }
  }
  liveNamespaces.add(ns);
}

function untrack(ns: Netns): void {
  if (!liveNamespaces.delete(ns) || liveNamespaces.size !== 0) return;
  for (const [sig, h] of handlers) Deno.removeSignalListener(sig, h);
}

/** A network namespace with `lo` up, and the children started in it. */
export class Netns {
  readonly name: string;
  #children = new Set<Child>();

  private constructor(name: string) {
    this.name = name;
  }

  /** Creates `vionet-bench-<hex>`. */
  static async create(): Promise<Netns> {
    const hex = Array.from(
      crypto.getRandomValues(new Uint8Array(6)),
      (b) => b.toString(16).padStart(2, "0"),
    ).join("");
    const ns = new Netns(`vionet-bench-${hex}`);
    await sh(["ip", "netns", "add", ns.name]);
    track(ns);
    await ns.exec(["ip", "link", "set", "lo", "up"]);
    return ns;
  }

  /** Runs a command in the namespace to completion. */
  exec(cmd: string[]): Promise<string> {
    return sh(["ip", "netns", "exec", this.name, ...cmd]);
  }

  /**
   * Starts `cmd` in the namespace, pinned to `cpu` with taskset when given.
   * `ip netns exec` and taskset both exec, so the PID is the command's own.
   */
  spawn(cmd: string[], opts: { cpu?: number | string; stdin?: boolean; cwd?: string } = {}): Child {
    const pin = opts.cpu === undefined ? [] : ["taskset", "-c", String(opts.cpu)];
    const child = new Child(["ip", "netns", "exec", this.name, ...pin, ...cmd], opts);
    this.#children.add(child);
    child.exited.finally(() => this.#children.delete(child));
    return child;
  }

  /** Kills every child still running (by PID) and deletes the namespace. */
  async close(): Promise<void> {
    await Promise.all([...this.#children].map((c) => c.stop("SIGKILL", 3000)));
    await sh(["ip", "netns", "delete", this.name]).catch(() => {});
    untrack(this);
  }

  /**
   * On the way out (a signal): SIGKILLs every process in the namespace,
   * the bench's own children and those started without `spawn` (the guest's
   * QEMU), by the PIDs `ip netns pids` gives, then deletes it. Synchronous.
   */
  destroySync(): void {
    const run = (args: string[]) =>
      new Deno.Command("ip", { args, stdout: "piped", stderr: "null" }).outputSync();
    for (const pid of decoder.decode(run(["netns", "pids", this.name]).stdout).split(/\s+/)) {
      if (!/^[0-9]+$/.test(pid)) continue;
      try {
        Deno.kill(Number(pid), "SIGKILL");
      } catch { /* gone */ }
    }
    run(["netns", "delete", this.name]);
    liveNamespaces.delete(this);
  }
}

/** Packet and byte counters of an interface, from the kernel's point of view. */
export interface LinkStats {
  rxPackets: number;
  rxBytes: number;
  rxDropped: number;
  txPackets: number;
  txBytes: number;
  txDropped: number;
}

/** Reads `ifname`'s counters in namespace `ns` (`ip -s -j link`). */
export async function linkStats(ns: string, ifname: string): Promise<LinkStats> {
  const out = await sh(["ip", "-n", ns, "-s", "-j", "link", "show", "dev", ifname]);
  const s = JSON.parse(out)[0].stats64;
  return {
    rxPackets: s.rx.packets,
    rxBytes: s.rx.bytes,
    rxDropped: s.rx.dropped,
    txPackets: s.tx.packets,
    txBytes: s.tx.bytes,
    txDropped: s.tx.dropped,
  };
}

/** Waits until `ifname` exists in `ns`. */
export async function waitForLink(ns: string, ifname: string, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    try {
      await linkStats(ns, ifname);
      return;
    } catch (e) {
      if (Date.now() > deadline) throw new Error(`interface ${ifname} did not appear: ${e}`);
      await sleep(100);
    }
  }
}

/** Waits until `path` exists. */
export async function waitForPath(path: string, timeoutMs: number, why = ""): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    try {
      Deno.statSync(path);
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`${path} did not appear ${why}`);
      await sleep(50);
    }
  }
}

const CLK_TCK = 100;

/** A thread of a process: its id and its name (`comm`). */
export interface ThreadName {
  tid: string;
  comm: string;
}

/** The threads of a process now, leaving out any that end while they are listed. */
export function threadsOf(pid: number): ThreadName[] {
  const out: ThreadName[] = [];
  for (const e of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      out.push({
        tid: e.name,
        comm: Deno.readTextFileSync(`/proc/${pid}/task/${e.name}/comm`).trim(),
      });
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

/** utime+stime of a process, or of some of its threads, in seconds. */
export function cpuSeconds(pid: number, threadFilter?: (comm: string) => boolean): number {
  if (!threadFilter) return statTicks(`/proc/${pid}/stat`) / CLK_TCK;
  let ticks = 0;
  for (const t of threadsOf(pid)) {
    if (threadFilter(t.comm)) ticks += statTicks(`/proc/${pid}/task/${t.tid}/stat`);
  }
  return ticks / CLK_TCK;
}

/** One thread's CPU so far: utime+stime and stime alone in seconds, voluntary context switches. */
export interface ThreadTime {
  cpu: number;
  sys: number;
  switches: number;
}

/**
 * utime+stime and stime in seconds and voluntary context switches (wake-ups,
 * near enough) of each thread of a process, keyed by "tid comm".
 */
export function threadTimes(pid: number): Map<string, ThreadTime> {
  const out = new Map<string, ThreadTime>();
  for (const { tid, comm } of threadsOf(pid)) {
    try {
      const dir = `/proc/${pid}/task/${tid}`;
      const status = Deno.readTextFileSync(`${dir}/status`);
      const switches = Number(/^voluntary_ctxt_switches:\s+(\d+)/m.exec(status)?.[1] ?? 0);
      const { user, sys } = statUserSys(`${dir}/stat`);
      out.set(`${tid} ${comm}`, {
        cpu: (user + sys) / CLK_TCK,
        sys: sys / CLK_TCK,
        switches,
      });
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

function statTicks(path: string): number {
  const { user, sys } = statUserSys(path);
  return user + sys;
}

/** utime and stime of a /proc stat file, in clock ticks. */
function statUserSys(path: string): { user: number; sys: number } {
  const text = Deno.readTextFileSync(path);
  // comm may hold spaces and parentheses: fields start after the last ')'.
  const fields = text.slice(text.lastIndexOf(")") + 2).split(" ");
  // fields[0] is field 3 (state); utime is field 14, stime field 15.
  return { user: Number(fields[11]), sys: Number(fields[12]) };
}
