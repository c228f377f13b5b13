/**
 * The daemon's counters in the Prometheus text exposition format, version
 * 0.0.4 (https://prometheus.io/docs/instrumenting/exposition_formats/):
 * every counter the SIGUSR2 dump logs, under stable `vionet_` names.
 *
 * {@link formatMetrics} is pure: it turns a {@link MetricsSnapshot} (what
 * `control_api.ts` gathers from the device workers, the data path, the tap
 * and the vhost-user service) into text. Names follow the Prometheus
 * conventions: counters end in `_total`, units in the name (`_bytes`,
 * `_seconds`), one `# HELP` and one `# TYPE` per family, every sample of a
 * family together. docs/operations.md ("Metrics") lists every name.
 *
 * The device's per-queue keys are mapped one by one (tables below); a key
 * this file does not know (a counter added to the device later) is still
 * exported, as `vionet_queue_unnamed{queue,counter}`, and the end-to-end test
 * fails on it, so that it gets a name here.
 *
 * @module
 */

import type { NetDevCounters } from "../host/tap_stats.ts";
import { NET_DEV_RECEIVE, NET_DEV_TRANSMIT } from "../host/tap_stats.ts";
import type { RateLimitSnapshot } from "./rate_limits.ts";

/** The content type of the exposition (text format 0.0.4). */
import type { CaptureStatus } from "./capture_host.ts";

export const METRICS_CONTENT_TYPE = "text/plain; version=0.0.4";

/** Everything one scrape shows. */
export interface MetricsSnapshot {
  /** Per queue (rx0, tx0, rx1, ...): the device's counters, as SIGUSR2 logs them. */
  queues: Record<string, Record<string, number>>;
  /** Per pair (its index): the data path's counters while its queues run. */
  pairs: Record<string, Record<string, number | boolean | string>>;
  /** Pairs whose device worker did not answer for its counters in time. */
  pairsUnanswered: number[];
  tap: {
    name: string;
    /** From /proc/net/dev; null when the tap is not in this namespace. */
    counters: NetDevCounters | null;
    /** The offloads in force on the tap (TUNSETOFFLOAD names). */
    offloads: string[];
  };
  /** The features the front-end acked, by name; null when none is set up. */
  features: string[] | null;
  /** A front-end is connected now. */
  connected: boolean;
  /** vhost-user connections served, and refused because one was active. */
  connectionsServed: number;
  connectionsRefused: number;
  /** Seconds since the daemon started. */
  uptimeSeconds: number;
  retiredMemory: { reservedBytes: number; ranges: number; retired: number; reclaimedBytes: number };
  /** Responses this HTTP server sent, by status. */
  httpResponses: ReadonlyMap<number, number>;
  /** The NIC's rate limits and their counters (absent: not shown). */
  rateLimits?: RateLimitSnapshot;
  /** `--pcap`: the capture's state and counters; absent or null without --pcap. */
  capture?: CaptureStatus | null;
}

type Kind = "counter" | "gauge";

/** A per-queue key of the device's counters: its metric name, kind and help. */
interface QueueMetric {
  name: string;
  kind: Kind;
  help: string;
}

