/**
 * The end of set-up: every thread of the daemon leaves it with the least the
 * kernel lets it keep, in this order:
 *
 * 1. a Landlock ruleset is built (`landlock.ts`) while the daemon can still
 *    open the paths its rules name;
 * 2. every thread (`privileges.ts`, one signal handler per thread) sets
 *    no_new_privs, drops every capability, restricts itself with that
 *    ruleset and switches to the unprivileged user (`users.ts`), and the
 *    result is read back from each thread's /proc status;
 * 3. one seccomp filter (`seccomp_policy.ts`, `seccomp.ts`) is put on every
 *    thread at once (TSYNC) and read back the same way.
 *
 * Seccomp comes last because the steps before it make calls it forbids
 * (landlock_restrict_self, setresuid, capset). Threads created afterwards
 * (a new device worker after a disconnect, the I/O workers at each queue
 * start, tokio's pool) are created by a sandboxed thread and inherit all
 * three: ids, Landlock domain and filter.
 *
 * @module
 */

import {
  CAPABILITIES_KEPT_AFTER_SETUP,
  currentCapabilities,
  dropPrivileges,
  type DropResult,
} from "./privileges.ts";
import {
  createRuleset,
  type LandlockPlan,
  landlockRules,
  landlockSupport,
  planLandlock,
  type SkippedRule,
} from "./landlock.ts";
import { assemble, installSeccomp } from "./seccomp.ts";
import { type PolicyContext, seccompPolicy } from "./seccomp_policy.ts";
import type { DaemonUser } from "./users.ts";
import * as libc from "./libc.ts";

/** The repository root: the modules that workers started later load. */
export const MODULE_ROOT = new URL("../../", import.meta.url).pathname.replace(/\/$/, "");

/** What the sandbox is built from: the options that decide it. */
export interface SandboxOptions {
  user: DaemonUser;
  seccomp: "on" | "off" | "log";
  ioUring: "auto" | "off";
  /** `--client`: the daemon connects to the VMM. */
  client: boolean;
  /** The directory of the socket the daemon listens on and removes at exit, or null. */
  socketDir: string | null;
  /** The directory of the `--metrics` socket, which it serves and removes at exit; or null. */
  metricsDir?: string | null;
}

/** A line for the log. */
export interface SandboxLogLine {
  level: "info" | "warn";
  message: string;
}

/** What the sandbox is, once entered. */
export interface SandboxReport {
  drop: DropResult;
  landlock: LandlockPlan & { applied: boolean; skipped: SkippedRule[] };
  seccomp: { installed: boolean; entries: number; threads: number };
  /** What to log, in order: one line per layer, warnings for what is missing. */
  log: SandboxLogLine[];
}

/** Whether the sandbox switches the ids, and to what; or why it keeps them. */
export type UserPlan =
  | { switchTo: { uid: number; gid: number } }
  | { keep: "root" | "unprivileged"; uid: number };

/**
 * What `--user` means for a process whose effective uid is `euid`: started
 * as root, switch to the user (or keep uid 0 for a root user, loudly);
 * started unprivileged (a supervisor handing over the tap and the socket),
 * there is nothing to give up and no right to switch: keep the ids when the
 * user was the default or is this very uid, and refuse a different one.
 * @throws {Error} for a different `--user` when the process cannot switch.
 */
export function planUser(user: DaemonUser, euid: number): UserPlan {
  if (euid === 0) {
    return user.uid === 0
      ? { keep: "root", uid: 0 }
      : { switchTo: { uid: user.uid, gid: user.gid } };
  }
  if (user.chosen === "default" || user.uid === euid) return { keep: "unprivileged", uid: euid };
  throw new Error(
    `--user ${user.name}: switching users needs root at set-up; this process runs as uid ${euid}`,
  );
}

/** The seccomp policy context for these options. */
export function policyContext(opts: Omit<SandboxOptions, "user">): PolicyContext {
  return {
    client: opts.client,
    accepts: !opts.client,
    metrics: (opts.metricsDir ?? null) !== null,
    ioUring: opts.ioUring,
    pid: libc.getpid(),
    logOnly: opts.seccomp === "log",
  };
}

/**
 * Puts the whole process in the sandbox (see the module comment). Returns
 * what it did; throws if any layer that the kernel offers could not be put
 * on every thread, in which case the daemon must not serve.
 */
