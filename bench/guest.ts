/**
 * Guest-bound benchmark: the same Linux guest (scripts/build_guest.sh, booted
 * by tests/e2e/guest.ts) against vionet (`-netdev vhost-user`) and against
 * QEMU's built-in backend (`-netdev tap,vhost=off`) on the same kind of tap,
 * `vectors=0` on virtio-net-pci for both. iperf3, one TCP stream each way,
 * with the device's offloads on and off (the same virtio-net-pci properties
 * for both backends), and the host CPU each backend used over the transfer:
 *
 * - vionet: the daemon process, all threads (/proc/PID/stat utime+stime);
 * - QEMU built-in: QEMU's threads except its vCPU threads (`CPU n/TCG` or
 *   `CPU n/KVM`), where the tap I/O runs.
 *
 * Also the daemon's CPU with the guest booted and idle.
 *
 * @module
 */

import {
  bootGuest,
  type Guest,
  guestAssets,
  kvmUsable,
  netKernelArgs,
} from "../tests/e2e/guest.ts";
import { ROOT, startTaskFlags } from "../tests/helpers.ts";
import {
  type Child,
  cpuSeconds,
  Netns,
  sleep,
  threadsOf,
  threadTimes,
  waitForLink,
  waitForPath,
} from "./proc.ts";

/** The backends of the guest-bound bench. */
export type GuestBackend = "vionet" | "qemu";
/** iperf3 directions. */
export type Direction = "guest->host" | "host->guest";

/** One iperf3 run. */
export interface GuestSample {
  backend: GuestBackend;
  offloads: "on" | "off";
  direction: Direction;
  /** Which boot of this configuration (0-based; see GuestOptions.boot). */
  boot: number;
  /** The run's number within its boot. */
  rep: number;
  gbps: number;
  /** Host CPU of the backend over the run, in cores. */
  backendCores: number;
  /** The whole QEMU process over the run, in cores (guest emulation included). */
  qemuCores: number;
  /**
   * Interrupts the guest took on its virtio lines over the run, per second
   * (from the guest's /proc/interrupts): what the device's notifications
   * cost a guest whose one vCPU is the bottleneck.
   */
  guestIrqsPerSecond?: number;
  /**
   * The guest kernel's clocksource after the run. Under TCG the watchdog
   * can demote `tsc` to `hpet` or `acpi_pm`, whose every read is an
   * emulated device access: a TCP stream reads the clock per packet.
   */
  guestClocksource?: string;
  /**
   * vionet only: each daemon thread's CPU (cores, and the kernel's part)
   * and voluntary context switches per second over the run, by "tid comm".
   * Workers show as worker-N in creation order: the device first, then per
   * queue start the writer and the poller.
   */
  threads?: Record<string, ThreadLoad>;
  /** The same for each QEMU thread (vCPUs `CPU n/TCG`, the main loop `qemu-system-x86`, ...). */
  qemuThreads?: Record<string, ThreadLoad>;
  /**
   * vionet only: lost kicks the device recovered (`kicksMissed` of its
   * SIGUSR2 counters), per queue, since the daemon started: the same for
   * every sample of one configuration.
   */
  kicksMissed?: PerQueue;
  /**
   * vionet only: the interrupts it asked the VMM for (writes to each
   * queue's call eventfd) per second of the run. Under TCG QEMU's main loop
   * wakes for each to inject it, so they cost host CPU that counts as the
   * backend's.
   */
  callsPerSecond?: PerQueue;
  error?: string;
}

/** The daemon's CPU with an idle guest. */
export interface IdleSample {
  boot: number;
  rep: number;
  cores: number;
  seconds: number;
}

/** Settings of the guest-bound bench. */
export interface GuestOptions {
  seconds: number;
  /** iperf3 runs each way per boot. */
  reps: number;
  /**
   * The number of this boot of the configuration. The bench boots each
   * configuration several times, alternating backends, so a drift of the
   * machine or of a long-running guest falls on both backends alike.
   */
  boot: number;
  idleSeconds: number;
  /**
   * Where the guest's vCPU runs and where everything else runs (the backend,
   * QEMU's other threads, the iperf3 server), or undefined to let the
   * scheduler place them.
   */
  pin?: GuestPinning;
  log: (line: string) => void;
}

