// Static peers and Tailscale hosts as libp2p PeerDiscovery modules: each reports the fleet peers
// it finds as a `peer` event ({ id, multiaddrs }), which libp2p adds to its peer store and
// announces as `peer:discovery`, as it does for mDNS; the peer manager keeps them connected.
// A libp2p discovery event needs a peer ID. A static peer given with /p2p/<id> has one at once;
// one given as "host:port" (the usual form) and a Tailscale host do not: their addresses are
// dialed blind (address-probes.ts) and reported once a dial reaches a fleet peer, which the
// handshake identifies.
import { peerDiscoverySymbol, type PeerDiscovery, type PeerDiscoveryEvents, type PeerId } from "@libp2p/interface";
import { peerIdFromString } from "@libp2p/peer-id";
import type { Multiaddr } from "@multiformats/multiaddr";
import type { Logger } from "../log.js";
import { peerAddr } from "../address.js";
import { AddressProbes, type AddressCandidate, type ProbeHost } from "./address-probes.js";
import { peerIdIn } from "./peer-addresses.js";
import { MAX_BLIND_REDIAL_MS, MAX_REDIAL_MS } from "./redial.js";
import { CallSignals } from "./call-signals.js";
import { readTailscaleStatus, tailscaleDialTargets } from "./tailscale.js";

/** What a discovery module needs once the mesh runs. */
export interface DiscoveryHost extends ProbeHost {
  /** Peer ID string -> key: the fleet. */
  trusted: ReadonlyMap<string, unknown>;
}

export abstract class FleetDiscovery extends EventTarget implements PeerDiscovery {
  readonly [peerDiscoverySymbol] = this;
  abstract readonly [Symbol.toStringTag]: string;
  abstract readonly source: AddressCandidate["source"];
  #listeners = 0;

  /** Starts finding peers (after the node is up and the peer manager listens). */
  abstract begin(host: DiscoveryHost): void;
  abstract end(): void;
  /** Addresses still being tried without a known peer ID. */
  abstract candidates(): AddressCandidate[];

  /** libp2p stops its components with the node. */
  stop(): void {
    this.end();
  }

  protected report(peerId: string, multiaddrs: Multiaddr[]): void {
    let id: PeerId;
    try {
      id = peerIdFromString(peerId);
    } catch {
      return;
    }
    this.safeDispatchEvent("peer", { detail: { id, multiaddrs } });
  }

  // The typed EventTarget libp2p expects of a discovery module.
  override addEventListener(type: string, listener: Listener, options?: AddOptions): void {
    if (listener) this.#listeners++;
    super.addEventListener(type, listener, options);
  }
  override removeEventListener(type: string, listener?: Listener, options?: RemoveOptions): void {
    if (listener) this.#listeners = Math.max(0, this.#listeners - 1);
    if (listener) super.removeEventListener(type, listener, options);
  }
  listenerCount(): number {
    return this.#listeners;
  }
  safeDispatchEvent<Detail>(type: keyof PeerDiscoveryEvents, init?: { detail?: Detail }): boolean {
    return this.dispatchEvent(new CustomEvent(type, init));
  }
}

type Listener = Parameters<EventTarget["addEventListener"]>[1];
type AddOptions = Parameters<EventTarget["addEventListener"]>[2];
type RemoveOptions = Parameters<EventTarget["removeEventListener"]>[2];

/** `--peer` / `peers`: "host:port", "[v6]:port" or multiaddrs, with or without /p2p/<id>. */
export class StaticPeers extends FleetDiscovery {
  readonly [Symbol.toStringTag] = "fleetcache/static-peers";
  readonly source = "static";
  readonly #specs: readonly string[];
  readonly #log: Logger;
  readonly #probes = new AddressProbes("static", MAX_REDIAL_MS, (peerId, addrs) => this.report(peerId, addrs));

  constructor(specs: readonly string[], log: Logger) {
    super();
    this.#specs = specs;
    this.#log = log;
  }

  begin(host: DiscoveryHost): void {
    for (const spec of this.#specs) {
      let ma: Multiaddr;
      try {
        ma = peerAddr(spec);
      } catch (err) {
        this.#log.warn({ peer: spec, err }, "mesh: ignoring invalid static peer");
        continue;
      }
      const id = peerIdIn(ma);
      if (id === undefined) this.#probes.add(ma.toString(), [ma]);
      else if (host.trusted.has(id) && id !== host.self) this.report(id, [ma]);
      else if (id !== host.self) this.#log.warn({ peer: spec }, "mesh: static peer's ID is not derived from a trusted key; not dialing it");
    }
    this.#probes.begin(host);
  }

  end(): void {
    this.#probes.end();
  }

  candidates(): AddressCandidate[] {
    return this.#probes.list();
  }
}

export interface TailscaleOptions {
  /** Default ["tailscale", "status", "--json"]. */
  statusCommand?: string[];
  /** For tests: read the JSON from this file instead of running the command. */
  statusFile?: string;
  /** Our mesh port, dialed on every online Tailscale peer. */
  port: number;
  /** How often to re-read the status (default 30 s). */
  intervalMs?: number;
}

/**
 * Every online host of the tailnet, at our mesh port (tailnets have no multicast for mDNS).
 * Most are not fleet members (phones, printers): the gater refuses them, and their blind dials
 * back off to a minute.
 */
export class TailscalePeers extends FleetDiscovery {
  readonly [Symbol.toStringTag] = "fleetcache/tailscale";
  readonly source = "tailscale";
  readonly #opts: TailscaleOptions;
  readonly #log: Logger;
  readonly #probes = new AddressProbes("tailscale", MAX_BLIND_REDIAL_MS, (peerId, addrs) => this.report(peerId, addrs));
  #timer: NodeJS.Timeout | undefined;
  #stop = new AbortController();
  readonly #calls = new CallSignals(); // each status read's deadline (call-signals.ts)
  /** Told after each status read how many online hosts it listed (for tests and diagnostics). */
  onPoll: ((targets: number) => void) | undefined;

  constructor(opts: TailscaleOptions, log: Logger) {
    super();
    this.#opts = opts;
    this.#log = log;
  }

  begin(host: DiscoveryHost): void {
    this.#stop = new AbortController();
    this.#probes.begin(host);
    void this.#poll();
    this.#timer = setInterval(() => void this.#poll(), this.#opts.intervalMs ?? 30_000);
    this.#timer.unref();
  }

  end(): void {
    this.#stop.abort(new Error("discovery stopped"));
    this.#calls.abortAll(new Error("discovery stopped"));
    clearInterval(this.#timer);
    this.#probes.end();
  }

  candidates(): AddressCandidate[] {
    return this.#probes.list();
  }

  async #poll(): Promise<void> {
    const stop = this.#stop.signal;
    let targets;
    try {
      targets = tailscaleDialTargets(await readTailscaleStatus(this.#opts, this.#calls.signal(15_000)), this.#opts.port);
    } catch (err) {
      if (!stop.aborted) this.#log.warn({ err }, "mesh: reading the Tailscale status failed");
      return;
    }
    if (stop.aborted) return;
    // Hosts that went offline or left the tailnet are no longer worth dialing blind; the ones
    // already known as peers keep their addresses in their entries.
    const keys = new Set<string>();
    for (const t of targets) {
      const key = t.addrs.map(String).join(",");
      keys.add(key);
      this.#probes.add(key, t.addrs);
    }
    this.#probes.retain(keys);
    this.onPoll?.(targets.length);
  }
}