/** The device's per-queue counters (device/net_device.ts `counters()`), by key. */
export const QUEUE_METRICS: Readonly<Record<string, QueueMetric>> = {
  chains: {
    name: "vionet_queue_chains_total",
    kind: "counter",
    help: "Descriptor chains the device took from the available ring",
  },
  used: {
    name: "vionet_queue_used_total",
    kind: "counter",
    help: "Used ring entries the device published, dropped chains included",
  },
  dropped: {
    name: "vionet_queue_bad_chains_total",
    kind: "counter",
    help: "Chains returned to the guest unused (length 0) because they failed validation; " +
      "by reason in vionet_queue_drops_total",
  },
  interrupts: {
    name: "vionet_queue_interrupts_total",
    kind: "counter",
    help: "Interrupts signalled to the guest (call eventfd writes)",
  },
  kicksMissed: {
    name: "vionet_queue_kicks_missed_total",
    kind: "counter",
    help: "Times buffers the guest offered waited two looks 10 ms apart without a kick",
  },
  frames: {
    name: "vionet_queue_frames_total",
    kind: "counter",
    help: "Frames the queue moved: rx delivered to the guest, tx taken from it",
  },
  bytes: {
    name: "vionet_queue_bytes_total",
    kind: "counter",
    help: "Bytes of those frames",
  },
  posted: {
    name: "vionet_queue_rx_buffers_posted",
    kind: "gauge",
    help: "RX chains posted for the tap's frames now",
  },
  passThrough: {
    name: "vionet_queue_tx_pass_through_total",
    kind: "counter",
    help: "TX frames handed to the tap with their offloads as the guest set them",
  },
  csumCompleted: {
    name: "vionet_queue_tx_checksums_completed_total",
    kind: "counter",
    help: "TX frames whose checksum the device completed in software",
  },
  segmented: {
    name: "vionet_queue_tx_segmented_total",
    kind: "counter",
    help: "TX GSO frames the device segmented in software",
  },
  segments: {
    name: "vionet_queue_tx_segments_total",
    kind: "counter",
    help: "Segments those became",
  },
  segmentedInPlace: {
    name: "vionet_queue_tx_segmented_in_place_total",
    kind: "counter",
    help: "TX GSO frames segmented without copying their payload",
  },
  ring_availIdx: {
    name: "vionet_queue_ring_avail_idx",
    kind: "gauge",
    help: "The available ring's idx, as the guest wrote it",
  },
  ring_lastAvail: {
    name: "vionet_queue_ring_last_avail",
    kind: "gauge",
    help: "The next available ring entry the device will read",
  },
  ring_usedIdx: {
    name: "vionet_queue_ring_used_idx",
    kind: "gauge",
    help: "The used ring's idx, as the guest sees it",
  },
  ring_deviceUsedIdx: {
    name: "vionet_queue_ring_device_used_idx",
    kind: "gauge",
    help: "The used idx the device has reached (ahead of used_idx until published)",
  },
  ring_availFlags: {
    name: "vionet_queue_ring_avail_flags",
    kind: "gauge",
    help: "The available ring's flags (1: the guest wants no interrupts)",
  },
  ring_usedFlags: {
    name: "vionet_queue_ring_used_flags",
    kind: "gauge",
    help: "The used ring's flags (1: the device wants no kicks)",
  },
  ring_inFlight: {
    name: "vionet_queue_ring_in_flight",
    kind: "gauge",
    help: "Chains the device holds and has not returned",
  },
  ring_usedEvent: {
    name: "vionet_queue_ring_used_event",
    kind: "gauge",
    help: "used_event: the used idx at which the guest wants its next interrupt (EVENT_IDX)",
  },
  ring_availEvent: {
    name: "vionet_queue_ring_avail_event",
    kind: "gauge",
    help: "avail_event: the avail idx at which the device wants its next kick (EVENT_IDX)",
  },
};

/** Per-queue keys that are drops by reason: `error_<REASON>` (chain checks) and `drop_<reason>`. */
const DROPS = {
  name: "vionet_queue_drops_total",
  help: "Chains or frames dropped, by reason: a chain check in capitals (NEXT_OUT_OF_RANGE; " +
    "AVAIL_IDX_CORRUPT, AVAIL_HEAD_IN_USE and RING_UNMAPPED also stopped the queue), or the " +
    "RX or TX path's own reason",
};

