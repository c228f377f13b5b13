/**
 * vhost-user wire format: the request numbers and flags with the names QEMU's
 * `docs/interop/vhost-user.rst` gives them, and a codec that turns the bytes a
 * front-end sent into typed requests, or says exactly what was wrong.
 *
 * Trust: everything decoded here comes from the VMM (the front-end), which we
 * treat as untrusted. Validation runs in the order rust-vmm's `vhost` crate
 * uses, and the first failure is reported as a {@link ProtocolError}:
 *
 * 1. {@link decodeHeader}: size of the header, version 1, no reply flag,
 *    reserved flag bits clear, payload size bounded.
 * 2. {@link decodeRequest}: the request is known and supported, the payload
 *    has exactly the size that request takes, its fields are well formed
 *    (reserved bits clear, ring flags, region ranges), and it came with exactly
 *    as many file descriptors as that request may carry.
 *
 * Semantics (is a ring index in range, was a protocol feature negotiated) are
 * the handler's business (`vhost_user_backend.ts`). This module is pure: it
 * never closes a descriptor. The caller owns the fds it passes in and closes
 * them when decoding fails.
 *
 * All numbers are in the machine's native byte order (vhost-user.rst "Message
 * Specification"); vionet runs on little-endian x86-64 only.
 *
 * @module
 */

/** A front-end that broke the vhost-user protocol. The connection ends. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

// ---------------------------------------------------------------------------
// Header (vhost-user.rst "Header"): u32 request, u32 flags, u32 size.

/** Bytes in the header: request, flags, size. */
export const VHOST_USER_HDR_SIZE = 12;
/** flags bits 0-1: the protocol version. */
export const VHOST_USER_VERSION_MASK = 0x3;
/** The only protocol version there is. */
export const VHOST_USER_VERSION = 0x1;
/** flags bit 2: set on every reply from the back-end. */
export const VHOST_USER_REPLY_MASK = 0x1 << 2;
/** flags bit 3: the front-end asks for a REPLY_ACK. */
export const VHOST_USER_NEED_REPLY_MASK = 0x1 << 3;
/** flags bits 4-31 are reserved. */
export const VHOST_USER_RESERVED_FLAGS = ~(VHOST_USER_VERSION_MASK | VHOST_USER_REPLY_MASK |
  VHOST_USER_NEED_REPLY_MASK) >>> 0;

/**
 * Largest payload vionet accepts. Not a spec constant: rust-vmm bounds it at
 * 0x1000 too; the largest request vionet handles (SET_MEM_TABLE) is 264 bytes.
 */
export const VHOST_USER_MAX_PAYLOAD_SIZE = 0x1000;
/** Most descriptors one message may carry (QEMU's VHOST_MEMORY_BASELINE_NREGIONS). */
export const VHOST_USER_MAX_FDS = 8;
/** Most regions in one VHOST_USER_SET_MEM_TABLE. */
export const VHOST_MEMORY_BASELINE_NREGIONS = 8;

/** SET_VRING_KICK/CALL/ERR payload bits 0-7: the ring index. */
export const VHOST_USER_VRING_IDX_MASK = 0xffn;
/** ... bit 8: no descriptor comes with the message (poll instead). */
export const VHOST_USER_VRING_NOFD_MASK = 0x1n << 8n;

