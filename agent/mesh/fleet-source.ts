// The PathSource the HTTP side uses when the mesh is on: this host's store first, then the peers
// whose summaries say they may hold the path. A path no connected peer announces is a miss
// without a question to any peer (the summaries are in memory); otherwise the closest holders
// are asked, with a short deadline.
import { createHash } from "node:crypto";
import { parseHash } from "../../protocol/hash.js";
import type { Narinfo } from "../../protocol/narinfo.js";
import type { PathInfo } from "../../protocol/path-info.js";
import { hashPartOf } from "../../protocol/store-path.js";
import type { Logger } from "../log.js";
import { NarGoneError, NarUnavailableError, type PathSource } from "../source.js";
import type { LocalStore } from "../store/local-store.js";
import { NarFetchError } from "./nar-service.js";

/** Which connected peers there are, fastest first (the peer manager). */
export interface PeerDirectory {
  connectedPeers(): string[];
}

/** Which peers announced a path (the summary table). */
export interface HolderIndex {
  holders(hashPart: string): string[];
}

export interface NarRequestFromPeer {
  hashPart: string;
  narHash: string;
  offset: number;
  narSize: number;
}

/** Requests to one peer (the narinfo and NAR services' requester sides). */
export interface PeerRequests {
  /** A verified narinfo (trusted signature, matching store path), or undefined. */
  narinfo(peerId: string, hashPart: string, signal: AbortSignal): Promise<Narinfo | undefined>;
  /** NAR bytes [offset, narSize); the iterator throws if the peer stops short. */
  nar(peerId: string, req: NarRequestFromPeer, signal: AbortSignal): Promise<AsyncIterable<Uint8Array>>;
}

export interface FleetSourceOptions {
  /** How long a narinfo lookup may wait on peers in all. */
  narinfoDeadlineMs?: number;
  /** After this long without an answer, the next holder is asked as well. */
  hedgeAfterMs?: number;
  /** How long an answer from a peer is reused. */
  cacheTtlMs?: number;
  /** Told of failures operators should see (a peer's NAR transfer or narinfo answer failing). */
  onError?: (e: { message: string; path?: string; peer: string }) => void;
}

/** Counters the operator tools read; the router only increments them. */
export interface FleetCounters {
  localHits: number;
  peerHits: number;
  misses: number;
  peerQueries: number;
  failovers: number;
  transferFailures: number;
  bytesFromPeers: number;
}

interface Cached {
  info: PathInfo;
  /** Peers that answered with this path (asked first for its NAR). */
  from: string;
  expires: number;
}

const MAX_CACHED = 50_000;

export class FleetSource implements PathSource {
  readonly counters: FleetCounters = { localHits: 0, peerHits: 0, misses: 0, peerQueries: 0, failovers: 0, transferFailures: 0, bytesFromPeers: 0 };
  /** NAR bytes received, by peer ID. */
  readonly bytesFromPeer = new Map<string, number>();
  /** PathInfos made from peers' narinfos (the HTTP side labels hits by source). */
  readonly #fromPeers = new WeakSet<PathInfo>();
  readonly #onError: NonNullable<FleetSourceOptions["onError"]>;
  private readonly cache = new Map<string, Cached>();
  private readonly inflight = new Map<string, Promise<PathInfo | undefined>>();
  private readonly deadlineMs: number;
  private readonly hedgeMs: number;
  private readonly ttlMs: number;

  constructor(
    private readonly local: LocalStore,
    private readonly peers: PeerDirectory,
    private readonly index: HolderIndex,
    private readonly requests: PeerRequests,
    private readonly log: Logger,
    opts: FleetSourceOptions = {},
  ) {
    this.deadlineMs = opts.narinfoDeadlineMs ?? 2000;
    this.hedgeMs = opts.hedgeAfterMs ?? 250;
    this.ttlMs = opts.cacheTtlMs ?? 30_000;
    this.#onError = opts.onError ?? (() => {});
  }

  /** Whether `info` came from a peer rather than this host's store. */
  fromPeer(info: PathInfo): boolean {
    return this.#fromPeers.has(info);
  }

