// The peer protocol codec: round trips of every message, hostile input refused with
// PeerProtocolError (and nothing else), summary bookkeeping, and the summary's size per path.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { NIX32_ALPHABET, decodeNix32, encodeNix32 } from "../protocol/nix32.js";
import { isValidHashPart } from "../protocol/store-path.js";
import {
  FrameDecoder,
  MAX_ADDRS_PER_PEER,
  MAX_FRAME_BYTES,
  MAX_KEYS_PER_FRAME,
  MAX_NARINFO_BYTES,
  MAX_PEERS,
  MAX_SUMMARY_KEYS,
  NAR_ERROR,
  PathSummary,
  PeerProtocolError,
  Reader,
  SnapshotAssembler,
  Writer,
  decodeNarRequest,
  decodeNarResponseHeader,
  decodeNarinfoRequest,
  decodeNarinfoResponse,
  decodePeersRequest,
  decodePeersResponse,
  decodeSummaryDelta,
  decodeSummaryMessage,
  decodeSummarySubscribe,
  diffSummaryKeys,
  encodeFrame,
  encodeNarRequest,
  encodeNarResponseHeader,
  encodeNarinfoRequest,
  encodeNarinfoResponse,
  encodePeersRequest,
  encodePeersResponse,
  encodeSummaryMessage,
  encodeSummarySubscribe,
  snapshotChunks,
  sortedKeys,
  sortedKeysInSteps,
  splitSummaryDelta,
  summaryKey,
  type PeerRecord,
  type SummaryDelta,
  type SummaryMessage,
  type SummarySnapshotChunk,
  ACCEPT_ZSTD,
  NAR_ENCODING,
  BULK_DIRECT_HTTP,
  BULK_DIRECT_MINT,
  BULK_TLS_PSK,
} from "../protocol/peer-codec.js";

import { MINTED_TICKET_BYTES, mintTicket, mintedMacOk } from "../protocol/direct-ticket.js";

const hashPart = () => encodeNix32(randomBytes(20));
const narHash = () => encodeNix32(randomBytes(32));
const isPPE = (e: unknown) => e instanceof PeerProtocolError;
const rejects = (fn: () => unknown, re: RegExp) =>
  assert.throws(fn, (e: unknown) => isPPE(e) && re.test((e as Error).message), String(re));

/** Bytes from numbers (single bytes), bigints (u64 varints) and byte arrays. */
function bytes(...parts: (number | bigint | Uint8Array)[]): Uint8Array {
  const w = new Writer();
  for (const p of parts) {
    if (typeof p === "number") w.u8(p);
    else if (typeof p === "bigint") w.u64("test", p);
    else w.fixed(p);
  }
  return w.finish();
}
const epochBytes = (e: bigint) => new Writer().fixedU64("epoch", e).finish();
const keysOf = (...ks: bigint[]) => BigUint64Array.from(ks);

test("varints: edge values round trip, overlong and oversized encodings are refused", () => {
  for (const v of [0, 1, 127, 128, 300, 2 ** 31, 2 ** 32 + 5, Number.MAX_SAFE_INTEGER]) {
    const r = new Reader(new Writer().uint("v", v).finish(), "t");
    assert.equal(r.uint("v"), v);
    r.end();
  }
  for (const v of [0n, 127n, 128n, 0xfffffffn, 0x10000000n, 1n << 63n, (1n << 64n) - 1n, 0x0123456789abcdefn]) {
    const enc = new Writer().u64("v", v).finish();
    const r = new Reader(enc, "t");
    assert.equal(r.u64("v"), v);
    r.end();
  }
  assert.equal(new Writer().u64("v", (1n << 64n) - 1n).finish().length, 10);
  rejects(() => new Reader(Uint8Array.of(0x80, 0x00), "t").uint("v"), /non-minimal/);
  rejects(() => new Reader(Uint8Array.of(0x81, 0x80, 0x00), "t").u64("v"), /non-minimal/);
  rejects(() => new Reader(new Uint8Array(9).fill(0xff), "t").uint("v"), /too long/);
  rejects(() => new Reader(Uint8Array.of(0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x10), "t").uint("v"), /exceeds/); // 2^53
  rejects(() => new Reader(Uint8Array.of(...new Array(9).fill(0xff), 0x02), "t").u64("v"), /64 bits/);
  rejects(() => new Reader(new Uint8Array(11).fill(0xff), "t").u64("v"), /too long|64 bits/);
  rejects(() => new Reader(Uint8Array.of(0x80), "t").uint("v"), /truncated/);
  rejects(() => new Writer().uint("v", -1), /not a non-negative integer/);
  rejects(() => new Writer().uint("v", 1.5), /not a non-negative integer/);
  rejects(() => new Writer().u64("v", 1n << 64n), /64-bit/);
});

test("frames: split anywhere, oversized refused before buffering, rest handed back", () => {
  const payloads = [new Uint8Array(0), Uint8Array.of(1, 2, 3), new Uint8Array(randomBytes(300))];
  const stream = Buffer.concat([...payloads.map((p) => encodeFrame(p, 1000)), Buffer.from("raw tail")]);
  const d = new FrameDecoder(1000);
  const got: Uint8Array[] = [];
  for (const b of stream.subarray(0, stream.length - 8)) {
    d.push(Uint8Array.of(b));
    for (let f = d.next(); f; f = d.next()) got.push(Uint8Array.from(f));
  }
  d.push(stream.subarray(stream.length - 8));
  assert.deepEqual(got, payloads);
  assert.equal(Buffer.from(d.takeRest()).toString(), "raw tail");
  assert.equal(d.buffered, 0);

  rejects(() => encodeFrame(new Uint8Array(11), 10), /exceeds the limit/);
  const big = new FrameDecoder(100);
  big.push(Uint8Array.of(0xe5, 0x8e)); // 1893+ before the payload (or even the whole prefix) arrives
  rejects(() => big.next(), /exceeds the limit/);
  const overlong = new FrameDecoder(100);
  overlong.push(Uint8Array.of(0x85, 0x00));
  rejects(() => overlong.next(), /non-minimal/);
  const huge = new FrameDecoder(Number.MAX_SAFE_INTEGER);
  huge.push(new Uint8Array(12).fill(0xff));
  rejects(() => huge.next(), /too long|exceeds/);
});

test("summaryKey is bytes 0..7 of the decoded hash part, big-endian", () => {
  for (let i = 0; i < 2000; i++) {
    const h = hashPart();
    const b = decodeNix32(h, 20);
    assert.equal(summaryKey(h), Buffer.from(b).readBigUInt64BE(0), h);
  }
  assert.equal(summaryKey("0".repeat(32)), 0n);
  assert.equal(summaryKey("z".repeat(32)), (1n << 64n) - 1n);
  for (const bad of ["0".repeat(31), "0".repeat(33), "e".repeat(32), "0".repeat(31) + "E", ""]) {
    rejects(() => summaryKey(bad), /invalid hash part/);
  }
  assert.deepEqual(sortedKeys([3n, 1n, 3n, 2n, 1n]), keysOf(1n, 2n, 3n));
  // Hash parts (written as 32-bit words, not BigInts), duplicates among them, mixed with keys, from an iterable.
  const parts = Array.from({ length: 3000 }, hashPart);
  const mixed = [...parts, parts[5]!, parts[17]!, summaryKey(parts[9]!), 0n, (1n << 64n) - 1n, (1n << 32n) + 1n, 1n << 32n];
  const expected = [...new Set(mixed.map((x) => (typeof x === "string" ? summaryKey(x) : x)))].sort((x, y) => (x < y ? -1 : x > y ? 1 : 0));
  assert.deepEqual(sortedKeys(mixed), BigUint64Array.from(expected));
  assert.deepEqual(sortedKeys(new Set(mixed)), BigUint64Array.from(expected));
  assert.deepEqual(sortedKeys([]), keysOf());
  rejects(() => sortedKeys(["e".repeat(32)]), /invalid hash part/);
});

