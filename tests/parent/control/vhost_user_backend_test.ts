import assert from "node:assert/strict";
import {
  type BackendSystem,
  type DevicePort,
  type HandleResult,
  type MappedRegion,
  VhostUserBackend,
  type VhostUserBackendOptions,
  VIONET_PROTOCOL_FEATURES,
  type VringAddrFields,
} from "../../../parent/control/vhost_user_backend.ts";
import {
  decodeHeader,
  encodeU64,
  encodeVringState,
  type LogDesc,
  type MemoryRegionDesc,
  ProtocolError,
  VHOST_F_LOG_ALL,
  VHOST_USER_ADD_MEM_REG,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_MAX_MEM_SLOTS,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_GET_QUEUE_NUM,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_NET_SET_MTU,
  VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS,
  VHOST_USER_PROTOCOL_F_LOG_SHMFD,
  VHOST_USER_PROTOCOL_F_MQ,
  VHOST_USER_PROTOCOL_F_MTU,
  VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_REM_MEM_REG,
  VHOST_USER_RESET_DEVICE,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_ERR,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
} from "../../../parent/control/vhost_user_messages.ts";
import {
  decodeReplyHeader,
  encodeMemRegion,
  encodeMemTable,
  encodeRequest,
  encodeVringAddr,
  encodeVringFd,
} from "./vhost_user_encode.ts";
import { VIRTIO_F_VERSION_1, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_MAC } from "../../../ipc/features.ts";

const DEVICE_FEATURES = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_MAC;

/** Fake system calls: descriptors are numbers in a set; every close is checked. */
class FakeSystem implements BackendSystem {
  open = new Set<number>();
  events: string[] = [];
  errors: string[] = [];
  signalled: number[] = [];
  failMapAt: number | null = null;
  failSignal = false;
  #next = 100;
  #maps = 0;

  newFd(): number {
    const fd = this.#next++;
    this.open.add(fd);
    return fd;
  }
  mapRegion(desc: MemoryRegionDesc, fd: number): MappedRegion {
    if (this.failMapAt === this.#maps++) {
      this.closeFd(fd);
      throw new ProtocolError(`fake: region fd ${fd} too small`);
    }
    this.events.push(`map ${fd}`);
    const pointer = Deno.UnsafePointer.create(0x1000n + desc.guestPhysAddr)!;
    return {
      ...desc,
      fd,
      pointer,
      mapBase: pointer,
      mapLength: Number(desc.size),
      shrinkSealed: true,
    };
  }
  mapLog(desc: LogDesc, fd: number): MappedRegion {
    this.events.push(`map log ${fd}`);
    const pointer = Deno.UnsafePointer.create(0x4000_0000n)!;
    return {
      guestPhysAddr: 0n,
      size: desc.mmapSize,
      userAddr: 0n,
      mmapOffset: desc.mmapOffset,
      fd,
      pointer,
      mapBase: pointer,
      mapLength: Number(desc.mmapSize),
      shrinkSealed: true,
    };
  }
  unmapRegion(region: MappedRegion): void {
    this.events.push(`unmap ${region.fd}`);
    this.closeFd(region.fd);
  }
  retireRegion(region: MappedRegion): void {
    this.events.push(`retire ${region.fd}`);
    this.closeFd(region.fd);
  }
  /** Which fake file each fd names (fds of one file: same id); default: its own. */
  files = new Map<number, string>();
  fileId(fd: number): string | null {
    return this.files.get(fd) ?? `fd${fd}`;
  }
  closeFd(fd: number): void {
    if (!this.open.delete(fd)) this.errors.push(`close of fd ${fd} that is not open`);
    this.events.push(`close ${fd}`);
  }
  signalCall(fd: number): void {
    if (this.failSignal) throw new Error("EPIPE");
    this.signalled.push(fd);
  }
}

interface FakeRing {
  num: number;
  base: number;
  started: boolean;
  enabled: boolean;
  kickFd: number | null;
  callFd: number | null;
  /** Chains processed; a disabled started ring discards TX and supplies no RX. */
  processed: number;
}

/** A device that keeps ring state the way the real one must, and owns kick/call fds. */
class FakeDevice implements DevicePort {
  vringErrorSink: ((index: number) => void) | null = null;
  features = 0n;
  rings = new Map<number, FakeRing>();
  regions: MappedRegion[] = [];
  calls: string[] = [];
  reject = new Set<string>();
  readonly #system: FakeSystem;