/** The data path's counters per pair (parent/control/datapath_host.ts `counters()`), by key. */
export const PAIR_METRICS: Readonly<Record<string, QueueMetric>> = {
  pollerStarved: {
    name: "vionet_pair_poller_starved",
    kind: "gauge",
    help: "1 while the guest has posted no RX buffer and the poller does not read the tap",
  },
  pollerNoBuffer: {
    name: "vionet_pair_rx_no_buffer_total",
    kind: "counter",
    help: "Frames from the tap dropped because the guest had posted no buffer",
  },
  pollerTooBig: {
    name: "vionet_pair_rx_too_big_total",
    kind: "counter",
    help: "Frames from the tap dropped because they were larger than the posted buffers",
  },
  ioBadRecord: {
    name: "vionet_pair_bad_records_total",
    kind: "counter",
    help: "Device records an I/O worker refused (an iovec outside the granted memory)",
  },
  writerErrors: {
    name: "vionet_pair_tx_errors_total",
    kind: "counter",
    help: "Frames the kernel refused on the tap (a write error)",
  },
  pollerErrors: {
    name: "vionet_pair_rx_errors_total",
    kind: "counter",
    help: "Tap read errors other than EAGAIN",
  },
  pollerBatches: {
    name: "vionet_pair_rx_batches_total",
    kind: "counter",
    help: "io_uring_enter calls the poller made for batches of reads",
  },
  pollerUnused: {
    name: "vionet_pair_rx_buffers_unused_total",
    kind: "counter",
    help: "Posted RX chains the poller gave back unfilled",
  },
  pollerStarvations: {
    name: "vionet_pair_poller_starvations_total",
    kind: "counter",
    help: "Times the poller found no posted RX buffer and stopped reading the tap",
  },
  pollerWakeAsked: {
    name: "vionet_pair_poller_wakes_total",
    kind: "counter",
    help: "Times the poller was woken for new RX buffers after starving",
  },
  rxInterrupts: {
    name: "vionet_pair_rx_interrupts_total",
    kind: "counter",
    help: "RX call eventfd writes by the poller",
  },
  rxKicks: {
    name: "vionet_pair_rx_kicks_total",
    kind: "counter",
    help: "RX kicks (available buffer notifications) the poller read",
  },
  txKicks: {
    name: "vionet_pair_tx_kicks_total",
    kind: "counter",
    help: "TX kicks the poller read",
  },
  deviceWakes: {
    name: "vionet_pair_device_wakes_total",
    kind: "counter",
    help: "Times the device worker woke from a wait on its doorbell",
  },
  pollerTxBatches: {
    name: "vionet_pair_poller_tx_batches_total",
    kind: "counter",
    help: "Batches of TX records the poller wrote (the writer wrote the rest)",
  },
};

/** The pair keys that are text, shown as labels of one info metric. */
const PAIR_ENGINES = { writerEngine: "writer", pollerEngine: "poller" } as const;

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL = /^[a-zA-Z_][a-zA-Z0-9_]*$/;

/** A label value escaped for the text format: backslash, double quote, line feed. */
export function escapeLabelValue(v: string): string {
  return v.replaceAll("\\", "\\\\").replaceAll('"', '\\"').replaceAll("\n", "\\n");
}

/** A HELP text escaped for the text format: backslash and line feed. */
function escapeHelp(v: string): string {
  return v.replaceAll("\\", "\\\\").replaceAll("\n", "\\n");
}

/** A sample value: integers as they are, the special values as Prometheus spells them. */
function formatValue(v: number): string {
  if (Number.isNaN(v)) return "NaN";
  if (v === Infinity) return "+Inf";
  if (v === -Infinity) return "-Inf";
  return String(v);
}

/** Metric families in the order first added, each with its samples together. */
export class Exposition {
  readonly #families = new Map<
    string,
    { kind: Kind | "untyped"; help: string; samples: Map<string, number> }
  >();

  /**
   * Adds one sample. A second sample of the same series replaces the first.
   * @throws {RangeError} for an invalid name, or a family added with another kind.
   */
  add(
    name: string,
    kind: Kind | "untyped",
    help: string,
    value: number,
    labels: Record<string, string> = {},
  ): void {
    if (!NAME.test(name)) throw new RangeError(`invalid metric name ${name}`);
    let family = this.#families.get(name);
    if (!family) {
      family = { kind, help, samples: new Map() };
      this.#families.set(name, family);
    } else if (family.kind !== kind) {
      throw new RangeError(`metric ${name} is a ${family.kind}, not a ${kind}`);
    }
    const pairs = Object.entries(labels).map(([k, v]) => {
      if (!LABEL.test(k) || k.startsWith("__")) throw new RangeError(`invalid label name ${k}`);
      return `${k}="${escapeLabelValue(v)}"`;
    });
    family.samples.set(pairs.length ? `{${pairs.join(",")}}` : "", value);
  }

