// /fleetcache/narinfo/1.0.0 (protocol/PEER-PROTOCOL.md): answering peers' narinfo requests from
// this host's store, and asking a peer for one. A peer's answer is kept only if it names the
// requested path and carries a signature by a trusted key: fleet membership proves who is
// talking, not that what they say is right.
//
// Also home to the small helpers the NAR service shares (per-peer slots, timed frame reads,
// deadlines that reset a stream).
import { setImmediate as nextTurn } from "node:timers/promises";
import type { Stream } from "@libp2p/interface";
import {
  MAX_FRAME_BYTES,
  PROTOCOL_NARINFO,
  decodeNarinfoRequest,
  decodeNarinfoResponse,
  encodeNarinfoRequest,
  encodeNarinfoResponse,
  type NarinfoResponse,
} from "../../protocol/peer-codec.js";
import { Verifier, type PublicKey } from "../../protocol/keys.js";
import { fingerprint, parseNarinfo, renderNarinfo, type Narinfo } from "../../protocol/narinfo.js";
import { narUrl } from "../../protocol/nar-url.js";
import { isValidHashPart, storePathHashPart } from "../../protocol/store-path.js";
import type { Logger } from "../log.js";
import type { LocalStore } from "../store/local-store.js";
import type { MeshNode, MeshStream } from "./node.js";
import type { StreamReader } from "./stream-io.js";
import { idleAndSound, writeFrame } from "./stream-io.js";
import { quietWindowUpdates } from "./yamux-window.js";

/** Responder limits from the spec; tests shorten the timeouts. */
export interface NarinfoServeOptions {
  /** The first request must arrive within this long of the stream opening (spec: 10 s). */
  firstRequestMs?: number;
  /** A stream idle this long between requests is closed (spec: 30 s). */
  idleMs?: number;
  /** Concurrent inbound narinfo streams per peer (spec: 64); more are reset. */
  maxStreamsPerPeer?: number;
  /** Requests answered per peer per turn of the event loop, over all its streams (default 4). */
  perTurn?: number;
}

export const FIRST_REQUEST_MS = 10_000;
export const NARINFO_IDLE_MS = 30_000;
export const MAX_NARINFO_STREAMS_PER_PEER = 64;
export const NARINFO_PER_TURN = 4;
/** Requester deadline for an answer when the caller gives none (the spec's recommendation). */
export const NARINFO_DEADLINE_MS = 2_000;

/** Answers narinfo requests from `local` only: a path this host does not hold is not-found. */
export async function serveNarinfo(node: MeshNode, local: LocalStore, log: Logger, opts: NarinfoServeOptions = {}): Promise<void> {
  const firstMs = opts.firstRequestMs ?? FIRST_REQUEST_MS;
  const idleMs = opts.idleMs ?? NARINFO_IDLE_MS;
  const slots = new PeerSlots(opts.maxStreamsPerPeer ?? MAX_NARINFO_STREAMS_PER_PEER);
  const share = new TurnShare(opts.perTurn ?? NARINFO_PER_TURN);
  await node.handle(
    PROTOCOL_NARINFO,
    async ({ stream, reader, peerId, peer }) => {
      // No "busy" message exists for narinfo: a stream over the limit is reset.
      if (!slots.tryAcquire(peerId)) throw new Error(`more than ${slots.limit} narinfo streams from ${peer.name}`);
      quietWindowUpdates(stream); // small frames: no window update for each request
      try {
        for (let first = true; ; first = false) {
          const frame = await readFrameWithin(reader, MAX_FRAME_BYTES.narinfo, first ? firstMs : idleMs);
          if (frame === TIMED_OUT) {
            if (first) throw new Error(`no narinfo request within ${firstMs} ms`);
            return; // idle: closed cleanly
          }
          if (frame === undefined) return; // the requester is done
          const hashPart = decodeNarinfoRequest(frame); // malformed: throws, the stream is reset
          // A peer may pipeline thousands of requests into our buffers, on up to 64 streams:
          // a few of its requests per turn of the event loop, so local lookups run in between.
          await share.take(peerId);
          await writeFrame(stream, await localAnswer(local, hashPart, log));
        }
      } finally {
        slots.release(peerId);
      }
    },
    // libp2p's own per-connection cap (32 by default) must not bite before ours does; half-closed
    // streams still count towards it, hence the slack.
    { maxInboundStreams: 2 * slots.limit, maxOutboundStreams: 2 * MAX_NARINFO_STREAMS_PER_PEER },
  );
}