  constructor(system: FakeSystem) {
    this.#system = system;
  }
  ring(i: number): FakeRing {
    let r = this.rings.get(i);
    if (r === undefined) {
      r = {
        num: 0,
        base: 0,
        started: false,
        enabled: false,
        kickFd: null,
        callFd: null,
        processed: 0,
      };
      this.rings.set(i, r);
    }
    return r;
  }
  /** The guest made `n` chains available and the ring runs: advance last_avail. */
  run(i: number, n: number): void {
    const r = this.ring(i);
    if (!r.started) return;
    r.base = (r.base + n) & 0xffff;
    if (r.enabled) r.processed += n;
  }
  #check(name: string): void {
    this.calls.push(name);
    if (this.reject.has(name)) throw new ProtocolError(`fake device refuses ${name}`);
  }
  #closeIfSet(fd: number | null): void {
    if (fd !== null) this.#system.closeFd(fd);
  }
  getFeatures(): Promise<bigint> {
    this.#check("getFeatures");
    return Promise.resolve(DEVICE_FEATURES);
  }
  setFeatures(features: bigint): Promise<void> {
    this.#check("setFeatures");
    this.features = features;
    return Promise.resolve();
  }
  setMemTable(regions: MappedRegion[]): Promise<void> {
    this.#check("setMemTable");
    this.#system.events.push(`device releases ${this.regions.map((r) => r.fd).join(",")}`);
    this.regions = [...regions];
    return Promise.resolve();
  }
  addMemRegion(region: MappedRegion): Promise<void> {
    this.#check("addMemRegion");
    this.regions.push(region);
    return Promise.resolve();
  }
  removeMemRegion(gpa: bigint, size: bigint): Promise<void> {
    this.#check("removeMemRegion");
    const r = this.regions.find((r) => r.guestPhysAddr === gpa && r.size === size);
    this.#system.events.push(`device releases ${r?.fd}`);
    this.regions = this.regions.filter((x) => x !== r);
    return Promise.resolve();
  }
  setVringNum(index: number, num: number): Promise<void> {
    this.#check("setVringNum");
    this.ring(index).num = num;
    return Promise.resolve();
  }
  setVringAddr(_index: number, _addr: VringAddrFields): Promise<void> {
    this.#check("setVringAddr");
    return Promise.resolve();
  }
  setVringBase(index: number, base: number): Promise<void> {
    this.#check("setVringBase");
    this.ring(index).base = base;
    return Promise.resolve();
  }
  getVringBase(index: number): Promise<number> {
    this.#check("getVringBase");
    const r = this.ring(index);
    r.started = false;
    this.#closeIfSet(r.kickFd);
    r.kickFd = null;
    return Promise.resolve(r.base);
  }
  setVringKick(index: number, fd: number | null): Promise<void> {
    const r = this.ring(index);
    this.#closeIfSet(r.kickFd);
    r.kickFd = fd;
    this.#check("setVringKick");
    r.started = true;
    return Promise.resolve();
  }
  setVringCall(index: number, fd: number | null): Promise<void> {
    const r = this.ring(index);
    this.#closeIfSet(r.callFd);
    r.callFd = fd;
    this.#check("setVringCall");
    return Promise.resolve();
  }
  setVringEnable(index: number, enabled: boolean): Promise<void> {
    this.#check(`setVringEnable ${index} ${enabled}`);
    this.ring(index).enabled = enabled;
    return Promise.resolve();
  }
  logAll = false;
  log: MappedRegion | null = null;
  rarps: string[] = [];
  setLogAll(on: boolean): Promise<void> {
    this.#check(`setLogAll ${on}`);
    this.logAll = on;
    return Promise.resolve();
  }
  setLogBase(log: MappedRegion): Promise<void> {
    this.#check("setLogBase");
    this.log = log;
    return Promise.resolve();
  }
  sendRarp(mac: Uint8Array): Promise<void> {
    this.#check("sendRarp");
    this.rarps.push(Array.from(mac, (b) => b.toString(16).padStart(2, "0")).join(":"));
    return Promise.resolve();
  }
  /** A region the device still lists was never given back (a refused release). */
  forgetRegion(region: MappedRegion): boolean {
    const held = this.regions.includes(region);
    this.regions = this.regions.filter((r) => r !== region);
    return held;
  }
  reset(): Promise<void> {
    this.#check("reset");
    for (const r of this.rings.values()) {
      this.#closeIfSet(r.kickFd);
      this.#closeIfSet(r.callFd);
    }
    this.rings.clear();
    this.features = 0n;
    return Promise.resolve();
  }
}

function setup(options: VhostUserBackendOptions = {}) {
  const system = new FakeSystem();
  const device = new FakeDevice(system);
  const backend = new VhostUserBackend(device, system, options);
  const send = (bytes: Uint8Array, fds: number[] = []): Promise<HandleResult> => {
    const header = decodeHeader(bytes.subarray(0, VHOST_USER_HDR_SIZE));
    return backend.handleMessage(header, bytes.subarray(VHOST_USER_HDR_SIZE), fds);
  };
  /** Sends and requires success; returns the reply bytes. */
  const ok = async (bytes: Uint8Array, fds: number[] = []): Promise<Uint8Array | null> => {
    const r = await send(bytes, fds);
    if (!r.ok) throw r.error;
    return r.reply;
  };
  return { system, device, backend, send, ok };
}

