// What the trust policy costs a narinfo lookup: real agents in network namespaces, B and C on one
// bridge, A behind a link proxy (--latency-ms each way, 30 by default), so B asks C first. For
// each case, B's first lookup of fresh paths (its agent remembers an answer for 30 s), timed by
// curl inside B's namespace, with the policy on (B's Nix trusts an upstream key besides the
// fleet's) and off (FLEETCACHE_UPSTREAM_KEYS=none: the first verified answer, as before):
//
//   upstream path: A has it signed by the upstream key, C the same contents signed by fleet keys
//   fleet path, 2 holders: A and C, fleet keys only
//   fleet path, C only: fleet keys only
//   upstream path on C: C has it with the upstream signature (taken at once)
//   upstream build: as "upstream path", but input-addressed (a derivation's output)
//   fleet build, 2 holders: as "fleet path, 2 holders", input-addressed (the policy waits for A's answer too)
//
// The "path" cases are `nix-store --add`ed files: content-addressed (CA fixed:r:sha256), their
// store path names their contents, so a fleet-only answer for one settles the lookup at once.
// The "build" cases are what a fleet builds and what most of cache.nixos.org is: nothing in the
// path vouches for its contents, so a fleet-only answer waits for the other holders.
//
//   npx tsc -p . && node dist/bench/trust-lookup.js [--paths 20] [--latency-ms 30] [--order off,on] [--breakdown]
//
// Needs root and Nix. Prints one line per case and mode: median and p90 in ms. --breakdown runs B
// with debug logs and adds where its lookups' time went: the median time to each holder's answer
// and to the decision, from B's "narinfo lookup decided" lines.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import type { ChildProcess } from "node:child_process";
import { startProxy } from "../faults/fleet-tools.js";
import { announcedTo, createFleet, eventually, P2P_PORT, type FleetHost } from "../test/helpers/fleet.js";
import { createSites } from "../test/helpers/netns.js";
import { NIX_FLAGS, OFFLINE, run, tempDir } from "../test/helpers/nix.js";

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}
const PATHS = Number(arg("paths", "20"));
const LATENCY_MS = Number(arg("latency-ms", "30"));
// Which mode runs first (the agent B runs each on a fresh start): --order on,off or off,on.
const ORDER = arg("order", "off,on").split(",") as ("on" | "off")[];
const BREAKDOWN = process.argv.includes("--breakdown");

const CASES = ["upstream path", "fleet path, 2 holders", "fleet path, C only", "upstream path on C", "upstream build", "fleet build, 2 holders"] as const;

async function addFiles(host: FleetHost, names: string[]): Promise<string[]> {
  const files = names.map((n) => {
    const f = join(host.dir, n);
    writeFileSync(f, `${n}\n`);
    return f;
  });
  return (await run("nix-store", ["--store", host.storeRoot, "--add", ...files])).trim().split("\n");
}

/** Medians from B's debug lines for these paths: ms to A's and C's answers, and to the decision. */
async function breakdown(B: FleetHost, storePaths: string[]): Promise<string> {
  const names = new Map(((await B.status()).peers as { name: string; peerId: string }[]).map((p) => [p.peerId, p.name.replace(/-1$/, "").toUpperCase()]));
  const want = new Set(storePaths.map((p) => p.slice(11, 43)));
  const per = new Map<string, number[]>([["decided", []]]);
  for (const line of B.agent!.logs().split("\n")) {
    if (!line.includes("narinfo lookup decided")) continue;
    const e = JSON.parse(line) as { hashPart: string; ms: number; answers: Record<string, number> };
    if (!want.has(e.hashPart)) continue;
    per.get("decided")!.push(e.ms);
    for (const [peer, t] of Object.entries(e.answers)) {
      const k = `${names.get(peer) ?? peer} answered`;
      per.set(k, [...(per.get(k) ?? []), t]);
    }
  }
  return [...per].map(([k, xs]) => `${k} ${xs.length ? pct(xs, 0.5).toFixed(1) : "-"} ms (${xs.length})`).join(", ");
}

/** Input-addressed outputs (deterministic: the same on every host that builds them) of one derivation per name, in `host`'s store. */
async function buildOutputs(host: FleetHost, names: string[]): Promise<string[]> {
  const expr = join(host.dir, `outputs-${names[0]}.nix`);
  const drvs = names.map((n) => `(derivation { name = "${n}"; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "echo ${n} > $out" ]; })`);
  writeFileSync(expr, `[ ${drvs.join(" ")} ]`);
  return (await run("nix-build", ["--store", host.storeRoot, ...OFFLINE, expr, "--no-out-link"])).trim().split("\n");
}

