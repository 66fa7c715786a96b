// The mesh case of the benchmark: Nix on host B copies a closure of a few hundred MB that host A
// holds, once through B's and A's agents (B's localhost agent fetches from A over the mesh) and
// once from nginx on A serving the same closure as a static cache. Hosts are network namespaces
// on a private bridge (test/helpers), so the bytes cross a (virtual) network in both cases.
import { randomBytes } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { createFleet, eventually, P2P_PORT, type Fleet } from "../test/helpers/fleet.js";
import { shapeLink, shapingStats, type NetHost } from "../test/helpers/netns.js";
import { addToStore, NIX_FLAGS, pathInfo, run } from "../test/helpers/nix.js";
import { descendants, pinTree, readStatus, treeCpuSeconds } from "./load.js";

export interface MeshResult {
  paths: number;
  narBytes: number;
  agentSeconds: number;
  nginxSeconds: number;
  /** CPU seconds both agents (A serving, B fetching) used per GB of NAR, in the fastest agent run. */
  agentCpuPerGb: number;
  /** The same split by agent: A (the holder, sending) and B (the requester), in that run. */
  holderCpuPerGb: number;
  requesterCpuPerGb: number;
  /** agent MB/s ÷ nginx MB/s (equal bytes, so nginx time ÷ agent time). */
  ratio: number;
  /** Peak RSS (VmHWM) of A's and of B's agent over the whole case, MiB. */
  agentPeakRssMiB: [number, number];
  /** Where the fastest agent copy's wall time went, from B's per-NAR timing lines (only with logLevel "debug"). */
  timeline?: Timeline;
  /** The agents' log level (FLEETCACHE_LOG_LEVEL): "info" (an operator's default) unless asked. */
  logLevel: string;
  /**
   * Per path, in each agent copy: Nix's narinfo requests to B (hits and misses), B's narinfo
   * questions to A (peerQueries), and how many of those opened a mesh stream rather than reusing one.
   */
  narinfoPerPath: { nixToB: number; bToA: number; streamsOpened: number }[];
  /** CPU ms per NAR in the fastest copies: A's and B's agents, and Nix (through the agents; from nginx). */
  perNarMs: { holder: number; requester: number; nixAgents: number; nixNginx: number };
  /** NAR bodies on the bulk port in the whole case: sent by A, taken by B, fallbacks to the stream. */
  /** One-time bulk connections' bodies, bulk session bodies, and the session connections B opened. */
  bulk: { sent: number; received: number; fallbacks: number; sessionSent: number; sessionReceived: number; sessionConnections: number };
  /** LAN-direct NARs (`--direct`: both agents with direct_lan): B's redirects, NARs A's direct port sent, B's fallbacks to relaying. */
  direct?: { redirects: number; sent: number; fallbacks: number; asked?: number; minted?: number; repeats?: number; repeatSeconds?: number };
  /** How Nix fetched: "copy" (`nix copy --from`) or "substitute" (`nix-store --realise` with the server as substituter, max-jobs as given). */
  nixMode: string;
  /** pinned: host A (its agent, nginx) on CPU 1, host B (its agent, Nix) on CPU 0. */
  pinned: boolean;
  /** Both hosts' links shaped to this rate in each direction (tc syntax, "1gbit"), or null: unshaped. */
  linkRate: string | null;
  /**
   * A plain transfer over the same links: curl on B fetching the closure's NAR files from nginx
   * one after another on one connection, MB/s (the faster of two). What the wire and nginx give
   * one TCP stream, without Nix.
   */
  plainMBps: number;
  /** With a link rate: packets the shapers dropped (both hosts, both directions) and TCP segments A and B retransmitted, over the whole case. */
  shaping?: { dropped: number; retransSegs: [number, number] };
  /** 1-minute load average before and after the case. */
  load: [number, number];
  /**
   * Each agent copy's start and end on the monotonic clock in µs, as V8's CPU profiles count
   * time (profile-summary.js --from/--to takes them), in the order run; fastest is its index.
   */
  copyWindowsUs: [number, number][];
  fastest: number;
  /** A's and B's agent processes (a CPU profile's file name carries its process's). */
  pids: [number, number];
  /** V8's collections in the fastest agent copy, A's and B's, when the agents run with --trace-gc (FLEETCACHE_TEST_NODE_ARGS). */
  gc?: { holder: GcCount; requester: GcCount };
}

