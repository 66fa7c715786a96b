// Soak: two agents at an accelerated rate for the whole run (10 min by default): the connection
// monitor pings every second, B's connection to A is killed about every second (`ss -K`, an RST
// both ways) so B redials and resubscribes, B looks up A's narinfos and downloads small NARs
// from A in loops, and A's store changes every 2 s (summary deltas to B). Measured: RSS and V8
// heap of both agents over time; the goal is RSS growth under 10 MiB after a warm-up. Per-call
// state that is never freed (a listener or dependent signal left on a long-lived AbortSignal for
// every ping or dial, say) shows here as steady growth.
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { createFleet, eventually, P2P_PORT, type FleetHost } from "../../test/helpers/fleet.js";
import { run } from "../../test/helpers/nix.js";
import { addBlob, downloadNar, narinfoLatencyMs, narinfoVia } from "../fleet-tools.js";
import { memoryMap, type MemoryMap } from "../memory-map.js";
import { mib, percentiles, ProcessMeter, sleep, type Scenario } from "../scenario.js";
import type { Narinfo } from "../../protocol/narinfo.js";

/** How often each kind of event comes: the accelerated soak's rates, or one agent's share of a fleet's. */
interface Rates {
  pingMs: number;
  killMs: number;
  /** Pause after each narinfo lookup, and after each NAR download. */
  lookupMs: number;
  narMs: number;
  churnMs: number;
}
const ACCELERATED: Rates = { pingMs: 1000, killMs: 1000, lookupMs: 50, narMs: 0, churnMs: 2000 };
/**
 * FLEETCACHE_SOAK_RATE=fleet: what one agent of a fleet of 20-100 hosts sees, generously, but
 * for pings: the connection monitor pings each peer every 10 s, 2-10 pings a second over 20-100
 * connections, here one a second on the one connection (its deadline is 80 % of the interval:
 * at 200 ms, a loaded machine missed it and connections dropped, half the NARs failed); a
 * redial a minute (a peer restarting or a link dropping somewhere); a narinfo lookup a second
 * and a NAR every 5 s (a fleet's builds and deployments, averaged over a day, ask far less); a
 * store change every 10 s.
 */
const FLEET: Rates = { pingMs: 1000, killMs: 60_000, lookupMs: 1000, narMs: 5000, churnMs: 10_000 };
const SAMPLE_EVERY_MS = 2000;
const PATHS = 300;
const GOAL_MIB = 10;

interface Sample {
  at: number;
  rss: number;
  /** V8 heap used and reserved, and memory outside it (Buffers, native), from /metrics. */
  heap: number | undefined;
  heapTotal: number | undefined;
  external: number | undefined;
  /** V8's reserved (committed) bytes per heap space: "new", "old", "code", "large_object", ... */
  spaces: Record<string, number>;
  /** RSS by kind of mapping (smaps). */
  map: MemoryMap | undefined;
}

/** prom-client's default process metrics, from the agent's /metrics. */
async function memory(host: FleetHost): Promise<Omit<Sample, "at" | "rss" | "map">> {
  const r = await host.http("/metrics").catch(() => undefined);
  const read = (name: string) => {
    const m = r && new RegExp(`^fleetcache_${name} (\\S+)$`, "m").exec(r.body);
    return m ? Number(m[1]) : undefined;
  };
  const spaces: Record<string, number> = {};
  for (const m of r?.body.matchAll(/^fleetcache_nodejs_heap_space_size_total_bytes\{space="(\w+)"\} (\S+)$/gm) ?? []) spaces[m[1]!] = Number(m[2]);
  return { heap: read("nodejs_heap_size_used_bytes"), heapTotal: read("nodejs_heap_size_total_bytes"), external: read("nodejs_external_memory_bytes"), spaces };
}

/**
 * Floors after the warm-up: the lowest value in the first half of the rest of the run, and in
 * the second half. V8 grows its heap to 150-190 MiB between major collections and gives it back
 * after them, so RSS swings by 100 MiB within a minute; what a leak raises is the floor the
 * swings return to (the lowest samples, taken just after a collection).
 */
function floors(samples: Sample[], warmupEnd: number, pick: (s: Sample) => number | undefined, of = Math.min): { from: number; to: number } {
  const after = samples.filter((s) => s.at >= warmupEnd);
  const mid = warmupEnd + ((after.at(-1)?.at ?? warmupEnd) - warmupEnd) / 2;
  const values = (xs: Sample[]) => of(...xs.map(pick).filter((v): v is number => v !== undefined));
  return { from: values(after.filter((s) => s.at < mid)), to: values(after.filter((s) => s.at >= mid)) };
}