/** vring address flags: log used-ring writes (only with VHOST_F_LOG_ALL). */
export const VHOST_VRING_F_LOG = 0x1;
/** virtio feature bit for dirty logging during migration (vhost-user.rst "Migration"). */
export const VHOST_F_LOG_ALL = 1n << 26n;
/** vhost-user.rst "Migration": one log bit stands for a page of this many bytes. */
export const VHOST_LOG_PAGE = 0x1000;
/** virtio feature bit 30, reused by vhost-user for protocol-feature negotiation. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 1n << 30n;

// ---------------------------------------------------------------------------
// Protocol feature bits (vhost-user.rst "Protocol features"), as masks.

export const VHOST_USER_PROTOCOL_F_MQ = 1n << 0n;
export const VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1n << 1n;
export const VHOST_USER_PROTOCOL_F_RARP = 1n << 2n;
export const VHOST_USER_PROTOCOL_F_REPLY_ACK = 1n << 3n;
export const VHOST_USER_PROTOCOL_F_MTU = 1n << 4n;
export const VHOST_USER_PROTOCOL_F_BACKEND_REQ = 1n << 5n;
export const VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 1n << 6n;
export const VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 1n << 7n;
export const VHOST_USER_PROTOCOL_F_PAGEFAULT = 1n << 8n;
export const VHOST_USER_PROTOCOL_F_CONFIG = 1n << 9n;
export const VHOST_USER_PROTOCOL_F_BACKEND_SEND_FD = 1n << 10n;
export const VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 1n << 11n;
export const VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 1n << 12n;
export const VHOST_USER_PROTOCOL_F_RESET_DEVICE = 1n << 13n;
export const VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 1n << 14n;
export const VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 1n << 15n;
export const VHOST_USER_PROTOCOL_F_STATUS = 1n << 16n;
export const VHOST_USER_PROTOCOL_F_XEN_MMAP = 1n << 17n;
export const VHOST_USER_PROTOCOL_F_SHARED_OBJECT = 1n << 18n;
export const VHOST_USER_PROTOCOL_F_DEVICE_STATE = 1n << 19n;

// ---------------------------------------------------------------------------
// Front-end message types (vhost-user.rst "Front-end message types").

export const VHOST_USER_GET_FEATURES = 1;
export const VHOST_USER_SET_FEATURES = 2;
export const VHOST_USER_SET_OWNER = 3;
export const VHOST_USER_RESET_OWNER = 4;
export const VHOST_USER_SET_MEM_TABLE = 5;
export const VHOST_USER_SET_LOG_BASE = 6;
export const VHOST_USER_SET_LOG_FD = 7;
export const VHOST_USER_SET_VRING_NUM = 8;
export const VHOST_USER_SET_VRING_ADDR = 9;
export const VHOST_USER_SET_VRING_BASE = 10;
export const VHOST_USER_GET_VRING_BASE = 11;
export const VHOST_USER_SET_VRING_KICK = 12;
export const VHOST_USER_SET_VRING_CALL = 13;
export const VHOST_USER_SET_VRING_ERR = 14;
export const VHOST_USER_GET_PROTOCOL_FEATURES = 15;
export const VHOST_USER_SET_PROTOCOL_FEATURES = 16;
export const VHOST_USER_GET_QUEUE_NUM = 17;
export const VHOST_USER_SET_VRING_ENABLE = 18;
export const VHOST_USER_SEND_RARP = 19;
export const VHOST_USER_NET_SET_MTU = 20;
export const VHOST_USER_SET_BACKEND_REQ_FD = 21;
export const VHOST_USER_IOTLB_MSG = 22;
export const VHOST_USER_SET_VRING_ENDIAN = 23;
export const VHOST_USER_GET_CONFIG = 24;
export const VHOST_USER_SET_CONFIG = 25;
export const VHOST_USER_CREATE_CRYPTO_SESSION = 26;
export const VHOST_USER_CLOSE_CRYPTO_SESSION = 27;
export const VHOST_USER_POSTCOPY_ADVISE = 28;
export const VHOST_USER_POSTCOPY_LISTEN = 29;
export const VHOST_USER_POSTCOPY_END = 30;
export const VHOST_USER_GET_INFLIGHT_FD = 31;
export const VHOST_USER_SET_INFLIGHT_FD = 32;
export const VHOST_USER_GPU_SET_SOCKET = 33;
export const VHOST_USER_RESET_DEVICE = 34;
export const VHOST_USER_VRING_KICK = 35;
export const VHOST_USER_GET_MAX_MEM_SLOTS = 36;
export const VHOST_USER_ADD_MEM_REG = 37;
export const VHOST_USER_REM_MEM_REG = 38;
export const VHOST_USER_SET_STATUS = 39;
export const VHOST_USER_GET_STATUS = 40;
export const VHOST_USER_GET_SHARED_OBJECT = 41;
export const VHOST_USER_SET_DEVICE_STATE_FD = 42;
export const VHOST_USER_CHECK_DEVICE_STATE = 43;

/** Spec names of every front-end request, for messages and logs. */
const REQUEST_NAMES: readonly string[] = [
  "",
  "GET_FEATURES",
  "SET_FEATURES",
  "SET_OWNER",
  "RESET_OWNER",
  "SET_MEM_TABLE",
  "SET_LOG_BASE",
  "SET_LOG_FD",
  "SET_VRING_NUM",
  "SET_VRING_ADDR",
  "SET_VRING_BASE",
  "GET_VRING_BASE",
  "SET_VRING_KICK",
  "SET_VRING_CALL",
  "SET_VRING_ERR",
  "GET_PROTOCOL_FEATURES",
  "SET_PROTOCOL_FEATURES",
  "GET_QUEUE_NUM",
  "SET_VRING_ENABLE",
  "SEND_RARP",
  "NET_SET_MTU",
  "SET_BACKEND_REQ_FD",
  "IOTLB_MSG",
  "SET_VRING_ENDIAN",
  "GET_CONFIG",
  "SET_CONFIG",
  "CREATE_CRYPTO_SESSION",
  "CLOSE_CRYPTO_SESSION",
  "POSTCOPY_ADVISE",
  "POSTCOPY_LISTEN",
  "POSTCOPY_END",
  "GET_INFLIGHT_FD",
  "SET_INFLIGHT_FD",
  "GPU_SET_SOCKET",
  "RESET_DEVICE",
  "VRING_KICK",
  "GET_MAX_MEM_SLOTS",
  "ADD_MEM_REG",
  "REM_MEM_REG",
  "SET_STATUS",
  "GET_STATUS",
  "GET_SHARED_OBJECT",
  "SET_DEVICE_STATE_FD",
  "CHECK_DEVICE_STATE",
];

