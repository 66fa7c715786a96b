// Admission of inbound connections before any handshake: who may hold a socket on the mesh port.
// libp2p bounds inbound connections still in their handshake globally (a pending queue) and by
// rate per remote host, but not by count per remote host: one host holding idle sockets fills
// the queue and keeps trusted peers out until it lets go (issue 10, scenario 5).
import type { MultiaddrConnection } from "@libp2p/interface";

/**
 * The connection manager's settings for inbound connections.
 * - `maxIncomingPendingConnections`: sockets in their handshake at once, over all hosts (libp2p:
 *   10). Sized for a fleet rejoining at once (after a restart of the network) while a few hosts
 *   each hold their MAX_INBOUND_PER_HOST sockets idle.
 * - `inboundUpgradeTimeout`: a socket must finish noise + yamux within this (libp2p: 10 s). The
 *   handshake is a few round trips, under 1.5 s on a 300 ms tailnet relay; a silent socket holds
 *   its slot no longer than this.
 * - `inboundConnectionThreshold`: new sockets per second per remote host (libp2p's default, 5,
 *   stated here): a host that reopens faster is refused before anything is read.
 */
export const INBOUND_CONNECTION_SETTINGS = {
  maxIncomingPendingConnections: 128,
  inboundUpgradeTimeout: 3_000,
  inboundConnectionThreshold: 5,
};

/**
 * Inbound sockets one remote host may hold before their handshake is done. A fleet host needs one
 * (two while a simultaneous dial settles); four leaves room and keeps one host from holding more
 * than a small share of the pending queue. Connections that passed the handshake with a trusted
 * key no longer count, so hosts behind one NAT address can all be connected.
 */
export const MAX_INBOUND_PER_HOST = 4;

/** Hosts remembered as recent offenders (refused by the per-host limit), most recent kept. */
export const RECENT_OFFENDERS = 16;

/** A remote host refused by the per-host limit, for status. */
export interface AdmissionOffender {
  host: string;
  /** Sockets refused since it was first listed. */
  refused: number;
  /** When the last one was refused (ms since the epoch). */
  lastRefusedAt: number;
}

/**
 * Counts inbound sockets per remote IP that have not finished their handshake; `deny` refuses one
 * over `max` (for the gater's `denyInboundConnection`, which runs before the handshake). A socket
 * is counted until it closes or `admitted` is called for it (the gater, once a trusted key passed).
 */
export class InboundPerHost {
  readonly #open = new Map<string, number>();
  readonly #counted = new WeakMap<object, () => void>();
  /** Least recently refused first, at most RECENT_OFFENDERS: a flood from many addresses stays bounded. */
  readonly #offenders = new Map<string, AdmissionOffender>();
  /** Sockets refused by the limit, from every host. */
  refused = 0;
  constructor(readonly max = MAX_INBOUND_PER_HOST) {}

  deny(conn: MultiaddrConnection): boolean {
    const host = hostOf(conn);
    if (host === undefined) return false;
    return this.#deny(host, conn, (uncount) => conn.addEventListener("close", uncount, { once: true }));
  }

  /** deny() for a plain socket (the bulk listener's, bulk-listener.ts), by its remote IP. */
  denySocket(host: string | undefined, socket: { once(event: "close", fn: () => void): unknown }): boolean {
    if (host === undefined) return false;
    return this.#deny(host, socket, (uncount) => socket.once("close", uncount));
  }

  #deny(host: string, conn: object, onClose: (uncount: () => void) => void): boolean {
    const n = this.#open.get(host) ?? 0;
    if (n >= this.max) {
      this.#refuse(host);
      return true;
    }
    this.#open.set(host, n + 1);
    let counted = true;
    const uncount = () => {
      if (!counted) return;
      counted = false;
      const left = (this.#open.get(host) ?? 1) - 1;
      if (left > 0) this.#open.set(host, left);
      else this.#open.delete(host);
    };
    this.#counted.set(conn, uncount);
    onClose(uncount);
    return false;
  }

  /** The socket's handshake is done and its peer let in: it no longer holds a pending slot. */
  admitted(conn: object): void {
    this.#counted.get(conn)?.();
  }

  /** Hosts refused lately, the most recent first. */
  offenders(): AdmissionOffender[] {
    return [...this.#offenders.values()].reverse().map((o) => ({ ...o }));
  }

  #refuse(host: string): void {
    this.refused++;
    const o = this.#offenders.get(host) ?? { host, refused: 0, lastRefusedAt: 0 };
    o.refused++;
    o.lastRefusedAt = Date.now();
    this.#offenders.delete(host); // re-inserted last: the map's order is the order of refusal
    this.#offenders.set(host, o);
    if (this.#offenders.size > RECENT_OFFENDERS) this.#offenders.delete(this.#offenders.keys().next().value!);
  }

  /** Open inbound sockets counted for a host (for tests and status). */
  count(host: string): number {
    return this.#open.get(host) ?? 0;
  }
}

function hostOf(conn: MultiaddrConnection): string | undefined {
  for (const c of conn.remoteAddr.getComponents()) if (c.name === "ip4" || c.name === "ip6") return c.value;
  return undefined;
}
