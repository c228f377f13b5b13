/**
 * Backend-bound benchmark, no VM: DPDK's virtio-user driver (`dpdk-testpmd`)
 * plays the guest at full speed against a backend's vhost-user socket, and the
 * backend moves frames to or from a tap in a private namespace.
 *
 * Backends, each measured on the same set-up:
 * - `vionet` (`--offload auto`) and, for TSO, `vionet --offload off` (the
 *   device segments in software);
 * - `dpdk`: DPDK's own vhost backend, testpmd with `net_vhost0` and
 *   `net_tap0`, io forwarding (for TSO: csum forwarding, so that net_tap
 *   segments each 64 KiB frame in software into checksummed segments);
 * - `raw`: the ceiling, one thread `write()`ing the same frames (vnet header
 *   first) to a tap, or `read()`ing what is injected (bench/raw_tap.ts).
 *
 * Tests: `tx64`, `tx1514` (txonly, counted on the tap's rx counters),
 * `tx64q2` and `tx1514q2` (the same with two queue pairs: the driver sends
 * on both, vionet runs `--queues 2` on a multi-queue tap, DPDK's vhost and
 * net_tap two queues each; backend still on one core), `tso`
 * (csum engine with `tso set 1448 0`, fed by net_pcap replaying one 64 KiB TCP
 * frame), `rx64` (64 B frames injected into the tap from the namespace by a
 * testpmd on `net_af_packet`, counted by the rxonly driver).
 *
 * CPUs: the backend gets CPU `backendCpu`, the driver (and the injector)
 * `frontendCpu`; every process is pinned with taskset and testpmd's lcores
 * share its one CPU (`--lcores 0@N,1@N`).
 *
 * @module
 */

import { ROOT, startTaskFlags } from "../tests/helpers.ts";
import { pcapFile, TSO_MSS, tsoFrame } from "./frames.ts";
import {
  type Child,
  cpuSeconds,
  type LinkStats,
  linkStats,
  Netns,
  sleep,
  waitForLink,
  waitForPath,
} from "./proc.ts";
import { Testpmd } from "./testpmd.ts";
import { ceilingBinary } from "./tap_ceiling.ts";

/** The backend-bound tests. */
export const BACKEND_TESTS = ["tx64", "tx1514", "tso", "rx64", "tx64q2", "tx1514q2"] as const;
export type BackendTest = typeof BACKEND_TESTS[number];
/** The backends compared. */
export type BackendName =
  | "vionet"
  | "vionet-offload-off"
  | "vionet-capture"
  | "dpdk"
  | "raw"
  | "c-readv"
  | "c-uring-readv";

/**
 * The kernel's RX ceiling (rx64 only): one C thread reading the tap
 * (bench/tap_ceiling.c), `readv` a frame or io_uring READV batches with
 * RWF_NOWAIT as vionet's poller makes them. Measured as a backend, so with
 * the very injector, warm-up, window and counters of vionet's figure.
 */
export const RX_CEILING_BACKENDS = ["c-readv", "c-uring-readv"] as const;

/** Whether `backend` is a reader of its own on the tap (no vhost-user, no driver). */
export function isTapLoop(backend: BackendName): boolean {
  return backend === "raw" || backend === "c-readv" || backend === "c-uring-readv";
}

/** One measurement window. */
export interface BackendSample {
  test: BackendTest;
  backend: BackendName;
  rep: number;
  /** Frames per second delivered (for TSO: 64 KiB frames, from bytes). */
  pps: number;
  /** Frame bits per second delivered, in Gbit/s (Ethernet frame bytes, no vnet header). */
  gbps: number;
  /** CPU the backend process used over the window, in cores (utime+stime / wall). */
  backendCores: number;
  /** Frames the tap dropped over the window. */
  tapDropped: number;
  seconds: number;
  error?: string;
  /**
   * vionet backends: the daemon's RSS at the end of the window and its
   * peak so far (VmRSS, VmHWM), in kB: one NIC's memory under this load.
   */
  rssKb?: number;
  hwmKb?: number;
  /**
   * `vionet-capture` only (vionet with `--pcap`, capture on from the start):
   * what the capture did over the window, from `GET /capture`.
   */
  capture?: { packets: number; bytes: number; droppedBehind: number; fileBytes: number };
}

