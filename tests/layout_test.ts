/**
 * Folders follow privilege (README "Development", docs/design.md "Layout in
 * detail"): the imports of each folder stay inside what its context may run,
 * so a path says what a line may do.
 * A module a folder must not reach shows here by name.
 */

import assert from "node:assert/strict";
import { ROOT } from "./helpers.ts";

/** Every .ts module under `dir` (its folders too), by repository path. */
function modules(dir: string): Map<string, string> {
  const out = new Map<string, string>();
  const walk = (d: string) => {
    for (const e of Deno.readDirSync(`${ROOT}${d}`)) {
      const path = `${d}/${e.name}`;
      if (e.isDirectory) walk(path);
      else if (e.name.endsWith(".ts")) out.set(path, Deno.readTextFileSync(`${ROOT}${path}`));
    }
  };
  walk(dir);
  return out;
}

/** The repository paths a module imports (static and dynamic, relative specifiers only). */
function importsOf(path: string, text: string): string[] {
  const dir = path.slice(0, path.lastIndexOf("/"));
  const out: string[] = [];
  for (const m of text.matchAll(/(?:from|import)\s*\(?\s*"(\.{1,2}\/[^"]+)"/g)) {
    const parts = `${dir}/${m[1]}`.split("/");
    const stack: string[] = [];
    for (const p of parts) {
      if (p === "..") stack.pop();
      else if (p !== ".") stack.push(p);
    }
    out.push(stack.join("/"));
  }
  return out;
}

/** Each folder and the paths its modules may import. */
const ALLOWED: Array<[string, (target: string) => boolean]> = [
  // The zero-permission device: pure logic over the wire vocabulary.
  ["device", (t) => t.startsWith("device/") || t.startsWith("ipc/")],
  // The shared vocabulary: no system calls, nothing of either side.
  ["ipc", (t) => t.startsWith("ipc/")],
  // The FFI-only workers: their own code, libc and /proc, the vocabulary.
  [
    "parent/io",
    (t) => t.startsWith("parent/io/") || t === "parent/host/libc.ts" || t.startsWith("ipc/"),
  ],
];

for (const [dir, allowed] of ALLOWED) {
  Deno.test(`${dir}/ imports only what its context may run`, () => {
    const found = modules(dir);
    assert.ok(found.size > 3, `${dir}: no modules found`);
    for (const [path, text] of found) {
      for (const target of importsOf(path, text)) {
        assert.ok(allowed(target), `${path} imports ${target}`);
      }
    }
  });
}

Deno.test("only parent/host/libc.ts opens a library (Deno.dlopen)", () => {
  for (const dir of ["parent", "device", "ipc"]) {
    for (const [path, text] of modules(dir)) {
      if (path === "parent/host/libc.ts") continue;
      assert.doesNotMatch(text, /Deno\.dlopen\s*\(/, `${path} calls Deno.dlopen`);
    }
  }
});

Deno.test("device/ and ipc/ use no Deno system API (the device has no permission for any)", () => {
  for (const dir of ["device", "ipc"]) {
    for (const [path, text] of modules(dir)) {
      const code = text.replace(/\/\*[\s\S]*?\*\/|\/\/.*$/gm, "");
      const calls = [...code.matchAll(/Deno\.(\w+)/g)].map((m) => m[1])
        .filter((name) => name !== "permissions"); // the device reports its own permissions
      assert.deepEqual(calls, [], `${path} uses Deno.${calls[0]}`);
    }
  }
});
