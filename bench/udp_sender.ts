/**
 * Sends UDP datagrams to an address, for the footprint bench's receive
 * direction (frames the tap hands to vionet for the guest). Run inside the
 * bench's network namespace:
 *
 * ```
 * deno run -A bench/udp_sender.ts HOST PORT RATE [PAYLOAD]
 * ```
 *
 * RATE: datagrams per second, or 0 for as fast as the socket takes them.
 * Runs until killed.
 *
 * @module
 */

import dgram from "node:dgram";

function whole(text: string | undefined, what: string): number {
  const n = Number(text);
  if (text === undefined || !/^[0-9]+$/.test(text) || !Number.isSafeInteger(n)) {
    console.error(`udp_sender: ${what} must be a whole number, not ${JSON.stringify(text)}`);
    Deno.exit(2);
  }
  return n;
}

const [host, portText, rateText, payloadText] = Deno.args;
if (host === undefined) {
  console.error("usage: udp_sender.ts HOST PORT RATE [PAYLOAD]");
  Deno.exit(2);
}
const port = whole(portText, "PORT");
const rate = whole(rateText, "RATE");
const payload = new Uint8Array(payloadText === undefined ? 18 : whole(payloadText, "PAYLOAD"));
const socket = dgram.createSocket("udp4");
// Errors (ENOBUFS when the tap's queue is full) only mean this datagram was not sent.
socket.on("error", () => {});

/** Sends `n` datagrams and resolves once the socket took them. */
function burst(n: number): Promise<void> {
  let left = n;
  return new Promise((resolve) => {
    for (let i = 0; i < n; i++) {
      socket.send(payload, port, host, () => {
        if (--left === 0) resolve();
      });
    }
  });
}

if (rate === 0) {
  for (;;) await burst(64);
} else {
  // Ticks of 10 ms, each sending what the rate owes since the start.
  const t0 = performance.now();
  let sent = 0;
  for (;;) {
    const owed = Math.floor((performance.now() - t0) / 1000 * rate) - sent;
    if (owed > 0) {
      await burst(owed);
      sent += owed;
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}
