// The PathSource the HTTP side uses when the mesh is on: this host's store first, then the peers
// whose summaries say they may hold the path. A path no connected peer announces is a miss
// without a question to any peer (the summaries are in memory); otherwise the closest holders
// are asked, with a short deadline. NARs come from the fastest holder with a free transfer slot
// (or wait in a queue for one), are verified whole against the narinfo, and a holder whose bytes
// are wrong is passed over (penalties.ts).
import { setTimeout as sleep } from "node:timers/promises";
import type { Narinfo } from "../../protocol/narinfo.js";
import type { PathInfo } from "../../protocol/path-info.js";
import { hashPartOf } from "../../protocol/store-path.js";
import type { Logger } from "../log.js";
import { NarGoneError, NarUnavailableError, type PathSource } from "../source.js";
import type { LocalStore } from "../store/local-store.js";
import { MAX_NAR_TRANSFERS_PER_PEER, NarFetchError, NarVerifier } from "./nar-service.js";
import { HolderPenalties, type PenaltyOptions } from "./holder-penalties.js";
import { TransferSlots } from "./transfer-slots.js";

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
  /**
   * NAR bytes [offset, narSize); the iterator throws if the peer stops short. The chunks are the
   * caller's to keep: the producer never writes into one it has handed out.
   */
  nar(peerId: string, req: NarRequestFromPeer, signal: AbortSignal): Promise<AsyncIterable<Uint8Array>>;
}

export interface FleetSourceOptions extends PenaltyOptions {
  /** How long a narinfo lookup may wait on peers in all. */
  narinfoDeadlineMs?: number;
  /** After this long without an answer, the next holder is asked as well. */
  hedgeAfterMs?: number;
  /** How long an answer from a peer is reused. */
  cacheTtlMs?: number;
  /** Concurrent NAR transfers asked of one holder (its NAR service answers "busy" past 8). */
  transfersPerHolder?: number;
  /** Longest wait in a holder's queue for a transfer slot before the request fails (a 502). */
  queueDeadlineMs?: number;
  /** A peer NAR answer is held back until verified up to this many bytes (beyond: all but the last chunk flow). */
  holdBytes?: number;
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
  /** NARs from peers that failed NarSize or NarHash. */
  verifyFailures: number;
  /** NAR requests that waited for a slot because every holder was at its transfer limit. */
  queuedTransfers: number;
}

interface Cached {
  info: PathInfo;
  /** Peers that answered with this path (asked first for its NAR). */
  from: string;
  expires: number;
}

const MAX_CACHED = 50_000;
/** Nix waits for a response up to stalled-download-timeout (300 s) before giving up. */
const QUEUE_DEADLINE_MS = 120_000;
/** What one answer holds back until verified: most store paths' NARs fit whole. */
const HOLD_BYTES = 8 * 1024 * 1024;
/** A holder may still count a transfer that has ended on our side: how often to ask again. */
const MAX_BUSY_RETRIES = 20;
const BUSY_RETRY_MS = 25;

export class FleetSource implements PathSource {
  readonly counters: FleetCounters = { localHits: 0, peerHits: 0, misses: 0, peerQueries: 0, failovers: 0, transferFailures: 0, bytesFromPeers: 0, verifyFailures: 0, queuedTransfers: 0 };
  /** Holders whose bytes failed verification (read by the status document and metrics). */
  readonly penalties: HolderPenalties;
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
  private readonly queueMs: number;
  private readonly holdBytes: number;
  private readonly slots: TransferSlots;

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
    this.queueMs = opts.queueDeadlineMs ?? QUEUE_DEADLINE_MS;
    this.holdBytes = opts.holdBytes ?? HOLD_BYTES;
    this.slots = new TransferSlots(opts.transfersPerHolder ?? MAX_NAR_TRANSFERS_PER_PEER);
    this.penalties = new HolderPenalties(opts);
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

