// Subscriber side of /fleetcache/summary/1.0.0: the summaries of the peers we subscribe to, and the
// lookup the router makes on every narinfo miss (holders: one binary search per peer).
//
// Per peer: one stream at a time. A protocol error (bad frame, gap, total mismatch) resets the
// stream and resubscribes from scratch after a backoff, keeping the old summary as a stale hint
// until the new snapshot replaces it (dropped if that attempt fails too). A stream that ends or a
// connection that closes takes the summary out of lookups at once (lookups never name a peer we
// cannot reach) but keeps it for a while, so the next subscription resumes from its epoch and
// generation and the publisher sends only what changed meanwhile, not a whole snapshot.
// Without a connection we wait for the peer to come back (dialing is discovery's job) rather than
// redial a dead peer on our own.
//
// Fair share: a peer's summary frames are decoded and applied one at a time, in slices (2,048
// keys of a snapshot frame, 1,024 of a delta, 32,768 of a merge) with a turn of the event loop
// between them, so local lookups never wait behind a peer's burst; and each peer has a budget of
// keys (a token bucket: a burst, then a rate). A peer over budget is disconnected and penalised
// (PeerPenalties: refused with a growing backoff). A flood should not buy full garbage
// collections either: snapshot keys are decoded straight into the snapshot's buffer, frames that
// arrive in pieces are put together in one scratch buffer, and snapshots back to back reuse the
// buffer of the one before last.
import { EventEmitter } from "node:events";
import { setImmediate as nextTurn } from "node:timers/promises";
import type { PeerId } from "@libp2p/interface";
import type { Logger } from "pino";
import {
  MAX_FRAME_BYTES,
  MAX_KEYS_PER_FRAME,
  MAX_SUMMARY_KEYS,
  PROTOCOL_SUMMARY,
  PathSummary,
  PeerProtocolError,
  SnapshotAssembler,
  TAG_SUMMARY_SNAPSHOT,
  decodeSummaryDelta,
  encodeSummarySubscribe,
  summaryKey,
} from "../../protocol/peer-codec.js";
import { isValidHashPart } from "../../protocol/store-path.js";
import type { MeshNode } from "./node.js";
import type { PeerPenalties } from "./peer-penalties.js";
import { FrameTooLargeError, writeFrame, type StreamReader } from "./stream-io.js";
import { peerIdFromString as peerIdOf } from "@libp2p/peer-id";

export interface SummaryTableOptions {
  /** First retry delay after a failed stream; doubles up to retryMaxMs. */
  retryMinMs?: number;
  retryMaxMs?: number;
  /** A snapshot that makes no progress for this long is given up (reset, retried). */
  snapshotStallMs?: number;
  /** How long a disconnected peer's summary is kept to resume from (default 10 min). */
  resumeGraceMs?: number;
  /** Work each peer may cause, in keys; see SummaryBudget. */
  budget?: Partial<SummaryBudget>;
  /** Where a peer over budget is recorded (the gater then refuses it for a backoff). */
  penalties?: PeerPenalties;
}

/**
 * A token bucket of keys per peer: every frame costs its keys plus FRAME_COST (a flood of tiny
 * frames is work too). The default burst takes two full snapshots of the largest summary back to
 * back (a reconnect and a restarted publisher); the rate, a store changing by a million paths a
 * minute. A peer that overdraws it is disconnected.
 */
export interface SummaryBudget {
  burstKeys: number;
  keysPerSecond: number;
}

export const DEFAULT_SUMMARY_BUDGET: SummaryBudget = { burstKeys: 2 * MAX_SUMMARY_KEYS + 65_536, keysPerSecond: 20_000 };
/** What a frame costs besides its keys. */
export const FRAME_COST = 64;
/** How long the keys a snapshot replaced are kept for a next snapshot to reuse. */
const SPARE_KEEP_MS = 2_000;