test("summary messages round trip", () => {
  for (const sub of [
    { epoch: 0n, generation: 0 },
    { epoch: (1n << 64n) - 1n, generation: Number.MAX_SAFE_INTEGER },
  ]) {
    assert.deepEqual(decodeSummarySubscribe(encodeSummarySubscribe(sub)), { type: "subscribe", ...sub });
  }
  const keys = sortedKeys(Array.from({ length: 500 }, hashPart));
  const msgs: SummaryMessage[] = [
    { type: "snapshot", epoch: 7n, generation: 3, total: 0, offset: 0, keys: keysOf() },
    { type: "snapshot", epoch: 1n << 63n, generation: 9, total: 1000, offset: 500, keys },
    { type: "snapshot", epoch: 1n, generation: 0, total: 2, offset: 0, keys: keysOf(0n, (1n << 64n) - 1n) },
    { type: "delta", fromGeneration: 4, toGeneration: 5, total: 10, added: keys.slice(0, 3), removed: keys.slice(3, 5) },
    { type: "delta", fromGeneration: 0, toGeneration: 2 ** 40, total: 0, added: keysOf(), removed: keysOf() },
  ];
  for (const m of msgs) {
    const enc = encodeSummaryMessage(m);
    assert.ok(enc.length <= MAX_FRAME_BYTES.summary);
    assert.deepEqual(decodeSummaryMessage(enc), m);
  }
  // The largest chunk and the largest delta fit the frame limit even with the widest keys.
  const wide = BigUint64Array.from({ length: MAX_KEYS_PER_FRAME }, (_, i) => (1n << 63n) * BigInt(i % 2) + BigInt(i));
  wide.sort();
  const sparse = BigUint64Array.from({ length: MAX_KEYS_PER_FRAME }, (_, i) => BigInt(i) * ((1n << 64n) / BigInt(MAX_KEYS_PER_FRAME)) + 1n);
  for (const k of [wide, sparse]) {
    const enc = encodeSummaryMessage({ type: "snapshot", epoch: (1n << 64n) - 1n, generation: Number.MAX_SAFE_INTEGER, total: MAX_SUMMARY_KEYS, offset: MAX_SUMMARY_KEYS - k.length, keys: k });
    assert.ok(enc.length <= MAX_FRAME_BYTES.summary, `${enc.length}`);
    const half = k.length / 2;
    const delta = encodeSummaryMessage({ type: "delta", fromGeneration: 2 ** 52, toGeneration: Number.MAX_SAFE_INTEGER, total: MAX_SUMMARY_KEYS, added: k.filter((_, i) => i % 2 === 0), removed: k.filter((_, i) => i % 2 === 1) });
    assert.ok(delta.length <= MAX_FRAME_BYTES.summary && half > 0);
  }
});

test("summary decoding refuses hostile frames", () => {
  const E = epochBytes(5n);
  const snap = (...rest: (number | bigint | Uint8Array)[]) => bytes(0x02, E, ...rest);
  assert.equal(decodeSummaryMessage(snap(1, 2, 0, 2, 10n, 5n)).type, "snapshot"); // the well-formed baseline
  rejects(() => decodeSummaryMessage(snap(1, 2, 0, 2, 300n)), /truncated/);
  rejects(() => decodeSummaryMessage(snap(1, 2, 0, 2, 10n)), /cannot fit/);
  rejects(() => decodeSummaryMessage(snap(1, 2, 0, 2, 10n, 5n, 0)), /trailing/);
  rejects(() => decodeSummaryMessage(snap(1, 2, 0, 2, 10n, 0n)), /duplicate key/);
  rejects(() => decodeSummaryMessage(snap(1, 2, 0, 2, (1n << 64n) - 2n, 2n)), /overflow/); // "unsorted": wraps past 2^64
  rejects(() => decodeSummaryMessage(snap(1, 1, 0, 2, 10n, 5n)), /exceed the total/);
  rejects(() => decodeSummaryMessage(snap(1, 5, 4, 2, 10n, 5n)), /exceed the total/);
  rejects(() => decodeSummaryMessage(snap(1, 5, 0, 0)), /empty chunk/);
  rejects(() => decodeSummaryMessage(bytes(0x02, epochBytes(0n), 1, 0, 0, 0)), /epoch 0/);
  rejects(() => decodeSummaryMessage(snap(1, 2, 0, 0xff, 0xff, 0x03)), /count.*exceeds/); // 65535 keys
  rejects(() => decodeSummaryMessage(snap(1, 0x80, 0x80, 0x80, 0x04, 0, 0)), /total.*exceeds/);
  rejects(() => decodeSummaryMessage(snap(1, 0x80, 0x40, 0, 0x80, 0x40)), /cannot fit/); // 8192 keys claimed, none sent
  rejects(() => decodeSummaryMessage(snap(1, 2, 0, 2, new Uint8Array(11).fill(0xff))), /too long|64 bits/);
  rejects(() => decodeSummaryMessage(bytes(0x02, 1, 2, 3)), /truncated/);
  rejects(() => decodeSummaryMessage(bytes(0x01, E, 0)), /unknown message tag 0x1/); // a Subscribe on the wrong side
  rejects(() => decodeSummaryMessage(bytes(0x7f)), /unknown message tag 0x7f/);
  rejects(() => decodeSummaryMessage(new Uint8Array(0)), /truncated/);

  assert.equal(decodeSummaryMessage(bytes(0x03, 1, 2, 1, 1, 7n, 0)).type, "delta");
  rejects(() => decodeSummaryMessage(bytes(0x03, 2, 2, 1, 1, 7n, 0)), /toGeneration/);
  rejects(() => decodeSummaryMessage(bytes(0x03, 1, 2, 1, 1, 7n, 1, 7n)), /both added and removed/);
  rejects(() => decodeSummaryMessage(bytes(0x03, 1, 2, 1, 2, 7n, 0n, 0)), /duplicate key/);
  rejects(() => decodeSummaryMessage(bytes(0x03, 1, 2, 1, 0x80, 0x40, 0x00)), /cannot fit/);
  rejects(() => decodeSummaryMessage(bytes(0x03, 1, 2, 1, 0x81, 0x40)), /exceeds the limit/);
  rejects(() => decodeSummaryMessage(bytes(0x03, 1, 2, 1, 0, 0, 0)), /trailing/);

  rejects(() => decodeSummarySubscribe(bytes(0x01, E)), /truncated/);
  rejects(() => decodeSummarySubscribe(bytes(0x01, E, 0, 0)), /trailing/);
  rejects(() => decodeSummarySubscribe(bytes(0x02, E, 0)), /unknown message tag/);

  // Encoding refuses what decoding would refuse.
  rejects(() => encodeSummaryMessage({ type: "snapshot", epoch: 1n, generation: 0, total: 2, offset: 0, keys: keysOf(2n, 1n) }), /ascending/);
  rejects(() => encodeSummaryMessage({ type: "snapshot", epoch: 0n, generation: 0, total: 0, offset: 0, keys: keysOf() }), /epoch 0/);
  rejects(() => encodeSummaryMessage({ type: "delta", fromGeneration: 1, toGeneration: 2, total: 1, added: keysOf(1n), removed: keysOf(1n) }), /both/);
  rejects(() => encodeSummaryMessage({ type: "delta", fromGeneration: 2, toGeneration: 2, total: 1, added: keysOf(), removed: keysOf() }), /toGeneration/);
});

test("snapshots: chunked, reassembled in order, inconsistent chunks refused", () => {
  const keys = sortedKeys(Array.from({ length: 20_000 }, hashPart));
  const chunks = snapshotChunks(42n, 7, keys);
  assert.equal(chunks.length, 3);
  const asm = new SnapshotAssembler();
  let snap;
  for (const [i, c] of chunks.entries()) {
    const r = asm.push(decodeSummaryMessage(encodeSummaryMessage(c)) as SummarySnapshotChunk);
    assert.equal(r === undefined, i < chunks.length - 1);
    assert.equal(asm.pending, i < chunks.length - 1);
    snap = r ?? snap;
  }
  assert.deepEqual(snap, { epoch: 42n, generation: 7, keys });
  assert.deepEqual(new SnapshotAssembler().push(snapshotChunks(1n, 0, keysOf())[0]!), { epoch: 1n, generation: 0, keys: keysOf() });

  const [a, b, c] = snapshotChunks(1n, 1, keysOf(1n, 2n, 3n, 4n, 5n), 2) as [SummarySnapshotChunk, SummarySnapshotChunk, SummarySnapshotChunk];
  const fresh = (...cs: SummarySnapshotChunk[]) => {
    const s = new SnapshotAssembler();
    for (const x of cs) s.push(x);
  };
  rejects(() => fresh(b), /first chunk starts at offset 2/);
  rejects(() => fresh(a, c), /offset 4, expected 2/);
  rejects(() => fresh(a, { ...b, generation: 2 }), /different snapshot/);
  rejects(() => fresh(a, { ...b, epoch: 9n }), /different snapshot/);
  rejects(() => fresh(a, { ...b, keys: keysOf(2n, 3n) }), /not ascending across chunks/);
  rejects(() => new SnapshotAssembler(4).push(a), /exceed the limit 4/);
  // After an error the assembler starts over with the next snapshot.
  const s = new SnapshotAssembler();
  s.push(a);
  assert.throws(() => s.push(c));
  s.push(a);
  s.push(b);
  assert.deepEqual(s.push(c)?.keys, keysOf(1n, 2n, 3n, 4n, 5n));
});

