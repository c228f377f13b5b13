import assert from "node:assert/strict";
import {
  checkRegionWithinFile,
  decodeHeader,
  decodeRequest,
  encodeMessage,
  encodeReply,
  encodeU64,
  encodeVringState,
  type MemoryRegionDesc,
  ProtocolError,
  requestName,
  VHOST_USER_ADD_MEM_REG,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_VRING_BASE,
  VHOST_USER_HDR_SIZE,
  VHOST_USER_MAX_PAYLOAD_SIZE,
  VHOST_USER_NEED_REPLY_MASK,
  VHOST_USER_REM_MEM_REG,
  VHOST_USER_REPLY_MASK,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_ENDIAN,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
  VHOST_USER_VERSION,
  type VhostUserRequest,
} from "../../../parent/control/vhost_user_messages.ts";
import {
  decodeReplyHeader,
  encodeMemRegion,
  encodeMemTable,
  encodeRequest,
  encodeVringAddr,
  encodeVringFd,
} from "./vhost_user_encode.ts";

/** Splits an encoded message and runs both decode stages, as the backend does. */
function decode(bytes: Uint8Array, fds: number[] = []): VhostUserRequest {
  const header = decodeHeader(bytes.subarray(0, VHOST_USER_HDR_SIZE));
  return decodeRequest(header, bytes.subarray(VHOST_USER_HDR_SIZE), fds);
}

/** A header with arbitrary fields. */
function rawHeader(request: number, flags: number, size: number): Uint8Array {
  const out = new Uint8Array(VHOST_USER_HDR_SIZE);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags, true);
  v.setUint32(8, size, true);
  return out;
}

function region(gpa: bigint, size: bigint, offset = 0n): MemoryRegionDesc {
  return { guestPhysAddr: gpa, size, userAddr: 0x7f00_0000_0000n + gpa, mmapOffset: offset };
}

