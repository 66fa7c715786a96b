// Content routing summaries (/fleetcache/summary/1.0.0): which store paths a peer holds, as a
// sorted set of 64-bit keys (the first 8 bytes of each path's 20-byte hash), sent as a snapshot
// in chunks and then kept current with deltas. Keys are gap-encoded varints: ~7 bytes per path.
// A key match is a routing hint only; the narinfo request confirms (and 2^-64 collisions are moot).
import { NIX32_ALPHABET } from "./nix32.js";
import { isValidHashPart } from "./store-path.js";
import { PeerProtocolError, Reader, Writer } from "./peer-wire.js";

/** Where each key's high and low 32-bit halves sit in a Uint32Array view of a BigUint64Array. */
const HI = new Uint8Array(Uint32Array.of(1).buffer)[0] === 1 ? 1 : 0;
const LO = 1 - HI;

function halves(keys: BigUint64Array): Uint32Array {
  return new Uint32Array(keys.buffer, keys.byteOffset, keys.length * 2);
}

export const TAG_SUMMARY_SUBSCRIBE = 0x01;
export const TAG_SUMMARY_SNAPSHOT = 0x02;
export const TAG_SUMMARY_DELTA = 0x03;

/** Most keys in one snapshot chunk or one delta (added + removed). */
export const MAX_KEYS_PER_FRAME = 8192;
/** Most keys in one summary: 4 Mi paths (32 MiB held per peer at most). */
export const MAX_SUMMARY_KEYS = 1 << 22;
/** Largest summary frame payload: 8192 keys of <= 10 bytes plus a header under 64 bytes. */
export const MAX_SUMMARY_FRAME_BYTES = 96 * 1024;

/** Subscriber -> publisher, once per stream. epoch 0n: no state, send a snapshot. */
export interface SummarySubscribe {
  type: "subscribe";
  epoch: bigint;
  generation: number;
}

/** Publisher -> subscriber: keys [offset, offset + keys.length) of a snapshot of `total` keys. */
export interface SummarySnapshotChunk {
  type: "snapshot";
  /** Random, non-zero, chosen when the publisher starts; generations count within it. */
  epoch: bigint;
  generation: number;
  total: number;
  offset: number;
  /** Strictly ascending. */
  keys: BigUint64Array;
}

/** Publisher -> subscriber: the change from one generation to a later one. */
export interface SummaryDelta {
  type: "delta";
  fromGeneration: number;
  toGeneration: number;
  /** Number of keys in the set after applying: a cheap check that both sides agree. */
  total: number;
  added: BigUint64Array;
  removed: BigUint64Array;
}

export type SummaryMessage = SummarySnapshotChunk | SummaryDelta;

/** A whole snapshot, as SnapshotAssembler returns it. */
export interface SummarySnapshot {
  epoch: bigint;
  generation: number;
  keys: BigUint64Array;
}

const DIGIT = new Int8Array(128).fill(-1);
for (let i = 0; i < NIX32_ALPHABET.length; i++) DIGIT[NIX32_ALPHABET.charCodeAt(i)] = i;

/**
 * The summary key of a store path hash part: bytes 0..7 of decodeNix32(hashPart, 20), read
 * big-endian. Computed from the last 13 characters (nix32 writes the low bits last) without
 * decoding the rest: this runs for every lookup and every path of the store.
 */
export function summaryKey(hashPart: string): bigint {
  writeKey(hashPart, SCRATCH, 0, 1);
  return (BigInt(SCRATCH[0]!) << 32n) | BigInt(SCRATCH[1]!);
}
const SCRATCH = new Uint32Array(2);

/** summaryKey's high and low 32 bits, written to words[hiAt] and words[loAt] (no BigInt made). */
function writeKey(hashPart: string, words: Uint32Array, hiAt: number, loAt: number): void {
  if (!isValidHashPart(hashPart)) throw new PeerProtocolError(`invalid hash part ${JSON.stringify(String(hashPart).slice(0, 40))}`);
  // lo/hi: bits 0..31 and 32..63 of the decoded bytes as a little-endian bit string.
  let lo = 0;
  let hi = 0;
  for (let n = 0; n < 13; n++) {
    const d = DIGIT[hashPart.charCodeAt(31 - n)]!;
    const bit = 5 * n;
    if (bit < 32) lo |= d << bit; // int32 shifts drop what goes past bit 31...
    if (bit + 5 > 32) hi |= bit >= 32 ? d << (bit - 32) : d >>> (32 - bit); // ...and this keeps it
  }
  // Byte 0 is the most significant byte of the key: swap the byte order.
  words[hiAt] = bswap32(lo);
  words[loAt] = bswap32(hi);
}

