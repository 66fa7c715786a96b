// A partition that heals: the link between two sites goes silent (frozen: no FIN, no RST, new
// connections accepted but never carried) for long enough that both sides drop each other, while
// both keep adding paths; then the link comes back. Measured: how long until they are connected
// again, until each answers the other's new paths through its own agent, and what the resync
// cost on the wire (the link proxy's byte count from the heal until both have resynced).
// partition-refuse.ts runs the same with a link that refuses instead (RST, connection refused).
import { addBlob, linkedFleet, narinfoVia } from "../fleet-tools.js";
import { eventually, type FleetHost } from "../../test/helpers/fleet.js";
import { logLines, ProcessMeter, sleep, type Scenario } from "../scenario.js";

const LATENCY_MS = 60;
/** Long enough that both sides drop each other (within 18 s, see silent-peer) and redial for a while. */
const PARTITION_S = Number(process.env.FLEETCACHE_PARTITION_S ?? 60);
/** Each side adds a path this often during the partition. */
const ADD_EVERY_S = 10;
/**
 * Goal: connected and resynced within two ping intervals (10 s each) plus 5 s of the heal. Two
 * intervals is how long a live link needs to show it is live again; a fleet that waits longer
 * after a partition heals is serving misses for paths its peers have.
 */
const GOAL_S = 25;
/** How long to wait after the heal before giving up. */
const CAP_S = 150;

export const partitionHeal: Scenario = partitionScenario("freeze");

/** The scenario with a link that, while cut, freezes (silent) or refuses (resets, connection refused). */
export function partitionScenario(cut: "freeze" | "refuse"): Scenario {
  return {
    name: cut === "freeze" ? "partition-heal" : "partition-refuse",
    title: `two sites partitioned (the link ${cut === "freeze" ? "silent" : "refusing: RST, connection refused"}) for ${PARTITION_S} s while both add paths, then healed`,
    goal: `after the heal, both reconnected and each sees the other's new paths within ${GOAL_S} s`,
    async run({ log }) {
      const net = await linkedFleet({ latencyMs: LATENCY_MS, cut });
      const { a, b } = net;
      try {
        const a0 = await addBlob(a, "part-a-0", 4096);
        const b0 = await addBlob(b, "part-b-0", 4096);
        await a.start();
        await b.start(["--peer", net.aViaLink]);
        await eventually("B sees A's path", () => narinfoVia(b, a0), 60_000);
        await eventually("A sees B's path", () => narinfoVia(a, b0), 60_000);
        const meters = { a: ProcessMeter.of(a.agent!), b: ProcessMeter.of(b.agent!) };
        const connected = async (viewer: FleetHost, peer: string) => (await viewer.status()).peers.find((p) => p.name === peer)?.connected === true;

        log(`the link is cut (${cut === "freeze" ? "frozen" : "refusing"}) for ${PARTITION_S} s; both add a path every ${ADD_EVERY_S} s`);
        const tCut = Date.now();
        net.proxy.kill("SIGUSR1");
        const newA: string[] = [];
        const newB: string[] = [];
        const dropped: { a?: number; b?: number } = {};
        for (let i = 1; Date.now() - tCut < PARTITION_S * 1000; i++) {
          if ((Date.now() - tCut) / 1000 >= (newA.length) * ADD_EVERY_S) {
            newA.push(await addBlob(a, `part-a-${i}`, 4096));
            newB.push(await addBlob(b, `part-b-${i}`, 4096));
          }
          if (dropped.a === undefined && !(await connected(a, "b-1"))) dropped.a = (Date.now() - tCut) / 1000;
          if (dropped.b === undefined && !(await connected(b, "a-1"))) dropped.b = (Date.now() - tCut) / 1000;
          await sleep(500);
        }
        const dialFailures = logLines(b.agent, /dial failed/).filter((r) => r.time >= tCut).length;

        log("the link is healed");
        const before = await net.linkStats();
        const tHeal = Date.now();
        net.proxy.kill("SIGUSR2");
        const at: Record<"aConnected" | "bConnected" | "aSeesB" | "bSeesA", number | undefined> = {
          aConnected: undefined, bConnected: undefined, aSeesB: undefined, bSeesA: undefined,
        };
        const all = async (viewer: FleetHost, paths: string[]) => (await Promise.all(paths.map((p) => narinfoVia(viewer, p)))).every(Boolean);
        const since = () => (Date.now() - tHeal) / 1000;
        while (Object.values(at).some((v) => v === undefined) && since() < CAP_S) {
          const [ac, bc, asb, bsa] = await Promise.all([connected(a, "b-1"), connected(b, "a-1"), all(a, newB), all(b, newA)]);
          const t = since();
          if (ac) at.aConnected ??= t;
          if (bc) at.bConnected ??= t;
          if (asb) at.aSeesB ??= t;
          if (bsa) at.bSeesA ??= t;
          await sleep(200);
        }
        const after = await net.linkStats();
        const fmt = (v: number | undefined) => (v === undefined ? `not within ${CAP_S} s` : `${v.toFixed(1)} s`);
        const worst = Math.max(...Object.values(at).map((v) => v ?? Infinity));
        return {
          ok: worst <= GOAL_S,
          figures: [
            ["link", `${LATENCY_MS} ms each way; ${cut === "freeze" ? `frozen for ${PARTITION_S} s (no FIN, no RST)` : `refusing for ${PARTITION_S} s (open connections reset, new ones refused)`}`],
            ["dropped the other after the cut", `A ${fmt(dropped.a)}, B ${fmt(dropped.b)}`],
            ["paths added during the cut", `${newA.length} on A, ${newB.length} on B`],
            ["B's failed dials during the cut", dialFailures],
            ["after the heal: A shows B connected", fmt(at.aConnected)],
            ["after the heal: B shows A connected", fmt(at.bConnected)],
            ["after the heal: A answers B's new paths", fmt(at.aSeesB)],
            ["after the heal: B answers A's new paths", fmt(at.bSeesA)],
            ["bytes on the link from heal to resync", `${after.bytesUp - before.bytesUp} B→A, ${after.bytesDown - before.bytesDown} A→B (${after.connections - before.connections} new connections)`],
            ["agent A", meters.a.summary()],
            ["agent B", meters.b.summary()],
          ],
        };
      } finally {
        await net.destroy();
      }
    },
  };
}
