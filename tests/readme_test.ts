/**
 * The README (and docs/*.md) kept honest against the code:
 *
 * - every option in an options table (a table whose first header cell is
 *   "option") is an option `main.ts --help` prints, spelt the same with its
 *   argument, and where the table has a "default" column, with the very
 *   default `--help` shows (none where `--help` shows none); the options the
 *   README lists "Without a default" have none; and between the README's
 *   table and that list, every option of `--help` appears;
 * - every repository path named in backticks or as a link target exists;
 * - every `deno task NAME` named is a task in deno.json.
 *
 * `--help` is asked of the daemon itself, run as the start task runs it, so
 * that the test reads what an operator reads.
 */

import assert from "node:assert/strict";
import { ROOT, startTaskEnv, startTaskFlags } from "./helpers.ts";

/** The documents an operator reads: the README and everything under docs/. */
function documents(): Map<string, string> {
  const docs = new Map<string, string>();
  docs.set("README.md", Deno.readTextFileSync(`${ROOT}README.md`));
  for (const e of Deno.readDirSync(`${ROOT}docs`)) {
    if (e.isFile && e.name.endsWith(".md")) {
      docs.set(`docs/${e.name}`, Deno.readTextFileSync(`${ROOT}docs/${e.name}`));
    }
  }
  return docs;
}

/** Markdown without HTML comments (placeholders for options that have not landed) and code blocks. */
function prose(markdown: string): string {
  return markdown.replace(/<!--[\s\S]*?-->/g, "").replace(/^```[\s\S]*?^```/gm, "");
}

/** An option as `--help` prints it: `--mtu N` and its default, or "" when it shows none. */
export interface HelpOption {
  usage: string;
  default: string;
}

/** Parses the options section of `--help`: `  --name ARG   text`, then `(default: X)` lines. */
export function parseHelp(text: string): Map<string, HelpOption> {
  const options = new Map<string, HelpOption>();
  let last: HelpOption | null = null;
  for (const line of text.split("\n")) {
    const opt = /^ {2}(--[a-z][a-z-]*(?: \S+)?)\s{2,}\S/.exec(line);
    if (opt) {
      last = { usage: opt[1], default: "" };
      options.set(opt[1].split(" ")[0], last);
      continue;
    }
    const def = /^\s+\(default: (.*)\)$/.exec(line);
    if (def && last) last.default = def[1];
  }
  return options;
}

/** A table cell's text as a reader sees it: no backticks, `\|` as `|`. */
function cellText(cell: string): string {
  return cell.trim().replaceAll("`", "").replaceAll("\\|", "|").trim();
}

/** The cells of a Markdown table row, split on `|` not escaped as `\|`. */
function cells(row: string): string[] {
  return row.trim().replace(/^\|/, "").replace(/\|$/, "").split(/(?<!\\)\|/).map(cellText);
}

/** One row of an options table: where it is, the option as written, and its default cell if any. */
export interface OptionRow {
  where: string;
  usage: string;
  default: string | null;
}

/** Every row of every options table (first header cell "option") in a document. */
export function optionRows(file: string, markdown: string): OptionRow[] {
  const rows: OptionRow[] = [];
  const lines = prose(markdown).split("\n");
  for (let i = 0; i < lines.length; i++) {
    const header = lines[i].startsWith("|") ? cells(lines[i]) : [];
    if (header[0] !== "option" || !/^\|[\s|:-]+\|$/.test(lines[i + 1] ?? "")) continue;
    const defaultColumn = header.indexOf("default");
    for (i += 2; i < lines.length && lines[i].startsWith("|"); i++) {
      const row = cells(lines[i]);
      rows.push({
        where: `${file}: ${lines[i].trim().slice(0, 60)}`,
        usage: row[0],
        default: defaultColumn < 0 ? null : row[defaultColumn] ?? "",
      });
    }
  }
  return rows;
}