/** The encoded answer for one hash part, from the local store only. */
async function localAnswer(local: LocalStore, hashPart: string, log: Logger): Promise<Uint8Array> {
  // A store that cannot answer (daemon gone) throws: the stream is reset, the peer asks elsewhere.
  const info = await local.pathInfo(hashPart);
  let res: NarinfoResponse = { type: "not-found" };
  if (info) res = { type: "found", narinfo: renderNarinfo(info, narUrl(hashPart, info.narHash)) };
  try {
    return encodeNarinfoResponse(res);
  } catch (err) {
    // Only a narinfo over 64 KiB (thousands of references) gets here: peers cannot have it.
    log.warn({ path: info?.storePath, err: (err as Error).message }, "mesh: narinfo too large for the peer protocol");
    return encodeNarinfoResponse({ type: "not-found" });
  }
}

export interface FetchNarinfoOptions {
  /** Keys whose signature makes a narinfo acceptable (the fleet's trusted keys): a Verifier made once, or a list for one request. */
  trusted: Verifier | readonly PublicKey[];
  signal?: AbortSignal;
  /**
   * Deadline for the whole exchange. Default: the signal's alone when one is given (the caller's
   * lookup deadline, which FleetSource stretches over a slow or busy link; a shorter one here
   * dropped answers on their way), else 2 s.
   */
  timeoutMs?: number;
  log?: Logger;
}

/**
 * Asks `peerId` for the narinfo of `hashPart`. Returns it only if it parses, names the requested
 * path, and a Sig verifies with a trusted key; anything else a peer can cause (not-found, junk,
 * no valid signature, timeout, a reset) is undefined, never a throw. Throws only on a hash part
 * that is not one (a caller bug).
 */
export async function fetchNarinfo(node: MeshNode, peerId: string, hashPart: string, opts: FetchNarinfoOptions): Promise<Narinfo | undefined> {
  if (!isValidHashPart(hashPart)) throw new TypeError(`invalid store path hash part ${JSON.stringify(hashPart)}`);
  const signal = opts.signal && opts.timeoutMs === undefined ? opts.signal : deadline(opts.timeoutMs ?? NARINFO_DEADLINE_MS, opts.signal);
  const why = (reason: string, err?: unknown) => {
    opts.log?.debug({ peer: peerId, hashPart, reason, err: err instanceof Error ? err.message : err }, "mesh: narinfo from peer not used");
    return undefined;
  };
  let res: NarinfoResponse | undefined;
  // A pooled stream may have been closed by the responder (idle timeout) just as we reused it:
  // then ask once more on a fresh one, within the same deadline.
  for (let attempt = 0; res === undefined; attempt++) {
    let ms: MeshStream | undefined;
    let reused = false;
    let release = () => {};
    try {
      ({ ms, reused } = await narinfoStreams(node).take(peerId, signal));
      release = resetOnAbort(ms.stream, signal);
      await writeFrame(ms.stream, encodeNarinfoRequest(hashPart), { signal });
      const frame = await ms.reader.readFrame(MAX_FRAME_BYTES.narinfo);
      if (frame === undefined) throw new Error("stream ended without an answer");
      res = decodeNarinfoResponse(frame);
      release();
      release = () => {};
      narinfoStreams(node).give(peerId, ms);
    } catch (err) {
      // Never reuse a stream that failed: it may still carry a late answer.
      ms?.stream.abort(err instanceof Error ? err : new Error(String(err)));
      if (reused && attempt === 0 && !signal.aborted) continue;
      return why(signal.aborted ? "timeout or aborted" : "exchange failed", err);
    } finally {
      release();
    }
  }
  if (res.type === "not-found") return why("not-found");
  let info: Narinfo;
  try {
    info = parseNarinfo(res.narinfo);
  } catch (err) {
    return why("malformed narinfo", err);
  }
  if (storePathHashPart(info.storePath) !== hashPart) return why(`answer is for ${info.storePath}`);
  const fp = fingerprint(info);
  const trusted = opts.trusted instanceof Verifier ? opts.trusted : new Verifier(opts.trusted);
  if (!info.sigs.some((sig) => trusted.verify(fp, sig))) return why("no signature by a trusted key");
  return info;
}

// --- requester stream pool -----------------------------------------------------------------------

/**
 * Idle narinfo streams kept per peer; concurrent requests beyond this open (then close) their own.
 * Nix looks a closure's paths up at once over up to 25 connections (http-connections), so a pool
 * of 4 had 31 of a 40-path copy's 40 peer lookups open a stream (and close it after one answer);
 * 32 keeps such a burst's streams for the next. Idle streams count against the responder's 64
 * per peer (MAX_NARINFO_STREAMS_PER_PEER), but no more than the burst itself did.
 */
