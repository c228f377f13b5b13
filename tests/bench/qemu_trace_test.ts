/**
 * bench/qemu_trace.ts: the source's stop of the VM and the destination's
 * resumption, read from QEMU's traces (lines as QEMU 7.2 wrote them in a
 * migration of the bench).
 *
 * @module
 */

import assert from "node:assert/strict";
import { resumedUs, sourceStopMs, traceEvents } from "../../bench/qemu_trace.ts";

const VIONET_SOURCE = `
6628@1796671089.926638:migration_bitmap_sync_start 
6628@1796671089.928885:migration_bitmap_sync_end dirty_pages 905
6628@1796671089.928929:runstate_set current_run_state 9 (running) new_state 7 (finish-migrate)
6628@1796671089.928964:vm_state_notify running 0 reason 7 (finish-migrate)
6628@1796671089.928996:vhost_dev_stop 0x560cdb616cb0:virtio-net vrings:0
6628@1796671089.929103:vhost_user_write req:11 flags:0x1
6628@1796671089.934573:vhost_user_read req:11 flags:0x5
6628@1796671089.934839:vhost_user_write req:11 flags:0x1
6628@1796671089.935909:vhost_user_read req:11 flags:0x5
6628@1796671089.936535:migration_completion_vm_stop ret 0
6628@1796671089.936546:savevm_state_complete_precopy 
6628@1796671089.975500:migrate_set_state new state completed
6628@1796671089.975509:runstate_set current_run_state 7 (finish-migrate) new_state 5 (postmigrate)
`;

Deno.test("qemu_trace: events keep microseconds, names and arguments", () => {
  const ev = traceEvents(VIONET_SOURCE);
  assert.equal(ev.length, 13);
  assert.deepEqual(ev[3], {
    us: 1796671089928964,
    event: "vm_state_notify",
    args: "running 0 reason 7 (finish-migrate)",
  });
});

Deno.test("qemu_trace: the source's stop runs from finish-migrate to the completion's vm stop", () => {
  assert.equal(sourceStopMs(VIONET_SOURCE).toFixed(3), "7.606");
});

Deno.test("qemu_trace: the last migration's stop counts; none reached is NaN", () => {
  const earlier = VIONET_SOURCE.replaceAll("1796671089.9", "1796671080.9")
    .replace("936535:migration_completion", "930000:migration_completion");
  assert.equal(sourceStopMs(earlier + VIONET_SOURCE).toFixed(3), "7.606");
  const cut = VIONET_SOURCE.split("\n").filter((l) => !l.includes("migration_completion_vm_stop"));
  assert.ok(Number.isNaN(sourceStopMs(cut.join("\n"))));
  assert.ok(Number.isNaN(sourceStopMs("")));
});

const DESTINATION = `
26229@1796685901.077729:qemu_loadvm_state_post_main 0
26229@1796685901.077965:runstate_set current_run_state 1 (inmigrate) new_state 9 (running)
26229@1796685901.077972:vm_state_notify running 1 reason 9 (running)
26229@1796685901.078072:vhost_dev_start 0x55f749966cb0:virtio-net vrings:0
26229@1796685901.078082:vhost_user_write req:2 flags:0x1
`;

Deno.test("qemu_trace: the destination resumes at run state running; never running is NaN", () => {
  assert.equal(resumedUs(DESTINATION), 1796685901077965);
  // The source ran too (before finish-migrate), but only its last start counts.
  assert.equal(resumedUs(VIONET_SOURCE + DESTINATION), 1796685901077965);
  assert.ok(Number.isNaN(resumedUs(VIONET_SOURCE)));
  assert.ok(Number.isNaN(resumedUs("")));
});
