/**
 * `--metrics` against a real guest: curl scrapes the daemon's unix socket
 * while the guest moves traffic; every scrape is held to the text format
 * 0.0.4 by a strict parser; every counter the SIGUSR2 dump logs has a named
 * series; the counters move between two scrapes. Meanwhile clients that
 * connect and say nothing, send garbage, or ask and never read keep
 * hammering the socket: a transfer each way completes intact, a driver
 * reload (a vhost-user renegotiation on the same main thread) goes through,
 * and curl keeps getting answers.
 */

import assert from "node:assert/strict";
import { Rig, rigUnavailable } from "./vionet_rig.ts";
import type { Guest } from "./guest.ts";
import { GUEST_IP, HOST_IP } from "./vionet_rig.ts";
import { type Exposition, parseExposition, valueOf } from "../parent/control/exposition_parser.ts";
import { PAIR_METRICS, QUEUE_METRICS } from "../../parent/control/metrics.ts";

function onPath(tool: string): boolean {
  return ["/usr/bin/", "/bin/", "/usr/local/bin/"].some((d) => {
    try {
      return Deno.statSync(d + tool).isFile;
    } catch {
      return false;
    }
  });
}

const unavailable = rigUnavailable() ??
  (onPath("curl") ? undefined : "needs curl (scripts/setup.sh --test installs it)");

