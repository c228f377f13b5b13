/**
 * A strict reader of the Prometheus text exposition format 0.0.4, for tests:
 * it refuses what a lenient scraper would let through, so that the daemon's
 * output is held to the format, not to what happens to parse.
 *
 * Checked: `\n` line ends and a final one; `# HELP` and `# TYPE` at most once
 * per family, TYPE before the family's first sample (and, here, required);
 * metric names `[a-zA-Z_:][a-zA-Z0-9_:]*`, label names
 * `[a-zA-Z_][a-zA-Z0-9_]*` not starting with `__`, no label twice in a
 * sample; label values quoted with only `\\`, `\"` and `\n` as escapes;
 * values as Go's ParseFloat reads them (`NaN`, `+Inf`, `-Inf` too), an
 * optional integer timestamp; a family's samples together; no series twice.
 * Optionally (`counterSuffix`), counters end in `_total` and are never
 * negative.
 *
 * @module
 */

/** One sample. */
export interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** One family: its type, help and samples. */
export interface Family {
  type: string;
  help: string | null;
  samples: Sample[];
}

/** What a scrape held. */
export interface Exposition {
  families: Map<string, Family>;
  /** Every sample by its series key (`name{a="1",b="2"}`, labels sorted). */
  series: Map<string, Sample>;
}

/** A line the format does not allow, with its number. */
export class ExpositionError extends Error {
  override name = "ExpositionError";
}

const METRIC_NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const LABEL_NAME = /^[a-zA-Z_][a-zA-Z0-9_]*$/;
const TYPES = new Set(["counter", "gauge", "histogram", "summary", "untyped"]);
const FLOAT = /^[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|Inf|inf|NaN)$/;

/** The series key of a sample: its name and its labels, sorted. */
export function seriesKey(name: string, labels: Record<string, string>): string {
  const parts = Object.keys(labels).sort().map((k) => `${k}=${JSON.stringify(labels[k])}`);
  return `${name}{${parts.join(",")}}`;
}

/** The family a sample name belongs to (histogram and summary samples carry suffixes). */
function familyOf(name: string, families: Map<string, Family>): string {
  if (families.has(name)) return name;
  for (const suffix of ["_bucket", "_sum", "_count"]) {
    if (name.endsWith(suffix)) {
      const base = name.slice(0, -suffix.length);
      const f = families.get(base);
      if (f && (f.type === "histogram" || f.type === "summary")) return base;
    }
  }
  return name;
}

/** A HELP text's escapes: only `\\` and `\n`. */
function unescapeHelp(text: string, where: string): string {
  let out = "";
  for (let i = 0; i < text.length; i++) {
    if (text[i] !== "\\") {
      out += text[i];
      continue;
    }
    const next = text[++i];
    if (next === "\\") out += "\\";
    else if (next === "n") out += "\n";
    else throw new ExpositionError(`${where}: a bad escape \\${next ?? ""} in HELP`);
  }
  return out;
}

function parseValue(text: string, where: string): number {
  if (!FLOAT.test(text)) throw new ExpositionError(`${where}: "${text}" is not a float`);
  if (/^[+-]?[Ii]nf$/.test(text)) return text.startsWith("-") ? -Infinity : Infinity;
  return text === "NaN" ? NaN : Number(text);
}

/** Reads `{a="x",b="y"}` from `line` at `at` (the `{`); returns the labels and the index after `}`. */
function parseLabels(
  line: string,
  at: number,
  where: string,
): [Record<string, string>, number] {
  const labels: Record<string, string> = {};
  let i = at + 1;
  const fail = (why: string): never => {
    throw new ExpositionError(`${where}: ${why} at column ${i + 1}`);
  };
  if (line[i] === "}") return [labels, i + 1];
  for (;;) {
    const nameEnd = line.indexOf("=", i);
    if (nameEnd < 0) fail("a label without =");
    const name = line.slice(i, nameEnd);
    if (!LABEL_NAME.test(name) || name.startsWith("__")) fail(`invalid label name "${name}"`);
    if (name in labels) fail(`label ${name} twice`);
    i = nameEnd + 1;
    if (line[i] !== '"') fail("a label value not in double quotes");
    i++;
    let value = "";
    for (;;) {
      if (i >= line.length) fail("an unterminated label value");
      const c = line[i];
      if (c === '"') break;
      if (c === "\\") {
        const next = line[i + 1];
        if (next === "\\") value += "\\";
        else if (next === '"') value += '"';
        else if (next === "n") value += "\n";
        else fail(`an escape \\${next ?? ""} the format does not have`);
        i += 2;
        continue;
      }
      value += c;
      i++;
    }
    labels[name] = value;
    i++;
    if (line[i] === "}") return [labels, i + 1];
    if (line[i] !== ",") fail("labels not separated by a comma");
    i++;
    if (line[i] === "}") return [labels, i + 1]; // a trailing comma is allowed
  }
}

