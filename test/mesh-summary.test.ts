// Content routing summaries between in-process mesh nodes: a real store's paths reach a
// subscriber and stay current incrementally, large snapshots span chunks, hostile publishers are
// survived, stalled subscribers are reset, and a peer that goes away is forgotten; a reconnecting
// subscriber resumes with the deltas only; a peer flooding summary work is cut off at its budget,
// disconnected and refused, and a real agent shows that in its status and metrics.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import type { Stream } from "@libp2p/interface";
import { multiaddr } from "@multiformats/multiaddr";
import { formatPublicKey, generateKeyPair, parsePublicKey, type SecretKey } from "../protocol/keys.js";
import type { StatusDocument } from "../agent/http/admin-routes.js";
import { freePort, keygen, runCli, startAgentProcess } from "./helpers/agent.js";
import { NIX32_ALPHABET } from "../protocol/nix32.js";
import {
  MAX_FRAME_BYTES,
  MAX_KEYS_PER_FRAME,
  PROTOCOL_SUMMARY,
  decodeSummaryMessage,
  decodeSummarySubscribe,
  encodeSummaryMessage,
  encodeSummarySubscribe,
  snapshotChunks,
  sortedKeys,
} from "../protocol/peer-codec.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { peerIdOf } from "../agent/mesh/identity.js";
import { StreamReader, writeFrame } from "../agent/mesh/stream-io.js";
import { SummaryPublisher, SummaryTable, type StoreChanges } from "../agent/mesh/summary-service.js";
import { FRAME_COST } from "../agent/mesh/summary-table.js";
import { PeerPenalties } from "../agent/mesh/peer-penalties.js";
import { startSummaryFlooder } from "./helpers/summary-flood.js";
import { NixDb } from "../agent/store/db.js";
import { StoreWatcher, type StoreChange } from "../agent/store/watch.js";
import { addToStore, needNix, run, tempDir } from "./helpers/nix.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: "silent" });
const nodes: MeshNode[] = [];
const cleanups: (() => void)[] = [];
after(async () => {
  for (const c of cleanups) c();
  await Promise.allSettled(nodes.map((n) => n.stop()));
});

async function node(key: SecretKey, trusted: SecretKey[]): Promise<MeshNode> {
  const n = await createMeshNode({ key, trusted, listen: "/ip4/127.0.0.1/tcp/0", log });
  nodes.push(n);
  return n;
}

/** Two nodes trusting each other, b connected to a. */
async function pair(): Promise<{ a: MeshNode; b: MeshNode; aId: string }> {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  await connectBoth(b, a); // an 800,000-key publisher start below holds the loop for seconds on a loaded host
  return { a, b, aId: a.peerId.toString() };
}

