// The fleetcache command as a user runs it: keygen, configuration precedence, host key creation.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parsePublicKey, verify } from "../protocol/keys.js";
import { fingerprint, parseNarinfo } from "../protocol/narinfo.js";
import { startAgentProcess, runCli as fleetcache } from "./helpers/agent.js";
import { addToStore, needNix, nix, pathInfo, run, tempDir } from "./helpers/nix.js";



test("keygen writes a 0600 Nix secret key that nix store sign accepts, and prints the public key", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  try {
    const sec = join(tmp.dir, "keys", "host.sec");
    const r = await fleetcache(["keygen", "fleet-host-1", "--out", sec, "--public-out", join(tmp.dir, "host.pub")]);
    assert.equal(r.code, 0, r.stderr);
    const pub = r.stdout.trim();
    assert.match(pub, /^fleet-host-1:[A-Za-z0-9+/]{43}=$/);
    assert.equal(readFileSync(join(tmp.dir, "host.pub"), "utf8"), pub);
    assert.equal(statSync(sec).mode & 0o777, 0o600);
    assert.match(readFileSync(sec, "utf8"), /^fleet-host-1:[A-Za-z0-9+/]{86}==$/);
    // Nix signs with our key file, and the signature checks against our public key.
    const root = join(tmp.dir, "store");
    writeFileSync(join(tmp.dir, "f"), "signed\n");
    const path = await addToStore(root, join(tmp.dir, "f"));
    await nix(["store", "sign", "--store", root, "--key-file", sec, path]);
    const [info] = await pathInfo(root, [path]);
    const sig = info!.signatures!.find((s) => s.startsWith("fleet-host-1:"))!;
    const fp = `1;${path};${(await nix(["hash", "to-base32", info!.narHash])).trim().replace(/^/, "sha256:")};${info!.narSize};`;
    assert.ok(verify([parsePublicKey(pub)], fp, sig), "Nix's signature verifies with the printed public key");
    // Existing files are not overwritten without --force.
    const again = await fleetcache(["keygen", "fleet-host-1", "--out", sec]);
    assert.equal(again.code, 1);
    assert.match(again.stderr, /already exists/);
    assert.equal((await fleetcache(["keygen", "fleet-host-1", "--out", sec, "--force"])).code, 0);
    assert.equal((await fleetcache(["keygen", "bad:name", "--out", join(tmp.dir, "x")])).code, 2);
    assert.equal((await fleetcache(["keygen"])).code, 2);
  } finally {
    tmp.cleanup();
  }
});

test("Nix's own key files work with the agent: keys interoperate both ways", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  try {
    await run("nix-store", ["--generate-binary-cache-key", "nixmade-1", join(tmp.dir, "sec"), join(tmp.dir, "pub")]);
    const r = await fleetcache(["agent", "--sign-key", join(tmp.dir, "sec"), "--check-config"]);
    assert.equal(r.code, 0, r.stderr);
    assert.deepEqual(JSON.parse(r.stdout).signKeyFiles, [join(tmp.dir, "sec")]);
  } finally {
    tmp.cleanup();
  }
});

