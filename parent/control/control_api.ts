/**
 * The operator's HTTP endpoints on the `--metrics` socket: the route table,
 * and the scrape behind `GET /metrics`.
 *
 * Adding an endpoint is one entry in {@link controlRoutes}.
 * `POST /rate-limit` changes the NIC's rate limits and `GET /rate-limit`
 * shows them (`rate_limits.ts`).
 *
 * `POST /capture?state=on|off` turns `--pcap` capture on or off
 * (`capture_host.ts`); `GET /capture` only reports. Both answer with the
 * capture's status as JSON; 400 names what is wrong with a request, 409 says
 * why the capture cannot change (no --pcap, the file full, a failed write).
 *
 * A scrape asks every pair's device worker for its counters (the same
 * message SIGUSR2 sends), reads the data path's shared counters and the
 * tap's line of /proc/net/dev. Asking a device worker wakes it, so scrapes
 * are coalesced: one at a time, and one that ends less than
 * `minIntervalMs` before the next is reused, so clients hammering the
 * socket cost the data path at most a few wake-ups a second. A device that
 * does not answer within `statsTimeoutMs` is left out of that scrape
 * (`vionet_pair_stats_missing`), never waited for longer.
 *
 * @module
 */

import { featureNames } from "../../ipc/features.ts";
import { readTapCounters } from "../host/tap_stats.ts";
import { type Tap, tunFlagNames } from "../host/tap.ts";
import type { VionetDevicePort } from "./device_port.ts";
import type { HttpRequest, HttpResponse, Route } from "./http_server.ts";
import type { CaptureChange, CaptureStatus } from "./capture_host.ts";
import { formatMetrics, METRICS_CONTENT_TYPE, type MetricsSnapshot } from "./metrics.ts";
import { retiredMemory } from "./retired_memory.ts";
import type { NicRateLimits, RateLimitSnapshot } from "./rate_limits.ts";

/** Where a scrape reads from: the daemon's parts. */
export interface MetricsSources {
  port: VionetDevicePort;
  tap: Tap;
  /** The vhost-user service, once it serves. */
  service(): { connected: boolean; served: number } | null;
  /** vhost-user connections refused because one was active. */
  refused(): number;
  /** Responses the metrics server sent, by status. */
  httpResponses(): ReadonlyMap<number, number>;
  /** `performance.now()` when the daemon started (default 0: the process's start). */
  startedAt?: number;
  /** The NIC's rate limits and their counters (absent: not shown). */
  rateLimits?: () => RateLimitSnapshot;
  /** `--pcap`: the capture's state and counters; absent: no capture. */
  capture?: () => CaptureStatus | null;
}

/** Resolves to `p`'s value, or undefined after `ms` (the timer is always cleared). */
async function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms)),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** Gathers one snapshot (see the module comment for what it costs). */
export async function gatherSnapshot(
  src: MetricsSources,
  statsTimeoutMs = 1000,
): Promise<MetricsSnapshot> {
  const queues: MetricsSnapshot["queues"] = {};
  const pairsUnanswered: number[] = [];
  const pairs = src.port.pairs();
  const answers = await Promise.all(
    pairs.map((p) => within(p.device.getStats().catch(() => undefined), statsTimeoutMs)),
  );
  pairs.forEach((p, i) => {
    const stats = answers[i];
    if (stats === undefined) {
      pairsUnanswered.push(p.pair);
      return;
    }
    for (const [name, counters] of Object.entries(stats)) {
      // "io": the I/O side's counters, the same words as the pair's data-path counters below.
      if (name === "io") continue;
      queues[name.replace(/0$/, String(p.pair))] = counters;
    }
  });
  const datapath: MetricsSnapshot["pairs"] = {};
  for (const p of pairs) {
    const c = p.datapathCounters();
    if (c !== null) datapath[String(p.pair)] = { ...c };
  }
  let tapCounters: MetricsSnapshot["tap"]["counters"] = null;
  try {
    tapCounters = readTapCounters(src.tap.name);
  } catch {
    // Left out of this scrape; the rest still says what the daemon does.
  }
  const service = src.service();
  const features = src.port.features;
  return {
    queues,
    pairs: datapath,
    pairsUnanswered,
    tap: { name: src.tap.name, counters: tapCounters, offloads: tunFlagNames(src.tap.offloads) },
    features: features === null ? null : featureNames(features),
    connected: service?.connected ?? false,
    connectionsServed: service?.served ?? 0,
    connectionsRefused: src.refused(),
    uptimeSeconds: (performance.now() - (src.startedAt ?? 0)) / 1000,
    retiredMemory: {
      reservedBytes: retiredMemory.reservedBytes,
      ranges: retiredMemory.ranges().length,
      retired: retiredMemory.retiredCount,
      reclaimedBytes: retiredMemory.reclaimedBytes,
    },
    httpResponses: src.httpResponses(),
    rateLimits: src.rateLimits?.(),
    capture: src.capture?.() ?? null,
  };
}

