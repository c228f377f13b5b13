import assert from "node:assert/strict";
import {
  capabilities,
  DEFAULT_PCAP_MAX,
  defaultMac,
  defaultQueues,
  MIN_PCAP_MAX,
  OPTIONS,
  parseBytes,
  parseMac,
  parseOptions,
  usage,
  UsageError,
} from "../../../parent/control/cli.ts";
import {
  formatDirection,
  parseRateLimit,
  queryToSpec,
  RateLimitSyntaxError,
} from "../../../parent/control/rate_limit_spec.ts";
import { ROOT, startTaskEnv, startTaskFlags } from "../../helpers.ts";
import { withNetns } from "../../net_ns.ts";

Deno.test("no arguments: tap vionet0, a socket path, offload auto, no MAC enforced, the tap's MTU", () => {
  const o = parseOptions([], {});
  assert.equal(o.tap, "vionet0");
  assert.equal(o.socketPath, "/run/vionet/vionet0.sock");
  assert.equal(o.ownSocketDir, true);
  assert.equal(o.offload, "auto");
  assert.equal(o.ioUring, "auto");
  assert.equal(o.logLevel, "info");
  assert.equal(o.user, null, "the default user is chosen at set-up (vionet, else nobody)");
  assert.equal(o.seccomp, "on");
  assert.equal(o.mac, null);
  assert.equal(o.mtu, null);
  assert.equal(o.socketGroup, null);
  assert.equal(o.socketMode, null);
  assert.deepEqual(defaultMac("vionet0"), defaultMac("vionet0"));
  assert.equal(
    defaultMac("vionet0")[0] & 3,
    2,
    "the suggested MAC is locally administered unicast",
  );
  assert.equal(
    parseOptions([], { XDG_RUNTIME_DIR: "/run/user/7" }).socketPath,
    "/run/user/7/vionet/vionet0.sock",
  );
});

Deno.test("options take both --opt value and --opt=value", () => {
  const o = parseOptions([
    "--socket-path=/tmp/s.sock",
    "--tap",
    "tapx",
    "--mac=02:00:00:00:00:01",
    "--offload",
    "off",
    "--mtu=9000",
    "--io-uring=off",
    "--log-level=debug",
    "--user=nobody",
    "--seccomp",
    "log",
    "--socket-group=libvirt-qemu",
    "--socket-mode",
    "0666",
  ]);
  assert.equal(o.socketPath, "/tmp/s.sock");
  assert.equal(o.ownSocketDir, false);
  assert.equal(o.socketGroup, "libvirt-qemu");
  assert.equal(o.socketMode, 0o666);
  assert.equal(parseOptions(["--socket-mode", "660", "--socket-group", "64055"]).socketMode, 0o660);
  assert.equal(o.tap, "tapx");
  assert.deepEqual(o.mac, [2, 0, 0, 0, 0, 1]);
  assert.equal(o.offload, "off");
  assert.equal(o.mtu, 9000);
  assert.equal(o.ioUring, "off");
  assert.equal(o.logLevel, "debug");
  assert.equal(o.user, "nobody");
  assert.equal(o.seccomp, "log");
  assert.equal(parseOptions(["--user", "65534:65534"]).user, "65534:65534");
});

Deno.test("inherited descriptors: --fd and --tap-fd", () => {
  const o = parseOptions(["--fd", "3", "--tap-fd", "4"]);
  assert.equal(o.listenFd, 3);
  assert.equal(o.socketPath, null);
  assert.equal(o.tapFd, 4);
  assert.equal(o.tap, null);
  assert.deepEqual(o.tapFds, [4]);
  assert.equal(o.queues, 1, "one descriptor: one queue pair");
  const mq = parseOptions(["--tap-fd", "4,5,6"]);
  assert.deepEqual(mq.tapFds, [4, 5, 6]);
  assert.equal(mq.tapFd, 4);
  assert.equal(mq.queues, 3, "one queue pair per descriptor");
});

Deno.test("--queues: the default is one pair per host CPU, at most 8; explicit values are kept", () => {
  assert.equal(defaultQueues(1), 1);
  assert.equal(defaultQueues(2), 2);
  assert.equal(defaultQueues(64), 8);
  const d = parseOptions([]);
  assert.equal(d.queues, defaultQueues());
  assert.equal(d.queuesExplicit, false);
  const o = parseOptions(["--queues", "4"]);
  assert.equal(o.queues, 4);
  assert.equal(o.queuesExplicit, true);
  assert.equal(d.steering, "hash", "a multi-queue tap's pairs are picked by flow hash");
  assert.equal(parseOptions(["--steering", "kernel"]).steering, "kernel");
});

