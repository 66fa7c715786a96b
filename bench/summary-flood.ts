// A trusted peer floods the agent with summary traffic while a client measures the agent's local
// narinfo latency: one real agent process (chroot store, mesh on loopback), one flooder process
// (a real libp2p node with a fleet key, test/helpers/summary-flood.ts), and sequential
// keep-alive `GET /<hash>.narinfo` hits from this process.
//
//   npx tsc -p . && node dist/bench/summary-flood.js [--mode deltas,snapshots] [--seconds 20]
//     [--delta-base 1000000] [--snapshot-keys 4194304] [--nice 0]
//
// deltas: a snapshot of --delta-base keys, then deltas of 8,192 keys as fast as the agent takes
// them. snapshots: the same snapshot of --snapshot-keys keys, back to back. Figures: latency
// before the flood (baseline), while the flooder is connected, and over the whole run; what the
// agent's status says about the peer. The flooder runs at full speed on the same CPUs as the
// agent (on a fleet it is another host); `--nice 19` makes it yield them, but then on a busy
// machine it sends far less, and the old agent, taking frames one or two at a time, looks fine.
// The agent runs with --trace-gc: its collections are counted for each window, as the latencies
// (FLEETCACHE_FLOOD_GC_LOG=FILE appends its lines to FILE, each after this process's clock in ms).
// Needs Nix (nix-store); everything stays on loopback.
import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { appendFileSync, mkdtempSync, realpathSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { multiaddr } from "@multiformats/multiaddr";
import { formatPublicKey, formatSecretKey, generateKeyPair, parsePublicKey, parseSecretKey } from "../protocol/keys.js";
import { startSummaryFlooder, type FloodMode } from "../test/helpers/summary-flood.js";

const CLI = fileURLToPath(new URL("../agent/cli.js", import.meta.url));
const SELF = fileURLToPath(import.meta.url);

/** The flood's size and length; the defaults are the bench's. */
export interface FloodOptions {
  seconds: number;
  /** deltas: the snapshot sent before the deltas. */
  deltaBase: number;
  /** snapshots: the size of each. */
  snapshotKeys: number;
  /** Niceness of the flooder process. */
  nice: number;
}

export const FLOOD_DEFAULTS: FloodOptions = { seconds: 20, deltaBase: 1_000_000, snapshotKeys: 1 << 22, nice: 0 };

/** The command line (read only when this file is run, not when imported by the fault suite). */
function options() {
  return parseArgs({
    options: {
      mode: { type: "string", default: "deltas,snapshots" },
      seconds: { type: "string", default: String(FLOOD_DEFAULTS.seconds) },
      "delta-base": { type: "string", default: String(FLOOD_DEFAULTS.deltaBase) },
      "snapshot-keys": { type: "string", default: String(FLOOD_DEFAULTS.snapshotKeys) },
      nice: { type: "string", default: String(FLOOD_DEFAULTS.nice) },
      help: { type: "boolean", short: "h" },
      // Internal: run as the flooder.
      role: { type: "string" },
      key: { type: "string" },
      trust: { type: "string" },
      dial: { type: "string" },
      keys: { type: "string" },
    },
  }).values;
}

async function flooder(opt: ReturnType<typeof options>): Promise<void> {
  const f = await startSummaryFlooder({
    key: parseSecretKey(opt.key!),
    trusted: [parsePublicKey(opt.trust!)],
    mode: opt.mode as FloodMode,
    snapshotKeys: Number(opt.keys),
  });
  process.stdout.write("ready\n");
  await f.node.libp2p.dial(multiaddr(opt.dial!));
  process.on("SIGTERM", () => {
    process.stdout.write(JSON.stringify(f.stats) + "\n");
    void f.stop().finally(() => process.exit(0));
  });
}

const children: ChildProcess[] = [];

/** One garbage collection of the agent's, from its --trace-gc line: when it was seen (performance.now()), its kind and pause. */
export interface GcEvent {
  at: number;
  kind: string;
  pauseMs: number;
}

async function startAgent(args: string[], gcs: GcEvent[]): Promise<string> {
  // FLEETCACHE_TEST_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the agent (as in the tests).
  const nodeArgs = (process.env.FLEETCACHE_TEST_NODE_ARGS ?? "").split(" ").filter(Boolean);
  // --trace-gc: a line on stdout per collection, timed here as it arrives (a few lines a second).
  const child = spawn(process.execPath, ["--trace-gc", ...nodeArgs, CLI, "agent", "--listen", "127.0.0.1:0", "--no-mdns", ...args], { stdio: ["ignore", "pipe", "pipe"] });
  children.push(child);
  let partial = "";
  child.stdout!.on("data", (d: Buffer) => {
    const lines = (partial + d.toString()).split("\n");
    partial = lines.pop()!;
    if (process.env.FLEETCACHE_FLOOD_GC_LOG) appendFileSync(process.env.FLEETCACHE_FLOOD_GC_LOG, lines.map((l) => `${performance.now().toFixed(0)} ${l}\n`).join(""));
    for (const line of lines) {
      const m = /ms: (Scavenge|Mark-Compact|Minor Mark-Sweep|Mark-Sweep)\b.*?MB, (?:pooled: [\d.]+ MB, )?([\d.]+) \/ [\d.]+ ms/.exec(line);
      if (m) gcs.push({ at: performance.now(), kind: m[1]!, pauseMs: Number(m[2]) });
    }
  });
  let stderr = "";
  const port = await new Promise<number>((resolve, reject) => {
    child.stderr!.on("data", (d: Buffer) => {
      stderr += d.toString();
      const m = /"listen":"[^"]*:(\d+)"/.exec(stderr);
      if (m) resolve(Number(m[1]));
    });
    child.on("exit", (code) => reject(new Error(`agent exited with ${code}: ${stderr}`)));
  });
  return `http://127.0.0.1:${port}`;
}