/** Settings of a backend-bound run. */
export interface BackendOptions {
  seconds: number;
  warmSeconds: number;
  backendCpu: number;
  frontendCpu: number;
  log: (line: string) => void;
  /** More Deno flags for the vionet daemon (e.g. `--cpu-prof`, `--v8-flags=--lite-mode`). */
  daemonFlags?: string[];
  /** More environment for the vionet daemon, `NAME=value` each (e.g. `MALLOC_ARENA_MAX=2`). */
  daemonEnv?: string[];
  /** More vionet options (e.g. `--io-uring off`), after the bench's own. */
  vionetArgs?: string[];
  /** More options for the `vionet-capture` backend only (e.g. `--pcap-snaplen 128`). */
  captureArgs?: string[];
  /** rx64: the tap's txqueuelen (default {@link RX_TAP_QUEUE_LEN}; the kernel's own is 1000). */
  rxTapQueueLen?: number;
  /** rx64: the driver's virtio ring size (default {@link RX_RING_SIZE}; the other tests' is 256). */
  rxRingSize?: number;
  /** rx64: whether the injector's af_packet bypasses the tap's qdisc (default true). */
  rxQdiscBypass?: boolean;
  /**
   * Runs alongside the measured window (e.g. a profiler attached to the
   * backend, `bench/profile.ts`); the window ends when both it and the
   * window's time are over.
   */
  during?: (backendPid: number, seconds: number) => Promise<void>;
}

/*
 * The rx64 set-up, and why (issue 27: the figure moved 0.19-0.55x of the
 * ceiling between runs). The injector and the driver are two busy-polling
 * testpmds sharing the front-end CPU; with HZ=250 the scheduler hands that
 * CPU over about every 4 ms. While the injector holds it the driver frees
 * no RX buffer, and while the driver holds it nothing is injected. With
 * the old set-up (a 256-entry ring, the tap's 1000-frame queue) the
 * backend filled the ring within about 1 ms of the injector's slice and
 * then waited, and ran dry within the driver's slice once the tap's queue
 * was read; how much of each 8 ms it could work depended on where the
 * slices fell, so the figure measured the scheduler. In the run of
 * 2026-12-06 04:31 vionet's rx64 was 0.154-0.155 Mpps at 0.28-0.37 of its
 * core: the tap's queue plus the ring, 1000 + 256 frames, per 8 ms cycle
 * is 0.157 Mpps; the set-up, not vionet, set that figure. Now:
 * - the ring holds a slice's worth of frames up to 1 Mpps (4096 entries,
 *   4 ms; the readers measured so far move 0.15-0.4 Mpps, the target is
 *   0.6x a ceiling of about 1), so the backend keeps working while the
 *   driver is off the CPU; vionet and DPDK's virtio-user both take 4096;
 * - the tap's queue holds twice that (8192 frames), so it keeps working
 *   while the injector is off the CPU;
 * - the injector skips the tap's qdisc (af_packet's PACKET_QDISC_BYPASS),
 *   the cheaper path to tun_net_xmit, so that on half a CPU it still
 *   outpaces the readers: the tap drops frames all along (the sample's
 *   tapDropped) and the figure is the reader's, not the injector's;
 * - every RX backend (vionet, DPDK, the raw and C readers) gets the same.
 * The C readers have no driver, so the injector has the front-end CPU to
 * itself there: a reader the tap drops frames for is still the limit.
 */
/** rx64: the tap's queue of frames for its reader (txqueuelen). */
export const RX_TAP_QUEUE_LEN = 8192;
/** rx64: the driver's RX (and TX) ring size. */
export const RX_RING_SIZE = 4096;

const TAP = "vb0";
const TSO_FRAME_BYTES = tsoFrame().byteLength;

/** Which backends a test compares. */
export function backendsFor(test: BackendTest): BackendName[] {
  if (test === "tso") return ["vionet", "vionet-capture", "vionet-offload-off", "dpdk", "raw"];
  if (queuePairsOf(test) > 1) return ["vionet", "dpdk"];
  if (test === "rx64") return ["vionet", "vionet-capture", "dpdk", "raw", ...RX_CEILING_BACKENDS];
  return ["vionet", "vionet-capture", "dpdk", "raw"];
}