test("configuration: flags over environment over TOML over defaults; mistakes exit 2", async () => {
  const tmp = tempDir();
  try {
    const toml = join(tmp.dir, "fleetcache.toml");
    writeFileSync(toml, 'listen = "127.0.0.1:4000"\npriority = 41\nstore_root = "/srv/store"\nstate_dir = "/tmp/x"\nsign_key = ["/a", "/b"]\n');
    const cfg = async (args: string[], env: NodeJS.ProcessEnv = {}) => {
      const r = await fleetcache(["agent", "--check-config", ...args], env);
      return { ...r, config: r.code === 0 ? JSON.parse(r.stdout) : undefined };
    };
    const defaults = (await cfg([], { FLEETCACHE_CONFIG: "" })).config;
    assert.deepEqual(defaults, {
      listen: { host: "127.0.0.1", port: 37515 },
      storeRoot: "/",
      signKeyFiles: [],
      stateDir: "/var/lib/fleetcache",
      priority: 30,
      p2pListen: "0.0.0.0:37516",
      peers: [],
      trustedKeys: [],
      mdns: true,
      tailscale: false,
      tailscaleStatusFile: null,
      storeBackend: "auto",
      daemonSocket: null,
      useCaseHack: process.platform === "darwin",
      summaryBudget: 8_454_144,
      reconnectWait: 5,
      upstreamKeys: null,
      upstreamCaches: [],
      meshCompression: "auto",
      meshBulk: true,
      sendfile: true,
      directLan: false,
    });
    assert.equal((await cfg(["--reconnect-wait", "20"], { FLEETCACHE_CONFIG: "" })).config.reconnectWait, 20);
    assert.equal((await cfg(["--reconnect-wait", "600"], { FLEETCACHE_CONFIG: "" })).code, 2, "longer than Nix should be held");
    const up = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
    const upCfg = (await cfg(["--upstream-key", up, "--upstream-cache", "https://cache.nixos.org"], { FLEETCACHE_CONFIG: "" })).config;
    assert.deepEqual([upCfg.upstreamKeys, upCfg.upstreamCaches], [[up], ["https://cache.nixos.org"]]);
    assert.deepEqual((await cfg(["--upstream-key", "none"], { FLEETCACHE_CONFIG: "" })).config.upstreamKeys, []);
    assert.equal((await cfg(["--upstream-cache", "ftp://x"], { FLEETCACHE_CONFIG: "" })).code, 2, "not a cache URL the check can ask");
    assert.equal((await cfg(["--summary-budget", "50000"], { FLEETCACHE_CONFIG: "" })).config.summaryBudget, 50_000);
    assert.equal((await cfg(["--mesh-compression", "off"], { FLEETCACHE_CONFIG: "" })).config.meshCompression, "off");
    assert.equal((await cfg([], { FLEETCACHE_CONFIG: "", FLEETCACHE_MESH_COMPRESSION: "zstd" })).config.meshCompression, "zstd");
    assert.equal((await cfg(["--no-mesh-bulk"], { FLEETCACHE_CONFIG: "" })).config.meshBulk, false);
    assert.equal((await cfg([], { FLEETCACHE_CONFIG: "", FLEETCACHE_MESH_BULK: "false" })).config.meshBulk, false);
    assert.equal((await cfg(["--no-sendfile"], { FLEETCACHE_CONFIG: "" })).config.sendfile, false);
    assert.equal((await cfg([], { FLEETCACHE_CONFIG: "", FLEETCACHE_SENDFILE: "false" })).config.sendfile, false);
    assert.equal((await cfg(["--direct-lan"], { FLEETCACHE_CONFIG: "" })).config.directLan, true);
    assert.equal((await cfg(["--direct-lan", "--no-direct-lan"], { FLEETCACHE_CONFIG: "" })).config.directLan, false);
    assert.equal((await cfg([], { FLEETCACHE_CONFIG: "", FLEETCACHE_DIRECT_LAN: "true" })).config.directLan, true);
    assert.equal((await cfg(["--mesh-compression", "gzip"], { FLEETCACHE_CONFIG: "" })).code, 2, "an unknown compression mode");
    assert.equal((await cfg(["--summary-budget", "12"], { FLEETCACHE_CONFIG: "" })).code, 2, "a budget too small for any summary");
    const fromFile = await cfg(["--config", toml]);
    assert.equal(fromFile.code, 2, "sign key files that don't exist are a configuration error");
    writeFileSync(toml, 'listen = "[::1]:4000"\npriority = 41\nstore_root = "/srv/store"\n');
    assert.deepEqual((await cfg(["--config", toml])).config.listen, { host: "::1", port: 4000 });
    assert.equal((await cfg(["--config", toml])).config.priority, 41);
    assert.equal((await cfg(["--config", toml], { FLEETCACHE_PRIORITY: "50" })).config.priority, 50);
    assert.equal((await cfg(["--config", toml, "--priority", "60"], { FLEETCACHE_PRIORITY: "50" })).config.priority, 60);
    assert.equal((await cfg([], { FLEETCACHE_CONFIG: toml })).config.storeRoot, "/srv/store");
    writeFileSync(toml, "direct_lan = true\n");
    assert.equal((await cfg(["--config", toml])).config.directLan, true);
    for (const [bad, why] of [
      ['listen = "nonsense"', /ADDR:PORT/],
      ['listen = "1.2.3.4:99999"', /ADDR:PORT/],
      ["priority = -1", /integer/],
      ['unknwon_key = "x"', /unknown setting "unknwon_key"/],
      ["this is not toml", /invalid TOML/],
      ['trusted_keys = ["nokey"]', /not a Nix public key/],
      ['mdns = "maybe"', /true or false/],
      ['p2p_listen = "nowhere"', /ADDR:PORT/],
      // What the mesh would refuse at start must fail the check too (one parser for both).
      ['p2p_listen = "localhost:37599"', /IP address/],
      ['p2p_listen = "300.1.2.3:37516"', /IP address/],
      ['p2p_listen = "/ip4/127.0.0.1/udp/1"', /TCP multiaddr/],
      ['p2p_listen = "/not/a/multiaddr"', /TCP multiaddr/],
      ['peers = ["bad host:1"]', /not an IP address or a host name/],
      ['peers = ["10.0.0.5:99999"]', /ADDR:PORT/],
    ] as const) {
      writeFileSync(toml, bad + "\n");
      const r = await cfg(["--config", toml]);
      assert.equal(r.code, 2, bad);
      assert.match(r.stderr, why);
    }
    const key = "peer-1:" + Buffer.alloc(32, 1).toString("base64");
    const mesh = (await cfg(["--no-mdns", "--tailscale", "--peer", "10.0.0.1:37516", "--peer", "/dns4/b/tcp/1", "--trusted-key", key, "--p2p-listen", "off"])).config;
    assert.deepEqual([mesh.mdns, mesh.tailscale, mesh.peers, mesh.trustedKeys, mesh.p2pListen], [false, true, ["10.0.0.1:37516", "/dns4/b/tcp/1"], [key], null]);
    assert.deepEqual((await cfg([], { FLEETCACHE_TRUSTED_KEYS: `${key}, ${key}`, FLEETCACHE_MDNS: "no" })).config.trustedKeys, [key, key]);
    assert.equal((await cfg(["--config", join(tmp.dir, "missing.toml")])).code, 2);
    assert.equal((await cfg(["--priority", "x"])).code, 2);
    const localhost = await cfg(["--p2p-listen", "localhost:37599"]);
    assert.equal(localhost.code, 2, "--p2p-listen localhost:37599 is refused by the check, as the mesh would refuse it");
    assert.match(localhost.stderr, /--p2p-listen/);
    assert.deepEqual((await cfg(["--p2p-listen", "[::1]:37599", "--peer", "builder-1.ts.net:37516"])).config.p2pListen, "[::1]:37599");
  } finally {
    tmp.cleanup();
  }
});

