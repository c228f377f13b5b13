/**
 * Bench results for the report and pool tests: a guest-only run on a
 * made-up machine.
 *
 * @module
 */

import type { Results } from "../../bench/report.ts";
import type { GuestSample } from "../../bench/guest.ts";

/** The results of a guest-only run of `guest` on a test machine (`kernel` as given). */
export function guestOnly(guest: GuestSample[], kernel = "6.x", date = "now"): Results {
  return {
    machine: {
      cpus: 2,
      cpuModel: "test",
      kernel,
      accelerator: "TCG",
      deno: "Deno x",
      dpdk: "x",
      qemu: "x",
      date,
      loadBefore: "0 0 0",
    },
    command: "deno task bench --only guest",
    options: {},
    backend: [],
    guest,
    idle: [],
    notes: [],
  };
}
