// What a peer's back-to-back snapshots cost the agent's event loop, in-process and without a
// network: the frames of four 4M-key snapshots taken as SummaryTable takes them, the old way
// (each network frame copied into a fresh array, decoded into a fresh array per frame, then copied
// into the snapshot, a fresh 32 MiB snapshot each) or the new way (frames put together in one
// scratch buffer, keys decoded straight into the snapshot 2,048 a step, snapshots back to back in
// the buffer of the one before last). Reports the longest and the 99th-percentile piece of work
// between two turns of the event loop, and the garbage collections (count and pauses) it caused.
// Each way runs in a child process of its own, with the agent's GC settings (agent/gc-tuning.ts).
//
//   npx tsc -p . && node dist/bench/summary-assemble.js [--snapshots 4] [--keys 4194304] [--rounds 2]
import { execFileSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import { PerformanceObserver, constants } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { PathSummary, SnapshotAssembler, decodeSummaryMessage, encodeSummaryMessage, snapshotChunks, type SummarySnapshotChunk } from "../protocol/peer-codec.js";
import { tuneGcForBuffers } from "../agent/gc-tuning.js";
import { randomKeys } from "../test/helpers/summary-flood.js";

const { values } = parseArgs({
  options: {
    snapshots: { type: "string", default: "4" },
    keys: { type: "string", default: String(1 << 22) },
    rounds: { type: "string", default: "2" },
    way: { type: "string" }, // internal: run one way in this process
  },
});

function runOne(way: "old" | "new"): void {
  tuneGcForBuffers();
  const frames = snapshotChunks(7n, 1, randomKeys(Number(values.keys))).map(encodeSummaryMessage);
  (globalThis as { gc?: () => void }).gc?.(); // the set-up's garbage is not the way's
  const gcs: { kind: number; ms: number }[] = [];
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries()) gcs.push({ kind: (e as unknown as { detail: { kind: number } }).detail.kind, ms: e.duration });
  });
  obs.observe({ entryTypes: ["gc"] });
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
  // The observer hears of the collections once the loop turns.
  setTimeout(() => {
    obs.disconnect();
    turns.sort((a, b) => a - b);
    const major = gcs.filter((g) => g.kind === constants.NODE_PERFORMANCE_GC_MAJOR);
    const minor = gcs.filter((g) => g.kind !== constants.NODE_PERFORMANCE_GC_MAJOR);
    const sum = (xs: { ms: number }[]) => xs.reduce((n, g) => n + g.ms, 0);
    const max = (xs: { ms: number }[]) => Math.max(0, ...xs.map((g) => g.ms));
    console.log(
      `${way}: ${values.snapshots} snapshots of ${values.keys} keys in ${total.toFixed(0)} ms; work between turns: p50 ${turns[turns.length >> 1]!.toFixed(3)} ms, ` +
        `p99 ${turns[Math.floor(0.99 * turns.length)]!.toFixed(3)} ms, max ${turns[turns.length - 1]!.toFixed(2)} ms (n=${turns.length}); ` +
        `GC: ${major.length} major (${sum(major).toFixed(0)} ms, longest ${max(major).toFixed(1)} ms), ${minor.length} minor (${sum(minor).toFixed(0)} ms, longest ${max(minor).toFixed(1)} ms)`,
    );
  }, 200);
}

if (values.way) runOne(values.way as "old" | "new");
else {
  const self = fileURLToPath(import.meta.url);
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const way of round % 2 === 0 ? ["old", "new"] : ["new", "old"]) {
      const args = ["--expose-gc", self, "--way", way, "--snapshots", values.snapshots!, "--keys", values.keys!];
      process.stdout.write(execFileSync(process.execPath, args, { encoding: "utf8" }));
    }
  }
}
