// A holder stopped with SIGSTOP (a paused VM, a host swapping to death, a debugger): its sockets
// stay open and its kernel still ACKs, but nothing answers. Two holders (A and C) have the same
// paths; client B fetches through its agent. The holder B took its first NAR from is stopped
// while a rate-limited NAR transfer from it is running, and for STOP_S B keeps looking up
// narinfos (a fresh path each time) and downloading NARs; then SIGCONT. Measured: how long B's
// lookups and downloads are held up, whether B fails over to the other holder, when B drops the
// stopped peer, and whether it is back after SIGCONT.
import { createFleet, eventually, P2P_PORT, type FleetHost } from "../../test/helpers/fleet.js";
import { addBlob, downloadNar, narinfoLatencyMs, narinfoVia, type Download } from "../fleet-tools.js";
import { percentiles, ProcessMeter, sleep, type Scenario } from "../scenario.js";

const STOP_S = Number(process.env.FLEETCACHE_SIGSTOP_S ?? 40);
const AFTER_S = 20;
const LOOKUP_PATHS = 150;
const NAR_SIZE = 16 << 20;
/** Goal: no lookup held longer than this while another holder is up (Nix's own connect timeout is 5 s). */
const LOOKUP_GOAL_MS = 2500;

/** "5.3 s, started at +0.2 s after the stop". */
function slowest(ds: (Sample & Download)[], t0: number): string {
  const d = ds.reduce((x, y) => (y.ms > x.ms ? y : x));
  return `${(d.ms / 1000).toFixed(1)} s, started +${((d.at - t0) / 1000).toFixed(1)} s after the stop`;
}

interface Sample {
  phase: "stopped" | "continued";
  at: number;
}