  async pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    const local = await this.local.pathInfo(hashPart);
    if (local) {
      this.counters.localHits++;
      return local;
    }
    const holders = this.holders(hashPart);
    if (holders.length === 0) {
      this.counters.misses++;
      return undefined; // no connected peer announces it: answered without any network traffic
    }
    const cached = this.cache.get(hashPart);
    if (cached && cached.expires > Date.now() && holders.includes(cached.from)) {
      this.counters.peerHits++;
      return cached.info;
    }
    // Concurrent lookups of one path (Nix's HEAD then GET) share one round of questions.
    let pending = this.inflight.get(hashPart);
    if (!pending) {
      pending = this.askPeers(hashPart, holders).finally(() => this.inflight.delete(hashPart));
      this.inflight.set(hashPart, pending);
    }
    const info = await pending;
    if (info) this.counters.peerHits++;
    else this.counters.misses++;
    return info;
  }

  async *narStream(info: PathInfo, start: number, end: number, readSize?: () => number): AsyncGenerator<Buffer> {
    const hashPart = hashPartOf(info.storePath);
    const local = await this.local.pathInfo(hashPart);
    if (local && local.narHash === info.narHash) {
      let sent = false;
      try {
        for await (const chunk of this.local.narStream(local, start, end, readSize)) {
          sent = true;
          yield chunk;
        }
        return;
      } catch (e) {
        // Collected here before its first byte went out: a peer may still hold it.
        if (sent || !(e instanceof NarGoneError)) throw e;
      }
    }
    yield* this.remoteNar(hashPart, info, start, end);
  }

  /** Connected peers announcing the path, fastest first. */
  private holders(hashPart: string): string[] {
    const announced = this.index.holders(hashPart);
    if (announced.length === 0) return announced;
    const set = new Set(announced);
    return this.peers.connectedPeers().filter((p) => set.has(p));
  }

  /**
   * Asks the holders in order, starting the next one when the previous has not answered within
   * the hedge delay (or has answered "no"); the first verified answer wins, and the deadline
   * bounds the whole lookup so a dead peer never holds Nix up.
   */
  private askPeers(hashPart: string, holders: string[]): Promise<PathInfo | undefined> {
    const controller = new AbortController();
    const deadline = setTimeout(() => controller.abort(), this.deadlineMs);
    return new Promise<PathInfo | undefined>((resolve) => {
      let next = 0;
      let outstanding = 0;
      let done = false;
      let hedge: NodeJS.Timeout | undefined;
      const finish = (info: PathInfo | undefined) => {
        if (done) return;
        done = true;
        clearTimeout(deadline);
        clearTimeout(hedge);
        controller.abort();
        resolve(info);
      };
      const askNext = () => {
        clearTimeout(hedge);
        if (done) return;
        if (next >= holders.length) {
          if (outstanding === 0) finish(undefined);
          return;
        }
        const peer = holders[next++]!;
        outstanding++;
        this.counters.peerQueries++;
        this.requests.narinfo(peer, hashPart, controller.signal).then(
          (narinfo) => {
            outstanding--;
            if (narinfo) {
              const info = toPathInfo(narinfo);
              this.#fromPeers.add(info);
              this.remember(hashPart, info, peer);
              finish(info);
            } else askNext();
          },
          (err: unknown) => {
            outstanding--;
            this.log.debug({ peer, hashPart, err }, "narinfo request to peer failed");
            // Cancelled because another peer answered first, or the deadline passed: not the peer's fault.
            if (!controller.signal.aborted) this.#onError({ message: `narinfo request failed: ${(err as Error).message ?? String(err)}`, path: hashPart, peer });
            askNext();
          },
        );
        hedge = setTimeout(askNext, this.hedgeMs);
      };
      controller.signal.addEventListener("abort", () => finish(undefined));
      askNext();
    });
  }

  private remember(hashPart: string, info: PathInfo, from: string): void {
    if (this.cache.size >= MAX_CACHED) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(hashPart, { info, from, expires: Date.now() + this.ttlMs });
  }

  /**
   * NAR bytes from peers. A peer failing mid-way is replaced by the next holder at the byte
   * offset reached (NAR bytes are canonical). A whole NAR is hashed as it goes, and its last chunk
   * is held back until size and hash check out, so a corrupt NAR never reaches Nix complete.
   */
  private async *remoteNar(hashPart: string, info: PathInfo, start: number, end: number): AsyncGenerator<Buffer> {
    const cachedFrom = this.cache.get(hashPart)?.from;
    const holders = this.holders(hashPart);
    const order = cachedFrom && holders.includes(cachedFrom) ? [cachedFrom, ...holders.filter((p) => p !== cachedFrom)] : holders;
    if (order.length === 0) throw new NarGoneError(`no connected peer holds ${info.storePath} any more`);
    const whole = start === 0 && end === info.narSize;
    const hash = whole ? createHash("sha256") : undefined;
    let offset = start;
    let held: Buffer | undefined;
    // Holders that answer "not found" have lost the path since they announced it (a GC racing
    // its summary delta): if all of them do, the path is gone, not unavailable.
    let allNotFound = true;
    for (const [i, peer] of order.entries()) {
      if (offset >= end) break;
      if (i > 0) this.counters.failovers++;
      const controller = new AbortController();
      try {
        const chunks = await this.requests.nar(peer, { hashPart, narHash: info.narHash, offset, narSize: info.narSize }, controller.signal);
        for await (const c of chunks) {
          const chunk = Buffer.from(c.buffer, c.byteOffset, Math.min(c.length, end - offset));
          offset += chunk.length;
          this.counters.bytesFromPeers += chunk.length;
          this.bytesFromPeer.set(peer, (this.bytesFromPeer.get(peer) ?? 0) + chunk.length);
          hash?.update(chunk);
          if (held) yield held;
          held = Buffer.from(chunk); // a copy: the reader may reuse its buffers
          if (offset >= end) break;
        }
      } catch (err) {
        if (!(err instanceof NarFetchError && err.reason === "not-found")) allNotFound = false;
        this.counters.transferFailures++;
        this.log.warn({ peer, path: info.storePath, offset, err: (err as Error).message }, "NAR transfer from peer failed; trying the next holder");
        this.#onError({ message: `NAR transfer failed at byte ${offset}: ${(err as Error).message}`, path: info.storePath, peer });
      } finally {
        controller.abort();
      }
    }
    if (offset === start && allNotFound) throw new NarGoneError(`every holder of ${info.storePath} has lost it`);
    if (offset < end) {
      throw new NarUnavailableError(`no peer could send ${info.storePath} (got ${offset - start} of ${end - start} bytes)`);
    }
    if (hash && !Buffer.from(parseHash(info.narHash)).equals(hash.digest())) {
      throw new NarUnavailableError(`NAR of ${info.storePath} from peers does not match its NarHash`);
    }
    if (held) yield held;
  }
}

function toPathInfo(n: Narinfo): PathInfo {
  const info: PathInfo = { storePath: n.storePath, narHash: n.narHash, narSize: n.narSize, references: n.references, sigs: n.sigs };
  if (n.deriver) info.deriver = n.deriver;
  if (n.ca) info.ca = n.ca;
  return info;
}