/** Cumulative per-peer counters (all streams), for metrics and tests. */
export interface SummaryTraffic {
  streams: number;
  frames: number;
  /** Bytes received, frame headers included. */
  bytes: number;
  /** Of those, in snapshot frames (a full resync) and in delta frames (changes, a resume). */
  snapshotBytes: number;
  deltaBytes: number;
  snapshots: number;
  deltas: number;
  /** Streams we reset for a protocol error (gap, total mismatch, malformed frame). */
  resets: number;
  /** Keys received (snapshot chunks and deltas): what the budget counts, with FRAME_COST a frame. */
  keys: number;
  /** Subscriptions that asked to resume from a summary we kept. */
  resumes: number;
  /** Times the peer went over its budget. */
  overBudget: number;
}

interface PeerEntry {
  readonly peerId: string;
  /** The last complete summary; also in #ready while it counts for lookups. */
  summary: PathSummary | undefined;
  /** Set after a protocol error: the summary is a stale hint, dropped if the retry fails too. */
  stale: boolean;
  /** The live stream's controller, if any. */
  ctl: AbortController | undefined;
  timer: NodeJS.Timeout | undefined;
  backoff: number;
  traffic: SummaryTraffic;
  /** Budget left (keys) as of `refilledAt` (performance.now()). */
  tokens: number;
  refilledAt: number;
  /** Frees a kept summary after the resume grace period. */
  keepTimer: NodeJS.Timeout | undefined;
}

/** A delta that does not apply (gap or total mismatch): a protocol error like any other. */
class SummaryGapError extends PeerProtocolError {}

/** The peer went over its summary budget. */
export class SummaryBudgetError extends Error {
  override name = "SummaryBudgetError";
}

export class SummaryTable extends EventEmitter<{ change: [peerId: string]; overBudget: [peerId: string, reason: string] }> {
  #entries = new Map<string, PeerEntry>();
  /** Summary bytes received from every peer so far, peers since unsubscribed included. */
  readonly received = { snapshotBytes: 0, deltaBytes: 0 };
  /** Peers with a complete summary: what holders() scans. */
  #ready = new Map<string, PathSummary>();
  #stopped = false;
  readonly #retryMin: number;
  readonly #retryMax: number;
  readonly #stallMs: number;
  readonly #graceMs: number;
  readonly #budget: SummaryBudget;
  readonly #penalties: PeerPenalties | undefined;