/** Polls until cond() holds; fails after a generous bound (never a timing assertion). */
async function waitFor(cond: () => boolean, what: string, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const hashOf = (storePath: string) => storePath.slice(11, 43);
function randomHashPart(): string {
  return randomHashParts(1)[0]!;
}
function randomHashParts(n: number): string[] {
  // In bulk: an 800,000-path store is made in well under a second.
  const buf = randomBytes(32 * n);
  for (let i = 0; i < buf.length; i++) buf[i] = NIX32_ALPHABET.charCodeAt(buf[i]! & 31);
  return Array.from({ length: n }, (_, i) => buf.toString("latin1", 32 * i, 32 * i + 32));
}

/** A synthetic store for the publisher: hash parts in memory, changes emitted on demand. */
class FakeStore extends EventEmitter implements StoreChanges {
  readonly parts = new Set<string>();
  constructor(n: number) {
    super();
    while (this.parts.size < n) for (const h of randomHashParts(n - this.parts.size)) this.parts.add(h);
  }
  hashParts(): Iterable<string> {
    return this.parts.values();
  }
  change(c: StoreChange): void {
    for (const h of c.removed) this.parts.delete(h);
    for (const h of c.added) this.parts.add(h);
    this.emit("change", c);
  }
}

test("a subscriber learns a real store's paths, then only what changes", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  cleanups.push(tmp.cleanup);
  const root = join(tmp.dir, "store");
  const file = (name: string) => {
    const p = join(tmp.dir, name);
    writeFileSync(p, `${name}\n`);
    return p;
  };
  // 200 paths in one nix-store call.
  const files = Array.from({ length: 200 }, (_, i) => file(`f${i}`));
  const paths = (await run("nix-store", ["--store", root, "--add", ...files])).trim().split("\n");
  assert.equal(paths.length, 200);

  const db = new NixDb(root);
  const watcher = new StoreWatcher(db, 100).start();
  cleanups.push(() => (watcher.stop(), db.close()));
  const { a, b, aId } = await pair();
  const publisher = new SummaryPublisher(a, watcher, log);
  await publisher.start();
  const table = new SummaryTable(b, log);
  cleanups.push(() => table.stop());
  const changes: string[] = [];
  table.on("change", (id) => changes.push(id));

  table.subscribe(aId);
  await waitFor(() => table.pathCount(aId) !== undefined, "A's snapshot");
  assert.equal(table.pathCount(aId), 200);
  assert.deepEqual(table.peers(), [aId]);
  assert.ok(changes.includes(aId), "a 'change' event for the snapshot");
  for (const p of paths) assert.deepEqual(table.holders(hashOf(p)), [aId], p);
  for (let i = 0; i < 100; i++) assert.deepEqual(table.holders(randomHashPart()), []);
  assert.deepEqual(table.holders("not a hash part"), []);
  assert.deepEqual(publisher.subscribers(), [b.peerId.toString()]);

  const atSnapshot = { ...table.traffic(aId)! };
  assert.equal(atSnapshot.snapshots, 1);
  assert.equal(atSnapshot.frames, 1);
  t.diagnostic(`snapshot of 200 paths: ${atSnapshot.bytes} bytes`);

  // A new path arrives as a delta.
  const added = await addToStore(root, file("late-arrival"));
  await waitFor(() => table.holders(hashOf(added)).includes(aId), "the added path at B");
  assert.equal(table.pathCount(aId), 201);
  const afterAdd = { ...table.traffic(aId)! };
  assert.equal(afterAdd.snapshots, 1, "no new snapshot for one path");
  assert.equal(afterAdd.deltas, 1);
  const deltaBytes = afterAdd.bytes - atSnapshot.bytes;
  t.diagnostic(`one-path delta: ${deltaBytes} bytes`);
  assert.ok(deltaBytes > 0 && deltaBytes * 20 < atSnapshot.bytes, `delta ${deltaBytes} B vs snapshot ${atSnapshot.bytes} B`);

  // A deleted path disappears, again incrementally.
  const gone = paths[17]!;
  await run("nix-store", ["--store", root, "--delete", gone]);
  await waitFor(() => table.holders(hashOf(gone)).length === 0, "the deleted path to leave B");
  assert.equal(table.pathCount(aId), 200);
  const afterDelete = table.traffic(aId)!;
  assert.equal(afterDelete.snapshots, 1);
  assert.equal(afterDelete.deltas, 2);
  assert.ok((afterDelete.bytes - afterAdd.bytes) * 20 < atSnapshot.bytes);
  assert.deepEqual(table.holders(hashOf(added)), [aId]);
  assert.deepEqual(table.holders(hashOf(paths[18]!)), [aId]);

  // The publisher stops while the connection stays: its summary is dropped at B.
  changes.length = 0;
  publisher.stop();
  await waitFor(() => table.pathCount(aId) === undefined, "B to drop A's summary");
  assert.deepEqual(table.holders(hashOf(added)), []);
  assert.deepEqual(table.peers(), []);
  assert.ok(changes.includes(aId));
});

