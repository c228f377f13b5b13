/**
 * The guest-bound bench's interrupt count: the script it runs in the guest,
 * run here by the host's sh and awk against a /proc/interrupts of the test
 * guest's shape (one CPU, virtio-net on INTx with `vectors=0`).
 */

import assert from "node:assert/strict";
import { iperfWithIrqs, irqDelta } from "../../bench/guest.ts";

const interrupts = (net: number, other: number) =>
  [
    "           CPU0       CPU1",
    `  1:          9          0   IO-APIC   1-edge      i8042`,
    `  4:       ${other}          0   IO-APIC   4-edge      ttyS0`,
    ` 11:       ${net}          7   IO-APIC  11-fasteoi   virtio0`,
    "LOC:      40000      40000   Local timer interrupts",
    "",
  ].join("\n");

Deno.test("iperfWithIrqs() counts the virtio lines around the command, its report last", async () => {
  const dir = await Deno.makeTempDir({ prefix: "vionet-irqs-" });
  try {
    const file = `${dir}/interrupts`;
    await Deno.writeTextFile(file, interrupts(100, 5));
    // The "iperf3" here moves the counts on, as a transfer would.
    const fake = `printf '%s' '${interrupts(2600, 50)}' > ${file}; echo '{"end": {}}'`;
    const out = await new Deno.Command("sh", { args: ["-c", iperfWithIrqs(fake, file)] })
      .output();
    assert.equal(out.code, 0, new TextDecoder().decode(out.stderr));
    const text = new TextDecoder().decode(out.stdout);
    assert.equal(irqDelta(text), 2500);
    assert.deepEqual(JSON.parse(text.slice(text.indexOf("{"))), { end: {} });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("iperfWithIrqs() keeps the command's exit status", async () => {
  const out = await new Deno.Command("sh", {
    args: ["-c", iperfWithIrqs('echo \'{"error": "x"}\'; false', "/dev/null")],
  }).output();
  assert.equal(out.code, 1);
  assert.equal(irqDelta(new TextDecoder().decode(out.stdout)), 0);
});

Deno.test("irqDelta() is undefined without both marks", () => {
  assert.equal(irqDelta("irqs-before 5\n{}"), undefined);
  assert.equal(irqDelta("{}"), undefined);
});
