/**
 * The data path between the zero-permission device worker and the parent's
 * two privileged I/O workers: shared-memory layouts, record formats and
 * event bits. No code here makes a system call.
 *
 * Theory of operation
 *
 * Three threads share five SPSC rings (`ipc/spsc_ring.ts`) and one control
 * block, all in SharedArrayBuffers:
 *
 *   device (no permissions)  walks the virtqueues in guest memory, validates
 *                            every chain and header, and turns them into
 *                            records: "write this frame", "read into these
 *                            buffers". It never makes a system call.
 *   writer (FFI)             waits on the control block; `writev`s each TX
 *                            record to the tap straight from guest memory,
 *                            then publishes the TX used index the device
 *                            prepared and signals the TX call eventfd when
 *                            the driver asked for it; writes the RX call
 *                            eventfd when the device asks, and wakes the
 *                            poller.
 *   poller (FFI)             blocks in `epoll_wait` on the tap, the kick
 *                            eventfds and its own wake eventfd; reads frames
 *                            from the tap straight into the guest buffers the
 *                            device posted and completes them (RX
 *                            publication); turns kicks into device events.
 *
 *   TX:  guest kick ─▶ poller ─EV_KICK_TX─▶ device ─tx ring─▶ writer ─writev─▶ tap
 *        writer, after the writes: used->idx, TX interrupt, releases the records
 *        (EV_TX_DONE ─▶ device only when it asked: ring or bounce arena full)
 *   RX:  device posts chains ─rx-post ring─▶ poller ─readv from tap─▶ guest buffers
 *        the poller writes num_buffers, the used ring, used->idx and the RX
 *        interrupt itself; RX_PUBLISHED records tell the device later which
 *        chains to retire. A chain the device cannot use (bad descriptors,
 *        shorter than the header, too fragmented) is posted as a discard
 *        record, which the poller completes with length 0, in post order.
 *   IRQ: TX: the writer decides and writes it itself (below); RX: the poller.
 *
 * TX completion without a round trip: when the device turns a chain into
 * records it already writes the chain's used element (id, len 0) into the
 * used ring, past used->idx where the driver does not look yet, and puts in
 * the record the used->idx value that makes it visible (TX_REC.USED_IDX).
 * The writer stores that value into used->idx once the kernel has taken the
 * frame, reads the driver's used_event (or NO_INTERRUPT flag) after it and
 * writes the TX call eventfd if the driver asked, then releases the record.
 * So a transmitted frame costs no wake-up of the device after the write
 * (two fewer thread hand-offs per kick). Chains the device drops ride on the
 * next record, or on a completion-only record (TXF_COMPLETE_ONLY). While the
 * queue runs only the writer stores TX used->idx; the device publishes it
 * again only at stop, after the writer ended. Where used->idx and used_event
 * live the writer learns from the parent (`txUsed` in its init), not from the
 * device; a subverted device can only choose the index values, which it could
 * write into the used ring itself anyway. The ring's tail still says which
 * records are done: the device reaps it whenever it runs, and asks the writer
 * for EV_TX_DONE (CTL.TX_WANT_DONE) only when it waits for ring or bounce
 * space.
 *
 * RX publication, the same idea for received frames: the poller, which
 * read the frame, completes it without waking anyone, and it is the only
 * writer of the RX used ring while the queues run (the device's Virtqueue
 * throws if asked to write it). The parent gives the poller the RX used
 * ring's place and the RX call eventfd (`rxUsed` in its init); the device
 * sets CTL.RX_TAKES (what the guest accepts in a header) and seeds
 * CTL.RX_USED_IDX before it posts a chain. Per frame the poller
 * checks the tap's header against RX_TAKES (clears DATA_VALID for a guest
 * without GUEST_CSUM; drops, keeping the chains, a header the guest cannot
 * take, which TUNSCAP keeps the tap from writing), writes num_buffers and
 * one used element per chain (id = the record's token); per batch it pushes
 * the RX_PUBLISHED record, then stores used->idx (and CTL.RX_USED_IDX),
 * then decides the interrupt. The device retires published chains from
 * those records every time it reads avail->idx (`Virtqueue.onAvailIdx`):
 * the record is visible before used->idx, and the driver can offer a head
 * again only after it saw used->idx, so the device never meets a re-offered
 * head it still counts in flight. It is woken for the records only every
 * 128 chains (or for any other record). At stop it takes RX_USED_IDX back.
 *
 * Trust: each I/O worker treats records as hostile (the device parses guest
 * memory and could be subverted). It copies a record out of shared memory
 * before looking at it, checks every iovec against the regions it was told
 * are guest memory or the bounce arena, and only then makes the system call
 * from its private copy. The device, in turn, treats rx-done records as
 * untrusted counts and checks them against what it posted.
 *
 * Wake-ups are batched: a side sets event bits with `Atomics.or`, then bumps
 * the peer's doorbell and notifies it only if the peer announced that it
 * sleeps (the same Dekker pattern as the rings). The poller cannot see
 * Atomics while blocked in `epoll_wait`; whoever needs it awake asks the writer
 * (WEV_WAKE_POLLER) or, from the parent, writes its wake eventfd.
 *
 * @module
 */

