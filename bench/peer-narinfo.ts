// `npm run bench -- --case peer-narinfo`: what a narinfo lookup costs when the agent must ask a
// peer for it. Agent A (this checkout) holds --paths small paths; agent B, of each build given by
// --agent-dir, holds none of them and is asked for each once over one keep-alive connection
// from a Node client: every lookup is B's first of that path, so B asks A over the mesh (a
// later one within 30 s would come from B's cache, answered without waiting). B is started
// afresh (empty cache) for every measurement, the builds taking turns; medians over the rounds.
import { mkdirSync, mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import http from "node:http";
import { loadavg, tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { treeCpuSeconds } from "./load.js";
import { installSignalHandlers, registerTempDir, run, setRepoRoot, setTmpRoot, spawnTracked, stopChild } from "./proc.js";
import { fmtNum, table } from "./report.js";
import { AGENT_NODE_FLAGS } from "../test/helpers/agent.js";
import { AGENT_CLI, freePort, httpGet } from "./servers.js";

const HELP = `Usage: npm run bench -- --case peer-narinfo [options]

Narinfo lookups that ask a peer: agent B (each --agent-dir build) is asked once for each of the
paths agent A (this checkout) holds; µs a lookup and B's and A's CPU µs a lookup.

  --paths N                  paths held by A, each asked once a measurement (default 500)
  --rounds N                 measurements per build, taking turns (default 5)
  --agent-dir DIR[=LABEL]    a built checkout to run as B (repeatable; default this one)
`;

interface Agent {
  pid: number;
  url: string;
  stop(): Promise<void>;
}

/** An agent of the checkout `dir` on `root`, in the mesh on 127.0.0.1:p2pPort, with `extra` flags. */
async function startMeshAgent(dir: string, work: string, root: string, key: string, p2pPort: number, extra: string[]): Promise<Agent> {
  mkdirSync(work, { recursive: true });
  const port = await freePort();
  // As shipped (AGENT_NODE_FLAGS), plus FLEETCACHE_TEST_NODE_ARGS (e.g. "--cpu-prof --cpu-prof-dir=/tmp/prof").
  const nodeArgs = [...AGENT_NODE_FLAGS, ...(process.env.FLEETCACHE_TEST_NODE_ARGS ?? "").split(" ").filter(Boolean)];
  const child = spawnTracked(process.execPath, [
    ...nodeArgs, join(dir, AGENT_CLI), "agent", "--listen", `127.0.0.1:${port}`, "--store-root", root, "--state-dir", work, "--sign-key", key,
    "--p2p-listen", `127.0.0.1:${p2pPort}`, "--no-mdns", "--no-mesh-bulk", "--upstream-key", "none", ...extra,
  ], { stdio: "ignore" });
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; ; i++) {
    if ((await httpGet(`${url}/health`, 1000).catch(() => undefined))?.status === 200) break;
    if (i > 600 || child.exitCode !== null) throw new Error(`agent ${dir} did not start`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { pid: child.pid!, url, stop: () => stopChild(child) };
}

/** Asks for each of `targets` once, in turn, on one keep-alive connection; µs a lookup. All must be 200. */
async function lookups(url: string, targets: string[]): Promise<number> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  const get = (path: string) =>
    new Promise<void>((resolve, reject) => {
      http.get(`${url}${path}`, { agent }, (res) => {
        res.resume();
        res.on("end", () => (res.statusCode === 200 ? resolve() : reject(new Error(`${path}: ${res.statusCode}`))));
      }).on("error", reject);
    });
  const start = process.hrtime.bigint();
  for (const t of targets) await get(t);
  const us = Number(process.hrtime.bigint() - start) / 1000 / targets.length;
  agent.destroy();
  return us;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2]! : (s[s.length / 2 - 1]! + s[s.length / 2]!) / 2;
};

export async function peerNarinfoMain(argv: string[], repoRoot: string): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      case: { type: "string" },
      paths: { type: "string" },
      rounds: { type: "string" },
      "agent-dir": { type: "string", multiple: true },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  });
  if (values.help) return void process.stdout.write(HELP);
  const n = Number(values.paths ?? 500);
  const rounds = Number(values.rounds ?? 5);
  const builds = (values["agent-dir"] ?? [repoRoot]).map((spec) => {
    const [dir, label] = spec.split("=");
    return { dir: resolve(dir!), label: label ?? dir! };
  });
  const tmp = mkdtempSync(join(tmpdir(), "fleetcache-peer-narinfo-"));
  registerTempDir(tmp);
  installSignalHandlers({ keepTemp: false });
  setTmpRoot(tmp);
  setRepoRoot(repoRoot);
  const [rootA, rootB] = [join(tmp, "a"), join(tmp, "b")];
  const files = Array.from({ length: n + 1 }, (_, i) => {
    const f = join(tmp, `path-${i}.txt`);
    writeFileSync(f, `fleetcache bench peer-narinfo path ${i}\n`);
    return f;
  });
  const held = (await run("nix-store", ["--store", rootA, "--add", ...files])).stdout.trim().split("\n");
  writeFileSync(join(tmp, "own.txt"), "B's own\n");
  await run("nix-store", ["--store", rootB, "--add", join(tmp, "own.txt")]);
  for (const k of ["a", "b"]) await run("nix-store", ["--generate-binary-cache-key", `peer-bench-${k}-1`, join(tmp, `${k}.sec`), join(tmp, `${k}.pub`)]);
  const [pubA, pubB] = ["a", "b"].map((k) => readFileSync(join(tmp, `${k}.pub`), "utf8").trim()) as [string, string];
  const portA = await freePort();
  const a = await startMeshAgent(repoRoot, join(tmp, "agent-a"), rootA, join(tmp, "a.sec"), portA, ["--trusted-key", pubB]);
  const targets = held.map((p) => `/${p.slice(11, 43)}.narinfo`);
  const samples = new Map(builds.map((b) => [b.label, [] as { us: number; cpuB: number; cpuA: number }[]]));
  const load0 = loadavg()[0]!.toFixed(1);
  for (let r = 0; r < rounds; r++) {
    for (const b of r % 2 ? [...builds].reverse() : builds) {
      const agentB = await startMeshAgent(b.dir, join(tmp, `agent-b-${r}-${b.label}`), rootB, join(tmp, "b.sec"), await freePort(), [
        "--peer", `127.0.0.1:${portA}`, "--trusted-key", pubA,
      ]);
      // Connected and A's summary in: the first path answers 200 (it is not measured).
      for (let i = 0; (await httpGet(`${agentB.url}${targets[0]}`).catch(() => undefined))?.status !== 200; i++) {
        if (i > 400) throw new Error(`${b.label}: B never saw A's paths`);
        await new Promise((res) => setTimeout(res, 50));
      }
      const [b0, a0] = [treeCpuSeconds(agentB.pid), treeCpuSeconds(a.pid)];
      const us = await lookups(agentB.url, targets.slice(1));
      const [cpuB, cpuA] = [((treeCpuSeconds(agentB.pid) - b0) * 1e6) / n, ((treeCpuSeconds(a.pid) - a0) * 1e6) / n];
      samples.get(b.label)!.push({ us, cpuB, cpuA });
      await agentB.stop();
    }
  }
  await a.stop();
  const range = (xs: number[]) => `${fmtNum(median(xs))} (${fmtNum(Math.min(...xs))}–${fmtNum(Math.max(...xs))})`;
  const rows = builds.map((b) => {
    const s = samples.get(b.label)!;
    return [b.label, range(s.map((x) => x.us)), range(s.map((x) => x.cpuB)), range(s.map((x) => x.cpuA))];
  });
  process.stdout.write(
    `Run on ${new Date().toISOString().slice(0, 16).replace("T", " ")} UTC with \`npm run bench -- ${argv.join(" ")}\`: ${n} paths held by A, ` +
      `each asked of B once a measurement, ${rounds} rounds taking turns; medians (lowest–highest). Load average ${load0} at the start, ${loadavg()[0]!.toFixed(1)} at the end.\n\n` +
      table(["B", "µs a peer lookup (sequential)", "B's CPU µs a lookup", "A's CPU µs a lookup"], rows, ["l", "r", "r", "r"]) + "\n",
  );
}
