import assert from "node:assert/strict";
import {
  formatResponse,
  HttpServer,
  type HttpServerOptions,
  parseRequest,
  type Route,
} from "../../../parent/control/http_server.ts";
import { controlRoutes } from "../../../parent/control/control_api.ts";
import { quietLogger } from "../../helpers.ts";

const enc = new TextEncoder();
const dec = new TextDecoder();

Deno.test("parseRequest(): requests it takes, and what it refuses with which status", async (t) => {
  const max = 8192;
  const take: [string, string, Partial<{ method: string; path: string; query: string }>][] = [
    ["a GET", "GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n", { path: "/metrics" }],
    ["HTTP/1.0, no headers", "GET /metrics HTTP/1.0\r\n\r\n", { method: "GET" }],
    ["a query", "GET /metrics?x=1 HTTP/1.1\r\n\r\n", { path: "/metrics", query: "x=1" }],
    ["absolute form", "GET http://localhost/metrics HTTP/1.1\r\n\r\n", { path: "/metrics" }],
    ["a POST with a body", "POST /capture HTTP/1.1\r\nContent-Length: 2\r\n\r\nab", {
      method: "POST",
      path: "/capture",
    }],
  ];
  for (const [name, text, want] of take) {
    await t.step(`takes ${name}`, () => {
      const r = parseRequest(enc.encode(text), max);
      assert.equal(r.kind, "request", JSON.stringify(r));
      if (r.kind !== "request") return;
      for (const [k, v] of Object.entries(want)) {
        assert.equal(r.request[k as keyof typeof want], v, k);
      }
    });
  }
  const incomplete = ["GET /metrics HTTP/1.1\r\nHost: x\r\n", "GET /met", ""];
  for (const text of incomplete) {
    await t.step(`waits for more after ${JSON.stringify(text)}`, () => {
      assert.deepEqual(parseRequest(enc.encode(text), max), { kind: "incomplete" });
    });
  }
  const refuse: [string, string | Uint8Array, number][] = [
    ["garbage", "GARBAGE\r\n\r\n", 400],
    ["HTTP/2", "GET / HTTP/2.0\r\n\r\n", 400],
    ["a bare LF", "GET / HTTP/1.1\n\n", 400],
    ["a CR without LF", "GET / HTTP/1.1\rX", 400],
    ["a NUL byte", "GET /\0 HTTP/1.1\r\n\r\n", 400],
    ["binary junk", new Uint8Array([0x16, 0x03, 0x01, 0x00]), 400],
    ["a folded header", "GET / HTTP/1.1\r\nA: b\r\n c\r\n\r\n", 400],
    ["a header without a name", "GET / HTTP/1.1\r\n: b\r\n\r\n", 400],
    ["a target that is not a path", "GET metrics HTTP/1.1\r\n\r\n", 400],
    [
      "two Content-Lengths",
      "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
      400,
    ],
    ["a Content-Length that is not a number", "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400],
    ["Transfer-Encoding", "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501],
    ["a body past the limit", `POST / HTTP/1.1\r\nContent-Length: ${max}\r\n\r\n`, 413],
    ["a head past the limit", `GET /${"a".repeat(max)}`, 431],
  ];
  for (const [name, text, status] of refuse) {
    await t.step(`refuses ${name} with ${status}`, () => {
      const r = parseRequest(typeof text === "string" ? enc.encode(text) : text, max);
      assert.equal(r.kind, "error", JSON.stringify(r));
      if (r.kind === "error") assert.equal(r.status, status, r.reason);
    });
  }
});

Deno.test("formatResponse(): status line, length, Connection: close, extra headers", () => {
  const text = dec.decode(formatResponse({ status: 405, headers: { Allow: "GET" }, body: "né\n" }));
  assert.equal(
    text,
    "HTTP/1.1 405 Method Not Allowed\r\nContent-Type: text/plain; charset=utf-8\r\n" +
      "Content-Length: 4\r\nConnection: close\r\nAllow: GET\r\n\r\nné\n",
  );
});

/** A server in a fresh directory; `fn` gets it and its path; always stopped and removed. */
async function withServer(
  opts: Partial<HttpServerOptions>,
  fn: (server: HttpServer, path: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "vionet-http-" });
  const path = `${dir}/m.sock`;
  const server = HttpServer.listen(path, { routes: [], logger: quietLogger(), ...opts });
  try {
    await fn(server, path);
  } finally {
    await server.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Sends `raw`, reads to the end; the status, headers and body. */
async function exchange(path: string, raw: string | Uint8Array) {
  const conn = await Deno.connect({ transport: "unix", path });
  try {
    await conn.write(typeof raw === "string" ? enc.encode(raw) : raw);
    const chunks: Uint8Array[] = [];
    const buf = new Uint8Array(65536);
    for (;;) {
      const n = await conn.read(buf);
      if (n === null) break;
      chunks.push(buf.slice(0, n));
    }
    const text = dec.decode(new Uint8Array(chunks.flatMap((c) => [...c])));
    const [head, ...rest] = text.split("\r\n\r\n");
    const status = Number(/^HTTP\/1\.1 (\d{3}) /.exec(head)?.[1]);
    return { status, head, body: rest.join("\r\n\r\n") };
  } finally {
    conn.close();
  }
}

function get(path: string, target: string) {
  return exchange(path, `GET ${target} HTTP/1.1\r\nHost: localhost\r\n\r\n`);
}

const HELLO: Route = {
  method: "GET",
  path: "/hello",
  handle: () => ({ status: 200, body: "hi\n" }),
};

Deno.test("HttpServer: routes, 404, 405 with Allow, 500 from a handler that throws, 400 for garbage", async () => {
  const routes: Route[] = [
    HELLO,
    { method: "GET", path: "/boom", handle: () => Promise.reject(new Error("boom")) },
  ];
  await withServer({ routes }, async (server, path) => {
    assert.deepEqual([(await get(path, "/hello")).status, (await get(path, "/hello")).body], [
      200,
      "hi\n",
    ]);
    assert.equal((await get(path, "/nope")).status, 404);
    const wrong = await exchange(path, "DELETE /hello HTTP/1.1\r\n\r\n");
    assert.equal(wrong.status, 405);
    assert.match(wrong.head, /\r\nAllow: GET(\r\n|$)/);
    assert.equal((await get(path, "/boom")).status, 500);
    const garbage = await exchange(path, "\x16\x03\x01 this is not HTTP\r\n\r\n");
    assert.equal(garbage.status, 400);
    assert.equal(server.responses.get(400), 1);
    assert.equal(server.responses.get(200), 2);
  });
});

Deno.test("HttpServer: POST /rate-limit answers 501 with a body saying so", async () => {
  await withServer({ routes: controlRoutes(() => Promise.resolve("")) }, async (_server, path) => {
    const r = await exchange(path, `POST /rate-limit HTTP/1.1\r\nContent-Length: 0\r\n\r\n`);
    assert.equal(r.status, 501);
    assert.match(r.body, /not implemented/);
  });
});

Deno.test("HttpServer: /capture without --pcap answers 409 naming --pcap, 400 for a bad request first", async () => {
  await withServer({ routes: controlRoutes(() => Promise.resolve("")) }, async (_server, path) => {
    const on = await exchange(path, `POST /capture?state=on HTTP/1.1\r\nContent-Length: 0\r\n\r\n`);
    assert.equal(on.status, 409);
    assert.match(JSON.parse(on.body).error, /--pcap FILE/);
    assert.equal((await get(path, "/capture")).status, 409);
    const bad = await exchange(path, `POST /capture?state=x HTTP/1.1\r\nContent-Length: 0\r\n\r\n`);
    assert.equal(bad.status, 400);
    assert.match(JSON.parse(bad.body).error, /state "x" must be on or off/);
  });
});

Deno.test("HttpServer: a client that sends nothing is closed at its deadline, and others are served meanwhile", async () => {
  await withServer({ routes: [HELLO], requestTimeoutMs: 1500 }, async (server, path) => {
    const idle = await Deno.connect({ transport: "unix", path });
    const slow = await Deno.connect({ transport: "unix", path });
    await slow.write(enc.encode("GET /hel")); // and no more
    try {
      const t0 = Date.now();
      assert.equal((await get(path, "/hello")).status, 200);
      assert.ok(Date.now() - t0 < 1000, `served in ${Date.now() - t0} ms beside an idle client`);
      const buf = new Uint8Array(16);
      assert.equal(await idle.read(buf), null, "closed without a response");
      assert.equal(await slow.read(buf), null, "closed without a response");
      assert.ok(Date.now() - t0 >= 1400, "not before its time");
      assert.equal(server.timedOut, 2);
      assert.equal(server.clients, 0);
    } finally {
      idle.close();
      slow.close();
    }
  });
});

Deno.test("HttpServer: a client that never reads a large response is closed at its deadline", async () => {
  const big: Route = {
    method: "GET",
    path: "/big",
    handle: () => ({ status: 200, body: new Uint8Array(8 << 20) }),
  };
  await withServer({ routes: [big, HELLO], requestTimeoutMs: 500 }, async (server, path) => {
    const stuck = await Deno.connect({ transport: "unix", path });
    try {
      await stuck.write(enc.encode("GET /big HTTP/1.1\r\n\r\n"));
      await new Promise((r) => setTimeout(r, 100));
      assert.equal((await get(path, "/hello")).status, 200, "others are served meanwhile");
      const until = Date.now() + 3000;
      while (server.clients > 0 && Date.now() < until) {
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(server.clients, 0, "the reader that never read was closed");
      assert.equal(server.timedOut, 1);
    } finally {
      stuck.close();
    }
  });
});

Deno.test("HttpServer: beyond maxClients, clients wait in the backlog until a slot frees", async () => {
  await withServer(
    { routes: [HELLO], maxClients: 2, requestTimeoutMs: 500 },
    async (server, path) => {
      const idle = [
        await Deno.connect({ transport: "unix", path }),
        await Deno.connect({ transport: "unix", path }),
      ];
      try {
        await new Promise((r) => setTimeout(r, 150)); // both accepted
        assert.equal(server.clients, 2);
        const t0 = Date.now();
        const r = await get(path, "/hello");
        assert.equal(r.status, 200);
        const waited = Date.now() - t0;
        assert.ok(waited >= 250, `the third was served after ${waited} ms, before a slot freed`);
        assert.ok(waited < 2000, `the third waited ${waited} ms`);
      } finally {
        for (const c of idle) c.close();
      }
    },
  );
});

Deno.test("HttpServer: a head past 8 KiB gets 431, and the connection is closed", async () => {
  await withServer({ routes: [HELLO] }, async (_server, path) => {
    const r = await exchange(path, `GET /hello HTTP/1.1\r\nX: ${"a".repeat(9000)}\r\n\r\n`);
    assert.equal(r.status, 431);
  });
});

Deno.test("HttpServer: stop() removes its socket; a stale one is replaced, a live one refused", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vionet-http-" });
  const path = `${dir}/m.sock`;
  try {
    const a = HttpServer.listen(path, { routes: [HELLO] });
    assert.throws(() => HttpServer.listen(path, { routes: [HELLO] }), /another process/);
    await a.stop();
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
    // A stale socket (nobody listening) is replaced.
    const stale = Deno.listen({ transport: "unix", path });
    stale.close();
    const b = HttpServer.listen(path, { routes: [HELLO] });
    assert.equal((await get(path, "/hello")).status, 200);
    await b.stop();
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