import { VIRTIO_NET_HDR_SIZE } from "./virtio_net_hdr.ts";

/** Queue indices of a single-pair virtio-net device (virtio 1.2 §5.1.2). */
export const RX_QUEUE = 0;
export const TX_QUEUE = 1;

/** Longest frame the tap may hand us or take: a 64 KiB GSO frame plus Ethernet and VLAN. */
export const MAX_FRAME_BYTES = 65_550;
/** The virtio 1.0 net header, which the tap reads and writes (TUNSETVNETHDRSZ 12). */
export const NET_HDR_BYTES = VIRTIO_NET_HDR_SIZE;

// ---------------------------------------------------------------------------
// The control block: an Int32Array over a SharedArrayBuffer.

/** Word indices of the control block. Each pair that two threads touch sits on its own line. */
export const CTL = {
  /** Bumped by the I/O side when `DEVICE_EVENTS` gained bits; the device waits on it. */
  DEVICE_DOORBELL: 0,
  /** EV_* bits for the device; set with Atomics.or, taken with Atomics.exchange(0). */
  DEVICE_EVENTS: 1,
  /** 1 while the device is about to wait or waiting on its doorbell. */
  DEVICE_SLEEPING: 2,
  /** Messages the parent posted to the device worker since start-queues (`device/mailbox.ts`). */
  DEVICE_MAIL: 3,
  /** Times the device woke from a wait on its doorbell (written by the device only). */
  DEVICE_WAKES: 4,
  /** Bumped by the device when `WRITER_EVENTS` gained bits; the writer waits on it. */
  WRITER_DOORBELL: 32,
  /** WEV_* bits for the writer. */
  WRITER_EVENTS: 33,
  /** 1 while the writer is about to wait or waiting. */
  WRITER_SLEEPING: 34,
  /** 1 while the poller has no posted RX buffers and so does not poll the tap. */
  POLLER_STARVED: 64,
  /** Frames the poller dropped because the guest had posted no buffer (tap queue overflow aside). */
  POLLER_NO_BUFFER: 65,
  /** Frames the poller dropped because they were larger than the posted buffers. */
  POLLER_TOO_BIG: 66,
  /** Records an I/O worker refused because an iovec was outside the granted regions. */
  IO_BAD_RECORD: 67,
  /** writev errors (the kernel refused a frame: bad header, no carrier, ...). */
  WRITER_ERRORS: 68,
  /** readv errors other than EAGAIN. */
  POLLER_ERRORS: 69,
  /** The writer's engine once it runs: {@link WRITER_ENGINE_IO_URING} or {@link WRITER_ENGINE_WRITEV}. */
  WRITER_ENGINE: 70,
  /** TX call eventfd writes, after publishing TX completions (the writer or the poller). */
  TX_INTERRUPTS: 71,
  /** The poller's engine once it runs: {@link POLLER_ENGINE_IO_URING} or {@link POLLER_ENGINE_READV}. */
  POLLER_ENGINE: 72,
  /** Posted chains the poller gave back unfilled (rx-done RX_UNUSED). */
  POLLER_UNUSED: 73,
  /** io_uring_enter calls the poller made for batches of reads. */
  POLLER_BATCHES: 74,
  /** Times the writer woke the poller for the device (WEV_WAKE_POLLER: RX buffers after starving). */
  POLLER_WAKE_ASKED: 75,
  /** Times the poller found no posted RX buffer and stopped polling the tap. */
  POLLER_STARVATIONS: 76,
  /**
   * Discard records the device posted (monotonic): the poller looks for
   * them in the rx-post ring only when this moved.
   */
  RX_DISCARDS: 77,
  /** What the guest takes in an RX header, RXT_* bits; set by the device before it posts. */
  RX_TAKES: 78,
  /**
   * RX used->idx: seeded by the device at start; the poller stores here
   * every value it stores in the ring, and the device takes it back at stop.
   */
  RX_USED_IDX: 79,
  /** RX call eventfd writes, after the poller published RX completions. */
  RX_INTERRUPTS: 80,
  /** Guest kicks (available buffer notifications) the poller read, per queue. */
  RX_KICKS: 81,
  TX_KICKS: 82,
  /**
   * 1: the poller read a TX kick and waits (on POLLER_DOORBELL) for the
   * device's answer, to write the TX records itself instead of the writer
   * (one thread fewer woken per kick). Cleared by whoever answers.
   */
  POLLER_AWAITS_TX: 83,
  /** Bumped by the device when it answers POLLER_AWAITS_TX; the poller waits on it. */
  POLLER_DOORBELL: 84,
  /** Batches of TX records the poller wrote (the writer wrote the rest). */
  POLLER_TX_BATCHES: 85,
  /**
   * 1: the device found the RX queue broken (needs-reset): the poller reads
   * and completes nothing more on it (virtio 1.2 §2.1.2: a device that needs
   * a reset does not go on using the queue).
   */
  RX_STOPPED: 86,
  /** 1: the device waits for TX ring or bounce space; the writer raises EV_TX_DONE after its next release and clears it. */
  TX_WANT_DONE: 96,
  /**
   * IO_ENDED_* bits: each I/O worker sets its own when its loop has ended
   * (nothing more of it touches guest memory or the rings), and notifies;
   * a device told to stop while the parent ends the workers waits on it.
   */
  IO_ENDED: 112,
  /**
   * 1: the device has quiesced (nothing taken is left unwritten, nothing new
   * is taken); a writer told to stop with `untilTxClosed` runs until then.
   */
  TX_CLOSED: 113,
  /**
   * Set by the parent just before it posts an overlapped `stop-queues`
   * (`ipc/protocol.ts`): how long the device waits for the I/O workers'
   * ends (ms). The device's loop starts the stop when it sees it, without
   * waiting for its event loop to deliver the message (that took 0.7-3 ms
   * of a migration's downtime); the message, when it comes, gets the same
   * answer.
   */
  STOP_ASKED: 114,
  /**
   * 1: the device has stopped both queues and put their bases in
   * STOP_BASES (then it notifies). The parent may answer the front-end from
   * these words without waiting for the device's reply to arrive, but only
   * once its I/O workers said, in their own mailboxes, that their loops
   * ended: a device can write these words (and IO_ENDED) at any time.
   */
  STOPPED: 115,
  /** The stopped queues' last_avail_idx: RX in bits 0-15, TX in bits 16-31. */
  STOP_BASES: 116,
} as const;
/** Bits of CTL.IO_ENDED. */
export const IO_ENDED_POLLER = 1;
export const IO_ENDED_WRITER = 2;
export const IO_ENDED_BOTH = IO_ENDED_POLLER | IO_ENDED_WRITER;
export const WRITER_ENGINE_IO_URING = 1;
export const WRITER_ENGINE_WRITEV = 2;
export const POLLER_ENGINE_IO_URING = 1;
export const POLLER_ENGINE_READV = 2;
export const CTL_WORDS = 128;
export const CTL_BYTES = CTL_WORDS * 4;

