// What a peer's back-to-back snapshots cost the agent's event loop, in-process and without a
// network: the frames of four 4M-key snapshots taken as SummaryTable takes them, the old way
// (each network frame copied into a fresh array, decoded into a fresh array per frame, then copied
// into the snapshot, a fresh 32 MiB snapshot each) or the new way (frames put together in one
// scratch buffer, keys decoded straight into the snapshot 2,048 a step, snapshots back to back in
// the buffer of the one before last). Reports the longest and the 99th-percentile piece of work
// between two turns of the event loop, and the garbage collections (count and pauses) it caused.
// Each way runs in a child process of its own, with the agent's GC settings (agent/gc-tuning.ts).
// `--case deltas`: 8,192-key deltas (in, out, in, ...) decoded and applied to a 1M-key summary in
// slices, as the table does: time a delta and GCs of this build only (copy the compiled file into
// another build's dist/bench to compare; it uses no API that older builds lack).
//
//   npx tsc -p . && node dist/bench/summary-assemble.js [--snapshots 4] [--keys 4194304] [--rounds 2]
//   node dist/bench/summary-assemble.js --case deltas [--deltas 400] [--slice KEYS] [--rounds 2]
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { PerformanceObserver, constants } from "node:perf_hooks";
import { parseArgs } from "node:util";
import {
  MAX_KEYS_PER_FRAME,
  PathSummary,
  SnapshotAssembler,
  decodeSummaryMessage,
  encodeSummaryMessage,
  snapshotChunks,
  type SummaryDelta,
  type SummarySnapshotChunk,
} from "../protocol/peer-codec.js";
import { tuneGcForBuffers } from "../agent/gc-tuning.js";
import { randomKeys } from "../test/helpers/summary-flood.js";

const { values } = parseArgs({
  options: {
    snapshots: { type: "string", default: "4" },
    keys: { type: "string", default: String(1 << 22) },
    rounds: { type: "string", default: "2" },
    case: { type: "string", default: "snapshots" },
    deltas: { type: "string", default: "400" },
    slice: { type: "string" }, // deltas: keys per step (default: applyDeltaSteps' own)
    way: { type: "string" }, // internal: run one way in this process
  },
});

/** Collections seen by a PerformanceObserver until stop() (which waits a turn for the last reports). */
function watchGc(): { stop: () => Promise<string> } {
  const gcs: { kind: number; ms: number }[] = [];
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) gcs.push({ kind: (e as unknown as { detail: { kind: number } }).detail.kind, ms: e.duration });
  });
  obs.observe({ entryTypes: ["gc"] });
  return {
    stop: () =>
      new Promise((resolve) =>
        setTimeout(() => {
          obs.disconnect();
          const major = gcs.filter((g) => g.kind === constants.NODE_PERFORMANCE_GC_MAJOR);
          const minor = gcs.filter((g) => g.kind !== constants.NODE_PERFORMANCE_GC_MAJOR);
          const sum = (xs: { ms: number }[]) => xs.reduce((n, g) => n + g.ms, 0);
          const max = (xs: { ms: number }[]) => Math.max(0, ...xs.map((g) => g.ms));
          resolve(`GC: ${major.length} major (${sum(major).toFixed(0)} ms, longest ${max(major).toFixed(1)} ms), ${minor.length} minor (${sum(minor).toFixed(0)} ms, longest ${max(minor).toFixed(1)} ms)`);
        }, 200),
      ),
  };
}