/** Runs SnapshotAssembler.frame() to the end of its steps; the snapshot, if this frame completed one. */
function frameInto(asm: SnapshotAssembler, payload: Uint8Array, slice?: number) {
  const f = asm.frame(payload, slice);
  for (;;) {
    const r = f.steps.next();
    if (r.done) return r.value;
  }
}

/**
 * The snapshot decoding rules written out plainly, a BigInt per key, for comparison with the
 * decoders: the keys of a whole snapshot from its frames, or a thrown PeerProtocolError.
 */
function referenceSnapshot(frames: Uint8Array[]): BigUint64Array {
  const keys: bigint[] = [];
  let head: { epoch: bigint; generation: number; total: number } | undefined;
  for (const [n, payload] of frames.entries()) {
    const r = new Reader(payload, "reference");
    if (r.u8() !== 0x02) r.fail("tag");
    const epoch = r.fixedU64("epoch");
    const generation = r.uint("generation");
    const total = r.uint("total", MAX_SUMMARY_KEYS);
    const offset = r.uint("offset", MAX_SUMMARY_KEYS);
    const count = r.uint("count", MAX_KEYS_PER_FRAME);
    if (epoch === 0n || offset + count > total || (count === 0 && total !== 0)) r.fail("header");
    if (head === undefined ? offset !== 0 : epoch !== head.epoch || generation !== head.generation || total !== head.total) r.fail("chain");
    head ??= { epoch, generation, total };
    if (offset !== keys.length) r.fail("offset");
    let prev = -1n;
    for (let i = 0; i < count; i++) {
      const v = r.u64("key");
      const k = i === 0 ? v : prev + v;
      if (i > 0 && v === 0n) r.fail("duplicate");
      if (k >= 1n << 64n) r.fail("overflow");
      if (i === 0 && keys.length > 0 && k <= keys[keys.length - 1]!) r.fail("across chunks");
      keys.push(k);
      prev = k;
    }
    r.end();
    if (keys.length === total && n !== frames.length - 1) r.fail("frames after the end");
  }
  if (!head || keys.length !== head.total) throw new PeerProtocolError("incomplete");
  return BigUint64Array.from(keys);
}

/** The same frames through decodeSummaryMessage + push() and through frame() (in slices of `slice`). */
function bothAssemblers(frames: Uint8Array[], slice: number): [BigUint64Array | Error, BigUint64Array | Error] {
  const run = (one: (asm: SnapshotAssembler, f: Uint8Array) => { keys: BigUint64Array } | undefined) => {
    const asm = new SnapshotAssembler();
    try {
      let snap: { keys: BigUint64Array } | undefined;
      for (const [n, f] of frames.entries()) {
        snap = one(asm, f);
        if (snap && n !== frames.length - 1) throw new PeerProtocolError("frames after the end");
      }
      if (!snap) throw new PeerProtocolError("incomplete");
      return snap.keys;
    } catch (e) {
      assert.ok(isPPE(e), `not a PeerProtocolError: ${e}`);
      return e as Error;
    }
  };
  return [
    run((asm, f) => {
      const m = decodeSummaryMessage(f);
      if (m.type !== "snapshot") throw new PeerProtocolError("not a snapshot");
      return asm.push(m);
    }),
    run((asm, f) => frameInto(asm, f, slice)),
  ];
}

test("snapshot frames decode straight into the snapshot, in slices, as decodeSummaryMessage + push do", () => {
  const keys = sortedKeys(Array.from({ length: 20_000 }, hashPart));
  const frames = snapshotChunks(42n, 7, keys).map(encodeSummaryMessage);
  for (const slice of [1, 3, 1000, 2048, 8192, Infinity]) {
    const asm = new SnapshotAssembler();
    let snap;
    for (const [i, payload] of frames.entries()) {
      const f = asm.frame(payload, slice);
      assert.equal(f.keys, Math.min(8192, keys.length - 8192 * i), "the key count is known before decoding");
      let steps = 0;
      for (let r = f.steps.next(); ; r = f.steps.next(), steps++) {
        if (r.done) {
          snap = r.value;
          break;
        }
      }
      assert.equal(steps, Math.ceil(f.keys / Math.min(slice, f.keys)) - 1, `slice ${slice}: a yield between slices`);
      assert.equal(snap === undefined, i < frames.length - 1);
      assert.equal(asm.pending, i < frames.length - 1);
    }
    assert.deepEqual(snap, { epoch: 42n, generation: 7, keys }, `slice ${slice}`);
  }
  assert.deepEqual(frameInto(new SnapshotAssembler(), encodeSummaryMessage(snapshotChunks(1n, 0, keysOf())[0]!)), { epoch: 1n, generation: 0, keys: keysOf() });
  // Extreme keys: 0, 2^64 - 1, and gaps of every varint length.
  const edge = keysOf(0n, 1n, 2n ** 28n, 2n ** 32n, 2n ** 35n + 7n, 2n ** 63n, (1n << 64n) - 2n, (1n << 64n) - 1n);
  assert.deepEqual(frameInto(new SnapshotAssembler(), encodeSummaryMessage(snapshotChunks(1n, 0, edge)[0]!), 3)?.keys, edge);
});

test("snapshot frames: hostile frames are refused with PeerProtocolError, and the assembler starts over", () => {
  const snap = (epoch: number, total: number, offset: number, count: number, ...ks: (number | bigint | Uint8Array)[]) => bytes(0x02, epochBytes(BigInt(epoch)), 1, total, offset, count, ...ks);
  const refuses = (frames: Uint8Array[], re: RegExp, slice = 2) =>
    rejects(() => {
      const asm = new SnapshotAssembler();
      for (const f of frames) frameInto(asm, f, slice);
    }, re);
  assert.deepEqual(frameInto(new SnapshotAssembler(), snap(1, 2, 0, 2, 5n, 5n))?.keys, keysOf(5n, 10n)); // the well-formed baseline
  // Truncated varints: in the first key, in a later one, in a later slice.
  refuses([snap(1, 2, 0, 2, 0x80, 0x80)], /truncated/);
  refuses([snap(1, 2, 0, 2, 5n, 0x81)], /truncated/);
  refuses([snap(1, 4, 0, 4, 1n, 1n, 1n, 0xff, 0xff)], /truncated/);
  refuses([snap(1, 2, 0, 2, 300n)], /truncated/);
  refuses([bytes(0x02, epochBytes(1n), 1, 2)], /truncated/); // inside the header
  // Varints too long, past 64 bits, not minimal.
  refuses([snap(1, 2, 0, 2, new Uint8Array(11).fill(0xff))], /too long|64 bits/);
  refuses([snap(1, 1, 0, 1, Uint8Array.of(...new Array(9).fill(0xff), 0x02))], /64 bits/);
  refuses([snap(1, 2, 0, 2, 5n, Uint8Array.of(0x81, 0x00))], /non-minimal/);
  // Oversize counts: past a frame's limit, past the bytes sent, past the total, past the summary limit.
  refuses([snap(1, 2, 0, 0xff, 0xff, 0x03)], /count.*exceeds/);
  refuses([snap(1, 0x80, 0x40, 0, 0x80, 0x40)], /cannot fit/);
  refuses([snap(1, 2, 0, 3, 1n, 1n, 1n)], /exceed the total/);
  refuses([snap(1, 0x80, 0x80, 0x80, 0x04, 0, 0)], /total.*exceeds/);
  rejects(() => frameInto(new SnapshotAssembler(4), snap(1, 5, 0, 1, 1n)), /exceed the limit 4/);
  // Keys out of order: a zero gap, a gap past 2^64, a chunk starting at or below the last key.
  refuses([snap(1, 2, 0, 2, 10n, 0n)], /duplicate key/);
  refuses([snap(1, 2, 0, 2, (1n << 64n) - 2n, 2n)], /overflow/);
  refuses([snap(1, 4, 0, 2, 5n, 5n), snap(1, 4, 2, 2, 10n, 1n)], /not ascending across chunks/);
  refuses([snap(1, 4, 0, 2, 5n, 5n), snap(1, 4, 2, 2, 9n, 1n)], /not ascending across chunks/);
  // Chunks that do not follow on: offsets, another snapshot, a first chunk not at 0; and the rest.
  refuses([snap(1, 4, 0, 2, 5n, 5n), snap(1, 4, 3, 1, 20n)], /offset 3, expected 2/);
  refuses([snap(1, 4, 0, 2, 5n, 5n), snap(2, 4, 2, 2, 20n, 1n)], /different snapshot/);
  refuses([snap(1, 4, 0, 2, 5n, 5n), snap(1, 5, 2, 2, 20n, 1n)], /different snapshot/);
  refuses([snap(1, 4, 2, 2, 5n, 5n)], /first chunk starts at offset 2/);
  refuses([snap(1, 2, 0, 2, 10n, 5n, 0)], /trailing/);
  refuses([snap(1, 5, 0, 0)], /empty chunk/);
  refuses([snap(0, 1, 0, 1, 1n)], /epoch 0/);
  refuses([bytes(0x03, 1, 2, 1, 1, 7n, 0)], /expected a snapshot chunk/);
  refuses([new Uint8Array(0)], /truncated/);

  // After an error (here in a later slice of a later frame) the next snapshot starts afresh.
  const asm = new SnapshotAssembler();
  frameInto(asm, snap(1, 4, 0, 2, 5n, 5n));
  rejects(() => frameInto(asm, snap(1, 4, 2, 2, 20n, 0n), 1), /duplicate key/);
  assert.equal(asm.pending, false);
  frameInto(asm, snap(3, 3, 0, 2, 7n, 1n));
  assert.deepEqual(frameInto(asm, snap(3, 3, 2, 1, 9n))?.keys, keysOf(7n, 8n, 9n));
  // A frame's keys must be decoded before the next frame is taken.
  const half = new SnapshotAssembler();
  half.frame(snap(1, 2, 0, 2, 5n, 5n));
  assert.throws(() => half.frame(snap(1, 2, 0, 2, 5n, 5n)), /not all decoded/);
});

