// `npm run bench -- --case daemon-hit`: what a narinfo hit (and a miss) costs with the database
// backend and with the daemon backend, on one chroot store with its own nix-daemon, for one or
// more builds of the agent (--agent-dir, e.g. main's code for a before/after comparison).
// Sequential keep-alive requests from a Node client, then wrk at 1 and 4 connections; every
// measurement is repeated --rounds times, the agents taking turns, and the medians reported.
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import http from "node:http";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { randomHashParts } from "./nix32.js";
import { runWrk, treeCpuSeconds, writeWrkScript } from "./load.js";
import { installSignalHandlers, registerTempDir, run, setRepoRoot, setTmpRoot, spawnTracked, stopChild } from "./proc.js";
import { fmtNum, table, writeBenchSection } from "./report.js";
import { AGENT_CLI, startAgent, type Server } from "./servers.js";

const HELP = `Usage: npm run bench -- --case daemon-hit [options]

Narinfo hits and misses with the database and the daemon backend: sequential keep-alive requests
(µs a request) and wrk at 1 and 4 connections (requests a second, agent CPU µs a request).

  --paths N            paths in the store, asked in turn (default 50)
  --requests N         sequential requests per measurement (default 2000)
  --duration S         seconds per wrk measurement (default 4)
  --rounds N           measurements per agent and backend, taking turns; medians reported (default 5)
  --agent-dir DIR[=LABEL]  a built checkout whose ${AGENT_CLI} to run (repeatable; default this one)
  --agent-cpu-prof DIR run each agent under node --cpu-prof, profiles written to DIR/<label>-<backend>
  --write              record the results in BENCHMARKS.md ("## Daemon backend" section)
  --tmpdir DIR         where to make the temporary directory
  --keep               keep the temporary directory
`;

interface Options {
  paths: number;
  requests: number;
  durationS: number;
  rounds: number;
  agents: { dir: string; label: string }[];
  write: boolean;
  cpuProfDir?: string;
  tmpBase: string;
  keep: boolean;
}

