/** An HttpRequest as the HTTP server would parse it, for calling routes directly in tests. */

import type { HttpRequest } from "../../../parent/control/http_server.ts";

/** `method target` (a path with an optional `?query`) with `body`, HTTP/1.1, no headers. */
export function httpRequest(method: string, target: string, body = ""): HttpRequest {
  const q = target.indexOf("?");
  return {
    method,
    target,
    path: q < 0 ? target : target.slice(0, q),
    query: q < 0 ? "" : target.slice(q + 1),
    version: "1.1",
    headers: new Map(),
    body: new TextEncoder().encode(body),
  };
}