/** CPUs of the guest-bound bench: the vCPU alone on one, the rest on the other. */
export interface GuestPinning {
  vcpu: number;
  io: number;
}

const TAP = "vg0";
const HOST_IP = "198.18.0.1";
const GUEST_IP = "198.18.0.2";
const MAC = "52:54:00:12:34:56";
/** virtio-net-pci properties that switch every offload off (Linux then offers none). */
const OFFLOADS_OFF = [
  "csum=off",
  "guest_csum=off",
  "gso=off",
  "host_tso4=off",
  "host_tso6=off",
  "host_ecn=off",
  "host_ufo=off",
  "guest_tso4=off",
  "guest_tso6=off",
  "guest_ecn=off",
  "guest_ufo=off",
];

/** A thread's load over a run. */
export interface ThreadLoad {
  /** Share of a core, user and kernel time. */
  cores: number;
  /** The kernel's part of `cores` (system calls, and the softirq work they run). */
  sysCores: number;
  wakeupsPerSecond: number;
}

/** Whether the guest-bound bench can run, or why not. */
export function guestUnavailable(): string | undefined {
  try {
    guestAssets();
  } catch (e) {
    return (e as Error).message;
  }
  return undefined;
}

/** A QEMU vCPU thread's name (`CPU 0/TCG`, `CPU 1/KVM`). */
export function isVcpu(comm: string): boolean {
  return /^CPU \d+\/(TCG|KVM)/.test(comm);
}

/** Each thread's share of a core (and the kernel's part of it) and wake-ups per second between two `threadTimes()` readings. */
function perThread(
  before: ReturnType<typeof threadTimes>,
  after: ReturnType<typeof threadTimes>,
  seconds: number,
): Record<string, ThreadLoad> {
  const out: Record<string, ThreadLoad> = {};
  const round = (x: number) => Math.round(x * 1000) / 1000;
  for (const [name, t] of after) {
    const b = before.get(name) ?? { cpu: 0, sys: 0, switches: 0 };
    const cores = (t.cpu - b.cpu) / seconds;
    if (cores < 0.005) continue;
    out[name] = {
      cores: round(cores),
      sysCores: round((t.sys - b.sys) / seconds),
      wakeupsPerSecond: Math.round((t.switches - b.switches) / seconds),
    };
  }
  return out;
}

/** Seconds of iperf3 each way before the measured runs. */
const WARMUP_SECONDS = 3;

