import assert from "node:assert/strict";
import {
  escapeLabelValue,
  Exposition,
  formatMetrics,
  type MetricsSnapshot,
  PAIR_METRICS,
  QUEUE_METRICS,
} from "../../../parent/control/metrics.ts";
import { ExpositionError, parseExposition, valueOf } from "./exposition_parser.ts";

/** A snapshot shaped like a real one: two pairs, drops by reason, a tap. */
function snapshot(over: Partial<MetricsSnapshot> = {}): MetricsSnapshot {
  const queue = (n: number) => ({
    chains: 10 * n,
    used: 10 * n,
    dropped: 1,
    interrupts: 4,
    kicksMissed: 0,
    error_NEXT_OUT_OF_RANGE: 1,
    ring_availIdx: 65535,
    ring_lastAvail: 12,
    ring_usedIdx: 12,
    ring_deviceUsedIdx: 12,
    ring_availFlags: 0,
    ring_usedFlags: 1,
    ring_inFlight: 0,
    ring_usedEvent: 3,
    ring_availEvent: 4,
    frames: 9 * n,
    bytes: 1500 * n,
  });
  return {
    queues: {
      rx0: { ...queue(1), posted: 256, drop_too_big: 2 },
      tx0: { ...queue(2), passThrough: 18, csumCompleted: 0, segmented: 0, segments: 0 },
      rx1: queue(3),
      tx1: { ...queue(4), drop_bad_header: 5 },
    },
    pairs: {
      "0": {
        pollerStarved: false,
        pollerNoBuffer: 3,
        writerEngine: "io_uring",
        pollerEngine: "readv",
        rxKicks: 7,
      },
      "1": { pollerStarved: true, writerEngine: "writev", pollerEngine: "io_uring" },
    },
    pairsUnanswered: [],
    tap: {
      name: "vionet0",
      counters: {
        receive: {
          bytes: 2 ** 40,
          packets: 5,
          errs: 0,
          drop: 0,
          fifo: 0,
          frame: 0,
          compressed: 0,
          multicast: 1,
        },
        transmit: {
          bytes: 9,
          packets: 1,
          errs: 0,
          drop: 2,
          fifo: 0,
          colls: 0,
          carrier: 0,
          compressed: 0,
        },
      },
      offloads: ["TUN_F_CSUM", "TUN_F_TSO4"],
    },
    features: ["CSUM", "GUEST_CSUM", "MRG_RXBUF"],
    connected: true,
    connectionsServed: 3,
    connectionsRefused: 1,
    uptimeSeconds: 12.3456,
    retiredMemory: { reservedBytes: 0, ranges: 0, retired: 0, reclaimedBytes: 0 },
    httpResponses: new Map([[200, 4], [400, 1]]),
    ...over,
  };
}

Deno.test("formatMetrics(): strict exposition, every queue counter named, counters end in _total", () => {
  const text = formatMetrics(snapshot());
  const e = parseExposition(text, { counterSuffix: true, requireHelp: true });
  assert.equal(valueOf(e, "vionet_queue_chains_total", { queue: "rx1" }), 30);
  assert.equal(valueOf(e, "vionet_queue_ring_avail_idx", { queue: "tx1" }), 65535);
  assert.equal(
    valueOf(e, "vionet_queue_drops_total", { queue: "rx0", reason: "NEXT_OUT_OF_RANGE" }),
    1,
  );
  assert.equal(valueOf(e, "vionet_queue_drops_total", { queue: "tx1", reason: "bad_header" }), 5);
  assert.equal(valueOf(e, "vionet_queue_rx_buffers_posted", { queue: "rx0" }), 256);
  assert.equal(valueOf(e, "vionet_pair_rx_no_buffer_total", { pair: "0" }), 3);
  assert.equal(valueOf(e, "vionet_pair_poller_starved", { pair: "1" }), 1);
  assert.equal(
    valueOf(e, "vionet_pair_engine_info", { pair: "0", writer: "io_uring", poller: "readv" }),
    1,
  );
  assert.equal(valueOf(e, "vionet_tap_receive_bytes_total"), 2 ** 40);
  assert.equal(valueOf(e, "vionet_tap_transmit_drop_total"), 2);
  assert.equal(
    valueOf(e, "vionet_info", {
      tap: "vionet0",
      features: "CSUM GUEST_CSUM MRG_RXBUF",
      offloads: "TUN_F_CSUM TUN_F_TSO4",
    }),
    1,
  );
  assert.equal(valueOf(e, "vionet_frontend_connected"), 1);
  assert.equal(valueOf(e, "vionet_connections_total"), 3);
  assert.equal(valueOf(e, "vionet_uptime_seconds"), 12.346);
  assert.equal(valueOf(e, "vionet_http_responses_total", { code: "400" }), 1);
  assert.equal(e.families.get("vionet_queue_frames_total")?.type, "counter");
  assert.equal(e.families.get("vionet_queue_ring_used_idx")?.type, "gauge");
  assert.ok(![...e.families.keys()].some((n) => n.endsWith("_unnamed")), "every key is named");
  for (const [key, m] of [...Object.entries(QUEUE_METRICS), ...Object.entries(PAIR_METRICS)]) {
    assert.match(m.name, /^vionet_[a-z_]+$/, key);
    assert.equal(m.kind === "counter", m.name.endsWith("_total"), `${key}: ${m.name}`);
  }
});

