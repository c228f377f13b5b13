/**
 * Started by permissions_test.ts with the `start` task's own Deno flags:
 * creates a worker exactly as the daemon creates the device, runs the probe
 * in it, and prints the results as JSON.
 */
import { DEVICE_WORKER_OPTIONS } from "../../parent/control/device_host.ts";

const worker = new Worker(new URL("./permission_probe.ts", import.meta.url), DEVICE_WORKER_OPTIONS);
worker.onmessage = (e) => {
  console.log(JSON.stringify(e.data));
  worker.terminate();
};
worker.onerror = (e) => {
  console.error(`probe worker failed: ${e.message}`);
  Deno.exit(1);
};
worker.postMessage("go");
