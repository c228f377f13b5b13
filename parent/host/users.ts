/**
 * The unprivileged user the daemon becomes once set-up is over (`--user`).
 *
 * Which user by default: a dedicated `vionet` system user when the host has
 * one, else `nobody`. A user of its own is the better choice: no other
 * process runs as it, so none can signal the daemon, read its /proc files,
 * or write into a socket directory the daemon hands to it. `nobody` is
 * shared by whatever else the host runs as nobody (NFS squashed access, some
 * daemons), which is why the log says so when it is the one used. Create the
 * dedicated user with
 * `useradd --system --no-create-home --shell /usr/sbin/nologin vionet`.
 *
 * `--user root` (or any user whose uid is 0) keeps uid 0: the daemon then
 * still drops every capability and runs under the same seccomp filter and
 * Landlock ruleset, but a file it can reach is one root can reach. The log
 * says so loudly.
 *
 * Names are resolved with getpwnam(3) at set-up, so the host's NSS
 * configuration (files, systemd-userdb, LDAP) applies; `UID:GID` in numbers
 * needs no lookup.
 *
 * @module
 */

import * as libc from "./libc.ts";

/** The user the daemon switches to. */
export interface DaemonUser {
  /** The name given or found ("65534:65534" style when given in numbers). */
  name: string;
  uid: number;
  gid: number;
  /** How it was chosen: `--user`, or the default. */
  chosen: "option" | "default";
}

/** The users tried, in order, when `--user` is not given. */
export const DEFAULT_USERS = ["vionet", "nobody"] as const;

/** `--user` names no user this host knows. */
export class UnknownUserError extends Error {
  override name = "UnknownUserError";
}

/** getpwnam(3): uid and gid of `name`, or null when there is no such user. */
export function lookupUser(name: string): { uid: number; gid: number } | null {
  const pw = libc.sys.getpwnam(libc.cstr(name));
  if (pw === null) return null;
  const view = new Deno.UnsafePointerView(pw);
  // struct passwd (x86-64): char *pw_name @0, char *pw_passwd @8, uid_t pw_uid @16, gid_t pw_gid @20.
  return { uid: view.getUint32(16), gid: view.getUint32(20) };
}

/**
 * Resolves `spec` (a user name, or `UID:GID`) or, when null, the first of
 * {@link DEFAULT_USERS} this host has.
 * @throws {UnknownUserError} when the user does not exist.
 */
export function resolveUser(spec: string | null): DaemonUser {
  if (spec !== null) {
    const numeric = /^(\d{1,10}):(\d{1,10})$/.exec(spec);
    if (numeric) {
      const [uid, gid] = [Number(numeric[1]), Number(numeric[2])];
      if (uid > 0xffff_fffe || gid > 0xffff_fffe) {
        throw new UnknownUserError(`--user ${spec}: ids must be below 4294967295`);
      }
      return { name: spec, uid, gid, chosen: "option" };
    }
    const found = lookupUser(spec);
    if (found === null) throw new UnknownUserError(`--user ${spec}: there is no such user`);
    return { name: spec, ...found, chosen: "option" };
  }
  for (const name of DEFAULT_USERS) {
    const found = lookupUser(name);
    if (found !== null) return { name, ...found, chosen: "default" };
  }
  throw new UnknownUserError(
    `neither of the default users (${DEFAULT_USERS.join(", ")}) exists; name one with --user`,
  );
}