export const NARINFO_POOL_PER_PEER = 32;
/** An idle pooled stream is closed well before the responder's idle timeout (30 s) would. */
const NARINFO_POOL_IDLE_MS = 20_000;

/**
 * Streams opened ahead when a peer connects, for Nix's first burst of lookups (it asks up to 25
 * at once: http-connections), which would otherwise open one each while Nix waits: a yamux SYN,
 * multistream-select and the responder's handler setup, on both agents, in the middle of the copy.
 */
export const NARINFO_WARM_PER_PEER = 25;
/**
 * Warm streams not yet used, over all peers. A fleet of 100 peers connecting at once warms the
 * first 8 fully and no more: 200 stream openings, each closed unused after NARINFO_WARM_IDLE_MS.
 */
export const NARINFO_WARM_MAX = 200;
/** A warm stream no lookup took is closed before the responder's first-request limit (10 s) would reset it. */
export const NARINFO_WARM_IDLE_MS = 8_000;

interface Pooled {
  ms: MeshStream;
  timer: NodeJS.Timeout;
  /** Opened ahead and not used yet (counts against NARINFO_WARM_MAX). */
  warm: boolean;
}

/**
 * Reusable narinfo streams per peer (the protocol allows requests one after another on a stream):
 * opening a stream costs a yamux round trip and a multistream-select, several ms, against about
 * one ms for the exchange itself. A stream is only ever used by one request at a time, returned
 * only after a complete answer, and dropped on any failure.
 */
class NarinfoStreamPool {
  readonly #idle = new Map<string, Pooled[]>();
  /** Warm streams opening or idle, not yet used. */
  #warmUnused = 0;
  /** Streams opened for a request, requests that reused an idle one, streams opened ahead (status counters). */
  readonly counts = { opened: 0, reused: 0, warmed: 0 };
  constructor(readonly node: MeshNode) {}

  async take(peerId: string, signal: AbortSignal): Promise<{ ms: MeshStream; reused: boolean }> {
    const list = this.#idle.get(peerId);
    while (list && list.length > 0) {
      const entry = list.pop()!;
      clearTimeout(entry.timer);
      this.#used(entry);
      if (list.length === 0) this.#idle.delete(peerId);
      const { ms } = entry;
      const s = ms.stream;
      if (idleAndSound(s, ms.reader)) {
        this.counts.reused++;
        return { ms, reused: true };
      }
      s.abort(new Error("stale pooled narinfo stream"));
    }
    this.counts.opened++;
    return { ms: await this.#open(peerId, signal), reused: false };
  }

  give(peerId: string, ms: MeshStream): void {
    this.#add(peerId, ms, false);
  }

  /** Opens streams to `peerId` ahead of its lookups, up to `count` idle ones, within NARINFO_WARM_MAX. */
  warm(peerId: string, count: number, idleMs: number): void {
    const n = Math.min(count - (this.#idle.get(peerId)?.length ?? 0), NARINFO_WARM_MAX - this.#warmUnused);
    for (let i = 0; i < n; i++) {
      this.#warmUnused++;
      this.counts.warmed++;
      this.#open(peerId, AbortSignal.timeout(NARINFO_DEADLINE_MS)).then(
        (ms) => this.#add(peerId, ms, true, idleMs),
        () => this.#warmUnused--, // the peer went, or is too slow: its lookups open their own
      );
    }
  }

  /** Idle streams kept, over all peers (for tests). */
  get idle(): number {
    let n = 0;
    for (const list of this.#idle.values()) n += list.length;
    return n;
  }

  async #open(peerId: string, signal: AbortSignal): Promise<MeshStream> {
    const ms = await this.node.open(peerId, PROTOCOL_NARINFO, { signal });
    quietWindowUpdates(ms.stream); // small frames: no window update for each answer
    return ms;
  }

  #used(entry: Pooled): void {
    if (!entry.warm) return;
    entry.warm = false;
    this.#warmUnused--;
  }

  #add(peerId: string, ms: MeshStream, warm: boolean, idleMs = NARINFO_POOL_IDLE_MS): void {
    const list = this.#idle.get(peerId) ?? [];
    if (list.length >= NARINFO_POOL_PER_PEER || ms.stream.status !== "open") {
      if (warm) this.#warmUnused--;
      ms.stream.close().catch(() => {}); // our FIN ends the responder's loop
      return;
    }
    const entry: Pooled = {
      ms,
      warm,
      timer: setTimeout(() => {
        const i = list.indexOf(entry);
        if (i >= 0) list.splice(i, 1);
        if (list.length === 0 && this.#idle.get(peerId) === list) this.#idle.delete(peerId);
        this.#used(entry);
        ms.stream.close().catch(() => {});
      }, idleMs),
    };
    entry.timer.unref();
    // Warm streams at the bottom: a lookup takes a stream used before (its window known good) first.
    if (warm) list.unshift(entry);
    else list.push(entry);
    this.#idle.set(peerId, list);
  }
}

const pools = new WeakMap<MeshNode, NarinfoStreamPool>();

/** How many narinfo requests to peers opened a stream, how many reused a pooled one, and how many streams were opened ahead. */
export function narinfoStreamCounts(node: MeshNode): { opened: number; reused: number; warmed: number; idle: number } {
  const pool = narinfoStreams(node);
  return { ...pool.counts, idle: pool.idle };
}

/**
 * Opens narinfo streams to a peer that just connected, so that Nix's first burst of lookups finds
 * them open (NARINFO_WARM_PER_PEER). Unused, they are closed after `idleMs` (NARINFO_WARM_IDLE_MS).
 */
export function warmNarinfoStreams(node: MeshNode, peerId: string, opts: { count?: number; idleMs?: number } = {}): void {
  narinfoStreams(node).warm(peerId, opts.count ?? NARINFO_WARM_PER_PEER, opts.idleMs ?? NARINFO_WARM_IDLE_MS);
}

function narinfoStreams(node: MeshNode): NarinfoStreamPool {
  let pool = pools.get(node);
  if (!pool) pools.set(node, (pool = new NarinfoStreamPool(node)));
  return pool;
}

// --- helpers shared with nar-service.ts ---------------------------------------------------------

/**
 * At most `perTurn` units of work per peer in one turn of the event loop: take() resolves at once
 * while the peer has some left this turn, else on a later turn.
 */
export class TurnShare {
  readonly #used = new Map<string, number>();
  #resetting = false;
  constructor(readonly perTurn: number) {}