  /** Connected peers announcing the path, fastest first; penalised ones last, barred ones left out. */
  private holders(hashPart: string): string[] {
    const announced = this.index.holders(hashPart);
    if (announced.length === 0) return announced;
    const set = new Set(announced);
    return this.penalties.order(this.peers.connectedPeers().filter((p) => set.has(p)), hashPart);
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
   * NAR bytes from peers, always verified: the whole NAR goes through one NarVerifier (from byte
   * 0 even for a Range, whose bytes before `start` are hashed and dropped), and what the client
   * gets is held back until the hash checks out, up to `holdBytes`; past that, all but the last
   * chunk flow on, so a wrong NAR is still never complete. A holder failing mid-way is replaced
   * at the byte reached (NAR bytes are canonical). Wrong bytes penalise their holders and, while
   * nothing has gone out, the NAR starts over from another holder.
   */
  private async *remoteNar(hashPart: string, info: PathInfo, start: number, end: number): AsyncGenerator<Buffer> {
    const skip = new Set<string>(); // holders that failed this request
    let verifier = new NarVerifier(info.narHash, info.narSize);
    let contributors = new Set<string>();
    let held: Buffer[] = [];
    let heldBytes = 0;
    let sent = false;
    let busy = 0;
    let attempts = 0;
    let allGone = true; // every holder asked answered "not-found" (collected since it announced it)
    let pause = 0; // before asking again after "busy" (with no slot of ours held meanwhile)
    for (;;) {
      if (pause) await sleep(pause);
      pause = 0;
      const peer = await this.holderSlot(hashPart, skip, info.storePath);
      if (peer === undefined) break;
      if (attempts++ > 0) this.counters.failovers++;
      const controller = new AbortController();
      let body = false; // whether the header came and bytes are the peer's
      try {
        const chunks = await this.requests.nar(peer, { hashPart, narHash: info.narHash, offset: verifier.bytes, narSize: info.narSize }, controller.signal);
        body = true;
        contributors.add(peer);
        for await (const c of chunks) {
          const from = verifier.bytes;
          verifier.update(c);
          this.counters.bytesFromPeers += c.length;
          this.bytesFromPeer.set(peer, (this.bytesFromPeer.get(peer) ?? 0) + c.length);
          const [s, e] = [Math.max(from, start), Math.min(verifier.bytes, end)];
          if (e > s) {
            // A view, not a copy: chunks are ours to keep (PeerRequests.nar).
            held.push(Buffer.from(c.buffer, c.byteOffset + (s - from), e - s));
            heldBytes += e - s;
          }
          while (heldBytes > this.holdBytes && held.length > 1) {
            const out = held.shift()!;
            heldBytes -= out.length;
            sent = true;
            yield out;
          }
        }
        verifier.finish();
      } catch (err) {
        const reason = err instanceof NarFetchError ? err.reason : undefined;
        if (reason === "busy") {
          // Its last transfer has not quite ended on its side: ask again shortly, not a failure.
          if (++busy > MAX_BUSY_RETRIES) skip.add(peer);
          attempts--;
          pause = BUSY_RETRY_MS * busy;
          continue;
        }
        if (reason !== "size-mismatch" && reason !== "hash-mismatch") {
          if (reason !== "not-found") allGone = false;
          this.counters.transferFailures++;
          skip.add(peer);
          this.log.warn({ peer, path: info.storePath, offset: verifier.bytes, err: (err as Error).message }, "NAR transfer from peer failed; trying the next holder");
          this.#onError({ message: `NAR transfer failed at byte ${verifier.bytes}: ${(err as Error).message}`, path: info.storePath, peer });
          continue;
        }
        allGone = false;
        // Wrong bytes. A wrong size in the header is this peer's alone; a NAR that fails its
        // hash (or runs long) may have been stitched from several holders: each is barred from
        // this path, and only a sole sender earns a strike as a peer.
        const blamed = body ? [...contributors] : [peer];
        this.counters.verifyFailures++;
        for (const p of blamed) {
          this.penalties.wrongBytes(p, hashPart, blamed.length === 1);
          skip.add(p);
          this.#onError({ message: `wrong NAR bytes (${reason}): ${(err as Error).message}`, path: info.storePath, peer: p });
        }
        this.log.warn({ peers: blamed, path: info.storePath, err: (err as Error).message }, "NAR from peers failed verification; penalised");
        if (!body) continue;
        if (sent) throw new NarUnavailableError(`NAR of ${info.storePath} from peers does not match its NarHash`);
        verifier = new NarVerifier(info.narHash, info.narSize); // start over, nothing went out
        contributors = new Set();
        held = [];
        heldBytes = 0;
        continue;
      } finally {
        controller.abort();
        this.slots.release(peer);
      }
      for (const out of held) yield out;
      return;
    }
    // Nix takes a 404 as "not in this cache" and moves on; a 502 it retries.
    if (!sent && allGone) throw new NarGoneError(`no connected peer holds ${info.storePath} any more`);
    throw new NarUnavailableError(`no peer could send ${info.storePath} (got ${verifier.bytes} of ${info.narSize} bytes)`);
  }

  /**
   * The holder to ask next, with a transfer slot taken on it: the first (fastest, not penalised)
   * one with room; if all are at their limit, a place in the first one's queue. Undefined when no
   * holder is left; NarUnavailableError when the queue's deadline passes.
   */
  private async holderSlot(hashPart: string, skip: Set<string>, storePath: string): Promise<string | undefined> {
    const cachedFrom = this.cache.get(hashPart)?.from;
    const holders = this.holders(hashPart).filter((p) => !skip.has(p));
    const order = cachedFrom && holders.includes(cachedFrom) ? [cachedFrom, ...holders.filter((p) => p !== cachedFrom)] : holders;
    if (order.length === 0) return undefined;
    const free = order.find((p) => this.slots.tryAcquire(p));
    if (free !== undefined) return free;
    this.counters.queuedTransfers++;
    try {
      await this.slots.acquire(order[0]!, this.queueMs);
    } catch (err) {
      throw new NarUnavailableError(`${storePath}: ${(err as Error).message} on ${order.length} busy holder(s)`);
    }
    return order[0]!;
  }
}

function toPathInfo(n: Narinfo): PathInfo {
  const info: PathInfo = { storePath: n.storePath, narHash: n.narHash, narSize: n.narSize, references: n.references, sigs: n.sigs };
  if (n.deriver) info.deriver = n.deriver;
  if (n.ca) info.ca = n.ca;
  return info;
}
