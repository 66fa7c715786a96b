// The cost of decoding one summary frame of 8,192 keys (the most a frame holds), the unit of work
// the agent does per turn of its event loop while a peer sends a snapshot or deltas.
//
//   npx tsc -p . && node dist/bench/summary-decode.js [--rounds 30]
//
// Prints the minimum (the machine's speed, least disturbed by other work) and the median.
import { parseArgs } from "node:util";
import { decodeSummaryMessage, encodeSummaryMessage, snapshotChunks } from "../protocol/peer-codec.js";
import { randomKeys } from "../test/helpers/summary-flood.js";

const { values } = parseArgs({ options: { rounds: { type: "string", default: "30" } } });
// 2^17 random keys: 16 full frames of 7-byte gaps (a 4M-key summary has 6-7 byte gaps).
const frames = snapshotChunks(1n, 1, randomKeys(1 << 17)).map(encodeSummaryMessage);
const times: number[] = [];
for (let round = 0; round < Number(values.rounds); round++) {
  for (const f of frames) {
    const t = performance.now();
    decodeSummaryMessage(f);
    times.push(performance.now() - t);
  }
}
times.sort((a, b) => a - b);
const bytes = frames.reduce((n, f) => n + f.length, 0) / frames.length;
console.log(`decode of an 8,192-key snapshot frame (${bytes.toFixed(0)} B): min ${times[0]!.toFixed(3)} ms, p50 ${times[times.length >> 1]!.toFixed(3)} ms (n=${times.length})`);