/** "VHOST_USER_SET_MEM_TABLE (5)"; unknown numbers as "request 99". */
export function requestName(request: number): string {
  const name = request > 0 && request < REQUEST_NAMES.length ? REQUEST_NAMES[request] : undefined;
  return name === undefined ? `request ${request}` : `VHOST_USER_${name} (${request})`;
}

// ---------------------------------------------------------------------------
// Payload layouts (vhost-user.rst "Payload"). Offsets are from the payload start.

/** u64. */
export const U64_SIZE = 8;
/** vring state description: u32 index, u32 num. */
export const VRING_STATE_SIZE = 8;
/** vring address description: u32 index, u32 flags, u64 descriptor, used, available, log. */
export const VRING_ADDR_SIZE = 40;
/** memory region description: u64 guest address, size, user address, mmap offset. */
export const MEMORY_REGION_SIZE = 32;
/** multiple memory regions description: u32 num regions, u32 padding, then regions. */
export const MEMORY_TABLE_HEADER_SIZE = 8;
/** single memory region description: u64 padding, then one region. */
export const SINGLE_MEMORY_REGION_SIZE = 8 + MEMORY_REGION_SIZE;
/** log description: u64 log size, u64 log offset. */
export const LOG_DESC_SIZE = 16;
/** MAC address bytes at the start of SEND_RARP's u64. */
export const MAC_BYTES = 6;

const U64_MAX = (1n << 64n) - 1n;

/** The header of one message. */
export interface VhostUserHeader {
  request: number;
  flags: number;
  /** Payload bytes that follow the header. */
  size: number;
}

/** One memory region as the front-end describes it (all fields u64). */
export interface MemoryRegionDesc {
  guestPhysAddr: bigint;
  size: bigint;
  userAddr: bigint;
  mmapOffset: bigint;
}

/** A log description (VHOST_USER_SET_LOG_BASE): where in the fd the bitmap lies. */
export interface LogDesc {
  /** Bytes of bitmap (one bit per VHOST_LOG_PAGE of guest-physical memory). */
  mmapSize: bigint;
  /** Where in the file the bitmap starts (the bit of guest address 0). */
  mmapOffset: bigint;
}

/** A vring address description (VHOST_USER_SET_VRING_ADDR). */
export interface VringAddr {
  index: number;
  flags: number;
  descUser: bigint;
  usedUser: bigint;
  availUser: bigint;
  logGuest: bigint;
}