/**
 * Parses `text` strictly (see the module comment).
 * @throws {ExpositionError} naming the first line the format does not allow.
 */
export function parseExposition(
  text: string,
  opts: { counterSuffix?: boolean; requireHelp?: boolean } = {},
): Exposition {
  if (text !== "" && !text.endsWith("\n")) {
    throw new ExpositionError("the exposition does not end with a line feed");
  }
  if (text.includes("\r")) throw new ExpositionError("a carriage return: lines end with \\n only");
  const families = new Map<string, Family>();
  const series = new Map<string, Sample>();
  const closed = new Set<string>();
  let current: string | null = null;
  const lines = text.split("\n").slice(0, -1);
  lines.forEach((line, n) => {
    const where = `line ${n + 1} (${line.slice(0, 80)})`;
    if (line.startsWith("#")) {
      const m = /^# (HELP|TYPE) (\S+)(?: (.*))?$/.exec(line);
      if (!m) return; // a comment
      const [, kind, name, rest = ""] = m;
      if (!METRIC_NAME.test(name)) throw new ExpositionError(`${where}: invalid name ${name}`);
      let f = families.get(name);
      if (f && f.samples.length > 0) {
        throw new ExpositionError(`${where}: ${kind} after the family's samples`);
      }
      if (!f) {
        f = { type: "", help: null, samples: [] };
        families.set(name, f);
      }
      if (kind === "HELP") {
        if (f.help !== null) throw new ExpositionError(`${where}: a second HELP for ${name}`);
        f.help = unescapeHelp(rest, where);
      } else {
        if (f.type !== "") throw new ExpositionError(`${where}: a second TYPE for ${name}`);
        if (!TYPES.has(rest)) throw new ExpositionError(`${where}: unknown type "${rest}"`);
        f.type = rest;
      }
      return;
    }
    if (line.trim() === "") throw new ExpositionError(`${where}: an empty line`);
    const nameMatch = /^[^{ ]+/.exec(line);
    const name = nameMatch?.[0] ?? "";
    if (!METRIC_NAME.test(name)) throw new ExpositionError(`${where}: invalid name "${name}"`);
    let at = name.length;
    let labels: Record<string, string> = {};
    if (line[at] === "{") [labels, at] = parseLabels(line, at, where);
    if (line[at] !== " ") throw new ExpositionError(`${where}: no space before the value`);
    const fields = line.slice(at + 1).split(" ");
    if (fields.length < 1 || fields.length > 2 || fields.some((f) => f === "")) {
      throw new ExpositionError(`${where}: expected a value and an optional timestamp`);
    }
    const value = parseValue(fields[0], where);
    if (fields.length === 2 && !/^-?\d+$/.test(fields[1])) {
      throw new ExpositionError(`${where}: the timestamp is not an integer`);
    }
    const familyName = familyOf(name, families);
    const f = families.get(familyName);
    if (!f || f.type === "") throw new ExpositionError(`${where}: no TYPE line before it`);
    if (opts.requireHelp && f.help === null) {
      throw new ExpositionError(`${where}: no HELP line before it`);
    }
    if (familyName !== current) {
      if (closed.has(familyName)) {
        throw new ExpositionError(`${where}: ${familyName}'s samples are not together`);
      }
      if (current !== null) closed.add(current);
      current = familyName;
    }
    if (opts.counterSuffix && f.type === "counter") {
      if (!name.endsWith("_total")) {
        throw new ExpositionError(`${where}: counter ${name} does not end in _total`);
      }
      if (!(value >= 0)) throw new ExpositionError(`${where}: counter ${name} is ${value}`);
    }
    const key = seriesKey(name, labels);
    if (series.has(key)) throw new ExpositionError(`${where}: series ${key} twice`);
    const sample = { name, labels, value };
    series.set(key, sample);
    f.samples.push(sample);
  });
  return { families, series };
}

/** The value of one series, or undefined. */
export function valueOf(
  e: Exposition,
  name: string,
  labels: Record<string, string> = {},
): number | undefined {
  return e.series.get(seriesKey(name, labels))?.value;
}