export interface GcCount {
  scavenges: number;
  markCompacts: number;
}

/** Counts --trace-gc's lines ("Scavenge", "Mark-Compact"; also "Mark-Compact (reduce)"). */
function gcCount(traceGc: string): GcCount {
  return { scavenges: traceGc.match(/: Scavenge/g)?.length ?? 0, markCompacts: traceGc.match(/: Mark-Compact/g)?.length ?? 0 };
}
const minus = (a: GcCount, b: GcCount): GcCount => ({ scavenges: a.scavenges - b.scavenges, markCompacts: a.markCompacts - b.markCompacts });

/**
 * B's peer NARs in one copy: each is fetched from A (and verified) and then sent to Nix, in
 * series (it is held until verified). Seconds summed over the NARs, NARs in each stage on
 * average (sum ÷ wall), and the share of the wall time in which no NAR was being sent to Nix.
 */
export interface Timeline {
  nars: number;
  fetchSeconds: number;
  sendSeconds: number;
  meanFetching: number;
  meanSending: number;
  idleShare: number;
  /** Most NARs in flight at once, and seconds from the copy's start to the first NAR request. */
  maxInFlight: number;
  firstRequestSeconds: number;
}

/** Reads B's "peer NAR sent" debug lines logged between `from` and `to` (epoch ms). */
export function timeline(logs: string, from: number, to: number): Timeline {
  const nars: { fetchStart: number; sendStart: number; end: number }[] = [];
  for (const line of logs.split("\n")) {
    if (!line.includes('"peer NAR sent"')) continue;
    const l = JSON.parse(line) as { time: number; fetchMs: number; sendMs: number };
    if (l.time < from || l.time > to) continue;
    nars.push({ fetchStart: l.time - l.sendMs - l.fetchMs, sendStart: l.time - l.sendMs, end: l.time });
  }
  const wall = to - from;
  // Time covered by at least one send: merge the send intervals in start order.
  let covered = 0;
  let until = -Infinity;
  for (const n of [...nars].sort((a, b) => a.sendStart - b.sendStart)) {
    const s = Math.max(n.sendStart, until);
    if (n.end > s) covered += n.end - s;
    until = Math.max(until, n.end);
  }
  const fetch = nars.reduce((t, n) => t + n.sendStart - n.fetchStart, 0);
  const send = nars.reduce((t, n) => t + n.end - n.sendStart, 0);
  const edges = nars.flatMap((n) => [[n.fetchStart, 1], [n.end, -1]] as const).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
  let inFlight = 0;
  let maxInFlight = 0;
  for (const [, d] of edges) maxInFlight = Math.max(maxInFlight, (inFlight += d));
  const first = nars.length ? Math.min(...nars.map((n) => n.fetchStart)) : from;
  return { nars: nars.length, fetchSeconds: fetch / 1000, sendSeconds: send / 1000, meanFetching: fetch / wall, meanSending: send / wall, idleShare: 1 - covered / wall, maxInFlight, firstRequestSeconds: (first - from) / 1000 };
}

/** Largest VmHWM in a process tree (the agent may run under a wrapper), MiB. */
function peakRssMiB(pid: number): number {
  return Math.max(0, ...[pid, ...descendants(pid)].map((p) => readStatus(p).get("VmHWM") ?? 0)) / 1024;
}

const NGINX_PORT = 8080;

/** CPU seconds of this process's children that have ended and been waited for (cutime + cstime): the Nix copies. */
function waitedChildrenCpuSeconds(): number {
  const stat = readFileSync("/proc/self/stat", "utf8");
  const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(f[13]) + Number(f[14])) / 100; // USER_HZ
}

const loadAverage = () => Number(readFileSync("/proc/loadavg", "utf8").split(" ")[0]);