/** Device events (bits of CTL.DEVICE_EVENTS). */
export const EV_KICK_RX = 1 << 0;
export const EV_KICK_TX = 1 << 1;
/** The writer released TX records (tail moved); raised only when CTL.TX_WANT_DONE asked for it. */
export const EV_TX_DONE = 1 << 2;
/** The poller published rx-done records. */
export const EV_RX_DONE = 1 << 3;
/** An I/O worker refused a record (see CTL.IO_BAD_RECORD); the device should reset the queue. */
export const EV_IO_FAULT = 1 << 4;
/** The poller ran out of RX buffers (room for a largest frame): post what the guest offers, or ask for its kick. */
export const EV_RX_STARVED = 1 << 5;

/** Writer events (bits of CTL.WRITER_EVENTS). */
export const WEV_TX = 1 << 0;
/** Write the poller's wake eventfd (new RX buffers after starvation). (Bits 1, 2: unused.) */
export const WEV_WAKE_POLLER = 1 << 3;

// ---------------------------------------------------------------------------
// Records. An iovec is four u32 words, exactly Linux x86-64 `struct iovec`:
// [base low, base high, length, 0]. `base` is a host virtual address inside a
// guest-memory mapping or the bounce arena.

export const IOVEC_WORDS = 4;

/**
 * TX ring record (device → writer): one frame.
 *   word 0  iovCount   number of iovecs that follow the header (1..TX_MAX_IOV)
 *   word 1  frameLen   sum of the iovec lengths (without the net header)
 *   word 2  token      the device's own sequence number, echoed nowhere; for debugging
 *   word 3  flags      0, or TXF_COMPLETE_ONLY: no frame (iovCount and frameLen 0),
 *                      only USED_IDX to publish
 *   words 4..6         the 12-byte virtio_net_hdr the kernel is to see (validated by the device)
 *   word 7  usedIdx    the TX used->idx (u16) to publish once this record is done
 *   words 8..          iovCount iovecs
 */