/** One scrape with curl; the status line, the Content-Type and the parsed exposition. */
async function scrape(path: string): Promise<{ contentType: string; e: Exposition; text: string }> {
  const out = await new Deno.Command("curl", {
    args: ["-sS", "-i", "--max-time", "10", "--unix-socket", path, "http://localhost/metrics"],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const dec = new TextDecoder();
  assert.equal(out.code, 0, `curl exited ${out.code}: ${dec.decode(out.stderr)}`);
  const raw = dec.decode(out.stdout);
  const split = raw.indexOf("\r\n\r\n");
  const head = raw.slice(0, split);
  const text = raw.slice(split + 4);
  assert.match(head, /^HTTP\/1\.1 200 OK\r\n/);
  const contentType = /\r\nContent-Type: ([^\r]*)/i.exec(head)?.[1] ?? "";
  return {
    contentType,
    e: parseExposition(text, { counterSuffix: true, requireHelp: true }),
    text,
  };
}

/** The daemon's SIGUSR2 dump: per-queue objects (rx0, tx0, ...) and the pairs' data path. */
async function dump(rig: Rig): Promise<Record<string, Record<string, unknown>>> {
  const from = rig.daemon.lines().length;
  rig.daemon.signal("SIGUSR2");
  await rig.daemon.waitFor(/\[stats\] info: datapath /, 10_000, from);
  const out: Record<string, Record<string, unknown>> = {};
  for (const line of rig.daemon.lines().slice(from)) {
    const m = /\[stats\] info: (\w+) (\{.*\})$/.exec(line);
    if (m) out[m[1]] = JSON.parse(m[2]);
  }
  return out;
}

/**
 * Clients that misbehave until stopped: `idle` connections that never write
 * or read (each reopened when the daemon closes it at its deadline), one
 * garbage request every 50 ms (each must be answered 400), and requests
 * whose answers are never read.
 */
function hostileClients(path: string, idle: number) {
  let stop = false;
  const held = new Set<Deno.UnixConn>();
  const counts = { garbage400: 0, garbageOther: 0, idleClosed: 0, unread: 0 };
  const timers = new Set<ReturnType<typeof setTimeout>>();
  const hold = async () => {
    while (!stop) {
      let c: Deno.UnixConn;
      try {
        c = await Deno.connect({ transport: "unix", path });
      } catch {
        await new Promise((r) => setTimeout(r, 100));
        continue;
      }
      held.add(c);
      try {
        // Nothing is sent: the daemon must close it (read gives null) after its 2 s.
        if ((await c.read(new Uint8Array(64))) === null) counts.idleClosed++;
      } catch { /* closed by us at the end */ }
      held.delete(c);
      closeQuietly(c);
    }
  };
  const junk = async () => {
    const bytes = new Uint8Array(512);
    while (!stop) {
      crypto.getRandomValues(bytes);
      bytes.set(new TextEncoder().encode("\x00\x01garbage\r\n\r\n"), 0);
      try {
        const c = await Deno.connect({ transport: "unix", path });
        try {
          await c.write(bytes);
          const buf = new Uint8Array(256);
          const n = await c.read(buf);
          const line = new TextDecoder().decode(buf.subarray(0, n ?? 0));
          if (line.startsWith("HTTP/1.1 400 ")) counts.garbage400++;
          else counts.garbageOther++;
          // And ask for metrics on a connection that is never read.
          const unread = await Deno.connect({ transport: "unix", path });
          await unread.write(new TextEncoder().encode("GET /metrics HTTP/1.1\r\n\r\n"));
          held.add(unread);
          counts.unread++;
          timers.add(setTimeout(() => {
            held.delete(unread);
            closeQuietly(unread);
          }, 3000));
        } finally {
          c.close();
        }
      } catch {
        counts.garbageOther++;
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  const running = Promise.all([...Array.from({ length: idle }, hold), junk()]);
  return {
    counts,
    async stop() {
      stop = true;
      for (const c of held) closeQuietly(c);
      await running;
      for (const t of timers) clearTimeout(t);
      for (const c of held) closeQuietly(c);
    },
  };
}

function closeQuietly(c: Deno.UnixConn): void {
  try {
    c.close();
  } catch { /* already closed */ }
}

async function reloadDriver(guest: Guest): Promise<void> {
  const r = await guest.run(
    [
      "rmmod virtio_net || exit 11",
      "modprobe virtio_net || exit 13",
      "i=0; while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done",
      "ip link set eth0 up || exit 14",
      `ip addr add ${GUEST_IP}/24 dev eth0 || exit 15`,
      `ip route add default via ${HOST_IP} || exit 16`,
      'i=0; while [ "$(cat /sys/class/net/eth0/operstate)" != up ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done',
      `ping -c 1 -W 5 ${HOST_IP} >/dev/null || exit 17`,
    ].join("\n"),
    60_000,
  );
  assert.equal(r.status, 0, r.output);
}

Deno.test({
  name: "--metrics: curl scrapes a strict exposition of every counter while a guest moves " +
    "traffic, and idle, garbage and never-reading clients stall neither the data path nor " +
    "vhost-user",
  ignore: unavailable !== undefined,
  sanitizeOps: false,
  sanitizeResources: false,
  async fn() {
    const dir = await Deno.makeTempDir({ prefix: "vionet-metrics-" });
    await Deno.chmod(dir, 0o755);
    const path = `${dir}/metrics/vionet.sock`;
    try {
      await Rig.run({ daemonArgs: ["--metrics", path] }, async (rig) => {
        await rig.daemon.waitFor(/serving metrics on /, 10_000);
        const { guest } = await rig.bootGuest();
        await rig.daemon.waitFor(/queues running/, 30_000);

        const before = await scrape(path);
        assert.equal(before.contentType, "text/plain; version=0.0.4");
        const e0 = before.e;
        assert.equal(valueOf(e0, "vionet_frontend_connected"), 1);
        assert.equal(valueOf(e0, "vionet_connections_total"), 1);
        const info = [...e0.series.values()].find((s) => s.name === "vionet_info");
        assert.ok(info, "no vionet_info");
        assert.equal(info.labels.tap, rig.tap);
        assert.match(info.labels.features, /\bMRG_RXBUF\b/);
        assert.match(info.labels.offloads, /\bTUN_F_CSUM\b/);
        assert.ok(
          ![...e0.families.keys()].some((n) => n.endsWith("_unnamed")),
          `a counter without a name:\n${before.text}`,
        );

        // Every counter of the SIGUSR2 dump has its series.
        const d = await dump(rig);
        for (const queue of ["rx0", "tx0"]) {
          assert.ok(d[queue], `no ${queue} in the dump`);
          for (const key of Object.keys(d[queue])) {
            const reason = /^(?:error|drop)_(.+)$/.exec(key)?.[1];
            const name = reason !== undefined
              ? "vionet_queue_drops_total"
              : QUEUE_METRICS[key]?.name;
            assert.ok(name, `the dump's ${queue}.${key} has no metric name`);
            const labels: Record<string, string> = reason !== undefined
              ? { queue, reason }
              : { queue };
            assert.notEqual(
              valueOf(e0, name, labels),
              undefined,
              `${name}${JSON.stringify(labels)}`,
            );
          }
        }
        const datapath = JSON.parse(
          rig.daemon.lines().findLast((l) => / datapath \{/.test(l))!.replace(/^.* datapath /, ""),
        ) as Record<string, unknown>; // pair 0's line; pair N's say "datapath pairN {...}"
        for (const key of Object.keys(datapath)) {
          if (key.endsWith("Engine")) continue; // labels of vionet_pair_engine_info
          assert.ok(PAIR_METRICS[key], `the dump's pair0.${key} has no metric name`);
          assert.notEqual(valueOf(e0, PAIR_METRICS[key].name, { pair: "0" }), undefined, key);
        }

        // Traffic and a renegotiation while misbehaving clients keep at it.
        const hostile = hostileClients(path, 3);
        let moving: Exposition | null = null;
        const answered: number[] = [];
        let scraping = true;
        const scrapes = (async () => {
          while (scraping) {
            const t0 = Date.now();
            await scrape(path);
            answered.push(Date.now() - t0);
            await new Promise((r) => setTimeout(r, 300));
          }
        })();
        try {
          const up = await rig.sendFromGuest(guest, 16);
          assert.equal(up.receivedSha256, up.sentSha256, "guest -> host");
          const down = await rig.sendToGuest(guest, 16);
          assert.equal(down.receivedSha256, down.sentSha256, "host -> guest");
          // The queue and pair counters start again when the driver renegotiates:
          // judge them before that (past the 250 ms a scrape is reused for).
          await new Promise((r) => setTimeout(r, 400));
          moving = (await scrape(path)).e;
          const from = rig.daemon.lines().length;
          await reloadDriver(guest);
          assert.ok(rig.daemon.negotiated(from), "no renegotiation after the driver reload");
        } finally {
          scraping = false;
          await scrapes;
          await hostile.stop();
        }
        const c = hostile.counts;
        console.log(
          `  ${answered.length} scrapes meanwhile, slowest ${Math.max(...answered)} ms; ` +
            `garbage answered 400: ${c.garbage400}, idle clients closed: ${c.idleClosed}, ` +
            `unread requests: ${c.unread}`,
        );
        assert.ok(answered.length >= 3, `only ${answered.length} scrapes answered`);
        assert.ok(c.garbage400 >= 10 && c.garbageOther === 0, JSON.stringify(c));
        assert.ok(c.idleClosed >= 3, JSON.stringify(c));

        // Scrapes are coalesced (one less than 250 ms old is served again): wait
        // that out, so this one counts every garbage request answered above.
        await new Promise((r) => setTimeout(r, 400));
        const after = await scrape(path);
        const e1 = after.e;
        const moved = (name: string, labels: Record<string, string>, atLeast: number) => {
          const a = valueOf(e0, name, labels) ?? 0;
          const b = valueOf(moving!, name, labels) ?? NaN;
          assert.ok(b - a >= atLeast, `${name}${JSON.stringify(labels)}: ${a} -> ${b}`);
        };
        const mib16 = 16 * 2 ** 20;
        moved("vionet_queue_chains_total", { queue: "tx0" }, 100);
        moved("vionet_queue_used_total", { queue: "rx0" }, 100);
        moved("vionet_queue_interrupts_total", { queue: "rx0" }, 1);
        moved("vionet_tap_receive_bytes_total", {}, mib16);
        moved("vionet_tap_transmit_bytes_total", {}, mib16);
        moved("vionet_pair_tx_kicks_total", { pair: "0" }, 1);
        assert.ok(
          (valueOf(e1, "vionet_http_responses_total", { code: "400" }) ?? 0) >= c.garbage400,
          `vionet_http_responses_total{code="400"} ` +
            `${valueOf(e1, "vionet_http_responses_total", { code: "400" })}, ` +
            `the clients saw ${c.garbage400}`,
        );
        assert.equal(valueOf(e1, "vionet_frontend_connected"), 1);
        const tap = await rig.tapCounters();
        assert.ok(
          (valueOf(e1, "vionet_tap_receive_bytes_total") ?? Infinity) <= tap.rxBytes,
          "the tap's counters are the kernel's",
        );
      });
      assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound, "the socket is removed");
    } finally {
      await Deno.remove(dir, { recursive: true }).catch(() => {});
    }
  },
});
