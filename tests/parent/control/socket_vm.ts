/**
 * A VM that attaches to a real daemon over its vhost-user socket: this
 * module plays QEMU (the requests, with the guest's memfd and the kick and
 * call eventfds in SCM_RIGHTS) and the guest's driver (split rings in that
 * memfd, `tests/device/driver.ts`). Unlike `frontend_rig.ts`, the back-end
 * is another process (`deno task start`), so what is measured or checked is
 * the daemon as an operator runs it: the footprint bench and the
 * no-growth test attach, move frames and detach a thousand times with it.
 *
 * One guest memory (a memfd, mapped here once) serves every attachment; each
 * {@link SocketVm.attach} lays fresh rings in it, as a rebooted guest would.
 *
 * @module
 */

import * as libc from "../../../parent/host/libc.ts";
import { VIONET_PROTOCOL_FEATURES } from "../../../parent/control/vhost_user_backend.ts";
import {
  encodeU64,
  encodeVringState,
  VHOST_USER_F_PROTOCOL_FEATURES,
  VHOST_USER_GET_FEATURES,
  VHOST_USER_GET_PROTOCOL_FEATURES,
  VHOST_USER_SET_FEATURES,
  VHOST_USER_SET_MEM_TABLE,
  VHOST_USER_SET_OWNER,
  VHOST_USER_SET_PROTOCOL_FEATURES,
  VHOST_USER_SET_VRING_ADDR,
  VHOST_USER_SET_VRING_BASE,
  VHOST_USER_SET_VRING_CALL,
  VHOST_USER_SET_VRING_ENABLE,
  VHOST_USER_SET_VRING_KICK,
  VHOST_USER_SET_VRING_NUM,
} from "../../../parent/control/vhost_user_messages.ts";
import { RX_QUEUE, TX_QUEUE } from "../../../ipc/datapath.ts";
import { VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF } from "../../../ipc/features.ts";
import { TestDriver, TestGuest } from "../../device/driver.ts";
import { buildFrame } from "../../device/frames.ts";
import { encodeMemTable, encodeVringAddr, encodeVringFd } from "./vhost_user_encode.ts";
import { TestFrontend } from "./vhost_user_frontend.ts";
// One guest's addresses and memory size for every rig (guest memory: one region at GPA 0).
import { GUEST_BYTES, GUEST_IP, GUEST_MAC, HOST_IP } from "./frontend_rig.ts";

/** The guest's MAC and address, and the address the host side of the tap should have: the rig's. */
export { GUEST_IP as VM_IP, GUEST_MAC as VM_MAC, HOST_IP as VM_HOST_IP };
/** The user address QEMU would give GPA 0. */
const USER_BASE = 0x7f00_0000_0000;
/** The virtio-net header before each frame (VERSION_1: 12 bytes). */
const HDR = 12;
const RX_BUFFER_BYTES = 2048;
const QUEUE_SIZE = 256;

/** The ring pair of one attachment. */
interface Rings {
  rx: TestDriver;
  tx: TestDriver;
}

/** One guest (its memory and eventfds), attached to a daemon's socket again and again. */
export class SocketVm {
  readonly #memFd: number;
  readonly #memPtr: Deno.PointerObject;
  readonly #buffer: ArrayBuffer;
  /** Kick and call eventfds, by queue (RX_QUEUE, TX_QUEUE). */
  readonly kick: [number, number];
  readonly call: [number, number];
  #vmm: TestFrontend | null = null;
  #rings: Rings | null = null;
  /** Frames sent and received over this VM's life, every attachment together. */
  sent = 0;
  received = 0;

  constructor(readonly socketPath: string, readonly tapMac: readonly number[]) {
    this.#memFd = libc.memfdCreate("vionet-socket-vm", libc.MFD_CLOEXEC);
    libc.ftruncate(this.#memFd, GUEST_BYTES);
    this.#memPtr = libc.mmap(
      GUEST_BYTES,
      libc.PROT_READ | libc.PROT_WRITE,
      libc.MAP_SHARED,
      this.#memFd,
    );
    this.#buffer = Deno.UnsafePointerView.getArrayBuffer(this.#memPtr, GUEST_BYTES);
    const ev = () => libc.eventfd(0, libc.EFD_NONBLOCK | libc.EFD_CLOEXEC);
    this.kick = [ev(), ev()];
    this.call = [ev(), ev()];
  }

