/**
 * systemd socket activation (sd_listen_fds(3)): a supervisor that made the
 * listening socket itself (a `vionet@.socket` unit, `systemd-socket-activate`)
 * passes it as descriptor 3 and says so in the environment:
 *
 * - `LISTEN_PID`: the process the descriptors are for. Anything else means
 *   they were meant for a parent of ours (a shell, `deno task`) and are
 *   ignored, as sd_listen_fds ignores them.
 * - `LISTEN_FDS`: how many descriptors, from `SD_LISTEN_FDS_START` (3) on.
 * - `LISTEN_FDNAMES` (optional): their names, colon-separated
 *   (`FileDescriptorName=` in the socket unit).
 *
 * The daemon then serves the passed socket as it serves `--fd N`. With more
 * than one descriptor, the one named `vhost-user` is served; without such a
 * name that is ambiguous and an error. The variables are removed from the
 * environment once read (as `sd_listen_fds(1)` does), so nothing started
 * later could take them for its own.
 *
 * Only parsing here: the caller checks that the descriptor is a stream socket
 * (`VhostUserServer.fromFd`), and nothing is opened.
 *
 * @module
 */

/** The first descriptor a supervisor passes (sd-daemon.h `SD_LISTEN_FDS_START`). */
export const SD_LISTEN_FDS_START = 3;

/** The `FileDescriptorName=` that picks the vhost-user socket among several. */
export const VHOST_USER_FD_NAME = "vhost-user";

/** The environment variables of socket activation. */
export const LISTEN_ENV = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"] as const;

/** The part of the environment socket activation reads. */
export type ListenEnv = Partial<Record<typeof LISTEN_ENV[number], string>>;

/** A socket the supervisor passed, and what it was called. */
export interface PassedSocket {
  fd: number;
  /** Its name from LISTEN_FDNAMES, or null when none was given. */
  name: string | null;
  /** How many descriptors were passed in all. */
  count: number;
}

/** The environment says the descriptors are ours, but not which one to serve, or not sanely. */
export class ListenFdsError extends Error {
  override name = "ListenFdsError";
}

/**
 * The socket that `env` passes to process `pid`, or null when the variables
 * are absent or meant for another process.
 * @throws {ListenFdsError} when they are for us but malformed or ambiguous.
 */
export function passedSocket(env: ListenEnv, pid: number): PassedSocket | null {
  if (env.LISTEN_FDS === undefined || env.LISTEN_PID === undefined) return null;
  if (!/^\d{1,10}$/.test(env.LISTEN_PID)) {
    throw new ListenFdsError(`LISTEN_PID "${env.LISTEN_PID}" is not a process id`);
  }
  if (Number(env.LISTEN_PID) !== pid) return null;
  if (!/^\d{1,4}$/.test(env.LISTEN_FDS) || Number(env.LISTEN_FDS) === 0) {
    throw new ListenFdsError(
      `LISTEN_FDS "${env.LISTEN_FDS}" is not a number of descriptors (1 or more)`,
    );
  }
  const count = Number(env.LISTEN_FDS);
  const names = env.LISTEN_FDNAMES === undefined ? null : env.LISTEN_FDNAMES.split(":");
  if (names !== null && names.length !== count) {
    throw new ListenFdsError(
      `LISTEN_FDNAMES names ${names.length} descriptors, LISTEN_FDS passes ${count}`,
    );
  }
  if (count === 1) return { fd: SD_LISTEN_FDS_START, name: names?.[0] ?? null, count };
  const at = names?.indexOf(VHOST_USER_FD_NAME) ?? -1;
  if (at < 0) {
    throw new ListenFdsError(
      `the supervisor passed ${count} sockets` +
        (names ? ` (${names.join(", ")})` : "") +
        `; name the vhost-user one with FileDescriptorName=${VHOST_USER_FD_NAME}`,
    );
  }
  return { fd: SD_LISTEN_FDS_START + at, name: VHOST_USER_FD_NAME, count };
}
