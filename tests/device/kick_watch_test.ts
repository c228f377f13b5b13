/** Lost-kick recovery (device/kick_watch.ts) against queues whose state the test sets. */
import assert from "node:assert/strict";
import { KICK_GRACE_MS, KickWatch, type WatchedQueue } from "../../device/kick_watch.ts";

interface FakeQueue extends WatchedQueue {
  waiting: boolean;
  last: number;
}

function queue(event: number): FakeQueue {
  const q: FakeQueue = {
    waiting: false,
    last: 0,
    awaitsKick: () => q.waiting,
    lastAvailIdx: () => q.last,
    counters: { kicksMissed: 0 },
    event,
  };
  return q;
}

Deno.test("kick watch: a queue that waits two looks in a row with nothing taken lost its kick", () => {
  const rx = queue(1), tx = queue(2);
  const w = new KickWatch([rx, tx]);
  tx.waiting = true;
  tx.last = 3873;
  assert.equal(w.look(0), 0, "first sighting: the kick may still be on its way");
  assert.equal(w.look(KICK_GRACE_MS - 1), 0, "no second look within a grace period");
  assert.equal(w.look(KICK_GRACE_MS), 2, "still waiting at the same index: served as if kicked");
  assert.equal(tx.counters.kicksMissed, 1);
  assert.equal(rx.counters.kicksMissed, 0);
  // Served: the count starts over, a queue still waiting is noted afresh.
  assert.equal(w.look(2 * KICK_GRACE_MS), 0);
  assert.equal(w.look(3 * KICK_GRACE_MS), 2);
  assert.equal(tx.counters.kicksMissed, 2);
});

Deno.test("kick watch: a late kick, a device that took buffers, or a queue that stopped waiting is not counted", () => {
  const rx = queue(1), tx = queue(2);
  const w = new KickWatch([rx, tx]);
  rx.waiting = tx.waiting = true;
  assert.equal(w.look(0), 0);
  // The kick came: the device took chains (last_avail moved), more wait now.
  rx.last = 5;
  tx.waiting = false;
  assert.equal(w.look(KICK_GRACE_MS), 0);
  tx.waiting = true;
  assert.equal(w.look(2 * KICK_GRACE_MS), 1, "rx: still at 5 since the last look");
  assert.equal(w.look(3 * KICK_GRACE_MS), 2, "tx: noted at 2×, not at 0× (it stopped waiting)");
  assert.deepEqual([rx.counters.kicksMissed, tx.counters.kicksMissed], [1, 1]);
  w.clear();
  assert.equal(w.look(3 * KICK_GRACE_MS + 1), 0, "clear() forgets what was noted");
});

Deno.test("kick watch: the device sleeps long only when it did nothing since the last look and nothing is noted", () => {
  const q = queue(2);
  const w = new KickWatch([q]);
  assert.equal(w.sleepFor(0, 1000), 1000, "idle: the whole wait");
  w.worked();
  assert.ok(w.sleepFor(0, 1000) <= KICK_GRACE_MS, "worked: look again within a grace period");
  assert.equal(w.look(0), 0);
  assert.equal(w.sleepFor(0, 1000), 1000, "looked, nothing waits: the whole wait again");
  q.waiting = true;
  assert.equal(w.look(KICK_GRACE_MS), 0);
  assert.equal(
    w.sleepFor(KICK_GRACE_MS + 3, 1000),
    KICK_GRACE_MS - 3,
    "noted: until the next look",
  );
  assert.equal(w.sleepFor(5 * KICK_GRACE_MS, 1000), 1, "a look overdue: at least 1 ms");
});
