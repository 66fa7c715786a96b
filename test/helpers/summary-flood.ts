// A misbehaving trusted peer for tests and bench/summary-flood.ts: a real libp2p mesh node with a
// fleet key that answers every summary subscription with a flood, either deltas as fast as the
// subscriber takes them (after a snapshot) or the same large snapshot over and over.
import { randomBytes } from "node:crypto";
import { pino } from "pino";
import type { PublicKey, SecretKey } from "../../protocol/keys.js";
import {
  MAX_FRAME_BYTES,
  MAX_KEYS_PER_FRAME,
  PROTOCOL_SUMMARY,
  decodeSummarySubscribe,
  encodeSummaryMessage,
  snapshotChunks,
} from "../../protocol/peer-codec.js";
import { createMeshNode, type MeshNode } from "../../agent/mesh/node.js";
import { writeFrame } from "../../agent/mesh/stream-io.js";

export type FloodMode = "deltas" | "snapshots";

export interface SummaryFlooder {
  node: MeshNode;
  /** Subscriptions answered, frames and payload bytes sent so far. */
  stats: { subscribes: number; frames: number; bytes: number };
  stop(): Promise<void>;
}

/** n distinct random keys, sorted. */
export function randomKeys(n: number): BigUint64Array {
  const out = new BigUint64Array(n);
  for (let filled = 0; filled < n; ) {
    const buf = randomBytes(8 * (n - filled));
    out.set(new BigUint64Array(buf.buffer, buf.byteOffset, n - filled), filled);
    out.sort();
    let m = 0;
    for (let i = 0; i < n; i++) if (i === 0 || out[i] !== out[m - 1]) out[m++] = out[i]!;
    filled = m;
  }
  return out;
}

export async function startSummaryFlooder(opts: {
  key: SecretKey;
  trusted: PublicKey[];
  mode: FloodMode;
  /** Keys in the snapshot (deltas mode: the one before the deltas). */
  snapshotKeys: number;
  listen?: string;
}): Promise<SummaryFlooder> {
  const log = pino({ level: "silent" });
  const node = await createMeshNode({ key: opts.key, trusted: opts.trusted, listen: opts.listen ?? "/ip4/127.0.0.1/tcp/0", log });
  const stats = { subscribes: 0, frames: 0, bytes: 0 };
  const epoch = 0x5eedn;
  // Encoded once: a 4M-key snapshot takes seconds to encode.
  const snapshot = snapshotChunks(epoch, 1, randomKeys(opts.snapshotKeys)).map(encodeSummaryMessage);
  const extra = randomKeys(MAX_KEYS_PER_FRAME);
  const none = new BigUint64Array(0);
  const send = async (stream: Parameters<typeof writeFrame>[0], payload: Uint8Array) => {
    await writeFrame(stream, payload);
    stats.frames++;
    stats.bytes += payload.length;
  };
  await node.handle(PROTOCOL_SUMMARY, async ({ stream, reader }) => {
    decodeSummarySubscribe((await reader.readFrame(MAX_FRAME_BYTES.summary))!);
    stats.subscribes++;
    // Until the subscriber resets the stream (or disconnects us): writeFrame then throws.
    for (;;) {
      for (const chunk of snapshot) await send(stream, chunk);
      if (opts.mode === "snapshots") continue;
      // 8,192 keys in, the same 8,192 out, in, out, ...: every delta is valid and maximal.
      for (let gen = 1; ; gen++) {
        const adding = gen % 2 === 1;
        const d = { type: "delta" as const, fromGeneration: gen, toGeneration: gen + 1, total: opts.snapshotKeys + (adding ? extra.length : 0), added: adding ? extra : none, removed: adding ? none : extra };
        await send(stream, encodeSummaryMessage(d));
      }
    }
  });
  return { node, stats, stop: () => node.stop() };
}
