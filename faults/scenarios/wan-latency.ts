// Scenario 1: a healthy peer over a link with 60 ms each way must stay connected, and a
// rate-limited 64 MiB NAR download through it must complete, for the whole run. Before the fix,
// libp2p's ConnectionMonitor and the peer manager both pinged; their pings collided on the ping
// protocol's one outbound stream and the loser closed the connection.
// It also asks B for narinfos A holds throughout: one B has cached, and each time one of many
// small paths B has not asked A for within its cache's 30 s, so that lookup crosses the link while
// a NAR fills it. Such a lookup answered 404 at the 2 s peer deadline (a path the fleet holds,
// which Nix would then remember as missing for an hour) until lookups got the longest deadline
// while a peer NAR is in flight.
import { downloadNar, linkedFleet, narinfoLatencyMs, narinfoVia, addBlob, type Download } from "../fleet-tools.js";
import { eventually } from "../../test/helpers/fleet.js";
import { logLines, percentiles, ProcessMeter, sleep, type Scenario } from "../scenario.js";

const LATENCY_MS = 60;
/** The link itself: a modest WAN, faster than the download so the link has headroom. */
const LINK_RATE = "4MiB";
const DOWNLOAD_RATE = "1M"; // curl: 1 MiB/s
const BLOB = 64 << 20;
/** Small paths on A, asked in turn (one every 2 s: each is asked again after 2 min, past B's 30 s cache). */
const SMALL_PATHS = 64;

export const wanLatency: Scenario = {
  name: "wan-latency",
  title: "a healthy peer over a link with 60 ms each way",
  goal: "0 drops for the whole run; every 1 MiB/s 64 MiB transfer completes intact; every lookup of a held path answered 200",
  defaultMinutes: 10,
  async run({ durationMs, log }) {
    const net = await linkedFleet({ latencyMs: LATENCY_MS, rate: LINK_RATE });
    const { a, b } = net;
    try {
      log(`A holds a ${BLOB >> 20} MiB path; B reaches A through the link proxy (${LATENCY_MS} ms each way, ${LINK_RATE}/s)`);
      const blob = await addBlob(a, "wan-blob", BLOB);
      await addBlob(b, "b-own", 1024); // an agent needs a store of its own
      const small: string[] = [];
      for (let i = 0; i < SMALL_PATHS; i++) small.push(await addBlob(a, `wan-small-${i}`, 4096));
      await a.start();
      await b.start(["--peer", net.aViaLink]);
      const info = await eventually("B sees A's blob", () => narinfoVia(b, blob), 60_000);
      await eventually("B sees A's small paths", () => narinfoVia(b, small.at(-1)!), 60_000);
      const meters = { a: ProcessMeter.of(a.agent!), b: ProcessMeter.of(b.agent!) };
      const start = Date.now();
      const end = start + durationMs;

      // Lookups and samples every 2 s while downloads run back to back.
      const lookups: number[] = [];
      const rtts: number[] = [];
      // Lookups not answered 200: the status (0: curl failed), when, and how long it took.
      const lookupFailures: string[] = [];
      // The same for the small paths, each asked anew of A (not in B's cache).
      const fresh: number[] = [];
      const freshFailures: string[] = [];
      const ask = async (path: string, ok: number[], failures: string[]) => {
        const at = Date.now();
        const r = await narinfoLatencyMs(b, path).catch(() => ({ status: 0, ms: Date.now() - at }));
        if (r.status === 200) ok.push(r.ms);
        else failures.push(`${r.status} at ${Math.round((at - start) / 1000)} s after ${Math.round(r.ms)} ms`);
      };
      const sampler = (async () => {
        for (let i = 0; Date.now() < end; i++) {
          await Promise.all([ask(blob, lookups, lookupFailures), ask(small[i % SMALL_PATHS]!, fresh, freshFailures)]);
          const peer = (await b.status().catch(() => undefined))?.peers.find((p) => p.name === "a-1") as { rttMs?: number } | undefined;
          if (peer?.rttMs !== undefined) rtts.push(peer.rttMs);
          meters.a.sample();
          meters.b.sample();
          await sleep(2000);
        }
      })();
      const downloads: Download[] = [];
      while (Date.now() < end || downloads.length === 0) {
        const d = await downloadNar(b, info, DOWNLOAD_RATE);
        downloads.push(d);
        log(`download ${downloads.length}: ${d.ok ? "complete" : `FAILED (${d.error})`} in ${(d.ms / 1000).toFixed(1)} s`);
      }
      await sampler;

      const dropsSeen = (agent: typeof a.agent) => {
        const times = logLines(agent, /peer disconnected/).map((d) => Math.round((d.time - start) / 1000));
        return times.length === 0 ? "0" : `${times.length}, at ${times.map((t) => `${t} s`).join(", ")}`;
      };
      const drops = [...logLines(a.agent, /peer disconnected/), ...logLines(b.agent, /peer disconnected/)];
      const pingClosed = [...logLines(a.agent, /stopped answering pings/), ...logLines(b.agent, /stopped answering pings/)].length;
      const streamLimit = ((a.agent?.logs() ?? "") + (b.agent?.logs() ?? "")).split("TooManyOutboundProtocolStreams").length - 1;
      const failed = downloads.filter((d) => !d.ok);
      const counters = (await b.status()).counters as { bulkNarsReceived?: number; bulkFallbacks?: number };
      const ok = drops.length === 0 && failed.length === 0 && lookupFailures.length === 0 && freshFailures.length === 0;
      return {
        ok,
        figures: [
          ["run", `${((Date.now() - start) / 60_000).toFixed(1)} min`],
          ["link", `${LATENCY_MS} ms each way, ${LINK_RATE}/s`],
          ["disconnects seen by A", dropsSeen(a.agent)],
          ["disconnects seen by B", dropsSeen(b.agent)],
          ["closed for failed pings (peer manager)", pingClosed],
          ["TooManyOutboundProtocolStreams in logs", streamLimit],
          ["downloads at 1 MiB/s (64 MiB)", `${downloads.length - failed.length} of ${downloads.length} complete`],
          ...(failed.length > 0 ? [["first failure", failed[0]!.error ?? ""] as [string, string]] : []),
          ["download time", downloads.filter((d) => d.ok).map((d) => `${(d.ms / 1000).toFixed(1)} s`).join(", ") || "-"],
          ["narinfo on B (held by A)", `${percentiles(lookups)}${lookupFailures.length ? `; not 200: ${lookupFailures.join(", ")}` : ""}`],
          ["narinfo on B, asked anew of A", `${fresh.length} of ${fresh.length + freshFailures.length} answered 200, ${percentiles(fresh)}${freshFailures.length ? `; not 200: ${freshFailures.join(", ")}` : ""}`],
          ["RTT B reports for A", percentiles(rtts)],
          ["NAR bodies B took on the bulk port", `${counters.bulkNarsReceived ?? 0} (fell back to the mesh stream: ${counters.bulkFallbacks ?? 0})`],
          ["agent A", meters.a.summary()],
          ["agent B", meters.b.summary()],
        ],
      };
    } finally {
      await net.destroy();
    }
  },
};
