/**
 * CaptureHost (parent/control/capture_host.ts) with its real worker and a
 * real file: the header is written at open; frames put in a pair's rings
 * reach the file only while the state is on; set() refuses to restart a
 * full capture with the reason; stop() writes what the rings still hold;
 * the file is created 0600, and a path that is not a regular file (a FIFO,
 * a symbolic link) is refused at open. The routes of `/capture` answer with
 * the status as JSON, 400 and 409 with the reason.
 */

import assert from "node:assert/strict";
import { CaptureHost } from "../../../parent/control/capture_host.ts";
import { CaptureProducer } from "../../../parent/io/capture_ring.ts";
import { captureRequest, controlRoutes } from "../../../parent/control/control_api.ts";
import type { HttpRequest, HttpResponse } from "../../../parent/control/http_server.ts";
import type { Logger } from "../../../parent/control/log.ts";
import type { HostMemory } from "../../../parent/io/regions.ts";
import { direction, readPcapng } from "../io/pcapng_reader.ts";
import { udpFrame } from "../io/capture_frames.ts";
import { httpRequest } from "./http_request.ts";

const lines: string[] = [];
const logger = { log: (_l: string, _p: string, m: string) => lines.push(m) } as unknown as Logger;

/** The frame at a fake address 0x1000. */
function memoryOf(frame: Uint8Array): { memory: HostMemory; iov: Uint32Array } {
  const memory: HostMemory = {
    find: (a, n) => (a >= 0x1000 && a + n <= 0x1000 + frame.length ? 0 : -1),
    contains: (a, n) => a >= 0x1000 && a + n <= 0x1000 + frame.length,
    start: () => 0x1000,
    guestAddress: () => -1,
    bytes: () => frame,
    window: () => {
      throw new Error("unused");
    },
  };
  return { memory, iov: new Uint32Array([0x1000, 0, frame.length, 0]) };
}

