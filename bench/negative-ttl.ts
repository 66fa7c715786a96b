// What narinfo-cache-negative-ttl costs the upstream cache. Real Nix builds a closure into a
// chroot store with two substituters, as the modules configure a host: the fleetcache agent
// (priority 30) and a stand-in for cache.nixos.org (priority 40), a static binary cache made by
// `nix copy --to file://` and served on loopback by a server that counts the narinfo requests it
// gets. Each scenario runs with a fresh store and a fresh Nix narinfo cache, once per TTL.
//
//   npx tsc -p . && node dist/bench/negative-ttl.js [--ttl 0,10,3600] [--deps 20] [--apps 20] [--pause S]
//
// The steps run seconds apart, so a small TTL also covers the gaps between invocations; with
// --pause S (more than the TTL) every Nix invocation waits S seconds first, as when an operator
// runs them minutes apart, and only what one invocation asks twice is saved.
//
// Needs root and Nix (nix-build, nix-store, nix), like the tests; nothing leaves loopback.
import { execFile } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { startAgentProcess } from "../test/helpers/agent.js";

const execFileP = promisify(execFile);
const NIX_FLAGS = ["--extra-experimental-features", "nix-command"];
const SANDBOX = ["--option", "sandbox-paths", "/bin /lib /lib64 /usr"];

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}
const TTLS = arg("ttl", "0,10,3600").split(",").map(Number);
const DEPS = Number(arg("deps", "20"));
const APPS = Number(arg("apps", "20"));
const PAUSE_MS = Number(arg("pause", "0")) * 1000;

async function run(cmd: string, args: string[], env: NodeJS.ProcessEnv = {}, allowFail = false): Promise<string> {
  try {
    return (await execFileP(cmd, args, { env: { ...process.env, ...env }, maxBuffer: 64 << 20 })).stdout;
  } catch (e) {
    if (allowFail) return "";
    throw new Error(`${cmd} ${args.join(" ")}: ${(e as { stderr?: string }).stderr ?? String(e)}`);
  }
}

/**
 * The closure: DEPS leaf packages that upstream has (as if from cache.nixos.org), APPS packages
 * built on the host from them (a configuration: units, /etc, wrappers), one "system" path over
 * all, and a package whose build fails while `fail` is true. `seed` changes one app (a rebuild
 * after a configuration change).
 */
const EXPR = `{ seed ? "0", fail ? false, withBroken ? false }:
let
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
  deps = builtins.genList (i: mk "dep-\${toString i}" "echo dep \${toString i} > $out") ${DEPS};
  apps = builtins.genList (i: mk "app-\${toString i}" ''
    echo app \${toString i} \${if i == 0 then seed else ""} > $out
    \${builtins.concatStringsSep "\\n" (map (d: "echo \${d} >> $out") deps)}
  '') ${APPS};
  broken = mk "broken-app" "echo \${builtins.elemAt deps 0}; \${if fail then "exit 1" else "true"}; echo ok > $out";
in mk "system" ''
  \${builtins.concatStringsSep "\\n" (map (a: "echo \${a} >> $out") (apps ++ (if withBroken then [ broken ] else [ ])))}
''
`;

interface Counts {
  narinfo: number;
  narinfoHits: number;
  nar: number;
}

/** A static binary cache on loopback that counts what it is asked. */
async function countingCache(dir: string): Promise<{ url: string; counts: Counts; reset(): void; close(): Promise<void> }> {
  const counts: Counts = { narinfo: 0, narinfoHits: 0, nar: 0 };
  const server = http.createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url ?? "/", "http://x").pathname);
    const file = join(dir, path);
    if (path.includes("..")) return void res.writeHead(400).end();
    const found = existsSync(file) && path !== "/";
    if (path.endsWith(".narinfo")) {
      counts.narinfo++;
      if (found) counts.narinfoHits++;
    } else if (path.startsWith("/nar/")) counts.nar++;
    if (!found) return void res.writeHead(404).end();
    res.writeHead(200).end(req.method === "HEAD" ? undefined : readFileSync(file));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    counts,
    reset() {
      counts.narinfo = counts.narinfoHits = counts.nar = 0;
    },
    close: () => new Promise((r) => server.close(() => r())),
  };
}