function replyU64(reply: Uint8Array | null, request: number): bigint {
  assert.ok(reply !== null, "expected a reply");
  const h = decodeReplyHeader(reply, request);
  assert.equal(h.size, 8);
  return new DataView(reply.buffer, reply.byteOffset + VHOST_USER_HDR_SIZE).getBigUint64(0, true);
}

function replyVringState(reply: Uint8Array | null): { index: number; num: number } {
  assert.ok(reply !== null, "expected a reply");
  const h = decodeReplyHeader(reply, VHOST_USER_GET_VRING_BASE);
  assert.equal(h.size, 8);
  const v = new DataView(reply.buffer, reply.byteOffset + VHOST_USER_HDR_SIZE);
  return { index: v.getUint32(0, true), num: v.getUint32(4, true) };
}

const ADDR = {
  flags: 0,
  descUser: 0x7f00_0000_1000n,
  usedUser: 0x7f00_0000_3000n,
  availUser: 0x7f00_0000_2000n,
  logGuest: 0n,
};

/** GET/SET_PROTOCOL_FEATURES and SET_FEATURES the way QEMU does them. */
async function negotiate(
  ok: (b: Uint8Array, fds?: number[]) => Promise<Uint8Array | null>,
  withProtocolFeatures: boolean,
  protocol = VIONET_PROTOCOL_FEATURES,
): Promise<void> {
  const offered = replyU64(await ok(encodeRequest(VHOST_USER_GET_FEATURES)), 1);
  if (withProtocolFeatures) {
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(protocol)));
  }
  await ok(encodeRequest(VHOST_USER_SET_OWNER));
  const acked = withProtocolFeatures ? offered : offered & ~VHOST_USER_F_PROTOCOL_FEATURES;
  await ok(encodeRequest(VHOST_USER_SET_FEATURES, encodeU64(acked)));
}

Deno.test("feature negotiation", async (t) => {
  await t.step(
    "GET_FEATURES adds VHOST_USER_F_PROTOCOL_FEATURES and VHOST_F_LOG_ALL to the device's",
    async () => {
      const { ok } = setup();
      const features = replyU64(await ok(encodeRequest(VHOST_USER_GET_FEATURES)), 1);
      assert.equal(features, DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL);
    },
  );
  await t.step("without LOG_SHMFD offered there is no VHOST_F_LOG_ALL", async () => {
    const { ok } = setup({
      protocolFeatures: VIONET_PROTOCOL_FEATURES & ~VHOST_USER_PROTOCOL_F_LOG_SHMFD,
    });
    const features = replyU64(await ok(encodeRequest(VHOST_USER_GET_FEATURES)), 1);
    assert.equal(features, DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES);
  });
  await t.step("GET_PROTOCOL_FEATURES offers REPLY_ACK, MQ, CONFIGURE_MEM_SLOTS", async () => {
    const { ok } = setup();
    const p = replyU64(await ok(encodeRequest(VHOST_USER_GET_PROTOCOL_FEATURES)), 15);
    assert.equal(p, VIONET_PROTOCOL_FEATURES);
    for (const bit of [VHOST_USER_PROTOCOL_F_REPLY_ACK, VHOST_USER_PROTOCOL_F_MQ]) {
      assert.notEqual(p & bit, 0n);
    }
    assert.notEqual(p & VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS, 0n);
  });
  await t.step("SET_FEATURES passes the acked bits on without bit 30", async () => {
    const { ok, device, backend } = setup();
    await negotiate(ok, true);
    assert.equal(device.features, DEVICE_FEATURES);
    assert.equal(
      backend.ackedFeatures,
      DEVICE_FEATURES | VHOST_USER_F_PROTOCOL_FEATURES | VHOST_F_LOG_ALL,
    );
    assert.equal(device.logAll, true);
  });
  await t.step("SET_FEATURES with a bit that was not offered ends the connection", async () => {
    const { send, device } = setup();
    const r = await send(encodeRequest(VHOST_USER_SET_FEATURES, encodeU64(1n << 40n)));
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /did not offer/);
    assert.equal(device.features, 0n);
  });
  await t.step("a device that refuses SET_FEATURES ends the connection", async () => {
    const { send, device } = setup();
    device.reject.add("setFeatures");
    const r = await send(encodeRequest(VHOST_USER_SET_FEATURES, encodeU64(DEVICE_FEATURES)));
    assert.equal(r.ok, false);
  });
  await t.step("SET_PROTOCOL_FEATURES with an unoffered bit is refused", async () => {
    const { send } = setup();
    const r = await send(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(1n << 8n)));
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /SET_PROTOCOL_FEATURES acks 0x100/);
  });
  await t.step("GET_QUEUE_NUM answers the queue pairs", async () => {
    const { ok } = setup({ queuePairs: 4 });
    assert.equal(replyU64(await ok(encodeRequest(VHOST_USER_GET_QUEUE_NUM)), 17), 4n);
  });
  await t.step("GET_MAX_MEM_SLOTS needs CONFIGURE_MEM_SLOTS negotiated", async () => {
    const { send, ok } = setup({ maxMemSlots: 16 });
    assert.equal((await send(encodeRequest(VHOST_USER_GET_MAX_MEM_SLOTS))).ok, false);
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)));
    assert.equal(replyU64(await ok(encodeRequest(VHOST_USER_GET_MAX_MEM_SLOTS)), 36), 16n);
  });
});

