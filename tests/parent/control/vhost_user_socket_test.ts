import assert from "node:assert/strict";
import * as libc from "../../../parent/host/libc.ts";
import type {
  DevicePort,
  MappedRegion,
  VringAddrFields,
} from "../../../parent/control/vhost_user_backend.ts";
import { VIONET_PROTOCOL_FEATURES } from "../../../parent/control/vhost_user_backend.ts";
import {
  type DisconnectInfo,
  FOLLOW_UP_WAIT_MS,
  VhostUserClient,
  type VhostUserServeOptions,
  VhostUserServer,
} from "../../../parent/control/vhost_user_socket.ts";
import {
  encodeMessage,
  encodeU64,
  encodeVringState,
  type MemoryRegionDesc,
  VHOST_F_LOG_ALL,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
} from "../../../parent/control/vhost_user_messages.ts";
import { encodeMemTable, encodeVringFd } from "./vhost_user_encode.ts";
import { VIRTIO_F_VERSION_1, VIRTIO_NET_F_MAC } from "../../../ipc/features.ts";
import { quietLogger } from "../../helpers.ts";
import { accelArgs, guestAssets, guestAssetsMissing } from "../../e2e/guest.ts";
import {
  makeMemfd,
  openFdsMatching,
  readAt,
  readEventfd,
  TestFrontend,
  TestListener,
  writeAt,
} from "./vhost_user_frontend.ts";

const DEVICE_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC;

/** A device that records what it was given and owns kick/call fds like the real one. */
class RecordingDevice implements DevicePort {
  regions: MappedRegion[] = [];
  kick = new Map<number, number | null>();
  call = new Map<number, number | null>();
  base = new Map<number, number>();
  resets = 0;

  #replace(map: Map<number, number | null>, index: number, fd: number | null): void {
    const old = map.get(index);
    if (old !== undefined && old !== null) libc.close(old);
    map.set(index, fd);
  }
  getFeatures(): Promise<bigint> {
    return Promise.resolve(DEVICE_FEATURES);
  }
  setFeatures(_features: bigint): Promise<void> {
    return Promise.resolve();
  }
  setMemTable(regions: MappedRegion[]): Promise<void> {
    this.regions = [...regions];
    return Promise.resolve();
  }
  addMemRegion(region: MappedRegion): Promise<void> {
    this.regions.push(region);
    return Promise.resolve();
  }
  removeMemRegion(gpa: bigint, _size: bigint): Promise<void> {
    this.regions = this.regions.filter((r) => r.guestPhysAddr !== gpa);
    return Promise.resolve();
  }
  setVringNum(_index: number, _num: number): Promise<void> {
    return Promise.resolve();
  }
  setVringAddr(_index: number, _addr: VringAddrFields): Promise<void> {
    return Promise.resolve();
  }
  setVringBase(index: number, base: number): Promise<void> {
    this.base.set(index, base);
    return Promise.resolve();
  }
  getVringBase(index: number): Promise<number> {
    this.#replace(this.kick, index, null);
    return Promise.resolve(this.base.get(index) ?? 0);
  }
  setVringKick(index: number, fd: number | null): Promise<void> {
    this.#replace(this.kick, index, fd);
    return Promise.resolve();
  }
  setVringCall(index: number, fd: number | null): Promise<void> {
    this.#replace(this.call, index, fd);
    return Promise.resolve();
  }
  setVringEnable(_index: number, _enabled: boolean): Promise<void> {
    return Promise.resolve();
  }
  forgetRegion(_region: MappedRegion): boolean {
    return false; // setMemTable and removeMemRegion always release
  }
  setLogAll(_on: boolean): Promise<void> {
    return Promise.resolve();
  }
  setLogBase(_log: MappedRegion): Promise<void> {
    return Promise.resolve();
  }
  sendRarp(_mac: Uint8Array): Promise<void> {
    return Promise.resolve();
  }
  reset(): Promise<void> {
    this.resets++;
    for (const [i] of this.kick) this.#replace(this.kick, i, null);
    for (const [i] of this.call) this.#replace(this.call, i, null);
    return Promise.resolve();
  }
}

