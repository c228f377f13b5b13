/**
 * What one NIC costs does not grow with the VMs it served (issue 27): the
 * real daemon, under the start task's flags, takes 65 VM connections in a
 * row from `socket_vm.ts` (attach, start the queues, frames both ways,
 * detach, gracefully or by closing the socket), and afterwards holds the
 * same descriptors, no guest mapping, its idle worker threads, and an RSS
 * within a bound that any real leak per connection would exceed.
 *
 * Not a timing test: nothing here depends on how fast anything runs.
 */

import assert from "node:assert/strict";
import { type Netns, tapTestsUnavailable, withNetns } from "../../net_ns.ts";
import { ROOT, startTaskEnv, startTaskFlags } from "../../helpers.ts";
import { SocketVm, VM_HOST_IP, VM_IP, VM_MAC } from "./socket_vm.ts";

const unavailable = tapTestsUnavailable(["ip"], "iproute2");

/** Warm-up connections (allocators and V8 heaps reach their working size), then the measured ones. */
const WARM_UP = 5;
const MEASURED = 60;
/** RSS is read after the warm-up and after every this many measured connections. */
const SAMPLE_EVERY = 10;
/**
 * How much the median of the last three readings may exceed the median of
 * the first three (40 connections later) without a leak. Between VMs the
 * daemon's RSS moves with its isolates' garbage collections (pair 0's device
 * worker, the main isolate) by a few MB, and by tens of MB when glibc's mmap
 * threshold is left to rise (`fixMmapThreshold` in `daemon.ts`); a median of
 * three ignores one reading taken before a collection. What this catches:
 * anything of 0.75 MB or more per connection (30 MB over 40), such as one
 * worker isolate (7 MB or more), a data path's 8 MiB bounce arena, or guest
 * memory kept mapped (also checked on its own below).
 */
const RSS_SLACK_KB = 30 * 1024;

interface Snapshot {
  rssKb: number;
  fds: number;
  workerThreads: number;
  guestMappings: number;
}

function snapshot(pid: number): Snapshot {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  let workerThreads = 0;
  for (const e of Deno.readDirSync(`/proc/${pid}/task`)) {
    try {
      const comm = Deno.readTextFileSync(`/proc/${pid}/task/${e.name}/comm`).trim();
      if (/^worker-\d+$/.test(comm)) workerThreads++;
    } catch { /* ended meanwhile */ }
  }
  return {
    rssKb: Number(/^VmRSS:\s+(\d+) kB/m.exec(status)![1]),
    fds: [...Deno.readDirSync(`/proc/${pid}/fd`)].length,
    workerThreads,
    guestMappings: Deno.readTextFileSync(`/proc/${pid}/maps`).split("\n")
      .filter((l) => l.includes("vionet-socket-vm")).length,
  };
}

/**
 * Reads the daemon once the last VM's workers have exited and it gave free
 * memory back (its debug line `malloc_trim:` after `trims` earlier ones):
 * the daemon as it idles between VMs. At most 30 s.
 */
