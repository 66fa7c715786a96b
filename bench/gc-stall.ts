// `npm run bench -- --case gc-stall`: narinfo lookups on one keep-alive connection while Nix
// garbage-collects a big store, for the database and the daemon backend, and for one or more
// builds of the agent (--agent-dir, e.g. main's code for a before/after comparison).
//
// The store: a real chroot store made by Nix plus synthetic ValidPaths rows (1M by default,
// test/helpers/scale-store.ts). The GC: `nix-store --delete` of 50,000 of them spread over the
// table (each given an empty file first, so that Nix removes files as a real GC does and the
// daemon backend's directory watch sees it), i.e. Nix invalidating one path per transaction.
import { existsSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import http from "node:http";
import { tmpdir } from "node:os";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { addSyntheticPaths, sql } from "../test/helpers/scale-store.js";
import { randomHashParts } from "./nix32.js";
import { readStatus } from "./load.js";
import { installSignalHandlers, registerTempDir, run, setRepoRoot, setTmpRoot, spawnTracked, stopChild } from "./proc.js";
import { fmtNum, table, writeBenchSection } from "./report.js";
import { AGENT_CLI, startAgent } from "./servers.js";

const HELP = `Usage: npm run bench -- --case gc-stall [options]

Narinfo lookups (one keep-alive connection, hits and misses alternating) while Nix deletes paths
from a big store, one transaction a path: latency p50/p99/max before and during the deletions.

  --paths N            synthetic valid paths in the store (default 1000000)
  --gc N               paths deleted (default 50000)
  --backend B          database or daemon (repeatable; default both)
  --agent-dir DIR[=LABEL]  a built checkout whose ${AGENT_CLI} to run (repeatable; default this one)
  --idle S             seconds of lookups before the deletions (default 5)
  --write              record the results in BENCHMARKS.md ("## Store scale" section)
  --agent-cpu-prof DIR run each agent under node --cpu-prof, profiles written to DIR/<label>-<backend>
  --tmpdir DIR         where to make the temporary directory
  --keep               keep the temporary directory
`;

interface Options {
  paths: number;
  gc: number;
  backends: ("database" | "daemon")[];
  agents: { dir: string; label: string }[];
  idleS: number;
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
      gc: { type: "string" },
      backend: { type: "string", multiple: true },
      "agent-dir": { type: "string", multiple: true },
      idle: { type: "string" },
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
  const backends = (values.backend ?? ["database", "daemon"]).map((b) => {
    if (b !== "database" && b !== "daemon") throw new Error(`--backend must be database or daemon, got ${b}`);
    return b;
  });
  const agents = (values["agent-dir"] ?? [repoRoot]).map((spec) => {
    const [dir, label] = spec.split("=");
    const abs = resolve(dir!);
    if (!existsSync(join(abs, AGENT_CLI))) throw new Error(`${abs}/${AGENT_CLI} is missing: build that checkout first`);
    return { dir: abs, label: label ?? (abs === repoRoot ? "this checkout" : abs) };
  });
  return {
    paths: Number(values.paths ?? 1_000_000),
    gc: Number(values.gc ?? 50_000),
    backends,
    agents,
    idleS: Number(values.idle ?? 5),
    write: values.write ?? false,
    ...(values["agent-cpu-prof"] ? { cpuProfDir: resolve(values["agent-cpu-prof"]) } : {}),
    tmpBase: values.tmpdir ? resolve(values.tmpdir) : tmpdir(),
    keep: values.keep ?? false,
  };
}

const t0 = Date.now();
const log = (msg: string) => process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(0).padStart(4)}s] ${msg}\n`);

/** Latencies in ms of sequential narinfo GETs on one keep-alive connection, by phase. */
class LookupLoop {
  readonly phases = new Map<string, number[]>();
  phase = "idle";
  errors: string[] = [];
  private running = true;
  private done: Promise<void>;
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

  constructor(baseUrl: string, hits: string[], misses: string[]) {
    this.done = (async () => {
      for (let i = 0; this.running; i++) {
        const hit = i % 2 === 0;
        const list = hit ? hits : misses;
        const hash = list[(i >> 1) % list.length]!;
        const start = process.hrtime.bigint();
        const status = await this.get(`${baseUrl}/${hash}.narinfo`);
        const ms = Number(process.hrtime.bigint() - start) / 1e6;
        if (status !== (hit ? 200 : 404)) this.errors.push(`${this.phase}: ${hash} answered ${status}`);
        let list2 = this.phases.get(this.phase);
        if (!list2) this.phases.set(this.phase, (list2 = []));
        list2.push(ms);
      }
    })();
  }

  private get(url: string): Promise<number> {
    return new Promise((resolvePromise, reject) => {
      const req = http.get(url, { agent: this.agent, timeout: 60_000 }, (res) => {
        res.resume();
        res.on("end", () => resolvePromise(res.statusCode ?? 0));
      });
      req.on("timeout", () => req.destroy(new Error("timeout")));
      req.on("error", reject);
    });
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.done;
    this.agent.destroy();
  }
}

interface Stats {
  n: number;
  p50: number;
  p99: number;
  max: number;
}

function stats(ms: number[] | undefined): Stats | undefined {
  if (!ms || ms.length === 0) return undefined;
  const s = [...ms].sort((a, b) => a - b);
  const at = (q: number) => s[Math.min(s.length - 1, Math.floor(q * s.length))]!;
  return { n: s.length, p50: at(0.5), p99: at(0.99), max: s[s.length - 1]! };
}

interface RunResult {
  agent: string;
  backend: string;
  readyS: number;
  rssStartMiB: number;
  hwmMiB: number;
  idle?: Stats;
  gc?: Stats;
  gcS: number;
  caughtUpS: number | undefined;
  promLagMaxS: number | undefined;
  /** The benchmark's own longest event-loop delay during the GC (ms): the machine's noise, also in the latencies. */
  clientLagMaxMs: number;
  loopOver100ms: number | undefined;
  errors: string[];
}

async function metricsText(baseUrl: string): Promise<string> {
  return new Promise((resolvePromise, reject) => {
    http.get(`${baseUrl}/metrics`, { agent: false }, (res) => {
      let body = "";
      res.setEncoding("utf8").on("data", (d: string) => (body += d)).on("end", () => resolvePromise(body));
    }).on("error", reject);
  });
}

const sample = (text: string, name: string) => {
  const m = new RegExp(`^${name} (\\S+)$`, "m").exec(text);
  return m ? Number(m[1]) : undefined;
};

async function statusPaths(baseUrl: string): Promise<number> {
  const res = await fetch(`${baseUrl}/api/v1/status`);
  return ((await res.json()) as { self: { paths: number } }).self.paths;
}

async function oneRun(
  opts: Options, tmp: string, pristine: string, agentDir: { dir: string; label: string }, backend: "database" | "daemon",
  doomed: string[], hits: string[], misses: string[], expected: number,
): Promise<RunResult> {
  const dir = mkdtempSync(join(tmp, `run-${backend}-`));
  const root = join(dir, "store");
  await run("cp", ["-a", pristine, root]);
  // Empty files for the doomed paths: Nix's GC removes them, as it removes real paths' files.
  for (const p of doomed) writeFileSync(join(root, p), "");
  let daemon: ReturnType<typeof spawnTracked> | undefined;
  const socket = join(root, "nix/var/nix/daemon-socket/socket");
  if (backend === "daemon") {
    mkdirSync(join(root, "nix/var/nix/daemon-socket"), { recursive: true });
    daemon = spawnTracked("nix-daemon", ["--store", root], {
      env: { ...process.env, NIX_DAEMON_SOCKET_PATH: socket, NIX_CONFIG: "sandbox = false\nsubstituters =" },
    });
    for (let i = 0; i < 400 && !existsSync(socket); i++) await new Promise((r) => setTimeout(r, 25));
  }
  const extraArgs = backend === "daemon" ? ["--store-backend", "daemon", "--daemon-socket", socket] : ["--store-backend", "database"];
  const cpuProfDir = opts.cpuProfDir && join(opts.cpuProfDir, `${agentDir.label}-${backend}`.replace(/[^\w.-]/g, "_"));
  const agent = await startAgent(join(dir, "agent"), agentDir.dir, root, { extraArgs, ...(cpuProfDir ? { cpuProfDir } : {}) });
  const readyS = agent.readyMs / 1000;
  const rssStartMiB = (readStatus(agent.pid).get("VmRSS") ?? 0) / 1024;
  log(`${agentDir.label}, ${backend}: serving after ${readyS.toFixed(1)} s, RSS ${rssStartMiB.toFixed(0)} MiB`);
  try {
    await new Promise((r) => setTimeout(r, 2000));
    const loop = new LookupLoop(agent.baseUrl, hits, misses);
    await new Promise((r) => setTimeout(r, opts.idleS * 1000));
    const before = await metricsText(agent.baseUrl); // also resets prom-client's max-since-last-scrape gauge
    loop.phase = "gc";
    const clientLag = monitorEventLoopDelay({ resolution: 10 });
    clientLag.enable();
    const gcStart = Date.now();
    for (let i = 0; i < doomed.length; i += 5000) {
      await run("nix-store", ["--store", root, "--delete", ...doomed.slice(i, i + 5000)], { log: i === 0 });
    }
    const gcEnd = Date.now();
    const afterText = await metricsText(agent.baseUrl);
    loop.phase = "after";
    clientLag.disable();
    log(`${agentDir.label}, ${backend}: deleted ${doomed.length} paths in ${((gcEnd - gcStart) / 1000).toFixed(1)} s`);
    let caughtUpS: number | undefined;
    while (Date.now() - gcEnd < 120_000) {
      if ((await statusPaths(agent.baseUrl)) === expected) {
        caughtUpS = (Date.now() - gcEnd) / 1000;
        break;
      }
      await new Promise((r) => setTimeout(r, 250));
    }
    await loop.stop();
    const over = (text: string) => {
      const count = sample(text, "fleetcache_event_loop_delay_seconds_count");
      const le = sample(text, 'fleetcache_event_loop_delay_seconds_bucket\\{le="0.1"\\}');
      return count === undefined || le === undefined ? undefined : count - le;
    };
    const o0 = over(before);
    const o1 = over(afterText);
    return {
      agent: agentDir.label,
      backend,
      readyS,
      rssStartMiB,
      hwmMiB: (readStatus(agent.pid).get("VmHWM") ?? 0) / 1024,
      idle: stats(loop.phases.get("idle")),
      gc: stats(loop.phases.get("gc")),
      gcS: (gcEnd - gcStart) / 1000,
      caughtUpS,
      promLagMaxS: sample(afterText, "fleetcache_nodejs_eventloop_lag_max_seconds"),
      clientLagMaxMs: clientLag.max / 1e6,
      loopOver100ms: o0 === undefined || o1 === undefined ? undefined : o1 - o0,
      errors: loop.errors,
    };
  } finally {
    await agent.stop();
    if (daemon) {
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
}

const fmtMs = (v: number | undefined) => (v === undefined ? "–" : v < 10 ? v.toFixed(2) : fmtNum(v));

function render(opts: Options, results: RunResult[], fixtureS: number, argv: string[]): string {
  const rows = results.map((r) => [
    r.agent, r.backend,
    `${fmtMs(r.idle?.p50)} / ${fmtMs(r.idle?.p99)} / ${fmtMs(r.idle?.max)}`,
    `${fmtMs(r.gc?.p50)} / ${fmtMs(r.gc?.p99)} / **${fmtMs(r.gc?.max)}**`,
    fmtNum(r.gc?.n),
    r.gcS.toFixed(1),
    r.caughtUpS === undefined ? "not within 120 s" : r.caughtUpS.toFixed(1),
    r.promLagMaxS === undefined ? "–" : (r.promLagMaxS * 1000).toFixed(0),
    r.loopOver100ms === undefined ? "–" : String(r.loopOver100ms),
    r.clientLagMaxMs.toFixed(0),
    r.readyS.toFixed(1),
    `${r.rssStartMiB.toFixed(0)} / ${r.hwmMiB.toFixed(0)}`,
  ]);
  const errors = results.flatMap((r) => r.errors.slice(0, 3).map((e) => `${r.agent}, ${r.backend}: ${e}`));
  return [
    `Run on ${new Date().toISOString().slice(0, 10)} with \`npm run bench -- ${argv.join(" ")}\`: ${fmtNum(opts.paths)} synthetic paths (fixture ${fixtureS.toFixed(0)} s), ` +
      `${fmtNum(opts.gc)} of them deleted by \`nix-store --delete\` (one transaction a path), lookups alternating hits and misses on one keep-alive connection.`,
    "",
    table(
      ["agent", "backend", "lookup ms before GC p50 / p99 / max", "lookup ms during GC p50 / p99 / max", "lookups during GC", "GC s", "count right after s", "nodejs_eventloop_lag_max ms (GC)", "seconds with loop delay > 100 ms (GC)", "client's own loop delay max ms (GC)", "serving after s", "RSS MiB start / peak"],
      rows,
      ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r", "r", "r"],
    ),
    "",
    errors.length ? `Wrong answers: ${errors.join("; ")}` : "Every hit answered 200 and every miss 404 throughout.",
  ].join("\n");
}

