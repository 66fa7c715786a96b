// The Nix side of the repository: every .nix file parses, the TOML the modules generate is what
// the agent accepts, the NixOS and nix-darwin modules evaluate to the service, user and Nix
// settings they promise (with nixpkgs' lib.evalModules, when a nixpkgs is available), and the
// plain systemd unit and launchd plist are well-formed and agree with each other.
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { chmodSync, existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parse as parseToml } from "smol-toml";
import { needNix, run, tempDir } from "./helpers/nix.js";
import { AGENT_NODE_FLAGS, runCli } from "./helpers/agent.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const KEY_A = readFileSync(join(ROOT, "nix/tests/keys/a.pub"), "utf8").trim();
const KEY_B = readFileSync(join(ROOT, "nix/tests/keys/b.pub"), "utf8").trim();

function nixFiles(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => {
    const p = join(dir, e.name);
    if (e.isDirectory()) return ["node_modules", "dist", ".git"].includes(e.name) ? [] : nixFiles(p);
    return e.name.endsWith(".nix") ? [p] : [];
  });
}

/** Evaluates a Nix expression to JSON; --read-write-mode lets builtins.toFile write its file. */
async function evalJson(expr: string): Promise<unknown> {
  return JSON.parse(await run("nix-instantiate", ["--eval", "--strict", "--json", "--read-write-mode", "-E", expr]));
}

/** Writes `text` as a config file and asks the agent whether it accepts it. */
async function checkConfig(text: string): Promise<{ code: number; config: Record<string, unknown>; stderr: string }> {
  const { dir, cleanup } = tempDir();
  try {
    const file = join(dir, "fleetcache.toml");
    writeFileSync(file, text);
    const r = await runCli(["agent", "--config", file, "--check-config"]);
    return { code: r.code, config: r.code === 0 ? JSON.parse(r.stdout) : {}, stderr: r.stderr };
  } finally {
    cleanup();
  }
}

test("every .nix file parses", async (t) => {
  if (!(await needNix(t))) return;
  const files = nixFiles(ROOT);
  for (const f of ["flake.nix", "nix/package.nix", "nix/modules/nixos.nix", "nix/modules/darwin.nix", "nix/tests/fleet.nix"]) {
    assert.ok(files.includes(join(ROOT, f)), `${f} exists`);
  }
  for (const f of files) await run("nix-instantiate", ["--parse", f]);
  // The check can fail: a broken file is reported.
  const { dir, cleanup } = tempDir();
  try {
    writeFileSync(join(dir, "broken.nix"), "{ a = 1; ");
    await assert.rejects(run("nix-instantiate", ["--parse", join(dir, "broken.nix")]));
  } finally {
    cleanup();
  }
});

test("to-toml.nix renders settings the agent reads back exactly", async (t) => {
  if (!(await needNix(t))) return;
  const toToml = join(ROOT, "nix/lib/to-toml.nix");
  // Quotes, backslashes, newlines, tabs, control characters, DEL and non-ASCII in values and keys.
  const nasty = 'a "quoted" \\ back\nslash\ttab \u0001 \u007f é 🙂';
  const settings = { listen: "127.0.0.1:4000", peers: ["10.0.0.1:37516", nasty], mdns: false, priority: 7, state_dir: null, "odd key": nasty, [nasty]: "k" };
  const { dir, cleanup } = tempDir();
  t.after(cleanup);
  const json = join(dir, "settings.json");
  writeFileSync(json, JSON.stringify(settings));
  const text = (await evalJson(`import ${toToml} (builtins.fromJSON (builtins.readFile ${json}))`)) as string;
  const parsed = { ...parseToml(text) };
  assert.deepEqual(parsed, { listen: "127.0.0.1:4000", peers: ["10.0.0.1:37516", nasty], mdns: false, priority: 7, "odd key": nasty, [nasty]: "k" });
  assert.ok(!text.includes("state_dir"), "null leaves a key out");
  await assert.rejects(evalJson(`import ${toToml} { x = { nested = 1; }; }`), /expected a string, integer, boolean or list/);
  await assert.rejects(evalJson(`import ${toToml} { x = 1.5; }`), /x is a float/);
});