function bswap32(x: number): number {
  return (((x & 0xff) << 24) | ((x & 0xff00) << 8) | ((x >>> 8) & 0xff00) | (x >>> 24)) >>> 0;
}

/**
 * Sorted, duplicate-free keys from keys or hash parts. Works on the keys' 32-bit words: reading
 * or making a BigInt per element cost about 1.4 of the 1.9 s a million-path store took, all
 * of it on the event loop (the summary publisher's start).
 */
export function sortedKeys(items: Iterable<bigint | string>): BigUint64Array {
  const list = Array.isArray(items) ? (items as (bigint | string)[]) : [...items];
  const out = new BigUint64Array(list.length);
  const w = halves(out);
  for (let i = 0; i < list.length; i++) {
    const x = list[i]!;
    if (typeof x === "string") writeKey(x, w, 2 * i + HI, 2 * i + LO);
    else out[i] = x;
  }
  return sortedUnique(out);
}

/**
 * sortedKeys of the valid hash parts among `hashParts` (others are skipped), in steps: it yields
 * after every `slice` hash parts and after the sort, so that a caller can let the event loop run
 * between steps (a million paths took 0.8-0.9 s in one step on a quiet machine, seconds on a
 * loaded one). Drive it to the end; its return value is the keys.
 */
export function* sortedKeysInSteps(hashParts: readonly string[], slice = 32_768): Generator<void, BigUint64Array> {
  const out = new BigUint64Array(hashParts.length);
  const w = halves(out);
  let n = 0;
  for (let i = 0; i < hashParts.length; i++) {
    const h = hashParts[i]!;
    if (isValidHashPart(h)) {
      writeKey(h, w, 2 * n + HI, 2 * n + LO);
      n++;
    }
    if (i % slice === slice - 1) yield;
  }
  const keys = out.subarray(0, n);
  keys.sort(); // one step: about 85 ms a million keys
  yield;
  return sortedUnique(keys, true);
}

/** Sorts `keys` in place (unless `sorted`) and returns a copy without duplicates. */
function sortedUnique(keys: BigUint64Array, sorted = false): BigUint64Array {
  if (!sorted) keys.sort();
  const w = halves(keys);
  let n = 0;
  for (let i = 0; i < keys.length; i++) {
    if (n > 0 && w[2 * i] === w[2 * n - 2] && w[2 * i + 1] === w[2 * n - 1]) continue;
    w[2 * n] = w[2 * i]!;
    w[2 * n + 1] = w[2 * i + 1]!;
    n++;
  }
  return keys.slice(0, n);
}

// Sorted keys as varints: the first as is, each next one as its (non-zero) gap from the previous.
function writeKeys(w: Writer, field: string, keys: BigUint64Array): void {
  let prev = 0n;
  for (let i = 0; i < keys.length; i++) {
    const k = keys[i]!;
    if (i > 0 && k <= prev) throw new PeerProtocolError(`${field}: keys not strictly ascending`);
    w.u64(field, i === 0 ? k : k - prev);
    prev = k;
  }
}

function readKeys(r: Reader, field: string, count: number): BigUint64Array {
  checkKeyCount(r, field, count);
  const keys = new BigUint64Array(count);
  readKeysInto(r, field, halves(keys), 0, 0, count);
  return keys;
}

/** Each key takes at least one byte: refuse counts the payload cannot hold before allocating. */
function checkKeyCount(r: Reader, field: string, count: number): void {
  if (count > r.remaining) r.fail(`${field}: ${count} keys cannot fit in ${r.remaining} bytes`);
}

/**
 * Decodes keys [from, to) of a run that starts at index `first` of `out` (a halves view): the
 * run's first key is written as is, each later one as its non-zero gap from the key before it,
 * which is read back from `out`, so a run can be decoded a slice at a time. In 32-bit halves, as
 * numbers: a BigInt per key made this the bulk of a summary's cost.
 */
