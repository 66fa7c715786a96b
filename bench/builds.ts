// Agent builds side by side with nginx, for before/after figures on a busy machine: one fixture,
// nginx and one agent per build running at once, every measurement taken for each server in
// turn (the order reversed every round), medians of the rounds. The same measurements as
// `npm run bench` (bench/run.ts), minus its checks, memory and mesh case.
//
//   node dist/bench/builds.js [--rows hit1,hit4,miss1,miss4,nar1,nar4] [--rounds 3] [--duration 4]
//        [--nar-gib 1] [--small 100] [--keep-fixture DIR] [--bare LABEL] [--steps LABEL]
//        [--step-list bare,net,...] LABEL=REPO_DIR ...
//
// REPO_DIR is a checkout with a built dist/ (e.g. a `git worktree add` of the old commit, built
// with `npx tsc -p .`); `.` is this one. With --keep-fixture DIR the fixture is made once in DIR
// and reused by later runs. With --bare LABEL a bare node:http server (bench/bare-narinfo.ts)
// runs alongside, answering with the responses recorded from build LABEL: the floor for its
// narinfo rows (its NAR rows are not measured). With --steps LABEL the steps from that bare server
// to the agent run alongside too (bench/bare-narinfo.ts: options, routing, lookup, metrics; this
// checkout's code, signing with build LABEL's key), each checked to answer as LABEL does. Needs root (chroot store), nginx, wrk and curl, as `npm run bench`.
import { chmodSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { hashPart, keptFixture, type Fixture } from "./fixture.js";
import { narThroughput, pinTree, runWrk, warmFile, withCpuAccounting, writeWrkScript } from "./load.js";
import { randomHashParts } from "./nix32.js";
import { cleanup, installSignalHandlers, registerTempDir } from "./proc.js";
import { httpGet, parseNarinfo, startAgent, startBare, startNginx, type Server } from "./servers.js";
import { STEPS, type Recorded, type RecordedResponses } from "./bare-narinfo.js";

const ROWS = ["hit1", "hit4", "miss1", "miss4", "nar1", "nar4"] as const;
type Row = (typeof ROWS)[number];

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: {
    rows: { type: "string", default: ROWS.join(",") },
    rounds: { type: "string", default: "3" },
    duration: { type: "string", default: "4" },
    "nar-gib": { type: "string", default: "1" },
    small: { type: "string", default: "100" },
    "keep-fixture": { type: "string" },
    bare: { type: "string" },
    steps: { type: "string" },
    "step-list": { type: "string", default: STEPS.join(",") },
    help: { type: "boolean", short: "h" },
  },
});
if (values.help) {
  console.log(`Usage: node dist/bench/builds.js [--rows ${ROWS.join(",")}] [--rounds 3] [--duration 4]
       [--nar-gib 1] [--small 100] [--keep-fixture DIR] [--bare LABEL] [--steps LABEL]
       [--step-list ${STEPS.join(",")}] LABEL=REPO_DIR ...

Agent builds side by side with nginx, each measurement taken for every server in turn, medians
of the rounds (BENCHMARKS.md). REPO_DIR is a checkout with a built dist/ ("." is this one).
--bare LABEL: a bare node:http server replaying build LABEL's answers runs alongside (the floor).
--steps LABEL: the steps from that bare server to the agent run alongside too
  (--step-list ${STEPS.join(",")} picks some of them).
Needs root (chroot store), nginx, wrk and curl.`);
  process.exit(0);
}
const rows = values.rows.split(",") as Row[];
for (const r of rows) if (!ROWS.includes(r)) throw new Error(`unknown row ${r} (known: ${ROWS.join(", ")})`);
const rounds = Number(values.rounds);
const duration = Number(values.duration);
const builds = positionals.map((p) => {
  const i = p.indexOf("=");
  if (i <= 0) throw new Error(`expected LABEL=REPO_DIR, got ${p}`);
  return { label: p.slice(0, i), dir: resolve(p.slice(i + 1)) };
});
if (builds.length === 0) throw new Error("name at least one build: LABEL=REPO_DIR");

const log = (m: string) => process.stderr.write(m + "\n");

function fixture(): Promise<Fixture> {
  const keep = values["keep-fixture"] ? resolve(values["keep-fixture"]) : undefined;
  return keptFixture(keep, "fleetcache-builds-", { smallCount: Number(values.small), bigBytes: Math.round(Number(values["nar-gib"]) * 2 ** 30) }, log);
}