Deno.test("ring enable semantics", async (t) => {
  await t.step(
    "without PROTOCOL_FEATURES, SET_FEATURES enables every ring and a kick starts it",
    async () => {
      const { ok, device, backend, system } = setup({ queuePairs: 2 });
      await negotiate(ok, false);
      for (let i = 0; i < 4; i++) assert.equal(backend.ring(i).enabled, true, `ring ${i}`);
      assert.ok(device.calls.includes("setVringEnable 3 true"));
      assert.equal(backend.ring(0).started, false);
      const kick = system.newFd();
      await ok(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(0, false)), [kick]);
      assert.equal(backend.ring(0).started, true);
      assert.equal(device.ring(0).kickFd, kick);
      device.run(0, 3);
      assert.equal(device.ring(0).processed, 3);
    },
  );
  await t.step("without PROTOCOL_FEATURES, SET_VRING_ENABLE is a protocol error", async () => {
    const { ok, send } = setup();
    await negotiate(ok, false);
    const r = await send(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(0, 1)));
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /before VHOST_USER_F_PROTOCOL_FEATURES/);
  });
  await t.step(
    "SET_VRING_ENABLE after SET_PROTOCOL_FEATURES but before SET_FEATURES is accepted (QEMU's init)",
    async () => {
      const { ok, backend } = setup();
      await ok(
        encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)),
      );
      await ok(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(1, 0)));
      assert.equal(backend.ring(1).enabled, false);
      await negotiate(ok, true);
      assert.equal(backend.ring(1).enabled, false, "SET_FEATURES with bit 30 leaves it disabled");
    },
  );
  await t.step(
    "SET_VRING_ENABLE from a front-end that never negotiated protocol features is refused",
    async () => {
      const { send } = setup();
      const r = await send(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(0, 0)));
      assert.equal(r.ok, false);
    },
  );
  await t.step(
    "with PROTOCOL_FEATURES, a kicked ring stays disabled until SET_VRING_ENABLE",
    async () => {
      const { ok, device, backend, system } = setup();
      await negotiate(ok, true);
      await ok(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(0, false)), [
        system.newFd(),
      ]);
      assert.equal(backend.ring(0).started, true);
      assert.equal(backend.ring(0).enabled, false);
      assert.equal(device.calls.some((c) => c.startsWith("setVringEnable")), false);
      device.run(0, 2); // started but disabled: consumed, no side effects
      assert.equal(device.ring(0).processed, 0);
      await ok(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(0, 1)));
      assert.equal(backend.ring(0).enabled, true);
      device.run(0, 2);
      assert.equal(device.ring(0).processed, 2);
      await ok(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(0, 0)));
      assert.equal(device.ring(0).enabled, false);
    },
  );
  await t.step("a ring index past the last ring is refused and its fd closed", async () => {
    const { ok, send, system, device } = setup();
    await negotiate(ok, true);
    const fd = system.newFd();
    const r = await send(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(2, false)), [fd]);
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /ring 2 does not exist \(this back-end has 2\)/);
    assert.equal(system.open.has(fd), false);
    assert.equal(device.calls.includes("setVringKick"), false);
  });
});

Deno.test("GET_VRING_BASE stops the ring and returns the next index to process", async () => {
  const { ok, device, backend, system } = setup();
  await negotiate(ok, true);
  await ok(encodeRequest(VHOST_USER_SET_VRING_NUM, encodeVringState(1, 256)));
  await ok(encodeRequest(VHOST_USER_SET_VRING_ADDR, encodeVringAddr({ index: 1, ...ADDR })));
  await ok(encodeRequest(VHOST_USER_SET_VRING_BASE, encodeVringState(1, 0xfffe)));
  await ok(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(1, false)), [system.newFd()]);
  await ok(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(1, 1)));
  device.run(1, 5); // wraps past 0xffff
  // need_reply on a request with its own reply brings no extra ack.
  const reply = await ok(encodeRequest(VHOST_USER_GET_VRING_BASE, encodeVringState(1, 0), true));
  assert.deepEqual(replyVringState(reply), { index: 1, num: 3 });
  assert.equal(backend.ring(1).started, false);
  assert.equal(device.ring(1).kickFd, null);
  device.run(1, 4); // stopped: nothing moves, nothing is lost or sent twice
  assert.equal(device.ring(1).base, 3);
  // A new kick restarts it where it stopped.
  await ok(encodeRequest(VHOST_USER_SET_VRING_BASE, encodeVringState(1, 3)));
  await ok(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(1, false)), [system.newFd()]);
  assert.equal(backend.ring(1).started, true);
  assert.equal(backend.ring(1).num, 256);
});