export function enterSandbox(opts: SandboxOptions): SandboxReport {
  const log: SandboxLogLine[] = [];
  const plan = planLandlock(
    landlockRules({
      root: MODULE_ROOT,
      socketDir: opts.socketDir,
      metricsDir: opts.metricsDir ?? null,
    }),
    landlockSupport(),
  );
  let ruleset: { fd: number; skipped: SkippedRule[] } | null = null;
  if (plan.abi > 0) ruleset = createRuleset(plan);
  const who = planUser(opts.user, currentCapabilities().uids[1]);
  let drop: DropResult;
  try {
    drop = dropPrivileges(CAPABILITIES_KEPT_AFTER_SETUP.map((c) => c.name), {
      user: "switchTo" in who ? who.switchTo : undefined,
      landlockFd: ruleset?.fd,
    });
  } finally {
    if (ruleset) libc.closeQuietly(ruleset.fd);
  }
  if ("keep" in who && who.keep === "root") {
    log.push({
      level: "warn",
      message: `--user ${opts.user.name}: KEEPING UID 0. Capabilities are dropped and the ` +
        "filters below apply, but every file root may reach stays reachable",
    });
  } else if ("keep" in who) {
    log.push({
      level: "info",
      message: `started unprivileged: keeps uid ${who.uid} on all ${drop.threads} threads ` +
        `(${opts.user.chosen === "default" ? "no --user" : `--user ${opts.user.name}`})`,
    });
  } else {
    log.push({
      level: opts.user.name === "nobody" ? "warn" : "info",
      message: `running as user ${opts.user.name} (uid ${drop.uid}, gid ${drop.gid}, ` +
        `no supplementary groups) on all ${drop.threads} threads` +
        (opts.user.name === "nobody"
          ? "; nobody is shared with whatever else runs as nobody here: a dedicated user " +
            "(useradd --system vionet) keeps them away from the daemon"
          : ""),
    });
  }
  log.push({
    level: "info",
    message: `dropped ${drop.dropped.length} capabilities on ${drop.threads} threads; ` +
      (drop.kept.length ? `kept ${drop.kept.join(" ")}` : "kept none") + "; no_new_privs set",
  });
  if (ruleset) {
    log.push({
      level: plan.notes.length ? "warn" : "info",
      message: `Landlock ABI ${plan.abi} on every thread: read-only ${
        plan.rules.filter((r) =>
          !ruleset!.skipped.some((s) => s.rule === r)
        )
          .filter((r) =>
            r.access.includes("READ_FILE")
          ).map((r) => r.path).join(", ")
      }` +
        (opts.socketDir ? `; may remove its socket from ${opts.socketDir}` : "") +
        (opts.metricsDir && opts.metricsDir !== opts.socketDir
          ? `; its metrics socket from ${opts.metricsDir}`
          : "") +
        `; ${
          plan.handledNet.length ? "no TCP bind or connect" : "TCP not restricted (ABI < 4)"
        }; scoped: ${plan.scoped.join(", ") || "nothing"}` +
        (plan.notes.length ? ` (${plan.notes.join("; ")})` : ""),
    });
    for (const s of ruleset.skipped) {
      log.push({
        level: "info",
        message: `Landlock rule for ${s.rule.path} left out: ${s.reason}`,
      });
    }
  } else {
    log.push({
      level: "warn",
      message: `no Landlock: ${plan.notes.join("; ")}; files are bounded by the user and ` +
        "the seccomp filter only",
    });
  }
  let seccomp = { installed: false, entries: 0, threads: 0 };
  if (opts.seccomp !== "off") {
    const policy = seccompPolicy(policyContext(opts));
    const threads = installSeccomp(assemble(policy));
    seccomp = { installed: true, entries: policy.entries.length, threads };
    log.push({
      level: opts.seccomp === "log" ? "warn" : "info",
      message: `seccomp filter on all ${threads} threads: ${
        policy.entries.filter((e) => e.rule.action !== "errno").length
      } system calls allowed (${
        policy.entries.filter((e) => e.rule.action === "allow-if").length
      } only with allowed arguments), ` + (opts.seccomp === "log"
        ? "AND ANYTHING ELSE ONLY LOGGED (--seccomp log): allowed, and reported by the " +
          "kernel as audit type=1326"
        : "anything else fails with EPERM"),
    });
  } else {
    log.push({
      level: "warn",
      message: "SECCOMP IS OFF (--seccomp off): the parent and the I/O workers may make any " +
        "system call the user and Landlock allow",
    });
  }
  return {
    drop,
    landlock: { ...plan, applied: ruleset !== null, skipped: ruleset?.skipped ?? [] },
    seccomp,
    log,
  };
}
