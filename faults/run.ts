// The fault suite: `npm run faults -- [SCENARIO...] [--minutes N] [--list]`. Runs each scenario
// (all by default) on real agents in network namespaces, prints its figures, and exits non-zero
// when any scenario missed its goal. Needs root (namespaces) and Nix; FAULTS.md has the figures.
import { parseArgs } from "node:util";
import { canUseNetns } from "../test/helpers/netns.js";
import { hasNix } from "../test/helpers/nix.js";
import type { Scenario } from "./scenario.js";
import { wanLatency } from "./scenarios/wan-latency.js";
import { busyHolder } from "./scenarios/busy-holder.js";
import { silentPeer } from "./scenarios/silent-peer.js";
import { idleFlood } from "./scenarios/idle-flood.js";
import { partitionHeal } from "./scenarios/partition-heal.js";
import { sigstopPeer } from "./scenarios/sigstop-peer.js";
import { restartUnderLoad } from "./scenarios/restart-under-load.js";
import { partitionRefuse } from "./scenarios/partition-refuse.js";
import { peerKilledMidNar } from "./scenarios/peer-killed-mid-nar.js";
import { corruptedHolder } from "./scenarios/corrupted-holder.js";
import { rangeCheck } from "./scenarios/range-check.js";
import { daemonRestartUnderLoad } from "./scenarios/daemon-restart-under-load.js";
import { summaryFlood } from "./scenarios/summary-flood.js";
import { forgedNarinfo } from "./scenarios/forged-narinfo.js";
import { soak } from "./scenarios/soak.js";

const SCENARIOS: Scenario[] = [wanLatency, silentPeer, busyHolder, corruptedHolder, rangeCheck, forgedNarinfo, idleFlood, summaryFlood, partitionHeal, partitionRefuse, sigstopPeer, peerKilledMidNar, restartUnderLoad, daemonRestartUnderLoad, soak];

const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { minutes: { type: "string" }, list: { type: "boolean", default: false }, help: { type: "boolean", short: "h" } },
});

if (values.help) {
  console.log(`Usage: npm run faults -- [SCENARIO...] [--minutes N] [--list]

Runs each scenario (all by default) on real agents and real Nix in network namespaces, prints its
figures, and exits 1 when any scenario missed its goal. Needs root and Nix; FAULTS.md has the figures.
  --list       the scenarios, with their goals
  --minutes N  length of the timed scenarios (soak, wan-latency...)`);
  process.exit(0);
}

if (values.list) {
  for (const s of SCENARIOS) {
    const timed = s.defaultMinutes === undefined ? "" : ` (${s.defaultMinutes} min)`;
    console.log(`${s.name.padEnd(20)} ${s.title}${timed}. Goal: ${s.goal}`);
  }
  process.exit(0);
}
const unknown = positionals.filter((n) => !SCENARIOS.some((s) => s.name === n));
if (unknown.length > 0) {
  console.error(`unknown scenario ${unknown.join(", ")}; known: ${SCENARIOS.map((s) => s.name).join(", ")}`);
  process.exit(2);
}
const minutes = values.minutes === undefined ? undefined : Number(values.minutes);
if (minutes !== undefined && !(minutes > 0)) {
  console.error(`--minutes expects a positive number, got "${values.minutes}"`);
  process.exit(2);
}
if (!(await canUseNetns()) || !(await hasNix())) {
  console.error("the fault suite needs root (network namespaces) and Nix");
  process.exit(2);
}

let failed = 0;
for (const s of SCENARIOS.filter((s) => positionals.length === 0 || positionals.includes(s.name))) {
  const durationMs = s.defaultMinutes === undefined ? 0 : (minutes ?? s.defaultMinutes) * 60_000;
  console.log(`\n## ${s.name}: ${s.title}\ngoal: ${s.goal}`);
  const t0 = Date.now();
  let ok = false;
  try {
    const r = await s.run({ durationMs, log: (line) => console.error(`  [${((Date.now() - t0) / 1000).toFixed(0)} s] ${line}`) });
    ok = r.ok;
    const width = Math.max(...r.figures.map(([k]) => k.length));
    for (const [k, v] of r.figures) console.log(`  ${k.padEnd(width)}  ${v}`);
  } catch (e) {
    console.log(`  error: ${(e as Error).stack ?? e}`);
  }
  console.log(`result: ${ok ? "GOAL MET" : "GOAL MISSED"} (${s.name}, ${new Date().toISOString()})`);
  if (!ok) failed++;
}
process.exit(failed > 0 ? 1 : 0);