Deno.test("REPLY_ACK", async (t) => {
  await t.step("no reply to need_reply before REPLY_ACK is negotiated", async () => {
    const { ok } = setup();
    assert.equal(await ok(encodeRequest(VHOST_USER_SET_OWNER, undefined, true)), null);
  });
  await t.step("no reply without need_reply", async () => {
    const { ok } = setup();
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)));
    assert.equal(await ok(encodeRequest(VHOST_USER_SET_OWNER)), null);
  });
  await t.step("a zero u64 for a request that succeeded", async () => {
    const { ok } = setup();
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)));
    assert.equal(replyU64(await ok(encodeRequest(VHOST_USER_SET_OWNER, undefined, true)), 3), 0n);
  });
  await t.step("a non-zero u64, then the end, for a request that failed", async () => {
    const { ok, send, device } = setup();
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)));
    device.reject.add("setVringNum");
    const r = await send(encodeRequest(VHOST_USER_SET_VRING_NUM, encodeVringState(0, 64), true));
    assert.equal(r.ok, false);
    assert.equal(replyU64(r.reply, VHOST_USER_SET_VRING_NUM), 1n);
  });
  await t.step("no ack for a message that did not decode", async () => {
    const { ok, send } = setup();
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)));
    const r = await send(encodeRequest(VHOST_USER_SET_OWNER, encodeU64(0n), true));
    assert.equal(r.ok, false);
    assert.equal(r.reply, null);
  });
});

Deno.test("SET_VRING_NUM", async (t) => {
  for (const num of [0, 3, 100, 65536]) {
    await t.step(`refuses size ${num} for a split ring and keeps nothing`, async () => {
      const { send, backend, device } = setup();
      const r = await send(encodeRequest(VHOST_USER_SET_VRING_NUM, encodeVringState(0, num)));
      assert.equal(r.ok, false);
      assert.equal(backend.ring(0).num, null);
      assert.equal(device.calls.includes("setVringNum"), false);
    });
  }
  await t.step("a size the device refuses is not stored", async () => {
    const { send, backend, device } = setup();
    device.reject.add("setVringNum");
    assert.equal(
      (await send(encodeRequest(VHOST_USER_SET_VRING_NUM, encodeVringState(0, 64)))).ok,
      false,
    );
    assert.equal(backend.ring(0).num, null);
  });
  await t.step("accepts 1 and 32768", async () => {
    const { ok, backend } = setup();
    await ok(encodeRequest(VHOST_USER_SET_VRING_NUM, encodeVringState(0, 1)));
    await ok(encodeRequest(VHOST_USER_SET_VRING_NUM, encodeVringState(1, 32768)));
    assert.equal(backend.ring(1).num, 32768);
  });
  await t.step("SET_VRING_BASE above 16 bits on a split ring is refused", async () => {
    const { send } = setup();
    const r = await send(encodeRequest(VHOST_USER_SET_VRING_BASE, encodeVringState(0, 0x10000)));
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /reserved bits 16-31/);
  });
  await t.step("VHOST_VRING_F_LOG without VHOST_F_LOG_ALL is refused", async () => {
    const { send } = setup();
    const r = await send(
      encodeRequest(VHOST_USER_SET_VRING_ADDR, encodeVringAddr({ index: 0, ...ADDR, flags: 1 })),
    );
    assert.equal(r.ok, false);
  });
});

Deno.test("SET_VRING_CALL signals the new eventfd once and hands it to the device", async () => {
  const { ok, device, system, backend } = setup();
  const call = system.newFd();
  await ok(encodeRequest(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false)), [call]);
  assert.deepEqual(system.signalled, [call]);
  assert.equal(device.ring(0).callFd, call);
  assert.equal(backend.ring(0).call, "fd");
  // A replacement: the device closes the old one, the new one is signalled once.
  const call2 = system.newFd();
  await ok(encodeRequest(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false)), [call2]);
  assert.deepEqual(system.signalled, [call, call2]);
  assert.equal(system.open.has(call), false);
  await ok(encodeRequest(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, true)));
  assert.equal(device.ring(0).callFd, null);
  assert.equal(backend.ring(0).call, "nofd");
});

Deno.test("a call fd that cannot be signalled is closed and ends the connection", async () => {
  const { send, device, system } = setup();
  system.failSignal = true;
  const call = system.newFd();
  const r = await send(encodeRequest(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false)), [call]);
  assert.equal(r.ok, false);
  if (!r.ok) assert.match(r.error.message, /call fd cannot be signalled: EPIPE/);
  assert.equal(system.open.has(call), false);
  assert.equal(device.calls.includes("setVringCall"), false);
  assert.deepEqual(system.errors, []);
});