Deno.test("codec round trips", async (t) => {
  await t.step("GET_FEATURES with need_reply", () => {
    const m = decode(encodeRequest(VHOST_USER_GET_FEATURES, undefined, true));
    assert.equal(m.request, VHOST_USER_GET_FEATURES);
    assert.equal(m.needReply, true);
    assert.deepEqual(m.fds, []);
  });
  await t.step("SET_FEATURES carries a full 64-bit value", () => {
    const value = (1n << 63n) | (1n << 32n) | 1n;
    const m = decode(encodeRequest(VHOST_USER_SET_FEATURES, encodeU64(value)));
    assert.equal(m.request, VHOST_USER_SET_FEATURES);
    if (m.request === VHOST_USER_SET_FEATURES) assert.equal(m.body.value, value);
    assert.equal(m.needReply, false);
  });
  await t.step("SET_MEM_TABLE keeps regions and fds in order", () => {
    const regions = [region(0n, 0x10_0000n), region(0x1_0000_0000n, 0x2000n, 0x4000n)];
    const m = decode(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(regions)), [7, 9]);
    assert.equal(m.request, VHOST_USER_SET_MEM_TABLE);
    if (m.request === VHOST_USER_SET_MEM_TABLE) assert.deepEqual(m.body.regions, regions);
    assert.deepEqual(m.fds, [7, 9]);
  });
  await t.step("SET_MEM_TABLE with 8 regions is the maximum", () => {
    const regions = Array.from({ length: 8 }, (_, i) => region(BigInt(i) * 0x1000n, 0x1000n));
    const fds = regions.map((_, i) => 10 + i);
    const m = decode(encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(regions)), fds);
    if (m.request !== VHOST_USER_SET_MEM_TABLE) throw new Error("wrong request");
    assert.equal(m.body.regions.length, 8);
  });
  await t.step("SET_VRING_ADDR", () => {
    const addr = {
      index: 1,
      flags: 0,
      descUser: 0x7f00_1000n,
      usedUser: 0x7f00_3000n,
      availUser: 0x7f00_2000n,
      logGuest: 0n,
    };
    const m = decode(encodeRequest(VHOST_USER_SET_VRING_ADDR, encodeVringAddr(addr)));
    if (m.request !== VHOST_USER_SET_VRING_ADDR) throw new Error("wrong request");
    assert.deepEqual(m.body, addr);
  });
  await t.step("SET_VRING_KICK with an fd and with VHOST_USER_VRING_NOFD_MASK", () => {
    const withFd = decode(encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(5, false)), [3]);
    if (withFd.request !== VHOST_USER_SET_VRING_KICK) throw new Error("wrong request");
    assert.deepEqual(withFd.body, { index: 5, noFd: false });
    const noFd = decode(encodeRequest(VHOST_USER_SET_VRING_CALL, encodeVringFd(255, true)));
    if (noFd.request !== VHOST_USER_SET_VRING_CALL) throw new Error("wrong request");
    assert.deepEqual(noFd.body, { index: 255, noFd: true });
  });
  await t.step("SET_VRING_ENABLE", () => {
    const m = decode(encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(3, 1)));
    if (m.request !== VHOST_USER_SET_VRING_ENABLE) throw new Error("wrong request");
    assert.deepEqual(m.body, { index: 3, enable: true });
  });
  await t.step("ADD_MEM_REG and REM_MEM_REG", () => {
    const r = region(0x8000_0000n, 0x4000_0000n, 0x1000n);
    const add = decode(encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(r)), [4]);
    if (add.request !== VHOST_USER_ADD_MEM_REG) throw new Error("wrong request");
    assert.deepEqual(add.body.region, r);
    const rem = decode(encodeRequest(VHOST_USER_REM_MEM_REG, encodeMemRegion(r)));
    if (rem.request !== VHOST_USER_REM_MEM_REG) throw new Error("wrong request");
    assert.deepEqual(rem.body.region, r);
    // vhost-user.rst REM_MEM_REG: the back-end MAY accept one fd (and closes it).
    assert.deepEqual(
      decode(encodeRequest(VHOST_USER_REM_MEM_REG, encodeMemRegion(r)), [4]).fds,
      [4],
    );
  });
  await t.step("a reply decodes with the reply flag", () => {
    const bytes = encodeReply(VHOST_USER_GET_FEATURES, encodeU64(42n));
    const h = decodeReplyHeader(bytes, VHOST_USER_GET_FEATURES);
    assert.equal(h.flags, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK);
    assert.equal(h.size, 8);
    assert.throws(() => decodeReplyHeader(bytes, VHOST_USER_SET_FEATURES), /expected/);
  });
});

Deno.test("decodeHeader rejects", async (t) => {
  const cases: [string, Uint8Array, RegExp][] = [
    ["a short header", new Uint8Array(11), /11 bytes, needs 12/],
    ["version 0", rawHeader(VHOST_USER_SET_OWNER, 0, 0), /version 0/],
    ["version 2", rawHeader(VHOST_USER_SET_OWNER, 2, 0), /version 2/],
    ["version 3", rawHeader(VHOST_USER_SET_OWNER, 3, 0), /version 3/],
    [
      "the reply flag on a request",
      rawHeader(VHOST_USER_SET_OWNER, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 0),
      /reply flag/,
    ],
    ["reserved flag bit 4", rawHeader(VHOST_USER_SET_OWNER, 1 | 0x10, 0), /reserved flag bits/],
    ["reserved flag bit 31", rawHeader(VHOST_USER_SET_OWNER, 1 | 0x8000_0000, 0), /reserved/],
    [
      "a payload larger than the bound",
      rawHeader(VHOST_USER_SET_MEM_TABLE, 1, VHOST_USER_MAX_PAYLOAD_SIZE + 1),
      /exceeds/,
    ],
  ];
  for (const [name, bytes, pattern] of cases) {
    await t.step(name, () => {
      assert.throws(
        () => decodeHeader(bytes),
        (e) => e instanceof ProtocolError && pattern.test(e.message),
      );
    });
  }
  await t.step("accepts need_reply and the largest payload", () => {
    const h = decodeHeader(
      rawHeader(VHOST_USER_SET_OWNER, 1 | VHOST_USER_NEED_REPLY_MASK, VHOST_USER_MAX_PAYLOAD_SIZE),
    );
    assert.equal(h.size, VHOST_USER_MAX_PAYLOAD_SIZE);
  });
});

