/**
 * `deno task bench`: vionet against the kernel's own ceiling (one C thread
 * making vionet's system calls, bench/tap_ceiling.ts) and side by side with
 * DPDK's and QEMU's backends, in one run (issues 5 and 27). Needs root (namespaces, taps); installs what it needs
 * from Debian's packages first (DPDK's testpmd and PMDs, QEMU, iperf3) and
 * builds the test guest if it is missing.
 *
 * ```
 * deno task bench [--reps 3] [--seconds 4] [--guest-boots 5] [--guest-reps 1] [--guest-seconds 8]
 *                 [--guest-pin on|off] [--only backend|guest|migration|footprint] [--migrations 3]
 *                 [--daemon-logs DIR]
 *                 [--tests tx64,tx1514,tso,rx64] [--vionet-args "--io-uring off"]
 *                 [--deno-flags "--v8-flags=--lite-mode"] [--daemon-env "MALLOC_ARENA_MAX=2"]
 *                 [--capture-args "--pcap-snaplen 128"]
 *                 [--connections 1000] [--footprint-variants shipped,arenas2,...]
 *                 [--backend-cpu 0] [--frontend-cpu 1] [--out bench/results] [--report-only]
 * ```
 *
 * 1. Backend-bound (bench/dpdk.ts): TX 64 B, TX 1514 B, TSO, RX 64 B through
 *    vionet, DPDK's vhost + tap, and a raw tap loop, with testpmd's
 *    virtio-user as the guest, and for RX the C readers that are its
 *    ceiling; repetitions interleaved so drift hits all alike. Then the TX
 *    ceiling (bench/tap_ceiling.c: a write a frame, and vionet's io_uring
 *    batches).
 * 2. Guest-bound (bench/guest.ts): iperf3 both ways, offloads on and off,
 *    vionet vs QEMU's built-in backend; the daemon's CPU with an idle guest.
 *    Under TCG a guest's TCP stream runs at one of two speeds, mostly one
 *    per boot and sometimes sliding within one, on either backend (vionet
 *    guest->host 1.45 down to 0.87 Gbit/s in one boot; host->guest 1.02 in
 *    one boot and 1.73-1.78 in four others). So each configuration is
 *    booted `--guest-boots` times, backends alternating (ABBA), `--guest-reps`
 *    runs each way per boot; and the vCPU thread gets `--frontend-cpu` to
 *    itself while the backend, QEMU's other threads and the iperf3 server
 *    share `--backend-cpu` (`--guest-pin off` leaves placement to the
 *    scheduler: one such run gave vionet guest->host 0.81-1.6 Gbit/s).
 * 3. Migration (bench/migration.ts): a guest migrated between two hosts on
 *    one bridge, vionet's daemons against QEMU's own tap backend,
 *    `--migrations` times each, alternating: QEMU's downtime, the longest
 *    stall of a TCP stream each way, when the bridge learned the new port.
 * 4. Footprint (bench/footprint.ts): one daemon's RSS, PSS, USS and threads
 *    idle, with a VM attached, under load and over `--connections` VM
 *    connections, and its time from exec to a listening socket; each
 *    `--footprint-variants` entry (the start task as shipped, or with a V8
 *    flag, glibc's arenas, a code cache) measured the same way.
 * 5. bench/results/{results.json, results.md, chart.svg} (bench/report.ts).
 *
 * @module
 */

import { parseArgs } from "node:util";
import { ROOT } from "../tests/helpers.ts";
import {
  BACKEND_TESTS,
  type BackendSample,
  backendsFor,
  describeBackendTest,
  measureBackend,
  RX_CEILING_BACKENDS,
} from "./dpdk.ts";
import {
  accelerator,
  type GuestSample,
  guestUnavailable,
  type IdleSample,
  measureGuest,
} from "./guest.ts";
import { measureMigration, type MigrationSample } from "./migration.ts";
import { measureFootprint, variantsNamed } from "./footprint.ts";
import { sh } from "./proc.ts";
import { ceilingUnavailable, measureTapCeiling } from "./tap_ceiling.ts";
import { markdown, type Results, writeReport } from "./report.ts";

const APT_PACKAGES: Record<string, string> = {
  "dpdk-dev": "/usr/bin/dpdk-testpmd",
  "librte-net-virtio23": "",
  "librte-net-vhost23": "",
  "librte-net-tap23": "",
  "librte-net-pcap23": "",
  "librte-net-af-packet23": "",
  "librte-mempool-ring23": "",
  "qemu-system-x86": "/usr/bin/qemu-system-x86_64",
  "iperf3": "/usr/bin/iperf3",
  "tcpdump": "/usr/bin/tcpdump", // the migration part: when the bridge learns the new port
  "gcc": "/usr/bin/gcc", // bench/tap_ceiling.c
  "linux-libc-dev": "", // <linux/io_uring.h> for bench/tap_ceiling.c
};

