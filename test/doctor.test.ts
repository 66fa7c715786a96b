// `fleetcache doctor` against a real agent and Nix configurations that are right, and wrong in
// one way each: every variation must turn exactly the expected checks to FAIL or warn.
import { after, before, describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { startAgentProcess, runCli as fleetcache, keygen, type AgentProcess } from "./helpers/agent.js";
import { addToStore, hasNix, needNix, tempDir } from "./helpers/nix.js";

const NIXOS_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

type Check = { check: string; verdict: string; message: string; fix?: string };

const ALL_OK = {
  agent: "ok", store: "ok", "store-backend": "ok", substituters: "ok", priority: "ok", "trusted-keys": "ok", "stale-keys": "ok",
  "upstream-keys": "ok", "negative-ttl": "ok", "case-hack": "ok", "sign-key": "ok", peers: "ok",
};

// One agent and one key set for every case; each case writes the nix.conf it checks.
describe("doctor against a real agent", { concurrency: false }, () => {
  let ready = false;
  let tmp: ReturnType<typeof tempDir>;
  let agent: AgentProcess | undefined;
  let hostSec: string, hostPub: string, memberPub: string, rotatedPub: string, toml: string, confDir: string;
  let good: Record<string, string>;
  let nixEnv: Record<string, string>;

  before(async () => {
    if (!(await hasNix())) {
      if (process.env.CI === "true") throw new Error("real Nix is required under CI=true but `nix` was not found");
      return;
    }
    tmp = tempDir();
    hostSec = join(tmp.dir, "host.sec");
    hostPub = await keygen("host-a-1", hostSec);
    memberPub = await keygen("host-b-1", join(tmp.dir, "member.sec"));
    rotatedPub = await keygen("host-a-1", join(tmp.dir, "old-host.sec")); // same name, other bytes
    const root = join(tmp.dir, "store");
    writeFileSync(join(tmp.dir, "file"), "doctor\n");
    await addToStore(root, join(tmp.dir, "file"));
    toml = join(tmp.dir, "agent.toml");
    writeFileSync(toml, `sign_key = [${JSON.stringify(hostSec)}]\ntrusted_keys = [${JSON.stringify(memberPub)}]\nstore_root = ${JSON.stringify(root)}\n`);
    agent = await startAgentProcess(["--config", toml]);
    confDir = join(tmp.dir, "nixconf");
    mkdirSync(confDir);
    nixEnv = { NIX_CONF_DIR: confDir, NIX_USER_CONF_FILES: join(confDir, "no-user.conf") };
    good = {
      substituters: `${agent.url} https://cache.nixos.org`,
      "trusted-public-keys": `${hostPub} ${memberPub} ${NIXOS_KEY}`,
      "narinfo-cache-negative-ttl": "0",
    };
    ready = true;
  });

  after(async () => {
    await agent?.stop();
    tmp?.cleanup();
  });

  function skipUnlessReady(t: TestContext): boolean {
    if (!ready) t.skip("nix not installed");
    return ready;
  }
  const writeConf = (settings: Record<string, string>) =>
    writeFileSync(join(confDir, "nix.conf"), Object.entries(settings).map(([k, v]) => `${k} = ${v}\n`).join(""));
  const doctor = async (extra: string[] = []) => {
    const r = await fleetcache(["doctor", "--agent", agent!.url, "--config", toml, "--json", ...extra], nixEnv);
    assert.ok(r.stdout.startsWith("["), `doctor printed no JSON (exit ${r.code}): ${r.stderr}`);
    const checks = JSON.parse(r.stdout) as Check[];
    return { code: r.code, checks, verdicts: Object.fromEntries(checks.map((c) => [c.check, c.verdict])) };
  };
  const expectOnly = async (what: string, changed: Record<string, string>, code: number, extra: string[] = []) => {
    const r = await doctor(extra);
    assert.deepEqual(r.verdicts, { ...ALL_OK, ...changed }, `${what}: ${JSON.stringify(r.checks, null, 2)}`);
    assert.equal(r.code, code, what);
    for (const c of r.checks) if (c.verdict === "FAIL" || c.verdict === "warn") assert.ok(c.fix, `${what}: ${c.check} names a fix`);
    return r.checks;
  };
  const find = (checks: Check[], name: string) => checks.find((c) => c.check === name)!;

  test("a right configuration: every check ok, exit 0, one ok line per check", async (t) => {
    if (!skipUnlessReady(t)) return;
    assert.notEqual(rotatedPub, hostPub);
    writeConf(good);
    const right = await doctor();
    assert.deepEqual(right.verdicts, ALL_OK, JSON.stringify(right.checks, null, 2));
    assert.equal(right.code, 0);
    const text = await fleetcache(["doctor", "--agent", agent!.url, "--config", toml], nixEnv);
    assert.equal(text.code, 0, text.stdout + text.stderr);
    const lines = text.stdout.trim().split("\n");
    assert.equal(lines.length, Object.keys(ALL_OK).length + 1); // one per check, then the summary
    for (const l of lines.slice(0, -1)) assert.match(l, /^ok {4}\S/);
    assert.match(lines.at(-1)!, /^doctor: 0 failed, 0 warnings/);
  });

  test("the agent not among the substituters fails", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, substituters: "https://cache.nixos.org" });
    await expectOnly("agent not a substituter", { substituters: "FAIL", priority: "skip" }, 1);
  });

  test("the agent after cache.nixos.org warns", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, substituters: `${agent!.url}?priority=50 https://cache.nixos.org` });
    await expectOnly("priority after cache.nixos.org", { priority: "warn" }, 0);
  });

  test("this host's key not trusted fails, naming the key", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, "trusted-public-keys": `${memberPub} ${NIXOS_KEY}` });
    const checks = await expectOnly("host key not trusted", { "trusted-keys": "FAIL" }, 1);
    assert.match(find(checks, "trusted-keys").message, /host-a-1 \(this host\)/);
    assert.ok(find(checks, "trusted-keys").fix!.includes(hostPub));
  });

  test("a rotated key trusted instead of the current one fails, and warns of the stale key", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, "trusted-public-keys": `${memberPub} ${rotatedPub} ${NIXOS_KEY}` });
    const checks = await expectOnly("rotated host key trusted instead of the current one", { "trusted-keys": "FAIL", "stale-keys": "warn" }, 1);
    assert.ok(find(checks, "stale-keys").message.includes(rotatedPub));
  });

  test("a rotated key still trusted besides the current one warns", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, "trusted-public-keys": `${good["trusted-public-keys"]} ${rotatedPub}` });
    await expectOnly("rotated key still trusted besides the current one", { "stale-keys": "warn" }, 0);
  });

  test("a negative TTL of an hour warns", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, "narinfo-cache-negative-ttl": "3600" });
    const checks = await expectOnly("negative TTL 3600", { "negative-ttl": "warn" }, 0);
    // The fix is the value the modules set: short enough for the fleet, long enough that one
    // Nix run asks upstream once per missing path (README, "Pointing Nix at it").
    assert.match(find(checks, "negative-ttl").fix!, /narinfo-cache-negative-ttl = 30/);
    assert.doesNotMatch(find(checks, "negative-ttl").fix!, /from memory/);
  });

  test("a negative TTL of 30 s (the modules' default) is ok", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, "narinfo-cache-negative-ttl": "30" });
    await expectOnly("negative TTL 30", {}, 0);
  });

  test("--nix-conf checks that file alone, whatever NIX_CONF_DIR holds", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf({ ...good, substituters: "https://cache.nixos.org" });
    const goodFile = join(tmp.dir, "good-nix.conf");
    writeFileSync(goodFile, Object.entries(good).map(([k, v]) => `${k} = ${v}\n`).join(""));
    await expectOnly("--nix-conf with a right file", {}, 0, ["--nix-conf", goodFile]);
  });

  test("a sign key readable by others fails, with the chmod that fixes it", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf(good);
    chmodSync(hostSec, 0o644);
    try {
      const checks = await expectOnly("sign key mode 0644", { "sign-key": "FAIL" }, 1);
      assert.equal(find(checks, "sign-key").fix, `chmod 600 ${hostSec}`);
    } finally {
      chmodSync(hostSec, 0o600);
    }
  });

  // Last: it stops the agent.
  test("an agent that does not answer fails first", async (t) => {
    if (!skipUnlessReady(t)) return;
    writeConf(good);
    await agent!.stop();
    const down = await doctor();
    assert.equal(down.code, 1);
    assert.deepEqual(down.checks[0]!.check, "agent");
    assert.equal(down.checks[0]!.verdict, "FAIL");
    assert.match(down.checks[0]!.message, /cannot reach the fleetcache agent/);
  });
});