/** The options the README names in its "Without a default:" paragraph. */
export function optionsWithoutDefault(markdown: string): string[] {
  const para = prose(markdown).split(/\n\s*\n/).find((p) => p.startsWith("Without a default:"));
  if (!para) return [];
  return [...para.matchAll(/`(--[a-z][a-z-]*(?: [^`]+)?)`/g)].map((m) => m[1]);
}

let helpCache: Map<string, HelpOption> | null = null;

/** `main.ts --help`, run with the start task's flags and environment. */
async function help(): Promise<Map<string, HelpOption>> {
  if (helpCache) return helpCache;
  const out = await new Deno.Command(Deno.execPath(), {
    args: ["run", ...startTaskFlags(), `${ROOT}main.ts`, "--help"],
    env: startTaskEnv(),
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder().decode(out.stdout);
  assert.equal(out.code, 0, `main.ts --help failed: ${new TextDecoder().decode(out.stderr)}`);
  helpCache = parseHelp(text);
  assert.ok(helpCache.size > 10, `--help listed only ${helpCache.size} options:\n${text}`);
  return helpCache;
}

/** Checks option rows against `--help`; returns one line per mismatch. */
export function optionMismatches(rows: OptionRow[], options: Map<string, HelpOption>): string[] {
  const wrong: string[] = [];
  for (const row of rows) {
    const opt = options.get(row.usage.split(" ")[0]);
    if (!opt) {
      wrong.push(`${row.where}: ${row.usage} is not an option of --help`);
    } else if (opt.usage !== row.usage) {
      wrong.push(`${row.where}: written "${row.usage}", --help says "${opt.usage}"`);
    } else if (row.default !== null && row.default !== opt.default) {
      wrong.push(
        `${row.where}: default "${row.default}", --help says "${opt.default || "(none)"}"`,
      );
    }
  }
  return wrong;
}

Deno.test("every option in the README's and docs' options tables is in --help, with its default", async () => {
  const options = await help();
  const rows = [...documents()].flatMap(([file, text]) => optionRows(file, text));
  assert.ok(rows.some((r) => r.where.startsWith("README.md") && r.default !== null));
  assert.deepEqual(optionMismatches(rows, options), []);
});

Deno.test("the README's table and its 'Without a default' list hold every option of --help, once", async () => {
  const options = await help();
  const readme = Deno.readTextFileSync(`${ROOT}README.md`);
  const table = optionRows("README.md", readme).filter((r) => r.default !== null);
  const bare = optionsWithoutDefault(readme);
  const wrong = optionMismatches(
    bare.map((usage) => ({ where: "README.md: Without a default", usage, default: "" })),
    options,
  );
  assert.deepEqual(wrong, []);
  const named = [...table.map((r) => r.usage), ...bare].map((u) => u.split(" ")[0]);
  const missing = [...options.keys()].filter((name) => !named.includes(name));
  assert.deepEqual(
    missing,
    [],
    "options of --help the README does not show (add a row where the README's placeholder says)",
  );
  assert.deepEqual(named.filter((n, i) => named.indexOf(n) !== i), [], "options shown twice");
});

/**
 * Paths in backticks that name other projects' files (the peers the design
 * notes compare with), not this repository's.
 */
const FOREIGN = new Set([
  "AkihiroSuda/passt-mirror",
  "firecracker-microvm/firecracker",
  "resources/seccomp/x86_64-unknown-linux-musl.json",
  "qemu/qemu",
  "system/qemu-seccomp.c",
  "seccomp.sh",
  "isolation.c",
]);

/** A backtick span that names a repository path: relative, with a slash, path characters only. */
function isPathLike(span: string): boolean {
  return /^\.?[A-Za-z0-9_@-][A-Za-z0-9_.@-]*(\/[A-Za-z0-9_.@-]+)*\/?$/.test(span) &&
    span.includes("/") && !span.includes("..");
}

/** The repository paths a document names: backtick spans that look like paths, and link targets. */
export function namedPaths(file: string, markdown: string): string[] {
  const text = prose(markdown);
  const dir = file.includes("/") ? file.slice(0, file.lastIndexOf("/") + 1) : "";
  const paths: string[] = [];
  for (const m of text.matchAll(/`([^`\n]+)`/g)) {
    if (isPathLike(m[1]) && !FOREIGN.has(m[1]) && !m[1].startsWith(".cache/")) paths.push(m[1]);
  }
  for (const m of text.matchAll(/\]\(([^)\s]+)\)/g)) {
    if (/^[a-z]+:|^#/.test(m[1])) continue;
    const parts = `${dir}${m[1].split("#")[0]}`.split("/");
    const stack: string[] = [];
    for (const p of parts) {
      if (p === "..") stack.pop();
      else if (p !== ".") stack.push(p);
    }
    paths.push(stack.join("/"));
  }
  return paths;
}

