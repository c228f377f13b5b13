/**
 * A private libvirtd for tests, so that the README's libvirt recipe runs
 * for real: libvirt 9.0 (Debian 12) starting QEMU as its unprivileged user
 * `libvirt-qemu`, against vionet's socket.
 *
 * Theory of operation. A root libvirtd reads its QEMU driver's settings
 * from /etc/libvirt/qemu.conf and keeps state in /run/libvirt,
 * /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt; none of those
 * paths can be moved by an option. So libvirtd runs in a mount namespace of
 * its own (`unshare --mount`, propagation private) where a tmpfs covers /run
 * and each of those directories is a bind mount of a fresh temporary
 * directory: its configuration is the test's, its state is thrown away, and
 * a system libvirtd (there is none here) or another test's is not touched.
 * Its socket is in the temporary directory, and `virsh -c
 * qemu:///system?socket=...` reaches it.
 *
 * qemu.conf keeps libvirt's default of running QEMU as `libvirt-qemu`
 * (written out: `user`, `group`) and turns off what this machine lacks or
 * what would touch files outside the test: `dynamic_ownership` (libvirt
 * would chown the kernel and initrd), security drivers, cgroups, QEMU's
 * private /dev, virtlogd (`stdio_handler = "file"`).
 *
 * Cleanup is by PID: `stop()` destroys the domains it started, ends
 * libvirtd (SIGTERM, then SIGKILL), kills any QEMU of its domains still
 * there, and removes the directory. The namespace goes with its last
 * process.
 *
 * @module
 */

import type { GuestProcess } from "./guest.ts";

/** The user Debian's libvirt runs QEMU as. */
export const QEMU_USER = "libvirt-qemu";

const dec = new TextDecoder();