test("fuzz: snapshot frames decoded straight into the snapshot agree with the plain rules and with push()", () => {
  const frameSets = [
    snapshotChunks(3n, 4, sortedKeys(Array.from({ length: 40 }, hashPart)), 16).map(encodeSummaryMessage),
    snapshotChunks(5n, 1, keysOf(0n, 1n, 2n ** 32n - 1n, 2n ** 32n, 2n ** 63n, (1n << 64n) - 1n), 2).map(encodeSummaryMessage),
    snapshotChunks(7n, 2, keysOf(), 2).map(encodeSummaryMessage),
  ];
  const pick = <T>(xs: T[]) => xs[Math.floor(Math.random() * xs.length)]!;
  const mutateFrame = (s: Uint8Array): Uint8Array => {
    const b = Uint8Array.from(s);
    switch (Math.floor(Math.random() * 5)) {
      case 0:
        return b.subarray(0, Math.floor(Math.random() * b.length));
      case 1:
        b[Math.floor(Math.random() * b.length)] = Math.floor(Math.random() * 256);
        return b;
      case 2:
        return bytes(...b, ...randomBytes(1 + Math.floor(Math.random() * 3)));
      case 3: {
        const i = Math.floor(Math.random() * b.length);
        b[i] = b[i]! ^ (1 << Math.floor(Math.random() * 8));
        return b;
      }
      default: {
        const i = 9 + Math.floor(Math.random() * Math.max(1, b.length - 9)); // in the keys
        b[i] = b[i]! ^ 0x80; // a varint's continuation bit: lengths and boundaries shift
        return b;
      }
    }
  };
  const outcome = (x: BigUint64Array | Error) => (x instanceof Error ? "refused" : x.join(","));
  const counts = { accepted: 0, refused: 0 };
  for (let n = 0; n < 6000; n++) {
    const frames = [...pick(frameSets)];
    const i = Math.floor(Math.random() * frames.length);
    switch (Math.floor(Math.random() * 4)) {
      case 0:
        frames.splice(i, 1); // dropped
        break;
      case 1:
        frames.splice(i, 0, frames[i]!); // repeated
        break;
      case 2:
        if (frames.length > 1) [frames[0], frames[frames.length - 1]] = [frames[frames.length - 1]!, frames[0]!]; // reordered
        break;
      default:
        frames[i] = mutateFrame(frames[i]!);
    }
    let expected: BigUint64Array | Error;
    try {
      expected = referenceSnapshot(frames);
    } catch (e) {
      assert.ok(isPPE(e));
      expected = e as Error;
    }
    const [viaPush, viaFrame] = bothAssemblers(frames, 1 + Math.floor(Math.random() * 4));
    assert.equal(outcome(viaFrame), outcome(expected), `frame(): ${frames.map((f) => Buffer.from(f).toString("hex")).join(" ")}`);
    assert.equal(outcome(viaPush), outcome(expected), `push(): ${frames.map((f) => Buffer.from(f).toString("hex")).join(" ")}`);
    counts[expected instanceof Error ? "refused" : "accepted"]++;
  }
  console.log(`# snapshot fuzz: ${counts.accepted} accepted, ${counts.refused} refused alike`);
  assert.ok(counts.accepted > 100 && counts.refused > 1000, JSON.stringify(counts));
});

test("a snapshot is assembled in the keys it replaced when they are handed back", () => {
  const keys = (n: number, from = 1n) => BigUint64Array.from({ length: n }, (_, i) => from + 3n * BigInt(i));
  const whole = (asm: SnapshotAssembler, ks: BigUint64Array, gen: number) => {
    let snap;
    for (const c of snapshotChunks(9n, gen, ks, 1000)) snap = frameInto(asm, encodeSummaryMessage(c), 700) ?? snap;
    return snap!;
  };
  const asm = new SnapshotAssembler();
  const ps = new PathSummary();
  const first = whole(asm, keys(5000), 1);
  assert.equal(ps.applySnapshot(first, true).length, 0, "what it held before: nothing");
  const second = whole(asm, keys(5000, 2n), 2);
  assert.notEqual(second.keys.buffer, first.keys.buffer, "the first is still in use");
  const replaced = ps.applySnapshot(second, true);
  assert.equal(replaced, first.keys, "applySnapshot hands back the keys it held");
  asm.recycle(replaced);
  const third = whole(asm, keys(4000, 3n), 3);
  assert.equal(third.keys.buffer, first.keys.buffer, "assembled in the recycled buffer");
  assert.deepEqual(third.keys, keys(4000, 3n));
  ps.applySnapshot(third, true);
  assert.deepEqual(ps.keys(), keys(4000, 3n));
  assert.ok(ps.hasKey(3n) && !ps.hasKey(1n));
  // The spare is used once, and only by a snapshot it fits without wasting half of it.
  const fourth = whole(asm, keys(4000, 4n), 4);
  assert.notEqual(fourth.keys.buffer, first.keys.buffer);
  asm.recycle(second.keys);
  assert.notEqual(whole(asm, keys(2000, 5n), 5).keys.buffer, second.keys.buffer, "too large a spare for 2,000 keys");
  asm.recycle(second.keys);
  assert.notEqual(whole(asm, keys(6000, 6n), 6).keys.buffer, second.keys.buffer, "too small a spare for 6,000 keys");
  asm.recycle(second.keys);
  asm.dropSpare();
  assert.notEqual(whole(asm, keys(5000, 7n), 7).keys.buffer, second.keys.buffer, "dropped");
});

test("deltas decoded into a scratch array: the same deltas, views of it; hostile ones refused alike", () => {
  const scratch = new BigUint64Array(MAX_KEYS_PER_FRAME);
  const ks = sortedKeys(Array.from({ length: MAX_KEYS_PER_FRAME }, hashPart));
  const deltas: SummaryDelta[] = [
    { type: "delta", fromGeneration: 1, toGeneration: 2, total: 9, added: ks.filter((_, i) => i % 2 === 0), removed: ks.filter((_, i) => i % 2 === 1) },
    { type: "delta", fromGeneration: 2, toGeneration: 3, total: 1, added: keysOf(7n), removed: keysOf() },
    { type: "delta", fromGeneration: 3, toGeneration: 9, total: 0, added: keysOf(), removed: keysOf(0n, (1n << 64n) - 1n) },
  ];
  for (const d of deltas) {
    const got = decodeSummaryDelta(encodeSummaryMessage(d), scratch);
    assert.deepEqual(got, d);
    assert.ok(got.added.buffer === scratch.buffer && got.removed.buffer === scratch.buffer, "views of the scratch array");
  }
  assert.notEqual(decodeSummaryDelta(encodeSummaryMessage(deltas[1]!), new BigUint64Array(10)).added.buffer.byteLength, 80, "too small a scratch is not used");
  rejects(() => decodeSummaryDelta(encodeSummaryMessage(snapshotChunks(1n, 1, keysOf(1n))[0]!), scratch), /expected a delta/);
  // Every mutation of a valid delta: the same outcome with and without the scratch array.
  const seed = encodeSummaryMessage({ type: "delta", fromGeneration: 1, toGeneration: 3, total: 9, added: sortedKeys([hashPart(), hashPart(), hashPart()]), removed: sortedKeys([hashPart(), hashPart()]) });
  const outcome = (f: () => SummaryDelta) => {
    try {
      const d = f();
      return `${d.fromGeneration} ${d.toGeneration} ${d.total} ${d.added.join(",")} ${d.removed.join(",")}`;
    } catch (e) {
      assert.ok(isPPE(e), String(e));
      return "refused";
    }
  };
  let refused = 0;
  for (let n = 0; n < 3000; n++) {
    const b = Uint8Array.from(seed);
    for (let i = 0; i < 1 + (n % 3); i++) {
      const j = Math.floor(Math.random() * b.length);
      b[j] = b[j]! ^ (1 << Math.floor(Math.random() * 8));
    }
    const cut = n % 5 === 0 ? b.subarray(0, Math.floor(Math.random() * b.length)) : b;
    const plain = outcome(() => decodeSummaryMessage(cut) as SummaryDelta);
    assert.equal(outcome(() => decodeSummaryDelta(cut, scratch)), plain, Buffer.from(cut).toString("hex"));
    if (plain === "refused") refused++;
  }
  assert.ok(refused > 100 && refused < 3000, `${refused}`);
});