function readKeysInto(r: Reader, field: string, out: Uint32Array, first: number, from: number, to: number): void {
  let hi = from > first ? out[2 * (from - 1) + HI]! : 0;
  let lo = from > first ? out[2 * (from - 1) + LO]! : 0;
  for (let i = from; i < to; i++) {
    const gapLo = r.u64Split(field);
    const gapHi = r.hi32;
    if (i === first) (hi = gapHi), (lo = gapLo);
    else {
      if (gapLo === 0 && gapHi === 0) r.fail(`${field}: duplicate key`);
      lo += gapLo;
      hi += gapHi;
      if (lo >= 2 ** 32) (lo -= 2 ** 32), hi++;
      if (hi >= 2 ** 32) r.fail(`${field}: keys overflow 64 bits`);
    }
    out[2 * i + HI] = hi;
    out[2 * i + LO] = lo;
  }
}

export function encodeSummarySubscribe(m: Omit<SummarySubscribe, "type">): Uint8Array {
  return new Writer(24).u8(TAG_SUMMARY_SUBSCRIBE).fixedU64("epoch", m.epoch).uint("generation", m.generation).finish();
}

export function decodeSummarySubscribe(payload: Uint8Array): SummarySubscribe {
  const r = new Reader(payload, "summary subscribe");
  const tag = r.u8();
  if (tag !== TAG_SUMMARY_SUBSCRIBE) r.fail(`unknown message tag 0x${tag.toString(16)}`);
  const epoch = r.fixedU64("epoch");
  const generation = r.uint("generation");
  r.end();
  return { type: "subscribe", epoch, generation };
}

export function encodeSummaryMessage(m: SummaryMessage): Uint8Array {
  const w = new Writer(64);
  if (m.type === "snapshot") {
    checkSnapshotChunk({ ...m, count: m.keys.length }, (reason) => {
      throw new PeerProtocolError(`summary snapshot: ${reason}`);
    });
    w.u8(TAG_SUMMARY_SNAPSHOT).fixedU64("epoch", m.epoch).uint("generation", m.generation);
    w.uint("total", m.total, MAX_SUMMARY_KEYS).uint("offset", m.offset).uint("count", m.keys.length, MAX_KEYS_PER_FRAME);
    writeKeys(w, "snapshot keys", m.keys);
  } else {
    if (m.added.length + m.removed.length > MAX_KEYS_PER_FRAME) throw new PeerProtocolError(`summary delta: more than ${MAX_KEYS_PER_FRAME} keys`);
    if (!(m.toGeneration > m.fromGeneration)) throw new PeerProtocolError("summary delta: toGeneration must exceed fromGeneration");
    w.u8(TAG_SUMMARY_DELTA).uint("fromGeneration", m.fromGeneration).uint("toGeneration", m.toGeneration);
    w.uint("total", m.total, MAX_SUMMARY_KEYS);
    w.uint("added count", m.added.length);
    writeKeys(w, "added keys", m.added);
    w.uint("removed count", m.removed.length);
    writeKeys(w, "removed keys", m.removed);
    if (intersects(m.added, m.removed)) throw new PeerProtocolError("summary delta: a key is both added and removed");
  }
  return w.finish();
}

export function decodeSummaryMessage(payload: Uint8Array): SummaryMessage {
  const r = new Reader(payload, "summary");
  const tag = r.u8();
  if (tag === TAG_SUMMARY_SNAPSHOT) {
    const h = readSnapshotHeader(r);
    const keys = readKeys(r, "snapshot keys", h.count);
    r.end();
    return { type: "snapshot", epoch: h.epoch, generation: h.generation, total: h.total, offset: h.offset, keys };
  }
  if (tag === TAG_SUMMARY_DELTA) return readDelta(r);
  return r.fail(`unknown message tag 0x${tag.toString(16)}`);
}

/**
 * A delta frame's payload; anything else (a snapshot chunk too) is refused. With `scratch` (room
 * for MAX_KEYS_PER_FRAME keys) its keys are views of it, not fresh arrays: valid until the next
 * delta is decoded there.
 */
export function decodeSummaryDelta(payload: Uint8Array, scratch?: BigUint64Array): SummaryDelta {
  const r = new Reader(payload, "summary");
  const tag = r.u8();
  if (tag !== TAG_SUMMARY_DELTA) r.fail(`expected a delta, got tag 0x${tag.toString(16)}`);
  return readDelta(r, scratch && scratch.length >= MAX_KEYS_PER_FRAME ? scratch : undefined);
}