/** The capture file and metrics socket of a `vionet-capture` run, in its directory. */
function captureArgs(dir: string): string[] {
  return [
    "--pcap",
    `${dir}/capture.pcapng`,
    "--pcap-max",
    "16G",
    "--metrics",
    `${dir}/metrics.sock`,
  ];
}

/** `GET /capture` on the daemon's metrics socket: the capture's counters. */
async function captureStatus(dir: string): Promise<NonNullable<BackendSample["capture"]>> {
  const conn = await Deno.connect({ transport: "unix", path: `${dir}/metrics.sock` });
  try {
    await conn.write(new TextEncoder().encode("GET /capture HTTP/1.1\r\nHost: x\r\n\r\n"));
    let text = "";
    const buf = new Uint8Array(8192);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      text += new TextDecoder().decode(buf.subarray(0, n));
    }
    const s = JSON.parse(text.slice(text.indexOf("\r\n\r\n") + 4));
    return {
      packets: s.packets,
      bytes: s.bytes,
      droppedBehind: s.droppedBehind,
      fileBytes: s.fileBytes,
    };
  } finally {
    conn.close();
  }
}

/** The queue pairs a test runs with. */
export function queuePairsOf(test: BackendTest): number {
  return test.endsWith("q2") ? 2 : 1;
}

/** The frame size of a TX test ("64" of tx64 and tx64q2). */
function txFrame(test: BackendTest): string {
  return /^tx(\d+)/.exec(test)![1];
}

/** The command lines a test runs, for the report (placeholders for paths). */
export function describeBackendTest(test: BackendTest): string {
  const fe =
    "dpdk-testpmd --no-huge --no-shconf --file-prefix P -m 512 --no-pci --lcores 0@1,1@1 " +
    "--vdev net_virtio_user0,path=SOCK,queues=1,queue_size=256";
  switch (test) {
    case "tx64":
    case "tx1514":
      return `${fe} -- -i: set fwd txonly retry; set txpkts ${txFrame(test)}; start`;
    case "tx64q2":
    case "tx1514q2":
      return `${fe.replace("queues=1", "queues=2")} -- -i --rxq=2 --txq=2: set fwd txonly retry; ` +
        `set txpkts ${txFrame(test)}; start; vionet --queues 2; DPDK backend: ` +
        "--vdev net_vhost0,iface=SOCK,queues=2 --vdev net_tap0,iface=TAP -- -i --rxq=2 --txq=2";
    case "tso":
      return `${fe} --vdev net_pcap0,rx_pcap=tso.pcap,infinite_rx=1 -- -i --mbuf-size=65535: ` +
        "(--disable-device-start) csum set ip sw 0; csum set tcp hw 0; tso set 1448 0; port start all; set fwd csum; start" +
        "; DPDK backend: --vdev net_vhost0,iface=SOCK,queues=1,tso=1 --vdev net_tap0,iface=TAP -- -i " +
        "--mbuf-size=65535 --max-pkt-len=1522: (--disable-device-start) port config 0 rx_offload tcp_cksum on; " +
        "port config 1 tx_offload multi_segs on; csum set ip hw 1; csum set tcp hw 1; tso set 1448 1; " +
        "csum mac-swap off 0; csum mac-swap off 1; port start all; set fwd csum; start";
    case "rx64":
      return `${fe.replace("queue_size=256", `queue_size=${RX_RING_SIZE}`)} -- -i: set fwd ` +
        `rxonly; start; ip link set TAP txqueuelen ${RX_TAP_QUEUE_LEN}; injector: ` +
        "dpdk-testpmd ... --vdev net_af_packet0,iface=TAP,qpairs=1,qdisc_bypass=1: " +
        "set fwd txonly; set txpkts 64; start; C readers (RX ceiling): tap_ceiling TAP - " +
        "readv|uring-readv nonblock 0";
  }
}

interface Running {
  ns: Netns;
  dir: string;
  backendPid: number;
  frontend?: Testpmd;
  parts: Array<{ quit(): Promise<unknown> }>;
  testpmds: Testpmd[];
  daemon?: Child;
}