test("PathSummary: snapshot, deltas in order, gaps and total mismatches refused unchanged", () => {
  const hs = Array.from({ length: 10 }, hashPart);
  const ps = new PathSummary();
  assert.equal(ps.generation, undefined);
  assert.equal(ps.has(hs[0]!), false);
  const d0: SummaryDelta = { type: "delta", fromGeneration: 1, toGeneration: 2, total: 1, added: sortedKeys([hs[0]!]), removed: keysOf() };
  assert.equal(ps.applyDelta(d0), false, "no snapshot yet");

  ps.applySnapshot({ epoch: 3n, generation: 1, keys: sortedKeys(hs.slice(0, 5)) });
  assert.equal(ps.size, 5);
  assert.ok(hs.slice(0, 5).every((h) => ps.has(h)));
  assert.ok(!hs.slice(5).some((h) => ps.has(h)));
  assert.equal(ps.has("not a hash"), false);

  const add = sortedKeys(hs.slice(5, 7));
  const rem = sortedKeys(hs.slice(0, 2));
  assert.equal(ps.applyDelta({ type: "delta", fromGeneration: 2, toGeneration: 3, total: 5, added: add, removed: rem }), false, "gap");
  assert.equal(ps.applyDelta({ type: "delta", fromGeneration: 1, toGeneration: 2, total: 6, added: add, removed: rem }), false, "wrong total");
  assert.equal(ps.generation, 1);
  assert.equal(ps.size, 5);
  assert.ok(ps.has(hs[0]!) && !ps.has(hs[5]!), "unchanged after refusals");

  assert.equal(ps.applyDelta({ type: "delta", fromGeneration: 1, toGeneration: 2, total: 5, added: add, removed: rem }), true);
  assert.equal(ps.generation, 2);
  assert.deepEqual(hs.map((h) => ps.has(h)), [false, false, true, true, true, true, true, false, false, false]);
  // Re-adding a present key and removing an absent one change nothing; the total still checks.
  assert.equal(ps.applyDelta({ type: "delta", fromGeneration: 2, toGeneration: 3, total: 5, added: sortedKeys([hs[2]!]), removed: sortedKeys([hs[9]!]) }), true);
  assert.deepEqual(ps.keys(), sortedKeys(hs.slice(2, 7)));
  ps.clear();
  assert.equal(ps.size, 0);
  assert.equal(ps.generation, undefined);
});

test("PathSummary follows a long random history exactly (overlay merges included)", () => {
  const truth = new Set<bigint>();
  const pool = Array.from({ length: 6000 }, () => summaryKey(hashPart()));
  for (const k of pool.slice(0, 3000)) truth.add(k);
  const ps = new PathSummary();
  let before = sortedKeys(truth);
  ps.applySnapshot({ epoch: 1n, generation: 10, keys: before });
  let gen = 10;
  for (let step = 0; step < 300; step++) {
    for (let i = 0; i < 1 + (step % 40); i++) {
      const k = pool[Math.floor(Math.random() * pool.length)]!;
      if (truth.has(k)) truth.delete(k);
      else truth.add(k);
    }
    const after = sortedKeys(truth);
    const { added, removed } = diffSummaryKeys(before, after);
    for (const d of splitSummaryDelta(gen, before.length, added, removed, 1 + (step % 7))) {
      assert.equal(ps.applyDelta(decodeSummaryMessage(encodeSummaryMessage(d)) as SummaryDelta), true);
      gen = d.toGeneration;
    }
    assert.equal(ps.size, truth.size);
    before = after;
  }
  assert.deepEqual(ps.keys(), before);
  assert.ok(pool.every((k) => ps.hasKey(k) === truth.has(k)));
});

test("PathSummary: a large summary merges in slices, lookups exact throughout; a change abandons the merge", () => {
  // Above INLINE_COMPACTION_KEYS, applyDelta leaves the merge to compactionSteps.
  const n = PathSummary.INLINE_COMPACTION_KEYS + 10_000;
  const truth = new Set<bigint>();
  while (truth.size < n + 20_000) truth.add(randomBytes(8).readBigUInt64BE());
  const pool = [...truth];
  const base = sortedKeys(pool.slice(0, n));
  const inBase = new Set(base);
  const ps = new PathSummary();
  ps.applySnapshot({ epoch: 1n, generation: 1, keys: base });
  // Keys both above and below 2^32 in either half exercise the 32-bit comparisons.
  const edge = [0n, 1n, 0xffffffffn, 0x100000000n, 0xffffffff00000000n, 0xffffffffffffffffn].filter((k) => !inBase.has(k));
  const added = sortedKeys([...pool.slice(n, n + 9_000), ...edge]);
  const removed = sortedKeys(pool.slice(0, 8_000));
  let gen = 1;
  let total = n;
  for (const d of splitSummaryDelta(gen, total, added, removed)) {
    assert.equal(ps.applyDelta(d), true);
    gen = d.toGeneration;
    total = d.total;
  }
  assert.equal(ps.compactionDue, true, "the overlays wait for a sliced merge");
  const expect = (k: bigint) => (inBase.has(k) || added.includes(k)) && !removed.includes(k);
  const check = () => {
    for (const k of [...pool.slice(0, 100), ...pool.slice(n - 50, n + 50), ...edge, ...removed.slice(0, 50)]) assert.equal(ps.hasKey(k), expect(k), String(k));
  };
  // A change between two steps: the merge is dropped, nothing is lost.
  const steps = ps.compactionSteps(10_000);
  steps.next();
  check();
  const one = pool[n + 19_000]!;
  assert.equal(ps.applyDelta({ type: "delta", fromGeneration: gen, toGeneration: gen + 1, total: total + 1, added: keysOf(one), removed: keysOf() }), true);
  added.sort();
  for (;;) if (steps.next().done) break;
  assert.equal(ps.compactionDue, true);
  assert.equal(ps.hasKey(one), true);
  // Undisturbed, it takes several steps and ends with the exact set.
  let count = 0;
  for (const _ of ps.compactionSteps(10_000)) {
    count++;
    check();
  }
  assert.ok(count >= 5, `${count} steps`);
  assert.equal(ps.compactionDue, false);
  assert.equal(ps.size, total + 1);
  const want = sortedKeys([...[...inBase].filter((k) => !removed.includes(k)), ...added, one]);
  assert.deepEqual(ps.keys(), want);
  check();
});

test("diffSummaryKeys and splitSummaryDelta", () => {
  assert.deepEqual(diffSummaryKeys(keysOf(1n, 3n, 5n), keysOf(2n, 3n, 6n)), { added: keysOf(2n, 6n), removed: keysOf(1n, 5n) });
  assert.deepEqual(diffSummaryKeys(keysOf(), keysOf()), { added: keysOf(), removed: keysOf() });
  const parts = splitSummaryDelta(5, 10, keysOf(20n, 21n, 22n), keysOf(1n, 2n), 2);
  assert.deepEqual(
    parts.map((d) => [d.fromGeneration, d.toGeneration, d.total, [...d.added], [...d.removed]]),
    [
      [5, 6, 8, [], [1n, 2n]],
      [6, 7, 10, [20n, 21n], []],
      [7, 8, 11, [22n], []],
    ],
  );
  assert.equal(splitSummaryDelta(5, 10, keysOf(), keysOf()).length, 1, "an empty change still advances the generation");
});

