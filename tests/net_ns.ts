/**
 * Test helper: a throw-away network namespace, so that nothing a test does to
 * the network touches the host's.
 *
 * ```ts
 * await withNetns(async (ns) => {
 *   await ns.exec(["ip", "link", "set", "lo", "up"]);
 *   const out = await ns.exec(["ip", "-j", "addr"]);
 * });
 * ```
 *
 * The namespace is `vionet-t-<16 hex>`; it is deleted when the callback ends,
 * whether it returns or throws. Deleting it also removes every interface that
 * still lives in it (a tap moved in there disappears from the namespace; its
 * fd stays usable until closed). Needs root and `ip` (iproute2).
 *
 * @module
 */

/**
 * Why tests that need a real tap in a namespace cannot run here, or
 * undefined when they can: root, /dev/net/tun, and each of `tools` on the
 * usual paths (`packages` names what to apt-get install for them).
 */
export function tapTestsUnavailable(
  tools: string[] = ["ip"],
  packages = "iproute2",
): string | undefined {
  if (Deno.uid() !== 0) return "needs root for taps and network namespaces";
  try {
    Deno.statSync("/dev/net/tun");
  } catch {
    return "needs /dev/net/tun";
  }
  for (const tool of tools) {
    const found = ["/usr/sbin/", "/usr/bin/", "/sbin/", "/bin/"].some((dir) => {
      try {
        return Deno.statSync(dir + tool).isFile;
      } catch {
        return false;
      }
    });
    if (!found) return `needs ${tool} (apt-get install -y ${packages})`;
  }
  return undefined;
}

/** A command run inside a namespace that exited non-zero. */
export class CommandError extends Error {
  constructor(
    readonly cmd: readonly string[],
    readonly code: number,
    readonly stdout: string,
    readonly stderr: string,
  ) {
    super(`${cmd.join(" ")} exited with ${code}: ${stderr.trim() || stdout.trim()}`);
    this.name = "CommandError";
  }
}

/** Output of a finished command. */
export interface ExecResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** A network namespace that exists for the duration of a {@link withNetns} callback. */
export interface Netns {
  /** The namespace's name, e.g. `vionet-t-3fa2c81d09be4471`. */
  readonly name: string;
  /**
   * Runs `cmd` with `ip netns exec <name>` and returns its stdout.
   * A non-zero exit throws a {@link CommandError}.
   */
  exec(cmd: string[]): Promise<string>;
  /** The same, but returns code, stdout and stderr instead of throwing. */
  run(cmd: string[]): Promise<ExecResult>;
  /**
   * Starts a long-running `cmd` inside the namespace (a server, a guest). The
   * caller owns the child; children still running when the callback ends are
   * killed (SIGKILL, by PID) and awaited before the namespace is deleted.
   */
  spawn(cmd: string[], options?: Deno.CommandOptions): Deno.ChildProcess;
}

const decoder = new TextDecoder();

/** Runs a command on the host (not in a namespace) and returns its output. */
export async function run(cmd: string[]): Promise<ExecResult> {
  const out = await new Deno.Command(cmd[0], {
    args: cmd.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stdout: decoder.decode(out.stdout), stderr: decoder.decode(out.stderr) };
}

/** Runs a command on the host; throws a CommandError if it fails. */
export async function exec(cmd: string[]): Promise<string> {
  const r = await run(cmd);
  if (r.code !== 0) throw new CommandError(cmd, r.code, r.stdout, r.stderr);
  return r.stdout;
}

function randomName(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(8));
  return `vionet-t-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

/**
 * Creates a fresh namespace with `lo` up, runs `fn` with it, and deletes the
 * namespace afterwards (also when `fn` throws). Returns what `fn` returns.
 */
export async function withNetns<T>(fn: (ns: Netns) => Promise<T>): Promise<T> {
  const name = randomName();
  await exec(["ip", "netns", "add", name]);
  const children = new Set<Deno.ChildProcess>();
  const ns: Netns = {
    name,
    run: (cmd) => run(["ip", "netns", "exec", name, ...cmd]),
    exec: (cmd) => exec(["ip", "netns", "exec", name, ...cmd]),
    spawn(cmd, options = {}) {
      const child = new Deno.Command("ip", {
        stdin: "null",
        ...options,
        args: ["netns", "exec", name, ...cmd],
      }).spawn();
      children.add(child);
      child.status.finally(() => children.delete(child));
      return child;
    },
  };
  try {
    await ns.exec(["ip", "link", "set", "lo", "up"]);
    return await fn(ns);
  } finally {
    for (const child of [...children]) {
      try {
        child.kill("SIGKILL");
      } catch {
        // already exited
      }
      await child.status;
    }
    await exec(["ip", "netns", "delete", name]);
  }
}