test("a snapshot spanning several chunks, a change spanning several deltas", async (t) => {
  const { a, b, aId } = await pair();
  const store = new FakeStore(20_000);
  const publisher = new SummaryPublisher(a, store, log);
  await publisher.start();
  cleanups.push(() => publisher.stop());
  const table = new SummaryTable(b, log);
  cleanups.push(() => table.stop());

  table.subscribe(aId);
  await waitFor(() => table.pathCount(aId) !== undefined, "the snapshot");
  assert.equal(table.pathCount(aId), 20_000);
  const tr = table.traffic(aId)!;
  assert.equal(tr.frames, 3, "20,000 keys = 8,192 + 8,192 + 3,616");
  assert.equal(tr.snapshots, 1);
  const t0 = performance.now();
  for (const h of store.parts) assert.deepEqual(table.holders(h), [aId]);
  t.diagnostic(`holders(): ${(((performance.now() - t0) / 20_000) * 1000).toFixed(2)} µs per lookup (with the assertion)`);
  for (let i = 0; i < 1000; i++) assert.deepEqual(table.holders(randomHashPart()), []);

  // 15,000 keys changed at once: more than one delta can carry, so consecutive deltas.
  const removed = [...store.parts].slice(0, 10_000);
  const added = Array.from({ length: 5_000 }, randomHashPart);
  store.change({ added, removed });
  await waitFor(() => table.pathCount(aId) === 15_000, "the big change");
  assert.equal(table.traffic(aId)!.deltas, 2);
  assert.equal(table.traffic(aId)!.snapshots, 1);
  for (const h of removed) assert.deepEqual(table.holders(h), []);
  for (const h of store.parts) assert.deepEqual(table.holders(h), [aId]);

  // A path removed and re-added between two polls is a no-op; nothing is sent.
  const same = added[0]!;
  const gen = publisher.generation;
  store.change({ added: [same], removed: [same] });
  assert.equal(publisher.generation, gen);
  assert.deepEqual(table.holders(same), [aId]);
});

test("a subscriber that reads nothing is reset", async () => {
  // A snapshot of ~5.6 MB: more than a yamux stream window can ever hold (4 MiB, see node.ts).
  const store = new FakeStore(800_000);
  const { a, b } = await pair();
  // A short stall timeout, for this publisher only: with a busy event loop it could trip on
  // healthy subscribers too, which is why the real one is 60 s. A long Subscribe deadline, so
  // that only the stall can explain a reset.
  const publisher = new SummaryPublisher(a, store, log, { stallTimeoutMs: 300, subscribeTimeoutMs: 600_000 });
  await publisher.start();
  cleanups.push(() => publisher.stop());

  // A reader that never reads: the stream paused, so its window is never granted again.
  const stalled = await b.libp2p.dialProtocol(a.peerId, PROTOCOL_SUMMARY);
  stalled.pause();
  stalled.send(frameOf(encodeSummarySubscribe({ epoch: 0n, generation: 0 })));
  await waitFor(() => publisher.subscribers().length === 1 || stalled.status !== "open", "the subscription");
  await waitFor(() => stalled.status !== "open", "the stalled stream to end");
  assert.equal(stalled.status, "reset", "the publisher reset the stalled stream");
  await waitFor(() => publisher.subscribers().length === 0, "the stalled subscription to end");
});

test("a newer subscription replaces the old stream; a resume gets only the deltas", async () => {
  const store = new FakeStore(20_000);
  const { a, b } = await pair();
  const publisher = new SummaryPublisher(a, store, log);
  await publisher.start();
  cleanups.push(() => publisher.stop());

  const first = await b.open(a.peerId, PROTOCOL_SUMMARY);
  await writeFrame(first.stream, encodeSummarySubscribe({ epoch: 0n, generation: 0 }));
  const keys = await readSnapshot(first.reader);
  assert.deepEqual(keys, sortedKeys(store.parts));
  const second = await b.open(a.peerId, PROTOCOL_SUMMARY);
  await writeFrame(second.stream, encodeSummarySubscribe({ epoch: 0n, generation: 0 }));
  assert.deepEqual(await readSnapshot(second.reader), keys);
  await assert.rejects(first.reader.readFrame(MAX_FRAME_BYTES.summary), "the replaced stream is reset");
  assert.deepEqual(publisher.subscribers(), [b.peerId.toString()]);

  // The second one gets deltas.
  const h = randomHashPart();
  store.change({ added: [h], removed: [] });
  const d = decodeSummaryMessage((await second.reader.readFrame(MAX_FRAME_BYTES.summary))!);
  assert.deepEqual(d.type === "delta" && [d.fromGeneration, d.toGeneration, d.total, [...d.added]], [0, 1, 20_001, [...sortedKeys([h])]]);

  // A resume within the epoch gets just the deltas since, not a snapshot; another epoch, a snapshot.
  const third = await b.open(a.peerId, PROTOCOL_SUMMARY);
  await writeFrame(third.stream, encodeSummarySubscribe({ epoch: publisher.epoch, generation: 0 }));
  const r = decodeSummaryMessage((await third.reader.readFrame(MAX_FRAME_BYTES.summary))!);
  assert.deepEqual(r.type === "delta" && [r.fromGeneration, r.toGeneration, r.total], [0, 1, 20_001]);
  const fourth = await b.open(a.peerId, PROTOCOL_SUMMARY);
  await writeFrame(fourth.stream, encodeSummarySubscribe({ epoch: publisher.epoch ^ 1n, generation: 0 }));
  assert.equal((await readSnapshot(fourth.reader)).length, 20_001);
  await fourth.stream.close();
});

