// The PathSource the HTTP side uses when the mesh is on: this host's store first, then the peers
// whose summaries say they may hold the path. A path no connected peer announces is a miss
// without a question to any peer (the summaries are in memory); otherwise the closest holders
// are asked, with a short deadline. NARs come from the fastest holder with a free transfer slot
// (or wait in a queue for one), are verified whole against the narinfo, and a holder whose bytes
// are wrong is passed over (holder-penalties.ts). Who holds what comes from the fleet table
// (fleet-table.ts); a path whose only holders are reconnecting waits for them, briefly.
import { setTimeout as sleep } from "node:timers/promises";
import type { Narinfo } from "../../protocol/narinfo.js";
import type { PathInfo } from "../../protocol/path-info.js";
import { hashPartOf } from "../../protocol/store-path.js";
import type { Logger } from "../log.js";
import { NarGoneError, NarUnavailableError, NOT_NOW, SOON, type NarPieceOptions, type PathSource } from "../source.js";
import type { NarPiece } from "../store/nar-dump.js";
import type { LocalStore } from "../store/local-store.js";
import { MAX_NAR_TRANSFERS_PER_PEER, NarFetchError, NarVerifier } from "./nar-service.js";
import type { HolderPenalties } from "./holder-penalties.js";
import type { FleetView } from "./fleet-table.js";
import { TransferSlots } from "./transfer-slots.js";
import { HeldNar } from "./held-nar.js";
import { MAX_HOLDERS_ASKED, TrustPolicy, type PeerAnswer } from "./trust-policy.js";
import type { UpstreamAnswer, UpstreamCheck } from "./upstream-check.js";


export interface NarRequestFromPeer {
  hashPart: string;
  narHash: string;
  offset: number;
  narSize: number;
}

/** Requests to one peer (the narinfo and NAR services' requester sides). */
export interface PeerRequests {
  /** A verified narinfo (a fleet or upstream signature, matching store path), or undefined. */
  narinfo(peerId: string, hashPart: string, signal: AbortSignal): Promise<Narinfo | undefined>;
  /**
   * NAR bytes [offset, narSize); the iterator throws if the peer stops short. The chunks are the
   * caller's to keep: the producer never writes into one it has handed out.
   */
  nar(peerId: string, req: NarRequestFromPeer, signal: AbortSignal): Promise<AsyncIterable<Uint8Array>>;
  /**
   * LAN-direct NARs (DirectRoutes.url): a URL where Nix fetches the whole NAR from this holder
   * itself, or undefined; never throws. Absent: every NAR is relayed.
   */
  direct?(peerId: string, req: Omit<NarRequestFromPeer, "offset">): Promise<string | undefined>;
  /**
   * The holder Nix was lately redirected to for this NAR (DirectRoutes.redirectedTo): Nix asking
   * for it again means that may have failed, so that holder is asked first when it is relayed,
   * and its bytes checked.
   */
  redirectedTo?(hashPart: string): string | undefined;
}