/** Measures `test` on `backend` once, in a fresh namespace. */
export async function measureBackend(
  test: BackendTest,
  backend: BackendName,
  rep: number,
  o: BackendOptions,
): Promise<BackendSample> {
  const ns = await Netns.create();
  const dir = await Deno.makeTempDir({ prefix: "vionet-bench-" });
  const r: Running = { ns, dir, backendPid: 0, parts: [], testpmds: [] };
  const base = { test, backend, rep, seconds: o.seconds };
  try {
    await startBackend(test, backend, r, o);
    await startFrontend(test, backend, r, o);
    await sleep(o.warmSeconds * 1000);
    const capturing = backend === "vionet-capture";
    const ca = capturing ? await captureStatus(r.dir) : null;
    const a = await snapshot(r, test);
    const t0 = performance.now();
    await Promise.all([sleep(o.seconds * 1000), o.during?.(r.backendPid, o.seconds)]);
    const b = await snapshot(r, test);
    const dt = (performance.now() - t0) / 1000;
    const mem = backend.startsWith("vionet") ? daemonRss(r.backendPid) : {};
    const cb = capturing ? await captureStatus(r.dir) : null;
    const capture = ca && cb
      ? {
        packets: cb.packets - ca.packets,
        bytes: cb.bytes - ca.bytes,
        droppedBehind: cb.droppedBehind - ca.droppedBehind,
        fileBytes: cb.fileBytes - ca.fileBytes,
      }
      : undefined;
    if (Deno.env.get("VIONET_BENCH_DEBUG")) {
      for (const t of r.testpmds) {
        await t.cmd("show port stats all");
        o.log(t.child.tail(2500));
      }
      o.log(r.daemon?.tail(3000) ?? "");
    }
    if (r.daemon?.done) throw new Error(`the daemon exited:\n${r.daemon.tail(2000)}`);
    const rate = rates(test, backend, a, b, dt);
    if (rate.pps === 0) {
      const why = r.testpmds.length
        ? `no frames delivered; testpmd said:\n${
          r.testpmds.map((t) => t.child.tail(800)).join("\n")
        }`
        : "no frames delivered";
      throw new Error(why);
    }
    return { ...base, ...rate, seconds: dt, ...mem, ...(capture ? { capture } : {}) };
  } catch (e) {
    const why = (e as Error).message;
    o.log(`  ${test} ${backend} rep ${rep}: FAILED: ${why.slice(0, 2000)}`);
    return { ...base, pps: 0, gbps: 0, backendCores: 0, tapDropped: 0, error: why.slice(0, 500) };
  } finally {
    for (const p of r.parts.reverse()) await p.quit().catch(() => {});
    await ns.close();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

/** VmRSS and VmHWM of `pid`, in kB; empty if it cannot be read. */
function daemonRss(pid: number): { rssKb?: number; hwmKb?: number } {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    const kb = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, "m").exec(status)?.[1]);
    return { rssKb: kb("VmRSS"), hwmKb: kb("VmHWM") };
  } catch {
    return {};
  }
}

interface Snapshot {
  tap: LinkStats;
  driverRx: number;
  driverRxBytes: number;
  cpu: number;
}

async function snapshot(r: Running, test: BackendTest): Promise<Snapshot> {
  const tap = await linkStats(r.ns.name, TAP);
  let driverRx = 0, driverRxBytes = 0;
  if (test === "rx64" && r.frontend) {
    const s = await r.frontend.stats(0);
    driverRx = s.rxPackets;
    driverRxBytes = s.rxBytes;
  }
  return { tap, driverRx, driverRxBytes, cpu: cpuSeconds(r.backendPid) };
}

function rates(test: BackendTest, backend: BackendName, a: Snapshot, b: Snapshot, dt: number) {
  const backendCores = (b.cpu - a.cpu) / dt;
  if (test === "rx64") {
    const raw = isTapLoop(backend);
    const frames = raw ? b.tap.txPackets - a.tap.txPackets : b.driverRx - a.driverRx;
    const bytes = raw ? b.tap.txBytes - a.tap.txBytes : b.driverRxBytes - a.driverRxBytes;
    return {
      pps: frames / dt,
      gbps: bytes * 8 / dt / 1e9,
      backendCores,
      tapDropped: b.tap.txDropped - a.tap.txDropped,
    };
  }
  const bytes = b.tap.rxBytes - a.tap.rxBytes;
  const frames = test === "tso" ? bytes / TSO_FRAME_BYTES : b.tap.rxPackets - a.tap.rxPackets;
  return {
    pps: frames / dt,
    gbps: bytes * 8 / dt / 1e9,
    backendCores,
    tapDropped: b.tap.rxDropped - a.tap.rxDropped,
  };
}

