// A trusted peer floods an agent with summary traffic (issue 10, scenario 6): the measurement of
// bench/summary-flood.ts (a real agent on loopback, a flooder process with a fleet key, keep-alive
// narinfo requests for a local path), run here for both floods: deltas as fast as the agent takes
// them, and 4M-key snapshots back to back. The goal is the issue's: local narinfo p99 under 10 ms
// while the flood lasts.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FLOOD_DEFAULTS, floodStore, runFlood, stopAgents } from "../../bench/summary-flood.js";
import { percentiles, type Scenario } from "../scenario.js";

const SECONDS = Number(process.env.FLEETCACHE_FLOOD_S ?? FLOOD_DEFAULTS.seconds);
/** Goal: local narinfo p99 while the flood lasts. */
const P99_GOAL_MS = 10;

const p99 = (ms: number[]) => [...ms].sort((a, b) => a - b)[Math.min(ms.length - 1, Math.floor(0.99 * ms.length))] ?? Infinity;

export const summaryFlood: Scenario = {
  name: "summary-flood",
  title: `a trusted peer floods an agent with summary deltas, then with 4M-key snapshots (${SECONDS} s each), while its local narinfo is timed`,
  goal: `local narinfo p99 < ${P99_GOAL_MS} ms during each flood`,
  async run({ log }) {
    const tmp = mkdtempSync(join(tmpdir(), "fleetcache-flood-"));
    try {
      const { store, hashPart } = floodStore(tmp);
      const figures: [string, string][] = [];
      let ok = true;
      for (const mode of ["deltas", "snapshots"] as const) {
        log(`${mode} flood for ${SECONDS} s`);
        const r = await runFlood(mode, { ...FLOOD_DEFAULTS, seconds: SECONDS }, tmp, store, hashPart);
        if (!(p99(r.whole) < P99_GOAL_MS)) ok = false;
        figures.push(
          [`${mode}: sent`, r.what],
          [`${mode}: local narinfo before the flood`, percentiles(r.baseline)],
          [`${mode}: while the flooder was connected`, `${percentiles(r.during)} (${r.connectedS.toFixed(1)} s)`],
          [`${mode}: whole flood`, percentiles(r.whole)],
          [`${mode}: agent GC while connected`, r.gc.during],
          [`${mode}: agent GC, whole flood`, r.gc.whole],
          [`${mode}: flooder sent`, r.sent],
          [`${mode}: the peer as the agent shows it`, r.peer],
        );
      }
      return { ok, figures };
    } finally {
      stopAgents();
      rmSync(tmp, { recursive: true, force: true });
    }
  },
};