Deno.test("SET_VRING_ERR fds stay with the backend and are closed when replaced", async () => {
  const { ok, system, backend } = setup();
  const a = system.newFd();
  const b = system.newFd();
  await ok(encodeRequest(VHOST_USER_SET_VRING_ERR, encodeVringFd(1, false)), [a]);
  assert.equal(backend.ring(1).errFd, a);
  await ok(encodeRequest(VHOST_USER_SET_VRING_ERR, encodeVringFd(1, false)), [b]);
  assert.equal(system.open.has(a), false);
  await backend.close();
  assert.equal(system.open.size, 0);
});

Deno.test("a ring the device reports faulted has its SET_VRING_ERR eventfd signalled", async () => {
  const { ok, device, system, backend } = setup();
  const errTx = system.newFd();
  await ok(encodeRequest(VHOST_USER_SET_VRING_ERR, encodeVringFd(1, false)), [errTx]);
  assert.ok(device.vringErrorSink, "the backend registered its sink with the device");
  device.vringErrorSink!(1);
  assert.deepEqual(system.signalled, [errTx]);
  // Ring 0 has no err fd: nothing to signal. -1 (the I/O side) means every ring.
  device.vringErrorSink!(0);
  device.vringErrorSink!(-1);
  assert.deepEqual(system.signalled, [errTx, errTx]);
  // An index the backend does not have is ignored, not thrown on.
  device.vringErrorSink!(7);
  await backend.close();
  assert.equal(device.vringErrorSink, null, "a closed backend takes its sink back");
});

const REGIONS = [
  { guestPhysAddr: 0n, size: 0xa0000n, userAddr: 0x7f00_0000_0000n, mmapOffset: 0n },
  {
    guestPhysAddr: 0x10_0000n,
    size: 0x7ff0_0000n,
    userAddr: 0x7f00_0010_0000n,
    mmapOffset: 0x10_0000n,
  },
];

Deno.test("memory table", async (t) => {
  await t.step("SET_MEM_TABLE maps each region with its own fd", async () => {
    const { ok, system, device, backend } = setup();
    const fds = [system.newFd(), system.newFd()];
    await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(REGIONS)), fds);
    assert.deepEqual(backend.regions.map((r) => r.fd), fds);
    assert.deepEqual(device.regions.map((r) => r.guestPhysAddr), [0n, 0x10_0000n]);
  });
  await t.step("a new table is unmapped only after the device released the old", async () => {
    const { ok, system } = setup();
    const old = [system.newFd(), system.newFd()];
    await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(REGIONS)), old);
    system.events = [];
    const next = [system.newFd()];
    await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([REGIONS[0]])), next);
    assert.deepEqual(system.events, [
      `map ${next[0]}`,
      `device releases ${old.join(",")}`,
      `unmap ${old[0]}`,
      `close ${old[0]}`,
      `unmap ${old[1]}`,
      `close ${old[1]}`,
    ]);
  });
  await t.step("a region that fails to map undoes the others and closes every fd", async () => {
    const { send, system, device, backend } = setup();
    system.failMapAt = 1;
    const three = [REGIONS[0], REGIONS[1], {
      guestPhysAddr: 0x1_0000_0000n,
      size: 0x1000n,
      userAddr: 0n,
      mmapOffset: 0n,
    }];
    const fds = [system.newFd(), system.newFd(), system.newFd()];
    const r = await send(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(three)), fds);
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /too small/);
    assert.equal(system.open.size, 0);
    assert.deepEqual(system.errors, []);
    assert.equal(device.calls.includes("setMemTable"), false);
    assert.equal(backend.regions.length, 0);
  });
  await t.step("a table the device refuses is unmapped; the old one stays", async () => {
    const { ok, send, system, device, backend } = setup();
    const old = [system.newFd(), system.newFd()];
    await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(REGIONS)), old);
    device.reject.add("setMemTable");
    const next = system.newFd();
    const r = await send(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([REGIONS[0]])), [
      next,
    ]);
    assert.equal(r.ok, false);
    assert.equal(system.open.has(next), false);
    assert.deepEqual(backend.regions.map((r) => r.fd), old);
  });
  await t.step("ADD_MEM_REG needs CONFIGURE_MEM_SLOTS negotiated", async () => {
    const { send, system } = setup();
    const fd = system.newFd();
    const r = await send(encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(REGIONS[0])), [fd]);
    assert.equal(r.ok, false);
    assert.equal(system.open.has(fd), false);
  });
  await t.step("ADD_MEM_REG, overlap refused, REM_MEM_REG releases before unmapping", async () => {
    const { ok, send, system, device, backend } = setup();
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)));
    const a = system.newFd();
    const b = system.newFd();
    await ok(encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(REGIONS[0])), [a]);
    await ok(encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(REGIONS[1])), [b]);
    assert.equal(device.regions.length, 2);
    const c = system.newFd();
    const clash = { ...REGIONS[1], guestPhysAddr: 0x20_0000n, size: 0x1000n };
    const r = await send(encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(clash)), [c]);
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /overlaps/);
    assert.equal(system.open.has(c), false);

    system.events = [];
    // The fd that REM_MEM_REG may carry is closed unused.
    const stray = system.newFd();
    await ok(
      encodeRequest(VHOST_USER_REM_MEM_REG, encodeMemRegion({ ...REGIONS[0], mmapOffset: 99n })),
      [stray],
    );
    assert.deepEqual(system.events, [
      `device releases ${a}`,
      `unmap ${a}`,
      `close ${a}`,
      `close ${stray}`,
    ]);
    assert.deepEqual(backend.regions.map((r) => r.fd), [b]);
    const unknown = await send(encodeRequest(VHOST_USER_REM_MEM_REG, encodeMemRegion(REGIONS[0])));
    assert.equal(unknown.ok, false);
  });
  await t.step("ADD_MEM_REG beyond maxMemSlots is refused", async () => {
    const { ok, send, system } = setup({ maxMemSlots: 1 });
    await ok(encodeRequest(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES)));
    await ok(encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(REGIONS[0])), [system.newFd()]);
    const r = await send(encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(REGIONS[1])), [
      system.newFd(),
    ]);
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /all 1 memory slots are in use/);
  });
});