async function main(): Promise<void> {
  const tmp = mkdtempSync(join(tmpdir(), "fleetcache-negttl-"));
  try {
    const exprFile = join(tmp, "system.nix");
    writeFileSync(exprFile, EXPR);
    // Upstream: the leaf packages, built once, signed and copied into a static cache.
    const upstreamStore = join(tmp, "upstream-store");
    const key = join(tmp, "upstream.sec");
    await run("nix-store", ["--generate-binary-cache-key", "upstream-1", key, `${key}.pub`]);
    const pub = readFileSync(`${key}.pub`, "utf8").trim();
    const depsExpr = join(tmp, "deps.nix");
    // The same expression, returning the leaves: the same derivations, so the same paths.
    writeFileSync(depsExpr, EXPR.replace(/in mk "system"[\s\S]*$/, "in deps\n"));
    const depPaths = (await run("nix-build", ["--store", upstreamStore, "--option", "substituters", "", ...SANDBOX, depsExpr, "--no-out-link"])).trim().split("\n");
    await run("nix", [...NIX_FLAGS, "store", "sign", "--store", upstreamStore, "--key-file", key, ...depPaths]);
    const cacheDir = join(tmp, "upstream-cache");
    await run("nix", [...NIX_FLAGS, "copy", "--from", upstreamStore, "--to", `file://${cacheDir}?compression=none`, ...depPaths]);
    writeFileSync(join(cacheDir, "nix-cache-info"), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 40\n");
    const upstream = await countingCache(cacheDir);
    console.log(`upstream: ${depPaths.length} leaf paths; the closure adds ${APPS} apps and a system path built locally\n`);

    const rows: { scenario: string; byTtl: Map<number, Counts> }[] = [];
    const record = (scenario: string, ttl: number) => {
      let row = rows.find((r) => r.scenario === scenario);
      if (!row) rows.push((row = { scenario, byTtl: new Map() }));
      row.byTtl.set(ttl, { ...upstream.counts });
      upstream.reset();
    };

    for (const ttl of TTLS) {
      const dir = join(tmp, `client-${ttl}`);
      const store = join(dir, "store");
      mkdirSync(dir, { recursive: true });
      // The agent needs a store to serve: one unrelated path.
      writeFileSync(join(dir, "seed.txt"), "seed\n");
      await run("nix-store", ["--store", store, "--add", join(dir, "seed.txt")]);
      const agent = await startAgentProcess(["--store-root", store, "--state-dir", join(dir, "state")], { FLEETCACHE_LOG_LEVEL: "info" });
      const agentPub = readFileSync(join(dir, "state", "host-key.pub"), "utf8").trim();
      const env = { XDG_CACHE_HOME: join(dir, "cache") }; // Nix's narinfo cache, fresh per TTL
      const nixOpts = [
        "--store", store, ...SANDBOX,
        "--option", "substituters", `${agent.url} ${upstream.url}`,
        "--option", "trusted-public-keys", `${pub} ${agentPub}`,
        "--option", "narinfo-cache-negative-ttl", String(ttl),
      ];
      let first = true;
      const build = async (args: string[], allowFail = false) => {
        if (!first && PAUSE_MS > 0) await new Promise((r) => setTimeout(r, PAUSE_MS));
        first = false;
        return run("nix-build", [...nixOpts, exprFile, "--no-out-link", ...args], env, allowFail);
      };
      try {
        upstream.reset();
        await build([]);
        record("first build (20 leaves substituted, 21 paths built)", ttl);
        await build(["--argstr", "seed", "1"]);
        record("rebuild after a change (2 paths built)", ttl);
        for (let i = 0; i < 3; i++) await build(["--argstr", "seed", "2", "--dry-run"]);
        record("3 dry runs of the next change", ttl);
        await build(["--argstr", "seed", "2"]);
        record("then that build (2 paths built)", ttl);
        for (let i = 0; i < 3; i++) await build(["--argstr", "seed", "3", "--arg", "withBroken", "true", "--arg", "fail", "true"], true);
        record("a failing build, tried 3 times", ttl);
        await build(["--argstr", "seed", "3", "--arg", "withBroken", "true"]);
        record("then fixed and built", ttl);
        await build(["--argstr", "seed", "3", "--arg", "withBroken", "true"]);
        record("the same build again (nothing to do)", ttl);
      } finally {
        await agent.stop();
      }
    }
    await upstream.close();

    const head = ["scenario", ...TTLS.map((t) => `TTL ${t}: narinfo (hits)`)];
    const lines = rows.map((r) => [r.scenario, ...TTLS.map((t) => `${r.byTtl.get(t)!.narinfo} (${r.byTtl.get(t)!.narinfoHits})`)]);
    const totals = ["total", ...TTLS.map((t) => String(rows.reduce((n, r) => n + r.byTtl.get(t)!.narinfo, 0)))];
    console.log(`narinfo requests to upstream (of which found)${PAUSE_MS ? `, ${PAUSE_MS / 1000} s before each Nix invocation` : ""}:`);
    for (const l of [head, ...lines, totals]) console.log("| " + l.join(" | ") + " |");
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(e);
  process.exit(1);
});