  /** The exposition text, ending with a line feed. */
  text(): string {
    const lines: string[] = [];
    for (const [name, f] of this.#families) {
      lines.push(`# HELP ${name} ${escapeHelp(f.help)}`, `# TYPE ${name} ${f.kind}`);
      for (const [labels, value] of f.samples) lines.push(`${name}${labels} ${formatValue(value)}`);
    }
    return lines.join("\n") + "\n";
  }
}

/** The exposition of one snapshot. */
export function formatMetrics(s: MetricsSnapshot): string {
  const e = new Exposition();
  e.add("vionet_info", "gauge", "The negotiated virtio features and the tap's offloads", 1, {
    tap: s.tap.name,
    features: (s.features ?? []).join(" "),
    offloads: s.tap.offloads.join(" "),
  });
  e.add(
    "vionet_uptime_seconds",
    "gauge",
    "Seconds since the daemon started",
    Math.round(s.uptimeSeconds * 1000) / 1000,
  );
  e.add(
    "vionet_frontend_connected",
    "gauge",
    "1 while a vhost-user front-end (the VMM) is connected",
    s.connected ? 1 : 0,
  );
  e.add(
    "vionet_connections_total",
    "counter",
    "vhost-user connections served",
    s.connectionsServed,
  );
  e.add(
    "vionet_connections_refused_total",
    "counter",
    "vhost-user connections refused because a front-end was already connected",
    s.connectionsRefused,
  );

  for (const [queue, counters] of Object.entries(s.queues)) {
    for (const [key, value] of Object.entries(counters)) {
      const known = QUEUE_METRICS[key];
      const reason = /^(?:error|drop)_(.+)$/.exec(key)?.[1];
      if (known) e.add(known.name, known.kind, known.help, value, { queue });
      else if (reason !== undefined) {
        e.add(DROPS.name, "counter", DROPS.help, value, { queue, reason });
      } else {
        e.add(
          "vionet_queue_unnamed",
          "untyped",
          "A per-queue counter this version of the metrics does not name yet",
          value,
          { queue, counter: key },
        );
      }
    }
  }
  for (const pair of s.pairsUnanswered) {
    e.add(
      "vionet_pair_stats_missing",
      "gauge",
      "1 when the pair's device worker did not give its counters in time for this scrape",
      1,
      { pair: String(pair) },
    );
  }

  for (const [pair, counters] of Object.entries(s.pairs)) {
    const engines: Record<string, string> = { pair };
    for (const [key, value] of Object.entries(counters)) {
      if (key in PAIR_ENGINES) {
        engines[PAIR_ENGINES[key as keyof typeof PAIR_ENGINES]] = String(value);
        continue;
      }
      const known = PAIR_METRICS[key];
      const n = typeof value === "boolean" ? (value ? 1 : 0) : Number(value);
      if (known) e.add(known.name, known.kind, known.help, n, { pair });
      else {
        e.add(
          "vionet_pair_unnamed",
          "untyped",
          "A data-path counter this version of the metrics does not name yet",
          n,
          { pair, counter: key },
        );
      }
    }
    e.add(
      "vionet_pair_engine_info",
      "gauge",
      "How the pair's writer and poller reach the tap (io_uring, writev or readv)",
      1,
      engines,
    );
  }

  const tap = s.tap.counters;
  if (tap !== null) {
    for (const k of NET_DEV_RECEIVE) {
      e.add(
        `vionet_tap_receive_${k}_total`,
        "counter",
        `The tap's receive ${k} (/proc/net/dev): frames vionet wrote, guest to host`,
        tap.receive[k],
      );
    }
    for (const k of NET_DEV_TRANSMIT) {
      e.add(
        `vionet_tap_transmit_${k}_total`,
        "counter",
        `The tap's transmit ${k} (/proc/net/dev): frames for vionet to read, host to guest`,
        tap.transmit[k],
      );
    }
  }

  const m = s.retiredMemory;
  e.add(
    "vionet_retired_memory_bytes",
    "gauge",
    "Guest memory address space retired (zero pages over it) and not yet unmapped",
    m.reservedBytes,
  );
  e.add("vionet_retired_memory_ranges", "gauge", "Retired ranges not yet unmapped", m.ranges);
  e.add(
    "vionet_retired_memory_total",
    "counter",
    "Guest memory ranges retired because a device worker did not give them back",
    m.retired,
  );
  e.add(
    "vionet_retired_memory_reclaimed_bytes_total",
    "counter",
    "Retired address space unmapped once no thread could reach it",
    m.reclaimedBytes,
  );
  if (s.rateLimits) addRateLimits(e, s.rateLimits);
  const c = s.capture;
  if (c) {
    e.add("vionet_capture_info", "gauge", "--pcap: the capture file and its state", 1, {
      file: c.file,
      state: c.state,
    });
    e.add(
      "vionet_capture_active",
      "gauge",
      "1 while frames are being captured",
      c.state === "on" ? 1 : 0,
    );
    e.add("vionet_capture_file_bytes", "gauge", "Bytes in the capture file", c.fileBytes);
    e.add(
      "vionet_capture_max_bytes",
      "gauge",
      "--pcap-max: the most bytes the file may hold",
      c.maxBytes,
    );
    for (const [direction, n] of [["tx", c.txPackets], ["rx", c.rxPackets]] as const) {
      e.add(
        "vionet_capture_packets_total",
        "counter",
        "Frames written to the capture file, by direction (tx: guest to tap, rx: tap to guest)",
        n,
        { direction },
      );
    }
    e.add(
      "vionet_capture_bytes_total",
      "counter",
      "Frame bytes written to the capture file (without virtio_net_hdr or pcapng headers)",
      c.bytes,
    );
    for (const [reason, n] of [["behind", c.droppedBehind], ["max", c.droppedOverMax]] as const) {
      e.add(
        "vionet_capture_dropped_total",
        "counter",
        "Frames not captured while capture was asked for: behind (a capture ring was full, the " +
          "writer fell behind), max (the file had reached --pcap-max)",
        n,
        { reason },
      );
    }
    e.add(
      "vionet_capture_write_errors_total",
      "counter",
      "Writes to the capture file that failed",
      c.writeErrors,
    );
  }
  for (const [status, count] of [...s.httpResponses].sort((a, b) => a[0] - b[0])) {
    e.add(
      "vionet_http_responses_total",
      "counter",
      "Responses of this HTTP endpoint, by status code",
      count,
      { code: String(status) },
    );
  }
  return e.text();
}

