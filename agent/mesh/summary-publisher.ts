// Publisher side of /fleetcache/summary/1.0.0 (protocol/PEER-PROTOCOL.md, "content routing"): tells
// each subscribed peer which paths this host holds, as a snapshot and then one delta per store
// change, for as long as the stream lives.
//
// Every subscription reads from one shared state (an immutable sorted key array, the generation,
// and the last few deltas) and sends whatever it is behind by: the deltas if they are still kept,
// a fresh snapshot otherwise. So a slow subscriber costs no queue of its own, only its place in the
// history; one that takes nothing at all for 60 s is reset.
import { randomBytes } from "node:crypto";
import { setImmediate } from "node:timers/promises";
import type { Stream } from "@libp2p/interface";
import type { Logger } from "pino";
import {
  MAX_FRAME_BYTES,
  MAX_SUMMARY_KEYS,
  PROTOCOL_SUMMARY,
  PeerProtocolError,
  decodeSummarySubscribe,
  encodeSummaryMessage,
  snapshotChunks,
  sortedKeys,
  sortedKeysInSteps,
  splitSummaryDelta,
  summaryKey,
  type SummaryDelta,
  type SummaryMessage,
} from "../../protocol/peer-codec.js";
import { isValidHashPart } from "../../protocol/store-path.js";
import type { StoreChange } from "../store/watch.js";
import type { MeshNode, MeshRequest } from "./node.js";
import { writeFrame } from "./stream-io.js";

/** What the publisher needs of a StoreWatcher (tests may substitute a synthetic store). */
export interface StoreChanges {
  hashParts(): Iterable<string>;
  on(event: "change", listener: (change: StoreChange) => void): unknown;
  off(event: "change", listener: (change: StoreChange) => void): unknown;
}

export interface SummaryPublisherOptions {
  /** The Subscribe frame must arrive within this long of the stream opening (spec: 10 s). */
  subscribeTimeoutMs?: number;
  /** A subscriber whose stream takes no frame for this long is reset (spec: 60 s). */
  stallTimeoutMs?: number;
  /** Keys kept in the delta history, for lagging subscribers and resumes. */
  historyKeys?: number;
}

interface Subscription {
  ctl: AbortController;
}

const HISTORY_MAX_DELTAS = 1024;

export class SummaryPublisher {
  /** Random and non-zero: a restarted agent is a new epoch, so nobody resumes across it. */
  readonly epoch: bigint;
  #keys: BigUint64Array = new BigUint64Array(0);
  #generation = 0;
  /** Consecutive deltas ending at #generation. */
  #history: SummaryDelta[] = [];
  #historyKeys = 0;
  #subs = new Map<string, Subscription>();
  #waiters = new Set<() => void>();
  #started = false;
  /** This start's token: a stop() and a new start() during a start's build end the first one. */
  #run: object | undefined;
  #truncatedWarned = false;
  readonly #subscribeTimeoutMs: number;
  readonly #stallTimeoutMs: number;
  readonly #maxHistoryKeys: number;

  constructor(
    private readonly node: MeshNode,
    private readonly watcher: StoreChanges,
    private readonly log: Logger,
    opts: SummaryPublisherOptions = {},
  ) {
    let epoch = 0n;
    while (epoch === 0n) epoch = randomBytes(8).readBigUInt64BE();
    this.epoch = epoch;
    this.#subscribeTimeoutMs = opts.subscribeTimeoutMs ?? 10_000;
    this.#stallTimeoutMs = opts.stallTimeoutMs ?? 60_000;
    this.#maxHistoryKeys = opts.historyKeys ?? 65_536;
  }

  /** Current generation (increases with every delta sent). */
  get generation(): number {
    return this.#generation;
  }

  /** Number of keys currently published. */
  get size(): number {
    return this.#keys.length;
  }