/** The requests vionet's net back-end handles, each with its decoded payload. */
export interface RequestBodies {
  [VHOST_USER_GET_FEATURES]: Record<never, never>;
  [VHOST_USER_SET_FEATURES]: { value: bigint };
  [VHOST_USER_SET_OWNER]: Record<never, never>;
  [VHOST_USER_RESET_OWNER]: Record<never, never>;
  [VHOST_USER_SET_MEM_TABLE]: { regions: MemoryRegionDesc[] };
  [VHOST_USER_SET_LOG_BASE]: LogDesc;
  [VHOST_USER_SET_LOG_FD]: Record<never, never>;
  [VHOST_USER_SET_VRING_NUM]: { index: number; num: number };
  [VHOST_USER_SET_VRING_ADDR]: VringAddr;
  [VHOST_USER_SET_VRING_BASE]: { index: number; num: number };
  [VHOST_USER_GET_VRING_BASE]: { index: number; num: number };
  [VHOST_USER_SET_VRING_KICK]: { index: number; noFd: boolean };
  [VHOST_USER_SET_VRING_CALL]: { index: number; noFd: boolean };
  [VHOST_USER_SET_VRING_ERR]: { index: number; noFd: boolean };
  [VHOST_USER_GET_PROTOCOL_FEATURES]: Record<never, never>;
  [VHOST_USER_SET_PROTOCOL_FEATURES]: { value: bigint };
  [VHOST_USER_GET_QUEUE_NUM]: Record<never, never>;
  [VHOST_USER_SET_VRING_ENABLE]: { index: number; enable: boolean };
  [VHOST_USER_SEND_RARP]: { mac: Uint8Array };
  [VHOST_USER_RESET_DEVICE]: Record<never, never>;
  [VHOST_USER_GET_MAX_MEM_SLOTS]: Record<never, never>;
  [VHOST_USER_ADD_MEM_REG]: { region: MemoryRegionDesc };
  [VHOST_USER_REM_MEM_REG]: { region: MemoryRegionDesc };
}

/** A request number vionet handles. */
export type SupportedRequest = keyof RequestBodies;

/** A validated request of kind `R`: its payload, need_reply, and the fds that came with it. */
export interface RequestOf<R extends SupportedRequest> {
  request: R;
  /** The front-end set VHOST_USER_NEED_REPLY_MASK. */
  needReply: boolean;
  body: RequestBodies[R];
  /** The descriptors that came with the header, in order; the caller owns them. */
  fds: number[];
}

/** Any validated request. Switch on `request` to narrow `body`. */
export type VhostUserRequest = { [R in SupportedRequest]: RequestOf<R> }[SupportedRequest];

/** What a request's reply carries when the request has an explicit reply. */
export type ReplyKind = "none" | "u64" | "vring_state";

/** How many descriptors a request may carry. */
type FdRule =
  | "none"
  | "one"
  | "none_or_one"
  | "per_region"
  | "unless_nofd";

interface RequestSpec<R extends SupportedRequest> {
  /** Exact payload size, or "mem_table" (8 + 32 × num regions). */
  size: number | "mem_table";
  fds: FdRule;
  reply: ReplyKind;
  /** Reads and checks the payload; the size has been checked already. */
  decode(v: DataView): RequestBodies[R];
}

const noBody = (): Record<never, never> => ({});