function getJson(url: string): Promise<any> {
  return new Promise((resolve, reject) => {
    http.get(url, (res) => {
      let body = "";
      res.on("data", (d) => (body += d));
      res.on("end", () => resolve(JSON.parse(body)));
    }).on("error", reject);
  });
}

/** Sequential keep-alive requests until `until()`; each one's start time and latency (ms). */
async function measure(url: string, until: () => boolean): Promise<{ at: number; ms: number }[]> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const out: { at: number; ms: number }[] = [];
  while (!until()) {
    const at = performance.now();
    await new Promise<void>((resolve, reject) => {
      http.get(url, { agent }, (res) => {
        res.resume();
        res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new Error(`narinfo: ${res.statusCode}`))));
      }).on("error", reject);
    });
    out.push({ at, ms: performance.now() - at });
  }
  agent.destroy();
  return out;
}

/** The agent's collections between two instants: counts by kind and the longest pause. */
export function gcFigures(gcs: GcEvent[], from: number, to: number): string {
  const inside = gcs.filter((g) => g.at >= from && g.at <= to);
  const count = (kind: string) => inside.filter((g) => g.kind === kind).length;
  const longest = (kind: string) => Math.max(0, ...inside.filter((g) => g.kind === kind).map((g) => g.pauseMs)).toFixed(1);
  return `${count("Mark-Compact")} mark-compact (longest ${longest("Mark-Compact")} ms), ${count("Scavenge")} scavenge (longest ${longest("Scavenge")} ms)`;
}

function figures(xs: number[]): string {
  if (xs.length === 0) return "no requests";
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
  return `n ${s.length}, p50 ${q(0.5).toFixed(2)} ms, p99 ${q(0.99).toFixed(2)} ms, max ${s[s.length - 1]!.toFixed(1)} ms`;
}

export interface FloodResult {
  mode: FloodMode;
  /** What was sent, in words. */
  what: string;
  /** Local narinfo latencies (ms): before the flood, while the flooder was connected, the whole flood. */
  baseline: number[];
  during: number[];
  whole: number[];
  /** Seconds the flooder stayed connected (the whole run if never disconnected). */
  connectedS: number;
  /** The flooder's own count of what it sent (a JSON line). */
  sent: string;
  /** The agent's status of the peer at the end. */
  peer: string;
  /** The agent's garbage collections (gcFigures): before the flood, while the flooder was connected, the whole flood. */
  gc: { baseline: string; during: string; whole: string };
}