async function main(): Promise<void> {
  installSignalHandlers({ keepTemp: false });
  const fx = await fixture();
  const run = mkdtempSync(join(tmpdir(), "fleetcache-builds-run-"));
  chmodSync(run, 0o755);
  registerTempDir(run);
  const servers: Server[] = [await startNginx(join(run, "nginx"), fx.cacheDir, "nginx")];
  for (const b of builds) {
    const agent = await startAgent(join(run, `agent-${b.label}`), b.dir, fx.storeRoot);
    servers.push({ ...agent, name: b.label });
  }
  const existing = new Set([...fx.smallPaths, fx.bigPath].map(hashPart));
  const hits = join(run, "hits.lua");
  const misses = join(run, "misses.lua");
  const hitPaths = [...existing].map((h) => `/${h}.narinfo`);
  const missPaths = randomHashParts(1000, existing).map((h) => `/${h}.narinfo`);
  writeWrkScript(hits, hitPaths);
  writeWrkScript(misses, missPaths);
  if (values.bare) {
    const from = servers.find((s) => s.name === values.bare);
    if (!from) throw new Error(`--bare ${values.bare}: no build of that label`);
    const file = join(run, "bare-responses.json");
    writeFileSync(file, JSON.stringify(await recordResponses(from.baseUrl, hitPaths, missPaths[0]!)));
    servers.push(await startBare(join(run, "bare"), file));
  }
  if (values.steps) {
    const from = servers.find((s) => s.name === values.steps);
    if (!from) throw new Error(`--steps ${values.steps}: no build of that label`);
    const recorded = await recordResponses(from.baseUrl, hitPaths, missPaths[0]!);
    const file = join(run, "steps-responses.json");
    writeFileSync(file, JSON.stringify(recorded));
    const only = values["step-list"].split(",");
    for (const x of only) if (!(STEPS as readonly string[]).includes(x)) throw new Error(`unknown step ${x} (known: ${STEPS.join(", ")})`);
    for (const step of STEPS.filter((x) => only.includes(x))) {
      const s = await startBare(join(run, `step-${step}`), file, step, { step, storeRoot: fx.storeRoot, keyFile: join(run, `agent-${values.steps}`, "key.sec") });
      // Each step must answer as the agent does, or its figures say nothing about the agent.
      const got = await recordResponses(s.baseUrl, hitPaths, missPaths[1]!);
      if (JSON.stringify(got) !== JSON.stringify(recorded)) throw new Error(`step ${step} answers differently from ${values.steps}`);
      servers.push(s);
    }
  }
  const nar = new Map<Server, { url: string; size: number; file: string }>();
  for (const s of servers) {
    // The bare server and the steps serve narinfos only.
    if (s.name !== "bare" && !(STEPS as readonly string[]).includes(s.name)) {
      const r = await httpGet(`${s.baseUrl}/${hashPart(fx.bigPath)}.narinfo`);
      const f = parseNarinfo(r.body.toString()).fields;
      const url = new URL(f.get("URL") ?? "", `${s.baseUrl}/`).toString();
      const file = s.name === "nginx" ? join(fx.cacheDir, decodeURIComponent(new URL(url).pathname)) : join(fx.storeRoot, fx.bigPath);
      nar.set(s, { url, size: Number(f.get("NarSize")), file });
    }
    // Warm-up (the JIT).
    await runWrk(s.baseUrl, hits, { connections: 1, threads: 1, durationSec: 1 });
    await runWrk(s.baseUrl, misses, { connections: 1, threads: 1, durationSec: 1 });
  }

  // both: NAR rows, server + clients CPU per GB (curl's, and this process's own, which is small):
  // part of loopback's TCP work is charged to either, as scheduling has it.
  const results = new Map<string, { rate: number; cost: number; other: number; both?: number }[]>();
  for (let round = 0; round < rounds; round++) {
    for (const row of rows) {
      for (const s of round % 2 === 0 ? servers : [...servers].reverse()) {
        const conns = Number(row.slice(-1));
        const isNar = row.startsWith("nar");
        if (isNar && !nar.has(s)) continue;
        // As bench/run.ts: 1-connection narinfo runs with client and server on CPU 0.
        const pin = conns === 1 && !isNar;
        if (pin) await pinTree(s.pid, "0");
        let m: { rate: number; cost: number; other: number; both?: number };
        if (isNar) {
          const t = nar.get(s)!;
          await warmFile(t.file);
          const a = await withCpuAccounting(s.pid, () => narThroughput(t.url, t.size, { clients: conns, durationSec: duration }));
          if (a.result.failed > 0) log(`${s.name} ${row}: ${a.result.failed} failed downloads: ${a.result.failures.join("; ")}`);
          const gb = a.result.bytes / 1e9;
          m = { rate: a.result.mbPerSec, cost: a.serverCpu / gb, other: a.otherCpu / a.wall, both: (a.serverCpu + a.clientCpu) / gb };
        } else {
          const a = await withCpuAccounting(s.pid, () =>
            runWrk(s.baseUrl, row.startsWith("hit") ? hits : misses, { connections: conns, threads: conns === 1 ? 1 : 2, durationSec: duration, ...(pin ? { cpus: "0" } : {}) }),
          );
          m = { rate: a.result.reqPerSec, cost: (a.serverCpu / a.result.requests) * 1e6, other: a.otherCpu / a.wall };
        }
        if (pin) await pinTree(s.pid, "0-1");
        const key = `${row} ${s.name}`;
        results.set(key, [...(results.get(key) ?? []), m]);
        const both = m.both !== undefined ? ` (with the clients' ${m.both.toFixed(2)})` : "";
        log(`round ${round + 1} ${row} ${s.name}: ${m.rate.toFixed(0)}${isNar ? " MB/s" : "/s"}, CPU ${m.cost.toFixed(isNar ? 2 : 1)} ${isNar ? "s/GB" : "µs/request"}${both}, other work ${(m.other * 100).toFixed(0)} % of a CPU`);
      }
    }
  }

  const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor((xs.length - 1) / 2)]!;
  const out = [
    "| row | server | rate (median; each round) | /nginx | server CPU (median; each round) | /nginx | NARs: server + clients CPU (median; each round) | /nginx | other work, % of a CPU (median) |",
    "| :--- | :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
  ];
  for (const row of rows) {
    const isNar = row.startsWith("nar");
    const n = results.get(`${row} nginx`)!;
    for (const s of servers) {
      const r = results.get(`${row} ${s.name}`);
      if (!r) continue;
      const rate = median(r.map((x) => x.rate));
      const cost = median(r.map((x) => x.cost));
      const d = isNar ? 2 : 1;
      const both = isNar
        ? `${median(r.map((x) => x.both!)).toFixed(2)} (${r.map((x) => x.both!.toFixed(2)).join(", ")}) | ${(median(r.map((x) => x.both!)) / median(n.map((x) => x.both!))).toFixed(2)}×`
        : " | ";
      out.push(
        `| ${row} | ${s.name} | ${rate.toFixed(0)} (${r.map((x) => x.rate.toFixed(0)).join(", ")}) | ${(rate / median(n.map((x) => x.rate))).toFixed(2)}× ` +
          `| ${cost.toFixed(d)} (${r.map((x) => x.cost.toFixed(d)).join(", ")}) | ${(cost / median(n.map((x) => x.cost))).toFixed(2)}× | ${both} | ${(median(r.map((x) => x.other)) * 100).toFixed(0)} |`,
      );
    }
  }
  process.stdout.write(`Rates: narinfo requests/s, NAR MB/s; CPU: µs per request, s per GB.\n\n${out.join("\n")}\n`);
}

/** The answers of a server to these paths, as bench/bare-narinfo.ts replays them. */
async function recordResponses(baseUrl: string, hitPaths: string[], missPath: string): Promise<RecordedResponses> {
  const record = async (path: string): Promise<Recorded> => {
    const r = await httpGet(baseUrl + path);
    const headers: string[] = [];
    for (let i = 0; i < r.rawHeaders.length; i += 2) {
      // Node's server adds these itself, to the bare server's answers as to the agent's.
      if (!/^(date|connection|keep-alive)$/i.test(r.rawHeaders[i]!)) headers.push(r.rawHeaders[i]!, r.rawHeaders[i + 1]!);
    }
    return { status: r.status, headers, body: r.body.toString("base64") };
  };
  const hits: Record<string, Recorded> = {};
  for (const p of hitPaths) hits[p] = await record(p);
  return { hits, miss: await record(missPath) };
}

main()
  .then(() => cleanup())
  .then(() => process.exit(0))
  .catch(async (e: unknown) => {
    log(`FAILED: ${(e as Error).stack ?? String(e)}`);
    await cleanup();
    process.exit(1);
  });