test("a 100,000-path snapshot takes well under 10 bytes per path", () => {
  const n = 100_000;
  const keys = sortedKeys(Array.from({ length: n }, hashPart));
  const frames = snapshotChunks(0xfeedn, 1, keys).map((c) => encodeFrame(encodeSummaryMessage(c), MAX_FRAME_BYTES.summary));
  const total = frames.reduce((s, f) => s + f.length, 0);
  const perPath = total / n;
  console.log(`# 100,000-path snapshot: ${frames.length} frames, ${total} bytes, ${perPath.toFixed(3)} bytes/path`);
  assert.ok(perPath < 7.5, `${perPath} bytes/path`);
  const d = new FrameDecoder(MAX_FRAME_BYTES.summary);
  const asm = new SnapshotAssembler();
  let snap;
  for (const f of frames) {
    d.push(f);
    for (let p = d.next(); p; p = d.next()) snap = asm.push(decodeSummaryMessage(p) as SummarySnapshotChunk) ?? snap;
  }
  assert.deepEqual(snap?.keys, keys);
  // A typical delta (a build adding 50 paths, a GC of 20) is a few hundred bytes.
  const delta = encodeSummaryMessage({ type: "delta", fromGeneration: 1, toGeneration: 2, total: n + 30, added: sortedKeys(Array.from({ length: 50 }, hashPart)), removed: keys.filter((_, i) => i % 5000 === 0) });
  console.log(`# delta of 50 added + 20 removed: ${delta.length} bytes`);
  assert.ok(delta.length < 70 * 10);
});

test("narinfo messages: round trips and hostile input", () => {
  const h = hashPart();
  const req = encodeNarinfoRequest(h);
  assert.equal(req.length, 21);
  assert.equal(decodeNarinfoRequest(req), h);
  const text = `StorePath: /nix/store/${h}-héllo\nURL: nar/x.nar\n`;
  assert.deepEqual(decodeNarinfoResponse(encodeNarinfoResponse({ type: "found", narinfo: text })), { type: "found", narinfo: text });
  assert.deepEqual(decodeNarinfoResponse(encodeNarinfoResponse({ type: "not-found" })), { type: "not-found" });
  const max = "x".repeat(MAX_NARINFO_BYTES);
  const enc = encodeNarinfoResponse({ type: "found", narinfo: max });
  assert.ok(enc.length <= MAX_FRAME_BYTES.narinfo);
  assert.equal(decodeNarinfoResponse(enc).type, "found");

  for (const bad of ["", "0".repeat(31), "e".repeat(32), h.toUpperCase()]) rejects(() => encodeNarinfoRequest(bad), /invalid hash part/);
  rejects(() => decodeNarinfoRequest(req.subarray(0, 20)), /truncated/);
  rejects(() => decodeNarinfoRequest(bytes(...req, 0)), /trailing/);
  rejects(() => decodeNarinfoRequest(bytes(0x11, ...req.subarray(1))), /unknown message tag/);
  rejects(() => encodeNarinfoResponse({ type: "found", narinfo: max + "x" }), /exceeds the limit/);
  rejects(() => encodeNarinfoResponse({ type: "found", narinfo: "" }), /empty/);
  rejects(() => decodeNarinfoResponse(bytes(0x11, 0x81, 0x80, 0x04)), /exceeds the limit/); // 65537 claimed
  rejects(() => decodeNarinfoResponse(bytes(0x11, 3, 0x61, 0xff, 0x62)), /UTF-8/);
  rejects(() => decodeNarinfoResponse(bytes(0x11, 0)), /empty/);
  rejects(() => decodeNarinfoResponse(bytes(0x11, 5, 0x61)), /truncated/);
  rejects(() => decodeNarinfoResponse(bytes(0x12, 0)), /trailing/);
  rejects(() => decodeNarinfoResponse(bytes(0x10)), /unknown message tag/);
});

test("NAR 2.0.0 messages: accept and encoding round-trip; each version refuses the other's tags; only an accepted encoding", () => {
  const m = { hashPart: hashPart(), narHash: narHash(), offset: 7, accept: ACCEPT_ZSTD };
  const req = encodeNarRequest(m);
  assert.equal(req[0], 0x23);
  assert.deepEqual(decodeNarRequest(req, true), m);
  // A future encoding bit is carried (and ignored by the responder's choice), not refused.
  assert.deepEqual(decodeNarRequest(encodeNarRequest({ ...m, accept: 0b110 }), true), { ...m, accept: 0b110 });
  rejects(() => decodeNarRequest(req), /unknown message tag 0x23/); // a 1.0.0 responder
  rejects(() => decodeNarRequest(encodeNarRequest({ hashPart: m.hashPart, narHash: m.narHash, offset: 7 }), true), /unknown message tag 0x20/);
  const ok = { type: "ok", narSize: 1000, encoding: NAR_ENCODING.zstd } as const;
  assert.deepEqual(decodeNarResponseHeader(encodeNarResponseHeader(ok), ACCEPT_ZSTD), ok);
  const plain = { type: "ok", narSize: 1000, encoding: NAR_ENCODING.identity } as const;
  assert.deepEqual(decodeNarResponseHeader(encodeNarResponseHeader(plain), 0), plain);
  rejects(() => decodeNarResponseHeader(encodeNarResponseHeader(ok), 0), /encoding 1 was not accepted/);
  rejects(() => decodeNarResponseHeader(bytes(0x24, 0x80, 0x01, 2), 0b110), /encoding 2 was not accepted/);
  rejects(() => decodeNarResponseHeader(encodeNarResponseHeader(ok)), /unknown message tag 0x24/); // a 1.0.0 requester
  rejects(() => decodeNarResponseHeader(encodeNarResponseHeader({ type: "ok", narSize: 1000 }), ACCEPT_ZSTD), /unknown message tag 0x21/);
  assert.deepEqual(decodeNarResponseHeader(encodeNarResponseHeader({ type: "error", code: 3, message: "busy" }), ACCEPT_ZSTD), { type: "error", code: 3, message: "busy" });
});

test("NAR 3.0.0 direct: bit 2 round-trips; NarDirect only when asked for, bounded, no trailing bytes", () => {
  const m = { hashPart: hashPart(), narHash: narHash(), offset: 0, accept: 0, bulk: BULK_DIRECT_HTTP };
  const req = encodeNarRequest(m);
  assert.equal(req[0], 0x25);
  assert.deepEqual(decodeNarRequest(req, 3), m);
  assert.deepEqual(decodeNarRequest(encodeNarRequest({ ...m, bulk: BULK_DIRECT_HTTP | BULK_TLS_PSK | 8 }), 3).bulk, 11, "unknown bits are carried");
  const ticket = new Uint8Array(randomBytes(16));
  const d = { type: "direct", narSize: 9 * 2 ** 20, port: 37518, ticket } as const;
  const wire = encodeNarResponseHeader(d);
  assert.equal(wire[0], 0x27);
  assert.deepEqual(decodeNarResponseHeader(wire, 0, BULK_DIRECT_HTTP), d);
  assert.deepEqual(decodeNarResponseHeader(wire, 0, BULK_DIRECT_HTTP | BULK_TLS_PSK), d);
  // Not asked for: an old requester (bulk 0 or TLS only, or 2.0.0) takes it as an unknown tag.
  rejects(() => decodeNarResponseHeader(wire, 0, BULK_TLS_PSK), /unknown message tag 0x27/);
  rejects(() => decodeNarResponseHeader(wire, 0, 0), /unknown message tag 0x27/);
  rejects(() => decodeNarResponseHeader(wire, 0), /unknown message tag 0x27/);
  rejects(() => decodeNarResponseHeader(wire), /unknown message tag 0x27/);
  // A NarBulk is still refused when only direct was asked for.
  const bulk = encodeNarResponseHeader({ type: "bulk", narSize: 5, encoding: 0, port: 1, ticket, key: new Uint8Array(32) });
  rejects(() => decodeNarResponseHeader(bulk, 0, BULK_DIRECT_HTTP), /unknown message tag 0x26/);
  // The ordinary answers stay valid to a direct request (an old responder ignores bit 2).
  assert.deepEqual(decodeNarResponseHeader(encodeNarResponseHeader({ type: "ok", narSize: 5, encoding: 0 }), 0, BULK_DIRECT_HTTP), { type: "ok", narSize: 5, encoding: 0 });
  // Bounds and garbage.
  rejects(() => encodeNarResponseHeader({ ...d, narSize: 0 }), /positive/);
  rejects(() => encodeNarResponseHeader({ ...d, port: 0 }), /invalid port/);
  rejects(() => encodeNarResponseHeader({ ...d, port: 65536 }), /invalid port/);
  rejects(() => encodeNarResponseHeader({ ...d, ticket: new Uint8Array(15) }), /ticket length/);
  rejects(() => decodeNarResponseHeader(bytes(0x27, 0, 1, ticket), 0, 2), /positive/);
  rejects(() => decodeNarResponseHeader(bytes(0x27, 5, 0, ticket), 0, 2), /port 0/);
  rejects(() => decodeNarResponseHeader(bytes(0x27, 5, 0x80, 0x80, 0x04, ticket), 0, 2), /exceeds the limit 65535/);
  rejects(() => decodeNarResponseHeader(bytes(0x27, 5, 1, ticket.subarray(0, 15)), 0, 2), /truncated/);
  rejects(() => decodeNarResponseHeader(bytes(...wire, 0), 0, 2), /trailing/);
  for (let i = 0; i < 500; i++) {
    const junk = bytes(0x27, ...randomBytes(Math.floor(Math.random() * 30)));
    try {
      const h = decodeNarResponseHeader(junk, 0, 2);
      assert.equal(h.type, "direct");
      if (h.type === "direct") assert.ok(h.narSize > 0 && h.port >= 1 && h.port <= 65535 && h.ticket.length === 16);
    } catch (e) {
      assert.ok(isPPE(e), String(e));
    }
  }
});