function frameOf(payload: Uint8Array): Uint8Array {
  assert.ok(payload.length < 128);
  return Uint8Array.from([payload.length, ...payload]);
}

async function readSnapshot(reader: StreamReader): Promise<BigUint64Array> {
  const parts: bigint[] = [];
  for (;;) {
    const m = decodeSummaryMessage((await reader.readFrame(MAX_FRAME_BYTES.summary))!);
    assert.equal(m.type, "snapshot");
    if (m.type !== "snapshot") throw new Error("unreachable");
    parts.push(...m.keys);
    if (m.offset + m.keys.length === m.total) return BigUint64Array.from(parts);
  }
}

test("a hostile publisher: garbage, oversized frames, gaps and early deltas reset and resubscribe", async () => {
  const { a: m, b, aId: mId } = await pair();
  const [h1, h2, h3, h4] = [randomHashPart(), randomHashPart(), randomHashPart(), randomHashPart()];
  const epoch = 42n;
  const snapshot = (gen: number, parts: string[]) => snapshotChunks(epoch, gen, sortedKeys(parts)).map(encodeSummaryMessage);
  let proceed: () => void = () => {};
  const gate = () => new Promise<void>((resolve) => (proceed = resolve));
  let deltasAsked = 0;
  let askDelta: () => void = () => {};

  // What the n-th subscription gets, one script per stream; each then waits for B to reset it.
  const scripts: ((s: Stream) => Promise<void>)[] = [
    async (s) => writeFrame(s, Uint8Array.from([0x7f, 1, 2, 3])), // unknown tag
    async (s) => {
      for (const f of snapshot(5, [h1, h2, h3])) await writeFrame(s, f);
      await gate(); // the test looks at B's table first
      const gap = { type: "delta" as const, fromGeneration: 7, toGeneration: 8, total: 3, added: sortedKeys([h4]), removed: sortedKeys([h1]) };
      await writeFrame(s, encodeSummaryMessage(gap));
    },
    async (s) => {
      for (const f of snapshot(1, [h1, h4])) await writeFrame(s, f);
      await gate();
      s.send(Uint8Array.from([0x80, 0x80, 0x10])); // a 256 KiB frame header
    },
    async (s) => {
      // A delta before any snapshot on this stream (even one matching the stale generation).
      const early = { type: "delta" as const, fromGeneration: 1, toGeneration: 2, total: 1, added: new BigUint64Array(0), removed: sortedKeys([h1]) };
      await writeFrame(s, encodeSummaryMessage(early));
    },
    async (s) => {
      for (const f of snapshot(9, [h2, h3])) await writeFrame(s, f);
      // Then a delta each time the test asks: h4 in, h4 out, ...
      for (let gen = 9; ; gen++) {
        while (gen - 9 >= deltasAsked) await new Promise<void>((resolve) => (askDelta = resolve));
        const [added, removed] = gen % 2 === 1 ? [[h4], []] : [[], [h4]];
        await writeFrame(s, encodeSummaryMessage({ type: "delta", fromGeneration: gen, toGeneration: gen + 1, total: 2 + added.length, added: sortedKeys(added), removed: sortedKeys(removed) }));
      }
    },
  ];
  const subscribes: bigint[] = [];
  const resetSeen: boolean[] = [];
  await m.handle(PROTOCOL_SUMMARY, async ({ stream, reader }) => {
    const sub = decodeSummarySubscribe((await reader.readFrame(MAX_FRAME_BYTES.summary))!);
    const n = subscribes.push(sub.epoch) - 1;
    await scripts[n]?.(stream);
    // Hold the stream open; B resetting it ends the read with an error.
    const reset = await reader.readFrame(MAX_FRAME_BYTES.summary).then(() => false, () => true);
    resetSeen[n] = reset;
  });

  const table = new SummaryTable(b, log, { retryMinMs: 50, retryMaxMs: 200 });
  cleanups.push(() => table.stop());
  table.subscribe(mId);

  // 1: garbage -> reset, no summary, resubscribe.
  // 2: a good snapshot, then a gap.
  await waitFor(() => table.pathCount(mId) === 3, "the second stream's snapshot");
  assert.equal(subscribes.length, 2);
  assert.equal(table.traffic(mId)!.resets, 1);
  assert.deepEqual(table.holders(h1), [mId]);
  assert.deepEqual(table.holders(h4), []);
  proceed();
  // 3: resubscribed after the gap; a good snapshot replaces the stale one, then an oversized frame.
  await waitFor(() => table.holders(h4).length === 1, "the third stream's snapshot");
  assert.equal(table.pathCount(mId), 2);
  assert.deepEqual(table.holders(h2), []);
  assert.equal(table.traffic(mId)!.resets, 2);
  proceed();
  // 4: a delta before its snapshot; the stale hint from 3 does not survive a second failure.
  // 5: a good snapshot at last, and B stays subscribed.
  await waitFor(() => subscribes.length === 5 && table.pathCount(mId) === 2 && table.holders(h2).length === 1, "the fifth stream's snapshot");
  assert.deepEqual(table.holders(h1), []);
  assert.deepEqual(table.holders(h4), []);
  assert.deepEqual(table.holders(h3), [mId]);
  assert.equal(table.traffic(mId)!.resets, 4);
  assert.ok(subscribes.every((e) => e === 0n), "every resubscription starts from scratch");
  await waitFor(() => resetSeen.filter(Boolean).length === 4, "the publisher to see four resets");
  assert.deepEqual(resetSeen.slice(0, 4), [true, true, true, true]);
  // A healthy stream is not resubscribed: B goes on applying deltas from the fifth stream for
  // longer than its longest backoff (200 ms), and it opens no sixth.
  const start = Date.now();
  for (let n = 1; n <= 3 || Date.now() - start < 2 * 200; n++) {
    deltasAsked = n;
    askDelta();
    await waitFor(() => table.traffic(mId)!.deltas === n, `delta ${n} on the fifth stream`);
    assert.deepEqual(table.holders(h4), n % 2 === 1 ? [mId] : []);
  }
  assert.equal(subscribes.length, 5);
  assert.equal(table.traffic(mId)!.streams, 5);
  assert.equal(resetSeen[4], undefined, "the fifth stream was never reset");
});