test("package.nix's npmDepsHash belongs to this package-lock.json, whose entries Nix can fetch", () => {
  const packageNix = readFileSync(join(ROOT, "nix/package.nix"), "utf8");
  const lockText = readFileSync(join(ROOT, "package-lock.json"));
  // The hash can only be computed by nixpkgs' prefetch-npm-deps, which is not here: package.nix
  // records which lock file it was computed for, so a changed lock file cannot go unnoticed. The
  // whole file, not only the entries fetched: prefetch-npm-deps puts package-lock.json itself in
  // its output (npmConfigHook compares it with the source's), so any byte of it changes the hash.
  const recorded = /package-lock\.json with\s+#\s+sha256 ([0-9a-f]{64})/.exec(packageNix)?.[1];
  assert.ok(recorded, "package.nix names the sha256 of the lock file its npmDepsHash is for");
  assert.equal(createHash("sha256").update(lockText).digest("hex"), recorded, "package-lock.json changed: recompute npmDepsHash (see nix/package.nix)");
  assert.match(packageNix, /npmDepsHash = "sha256-[A-Za-z0-9+/]{43}=";/);
  // fetchNpmDeps downloads only entries with a registry URL and an integrity hash.
  const lock = JSON.parse(lockText.toString("utf8")) as { packages: Record<string, { resolved?: string; integrity?: string; link?: boolean }> };
  const entries = Object.entries(lock.packages).filter(([path, p]) => path !== "" && !p.link);
  assert.ok(entries.length > 100);
  for (const [path, p] of entries) {
    assert.match(p.resolved ?? "", /^https:\/\/registry\.npmjs\.org\//, `${path} has a registry URL`);
    assert.match(p.integrity ?? "", /^sha512-/, `${path} has an integrity hash`);
  }
});

test("one Node line: engines, @types/node, the Node CI installs, package.nix's nodejs and the Node running this", () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { engines: { node: string }; devDependencies: Record<string, string> };
  const major = Number(/^>=(\d+)$/.exec(pkg.engines.node)?.[1]);
  assert.ok(major >= 22, `engines.node is ">=N" for a supported Node line (got ${pkg.engines.node})`);
  assert.equal(Number(/^\^(\d+)\./.exec(pkg.devDependencies["@types/node"] ?? "")?.[1]), major, "@types/node has the same major");
  const ci = readFileSync(join(ROOT, ".ci/run"), "utf8");
  assert.equal(Number(/^NODE_MAJOR=(\d+)$/m.exec(ci)?.[1]), major, ".ci/run installs that Node line");
  const packageNix = readFileSync(join(ROOT, "nix/package.nix"), "utf8");
  assert.deepEqual([...new Set(packageNix.match(/nodejs_\d+/g))], [`nodejs_${major}`], "package.nix builds with that Node line");
  const running = Number(process.versions.node.split(".")[0]);
  assert.ok(running >= major, `Node ${process.version} satisfies engines ${pkg.engines.node}`);
  if (process.env.CI === "true") assert.equal(running, major, "CI tests the Node line the package ships");
});

test("the example configuration is accepted by the agent", async () => {
  const r = await checkConfig(readFileSync(join(ROOT, "nix/fleetcache.example.toml"), "utf8"));
  assert.equal(r.code, 0, r.stderr);
  assert.deepEqual(r.config.listen, { host: "127.0.0.1", port: 37515 });
  assert.equal(r.config.p2pListen, "0.0.0.0:37516");
  assert.equal(r.config.stateDir, "/var/lib/fleetcache");
});

/** Node with NODE_OPTIONS set allocates short-lived objects (1 % survive a while); prints the new space's size. */
async function newSpaceAfterChurn(nodeOptions: string): Promise<number> {
  const probe = `const v8 = require("node:v8"); let keep = [];
    for (let r = 0; r < 200; r++) { for (let i = 0; i < 100000; i++) { const o = { i, a: [i] }; if (i % 100 === 0) keep.push(o); } if (keep.length > 20000) keep = keep.slice(10000); }
    console.log(v8.getHeapSpaceStatistics().find((s) => s.space_name === "new_space").space_size);`;
  return Number(await run(process.execPath, ["-e", probe], { env: { ...process.env, NODE_OPTIONS: nodeOptions } }));
}

