/**
 * A subprocess for poller_gc_test.ts, run with `--v8-flags=--expose-gc`
 * inside a network namespace the test made (so the collector can be forced
 * in the poller, and a heap the poller corrupts takes down only this
 * process). Prints one JSON line on stdout: the rx-done records it saw.
 *
 * It creates a tap with a static neighbour, starts the real data path with
 * `poller_gc_worker.ts` as the poller, posts one 256-byte chain, sends UDP
 * datagrams too big for it (so the poller's readv spills into its overflow
 * iovec, then drops them), and finally sends `setRegions`, at which the
 * worker reports its sentinels on stderr.
 *
 * Argument: the tap's name.
 *
 * @module
 */

import * as libc from "../../../parent/host/libc.ts";
import { createTap } from "../../../parent/host/tap.ts";
import { createDatapathBuffers, DatapathHost } from "../../../parent/control/datapath_host.ts";
import { EV_RX_DONE } from "../../../ipc/datapath.ts";
import type { Logger } from "../../../parent/control/log.ts";
import { FakeDeviceSide, GuestMemory } from "./fake_device_side.ts";

const TAP_IP = "198.18.0.1";
const NEIGHBOUR_IP = [198, 18, 0, 2];
const NEIGHBOUR_MAC = "02:00:00:00:00:02";
/** Datagrams sent, each 1400 bytes of 0xab: a 1454-byte read into 256 bytes of chain. */
const DATAGRAMS = 20;
const PAYLOAD = 1400;

async function sh(cmd: string[]): Promise<void> {
  const r = await new Deno.Command(cmd[0], { args: cmd.slice(1), stderr: "piped" }).output();
  if (!r.success) throw new Error(`${cmd.join(" ")}: ${new TextDecoder().decode(r.stderr)}`);
}

const logger: Logger = { level: "error", log: () => {} };

const name = Deno.args[0];
const tap = createTap(name, { up: false });
const guest = new GuestMemory(1 << 20);
let host: DatapathHost | undefined;
try {
  await sh(["sysctl", "-qw", `net.ipv6.conf.${name}.disable_ipv6=1`]);
  await sh(["ip", "addr", "add", `${TAP_IP}/24`, "dev", name]);
  await sh(["ip", "link", "set", "dev", name, "up"]);
  await sh(["ip", "neigh", "add", NEIGHBOUR_IP.join("."), "lladdr", NEIGHBOUR_MAC, "dev", name]);
  const buffers = createDatapathBuffers();
  host = await DatapathHost.start({
    tapFd: tap.fd,
    buffers,
    logger,
    ranges: [guest.range()],
    pollerUrl: new URL("./poller_gc_worker.ts", import.meta.url),
    rxUsed: {
      ringAddr: guest.base + 0x8000n,
      size: 256,
      eventAddr: guest.base + 0x9000n,
      eventIdx: true,
    },
  });
  const dev = new FakeDeviceSide(buffers, { guest, ringOffset: 0x8000, size: 256 });
  dev.postRx([{ iovs: [{ addr: guest.addr(0x1000), len: 256 }] }]);

  const fd = libc.socket(libc.AF_INET, libc.SOCK_DGRAM);
  const sa = new Uint8Array(16);
  sa[0] = libc.AF_INET;
  sa[2] = 0x30; // port 12345
  sa[3] = 0x39;
  sa.set(NEIGHBOUR_IP, 4);
  libc.connect(fd, sa);
  const payload = new Uint8Array(PAYLOAD).fill(0xab);
  const done: unknown[] = [];
  for (let i = 0; i < DATAGRAMS; i++) {
    libc.write(fd, payload);
    const deadline = performance.now() + 2000;
    while (done.length <= i && performance.now() < deadline) {
      await dev.waitFor(EV_RX_DONE, deadline - performance.now());
      done.push(...dev.takeRxDone());
    }
  }
  libc.close(fd);
  await host.setRegions([guest.range()]);
  console.log(JSON.stringify({ done }));
} finally {
  await host?.stop();
  guest.unmap();
  tap.close();
}