test("snapshots back to back on one stream: lookups see each whole snapshot, never the one being assembled", async () => {
  const { a: m, b, aId: mId } = await pair();
  // Three summaries of 20,000 paths (3 frames each), no path in two of them.
  const parts = randomHashParts(60_000);
  const sets = [parts.slice(0, 20_000), parts.slice(20_000, 40_000), parts.slice(40_000)];
  const snapshots = sets.map((set, i) => snapshotChunks(77n, i + 1, sortedKeys(set)).map(encodeSummaryMessage));
  let proceed: () => void = () => {};
  const gate = () => new Promise<void>((resolve) => (proceed = resolve));
  await m.handle(PROTOCOL_SUMMARY, async ({ stream, reader }) => {
    await reader.readFrame(MAX_FRAME_BYTES.summary);
    for (const [i, frames] of snapshots.entries()) {
      for (const [j, f] of frames.entries()) {
        await writeFrame(stream, f);
        if (j === 0) await gate(); // the test looks while each snapshot is half-way
      }
      if (i === snapshots.length - 1) await gate();
    }
    await reader.readFrame(MAX_FRAME_BYTES.summary).catch(() => {});
  });
  const table = new SummaryTable(b, log);
  cleanups.push(() => table.stop());
  table.subscribe(mId);
  const sample = (set: string[]) => set.filter((_, i) => i % 97 === 0);
  const holds = (set: string[]) => sample(set).filter((h) => table.holders(h).length === 1).length;
  await waitFor(() => table.traffic(mId)!.frames === 1, "the first snapshot's first frame");
  assert.equal(table.pathCount(mId), undefined);
  for (let i = 0; i < 3; i++) {
    proceed();
    await waitFor(() => table.traffic(mId)!.snapshots === i + 1 && table.traffic(mId)!.frames === 3 * i + (i < 2 ? 4 : 3), `snapshot ${i + 1}, and the next one's first frame`);
    // Snapshot i is whole in lookups; nothing of the others, though the next is half-assembled
    // (from the third on, in the buffer of snapshot i - 1).
    assert.equal(table.pathCount(mId), 20_000);
    for (const [j, set] of sets.entries()) assert.equal(holds(set), j === i ? sample(set).length : 0, `snapshot ${i + 1} in lookups: paths of set ${j + 1}`);
  }
  proceed();
  assert.equal(table.traffic(mId)!.resets, 0);
});