/**
 * The NIC's rate limits (`rate_limits.ts`), per direction: tx is what the
 * guest transmits, rx what it receives. A rate of 0 means no limit.
 */
function addRateLimits(e: Exposition, r: RateLimitSnapshot): void {
  for (const direction of ["tx", "rx"] as const) {
    const { limit, counters } = r[direction];
    const labels = { direction };
    e.add(
      "vionet_rate_limit_bytes_per_second",
      "gauge",
      "The NIC's byte rate limit (tx: guest transmits, rx: guest receives); 0: none",
      limit.bytes?.rate ?? 0,
      labels,
    );
    e.add(
      "vionet_rate_limit_burst_bytes",
      "gauge",
      "The byte bucket's size (burst); 0: no byte limit",
      limit.bytes?.size ?? 0,
      labels,
    );
    e.add(
      "vionet_rate_limit_frames_per_second",
      "gauge",
      "The NIC's frame rate limit; 0: none",
      limit.frames?.rate ?? 0,
      labels,
    );
    e.add(
      "vionet_rate_limit_burst_frames",
      "gauge",
      "The frame bucket's size (burst); 0: no frame limit",
      limit.frames?.size ?? 0,
      labels,
    );
    e.add(
      "vionet_rate_limit_throttled_total",
      "counter",
      "Times the rate limit held the direction back (no frame is dropped for it)",
      counters.throttles,
      labels,
    );
    e.add(
      "vionet_rate_limit_throttled_seconds_total",
      "counter",
      "Seconds the rate limit held the direction back",
      Math.round(counters.throttledMs) / 1000,
      labels,
    );
  }
}