/** One agent (started with `agentArgs`) with a store, its keys, and a nix.conf that is right for it. */
async function doctorFixture(agentArgs: string[] = []) {
  const tmp = tempDir();
  const hostSec = join(tmp.dir, "host.sec");
  const hostPub = await keygen("host-a-1", hostSec);
  const root = join(tmp.dir, "store");
  writeFileSync(join(tmp.dir, "file"), "doctor\n");
  await addToStore(root, join(tmp.dir, "file"));
  const toml = join(tmp.dir, "agent.toml");
  writeFileSync(toml, `sign_key = [${JSON.stringify(hostSec)}]\nstore_root = ${JSON.stringify(root)}\n`);
  const agent = await startAgentProcess(["--config", toml, ...agentArgs]);
  const confDir = join(tmp.dir, "nixconf");
  mkdirSync(confDir);
  const nixEnv = { NIX_CONF_DIR: confDir, NIX_USER_CONF_FILES: join(confDir, "no-user.conf") };
  const good: Record<string, string> = {
    substituters: `${agent.url} https://cache.nixos.org`,
    "trusted-public-keys": `${hostPub} ${NIXOS_KEY}`,
    "narinfo-cache-negative-ttl": "0",
  };
  return {
    agent,
    good,
    writeConf: (settings: Record<string, string>) =>
      writeFileSync(join(confDir, "nix.conf"), Object.entries(settings).map(([k, v]) => `${k} = ${v}\n`).join("")),
    /** Doctor's JSON, and the checks that are not ok (skips included) by name. */
    doctor: async (env: Record<string, string> = {}) => {
      const r = await fleetcache(["doctor", "--agent", agent.url, "--config", toml, "--json"], { ...nixEnv, ...env });
      assert.ok(r.stdout.startsWith("["), `doctor printed no JSON (exit ${r.code}): ${r.stderr}`);
      const checks = JSON.parse(r.stdout) as { check: string; verdict: string; message: string; fix?: string }[];
      const notOk = Object.fromEntries(checks.filter((c) => c.verdict !== "ok").map((c) => [c.check, c.verdict]));
      return { code: r.code, checks, notOk, find: (name: string) => checks.find((c) => c.check === name) };
    },
    async cleanup() {
      await agent.stop();
      tmp.cleanup();
    },
  };
}