async function until(what: string, f: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

Deno.test({
  name: "CaptureHost: frames reach the file only while on; stop() writes what is left; 0600",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const dir = await Deno.makeTempDir();
    const path = `${dir}/c.pcapng`;
    const host = await CaptureHost.open({
      path,
      maxBytes: 1 << 20,
      start: false,
      pairs: 2,
      tapName: "vt0",
      logger,
    });
    try {
      assert.equal((Deno.statSync(path).mode ?? 0) & 0o777, 0o600);
      const headerBytes = Deno.statSync(path).size;
      assert.ok(headerBytes > 0, "the header is written at open");
      assert.equal(host.status().state, "off");
      const frame = udpFrame(300, 7);
      const { memory, iov } = memoryOf(frame);
      const p1 = host.pair(1);
      const writer = new CaptureProducer(p1.writer, p1.state);
      const poller = new CaptureProducer(p1.poller, p1.state);
      assert.equal(writer.state(), 0, "off: the data path sees OFF");
      assert.deepEqual(host.set(true).ok, true);
      assert.equal(writer.state(), 1);
      writer.tx(new Uint8Array(12), 0, iov, 0, 1, frame.length, memory);
      await until("the frame in the file", () => host.status().packets === 1);
      assert.equal(host.set(false).ok, true);
      assert.equal(poller.state(), 0);
      // Already in a ring when capture stops: still written by stop().
      const rx = new Uint8Array(12 + frame.length);
      rx.set(frame, 12);
      const m2 = memoryOf(rx);
      poller.rx(m2.iov, 0, 4, rx.length, m2.memory);
      await host.stop();
      const file = readPcapng(await Deno.readFile(path));
      assert.deepEqual(file.interfaces.map((i) => i.name), ["vt0/pair0", "vt0/pair1"]);
      assert.equal(file.packets.length, 2);
      assert.deepEqual(file.packets.map((p) => [p.interfaceId, direction(p)]), [
        [1, "outbound"],
        [1, "inbound"],
      ]);
      assert.deepEqual(file.packets[1].data, frame);
      assert.equal(host.status().fileBytes, (await Deno.stat(path)).size);
      assert.equal(host.set(true).ok, false, "no change after stop");
    } finally {
      await host.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test({
  name: "CaptureHost: a full file ends the capture; set(true) then says why",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const dir = await Deno.makeTempDir();
    const path = `${dir}/c.pcapng`;
    const host = await CaptureHost.open({
      path,
      maxBytes: 65536,
      start: true,
      pairs: 1,
      tapName: "vt0",
      logger,
    });
    try {
      const frame = udpFrame(1500);
      const { memory, iov } = memoryOf(frame);
      const p = host.pair(0);
      const w = new CaptureProducer(p.writer, p.state);
      for (let i = 0; i < 60; i++) {
        if (w.state() === 1) w.tx(new Uint8Array(12), 0, iov, 0, 1, frame.length, memory);
        else w.overMax();
        await new Promise((r) => setTimeout(r, 1));
      }
      await until("the state full", () => host.status().state === "full");
      const r = host.set(true);
      assert.equal(r.ok, false);
      assert.match((r as { reason: string }).reason, /reached --pcap-max \(65536 bytes\)/);
      await host.stop();
      const size = (await Deno.stat(path)).size;
      assert.ok(size <= 65536, `${size} bytes`);
      const s = host.status();
      assert.equal(readPcapng(await Deno.readFile(path)).packets.length, s.packets);
      assert.equal(s.packets + s.droppedOverMax, 60);
      assert.ok(lines.some((l) => /capture stopped: the file reached --pcap-max/.test(l)));
    } finally {
      await host.stop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

Deno.test("CaptureHost: a FIFO or a symbolic link is refused at open, and nothing is left running", async () => {
  const dir = await Deno.makeTempDir();
  try {
    const fifo = `${dir}/fifo`;
    const mk = await new Deno.Command("mkfifo", { args: [fifo] }).output();
    assert.ok(mk.success);
    await assert.rejects(
      CaptureHost.open({
        path: fifo,
        maxBytes: 1 << 20,
        start: true,
        pairs: 1,
        tapName: "t",
        logger,
      }),
      /ENXIO|not a regular file/,
    );
    await Deno.writeTextFile(`${dir}/target`, "keep");
    await Deno.symlink(`${dir}/target`, `${dir}/link`);
    await assert.rejects(
      CaptureHost.open({
        path: `${dir}/link`,
        maxBytes: 1 << 20,
        start: true,
        pairs: 1,
        tapName: "t",
        logger,
      }),
      /ELOOP/,
    );
    assert.equal(
      await Deno.readTextFile(`${dir}/target`),
      "keep",
      "the link's target is untouched",
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("captureRequest: state from the query, a form body or JSON; each mistake named", () => {
  assert.deepEqual(captureRequest(httpRequest("POST", "/capture?state=on")), { on: true });
  assert.deepEqual(captureRequest(httpRequest("POST", "/capture", "state=off")), { on: false });
  assert.deepEqual(captureRequest(httpRequest("POST", "/capture", '{"state":"on"}')), { on: true });
  assert.deepEqual(captureRequest(httpRequest("POST", "/capture?state=on", "state=on")), {
    on: true,
  });
  const errors: Array<[HttpRequest, RegExp]> = [
    [httpRequest("POST", "/capture"), /say which state/],
    [httpRequest("POST", "/capture?state=ON"), /state "ON" must be on or off/],
    [httpRequest("POST", "/capture?x=1&state=on"), /unknown parameter "x"/],
    [httpRequest("POST", "/capture", "{bad"), /not JSON/],
    [httpRequest("POST", "/capture", '{"state":1}'), /names no state/],
    [httpRequest("POST", "/capture?state=off", "state=on"), /different states/],
  ];
  for (const [req, re] of errors) {
    const r = captureRequest(req);
    assert.ok("error" in r && re.test(r.error), `${req.target} ${JSON.stringify(r)}`);
  }
});

Deno.test("/capture routes: 200 with the status, 409 with the reason when the capture refuses", async () => {
  const status = {
    state: "on" as const,
    file: "/f",
    maxBytes: 1,
    fileBytes: 0,
    packets: 0,
    bytes: 0,
    txPackets: 0,
    rxPackets: 0,
    droppedBehind: 0,
    droppedOverMax: 0,
    writeErrors: 0,
    corrupt: 0,
  };
  let refuse = false;
  const routes = controlRoutes(() => Promise.resolve(""), undefined, {
    set: (on) =>
      refuse
        ? { ok: false, reason: "the file is full", status: { ...status, state: "full" } }
        : { ok: true, status: { ...status, state: on ? "on" : "off" } },
    status: () => status,
  });
  const call = async (method: string, target: string): Promise<HttpResponse> => {
    const route = routes.find((r) => r.method === method && r.path === "/capture")!;
    return await route.handle(httpRequest(method, target));
  };
  const off = await call("POST", "/capture?state=off");
  assert.equal(off.status, 200);
  assert.equal(JSON.parse(off.body as string).state, "off");
  assert.equal((await call("GET", "/capture")).status, 200);
  refuse = true;
  const full = await call("POST", "/capture?state=on");
  assert.equal(full.status, 409);
  assert.equal(JSON.parse(full.body as string).error, "the file is full");
  assert.equal((await call("POST", "/capture?state=bad")).status, 400);
});
