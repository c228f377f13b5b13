/**
 * Runs inside a worker started with the device worker's exact options and
 * tries one operation of each permission kind; reports how each one failed.
 * Specifiers are built at run time so that the test runner does not fetch
 * them while building its module graph.
 */

const host = ["198", "18", "0", "1"].join(".");
const attempts: Record<string, () => unknown> = {
  read: () => Deno.readTextFileSync("/etc/hostname"),
  write: () => Deno.writeTextFileSync("/tmp/vionet-permission-probe", "x"),
  net: () => Deno.listen({ hostname: "127.0.0.1", port: 0 }),
  env: () => Deno.env.get("HOME"),
  run: () => new Deno.Command("true").outputSync(),
  ffi: () => Deno.dlopen("libc.so.6", { getpid: { parameters: [], result: "i32" } }),
  sys: () => Deno.hostname(),
  import: () => import(`https://${host}/never.js`),
  // npm: specifiers are resolved by the runtime, not the worker: the daemon's
  // --cached-only is what keeps them from reaching the registry.
  "import-npm": () => import(["npm", "left-pad@1.3.0"].join(":")),
};

self.onmessage = async () => {
  const results: Record<string, { query: string; request: string; attempt: string }> = {};
  for (const [name, attempt] of Object.entries(attempts)) {
    const perm = name.split("-")[0];
    const desc = { name: perm } as Deno.PermissionDescriptor;
    const query = (await Deno.permissions.query(desc)).state;
    const request = (await Deno.permissions.request(desc)).state;
    let outcome = "succeeded";
    try {
      await attempt();
    } catch (e) {
      outcome = `${(e as Error).name}: ${(e as Error).message.split("\n")[0]}`;
    }
    results[name] = { query, request, attempt: outcome };
  }
  self.postMessage(results);
};