  /** Peer IDs with a live subscription. */
  subscribers(): string[] {
    return [...this.#subs.keys()];
  }

  async start(): Promise<void> {
    if (this.#started) return;
    this.#started = true;
    const run = (this.#run = {});
    // The store's paths now, and every change from now on. The keys are built in steps with the
    // event loop running between them (a million paths held it 0.8-0.9 s in one step, seconds on
    // a loaded host: HTTP requests, pings and peers' handshakes waited); changes that come
    // meanwhile are applied once the keys are there.
    const parts = [...this.watcher.hashParts()];
    const early: StoreChange[] = [];
    const hold = (change: StoreChange) => early.push(change);
    this.watcher.on("change", hold);
    try {
      const steps = sortedKeysInSteps(parts);
      let step = steps.next();
      while (!step.done) {
        await setImmediate();
        if (this.#run !== run) return; // stopped (and perhaps started again) meanwhile
        step = steps.next();
      }
      this.#keys = this.#capped(step.value);
    } finally {
      this.watcher.off("change", hold);
    }
    this.watcher.on("change", this.#onChange);
    for (const change of early) this.#onChange(change);
    // A replacement subscription may arrive while the old stream is still being reset.
    await this.node.handle(PROTOCOL_SUMMARY, (req) => this.#serve(req), { maxInboundStreams: 4 });
    this.log.debug({ keys: this.#keys.length, epoch: this.epoch.toString(16) }, "summary: publishing");
  }

  stop(): void {
    if (!this.#started) return;
    this.#started = false;
    this.#run = undefined;
    this.watcher.off("change", this.#onChange);
    this.node.libp2p.unhandle(PROTOCOL_SUMMARY).catch((err: unknown) => this.log.debug({ err }, "summary: unhandle failed"));
    for (const sub of this.#subs.values()) sub.ctl.abort(new Error("summary publisher stopped"));
    this.#subs.clear();
  }

  readonly #onChange = (change: StoreChange): void => {
    // Net effect per path: one deleted and re-added between two polls is in both lists.
    const net = new Map<string, number>();
    for (const h of change.added) net.set(h, (net.get(h) ?? 0) + 1);
    for (const h of change.removed) net.set(h, (net.get(h) ?? 0) - 1);
    const add: bigint[] = [];
    const rem: bigint[] = [];
    for (const [h, n] of net) {
      if (!isValidHashPart(h)) continue;
      if (n > 0) add.push(summaryKey(h));
      else if (n < 0) rem.push(summaryKey(h));
    }
    // splitSummaryDelta wants an exact diff. (Two paths sharing a 64-bit key, odds ~n²/2^65,
    // would lose the key when either goes: a missed routing hint, nothing worse.)
    const removed = sortedKeys(rem).filter((k) => hasKey(this.#keys, k));
    let added: BigUint64Array = sortedKeys(add).filter((k) => !hasKey(this.#keys, k));
    const room = MAX_SUMMARY_KEYS - (this.#keys.length - removed.length);
    if (added.length > room) {
      this.#warnTruncated();
      added = added.subarray(0, Math.max(0, room));
    }
    if (added.length === 0 && removed.length === 0) return;
    const deltas = splitSummaryDelta(this.#generation, this.#keys.length, added, removed);
    this.#keys = mergeKeys(this.#keys, added, removed);
    this.#generation = deltas[deltas.length - 1]!.toGeneration;
    for (const d of deltas) {
      this.#history.push(d);
      this.#historyKeys += d.added.length + d.removed.length;
    }
    while (this.#history.length > 0 && (this.#historyKeys > this.#maxHistoryKeys || this.#history.length > HISTORY_MAX_DELTAS)) {
      const d = this.#history.shift()!;
      this.#historyKeys -= d.added.length + d.removed.length;
    }
    for (const wake of [...this.#waiters]) wake();
  };

  /** The deltas from `generation` to now ([] if current), or undefined if no longer kept. */
  #deltasSince(generation: number): SummaryDelta[] | undefined {
    if (generation === this.#generation) return [];
    const first = this.#history[0];
    if (!first || generation < first.fromGeneration || generation > this.#generation) return undefined;
    const i = this.#history.findIndex((d) => d.fromGeneration === generation);
    return i < 0 ? undefined : this.#history.slice(i);
  }

  async #serve({ stream, reader, peerId }: MeshRequest): Promise<void> {
    const first = await deadline(
      reader.readFrame(MAX_FRAME_BYTES.summary),
      this.#subscribeTimeoutMs,
      () => new PeerProtocolError("no Subscribe within the deadline"),
    );
    if (first === undefined) return; // closed without subscribing
    const subscribe = decodeSummarySubscribe(first);
    if (!this.#started) throw new Error("summary publisher stopped");

    // One summary stream per peer: the newest wins and the old one is reset.
    const sub: Subscription = { ctl: new AbortController() };
    const { signal } = sub.ctl;
    this.#subs.get(peerId)?.ctl.abort(new Error("replaced by a newer subscription"));
    this.#subs.set(peerId, sub);
    stream.addEventListener("close", () => sub.ctl.abort(new Error("stream closed")), { once: true });
    // From now on only we write: a frame from the subscriber is out of turn. Its clean half-close
    // is fine; a reset or a lost connection ends the subscription.
    reader.readFrame(MAX_FRAME_BYTES.summary).then(
      (frame) => frame !== undefined && sub.ctl.abort(new PeerProtocolError("subscriber sent a frame after Subscribe")),
      (err: unknown) => sub.ctl.abort(err),
    );

    try {
      // Resume only within our epoch and while the history still has the deltas.
      let sent = subscribe.epoch === this.epoch && this.#deltasSince(subscribe.generation) ? subscribe.generation : undefined;
      for (;;) {
        signal.throwIfAborted();
        const deltas = sent === undefined ? undefined : this.#deltasSince(sent);
        if (deltas === undefined) {
          // Consistent even if the store changes meanwhile: #keys is replaced, never mutated.
          const keys = this.#keys;
          const generation = this.#generation;
          for (const chunk of snapshotChunks(this.epoch, generation, keys)) await this.#write(stream, chunk, sub);
          sent = generation;
        } else if (deltas.length === 0) {
          await this.#nextChange(signal);
        } else {
          for (const d of deltas) {
            await this.#write(stream, d, sub);
            sent = d.toGeneration;
          }
        }
      }
    } finally {
      if (this.#subs.get(peerId) === sub) this.#subs.delete(peerId);
    }
  }

  /** One frame, with backpressure; a subscriber that takes nothing for the stall timeout is reset. */
  async #write(stream: Stream, msg: SummaryMessage, sub: Subscription): Promise<void> {
    const payload = encodeSummaryMessage(msg);
    const timer = setTimeout(() => sub.ctl.abort(new Error("summary subscriber stalled")), this.#stallTimeoutMs);
    try {
      await writeFrame(stream, payload, { signal: sub.ctl.signal });
    } finally {
      clearTimeout(timer);
    }
  }

  #nextChange(signal: AbortSignal): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      const done = () => {
        this.#waiters.delete(done);
        signal.removeEventListener("abort", onAbort);
        resolve();
      };
      const onAbort = () => {
        this.#waiters.delete(done);
        reject(signal.reason);
      };
      this.#waiters.add(done);
      signal.addEventListener("abort", onAbort, { once: true });
    });
  }

  #capped(keys: BigUint64Array): BigUint64Array {
    if (keys.length <= MAX_SUMMARY_KEYS) return keys;
    this.#warnTruncated();
    return keys.slice(0, MAX_SUMMARY_KEYS);
  }

  #warnTruncated(): void {
    if (this.#truncatedWarned) return;
    this.#truncatedWarned = true;
    this.log.warn({ limit: MAX_SUMMARY_KEYS }, "summary: store has more paths than a summary may hold; announcing only some");
  }
}

function hasKey(keys: BigUint64Array, k: bigint): boolean {
  let lo = 0;
  let hi = keys.length - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const v = keys[mid]!;
    if (v === k) return true;
    if (v < k) lo = mid + 1;
    else hi = mid - 1;
  }
  return false;
}

/** base − removed + added, all sorted; removed ⊆ base, added disjoint from base. */
function mergeKeys(base: BigUint64Array, added: BigUint64Array, removed: BigUint64Array): BigUint64Array {
  const out = new BigUint64Array(base.length + added.length - removed.length);
  let n = 0;
  let a = 0;
  let r = 0;
  for (let i = 0; i < base.length; i++) {
    const k = base[i]!;
    if (r < removed.length && removed[r] === k) {
      r++;
      continue;
    }
    while (a < added.length && added[a]! < k) out[n++] = added[a++]!;
    out[n++] = k;
  }
  while (a < added.length) out[n++] = added[a++]!;
  return out;
}

/** The promise's value, or the error from onTimeout() after ms. */
function deadline<T>(p: Promise<T>, ms: number, onTimeout: () => Error): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(onTimeout()), ms)));
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
