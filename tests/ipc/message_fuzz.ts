/**
 * A seeded generator of random and mutated control messages, for fuzzing
 * both sides of the channel. Deterministic: the same seed, the same messages.
 */

/** xorshift32: small, fast, reproducible. */
export function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s / 2 ** 32;
  };
}

const WEIRD: unknown[] = [
  undefined,
  null,
  0,
  -1,
  1.5,
  NaN,
  Infinity,
  2 ** 53,
  -(2n ** 70n),
  2n ** 64n,
  0n,
  "",
  "x".repeat(10_000),
  "hello",
  true,
  [],
  [1, 2, 3],
  {},
  { kind: "hello" },
  new Uint8Array(4),
  new ArrayBuffer(8),
  new Date(0),
  new Map(),
];

/** Replaces, deletes or adds one field of `msg` (shallow or one level deep). */
export function mutate(msg: Record<string, unknown>, next: () => number): Record<string, unknown> {
  const out: Record<string, unknown> = structuredClone(msg);
  const keys = Object.keys(out);
  const pick = <T>(xs: readonly T[]) => xs[Math.floor(next() * xs.length)];
  switch (Math.floor(next() * 5)) {
    case 0:
      delete out[pick(keys)];
      break;
    case 1:
      out[pick(keys)] = pick(WEIRD);
      break;
    case 2:
      out[pick(["extra", "constructor", "toString", "id", "kind"])] = pick(WEIRD);
      break;
    case 3: {
      const k = pick(keys);
      const v = out[k];
      if (ArrayBuffer.isView(v) || v instanceof ArrayBuffer) {
        out[k] = pick(WEIRD);
      } else if (v && typeof v === "object" && !Array.isArray(v)) {
        const inner = v as Record<string, unknown>;
        const ik = pick(Object.keys(inner).length ? Object.keys(inner) : ["x"]);
        inner[ik] = pick(WEIRD);
      } else if (Array.isArray(v) && v.length) {
        v[Math.floor(next() * v.length)] = pick(WEIRD);
      } else {
        out[k] = pick(WEIRD);
      }
      break;
    }
    default:
      out.kind = pick(["", "HELLO", "tunscap ", "error", "ready", "done", "nope", 7]);
  }
  return out;
}

/** A message: sometimes junk, mostly a mutation of one of `valid`. */
export function fuzzMessage(valid: Record<string, unknown>[], next: () => number): unknown {
  if (next() < 0.1) return WEIRD[Math.floor(next() * WEIRD.length)];
  let m = valid[Math.floor(next() * valid.length)];
  const rounds = 1 + Math.floor(next() * 3);
  for (let i = 0; i < rounds; i++) m = mutate(m, next);
  return m;
}
