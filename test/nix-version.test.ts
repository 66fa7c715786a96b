// Which Nix the tests run against. `npm test` runs the Nix tests twice: against the Nix on PATH
// (Debian bookworm's 2.8 on CI) and against the current Nix of test/nix/current-nix, with
// FLEETCACHE_EXPECT_NIX_VERSION set. This test proves each Nix command the tests call, and the
// daemon the agent talks to, is that version, so a broken wrapper cannot quietly test 2.8 twice.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { DaemonClient } from "../agent/store/daemon-client.js";
import { needNix, run, tempDir } from "./helpers/nix.js";

const expected = process.env.FLEETCACHE_EXPECT_NIX_VERSION;
const COMMANDS = ["nix", "nix-store", "nix-build", "nix-instantiate", "nix-daemon"];

/** "2.26.3" from "nix (Nix) 2.26.3". */
async function versionOf(cmd: string): Promise<string> {
  const out = (await run(cmd, ["--version"])).trim();
  const m = /^\S+ \(Nix\) (\d+\.\d+\S*)$/.exec(out);
  assert.ok(m, `${cmd} --version said ${JSON.stringify(out)}`);
  return m[1]!;
}

test(`every Nix command on PATH is the same Nix${expected ? `, ${expected}` : ""}`, async (t) => {
  if (!(await needNix(t))) return;
  const versions = await Promise.all(COMMANDS.map(versionOf));
  t.diagnostic(`Nix under test: ${versions[0]}`);
  assert.deepEqual(versions, COMMANDS.map(() => versions[0]), `${COMMANDS.join(", ")} differ`);
  if (expected) assert.ok(versions[0]!.startsWith(`${expected}.`), `expected Nix ${expected}, PATH has ${versions[0]}`);
});

test("the daemon the agent's client reaches tells the same version over its socket", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  const socket = join(tmp.dir, "nix/var/nix/daemon-socket/socket");
  mkdirSync(join(tmp.dir, "nix/var/nix/daemon-socket"), { recursive: true });
  const daemon = spawn("nix-daemon", ["--store", tmp.dir], {
    stdio: "ignore",
    env: { ...process.env, NIX_DAEMON_SOCKET_PATH: socket, NIX_CONFIG: "sandbox = false\nsubstituters =" },
  });
  const client = new DaemonClient(socket);
  try {
    // The socket file appears at bind(), a moment before the daemon listens: retry until it answers.
    let info = await client.check().catch(() => undefined);
    for (let i = 0; i < 200 && !info; i++) info = await sleep(25).then(() => client.check().catch(() => undefined));
    assert.ok(info, "nix-daemon answers on its socket");
    assert.equal(info.nixVersion, await versionOf("nix-daemon"));
  } finally {
    client.close();
    const exited = new Promise((resolve) => daemon.once("exit", resolve));
    daemon.kill("SIGKILL");
    await exited;
    tmp.cleanup();
  }
});
