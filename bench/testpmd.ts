/**
 * Drives DPDK's `dpdk-testpmd` (Debian's `dpdk-dev`) in interactive mode over
 * its stdin: one instance plays the guest (virtio-user), another is DPDK's own
 * vhost backend, a third injects frames (af_packet). Each runs in the bench's
 * namespace, pinned to one CPU with both of its lcores on it
 * (`--lcores 0@N,1@N`), without hugepages (`--no-huge -m 512`).
 *
 * @module
 */

import { type Child, type Netns } from "./proc.ts";

/** Counters testpmd reports for one port (`show port stats N`). */
export interface PortStats {
  rxPackets: number;
  rxBytes: number;
  txPackets: number;
  txBytes: number;
}

/** How to start one testpmd. */
export interface TestpmdOptions {
  /** The CPU both lcores run on. */
  cpu: number;
  /** EAL `--vdev` arguments, in port order. */
  vdevs: string[];
  /** Unique per instance (`--file-prefix`). */
  prefix: string;
  /** Mbufs in the pool (default 16384). */
  mbufs?: number;
  /** Mbuf data room, for the 64 KiB TSO frame (default testpmd's 2176). */
  mbufSize?: number;
  /** More application arguments (after `--`). */
  appArgs?: string[];
}

/** The command line of one testpmd, as the bench runs it (for the report). */
export function testpmdArgv(o: TestpmdOptions): string[] {
  const eal = [
    "dpdk-testpmd",
    "--no-huge",
    "--no-shconf",
    "--file-prefix",
    o.prefix,
    "-m",
    "512",
    "--no-pci",
    "--lcores",
    `0@${o.cpu},1@${o.cpu}`,
    "--log-level",
    "pmd.net.virtio.*:error",
    ...o.vdevs.flatMap((v) => ["--vdev", v]),
  ];
  const app = ["-i", `--total-num-mbufs=${o.mbufs ?? 16384}`];
  if (o.mbufSize) app.push(`--mbuf-size=${o.mbufSize}`);
  return [...eal, "--", ...app, ...(o.appArgs ?? [])];
}

const PROMPT = /testpmd> /;

/** A running interactive testpmd. */
export class Testpmd {
  readonly child: Child;
  readonly argv: string[];
  #pos = 0;

  private constructor(child: Child, argv: string[]) {
    this.child = child;
    this.argv = argv;
  }

  /** Starts testpmd in `ns` and waits for its first prompt. */
  static async start(ns: Netns, o: TestpmdOptions): Promise<Testpmd> {
    const argv = testpmdArgv(o);
    // testpmd printf()s into a pipe: line-buffer it so each answer arrives before its prompt.
    const child = ns.spawn(["stdbuf", "-oL", ...argv], { stdin: true });
    const t = new Testpmd(child, argv);
    t.#pos = await child.waitFor(PROMPT, 0, 30_000, "testpmd's prompt");
    return t;
  }

  /** Runs one command and returns what it printed before the next prompt. */
  async cmd(line: string, timeoutMs = 15_000): Promise<string> {
    const from = this.#pos;
    await this.child.send(line);
    this.#pos = await this.child.waitFor(PROMPT, from, timeoutMs, `"${line}" to finish`);
    const out = this.child.output.slice(from, this.#pos);
    if (
      /Bad arguments|Command not found|Fail to (configure|start)|Please stop|not supported by port|Invalid/
        .test(out)
    ) {
      throw new Error(`testpmd: "${line}" failed:\n${out}`);
    }
    return out;
  }

  /** Runs several commands in order. */
  async cmds(lines: string[]): Promise<void> {
    for (const l of lines) await this.cmd(l);
  }

  /** Port `port`'s counters. */
  async stats(port: number): Promise<PortStats> {
    const out = await this.cmd(`show port stats ${port}`);
    const num = (re: RegExp) => {
      const m = re.exec(out);
      if (!m) throw new Error(`cannot parse testpmd stats:\n${out}`);
      return Number(m[1]);
    };
    return {
      rxPackets: num(/RX-packets:\s*(\d+)/),
      rxBytes: num(/RX-bytes:\s*(\d+)/),
      txPackets: num(/TX-packets:\s*(\d+)/),
      txBytes: num(/TX-bytes:\s*(\d+)/),
    };
  }

  /** Stops forwarding and quits; kills it if it hangs. */
  async quit(): Promise<void> {
    if (!this.child.done) {
      await this.child.send("stop").catch(() => {});
      await this.child.send("quit").catch(() => {});
    }
    await this.child.stop("SIGTERM", 5000);
  }
}