test("doctor: a setting Nix does not know warns, naming it; Nix's own warnings about a right configuration stay out", async (t) => {
  if (!(await needNix(t))) return;
  const f = await doctorFixture();
  try {
    f.writeConf(f.good);
    const right = await f.doctor();
    assert.deepEqual(right.notOk, {}, JSON.stringify(right.checks, null, 2)); // no nix-config line at all
    assert.equal(right.code, 0);

    f.writeConf({ ...f.good, "narinfo-cache-negativ-ttl": "0" }); // misspelled: Nix ignores it
    const typo = await f.doctor();
    assert.deepEqual(typo.notOk, { "nix-config": "warn" }, JSON.stringify(typo.checks, null, 2));
    assert.equal(typo.code, 0);
    assert.match(typo.find("nix-config")!.message, /unknown setting 'narinfo-cache-negativ-ttl'/);
    assert.ok(typo.find("nix-config")!.fix);
  } finally {
    await f.cleanup();
  }
});

test("doctor: the agent's use_case_hack must be Nix's use-case-hack, else FAIL naming the agent's flag", async (t) => {
  if (!(await needNix(t))) return;
  const status = async (url: string) => ((await (await fetch(`${url}/api/v1/status`)).json()) as { self: { useCaseHack?: unknown } }).self;
  const off = await doctorFixture(); // the default on Linux, as Nix's
  try {
    assert.equal((await status(off.agent.url)).useCaseHack, false);
    off.writeConf(off.good);
    const same = await off.doctor();
    assert.deepEqual(same.notOk, {}, JSON.stringify(same.checks, null, 2));
    assert.equal(same.find("case-hack")?.verdict, "ok");

    off.writeConf({ ...off.good, "use-case-hack": "true" });
    const differ = await off.doctor();
    assert.deepEqual(differ.notOk, { "case-hack": "FAIL" }, JSON.stringify(differ.checks, null, 2));
    assert.equal(differ.code, 1);
    assert.match(differ.find("case-hack")!.fix!, /(^|[^-])--use-case-hack\b/);
  } finally {
    await off.cleanup();
  }
  const on = await doctorFixture(["--use-case-hack"]);
  try {
    assert.equal((await status(on.agent.url)).useCaseHack, true);
    on.writeConf({ ...on.good, "use-case-hack": "true" });
    const same = await on.doctor();
    assert.deepEqual(same.notOk, {}, JSON.stringify(same.checks, null, 2));
    assert.equal(same.find("case-hack")?.verdict, "ok");
    assert.equal(same.code, 0);

    on.writeConf(on.good); // Nix's default on Linux: off
    const differ = await on.doctor();
    assert.deepEqual(differ.notOk, { "case-hack": "FAIL" }, JSON.stringify(differ.checks, null, 2));
    assert.equal(differ.code, 1);
    assert.match(differ.find("case-hack")!.fix!, /--no-use-case-hack\b/);
  } finally {
    await on.cleanup();
  }
});