test("the agent runs with its node flags wherever it is started, and NODE_OPTIONS caps the young generation", async () => {
  // nix/package.nix's wrapper (which the systemd unit, the launchd plist and both modules run),
  // package.json's start script, and the tests' agents (helpers/agent.ts) carry the same flags.
  const packageNix = readFileSync(join(ROOT, "nix/package.nix"), "utf8");
  const wrapped = /wrapProgram \$out\/bin\/fleetcache --prefix NODE_OPTIONS " " "([^"]+)"/.exec(packageNix)?.[1];
  assert.equal(wrapped, AGENT_NODE_FLAGS.join(" "), "package.nix's wrapper puts the agent's flags in NODE_OPTIONS");
  const packageJson = JSON.parse(readFileSync(join(ROOT, "package.json"), "utf8")) as { scripts: Record<string, string> };
  assert.equal(packageJson.scripts.start, `node ${AGENT_NODE_FLAGS.join(" ")} dist/agent/cli.js agent`);
  // What the flag does on this Node: V8 grows the new space to 2 x 64 MiB under this churn
  // without it, and keeps it at 2 x 16 MiB with it (given in NODE_OPTIONS, as the wrapper does).
  const cap = Number(/^--max-semi-space-size=(\d+)$/.exec(AGENT_NODE_FLAGS[0]!)?.[1]);
  assert.ok(cap > 0);
  assert.ok((await newSpaceAfterChurn("")) > 2 * cap * 2 ** 20, "without the flag the new space grows past the cap");
  assert.ok((await newSpaceAfterChurn(AGENT_NODE_FLAGS.join(" "))) <= 2 * cap * 2 ** 20, "with it, it stays within");
});

test("the plain systemd unit passes systemd-analyze verify", async (t) => {
  const unit = readFileSync(join(ROOT, "nix/systemd/fleetcache.service"), "utf8");
  const exec = /^ExecStart=(\S+) agent --config (\S+)$/m.exec(unit);
  assert.ok(exec, "ExecStart runs `fleetcache agent --config FILE`");
  assert.equal(exec[2], "/etc/fleetcache/config.toml");
  for (const line of ["DynamicUser=yes", "StateDirectory=fleetcache", "Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict"]) {
    assert.match(unit, new RegExp(`^${line}$`, "m"));
  }
  if (!existsSync("/usr/bin/systemd-analyze") && !existsSync("/bin/systemd-analyze")) {
    if (process.env.CI === "true") throw new Error("systemd-analyze is required under CI=true");
    t.skip("systemd-analyze not installed");
    return;
  }
  const { dir, cleanup } = tempDir();
  try {
    // verify checks that ExecStart's program exists: point it at a stand-in.
    const program = join(dir, "fleetcache");
    writeFileSync(program, "#!/bin/sh\n");
    chmodSync(program, 0o755);
    const verify = async (text: string) => {
      writeFileSync(join(dir, "fleetcache.service"), text.replaceAll(exec[1]!, program));
      return runCommand("systemd-analyze", ["verify", "--man=no", join(dir, "fleetcache.service")]);
    };
    const good = await verify(unit);
    assert.equal(good.code, 0, good.stderr);
    assert.equal(good.stderr.trim(), "", "no warnings");
    // The check can fail: a misspelt directive is reported.
    const bad = await verify(unit.replace("ProtectHome=yes", "ProtectHomes=yes"));
    assert.match(bad.stderr, /Unknown key 'ProtectHomes'/);
  } finally {
    cleanup();
  }
});