test("a peer that stops is dropped from lookups", async () => {
  const { a, b, aId } = await pair();
  const store = new FakeStore(50);
  const publisher = new SummaryPublisher(a, store, log);
  await publisher.start();
  const table = new SummaryTable(b, log);
  cleanups.push(() => table.stop());
  const h = [...store.parts][0]!;

  table.subscribe(aId);
  await waitFor(() => table.holders(h).length === 1, "A's snapshot");
  const dropped = new Promise<void>((resolve) => table.on("change", (id) => id === aId && table.pathCount(aId) === undefined && resolve()));
  await a.stop();
  await waitFor(() => table.holders(h).length === 0, "B to forget A");
  await dropped;
  assert.equal(table.pathCount(aId), undefined);
  assert.deepEqual(table.peers(), []);

  // And unsubscribing a peer that was never reachable is harmless.
  const stranger = peerIdOf(generateKeyPair("host-z-1")).toString();
  table.subscribe(stranger);
  table.unsubscribe(stranger);
  publisher.stop();
});

test("a reconnecting subscriber resumes from its epoch and generation: only the delta crosses", async (t) => {
  const { a, b, aId } = await pair();
  const store = new FakeStore(100_000);
  const publisher = new SummaryPublisher(a, store, log);
  await publisher.start();
  cleanups.push(() => publisher.stop());
  const table = new SummaryTable(b, log, { retryMinMs: 50, retryMaxMs: 200 });
  cleanups.push(() => table.stop());

  table.subscribe(aId);
  await waitFor(() => table.pathCount(aId) === 100_000, "the snapshot");
  const before = { ...table.traffic(aId)! };
  t.diagnostic(`snapshot of 100,000 paths: ${before.bytes} bytes`);

  // The connection goes; lookups stop naming A at once.
  await b.libp2p.hangUp(a.peerId);
  await waitFor(() => table.pathCount(aId) === undefined, "A to leave lookups");
  assert.deepEqual(table.holders([...store.parts][0]!), []);
  // A's store changes while B is away; then B is back.
  const h = randomHashPart();
  store.change({ added: [h], removed: [] });
  await connectBoth(b, a);
  await waitFor(() => table.holders(h).includes(aId), "the path added while away");

  const now = table.traffic(aId)!;
  const resync = now.bytes - before.bytes;
  t.diagnostic(`resync after the reconnect: ${resync} bytes (${now.frames - before.frames} frames)`);
  assert.equal(table.pathCount(aId), 100_001);
  assert.equal(now.snapshots, 1, "no second snapshot");
  assert.equal(now.deltas, before.deltas + 1);
  assert.equal(now.resumes, 1);
  assert.ok(resync < 100, `${resync} bytes for a one-path change`);
  for (const p of [...store.parts].slice(0, 1000)) assert.deepEqual(table.holders(p), [aId]);
});

test("a resume the publisher cannot serve (it restarted) gets a whole snapshot", async () => {
  const { a, b, aId } = await pair();
  const store = new FakeStore(1_000);
  let publisher = new SummaryPublisher(a, store, log);
  await publisher.start();
  const table = new SummaryTable(b, log, { retryMinMs: 50, retryMaxMs: 200 });
  cleanups.push(() => table.stop());
  table.subscribe(aId);
  await waitFor(() => table.pathCount(aId) === 1_000, "the snapshot");
  await b.libp2p.hangUp(a.peerId);
  await waitFor(() => table.pathCount(aId) === undefined, "A to leave lookups");
  // A new publisher is a new epoch: B asks to resume, A answers with a snapshot.
  publisher.stop();
  const gone = [...store.parts].slice(0, 10);
  store.change({ added: [], removed: gone });
  publisher = new SummaryPublisher(a, store, log);
  await publisher.start();
  cleanups.push(() => publisher.stop());
  await connectBoth(b, a);
  await waitFor(() => table.traffic(aId)!.snapshots === 2 && table.pathCount(aId) === 990, "the new snapshot");
  assert.equal(table.traffic(aId)!.resumes, 1);
  for (const p of gone) assert.deepEqual(table.holders(p), []);
});