export interface FleetSourceOptions {
  /** How long a narinfo lookup may wait on peers in all (longer over a slow link: see rttMs). */
  narinfoDeadlineMs?: number;
  /**
   * The measured round trip to a peer (the mesh connection's pings), if known. A lookup's deadline
   * is at least RTT_DEADLINE_FACTOR times the best holder's, up to maxNarinfoDeadlineMs.
   */
  rttMs?: (peer: string) => number | undefined;
  /** The most an RTT may stretch a lookup's deadline to (default 6 s). */
  maxNarinfoDeadlineMs?: number;
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
  /**
   * A NAR up to this size is held whole until verified (past `holdBytes`, in a temporary file),
   * so no byte of a wrong NAR reaches the client; a larger one streams with its last chunk held.
   */
  spoolBytes?: number;
  /**
   * Longest wait, when a path's only holders are reconnecting (fleet-table.ts), for one of them
   * to be back before the lookup is a miss (default 5 s: an agent restart; well under Nix's timeouts).
   */
  reconnectWaitMs?: number;
  /** Which narinfos to believe (default: no upstream keys, the first verified answer). */
  trust?: TrustPolicy;
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
  /** Fleet-only narinfos from peers that contradicted an upstream signature for the path (the holder is penalised). */
  narinfoConflicts: number;
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
/** A narinfo lookup waits at least this many times the best holder's measured round trip... */
const RTT_DEADLINE_FACTOR = 3;
/** ...but never longer than this (Nix's narinfo lookups have no deadline of their own short of curl's). */
const MAX_NARINFO_DEADLINE_MS = 6_000;
/** What one answer holds back in memory until verified: most store paths' NARs fit whole. */
const HOLD_BYTES = 8 * 1024 * 1024;
/**
 * Larger NARs up to this size are held whole in a temporary file until verified. Nix gives a
 * response 300 s without a byte (stalled-download-timeout), so this is also what a peer must be
 * able to send in that time; larger NARs stream (see HeldNar).
 */
const SPOOL_BYTES = 1024 * 1024 * 1024;
/** A holder may still count a transfer that has ended on our side: how often to ask again. */
const MAX_BUSY_RETRIES = 20;
const BUSY_RETRY_MS = 25;
/** An agent restart measured 2-5 s from SIGTERM to its peers reconnected (FAULTS.md, restart-under-load). */
const RECONNECT_WAIT_MS = 5_000;

export class FleetSource implements PathSource {
  readonly counters: FleetCounters = { localHits: 0, peerHits: 0, misses: 0, peerQueries: 0, failovers: 0, transferFailures: 0, bytesFromPeers: 0, verifyFailures: 0, queuedTransfers: 0, narinfoConflicts: 0 };
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
  private readonly maxDeadlineMs: number;
  private readonly rttMs: (peer: string) => number | undefined;
  private readonly hedgeMs: number;
  private readonly ttlMs: number;
  private readonly queueMs: number;
  private readonly holdBytes: number;
  private readonly spoolBytes: number;
  private readonly slots: TransferSlots;
  private readonly reconnectWaitMs: number;
  private readonly trust: TrustPolicy;

  constructor(
    private readonly local: LocalStore,
    private readonly fleet: FleetView,
    private readonly requests: PeerRequests,
    private readonly log: Logger,
    opts: FleetSourceOptions = {},
  ) {
    this.deadlineMs = opts.narinfoDeadlineMs ?? 2000;
    this.maxDeadlineMs = Math.max(this.deadlineMs, opts.maxNarinfoDeadlineMs ?? MAX_NARINFO_DEADLINE_MS);
    this.rttMs = opts.rttMs ?? (() => undefined);
    this.hedgeMs = opts.hedgeAfterMs ?? 250;
    this.ttlMs = opts.cacheTtlMs ?? 30_000;
    this.#onError = opts.onError ?? (() => {});
    this.queueMs = opts.queueDeadlineMs ?? QUEUE_DEADLINE_MS;
    this.holdBytes = opts.holdBytes ?? HOLD_BYTES;
    this.spoolBytes = opts.spoolBytes ?? SPOOL_BYTES;
    this.slots = new TransferSlots(opts.transfersPerHolder ?? MAX_NAR_TRANSFERS_PER_PEER);
    this.reconnectWaitMs = opts.reconnectWaitMs ?? RECONNECT_WAIT_MS;
    this.penalties = fleet.holderPenalties;
    this.trust = opts.trust ?? new TrustPolicy([]);
  }

  /** The upstream check, if configured (its counters are shown in status and metrics). */
  get upstreamCheck(): UpstreamCheck | undefined {
    return this.trust.upstream;
  }

  /** Whether `info` came from a peer rather than this host's store. */
  fromPeer(info: PathInfo): boolean {
    return this.#fromPeers.has(info);
  }

  /**
   * The answer without waiting, when there is one: a path in this host's store (as the store
   * knows it without I/O), one that no connected or reconnecting peer holds (a miss, from the
   * summaries in memory), or a peer's answer still cached. Anything that needs a peer, or the
   * daemon, is NOT_NOW; SOON when the local store says so (asked again from whenSoon()).
   */
  pathInfoNow(hashPart: string): PathInfo | undefined | typeof NOT_NOW | typeof SOON {
    const local = this.local.pathInfoNow(hashPart);
    if (local === NOT_NOW || local === SOON) return local;
    if (local) {
      this.counters.localHits++;
      return local;
    }
    const holders = this.holders(hashPart);
    if (holders.length === 0) {
      if (this.mayWaitFor(hashPart)) return NOT_NOW;
      this.counters.misses++;
      return undefined;
    }
    const cached = this.cache.get(hashPart);
    if (cached && cached.expires > Date.now() && holders.includes(cached.from)) {
      this.counters.peerHits++;
      return cached.info;
    }
    return NOT_NOW;
  }

  /** After pathInfoNow() said SOON: the local store's (see PathSource.whenSoon). */
  whenSoon(run: () => void): void {
    this.local.whenSoon(run);
  }