function parseOptions(argv: string[], repoRoot: string): Options {
  const { values } = parseArgs({
    args: argv,
    options: {
      case: { type: "string" },
      paths: { type: "string" },
      requests: { type: "string" },
      duration: { type: "string" },
      rounds: { type: "string" },
      "agent-dir": { type: "string", multiple: true },
      write: { type: "boolean", default: false },
      "agent-cpu-prof": { type: "string" },
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
  const agents = (values["agent-dir"] ?? [repoRoot]).map((spec) => {
    const [dir, label] = spec.split("=");
    const abs = resolve(dir!);
    if (!existsSync(join(abs, AGENT_CLI))) throw new Error(`${abs}/${AGENT_CLI} is missing: build that checkout first`);
    return { dir: abs, label: label ?? (abs === repoRoot ? "this checkout" : abs) };
  });
  return {
    paths: Number(values.paths ?? 50),
    requests: Number(values.requests ?? 2000),
    durationS: Number(values.duration ?? 4),
    rounds: Number(values.rounds ?? 5),
    agents,
    write: values.write ?? false,
    ...(values["agent-cpu-prof"] ? { cpuProfDir: resolve(values["agent-cpu-prof"]) } : {}),
    tmpBase: values.tmpdir ? resolve(values.tmpdir) : tmpdir(),
    keep: values.keep ?? false,
  };
}

const t0 = Date.now();
const log = (msg: string) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(0).padStart(4)}s] ${msg}\n`);

/** Microseconds a request over one keep-alive connection, for `paths` asked in turn `n` times. */
async function sequential(base: string, paths: string[], n: number, expect: number): Promise<number> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const get = (path: string) =>
    new Promise<void>((ok, fail) => {
      http.get(`${base}${path}`, { agent }, (res) => {
        res.resume();
        res.on("end", () => (res.statusCode === expect ? ok() : fail(new Error(`${path}: ${res.statusCode}, expected ${expect}`))));
      }).on("error", fail);
    });
  await get(paths[0]!); // the connection
  const start = process.hrtime.bigint();
  for (let i = 0; i < n; i++) await get(paths[i % paths.length]!);
  const us = Number(process.hrtime.bigint() - start) / 1000 / n;
  agent.destroy();
  return us;
}

interface Sample {
  hitUs: number;
  missUs: number;
  wrk1: number;
  wrk1CpuUs: number;
  wrk4: number;
  wrk4CpuUs: number;
  /** The nix-daemon's share of wrk4CpuUs (daemon backend; 0 for the database). */
  wrk4DaemonCpuUs: number;
}

interface Subject {
  label: string;
  backend: "database" | "daemon";
  server: Server;
  /** For the daemon backend: the nix-daemon, whose CPU time (its workers') a request costs too. */
  daemonPid?: number;
  samples: Sample[];
}

/** Hits a second, and CPU µs a hit: the agent's and the nix-daemon's (with its workers). */
async function wrkHits(s: Subject, script: string, connections: number, durationS: number): Promise<{ rps: number; cpuUs: number; daemonCpuUs: number }> {
  const daemonCpu = () => (s.daemonPid ? treeCpuSeconds(s.daemonPid) : 0);
  const [agent0, daemon0] = [treeCpuSeconds(s.server.pid), daemonCpu()];
  const r = await runWrk(s.server.baseUrl, script, { connections, threads: Math.min(connections, 2), durationSec: durationS });
  const [agent, daemon] = [treeCpuSeconds(s.server.pid) - agent0, daemonCpu() - daemon0];
  if (r.non2xx > 0 || r.requests === 0) throw new Error(`${s.label}, ${s.backend}: ${r.non2xx} non-2xx of ${r.requests} hits`);
  return { rps: r.reqPerSec, cpuUs: ((agent + daemon) * 1e6) / r.requests, daemonCpuUs: (daemon * 1e6) / r.requests };
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

function render(opts: Options, subjects: Subject[], argv: string[], load: string): string {
  const m = (s: Subject, k: keyof Sample) => median(s.samples.map((x) => x[k]));
  const range = (s: Subject, k: keyof Sample, digits = 0) => {
    const xs = s.samples.map((x) => x[k]);
    return `${fmtNum(m(s, k), digits)} (${fmtNum(Math.min(...xs), digits)}–${fmtNum(Math.max(...xs), digits)})`;
  };
  const database = (s: Subject) => subjects.find((d) => d.label === s.label && d.backend === "database");
  const rows = subjects.map((s) => {
    const db = database(s);
    const ratio = (k: keyof Sample, inverse = false) =>
      !db || s === db ? "–" : `${(inverse ? m(db, k) / m(s, k) : m(s, k) / m(db, k)).toFixed(2)}×`;
    return [
      s.label, s.backend,
      range(s, "hitUs"), ratio("hitUs"),
      range(s, "missUs"),
      range(s, "wrk1"), ratio("wrk1", true), fmtNum(m(s, "wrk1CpuUs")),
      range(s, "wrk4"), ratio("wrk4", true), fmtNum(m(s, "wrk4CpuUs")), s.backend === "daemon" ? fmtNum(m(s, "wrk4DaemonCpuUs")) : "–",
    ];
  });
  return [
    `Run on ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC with \`npm run bench -- ${argv.join(" ")}\`: ` +
      `${opts.paths} paths, ${fmtNum(opts.requests)} sequential requests and ${opts.durationS} s of wrk a measurement, ` +
      `${opts.rounds} rounds with the agents taking turns; medians (lowest–highest). Load average ${load}.`,
    "",
    table(
      ["agent", "backend", "hit µs (sequential)", "hit time / database's", "miss µs (sequential)",
        "hits/s wrk 1 conn", "time / database's", "CPU µs a hit", "hits/s wrk 4 conns", "time / database's", "CPU µs a hit", "of which nix-daemon"],
      rows,
      ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"],
    ),
  ].join("\n");
}

const SECTION = "## Daemon backend: narinfo hits";