test("without a sign key the agent creates its host key (0600) once and signs with it", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  try {
    const root = join(tmp.dir, "store");
    writeFileSync(join(tmp.dir, "f"), "x\n");
    const path = await addToStore(root, join(tmp.dir, "f"));
    const state = join(tmp.dir, "state");
    const first = await startAgentProcess(["--store-root", root, "--state-dir", state]);
    await first.stop();
    const keyFile = join(state, "host-key.sec");
    assert.equal(statSync(keyFile).mode & 0o777, 0o600);
    const pub = readFileSync(join(state, "host-key.pub"), "utf8");
    assert.ok(first.logs().includes(pub), "the public key is logged");
    const key = readFileSync(keyFile, "utf8");
    const second = await startAgentProcess(["--store-root", root, "--state-dir", state]);
    const narinfo = parseNarinfo(await (await fetch(`${second.url}/${path.slice(11, 43)}.narinfo`)).text());
    await second.stop();
    assert.ok(narinfo.sigs.some((s) => verify([parsePublicKey(pub)], fingerprint(narinfo), s)), "signed with the host key");
    assert.equal(readFileSync(keyFile, "utf8"), key, "the key is kept across restarts");
  } finally {
    tmp.cleanup();
  }
});

test("an agent that cannot start says why and exits 1", async () => {
  const tmp = tempDir();
  try {
    const r = await fleetcache(["agent", "--store-root", join(tmp.dir, "nothing"), "--state-dir", join(tmp.dir, "s"), "--listen", "127.0.0.1:0"]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /cannot open the Nix database/);
  } finally {
    tmp.cleanup();
  }
});