function readDelta(r: Reader, scratch?: BigUint64Array): SummaryDelta {
  const fromGeneration = r.uint("fromGeneration");
  const toGeneration = r.uint("toGeneration");
  if (toGeneration <= fromGeneration) r.fail("toGeneration must exceed fromGeneration");
  const total = r.uint("total", MAX_SUMMARY_KEYS);
  const keysAt = (field: string, count: number, at: number): BigUint64Array => {
    if (!scratch) return readKeys(r, field, count);
    checkKeyCount(r, field, count);
    const keys = scratch.subarray(at, at + count);
    readKeysInto(r, field, halves(keys), 0, 0, count);
    return keys;
  };
  const addedCount = r.uint("added count", MAX_KEYS_PER_FRAME);
  const added = keysAt("added keys", addedCount, 0);
  const removedCount = r.uint("removed count", MAX_KEYS_PER_FRAME - addedCount);
  const removed = keysAt("removed keys", removedCount, addedCount);
  r.end();
  if (intersects(added, removed)) r.fail("a key is both added and removed");
  return { type: "delta", fromGeneration, toGeneration, total, added, removed };
}

/** A snapshot chunk without its keys. */
interface SnapshotHeader {
  epoch: bigint;
  generation: number;
  total: number;
  offset: number;
  /** Keys in the chunk. */
  count: number;
}

/** A snapshot chunk's fields after the tag, checked, up to its keys (count checked against the bytes left). */
function readSnapshotHeader(r: Reader): SnapshotHeader {
  const epoch = r.fixedU64("epoch");
  const generation = r.uint("generation");
  const total = r.uint("total", MAX_SUMMARY_KEYS);
  const offset = r.uint("offset", MAX_SUMMARY_KEYS);
  const count = r.uint("count", MAX_KEYS_PER_FRAME);
  checkKeyCount(r, "snapshot keys", count);
  const h = { epoch, generation, total, offset, count };
  checkSnapshotChunk(h, (reason) => r.fail(reason));
  return h;
}

function checkSnapshotChunk(m: SnapshotHeader, fail: (reason: string) => never): void {
  if (m.epoch === 0n) fail("epoch 0 is reserved");
  if (m.offset + m.count > m.total) fail(`keys ${m.offset}..${m.offset + m.count} exceed the total ${m.total}`);
  // Only an empty snapshot may have an empty chunk: every other chunk makes progress.
  if (m.count === 0 && m.total !== 0) fail("empty chunk in a non-empty snapshot");
}

// Both sorted: a linear merge.
function intersects(a: BigUint64Array, b: BigUint64Array): boolean {
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    const x = a[i]!;
    const y = b[j]!;
    if (x === y) return true;
    if (x < y) i++;
    else j++;
  }
  return false;
}

/** Publisher side: a snapshot as chunks of at most `perChunk` keys (one chunk if empty). */
export function snapshotChunks(epoch: bigint, generation: number, keys: BigUint64Array, perChunk = MAX_KEYS_PER_FRAME): SummarySnapshotChunk[] {
  if (keys.length > MAX_SUMMARY_KEYS) throw new PeerProtocolError(`summary of ${keys.length} keys exceeds the limit ${MAX_SUMMARY_KEYS}`);
  const n = Math.min(Math.max(1, perChunk), MAX_KEYS_PER_FRAME);
  const out: SummarySnapshotChunk[] = [];
  let offset = 0;
  do {
    out.push({ type: "snapshot", epoch, generation, total: keys.length, offset, keys: keys.subarray(offset, offset + n) });
    offset += n;
  } while (offset < keys.length);
  return out;
}

/** Publisher side: what changed between two sorted key sets. */
export function diffSummaryKeys(before: BigUint64Array, after: BigUint64Array): { added: BigUint64Array; removed: BigUint64Array } {
  const added: bigint[] = [];
  const removed: bigint[] = [];
  let i = 0;
  let j = 0;
  while (i < before.length || j < after.length) {
    const x = before[i];
    const y = after[j];
    if (x !== undefined && y !== undefined && x === y) (i++, j++);
    else if (y === undefined || (x !== undefined && x < y)) (removed.push(x!), i++);
    else (added.push(y), j++);
  }
  return { added: BigUint64Array.from(added), removed: BigUint64Array.from(removed) };
}