/** One flood against a fresh agent serving `store` (which holds the path `hashPart`). */
export async function runFlood(mode: FloodMode, o: FloodOptions, tmp: string, store: string, hashPart: string): Promise<FloodResult> {
  const agentKeyFile = join(tmp, `${mode}-agent.sec`);
  const agentKey = generateKeyPair("bench-agent-1");
  writeFileSync(agentKeyFile, formatSecretKey(agentKey), { mode: 0o600 });
  const floodKey = generateKeyPair("bench-flooder-1");
  const meshPort = 20_000 + Math.floor(Math.random() * 20_000);
  const gcs: GcEvent[] = [];
  const url = await startAgent([
    "--store-root", store, "--state-dir", join(tmp, `${mode}-state`), "--sign-key", agentKeyFile,
    "--p2p-listen", `127.0.0.1:${meshPort}`, "--trusted-key", formatPublicKey(floodKey),
  ], gcs);
  const narinfo = `${url}/${hashPart}.narinfo`;
  const b0 = performance.now();
  const baseline = await measure(narinfo, ((end) => () => performance.now() > end)(performance.now() + 3000));
  const keys = String(mode === "deltas" ? o.deltaBase : o.snapshotKeys);
  // On a fleet the flooder is another host; here it shares the CPUs (--nice to make it yield them).
  const child = spawn("nice", ["-n", String(o.nice), process.execPath, SELF, "--role", "flooder", "--mode", mode, "--keys", keys, "--key", formatSecretKey(floodKey), "--trust", formatPublicKey(agentKey), "--dial", `/ip4/127.0.0.1/tcp/${meshPort}`], { stdio: ["ignore", "pipe", "inherit"] });
  children.push(child);
  let out = "";
  child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
  while (!out.includes("ready")) await new Promise((r) => setTimeout(r, 50)); // the flooder encodes its snapshot first
  const t0 = performance.now();
  const end = t0 + o.seconds * 1000;
  const run = measure(narinfo, () => performance.now() > end);
  // When the flooder was last seen connected, from the agent's own status.
  let connectedUntil = t0;
  while (performance.now() < end) {
    const st = await getJson(`${url}/api/v1/status`);
    if (st.peers.some((p: { connected: boolean }) => p.connected)) connectedUntil = performance.now();
    await new Promise((r) => setTimeout(r, 100));
  }
  const samples = await run;
  const status = await getJson(`${url}/api/v1/status`);
  child.kill("SIGTERM");
  await new Promise((r) => child.once("exit", r));
  stopAgents();
  const peer = status.peers[0] ?? {};
  return {
    mode,
    what: mode === "deltas" ? `a snapshot of ${keys} keys, then 8,192-key deltas` : `snapshots of ${keys} keys back to back`,
    baseline: baseline.map((s) => s.ms),
    during: samples.filter((s) => s.at <= connectedUntil).map((s) => s.ms),
    whole: samples.map((s) => s.ms),
    connectedS: (connectedUntil - t0) / 1000,
    sent: out.split("\n").find((l) => l.startsWith("{")) ?? "?",
    gc: { baseline: gcFigures(gcs, b0, b0 + 3000), during: gcFigures(gcs, t0, connectedUntil), whole: gcFigures(gcs, t0, end) },
    peer: `connected ${peer.connected}, pathCount ${peer.pathCount}, penalty ${JSON.stringify(peer.penalty ?? null)}, counters.peerPenalties ${status.counters.peerPenalties}`,
  };
}

/** A chroot store with one path (the one whose narinfo is timed), in `tmp`; its hash part. */
export function floodStore(tmp: string): { store: string; hashPart: string } {
  const store = join(tmp, "store");
  writeFileSync(join(tmp, "hit.txt"), "a path in the store\n");
  const hit = execFileSync("nix-store", ["--store", store, "--add", join(tmp, "hit.txt")], { encoding: "utf8" }).trim();
  return { store, hashPart: hit.slice(11, 43) };
}

/** Stops the agents (and flooders) this module started. */
export function stopAgents(): void {
  for (const c of children.splice(0)) c.kill("SIGTERM");
}

async function main(): Promise<void> {
  const opt = options();
  if (opt.help) {
    console.log(`Usage: node dist/bench/summary-flood.js [--mode deltas,snapshots] [--seconds ${FLOOD_DEFAULTS.seconds}]
       [--delta-base ${FLOOD_DEFAULTS.deltaBase}] [--snapshot-keys ${FLOOD_DEFAULTS.snapshotKeys}] [--nice ${FLOOD_DEFAULTS.nice}]

A trusted peer floods one agent with summary deltas or snapshots while this process measures the
agent's local narinfo latency (before, while the flooder is connected, over the run). Needs Nix.`);
    return;
  }
  if (opt.role === "flooder") return flooder(opt);
  const o: FloodOptions = { seconds: Number(opt.seconds), deltaBase: Number(opt["delta-base"]), snapshotKeys: Number(opt["snapshot-keys"]), nice: Number(opt.nice) };
  const tmp = mkdtempSync(join(tmpdir(), "fleetcache-flood-"));
  try {
    const { store, hashPart } = floodStore(tmp);
    for (const mode of opt.mode!.split(",")) {
      const r = await runFlood(mode as FloodMode, o, tmp, store, hashPart);
      console.log(`\n${mode}: ${r.what}, ${o.seconds} s`);
      console.log(`  baseline (no peer)        ${figures(r.baseline)}`);
      console.log(`  while the flooder was on  ${figures(r.during)} (${r.connectedS.toFixed(1)} s)`);
      console.log(`  whole run                 ${figures(r.whole)}`);
      console.log(`  agent GC: baseline        ${r.gc.baseline}`);
      console.log(`  agent GC: flooder on      ${r.gc.during}`);
      console.log(`  agent GC: whole run       ${r.gc.whole}`);
      console.log(`  flooder sent              ${r.sent}`);
      console.log(`  agent: peer ${r.peer}`);
    }
  } finally {
    stopAgents();
    await new Promise((r) => setTimeout(r, 300));
    rmSync(tmp, { recursive: true, force: true });
  }
}

// Run as a script (the bench, or a flooder child), not when the fault suite imports it.
if (process.argv[1] && realpathSync(process.argv[1]) === SELF) {
  main().catch((e) => {
    console.error(e);
    process.exitCode = 1;
  });
}
