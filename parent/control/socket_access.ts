/**
 * Who may connect to the vhost-user socket vionet listens on: its group and
 * mode (`--socket-group`, `--socket-mode`), and a directory the group can
 * pass through to reach it.
 *
 * Why it matters: libvirt runs QEMU as an unprivileged user (Debian:
 * `libvirt-qemu`, in groups `kvm` and `libvirt-qemu`). Connecting to a unix
 * socket takes write permission on the socket and search (x) permission on
 * every directory above it, so a socket that only root may use, or one in a
 * directory only root may enter, fails such a VM at start.
 *
 * Policy:
 * - the socket: mode `--socket-mode`, else 0660 with a group and 0600
 *   without; group `--socket-group`, else root's. Set after bind(2) and
 *   before listen(2): until listen nobody can connect, so no front-end ever
 *   reaches the socket with other permissions.
 * - its directory, when vionet creates it, and vionet's default directory
 *   (`<runtime dir>/vionet`) at every start: 0700, plus r-x for the group
 *   (0750, group `--socket-group`) when the socket's mode lets the group in,
 *   plus r-x for others (0755) when it lets everyone in. The group can reach
 *   the socket; nobody else can even list the directory.
 * - a directory the operator made is left as it is; vionet warns when it,
 *   or one above it, keeps the socket's group (or, for a mode that lets
 *   everyone in, others) out.
 *
 * @module
 */

import * as libc from "../host/libc.ts";
import type { Logger } from "./log.ts";

/** The socket's permissions as resolved at start. */
export interface SocketAccess {
  /** Permission bits of the socket file. */
  mode: number;
  /** Its group, or null to leave it root's. */
  gid: number | null;
  /** The group as the operator named it (for messages), or null. */
  group: string | null;
}

/** The default socket mode: the owner only, or owner and group when a group is given. */
export function defaultSocketMode(group: string | null): number {
  return group === null ? 0o600 : 0o660;
}

/**
 * Resolves `--socket-group` (a name through NSS, or a number) and the mode.
 * @throws Error naming the group when there is no such group.
 */
export function resolveSocketAccess(group: string | null, mode: number | null): SocketAccess {
  let gid: number | null = null;
  if (group !== null) {
    gid = /^\d+$/.test(group) ? Number(group) : libc.groupId(group);
    if (gid === null) {
      throw new Error(`--socket-group ${group}: no such group (see getent group)`);
    }
  }
  return { mode: mode ?? defaultSocketMode(group), gid, group };
}

/** The mode of a directory that lets in whoever the socket's `mode` lets in (see the module comment). */
export function socketDirMode(mode: number): number {
  return 0o700 | ((mode & 0o060) !== 0 ? 0o050 : 0) | ((mode & 0o006) !== 0 ? 0o005 : 0);
}

function modeText(mode: number): string {
  return `0${(mode & 0o7777).toString(8)}`;
}

/**
 * Makes the socket's directory `dir`: the directories it creates, and `dir`
 * itself when `own` (vionet's default directory), get {@link socketDirMode}
 * and the socket's group. Warns when a directory above the socket that
 * vionet did not set (the operator's, `/run/user/0`, ...) keeps out whom the
 * socket's mode lets in: its group, or with a mode for everyone, others.
 * Returns the directories it set (created, and `dir` when `own`): vionet's,
 * to hand to the user the daemon becomes.
 */
export function prepareSocketDir(
  dir: string,
  access: SocketAccess,
  own: boolean,
  logger: Logger,
): string[] {
  const mode = socketDirMode(access.mode);
  const created = libc.mkdirs(dir, mode);
  const set = own && !created.includes(dir) ? [...created, dir] : created;
  for (const d of set) {
    if (access.gid !== null) libc.lchgrp(d, access.gid);
    libc.chmod(d, mode);
  }
  const blocking = firstBlocking(dir, access, new Set(set));
  if (blocking === null) return set;
  const fix = !blocking.group
    ? `chmod o+x ${blocking.path}`
    : blocking.gid === access.gid
    ? `chmod g+x ${blocking.path}`
    : `chgrp ${access.group} ${blocking.path} and chmod g+x, or chmod o+x`;
  logger.log(
    "warn",
    "parent",
    `the socket's directory ${blocking.path} (mode ${
      modeText(blocking.mode)
    }, gid ${blocking.gid}) ` +
      `does not let ${blocking.group ? `group ${access.group}` : "others"} through: a VMM ` +
      `running as ${blocking.group ? "a member of it" : "another user"} cannot reach the ` +
      `socket (${fix}; or choose another --socket-path)`,
  );
  return set;
}

/**
 * The first directory from `dir` up to `/`, other than those in `skip`, that
 * a member of the socket's group (not the owner), or anyone when the mode
 * lets everyone in, cannot search; null when none.
 */
function firstBlocking(
  dir: string,
  access: SocketAccess,
  skip: ReadonlySet<string>,
): { path: string; mode: number; gid: number; group: boolean } | null {
  const forGroup = access.gid !== null && (access.mode & 0o060) !== 0;
  const forOthers = (access.mode & 0o006) !== 0;
  if (!forGroup && !forOthers) return null;
  for (let d = dir; d !== ""; d = d.slice(0, Math.max(0, d.lastIndexOf("/")))) {
    if (skip.has(d)) continue;
    const st = libc.lstat(d);
    if (st === null) continue;
    if (forGroup) {
      const bit = st.gid === access.gid ? 0o010 : 0o001;
      if ((st.mode & bit) === 0) return { path: d, mode: st.mode, gid: st.gid, group: true };
    } else if ((st.mode & 0o001) === 0) {
      return { path: d, mode: st.mode, gid: st.gid, group: false };
    }
  }
  return null;
}

/** Gives the freshly bound socket at `path` its group and mode (before listen). */
export function applySocketAccess(path: string, access: SocketAccess): void {
  const st = libc.lstat(path);
  if (st === null || (st.mode & libc.S_IFMT) !== libc.S_IFSOCK) {
    throw new Error(`${path} is not the socket vionet just bound`);
  }
  if (access.gid !== null) libc.lchgrp(path, access.gid);
  libc.chmod(path, access.mode);
}

/** "mode 0660, group libvirt-qemu (64055)" for the log. */
export function describeSocketAccess(access: SocketAccess): string {
  return `mode ${modeText(access.mode)}` +
    (access.gid === null ? "" : `, group ${access.group} (${access.gid})`);
}
