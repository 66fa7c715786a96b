// Holders whose NAR bytes failed NarSize or NarHash, or whose narinfo contradicted an upstream
// signature (trust-policy.ts). Wrong bytes are not only attacks: a store
// file changed on disk, bit rot or a failing disk give the same. Such a holder is not asked for
// that path again for a while (its bytes would be wrong again), and after repeated failures it
// is asked last for every path, so the next attempt, Nix's own retry included, reaches a holder
// with the right bytes.

export interface PenaltyOptions {
  /** How long a holder is passed over for a path whose bytes it got wrong. */
  pathPenaltyMs?: number;
  /** Wrong NARs (within peerPenaltyMs of each other) after which the peer is asked last for everything. */
  strikesBeforePeerPenalty?: number;
  /** How long a penalised peer stays last; also the window in which strikes add up. */
  peerPenaltyMs?: number;
}

export interface PeerPenaltyStatus {
  /** NARs from this peer that failed NarSize or NarHash since the agent started. */
  badNars: number;
  /** Fleet-only narinfos from this peer that contradicted an upstream signature (trust-policy.ts). */
  badNarinfos: number;
  /** Until when (ms since the epoch) the peer is asked last for every path, while that lasts. */
  penalisedUntil?: number;
}

const MAX_PATH_PENALTIES = 10_000;

export class HolderPenalties {
  readonly #pathMs: number;
  readonly #strikes: number;
  readonly #peerMs: number;
  /** "peer hashPart" → until when. */
  readonly #paths = new Map<string, number>();
  readonly #peers = new Map<string, { badNars: number; badNarinfos: number; recent: number[]; until?: number }>();

  constructor(opts: PenaltyOptions = {}) {
    this.#pathMs = opts.pathPenaltyMs ?? 10 * 60_000;
    this.#strikes = opts.strikesBeforePeerPenalty ?? 3;
    this.#peerMs = opts.peerPenaltyMs ?? 10 * 60_000;
  }

  /** Records wrong bytes (size or hash) from `peer` for `hashPart`; `strike`: count it against the peer as a whole. */
  wrongBytes(peer: string, hashPart: string, strike = true, now = Date.now()): void {
    this.#bar(peer, hashPart, now).badNars++;
    if (strike) this.#strike(peer, now);
  }

  /**
   * Records a fleet-only narinfo from `peer` that contradicts the path's upstream signature: a
   * forgery, or its own build of a path that is not reproducible. Either way its version is not
   * the one to serve: barred for the path, and a strike as for wrong bytes.
   */
  wrongNarinfo(peer: string, hashPart: string, now = Date.now()): void {
    this.#bar(peer, hashPart, now).badNarinfos++;
    this.#strike(peer, now);
  }

  #bar(peer: string, hashPart: string, now: number): { badNars: number; badNarinfos: number; recent: number[]; until?: number } {
    if (this.#paths.size >= MAX_PATH_PENALTIES) this.#paths.delete(this.#paths.keys().next().value!);
    this.#paths.set(`${peer} ${hashPart}`, now + this.#pathMs);
    const p = this.#peers.get(peer) ?? { badNars: 0, badNarinfos: 0, recent: [] };
    this.#peers.set(peer, p);
    return p;
  }

  #strike(peer: string, now: number): void {
    const p = this.#peers.get(peer)!;
    p.recent = [...p.recent.filter((t) => t > now - this.#peerMs), now];
    if (p.recent.length >= this.#strikes) p.until = now + this.#peerMs;
  }

  /** Whether `peer` is passed over for this path. */
  barred(peer: string, hashPart: string, now = Date.now()): boolean {
    const key = `${peer} ${hashPart}`;
    const until = this.#paths.get(key);
    if (until === undefined) return false;
    if (until > now) return true;
    this.#paths.delete(key);
    return false;
  }

  /** Whether `peer` is asked last for every path. */
  penalised(peer: string, now = Date.now()): boolean {
    const until = this.#peers.get(peer)?.until;
    return until !== undefined && until > now;
  }

  /**
   * Whether `peer` sent wrong bytes or a contradicted narinfo within peerPenaltyMs (a strike):
   * LAN-direct NARs from it are then relayed and verified, not left to Nix (direct-client.ts).
   */
  caughtLately(peer: string, now = Date.now()): boolean {
    return this.#peers.get(peer)?.recent.some((t) => t > now - this.#peerMs) ?? false;
  }

  /** `peers` with those barred for the path left out and penalised ones moved last (order kept otherwise). */
  order(peers: string[], hashPart: string, now = Date.now()): string[] {
    const allowed = peers.filter((p) => !this.barred(p, hashPart, now));
    return [...allowed.filter((p) => !this.penalised(p, now)), ...allowed.filter((p) => this.penalised(p, now))];
  }

  status(peer: string, now = Date.now()): PeerPenaltyStatus {
    const p = this.#peers.get(peer);
    const out: PeerPenaltyStatus = { badNars: p?.badNars ?? 0, badNarinfos: p?.badNarinfos ?? 0 };
    if (p?.until !== undefined && p.until > now) out.penalisedUntil = p.until;
    return out;
  }

  peersPenalised(now = Date.now()): number {
    let n = 0;
    for (const peer of this.#peers.keys()) if (this.penalised(peer, now)) n++;
    return n;
  }
}
