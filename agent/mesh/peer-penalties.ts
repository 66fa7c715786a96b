// Peers that went over a per-peer limit (summary work, for now): disconnected and refused for a
// backoff that doubles with each offence, so a trusted but misbehaving host costs this agent a
// bounded amount of work however hard it pushes. The gater consults isPenalised() on every dial
// and every handshake; the status document and metrics show the penalties.

export interface Penalty {
  /** Why, for operators ("summary work over budget: ..."). */
  reason: string;
  /** Offences so far. */
  count: number;
  /** Refused until then (ms since the epoch). */
  until: number;
}

export interface PeerPenaltiesOptions {
  /** Backoff after the first offence; doubles per offence up to maxMs (default 1 min, 1 h). */
  baseMs?: number;
  maxMs?: number;
}

export class PeerPenalties {
  readonly #byPeer = new Map<string, Penalty>();
  readonly #base: number;
  readonly #max: number;
  /** Offences since start, all peers. */
  total = 0;

  constructor(opts: PeerPenaltiesOptions = {}) {
    this.#base = opts.baseMs ?? 60_000;
    this.#max = opts.maxMs ?? 3_600_000;
  }

  penalise(peerId: string, reason: string): Penalty {
    const count = (this.#byPeer.get(peerId)?.count ?? 0) + 1;
    const p: Penalty = { reason, count, until: Date.now() + Math.min(this.#max, this.#base * 2 ** Math.min(count - 1, 30)) };
    this.#byPeer.set(peerId, p);
    this.total++;
    return p;
  }

  isPenalised(peerId: string): boolean {
    const p = this.#byPeer.get(peerId);
    return p !== undefined && p.until > Date.now();
  }

  /** The peer's last penalty (also after it expired: the count decides the next backoff). */
  get(peerId: string): Readonly<Penalty> | undefined {
    return this.#byPeer.get(peerId);
  }

  /** Peers refused right now. */
  active(): number {
    let n = 0;
    for (const id of this.#byPeer.keys()) if (this.isPenalised(id)) n++;
    return n;
  }
}