/** The handler-independent half of the table: payload shape, descriptors, reply. */
const SPECS: { [R in SupportedRequest]: RequestSpec<R> } = {
  [VHOST_USER_GET_FEATURES]: { size: 0, fds: "none", reply: "u64", decode: noBody },
  [VHOST_USER_SET_FEATURES]: { size: U64_SIZE, fds: "none", reply: "none", decode: readU64Body },
  [VHOST_USER_SET_OWNER]: { size: 0, fds: "none", reply: "none", decode: noBody },
  [VHOST_USER_RESET_OWNER]: { size: 0, fds: "none", reply: "none", decode: noBody },
  [VHOST_USER_SET_MEM_TABLE]: {
    size: "mem_table",
    fds: "per_region",
    reply: "none",
    decode: readMemTable,
  },
  [VHOST_USER_SET_LOG_BASE]: {
    size: LOG_DESC_SIZE,
    // vhost-user.rst SET_LOG_BASE: the log fd comes "when the back-end has
    // VHOST_USER_PROTOCOL_F_LOG_SHMFD", the only way vionet takes a log; and
    // with that feature the request "require[s] replies" ("Communication").
    fds: "one",
    reply: "u64",
    decode(v) {
      const log = { mmapSize: v.getBigUint64(0, true), mmapOffset: v.getBigUint64(8, true) };
      if (log.mmapSize === 0n) throw new ProtocolError("log size is 0");
      if (log.mmapOffset + log.mmapSize > U64_MAX) {
        throw new ProtocolError(
          `log offset 0x${log.mmapOffset.toString(16)} + size 0x${
            log.mmapSize.toString(16)
          } wraps past 2^64`,
        );
      }
      return log;
    },
  },
  // vhost-user.rst SET_LOG_FD: "request payload: N/A"; an eventfd vionet has no use for.
  [VHOST_USER_SET_LOG_FD]: { size: 0, fds: "one", reply: "none", decode: noBody },
  [VHOST_USER_SET_VRING_NUM]: {
    size: VRING_STATE_SIZE,
    fds: "none",
    reply: "none",
    decode: readVringState,
  },
  [VHOST_USER_SET_VRING_ADDR]: {
    size: VRING_ADDR_SIZE,
    fds: "none",
    reply: "none",
    decode: readVringAddr,
  },
  [VHOST_USER_SET_VRING_BASE]: {
    size: VRING_STATE_SIZE,
    fds: "none",
    reply: "none",
    decode: readVringState,
  },
  [VHOST_USER_GET_VRING_BASE]: {
    size: VRING_STATE_SIZE,
    fds: "none",
    reply: "vring_state",
    decode(v) {
      const s = readVringState(v);
      // vhost-user.rst GET_VRING_BASE: "The request payload's num field is
      // currently reserved and must be set to 0." That binds the sender; the
      // field is ignored here, as reserved fields are: DPDK 22.11's
      // virtio-user sends it uninitialised when it resets the device.
      return { index: s.index, num: 0 };
    },
  },
  [VHOST_USER_SET_VRING_KICK]: {
    size: U64_SIZE,
    fds: "unless_nofd",
    reply: "none",
    decode: readVringFd,
  },
  [VHOST_USER_SET_VRING_CALL]: {
    size: U64_SIZE,
    fds: "unless_nofd",
    reply: "none",
    decode: readVringFd,
  },
  [VHOST_USER_SET_VRING_ERR]: {
    size: U64_SIZE,
    fds: "unless_nofd",
    reply: "none",
    decode: readVringFd,
  },
  [VHOST_USER_GET_PROTOCOL_FEATURES]: { size: 0, fds: "none", reply: "u64", decode: noBody },
  [VHOST_USER_SET_PROTOCOL_FEATURES]: {
    size: U64_SIZE,
    fds: "none",
    reply: "none",
    decode: readU64Body,
  },
  [VHOST_USER_GET_QUEUE_NUM]: { size: 0, fds: "none", reply: "u64", decode: noBody },
  [VHOST_USER_SET_VRING_ENABLE]: {
    size: VRING_STATE_SIZE,
    fds: "none",
    reply: "none",
    decode(v) {
      const s = readVringState(v);
      // vhost-user.rst SET_VRING_ENABLE: num is 1 to enable, 0 to disable.
      if (s.num > 1) {
        throw new ProtocolError(`num is ${s.num}, must be 0 or 1`);
      }
      return { index: s.index, enable: s.num === 1 };
    },
  },
  [VHOST_USER_SEND_RARP]: {
    size: U64_SIZE,
    fds: "none",
    reply: "none",
    // vhost-user.rst SEND_RARP: "The first 6 bytes of the payload contain the mac address".
    decode: (v) => ({
      mac: new Uint8Array(v.buffer.slice(v.byteOffset, v.byteOffset + MAC_BYTES)),
    }),
  },
  [VHOST_USER_RESET_DEVICE]: { size: 0, fds: "none", reply: "none", decode: noBody },
  [VHOST_USER_GET_MAX_MEM_SLOTS]: { size: 0, fds: "none", reply: "u64", decode: noBody },
  [VHOST_USER_ADD_MEM_REG]: {
    size: SINGLE_MEMORY_REGION_SIZE,
    fds: "one",
    reply: "none",
    decode: (v) => ({ region: readRegion(v, 8, "region") }),
  },
  [VHOST_USER_REM_MEM_REG]: {
    size: SINGLE_MEMORY_REGION_SIZE,
    // vhost-user.rst REM_MEM_REG: "the back-end MAY accept messages with one
    // file descriptor. If a file descriptor is passed, the back-end MUST close
    // it without using it otherwise."
    fds: "none_or_one",
    reply: "none",
    decode: (v) => ({ region: readRegion(v, 8, "region", false) }),
  },
};

