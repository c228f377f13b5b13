/**
 * Loads the real device worker module inside a worker started with the
 * device's options, then reports what of the global scope it left: the
 * device must not be able to start a worker of its own.
 */

await import("../../device/worker.ts");
self.postMessage({
  kind: "globals-probe",
  worker: typeof (globalThis as { Worker?: unknown }).Worker,
});
