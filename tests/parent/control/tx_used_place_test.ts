/**
 * Where the writer publishes TX completions: the parent's translation of the
 * TX vring's addresses (parent/control/datapath_host.ts txUsedPlace) and the
 * writer's check of what it is given (parent/io/protocol.ts).
 */

import { ValidationError } from "../../../ipc/reader.ts";
import assert from "node:assert/strict";
import { txUsedPlace } from "../../../parent/control/datapath_host.ts";
import { IO_PROTOCOL_VERSION, parseIoRequest } from "../../../parent/io/protocol.ts";
import { VIRTIO_RING_F_EVENT_IDX } from "../../../ipc/features.ts";

const MAPS = [
  { userAddr: 0x7f00_0000_0000n, size: 0x10_0000n, hostAddr: 0x5500_0000_0000n },
  { userAddr: 0x7f00_1000_0000n, size: 0x10_0000n, hostAddr: 0x5600_0000_0000n },
];
const RING = { num: 256, availUser: 0x7f00_1000_2000n, usedUser: 0x7f00_0000_4000n };

Deno.test("txUsedPlace: used->idx and used_event (EVENT_IDX) or avail->flags, as host addresses", () => {
  const withEvent = txUsedPlace(MAPS, RING, VIRTIO_RING_F_EVENT_IDX);
  assert.deepEqual(withEvent, {
    idxAddr: 0x5500_0000_4002n,
    // avail: flags, idx, ring[256], then used_event
    eventAddr: 0x5600_0000_2000n + 4n + 512n,
    eventIdx: true,
  });
  const plain = txUsedPlace(MAPS, RING, 0n);
  assert.deepEqual(plain, {
    idxAddr: 0x5500_0000_4002n,
    eventAddr: 0x5600_0000_2000n,
    eventIdx: false,
  });
  // A word that straddles or misses every mapping is refused, by name.
  assert.throws(
    () => txUsedPlace(MAPS, { ...RING, usedUser: 0x7f00_000f_fffen }, 0n),
    /TX used->idx at user address 0x7f0000100000 is not in guest memory/,
  );
  assert.throws(
    () => txUsedPlace(MAPS, { ...RING, availUser: 0x1000n }, VIRTIO_RING_F_EVENT_IDX),
    /TX avail->used_event at user address 0x1204 is not in guest memory/,
  );
});

Deno.test("init: a txUsed that is not two aligned host addresses and a boolean is refused by name", () => {
  const init = (txUsed: unknown) => ({
    kind: "init",
    id: 1,
    version: IO_PROTOCOL_VERSION,
    role: "writer",
    control: new SharedArrayBuffer(8),
    tx: new SharedArrayBuffer(8),
    rxPost: new SharedArrayBuffer(8),
    rxLong: new SharedArrayBuffer(8),
    rxDone: new SharedArrayBuffer(8),
    mailbox: new SharedArrayBuffer(64),
    tapFd: 3,
    wakeFd: 4,
    ranges: [],
    ioUring: "auto",
    txUsed,
  });
  const ok = parseIoRequest(init({ idxAddr: 0x1000n, eventAddr: 0x2002n, eventIdx: true }));
  assert.equal(ok.kind, "init");
  assert.deepEqual(ok.kind === "init" && ok.txUsed, {
    idxAddr: 0x1000n,
    eventAddr: 0x2002n,
    eventIdx: true,
  });
  const none = parseIoRequest(init(null));
  assert.equal(none.kind === "init" && none.txUsed, null);
  for (
    const [bad, re] of [
      [{ idxAddr: 0x1001n, eventAddr: 0x2000n, eventIdx: true }, /txUsed\.idxAddr/],
      [{ idxAddr: 0x1000n, eventAddr: 0x2000, eventIdx: true }, /txUsed\.eventAddr/],
      [{ idxAddr: 0n, eventAddr: 0x2000n, eventIdx: true }, /txUsed\.idxAddr/],
      [{ idxAddr: 0x1000n, eventAddr: 0x2000n, eventIdx: 1 }, /txUsed\.eventIdx/],
      ["here", /txUsed must be an object/],
    ] as const
  ) {
    assert.throws(() => parseIoRequest(init(bad)), (e: unknown) => {
      assert.ok(e instanceof ValidationError);
      assert.match(e.message, re);
      assert.equal(e.id, 1);
      return true;
    });
  }
});
