// agent/gc-tuning.ts: the agent's V8 settings take effect when set at run time. What the heap
// limit is for: an allocation pattern like a busy agent's (a live set, plus churn of which a part
// outlives a few scavenges) must run more full collections and peak much lower with the agent's
// settings than with V8's defaults. Counts of collections and heap sizes, not timings.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { AGENT_NODE_FLAGS } from "./helpers/agent.js";

const TUNING = fileURLToPath(new URL("../agent/gc-tuning.js", import.meta.url));

const PROBE = `
import { PerformanceObserver, constants } from "node:perf_hooks";
const { tuneGcForBuffers } = await import(${JSON.stringify(TUNING)});
tuneGcForBuffers();
let major = 0;
new PerformanceObserver((l) => { for (const e of l.getEntries()) if (e.detail?.kind === constants.NODE_PERFORMANCE_GC_MAJOR) major++; }).observe({ entryTypes: ["gc"] });
const live = [];
for (let i = 0; i < 300_000; i++) live.push({ a: i, b: "x" + i, c: [i] });
const ring = new Array(200_000);
let peak = 0;
for (let i = 0; i < 40_000_000; i++) {
  const o = { i, s: "y" + i, arr: [i, i] };
  if (i % 20 === 0) ring[(i / 20) % ring.length] = o;
  if (i % 100_000 === 0) peak = Math.max(peak, process.memoryUsage().heapTotal);
}
setTimeout(() => console.log(JSON.stringify({ major, peakMiB: peak / 1048576, live: live.length })), 100);
`;

function probe(env: NodeJS.ProcessEnv): { major: number; peakMiB: number } {
  const out = execFileSync(process.execPath, [...AGENT_NODE_FLAGS, "--input-type=module", "-e", PROBE], {
    env: { ...process.env, ...env },
    encoding: "utf8",
  });
  return JSON.parse(out.trim().split("\n").pop()!);
}

test("the agent's heap limit, set at run time, keeps a churning heap far below V8's default", () => {
  const tuned = probe({ FLEETCACHE_V8_DEFAULTS: "" });
  const defaults = probe({ FLEETCACHE_V8_DEFAULTS: "1" });
  // Measured on Node 24: 11 full collections and a 94 MiB peak against 3 and 183.
  assert.ok(tuned.major > defaults.major, `full collections: ${tuned.major} tuned, ${defaults.major} with V8's defaults`);
  assert.ok(tuned.peakMiB < defaults.peakMiB * 0.75, `peak heap: ${tuned.peakMiB.toFixed(0)} MiB tuned, ${defaults.peakMiB.toFixed(0)} MiB with V8's defaults`);
});