/** curl on `host` fetching `urls` one after another on one connection: MB/s (10^6 bytes/s) over the whole. */
async function plainTransfer(host: NetHost, urls: string[], pin: boolean): Promise<number> {
  const args = ["-s", "-w", "%{size_download}\n", ...urls.flatMap((u) => ["-o", "/dev/null", u])];
  const t0 = process.hrtime.bigint();
  const out = await (pin ? host.exec("taskset", ["-c", "0", "curl", ...args]) : host.exec("curl", args));
  const bytes = out.trim().split("\n").reduce((n, l) => n + Number(l), 0);
  return bytes / 1e6 / (Number(process.hrtime.bigint() - t0) / 1e9);
}

/** TCP segments a host (its namespace) has retransmitted, from its /proc/net/snmp. */
async function retransSegs(host: NetHost): Promise<number> {
  const tcp = (await host.exec("cat", ["/proc/net/snmp"])).split("\n").filter((l) => l.startsWith("Tcp:"));
  const [names, values] = tcp.map((l) => l.split(/\s+/));
  return Number(values![names!.indexOf("RetransSegs")]);
}

/**
 * Runs the case: `mib` MiB of content in `count` paths.
 * `pin`: host A's processes (its agent, nginx) on CPU 1 and host B's (its agent, Nix) on CPU 0,
 * as two hosts would have a CPU each, instead of all of them sharing both CPUs.
 */
