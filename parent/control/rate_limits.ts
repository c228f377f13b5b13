/**
 * The NIC's rate limits as the parent's main thread holds them: the shared
 * buckets every pair's I/O workers take from (`io/rate_limiter.ts`), set at
 * start from `--rate-limit` and changed at run time by `POST /rate-limit`
 * on the `--metrics` socket (`control_api.ts`), and their counters for the
 * SIGUSR2 dump and `/metrics`.
 *
 * A change is in force as soon as it is stored: every worker reads the
 * buckets at each batch, and a worker waiting for tokens looks again within
 * `MAX_HOLD_MS` (50 ms).
 *
 * @module
 */

import { monotonicMs } from "../host/libc.ts";
import {
  createRateLimitBuffer,
  DIR_RX,
  DIR_TX,
  type DirectionCounters,
  type DirectionLimit,
  RateLimiter,
} from "../io/rate_limiter.ts";
import {
  formatDirection,
  parseRateLimit,
  queryToSpec,
  type RateLimitChange,
  RateLimitSyntaxError,
} from "./rate_limit_spec.ts";
import type { HttpRequest, HttpResponse } from "./http_server.ts";

/** One direction as `/metrics` and the stats dump show it. */
export interface DirectionSnapshot {
  limit: DirectionLimit;
  counters: DirectionCounters;
}

/** Both directions. */
export interface RateLimitSnapshot {
  tx: DirectionSnapshot;
  rx: DirectionSnapshot;
}

/** The NIC's limits (see the module comment). */
export class NicRateLimits {
  readonly #rl: RateLimiter;

  constructor(clock: () => number = monotonicMs) {
    this.#rl = new RateLimiter(createRateLimitBuffer(), clock);
  }

  /** The buffer every I/O worker is given. */
  get buffer(): SharedArrayBuffer {
    return this.#rl.buffer;
  }

  /** Applies a change: each direction it names gets exactly what it says (null: no limit). */
  apply(change: RateLimitChange): void {
    if (change.tx !== undefined) this.#rl.configure(DIR_TX, change.tx);
    if (change.rx !== undefined) this.#rl.configure(DIR_RX, change.rx);
  }

  /** The limits as a spec: `tx=50Mbit,burst=625000,rx=off`. */
  describe(): string {
    return `${formatDirection("tx", this.#rl.limit(DIR_TX))},${
      formatDirection("rx", this.#rl.limit(DIR_RX))
    }`;
  }

  /** Whether either direction is limited. */
  get any(): boolean {
    return this.#rl.active(DIR_TX) || this.#rl.active(DIR_RX);
  }

  snapshot(): RateLimitSnapshot {
    const rl = this.#rl;
    return {
      tx: { limit: rl.limit(DIR_TX), counters: rl.counters(DIR_TX) },
      rx: { limit: rl.limit(DIR_RX), counters: rl.counters(DIR_RX) },
    };
  }

  /**
   * `POST /rate-limit`: the spec in the body, or (an empty body) in the
   * query string; either may be form-encoded (`&` between items, %-escapes). 200 with the limits now in force,
   * 400 with the reason for a spec that does not parse (nothing changes).
   */
  post(request: HttpRequest): HttpResponse {
    let spec: string;
    try {
      // A body as `curl -d` sends it (form-encoded: `&` or `,` between items) or the query.
      spec = queryToSpec(
        request.body.length !== 0
          ? new TextDecoder("utf-8", { fatal: true }).decode(request.body)
          : request.query,
      );
      this.apply(parseRateLimit(spec));
    } catch (e) {
      if (e instanceof RateLimitSyntaxError || e instanceof TypeError) {
        return { status: 400, body: `rate limit refused: ${(e as Error).message}\n` };
      }
      throw e;
    }
    return { status: 200, body: `${this.describe()}\n` };
  }

  /** `GET /rate-limit`: the limits now in force, as a spec. */
  get(): HttpResponse {
    return { status: 200, body: `${this.describe()}\n` };
  }
}