export const sigstopPeer: Scenario = {
  name: "sigstop-peer",
  title: `one of two holders stopped with SIGSTOP for ${STOP_S} s while a client looks up and downloads, then SIGCONT`,
  goal: `while one holder is stopped: every lookup answered 200 within ${LOOKUP_GOAL_MS} ms and every NAR download started after the stop completes (from the other holder); the stopped holder is connected again after SIGCONT`,
  async run({ log }) {
    const fleet = await createFleet(["a", "b", "c"]);
    const [a, b, c] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
    try {
      log(`A and C hold the same ${LOOKUP_PATHS} small paths and 3 NARs of ${NAR_SIZE >> 20} MiB; B knows both`);
      const small: string[] = [];
      const big: string[] = [];
      for (const h of [a, c]) {
        for (let i = 0; i < LOOKUP_PATHS; i++) small[i] = await addBlob(h, `stop-${i}`, 512);
        for (let i = 0; i < 3; i++) big[i] = await addBlob(h, `stop-big-${i}`, NAR_SIZE);
      }
      await addBlob(b, "b-own", 1024);
      await a.start();
      await c.start();
      await b.start(["--peer", `${a.net.ip}:${P2P_PORT}`, "--peer", `${c.net.ip}:${P2P_PORT}`]);
      await eventually("B has both holders' summaries", async () => {
        const s = await b.status();
        return s.peers.filter((p) => p.connected && p.pathCount === LOOKUP_PATHS + 3).length === 2;
      }, 60_000);
      const infos = await Promise.all(big.map((p) => narinfoVia(b, p)));
      if (infos.some((i) => !i)) throw new Error("B does not answer the big paths' narinfos");

      // The holder B takes NARs from is the one to stop.
      const first = await downloadNar(b, infos[0]!);
      if (!first.ok) throw new Error(`first download failed: ${first.error}`);
      const received = (await b.status()).peers.map((p) => [p.name, (p as { bytesReceived?: number }).bytesReceived ?? 0] as const);
      const stoppedName = received.sort((x, y) => y[1] - x[1])[0]![0];
      const [stopped, other] = stoppedName === "a-1" ? [a, c] : [c, a];
      const meters = { stopped: ProcessMeter.of(stopped.agent!), other: ProcessMeter.of(other.agent!), b: ProcessMeter.of(b.agent!) };
      const bytesFrom = async () => Object.fromEntries((await b.status()).peers.map((p) => [p.name, (p as { bytesReceived?: number }).bytesReceived ?? 0]));
      const connected = async () => (await b.status()).peers.find((p) => p.name === stoppedName)?.connected === true;

      log(`a transfer from ${stopped.name} at 2 MiB/s, then SIGSTOP to ${stopped.name}'s agent for ${STOP_S} s`);
      const inFlight = downloadNar(b, infos[1]!, "2M");
      await sleep(1500);
      const bytesAtStop = await bytesFrom();
      const tStop = Date.now();
      stopped.agent!.child.kill("SIGSTOP");
      let phase = "stopped" as Sample["phase"];
      let tCont = 0;
      let droppedAfter: number | undefined;
      let backAfter: number | undefined;
      const lookups: (Sample & { status: number; ms: number })[] = [];
      const downloads: (Sample & Download)[] = [];
      let next = 0;
      const running = { on: true };

      const lookupLoop = (async () => {
        while (running.on) {
          const p = small[next++ % LOOKUP_PATHS]!;
          const at = Date.now();
          const r = await narinfoLatencyMs(b, p);
          lookups.push({ phase, at, ...r });
          await sleep(300);
        }
      })();
      const downloadLoop = (async () => {
        while (running.on) {
          const at = Date.now();
          const d = await downloadNar(b, infos[2]!);
          downloads.push({ phase, at, ...d });
          await sleep(500);
        }
      })();
      const watch = (async () => {
        while (running.on) {
          const up = await connected();
          if (phase === "stopped" && !up) droppedAfter ??= (Date.now() - tStop) / 1000;
          if (phase === "continued" && up && (droppedAfter !== undefined)) backAfter ??= (Date.now() - tCont) / 1000;
          await sleep(250);
        }
      })();

      await sleep(STOP_S * 1000);
      const bytesAtCont = await bytesFrom();
      log(`SIGCONT to ${stopped.name}'s agent; watching ${AFTER_S} s more`);
      tCont = Date.now();
      phase = "continued";
      stopped.agent!.child.kill("SIGCONT");
      await sleep(AFTER_S * 1000);
      running.on = false;
      await Promise.all([lookupLoop, downloadLoop, watch]);
      const mid = await inFlight;
      const bytesEnd = await bytesFrom();

      const of = <T extends Sample>(xs: T[], ph: Sample["phase"]) => xs.filter((x) => x.phase === ph);
      const lStop = of(lookups, "stopped");
      const lCont = of(lookups, "continued");
      const dStop = of(downloads, "stopped");
      const dCont = of(downloads, "continued");
      const failedLookups = lStop.filter((l) => l.status !== 200);
      const slowLookups = lStop.filter((l) => l.ms > LOOKUP_GOAL_MS);
      const failedDownloads = dStop.filter((d) => !d.ok);
      const delta = (x: Record<string, number>, y: Record<string, number>, n: string) => `${((y[n]! - x[n]!) / (1 << 20)).toFixed(1)} MiB`;
      const ok = failedLookups.length === 0 && slowLookups.length === 0 && failedDownloads.length === 0 && dStop.length > 0 && (droppedAfter === undefined || backAfter !== undefined);
      return {
        ok,
        figures: [
          ["stopped holder", `${stopped.name} (B's first NAR came from it); the other is ${other.name}`],
          ["curl at 2 MiB/s from B, started 1.5 s before the stop", mid.ok ? `completed in ${(mid.ms / 1000).toFixed(1)} s` : `FAILED after ${(mid.ms / 1000).toFixed(1)} s: ${mid.error}`],
          ["B dropped the stopped holder after", droppedAfter === undefined ? `not within ${STOP_S} s` : `${droppedAfter.toFixed(1)} s`],
          ["lookups while stopped (a fresh path each)", `${lStop.length - failedLookups.length} of ${lStop.length} answered 200; ${percentiles(lStop.map((l) => l.ms))}`],
          ["lookups while stopped over the goal", slowLookups.length > 0 ? `${slowLookups.length}, the first at +${((slowLookups[0]!.at - tStop) / 1000).toFixed(1)} s` : 0],
          ["NAR downloads started while stopped", `${dStop.length - failedDownloads.length} of ${dStop.length} complete; ${percentiles(dStop.map((d) => d.ms))}`],
          ...(dStop.length > 0 ? [["slowest of them", slowest(dStop, tStop)] as [string, string]] : []),
          ...(failedDownloads.length > 0 ? [["first failed download", `+${((failedDownloads[0]!.at - tStop) / 1000).toFixed(1)} s: ${failedDownloads[0]!.error}`] as [string, string]] : []),
          ["NAR bytes B received while stopped", `${delta(bytesAtStop, bytesAtCont, stopped.name + "-1")} from ${stopped.name}, ${delta(bytesAtStop, bytesAtCont, other.name + "-1")} from ${other.name}`],
          ["after SIGCONT: B connected to it again", droppedAfter === undefined ? "never dropped" : backAfter === undefined ? `not within ${AFTER_S} s` : `${backAfter.toFixed(1)} s`],
          ["after SIGCONT: lookups", `${lCont.filter((l) => l.status === 200).length} of ${lCont.length} answered 200; ${percentiles(lCont.map((l) => l.ms))}`],
          ["after SIGCONT: NAR downloads", `${dCont.filter((d) => d.ok).length} of ${dCont.length} complete; ${percentiles(dCont.map((d) => d.ms))}`],
          ["NAR bytes B received after SIGCONT", `${delta(bytesAtCont, bytesEnd, stopped.name + "-1")} from ${stopped.name}, ${delta(bytesAtCont, bytesEnd, other.name + "-1")} from ${other.name}`],
          [`agent ${stopped.name} (stopped)`, meters.stopped.summary()],
          [`agent ${other.name}`, meters.other.summary()],
          ["agent b", meters.b.summary()],
        ],
      };
    } finally {
      for (const h of fleet.hosts) h.agent?.child.kill("SIGCONT"); // a stopped agent would never exit
      await fleet.destroy();
    }
  },
};