export async function meshCase(opts: { mib?: number; count?: number; pin?: boolean; direct?: boolean; linkRate?: string; logLevel?: string; substitute?: boolean; jobs?: string; log?: (s: string) => void } = {}): Promise<MeshResult> {
  const mib = opts.mib ?? 400;
  // How Nix on B fetches: `nix copy --from` (a thread pool the size of the core count), or a
  // substitution into B's own kind of store, as `nix build` or a NixOS switch does (parallel up to
  // max-jobs in Nix 2.8, max-substitution-jobs (16) in current Nix).
  const substitute = opts.substitute ?? false;
  const count = opts.count ?? 40;
  const pin = opts.pin ?? false;
  // The agents log as an operator's do ("info"): at "debug" each writes a line or two per NAR to a
  // pipe the bench reads, which costs them CPU a deployed agent does not spend. The timeline needs debug.
  const logLevel = opts.logLevel ?? "info";
  const load0 = loadAverage();
  const log = opts.log ?? (() => {});
  const fleet: Fleet = await createFleet(["bench-a", "bench-b"]);
  let nginx: { kill(): boolean } | undefined;
  try {
    const [A, B] = fleet.hosts as [NonNullable<Fleet["hosts"][0]>, NonNullable<Fleet["hosts"][0]>];
    // A switch port's line rate, both ways, for every copy (nginx's and the agents' alike).
    const linkRate = opts.linkRate ?? null;
    if (linkRate) for (const h of [A, B]) await shapeLink(h.net, linkRate);
    const retrans0 = linkRate ? await Promise.all([A.net, B.net].map(retransSegs)) : [0, 0];
    log(`mesh: making ${count} paths of ${(mib / count).toFixed(0)} MiB in host A's store`);
    const paths: string[] = [];
    const per = Math.floor((mib << 20) / count);
    for (let i = 0; i < count; i++) {
      const dir = join(A.dir, `p${i}`);
      mkdirSync(dir, { recursive: true });
      writeFileSync(join(dir, "data"), randomBytes(per));
      writeFileSync(join(dir, "small"), `path ${i}\n`);
      paths.push(await addToStore(A.storeRoot, dir));
      rmSync(dir, { recursive: true });
    }
    // B needs a store of its own for its agent.
    writeFileSync(join(B.dir, "b"), "b\n");
    await addToStore(B.storeRoot, join(B.dir, "b"));
    const narBytes = (await pathInfo(A.storeRoot, paths)).reduce((n, i) => n + i.narSize, 0);

    // nginx on A serves the same closure, exported by Nix as a static uncompressed cache.
    const cache = join(A.dir, "cache");
    await run("nix", [...NIX_FLAGS, "copy", "--from", A.storeRoot, "--to", `file://${cache}?compression=none`, ...paths]);
    const conf = join(A.dir, "nginx.conf");
    writeFileSync(conf, `daemon off; user root; worker_processes auto; pid ${A.dir}/nginx.pid; error_log ${A.dir}/nginx.err;
events { worker_connections 768; }
http { sendfile on; tcp_nopush on; access_log off; keepalive_timeout 65;
  server { listen ${A.net.ip}:${NGINX_PORT}; root ${cache}; } }
`);
    nginx = pin ? A.net.spawn("taskset", ["-c", "1", "nginx", "-c", conf, "-e", `${A.dir}/nginx.err`], { stdio: "ignore" }) : A.net.spawn("nginx", ["-c", conf, "-e", `${A.dir}/nginx.err`], { stdio: "ignore" });

    // --trace-gc's lines are C stdio, block-buffered on a pipe: line-buffered, so counts between copies are exact.
    const traceGc = (process.env.FLEETCACHE_TEST_NODE_ARGS ?? "").includes("--trace-gc");
    const env = { FLEETCACHE_LOG_LEVEL: logLevel, ...(traceGc ? { LD_PRELOAD: "/usr/libexec/coreutils/libstdbuf.so", _STDBUF_O: "L" } : {}) };
    const direct = opts.direct ? ["--direct-lan"] : [];
    await A.start(["--p2p-listen", `0.0.0.0:${P2P_PORT}`, ...direct], undefined, env);
    const aPaths = (await A.status()).self.paths;
    const startB = async () => {
      await B.start(["--peer", `${A.net.ip}:${P2P_PORT}`, ...direct], undefined, env);
      await eventually("B has A's summary", async () => (await B.status()).peers.find((p) => p.connected)?.pathCount === aPaths, 30_000);
      if (pin) await pinTree(B.agent!.child.pid!, "0");
    };
    await startB();
    await eventually("nginx answers", async () => (await B.exec("curl", ["-s", "-o", "/dev/null", "-w", "%{http_code}", `http://${A.net.ip}:${NGINX_PORT}/nix-cache-info`])) === "200", 10_000);
    // nginx's workers were forked under taskset; A's agent (and its threads) is moved now.
    if (pin) await pinTree(A.agent!.child.pid!, "1");
    const narUrls = readdirSync(join(cache, "nar")).map((f) => `http://${A.net.ip}:${NGINX_PORT}/nar/${f}`);
    const plainMBps = Math.max(await plainTransfer(B.net, narUrls, pin), await plainTransfer(B.net, narUrls, pin));
    log(`mesh: link ${linkRate ?? "unshaped"}; curl from nginx (the NARs one after another, one connection) ${plainMBps.toFixed(0)} MB/s`);

    const spans: [number, number][] = []; // each agent copy's start and end, epoch ms
    const windows: [number, number][] = []; // the same on the monotonic clock, µs
    const nixCpu: number[] = []; // Nix's CPU seconds in each copy, in order
    const copy = async (from: string, dest: string, sigs: string[]): Promise<number> => {
      const t0 = process.hrtime.bigint();
      const start = Date.now();
      const c0 = waitedChildrenCpuSeconds();
      // A fresh narinfo cache each time: Nix looks the closure up as a host deploying it for the
      // first time does (with its 30-day positive cache, a second copy would skip the lookups).
      const cacheHome = `${dest}-xdg-cache`;
      const common = ["--option", "narinfo-cache-negative-ttl", "0", ...sigs];
      const nixCopy = substitute
        ? ["env", `XDG_CACHE_HOME=${cacheHome}`, "nix-store", "--store", dest, "--realise", "--option", "substituters", from, "--option", "max-jobs", opts.jobs ?? "auto", ...common, ...paths]
        : ["env", `XDG_CACHE_HOME=${cacheHome}`, "nix", ...NIX_FLAGS, "copy", "--from", from, "--to", dest, ...common, ...paths];
      await (pin ? B.exec("taskset", ["-c", "0", ...nixCopy]) : B.exec(nixCopy[0]!, nixCopy.slice(1)));
      const t1 = process.hrtime.bigint();
      nixCpu.push(waitedChildrenCpuSeconds() - c0);
      rmSync(cacheHome, { recursive: true, force: true });
      if (from === B.agent!.url) {
        spans.push([start, Date.now()]);
        windows.push([Number(t0 / 1000n), Number(t1 / 1000n)]);
      }
      return Number(t1 - t0) / 1e9;
    };
    // Alternate, twice each, and keep the faster of each (the first may pay for cold caches).
    const agentRuns: number[] = [];
    const agentCpu: [number, number][] = [];
    const nginxRuns: number[] = [];
    const agentsCpu = (): [number, number] => [treeCpuSeconds(A.agent!.child.pid!), treeCpuSeconds(B.agent!.child.pid!)];
    const gcs = (): [GcCount, GcCount] => [gcCount(A.agent!.stdout()), gcCount(B.agent!.stdout())];
    const agentGc: [GcCount, GcCount][] = [];
    const narinfoPerPath: MeshResult["narinfoPerPath"] = [];
    // B's narinfo requests from Nix (every outcome), its questions to A, and the streams they opened.
    const lookups = async () => {
      const c = (await B.status()).counters;
      return [(c.narinfoHitsLocal ?? 0) + (c.narinfoHitsPeer ?? 0) + (c.narinfoMisses ?? 0), c.peerQueries ?? 0, c.narinfoStreamsOpened ?? 0] as const;
    };
    const trust = ["--option", "trusted-public-keys", fleet.trustedKeys.join(" "), "--option", "require-sigs", "true"];
    // With --direct, B relays a NAR Nix asks for again within 10 minutes of a redirect for it (a
    // retry after a failure looks the same), so the second round's copy gets a fresh B (its
    // counters and log kept) to be LAN-direct as the first; a third copy on that B measures the
    // repeat, relayed (direct.repeatSeconds).
    let earlierB = { counters: {} as Record<string, number>, logs: "" };
    for (let round = 0; round < 2; round++) {
      if (round > 0 && opts.direct) {
        earlierB = { counters: (await B.status()).counters, logs: B.agent!.logs() };
        await startB();
      }
      const [a0, b0] = agentsCpu();
      const [ga0, gb0] = gcs();
      const l0 = await lookups();
      agentRuns.push(await copy(B.agent!.url, join(B.dir, `dest-agent-${round}`), trust));
      const [a1, b1] = agentsCpu();
      const l1 = await lookups();
      narinfoPerPath.push({ nixToB: (l1[0] - l0[0]) / count, bToA: (l1[1] - l0[1]) / count, streamsOpened: (l1[2] - l0[2]) / count });
      const [ga1, gb1] = gcs();
      agentCpu.push([a1 - a0, b1 - b0]);
      agentGc.push([minus(ga1, ga0), minus(gb1, gb0)]);
      log(`mesh: through the agents ${agentRuns.at(-1)!.toFixed(2)} s, agents' CPU ${(a1 - a0).toFixed(2)} s (A) + ${(b1 - b0).toFixed(2)} s (B); per path ${JSON.stringify(narinfoPerPath.at(-1))}`);
      // The static cache holds unsigned paths (they were added, not built by a signer).
      nginxRuns.push(await copy(`http://${A.net.ip}:${NGINX_PORT}`, join(B.dir, `dest-nginx-${round}`), ["--option", "require-sigs", "false"]));
      log(`mesh: from nginx ${nginxRuns.at(-1)!.toFixed(2)} s`);
      rmSync(join(B.dir, `dest-agent-${round}`), { recursive: true, force: true });
      rmSync(join(B.dir, `dest-nginx-${round}`), { recursive: true, force: true });
    }
    let repeatSeconds: number | undefined;
    if (opts.direct) {
      repeatSeconds = await copy(B.agent!.url, join(B.dir, "dest-agent-repeat"), trust);
      spans.pop(); // not one of the copies compared
      windows.pop();
      rmSync(join(B.dir, "dest-agent-repeat"), { recursive: true, force: true });
      log(`mesh: the same closure again on that B (relayed: asked for again) ${repeatSeconds.toFixed(2)} s`);
    }
    const agentSeconds = Math.min(...agentRuns);
    const nginxSeconds = Math.min(...nginxRuns);
    const fastest = agentRuns.indexOf(agentSeconds);
    const [holderCpu, requesterCpu] = agentCpu[fastest]!;
    // Copies ran agents, nginx, agents, nginx: Nix's CPU in the fastest of each kind.
    const nixAgents = nixCpu[2 * fastest]!;
    const nixNginx = nixCpu[2 * nginxRuns.indexOf(nginxSeconds) + 1]!;
    const sa = (await A.status()).counters;
    // B's counters over the whole case (both agents on B, with --direct).
    const sbNow = (await B.status()).counters;
    const sb: Record<string, number> = { ...sbNow };
    for (const [k, v] of Object.entries(earlierB.counters)) if (typeof v === "number" && typeof sbNow[k] === "number") sb[k] = sbNow[k] + v;
    const bulk = { sent: sa.bulkNarsSent ?? 0, received: sb.bulkNarsReceived ?? 0, fallbacks: sb.bulkFallbacks ?? 0, sessionSent: sa.bulkSessionNarsSent ?? 0, sessionReceived: sb.bulkSessionNarsReceived ?? 0, sessionConnections: sb.bulkSessionConnections ?? 0 };
    const directCounts = opts.direct ? { redirects: sb.directRedirects ?? 0, sent: sa.directNarsSent ?? 0, fallbacks: sb.directFallbacks ?? 0, asked: sb.directTicketsAsked ?? 0, minted: sb.directTicketsMinted ?? 0, repeats: sb.directRepeatsRelayed ?? 0, ...(repeatSeconds !== undefined && { repeatSeconds }) } : undefined;
    if (directCounts) log(`mesh: LAN-direct: ${directCounts.redirects} redirects by B (tickets: ${directCounts.asked} asked of A, ${directCounts.minted} minted by B), ${directCounts.sent} NARs sent by A's direct port, ${directCounts.fallbacks} fallbacks, ${directCounts.repeats} relayed as asked for again`);
    const perNarMs = { holder: (holderCpu / count) * 1e3, requester: (requesterCpu / count) * 1e3, nixAgents: (nixAgents / count) * 1e3, nixNginx: (nixNginx / count) * 1e3 };
    log(`mesh: CPU ms per NAR: A ${perNarMs.holder.toFixed(1)}, B ${perNarMs.requester.toFixed(1)}, Nix ${perNarMs.nixAgents.toFixed(1)} (through the agents) / ${perNarMs.nixNginx.toFixed(1)} (from nginx); bulk bodies sent ${bulk.sent}, received ${bulk.received}, fallbacks ${bulk.fallbacks}; on sessions sent ${bulk.sessionSent}, received ${bulk.sessionReceived} on ${bulk.sessionConnections} connections`);
    const gb = narBytes / 1e9;
    const agentCpuPerGb = (holderCpu + requesterCpu) / gb;
    const agentPeakRssMiB: [number, number] = [peakRssMiB(A.agent!.child.pid!), peakRssMiB(B.agent!.child.pid!)];
    const [from, to] = spans[fastest]!;
    const t = logLevel === "debug" ? timeline(earlierB.logs + B.agent!.logs(), from, to) : undefined;
    if (process.env.MESH_BENCH_B_LOG) {
      // B's agent's log, for a closer look (and its --trace-gc lines, if any)
      writeFileSync(process.env.MESH_BENCH_B_LOG, earlierB.logs + B.agent!.logs());
      if (traceGc) writeFileSync(`${process.env.MESH_BENCH_B_LOG}.gc`, B.agent!.stdout());
      writeFileSync(`${process.env.MESH_BENCH_B_LOG}.a`, A.agent!.logs()); // and A's, beside it
    }
    const shaping = linkRate ? { dropped: (await Promise.all([A.net, B.net].map(shapingStats))).flat().reduce((n, q) => n + q.dropped, 0), retransSegs: (await Promise.all([A.net, B.net].map(retransSegs))).map((n, i) => n - retrans0[i]!) as [number, number] } : undefined;
    if (shaping) log(`mesh: shapers dropped ${shaping.dropped} packets; TCP segments retransmitted by A ${shaping.retransSegs[0]}, by B ${shaping.retransSegs[1]}`);
    if (t) log(`mesh: fastest agent copy: ${t.nars} peer NARs, fetching ${t.fetchSeconds.toFixed(2)} s and sending ${t.sendSeconds.toFixed(2)} s in all (${t.meanFetching.toFixed(2)} / ${t.meanSending.toFixed(2)} at a time), no NAR going to Nix ${(t.idleShare * 100).toFixed(0)} % of the time, at most ${t.maxInFlight} at once, first request after ${t.firstRequestSeconds.toFixed(2)} s`);
    return {
      paths: count, narBytes, agentSeconds, nginxSeconds, agentCpuPerGb, holderCpuPerGb: holderCpu / gb, requesterCpuPerGb: requesterCpu / gb,
      ratio: nginxSeconds / agentSeconds, nixMode: substitute ? `substitute (max-jobs ${opts.jobs ?? "auto"})` : "copy", agentPeakRssMiB, ...(t && { timeline: t }), logLevel, narinfoPerPath, perNarMs, bulk, ...(directCounts && { direct: directCounts }), pinned: pin, linkRate, plainMBps, ...(shaping && { shaping }), load: [load0, loadAverage()], copyWindowsUs: windows, fastest, pids: [A.agent!.child.pid!, B.agent!.child.pid!],
      ...(traceGc && { gc: { holder: agentGc[fastest]![0], requester: agentGc[fastest]![1] } }),
    };
  } finally {
    nginx?.kill();
    await fleet.destroy();
  }
}