/** True for the requests vionet handles. */
export function isSupportedRequest(request: number): request is SupportedRequest {
  return Object.hasOwn(SPECS, request);
}

/** The explicit reply a request always gets (besides a REPLY_ACK). */
export function replyKind(request: SupportedRequest): ReplyKind {
  return SPECS[request].reply;
}

// ---------------------------------------------------------------------------
// Stage 1: the header.

/**
 * Decodes and checks a request header (vhost-user.rst "Header").
 * @throws ProtocolError naming the first bad field.
 */
export function decodeHeader(bytes: Uint8Array): VhostUserHeader {
  if (bytes.byteLength < VHOST_USER_HDR_SIZE) {
    throw new ProtocolError(
      `Header is ${bytes.byteLength} bytes, needs ${VHOST_USER_HDR_SIZE}`,
    );
  }
  const v = new DataView(bytes.buffer, bytes.byteOffset, VHOST_USER_HDR_SIZE);
  const header = {
    request: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    size: v.getUint32(8, true),
  };
  const name = requestName(header.request);
  const version = header.flags & VHOST_USER_VERSION_MASK;
  if (version !== VHOST_USER_VERSION) {
    throw new ProtocolError(`${name}: version ${version} in flags, only 1 exists`);
  }
  if ((header.flags & VHOST_USER_REPLY_MASK) !== 0) {
    throw new ProtocolError(`${name}: a request has the reply flag set`);
  }
  if ((header.flags & VHOST_USER_RESERVED_FLAGS) !== 0) {
    throw new ProtocolError(
      `${name}: reserved flag bits set (flags 0x${header.flags.toString(16)})`,
    );
  }
  if (header.size > VHOST_USER_MAX_PAYLOAD_SIZE) {
    throw new ProtocolError(
      `${name}: payload size ${header.size} exceeds ${VHOST_USER_MAX_PAYLOAD_SIZE}`,
    );
  }
  return header;
}

// ---------------------------------------------------------------------------
// Stage 2: the payload and the descriptors.

/**
 * Validates a request's payload and descriptor count against what that
 * request takes, and decodes it.
 *
 * @param header from {@link decodeHeader}.
 * @param payload exactly `header.size` bytes.
 * @param fds the descriptors that came with the header; not closed here.
 * @throws ProtocolError for an unknown or unsupported request, a payload of
 *   the wrong size or shape, or the wrong number of descriptors.
 */
export function decodeRequest(
  header: VhostUserHeader,
  payload: Uint8Array,
  fds: readonly number[],
): VhostUserRequest {
  const name = requestName(header.request);
  if (!isSupportedRequest(header.request)) {
    throw new ProtocolError(
      header.request > 0 && header.request < REQUEST_NAMES.length
        ? `${name} is not supported by this back-end`
        : `Unknown ${name}`,
    );
  }
  if (payload.byteLength !== header.size) {
    throw new ProtocolError(
      `${name}: payload is ${payload.byteLength} bytes, header says ${header.size}`,
    );
  }
  const spec = SPECS[header.request] as RequestSpec<SupportedRequest>;
  const v = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  let expected: number;
  if (spec.size === "mem_table") {
    if (header.size < MEMORY_TABLE_HEADER_SIZE) {
      throw new ProtocolError(
        `${name}: payload is ${header.size} bytes, shorter than the ${MEMORY_TABLE_HEADER_SIZE}-byte table header`,
      );
    }
    const n = v.getUint32(0, true);
    if (n === 0 || n > VHOST_MEMORY_BASELINE_NREGIONS) {
      throw new ProtocolError(
        `${name}: ${n} regions, must be 1 to ${VHOST_MEMORY_BASELINE_NREGIONS}`,
      );
    }
    expected = MEMORY_TABLE_HEADER_SIZE + n * MEMORY_REGION_SIZE;
  } else {
    expected = spec.size;
  }
  if (header.size !== expected) {
    throw new ProtocolError(`${name}: payload is ${header.size} bytes, must be ${expected}`);
  }
  let body: RequestBodies[SupportedRequest];
  try {
    body = spec.decode(v);
  } catch (e) {
    if (e instanceof ProtocolError) throw new ProtocolError(`${name}: ${e.message}`);
    throw e;
  }
  checkFdCount(name, spec.fds, body, fds.length);
  return {
    request: header.request,
    needReply: (header.flags & VHOST_USER_NEED_REPLY_MASK) !== 0,
    body,
    fds: [...fds],
  } as VhostUserRequest;
}