Deno.test("descriptors on a bad message are closed", async (t) => {
  await t.step("an fd on GET_FEATURES", async () => {
    const { send, system } = setup();
    const fd = system.newFd();
    const r = await send(encodeRequest(VHOST_USER_GET_FEATURES), [fd]);
    assert.equal(r.ok, false);
    assert.equal(system.open.size, 0);
  });
  await t.step("fds on an unknown request", async () => {
    const { send, system } = setup();
    const r = await send(encodeRequest(77), [system.newFd(), system.newFd()]);
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /Unknown request 77/);
    assert.equal(system.open.size, 0);
  });
});

Deno.test("RESET_DEVICE returns rings and features to the initial state, keeps memory", async () => {
  const { ok, system, device, backend } = setup();
  await negotiate(ok, true);
  await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([REGIONS[0]])), [
    system.newFd(),
  ]);
  await ok(encodeRequest(VHOST_USER_SET_VRING_NUM, encodeVringState(0, 256)));
  await ok(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(0, false)), [system.newFd()]);
  await ok(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(0, 1)));
  await ok(encodeRequest(VHOST_USER_RESET_DEVICE));
  assert.ok(device.calls.includes("reset"));
  assert.deepEqual(backend.ring(0), {
    num: null,
    addr: null,
    base: 0,
    started: false,
    enabled: false,
    kick: "unset",
    call: "unset",
    errFd: null,
  });
  assert.equal(backend.ackedFeatures, 0n);
  assert.equal(backend.regions.length, 1);
  // Only the region's fd is left open.
  assert.deepEqual([...system.open], [backend.regions[0].fd]);
});

Deno.test("close() releases every mapping and descriptor, device first", async () => {
  const { ok, system, device, backend } = setup();
  await negotiate(ok, true);
  await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(REGIONS)), [
    system.newFd(),
    system.newFd(),
  ]);
  for (const i of [0, 1]) {
    await ok(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(i, false)), [system.newFd()]);
    await ok(encodeRequest(VHOST_USER_SET_VRING_CALL, encodeVringFd(i, false)), [system.newFd()]);
    await ok(encodeRequest(VHOST_USER_SET_VRING_ERR, encodeVringFd(i, false)), [system.newFd()]);
  }
  assert.equal(system.open.size, 8);
  system.events = [];
  await backend.close();
  assert.equal(system.open.size, 0);
  assert.deepEqual(system.errors, []);
  const release = system.events.findIndex((e) => e.startsWith("device releases"));
  const firstUnmap = system.events.findIndex((e) => e.startsWith("unmap"));
  assert.ok(release >= 0 && release < firstUnmap, system.events.join("; "));
  assert.deepEqual(device.calls.slice(-2), ["reset", "setMemTable"]);
  assert.deepEqual(device.regions, []);
  // Closed for good: later messages are refused, their fds closed.
  await backend.close();
  const fd = system.newFd();
  const r = await backend.handleMessage(
    decodeHeader(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(0, false))),
    encodeVringFd(0, false),
    [fd],
  );
  assert.equal(r.ok, false);
  assert.equal(system.open.size, 0);
});