// Standalone: `node dist/bench/mesh.js [MiB] [--count PATHS] [--pin] [--direct] [--log-level LEVEL]`.
if (process.argv[1]?.endsWith("bench/mesh.js")) {
  const { values, positionals } = parseArgs({ allowPositionals: true, options: { count: { type: "string" }, pin: { type: "boolean", default: false }, direct: { type: "boolean", default: false }, "link-rate": { type: "string" }, "log-level": { type: "string", default: "info" }, substitute: { type: "boolean", default: false }, jobs: { type: "string" }, help: { type: "boolean", default: false } } });
  if (values.help) {
    console.log(`Usage: node dist/bench/mesh.js [MIB] [--count PATHS] [--pin] [--direct] [--link-rate RATE] [--substitute [--jobs N]]
Nix on host B copies PATHS paths (default 40) of MIB MiB in all (default 400), held by host A,
through B's and A's agents and from nginx on A, in network namespaces (root); prints the figures
as JSON on stdout, progress on stderr.
  --pin     host A's processes on CPU 1, host B's and Nix on CPU 0 (two hosts with a core each)
  --direct  both agents with direct_lan: B redirects Nix to A's direct port (LAN-direct NARs);
            B's agent is restarted before the second agent copy (it would relay NARs Nix asks
            for again within 10 minutes), and a third copy on it times that relayed repeat
  --link-rate RATE  each host's link limited to RATE both ways (tc's syntax: 1gbit, 2500mbit), as
            a switch port of that speed; default unshaped (memory speed between namespaces)
  --log-level LEVEL  the agents' log level (default info, as operators run them; "debug" adds
            the timeline of B's peer NARs, from its per-NAR debug lines)
  --substitute  Nix substitutes the paths into a fresh store (nix-store --realise, the server as
            its only substituter), as nix build or a system switch does, instead of nix copy
  --jobs N  with --substitute: Nix's max-jobs (default auto), which bounds parallel substitutions
            in Nix 2.8; current Nix bounds them by max-substitution-jobs (16) instead`);
  } else {
    const r = await meshCase({ mib: Number(positionals[0] ?? 400), count: Number(values.count ?? 40), pin: values.pin, direct: values.direct, substitute: values.substitute, jobs: values.jobs, linkRate: values["link-rate"], logLevel: values["log-level"], log: (s) => console.error(s) });
    console.log(JSON.stringify(r));
  }
}