/**
 * Publisher side: an exact diff (added keys absent before, removed keys present) as deltas of at
 * most `perFrame` keys each, with consecutive generations from `fromGeneration`.
 */
export function splitSummaryDelta(
  fromGeneration: number,
  totalBefore: number,
  added: BigUint64Array,
  removed: BigUint64Array,
  perFrame = MAX_KEYS_PER_FRAME,
): SummaryDelta[] {
  const n = Math.min(Math.max(1, perFrame), MAX_KEYS_PER_FRAME);
  const out: SummaryDelta[] = [];
  let a = 0;
  let r = 0;
  let gen = fromGeneration;
  let total = totalBefore;
  // Removals first: a store that shrinks and grows never overshoots the key limit midway.
  while (a < added.length || r < removed.length || out.length === 0) {
    const rem = removed.subarray(r, r + n);
    const add = added.subarray(a, a + (n - rem.length));
    r += rem.length;
    a += add.length;
    total += add.length - rem.length;
    out.push({ type: "delta", fromGeneration: gen, toGeneration: gen + 1, total, added: add, removed: rem });
    gen++;
  }
  return out;
}

/** One snapshot frame being decoded by SnapshotAssembler.frame(). */
export interface SnapshotFrame {
  /** Keys in the frame, from its header: known before any is decoded (what a budget charges). */
  readonly keys: number;
  /**
   * Decodes the keys straight into the snapshot, a slice per step (the caller may yield to the
   * event loop in between); returns the whole snapshot after its last frame. Run it to the end
   * (or until it throws) before the next frame.
   */
  readonly steps: Generator<void, SummarySnapshot | undefined, void>;
}

/** Keys decoded per step of SnapshotFrame.steps: about 0.1 ms of work on this project's machine. */
export const SNAPSHOT_DECODE_SLICE = 2048;

/**
 * Subscriber side: collects a snapshot's chunks, which must arrive in order and agree on epoch,
 * generation and total, into one buffer of the snapshot's size. frame() decodes a frame's keys
 * straight into that buffer (no array per frame: while a peer floods, every allocation outside
 * the V8 heap brings the next full garbage collection closer); push() takes a decoded chunk.
 * Either returns the snapshot when its last chunk arrives. A protocol error abandons the
 * snapshot; the next one starts afresh.
 */
export class SnapshotAssembler {
  private head: { epoch: bigint; generation: number; total: number } | undefined;
  /** The whole snapshot, filled chunk by chunk (no copy of everything at the end). */
  private keys: BigUint64Array = new BigUint64Array(0);
  private k32: Uint32Array = new Uint32Array(0);
  private received = 0;
  /** A frame's keys are being decoded (its steps not yet finished). */
  private busy = false;
  /** A buffer handed back by recycle(), for the next snapshot. */
  private spare: BigUint64Array | undefined;

  constructor(private readonly maxKeys = MAX_SUMMARY_KEYS) {}

  /** True between a snapshot's first and last chunk. */
  get pending(): boolean {
    return this.head !== undefined;
  }

  /**
   * A snapshot frame's payload (tag 0x02): its header is checked here, against the frame and
   * against the chunks before it; its keys are decoded by the returned steps. Throws
   * PeerProtocolError for anything a peer may not send (as decodeSummaryMessage and push() do).
   */
  frame(payload: Uint8Array, slice = SNAPSHOT_DECODE_SLICE): SnapshotFrame {
    if (this.busy) throw new Error("SnapshotAssembler: the previous frame's keys were not all decoded");
    const r = new Reader(payload, "summary");
    try {
      const tag = r.u8();
      if (tag !== TAG_SUMMARY_SNAPSHOT) r.fail(`expected a snapshot chunk, got tag 0x${tag.toString(16)}`);
      const h = readSnapshotHeader(r);
      this.accept(h);
      this.busy = true;
      return { keys: h.count, steps: this.decode(r, h.count, Math.max(1, slice)) };
    } catch (err) {
      this.reset();
      throw err;
    }
  }

