// `npm run bench`: fleetcache agent vs nginx on the same store contents. See BENCHMARKS.md for
// the method; `--help` for the options. Everything it starts or creates is removed at the end,
// also on failure and Ctrl-C.
import { createHash, createPublicKey, verify } from "node:crypto";
import { chmodSync, mkdirSync, mkdtempSync } from "node:fs";
import http from "node:http";
import { availableParallelism, cpus, release, tmpdir, totalmem } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { fmtBytes, hashPart, makeFixture, type Fixture } from "./fixture.js";
import {
  MemSampler, machineBusy, narThroughput, openFds, pageCacheResidency, pinTree, readStatus, resetPeakRss, runWrk,
  warmFile, withCpuAccounting, writeWrkScript,
  type NarThroughput, type WrkResult,
} from "./load.js";
import { encodeNix32 } from "../protocol/nix32.js";
import { randomHashParts } from "./nix32.js";
import {
  cleanup, commandLog, installSignalHandlers, interrupted, logCommand, registerTempDir, run, setRepoRoot, setTmpRoot,
} from "./proc.js";
import { fmtNum, fmtRatio, table, writeBenchmarksMd } from "./report.js";
import { meshCase, type MeshResult } from "./mesh.js";
import { slowLinkMain } from "./slow-link.js";
import { gcStallMain } from "./gc-stall.js";
import { daemonHitMain } from "./daemon-hit.js";
import { peerNarinfoMain } from "./peer-narinfo.js";
import {
  agentBuilt, httpGet, parseNarinfo, startAgent, startNginx, type Server,
} from "./servers.js";

const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");

const HELP = `Usage: npm run bench -- [options]

Benchmarks the fleetcache agent against nginx serving the same closure as a static binary cache.

  --nar-gib N        size of the big path in GiB (default 3; --quick: 0.0625)
  --small N          number of small paths (default 300; --quick: 50)
  --duration S       seconds per measurement (default 8; --quick: 2)
  --quick            small smoke run; does not write BENCHMARKS.md unless --write
  --write / --no-write   force writing BENCHMARKS.md on or off
  --candidate K      what to compare with nginx: "agent" (default) or "nginx" (a second nginx,
                     to check the harness itself)
  --pin1 MODE        CPU placement for the 1-connection narinfo runs: "same" (default: client
                     and server both on CPU 0), "cross" (client CPU 0, server CPU 1) or "none"
  --idle-wait S      before each measurement, wait up to S seconds for other work on the machine
                     to stop (more than 10 % CPU busy counts as busy; default 60, --quick: 5)
  --retries N        measure again, up to N times, when other work disturbed a run (default 2)
  --repeat N         repeat every measurement N times (servers alternating), report the median
  --mesh-mib N       the mesh case: Nix on one host copies N MiB held by a peer, through the two
                     agents vs from nginx on that peer (default 400; --quick: 64)
  --no-mesh          skip the mesh case (it needs root for network namespaces)
  --mesh-link-rate R the mesh case once more with both hosts' links shaped to R each way (tc's
                     syntax; default 1gbit, a common LAN's line rate; "none" skips it)
  --no-mesh-substitute  skip the mesh case's substitution rows (Nix on B substitutes the closure,
                     as nix build or a system switch does, with Nix's own parallelism; hosts pinned
                     to a CPU each; relayed and LAN-direct)
  --agent-arg ARG    pass ARG to the agent as well (repeatable); by default the agent gets
                     --p2p-listen off --no-mdns --no-tailscale when it knows them
  --agent-cpu-prof DIR   run the agent under node --cpu-prof, profile written to DIR at exit
  --case gc-stall    instead: lookups while Nix garbage-collects a store of a million paths
                     (first argument; \`npm run bench -- --case gc-stall --help\`)
  --case daemon-hit  instead: narinfo hits and misses with the database and the daemon backend
                     (first argument; \`npm run bench -- --case daemon-hit --help\`)
  --case peer-narinfo  instead: narinfo lookups an agent must ask a peer for (two agents on 127.0.0.1;
                     \`npm run bench -- --case peer-narinfo --help\`)
  --case slow-link   instead: Nix copies real binaries from a peer over a 100 Mbit/s link and the
                     LAN, per --mesh-compression mode (\`npm run bench -- --case slow-link --help\`)
  --tmpdir DIR       where to make the temporary directory (default: $TMPDIR or /tmp)
  --keep             keep the temporary directory (store, cache, logs) for inspection
  -h, --help
`;

/** Where the 1-connection runs put the load generator and the server (taskset CPU lists). */
const PIN_MODES: Record<"same" | "cross" | "none", { client: string; server: string } | undefined> = {
  same: { client: "0", server: "0" },
  cross: { client: "0", server: "1" },
  none: undefined,
};

const PIN_DESCRIPTIONS: Record<keyof typeof PIN_MODES, string> = {
  same: "with wrk and the server pinned to the same CPU",
  cross: "with wrk and the server pinned to different CPUs",
  none: "not pinned",
};

interface Options {
  narBytes: number;
  small: number;
  duration: number;
  quick: boolean;
  write: boolean;
  candidate: "agent" | "nginx";
  pin1: keyof typeof PIN_MODES;
  repeat: number;
  retries: number;
  idleWait: number;
  cpuProfDir?: string;
  agentArgs: string[];
  meshMib: number;
  /** The mesh case's extra row on shaped links (tc rate), or undefined: none. */
  meshLinkRate?: string;
  /** The mesh case's substitution rows (relayed and LAN-direct, pinned). */
  meshSubstitute: boolean;
  tmpBase: string;
  keep: boolean;
}

