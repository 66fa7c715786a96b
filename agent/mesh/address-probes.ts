// Addresses to dial whose peer ID we do not know yet: a static peer given as "host:port", a
// Tailscale host. Only a dial tells who is there (the handshake proves the key; the gater refuses
// anyone outside the fleet), so these are dialed blind, with the redial backoff, until one
// reaches a fleet peer; from then on the peer is known by its ID and the probe is done.
import type { PeerId } from "@libp2p/interface";
import type { Multiaddr } from "@multiformats/multiaddr";
import type { Logger } from "../log.js";
import { tcpAddress } from "./peer-addresses.js";
import { DIAL_TIMEOUT_MS, redialDelay } from "./redial.js";

/** An address to dial whose peer ID we do not know yet (for diagnostics). */
export interface AddressCandidate {
  addrs: string[];
  source: "static" | "tailscale";
  /**
   * Set once a dial reached a (necessarily trusted) peer; the peer entry takes over from then.
   * Our own peer ID when the address is ours: never dialed.
   */
  peerId?: string;
  failures: number;
  nextDialAt?: number;
}

/** What probing needs of the mesh. */
export interface ProbeHost {
  /** Our peer ID. */
  self: string;
  /** Dials the addresses; resolves with the peer reached. */
  dial(addrs: Multiaddr[], signal: AbortSignal): Promise<PeerId>;
  /** Our listen addresses (a fleet-wide peer list usually names this host too). */
  ownAddresses(): Multiaddr[];
  /** A known fleet peer that has one of these addresses (normalised, no /p2p/), if any. */
  knownPeerAt(addrs: ReadonlySet<string | undefined>): string | undefined;
  log: Logger;
  /** First redial delay (default 1 s). */
  dialIntervalMs?: number;
  dialTimeoutMs?: number;
}

interface Candidate {
  addrs: Multiaddr[];
  failures: number;
  nextDialAt?: number;
  peerId?: string;
  dialing: boolean;
}

export class AddressProbes {
  readonly #candidates = new Map<string, Candidate>();
  readonly #onFound: (peerId: string, addrs: Multiaddr[]) => void;
  #host: ProbeHost | undefined;
  #stop = new AbortController();
  #timer: NodeJS.Timeout | undefined;
  #timerAt = Infinity;

  /**
   * `source` labels the candidates; `maxRedialMs` caps their backoff; `onFound` is told the peer
   * an address belongs to, once, when a dial reaches it or a known peer turns out to have it.
   */
  constructor(
    readonly source: AddressCandidate["source"],
    readonly maxRedialMs: number,
    onFound: (peerId: string, addrs: Multiaddr[]) => void,
  ) {
    this.#onFound = onFound;
  }

  begin(host: ProbeHost): void {
    this.#host = host;
    this.#stop = new AbortController();
    this.kick();
  }

  end(): void {
    this.#host = undefined;
    this.#stop.abort(new Error("discovery stopped"));
    clearTimeout(this.#timer);
    this.#timer = undefined;
    this.#timerAt = Infinity;
  }

  add(key: string, addrs: Multiaddr[]): void {
    if (this.#candidates.has(key)) return;
    this.#candidates.set(key, { addrs, failures: 0, dialing: false });
    this.kick();
  }

  /** Forgets the candidates not in `keys` (hosts that left the tailnet or went offline). */
  retain(keys: ReadonlySet<string>): void {
    for (const key of this.#candidates.keys()) if (!keys.has(key)) this.#candidates.delete(key);
  }

  list(): AddressCandidate[] {
    return [...this.#candidates.values()].map((c) => ({
      addrs: c.addrs.map(String),
      source: this.source,
      ...(c.peerId !== undefined && { peerId: c.peerId }),
      failures: c.failures,
      ...(c.nextDialAt !== undefined && { nextDialAt: c.nextDialAt }),
    }));
  }

  /** Starts due dials and arms the timer for the next one. */
  kick(): void {
    const host = this.#host;
    if (!host) return;
    const now = Date.now();
    let next = Infinity;
    for (const c of this.#candidates.values()) {
      if (c.dialing || c.peerId !== undefined) continue;
      if (this.#resolveByAddress(host, c)) continue;
      const at = c.nextDialAt ?? now;
      if (at <= now) void this.#dial(host, c);
      else next = Math.min(next, at);
    }
    if (next < this.#timerAt) {
      clearTimeout(this.#timer);
      this.#timerAt = next;
      this.#timer = setTimeout(() => {
        this.#timerAt = Infinity;
        this.kick();
      }, Math.max(0, next - now));
      this.#timer.unref();
    }
  }

  /** A candidate whose address a known peer already has belongs to that peer: no blind dial. One of our own addresses is us. */
  #resolveByAddress(host: ProbeHost, c: Candidate): boolean {
    const addrs = new Set(c.addrs.map((a) => tcpAddress(a, "")));
    const own = new Set(host.ownAddresses().map((a) => tcpAddress(a, host.self)));
    if ([...addrs].every((a) => own.has(a))) {
      c.peerId = host.self;
      return true;
    }
    const known = host.knownPeerAt(addrs);
    if (known === undefined) return false;
    c.peerId = known;
    this.#onFound(known, c.addrs);
    return true;
  }

  async #dial(host: ProbeHost, c: Candidate): Promise<void> {
    c.dialing = true;
    const stop = this.#stop.signal;
    try {
      const peer = await host.dial(c.addrs, AbortSignal.any([stop, AbortSignal.timeout(host.dialTimeoutMs ?? DIAL_TIMEOUT_MS)]));
      if (stop.aborted) return;
      // The gater let it through, so it is a fleet peer: its entry takes over redialing.
      c.peerId = peer.toString();
      c.failures = 0;
      delete c.nextDialAt;
      this.#onFound(c.peerId, c.addrs);
    } catch (err) {
      if (stop.aborted) return;
      if (err instanceof Error && err.name === "InvalidPeerIdError" && /dial self/.test(err.message)) {
        c.peerId = host.self; // another name for one of our addresses
        return;
      }
      c.failures++;
      c.nextDialAt = Date.now() + redialDelay(c.failures, host.dialIntervalMs ?? 1000, this.maxRedialMs);
      host.log.debug({ addrs: c.addrs.map(String), failures: c.failures, err }, "mesh: dial failed");
    } finally {
      c.dialing = false;
      this.kick();
    }
  }
}