  get attached(): boolean {
    return this.#vmm !== null;
  }

  /**
   * Connects and does what QEMU does when a guest's driver comes up: the
   * features, the memory table, both rings, then enables them; then posts
   * `rxBuffers` receive buffers. Waits for the daemon's answer to a last
   * GET_FEATURES, so every request before it was handled.
   */
  async attach(rxBuffers = 128): Promise<void> {
    if (this.#vmm !== null) throw new Error("socket VM: attach while attached");
    const guest = new TestGuest([{ gpa: 0, size: GUEST_BYTES, buffer: this.#buffer }]);
    const features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MRG_RXBUF;
    const rings: Rings = {
      rx: new TestDriver(guest, { size: QUEUE_SIZE, features }),
      tx: new TestDriver(guest, { size: QUEUE_SIZE, features }),
    };
    for (const fd of [...this.kick, ...this.call]) drain(fd);
    const vmm = TestFrontend.connect(this.socketPath);
    try {
      const offered = await vmm.requestU64(VHOST_USER_GET_FEATURES);
      const want = features | VHOST_USER_F_PROTOCOL_FEATURES;
      if ((offered & want) !== want) {
        throw new Error(`socket VM: the daemon offers features 0x${offered.toString(16)}`);
      }
      const protocol = await vmm.requestU64(VHOST_USER_GET_PROTOCOL_FEATURES);
      await vmm.send(
        VHOST_USER_SET_PROTOCOL_FEATURES,
        encodeU64(protocol & VIONET_PROTOCOL_FEATURES),
      );
      await vmm.send(VHOST_USER_SET_OWNER);
      await vmm.send(VHOST_USER_SET_FEATURES, encodeU64(want));
      await vmm.send(
        VHOST_USER_SET_MEM_TABLE,
        encodeMemTable([{
          guestPhysAddr: 0n,
          size: BigInt(GUEST_BYTES),
          userAddr: BigInt(USER_BASE),
          mmapOffset: 0n,
        }]),
        { fds: [this.#memFd] },
      );
      for (const q of [RX_QUEUE, TX_QUEUE]) {
        const d = q === RX_QUEUE ? rings.rx : rings.tx;
        const c = d.config("user");
        await vmm.send(VHOST_USER_SET_VRING_NUM, encodeVringState(q, d.size));
        await vmm.send(VHOST_USER_SET_VRING_BASE, encodeVringState(q, 0));
        await vmm.send(
          VHOST_USER_SET_VRING_ADDR,
          encodeVringAddr({
            index: q,
            flags: 0,
            descUser: BigInt(c.desc),
            usedUser: BigInt(c.used),
            availUser: BigInt(c.avail),
            logGuest: BigInt(d.usedGpa),
          }),
        );
        await vmm.send(VHOST_USER_SET_VRING_CALL, encodeVringFd(q, false), {
          fds: [this.call[q]],
        });
        await vmm.send(VHOST_USER_SET_VRING_KICK, encodeVringFd(q, false), {
          fds: [this.kick[q]],
        });
      }
      for (const q of [RX_QUEUE, TX_QUEUE]) {
        await vmm.send(VHOST_USER_SET_VRING_ENABLE, encodeVringState(q, 1));
      }
      await vmm.requestU64(VHOST_USER_GET_FEATURES);
    } catch (e) {
      vmm.close();
      throw e;
    }
    this.#vmm = vmm;
    this.#rings = rings;
    this.postRx(rxBuffers);
  }

  /** Posts up to `n` receive buffers (as many as the ring has room for) and kicks. */
  postRx(n: number): void {
    const rx = this.#attachedRings().rx;
    for (let i = 0; i < n; i++) {
      if (rx.post([{ len: RX_BUFFER_BYTES, writable: true }]) < 0) break;
    }
    libc.eventfdSignal(this.kick[RX_QUEUE]);
  }

  /**
   * Queues up to `n` UDP frames of `payloadBytes` from the guest to the
   * tap's address (port 9, discard) and kicks; returns how many fit.
   */
  sendUdp(n: number, payloadBytes = 18): number {
    const tx = this.#attachedRings().tx;
    const { frame } = buildFrame({
      srcMac: [...GUEST_MAC],
      dstMac: [...this.tapMac],
      src: [198, 18, 0, 2],
      dst: [198, 18, 0, 1],
      l4: "udp",
      srcPort: 40000,
      dstPort: 9,
      payload: new Uint8Array(payloadBytes),
    });
    const data = new Uint8Array(HDR + frame.length);
    data.set(frame, HDR);
    let queued = 0;
    for (; queued < n; queued++) {
      if (tx.post([{ data }]) < 0) break;
    }
    if (queued > 0) libc.eventfdSignal(this.kick[TX_QUEUE]);
    return queued;
  }

  /**
   * Takes what the daemon finished: TX chains sent, RX buffers filled (each
   * posted again). Returns the counts this call saw.
   */
  reap(): { sent: number; received: number } {
    const { rx, tx } = this.#attachedRings();
    const sent = tx.readUsed().length;
    const received = rx.readUsed().length;
    if (received > 0) this.postRx(received);
    this.sent += sent;
    this.received += received;
    return { sent, received };
  }

  /** Chains the guest has posted on TX that the daemon has not finished. */
  get txInFlight(): number {
    return this.#attachedRings().tx.posted.size;
  }

  /**
   * Sends `frames` frames and waits until the daemon has sent them all and
   * at least `minReceived` frames arrived (something in the namespace must
   * be sending to {@link VM_IP}); throws naming what was missing after `ms`.
   */
  async exchange(frames: number, minReceived: number, ms = 10_000): Promise<void> {
    const sent0 = this.sent, received0 = this.received;
    let queued = 0;
    const end = Date.now() + ms;
    while (this.sent - sent0 < frames || this.received - received0 < minReceived) {
      if (queued < frames) queued += this.sendUdp(frames - queued);
      this.reap();
      if (Date.now() > end) {
        throw new Error(
          `socket VM: after ${ms} ms the daemon sent ${this.sent - sent0} of ${frames} frames ` +
            `and delivered ${this.received - received0} (wanted ${minReceived})`,
        );
      }
      await libc.pollOneAsync(this.call[TX_QUEUE], libc.POLLIN, 5);
      drain(this.call[TX_QUEUE]);
      drain(this.call[RX_QUEUE]);
    }
  }

  /**
   * Ends the attachment. `graceful`: as QEMU stopping a guest (GET_VRING_BASE
   * of each ring, then the socket closed); otherwise the socket just closes,
   * as when QEMU is killed.
   */
  async detach(graceful: boolean): Promise<void> {
    const vmm = this.#vmm;
    if (vmm === null) return;
    this.#vmm = null;
    this.#rings = null;
    try {
      if (graceful) {
        for (const q of [RX_QUEUE, TX_QUEUE]) await vmm.getVringBase(q);
      }
    } finally {
      vmm.close();
    }
  }

  #attachedRings(): Rings {
    if (this.#rings === null) throw new Error("socket VM: not attached");
    return this.#rings;
  }

  /** Detaches (abruptly) and releases the memory and descriptors. */
  close(): void {
    this.#vmm?.close();
    this.#vmm = null;
    libc.munmap(this.#memPtr, GUEST_BYTES);
    for (const fd of [this.#memFd, ...this.kick, ...this.call]) libc.closeQuietly(fd);
  }
}

/** Empties an eventfd (non-blocking). */
function drain(fd: number): void {
  const buf = new Uint8Array(8);
  try {
    libc.read(fd, buf);
  } catch (e) {
    if (!(e instanceof libc.SyscallError && e.errno === libc.Errno.EAGAIN)) throw e;
  }
}