function checkFdCount(
  name: string,
  rule: FdRule,
  body: RequestBodies[SupportedRequest],
  count: number,
): void {
  let allowed: number[];
  switch (rule) {
    case "none":
      allowed = [0];
      break;
    case "one":
      allowed = [1];
      break;
    case "none_or_one":
      allowed = [0, 1];
      break;
    case "per_region":
      // vhost-user.rst SET_MEM_TABLE: "The size and ordering of the fds
      // matches the number and ordering of memory regions."
      allowed = [(body as RequestBodies[typeof VHOST_USER_SET_MEM_TABLE]).regions.length];
      break;
    case "unless_nofd":
      // vhost-user.rst SET_VRING_KICK: bit 8 "is set when there is no file
      // descriptor in the ancillary data".
      allowed = [(body as { noFd: boolean }).noFd ? 0 : 1];
      break;
    default: {
      const never: never = rule;
      throw new Error(`unhandled fd rule ${never}`);
    }
  }
  if (!allowed.includes(count)) {
    throw new ProtocolError(
      `${name}: came with ${count} file descriptor${count === 1 ? "" : "s"}, takes ${
        allowed.join(" or ")
      }`,
    );
  }
}

function readU64Body(v: DataView): { value: bigint } {
  return { value: v.getBigUint64(0, true) };
}

function readVringState(v: DataView): { index: number; num: number } {
  return { index: v.getUint32(0, true), num: v.getUint32(4, true) };
}

function readVringAddr(v: DataView): VringAddr {
  const addr = {
    index: v.getUint32(0, true),
    flags: v.getUint32(4, true),
    descUser: v.getBigUint64(8, true),
    usedUser: v.getBigUint64(16, true),
    availUser: v.getBigUint64(24, true),
    logGuest: v.getBigUint64(32, true),
  };
  // vhost-user.rst "Migration": VHOST_VRING_F_LOG is the only ring flag.
  if ((addr.flags & ~VHOST_VRING_F_LOG) !== 0) {
    throw new ProtocolError(
      `unknown vring address flags 0x${addr.flags.toString(16)} (only VHOST_VRING_F_LOG exists)`,
    );
  }
  return addr;
}

function readVringFd(v: DataView): { index: number; noFd: boolean } {
  const value = v.getBigUint64(0, true);
  // vhost-user.rst SET_VRING_KICK/CALL/ERR: bits 0-7 index, bit 8 no-fd; the
  // rest are not defined, so a front-end that sets them is not speaking our protocol.
  if ((value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)) !== 0n) {
    throw new ProtocolError(`payload 0x${value.toString(16)} sets bits above bit 8`);
  }
  return {
    index: Number(value & VHOST_USER_VRING_IDX_MASK),
    noFd: (value & VHOST_USER_VRING_NOFD_MASK) !== 0n,
  };
}

function readMemTable(v: DataView): { regions: MemoryRegionDesc[] } {
  const n = v.getUint32(0, true);
  const regions: MemoryRegionDesc[] = [];
  for (let i = 0; i < n; i++) {
    regions.push(
      readRegion(v, MEMORY_TABLE_HEADER_SIZE + i * MEMORY_REGION_SIZE, `region ${i}`),
    );
  }
  const overlap = findOverlap(regions);
  if (overlap !== null) {
    const [a, b] = overlap;
    throw new ProtocolError(
      `region ${a} and region ${b} overlap in guest physical addresses (${
        describeRegion(regions[a])
      }, ${describeRegion(regions[b])})`,
    );
  }
  return { regions };
}

/**
 * One memory region description (vhost-user.rst "Memory region description").
 * `checkOffset` is false for REM_MEM_REG, whose mmap offset is ignored.
 */
