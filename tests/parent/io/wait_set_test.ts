/**
 * The poller's wait set (parent/io/wait_set.ts) on real descriptors: an
 * edge-triggered eventfd reports each write once without being read, a
 * level-triggered one until it is read, a quiet tag reports nothing, and a
 * descriptor epoll refuses is reported as refused.
 */
import assert from "node:assert/strict";
import * as libc from "../../../parent/host/libc.ts";
import { WaitSet } from "../../../parent/io/wait_set.ts";

const one = new Uint8Array(new BigUint64Array([1n]).buffer);

Deno.test("WaitSet: edge-triggered kicks, level-triggered wake-ups, quiet tags, refused fds", () => {
  const flags = libc.EFD_CLOEXEC | libc.EFD_NONBLOCK;
  const [kick, wake, other] = [0, 1, 2].map(() => libc.eventfd(0, flags));
  const ws = new WaitSet();
  const path = Deno.makeTempFileSync();
  const file = libc.open(path, libc.O_RDONLY | libc.O_CLOEXEC);
  try {
    assert.ok(ws.set(0, wake, libc.EPOLLIN));
    assert.ok(ws.set(1, kick, libc.EPOLLIN | libc.EPOLLET));
    assert.equal(ws.wait(0), 0, "nothing yet");

    libc.write(kick, one);
    assert.equal(ws.wait(0), 1);
    assert.equal(ws.ready(1) & libc.EPOLLIN, libc.EPOLLIN, "the kick");
    assert.equal(ws.ready(0), 0);
    assert.equal(ws.wait(0), 0, "reported once, though never read");
    libc.write(kick, one);
    assert.equal(ws.wait(0), 1, "the next write is reported again");

    libc.write(wake, one);
    assert.equal(ws.wait(0), 1);
    assert.equal(ws.wait(0), 1, "level-triggered: until it is read");
    libc.read(wake, new Uint8Array(8));
    assert.equal(ws.wait(0), 0);

    // Quiet (events 0): registered, not reported; then replaced by another fd.
    assert.ok(ws.set(1, kick, 0));
    libc.write(kick, one);
    assert.equal(ws.wait(0), 0, "a quiet tag reports nothing");
    assert.ok(ws.set(1, other, libc.EPOLLIN));
    assert.equal(ws.fd(1), other);
    libc.write(kick, one);
    assert.equal(ws.wait(0), 0, "the old fd is no longer watched");
    libc.write(other, one);
    assert.equal(ws.wait(10), 1);
    assert.ok(ws.ready(1) & libc.EPOLLIN);

    // epoll refuses a regular file: the tag then watches nothing.
    assert.equal(ws.set(2, file, libc.EPOLLIN), false);
    assert.equal(ws.fd(2), -1);
    assert.ok(ws.set(1, -1, 0));
    assert.equal(ws.fd(1), -1);
  } finally {
    ws.close();
    libc.close(file);
    Deno.removeSync(path);
    for (const fd of [kick, wake, other]) libc.close(fd);
  }
});