async function installed(pkg: string): Promise<boolean> {
  const out = await sh(["dpkg-query", "-W", "-f=${Status}", pkg]).catch(() => "");
  return out.includes("ok installed");
}

/** Installs the Debian packages the bench needs and builds the guest if missing. */
async function setup(log: (s: string) => void, needGuest: boolean): Promise<void> {
  const missing: string[] = [];
  for (const pkg of Object.keys(APT_PACKAGES)) if (!(await installed(pkg))) missing.push(pkg);
  if (missing.length) {
    log(`setup: apt-get install ${missing.join(" ")}`);
    await sh(["apt-get", "update", "-qq"]);
    await sh([
      "env",
      "DEBIAN_FRONTEND=noninteractive",
      "apt-get",
      "install",
      "-y",
      "-qq",
      "--no-install-recommends",
      ...missing,
    ]);
  }
  if (needGuest && guestUnavailable()) {
    log("setup: building the test guest (scripts/build_guest.sh)");
    await sh([`${ROOT}scripts/build_guest.sh`]);
  }
}

async function version(cmd: string[], re: RegExp): Promise<string> {
  const out = await sh(cmd).catch(() => "");
  return re.exec(out)?.[1] ?? "?";
}

async function machine() {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo");
  return {
    cpus: navigator.hardwareConcurrency,
    cpuModel: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1] ?? "?",
    kernel: Deno.osRelease(),
    accelerator: accelerator(),
    deno: `Deno ${Deno.version.deno}`,
    dpdk: await version(["dpkg-query", "-W", "-f=${Version}", "dpdk-dev"], /(.+)/),
    qemu: await version(["qemu-system-x86_64", "--version"], /version (\S+)/),
    date: new Date().toISOString().slice(0, 16).replace("T", " ") + " UTC",
    loadBefore: (await Deno.readTextFile("/proc/loadavg")).split(" ").slice(0, 3).join(" "),
  };
}