test("the launchd plist runs the same command as the systemd unit", async () => {
  const plist = join(ROOT, "nix/launchd/org.fleetcache.agent.plist");
  const py = "import json, plistlib, sys; print(json.dumps(plistlib.load(open(sys.argv[1], 'rb'))))";
  const doc = JSON.parse(await run("python3", ["-c", py, plist])) as Record<string, unknown>;
  const unit = readFileSync(join(ROOT, "nix/systemd/fleetcache.service"), "utf8");
  const execStart = /^ExecStart=(.+)$/m.exec(unit)![1]!.split(" ");
  assert.deepEqual(doc.ProgramArguments, execStart);
  assert.equal(doc.Label, "org.fleetcache.agent");
  assert.equal(doc.UserName, "_fleetcache");
  assert.equal(doc.RunAtLoad, true);
  assert.deepEqual(doc.KeepAlive, { SuccessfulExit: false });
  assert.match(String(doc.StandardOutPath), /^\/var\/log\//);
});

// --- Module evaluation with nixpkgs' lib ---

/** nixpkgs' lib directory: $FLEETCACHE_NIXPKGS_LIB, or <nixpkgs>/lib. */
async function nixpkgsLib(t: TestContext): Promise<string | undefined> {
  if (!(await needNix(t))) return undefined;
  const candidates = [process.env.FLEETCACHE_NIXPKGS_LIB];
  const found = await run("nix-instantiate", ["--find-file", "nixpkgs"]).catch(() => "");
  if (found.trim()) candidates.push(join(found.trim(), "lib"));
  const lib = candidates.find((c) => c && existsSync(join(c, "default.nix")) && existsSync(join(c, "modules.nix")));
  if (!lib) t.skip("no nixpkgs here: set FLEETCACHE_NIXPKGS_LIB to a nixpkgs lib/ directory (or put nixpkgs on NIX_PATH)");
  return lib;
}

interface Evaluated {
  settings: Record<string, unknown>;
  substituterUrl: string;
  configText: string;
  nix: { settings?: Record<string, unknown> };
  users: { users?: Record<string, Record<string, unknown>>; groups?: Record<string, unknown>; knownUsers?: string[]; knownGroups?: string[] };
  firewall: { allowedTCPPorts?: number[]; allowedUDPPorts?: number[] } | null;
  systemd: { serviceConfig: Record<string, unknown>; wantedBy: string[]; after: string[] } | null;
  launchd: { serviceConfig: Record<string, unknown> } | null;
  activation: string | null;
  systemPackages: string[];
  etc: string[];
  failedAssertions: string[];
}

/** Evaluates nix/modules/<module>.nix with `config` (Nix text for services.fleetcache) and `system` (a module, e.g. Nix's settings). */
async function evalModule(lib: string, module: "nixos" | "darwin", config: string, system = "{ }"): Promise<Evaluated> {
  const expr = `import ${join(ROOT, "test/nix/eval-module.nix")} {
    lib = import ${lib};
    module = ${join(ROOT, `nix/modules/${module}.nix`)};
    configuration = {
      imports = [ (${system}) ];
      services.fleetcache = {
        enable = true;
        package = derivation { name = "fleetcache-0.1.0"; system = "x86_64-linux"; builder = "/bin/sh"; };
      } // (${config});
    };
  }`;
  return (await evalJson(expr)) as Evaluated;
}

test("NixOS module: defaults give a hardened service and Nix pointed at the agent", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  const e = await evalModule(lib, "nixos", `{ trustedKeys = [ "${KEY_A}" "${KEY_B}" ]; }`);

  const checked = await checkConfig(e.configText);
  assert.equal(checked.code, 0, checked.stderr);
  assert.deepEqual(checked.config.listen, { host: "127.0.0.1", port: 37515 });
  assert.equal(checked.config.p2pListen, "0.0.0.0:37516");
  assert.equal(checked.config.stateDir, "/var/lib/fleetcache");
  assert.deepEqual(checked.config.trustedKeys, [KEY_A, KEY_B]);
  assert.equal(checked.config.mdns, true);
  assert.equal(checked.config.tailscale, false);
  assert.equal(checked.config.priority, 30);
  assert.deepEqual(checked.config.signKeyFiles, [], "no key: the agent makes its own host key");

  assert.deepEqual(e.nix.settings, {
    substituters: ["http://127.0.0.1:37515"],
    "trusted-public-keys": [KEY_A, KEY_B],
    "narinfo-cache-negative-ttl": 30,
    "extra-allowed-users": ["fleetcache"],
  });
  assert.equal(e.firewall, null, "firewall untouched unless openFirewall");
  assert.deepEqual(e.users.users?.fleetcache, { isSystemUser: true, group: "fleetcache", home: "/var/lib/fleetcache", description: "fleetcache agent" });
  assert.ok(e.users.groups?.fleetcache);
  assert.deepEqual(e.systemPackages, ["fleetcache-0.1.0"]);

  const svc = e.systemd!.serviceConfig;
  assert.deepEqual(e.systemd!.wantedBy, ["multi-user.target"]);
  assert.ok(e.systemd!.after.includes("nix-daemon.socket"));
  assert.match(String(svc.ExecStart), /^\/nix\/store\/[a-z0-9]{32}-fleetcache-0\.1\.0\/bin\/fleetcache agent --config \/nix\/store\/[a-z0-9]{32}-fleetcache\.toml$/);
  assert.deepEqual(svc.LoadCredential, []);
  for (const [k, v] of Object.entries({
    User: "fleetcache",
    Group: "fleetcache",
    StateDirectory: "fleetcache",
    Restart: "on-failure",
    StandardOutput: "journal",
    NoNewPrivileges: true,
    ProtectSystem: "strict",
    ProtectHome: true,
    PrivateTmp: true,
    PrivateDevices: true,
    CapabilityBoundingSet: "",
    MemoryDenyWriteExecute: false,
  })) {
    assert.deepEqual(svc[k], v, k);
  }
  assert.deepEqual(svc.RestrictAddressFamilies, ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"]);
});

test("NixOS module: the same hardening as the plain unit that test/systemd-unit runs under systemd", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  const svc = (await evalModule(lib, "nixos", "{ }")).systemd!.serviceConfig;
  const unit = readFileSync(join(ROOT, "nix/systemd/fleetcache.service"), "utf8");
  const service = unit.slice(unit.indexOf("[Service]"), unit.indexOf("[Install]"));
  const directives = new Map<string, string[]>();
  for (const line of service.split("\n")) {
    const m = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (m) directives.set(m[1]!, [...(directives.get(m[1]!) ?? []), m[2]!]);
  }
  // The unit makes its user on the fly; the module has a named one. Both run `agent --config`.
  const differ = new Set(["ExecStart", "DynamicUser"]);
  const asModule = (v: unknown): string[] =>
    (Array.isArray(v) ? v : [v]).map((x) => (x === true ? "yes" : x === false ? "no" : String(x)));
  assert.ok(directives.size > 25);
  for (const [key, values] of directives) {
    if (differ.has(key)) continue;
    const expected = key === "RestrictAddressFamilies" ? values.flatMap((v) => v.split(" ")) : values;
    assert.deepEqual(asModule(svc[key]), expected, key);
  }
  assert.equal(svc.User, "fleetcache");
});