Deno.test("formatMetrics(): a counter it does not know is still exported, under *_unnamed", () => {
  const s = snapshot();
  s.queues.tx0 = { ...s.queues.tx0, brandNew: 7 };
  s.pairs["0"] = { ...s.pairs["0"], alsoNew: 2 };
  const e = parseExposition(formatMetrics(s), { counterSuffix: true });
  assert.equal(valueOf(e, "vionet_queue_unnamed", { queue: "tx0", counter: "brandNew" }), 7);
  assert.equal(valueOf(e, "vionet_pair_unnamed", { pair: "0", counter: "alsoNew" }), 2);
});

Deno.test("formatMetrics(): with nothing connected, no tap line and a device that did not answer", () => {
  const s = snapshot({
    queues: {},
    pairs: {},
    pairsUnanswered: [0],
    features: null,
    connected: false,
    tap: { name: "t0", counters: null, offloads: [] },
    httpResponses: new Map(),
  });
  const e = parseExposition(formatMetrics(s), { counterSuffix: true, requireHelp: true });
  assert.equal(valueOf(e, "vionet_pair_stats_missing", { pair: "0" }), 1);
  assert.equal(valueOf(e, "vionet_info", { tap: "t0", features: "", offloads: "" }), 1);
  assert.equal(e.families.has("vionet_tap_receive_bytes_total"), false);
});

Deno.test("Exposition: label values are escaped, and read back the same", () => {
  const x = new Exposition();
  const nasty = 'a\\b"c\nd}e,f="g"';
  x.add("vionet_test", "gauge", "help with \\ and\nnewline", 1, { v: nasty });
  const text = x.text();
  assert.ok(text.includes(`v="${escapeLabelValue(nasty)}"`));
  assert.equal(text.split("\n").length, 4, "no raw line feed in a label or help");
  const e = parseExposition(text, { requireHelp: true });
  assert.equal(valueOf(e, "vionet_test", { v: nasty }), 1);
  assert.equal(e.families.get("vionet_test")?.help, "help with \\ and\nnewline");
  assert.throws(() => x.add("bad-name", "gauge", "", 1), RangeError);
  assert.throws(() => x.add("vionet_test", "counter", "", 1), /is a gauge/);
  assert.throws(() => x.add("vionet_x", "gauge", "", 1, { "0no": "" }), RangeError);
});

Deno.test("the strict parser refuses what the format does not allow", async (t) => {
  const ok = "# HELP a_total h\n# TYPE a_total counter\na_total 1\n";
  parseExposition(ok, { counterSuffix: true, requireHelp: true });
  const cases: [string, string, RegExp][] = [
    ["no final line feed", ok.slice(0, -1), /line feed/],
    ["a sample without TYPE", "a 1\n", /no TYPE/],
    ["TYPE after the sample", "a 1\n# TYPE a gauge\n", /no TYPE/],
    ["a second TYPE", "# TYPE a gauge\n# TYPE a gauge\na 1\n", /second TYPE/],
    ["an invalid metric name", "# TYPE 1a gauge\n1a 1\n", /invalid name/],
    ["an invalid label name", '# TYPE a gauge\na{b-c="1"} 1\n', /invalid label name/],
    ["a reserved label name", '# TYPE a gauge\na{__x="1"} 1\n', /invalid label name/],
    ["an unknown escape", '# TYPE a gauge\na{b="\\t"} 1\n', /escape/],
    ["an unquoted label value", "# TYPE a gauge\na{b=1} 1\n", /double quotes/],
    ["an unterminated label value", '# TYPE a gauge\na{b="1} 1\n', /unterminated/],
    ["a label twice", '# TYPE a gauge\na{b="1",b="2"} 1\n', /twice/],
    ["a series twice", '# TYPE a gauge\na{b="1"} 1\na{b="1"} 2\n', /twice/],
    ["samples apart", '# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x="1"} 1\n', /together/],
    ["a value that is not a float", "# TYPE a gauge\na one\n", /not a float/],
    ["a counter without _total", "# TYPE a counter\na 1\n", /_total/],
    ["a negative counter", "# TYPE a_total counter\na_total -1\n", /is -1/],
    ["a carriage return", "# TYPE a gauge\r\na 1\r\n", /carriage return/],
    ["no HELP", "# TYPE a gauge\na 1\n", /no HELP/],
    ["a bad escape in HELP", "# HELP a x\\ty\n# TYPE a gauge\na 1\n", /bad escape/],
  ];
  for (const [name, text, why] of cases) {
    await t.step(name, () => {
      assert.throws(
        () => parseExposition(text, { counterSuffix: true, requireHelp: name === "no HELP" }),
        (e) => e instanceof ExpositionError && why.test(e.message),
      );
    });
  }
  const special = parseExposition('# TYPE a gauge\na{b="x",} +Inf 123\n');
  assert.equal(valueOf(special, "a", { b: "x" }), Infinity);
});