async function startBackend(
  test: BackendTest,
  backend: BackendName,
  r: Running,
  o: BackendOptions,
): Promise<void> {
  const sock = `${r.dir}/vhost.sock`;
  const prefix = `vb${r.ns.name.slice(-8)}`;
  const pairs = queuePairsOf(test);
  const queueArgs = pairs > 1 ? [`--rxq=${pairs}`, `--txq=${pairs}`] : [];
  if (backend === "vionet" || backend === "vionet-offload-off" || backend === "vionet-capture") {
    const main = `${ROOT}main.ts`;
    const daemon = r.ns.spawn([
      ...(o.daemonEnv?.length ? ["env", ...o.daemonEnv] : []),
      Deno.execPath(),
      "run",
      ...startTaskFlags(),
      ...(o.daemonFlags ?? []),
      main,
      "--socket-path",
      sock,
      "--tap",
      TAP,
      "--offload",
      backend === "vionet-offload-off" ? "off" : "auto",
      "--log-level",
      "warn",
      "--queues",
      String(pairs),
      ...(backend === "vionet-capture" ? [...captureArgs(r.dir), ...(o.captureArgs ?? [])] : []),
      ...(o.vionetArgs ?? []),
    ], { cpu: o.backendCpu, cwd: ROOT });
    r.daemon = daemon;
    r.backendPid = daemon.pid;
    r.parts.push({ quit: () => daemon.stop("SIGTERM", 5000) });
    await waitForPath(sock, 30_000, `(vionet did not start:\n${daemon.tail()})`);
  } else if (backend === "dpdk") {
    const tso = test === "tso";
    const vhost = await Testpmd.start(r.ns, {
      cpu: o.backendCpu,
      prefix: `${prefix}v`,
      vdevs: [
        `net_vhost0,iface=${sock},queues=${pairs}${tso ? ",tso=1" : ""}`,
        `net_tap0,iface=${TAP}`,
      ],
      mbufSize: tso ? 65535 : undefined,
      mbufs: tso ? 2048 : undefined,
      // net_tap refuses a TSO mbuf whose tso_segsz + headers exceed its MTU (1448 + 54 > 1500):
      // net_tap allows at most 1522 B frames, so an MTU of 1504 from the first configure on.
      appArgs: tso ? ["--disable-device-start", "--max-pkt-len=1522"] : queueArgs,
    });
    r.parts.push(vhost);
    r.testpmds.push(vhost);
    r.backendPid = vhost.child.pid;
    if (tso) {
      // net_tap segments an mbuf in software (librte_gso) only when it carries
      // RTE_MBUF_F_TX_TCP_SEG with l2/l3/l4_len and tso_segsz; io forwarding
      // passes on what net_vhost0 set, and that is never TX_TCP_SEG: with its
      // default compliant-ol-flags the guest's VIRTIO_NET_HDR_GSO_TCPV4 frame
      // arrives as RTE_MBUF_F_RX_LRO, so net_tap sees a 64 KiB frame above its
      // MTU and counts a TX error. legacy-ol-flags=1 does set TX_TCP_SEG, but
      // librte_gso rewrites each segment's IPv4 total_length and id without
      // its header checksum, and nothing asks net_tap for RTE_MBUF_F_TX_IP_CKSUM:
      // every segment would leave with a bad IPv4 checksum. So the csum engine
      // marks each TCP frame longer than one 1448 B segment (the guest's
      // gso_size) for TSO with IPv4 and TCP checksums on the tap port, and
      // net_tap writes valid <= 1502 B segments. Port 0's rx tcp_cksum keeps
      // net_vhost from first checksumming the whole 64 KiB frame in software
      // (the guest's partial checksum stays, net_tap fills in each segment's).
      await vhost.cmds([
        "port config 0 rx_offload tcp_cksum on",
        "port config 1 tx_offload multi_segs on",
        "csum set ip hw 1",
        "csum set tcp hw 1",
        `tso set ${TSO_MSS} 1`,
        // io forwarding leaves the addresses alone; so does this engine then.
        "csum mac-swap off 0",
        "csum mac-swap off 1",
        "port start all",
        "set fwd csum",
        "start",
      ]);
    } else {
      await vhost.cmds(["set fwd io", "start"]);
    }
    await waitForPath(sock, 10_000, "(net_vhost0 did not create it)");
  } else if (backend === "c-readv" || backend === "c-uring-readv") {
    if (test !== "rx64") throw new Error(`${backend} reads; it has no ${test} test`);
    const reader = r.ns.spawn(
      [await ceilingBinary(), TAP, "-", backend.slice(2), "nonblock", "0"],
      { cpu: o.backendCpu },
    );
    r.backendPid = reader.pid;
    r.parts.push({ quit: () => reader.stop("SIGKILL", 2000) });
    await reader.waitFor(/ready/, 0, 30_000, "tap_ceiling to open its tap");
  } else {
    const mode = test === "rx64" ? "read" : "write";
    const frame = test === "tso" ? "tso" : test === "rx64" ? "64" : txFrame(test);
    const raw = r.ns.spawn([
      Deno.execPath(),
      "run",
      "-A",
      `${ROOT}bench/raw_tap.ts`,
      "--tap",
      TAP,
      "--mode",
      mode,
      "--frame",
      frame,
    ], { cpu: o.backendCpu, cwd: ROOT });
    r.backendPid = raw.pid;
    r.parts.push({ quit: () => raw.stop("SIGKILL", 2000) });
    await raw.waitFor(/ready/, 0, 30_000, "raw_tap.ts to open its tap");
  }
  await waitForLink(r.ns.name, TAP, 10_000);
}