/** Server options with fast polling and a queue of disconnect reports. */
function serveOptions(device: DevicePort) {
  const disconnects: DisconnectInfo[] = [];
  const waiters: ((d: DisconnectInfo) => void)[] = [];
  let refused = 0;
  const options: VhostUserServeOptions = {
    device,
    pollIntervalMs: 20,
    messageTimeoutMs: 1000,
    onDisconnect: (info) => {
      const w = waiters.shift();
      if (w) w(info);
      else disconnects.push(info);
    },
    onRefused: () => refused++,
  };
  const nextDisconnect = (): Promise<DisconnectInfo> => {
    const d = disconnects.shift();
    if (d) return Promise.resolve(d);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error("no disconnect within 5 s")), 5000);
      waiters.push((info) => {
        clearTimeout(timer);
        resolve(info);
      });
    });
  };
  return { options, nextDisconnect, refused: () => refused };
}

function tempSocketPath(): { dir: string; path: string } {
  const dir = Deno.makeTempDirSync({ prefix: "vu-" });
  return { dir, path: `${dir}/vhost.sock` };
}

const PATTERN = new TextEncoder().encode("vionet guest memory says hello");

Deno.test("memfd regions passed with SCM_RIGHTS are mapped and visible both ways", async () => {
  const { dir, path } = tempSocketPath();
  const device = new RecordingDevice();
  const { options, nextDisconnect } = serveOptions(device);
  const eventfdsBefore = openFdsMatching("eventfd").length;
  const server = VhostUserServer.listen(path, options);
  const fe = TestFrontend.connect(path);
  try {
    const features = await fe.requestU64(VHOST_USER_GET_FEATURES);
    assert.equal(features, DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL);
    await fe.send(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES));
    await fe.send(VHOST_USER_SET_OWNER);
    await fe.send(VHOST_USER_SET_FEATURES, encodeU64(features));

    const low = makeMemfd(0x1_0000);
    const high = makeMemfd(0x20_0000);
    writeAt(low, 0, PATTERN);
    // A region that starts 0x1010 bytes into its file: not page aligned.
    writeAt(high, 0x1010, PATTERN);
    const regions: MemoryRegionDesc[] = [
      { guestPhysAddr: 0n, size: 0x1_0000n, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n },
      {
        guestPhysAddr: 0x1_0000_0000n,
        size: 0x2000n,
        userAddr: 0x7f10_0000_0000n,
        mmapOffset: 0x1010n,
      },
    ];
    const ack = await fe.requestU64(VHOST_USER_SET_MEM_TABLE, encodeMemTable(regions), {
      fds: [low, high],
      needReply: true,
    });
    assert.equal(ack, 0n);
    assert.equal(device.regions.length, 2);
    for (let i = 0; i < 2; i++) {
      const r = device.regions[i];
      assert.equal(r.guestPhysAddr, regions[i].guestPhysAddr);
      const seen = new Uint8Array(
        Deno.UnsafePointerView.getArrayBuffer(r.pointer, PATTERN.byteLength),
      );
      assert.deepEqual(seen, PATTERN, `region ${i} shows the file's bytes`);
    }
    // The device writes through its mapping; the VMM sees it in the file.
    new Uint8Array(Deno.UnsafePointerView.getArrayBuffer(device.regions[1].pointer, 0x2000))
      .set([1, 2, 3], 0x1ffd);
    assert.deepEqual(readAt(high, 0x1010 + 0x1ffd, 3), new Uint8Array([1, 2, 3]));

    // The back-end holds its own descriptors for both regions.
    libc.close(low);
    libc.close(high);
    assert.equal(openFdsMatching("vhost-test").length, 2);

    // SET_VRING_CALL: the new eventfd is signalled exactly once.
    const call = libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC);
    const kick = libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC);
    await fe.send(VHOST_USER_SET_VRING_NUM, encodeVringState(0, 256));
    await fe.send(VHOST_USER_SET_VRING_BASE, encodeVringState(0, 7));
    await fe.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false), { fds: [call] });
    await fe.send(VHOST_USER_SET_VRING_KICK, encodeVringFd(0, false), { fds: [kick] });
    assert.equal(await fe.getVringBase(0), 7);
    assert.equal(readEventfd(call), 1n);
    assert.equal(readEventfd(call), 0n);
    libc.close(call);
    libc.close(kick);

    // A disconnect releases every mapping and descriptor.
    fe.close();
    const info = await nextDisconnect();
    assert.equal(info.reason, "eof");
    assert.equal(openFdsMatching("vhost-test").length, 0);
    assert.equal(openFdsMatching("eventfd").length, eventfdsBefore);
    assert.deepEqual(device.regions, []);
    assert.equal(device.resets, 1);
  } finally {
    fe.close();
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("a region fd smaller than offset+size is refused before mapping; the next connection is served", async () => {
  const { dir, path } = tempSocketPath();
  const device = new RecordingDevice();
  const { options, nextDisconnect } = serveOptions(device);
  const server = VhostUserServer.listen(path, options);
  try {
    const fe = TestFrontend.connect(path);
    await fe.send(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES));
    const small = makeMemfd(0x1000);
    const table = encodeMemTable([
      { guestPhysAddr: 0n, size: 0x1000n, userAddr: 0n, mmapOffset: 0x800n },
    ]);
    // REPLY_ACK: a non-zero ack, then the connection ends.
    assert.equal(
      await fe.requestU64(VHOST_USER_SET_MEM_TABLE, table, { fds: [small], needReply: true }),
      1n,
    );
    await fe.expectClosed();
    libc.close(small);
    fe.close();
    const info = await nextDisconnect();
    assert.equal(info.reason, "protocol");
    assert.match(info.error!.message, /runs past the end of its file \(0x1000 bytes\)/);
    assert.equal(device.regions.length, 0);
    assert.equal(openFdsMatching("vhost-test").length, 0);

    const fe2 = TestFrontend.connect(path);
    assert.notEqual(await fe2.requestU64(VHOST_USER_GET_FEATURES), 0n);
    fe2.close();
    await nextDisconnect();
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("a bad message closes the connection and its fds; the server accepts the next one", async (t) => {
  const { dir, path } = tempSocketPath();
  const { options, nextDisconnect } = serveOptions(new RecordingDevice());
  const server = VhostUserServer.listen(path, options);
  try {
    const cases: [string, Uint8Array, RegExp][] = [
      ["version 0", encodeMessage(VHOST_USER_GET_FEATURES, 0), /version 0/],
      ["an unknown request", encodeMessage(200, 1), /Unknown request 200/],
      [
        "a truncated payload",
        encodeMessage(VHOST_USER_SET_FEATURES, 1, new Uint8Array(8)).subarray(0, 16),
        /Connection closed in the middle of a message|middle of its payload/,
      ],
      [
        "an fd on a request that carries none",
        encodeMessage(VHOST_USER_SET_OWNER, 1),
        /came with 1 file descriptor, takes 0/,
      ],
    ];
    for (const [name, bytes, pattern] of cases) {
      await t.step(name, async () => {
        const fe = TestFrontend.connect(path);
        const memfd = makeMemfd(4096);
        await fe.sendRaw(bytes, [memfd]);
        libc.close(memfd);
        if (name === "a truncated payload") libc.shutdown(fe.fd, 1 /* SHUT_WR */);
        await fe.expectClosed();
        fe.close();
        const info = await nextDisconnect();
        assert.equal(info.reason, "protocol");
        assert.match(info.error!.message, pattern);
        // The descriptor that came with the bad message was closed.
        assert.equal(openFdsMatching("vhost-test").length, 0);
      });
    }
    await t.step("then a well-formed session works", async () => {
      const fe = TestFrontend.connect(path);
      assert.equal(
        await fe.requestU64(VHOST_USER_GET_FEATURES),
        DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL,
      );
      fe.close();
      assert.equal((await nextDisconnect()).reason, "eof");
    });
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("a second connection while one is active is closed; the first keeps working", async () => {
  const { dir, path } = tempSocketPath();
  const s = serveOptions(new RecordingDevice());
  const server = VhostUserServer.listen(path, s.options);
  try {
    const first = TestFrontend.connect(path);
    await first.requestU64(VHOST_USER_GET_FEATURES);
    assert.equal(server.connected, true);
    const second = TestFrontend.connect(path);
    await second.expectClosed();
    second.close();
    assert.equal(s.refused(), 1);
    assert.notEqual(await first.requestU64(VHOST_USER_GET_FEATURES), 0n);
    first.close();
    await s.nextDisconnect();
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("listen replaces a stale socket, refuses a live one or a non-socket, and cleans up", async () => {
  const { dir, path } = tempSocketPath();
  const { options, nextDisconnect } = serveOptions(new RecordingDevice());
  try {
    Deno.writeTextFileSync(path, "not a socket");
    assert.throws(() => VhostUserServer.listen(path, options), /it exists and is not a socket/);
    assert.equal(Deno.readTextFileSync(path), "not a socket");
    Deno.removeSync(path);

    // A socket file left behind by a dead process.
    const stale = new TestListener(path);
    libc.close(stale.fd);
    assert.ok(Deno.lstatSync(path).isSocket);
    const server = VhostUserServer.listen(path, options);
    assert.throws(() => VhostUserServer.listen(path, options), /another process is listening/);
    // The live server saw the probe as a connection that ended at once.
    assert.equal((await nextDisconnect()).messages, 0);
    const fe = TestFrontend.connect(path);
    assert.notEqual(await fe.requestU64(VHOST_USER_GET_FEATURES), 0n);
    fe.close();
    await server.stop();
    assert.throws(() => Deno.lstatSync(path), Deno.errors.NotFound);
  } finally {
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("--fd: an inherited listening socket is served", async () => {
  const { dir, path } = tempSocketPath();
  const { options, nextDisconnect } = serveOptions(new RecordingDevice());
  const listener = new TestListener(path);
  const server = VhostUserServer.fromFd(listener.fd, options);
  try {
    assert.equal(server.listenFd, listener.fd);
    for (let i = 0; i < 2; i++) {
      const fe = TestFrontend.connect(path);
      assert.notEqual(await fe.requestU64(VHOST_USER_GET_FEATURES), 0n);
      fe.close();
      await nextDisconnect();
    }
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("--fd: an inherited connected socket is served once", async () => {
  const { options, nextDisconnect } = serveOptions(new RecordingDevice());
  const [ours, theirs] = libc.socketpair(libc.AF_UNIX, libc.SOCK_STREAM | libc.SOCK_CLOEXEC);
  libc.setNonBlocking(ours, true);
  const server = VhostUserServer.fromFd(theirs, options);
  assert.equal(server.listenFd, null);
  const fe = new TestFrontend(ours);
  assert.notEqual(await fe.requestU64(VHOST_USER_GET_FEATURES), 0n);
  fe.close();
  assert.equal((await nextDisconnect()).reason, "eof");
  await server.done;
});

Deno.test("--fd refuses a descriptor that is not a stream socket", () => {
  const { options } = serveOptions(new RecordingDevice());
  const memfd = makeMemfd(4096);
  try {
    assert.throws(() => VhostUserServer.fromFd(memfd, options), /is not a socket/);
  } finally {
    libc.close(memfd);
  }
});

Deno.test("client mode retries until the VMM listens and reconnects after a disconnect", async () => {
  const { dir, path } = tempSocketPath();
  const s = serveOptions(new RecordingDevice());
  const client = VhostUserClient.connect(path, {
    ...s.options,
    backoff: { initialMs: 10, maxMs: 40 },
  });
  let listener: TestListener | null = null;
  try {
    await new Promise((r) => setTimeout(r, 100)); // nobody listens yet: it backs off
    assert.equal(client.connections, 0);
    const vmmSocket = new TestListener(path);
    listener = vmmSocket;
    for (let i = 1; i <= 2; i++) {
      const vmm = await vmmSocket.accept();
      assert.equal(
        await vmm.requestU64(VHOST_USER_GET_FEATURES),
        DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL,
      );
      assert.equal(client.connections, i);
      vmm.close(); // the VMM drops the connection; the back-end comes back
      assert.equal((await s.nextDisconnect()).reason, "eof");
    }
  } finally {
    await client.stop();
    listener?.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("stop() ends the active connection and releases its memory", async () => {
  const { dir, path } = tempSocketPath();
  const device = new RecordingDevice();
  const { options, nextDisconnect } = serveOptions(device);
  const server = VhostUserServer.listen(path, options);
  const fe = TestFrontend.connect(path);
  try {
    const memfd = makeMemfd(0x4000);
    const table = encodeMemTable([
      { guestPhysAddr: 0n, size: 0x4000n, userAddr: 0n, mmapOffset: 0n },
    ]);
    await fe.send(VHOST_USER_SET_MEM_TABLE, table, { fds: [memfd] });
    libc.close(memfd);
    await fe.requestU64(VHOST_USER_GET_FEATURES); // the table has been handled
    assert.equal(device.regions.length, 1);
    await server.stop();
    assert.equal((await nextDisconnect()).reason, "stopped");
    assert.equal(openFdsMatching("vhost-test").length, 0);
    await fe.expectClosed();
  } finally {
    fe.close();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("call fds that would stall or kill a naive back-end are handled", async (t) => {
  const { dir, path } = tempSocketPath();
  const { options, nextDisconnect } = serveOptions(new RecordingDevice());
  const server = VhostUserServer.listen(path, options);
  try {
    await t.step("a pipe with no reader ends the connection, not the daemon", async () => {
      const fe = TestFrontend.connect(path);
      const [r, w] = libc.pipe2(libc.O_CLOEXEC);
      libc.close(r);
      await fe.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false), { fds: [w] });
      libc.close(w);
      await fe.expectClosed();
      fe.close();
      const info = await nextDisconnect();
      assert.equal(info.reason, "protocol");
      assert.match(info.error!.message, /call fd cannot be signalled: .*EPIPE/);
    });
    await t.step("a full pipe does not block the control path", async () => {
      const fe = TestFrontend.connect(path);
      const [r, w] = libc.pipe2(libc.O_CLOEXEC | libc.O_NONBLOCK);
      const chunk = new Uint8Array(4096);
      try {
        for (;;) libc.write(w, chunk);
      } catch (e) {
        assert.equal((e as libc.SyscallError).code, "EAGAIN");
      }
      libc.setNonBlocking(w, false); // the back-end must set O_NONBLOCK itself
      await fe.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false), { fds: [w] });
      assert.notEqual(await fe.requestU64(VHOST_USER_GET_FEATURES), 0n);
      libc.close(w);
      libc.close(r);
      fe.close();
      assert.equal((await nextDisconnect()).reason, "eof");
    });
    await t.step("a regular file is refused as a call fd", async () => {
      const fe = TestFrontend.connect(path);
      const file = Deno.makeTempFileSync({ dir });
      const fd = libc.open(file, libc.O_RDWR | libc.O_CLOEXEC);
      await fe.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false), { fds: [fd] });
      libc.close(fd);
      await fe.expectClosed();
      fe.close();
      const info = await nextDisconnect();
      assert.match(info.error!.message, /neither an eventfd nor a pipe/);
      assert.equal(Deno.statSync(file).size, 0);
    });
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("more than 8 descriptors on one message: all closed, connection ended", async () => {
  const { dir, path } = tempSocketPath();
  const { options, nextDisconnect } = serveOptions(new RecordingDevice());
  const server = VhostUserServer.listen(path, options);
  try {
    const fe = TestFrontend.connect(path);
    const memfds = Array.from({ length: 9 }, () => makeMemfd(4096));
    const regions = memfds.slice(0, 8).map((_, i) => ({
      guestPhysAddr: BigInt(i) * 0x1000n,
      size: 0x1000n,
      userAddr: 0n,
      mmapOffset: 0n,
    }));
    await fe.send(VHOST_USER_SET_MEM_TABLE, encodeMemTable(regions), { fds: memfds });
    for (const fd of memfds) libc.close(fd);
    await fe.expectClosed();
    fe.close();
    const info = await nextDisconnect();
    assert.equal(info.reason, "protocol");
    assert.match(info.error!.message, /more than 8 file descriptors/);
    assert.equal(openFdsMatching("vhost-test").length, 0);
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

Deno.test("a front-end that reconnects while the old connection is still releasing is served, not refused", async () => {
  const { dir, path } = tempSocketPath();
  class SlowResetDevice extends RecordingDevice {
    override async reset(): Promise<void> {
      await new Promise((r) => setTimeout(r, 200));
      await super.reset();
    }
  }
  const device = new SlowResetDevice();
  const s = serveOptions(device);
  const server = VhostUserServer.listen(path, s.options);
  try {
    const first = TestFrontend.connect(path);
    await first.requestU64(VHOST_USER_GET_FEATURES);
    first.close();
    const second = TestFrontend.connect(path);
    assert.notEqual(await second.requestU64(VHOST_USER_GET_FEATURES), 0n);
    // The old connection finished releasing before the new one was served.
    assert.equal(device.resets, 1);
    assert.equal(s.refused(), 0);
    second.close();
    await s.nextDisconnect();
    await s.nextDisconnect();
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});

/** Why the real-QEMU test cannot run here, or undefined. */
function qemuMissing(): string | undefined {
  const assets = guestAssetsMissing();
  if (assets !== undefined) return assets;
  try {
    new Deno.Command("qemu-system-x86_64", { args: ["--version"], stdout: "null" }).outputSync();
  } catch {
    return "qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)";
  }
  return undefined;
}

const QEMU_MISSING = qemuMissing();
if (QEMU_MISSING !== undefined) {
  console.warn(`skipping the real-QEMU handshake test: ${QEMU_MISSING}`);
}

Deno.test({
  name: "QEMU's own vhost-user front-end completes the handshake and a clean disconnect",
  ignore: QEMU_MISSING !== undefined,
  async fn() {
    const { dir, path } = tempSocketPath();
    const calls: string[] = [];
    class LoggingDevice extends RecordingDevice {
      override setFeatures(f: bigint) {
        calls.push(`setFeatures 0x${f.toString(16)}`);
        return super.setFeatures(f);
      }
      override setVringKick(i: number, fd: number | null) {
        calls.push(`kick ${i}`);
        return super.setVringKick(i, fd);
      }
      override getVringBase(i: number) {
        calls.push(`getVringBase ${i}`);
        return super.getVringBase(i);
      }
      override setVringAddr(i: number, a: VringAddrFields) {
        calls.push(`addr ${i} 0x${a.descUser.toString(16)}`);
        return super.setVringAddr(i, a);
      }
    }
    const device = new LoggingDevice();
    const { options, nextDisconnect } = serveOptions(device);
    const memfdsBefore = openFdsMatching("memfd:").length;
    const server = VhostUserServer.listen(path, options);
    const { kernel, initrd } = guestAssets();
    const qemu = new Deno.Command("qemu-system-x86_64", {
      args: [
        ...accelArgs(),
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-m",
        "256M",
        "-object",
        "memory-backend-memfd,id=mem,size=256M,share=on",
        "-numa",
        "node,memdev=mem",
        "-kernel",
        kernel,
        "-initrd",
        initrd,
        "-append",
        "console=ttyS0 panic=-1",
        "-chardev",
        `socket,id=vu,path=${path}`,
        "-netdev",
        "vhost-user,id=n0,chardev=vu",
        "-device",
        "virtio-net-pci,netdev=n0,vectors=0",
      ],
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    let killed = false;
    try {
      // The guest's virtio-net driver starts the device: both rings kicked.
      const deadline = Date.now() + 60_000;
      while (!(calls.includes("kick 0") && calls.includes("kick 1"))) {
        if (Date.now() > deadline) throw new Error(`device never started: ${calls.join("; ")}`);
        await new Promise((r) => setTimeout(r, 50));
      }
      const acked = BigInt(calls.find((c) => c.startsWith("setFeatures "))!.split(" ")[1]);
      assert.notEqual(acked & VIRTIO_F_VERSION_1, 0n, "the guest acked VERSION_1");
      assert.equal(acked & ~DEVICE_FEATURES, 0n, "and nothing the device did not offer");
      // QEMU used ADD_MEM_REG (CONFIGURE_MEM_SLOTS); the rings lie inside mapped memory.
      assert.ok(device.regions.length >= 1);
      for (const i of [0, 1]) {
        const desc = BigInt(calls.find((c) => c.startsWith(`addr ${i} `))!.split(" ")[2]);
        assert.ok(
          device.regions.some((r) => r.userAddr <= desc && desc < r.userAddr + r.size),
          `ring ${i} descriptor table 0x${desc.toString(16)} is in a mapped region`,
        );
      }
      assert.ok(openFdsMatching("memfd:").length > memfdsBefore, "guest memory fds held");
      qemu.kill("SIGTERM");
      killed = true;
      const info = await nextDisconnect();
      assert.equal(info.reason, "eof", info.error?.message);
      // QEMU stopped the rings with GET_VRING_BASE before it went.
      assert.ok(calls.includes("getVringBase 0") && calls.includes("getVringBase 1"));
      assert.equal(openFdsMatching("memfd:").length, memfdsBefore, "guest memory released");
      assert.deepEqual(device.regions, []);
    } finally {
      if (!killed) qemu.kill("SIGKILL");
      await qemu.output();
      await server.stop();
      Deno.removeSync(dir, { recursive: true });
    }
  },
});

/** A memfd of `size` bytes; with `seals`, those seals added (F_ADD_SEALS). */
function memfdWithSeals(size: number, seals: number | null): number {
  const fd = libc.memfdCreate(
    "vhost-test",
    libc.MFD_CLOEXEC | (seals === null ? 0 : libc.MFD_ALLOW_SEALING),
  );
  libc.ftruncate(fd, size);
  if (seals !== null) libc.fcntl(fd, libc.F_ADD_SEALS, seals);
  return fd;
}

Deno.test("memory a front-end could shrink under us is mapped, with one warning a connection; a sealed memfd is not warned about", async () => {
  for (
    const [what, seals, warned] of [
      ["sealed like QEMU's (seal=on)", libc.F_SEAL_SHRINK | libc.F_SEAL_GROW, false],
      ["unsealed", null, true],
    ] as const
  ) {
    const { dir, path } = tempSocketPath();
    const device = new RecordingDevice();
    const { options } = serveOptions(device);
    const logger = quietLogger();
    const server = VhostUserServer.listen(path, { ...options, logger });
    const fe = TestFrontend.connect(path);
    try {
      await fe.send(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES));
      const fds = [memfdWithSeals(0x4000, seals), memfdWithSeals(0x4000, seals)];
      const table = encodeMemTable([
        { guestPhysAddr: 0n, size: 0x4000n, userAddr: 0n, mmapOffset: 0n },
        { guestPhysAddr: 0x10000n, size: 0x4000n, userAddr: 0x10000n, mmapOffset: 0n },
      ]);
      await fe.send(VHOST_USER_SET_MEM_TABLE, table, { fds });
      for (const fd of fds) libc.close(fd);
      await fe.requestU64(VHOST_USER_GET_FEATURES); // the table has been handled
      assert.equal(device.regions.length, 2, `${what}: mapped`);
      assert.deepEqual(device.regions.map((r) => r.shrinkSealed), [!warned, !warned]);
      const warnings = logger.lines.filter((l) => /not sealed against shrinking/.test(l));
      assert.equal(warnings.length, warned ? 1 : 0, `${what}: ${logger.lines.join("\n")}`);
    } finally {
      fe.close();
      await server.stop();
      Deno.removeSync(dir, { recursive: true });
    }
  }
});

Deno.test("Deno ignores SIGPIPE, which the call-fd writes rely on (a pipe with no reader gives EPIPE)", () => {
  // /proc/self/status SigIgn: bit (signal - 1); SIGPIPE is 13.
  const status = Deno.readTextFileSync("/proc/self/status");
  const ignored = BigInt(`0x${/^SigIgn:\s*([0-9a-f]+)/m.exec(status)![1]}`);
  assert.equal((ignored >> 12n) & 1n, 1n, "SIGPIPE is ignored");
  const [r, w] = libc.pipe2(libc.O_CLOEXEC);
  libc.close(r);
  assert.throws(() => libc.write(w, new Uint8Array(8)), /EPIPE/);
  libc.close(w);
});

Deno.test("after a reply, a request that comes once the connection's wait on its own thread is over is served", async () => {
  const { dir, path } = tempSocketPath();
  const s = serveOptions(new RecordingDevice());
  const server = VhostUserServer.listen(path, s.options);
  try {
    const fe = TestFrontend.connect(path);
    const features = await fe.requestU64(VHOST_USER_GET_FEATURES);
    assert.notEqual(features, 0n);
    // This front-end runs on the connection's thread, so each request comes
    // after the connection's blocking wait (FOLLOW_UP_WAIT_MS) ran out: the
    // wait on another thread that follows must still see it, at once or later.
    for (const pauseMs of [FOLLOW_UP_WAIT_MS * 30, 0, FOLLOW_UP_WAIT_MS * 3, 0]) {
      await new Promise((r) => setTimeout(r, pauseMs));
      assert.equal(await fe.requestU64(VHOST_USER_GET_FEATURES), features);
    }
    fe.close();
    assert.equal((await s.nextDisconnect()).messages, 5);
  } finally {
    await server.stop();
    Deno.removeSync(dir, { recursive: true });
  }
});