test("a peer flooding summary deltas is cut off at its budget, disconnected and refused", async () => {
  const ka = generateKeyPair("host-flood-1");
  const kb = generateKeyPair("host-b-1");
  const penalties = new PeerPenalties({ baseMs: 600_000 });
  const flooder = await startSummaryFlooder({ key: ka, trusted: [kb], mode: "deltas", snapshotKeys: 20_000 });
  nodes.push(flooder.node);
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log, denied: (id) => penalties.isPenalised(id) });
  nodes.push(b);
  const mId = flooder.node.peerId.toString();
  const budget = { burstKeys: 100_000, keysPerSecond: 0 };
  const table = new SummaryTable(b, log, { budget, penalties });
  cleanups.push(() => table.stop());
  const told: string[] = [];
  table.on("overBudget", (id, reason) => told.push(`${id} ${reason}`));
  await connectBoth(b, flooder.node);
  table.subscribe(mId);

  await waitFor(() => penalties.get(mId) !== undefined, "the flooder's penalty", 60_000);
  const tr = table.traffic(mId)!;
  // The work done: the budget, plus the one frame that overdrew it.
  assert.ok(tr.keys + tr.frames * FRAME_COST <= budget.burstKeys + MAX_KEYS_PER_FRAME + FRAME_COST, `${tr.keys} keys in ${tr.frames} frames`);
  assert.ok(tr.keys > budget.burstKeys - MAX_KEYS_PER_FRAME - tr.frames * FRAME_COST, "it did get its budget");
  assert.equal(tr.overBudget, 1);
  assert.match(penalties.get(mId)!.reason, /summary work over budget/);
  assert.equal(penalties.get(mId)!.count, 1);
  assert.deepEqual(told.map((s) => s.split(" ")[0]), [mId]);
  await waitFor(() => b.libp2p.getConnections(flooder.node.peerId).length === 0, "the flooder to be disconnected");
  assert.equal(table.pathCount(mId), undefined, "nothing it sent is used");
  // Refused both ways while penalised.
  await assert.rejects(b.libp2p.dial(flooder.node.addresses()[0]!));
  await assert.rejects(flooder.node.libp2p.dial(b.addresses()[0]!).then(async (c) => {
    // The remote's gater closes it right after the handshake; a stream on it cannot open.
    await flooder.node.libp2p.dialProtocol(b.peerId, PROTOCOL_SUMMARY).then((s) => s.abort(new Error("unexpected")));
    return c;
  }));
  const subscribes = flooder.stats.subscribes;
  await sleep(300);
  assert.equal(flooder.stats.subscribes, subscribes, "no new subscription to a penalised peer");
});