test("NAR 3.0.0 minting key: NarDirectKey only when bits 2 and 4 were asked, key and id of fixed length, lifetime 60..3600 s, no trailing bytes", () => {
  const ticket = new Uint8Array(randomBytes(16));
  const mint = { keyId: new Uint8Array(randomBytes(8)), key: new Uint8Array(randomBytes(32)), lifetimeS: 600 };
  const d = { type: "direct", narSize: 5 << 20, port: 37518, ticket, mint } as const;
  const wire = encodeNarResponseHeader(d);
  assert.equal(wire[0], 0x28);
  const both = BULK_DIRECT_HTTP | BULK_DIRECT_MINT;
  assert.deepEqual(decodeNarResponseHeader(wire, 0, both), d);
  // Not asked for (an old requester, or one holding a key): an unknown tag; bit 4 alone opens nothing.
  rejects(() => decodeNarResponseHeader(wire, 0, BULK_DIRECT_HTTP), /unknown message tag 0x28/);
  rejects(() => decodeNarResponseHeader(wire, 0, BULK_DIRECT_MINT), /unknown message tag 0x28/);
  rejects(() => decodeNarResponseHeader(wire, 0), /unknown message tag 0x28/);
  // A plain NarDirect stays a valid answer to bit 4 (a responder that does not mint).
  const plain = { type: "direct", narSize: 5, port: 1, ticket } as const;
  assert.deepEqual(decodeNarResponseHeader(encodeNarResponseHeader(plain), 0, both), plain);
  // Bounds and garbage.
  rejects(() => encodeNarResponseHeader({ ...d, mint: { ...mint, keyId: new Uint8Array(7) } }), /key id length/);
  rejects(() => encodeNarResponseHeader({ ...d, mint: { ...mint, key: new Uint8Array(33) } }), /key id length/);
  for (const lifetimeS of [0, 59, 3601, 1.5]) rejects(() => encodeNarResponseHeader({ ...d, mint: { ...mint, lifetimeS } }), /lifetime/);
  const head = bytes(0x28, 5, 1, ticket, mint.keyId, mint.key);
  assert.equal(decodeNarResponseHeader(bytes(...head, 60), 0, both).type, "direct");
  rejects(() => decodeNarResponseHeader(bytes(...head, 59), 0, both), /lifetime 59/);
  rejects(() => decodeNarResponseHeader(bytes(...head, 0x91, 0x1c), 0, both), /exceeds the limit 3600/);
  rejects(() => decodeNarResponseHeader(head, 0, both), /truncated/);
  rejects(() => decodeNarResponseHeader(bytes(0x28, 5, 1, ticket, mint.keyId, mint.key.subarray(0, 31)), 0, both), /truncated/);
  rejects(() => decodeNarResponseHeader(bytes(...wire, 0), 0, both), /trailing/);
  for (let i = 0; i < 500; i++) {
    const junk = bytes(0x28, ...randomBytes(Math.floor(Math.random() * 80)));
    try {
      const h = decodeNarResponseHeader(junk, 0, both);
      assert.ok(h.type === "direct" && h.mint && h.mint.key.length === 32 && h.mint.keyId.length === 8 && h.mint.lifetimeS >= 60 && h.mint.lifetimeS <= 3600);
    } catch (e) {
      assert.ok(isPPE(e), String(e));
    }
  }
});

test("minted tickets: key id, nonce, 16-byte MAC bound to one NAR path and key", () => {
  const key = randomBytes(32);
  const keyId = randomBytes(8);
  const nonce = randomBytes(12);
  const tail = `nar/${hashPart()}-${narHash()}.nar`;
  const t = mintTicket(key, keyId, nonce, tail);
  assert.equal(t.length, MINTED_TICKET_BYTES);
  assert.ok(t.subarray(0, 8).equals(keyId) && t.subarray(8, 20).equals(nonce));
  assert.ok(mintedMacOk(key, t, tail));
  assert.ok(!mintedMacOk(key, t, `nar/${hashPart()}-${narHash()}.nar`), "another NAR");
  assert.ok(!mintedMacOk(randomBytes(32), t, tail), "another key");
  const flipped = Buffer.from(t);
  flipped[5]! ^= 1; // the key id is under the MAC too
  assert.ok(!mintedMacOk(key, flipped, tail));
  assert.ok(!mintedMacOk(key, t.subarray(0, 35), tail) && !mintedMacOk(key, Buffer.concat([t, Buffer.of(0)]), tail), "wrong lengths");
  assert.throws(() => mintTicket(key, keyId, randomBytes(8), tail), RangeError);
});

test("NAR messages: round trips, header then raw bytes, hostile input", () => {
  const m = { hashPart: hashPart(), narHash: narHash(), offset: 123_456_789 };
  const req = encodeNarRequest(m);
  assert.deepEqual(decodeNarRequest(req), m);
  assert.equal(req.length, 1 + 20 + 32 + 4);
  for (const h of [{ type: "ok", narSize: 2 ** 40 + 3 }, { type: "error", code: NAR_ERROR.busy, message: "8 transfers" }, { type: "error", code: 200, message: "" }] as const) {
    assert.deepEqual(decodeNarResponseHeader(encodeNarResponseHeader(h)), h);
  }
  // A responder's stream: the framed header, then unframed NAR bytes the requester takes as they are.
  const nar = randomBytes(1000);
  const wire = Buffer.concat([encodeFrame(encodeNarResponseHeader({ type: "ok", narSize: 1000 }), MAX_FRAME_BYTES.nar), nar]);
  const d = new FrameDecoder(MAX_FRAME_BYTES.nar);
  d.push(wire.subarray(0, 700));
  assert.deepEqual(decodeNarResponseHeader(d.next()!), { type: "ok", narSize: 1000 });
  assert.deepEqual(Buffer.concat([d.takeRest(), wire.subarray(700)]), nar);

  rejects(() => encodeNarRequest({ ...m, narHash: "z" + m.narHash.slice(1) }), /invalid NAR hash.*non-zero bits/);
  rejects(() => encodeNarRequest({ ...m, narHash: "sha256:" + m.narHash }), /invalid NAR hash/);
  rejects(() => encodeNarRequest({ ...m, hashPart: m.narHash }), /invalid hash part/);
  rejects(() => encodeNarRequest({ ...m, offset: -1 }), /offset/);
  rejects(() => decodeNarRequest(req.subarray(0, 53)), /truncated/);
  rejects(() => decodeNarRequest(bytes(...req, 1)), /trailing/);
  rejects(() => decodeNarRequest(bytes(...req.subarray(0, 53), ...new Uint8Array(9).fill(0xff))), /too long/);
  rejects(() => encodeNarResponseHeader({ type: "ok", narSize: 0 }), /positive/);
  rejects(() => decodeNarResponseHeader(bytes(0x21, 0)), /positive/);
  rejects(() => decodeNarResponseHeader(bytes(0x22, 0, 0)), /error code 0/);
  rejects(() => decodeNarResponseHeader(bytes(0x22, 0x80, 0x02, 0)), /exceeds the limit 255/);
  rejects(() => decodeNarResponseHeader(bytes(0x22, 1, 0x81, 0x02)), /exceeds the limit 256/);
  rejects(() => decodeNarResponseHeader(bytes(0x22, 1)), /truncated/);
  rejects(() => decodeNarResponseHeader(bytes(0x20)), /unknown message tag/);
});

