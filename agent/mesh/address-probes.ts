// Addresses to dial whose peer ID we do not know yet: a static peer given as "host:port", a
// Tailscale host. Only a dial tells who is there (the handshake proves the key; the gater refuses
// anyone outside the fleet), so these are dialed blind, with the redial backoff, until one
// reaches a fleet peer; from then on the peer is known by its ID and the probe is done.
import type { PeerId } from "@libp2p/interface";
import type { Multiaddr } from "@multiformats/multiaddr";
import type { Logger } from "../log.js";
import { tcpAddress } from "./peer-addresses.js";
import { DIAL_TIMEOUT_MS, DialSchedule, type Dialable } from "./redial.js";

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

interface Candidate extends Dialable {
  addrs: Multiaddr[];
  peerId?: string;
}

export class AddressProbes {
  readonly #candidates = new Map<string, Candidate>();
  readonly #onFound: (peerId: string, addrs: Multiaddr[]) => void;
  #host: ProbeHost | undefined;
  #schedule: DialSchedule<Candidate> | undefined;

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
    this.#schedule = new DialSchedule<Candidate>({
      items: () => this.#candidates.values(),
      // A candidate whose address turned out to be a known peer's (or ours) needs no blind dial.
      wanted: (c) => c.peerId === undefined && !this.#resolveByAddress(host, c),
      dial: (c, signal) => this.#dial(host, c, signal),
      failed: (c, err) => host.log.debug({ addrs: c.addrs.map(String), failures: c.failures, err }, "mesh: dial failed"),
      baseMs: host.dialIntervalMs ?? 1000,
      maxMs: this.maxRedialMs,
      timeoutMs: host.dialTimeoutMs ?? DIAL_TIMEOUT_MS,
    });
    this.#schedule.start();
  }

  end(): void {
    this.#host = undefined;
    this.#schedule?.stop();
  }

  add(key: string, addrs: Multiaddr[]): void {
    if (this.#candidates.has(key)) return;
    this.#candidates.set(key, { addrs, failures: 0, dialing: false });
    this.#schedule?.kick();
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

  /** A candidate whose address a known peer already has belongs to that peer. One of our own addresses is us. */
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

  async #dial(host: ProbeHost, c: Candidate, signal: AbortSignal): Promise<void> {
    let peer: PeerId;
    try {
      peer = await host.dial(c.addrs, signal);
    } catch (err) {
      if (err instanceof Error && err.name === "InvalidPeerIdError" && /dial self/.test(err.message)) {
        c.peerId = host.self; // another name for one of our addresses
        return;
      }
      throw err;
    }
    if (this.#host !== host) return; // ended meanwhile
    // The gater let it through, so it is a fleet peer: its entry takes over redialing.
    c.peerId = peer.toString();
    c.failures = 0;
    delete c.nextDialAt;
    this.#onFound(c.peerId, c.addrs);
  }
}
