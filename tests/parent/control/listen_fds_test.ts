import assert from "node:assert/strict";
import { ListenFdsError, passedSocket } from "../../../parent/control/listen_fds.ts";
import { parseOptions, UsageError } from "../../../parent/control/cli.ts";

const PID = 4242;

Deno.test("passedSocket(): fd 3 when LISTEN_PID is ours; nothing when absent or another's", () => {
  assert.deepEqual(passedSocket({ LISTEN_FDS: "1", LISTEN_PID: String(PID) }, PID), {
    fd: 3,
    name: null,
    count: 1,
  });
  assert.equal(passedSocket({}, PID), null);
  assert.equal(passedSocket({ LISTEN_FDS: "1" }, PID), null, "no LISTEN_PID: not for us");
  assert.equal(passedSocket({ LISTEN_FDS: "1", LISTEN_PID: "1" }, PID), null, "a parent's");
  assert.deepEqual(
    passedSocket({ LISTEN_FDS: "1", LISTEN_PID: String(PID), LISTEN_FDNAMES: "vionet0" }, PID),
    { fd: 3, name: "vionet0", count: 1 },
  );
});

Deno.test("passedSocket(): among several, the one named vhost-user; unnamed several is an error", () => {
  const env = { LISTEN_FDS: "3", LISTEN_PID: String(PID), LISTEN_FDNAMES: "a:vhost-user:b" };
  assert.deepEqual(passedSocket(env, PID), { fd: 4, name: "vhost-user", count: 3 });
  assert.throws(
    () => passedSocket({ LISTEN_FDS: "2", LISTEN_PID: String(PID) }, PID),
    /passed 2 sockets; name the vhost-user one with FileDescriptorName=vhost-user/,
  );
  assert.throws(
    () => passedSocket({ ...env, LISTEN_FDNAMES: "a:b:c" }, PID),
    /\(a, b, c\); name the vhost-user one/,
  );
});

Deno.test("passedSocket(): malformed variables meant for us are errors, naming them", async (t) => {
  const cases: [Record<string, string>, RegExp][] = [
    [{ LISTEN_FDS: "0", LISTEN_PID: String(PID) }, /LISTEN_FDS "0"/],
    [{ LISTEN_FDS: "x", LISTEN_PID: String(PID) }, /LISTEN_FDS "x"/],
    [{ LISTEN_FDS: "-1", LISTEN_PID: String(PID) }, /LISTEN_FDS "-1"/],
    [{ LISTEN_FDS: "1", LISTEN_PID: "me" }, /LISTEN_PID "me"/],
    [{ LISTEN_FDS: "2", LISTEN_PID: String(PID), LISTEN_FDNAMES: "one" }, /names 1 .* passes 2/],
  ];
  for (const [env, why] of cases) {
    await t.step(JSON.stringify(env), () => {
      assert.throws(
        () => passedSocket(env, PID),
        (e) => e instanceof ListenFdsError && why.test(e.message),
      );
    });
  }
});

Deno.test("parseOptions(): a passed socket is served like --fd; with --socket-path, --fd or --client it is a usage error", () => {
  const env = { LISTEN_FDS: "1", LISTEN_PID: String(PID) };
  const o = parseOptions(["--tap", "t0"], env, PID);
  assert.equal(o.listenFd, 3);
  assert.equal(o.socketPath, null);
  assert.deepEqual(o.socketActivated, { fd: 3, name: null, count: 1 });
  assert.equal(parseOptions([], env, PID + 1).listenFd, null, "another process's variables");
  assert.equal(parseOptions([], env, PID + 1).socketActivated, null);
  for (const args of [["--socket-path", "/tmp/x.sock"], ["--fd", "5"], ["--client"]]) {
    assert.throws(
      () => parseOptions(args, env, PID),
      (e) => e instanceof UsageError && /mutually exclusive/.test(e.message),
      args.join(" "),
    );
  }
  assert.throws(
    () => parseOptions([], { LISTEN_FDS: "zero", LISTEN_PID: String(PID) }, PID),
    (e) => e instanceof UsageError && /^socket activation: LISTEN_FDS/.test(e.message),
  );
});
