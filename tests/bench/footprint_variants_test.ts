/**
 * bench/footprint.ts's variants: each applies to the start task as it is
 * (a flag it takes out is one the start task has), and one that would take
 * out a flag the start task lacks fails instead of measuring the shipped
 * daemon under another name.
 *
 * @module
 */

import assert from "node:assert/strict";
import { variantFlags, VARIANTS } from "../../bench/footprint.ts";
import { startTaskFlags } from "../helpers.ts";

Deno.test("every footprint variant applies to the start task as it is", () => {
  const shipped = startTaskFlags();
  for (const v of VARIANTS) {
    const flags = variantFlags(v, shipped);
    for (const f of v.removeFlags ?? []) assert.ok(!flags.includes(f), `${v.name} keeps ${f}`);
    for (const f of v.addFlags ?? []) assert.ok(flags.includes(f), `${v.name} lacks ${f}`);
  }
});

Deno.test("a footprint variant that takes out a flag the start task lacks is an error", () => {
  assert.throws(
    () => variantFlags({ name: "x", describe: "", removeFlags: ["--v8-flags=--gone"] }, ["-A"]),
    /variant x: the start task has no --v8-flags=--gone to take out/,
  );
  assert.deepEqual(
    variantFlags({ name: "y", describe: "", removeFlags: ["-A"], addFlags: ["-R"] }, ["-A", "-W"]),
    ["-W", "-R"],
  );
});