test("a real agent disconnects a peer over its summary budget, and says so in status and metrics", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  cleanups.push(tmp.cleanup);
  writeFileSync(join(tmp.dir, "f"), "local\n");
  const local = await addToStore(join(tmp.dir, "store"), join(tmp.dir, "f"));
  const agentPub = await keygen("agent-1", join(tmp.dir, "agent.sec"));
  const floodKey = generateKeyPair("flood-1");
  const flooder = await startSummaryFlooder({ key: floodKey, trusted: [parsePublicKey(agentPub)], mode: "deltas", snapshotKeys: 10_000 });
  nodes.push(flooder.node);
  const port = await freePort();
  const agent = await startAgentProcess([
    "--store-root", join(tmp.dir, "store"), "--sign-key", join(tmp.dir, "agent.sec"), "--state-dir", join(tmp.dir, "state"),
    "--p2p-listen", `127.0.0.1:${port}`, "--trusted-key", formatPublicKey(floodKey), "--summary-budget", "60000",
  ]);
  cleanups.push(() => void agent.stop());
  await flooder.node.libp2p.dial(multiaddr(`/ip4/127.0.0.1/tcp/${port}`));

  const status = async () => (await (await fetch(`${agent.url}/api/v1/status`)).json()) as StatusDocument;
  await waitFor(() => flooder.stats.subscribes > 0, "the agent's subscription");
  let doc: StatusDocument | undefined;
  for (const end = Date.now() + 60_000; !doc?.peers[0]?.penalty; ) {
    if (Date.now() > end) assert.fail("no penalty in the status document");
    await sleep(100);
    doc = await status();
  }
  const peer = doc.peers[0]!;
  assert.equal(peer.name, "flood-1");
  assert.match(peer.penalty!.reason, /summary work over budget: \d+ keys in \d+ frames \(budget 60000 keys/);
  assert.equal(peer.penalty!.count, 1);
  assert.ok(peer.penalty!.until > Date.now() + 30_000, "refused for a while");
  assert.equal(doc.counters.peerPenalties, 1);
  assert.ok(doc.recentErrors.some((e) => e.peer === "flood-1" && /over budget/.test(e.message)));
  await waitFor(() => flooder.node.libp2p.getConnections().length === 0, "the flooder to be disconnected");
  assert.equal((await status()).peers[0]!.connected, false);
  // It cannot come back while penalised: the handshake is refused.
  await flooder.node.libp2p.dial(multiaddr(`/ip4/127.0.0.1/tcp/${port}`)).then(() => {}, () => {});
  await sleep(300);
  assert.equal(flooder.node.libp2p.getConnections().length, 0);
  assert.equal(flooder.stats.subscribes, 1);
  const metrics = await (await fetch(`${agent.url}/metrics`)).text();
  assert.match(metrics, /^fleetcache_peer_penalties_total 1$/m);
  assert.match(metrics, /^fleetcache_peers_refused 1$/m);
  const cli = await runCli(["status", "--agent", agent.url]);
  assert.match(cli.stdout, /flood-1 {2}DISCONNECTED/);
  assert.match(cli.stdout, /REFUSED until \S+ \(offence 1\): summary work over budget/);
  // The agent still serves its own store.
  assert.equal((await fetch(`${agent.url}/${hashOf(local)}.narinfo`)).status, 200);
});

test("the publisher's start lets timers fire while it builds the keys, and changes that come meanwhile are announced", async () => {
  const store = new FakeStore(500_000);
  const { a, b, aId } = await pair();
  const publisher = new SummaryPublisher(a, store, log);
  cleanups.push(() => publisher.stop());
  const [first, second, ...rest] = [...store.parts];
  const early = randomHashPart();
  const later = randomHashPart();
  // Timers firing while start() runs (HTTP requests, pings and handshake deadlines need these);
  // the third tick, well inside the build, brings a second change.
  let ticks = 0;
  const timer = setInterval(() => {
    if (++ticks === 3) store.change({ added: [later], removed: [second!] });
  }, 1);
  const started = publisher.start();
  // A change right after start() began: the keys are being built from the store as it was.
  store.change({ added: [early], removed: [first!] });
  await started;
  clearInterval(timer);
  assert.ok(ticks >= 5, `timers fired during start(): ${ticks} ticks`);
  assert.equal(publisher.size, 500_000);
  assert.equal(publisher.generation, 2, "each change applied once");
  const table = new SummaryTable(b, log);
  cleanups.push(() => table.stop());
  table.subscribe(aId);
  await waitFor(() => table.pathCount(aId) === 500_000, "A's summary");
  assert.deepEqual(table.holders(early), [aId], "the path added right after start() began");
  assert.deepEqual(table.holders(later), [aId], "the path added during the build");
  assert.deepEqual(table.holders(first!), [], "the path removed right after start() began");
  assert.deepEqual(table.holders(second!), [], "the path removed during the build");
  for (const h of rest.slice(0, 200)) assert.deepEqual(table.holders(h), [aId]);
});

test("a publisher stopped and started again while its start builds the keys ends up started once", async () => {
  const store = new FakeStore(200_000);
  const { a, b, aId } = await pair();
  const publisher = new SummaryPublisher(a, store, log);
  cleanups.push(() => publisher.stop());
  const first = publisher.start();
  publisher.stop();
  const second = publisher.start();
  await Promise.all([first, second]);
  assert.equal(store.listenerCount("change"), 1, "one change listener");
  const added = randomHashPart();
  store.change({ added: [added], removed: [] });
  assert.equal(publisher.generation, 1);
  const table = new SummaryTable(b, log);
  cleanups.push(() => table.stop());
  table.subscribe(aId);
  await waitFor(() => table.pathCount(aId) === 200_001, "A's summary");
  assert.deepEqual(table.holders(added), [aId]);
});