export const soak: Scenario = {
  name: "soak",
  title: "two agents with pings every second, a forced disconnect and redial every second, lookups, NAR downloads and store changes in loops",
  goal: `RSS growth < ${GOAL_MIB} MiB after the warm-up (the floor RSS returns to after collections), on both agents`,
  defaultMinutes: 10,
  async run({ durationMs, log }) {
    const rates = process.env.FLEETCACHE_SOAK_RATE === "fleet" ? FLEET : ACCELERATED;
    const before = process.env.FLEETCACHE_PING_INTERVAL_MS;
    process.env.FLEETCACHE_PING_INTERVAL_MS = String(rates.pingMs);
    const fleet = await createFleet(["a", "b"]);
    const [a, b] = fleet.hosts as [FleetHost, FleetHost];
    try {
      log(`A holds ${PATHS} small paths; B knows A; pings every ${rates.pingMs} ms; ${JSON.stringify(rates)}`);
      const files: string[] = [];
      for (let i = 0; i < PATHS; i++) {
        const f = join(a.dir, `soak-${i}`);
        writeFileSync(f, `soak path ${i}\n`.repeat(1 + (i % 64) * 16));
        files.push(f);
      }
      const paths = (await run("nix-store", ["--store", a.storeRoot, "--add", ...files])).trim().split("\n");
      await addBlob(b, "b-own", 1024);
      await a.start();
      await b.start(["--peer", `${a.net.ip}:${P2P_PORT}`]);
      await eventually("B sees A's paths", () => narinfoVia(b, paths.at(-1)!), 60_000);
      const infos = new Map<string, Narinfo>();

      const start = Date.now();
      const end = start + durationMs;
      const warmupEnd = start + Math.max(20_000, durationMs * 0.2);
      const meters = { a: ProcessMeter.of(a.agent!), b: ProcessMeter.of(b.agent!) };
      const samples = { a: [] as Sample[], b: [] as Sample[] };
      const sampler = (async () => {
        while (Date.now() < end) {
          for (const [name, host] of [["a", a], ["b", b]] as const) {
            const pid = (name === "a" ? a : b).agent!.child.pid!;
            samples[name].push({ at: Date.now(), rss: meters[name].sample(), map: memoryMap(pid), ...(await memory(host)) });
          }
          const last = { a: samples.a.at(-1)!, b: samples.b.at(-1)! };
          const line = (s: Sample) =>
            `RSS ${mib(s.rss)} MiB (heap ${mib(s.heap ?? 0)} of ${mib(s.heapTotal ?? 0)}, new ${mib(s.spaces.new ?? 0)}, external ${mib(s.external ?? 0)}; ` +
            `anon ${mib(s.map?.otherAnon ?? 0)}, arenas ${mib(s.map?.arenas ?? 0)}, brk ${mib(s.map?.brk ?? 0)}, files ${mib(s.map?.files ?? 0)})`;
          if (samples.a.length % 5 === 1) log(`A ${line(last.a)}; B ${line(last.b)}`);
          await sleep(SAMPLE_EVERY_MS);
        }
      })();

      // Every second: kill B's mesh connections (to A's port, or A's from it) with an RST each way.
      let kills = 0;
      const killer = (async () => {
        while (Date.now() < end) {
          await sleep(rates.killMs);
          const out = await b.exec("ss", ["-K", "-t", "state", "established", `( dport = :${P2P_PORT} or sport = :${P2P_PORT} )`]).catch(() => "");
          if (out.split("\n").length > 2) kills++;
        }
      })();

      // Narinfo lookups on B for A's paths in turn (the router's cache keeps each 30 s, so many ask A).
      const lookups: number[] = [];
      let lookupMisses = 0;
      const lookup = (async () => {
        for (let i = 0; Date.now() < end; i++) {
          const r = await narinfoLatencyMs(b, paths[i % paths.length]!).catch(() => ({ status: 0, ms: 0 }));
          if (r.status === 200) lookups.push(r.ms);
          else lookupMisses++; // a lookup right after a kill, before B redialed, is a miss
          await sleep(rates.lookupMs);
        }
      })();

      // Small NARs from A through B, one after another.
      let narsOk = 0;
      let narsFailed = 0;
      const nars = (async () => {
        for (let i = 0; Date.now() < end; i++) {
          const p = paths[(i * 7) % paths.length]!;
          const info = infos.get(p) ?? (await narinfoVia(b, p).catch(() => undefined));
          if (!info) {
            narsFailed++;
            await sleep(100);
            continue;
          }
          infos.set(p, info);
          const d = await downloadNar(b, info);
          if (d.ok) narsOk++;
          else narsFailed++;
          if (rates.narMs > 0) await sleep(rates.narMs);
        }
      })();

      // A's store changes: one path in, the one added three rounds before out (summary deltas).
      let changes = 0;
      const churn = (async () => {
        const added: string[] = [];
        for (let i = 0; Date.now() < end; i++) {
          await sleep(rates.churnMs);
          const f = join(a.dir, "churn");
          writeFileSync(f, `churn ${i} ${start}\n`);
          added.push((await run("nix-store", ["--store", a.storeRoot, "--add", f])).trim());
          if (added.length > 3) await run("nix-store", ["--store", a.storeRoot, "--delete", added.shift()!]).catch(() => undefined);
          changes++;
        }
      })();

      await Promise.all([sampler, killer, lookup, nars, churn]);
      // FLEETCACHE_SOAK_SAMPLES=FILE keeps every sample (JSON) for a closer look.
      if (process.env.FLEETCACHE_SOAK_SAMPLES) writeFileSync(process.env.FLEETCACHE_SOAK_SAMPLES, JSON.stringify({ start, warmupEnd, samples }));
      const connectedAtEnd = (await b.status().catch(() => undefined))?.peers.find((p) => p.publicKey === a.publicKey)?.connected;

      const figures: [string, string][] = [];
      let ok = true;
      for (const name of ["a", "b"] as const) {
        const f = (pick: (s: Sample) => number | undefined) => floors(samples[name], warmupEnd, pick);
        const rss = f((s) => s.rss);
        const grew = (rss.to - rss.from) / (1 << 20);
        if (!(grew < GOAL_MIB)) ok = false;
        const fmt = (g: { from: number; to: number }) =>
          Number.isFinite(g.from) && Number.isFinite(g.to) ? `${mib(g.from)}→${mib(g.to)} MiB (${g.to >= g.from ? "+" : ""}${mib(g.to - g.from)})` : "not measured";
        const H = name.toUpperCase();
        figures.push([`agent ${H} RSS floor, 1st→2nd half after warm-up`, fmt(rss)]);
        // The highest samples: where V8 has filled its young generation, just before collecting.
        // With the young generation capped (AGENT_NODE_FLAGS) this is the steadier bound; the
        // floor moves with V8 shrinking the young generation (to 1 MiB) in quiet moments.
        figures.push([`agent ${H} RSS ceiling (the highest sample)`, fmt(floors(samples[name], warmupEnd, (s) => s.rss, Math.max))]);
        figures.push([`agent ${H} V8 heap used floor`, fmt(f((s) => s.heap))]);
        figures.push([`agent ${H} external memory (Buffers) floor`, fmt(f((s) => s.external))]);
        figures.push([`agent ${H} malloc (brk heap + arenas) floor`, fmt(f((s) => s.map && s.map.brk + s.map.arenas))]);
        const end = samples[name].findLast((s) => s.map !== undefined);
        if (end?.map) {
          const m = end.map;
          figures.push([
            `agent ${H} RSS at the end, by kind`,
            `V8 heap and other anonymous ${mib(m.otherAnon)} MiB (V8 reserved ${mib(end.heapTotal ?? 0)}, of it the new space ${mib(end.spaces.new ?? 0)}), ` +
              `malloc brk ${mib(m.brk)} and arenas ${mib(m.arenas)}, files ${mib(m.files)}`,
          ]);
        }
        figures.push([`agent ${H} over the run`, `${meters[name].summary()}; V8 heap reserved up to ${mib(Math.max(...samples[name].map((s) => s.heapTotal ?? 0)))} MiB`]);
      }
      return {
        ok,
        figures: [
          ["run", `${rates === FLEET ? "fleet rates" : "accelerated rates"}, ${((Date.now() - start) / 60_000).toFixed(1)} min; warm-up ${((warmupEnd - start) / 1000).toFixed(0)} s; a sample every ${SAMPLE_EVERY_MS / 1000} s`],
          ["forced disconnects (ss -K on B)", String(kills)],
          ["B connected to A at the end", String(connectedAtEnd ?? false)],
          ["narinfo lookups on B", `${percentiles(lookups)}; ${lookupMisses} not 200 (between a kill and the redial)`],
          ["NAR downloads through B", `${narsOk} complete, ${narsFailed} failed or skipped`],
          ["store changes on A", String(changes)],
          ...figures,
        ],
      };
    } finally {
      await fleet.destroy();
      if (before === undefined) delete process.env.FLEETCACHE_PING_INTERVAL_MS;
      else process.env.FLEETCACHE_PING_INTERVAL_MS = before;
    }
  },
};