export const TX_REC = {
  IOV_COUNT: 0,
  FRAME_LEN: 1,
  TOKEN: 2,
  FLAGS: 3,
  HDR: 4,
  USED_IDX: 7,
  IOV: 8,
} as const;
/** A TX record that carries no frame, only completions (chains the device dropped). */
export const TXF_COMPLETE_ONLY = 1 << 0;
export const TX_MAX_IOV = 64;
export const TX_RECORD_WORDS = TX_REC.IOV + TX_MAX_IOV * IOVEC_WORDS;

/**
 * RX-post ring record (device → poller): one descriptor chain the guest made
 * available for receiving, all of it device-writable.
 *   word 0  iovCount   1..RX_MAX_IOV (RXF_LONG: up to RX_LONG_MAX_IOV; RXF_DISCARD: 0)
 *   word 1  capacity   sum of the iovec lengths (>= 1; RXF_DISCARD: 0)
 *   word 2  token      the chain's head index (its used element's id)
 *   word 3  flags      RXF_* below
 *   words 4..          iovCount iovecs (none with RXF_LONG or RXF_DISCARD)
 */
export const RX_POST = { IOV_COUNT: 0, CAPACITY: 1, TOKEN: 2, FLAGS: 3, IOV: 4 } as const;
export const RX_MAX_IOV = 32;
export const RX_POST_RECORD_WORDS = RX_POST.IOV + RX_MAX_IOV * IOVEC_WORDS;
/** The device negotiated MRG_RXBUF: a frame may fill several consecutive chains. */
export const RXF_MERGEABLE = 1 << 0;
/**
 * A chain the device cannot use (virtio 1.2 §2.7.4 bad descriptors, shorter
 * than the net header, more segments than a read takes): the poller
 * completes it with used length 0 when it comes to the front, in post order
 * with the others, so RX used->idx only ever moves forward.
 */
export const RXF_DISCARD = 1 << 1;
/**
 * A chain of more than RX_MAX_IOV segments (virtio 1.2 §2.7.4: the device
 * must not assume a layout; a driver may spread even the net header over
 * one-byte buffers): its iovecs are the next record of the rx-long ring.
 */
export const RXF_LONG = 1 << 2;

/**
 * The rx-long ring (device → poller): the iovecs of each RXF_LONG chain, one
 * record per chain, in the order of their rx-post records; released with
 * them. readv takes UIO_MAXIOV (1024) iovecs and the poller adds one for
 * overflow, so a chain may have up to RX_LONG_MAX_IOV segments.
 */
export const RX_LONG_MAX_IOV = 1023;
export const RX_LONG_RECORD_WORDS = RX_LONG_MAX_IOV * IOVEC_WORDS;
export const RX_LONG_RING_RECORDS = 16;

