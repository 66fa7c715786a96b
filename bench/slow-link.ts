// `npm run bench -- --case slow-link`: compression of NAR transfers between agents. Nix on host B
// copies a closure of real binaries (files from /usr/lib and /usr/bin put into store paths) that
// host A holds, through B's and A's agents, with B's agent set to each --mesh-compression mode in
// turn (restarted for each, so "auto" starts knowing nothing of the link):
//   - over a 100 Mbit/s link: the link proxy (faults/link-proxy.ts) between two sites, 5 ms each way;
//   - over the fast LAN: the two hosts on one bridge, no proxy.
// Each mode runs `--rounds` times, alternating; the fastest run of each counts.
import { lstatSync, mkdirSync, readdirSync, copyFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { createFleet, eventually, P2P_PORT, type Fleet, type FleetHost } from "../test/helpers/fleet.js";
import { addToStore, pathInfo } from "../test/helpers/nix.js";
import { linkedFleet } from "../faults/fleet-tools.js";
import { readStatus, resetPeakRss, treeCpuSeconds } from "./load.js";

const HELP = `Usage: npm run bench -- --case slow-link [options]

Nix copies a closure of real binaries from a peer through the agents, per --mesh-compression mode,
over a rate-limited link and over the LAN.

  --mib N        closure size in MiB (default 160)
  --rate R       the slow link's rate per direction (default 12.5M: 100 Mbit/s)
  --latency MS   the slow link's latency each way (default 5)
  --rounds N     runs per mode (default 2)
  --only W       slow or lan (default both)
  --modes M,...  the --mesh-compression modes to run (default off,auto,zstd)
`;

const MODES = ["off", "auto", "zstd"] as const;
type Mode = (typeof MODES)[number];

interface Run {
  mode: Mode;
  seconds: number;
  /** Counters of B's agent after the copy. */
  narBytes: number;
  wireBytes: number;
  compressed: number;
  /** CPU seconds of both agents during the copy. */
  cpu: number;
  /** Of that, the requesting agent's (B: receiving, verifying, answering Nix). */
  cpuB: number;
  /** Peak RSS (VmHWM) of the holder's and the requester's agent during the copy, MiB. */
  rssA: number;
  rssB: number;
}

/** Real binaries and libraries in store paths of about 8 MiB each, `mib` MiB in all. */
async function binaryClosure(host: FleetHost, mib: number): Promise<string[]> {
  const files: string[] = [];
  for (const dir of ["/usr/lib/x86_64-linux-gnu", "/usr/bin", "/usr/lib"]) {
    for (const name of readdirSync(dir).sort()) {
      const f = join(dir, name);
      const st = lstatSync(f, { throwIfNoEntry: false });
      if (st?.isFile() && st.size >= 64 << 10 && st.size <= 16 << 20) files.push(f);
    }
  }
  const paths: string[] = [];
  let total = 0;
  let part: string | undefined;
  let partBytes = 0;
  const flush = async () => {
    if (part) paths.push(await addToStore(host.storeRoot, part));
    if (part) rmSync(part, { recursive: true });
    part = undefined;
    partBytes = 0;
  };
  for (const f of files) {
    if (total >= mib << 20) break;
    if (!part) mkdirSync((part = join(host.dir, `bins-${paths.length}`)));
    const size = lstatSync(f).size;
    copyFileSync(f, join(part, f.replaceAll("/", "_")));
    partBytes += size;
    total += size;
    if (partBytes >= 8 << 20) await flush();
  }
  await flush();
  if (total < mib << 20) throw new Error(`only ${total >> 20} MiB of binaries found in /usr`);
  return paths;
}

async function measure(where: string, a: FleetHost, b: FleetHost, peer: string, paths: string[], trustedKeys: string[], rounds: number, modes: readonly Mode[], log: (s: string) => void): Promise<Run[]> {
  writeFileSync(join(b.dir, "b"), "b\n");
  await addToStore(b.storeRoot, join(b.dir, "b"));
  await a.start(["--p2p-listen", `0.0.0.0:${P2P_PORT}`]);
  const aPaths = (await a.status()).self.paths;
  const runs: Run[] = [];
  for (let round = 0; round < rounds; round++) {
    for (const mode of modes) {
      await b.start(["--peer", peer, "--mesh-compression", mode]);
      await eventually("B has A's summary", async () => (await b.status()).peers.find((p) => p.connected)?.pathCount === aPaths, 60_000);
      // auto decides its first transfers by this ping (libp2p's, between the two agents).
      const rtt = ((await b.status()).peers.find((p) => p.connected) as { rttMs?: number } | undefined)?.rttMs;
      const dest = join(b.dir, `dest-${mode}-${round}`);
      const cpuB = () => treeCpuSeconds(b.agent!.child.pid!);
      const cpu = () => treeCpuSeconds(a.agent!.child.pid!) + cpuB();
      const [cpu0, cpuB0] = [cpu(), cpuB()];
      resetPeakRss(a.agent!.child.pid!);
      const t0 = process.hrtime.bigint();
      await b.nix(["copy", "--from", b.agent!.url, "--to", dest, "--option", "trusted-public-keys", trustedKeys.join(" "), "--option", "require-sigs", "true", ...paths]);
      const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
      const status = await b.status();
      const c = status.counters;
      const figures = status.peers.find((p) => p.connected) as { plainBytesPerSec?: number; zstdBytesPerSec?: number } | undefined;
      const run: Run = { mode, seconds, narBytes: c.narBytesFromPeers ?? 0, wireBytes: c.narWireBytesFromPeers ?? 0, compressed: c.compressedNarsFromPeers ?? 0, cpu: cpu() - cpu0, cpuB: cpuB() - cpuB0, rssA: peakMiB(a), rssB: peakMiB(b) };
      runs.push(run);
      log(`${where} ${mode}: ping ${rtt?.toFixed(1) ?? "?"} ms before the copy, ${seconds.toFixed(2)} s, ${(run.narBytes / 1e6).toFixed(1)} MB NAR in ${(run.wireBytes / 1e6).toFixed(1)} MB on the wire, ${run.compressed} compressed transfers, agents' CPU ${run.cpu.toFixed(1)} s (B ${run.cpuB.toFixed(1)} s), peak RSS A ${run.rssA} MiB, B ${run.rssB} MiB; auto's figures plain ${mb(figures?.plainBytesPerSec)}, zstd ${mb(figures?.zstdBytesPerSec)} MB/s`);
      await b.stop();
      rmSync(dest, { recursive: true, force: true });
    }
  }
  return runs;
}

const mb = (n: number | undefined) => (n === undefined ? "-" : (n / 1e6).toFixed(1));

function peakMiB(host: FleetHost): number {
  return Math.round((readStatus(host.agent!.child.pid!).get("VmHWM") ?? 0) / 1024);
}

function summary(where: string, runs: Run[], narBytes: number, modes: readonly Mode[]): string {
  const best = (m: Mode) => runs.filter((r) => r.mode === m).sort((x, y) => x.seconds - y.seconds)[0]!;
  const off = best(modes[0]!);
  const lines = [`${where}: ${(narBytes / 1e6).toFixed(0)} MB of NAR`];
  for (const m of modes) {
    const r = best(m);
    lines.push(`  ${m.padEnd(4)} ${r.seconds.toFixed(2)} s (${(narBytes / 1e6 / r.seconds).toFixed(1)} MB/s), wire ${(r.wireBytes / 1e6).toFixed(1)} MB, ${(off.seconds / r.seconds).toFixed(2)}x of ${modes[0]}, agents' CPU ${r.cpu.toFixed(1)} s (B ${r.cpuB.toFixed(1)} s, ${(r.cpuB / (narBytes / 1e9)).toFixed(1)} s/GB), peak RSS ${r.rssA}/${r.rssB} MiB; all runs ${runs.filter((x) => x.mode === m).map((x) => x.seconds.toFixed(2)).join(", ")} s`);
  }
  return lines.join("\n");
}

export async function slowLinkMain(argv: string[]): Promise<void> {
  const { values } = parseArgs({
    args: argv,
    options: {
      case: { type: "string" },
      mib: { type: "string", default: "160" },
      rate: { type: "string", default: "12.5M" },
      latency: { type: "string", default: "5" },
      rounds: { type: "string", default: "2" },
      only: { type: "string" },
      modes: { type: "string", default: MODES.join(",") },
      help: { type: "boolean" },
    },
  });
  if (values.help) return void process.stdout.write(HELP);
  const log = (s: string) => console.error(s);
  const mib = Number(values.mib);
  const rounds = Number(values.rounds);
  const modes = values.modes!.split(",") as Mode[];
  if (modes.length === 0 || modes.some((m) => !MODES.includes(m))) throw new Error(`--modes: a list of ${MODES.join(", ")}`);
  const out: string[] = [];
  if (values.only !== "lan") {
    const net = await linkedFleet({ latencyMs: Number(values.latency), rate: values.rate! });
    try {
      log(`slow link: ${values.rate}/s, ${values.latency} ms each way; making ${mib} MiB of binaries in A's store`);
      const paths = await binaryClosure(net.a, mib);
      const narBytes = (await pathInfo(net.a.storeRoot, paths)).reduce((n, i) => n + i.narSize, 0);
      const runs = await measure("slow", net.a, net.b, net.aViaLink, paths, net.fleet.trustedKeys, rounds, modes, log);
      out.push(summary(`slow link (${values.rate}/s, ${values.latency} ms each way)`, runs, narBytes, modes));
    } finally {
      await net.destroy();
    }
  }
  if (values.only !== "slow") {
    const fleet: Fleet = await createFleet(["lan-a", "lan-b"]);
    try {
      const [a, b] = fleet.hosts as [FleetHost, FleetHost];
      const paths = await binaryClosure(a, mib);
      const narBytes = (await pathInfo(a.storeRoot, paths)).reduce((n, i) => n + i.narSize, 0);
      const runs = await measure("lan", a, b, `${a.net.ip}:${P2P_PORT}`, paths, fleet.trustedKeys, rounds, modes, log);
      out.push(summary("LAN (bridge between namespaces, no proxy)", runs, narBytes, modes));
    } finally {
      await fleet.destroy();
    }
  }
  console.log(out.join("\n"));
}

// Standalone: `node dist/bench/slow-link.js [options]`.
if (process.argv[1]?.endsWith("bench/slow-link.js")) await slowLinkMain(process.argv.slice(2));