  private *decode(r: Reader, count: number, slice: number): Generator<void, SummarySnapshot | undefined, void> {
    const at = this.received;
    try {
      for (let i = at; i < at + count; ) {
        const end = Math.min(at + count, i + slice);
        readKeysInto(r, "snapshot keys", this.k32, at, i, end);
        if (i === at && at > 0 && cmp(this.k32, at, this.k32, at - 1) <= 0) this.fail("keys not ascending across chunks");
        i = end;
        if (i < at + count) yield;
      }
      r.end();
    } catch (err) {
      this.reset();
      throw err;
    }
    this.busy = false;
    this.received += count;
    return this.finishIfComplete();
  }

  push(c: SummarySnapshotChunk): SummarySnapshot | undefined {
    if (this.busy) throw new Error("SnapshotAssembler: the previous frame's keys were not all decoded");
    try {
      const h = { ...c, count: c.keys.length };
      checkSnapshotChunk(h, (reason) => this.fail(reason));
      this.accept(h);
      const at = this.received;
      this.keys.set(c.keys, at);
      if (c.keys.length > 0 && at > 0 && cmp(this.k32, at, this.k32, at - 1) <= 0) this.fail("keys not ascending across chunks");
    } catch (err) {
      this.reset();
      throw err;
    }
    this.received += c.keys.length;
    return this.finishIfComplete();
  }

  /**
   * Takes back the keys of a summary this assembler's snapshot replaced, to assemble a later
   * snapshot of up to their size in (a peer sending snapshots back to back then costs no fresh
   * 32 MiB each). The caller promises that nothing reads them any more.
   */
  recycle(keys: BigUint64Array): void {
    if (keys.byteOffset !== 0 || keys.buffer === this.keys.buffer) return;
    this.spare = new BigUint64Array(keys.buffer, 0, keys.buffer.byteLength / 8);
  }

  /** Lets go of a recycled buffer not needed after all. */
  dropSpare(): void {
    this.spare = undefined;
  }

  /** Checks a chunk's place in the snapshot (starting one with its first chunk). */
  private accept(c: SnapshotHeader): void {
    if (!this.head) {
      if (c.offset !== 0) this.fail(`first chunk starts at offset ${c.offset}`);
      if (c.total > this.maxKeys) this.fail(`${c.total} keys exceed the limit ${this.maxKeys}`);
      this.head = { epoch: c.epoch, generation: c.generation, total: c.total };
      this.setKeys(this.buffer(c.total));
      this.received = 0;
    } else if (c.epoch !== this.head.epoch || c.generation !== this.head.generation || c.total !== this.head.total) {
      this.fail("chunk of a different snapshot before the previous one ended");
    }
    if (c.offset !== this.received) this.fail(`chunk at offset ${c.offset}, expected ${this.received}`);
  }

  /** Room for n keys: the spare if it fits without wasting more than half of it, else fresh. */
  private buffer(n: number): BigUint64Array {
    const spare = this.spare;
    this.spare = undefined;
    if (spare && spare.length >= n && spare.length <= 2 * n) return spare.subarray(0, n);
    return new BigUint64Array(n);
  }

  private finishIfComplete(): SummarySnapshot | undefined {
    const head = this.head!;
    if (this.received < head.total) return undefined;
    const snap = { epoch: head.epoch, generation: head.generation, keys: this.keys };
    this.head = undefined;
    this.setKeys(new BigUint64Array(0));
    return snap;
  }

  private setKeys(keys: BigUint64Array): void {
    this.keys = keys;
    this.k32 = halves(keys);
  }

  private reset(): void {
    this.head = undefined;
    this.busy = false;
    this.received = 0;
    this.setKeys(new BigUint64Array(0));
  }

  private fail(reason: string): never {
    throw new PeerProtocolError(`summary snapshot: ${reason}`);
  }
}

/** -1, 0 or 1 as key i of `a` is below, equal to or above key j of `b` (both halves views). */
function cmp(a: Uint32Array, i: number, b: Uint32Array, j: number): number {
  const x = a[2 * i + HI]!;
  const y = b[2 * j + HI]!;
  if (x !== y) return x < y ? -1 : 1;
  const u = a[2 * i + LO]!;
  const v = b[2 * j + LO]!;
  return u === v ? 0 : u < v ? -1 : 1;
}

