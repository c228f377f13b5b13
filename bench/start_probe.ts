/**
 * One run of `start_latency.ts`, in a process of its own (so that the first
 * round is a fresh daemon's, as on a migration's destination): the daemon's
 * parts in this process behind `tests/parent/control/frontend_rig.ts`, a
 * front-end that sends what QEMU 7.2 sends a vhost-user back-end at a
 * migration's destination, and the time each step took. Prints one JSON
 * line (`StartProbeResult`).
 *
 * The steps: QEMU's set-up at its start (features, owner, both rings
 * enabled), a pause while the migration stream would run (the daemon starts
 * its spare I/O workers then), then with the guest's RX ring full of posted
 * buffers: SET_FEATURES, the memory table, each ring's NUM, BASE, ADDR,
 * KICK and CALL (ring 1's KICK starts the queues), and the guest's first TX
 * frame until its used entry. A second round does the same after a stop
 * (timed: both GET_VRING_BASE, after {@link IDLE_BEFORE_STOP_MS} without
 * traffic) and a new connection, in the same process (a daemon that served
 * before: the migration back).
 *
 * ```
 * deno run --unstable-worker-options -A bench/start_probe.ts [--rounds 2] [--pause-ms 1500] [--guest-mib 256]
 * ```
 *
 * @module
 */

import { parseArgs } from "node:util";
import * as libc from "../parent/host/libc.ts";
import { VIONET_PROTOCOL_FEATURES } from "../parent/control/vhost_user_backend.ts";
import {
  encodeU64,
  encodeVringState,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
} from "../parent/control/vhost_user_messages.ts";
import { encodeVringFd } from "../tests/parent/control/vhost_user_encode.ts";
import { FrontendRig } from "../tests/parent/control/frontend_rig.ts";
import { withNetns } from "../tests/net_ns.ts";
import { RX_QUEUE, TX_QUEUE } from "../ipc/datapath.ts";

/** One round's steps, in ms. */
export interface StartRound {
  /** SET_FEATURES (the device's set-features, its TUNSCAP). */
  featuresMs: number;
  /** SET_MEM_TABLE (the mapping, the grant to the device). */
  memoryMs: number;
  /** Ring 0's five messages and ring 1's NUM, BASE, ADDR. */
  ringsMs: number;
  /** Ring 1's SET_VRING_KICK, which starts the queues (device and I/O workers). */
  startMs: number;
  /** Ring 1's SET_VRING_CALL (to running I/O workers). */
  callMs: number;
  /** From then to the used entry of the guest's first TX frame. */
  firstFrameMs: number;
  /** SET_FEATURES to that used entry. */
  totalMs: number;
  /**
   * The stop before this round: GET_VRING_BASE of both rings, the queues
   * idle for a while (a migration's source stops a paused VM). Absent in
   * the first round.
   */
  stopMs?: number;
}

export interface StartProbeResult {
  rounds: StartRound[];
}

/** RX buffers the guest has posted when its rings resume (its RX ring is kept full). */
const POSTED_RX = 128;
/** Quiet before a timed stop: the data path's threads are asleep by then, as in a paused VM. */
const IDLE_BEFORE_STOP_MS = 300;

async function round(rig: FrontendRig, bases: [number, number]): Promise<StartRound> {
  const at = [performance.now()];
  const lap = () => at.push(performance.now());
  await rig.setFeatures(false);
  lap();
  await rig.setMemTable();
  lap();
  const ring = async (q: number, last: boolean) => {
    await rig.send(VHOST_USER_SET_VRING_NUM, encodeVringState(q, rig.driver(q).size));
    await rig.send(VHOST_USER_SET_VRING_BASE, encodeVringState(q, bases[q]));
    await rig.send(VHOST_USER_SET_VRING_ADDR, rig.vringAddr(q));
    if (last) lap();
    await rig.send(VHOST_USER_SET_VRING_KICK, encodeVringFd(q, false), [libc.dup(rig.kick[q])]);
    if (last) lap();
    await rig.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(q, false), [libc.dup(rig.call[q])]);
    if (last) lap();
  };
  await ring(RX_QUEUE, false);
  await ring(TX_QUEUE, true);
  rig.sendUdp(1);
  while (rig.tx.readUsed().length === 0) {
    if (performance.now() - at[0] > 10_000) throw new Error("no TX completion in 10 s");
    await new Promise((r) => setTimeout(r, 0));
  }
  lap();
  const d = (i: number) => at[i + 1] - at[i];
  return {
    featuresMs: d(0),
    memoryMs: d(1),
    ringsMs: d(2),
    startMs: d(3),
    callMs: d(4),
    firstFrameMs: d(5),
    totalMs: at[6] - at[0],
  };
}

/** QEMU's set-up when it starts (rings enabled before any feature is set), then its pause. */
async function connect(rig: FrontendRig, pauseMs: number): Promise<void> {
  await rig.send(VHOST_USER_GET_FEATURES);
  await rig.send(VHOST_USER_SET_PROTOCOL_FEATURES, encodeU64(VIONET_PROTOCOL_FEATURES));
  await rig.send(VHOST_USER_SET_OWNER);
  for (const q of [RX_QUEUE, TX_QUEUE]) {
    await rig.send(VHOST_USER_SET_VRING_ENABLE, encodeVringState(q, 1));
  }
  await new Promise((r) => setTimeout(r, pauseMs));
}

if (import.meta.main) {
  const { values } = parseArgs({
    args: Deno.args,
    options: {
      rounds: { type: "string", default: "2" },
      "pause-ms": { type: "string", default: "1500" },
      "guest-mib": { type: "string", default: "256" },
    },
  });
  const rounds = Number(values.rounds);
  const pauseMs = Number(values["pause-ms"]);
  if (!Number.isInteger(rounds) || rounds < 1) throw new Error(`--rounds ${values.rounds}`);
  if (!Number.isFinite(pauseMs) || pauseMs < 0) throw new Error(`--pause-ms ${values["pause-ms"]}`);
  const guestMiB = Number(values["guest-mib"]);
  if (!Number.isInteger(guestMiB) || guestMiB < 4) {
    throw new Error(`--guest-mib ${values["guest-mib"]}`);
  }
  const result: StartProbeResult = { rounds: [] };
  await withNetns(async (ns) => {
    const rig = await FrontendRig.open(ns, { guestBytes: guestMiB * 1024 * 1024 });
    try {
      let bases: [number, number] = [0, 0];
      for (let i = 0; i < rounds; i++) {
        let stopMs: number | undefined;
        if (i > 0) {
          await new Promise((r) => setTimeout(r, IDLE_BEFORE_STOP_MS));
          const t0 = performance.now();
          bases = await rig.stop();
          stopMs = performance.now() - t0;
          await rig.reconnect();
        }
        await connect(rig, pauseMs);
        // Before the first start: the ring resumes full. A stop gives back
        // what was posted and not filled, so later rounds resume full too.
        if (i === 0) rig.postRx(POSTED_RX);
        result.rounds.push({
          ...await round(rig, bases),
          ...(stopMs === undefined ? {} : { stopMs }),
        });
      }
    } finally {
      await rig.close();
    }
  });
  console.log(JSON.stringify(result));
}