Deno.test("each bad command line is a UsageError that names what is wrong", async (t) => {
  const cases: [string[], RegExp][] = [
    [["--bogus"], /unknown option --bogus/],
    [["-x"], /unknown option -x/],
    [["stray"], /unexpected argument stray/],
    [["--tap"], /--tap needs a value/],
    [["--help=yes"], /--help takes no value/],
    [["--socket-path", "/a", "--fd", "3"], /--socket-path and --fd are mutually exclusive/],
    [["--tap", "a", "--tap-fd", "3"], /--tap and --tap-fd are mutually exclusive/],
    [["--client", "--fd", "3"], /--client/],
    [["--fd", "1"], /--fd 1: descriptors 0-2/],
    [["--tap-fd", "x"], /--tap-fd wants a descriptor number, got "x"/],
    [["--tap", "way-too-long-name0"], /--tap "way-too-long-name0" is not a valid interface name/],
    [["--tap", "a/b"], /not a valid interface name/],
    [["--mac", "01:00:5e:00:00:01"], /--mac "01:00:5e:00:00:01" is not a unicast MAC/],
    [["--mac", "52:54:00:12:34"], /is not a unicast MAC/],
    [["--mac", "00:00:00:00:00:00"], /is not a unicast MAC/],
    [["--offload", "on"], /--offload "on" must be auto or off/],
    [["--io-uring", "yes"], /--io-uring "yes" must be auto or off/],
    [["--steering", "rss"], /--steering "rss" must be hash or kernel/],
    [["--mtu", "20"], /--mtu "20" is not in 68..65521/],
    [["--mtu", "65522"], /--mtu "65522" is not in 68..65521/],
    [["--mtu", "1e3"], /--mtu "1e3"/],
    [["--log-level", "loud"], /--log-level "loud" must be one of error, warn, info, debug/],
    [["--socket-path", ""], /--socket-path is empty/],
    [["--queues", "0"], /--queues "0" is not in 1..64/],
    [["--queues", "65"], /--queues "65" is not in 1..64/],
    [["--queues", "two"], /--queues "two"/],
    [["--tap-fd", "4,5", "--queues", "3"], /--queues 3 with 2 --tap-fd descriptor\(s\)/],
    [["--tap-fd", "4,4"], /--tap-fd 4,4 names a descriptor twice/],
    [["--seccomp", "strict"], /--seccomp "strict" must be on, off or log/],
    [["--user", "a b"], /--user "a b" is not a user name or UID:GID/],
    [["--user", "1:"], /--user "1:" is not a user name or UID:GID/],
    [["--socket-mode", "0666x"], /--socket-mode "0666x" is not an octal mode/],
    [["--socket-mode", "0460"], /--socket-mode "0460" is not an octal mode from 0600 to 0777/],
    [["--socket-mode", "04660"], /--socket-mode "04660"/],
    [["--socket-mode", "0800"], /--socket-mode "0800"/],
    [["--socket-group", "a b"], /--socket-group "a b" is not a group name or number/],
    [["--socket-group", ""], /--socket-group "" is not a group name/],
    [
      ["--fd", "3", "--socket-mode", "0660"],
      /--socket-group and --socket-mode apply to the socket vionet listens on; with --fd/,
    ],
    [["--client", "--socket-group", "kvm"], /with --client it makes none/],
    [["--socket-path", "/" + "x".repeat(120)], /107 bytes/],
  ];
  for (const [argv, re] of cases) {
    await t.step(argv.join(" ") || "(empty)", () => {
      assert.throws(
        () => parseOptions(argv),
        (e: unknown) => e instanceof UsageError && re.test(e.message),
      );
    });
  }
});

Deno.test("parseMac accepts either case and rejects group addresses", () => {
  assert.deepEqual(parseMac("52:54:00:AB:cd:EF"), [0x52, 0x54, 0, 0xab, 0xcd, 0xef]);
  assert.equal(parseMac("53:54:00:00:00:01"), null);
  assert.equal(parseMac("52-54-00-00-00-01"), null);
});