/**
 * Subscriber side: one peer's announced paths. A sorted array (8 bytes per key) plus small
 * added/removed overlays that are merged in once they grow, so a delta costs O(its size) and a
 * lookup is a binary search: memory matters with many peers of large stores. The searches and
 * merges compare 32-bit halves as numbers (a BigInt per comparison made a delta of 8,192 keys on a
 * 4M-key summary cost 40 ms, and a merge 340 ms); a large summary is merged in slices
 * (compactionSteps) so a peer's deltas never hold the event loop for long.
 */
export class PathSummary {
  private base: BigUint64Array = new BigUint64Array(0);
  private base32: Uint32Array = new Uint32Array(0);
  private added = new Set<bigint>();
  private removed = new Set<bigint>(); // always a subset of base
  private _epoch: bigint | undefined;
  private _generation: number | undefined;
  /** Bumped by every change, so a merge in progress knows it is out of date. */
  private version = 0;

  /** Summaries up to this size merge their overlays at once; larger ones wait for compactionSteps. */
  static readonly INLINE_COMPACTION_KEYS = 1 << 16;

  get epoch(): bigint | undefined {
    return this._epoch;
  }

  /** Undefined until a snapshot has been applied. */
  get generation(): number | undefined {
    return this._generation;
  }

  get size(): number {
    return this.base.length + this.added.size - this.removed.size;
  }

  /**
   * Replaces everything. The keys must be sorted and unique: checked, unless `sorted` says the
   * caller knows (SnapshotAssembler checks every chunk as it arrives). Returns the keys it held
   * before, which it no longer reads (SnapshotAssembler.recycle can reuse them).
   */
  applySnapshot(s: SummarySnapshot, sorted = false): BigUint64Array {
    const k32 = halves(s.keys);
    for (let i = 1; !sorted && i < s.keys.length; i++) {
      if (cmp(k32, i, k32, i - 1) <= 0) throw new PeerProtocolError("summary snapshot: keys not strictly ascending");
    }
    const before = this.base;
    this.setBase(s.keys);
    this.added.clear();
    this.removed.clear();
    this._epoch = s.epoch;
    this._generation = s.generation;
    return before;
  }

  /**
   * Applies a delta that starts at the current generation. Returns false, changing nothing, on a
   * gap (no snapshot yet, or another starting generation) or when the result would not have the
   * delta's total: either way the subscriber needs a fresh snapshot.
   */
  applyDelta(d: SummaryDelta): boolean {
    const steps = this.applyDeltaSteps(d, Infinity);
    for (;;) {
      const r = steps.next();
      if (r.done) return r.value;
    }
  }

  /**
   * applyDelta a slice of `slice` keys per step, so the caller can yield to the event loop in
   * between (a delta of 8,192 keys costs milliseconds). While it runs, lookups see the old set,
   * then part of the change: a routing hint either way. Stopped half-way (the stream failed), it
   * leaves the generation as it was, and applying the same delta again gives the same set (adding
   * a present key or removing an absent one changes nothing).
   */
  *applyDeltaSteps(d: SummaryDelta, slice = 1024): Generator<void, boolean, void> {
    if (this._generation === undefined || d.fromGeneration !== this._generation) return false;
    const generation = this._generation;
    const version = this.version;
    let size = this.size;
    let n = 0;
    const check = () => {
      if (this.version !== version || this._generation !== generation) throw new PeerProtocolError("summary changed while a delta was applied");
    };
    // Base lookups on the keys' 32-bit halves; a BigInt only for the overlays (a BigInt per key
    // and lookup made a delta flood's garbage).
    const add32 = halves(d.added);
    const rem32 = halves(d.removed);
    const present = (keys: BigUint64Array, k32: Uint32Array, i: number): boolean => {
      const inBase = this.inBase32(k32[2 * i + HI]!, k32[2 * i + LO]!);
      if (this.added.size === 0 && this.removed.size === 0) return inBase;
      const k = keys[i]!;
      return this.added.has(k) || (inBase && !this.removed.has(k));
    };
    for (let i = 0; i < d.added.length; i++) {
      if (!present(d.added, add32, i)) size++;
      if (++n % slice === 0) (yield, check());
    }
    for (let i = 0; i < d.removed.length; i++) {
      if (present(d.removed, rem32, i)) size--;
      if (++n % slice === 0) (yield, check());
    }
    if (size !== d.total) return false;
    // The overlays never hold a base key in `added` (nor anything but base keys in `removed`).
    for (let i = 0; i < d.added.length; i++) {
      if (!this.inBase32(add32[2 * i + HI]!, add32[2 * i + LO]!)) this.added.add(d.added[i]!);
      else if (this.removed.size > 0) this.removed.delete(d.added[i]!);
      if (++n % slice === 0) (yield, check());
    }
    for (let i = 0; i < d.removed.length; i++) {
      if (this.inBase32(rem32[2 * i + HI]!, rem32[2 * i + LO]!)) this.removed.add(d.removed[i]!);
      else if (this.added.size > 0) this.added.delete(d.removed[i]!);
      if (++n % slice === 0) (yield, check());
    }
    this._generation = d.toGeneration;
    this.version++;
    if (this.compactionDue && this.base.length <= PathSummary.INLINE_COMPACTION_KEYS) this.compact();
    return true;
  }