Deno.test("memory the device does not give back is retired, never unmapped", async (t) => {
  await t.step("on close", async () => {
    const logged: string[] = [];
    const { ok, system, device, backend } = setup({
      logger: { log: (level, _source, message) => logged.push(`${level}: ${message}`) },
    });
    const fds = [system.newFd(), system.newFd()];
    await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(REGIONS)), fds);
    device.reject.add("setMemTable");
    system.events = [];
    await backend.close();
    assert.deepEqual(system.events, [
      `retire ${fds[0]}`,
      `close ${fds[0]}`,
      `retire ${fds[1]}`,
      `close ${fds[1]}`,
    ]);
    assert.equal(system.open.size, 0);
    assert.match(logged[0], /^warn: device memory release on disconnect failed/);
    assert.equal(logged.filter((l) => /stays reserved \(zero pages\)/.test(l)).length, 2);
  });
  await t.step("on a new table, after the old one's release failed", async () => {
    const { ok, send, system, device } = setup();
    const old = [system.newFd()];
    await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([REGIONS[0]])), old);
    device.reject.add("setMemTable");
    const r = await send(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([REGIONS[1]])), [
      system.newFd(),
    ]);
    assert.equal(r.ok, false);
    device.reject.delete("setMemTable");
    // The device answers the next table: it released the old one after all.
    system.events = [];
    const next = system.newFd();
    await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([REGIONS[1]])), [next]);
    assert.deepEqual(system.events, [
      `map ${next}`,
      `device releases ${old[0]}`,
      `unmap ${old[0]}`,
      `close ${old[0]}`,
    ]);
  });
});

Deno.test("close() unmaps and logs when the device fails to answer the reset", async () => {
  const logged: string[] = [];
  const { ok, system, device, backend } = setup({
    logger: { log: (level, _source, message) => logged.push(`${level}: ${message}`) },
  });
  await ok(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([REGIONS[0]])), [
    system.newFd(),
  ]);
  device.reject.add("reset");
  await backend.close();
  assert.equal(system.open.size, 0);
  assert.equal(logged.length, 1);
  assert.match(logged[0], /^warn: device reset on disconnect failed: fake device refuses reset/);
});

Deno.test("NET_SET_MTU (QEMU host_mtu): up to --mtu accepted, above it or below 68 refused with a failure ack while the connection goes on", async (t) => {
  const logger = {
    lines: [] as string[],
    log(_l: string, _s: string, m: string) {
      this.lines.push(m);
    },
  };
  const { ok, send, backend } = setup({ maxMtu: 9000, maxMtuSource: "--mtu", logger });
  await negotiate(ok, true);
  const setMtu = (mtu: bigint, needReply = true) =>
    send(encodeRequest(VHOST_USER_NET_SET_MTU, encodeU64(mtu), needReply));
  await t.step("GET_PROTOCOL_FEATURES offers VHOST_USER_PROTOCOL_F_MTU", async () => {
    const p = replyU64(await ok(encodeRequest(VHOST_USER_GET_PROTOCOL_FEATURES)), 15);
    assert.notEqual(p & VHOST_USER_PROTOCOL_F_MTU, 0n);
  });
  await t.step("9000 and 68 are accepted with a zero ack", async () => {
    for (const mtu of [9000n, 68n]) {
      const r = await setMtu(mtu);
      assert.ok(r.ok);
      assert.equal(replyU64(r.reply, VHOST_USER_NET_SET_MTU), 0n);
      assert.equal(backend.mtu, Number(mtu));
    }
  });
  await t.step(
    "9001, 67 and 2^40 get a non-zero ack, a logged reason, and the connection stays",
    async () => {
      for (const mtu of [9001n, 67n, 1n << 40n]) {
        const r = await setMtu(mtu);
        assert.ok(r.ok, "the connection goes on");
        assert.equal(replyU64(r.reply, VHOST_USER_NET_SET_MTU), 1n);
        assert.equal(backend.mtu, 68, "the refused MTU was not taken");
      }
      assert.match(
        logger.lines.find((l) => /guest MTU 9001/.test(l)) ?? "",
        /NET_SET_MTU \(20\) refused: .*guest MTU 9001 \(QEMU: host_mtu\), above --mtu, 9000; give the VMM host_mtu=9000 or less, or start vionet with --mtu 9001/,
      );
      assert.ok(logger.lines.some((l) => /guest MTU 67 .*below the minimum of 68/.test(l)));
    },
  );
  await t.step(
    "a refusal the front-end would not hear (no need_reply) ends the connection",
    async () => {
      const r = await setMtu(9001n, false);
      assert.equal(r.ok, false);
    },
  );
  await t.step("without PROTOCOL_F_MTU negotiated it is a protocol error", async () => {
    const other = setup({ maxMtu: 9000 });
    await negotiate(other.ok, true, VIONET_PROTOCOL_FEATURES & ~VHOST_USER_PROTOCOL_F_MTU);
    const r = await other.send(encodeRequest(VHOST_USER_NET_SET_MTU, encodeU64(1500n), true));
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, /NET_SET_MTU needs a protocol feature/);
  });
});
