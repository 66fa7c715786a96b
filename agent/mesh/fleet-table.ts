// The fleet table: one row per fleet peer (key, addresses, connected, RTT, summary, penalties),
// read by FleetSource to route lookups and by the status document, CLI, dashboard and metrics.
// The columns come from the modules that keep them current: the peer manager (who is known and
// connected, addresses, RTT from libp2p's connection monitor), the summary table (what each
// peer announces) and the penalties (holders with wrong bytes, peers over a limit). The table
// itself adds what none of them knows: when a peer went away, so that for a short grace a peer
// that drops (an agent restarting, a blip) is "reconnecting" rather than gone, and a lookup for a
// path only it holds can wait for it instead of answering 404 at once.
import { EventEmitter } from "node:events";
import { HolderPenalties, type PenaltyOptions, type PeerPenaltyStatus } from "./holder-penalties.js";
import type { PeerInfo, PeerManager } from "./peer-manager.js";
import type { PeerPenalties, Penalty } from "./peer-penalties.js";
import type { SummaryTable } from "./summary-table.js";

/** What FleetSource reads of the fleet. */
export interface FleetView {
  /** Connected peers whose summary announces the path, fastest measured RTT first. */
  holders(hashPart: string): string[];
  /**
   * Peers that announced the path and are away for less than the reconnect grace (or connected
   * again, their summary not yet back): a lookup may wait for them.
   */
  reconnectingHolders(hashPart: string): string[];
  /** Calls `fn` whenever a peer connects, goes, leaves its grace, or its summary changes. Returns the unsubscribe. */
  onChange(fn: () => void): () => void;
  /** Holders whose bytes failed verification. */
  readonly holderPenalties: HolderPenalties;
}

export interface FleetRow extends PeerInfo, PeerPenaltyStatus {
  /** Keys in the peer's summary, while it counts for lookups. */
  pathCount?: number;
  /** Away for less than the reconnect grace: lookups of paths only it holds wait for it. */
  reconnecting?: true;
  /** Its last penalty for going over a per-peer limit, if any. */
  penalty?: Penalty;
}

export interface FleetTableOptions extends PenaltyOptions {
  /** How long a peer that went away counts as reconnecting (default 30 s). */
  reconnectGraceMs?: number;
}

/** An agent restart takes 2-5 s, a dropped connection is redialed at once: 30 s covers both with room. */
export const RECONNECT_GRACE_MS = 30_000;

export class FleetTable implements FleetView {
  readonly holderPenalties: HolderPenalties;
  readonly #manager: PeerManager;
  readonly #summaries: SummaryTable;
  readonly #peerPenalties: PeerPenalties | undefined;
  readonly #graceMs: number;
  readonly #events = new EventEmitter<{ change: [] }>();
  /**
   * Peer ID → the timer that ends its grace; kept after it reconnects until
   * its summary counts for lookups again (or the grace ends).
   */
  readonly #away = new Map<string, NodeJS.Timeout>();
  /** Peers whose summary counts for lookups. */
  readonly #ready = new Set<string>();

  constructor(manager: PeerManager, summaries: SummaryTable, peerPenalties: PeerPenalties | undefined, opts: FleetTableOptions = {}) {
    this.#manager = manager;
    this.#summaries = summaries;
    this.#peerPenalties = peerPenalties;
    this.#graceMs = opts.reconnectGraceMs ?? RECONNECT_GRACE_MS;
    this.holderPenalties = new HolderPenalties(opts);
    this.#events.setMaxListeners(0); // one per lookup waiting for a peer, each bounded in time
    // Every fleet member we connect to tells us what it holds (the summary table resubscribes by
    // itself after a reconnect, resuming from the summary it kept).
    manager.on("connected", (peerId) => {
      summaries.subscribe(peerId);
      this.#changed();
    });
    manager.on("disconnected", (peerId) => {
      this.#gone(peerId);
      this.#changed();
    });
    summaries.on("change", (peerId) => {
      if (summaries.pathCount(peerId) !== undefined) {
        this.#ready.add(peerId);
        this.#back(peerId); // resumed: back for lookups
      } else if (this.#ready.delete(peerId)) {
        // Its summary left lookups: the stream ended, often a moment before the connection
        // closes (a publisher stopping first). The grace starts now.
        this.#gone(peerId);
      }
      this.#changed();
    });
  }

  holders(hashPart: string): string[] {
    const announced = this.#summaries.holders(hashPart);
    if (announced.length === 0) return announced;
    const set = new Set(announced);
    return this.#manager.connectedPeers().filter((p) => set.has(p));
  }

  reconnectingHolders(hashPart: string): string[] {
    const kept = this.#summaries.keptHolders(hashPart);
    if (kept.length === 0) return kept;
    // Only within the grace: a connected peer whose summary stays out of lookups is not waited for.
    return kept.filter((p) => this.#away.has(p) && !this.#peerPenalties?.isPenalised(p));
  }

  onChange(fn: () => void): () => void {
    this.#events.on("change", fn);
    return () => this.#events.off("change", fn);
  }

  /** Every known fleet peer, for the status document and gauges. */
  rows(): FleetRow[] {
    return this.#manager.peers().map((p) => {
      const penalty = this.#peerPenalties?.get(p.peerId);
      return {
        ...p,
        ...(this.#summaries.pathCount(p.peerId) !== undefined && { pathCount: this.#summaries.pathCount(p.peerId)! }),
        ...(!p.connected && this.#away.has(p.peerId) && { reconnecting: true as const }),
        ...this.holderPenalties.status(p.peerId),
        ...(penalty && { penalty: { ...penalty } }),
      };
    });
  }

  stop(): void {
    for (const timer of this.#away.values()) clearTimeout(timer);
    this.#away.clear();
    this.#events.removeAllListeners();
  }

  #gone(peerId: string): void {
    this.#back(peerId);
    const timer = setTimeout(() => {
      this.#away.delete(peerId);
      this.#changed(); // lookups waiting for it give up now
    }, this.#graceMs);
    timer.unref();
    this.#away.set(peerId, timer);
  }

  #back(peerId: string): void {
    const timer = this.#away.get(peerId);
    if (!timer) return;
    clearTimeout(timer);
    this.#away.delete(peerId);
  }

  #changed(): void {
    this.#events.emit("change");
  }
}