test("peer exchange: round trips, bounds and hostile input", () => {
  const peers: PeerRecord[] = [
    { peerId: "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN", multiaddrs: ["/ip4/10.0.0.2/tcp/37516", "/ip6/fd00::2/tcp/37516"] },
    { peerId: "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo", multiaddrs: [] },
  ];
  assert.deepEqual(decodePeersResponse(encodePeersResponse(peers)), peers);
  assert.deepEqual(decodePeersResponse(encodePeersResponse([])), []);
  decodePeersRequest(encodePeersRequest());
  rejects(() => decodePeersRequest(bytes(0x30, 0)), /trailing/);
  rejects(() => decodePeersRequest(bytes(0x31)), /unknown message tag/);

  // The largest legal response fits the frame limit.
  const full = Array.from({ length: MAX_PEERS }, (_, i) => ({
    peerId: "P" + String(i).padStart(127, "0"),
    multiaddrs: Array.from({ length: MAX_ADDRS_PER_PEER }, (_, j) => "/dns4/" + String(j).padEnd(250, "a")),
  }));
  const enc = encodePeersResponse(full);
  assert.ok(enc.length <= MAX_FRAME_BYTES.peers, `${enc.length}`);
  assert.equal(decodePeersResponse(enc).length, MAX_PEERS);

  const one = (id: string, ...addrs: string[]) => encodePeersResponse([{ peerId: id, multiaddrs: addrs }]);
  rejects(() => encodePeersResponse([...full, peers[0]!]), /more than 256 peers/);
  rejects(() => one("x", ...new Array(17).fill("/ip4/1.2.3.4")), /more than 16 addresses/);
  rejects(() => one("x", "/" + "a".repeat(256)), /invalid multiaddr/);
  rejects(() => one("x", "ip4/1.2.3.4"), /invalid multiaddr/);
  rejects(() => one("x", "/ip4/1.2.3.4 /x"), /invalid multiaddr/);
  rejects(() => one("bad id"), /invalid peer ID/);
  rejects(() => one(""), /invalid peer ID/);
  rejects(() => one("P".repeat(129)), /invalid peer ID/);
  const str = (s: string) => new Writer().utf8("s", s, 1000).finish();
  rejects(() => decodePeersResponse(bytes(0x31, 0x81, 0x02)), /exceeds the limit 256/);
  rejects(() => decodePeersResponse(bytes(0x31, 1, str("abc"), 17)), /exceeds the limit 16/);
  rejects(() => decodePeersResponse(bytes(0x31, 1, str("abc"), 1, str("\x1b[31m"))), /invalid multiaddr/);
  rejects(() => decodePeersResponse(bytes(0x31, 1, str("a-b"), 0)), /invalid peer ID/);
  rejects(() => decodePeersResponse(bytes(0x31, 2, str("abc"), 0, str("abc"), 0)), /duplicate peer ID/);
  rejects(() => decodePeersResponse(bytes(0x31, 2, str("abc"), 0)), /truncated/);
  rejects(() => decodePeersResponse(bytes(0x31, 1, str("abc"), 0, 0)), /trailing/);
  rejects(() => decodePeersResponse(bytes(0x31, 1, 0x81, 0x01)), /exceeds the limit 128/);
});

test("fuzz: every decoder returns a value or throws PeerProtocolError, nothing else", () => {
  const decoders: [string, (b: Uint8Array) => unknown][] = [
    ["subscribe", decodeSummarySubscribe],
    ["summary", decodeSummaryMessage],
    ["narinfo request", decodeNarinfoRequest],
    ["narinfo response", decodeNarinfoResponse],
    ["NAR request", decodeNarRequest],
    ["NAR header", decodeNarResponseHeader],
    ["peers request", decodePeersRequest],
    ["peers response", decodePeersResponse],
  ];
  // Valid messages to mutate: random bytes alone rarely get past the tag.
  const seeds = [
    encodeSummarySubscribe({ epoch: 5n, generation: 9 }),
    ...snapshotChunks(3n, 4, sortedKeys(Array.from({ length: 40 }, hashPart)), 16).map(encodeSummaryMessage),
    encodeSummaryMessage({ type: "delta", fromGeneration: 1, toGeneration: 3, total: 9, added: sortedKeys([hashPart(), hashPart()]), removed: sortedKeys([hashPart()]) }),
    encodeNarinfoRequest(hashPart()),
    encodeNarinfoResponse({ type: "found", narinfo: "StorePath: /nix/store/x\nSig: k:é\n" }),
    encodeNarRequest({ hashPart: hashPart(), narHash: narHash(), offset: 77 }),
    encodeNarResponseHeader({ type: "error", code: 3, message: "busy" }),
    encodePeersResponse([{ peerId: "abc", multiaddrs: ["/ip4/1.2.3.4/tcp/1"] }, { peerId: "def", multiaddrs: [] }]),
  ];
  const mutate = (s: Uint8Array): Uint8Array => {
    const b = Uint8Array.from(s);
    switch (Math.floor(Math.random() * 4)) {
      case 0:
        return b.subarray(0, Math.floor(Math.random() * b.length));
      case 1:
        for (let i = 0; i < 1 + Math.floor(Math.random() * 3); i++) b[Math.floor(Math.random() * b.length)] = Math.floor(Math.random() * 256);
        return b;
      case 2:
        return bytes(...b, ...randomBytes(1 + Math.floor(Math.random() * 4)));
      default:
        if (b.length > 0) {
          const i = Math.floor(Math.random() * b.length);
          b[i] = b[i]! ^ (1 << Math.floor(Math.random() * 8));
        }
        return b;
    }
  };
  let accepted = 0;
  let refused = 0;
  for (let i = 0; i < 2000; i++) {
    const input =
      i % 2 === 0
        ? new Uint8Array(randomBytes(Math.floor(Math.random() * 64)))
        : mutate(seeds[i % seeds.length]!);
    if (i % 4 === 0 && input.length > 0) input[0] = [0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x20, 0x21, 0x22, 0x30, 0x31][i % 11]!;
    for (const [name, decode] of decoders) {
      try {
        decode(input);
        accepted++;
      } catch (e) {
        if (!isPPE(e)) assert.fail(`${name} threw ${(e as Error)?.name}: ${(e as Error)?.message} on ${Buffer.from(input).toString("hex")}`);
        refused++;
      }
    }
    const fd = new FrameDecoder(64);
    try {
      fd.push(input);
      while (fd.next());
    } catch (e) {
      if (!isPPE(e)) assert.fail(`FrameDecoder threw ${(e as Error)?.name} on ${Buffer.from(input).toString("hex")}`);
    }
  }
  assert.ok(accepted > 100 && refused > 1000, `accepted ${accepted}, refused ${refused}`);
});

test("sortedKeysInSteps: the keys of sortedKeys for the valid hash parts, in steps", () => {
  const alphabet = "0123456789abcdfghijklmnpqrsvwxyz";
  const valid = Array.from({ length: 5000 }, () => Array.from(randomBytes(32), (b) => alphabet[b & 31]).join(""));
  // Duplicates, and hash parts that are not (wrong length, letters nix32 lacks).
  const parts = [...valid, ...valid.slice(0, 700), "short", "e".repeat(32), "0".repeat(31) + "u", ...valid.slice(100, 150)];
  const steps = sortedKeysInSteps(parts, 1000);
  let yields = 0;
  let r = steps.next();
  while (!r.done) {
    yields++;
    r = steps.next();
  }
  assert.ok(yields >= 5, `yielded between slices: ${yields}`);
  assert.deepEqual(r.value, sortedKeys(valid));
  assert.equal(r.value.length, 5000);
  const empty = sortedKeysInSteps([]).next();
  assert.ok(!empty.done); // the step after the (empty) sort
});

test("sortedKeysInSteps: a large store in its default slices gives the one-step keys", () => {
  // 300,000 random hash parts, a tenth of them repeated and a few thousand invalid, in random
  // order: the keys must be those of the one-step build the publisher did before.
  const buf = randomBytes(32 * 300_000);
  for (let i = 0; i < buf.length; i++) buf[i] = NIX32_ALPHABET.charCodeAt(buf[i]! & 31);
  const parts = Array.from({ length: 300_000 }, (_, i) => buf.toString("latin1", 32 * i, 32 * i + 32));
  for (let i = 0; i < 30_000; i++) parts.push(parts[(i * 7919) % 300_000]!);
  for (let i = 0; i < 3_000; i++) parts.push(i % 3 === 0 ? "e".repeat(32) : i % 3 === 1 ? parts[i]!.slice(1) : parts[i]!.slice(0, 31) + "u");
  for (let i = parts.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [parts[i], parts[j]] = [parts[j]!, parts[i]!];
  }
  const steps = sortedKeysInSteps(parts);
  let yields = 0;
  let r = steps.next();
  while (!r.done) {
    yields++;
    r = steps.next();
  }
  assert.ok(yields >= 10, `yielded between slices: ${yields}`);
  const oneStep = sortedKeys(parts.filter(isValidHashPart));
  assert.equal(oneStep.length, 300_000);
  // Byte for byte (deepEqual's diff of 300,000 keys takes minutes to print when they differ).
  const bytes = (k: BigUint64Array) => Buffer.from(k.buffer, k.byteOffset, k.byteLength);
  assert.equal(r.value.length, oneStep.length);
  assert.ok(bytes(r.value).equals(bytes(oneStep)), "the same keys in the same order");
});