async function startFrontend(
  test: BackendTest,
  backend: BackendName,
  r: Running,
  o: BackendOptions,
): Promise<void> {
  const sock = `${r.dir}/vhost.sock`;
  const prefix = `vb${r.ns.name.slice(-8)}`;
  if (!isTapLoop(backend)) {
    const pairs = queuePairsOf(test);
    const ring = test === "rx64" ? o.rxRingSize ?? RX_RING_SIZE : 256;
    const virtio = `net_virtio_user0,path=${sock},queues=${pairs},queue_size=${ring}`;
    if (test === "tso") {
      const pcap = `${r.dir}/tso.pcap`;
      await Deno.writeFile(pcap, pcapFile([tsoFrame()]));
      const fe = await Testpmd.start(r.ns, {
        cpu: o.frontendCpu,
        prefix: `${prefix}f`,
        vdevs: [virtio, `net_pcap0,rx_pcap=${pcap},infinite_rx=1`],
        mbufSize: 65535,
        mbufs: 2048,
        // Offloads are set before the first start: a stop/start cycle reconnects.
        appArgs: ["--disable-device-start"],
      });
      r.parts.push(fe);
      r.testpmds.push(fe);
      r.frontend = fe;
      await fe.cmds([
        "csum set ip sw 0",
        "csum set tcp hw 0",
        "tso set 1448 0",
        "port start all",
        "set fwd csum",
        "start",
      ]);
    } else {
      const fe = await Testpmd.start(r.ns, {
        cpu: o.frontendCpu,
        prefix: `${prefix}f`,
        vdevs: [virtio],
        appArgs: pairs > 1 ? [`--rxq=${pairs}`, `--txq=${pairs}`] : [],
      });
      r.parts.push(fe);
      r.testpmds.push(fe);
      r.frontend = fe;
      if (test === "rx64") {
        await fe.cmds(["set fwd rxonly", "start"]);
      } else {
        await fe.cmds(["set fwd txonly retry", `set txpkts ${txFrame(test)}`, "start"]);
      }
    }
  }
  if (test === "rx64") {
    await r.ns.exec(["ip", "link", "set", TAP, "up"]);
    const qlen = o.rxTapQueueLen ?? RX_TAP_QUEUE_LEN;
    await r.ns.exec(["ip", "link", "set", TAP, "txqueuelen", String(qlen)]);
    const bypass = o.rxQdiscBypass ?? true;
    const inj = await Testpmd.start(r.ns, {
      cpu: o.frontendCpu,
      prefix: `${prefix}i`,
      vdevs: [`net_af_packet0,iface=${TAP},qpairs=1${bypass ? ",qdisc_bypass=1" : ""}`],
    });
    r.parts.push(inj);
    r.testpmds.push(inj);
    await inj.cmds(["set fwd txonly", "set txpkts 64", "start"]);
  }
}