test("NixOS module: options reach the agent's configuration and the system", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  const e = await evalModule(
    lib,
    "nixos",
    `{
      listen = "0.0.0.0:4000";
      p2pPort = 4001;
      openFirewall = true;
      signKeyFile = "/run/agenix/fleet key";
      trustedKeys = [ "${KEY_A}" ];
      peers = [ "build1.example.org:4001" ];
      mdns = false;
      tailscale = false;
      priority = 20;
      settings = { priority = 10; state_dir = "/srv/fleetcache"; };
    }`,
  );
  const checked = await checkConfig(e.configText);
  assert.equal(checked.code, 0, checked.stderr);
  assert.deepEqual(checked.config.listen, { host: "0.0.0.0", port: 4000 });
  assert.equal(checked.config.p2pListen, "0.0.0.0:4001");
  assert.deepEqual(checked.config.peers, ["build1.example.org:4001"]);
  assert.equal(checked.config.mdns, false);
  assert.equal(checked.config.priority, 10, "settings win over the option");
  assert.equal(checked.config.stateDir, "/srv/fleetcache");

  assert.equal(e.substituterUrl, "http://127.0.0.1:4000", "a wildcard listen address is reached on loopback");
  assert.deepEqual(e.nix.settings?.substituters, ["http://127.0.0.1:4000"]);
  assert.deepEqual(e.firewall, { allowedTCPPorts: [4001, 4002], allowedUDPPorts: [] }, "the mesh port and the bulk port next to it");
  const svc = e.systemd!.serviceConfig;
  assert.deepEqual(svc.LoadCredential, ["sign-key:/run/agenix/fleet key"]);
  assert.match(String(svc.ExecStart), / --sign-key %d\/sign-key$/);


  const v6 = await evalModule(lib, "nixos", `{ listen = "[::]:4000"; mdns = true; openFirewall = true; }`);
  assert.equal(v6.substituterUrl, "http://[::1]:4000");
  assert.deepEqual(v6.firewall?.allowedUDPPorts, [5353], "mDNS port opened when mdns is on");
  assert.equal((await checkConfig(v6.configText)).code, 0);
  const noBulk = await evalModule(lib, "nixos", `{ openFirewall = true; mdns = false; settings.mesh_bulk = false; }`);
  assert.deepEqual(noBulk.firewall?.allowedTCPPorts, [37516], "no bulk port opened with mesh_bulk off");
  assert.equal((await checkConfig(noBulk.configText)).code, 0);
  const direct = await evalModule(lib, "nixos", `{ openFirewall = true; mdns = false; settings.direct_lan = true; }`);
  assert.deepEqual(direct.firewall?.allowedTCPPorts, [37516, 37517, 37518], "the direct port opened with direct_lan on");
  assert.equal((await checkConfig(direct.configText)).code, 0);

  // The negative TTL is the operator's choice (bench/negative-ttl.ts measures what it costs).
  const fresh = await evalModule(lib, "nixos", `{ narinfoCacheNegativeTtl = 0; }`);
  assert.equal(fresh.nix.settings?.["narinfo-cache-negative-ttl"], 0);

  const off = await evalModule(lib, "nixos", `{ configureNix = false; }`);
  assert.deepEqual(off.nix.settings, { "extra-allowed-users": ["fleetcache"] }, "configureNix = false leaves Nix's substituters alone");
});

