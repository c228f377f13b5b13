/**
 * A misbehaving device for tests: answers hello, then sends the parent
 * whatever the test hands it (`rogue-send`), and reports every message the
 * parent sends back as a `log` line (JSON, bigints as "<n>n").
 */

const json = (v: unknown) => JSON.stringify(v, (_k, x) => typeof x === "bigint" ? `${x}n` : x);

self.onmessage = (e: MessageEvent) => {
  const m = e.data;
  if (m?.kind === "hello") {
    self.postMessage({ kind: "ready", version: m.version, features: 0n });
  } else if (m?.kind === "rogue-send") {
    for (const msg of m.messages) self.postMessage(msg);
  } else {
    self.postMessage({ kind: "log", level: "info", message: `got ${json(m)}` });
  }
};
