/**
 * `deno task demo`: vionet end to end in one command (issue 4, item 5).
 *
 * Builds the test guest if needed (scripts/build_guest.sh), creates a private
 * network namespace, starts the daemon in it, boots a Linux guest under QEMU
 * with `-netdev vhost-user` on the daemon's socket, prints what the guest's
 * driver negotiated and the offloads TUNSCAP put on the tap, runs iperf3 each
 * way, and cleans everything up (also on Ctrl-C or a failure). Needs root,
 * QEMU, iperf3 and ethtool (`scripts/setup.sh --test` installs them).
 *
 *   deno task demo [--seconds N] [--offload auto|off] [--log]
 *
 * @module
 */

import { parseArgs } from "node:util";
import {
  type IperfResult,
  parseEthtoolFeatures,
  Rig,
  type RigGuest,
  rigUnavailable,
} from "../tests/e2e/vionet_rig.ts";
import { guestAssetsDir, kvmUsable } from "../tests/e2e/guest.ts";

const USAGE = `usage: deno task demo [--seconds N] [--offload auto|off] [--log]
  --seconds N        iperf3 duration each way (default 5)
  --offload auto|off the daemon's --offload (default auto)
  --log              print the daemon's log at the end`;

const TAP_OFFLOADS = ["tx-checksum-ip-generic", "tx-tcp-segmentation", "tx-tcp6-segmentation"];
const REPO = new URL("..", import.meta.url).pathname;

interface DemoOptions {
  seconds: number;
  offload: "auto" | "off";
  log: boolean;
}

function parseDemoArgs(argv: string[]): DemoOptions | string {
  let values;
  try {
    ({ values } = parseArgs({
      args: argv,
      options: {
        seconds: { type: "string", default: "5" },
        offload: { type: "string", default: "auto" },
        log: { type: "boolean", default: false },
        help: { type: "boolean", default: false },
      },
      strict: true,
      allowPositionals: false,
    }));
  } catch (e) {
    return `${(e as Error).message.split("\n")[0]}\n${USAGE}`;
  }
  if (values.help) return USAGE;
  const seconds = Number(values.seconds);
  if (!Number.isInteger(seconds) || seconds < 1 || seconds > 60) {
    return `--seconds "${values.seconds}" must be a whole number from 1 to 60`;
  }
  if (values.offload !== "auto" && values.offload !== "off") {
    return `--offload "${values.offload}" must be auto or off`;
  }
  return { seconds, offload: values.offload, log: values.log };
}

/** Runs build_guest.sh; shows its output only when it does more than find the guest up to date. */
async function buildGuest(): Promise<void> {
  const child = new Deno.Command(`${REPO}scripts/build_guest.sh`, {
    args: [guestAssetsDir()],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const show = async (stream: ReadableStream<Uint8Array>) => {
    let buf = "";
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      buf += text;
      let nl: number;
      while ((nl = buf.indexOf("\n")) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (!/up to date/.test(line)) console.log(`  ${line}`);
      }
    }
    if (buf && !/up to date/.test(buf)) console.log(`  ${buf}`);
  };
  const [status] = await Promise.all([child.status, show(child.stdout), show(child.stderr)]);
  if (!status.success) throw new Error(`scripts/build_guest.sh exited ${status.code}`);
}

function gbit(r: IperfResult): string {
  return `${(r.bitsPerSecond / 1e9).toFixed(2)} Gbit/s`;
}

function onOff(features: Map<string, string>, names: string[]): string {
  return names.map((n) => `${n} ${features.get(n) ?? "?"}`).join(", ");
}

async function demo(opts: DemoOptions): Promise<number> {
  if (Deno.uid() !== 0) {
    console.error("demo: needs root (it creates a network namespace and a tap)");
    return 1;
  }
  console.log("vionet demo: a Linux guest's virtio-net driver on vionet, over vhost-user");
  console.log("- test guest: checking (scripts/build_guest.sh)");
  await buildGuest();
  const missing = rigUnavailable();
  if (missing) {
    console.error(
      `demo: cannot run: ${missing}\n(scripts/setup.sh --test installs what is missing)`,
    );
    return 1;
  }

  const rig = await Rig.create({ offload: opts.offload });
  let closing: Promise<Deno.CommandStatus> | undefined;
  const close = () => closing ??= rig.close();
  // Ctrl-C: kill everything at once; whatever the demo waits for then fails,
  // and the finally block reports the cleanup. A second Ctrl-C exits at once.
  let interrupted = false;
  const onSignal = () => {
    if (interrupted) Deno.exit(130);
    interrupted = true;
    console.log("\ninterrupted: cleaning up");
    close();
  };
  Deno.addSignalListener("SIGINT", onSignal);
  Deno.addSignalListener("SIGTERM", onSignal);
  let guest: RigGuest | undefined;
  try {
    console.log(
      `- namespace ${rig.netns}: tap ${rig.tap} 198.18.0.1/24, daemon pid ${rig.daemon.pid} ` +
        `(--offload ${opts.offload})`,
    );
    console.log(`- booting the guest (QEMU, ${kvmUsable() ? "KVM" : "TCG"})...`);
    guest = await rig.bootGuest();
    const g = guest.guest;
    if (guest.boot.netStatus !== "ok") {
      throw new Error(`the guest's eth0 did not come up (${guest.boot.netStatus})`);
    }
    console.log(
      `  up in ${(guest.boot.bootMs / 1000).toFixed(1)} s, eth0 198.18.0.2/24 has a link`,
    );

    const negotiated = rig.daemon.negotiated(guest.logFrom) ?? ["(no negotiated line in the log)"];
    console.log(`- negotiated: ${negotiated.join(" ")}`);
    console.log(`- tap offloads (TUNSCAP): ${onOff(await rig.tapFeatures(), TAP_OFFLOADS)}`);
    const eth = await g.run("ethtool -k eth0", 20_000);
    console.log(
      `- guest eth0: ${
        onOff(parseEthtoolFeatures(eth.output), ["tx-checksumming", "tcp-segmentation-offload"])
      }`,
    );

    console.log(`- iperf3, ${opts.seconds} s each way:`);
    const up = await rig.iperf3(g, { reverse: false, seconds: opts.seconds });
    console.log(`  guest -> host  ${gbit(up)}`);
    const down = await rig.iperf3(g, { reverse: true, seconds: opts.seconds });
    console.log(`  host -> guest  ${gbit(down)}`);
    return 0;
  } catch (e) {
    if (interrupted) return 130;
    console.error(`demo failed: ${(e as Error).message}`);
    console.error(`--- daemon log (tail) ---\n${rig.daemon.lines().slice(-30).join("\n")}`);
    return 1;
  } finally {
    if (guest) await guest.guest.shutdown(10_000).catch(() => {});
    const status = await close();
    Deno.removeSignalListener("SIGINT", onSignal);
    Deno.removeSignalListener("SIGTERM", onSignal);
    if (opts.log) console.log(`--- daemon log ---\n${rig.daemon.log()}`);
    console.log(
      `- cleaned up: guest stopped, daemon exited ${status.code}, namespace ${rig.netns} removed`,
    );
  }
}

if (import.meta.main) {
  const opts = parseDemoArgs(Deno.args);
  if (typeof opts === "string") {
    console.log(opts);
    Deno.exit(opts === USAGE ? 0 : 2);
  }
  Deno.exit(await demo(opts));
}