function parseOptions(): Options {
  const { values } = parseArgs({
    options: {
      "nar-gib": { type: "string" },
      small: { type: "string" },
      duration: { type: "string" },
      quick: { type: "boolean", default: false },
      write: { type: "boolean" },
      "no-write": { type: "boolean" },
      candidate: { type: "string", default: "agent" },
      pin1: { type: "string", default: "same" },
      repeat: { type: "string" },
      "idle-wait": { type: "string" },
      retries: { type: "string" },
      "agent-cpu-prof": { type: "string" },
      "agent-arg": { type: "string", multiple: true },
      "mesh-mib": { type: "string" },
      "no-mesh": { type: "boolean", default: false },
      "mesh-link-rate": { type: "string", default: "1gbit" },
      "no-mesh-substitute": { type: "boolean", default: false },
      tmpdir: { type: "string" },
      keep: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (values.help) {
    process.stdout.write(HELP);
    process.exit(0);
  }
  const quick = values.quick ?? false;
  const num = (v: string | undefined, dflt: number, name: string): number => {
    if (v === undefined) return dflt;
    const n = Number(v);
    if (!Number.isFinite(n) || n <= 0) throw new Error(`--${name} needs a positive number, got ${v}`);
    return n;
  };
  const gib = num(values["nar-gib"], quick ? 0.0625 : 3, "nar-gib");
  const candidate = values.candidate;
  if (candidate !== "agent" && candidate !== "nginx") throw new Error(`--candidate must be agent or nginx`);
  const pin1 = values.pin1 ?? "same";
  if (!(pin1 in PIN_MODES)) throw new Error(`--pin1 must be one of ${Object.keys(PIN_MODES).join(", ")}`);
  return {
    narBytes: Math.max(1, Math.round(gib * 2 ** 30)),
    small: Math.round(num(values.small, quick ? 50 : 300, "small")),
    duration: num(values.duration, quick ? 2 : 8, "duration"),
    quick,
    write: values["no-write"] ? false : (values.write ?? (!quick && candidate === "agent")),
    candidate,
    pin1: pin1 as keyof typeof PIN_MODES,
    repeat: Math.round(num(values.repeat, 1, "repeat")),
    retries: values.retries === "0" ? 0 : Math.round(num(values.retries, 2, "retries")),
    idleWait: values["idle-wait"] === "0" ? 0 : num(values["idle-wait"], quick ? 5 : 60, "idle-wait"),
    cpuProfDir: values["agent-cpu-prof"] ? resolve(values["agent-cpu-prof"]) : undefined,
    agentArgs: values["agent-arg"] ?? [],
    meshMib: values["no-mesh"] || candidate !== "agent" ? 0 : num(values["mesh-mib"], quick ? 64 : 400, "mesh-mib"),
    meshLinkRate: values["mesh-link-rate"] === "none" ? undefined : values["mesh-link-rate"],
    meshSubstitute: !values["no-mesh-substitute"],
    tmpBase: values.tmpdir ? resolve(values.tmpdir) : tmpdir(),
    keep: values.keep ?? false,
  };
}

const t0 = Date.now();
function log(msg: string): void {
  const s = ((Date.now() - t0) / 1000).toFixed(0).padStart(4);
  process.stderr.write(`[${s}s] ${msg}\n`);
}

async function firstLine(cmd: string, args: string[]): Promise<string> {
  try {
    const r = await run(cmd, args, { allowFail: true, log: false });
    return (r.stdout + r.stderr).trim().split("\n")[0] ?? "?";
  } catch {
    return "?";
  }
}

async function machineFacts(): Promise<Array<[string, string]>> {
  return [
    ["nproc", String(availableParallelism())],
    ["CPU", cpus()[0]?.model ?? "?"],
    ["RAM", fmtBytes(totalmem())],
    ["kernel", release()],
    ["node", process.version],
    ["nginx", (await firstLine("nginx", ["-v"])).replace(/^nginx version: /, "")],
    ["Nix", await firstLine("nix", ["--version"])],
    ["wrk", (await firstLine("wrk", ["--version"])).replace(/ Copyright.*/, "")],
    ["curl", (await firstLine("curl", ["--version"])).split(" ").slice(0, 2).join(" ")],
  ];
}

// ---------------------------------------------------------------------------------------------
// Checks before measuring

interface NarTarget {
  url: string;
  size: number;
  narHash: string;
  /** The file the server reads the NAR's bytes from (warmed before each NAR run). */
  file?: string;
}

/** Downloads a NAR with a Node client, hashing it; returns bytes, seconds and nix32 sha256. */
function downloadAndHash(url: string): Promise<{ bytes: number; seconds: number; hash: string; status: number }> {
  return new Promise((resolvePromise, reject) => {
    const start = process.hrtime.bigint();
    const req = http.get(url, { agent: false }, (res) => {
      const h = createHash("sha256");
      let bytes = 0;
      res.on("data", (c: Buffer) => {
        bytes += c.length;
        h.update(c);
      });
      res.on("end", () =>
        resolvePromise({
          bytes, status: res.statusCode ?? 0, seconds: Number(process.hrtime.bigint() - start) / 1e9,
          hash: `sha256:${encodeNix32(h.digest())}`,
        }),
      );
      res.on("error", reject);
    });
    req.on("error", reject);
  });
}

function verifySig(publicKey: string, fingerprint: string, sig: string): boolean {
  const [pkName, pkB64] = publicKey.split(":");
  const [sigName, sigB64] = sig.split(":");
  if (!pkB64 || !sigB64 || pkName !== sigName) return false;
  const key = createPublicKey({
    key: { kty: "OKP", crv: "Ed25519", x: Buffer.from(pkB64, "base64").toString("base64url") },
    format: "jwk",
  });
  return verify(null, Buffer.from(fingerprint), key, Buffer.from(sigB64, "base64"));
}

/** Checks a server against Nix's own export (the static cache) and finds its big NAR URL. */
async function checkServer(
  server: Server,
  reference: Server,
  fx: Fixture,
  missHashes: string[],
  publicKey: string | undefined,
  warnings: string[],
): Promise<NarTarget> {
  const warn = (m: string) => {
    warnings.push(`${server.name}: ${m}`);
    log(`WARNING ${server.name}: ${m}`);
  };
  const info = await httpGet(`${server.baseUrl}/nix-cache-info`);
  if (info.status !== 200 || !/StoreDir: \/nix\/store/.test(info.body.toString())) {
    warn(`/nix-cache-info answered ${info.status}: ${info.body.toString().slice(0, 200)}`);
  }
  const sample = [fx.bigPath, ...fx.smallPaths.filter((_, i) => i % Math.max(1, Math.floor(fx.smallPaths.length / 10)) === 0)];
  let bigTarget: NarTarget | undefined;
  let sigsChecked = 0;
  for (const path of sample) {
    const h = hashPart(path);
    const [mine, ref] = await Promise.all([
      httpGet(`${server.baseUrl}/${h}.narinfo`), httpGet(`${reference.baseUrl}/${h}.narinfo`),
    ]);
    if (mine.status !== 200) throw new Error(`${server.name}: GET /${h}.narinfo answered ${mine.status}`);
    const a = parseNarinfo(mine.body.toString());
    const b = parseNarinfo(ref.body.toString());
    for (const k of ["StorePath", "NarHash", "NarSize", "References"]) {
      if ((a.fields.get(k) ?? "") !== (b.fields.get(k) ?? "")) {
        warn(`${h}.narinfo ${k} differs from Nix's: ${a.fields.get(k)} vs ${b.fields.get(k)}`);
      }
    }
    if (!a.fields.get("URL")) throw new Error(`${server.name}: ${h}.narinfo has no URL`);
    if (publicKey) {
      const refs = (a.fields.get("References") ?? "").split(" ").filter(Boolean).map((r) => `/nix/store/${r}`).sort();
      const fp = `1;${a.fields.get("StorePath")};${a.fields.get("NarHash")};${a.fields.get("NarSize")};${refs.join(",")}`;
      const ours = a.sigs.filter((s) => s.startsWith(`${publicKey.split(":")[0]}:`));
      if (ours.length === 0) warn(`${h}.narinfo has no Sig by ${publicKey.split(":")[0]}`);
      else if (!ours.every((s) => verifySig(publicKey, fp, s))) warn(`${h}.narinfo: signature does not verify`);
      else sigsChecked++;
    }
    if (path === fx.bigPath) {
      bigTarget = {
        url: new URL(a.fields.get("URL") ?? "", `${server.baseUrl}/`).toString(),
        size: Number(a.fields.get("NarSize")),
        narHash: b.fields.get("NarHash") ?? "",
      };
    }
  }
  if (publicKey) log(`${server.name}: ${sigsChecked}/${sample.length} narinfo signatures verify`);
  for (const h of missHashes.slice(0, 5)) {
    const r = await httpGet(`${server.baseUrl}/${h}.narinfo`);
    if (r.status !== 404) warn(`miss /${h}.narinfo answered ${r.status}, expected 404`);
  }
  if (!bigTarget) throw new Error("no narinfo for the big path");
  return bigTarget;
}

// ---------------------------------------------------------------------------------------------
// Measurements

type Row = "hit1" | "hit4" | "miss1" | "miss4" | "nar1" | "nar4";
const ROWS: Array<{ key: Row; label: string; conns: number; kind: "hit" | "miss" | "nar" }> = [
  { key: "hit1", label: "narinfo hits/s, 1 conn", conns: 1, kind: "hit" },
  { key: "hit4", label: "narinfo hits/s, 4 conn", conns: 4, kind: "hit" },
  { key: "miss1", label: "narinfo misses/s (404), 1 conn", conns: 1, kind: "miss" },
  { key: "miss4", label: "narinfo misses/s (404), 4 conn", conns: 4, kind: "miss" },
  { key: "nar1", label: "NAR MB/s, 1 conn", conns: 1, kind: "nar" },
  { key: "nar4", label: "NAR MB/s, 4 conn", conns: 4, kind: "nar" },
];

/** Above this fraction of all CPUs busy while the benchmark is idle, the machine counts as busy. */
const BUSY = 0.1;

interface Outcome {
  value?: number;
  /** Fraction of the machine busy with other work just before this measurement. */
  busy: number;
  /** CPU seconds used during the run by the server, by the load generators, by anything else. */
  cpu?: { serverCpu: number; clientCpu: number; otherCpu: number; wall: number };
  /** Server CPU per unit of work: µs per request (narinfo), s per GB (NAR). */
  cost?: number;
  /** Runs it took (more than one when other work disturbed the earlier ones). */
  attempts?: number;
  /** NAR runs: share of the NAR's file in the page cache before it was read once to warm it. */
  warm?: { residency?: number; seconds: number };
  wrk?: WrkResult;
  nar?: NarThroughput;
  error?: string;
  problems: string[];
}

/** The median of repeated outcomes (the lower middle one for an even count), with every
 *  repetition's value and problems attached. */
function median(list: Outcome[] | undefined): (Outcome & { values: number[] }) | undefined {
  if (!list || list.length === 0) return undefined;
  const ok = list.filter((o) => o.value !== undefined).sort((a, b) => (a.value ?? 0) - (b.value ?? 0));
  const problems = [...new Set(list.flatMap((o) => o.problems))];
  const values = list.map((o) => o.value).filter((v): v is number => v !== undefined);
  const pick = ok[Math.floor((ok.length - 1) / 2)] ?? list[0];
  return pick ? { ...pick, problems, values } : undefined;
}

function cpuProblems(acc: { otherCpu: number; wall: number }): string[] {
  const share = acc.wall > 0 ? acc.otherCpu / acc.wall : 0;
  return share > BUSY * availableParallelism()
    ? [`other work on the machine used ${(share * 100).toFixed(0)} % of a CPU during the run`]
    : [];
}

function wrkProblems(r: WrkResult, kind: "hit" | "miss"): string[] {
  const p: string[] = [];
  if (kind === "hit" && r.non2xx > 0) p.push(`${r.non2xx} non-2xx answers to hits`);
  if (kind === "miss" && r.non2xx !== r.requests) p.push(`${r.requests - r.non2xx} of ${r.requests} misses answered 2xx/3xx`);
  const se = r.socketErrors;
  const socket = se.connect + se.read + se.write + se.timeout;
  if (socket > 0) p.push(`socket errors: connect ${se.connect}, read ${se.read}, write ${se.write}, timeout ${se.timeout}`);
  if (r.requests === 0) p.push("no requests completed");
  return p;
}

interface AgentMemory {
  narBytes: number;
  startRssKiB: number;
  beforeRssKiB: number;
  hwmBeforeKiB: number;
  hwmAfterKiB: number;
  hwmReset: boolean;
  phases: ReturnType<MemSampler["peaks"]>;
  peakNarRssKiB: number;
  peakRssKiB: number;
  afterRssKiB: number;
  fdsBefore: number;
  fdsAfter: number;
  slow?: NarThroughput;
}

async function main(): Promise<void> {
  // Other cases have options of their own.
  if (process.argv[2] === "--case") {
    const name = process.argv[3];
    if (name === "gc-stall") return gcStallMain(process.argv.slice(2), repoRoot);
    if (name === "daemon-hit") return daemonHitMain(process.argv.slice(2), repoRoot);
    if (name === "slow-link") return slowLinkMain(process.argv.slice(2));
    if (name === "peer-narinfo") return peerNarinfoMain(process.argv.slice(2), repoRoot);
    throw new Error(`unknown --case ${name} (known: gc-stall, daemon-hit, slow-link, peer-narinfo)`);
  }
  const opts = parseOptions();
  if (opts.candidate === "agent" && !agentBuilt(repoRoot)) {
    throw new Error(
      "dist/agent/cli.js is missing: build the agent (npx tsc -p .) or run with --candidate nginx to check the harness",
    );
  }
  const tmp = mkdtempSync(join(opts.tmpBase, "fleetcache-bench-"));
  // nginx workers run as an unprivileged user and must be able to read the cache below it.
  chmodSync(tmp, 0o755);
  registerTempDir(tmp);
  setTmpRoot(tmp);
  setRepoRoot(repoRoot);
  installSignalHandlers({ keepTemp: opts.keep });
  log(`temporary directory ${tmp}`);

  const facts = await machineFacts();
  const warnings: string[] = [];

  // Fixture -----------------------------------------------------------------------------------
  const fxStart = Date.now();
  const fx = await makeFixture(tmp, { smallCount: opts.small, bigBytes: opts.narBytes }, log);
  const fixtureSecs = (Date.now() - fxStart) / 1000;

  // Servers -----------------------------------------------------------------------------------
  const nginx = await startNginx(join(tmp, "nginx"), fx.cacheDir, "nginx");
  log(`nginx (pid ${nginx.pid}) at ${nginx.baseUrl}`);
  let cand: Server;
  let publicKey: string | undefined;
  if (opts.candidate === "agent") {
    if (opts.cpuProfDir) mkdirSync(opts.cpuProfDir, { recursive: true });
    const agent = await startAgent(join(tmp, "agent"), repoRoot, fx.storeRoot, { cpuProfDir: opts.cpuProfDir, extraArgs: opts.agentArgs });
    publicKey = agent.publicKey;
    cand = agent;
  } else {
    cand = await startNginx(join(tmp, "nginx2"), fx.cacheDir, "nginx-2");
  }
  log(`${cand.name} (pid ${cand.pid}) at ${cand.baseUrl}`);
  const candStartRss = readStatus(cand.pid).get("VmRSS") ?? 0;

  const existing = new Set([...fx.smallPaths, fx.bigPath].map(hashPart));
  const missHashes = randomHashParts(1000, existing);
  const hitPaths = [...existing].map((h) => `/${h}.narinfo`);
  const missPaths = missHashes.map((h) => `/${h}.narinfo`);

  const nginxNar = await checkServer(nginx, nginx, fx, missHashes, undefined, warnings);
  const candNar = await checkServer(cand, nginx, fx, missHashes, publicKey, warnings);
  nginxNar.file = join(fx.cacheDir, decodeURIComponent(new URL(nginxNar.url).pathname));
  // The big path is a single file, so its NAR's contents are that file (the agent reads it).
  candNar.file = opts.candidate === "agent" ? join(fx.storeRoot, fx.bigPath) : nginxNar.file;
  const targets = new Map<Server, NarTarget>([[nginx, nginxNar], [cand, candNar]]);
  log(`big NAR: ${fmtBytes(nginxNar.size)}; nginx ${nginxNar.url.replace(nginx.baseUrl, "")}, ${cand.name} ${candNar.url.replace(cand.baseUrl, "")}`);

  // Memory of the candidate from here on, sampled every 100 ms until the end; each measurement
  // is a labelled phase. The first full NAR download is part of it.
  const sampler = new MemSampler(cand.pid, 100);
  const beforeRssKiB = readStatus(cand.pid).get("VmRSS") ?? 0;
  const hwmBeforeKiB = readStatus(cand.pid).get("VmHWM") ?? 0;
  const hwmReset = resetPeakRss(cand.pid);
  const fdsBefore = openFds(cand.pid);
  sampler.start();

  // Whole NAR from each server, hashed: correctness, and warms the page cache.
  for (const s of [nginx, cand]) {
    const t = targets.get(s) as NarTarget;
    if (s === cand) sampler.phase("NAR: first download (Node client, hashing)");
    const d = await downloadAndHash(t.url);
    sampler.endPhase();
    const ok = d.status === 200 && d.bytes === t.size && d.hash === t.narHash;
    log(`${s.name}: NAR ${d.status}, ${fmtBytes(d.bytes)} in ${d.seconds.toFixed(1)} s, NarHash ${ok ? "matches" : "MISMATCH"}`);
    if (!ok) {
      const msg = `NAR download: HTTP ${d.status}, ${d.bytes} of ${t.size} bytes, hash ${d.hash} (narinfo says ${t.narHash})`;
      warnings.push(`${s.name}: ${msg}`);
      if (d.status !== 200) throw new Error(`${s.name}: ${msg}`);
    }
  }

  const hitScript = join(tmp, "hits.lua");
  const missScript = join(tmp, "misses.lua");
  writeWrkScript(hitScript, hitPaths);
  writeWrkScript(missScript, missPaths);
  const warm = Math.min(2, opts.duration);
  for (const s of [nginx, cand]) {
    await runWrk(s.baseUrl, hitScript, { connections: 1, threads: 1, durationSec: warm });
    await runWrk(s.baseUrl, missScript, { connections: 1, threads: 1, durationSec: warm });
  }
  log(`warmed up narinfo paths (${warm} s each)`);

  const allCpus = `0-${availableParallelism() - 1}`;
  const pin1 = PIN_MODES[opts.pin1];
  const results = new Map<Row, Map<Server, Outcome[]>>();
  const record = (row: Row, s: Server, o: Outcome) => {
    if (!results.has(row)) results.set(row, new Map());
    const m = results.get(row) as Map<Server, Outcome[]>;
    m.set(s, [...(m.get(s) ?? []), o]);
  };

  const measureOnce = async (row: (typeof ROWS)[number], s: Server): Promise<Outcome> => {
    let outcome: Outcome;
    // Pinning matters for narinfo ping-pong on one connection; bulk NAR transfers are left free.
    const pin = row.conns === 1 && row.kind !== "nar" ? pin1 : undefined;
    if (pin) {
      logCommand("taskset", ["-a", "-p", "-c", pin.server, "<each server process>"]);
      await pinTree(s.pid, pin.server);
    }
    let warm: { residency?: number; seconds: number } | undefined;
    const file = row.kind === "nar" ? targets.get(s)?.file : undefined;
    if (file) {
      // Bring the NAR's file back into the page cache: this VM pages out data left unread for
      // about 30 s, and a run reading from disk measures the disk, not the server.
      const residency = await pageCacheResidency(file);
      warm = { residency, seconds: await warmFile(file) };
    }
    let busy = await machineBusy(300);
    const waitUntil = Date.now() + opts.idleWait * 1000;
    if (busy > BUSY && opts.idleWait > 0) {
      log(`machine ${(busy * 100).toFixed(0)} % busy with other work: waiting up to ${opts.idleWait} s for it to settle`);
      while (busy > BUSY && Date.now() < waitUntil) busy = await machineBusy(1000);
    }
    const problems: string[] = [];
    if (busy > BUSY) problems.push(`machine ${(busy * 100).toFixed(0)} % busy with other work just before`);
    if (s === cand) sampler.phase(`${row.label}`);
    try {
      if (row.kind === "nar") {
        const t = targets.get(s) as NarTarget;
        const acc = await withCpuAccounting(s.pid, () =>
          narThroughput(t.url, t.size, { clients: row.conns, durationSec: opts.duration, cpus: pin?.client }),
        );
        const r = acc.result;
        if (r.failed > 0) problems.push(`${r.failed} failed downloads: ${r.failures.join("; ")}`);
        if (r.bytes === 0) problems.push("no bytes received");
        problems.push(...cpuProblems(acc));
        outcome = { value: r.mbPerSec, nar: r, problems, busy, cpu: acc, cost: r.bytes > 0 ? acc.serverCpu / (r.bytes / 1e9) : undefined, warm };
        log(`${s.name}: ${row.label}: ${fmtNum(r.mbPerSec)} (${r.complete} complete, ${r.cutOff} cut off at the deadline)${problems.length ? ` PROBLEMS: ${problems.join("; ")}` : ""}`);
      } else {
        const script = row.kind === "hit" ? hitScript : missScript;
        const acc = await withCpuAccounting(s.pid, () =>
          runWrk(s.baseUrl, script, {
            connections: row.conns, threads: row.conns === 1 ? 1 : 2, durationSec: opts.duration, cpus: pin?.client,
          }),
        );
        const r = acc.result;
        problems.push(...wrkProblems(r, row.kind), ...cpuProblems(acc));
        outcome = { value: r.reqPerSec, wrk: r, problems, busy, cpu: acc, cost: r.requests > 0 ? (acc.serverCpu / r.requests) * 1e6 : undefined };
        log(`${s.name}: ${row.label}: ${fmtNum(r.reqPerSec)} (p50 ${r.latencyUs.p50} µs, p99 ${r.latencyUs.p99} µs)${problems.length ? ` PROBLEMS: ${problems.join("; ")}` : ""}`);
      }
    } catch (e) {
      outcome = { error: (e as Error).message, problems, busy };
      log(`${s.name}: ${row.label}: ERROR ${(e as Error).message}`);
    } finally {
      sampler.endPhase();
      if (pin) {
        logCommand("taskset", ["-a", "-p", "-c", allCpus, "<each server process>"]);
        await pinTree(s.pid, allCpus);
      }
    }
    return outcome;
  };

  /** Measures, and measures again (up to --retries times) when other work disturbed the run. */
  const measure = async (row: (typeof ROWS)[number], s: Server): Promise<void> => {
    for (let attempt = 0; ; attempt++) {
      const o = await measureOnce(row, s);
      const disturbed = o.problems.some((p) => p.includes("other work"));
      if (!disturbed || attempt >= opts.retries) {
        record(row.key, s, { ...o, attempts: attempt + 1 });
        return;
      }
      log(`${s.name}: ${row.label}: disturbed by other work, measuring again (${attempt + 1} of ${opts.retries})`);
    }
  };

  // 1-connection rows first (pinned, see --pin1), then 4-connection rows on all CPUs. The servers
  // are interleaved per measurement so that slow drifts of the machine hit both alike.
  const order = [...ROWS.filter((r) => r.conns === 1), ...ROWS.filter((r) => r.conns !== 1)];
  for (let rep = 0; rep < opts.repeat; rep++) {
    for (const row of order) {
      for (const s of rep % 2 === 0 ? [nginx, cand] : [cand, nginx]) await measure(row, s);
    }
  }

  // A slow client: a server without backpressure would buffer the NAR in memory here.
  if (candNar.file) await warmFile(candNar.file);
  sampler.phase("NAR: slow client (curl --limit-rate 50M)");
  const slowSecs = Math.min(6, opts.duration);
  let slow: NarThroughput | undefined;
  try {
    slow = await narThroughput(candNar.url, candNar.size, { clients: 1, durationSec: slowSecs, limitRate: "50M" });
  } catch (e) {
    warnings.push(`${cand.name}: slow client: ${(e as Error).message}`);
  }
  sampler.endPhase();
  // Let the server notice the cut-off connections and release what they held.
  await new Promise((r) => setTimeout(r, 1000));
  sampler.phase("1 s after the last download");
  await new Promise((r) => setTimeout(r, 300));
  sampler.stop();
  const fdsAfter = openFds(cand.pid);
  const phases = sampler.peaks();
  const st = readStatus(cand.pid);
  const health = await httpGet(`${cand.baseUrl}/${opts.candidate === "agent" ? "health" : "nix-cache-info"}`).catch(() => undefined);
  if (health?.status !== 200) warnings.push(`${cand.name}: not healthy after the NAR downloads (${health?.status ?? "no answer"})`);
  const memory: AgentMemory = {
    narBytes: candNar.size,
    startRssKiB: candStartRss,
    beforeRssKiB,
    hwmBeforeKiB,
    hwmAfterKiB: st.get("VmHWM") ?? 0,
    hwmReset,
    phases,
    peakNarRssKiB: Math.max(0, ...phases.filter((p) => /NAR/.test(p.label)).map((p) => p.peakRssKiB)),
    peakRssKiB: Math.max(0, ...sampler.samples.map((s) => s.rssKiB)),
    afterRssKiB: st.get("VmRSS") ?? 0,
    fdsBefore,
    fdsAfter,
    slow,
  };
  log(`${cand.name} memory: RSS before ${fmtKiB(memory.beforeRssKiB)}, peak during NAR downloads ${fmtKiB(memory.peakNarRssKiB)}, VmHWM ${fmtKiB(memory.hwmAfterKiB)}${hwmReset ? " (reset before the downloads)" : ""}; NAR ${fmtBytes(memory.narBytes)}`);
  if (fdsAfter > fdsBefore + 2) warnings.push(`${cand.name}: open file descriptors grew from ${fdsBefore} to ${fdsAfter} after the NAR downloads`);

  // Mesh ----------------------------------------------------------------------------------------
  let meshMd = "";
  if (opts.meshMib > 0) {
    try {
      const m = await meshCase({ mib: opts.meshMib, log });
      // The opt-in LAN-direct mode (direct_lan on both agents) as a row of its own; the default row stays.
      const d = await meshCase({ mib: opts.meshMib, direct: true, log }).catch((e: Error) => {
        warnings.push(`mesh case with direct_lan failed: ${e.message}`);
        return undefined;
      });
      // The default mode again where the wire, not the CPU, sets the pace (BENCHMARKS.md, "Mesh on a LAN with a line rate").
      const l = opts.meshLinkRate
        ? await meshCase({ mib: opts.meshMib, linkRate: opts.meshLinkRate, log }).catch((e: Error) => {
            warnings.push(`mesh case on links at ${opts.meshLinkRate} failed: ${e.message}`);
            return undefined;
          })
        : undefined;
      // How a fleet host mostly fetches: a substitution, with as many NARs at once as Nix allows
      // (max-jobs in Nix 2.8, max-substitution-jobs in current Nix), each host on a CPU of its own.
      const substitution = async (direct: boolean) =>
        opts.meshSubstitute
          ? await meshCase({ mib: opts.meshMib, substitute: true, pin: true, direct, log }).catch((e: Error) => {
              warnings.push(`mesh substitution case${direct ? " with direct_lan" : ""} failed: ${e.message}`);
              return undefined;
            })
          : undefined;
      const sr = await substitution(false);
      const sd = await substitution(true);
      meshMd = renderMesh(m, d, l, sr, sd);
    } catch (e) {
      warnings.push(`mesh case failed: ${(e as Error).message}`);
    }
  }

  // Report ------------------------------------------------------------------------------------
  const totalSecs = (Date.now() - t0) / 1000;
  const md = renderResults({
    opts, facts, fx, fixtureSecs, nginx, cand, results, memory, warnings, totalSecs, nginxNar, candNar,
    meshMd,
  });
  process.stdout.write(`\n${md}\n`);
  if (opts.write) {
    writeBenchmarksMd(join(repoRoot, "BENCHMARKS.md"), md);
    log("wrote BENCHMARKS.md");
  } else {
    log("BENCHMARKS.md not written (quick run or --no-write; --write forces it)");
  }
}

function renderMesh(m: MeshResult, d?: MeshResult, l?: MeshResult, sr?: MeshResult, sd?: MeshResult): string {
  const mb = m.narBytes / 1e6;
  const substituted = ([["relayed", sr], ["LAN-direct", sd]] as const).flatMap(([mode, r]) =>
    r
      ? [
          [`seconds, substitution, ${mode}`, r.nginxSeconds.toFixed(2), r.agentSeconds.toFixed(2), ""],
          [`MB/s, substitution, ${mode}`, fmtNum(mb / r.nginxSeconds), fmtNum(mb / r.agentSeconds), r.ratio.toFixed(2) + "×"],
        ]
      : [],
  );
  const shaped = l
    ? [
        [`seconds, links at ${l.linkRate}`, l.nginxSeconds.toFixed(2), l.agentSeconds.toFixed(2), ""],
        [`MB/s, links at ${l.linkRate}`, fmtNum(mb / l.nginxSeconds), fmtNum(mb / l.agentSeconds), l.ratio.toFixed(2) + "×"],
        [`MB/s, links at ${l.linkRate}: curl of the NARs from nginx`, fmtNum(l.plainMBps), "", ""],
      ]
    : [];
  const direct = d
    ? [
        ["seconds, LAN-direct (\`direct_lan\` on both)", d.nginxSeconds.toFixed(2), d.agentSeconds.toFixed(2), ""],
        ["MB/s, LAN-direct", fmtNum(mb / d.nginxSeconds), fmtNum(mb / d.agentSeconds), d.ratio.toFixed(2) + "×"],
        ["agents' CPU s/GB, LAN-direct", "", d.agentCpuPerGb.toFixed(2), ""],
      ]
    : [];
  return `### Mesh: Nix on one host copying a closure held by a peer

Two hosts in network namespaces on a private bridge. Host A holds ${m.paths} paths (${fmtBytes(m.narBytes)} of NARs);
Nix on host B copies them with \`nix copy --from URL\` into an empty store, either through B's
agent (which fetches them from A's agent over the mesh; signatures required) or from nginx on A
serving the same closure as a static cache (unsigned, \`require-sigs false\`). Best of two runs each.
The LAN-direct rows are a second case with \`direct_lan\` on both agents: B's agent redirects each
NAR request to A's direct port and Nix fetches the bytes from A's agent itself (README, "LAN-direct NARs").${l ? `
The "links at ${l.linkRate}" rows are a third case, in the default mode, with each host's link shaped to
that rate both ways (tc tbf), as on a LAN with a line rate; the curl row is a plain transfer over the
same links, one connection (BENCHMARKS.md, "Mesh on a LAN with a line rate").` : ""}${sr || sd ? `
The "substitution" rows are Nix on B substituting the closure into an empty store (\`nix-store
--realise\` with the agent or nginx as its only substituter, Nix's defaults otherwise, max-jobs
auto), as \`nix build\` or a system switch does, with each host pinned to a CPU of its own (A's agent
and nginx on one, B's agent and Nix on the other), relayed (the default) and LAN-direct
(BENCHMARKS.md, "Mesh as fleets substitute").` : ""}

${table(["", "nginx on the peer", "through the agents", "agents/nginx"], [
    ["seconds", m.nginxSeconds.toFixed(2), m.agentSeconds.toFixed(2), ""],
    ["MB/s", fmtNum(mb / m.nginxSeconds), fmtNum(mb / m.agentSeconds), m.ratio.toFixed(2) + "×"],
    ["agents' CPU s/GB (both hosts)", "", m.agentCpuPerGb.toFixed(2), ""],
    ...direct,
    ...shaped,
    ...substituted,
  ])}

`;
}

function fmtKiB(k: number): string {
  return fmtBytes(k * 1024);
}

function renderResults(r: {
  meshMd: string;
  opts: Options;
  facts: Array<[string, string]>;
  fx: Fixture;
  fixtureSecs: number;
  nginx: Server;
  cand: Server;
  results: Map<Row, Map<Server, Outcome[]>>;
  memory: AgentMemory;
  warnings: string[];
  totalSecs: number;
  nginxNar: NarTarget;
  candNar: NarTarget;
}): string {
  const { opts, nginx, cand, results, memory, fx } = r;
  const date = new Date().toISOString().slice(0, 10);
  const argv = process.argv.slice(2);
  const out: string[] = [];
  out.push("## Results", "");
  out.push(
    `Run on ${date} with \`npm run bench${argv.length ? ` -- ${argv.join(" ")}` : ""}\` ` +
      `(${opts.duration} s per measurement${opts.repeat > 1 ? `, median of ${opts.repeat}` : ""}, ` +
      `1-connection narinfo runs ${PIN_DESCRIPTIONS[opts.pin1]}, ${fx.smallPaths.length} small paths, big NAR ${fmtBytes(r.candNar.size)}; ` +
      `whole run ${Math.round(r.totalSecs)} s, fixture ${Math.round(r.fixtureSecs)} s). ` +
      "This section is rewritten by every full run.",
    "",
  );
  const cell = (o: Outcome | undefined, digits: number): string => {
    if (!o) return "–";
    if (o.error) return "error";
    return `${fmtNum(o.value, digits)}${o.problems.length ? " ⚠" : ""}`;
  };
  out.push(
    table(
      ["", nginx.name, cand.name, `${cand.name}/${nginx.name}`],
      ROWS.map((row) => {
        const m = results.get(row.key);
        const a = median(m?.get(nginx));
        const b = median(m?.get(cand));
        return [row.label, cell(a, 0), cell(b, 0), fmtRatio(b?.value, a?.value)];
      }),
    ),
    "",
  );
  out.push(
    "Server CPU per unit of work (user + system time of the server's processes during the run, from " +
      "/proc). For NARs on loopback part of the TCP work (the receive softirq, sends clocked by the " +
      "client's ACKs or the pacing timer) is charged to whichever process the CPU was running, server or " +
      "curl, so the server's figure moves with scheduling; the last rows add the clients' CPU (curl's, and " +
      "the benchmark process's own, which is small; BENCHMARKS.md, " +
      '"NAR: where the per-byte gap to nginx goes"):',
    "",
  );
  // Server + curl CPU per GB of a NAR row's median run.
  const withClients = (o: Outcome | undefined): number | undefined =>
    o?.cpu && o.nar && o.nar.bytes > 0 ? (o.cpu.serverCpu + o.cpu.clientCpu) / (o.nar.bytes / 1e9) : undefined;
  out.push(
    table(
      ["", nginx.name, cand.name, `${cand.name}/${nginx.name}`],
      [
        ...ROWS.map((row) => {
          const m = results.get(row.key);
          const a = median(m?.get(nginx))?.cost;
          const b = median(m?.get(cand))?.cost;
          const what = row.kind === "nar" ? "NAR: CPU s per GB" : `${row.kind === "hit" ? "hit" : "miss"}: CPU µs per request`;
          const digits = row.kind === "nar" ? 2 : 0;
          return [`${what}, ${row.conns} conn`, fmtNum(a, digits), fmtNum(b, digits), fmtRatio(b, a)];
        }),
        ...ROWS.filter((row) => row.kind === "nar").map((row) => {
          const m = results.get(row.key);
          const a = withClients(median(m?.get(nginx)));
          const b = withClients(median(m?.get(cand)));
          return [`NAR: server + curl CPU s per GB, ${row.conns} conn`, fmtNum(a, 2), fmtNum(b, 2), fmtRatio(b, a)];
        }),
      ],
    ),
    "",
  );

  // Memory.
  const m = memory;
  if (r.meshMd) out.push(r.meshMd);
  out.push(`### ${cand.name} memory while serving the ${fmtBytes(m.narBytes)} NAR`, "");
  out.push(
    table(
      ["phase", "RSS at start", "peak RSS", "peak RSS incl. children", "samples"],
      [
        ["started, ready (/health or /nix-cache-info answered)", fmtKiB(m.startRssKiB), "", "", ""],
        ["after the checks, before any NAR download", fmtKiB(m.beforeRssKiB), "", "", ""],
        ...m.phases.map((p) => [p.label, fmtKiB(p.startRssKiB), fmtKiB(p.peakRssKiB), fmtKiB(p.peakTreeRssKiB), String(p.samples)]),
        ["end", fmtKiB(m.afterRssKiB), "", "", ""],
      ],
      ["l", "r", "r", "r", "r"],
    ),
    "",
  );
  const narPhases = m.phases.filter((p) => /NAR/.test(p.label));
  const growth = Math.max(0, m.peakNarRssKiB - m.beforeRssKiB);
  const phaseGrowth = Math.max(0, ...narPhases.map((p) => p.peakRssKiB - p.startRssKiB));
  out.push(
    `**Peak RSS while serving the NAR: ${fmtKiB(m.peakNarRssKiB)}, against ${fmtKiB(m.beforeRssKiB)} before the first ` +
      `NAR download (+${fmtKiB(growth)}, ${((growth * 1024) / m.narBytes * 100).toFixed(2)} % of the ${fmtBytes(m.narBytes)} NAR); ` +
      `largest rise within one NAR phase: +${fmtKiB(phaseGrowth)}.** ` +
      `VmHWM: ${fmtKiB(m.hwmBeforeKiB)} before the downloads, ${fmtKiB(m.hwmAfterKiB)} after` +
      `${m.hwmReset ? " (reset to the current RSS in between via /proc/PID/clear_refs, so it is the peak since then)" : ""}. ` +
      `Open file descriptors: ${m.fdsBefore} before, ${m.fdsAfter} after.` +
      (m.slow ? ` Slow client: ${fmtNum(m.slow.mbPerSec)} MB/s over ${m.slow.seconds.toFixed(1)} s.` : ""),
    "",
  );

  // Details.
  out.push("### Details", "");
  const detailRows: string[][] = [];
  for (const row of ROWS) {
    for (const s of [nginx, cand]) {
      const o = median(results.get(row.key)?.get(s));
      if (!o) continue;
      let detail = "";
      if (o.error) detail = `error: ${o.error.slice(0, 200)}`;
      else if (o.wrk) {
        const w = o.wrk;
        detail = `${fmtNum(w.requests)} requests in ${w.durationSec.toFixed(1)} s, latency p50 ${w.latencyUs.p50} µs / p99 ${w.latencyUs.p99} µs / max ${w.latencyUs.max} µs, non-2xx ${fmtNum(w.non2xx)}`;
      } else if (o.nar) {
        const n = o.nar;
        detail = `${fmtBytes(n.bytes)} in ${n.seconds.toFixed(1)} s; downloads complete ${n.complete}, cut off at the deadline ${n.cutOff}, failed ${n.failed}`;
        if (o.warm) {
          const res = o.warm.residency === undefined ? "" : `${(o.warm.residency * 100).toFixed(0)} % in page cache, `;
          detail += `; file ${res}read in ${o.warm.seconds.toFixed(1)} s to warm it`;
        }
      }
      if (o.cpu) {
        const c = o.cpu;
        detail += `; CPU s: server ${c.serverCpu.toFixed(2)}, wrk/curl ${c.clientCpu.toFixed(2)}, other ${c.otherCpu.toFixed(2)}`;
      }
      if ((o.attempts ?? 1) > 1) detail += `; run ${o.attempts} times (other work disturbed the earlier runs)`;
      if (o.values.length > 1) detail += `; all runs: ${o.values.map((v) => fmtNum(v)).join(", ")}`;
      if (o.busy > 0.02) detail += `; machine ${(o.busy * 100).toFixed(0)} % busy before`;
      if (o.problems.length) detail += `; ⚠ ${o.problems.join("; ")}`;
      detailRows.push([row.label, s.name, cell(o, 0), detail]);
    }
  }
  out.push(table(["measurement", "server", "value", "details"], detailRows, ["l", "l", "r", "l"]), "");
  out.push(
    `NAR URLs: nginx \`${r.nginxNar.url.replace(nginx.baseUrl, "")}\`, ${cand.name} \`${r.candNar.url.replace(cand.baseUrl, "")}\`. ` +
      `Fixture: small paths ${r.fx.timings.smallPaths.toFixed(1)} s, big file written ${r.fx.timings.bigWrite.toFixed(1)} s and ` +
      `added ${r.fx.timings.bigAdd.toFixed(1)} s, \`nix copy\` ${r.fx.timings.export.toFixed(1)} s.`,
    "",
  );
  if (r.warnings.length) {
    out.push("### Warnings", "", ...r.warnings.map((w) => `- ${w}`), "");
  }

  out.push("### Machine", "");
  out.push(table(["", ""], r.facts.map(([k, v]) => [k, v]), ["l", "l"]), "");
  out.push("### Commands", "");
  out.push(
    `\`$TMP\` is the run's temporary directory, \`$PORT\` values are free ports picked at run time; ` +
      "loops ran each distinct command line many times.",
    "",
    "```sh",
    `npm run bench${argv.length ? ` -- ${argv.join(" ")}` : ""}`,
    ...commandLog,
    "```",
    "",
  );
  return out.join("\n");
}

main()
  .then(() => cleanup({ keepTemp: parseKeep() }))
  .then(() => {
    log("done, cleaned up");
    process.exit(0);
  })
  .catch(async (e: unknown) => {
    if (interrupted()) return; // the signal handler cleans up and exits
    log(`FAILED: ${(e as Error).stack ?? String(e)}`);
    await cleanup({ keepTemp: parseKeep() });
    process.exit(1);
  });

function parseKeep(): boolean {
  return process.argv.includes("--keep");
}