test("both modules: upstream keys default to Nix's trusted keys without the fleet's; upstream caches reach the agent", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  const UPSTREAM = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
  const EXTRA = "extra-cache-1:vBJFgKIa1dIwQZuoOBEDgzvuZS3uDxlNT43tbvdfZNk=";
  // Nix's key lists declared as NixOS and nix-darwin declare them (lists that merge), holding
  // cache.nixos.org's key as the system's own definition, and another upstream.
  const nixSettings = `{ lib, ... }: with lib; {
    options.nix = mkOption { default = { }; type = types.submodule { freeformType = types.lazyAttrsOf types.anything;
      options.settings = mkOption { default = { }; type = types.submodule { freeformType = types.lazyAttrsOf types.anything;
        options.trusted-public-keys = mkOption { type = types.listOf types.str; default = [ ]; };
        options.extra-trusted-public-keys = mkOption { type = types.listOf types.str; default = [ ]; }; }; }; }; };
    config.nix.settings.trusted-public-keys = [ "${UPSTREAM}" ];
    config.nix.settings.extra-trusted-public-keys = [ "${EXTRA}" ];
  }`;
  for (const module of ["nixos", "darwin"] as const) {
    const e = await evalModule(lib, module, `{ trustedKeys = [ "${KEY_A}" "${KEY_B}" ]; }`, nixSettings);
    assert.deepEqual((e.nix.settings?.["trusted-public-keys"] as string[]).sort(), [UPSTREAM, KEY_A, KEY_B].sort(), `${module}: Nix trusts upstream and fleet`);
    const checked = await checkConfig(e.configText);
    assert.equal(checked.code, 0, checked.stderr);
    assert.deepEqual(checked.config.upstreamKeys, [UPSTREAM, EXTRA], `${module}: the fleet's keys are not upstream keys`);
    assert.deepEqual(checked.config.upstreamCaches, [], `${module}: no upstream check unless asked for`);

    const set = await evalModule(lib, module, `{ trustedKeys = [ "${KEY_A}" ]; upstreamKeys = [ "${EXTRA}" ]; upstreamCaches = [ "https://cache.nixos.org" ]; }`, nixSettings);
    const c2 = await checkConfig(set.configText);
    assert.equal(c2.code, 0, c2.stderr);
    assert.deepEqual(c2.config.upstreamKeys, [EXTRA]);
    assert.deepEqual(c2.config.upstreamCaches, ["https://cache.nixos.org"]);
  }
  // Nix trusting nothing but the fleet: explicitly no upstream keys (not Nix's, read again by the agent).
  const fleetOnly = await checkConfig((await evalModule(lib, "nixos", `{ trustedKeys = [ "${KEY_A}" ]; }`)).configText);
  assert.deepEqual(fleetOnly.config.upstreamKeys, []);
});

test("NixOS module: bad values are refused", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  await assert.rejects(evalModule(lib, "nixos", `{ priority = 20000; }`), /priority/);
  await assert.rejects(evalModule(lib, "nixos", `{ p2pPort = 70000; }`), /p2pPort/);
  await assert.rejects(evalModule(lib, "nixos", `{ trustedKeys = "k"; }`), /trustedKeys/);
  await assert.rejects(evalModule(lib, "nixos", `{ listen = "localhost"; }`), /expected HOST:PORT/);
  // A key the agent does not know passes the module's free-form settings but not the agent.
  const typo = await evalModule(lib, "nixos", `{ settings.trusted_key = [ "x" ]; }`);
  const checked = await checkConfig(typo.configText);
  assert.equal(checked.code, 2);
  assert.match(checked.stderr, /unknown setting "trusted_key"/);
});