function readRegion(v: DataView, at: number, what: string, checkOffset = true): MemoryRegionDesc {
  const r = {
    guestPhysAddr: v.getBigUint64(at, true),
    size: v.getBigUint64(at + 8, true),
    userAddr: v.getBigUint64(at + 16, true),
    mmapOffset: v.getBigUint64(at + 24, true),
  };
  if (r.size === 0n) throw new ProtocolError(`${what}: size is 0`);
  if (r.guestPhysAddr + r.size - 1n > U64_MAX) {
    throw new ProtocolError(`${what}: guest address range ${describeRegion(r)} wraps past 2^64`);
  }
  if (r.userAddr + r.size - 1n > U64_MAX) {
    throw new ProtocolError(
      `${what}: user address 0x${r.userAddr.toString(16)} + size 0x${
        r.size.toString(16)
      } wraps past 2^64`,
    );
  }
  if (checkOffset && r.mmapOffset + r.size > U64_MAX) {
    throw new ProtocolError(
      `${what}: mmap offset 0x${r.mmapOffset.toString(16)} + size 0x${
        r.size.toString(16)
      } wraps past 2^64`,
    );
  }
  return r;
}

/** Indices of the first two regions whose guest-physical ranges overlap, or null. */
export function findOverlap(regions: readonly MemoryRegionDesc[]): [number, number] | null {
  for (let a = 0; a < regions.length; a++) {
    for (let b = a + 1; b < regions.length; b++) {
      if (rangesOverlap(regions[a], regions[b])) return [a, b];
    }
  }
  return null;
}

/** True when two regions share a guest-physical byte. */
export function rangesOverlap(a: MemoryRegionDesc, b: MemoryRegionDesc): boolean {
  return a.guestPhysAddr < b.guestPhysAddr + b.size && b.guestPhysAddr < a.guestPhysAddr + a.size;
}

/** "GPA 0x0..0x10000000" for messages. */
export function describeRegion(r: MemoryRegionDesc): string {
  return `GPA 0x${r.guestPhysAddr.toString(16)}..0x${(r.guestPhysAddr + r.size).toString(16)}`;
}

/**
 * The check that keeps a mapping from raising SIGBUS: the region's bytes
 * [mmapOffset, mmapOffset + size) must lie inside the file the descriptor
 * names. (DPDK 22.11 maps unchecked and dies on first touch.)
 * @throws ProtocolError when the region runs past the end of the file.
 */
export function checkRegionWithinFile(
  r: MemoryRegionDesc,
  fileSize: bigint,
  what = "region",
): void {
  if (r.mmapOffset + r.size > fileSize) {
    throw new ProtocolError(
      `${what} (${describeRegion(r)}): mmap offset 0x${r.mmapOffset.toString(16)} + size 0x${
        r.size.toString(16)
      } runs past the end of its file (0x${fileSize.toString(16)} bytes)`,
    );
  }
}

// ---------------------------------------------------------------------------
// Encoding the back-end's replies. (What a front-end sends, the tests encode:
// tests/parent/control/vhost_user_encode.ts.)

/** Header plus payload in one buffer, ready for sendmsg. */
export function encodeMessage(
  request: number,
  flags: number,
  payload: Uint8Array = new Uint8Array(0),
): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(VHOST_USER_HDR_SIZE + payload.byteLength);
  const v = new DataView(out.buffer);
  v.setUint32(0, request, true);
  v.setUint32(4, flags >>> 0, true);
  v.setUint32(8, payload.byteLength, true);
  out.set(payload, VHOST_USER_HDR_SIZE);
  return out;
}

/** A back-end reply to `request` (version 1, reply flag). */
export function encodeReply(request: number, payload: Uint8Array): Uint8Array<ArrayBuffer> {
  return encodeMessage(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload);
}

/** u64 payload. */
export function encodeU64(value: bigint): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(U64_SIZE);
  new DataView(out.buffer).setBigUint64(0, value, true);
  return out;
}

/** vring state payload: index, num. */
export function encodeVringState(index: number, num: number): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(VRING_STATE_SIZE);
  const v = new DataView(out.buffer);
  v.setUint32(0, index, true);
  v.setUint32(4, num, true);
  return out;
}