  async pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    const local = await this.local.pathInfo(hashPart);
    if (local) {
      this.counters.localHits++;
      return local;
    }
    const holders = await this.holdersOrWait(hashPart);
    if (holders.length === 0) {
      this.counters.misses++;
      return undefined; // no connected peer announces it: answered without any network traffic
    }
    const cached = this.cache.get(hashPart);
    if (cached && cached.expires > Date.now() && holders.includes(cached.from)) {
      this.counters.peerHits++;
      return cached.info;
    }
    let info = await this.ask(hashPart, holders);
    // The holders we asked went away meanwhile (a restart begun as we asked): wait for them once.
    if (!info && this.holders(hashPart).length === 0) {
      const back = await this.holdersOrWait(hashPart);
      if (back.length > 0) info = await this.ask(hashPart, back);
    }
    if (info) this.counters.peerHits++;
    else this.counters.misses++;
    return info;
  }

  narStream(info: PathInfo, start: number, end: number, readSize?: () => number): AsyncGenerator<Buffer> {
    // Without regionMin the local store yields Buffers only.
    return this.narPieces(info, start, end, { ...(readSize ? { readSize } : {}) }) as AsyncGenerator<Buffer>;
  }

  /**
   * A URL on the chosen holder's direct port for the whole NAR (PathSource.directUrl), when the
   * requests can get one: only for a path from a peer that this host does not hold itself, and
   * from the holder its NAR would be relayed from first. Undefined: relay it.
   */
  async directUrl(info: PathInfo): Promise<string | undefined> {
    if (!this.requests.direct || !this.#fromPeers.has(info)) return undefined;
    const hashPart = hashPartOf(info.storePath);
    try {
      const local = await this.local.pathInfo(hashPart);
      if (local && local.narHash === info.narHash) return undefined;
    } catch {
      return undefined;
    }
    // As holderSlot orders them: the holder whose narinfo we have, else the fastest unpenalised one.
    const holders = this.holders(hashPart);
    const cachedFrom = this.cache.get(hashPart)?.from;
    const peer = cachedFrom !== undefined && holders.includes(cachedFrom) ? cachedFrom : holders[0];
    // A holder caught with wrong bytes lately is relayed, verified, rather than trusted to Nix.
    if (peer === undefined || this.penalties.caughtLately(peer)) return undefined;
    return this.requests.direct(peer, { hashPart, narHash: info.narHash, narSize: info.narSize });
  }

  /** From this host's store when it holds the path (FileRegions as asked), else from peers (Buffers). */
  async *narPieces(info: PathInfo, start: number, end: number, opts: NarPieceOptions = {}): AsyncGenerator<NarPiece> {
    const hashPart = hashPartOf(info.storePath);
    const local = await this.local.pathInfo(hashPart);
    if (local && local.narHash === info.narHash) {
      let sent = false;
      try {
        for await (const chunk of this.local.narPieces(local, start, end, opts)) {
          sent = true;
          yield chunk;
        }
        return;
      } catch (e) {
        // Collected here before its first byte went out: a peer may still hold it.
        if (sent || !(e instanceof NarGoneError)) throw e;
      }
    }
    // Timed for bench/mesh.ts: from the request to the first byte (the fetch and verification:
    // a peer NAR is held until verified), then to the last (the client taking it).
    const asked = performance.now();
    let first = 0;
    for await (const c of this.remoteNar(hashPart, info, start, end)) {
      first ||= performance.now();
      yield c;
    }
    this.log.debug({ path: info.storePath, bytes: end - start, fetchMs: Math.round(first - asked), sendMs: ms(first) }, "peer NAR sent");
  }

  /** Concurrent lookups of one path (Nix's HEAD then GET) share one round of questions. */
  private ask(hashPart: string, holders: string[]): Promise<PathInfo | undefined> {
    let pending = this.inflight.get(hashPart);
    if (!pending) {
      pending = this.askPeers(hashPart, holders).finally(() => this.inflight.delete(hashPart));
      this.inflight.set(hashPart, pending);
    }
    return pending;
  }

  /** Connected peers announcing the path, fastest first; penalised ones last, barred ones left out. */
  private holders(hashPart: string): string[] {
    const connected = this.fleet.holders(hashPart);
    return connected.length === 0 ? connected : this.penalties.order(connected, hashPart);
  }

  /**
   * The path's connected holders; when there are none but a holder of it is reconnecting (an
   * agent restarting), waits up to reconnectWaitMs for one to be back rather than answer a miss
   * that Nix would remember (narinfo-cache-negative-ttl). Empty when none is back by then.
   */
  private async holdersOrWait(hashPart: string): Promise<string[]> {
    let holders = this.holders(hashPart);
    if (holders.length > 0 || !this.mayWaitFor(hashPart)) return holders;
    const deadline = Date.now() + this.reconnectWaitMs;
    while (holders.length === 0 && Date.now() < deadline && this.mayWaitFor(hashPart)) {
      await this.fleetChange(deadline - Date.now());
      holders = this.holders(hashPart);
    }
    return holders;
  }

  /** Whether a holder of the path is reconnecting, and lookups wait for such holders. */
  private mayWaitFor(hashPart: string): boolean {
    return this.reconnectWaitMs > 0 && this.penalties.order(this.fleet.reconnectingHolders(hashPart), hashPart).length > 0;
  }

  /** Resolves at the fleet table's next change, or after `ms`. */
  private fleetChange(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        off();
        resolve();
      };
      const timer = setTimeout(done, ms);
      const off = this.fleet.onChange(done);
    });
  }

  /**
   * How long a lookup waits on `holders` in all: the configured deadline, stretched over a link
   * whose measured round trip is long. A lookup shares the mesh connection with NAR bodies, and
   * over a busy WAN link it queues behind them as the pings do (the fault suite's wan-latency:
   * pings up to 1 s over a 60 ms link carrying a NAR, and 3 of 287 lookups of a held path answered
   * 404 at the 2 s deadline). The pings come every 10 s, and a NAR fills the link's queue in well
   * under that: while any peer NAR is in flight here the lookup gets the cap outright (this host's
   * link carries those bytes whichever peer sends them, and the holder asked may be behind the
   * same bottleneck). A dead holder still cannot hold Nix up for more than the cap.
   */
  private lookupDeadlineMs(holders: string[]): number {
    if (this.slots.total > 0) return this.maxDeadlineMs;
    let best: number | undefined;
    for (const h of holders) {
      const rtt = this.rttMs(h);
      if (rtt !== undefined && (best === undefined || rtt < best)) best = rtt;
    }
    return best === undefined ? this.deadlineMs : Math.min(this.maxDeadlineMs, Math.max(this.deadlineMs, RTT_DEADLINE_FACTOR * best));
  }

  /**
   * Asks the holders in order, starting the next one when the previous has not answered within
   * the hedge delay (or has answered "no"); the deadline bounds the whole lookup so a dead peer
   * never holds Nix up. An answer with an upstream signature (or whose store path names its
   * contents) wins at once; another fleet-only one is
   * weighed against the other holders' answers and upstream's (trust-policy.ts): all holders (up
   * to MAX_HOLDERS_ASKED) are then asked at once, and the upstream check started.
   */
  private askPeers(hashPart: string, holders: string[]): Promise<PathInfo | undefined> {
    const controller = new AbortController();
    const deadline = setTimeout(() => {
      settle();
      controller.abort();
    }, this.lookupDeadlineMs(holders));
    const answers: PeerAnswer[] = [];
    const started = performance.now();
    const took: Record<string, number> = {}; // ms to each holder's answer (debug log: where a lookup's time goes)
    let upstream: UpstreamAnswer | "pending" | undefined; // undefined: not asked (none configured, or no fleet-only answer)
    let settle = () => {};
    return new Promise<PathInfo | undefined>((resolve) => {
      let next = 0;
      let outstanding = 0;
      let all = false; // a fleet-only answer came: ask every holder, wait for all
      let done = false;
      let hedge: NodeJS.Timeout | undefined;
      let decideBy: NodeJS.Timeout | undefined; // once a fleet-only answer is in hand
      // Once upstream's contents are known, answers still on their way (until the deadline) are
      // judged too, so a forger that answers late is penalised all the same.
      let lateJudge: ((peer: string, narinfo: Narinfo) => void) | undefined;
      /** Stops every request still under way (and the deadline): once done, and nobody's late answer is awaited. */
      const stop = () => {
        if (!done || (lateJudge && outstanding > 0)) return;
        clearTimeout(deadline);
        // Only with something to cancel: an abort makes a DOMException (with its stack) and runs
        // every dependent signal's listeners, about 20 µs, on most lookups for nothing.
        if (outstanding > 0 || upstream === "pending") controller.abort();
      };
      const finish = (info: PathInfo | undefined) => {
        if (done) return;
        done = true;
        clearTimeout(hedge);
        clearTimeout(decideBy);
        stop();
        resolve(info);
      };
      settle = () => {
        if (done) return;
        const verdict = this.trust.decide(order(answers, holders), upstream !== "pending" && upstream?.kind === "signed" ? upstream.narinfo : undefined);
        if (this.log.isLevelEnabled("debug")) {
          this.log.debug({ hashPart, ms: ms(started), answers: took, upstream: upstream === "pending" ? "pending" : upstream?.kind, chosen: verdict.chosen?.peer }, "narinfo lookup decided");
        }
        for (const peer of verdict.losers) this.#contradicted(peer, hashPart);
        if (verdict.upstreamSigned.size > 0) {
          lateJudge = (peer, n) => {
            if (this.trust.contradicts(n, verdict.upstreamSigned)) this.#contradicted(peer, hashPart);
          };
        }
        if (!verdict.chosen) return finish(undefined);
        const info = toPathInfo(verdict.chosen.narinfo);
        this.#fromPeers.add(info);
        this.remember(hashPart, info, verdict.chosen.peer);
        finish(info);
      };
      // Once a fleet-only answer is in: up to MAX_HOLDERS_ASKED holders answer (a "no" makes room for another).
      const moreToAsk = () => next < holders.length && answers.length + outstanding < MAX_HOLDERS_ASKED;
      const maybeSettle = () => {
        if (outstanding === 0 && upstream !== "pending" && !moreToAsk()) settle();
      };
      const onAnswer = (peer: string, narinfo: Narinfo) => {
        answers.push({ peer, narinfo });
        took[peer] = ms(started);
        if (this.trust.conclusive(narinfo)) return settle();
        if (all) return maybeSettle();
        all = true;
        // The others' answers are awaited up to the configured deadline only: the stretch (see
        // lookupDeadlineMs) is there so that a held path is not a miss for want of any answer, and
        // a stopped holder must not hold up one in hand that long.
        decideBy = setTimeout(settle, Math.max(0, this.deadlineMs - (performance.now() - started)));
        const check = this.trust.upstream;
        if (check) {
          upstream = "pending";
          void check.lookup(hashPart, controller.signal).then((a) => {
            upstream = a;
            maybeSettle();
          });
        }
        askNext();
      };
      const askNext = () => {
        clearTimeout(hedge);
        if (done) return;
        if (all) {
          while (moreToAsk()) askOne();
          return maybeSettle();
        }
        if (next >= holders.length) {
          if (outstanding === 0) settle();
          return;
        }
        askOne();
        hedge = setTimeout(askNext, this.hedgeMs);
      };
      const askOne = () => {
        const peer = holders[next++]!;
        outstanding++;
        this.counters.peerQueries++;
        this.requests.narinfo(peer, hashPart, controller.signal).then(
          (narinfo) => {
            outstanding--;
            if (done) {
              if (narinfo) lateJudge?.(peer, narinfo);
              return stop();
            }
            if (narinfo) onAnswer(peer, narinfo);
            else askNext();
          },
          (err: unknown) => {
            outstanding--;
            stop();
            this.log.debug({ peer, hashPart, err }, "narinfo request to peer failed");
            // Cancelled because another peer answered first, or the deadline passed: not the peer's fault.
            if (!controller.signal.aborted) this.#onError({ message: `narinfo request failed: ${(err as Error).message ?? String(err)}`, path: hashPart, peer });
            askNext();
          },
        );
      };
      askNext();
    });
  }

  /** A holder's fleet-only answer contradicts what upstream signed: it is passed over for the path, and counted. */
  #contradicted(peer: string, hashPart: string): void {
    this.counters.narinfoConflicts++;
    this.penalties.wrongNarinfo(peer, hashPart);
    this.log.warn({ peer, hashPart }, "a peer's narinfo contradicts an upstream signature for the path; penalised");
    this.#onError({ message: "narinfo contradicts the path's upstream signature (forged or a different build)", path: hashPart, peer });
  }

  private remember(hashPart: string, info: PathInfo, from: string): void {
    if (this.cache.size >= MAX_CACHED) this.cache.delete(this.cache.keys().next().value!);
    this.cache.set(hashPart, { info, from, expires: Date.now() + this.ttlMs });
  }

  /**
   * NAR bytes from peers, always verified: the whole NAR goes through one NarVerifier (from byte
   * 0 even for a Range, whose bytes before `start` are hashed and dropped), and what the client
   * gets is held back until the hash checks out (HeldNar: in memory, then in a temporary file; a
   * NAR over `spoolBytes` streams all but its last chunk, so a wrong one is still never complete). A holder failing mid-way is replaced
   * at the byte reached (NAR bytes are canonical). Wrong bytes penalise their holders and, while
   * nothing has gone out, the NAR starts over from another holder.
   */
  private async *remoteNar(hashPart: string, info: PathInfo, start: number, end: number): AsyncGenerator<Buffer> {
    const skip = new Set<string>(); // holders that failed this request
    let verifier = new NarVerifier(info.narHash, info.narSize);
    let contributors = new Set<string>();
    const hold = () => new HeldNar(this.holdBytes, info.narSize <= this.spoolBytes);
    let held = hold();
    let sent = false;
    let busy = 0;
    let attempts = 0;
    let allGone = true; // every holder asked answered "not-found" (collected since it announced it)
    let pause = 0; // before asking again after "busy" (with no slot of ours held meanwhile)
    try {
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
            // Held before it is hashed: if holding fails (a full disk), the verifier has not
            // counted the chunk either, and the next holder resumes where both agree.
            const [s, e] = [Math.max(from, start), Math.min(from + c.length, end)];
            if (e > s) {
              for (const out of await held.push(c.subarray(s - from, e - from))) {
                sent = true;
                yield out;
              }
            }
            verifier.update(c);
            this.counters.bytesFromPeers += c.length;
            this.bytesFromPeer.set(peer, (this.bytesFromPeer.get(peer) ?? 0) + c.length);
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
          if (reason === "corrupt") {
            // A compressed stream that does not decode: this holder's fault alone. What it decoded
            // before is checked by the NarHash at the end like any bytes; start over if we can.
            allGone = false;
            this.counters.verifyFailures++;
            this.penalties.wrongBytes(peer, hashPart, true);
            skip.add(peer);
            this.log.warn({ peer, path: info.storePath, offset: verifier.bytes, err: (err as Error).message }, "corrupt NAR stream from peer; penalised");
            this.#onError({ message: `corrupt compressed NAR stream: ${(err as Error).message}`, path: info.storePath, peer });
            if (!sent) {
              verifier = new NarVerifier(info.narHash, info.narSize);
              contributors = new Set();
              await held.discard();
              held = hold();
            }
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
          const narinfoFrom = this.cache.get(hashPart)?.from;
          if (!body && reason === "size-mismatch" && narinfoFrom !== undefined && narinfoFrom !== peer) {
            // Its size differs from the one in a narinfo another holder gave (the NarHash agrees):
            // either may lie, and a forger must not get an honest holder penalised. Passed over.
            skip.add(peer);
            this.log.warn({ peer, path: info.storePath, err: (err as Error).message }, "a holder's NAR size differs from the narinfo's (another holder's); trying the next holder");
            this.#onError({ message: `NAR size differs from the narinfo's: ${(err as Error).message}`, path: info.storePath, peer });
            continue;
          }
          // Wrong bytes. A wrong size in the header is this peer's alone (its own narinfo said otherwise); a NAR that fails its
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
          await held.discard();
          held = hold();
          continue;
        } finally {
          controller.abort();
          this.slots.release(peer);
        }
        yield* held.drain();
        return;
      }
    } finally {
      await held.discard(); // the client gone, or a failure: drop what is held (and its file)
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
    // The holder Nix was lately sent to for this NAR (its bytes are the ones to check), else the one whose narinfo we have.
    const first = this.requests.redirectedTo?.(hashPart) ?? this.cache.get(hashPart)?.from;
    const holders = (skip.size === 0 ? await this.holdersOrWait(hashPart) : this.holders(hashPart)).filter((p) => !skip.has(p));
    const order = first && holders.includes(first) ? [first, ...holders.filter((p) => p !== first)] : holders;
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

const ms = (since: number) => Math.round((performance.now() - since) * 10) / 10;

/** Answers in the holders' order of preference (fastest first), not arrival order. */
function order(answers: PeerAnswer[], holders: string[]): PeerAnswer[] {
  return [...answers].sort((a, b) => holders.indexOf(a.peer) - holders.indexOf(b.peer));
}

function toPathInfo(n: Narinfo): PathInfo {
  const info: PathInfo = { storePath: n.storePath, narHash: n.narHash, narSize: n.narSize, references: n.references, sigs: n.sigs };
  if (n.deriver) info.deriver = n.deriver;
  if (n.ca) info.ca = n.ca;
  return info;
}