const SECTION = "## Store scale: lookups during garbage collection";

export async function gcStallMain(argv: string[], repoRoot: string): Promise<void> {
  const opts = parseOptions(argv, repoRoot);
  const tmp = mkdtempSync(join(opts.tmpBase, "fleetcache-gc-stall-"));
  registerTempDir(tmp);
  installSignalHandlers({ keepTemp: opts.keep });
  setTmpRoot(tmp);
  setRepoRoot(repoRoot);
  log(`temporary directory ${tmp}`);
  const fxStart = Date.now();
  const pristine = join(tmp, "pristine");
  writeFileSync(join(tmp, "real"), "a path Nix added\n");
  await run("nix-store", ["--store", pristine, "--add", join(tmp, "real")]);
  await addSyntheticPaths(pristine, opts.paths);
  const fixtureS = (Date.now() - fxStart) / 1000;
  const every = Math.max(2, Math.floor(opts.paths / opts.gc));
  const lines = async (q: string) => (await sql(pristine, q)).split("\n").filter(Boolean);
  const doomed = await lines(`SELECT path FROM ValidPaths WHERE id % ${every} = 3 ORDER BY id LIMIT ${opts.gc}`);
  const hits = (await lines(`SELECT substr(path, 12, 32) FROM ValidPaths WHERE id % ${every} = 5 ORDER BY id LIMIT 2000`));
  const total = Number((await lines("SELECT count(*) FROM ValidPaths"))[0]);
  const misses = randomHashParts(2000, new Set(hits));
  log(`fixture: ${total} paths in ${fixtureS.toFixed(0)} s; deleting ${doomed.length}`);
  const results: RunResult[] = [];
  for (const backend of opts.backends) {
    for (const agentDir of opts.agents) {
      const r = await oneRun(opts, tmp, pristine, agentDir, backend, doomed, hits, misses, total - doomed.length);
      results.push(r);
      log(JSON.stringify({ ...r, errors: r.errors.length }));
    }
  }
  const md = render(opts, results, fixtureS, argv);
  process.stdout.write(`${md}\n`);
  if (opts.write) {
    writeBenchSection(join(repoRoot, "BENCHMARKS.md"), SECTION, INTRO, md);
    log("wrote BENCHMARKS.md");
  }
}