test("nix-darwin module: a launchd daemon under its own user, logging to /var/log", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  const e = await evalModule(lib, "darwin", `{ trustedKeys = [ "${KEY_A}" ]; signKeyFile = "/run/agenix/k"; }`);
  const checked = await checkConfig(e.configText);
  assert.equal(checked.code, 0, checked.stderr);
  assert.deepEqual(checked.config.trustedKeys, [KEY_A]);

  const sc = e.launchd!.serviceConfig;
  const args = sc.ProgramArguments as string[];
  assert.match(args[0]!, /^\/nix\/store\/[a-z0-9]{32}-fleetcache-0\.1\.0\/bin\/fleetcache$/);
  assert.deepEqual(args.slice(1, 3), ["agent", "--config"]);
  assert.match(args[3]!, /-fleetcache\.toml$/);
  assert.deepEqual(args.slice(4), ["--sign-key", "/run/agenix/k"]);
  assert.equal(sc.UserName, "_fleetcache");
  assert.equal(sc.RunAtLoad, true);
  assert.deepEqual(sc.KeepAlive, { SuccessfulExit: false });
  assert.equal(sc.StandardOutPath, "/var/log/fleetcache.log");
  assert.equal(sc.StandardErrorPath, "/var/log/fleetcache.log");
  assert.equal((sc.EnvironmentVariables as { PATH: string }).PATH, "/usr/bin:/bin:/usr/sbin:/sbin");

  assert.equal(e.users.users?._fleetcache?.uid, 537);
  assert.deepEqual(e.users.knownUsers, ["_fleetcache"]);
  assert.deepEqual(e.users.knownGroups, ["_fleetcache"]);
  assert.match(e.activation!, /install -d -m 0700 -o _fleetcache -g _fleetcache '?\/var\/lib\/fleetcache'?/);
  assert.deepEqual(e.etc, ["newsyslog.d/fleetcache.conf"]);
  assert.deepEqual(e.nix.settings, {
    substituters: ["http://127.0.0.1:37515"],
    "trusted-public-keys": [KEY_A],
    "narinfo-cache-negative-ttl": 30,
    "extra-allowed-users": ["_fleetcache"],
  });
  assert.equal(e.systemd, null);
});

test("both modules refuse a signKeyFile in the Nix store, naming the fix", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  const keyFile = join(ROOT, "nix/tests/keys/a.sec");
  // A path literal, or a string that names (or was interpolated from) a file in the store: the
  // store is world-readable, so every user on the host, and the agent's own /serve route, could
  // hand the fleet's secret key to anyone.
  const inStore = [keyFile, `"\${${keyFile}}"`, `"/nix/store/${"0".repeat(32)}-key.sec"`];
  for (const module of ["nixos", "darwin"] as const) {
    for (const value of inStore) {
      const e = await evalModule(lib, module, `{ signKeyFile = ${value}; }`);
      assert.equal(e.failedAssertions.length, 1, `${module}, signKeyFile = ${value}: ${JSON.stringify(e.failedAssertions)}`);
      const message = e.failedAssertions[0]!;
      assert.match(message, /services\.fleetcache\.signKeyFile/);
      assert.match(message, /world-readable/);
      assert.match(message, /string path/);
      assert.match(message, /agenix|sops-nix/);
    }
    for (const fine of [`"/run/agenix/fleetcache-key"`, "null"]) {
      const e = await evalModule(lib, module, `{ signKeyFile = ${fine}; }`);
      assert.deepEqual(e.failedAssertions, [], `${module}, signKeyFile = ${fine}`);
    }
  }
});

test("a disabled module defines nothing", async (t) => {
  const lib = await nixpkgsLib(t);
  if (!lib) return;
  for (const module of ["nixos", "darwin"] as const) {
    const e = await evalModule(lib, module, `{ enable = false; }`);
    assert.equal(e.systemd, null);
    assert.equal(e.launchd, null);
    assert.deepEqual(e.nix, {});
    assert.deepEqual(e.systemPackages, []);
  }
});

/** Runs a command and returns its exit code and stderr (warnings come with exit code 0). */
function runCommand(cmd: string, args: string[]): Promise<{ code: number; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, (err, _stdout, stderr) => resolve({ code: err ? (typeof err.code === "number" ? err.code : 1) : 0, stderr }));
  });
}
