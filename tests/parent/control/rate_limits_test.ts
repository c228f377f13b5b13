import assert from "node:assert/strict";
import { NicRateLimits } from "../../../parent/control/rate_limits.ts";
import { controlRoutes } from "../../../parent/control/control_api.ts";
import type { Route } from "../../../parent/control/http_server.ts";
import { formatMetrics, type MetricsSnapshot } from "../../../parent/control/metrics.ts";
import { parseExposition, valueOf } from "./exposition_parser.ts";
import { DIR_RX, DIR_TX, RateLimiter } from "../../../parent/io/rate_limiter.ts";
import { httpRequest } from "./http_request.ts";

function route(routes: Route[], method: string, path: string): Route {
  const r = routes.find((x) => x.method === method && x.path === path);
  assert(r, `no route ${method} ${path}`);
  return r;
}

Deno.test("POST /rate-limit: body or query string, 400 with the reason, GET shows the limits", async () => {
  const clock = { now: 0 };
  const limits = new NicRateLimits(() => clock.now);
  limits.apply({ tx: { bytes: { rate: 1e6, size: 1e5 }, frames: null } });
  const routes = controlRoutes(() => Promise.resolve(""), limits);
  const post = route(routes, "POST", "/rate-limit");
  const get = route(routes, "GET", "/rate-limit");
  assert.deepEqual(await get.handle(httpRequest("GET", "/rate-limit")), {
    status: 200,
    body: "tx=8Mbit,burst=100000,rx=off\n",
  });

  // The body: a direction it names is replaced, the other one kept.
  let r = await post.handle(httpRequest("POST", "/rate-limit", "rx=10kpps,burst=100"));
  assert.equal(r.status, 200);
  assert.equal(r.body, "tx=8Mbit,burst=100000,rx=10000pps,burst=100\n");
  // The query string, `&` between items; percent-escapes decoded.
  r = await post.handle(httpRequest("POST", "/rate-limit?tx=off&rx=50Mbit%2Cburst=1MiB"));
  assert.equal(r.status, 200);
  assert.equal(r.body, "tx=off,rx=50Mbit,burst=1048576\n");
  // A form-encoded body, as `curl -d 'tx=1Mbit&rx=50Mbit'` sends it.
  r = await post.handle(httpRequest("POST", "/rate-limit", "tx=1Mbit&rx=50Mbit%2Cburst=1MiB"));
  assert.equal(r.body, "tx=1Mbit,burst=65550,rx=50Mbit,burst=1048576\n");
  r = await post.handle(httpRequest("POST", "/rate-limit", "tx=off"));

  // What the workers see: the same buffer.
  const worker = new RateLimiter(limits.buffer, () => clock.now);
  assert.equal(worker.active(DIR_TX), false);
  assert.deepEqual(worker.limit(DIR_RX), {
    bytes: { rate: 6_250_000, size: 1_048_576 },
    frames: null,
  });

  for (
    const [target, body, reason] of [
      ["/rate-limit", "tx=fast", /rate limit refused: "fast" is not a rate/],
      ["/rate-limit", "", /the limit is empty/],
      ["/rate-limit?tx=%zz", "", /bad percent-escape/],
      ["/rate-limit", "\xff", /rate limit refused/],
    ] as const
  ) {
    const bytes = body === "\xff" ? new Uint8Array([0xff]) : new TextEncoder().encode(body);
    const bad = await post.handle({ ...httpRequest("POST", target), body: bytes });
    assert.equal(bad.status, 400, `${target} ${body}`);
    assert.match(String(bad.body), reason);
  }
  assert.equal(limits.describe(), "tx=off,rx=50Mbit,burst=1048576", "refusals changed nothing");
});

Deno.test("without limits /rate-limit answers 501 (a server that has none to change)", async () => {
  const r = await route(controlRoutes(() => Promise.resolve("")), "POST", "/rate-limit").handle(
    httpRequest("POST", "/rate-limit", "tx=off"),
  );
  assert.equal(r.status, 501);
});

Deno.test("formatMetrics(): the rate limits per direction, and how often and long each held", () => {
  const clock = { now: 1000 };
  const limits = new NicRateLimits(() => clock.now);
  limits.apply({
    tx: { bytes: { rate: 12_500_000, size: 1e6 }, frames: { rate: 1000, size: 10 } },
  });
  const w = new RateLimiter(limits.buffer, () => clock.now);
  assert(w.take(DIR_TX, 5e6, 1));
  w.settle(DIR_TX, 2e6, 1); // owes 1e6
  assert.equal(w.take(DIR_TX, 1, 1), false);
  clock.now += 250;
  const snap: MetricsSnapshot = {
    queues: {},
    pairs: {},
    pairsUnanswered: [],
    tap: { name: "t", counters: null, offloads: [] },
    features: null,
    connected: false,
    connectionsServed: 0,
    connectionsRefused: 0,
    uptimeSeconds: 1,
    retiredMemory: { reservedBytes: 0, ranges: 0, retired: 0, reclaimedBytes: 0 },
    httpResponses: new Map(),
    rateLimits: limits.snapshot(),
  };
  const e = parseExposition(formatMetrics(snap), { counterSuffix: true, requireHelp: true });
  const tx = { direction: "tx" }, rx = { direction: "rx" };
  assert.equal(valueOf(e, "vionet_rate_limit_bytes_per_second", tx), 12_500_000);
  assert.equal(valueOf(e, "vionet_rate_limit_burst_bytes", tx), 1e6);
  assert.equal(valueOf(e, "vionet_rate_limit_frames_per_second", tx), 1000);
  assert.equal(valueOf(e, "vionet_rate_limit_burst_frames", tx), 10);
  assert.equal(valueOf(e, "vionet_rate_limit_throttled_total", tx), 1);
  assert.equal(valueOf(e, "vionet_rate_limit_throttled_seconds_total", tx), 0.25);
  assert.equal(valueOf(e, "vionet_rate_limit_bytes_per_second", rx), 0);
  assert.equal(valueOf(e, "vionet_rate_limit_throttled_total", rx), 0);
});
