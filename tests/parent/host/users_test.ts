import assert from "node:assert/strict";
import { lookupUser, resolveUser, UnknownUserError } from "../../../parent/host/users.ts";
import { planUser } from "../../../parent/host/sandbox.ts";

const nobody = lookupUser("nobody");

Deno.test({
  name: "resolveUser(): a name through getpwnam, UID:GID as given, the default vionet then nobody",
  ignore: nobody === null,
  fn() {
    const byName = resolveUser("nobody");
    assert.deepEqual(byName, { name: "nobody", ...nobody!, chosen: "option" });
    assert.deepEqual(resolveUser("1234:5678"), {
      name: "1234:5678",
      uid: 1234,
      gid: 5678,
      chosen: "option",
    });
    const fallback = resolveUser(null);
    assert.equal(fallback.chosen, "default");
    assert.equal(fallback.name, lookupUser("vionet") ? "vionet" : "nobody");
    assert.throws(() => resolveUser("no-such-user-here"), UnknownUserError);
    assert.throws(() => resolveUser("4294967295:1"), UnknownUserError);
  },
});

Deno.test("planUser(): root switches (or keeps uid 0 for a root user); unprivileged keeps its ids or refuses another", () => {
  const user = { name: "nobody", uid: 65534, gid: 65534, chosen: "default" as const };
  assert.deepEqual(planUser(user, 0), { switchTo: { uid: 65534, gid: 65534 } });
  assert.deepEqual(planUser({ ...user, name: "root", uid: 0, gid: 0, chosen: "option" }, 0), {
    keep: "root",
    uid: 0,
  });
  // Started by a supervisor as uid 1000 with --tap-fd and --fd: nothing to give up.
  assert.deepEqual(planUser(user, 1000), { keep: "unprivileged", uid: 1000 });
  assert.deepEqual(planUser({ ...user, uid: 1000, chosen: "option" }, 1000), {
    keep: "unprivileged",
    uid: 1000,
  });
  assert.throws(
    () => planUser({ ...user, chosen: "option" }, 1000),
    /--user nobody: switching users needs root at set-up; this process runs as uid 1000/,
  );
});