export async function daemonHitMain(argv: string[], repoRoot: string): Promise<void> {
  const opts = parseOptions(argv, repoRoot);
  const tmp = mkdtempSync(join(opts.tmpBase, "fleetcache-daemon-hit-"));
  registerTempDir(tmp);
  installSignalHandlers({ keepTemp: opts.keep });
  setTmpRoot(tmp);
  setRepoRoot(repoRoot);
  log(`temporary directory ${tmp}`);
  const root = join(tmp, "store");
  const files = Array.from({ length: opts.paths }, (_, i) => {
    const f = join(tmp, `path-${i}.txt`);
    writeFileSync(f, `fleetcache bench daemon-hit path ${i}\n`);
    return f;
  });
  const stored = (await run("nix-store", ["--store", root, "--add", ...files])).stdout.trim().split("\n");
  const hits = stored.map((p) => `/${p.slice(11, 43)}.narinfo`);
  const misses = randomHashParts(1000, new Set(stored.map((p) => p.slice(11, 43)))).map((h) => `/${h}.narinfo`);
  const script = join(tmp, "hits.lua");
  writeWrkScript(script, hits);

  const socket = join(root, "nix/var/nix/daemon-socket/socket");
  mkdirSync(join(root, "nix/var/nix/daemon-socket"), { recursive: true });
  const daemon = spawnTracked("nix-daemon", ["--store", root], {
    env: { ...process.env, NIX_DAEMON_SOCKET_PATH: socket, NIX_CONFIG: "sandbox = false\nsubstituters =" },
  });
  for (let i = 0; i < 400 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 25));
  const subjects: Subject[] = [];
  try {
    for (const agentDir of opts.agents) {
      for (const backend of ["database", "daemon"] as const) {
        const extraArgs = backend === "daemon" ? ["--store-backend", "daemon", "--daemon-socket", socket] : ["--store-backend", "database"];
        // A directory per agent, named so that profiles of several builds can be told apart.
        const cpuProfDir = opts.cpuProfDir && join(opts.cpuProfDir, `${agentDir.label}-${backend}`.replace(/[^\w.-]/g, "_"));
        const server = await startAgent(join(tmp, `agent-${subjects.length}`), agentDir.dir, root, { extraArgs, ...(cpuProfDir ? { cpuProfDir } : {}) });
        subjects.push({ label: agentDir.label, backend, server, ...(backend === "daemon" ? { daemonPid: daemon.pid! } : {}), samples: [] });
      }
    }
    const loadBefore = loadavg()[0]!.toFixed(1);
    for (let r = 0; r < opts.rounds; r++) {
      // Taking turns, in the other order every other round.
      for (const s of r % 2 ? [...subjects].reverse() : subjects) {
        await sequential(s.server.baseUrl, hits, 200, 200); // warm: connections, caches
        const sample: Sample = {
          hitUs: await sequential(s.server.baseUrl, hits, opts.requests, 200),
          missUs: await sequential(s.server.baseUrl, misses, opts.requests, 404),
          ...(await wrkHits(s, script, 1, opts.durationS).then((w) => ({ wrk1: w.rps, wrk1CpuUs: w.cpuUs }))),
          ...(await wrkHits(s, script, 4, opts.durationS).then((w) => ({ wrk4: w.rps, wrk4CpuUs: w.cpuUs, wrk4DaemonCpuUs: w.daemonCpuUs }))),
        };
        s.samples.push(sample);
        log(`round ${r + 1}, ${s.label}, ${s.backend}: ${JSON.stringify(sample, (_, v: unknown) => (typeof v === "number" ? Math.round(v) : v))}`);
      }
    }
    const md = render(opts, subjects, argv, `${loadBefore} at the start, ${loadavg()[0]!.toFixed(1)} at the end`);
    process.stdout.write(`${md}\n`);
    if (opts.write) {
      writeBenchSection(join(repoRoot, "BENCHMARKS.md"), SECTION, INTRO, md);
      log("wrote BENCHMARKS.md");
    }
  } finally {
    for (const s of subjects) await s.server.stop();
    // The daemon's per-connection children first (ours, by their ids), then the daemon.
    const kids = (await run("pgrep", ["-P", String(daemon.pid)], { allowFail: true, log: false })).stdout.split("\n").filter(Boolean).map(Number);
    for (const pid of kids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // gone already
      }
    }
    await stopChild(daemon, "SIGKILL");
  }
}

const INTRO = `\`npm run bench -- --case daemon-hit\` (bench/daemon-hit.ts): one chroot store of small paths
added by \`nix-store --add\`, its own \`nix-daemon --store\`, and for each build of the agent one agent
with the database backend and one with the daemon backend (all started at once, idle while the
others are measured). Each measurement: 200 warm-up hits, then sequential keep-alive
\`GET /<hash>.narinfo\` from a Node client for the store's paths in turn (hits) and for random hash
parts (misses), then wrk on the hits at 1 connection (1 thread) and at 4 connections (2 threads),
counting the CPU time of the agent (with the daemon backend: and of the nix-daemon and its
per-connection workers). The agents take turns round by round (the order reversed every
other round); medians over the rounds, with the lowest and highest. Nothing is pinned to a CPU.`;