Deno.test("decodeRequest rejects", async (t) => {
  const twoRegions = [region(0n, 0x1000n), region(0x1000n, 0x1000n)];
  const nineRegions = Array.from({ length: 9 }, (_, i) => region(BigInt(i) * 0x1000n, 0x1000n));
  const cases: [string, Uint8Array, number[], RegExp][] = [
    ["an unknown request", encodeRequest(99), [], /Unknown request 99/],
    ["request 0", encodeRequest(0), [], /Unknown request 0/],
    [
      "a known request vionet does not handle",
      encodeRequest(VHOST_USER_SET_VRING_ENDIAN, encodeU64(0n)),
      [],
      /VHOST_USER_SET_VRING_ENDIAN \(23\) is not supported/,
    ],
    [
      "a body on a request that takes none",
      encodeRequest(VHOST_USER_GET_FEATURES, encodeU64(0n)),
      [],
      /GET_FEATURES.*payload is 8 bytes, must be 0/,
    ],
    [
      "a u64 request with 4 bytes",
      encodeMessage(VHOST_USER_SET_FEATURES, 1, new Uint8Array(4)),
      [],
      /SET_FEATURES.*payload is 4 bytes, must be 8/,
    ],
    [
      "a vring state with 12 bytes",
      encodeMessage(VHOST_USER_SET_VRING_NUM, 1, new Uint8Array(12)),
      [],
      /must be 8/,
    ],
    [
      "a mem table shorter than its own header",
      encodeMessage(VHOST_USER_SET_MEM_TABLE, 1, new Uint8Array(4)),
      [],
      /shorter than the 8-byte table header/,
    ],
    [
      "a mem table whose size disagrees with its region count",
      encodeMessage(VHOST_USER_SET_MEM_TABLE, 1, encodeMemTable(twoRegions).subarray(0, 40)),
      [3],
      /payload is 40 bytes, must be 72/,
    ],
    [
      "a mem table with zero regions",
      encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([])),
      [],
      /0 regions, must be 1 to 8/,
    ],
    [
      "a mem table with too many regions",
      encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(nineRegions)),
      [],
      /9 regions, must be 1 to 8/,
    ],
    [
      "a region of size 0",
      encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([region(0n, 0n)])),
      [3],
      /region 0: size is 0/,
    ],
    [
      "a region wrapping past 2^64",
      encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable([region(~0n & (2n ** 64n - 1n), 2n)])),
      [3],
      /wraps past 2\^64/,
    ],
    [
      "an mmap offset wrapping past 2^64",
      encodeRequest(
        VHOST_USER_ADD_MEM_REG,
        encodeMemRegion({ guestPhysAddr: 0n, size: 16n, userAddr: 0n, mmapOffset: 2n ** 64n - 8n }),
      ),
      [3],
      /mmap offset .* wraps past 2\^64/,
    ],
    [
      "overlapping regions",
      encodeRequest(
        VHOST_USER_SET_MEM_TABLE,
        encodeMemTable([region(0n, 0x2000n), region(0x1000n, 0x1000n)]),
      ),
      [3, 4],
      /region 0 and region 1 overlap/,
    ],
    [
      "fds on a request that carries none",
      encodeRequest(VHOST_USER_GET_FEATURES),
      [5],
      /came with 1 file descriptor, takes 0/,
    ],
    [
      "fewer fds than regions",
      encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(twoRegions)),
      [5],
      /came with 1 file descriptor, takes 2/,
    ],
    [
      "more fds than regions",
      encodeRequest(VHOST_USER_SET_MEM_TABLE, encodeMemTable(twoRegions)),
      [5, 6, 7],
      /came with 3 file descriptors, takes 2/,
    ],
    [
      "an fd with VHOST_USER_VRING_NOFD_MASK set",
      encodeRequest(VHOST_USER_SET_VRING_KICK, encodeVringFd(0, true)),
      [5],
      /came with 1 file descriptor, takes 0/,
    ],
    [
      "no fd without VHOST_USER_VRING_NOFD_MASK",
      encodeRequest(VHOST_USER_SET_VRING_CALL, encodeVringFd(0, false)),
      [],
      /came with 0 file descriptors, takes 1/,
    ],
    [
      "ADD_MEM_REG without its fd",
      encodeRequest(VHOST_USER_ADD_MEM_REG, encodeMemRegion(region(0n, 0x1000n))),
      [],
      /takes 1/,
    ],
    [
      "REM_MEM_REG with two fds",
      encodeRequest(VHOST_USER_REM_MEM_REG, encodeMemRegion(region(0n, 0x1000n))),
      [5, 6],
      /takes 0 or 1/,
    ],
    [
      "vring fd payload bits above bit 8",
      encodeRequest(VHOST_USER_SET_VRING_KICK, encodeU64(1n << 9n)),
      [5],
      /sets bits above bit 8/,
    ],
    [
      "unknown vring address flags",
      encodeRequest(
        VHOST_USER_SET_VRING_ADDR,
        encodeVringAddr({
          index: 0,
          flags: 2,
          descUser: 0n,
          usedUser: 0n,
          availUser: 0n,
          logGuest: 0n,
        }),
      ),
      [],
      /unknown vring address flags 0x2/,
    ],
    [
      "SET_VRING_ENABLE num 2",
      encodeRequest(VHOST_USER_SET_VRING_ENABLE, encodeVringState(0, 2)),
      [],
      /num is 2, must be 0 or 1/,
    ],
  ];
  for (const [name, bytes, fds, pattern] of cases) {
    await t.step(name, () => {
      assert.throws(
        () => decode(bytes, fds),
        (e) => e instanceof ProtocolError && pattern.test(e.message),
        `expected ${pattern}`,
      );
    });
  }
  await t.step("a payload shorter than the header says", () => {
    const header = decodeHeader(rawHeader(VHOST_USER_SET_FEATURES, 1, 8));
    assert.throws(
      () => decodeRequest(header, new Uint8Array(3), []),
      /payload is 3 bytes, header says 8/,
    );
  });
});