async function settled(pid: number, out: () => string, trims: number): Promise<Snapshot> {
  const end = Date.now() + 30_000;
  const trimmed = () => (out().match(/ malloc_trim: /g) ?? []).length > trims;
  while (!trimmed()) {
    if (Date.now() > end) {
      throw new Error(`no malloc_trim after the last VM:\n${out().slice(-3000)}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return snapshot(pid);
}

function trimsSoFar(out: string): number {
  return (out.match(/ malloc_trim: /g) ?? []).length;
}

async function waitForOutput(out: () => string, re: RegExp, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!re.test(out())) {
    if (Date.now() > end) throw new Error(`no ${re} in ${ms} ms; the daemon said:\n${out()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function hostSide(ns: Netns, tap: string): Promise<number[]> {
  await ns.exec(["ip", "addr", "add", `${VM_HOST_IP}/24`, "dev", tap]);
  await ns.exec(["ip", "link", "set", tap, "up"]);
  const mac = VM_MAC.map((b) => b.toString(16).padStart(2, "0")).join(":");
  await ns.exec(["ip", "neigh", "replace", VM_IP, "lladdr", mac, "dev", tap]);
  const [link] = JSON.parse(await ns.exec(["ip", "-j", "link", "show", "dev", tap]));
  return (link.address as string).split(":").map((h) => parseInt(h, 16));
}

Deno.test({
  name: `${MEASURED} VM connections in a row: no worker before a VM, three while one is ` +
    "attached, one between VMs; afterwards the same descriptors, no guest mapping, no RSS growth",
  ignore: unavailable !== undefined,
  async fn() {
    await withNetns(async (ns) => {
      const dir = await Deno.makeTempDir({ prefix: "vionet-fp-" });
      await Deno.chmod(dir, 0o777);
      const socket = `${dir}/v.sock`;
      const tap = "vfp0";
      const daemon = ns.spawn(
        [
          Deno.execPath(),
          "run",
          ...startTaskFlags(),
          `${ROOT}main.ts`,
          ...["--tap", tap, "--socket-path", socket, "--queues", "1", "--user", "nobody"],
          ...["--log-level", "debug"],
        ],
        { stdout: "piped", stderr: "piped", env: startTaskEnv(), cwd: ROOT },
      );
      let out = "";
      const pump = Promise.all([daemon.stdout, daemon.stderr].map(async (s) => {
        for await (const t of s.pipeThrough(new TextDecoderStream())) out += t;
      }));
      // Frames towards the guest, for the receive direction.
      const sender = ns.spawn(
        [Deno.execPath(), "run", "-A", `${ROOT}bench/udp_sender.ts`, VM_IP, "9", "2000"],
        { stdout: "null", stderr: "piped" },
      );
      let vm: SocketVm | null = null;
      try {
        await waitForOutput(() => out, /listening on /, 30_000);
        vm = new SocketVm(socket, await hostSide(ns, tap));
        const idleWorkers = snapshot(daemon.pid).workerThreads;
        const round = async (i: number) => {
          await vm!.attach(64);
          await vm!.exchange(4, 1);
          await vm!.detach(i % 2 === 0);
        };
        await vm.attach(64);
        await vm.exchange(4, 1);
        assert.equal(idleWorkers, 0, "no worker runs before a VM attaches");
        assert.equal(
          snapshot(daemon.pid).workerThreads,
          3,
          "an attached VM: its device worker, one writer and one poller",
        );
        await vm.detach(true);
        // From now on the device worker of pair 0 stays for the next VM.
        const between = idleWorkers + 1;
        for (let i = 1; i < WARM_UP; i++) await round(i);
        const before = await settled(daemon.pid, () => out, trimsSoFar(out));
        const rss = [before.rssKb];
        let after = before;
        for (let i = 0; i < MEASURED; i += SAMPLE_EVERY) {
          const trims = trimsSoFar(out);
          for (let j = i; j < i + SAMPLE_EVERY; j++) await round(j);
          after = await settled(daemon.pid, () => out, trims);
          rss.push(after.rssKb);
        }
        assert.equal(before.workerThreads, between, "only pair 0's device worker between VMs");
        assert.equal(after.guestMappings, 0, "no guest memory mapped once the VMs are gone");
        assert.equal(after.workerThreads, between, "only pair 0's device worker between VMs");
        assert.equal(after.fds, before.fds, "the same number of open descriptors");
        const median3 = (xs: number[]) => [...xs].sort((a, b) => a - b)[1];
        const growth = median3(rss.slice(-3)) - median3(rss.slice(0, 3));
        assert.ok(
          growth <= RSS_SLACK_KB,
          `RSS grew by ${growth} kB over ${MEASURED} connections (medians of the first and ` +
            `last three readings, every ${SAMPLE_EVERY}: ${
              rss.join(", ")
            } kB; allowed ${RSS_SLACK_KB})`,
        );
        assert.ok(vm.sent >= 4 * (MEASURED + WARM_UP) && vm.received >= MEASURED + WARM_UP);
      } catch (e) {
        // What the daemon said last (its own account of the failure).
        await new Promise((r) => setTimeout(r, 500));
        console.log(`the daemon's last output:\n${out.slice(-6000)}`);
        throw e;
      } finally {
        vm?.close();
        try {
          sender.kill("SIGKILL");
        } catch { /* exited */ }
        await sender.status;
        await sender.stderr.cancel();
        try {
          daemon.kill("SIGTERM");
        } catch { /* exited */ }
        await daemon.status;
        await pump;
        await Deno.remove(dir, { recursive: true }).catch(() => {});
      }
    });
  },
});
