// Deadlines for background calls that a stop() also cancels, without AbortSignal.any on a
// long-lived signal (agent/mesh/call-signals.ts; FAULTS.md, soak).
import { test } from "node:test";
import assert from "node:assert/strict";
import { once } from "node:events";
import { CallSignals } from "../agent/mesh/call-signals.js";

/** The signals Node records on `signal` for AbortSignal.any (internal; undefined if Node has none). */
function dependants(signal: AbortSignal): number | undefined {
  const sym = Object.getOwnPropertySymbols(signal).find((s) => s.description === "kDependantSignals");
  const set = sym && (signal as unknown as Record<symbol, Set<unknown> | undefined>)[sym];
  return set?.size;
}

test("the hazard: AbortSignal.any records every call's signal on the long-lived one", (t) => {
  const stop = new AbortController();
  for (let i = 0; i < 1000; i++) AbortSignal.any([stop.signal, AbortSignal.timeout(60_000)]);
  const n = dependants(stop.signal);
  if (n === undefined) return t.skip("this Node keeps no kDependantSignals");
  // Until collected, and Node 24 keeps memory for each even after (13-36 bytes, FAULTS.md).
  assert.equal(n, 1000);
});

test("CallSignals: a call's deadline aborts it with a TimeoutError and forgets it", async () => {
  const calls = new CallSignals();
  const signals = Array.from({ length: 1000 }, () => calls.signal(1));
  assert.equal(calls.live, 1000);
  await Promise.all(signals.map((s) => (s.aborted ? undefined : once(s, "abort"))));
  assert.equal(calls.live, 0, "nothing kept once the deadlines passed");
  assert.equal((signals[0]!.reason as Error).name, "TimeoutError");
});

test("CallSignals: abortAll aborts the calls within their deadline, with its reason, and keeps none", () => {
  const calls = new CallSignals();
  const signals = Array.from({ length: 10 }, () => calls.signal(60_000));
  const reason = new Error("stopped");
  calls.abortAll(reason);
  assert.ok(signals.every((s) => s.aborted && s.reason === reason));
  assert.equal(calls.live, 0);
  assert.equal(calls.signal(60_000).aborted, false, "a call made later has its own deadline");
  calls.abortAll(reason); // the process's timers are not kept alive either (unref'd): nothing to wait for
});