/**
 * RX-done ring record (poller → device): frames completed, a frame dropped,
 * or chains given back unfilled.
 *   word 0  chains   how many posted chains (from the front, in order) it consumed; 0 for a drop
 *   word 1  bytes    RX_PUBLISHED: the frames' bytes without net headers; a drop: the frame's
 *   word 2  status   RX_PUBLISHED, RX_UNUSED, or RX_STATUS_* (a drop, or a refused post)
 *   word 3  RX_PUBLISHED: the frames in those chains; else 0
 */
export const RX_DONE = { CHAINS: 0, BYTES: 1, STATUS: 2, FRAMES: 3 } as const;
export const RX_DONE_RECORD_WORDS = 4;
/** A frame longer than the chains it would fill: dropped, no chain consumed (chains 0). */
export const RX_STATUS_TOO_BIG = 1;
/** The poller refused a posted chain (bad iovec count, capacity or region); chains 1, bytes 0. */
export const RX_STATUS_BAD_POST = 2;
/**
 * `chains` (>= 1) posted chains come back unfilled, bytes = 0: in a batch of
 * reads one found no frame (or one too big for its chain) while a later one
 * found a frame, or they stood before a discard record. The device posts
 * them again at the back; the guest sees nothing (without
 * VIRTIO_F_IN_ORDER buffers are used in any order, virtio 1.2 §2.7.9).
 */
export const RX_UNUSED = 3;
/**
 * The poller completed `chains` (>= 1) posted chains, in post order (used
 * elements, num_buffers, used->idx, interrupt), discards among them;
 * `bytes` is the sum of the frames' lengths without the net header and word
 * 3 their number. The device only retires the chains and counts.
 */
export const RX_PUBLISHED = 4;
/** A frame whose tap header the guest cannot take as it is (RX_TAKES): dropped, chains 0. */
export const RX_STATUS_BAD_HEADER = 5;

/**
 * RX_TAKES bits: what the guest accepts in a net header as the tap wrote it
 * (virtio 1.2 §5.1.6.4). Bit `gso_type` (1 TCPV4, 3 UDP, 4 TCPV6, 5 UDP_L4)
 * for each GSO type it negotiated (GUEST_TSO4, GUEST_UFO, GUEST_TSO6,
 * GUEST_USO4/6); RXT_ECN with GUEST_ECN; RXT_CSUM with GUEST_CSUM (flags
 * NEEDS_CSUM and DATA_VALID); RXT_MERGEABLE with MRG_RXBUF (num_buffers).
 */
export const RXT_ECN = 1 << 8;
export const RXT_CSUM = 1 << 9;
export const RXT_MERGEABLE = 1 << 10;

/**
 * RX buffer top-ups without kicks (QEMU's virtio-net does the same): while
 * the poller holds plenty of posted chains the device does not ask the
 * driver for RX kicks, and relies on being woken by the I/O side instead:
 * under RX publication the poller wakes it every `rxSignalChains(size)`
 * published chains (otherwise after every batch), and always when it runs
 * out of room (CTL.POLLER_STARVED). "Plenty" is twice that many, so a top-up
 * comes while the poller still holds half of them.
 */
export function rxSignalChains(queueSize: number): number {
  return Math.max(1, Math.min(128, queueSize >> 2));
}

/** Ring capacities (records). Powers of two (RX_LONG_RING_RECORDS above). */
export const TX_RING_RECORDS = 256;
export const RX_POST_RING_RECORDS = 1024;
export const RX_DONE_RING_RECORDS = 1024;

/** The bounce arena: frames the device had to build itself (software csum and segmentation). */
export const BOUNCE_BYTES = 8 << 20;

/** Everything the three threads share, as transferable-by-sharing buffers. */
export interface DatapathBuffers {
  control: SharedArrayBuffer;
  tx: SharedArrayBuffer;
  rxPost: SharedArrayBuffer;
  rxLong: SharedArrayBuffer;
  rxDone: SharedArrayBuffer;
  bounce: SharedArrayBuffer;
}

/** Sets `bits` in `word` and wakes the thread waiting on `doorbell` if it announced sleep. */
export function signal(
  ctl: Int32Array,
  eventsWord: number,
  bits: number,
  doorbellWord: number,
  sleepingWord: number,
): void {
  Atomics.or(ctl, eventsWord, bits);
  Atomics.add(ctl, doorbellWord, 1);
  if (Atomics.load(ctl, sleepingWord) !== 0) Atomics.notify(ctl, doorbellWord);
}