/** Deltas in, out, in, ... on a 1M-key summary, decoded and applied as SummaryTable does. */
async function runDeltas(): Promise<void> {
  tuneGcForBuffers();
  const extra = randomKeys(MAX_KEYS_PER_FRAME);
  const none = new BigUint64Array(0);
  const n = Number(values.deltas);
  const frames = Array.from({ length: n }, (_, i) => {
    const gen = i + 1;
    const adding = gen % 2 === 1;
    return encodeSummaryMessage({ type: "delta", fromGeneration: gen, toGeneration: gen + 1, total: 1_000_000 + (adding ? extra.length : 0), added: adding ? extra : none, removed: adding ? none : extra });
  });
  const summary = new PathSummary();
  summary.applySnapshot({ epoch: 1n, generation: 1, keys: randomKeys(1_000_000) }, true);
  (globalThis as { gc?: () => void }).gc?.();
  const gc = watchGc();
  const turns: number[] = [];
  const slice = values.slice === undefined ? undefined : Number(values.slice);
  const start = performance.now();
  for (const f of frames) {
    let t = performance.now();
    const steps = summary.applyDeltaSteps(decodeSummaryMessage(f) as SummaryDelta, slice);
    let r = steps.next();
    while (!r.done) {
      turns.push(performance.now() - t); // a turn of the event loop here
      t = performance.now();
      r = steps.next();
    }
    turns.push(performance.now() - t);
    if (!r.value) throw new Error("a delta did not apply");
  }
  const ms = performance.now() - start;
  turns.sort((a, b) => a - b);
  console.log(
    `deltas: ${n} of 8,192 keys on 1,000,000 in slices of ${slice ?? "the default"}, ${(ms / n).toFixed(2)} ms a delta; work between turns: p50 ${turns[turns.length >> 1]!.toFixed(3)} ms, ` +
      `p99 ${turns[Math.floor(0.99 * turns.length)]!.toFixed(3)} ms (n=${turns.length}); ${await gc.stop()}`,
  );
}

async function runOne(way: "old" | "new"): Promise<void> {
  tuneGcForBuffers();
  const frames = snapshotChunks(7n, 1, randomKeys(Number(values.keys))).map(encodeSummaryMessage);
  (globalThis as { gc?: () => void }).gc?.(); // the set-up's garbage is not the way's
  const gc = watchGc();
  const turns: number[] = [];
  const summary = new PathSummary();
  const asm = new SnapshotAssembler();
  const scratch = new Uint8Array(96 * 1024);
  const start = performance.now();
  for (let s = 0; s < Number(values.snapshots); s++) {
    for (const f of frames) {
      let t = performance.now();
      let snap;
      if (way === "old") {
        const copy = new Uint8Array(f.length); // StreamReader's copy of a frame in pieces
        copy.set(f);
        snap = asm.push(decodeSummaryMessage(copy) as SummarySnapshotChunk);
      } else {
        scratch.set(f);
        const fr = asm.frame(scratch.subarray(0, f.length));
        for (let r = fr.steps.next(); ; r = fr.steps.next()) {
          if (r.done) {
            snap = r.value;
            break;
          }
          turns.push(performance.now() - t); // a turn of the event loop here
          t = performance.now();
        }
      }
      if (snap) {
        const replaced = summary.applySnapshot(snap, true);
        if (way === "new") asm.recycle(replaced);
      }
      turns.push(performance.now() - t);
    }
  }
  const total = performance.now() - start;
  turns.sort((a, b) => a - b);
  console.log(
    `${way}: ${values.snapshots} snapshots of ${values.keys} keys in ${total.toFixed(0)} ms; work between turns: p50 ${turns[turns.length >> 1]!.toFixed(3)} ms, ` +
      `p99 ${turns[Math.floor(0.99 * turns.length)]!.toFixed(3)} ms, max ${turns[turns.length - 1]!.toFixed(2)} ms (n=${turns.length}); ${await gc.stop()}`,
  );
}

if (values.way === "deltas") await runDeltas();
else if (values.way) await runOne(values.way as "old" | "new");
else if (values.case === "deltas") {
  for (let round = 0; round < Number(values.rounds); round++) {
    const slice = values.slice === undefined ? [] : ["--slice", values.slice];
    process.stdout.write(execFileSync(process.execPath, ["--expose-gc", fileURLToPath(import.meta.url), "--way", "deltas", "--deltas", values.deltas!, ...slice], { encoding: "utf8" }));
  }
} else {
  const self = fileURLToPath(import.meta.url);
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const way of round % 2 === 0 ? ["old", "new"] : ["new", "old"]) {
      const args = ["--expose-gc", self, "--way", way, "--snapshots", values.snapshots!, "--keys", values.keys!];
      process.stdout.write(execFileSync(process.execPath, args, { encoding: "utf8" }));
    }
  }
}