/** Coalesced scrapes (see the module comment). */
export class MetricsEndpoint {
  readonly #src: MetricsSources;
  readonly #minIntervalMs: number;
  readonly #statsTimeoutMs: number;
  #inFlight: Promise<string> | null = null;
  #last: { text: string; at: number } | null = null;

  constructor(src: MetricsSources, opts: { minIntervalMs?: number; statsTimeoutMs?: number } = {}) {
    this.#src = src;
    this.#minIntervalMs = opts.minIntervalMs ?? 250;
    this.#statsTimeoutMs = opts.statsTimeoutMs ?? 1000;
  }

  /** The exposition text: a fresh scrape, the one in flight, or one that just ended. */
  scrape(): Promise<string> {
    if (this.#inFlight) return this.#inFlight;
    const last = this.#last;
    if (last && performance.now() - last.at < this.#minIntervalMs) {
      return Promise.resolve(last.text);
    }
    const p = gatherSnapshot(this.#src, this.#statsTimeoutMs).then(formatMetrics).then(
      (text) => {
        this.#last = { text, at: performance.now() };
        return text;
      },
    ).finally(() => this.#inFlight = null);
    this.#inFlight = p;
    return p;
  }
}

/** A route that answers 501 until `what` exists. */
function notYet(method: string, path: string, what: string): Route {
  return {
    method,
    path,
    handle: (): HttpResponse => ({
      status: 501,
      body: `${method} ${path}: ${what} is not implemented yet in this version of vionet\n`,
    }),
  };
}

/** What `/capture` drives: the daemon's capture, or null without --pcap. */
export interface CaptureControl {
  set(on: boolean): CaptureChange;
  status(): CaptureStatus;
}

const JSON_TYPE = "application/json";

function json(status: number, body: unknown): HttpResponse {
  return { status, contentType: JSON_TYPE, body: JSON.stringify(body) + "\n" };
}

/** The state a `POST /capture` asks for: from `?state=`, or a body `state=on`/`{"state":"on"}`. */
export function captureRequest(req: HttpRequest): { on: boolean } | { error: string } {
  const query = new URLSearchParams(req.query);
  let asked = query.get("state");
  for (const key of query.keys()) {
    if (key !== "state") return { error: `unknown parameter "${key}" (only state=on|off)` };
  }
  const body = new TextDecoder().decode(req.body).trim();
  if (body !== "") {
    let fromBody: unknown;
    if (body.startsWith("{")) {
      try {
        fromBody = (JSON.parse(body) as Record<string, unknown>)?.state;
      } catch {
        return { error: 'the body is not JSON (send {"state":"on"} or state=on)' };
      }
    } else {
      const form = new URLSearchParams(body);
      fromBody = form.get("state");
    }
    if (typeof fromBody !== "string") return { error: "the body names no state (state=on|off)" };
    if (asked !== null && asked !== fromBody) {
      return { error: "the query and the body ask for different states" };
    }
    asked = fromBody;
  }
  if (asked === null) return { error: "say which state: POST /capture?state=on or ?state=off" };
  if (asked !== "on" && asked !== "off") return { error: `state "${asked}" must be on or off` };
  return { on: asked === "on" };
}

/** The `/capture` routes. */
function captureRoutes(capture: CaptureControl | null): Route[] {
  const none = () =>
    json(409, {
      error: "no capture: start vionet with --pcap FILE (the file can only be opened at start)",
    });
  return [
    {
      method: "GET",
      path: "/capture",
      handle: () => capture === null ? none() : json(200, capture.status()),
    },
    {
      method: "POST",
      path: "/capture",
      handle: (req) => {
        const asked = captureRequest(req);
        if ("error" in asked) return json(400, { error: asked.error });
        if (capture === null) return none();
        const r = capture.set(asked.on);
        return r.ok ? json(200, r.status) : json(409, { error: r.reason, ...r.status });
      },
    },
  ];
}

/** Every route of the `--metrics` socket; without `limits`, `/rate-limit` answers 501. */
export function controlRoutes(
  scrape: () => Promise<string>,
  limits?: NicRateLimits,
  capture: CaptureControl | null = null,
): Route[] {
  const rateLimit: Route[] = limits === undefined
    ? [notYet("POST", "/rate-limit", "rate limiting")]
    : [
      { method: "POST", path: "/rate-limit", handle: (r) => limits.post(r) },
      { method: "GET", path: "/rate-limit", handle: () => limits.get() },
    ];
  return [
    {
      method: "GET",
      path: "/metrics",
      handle: async () => ({
        status: 200,
        contentType: METRICS_CONTENT_TYPE,
        body: await scrape(),
      }),
    },
    ...captureRoutes(capture),
    ...rateLimit,
  ];
}