// README "Trust": with no upstream key the trust policy has nothing to tell an upstream path's
// contents by, so one compromised fleet host can serve forgeries of anything: doctor says so.
test("doctor: with the mesh on and no upstream key (Nix trusts only fleet keys, or upstream_keys = none) it warns, with the reason and the fix", async (t) => {
  if (!(await needNix(t))) return;
  const f = await doctorFixture(["--p2p-listen", "127.0.0.1:0"]);
  try {
    f.writeConf(f.good); // this host's key and cache.nixos.org's
    const right = await f.doctor();
    assert.deepEqual(right.notOk, { peers: "warn" }, JSON.stringify(right.checks, null, 2)); // a fleet of one
    assert.match(right.find("upstream-keys")!.message, /cache\.nixos\.org-1/);

    const hostKey = f.good["trusted-public-keys"]!.split(" ")[0]!;
    f.writeConf({ ...f.good, "trusted-public-keys": hostKey }); // the fleet's keys only
    const fleetOnly = await f.doctor();
    assert.deepEqual(fleetOnly.notOk, { peers: "warn", "upstream-keys": "warn" }, JSON.stringify(fleetOnly.checks, null, 2));
    assert.equal(fleetOnly.code, 0, "a warning, not a failure: a fleet may mean it");
    const w = fleetOnly.find("upstream-keys")!;
    assert.match(w.message, /Nix trusts no key but the fleet's/);
    assert.match(w.message, /single compromised fleet host can serve forged contents of any path/);
    assert.match(w.fix!, /trusted-public-keys/);
    assert.match(w.fix!, /upstream_keys/);

    // upstream_keys none, as the NixOS module writes it when Nix trusts only the fleet.
    const none = await f.doctor({ FLEETCACHE_UPSTREAM_KEYS: "none" });
    assert.deepEqual(none.notOk, { peers: "warn", "upstream-keys": "warn" }, JSON.stringify(none.checks, null, 2));
    assert.match(none.find("upstream-keys")!.message, /Nix trusts no key but the fleet's .* and upstream_keys is none/);
    assert.match(none.find("upstream-keys")!.fix!, /nix\.settings\.trusted-public-keys/);

    f.writeConf(f.good); // Nix trusts cache.nixos.org, but the agent was told to use no upstream key
    const noneByHand = await f.doctor({ FLEETCACHE_UPSTREAM_KEYS: "none" });
    assert.deepEqual(noneByHand.notOk, { peers: "warn", "upstream-keys": "warn" }, JSON.stringify(noneByHand.checks, null, 2));
    assert.match(noneByHand.find("upstream-keys")!.message, /upstream_keys is none, though Nix trusts cache\.nixos\.org-1/);
    assert.match(noneByHand.find("upstream-keys")!.fix!, /remove upstream_keys/);
  } finally {
    await f.cleanup();
  }
});