const INTRO = `\`npm run bench -- --case gc-stall\` (bench/gc-stall.ts): a chroot store made by Nix plus a
million synthetic valid paths (rows with valid store path names and hashes, added with the
sqlite3 CLI while no Nix runs); the agent serves it (database backend as root, or the daemon
backend through a \`nix-daemon --store\` of it), and one client asks for narinfos on one keep-alive
connection, alternating hits and misses, while \`nix-store --delete\` removes 50,000 of the paths
spread over the table (each has an empty file, so Nix removes files as a real GC does); Nix
invalidates one path per transaction, as GC does. Latency in ms as the client saw it; "count
right after": seconds from the end of the deletions until \`/api/v1/status\` shows the new path
count (for main's database backend that count is a \`count(*)\` on every request, not its
watcher); \`fleetcache_nodejs_eventloop_lag_max_seconds\` as scraped right after the deletions
(prom-client resets it at every scrape; one scrape came right before them); "seconds with loop
delay > 100 ms": the increase of \`fleetcache_event_loop_delay_seconds_count\` minus its \`le="0.1"\`
bucket over the deletions. The machine is shared: the lookups before GC and the client's own
event-loop delay (the benchmark process does nothing but the lookups, so its stalls are the
machine's, and they are in the latencies too) show how noisy it was.`;