Deno.test("--help lists every option, and --print-capabilities is the convention's JSON", () => {
  const text = usage();
  for (const name of Object.keys(OPTIONS)) assert.match(text, new RegExp(`--${name}\\b`));
  assert.match(text, /default: vionet0/);
  assert.match(text, /default: auto/);
  assert.deepEqual(JSON.parse(capabilities()), { type: "net" });
});

async function runMain(args: string[], netns?: string) {
  const cmd = [Deno.execPath(), "run", ...startTaskFlags(), `${ROOT}main.ts`, ...args];
  const full = netns ? ["ip", "netns", "exec", netns, ...cmd] : cmd;
  const out = await new Deno.Command(full[0], {
    args: full.slice(1),
    env: startTaskEnv(),
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  })
    .output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

Deno.test({
  name: "main: a bad option is one line on stderr, exit status 2, and no tap left behind",
  ignore: Deno.uid() !== 0,
  fn: () =>
    withNetns(async (ns) => {
      for (
        const args of [["--bogus"], ["--tap", "vbad0", "--mac", "zz"], [
          "--tap",
          "vbad0",
          "--offload",
        ]]
      ) {
        const r = await runMain(args, ns.name);
        assert.equal(r.code, 2, r.stderr);
        assert.equal(r.stdout, "");
        assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
        assert.match(r.stderr, /^vionet: /);
        const links = await ns.exec(["ip", "-o", "link"]);
        assert.doesNotMatch(links, /vionet0|vbad0/);
      }
    }),
});

Deno.test("main: --help and --print-capabilities print to stdout and exit 0", async () => {
  const help = await runMain(["--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /--socket-path PATH/);
  const caps = await runMain(["--print-capabilities"]);
  assert.equal(caps.code, 0);
  assert.deepEqual(JSON.parse(caps.stdout), { type: "net" });
});

Deno.test({
  name: "main: with no arguments it creates vionet0, and SIGTERM removes it",
  ignore: Deno.uid() !== 0,
  fn: () =>
    withNetns(async (ns) => {
      const child = ns.spawn(
        [Deno.execPath(), "run", ...startTaskFlags(), `${ROOT}main.ts`],
        {
          stdout: "piped",
          stderr: "piped",
          env: { ...startTaskEnv(), XDG_RUNTIME_DIR: await Deno.makeTempDir() },
        },
      );
      const stderr = collect(child.stderr);
      const stdout = collect(child.stdout);
      try {
        const end = Date.now() + 15_000;
        while (!/ready|listening|device worker started/.test(stderr.text()) && Date.now() < end) {
          await new Promise((r) => setTimeout(r, 50));
        }
        assert.match(await ns.exec(["ip", "-o", "link", "show", "vionet0"]), /vionet0.*UP/);
        child.kill("SIGTERM");
        const status = await child.status;
        assert.equal(status.code, 0, stderr.text());
        assert.match(stderr.text(), /SIGTERM: shutting down/);
        assert.doesNotMatch(await ns.exec(["ip", "-o", "link"]), /vionet0/);
        void stdout;
      } finally {
        try {
          child.kill("SIGKILL");
        } catch { /* already gone */ }
      }
    }),
});

Deno.test("parseOptions(): --metrics takes a socket path, not empty, not too long, not the vhost-user one", () => {
  assert.equal(parseOptions(["--metrics", "/run/m.sock"]).metricsPath, "/run/m.sock");
  assert.equal(parseOptions([]).metricsPath, null);
  assert.throws(() => parseOptions(["--metrics", ""]), /--metrics is empty/);
  assert.throws(() => parseOptions(["--metrics", `/${"a".repeat(107)}`]), /107 bytes/);
  assert.throws(
    () => parseOptions(["--socket-path", "/run/a.sock", "--metrics", "/run/a.sock"]),
    /cannot be the same path/,
  );
});

function collect(stream: ReadableStream<Uint8Array>) {
  let buf = "";
  const dec = new TextDecoder();
  (async () => {
    for await (const chunk of stream) buf += dec.decode(chunk, { stream: true });
  })();
  return { text: () => buf };
}

Deno.test("--rate-limit: bits, bytes and frames a second, per direction, with bursts", () => {
  assert.deepEqual(parseOptions([]).rateLimit, {}, "no option: nothing limited");
  const o = parseOptions(["--rate-limit", "tx=100Mbit,rx=12.5MB,burst=1MiB"]);
  assert.deepEqual(o.rateLimit, {
    tx: { bytes: { rate: 12_500_000, size: 1_250_000 }, frames: null },
    rx: { bytes: { rate: 12_500_000, size: 1_048_576 }, frames: null },
  });
  // Both buckets in one direction; a frame burst is a count.
  assert.deepEqual(
    parseOptions(["--rate-limit=tx=80mbit/s,tx=10kpps,burst=64"]).rateLimit,
    {
      tx: { bytes: { rate: 10_000_000, size: 1_000_000 }, frames: { rate: 10_000, size: 64 } },
    },
  );
  // The default byte burst is 100 ms of the rate, at least one 64 KiB GSO frame.
  assert.deepEqual(parseRateLimit("rx=1Mbit"), {
    rx: { bytes: { rate: 125_000, size: 65_550 }, frames: null },
  });
  assert.deepEqual(parseRateLimit("tx=1GiB,burst=100kB,rx=off"), {
    tx: { bytes: { rate: 1024 ** 3, size: 100_000 }, frames: null },
    rx: null,
  });
  assert.deepEqual(parseRateLimit(" tx = 2Gbit "), {
    tx: { bytes: { rate: 250_000_000, size: 25_000_000 }, frames: null },
  });
  assert.deepEqual(parseRateLimit("tx=1Mpps"), {
    tx: { bytes: null, frames: { rate: 1e6, size: 100_000 } },
  });
});

Deno.test("--rate-limit: each bad spec is a UsageError that says what is wrong", async (t) => {
  const cases: [string, RegExp][] = [
    ["", /the limit is empty/],
    ["tx", /"tx" wants KEY=VALUE/],
    ["tx=", /"tx=" wants KEY=VALUE/],
    ["tx=100M", /"100M": "M" is ambiguous/],
    ["tx=100mb", /"100mb": "mb" is ambiguous/],
    ["tx=100Mbps", /"Mbps" is ambiguous/],
    ["tx=100", /"100" has no unit: say bits \(100Mbit\), bytes \(100MB\)/],
    ["tx=fast", /"fast" is not a rate/],
    ["tx=-5Mbit", /"-5Mbit" is not a rate/],
    ["tx=5furlongs", /unknown unit "furlongs"/],
    ["tx=0Mbit", /"0Mbit" is out of range/],
    ["tx=9000Gbit", /out of range: 1 to 1000000000000 bytes/],
    ["tx=1bit", /"1bit" is out of range/],
    ["burst=1MB", /burst=1MB must follow the rate it is for/],
    ["tx=1Mbit,burst=1MB,burst=2MB", /tx's bytes rate has one already/],
    ["tx=1Mbit,burst=1Mbit", /burst "1Mbit" is not a size in bytes/],
    ["tx=1kpps,burst=1MB", /burst "1MB" is not a number of frames/],
    ["tx=1Mbit,burst=0", /burst "0" is out of range/],
    ["tx=1Mbit,tx=2MB", /tx has two byte \(or bit\) rates/],
    ["tx=1kpps,tx=2kpps", /tx has two frame rates/],
    ["tx=off,tx=1Mbit", /tx=1Mbit after tx=off/],
    ["tx=1Mbit,tx=off", /tx=off with another tx= item/],
    ["up=1Mbit", /unknown key "up": tx= \(guest transmits\), rx= \(guest receives\)/],
    ["tx=1Mbit,rx=off,burst=5", /burst=5 must follow the rate/],
  ];
  for (const [spec, re] of cases) {
    await t.step(spec || "(empty)", () => {
      assert.throws(
        () => parseOptions(["--rate-limit", spec]),
        (e: unknown) =>
          e instanceof UsageError && e.message.startsWith(`--rate-limit "${spec}": `) &&
          re.test(e.message),
      );
      assert.throws(() => parseRateLimit(spec), RateLimitSyntaxError);
    });
  }
});

Deno.test("rate limits read back as specs that parse to the same limits", () => {
  for (const spec of ["tx=50Mbit,burst=625000", "rx=12.5kbit,burst=70000", "tx=3000pps,burst=7"]) {
    const dir = spec.slice(0, 2) as "tx" | "rx";
    const parsed = parseRateLimit(spec)[dir]!;
    assert.equal(formatDirection(dir, parsed), spec);
  }
  assert.equal(formatDirection("rx", null), "rx=off");
  assert.equal(queryToSpec("tx=50Mbit&rx=off&burst=1%2C"), "tx=50Mbit,rx=off,burst=1,");
  assert.throws(() => queryToSpec("tx=%zz"), RateLimitSyntaxError);
});

Deno.test("parseOptions(): --pcap, --pcap-max (K/M/G) and --pcap-start; no capture by default", () => {
  const none = parseOptions([]);
  assert.equal(none.pcapPath, null);
  assert.equal(none.pcapMax, DEFAULT_PCAP_MAX);
  assert.equal(none.pcapStart, true);
  const o = parseOptions([
    "--pcap",
    "/var/tmp/c.pcapng",
    "--pcap-max",
    "100M",
    "--pcap-start",
    "off",
  ]);
  assert.equal(o.pcapPath, "/var/tmp/c.pcapng");
  assert.equal(o.pcapMax, 100 * 1024 * 1024);
  assert.equal(o.pcapStart, false);
  assert.equal(parseOptions(["--pcap", "c", "--pcap-max", "2g"]).pcapMax, 2 * 1024 ** 3);
  assert.equal(parseOptions(["--pcap", "c", "--pcap-max", "65536"]).pcapMax, 65536);
  assert.equal(parseOptions(["--pcap", "c", "--pcap-max", "64K"]).pcapMax, MIN_PCAP_MAX);
  assert.equal(parseBytes("12"), 12);
  assert.ok(Number.isNaN(parseBytes("1.5M")));
  assert.ok(Number.isNaN(parseBytes("-1")));
});

Deno.test("parseOptions(): each bad capture option is a UsageError naming it", async (t) => {
  const cases: [string[], RegExp][] = [
    [["--pcap-max", "1M"], /--pcap-max needs --pcap FILE/],
    [["--pcap-start", "on"], /--pcap-start needs --pcap FILE/],
    [["--pcap", ""], /--pcap is empty/],
    [["--pcap"], /--pcap needs a value/],
    [["--pcap", "c", "--pcap-max", "1000"], /--pcap-max "1000" is not a size from 65536 bytes/],
    [["--pcap", "c", "--pcap-max", "10T"], /--pcap-max "10T"/],
    [["--pcap", "c", "--pcap-max", "many"], /--pcap-max "many"/],
    [["--pcap", "c", "--pcap-max", "99999999999999999G"], /--pcap-max/],
    [["--pcap", "c", "--pcap-start", "later"], /--pcap-start "later" must be on or off/],
    [["--pcap", "/run/a.sock", "--socket-path", "/run/a.sock"], /is the path of a socket/],
    [["--pcap", "/run/m.sock", "--metrics", "/run/m.sock"], /is the path of a socket/],
  ];
  for (const [argv, re] of cases) {
    await t.step(argv.join(" "), () => {
      assert.throws(
        () => parseOptions(argv),
        (e: unknown) => e instanceof UsageError && re.test(e.message),
      );
    });
  }
});

Deno.test("--help says capture stops at --pcap-max (no rotation) and how to switch it at run time", () => {
  const text = usage();
  assert.match(text, /--pcap FILE/);
  assert.match(text, /STOPS\s+there \(no rotation\)|STOPS there \(no rotation\)/);
  assert.match(text, /POST \/capture\?state=on\|off/);
});

Deno.test("parseOptions(): --pcap-snaplen takes 64 bytes to 1M; whole frames by default", () => {
  assert.equal(parseOptions(["--pcap", "c"]).pcapSnaplen, 0);
  assert.equal(parseOptions(["--pcap", "c", "--pcap-snaplen", "128"]).pcapSnaplen, 128);
  assert.equal(parseOptions(["--pcap", "c", "--pcap-snaplen", "1M"]).pcapSnaplen, 1 << 20);
  for (const bad of ["63", "0", "2M", "x"]) {
    assert.throws(
      () => parseOptions(["--pcap", "c", "--pcap-snaplen", bad]),
      new RegExp(`--pcap-snaplen "${bad}" is not a length from 64 bytes to 1M`),
    );
  }
  assert.throws(() => parseOptions(["--pcap-snaplen", "128"]), /--pcap-snaplen needs --pcap FILE/);
});