const pct = (xs: number[], p: number) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(p * xs.length))]!;

async function main(): Promise<void> {
  const tmp = tempDir("fleetcache-trust-bench-");
  const sites = await createSites([2, 1]);
  const fleet = await createFleet(["a", "b", "c"], { hosts: [sites.sites[1]![0]!, sites.sites[0]![0]!, sites.sites[0]![1]!], destroy: sites.destroy });
  const [A, B, C] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
  let proxy: ChildProcess | undefined;
  try {
    const aViaLink = `${sites.link.linkIps[0]}:${P2P_PORT}`;
    proxy = (await startProxy(sites.link, aViaLink, `${A.net.ip}:${P2P_PORT}`, { latencyMs: LATENCY_MS })).child;
    const upSec = join(tmp.dir, "up.sec");
    const upPubFile = join(tmp.dir, "up.pub");
    await run("nix-store", ["--generate-binary-cache-key", "upstream-1", upSec, upPubFile]);
    const upPub = (await run("cat", [upPubFile])).trim();

    // Paths per mode and case: names differ, so every lookup is a first one.
    const paths = new Map<string, string[]>();
    for (const mode of ["on", "off"]) {
      for (const c of CASES) {
        const names = Array.from({ length: PATHS }, (_, i) => `${mode}-${c.replace(/\W+/g, "-")}-${i}`);
        const built = c.includes("build");
        const onC = built ? await buildOutputs(C, names) : await addFiles(C, names);
        if (c !== "fleet path, C only" && c !== "upstream path on C") {
          const onA = built ? await buildOutputs(A, names) : await addFiles(A, names);
          if (onA.join() !== onC.join()) throw new Error(`${c}: A and C have other store paths`);
        }
        if (c.startsWith("upstream path") || c === "upstream build") {
          const signed = c === "upstream path on C" ? C : A;
          await run("nix", [...NIX_FLAGS, "store", "sign", "--store", signed.storeRoot, "--key-file", upSec, ...onC]);
        }
        paths.set(`${mode} ${c}`, onC);
      }
    }
    await addFiles(B, ["b-own"]);
    await A.start();
    await C.start(["--peer", `${B.net.ip}:${P2P_PORT}`]);
    const nixConfig = `trusted-public-keys = ${upPub} ${fleet.trustedKeys.join(" ")}`;
    for (const mode of ORDER) {
      const debug = BREAKDOWN ? { FLEETCACHE_LOG_LEVEL: "debug" } : {};
      await B.start(["--peer", aViaLink], undefined, mode === "on" ? { NIX_CONFIG: nixConfig, ...debug } : { NIX_CONFIG: nixConfig, FLEETCACHE_UPSTREAM_KEYS: "none", ...debug });
      await announcedTo(B, A);
      await announcedTo(B, C);
      await eventually("B ranks C before A", async () => {
        const peers = (await B.status()).peers as { name: string; rttMs?: number }[];
        const a = peers.find((p) => p.name === "a-1")?.rttMs;
        const c = peers.find((p) => p.name === "c-1")?.rttMs;
        return a !== undefined && c !== undefined && c < a;
      }, 60_000);
      for (const c of CASES) {
        const ms: number[] = [];
        for (const p of paths.get(`${mode} ${c}`)!) {
          const out = await B.exec("curl", ["-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", `${B.agent!.url}/${p.slice(11, 43)}.narinfo`]);
          const [code, secs] = out.trim().split(" ");
          if (code !== "200") throw new Error(`${c}: ${p} answered ${code}`);
          ms.push(Number(secs) * 1000);
        }
        console.log(`policy ${mode.padEnd(3)} ${c.padEnd(22)} median ${pct(ms, 0.5).toFixed(1)} ms, p90 ${pct(ms, 0.9).toFixed(1)} ms (${ms.length} first lookups)`);
        if (BREAKDOWN) console.log(`  ${await breakdown(B, paths.get(`${mode} ${c}`)!)}`);
      }
    }
  } finally {
    proxy?.kill("SIGTERM");
    await fleet.destroy();
    tmp.cleanup();
  }
}

await main();