/** Runs one backend × offload configuration: boots once, then `reps` iperf3 runs each way. */
export async function measureGuest(
  backend: GuestBackend,
  offloads: "on" | "off",
  o: GuestOptions,
  idle?: IdleSample[],
): Promise<GuestSample[]> {
  const ns = await Netns.create();
  const dir = await Deno.makeTempDir({ prefix: "vionet-bench-guest-" });
  const out: GuestSample[] = [];
  let guest: Guest | undefined;
  let daemon: Child | undefined;
  try {
    const nic = `virtio-net-pci,netdev=n0,vectors=0,romfile=,mac=${MAC}` +
      (offloads === "off" ? "," + OFFLOADS_OFF.join(",") : "");
    let netdev: string[];
    if (backend === "vionet") {
      const sock = `${dir}/vhost.sock`;
      daemon = ns.spawn([
        Deno.execPath(),
        "run",
        ...startTaskFlags(),
        `${ROOT}main.ts`,
        "--socket-path",
        sock,
        "--tap",
        TAP,
        "--log-level",
        "info", // for the SIGUSR2 counters at the end
      ], { cwd: ROOT, cpu: o.pin?.io });
      await waitForPath(sock, 30_000, `(vionet did not start:\n${daemon.tail()})`);
      netdev = [
        "-chardev",
        `socket,id=c0,path=${sock}`,
        "-netdev",
        "vhost-user,id=n0,chardev=c0",
        "-device",
        nic,
      ];
    } else {
      netdev = [
        "-netdev",
        `tap,id=n0,ifname=${TAP},script=no,downscript=no,vhost=off`,
        "-device",
        nic,
      ];
    }
    const a = guestAssets();
    guest = await bootGuest({
      kernel: a.kernel,
      initrd: a.initrd,
      netns: ns.name,
      kernelArgs: netKernelArgs({ ip: `${GUEST_IP}/24` }),
      netdevArgs: netdev,
      // Named threads, so the vCPU threads can be told apart from the I/O ones.
      extraArgs: ["-name", "vionet-bench,debug-threads=on"],
    });
    const boot = await guest.waitForBoot(180_000);
    o.log(`  ${backend} offloads ${offloads}: guest up (${JSON.stringify(boot).slice(0, 200)})`);
    if (o.pin) await pinQemu(guest.pid, o.pin);
    await waitForLink(ns.name, TAP, 10_000);
    await ns.exec(["ip", "addr", "add", `${HOST_IP}/24`, "dev", TAP]);
    await ns.exec(["ip", "link", "set", TAP, "up"]);
    const server = ns.spawn(["iperf3", "-s", "-B", HOST_IP, "--forceflush"], { cpu: o.pin?.io });
    await server.waitFor(/Server listening/, 0, 10_000, "iperf3 -s");
    const ping = await guest.run(`ping -c 3 -W 2 ${HOST_IP}`, 20_000);
    if (ping.status !== 0) throw new Error(`the guest cannot reach the host:\n${ping.output}`);

    if (idle && daemon) {
      await sleep(2000);
      for (let rep = 0; rep < o.reps; rep++) {
        const c0 = cpuSeconds(daemon.pid);
        const t0 = performance.now();
        await sleep(o.idleSeconds * 1000);
        const dt = (performance.now() - t0) / 1000;
        idle.push({ boot: o.boot, rep, cores: (cpuSeconds(daemon.pid) - c0) / dt, seconds: dt });
      }
    }

    // Warm-up, not measured, for both backends alike: TCP's window grows and
    // vionet's workers get their code optimized (V8's compiler threads ran
    // for 2-4 % of a core during the first measured run otherwise).
    for (const reverse of ["", "-R"]) {
      const w = await guest.run(`iperf3 -c ${HOST_IP} -t ${WARMUP_SECONDS} ${reverse}`, 60_000);
      if (w.status !== 0) {
        // Say so now, with the daemon's counters (SIGUSR2), not only as failed reps.
        if (daemon) {
          Deno.kill(daemon.pid, "SIGUSR2");
          await sleep(500);
        }
        o.log(
          `  ${backend} offloads ${offloads}: warm-up iperf3 ${reverse || "(guest->host)"} ` +
            `failed, status ${w.status}: ${w.output.trim().slice(-300)}` +
            (daemon ? `\n${daemon.tail(3000)}` : ""),
        );
      }
    }

    const backendPid = daemon?.pid ?? guest.pid;
    const backendCpu = () =>
      backend === "vionet" ? cpuSeconds(backendPid) : cpuSeconds(backendPid, (c) => !isVcpu(c));
    for (let rep = 0; rep < o.reps; rep++) {
      for (const direction of ["guest->host", "host->guest"] as Direction[]) {
        const base = { backend, offloads, direction, boot: o.boot, rep };
        try {
          const k0 = daemon ? await daemonCounters(daemon) : undefined;
          const th0 = daemon ? threadTimes(daemon.pid) : null;
          const qth0 = threadTimes(guest.pid);
          const b0 = backendCpu();
          const q0 = cpuSeconds(guest.pid);
          const t0 = performance.now();
          const r = await guest.run(
            iperfWithIrqs(
              `iperf3 -c ${HOST_IP} -t ${o.seconds} -J ${direction === "host->guest" ? "-R" : ""}`,
            ),
            (o.seconds + 30) * 1000,
          );
          const dt = (performance.now() - t0) / 1000;
          const b1 = backendCpu();
          const q1 = cpuSeconds(guest.pid);
          const th1 = daemon ? threadTimes(daemon.pid) : null;
          const k1 = daemon && !daemon.done ? await daemonCounters(daemon) : undefined;
          if (daemon?.done) throw new Error(`the daemon exited:\n${daemon.tail(2000)}`);
          const brace = r.output.indexOf("{");
          if (brace < 0) {
            throw new Error(
              `iperf3 gave no report (status ${r.status}): ${r.output.trim().slice(-300)}`,
            );
          }
          const j = JSON.parse(r.output.slice(brace));
          if (j.error) throw new Error(`iperf3: ${j.error}`);
          const gbps = j.end.sum_received.bits_per_second / 1e9;
          const irqs = irqDelta(r.output);
          const irqRate = irqs === undefined
            ? undefined
            : Math.round(irqs / j.end.sum_received.seconds);
          const clocksource = clocksourceOf(r.output);
          const threads = th0 && th1 ? perThread(th0, th1, dt) : undefined;
          const calls = k0 && k1 ? perSecond(k0, k1, "interrupts", dt) : undefined;
          const qemuThreads = perThread(qth0, threadTimes(guest.pid), dt);
          out.push({
            ...base,
            gbps,
            backendCores: (b1 - b0) / dt,
            qemuCores: (q1 - q0) / dt,
            ...(irqRate !== undefined ? { guestIrqsPerSecond: irqRate } : {}),
            ...(clocksource ? { guestClocksource: clocksource } : {}),
            ...(threads ? { threads } : {}),
            ...(calls ? { callsPerSecond: calls } : {}),
            qemuThreads,
          });
          const perThreadText = threads
            ? "; threads " +
              Object.entries(threads).map(([name, t]) =>
                `${name.split(" ")[1]} ${(100 * t.cores).toFixed(1)} % ` +
                `(sys ${(100 * t.sysCores).toFixed(1)}) ${t.wakeupsPerSecond}/s`
              ).join(", ")
            : "";
          const irqText = (irqRate === undefined ? "" : `; guest ${irqRate} irq/s`) +
            (clocksource ? `, clock ${clocksource}` : "") +
            (calls ? `; calls rx ${calls.rx}/s tx ${calls.tx}/s` : "");
          o.log(
            `  ${backend} offloads ${offloads} ${direction} boot ${o.boot} rep ${rep}: ${
              gbps.toFixed(3)
            } Gbit/s${irqText}${perThreadText}`,
          );
        } catch (e) {
          const why = (e as Error).message;
          o.log(
            `  ${backend} offloads ${offloads} ${direction} boot ${o.boot} rep ${rep}: FAILED: ${
              why.slice(0, 1500)
            }`,
          );
          out.push({ ...base, gbps: 0, backendCores: 0, qemuCores: 0, error: why.slice(0, 500) });
          if (daemon?.done || guest.closed === undefined) break;
        }
      }
      if (daemon?.done) break;
    }
    if (daemon && !daemon.done) {
      const missed = await kicksMissed(daemon);
      if (missed) {
        for (const s of out) s.kicksMissed = missed;
        o.log(`  ${backend} offloads ${offloads}: lost kicks recovered: ${JSON.stringify(missed)}`);
      }
    }
  } catch (e) {
    const why = (e as Error).message;
    o.log(`  ${backend} offloads ${offloads}: FAILED: ${why.slice(0, 2000)}`);
    out.push({
      backend,
      offloads,
      direction: "guest->host",
      boot: o.boot,
      rep: -1,
      gbps: 0,
      backendCores: 0,
      qemuCores: 0,
      error: why.slice(0, 500),
    });
  } finally {
    if (guest) {
      await guest.shutdown(5000).catch(() => guest?.kill());
    }
    await daemon?.stop("SIGTERM", 5000);
    await ns.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
  return out;
}

/**
 * A guest script that runs `iperf` (its JSON report last, alone) between two
 * counts of the interrupts on the guest's virtio lines.
 */
export function iperfWithIrqs(iperf: string, interrupts = "/proc/interrupts"): string {
  const count = "awk '/virtio/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i } " +
    `END { print s + 0 }' ${interrupts}`;
  return `echo "irqs-before $(${count})"; out=$(${iperf}); st=$?; ` +
    `echo "irqs-after $(${count})"; ` +
    `echo "clocksource $(cat ${CLOCKSOURCE} 2>/dev/null)"; printf '%s\\n' "$out"; exit $st`;
}

const CLOCKSOURCE = "/sys/devices/system/clocksource/clocksource0/current_clocksource";

/** The clocksource iperfWithIrqs() printed, or undefined. */
export function clocksourceOf(output: string): string | undefined {
  return /^clocksource (\S+)$/m.exec(output)?.[1];
}

/** The interrupt count between the marks iperfWithIrqs() printed, or undefined. */
export function irqDelta(output: string): number | undefined {
  const before = /^irqs-before (\d+)$/m.exec(output);
  const after = /^irqs-after (\d+)$/m.exec(output);
  if (!before || !after) return undefined;
  return Number(after[1]) - Number(before[1]);
}

/**
 * Puts QEMU's vCPU threads on `pin.vcpu` and its other threads on `pin.io`;
 * threads QEMU starts later inherit the affinity of the thread that starts
 * them. Under TCG a vCPU thread uses a whole core; pinned, it has one of
 * its own instead of taking turns with the backend and the iperf3 server
 * wherever the scheduler puts them, the same way for both backends.
 */
async function pinQemu(pid: number, pin: GuestPinning): Promise<void> {
  let vcpus = 0;
  for (const { tid, comm } of threadsOf(pid)) {
    const vcpu = isVcpu(comm);
    if (vcpu) vcpus++;
    const cpu = vcpu ? pin.vcpu : pin.io;
    const r = await new Deno.Command("taskset", {
      args: ["-pc", String(cpu), tid],
      stdout: "null",
      stderr: "piped",
    }).output();
    // A thread that ended meanwhile needs no CPU.
    if (!r.success && threadsOf(pid).some((t) => t.tid === tid)) {
      throw new Error(
        `taskset -pc ${cpu} ${tid} (${comm}): ${new TextDecoder().decode(r.stderr).trim()}`,
      );
    }
  }
  if (vcpus === 0) throw new Error(`QEMU (PID ${pid}) has no thread named like a vCPU`);
}

/** One field of the daemon's SIGUSR2 counters, per queue. */
export interface PerQueue {
  rx: number;
  tx: number;
}

/** The daemon's counters of queues rx0 and tx0, as it logs them on SIGUSR2. */
async function daemonCounters(daemon: Child): Promise<QueueCounters | undefined> {
  const mark = daemon.output.length;
  Deno.kill(daemon.pid, "SIGUSR2");
  const end = Date.now() + 3000;
  const queue = (q: string) => {
    const m = new RegExp(`info: ${q} (\\{.*\\})`).exec(daemon.output.slice(mark));
    return m ? JSON.parse(m[1]) as Record<string, number> : undefined;
  };
  while (Date.now() < end) {
    const rx = queue("rx0"), tx = queue("tx0");
    if (rx !== undefined && tx !== undefined) return { rx, tx };
    await sleep(50);
  }
  return undefined;
}

type QueueCounters = { rx: Record<string, number>; tx: Record<string, number> };

/** `field` of both queues' counters (NaN where a queue lacks it). */
function field(c: QueueCounters, f: string): PerQueue {
  return { rx: Number(c.rx[f] ?? NaN), tx: Number(c.tx[f] ?? NaN) };
}

/** How fast `f` grew per queue from `a` to `b`, `seconds` apart (rounded). */
function perSecond(a: QueueCounters, b: QueueCounters, f: string, seconds: number): PerQueue {
  const x = field(a, f), y = field(b, f);
  return { rx: Math.round((y.rx - x.rx) / seconds), tx: Math.round((y.tx - x.tx) / seconds) };
}

/** The daemon's `kicksMissed` per queue. */
async function kicksMissed(daemon: Child): Promise<PerQueue | undefined> {
  const c = await daemonCounters(daemon);
  return c && field(c, "kicksMissed");
}

/** The accelerator QEMU uses here. */
export function accelerator(): string {
  return kvmUsable() ? "KVM" : "TCG";
}