  async take(peer: string): Promise<void> {
    for (;;) {
      const n = this.#used.get(peer) ?? 0;
      if (n < this.perTurn) {
        this.#used.set(peer, n + 1);
        if (!this.#resetting) {
          this.#resetting = true;
          setImmediate(() => {
            this.#used.clear();
            this.#resetting = false;
          });
        }
        return;
      }
      await nextTurn();
    }
  }
}

/** Counts concurrent streams per peer against a limit. */
export class PeerSlots {
  readonly #used = new Map<string, number>();
  constructor(readonly limit: number) {}

  tryAcquire(peer: string): boolean {
    const n = this.#used.get(peer) ?? 0;
    if (n >= this.limit) return false;
    this.#used.set(peer, n + 1);
    return true;
  }

  release(peer: string): void {
    const n = (this.#used.get(peer) ?? 1) - 1;
    if (n <= 0) this.#used.delete(peer);
    else this.#used.set(peer, n);
  }

  inUse(peer: string): number {
    return this.#used.get(peer) ?? 0;
  }
}

export const TIMED_OUT = Symbol("timed out");

/**
 * readFrame with a time limit. On timeout the read is left running (StreamReader has no cancel):
 * the caller closes or resets the stream, and a frame that still arrives resets it, since it came
 * after the responder stopped listening.
 */
export async function readFrameWithin(reader: StreamReader, maxBytes: number, ms: number): Promise<Uint8Array | undefined | typeof TIMED_OUT> {
  const read = reader.readFrame(maxBytes);
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<typeof TIMED_OUT>((resolve) => (timer = setTimeout(() => resolve(TIMED_OUT), ms)));
  try {
    const first = await Promise.race([read, timeout]);
    if (first === TIMED_OUT) {
      read.then(
        (frame) => frame !== undefined && reader.stream.abort(new Error("frame after the stream timed out")),
        () => {},
      );
    }
    return first;
  } finally {
    clearTimeout(timer);
  }
}

/** A signal that fires after `ms`, or when `signal` does. */
export function deadline(ms: number, signal?: AbortSignal): AbortSignal {
  const timeout = AbortSignal.timeout(ms);
  return signal ? AbortSignal.any([signal, timeout]) : timeout;
}

/** Resets `stream` when `signal` fires (so pending reads fail); returns the un-registration. */
export function resetOnAbort(stream: Stream, signal: AbortSignal): () => void {
  const onAbort = () => stream.abort(signal.reason instanceof Error ? signal.reason : new Error("aborted"));
  if (signal.aborted) {
    onAbort();
    return () => {};
  }
  signal.addEventListener("abort", onAbort, { once: true });
  return () => signal.removeEventListener("abort", onAbort);
}