function exists(path: string): boolean {
  try {
    Deno.statSync(`${ROOT}${path}`);
    return true;
  } catch {
    return false;
  }
}

/** A backtick span that names a file without its folder: `main.ts`, `results.md`, `vionet@.service`. */
export function namedFiles(markdown: string): string[] {
  return [
    ...prose(markdown).matchAll(
      /`([A-Za-z0-9_@-][A-Za-z0-9_.@-]*\.(?:ts|json|md|sh|c|svg|service|socket|lock))`/g,
    ),
  ]
    .map((m) => m[1])
    .filter((name) => !FOREIGN.has(name));
}

/** The names of every file in the repository, any folder (the guest cache and .git aside). */
function repositoryFileNames(): Set<string> {
  const names = new Set<string>();
  const walk = (dir: string) => {
    for (const e of Deno.readDirSync(`${ROOT}${dir}`)) {
      if ([".git", ".cache", "node_modules"].includes(e.name)) continue;
      if (e.isDirectory) walk(`${dir}${e.name}/`);
      else names.add(e.name);
    }
  };
  walk("");
  return names;
}

Deno.test("every repository path the README and docs name exists", () => {
  const missing: string[] = [];
  let count = 0;
  const names = repositoryFileNames();
  for (const [file, text] of documents()) {
    for (const path of namedPaths(file, text)) {
      count++;
      if (!exists(path)) missing.push(`${file}: ${path}`);
    }
    for (const name of namedFiles(text)) {
      if (!names.has(name)) missing.push(`${file}: ${name} (no file of that name)`);
    }
  }
  assert.ok(count > 20, `only ${count} paths found: the check would prove little`);
  assert.deepEqual(missing, []);
});

Deno.test("every `deno task` the README and docs name is a task in deno.json", () => {
  const tasks = Object.keys(JSON.parse(Deno.readTextFileSync(`${ROOT}deno.json`)).tasks);
  const unknown: string[] = [];
  for (const [file, text] of documents()) {
    for (const m of text.matchAll(/deno task ([A-Za-z0-9_:-]+)/g)) {
      if (!tasks.includes(m[1])) unknown.push(`${file}: deno task ${m[1]}`);
    }
  }
  assert.deepEqual(unknown, []);
});

Deno.test("the option check catches a wrong default, a wrong argument and an unknown option", () => {
  const options = parseHelp(
    "options:\n  --mtu N                    set the MTU\n" +
      "                             (default: the tap's MTU)\n" +
      "  --client                   connect\n",
  );
  const rows = (usage: string, def: string | null): OptionRow[] => [
    { where: "t", usage, default: def },
  ];
  assert.deepEqual(optionMismatches(rows("--mtu N", "the tap's MTU"), options), []);
  assert.deepEqual(optionMismatches(rows("--client", ""), options), []);
  assert.equal(optionMismatches(rows("--mtu N", "1500"), options).length, 1);
  assert.equal(optionMismatches(rows("--mtu BYTES", "the tap's MTU"), options).length, 1);
  assert.equal(optionMismatches(rows("--client", "off"), options).length, 1);
  assert.equal(optionMismatches(rows("--pcap FILE", null), options).length, 1);
  const table = "| option | default |\n| --- | --- |\n| `--offload auto\\|off` | `auto` |\n";
  assert.deepEqual(optionRows("x.md", table), [
    {
      where: "x.md: | `--offload auto\\|off` | `auto` |",
      usage: "--offload auto|off",
      default: "auto",
    },
  ]);
});