async function sh(argv: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(argv[0], {
    args: argv.slice(1),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/** Why a private libvirtd cannot run here, or undefined when it can. */
export async function libvirtUnavailable(): Promise<string | undefined> {
  if (Deno.uid() !== 0) return "needs root (a root libvirtd, a mount namespace)";
  for (const bin of ["/usr/sbin/libvirtd", "/usr/bin/virsh", "/usr/bin/unshare"]) {
    if (!exists(bin)) {
      return `needs ${bin} (apt-get install -y --no-install-recommends ` +
        `libvirt-daemon-system libvirt-clients)`;
    }
  }
  if ((await sh(["id", "-u", QEMU_USER])).code !== 0) {
    return `needs the ${QEMU_USER} user (libvirt-daemon-system creates it)`;
  }
  return undefined;
}

/** The domain XML of a test guest on a vhost-user socket (the README's recipe, plus the test's needs). */
export interface DomainSpec {
  name: string;
  memoryMiB: number;
  kernel: string;
  initrd: string;
  cmdline: string;
  /** File for ttyS0 (the console). */
  consolePath: string;
  /** Unix socket ttyS1 connects to (the harness's control channel). */
  controlPath: string;
  /** vionet's socket. */
  socketPath: string;
  mac: string;
}

function xmlText(s: string): string {
  return s.replaceAll("&", "&amp;").replaceAll("<", "&lt;").replaceAll(">", "&gt;")
    .replaceAll("'", "&apos;").replaceAll('"', "&quot;");
}

/**
 * A TCG domain (`type='qemu'`) with shared memfd memory, direct kernel boot
 * and `<interface type='vhostuser'>` as the README shows it; QEMU 7.2 under
 * TCG needs `vectors=0` on virtio-net-pci, given with `<qemu:commandline>`.
 */
export function domainXml(d: DomainSpec): string {
  const x = xmlText;
  return `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>${x(d.name)}</name>
  <memory unit='MiB'>${d.memoryMiB}</memory>
  <vcpu>1</vcpu>
  <memoryBacking>
    <source type='memfd'/>
    <access mode='shared'/>
  </memoryBacking>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>${x(d.kernel)}</kernel>
    <initrd>${x(d.initrd)}</initrd>
    <cmdline>${x(d.cmdline)}</cmdline>
  </os>
  <cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='file'><source path='${x(d.consolePath)}'/><target port='0'/></serial>
    <serial type='unix'><source mode='connect' path='${
    x(d.controlPath)
  }'/><target port='1'/></serial>
    <interface type='vhostuser'>
      <mac address='${x(d.mac)}'/>
      <source type='unix' path='${x(d.socketPath)}' mode='client'>
        <reconnect enabled='yes' timeout='1'/>
      </source>
      <model type='virtio'/>
    </interface>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-global'/>
    <qemu:arg value='virtio-net-pci.vectors=0'/>
  </qemu:commandline>
</domain>
`;
}

/** A file under the libvirtd's hooks directory (its /etc/libvirt/hooks). */
export interface HookFile {
  /** Relative to hooks/, e.g. `qemu.d/vionet-hook`. */
  path: string;
  content: string;
  mode: number;
}

/** What a private libvirtd is given. */
export interface LibvirtdOptions {
  /** A network namespace to run it in (and so the hooks and QEMUs it starts); none by default. */
  netns?: string;
  /** Hook files, given its temporary directory (for paths in their settings). */
  hooks?: (dir: string) => HookFile[];
}

/** A running private libvirtd. */
export class PrivateLibvirtd {
  /** Its temporary directory: etc, run, lib, cache, log, sock, and what tests put there. */
  readonly dir: string;
  /** The connection URI for virsh. */
  readonly uri: string;
  /** libvirtd's PID (unshare and sh exec it). */
  readonly pid: number;
  readonly #child: Deno.ChildProcess;
  readonly #domains = new Map<string, number>();

  private constructor(dir: string, child: Deno.ChildProcess) {
    this.dir = dir;
    this.#child = child;
    this.pid = child.pid;
    this.uri = `qemu:///system?socket=${dir}/sock/libvirt-sock`;
  }

  /** Starts libvirtd and waits until virsh reaches it; undoes everything if it does not. */
  static async start(opts: LibvirtdOptions = {}): Promise<PrivateLibvirtd> {
    const dir = await Deno.makeTempDir({ prefix: "vionet-libvirt-" });
    // QEMU (libvirt-qemu) reads the guest's files below it.
    await Deno.chmod(dir, 0o755);
    for (const sub of ["etc", "etc/hooks", "run", "lib", "cache", "log", "sock"]) {
      await Deno.mkdir(`${dir}/${sub}`);
    }
    for (const h of opts.hooks?.(dir) ?? []) {
      const path = `${dir}/etc/hooks/${h.path}`;
      await Deno.mkdir(path.slice(0, path.lastIndexOf("/")), { recursive: true });
      await Deno.writeTextFile(path, h.content);
      await Deno.chmod(path, h.mode);
    }
    await Deno.writeTextFile(
      `${dir}/etc/libvirtd.conf`,
      [
        `unix_sock_dir = "${dir}/sock"`,
        `unix_sock_rw_perms = "0700"`,
        `auth_unix_rw = "none"`,
        `auth_unix_ro = "none"`,
        `log_outputs = "3:file:${dir}/libvirtd.log"`,
        "",
      ].join("\n"),
    );
    await Deno.writeTextFile(
      `${dir}/etc/qemu.conf`,
      [
        `user = "${QEMU_USER}"`,
        `group = "${QEMU_USER}"`,
        "dynamic_ownership = 0",
        "remember_owner = 0",
        `security_driver = "none"`,
        `stdio_handler = "file"`,
        "cgroup_controllers = [ ]",
        "namespaces = [ ]",
        "",
      ].join("\n"),
    );
    const script = [
      "set -e",
      'd="$1"',
      "mount -t tmpfs -o mode=0755 vionet-test-run /run",
      "mkdir /run/libvirt",
      'mount --bind "$d/run" /run/libvirt',
      'mount --bind "$d/etc" /etc/libvirt',
      'mount --bind "$d/lib" /var/lib/libvirt',
      'mount --bind "$d/cache" /var/cache/libvirt',
      'mount --bind "$d/log" /var/log/libvirt',
      "exec /usr/sbin/libvirtd -f /etc/libvirt/libvirtd.conf",
    ].join("\n");
    // `ip netns exec` execs (no fork): the child's PID is libvirtd's either way.
    const argv = [
      ...(opts.netns ? ["ip", "netns", "exec", opts.netns] : []),
      ...["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", dir],
    ];
    const child = new Deno.Command(argv[0], {
      args: argv.slice(1),
      stdin: "null",
      stdout: "null",
      stderr: "piped",
    }).spawn();
    const stderr = (async () => dec.decode(await new Response(child.stderr).arrayBuffer()))();
    const d = new PrivateLibvirtd(dir, child);
    try {
      const end = Date.now() + 30_000;
      for (;;) {
        const r = await sh(["virsh", "-c", d.uri, "version"]);
        if (r.code === 0) break;
        const exited = await Promise.race([child.status, sleep(200).then(() => null)]);
        if (exited !== null || Date.now() > end) {
          throw new Error(
            `libvirtd ${exited ? `exited (${exited.code})` : "did not answer in 30 s"}: ` +
              `${exited ? await stderr : r.stderr}\n${await d.log()}`,
          );
        }
      }
      return d;
    } catch (e) {
      await d.stop();
      throw e;
    }
  }

  /** libvirtd's own log so far. */
  async log(): Promise<string> {
    return await Deno.readTextFile(`${this.dir}/libvirtd.log`).catch(() => "");
  }

  /** QEMU's log for domain `name` (its command line, its stderr). */
  async qemuLog(name: string): Promise<string> {
    return await Deno.readTextFile(`${this.dir}/log/qemu/${name}.log`).catch(() => "");
  }

  /** Runs virsh against this libvirtd; throws with its stderr on failure. */
  async virsh(...args: string[]): Promise<string> {
    const r = await sh(["virsh", "-c", this.uri, ...args]);
    if (r.code !== 0) {
      throw new Error(`virsh ${args.join(" ")} exited ${r.code}: ${r.stderr.trim()}`);
    }
    return r.stdout;
  }

  /**
   * Creates and starts a transient domain (`virsh create`) and returns its
   * QEMU as a {@link GuestProcess}: the console file as stdout, `kill()`
   * destroys the domain.
   */
  async startDomain(spec: DomainSpec): Promise<GuestProcess> {
    const xmlPath = `${this.dir}/${spec.name}.xml`;
    await Deno.writeTextFile(xmlPath, domainXml(spec));
    try {
      await this.virsh("create", xmlPath);
    } catch (e) {
      throw new Error(
        `${(e as Error).message}\n--- QEMU log ---\n${await this.qemuLog(spec.name)}`,
      );
    }
    const pid = Number((await Deno.readTextFile(`${this.dir}/run/qemu/${spec.name}.pid`)).trim());
    this.#domains.set(spec.name, pid);
    return new DomainProcess(this, spec.name, pid, spec.consolePath);
  }

  /** Destroys the domains, ends libvirtd and removes its directory. Never throws. */
  async stop(): Promise<void> {
    for (const name of this.#domains.keys()) {
      await sh(["virsh", "-c", this.uri, "destroy", name]).catch(() => {});
    }
    try {
      this.#child.kill("SIGTERM");
    } catch { /* gone */ }
    const timer = setTimeout(() => {
      try {
        this.#child.kill("SIGKILL");
      } catch { /* gone */ }
    }, 10_000);
    await this.#child.status;
    clearTimeout(timer);
    // A QEMU whose destroy failed: ours by the PID libvirt recorded, if it still runs as ours.
    const uid = (await sh(["id", "-u", QEMU_USER])).stdout.trim();
    for (const pid of this.#domains.values()) {
      if (qemuOfUser(pid, uid)) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch { /* gone */ }
      }
    }
    await Deno.remove(this.dir, { recursive: true }).catch(() => {});
  }
}

/** Whether `pid` is a QEMU running as `uid` (libvirt's user; not a reused PID). */
function qemuOfUser(pid: number, uid: string): boolean {
  try {
    const status = Deno.readTextFileSync(`/proc/${pid}/status`);
    return /^Name:\s*qemu-system/m.test(status) &&
      new RegExp(`^Uid:\\s*${uid}\\b`, "m").test(status);
  } catch {
    return false;
  }
}

/** The user id `pid` runs as (real), from /proc. */
export function processUid(pid: number): number {
  const m = /^Uid:\s*(\d+)/m.exec(Deno.readTextFileSync(`/proc/${pid}/status`));
  if (!m) throw new Error(`/proc/${pid}/status has no Uid line`);
  return Number(m[1]);
}

/** A libvirt domain's QEMU, seen as a {@link GuestProcess}. */
class DomainProcess implements GuestProcess {
  readonly pid: number;
  readonly status: Promise<Deno.CommandStatus>;
  readonly stdout: ReadableStream<Uint8Array>;
  readonly stderr: ReadableStream<Uint8Array>;
  readonly #libvirtd: PrivateLibvirtd;
  readonly #name: string;

  constructor(libvirtd: PrivateLibvirtd, name: string, pid: number, consolePath: string) {
    this.#libvirtd = libvirtd;
    this.#name = name;
    this.pid = pid;
    this.status = (async () => {
      while (exists(`/proc/${pid}`)) await sleep(200);
      return { success: true, code: 0, signal: null };
    })();
    this.stdout = follow(consolePath, this.status);
    this.stderr = new ReadableStream({ start: (c) => c.close() });
  }

  /** Destroys the domain (libvirt ends its QEMU); the signal is libvirt's to choose. */
  kill(_signal?: Deno.Signal): void {
    this.#libvirtd.virsh("destroy", this.#name).catch(() => {});
  }
}

/** The bytes appended to `path` until `done` settles, as a stream. */
function follow(path: string, done: Promise<unknown>): ReadableStream<Uint8Array> {
  let offset = 0;
  let finished = false;
  done.finally(() => finished = true);
  return new ReadableStream({
    async pull(controller) {
      for (;;) {
        const last = finished;
        let chunk = new Uint8Array(0);
        try {
          using f = await Deno.open(path);
          await f.seek(offset, Deno.SeekMode.Start);
          const buf = new Uint8Array(65536);
          const n = await f.read(buf);
          if (n) chunk = buf.subarray(0, n);
        } catch { /* not there yet */ }
        if (chunk.length > 0) {
          offset += chunk.length;
          controller.enqueue(chunk);
          return;
        }
        if (last) {
          controller.close();
          return;
        }
        await sleep(200);
      }
    },
  });
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}