  constructor(
    private readonly node: MeshNode,
    private readonly log: Logger,
    opts: SummaryTableOptions = {},
  ) {
    super();
    this.#retryMin = opts.retryMinMs ?? 1_000;
    this.#retryMax = opts.retryMaxMs ?? 30_000;
    this.#stallMs = opts.snapshotStallMs ?? 60_000;
    this.#graceMs = opts.resumeGraceMs ?? 600_000;
    this.#budget = { ...DEFAULT_SUMMARY_BUDGET, ...opts.budget };
    this.#penalties = opts.penalties;
    node.libp2p.addEventListener("peer:connect", this.#onConnect);
    node.libp2p.addEventListener("peer:disconnect", this.#onDisconnect);
  }

  subscribe(peerId: string): void {
    if (this.#stopped || this.#entries.has(peerId)) return;
    const e: PeerEntry = {
      peerId,
      summary: undefined,
      stale: false,
      ctl: undefined,
      timer: undefined,
      backoff: this.#retryMin,
      traffic: { streams: 0, frames: 0, bytes: 0, snapshotBytes: 0, deltaBytes: 0, snapshots: 0, deltas: 0, resets: 0, keys: 0, resumes: 0, overBudget: 0 },
      tokens: this.#budget.burstKeys,
      refilledAt: performance.now(),
      keepTimer: undefined,
    };
    this.#entries.set(peerId, e);
    void this.#run(e);
  }

  unsubscribe(peerId: string): void {
    const e = this.#entries.get(peerId);
    if (!e) return;
    this.#entries.delete(peerId);
    clearTimeout(e.timer);
    e.ctl?.abort(new Error("unsubscribed"));
    this.#drop(e);
    clearTimeout(e.keepTimer);
  }

  /** Peer IDs whose complete summary has this path's key (a hint: the narinfo request confirms). */
  holders(hashPart: string): string[] {
    if (this.#ready.size === 0 || !isValidHashPart(hashPart)) return [];
    const k = summaryKey(hashPart);
    const out: string[] = [];
    for (const [peerId, summary] of this.#ready) if (summary.hasKey(k)) out.push(peerId);
    return out;
  }

  /**
   * Peers whose summary is kept out of lookups (disconnected, or connected and not yet resumed)
   * and has this path's key: they may hold it once back. Stale hints are not counted.
   */
  keptHolders(hashPart: string): string[] {
    if (this.#entries.size === this.#ready.size || !isValidHashPart(hashPart)) return [];
    const k = summaryKey(hashPart);
    const out: string[] = [];
    for (const e of this.#entries.values()) {
      if (e.summary && !e.stale && !this.#ready.has(e.peerId) && e.summary.hasKey(k)) out.push(e.peerId);
    }
    return out;
  }

  /** Keys in the peer's summary, or undefined while we hold none. */
  pathCount(peerId: string): number | undefined {
    return this.#ready.get(peerId)?.size;
  }

  /** Peers with a summary that lookups consider. */
  peers(): string[] {
    return [...this.#ready.keys()];
  }

  traffic(peerId: string): Readonly<SummaryTraffic> | undefined {
    return this.#entries.get(peerId)?.traffic;
  }

  stop(): void {
    if (this.#stopped) return;
    for (const peerId of [...this.#entries.keys()]) this.unsubscribe(peerId);
    this.#stopped = true;
    this.node.libp2p.removeEventListener("peer:connect", this.#onConnect);
    this.node.libp2p.removeEventListener("peer:disconnect", this.#onDisconnect);
  }

  readonly #onConnect = (evt: CustomEvent<PeerId>): void => {
    const e = this.#entries.get(evt.detail.toString());
    if (!e || e.ctl) return;
    // Back (or newly) connected: no reason to sit out a backoff meant for a peer that was away.
    clearTimeout(e.timer);
    e.timer = undefined;
    e.backoff = this.#retryMin;
    void this.#run(e);
  };

  readonly #onDisconnect = (evt: CustomEvent<PeerId>): void => {
    const e = this.#entries.get(evt.detail.toString());
    if (!e) return;
    this.#park(e);
    e.ctl?.abort(new Error("peer disconnected"));
  };

  #connected(peerId: string): boolean {
    return this.node.libp2p.getConnections().some((c) => c.remotePeer.toString() === peerId && c.status === "open");
  }

  /** One stream's life, then the decision what to do next. */
  async #run(e: PeerEntry): Promise<void> {
    const ctl = new AbortController();
    e.ctl = ctl;
    e.timer = undefined;
    e.traffic.streams++;
    let synced = false;
    let failure: unknown;
    try {
      const { stream, reader } = await this.node.open(e.peerId, PROTOCOL_SUMMARY, { signal: ctl.signal });
      const onAbort = () => stream.abort(ctl.signal.reason instanceof Error ? ctl.signal.reason : new Error("aborted"));
      if (ctl.signal.aborted) onAbort();
      ctl.signal.addEventListener("abort", onAbort, { once: true });
      try {
        // A summary kept from an earlier stream (not one a protocol error made stale) is resumed
        // from: the publisher sends the deltas since, or a snapshot if it cannot.
        const kept = !e.stale ? e.summary : undefined;
        const from = kept?.epoch !== undefined && kept.generation !== undefined ? { epoch: kept.epoch, generation: kept.generation } : undefined;
        await writeFrame(stream, encodeSummarySubscribe(from ?? { epoch: 0n, generation: 0 }), { signal: ctl.signal });
        if (from && kept) {
          // Connected again: the kept summary counts for lookups (a hint, as ever) while the
          // publisher catches it up. Nothing may come if nothing changed.
          e.traffic.resumes++;
          clearTimeout(e.keepTimer);
          this.#ready.set(e.peerId, kept);
          this.emit("change", e.peerId);
        }
        await this.#consume(e, reader, ctl, from !== undefined, () => (synced = true));
        await stream.close().catch(() => {});
      } catch (err) {
        // Reset, so a publisher that misbehaved sees us give up on this stream.
        stream.abort(err instanceof Error ? err : new Error(String(err)));
        throw err;
      }
    } catch (err) {
      // Our own abort (stall, disconnect) surfaces as a reset error: report why we aborted.
      failure = ctl.signal.aborted ? ctl.signal.reason : err;
    } finally {
      if (e.ctl === ctl) e.ctl = undefined;
    }
    if (this.#entries.get(e.peerId) !== e) return; // unsubscribed meanwhile

    if (failure instanceof SummaryBudgetError) {
      // Nothing it sent is kept, and it is disconnected (refused for a while with penalties).
      e.traffic.overBudget++;
      e.tokens = this.#budget.burstKeys; // a fresh budget once the penalty is over
      this.#drop(e);
      const reason = failure.message;
      this.log.warn({ peer: e.peerId, reason }, "summary: peer over its budget; disconnecting it");
      const p = this.#penalties?.penalise(e.peerId, reason);
      this.emit("overBudget", e.peerId, reason);
      if (p) this.log.warn({ peer: e.peerId, until: new Date(p.until).toISOString(), offences: p.count }, "summary: peer refused until then");
      await this.node.libp2p.hangUp(peerIdOf(e.peerId)).catch(() => {});
      return; // #onConnect resumes when the peer is back
    }
    const protocolError = failure instanceof PeerProtocolError || failure instanceof FrameTooLargeError;
    if (protocolError) {
      e.traffic.resets++;
      this.log.warn({ peer: e.peerId, err: failure }, "summary: protocol error from peer; resubscribing");
    } else {
      this.log.debug({ peer: e.peerId, err: failure }, "summary: stream ended");
    }
    const connected = this.#connected(e.peerId);
    // A stale hint survives one protocol error while the peer is still there, not two. A stream
    // that just ended keeps its summary out of lookups, to resume from.
    if (protocolError && connected && !e.stale && e.summary) e.stale = true;
    else if (protocolError) this.#drop(e);
    else this.#park(e);
    if (!connected) return; // #onConnect resumes when the peer is back
    // A healthy stream that ended (publisher restarted) retries soon; misbehaviour backs off.
    if (synced && !protocolError) e.backoff = this.#retryMin;
    const delay = e.backoff;
    e.backoff = Math.min(e.backoff * 2, this.#retryMax);
    e.timer = setTimeout(() => {
      if (this.#entries.get(e.peerId) === e && !e.ctl) void this.#run(e);
    }, delay);
    e.timer.unref();
  }

  /** Reads snapshots and deltas until the stream ends (returns) or fails (throws). */
  async #consume(e: PeerEntry, reader: StreamReader, ctl: AbortController, resumed: boolean, onSynced: () => void): Promise<void> {
    const assembler = new SnapshotAssembler();
    // Frames that arrive in pieces are put together here, not in a fresh array each.
    const scratch = new Uint8Array(MAX_FRAME_BYTES.summary);
    // A delta's keys, decoded here: applying it copies what it keeps.
    const deltaKeys = new BigUint64Array(MAX_KEYS_PER_FRAME);
    let synced = resumed; // a snapshot completed on this stream (or we resumed): deltas may follow
    let stall: NodeJS.Timeout | undefined;
    let spareTimer: NodeJS.Timeout | undefined;
    // Until a snapshot completes, the publisher owes us frames; afterwards deltas may be rare.
    const arm = () => {
      clearTimeout(stall);
      if (!synced || assembler.pending) {
        stall = setTimeout(() => ctl.abort(new PeerProtocolError("summary snapshot stalled")), this.#stallMs);
      }
    };
    /** Yields to the event loop (lookups run) after each slice of a frame's work. */
    const drive = async <T>(steps: Generator<void, T, void>): Promise<T> => {
      for (let r = steps.next(); ; r = steps.next()) {
        if (r.done) return r.value;
        await nextTurn();
        ctl.signal.throwIfAborted();
      }
    };
    arm();
    try {
      for (;;) {
        const before = reader.bytesRead;
        const frame = await reader.readFrame(MAX_FRAME_BYTES.summary, scratch);
        ctl.signal.throwIfAborted();
        if (frame === undefined) return;
        e.traffic.frames++;
        const bytes = reader.bytesRead - before;
        e.traffic.bytes += bytes;
        const kind = frame[0] === TAG_SUMMARY_SNAPSHOT ? "snapshotBytes" : "deltaBytes";
        e.traffic[kind] += bytes;
        this.received[kind] += bytes;
        if (kind === "snapshotBytes") {
          // Decoded straight into the snapshot's buffer, a slice per turn of the event loop.
          const f = assembler.frame(frame);
          this.#charge(e, f.keys);
          const snap = await drive(f.steps);
          if (snap) {
            // Replaces the previous (maybe stale) summary in one step: lookups never see a mix.
            const summary = e.summary ?? new PathSummary();
            const replaced = summary.applySnapshot(snap, true); // the assembler checked the order
            // A peer sending snapshots back to back gets the next one assembled in the replaced
            // keys' buffer; one that does not keeps no spare for long.
            assembler.recycle(replaced);
            clearTimeout(spareTimer);
            spareTimer = setTimeout(() => assembler.dropSpare(), SPARE_KEEP_MS).unref();
            e.summary = summary;
            e.stale = false;
            this.#ready.set(e.peerId, summary);
            e.traffic.snapshots++;
            onSynced();
            synced = true;
            this.emit("change", e.peerId);
          }
        } else {
          const msg = decodeSummaryDelta(frame, deltaKeys);
          this.#charge(e, msg.added.length + msg.removed.length);
          if (!synced || assembler.pending || !e.summary) throw new PeerProtocolError("summary delta before a complete snapshot");
          // In slices: a delta of 8,192 keys on a large summary costs milliseconds.
          if (!(await drive(e.summary.applyDeltaSteps(msg)))) {
            throw new SummaryGapError(`summary delta ${msg.fromGeneration}->${msg.toGeneration} (total ${msg.total}) does not apply at generation ${e.summary.generation}`);
          }
          e.traffic.deltas++;
          onSynced();
          this.emit("change", e.peerId);
          // A large summary merges its overlays in slices, between which lookups run.
          if (e.summary.compactionDue) await drive(e.summary.compactionSteps());
        }
        arm();
        // One frame at a time: whatever else is waiting (local lookups) runs before the next.
        await nextTurn();
        ctl.signal.throwIfAborted();
      }
    } finally {
      clearTimeout(stall);
      clearTimeout(spareTimer);
    }
  }

  /** Charges a frame of `keys` keys to the peer's budget; throws when it is overdrawn. */
  #charge(e: PeerEntry, keys: number): void {
    e.traffic.keys += keys;
    const now = performance.now();
    const { burstKeys, keysPerSecond } = this.#budget;
    e.tokens = Math.min(burstKeys, e.tokens + ((now - e.refilledAt) / 1000) * keysPerSecond);
    e.refilledAt = now;
    e.tokens -= keys + FRAME_COST;
    if (e.tokens < 0) {
      throw new SummaryBudgetError(`summary work over budget: ${e.traffic.keys} keys in ${e.traffic.frames} frames (budget ${burstKeys} keys, then ${keysPerSecond} a second)`);
    }
  }

  /** Out of lookups, but kept for a while to resume from (unless it is only a stale hint). */
  #park(e: PeerEntry): void {
    if (!e.summary || e.stale) return this.#drop(e);
    if (this.#ready.delete(e.peerId)) this.emit("change", e.peerId);
    clearTimeout(e.keepTimer);
    e.keepTimer = setTimeout(() => {
      if (!this.#ready.has(e.peerId)) e.summary = undefined;
    }, this.#graceMs);
    e.keepTimer.unref();
  }

  #drop(e: PeerEntry): void {
    clearTimeout(e.keepTimer);
    e.stale = false;
    if (!e.summary) return;
    e.summary = undefined;
    this.#ready.delete(e.peerId);
    this.emit("change", e.peerId);
  }
}