Deno.test("checkRegionWithinFile rejects a region that runs past the end of its file", () => {
  const r = region(0n, 0x1000n, 0x1000n);
  checkRegionWithinFile(r, 0x2000n); // exactly fits
  assert.throws(
    () => checkRegionWithinFile(r, 0x1fffn),
    (e) =>
      e instanceof ProtocolError &&
      /runs past the end of its file \(0x1fff bytes\)/.test(e.message),
  );
  assert.throws(() => checkRegionWithinFile(region(0n, 0x1000n), 0n), ProtocolError);
});

Deno.test("requestName uses the spec's names", () => {
  assert.equal(requestName(VHOST_USER_SET_MEM_TABLE), "VHOST_USER_SET_MEM_TABLE (5)");
  assert.equal(requestName(43), "VHOST_USER_CHECK_DEVICE_STATE (43)");
  assert.equal(requestName(44), "request 44");
});

Deno.test("GET_VRING_BASE ignores its reserved num field (DPDK virtio-user leaves it uninitialised)", () => {
  const bytes = encodeRequest(VHOST_USER_GET_VRING_BASE, encodeVringState(1, 32639));
  const header = decodeHeader(bytes.subarray(0, VHOST_USER_HDR_SIZE));
  const req = decodeRequest(header, bytes.subarray(VHOST_USER_HDR_SIZE), []);
  assert.equal(req.request, VHOST_USER_GET_VRING_BASE);
  assert.deepEqual(req.body, { index: 1, num: 0 });
});