  /** The overlays have grown enough to be worth merging into the base. */
  get compactionDue(): boolean {
    return this.added.size + this.removed.size > Math.max(1024, this.base.length >> 3);
  }

  /** Whether the peer announced the path with this hash part (false for invalid input). */
  has(hashPart: string): boolean {
    return isValidHashPart(hashPart) && this.hasKey(summaryKey(hashPart));
  }

  hasKey(k: bigint): boolean {
    if (this.added.has(k)) return true;
    return !this.removed.has(k) && this.inBase(k);
  }

  /** All keys, sorted: the summary's own array, to read before the next snapshot (which may reuse it). */
  keys(): BigUint64Array {
    this.compact();
    return this.base;
  }

  /** Forgets everything (e.g. when the peer disconnects). */
  clear(): void {
    this.applySnapshot({ epoch: 0n, generation: 0, keys: new BigUint64Array(0) });
    this._epoch = undefined;
    this._generation = undefined;
  }

  /**
   * Merges the overlays into the base, `slice` base keys per step; the caller may yield to the
   * event loop between steps. Lookups see the unmerged (equal) state until the last step swaps
   * the merged base in. If the summary changes between steps the merge is abandoned: nothing is
   * lost, the overlays are still there.
   */
  *compactionSteps(slice = 1 << 15): Generator<void, void, void> {
    if (this.added.size === 0 && this.removed.size === 0) return;
    const version = this.version;
    const base = this.base32;
    const n = this.base.length;
    const add = halves(BigUint64Array.from(this.added).sort());
    const rem = halves(BigUint64Array.from(this.removed).sort());
    const addN = add.length / 2;
    const remN = rem.length / 2;
    const outKeys = new BigUint64Array(this.size);
    const out = halves(outKeys);
    let o = 0;
    let a = 0;
    let r = 0;
    const put = (src: Uint32Array, i: number) => {
      out[2 * o + HI] = src[2 * i + HI]!;
      out[2 * o + LO] = src[2 * i + LO]!;
      o++;
    };
    for (let i = 0; i < n; ) {
      const end = Math.min(n, i + Math.max(1, slice));
      for (; i < end; i++) {
        while (r < remN && cmp(rem, r, base, i) < 0) r++;
        if (r < remN && cmp(rem, r, base, i) === 0) {
          r++;
          continue;
        }
        while (a < addN && cmp(add, a, base, i) < 0) put(add, a++);
        put(base, i);
      }
      if (i < n) {
        yield;
        if (this.version !== version) return;
      }
    }
    while (a < addN) put(add, a++);
    this.setBase(outKeys);
    this.added.clear();
    this.removed.clear();
  }

  private setBase(keys: BigUint64Array): void {
    this.base = keys;
    this.base32 = halves(keys);
    this.version++;
  }

  private inBase(k: bigint): boolean {
    return this.inBase32(Number(k >> 32n), Number(k & 0xffffffffn));
  }

  private inBase32(hi: number, lo: number): boolean {
    const b = this.base32;
    let l = 0;
    let h = this.base.length - 1;
    while (l <= h) {
      const mid = (l + h) >>> 1;
      const x = b[2 * mid + HI]!;
      if (x === hi) {
        const y = b[2 * mid + LO]!;
        if (y === lo) return true;
        if (y < lo) l = mid + 1;
        else h = mid - 1;
      } else if (x < hi) l = mid + 1;
      else h = mid - 1;
    }
    return false;
  }

  private compact(): void {
    for (const _ of this.compactionSteps(Infinity)) {
      // one step: Infinity never yields
    }
  }
}