/** A whole-number option, at least `min`; otherwise exit 2 naming the option. */
function wholeNumber(text: string, option: string, min = 1): number {
  const n = Number(text);
  if (!/^[0-9]+$/.test(text) || !Number.isSafeInteger(n) || n < min) {
    console.error(
      `bench: ${option} must be a whole number of at least ${min}, not ${JSON.stringify(text)}`,
    );
    Deno.exit(2);
  }
  return n;
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      reps: { type: "string", default: "3" },
      seconds: { type: "string", default: "4" },
      "guest-boots": { type: "string", default: "5" },
      "guest-reps": { type: "string", default: "1" },
      "guest-seconds": { type: "string", default: "8" },
      "idle-seconds": { type: "string", default: "10" },
      migrations: { type: "string", default: "3" },
      "daemon-logs": { type: "string" },
      connections: { type: "string", default: "1000" },
      "footprint-variants": { type: "string", default: "shipped" },
      "guest-pin": { type: "string", default: "on" },
      only: { type: "string" },
      tests: { type: "string" },
      "backend-cpu": { type: "string", default: "0" },
      "frontend-cpu": { type: "string", default: "1" },
      "vionet-args": { type: "string", default: "" },
      "deno-flags": { type: "string", default: "" },
      "daemon-env": { type: "string", default: "" },
      "capture-args": { type: "string", default: "" },
      out: { type: "string", default: `${ROOT}bench/results` },
      "report-only": { type: "boolean", default: false },
    },
  });
  if (values["report-only"]) {
    // Rewrites results.md and chart.svg from results.json (after a change to the report).
    const r = JSON.parse(await Deno.readTextFile(`${values.out}/results.json`)) as Results;
    await writeReport(r, values.out);
    console.log(markdown(r));
    return;
  }
  const reps = wholeNumber(values.reps, "--reps");
  const guestBoots = wholeNumber(values["guest-boots"], "--guest-boots");
  const guestReps = wholeNumber(values["guest-reps"], "--guest-reps");
  const seconds = wholeNumber(values.seconds, "--seconds");
  const guestSeconds = wholeNumber(values["guest-seconds"], "--guest-seconds");
  const idleSeconds = wholeNumber(values["idle-seconds"], "--idle-seconds");
  const backendCpu = wholeNumber(values["backend-cpu"], "--backend-cpu", 0);
  const frontendCpu = wholeNumber(values["frontend-cpu"], "--frontend-cpu", 0);
  if (Deno.uid() !== 0) {
    console.error("bench: needs root (network namespaces, taps, apt-get)");
    Deno.exit(2);
  }
  const guestPin = values["guest-pin"];
  if (guestPin !== "on" && guestPin !== "off") {
    console.error(`bench: --guest-pin must be on or off, not ${JSON.stringify(guestPin)}`);
    Deno.exit(2);
  }
  const migrations = wholeNumber(values.migrations, "--migrations", 0);
  const only = values.only;
  const connections = wholeNumber(values.connections, "--connections", 0);
  if (only !== undefined && !["backend", "guest", "migration", "footprint"].includes(only)) {
    console.error(`bench: --only must be backend, guest, migration or footprint, not ${only}`);
    Deno.exit(2);
  }
  const log = (s: string) => console.log(s);
  const footprintVariants = variantsNamed(values["footprint-variants"]);
  for (const word of values["daemon-env"].split(" ").filter((a) => a !== "")) {
    if (!/^[A-Za-z_][A-Za-z0-9_]*=/.test(word)) {
      console.error(`bench: --daemon-env takes NAME=value words, not ${JSON.stringify(word)}`);
      Deno.exit(2);
    }
  }
  await setup(log, only !== "backend" && only !== "footprint");
  const results: Results = {
    machine: await machine(),
    command: ["deno task bench", ...Deno.args].join(" "),
    options: { ...values },
    backend: [] as BackendSample[],
    guest: [] as GuestSample[],
    idle: [] as IdleSample[],
    notes: [],
  };
  log(`bench: ${JSON.stringify(results.machine)}`);
  if (only) {
    // Re-running one half keeps the other half of the previous run (marked in the notes).
    try {
      const prev = JSON.parse(await Deno.readTextFile(`${values.out}/results.json`)) as Results;
      // A half kept twice keeps the date of the run that measured it.
      const keptNote = (half: string) =>
        prev.notes?.find((n) => n.startsWith(`${half} figures kept from the run of `)) ??
          `${half} figures kept from the run of ${prev.machine.date}`;
      if (only === "guest" && prev.ceiling?.length) results.ceiling = prev.ceiling;
      if (only === "backend" && prev.guest?.length) {
        results.guest = prev.guest;
        results.idle = prev.idle ?? [];
        results.notes.push(keptNote("guest-bound"));
      }
      if (only === "guest" && prev.backend?.length) {
        results.backend = prev.backend;
        results.notes.push(keptNote("backend-bound"));
      }
      if (only === "migration") {
        results.backend = prev.backend ?? [];
        results.guest = prev.guest ?? [];
        results.idle = prev.idle ?? [];
        if (prev.ceiling?.length) results.ceiling = prev.ceiling;
        results.notes.push(keptNote("backend- and guest-bound"));
      }
      if (only === "footprint") {
        results.backend = prev.backend ?? [];
        results.guest = prev.guest ?? [];
        results.idle = prev.idle ?? [];
        if (prev.ceiling?.length) results.ceiling = prev.ceiling;
        results.notes.push(keptNote("backend- and guest-bound"));
      }
      if (only !== "migration" && prev.migration?.length) {
        results.migration = prev.migration;
        results.notes.push(keptNote("migration"));
      }
      if (only !== "footprint" && prev.footprint?.length) {
        results.footprint = prev.footprint;
        results.notes.push(keptNote("footprint"));
      }
    } catch { /* no previous run */ }
  }

  if (only === undefined || only === "backend") {
    results.backend = [];
    const tests = values.tests ? values.tests.split(",") : [...BACKEND_TESTS];
    const o = {
      seconds,
      warmSeconds: 1.5,
      backendCpu,
      frontendCpu,
      vionetArgs: values["vionet-args"].split(" ").filter((a) => a !== ""),
      daemonFlags: values["deno-flags"].split(" ").filter((a) => a !== ""),
      daemonEnv: values["daemon-env"].split(" ").filter((a) => a !== ""),
      captureArgs: values["capture-args"].split(" ").filter((a) => a !== ""),
      log,
    };
    const noCeiling = await ceilingUnavailable();
    // The RX ceiling's C readers are rx64 backends: without gcc they are left out.
    const runs = (test: typeof BACKEND_TESTS[number]) =>
      backendsFor(test).filter((b) =>
        !noCeiling || !(RX_CEILING_BACKENDS as readonly string[]).includes(b)
      );
    for (let rep = 0; rep < reps; rep++) {
      for (const test of BACKEND_TESTS.filter((t) => tests.includes(t))) {
        for (const backend of runs(test)) {
          const s = await measureBackend(test, backend, rep, o);
          results.backend.push(s);
          log(
            `backend ${test} ${backend} rep ${rep}: ${(s.pps / 1e6).toFixed(3)} Mpps, ${
              s.gbps.toFixed(2)
            } Gbit/s, ` +
              `backend ${s.backendCores.toFixed(2)} cores${s.error ? " (failed)" : ""}`,
          );
        }
      }
      await writeReport(results, values.out);
    }
    if (noCeiling) {
      results.notes.push(`kernel ceiling not measured: ${noCeiling}`);
    } else {
      log("backend: the kernel's own tap write ceiling (bench/tap_ceiling.c)");
      results.ceiling = await measureTapCeiling({
        cpu: backendCpu,
        seconds: Math.min(seconds, 2),
        log,
      });
    }
    for (const test of BACKEND_TESTS) results.notes.push(`${test}: ${describeBackendTest(test)}`);
    results.notes.push(
      `CPUs: each backend process pinned to CPU ${o.backendCpu} (vionet: all its threads), the driver ` +
        `and the RX injector to CPU ${o.frontendCpu}; the raw writer and reader and the C readers ` +
        "(the RX ceiling) use a non-blocking tap.",
    );
  }

  if (only === undefined || only === "guest") {
    results.guest = [];
    results.idle = [];
    const why = guestUnavailable();
    if (why) {
      results.notes.push(`guest-bound bench skipped: ${why}`);
    } else {
      const o = {
        seconds: guestSeconds,
        reps: guestReps,
        idleSeconds,
        // The vCPU alone on the frontend's CPU, everything else on the backend's.
        pin: guestPin === "on" ? { vcpu: frontendCpu, io: backendCpu } : undefined,
        log,
      };
      // Boot by boot, backends alternating (and their order too, boot by
      // boot): a guest under TCG runs at one of two speeds, mostly one per
      // boot, and the machine drifts; interleaved, both hit both alike.
      for (let boot = 0; boot < guestBoots; boot++) {
        for (const offloads of ["on", "off"] as const) {
          const order = boot % 2 === 0 ? ["vionet", "qemu"] as const : ["qemu", "vionet"] as const;
          for (const backend of order) {
            log(`guest: ${backend}, offloads ${offloads}, boot ${boot + 1} of ${guestBoots}`);
            const idle = backend === "vionet" && offloads === "on" ? results.idle : undefined;
            results.guest.push(...await measureGuest(backend, offloads, { ...o, boot }, idle));
            await writeReport(results, values.out);
          }
        }
      }
    }
  }
  if ((only === undefined || only === "migration") && migrations > 0) {
    const why = guestUnavailable();
    if (why) {
      results.notes.push(`migration bench skipped: ${why}`);
    } else {
      results.migration = [] as MigrationSample[];
      for (let rep = 0; rep < migrations; rep++) {
        const order = rep % 2 === 0 ? ["vionet", "qemu"] as const : ["qemu", "vionet"] as const;
        for (const backend of order) {
          log(`migration: ${backend}, ${rep + 1} of ${migrations}`);
          const m = await measureMigration(backend, rep, {
            log,
            daemonLogs: values["daemon-logs"],
          });
          results.migration.push(m);
          log(
            `migration ${backend}: ${m.status}, downtime ${m.downtimeMs} ms ` +
              `(the source's stop ${m.stopMs?.toFixed(1)} ms), stalls ` +
              `${m.stallToGuestMs.toFixed(0)} / ${m.stallFromGuestMs.toFixed(0)} ms, ` +
              `bridge learnt ${m.bridgeMs.toFixed(2)} ms after the VM resumed, intact ${m.intact}`,
          );
          await writeReport(results, values.out);
        }
      }
    }
  }
  if (only === undefined || only === "footprint") {
    log("footprint: one daemon's memory, threads and startup (bench/footprint.ts)");
    results.footprint = await measureFootprint({
      connections,
      sampleEvery: 100,
      startups: 5,
      loadSeconds: 5,
      settleSeconds: 12,
      variants: footprintVariants,
      log,
    });
  }
  results.machine.loadAfter = (await Deno.readTextFile("/proc/loadavg")).split(" ").slice(0, 3)
    .join(" ");
  await writeReport(results, values.out);
  console.log("\n" + markdown(results));
  console.log(`bench: wrote ${values.out}/results.json, results.md, chart.svg`);
}

if (import.meta.main) await main();
