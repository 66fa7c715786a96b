// Keeps the mesh connected: learns fleet peers from the discovery modules (static peers and
// Tailscale: fleet-discovery.ts; mDNS: libp2p's), peer exchange and inbound connections; redials
// the ones that drop with capped exponential backoff (redial.ts);
// orders peers by the RTT that libp2p's connection monitor measures, so lookups ask the fastest
// peer first. Liveness is the monitor's too (node.ts): it pings every connection and closes the
// ones that stop answering; a second pinger here made the two collide. Nothing here blocks a
// caller: every dial, ping and exchange runs in the background with a short deadline, and
// connectedPeers() only ever lists peers with a live connection.
import { EventEmitter } from "node:events";
import { multiaddr, type Multiaddr } from "@multiformats/multiaddr";
import { peerIdFromString } from "@libp2p/peer-id";
import type { IdentifyResult, PeerId, PeerInfo as Libp2pPeerInfo } from "@libp2p/interface";
import type { Logger } from "../log.js";
import { formatPublicKey, type PublicKey } from "../../protocol/keys.js";
import { PROTOCOL_PEERS, type PeerRecord } from "../../protocol/peer-codec.js";
import type { MeshNode } from "./node.js";
import { fetchPeers, servePeerExchange } from "./peer-exchange.js";
import { dialableFirst, tcpAddress } from "./peer-addresses.js";
import { DialSchedule, MAX_QUICK_REDIAL_MS, MAX_REDIAL_MS, QUICK_REDIAL_WINDOW_MS, type Dialable } from "./redial.js";
import { CallSignals } from "./call-signals.js";
import type { AddressCandidate } from "./address-probes.js";
import { StaticPeers, TailscalePeers, type FleetDiscovery, type TailscaleOptions } from "./fleet-discovery.js";

export type { AddressCandidate } from "./address-probes.js";
export type { TailscaleOptions } from "./fleet-discovery.js";

export type PeerSource = "static" | "mdns" | "px" | "tailscale" | "inbound";
const SOURCE_ORDER: readonly PeerSource[] = ["static", "mdns", "px", "tailscale", "inbound"];

export interface PeerInfo {
  peerId: string;
  /** Nix key name. */
  name: string;
  /** "name:base64", as given to --trusted-key. */
  publicKey: string;
  /** Multiaddrs without /p2p/, the likely dialable ones first. */
  addresses: string[];
  connected: boolean;
  /** The connection monitor's last ping of the peer (the fastest connection's), once it pinged. */
  rttMs?: number;
  /**
   * Now while connected (the monitor closes a connection whose ping fails, so a connected peer
   * answered within the last ping interval); when the connection closed otherwise (ms since the epoch).
   */
  lastSeen?: number;
  sources: PeerSource[];
  /** Failed dials since the last successful connection. */
  failures: number;
  /** When the next redial is due, while disconnected. */
  nextDialAt?: number;
}

export interface PeerManagerOptions {
  /** "host:port", "[v6]:port" or multiaddrs (with or without /p2p/<id>). */
  staticPeers: string[];
  tailscale?: TailscaleOptions;
  /**
   * The discovery modules for staticPeers and tailscale, when the node was given them (so
   * libp2p sees their finds too); made here otherwise.
   */
  discovery?: FleetDiscovery[];
  log: Logger;
  /**
   * First redial delay; it doubles per failure up to 10 s (2 s in the first 30 s after a drop; 60 s
   * for Tailscale hosts not yet known), with ±25 % jitter (default 1 s).
   */
  dialIntervalMs?: number;
  /** Per-dial deadline (default 5 s). */
  dialTimeoutMs?: number;
  /** How often connected peers are asked for their peers, besides once on connecting (default 5 min). */
  exchangeIntervalMs?: number;
}

const MAX_ADDRESSES = 16;
const EXCHANGE_TIMEOUT_MS = 10_000;

interface Entry extends Dialable {
  peerId: string;
  id: PeerId;
  key: PublicKey;
  /** Normalised multiaddr strings (no /p2p/), oldest first. */
  addresses: string[];
  /** Addresses from configuration (static, Tailscale): never evicted by learned ones. */
  pinned: Set<string>;
  sources: Set<PeerSource>;
  connected: boolean;
  /** When the peer was last connected (ms since the epoch). */
  lastSeen?: number;
  exchanging: boolean;
}

export class PeerManager extends EventEmitter<{
  connected: [peerId: string];
  disconnected: [peerId: string];
  /** A Tailscale status was read and its online hosts taken as dial targets. */
  tailscale: [targets: number];
}> {
  readonly #node: MeshNode;
  readonly #opts: PeerManagerOptions;
  readonly #log: Logger;
  readonly #self: string;
  readonly #peers = new Map<string, Entry>();
  readonly #discovery: FleetDiscovery[];
  /** Peers our discovery modules reported (libp2p's peer:discovery for them is not mDNS). */
  readonly #reported = new Set<string>();
  readonly #redials: DialSchedule<Entry>;
  /** Deadlines of dials and exchanges, all aborted by stop() (no AbortSignal.any: call-signals.ts). */
  readonly #calls = new CallSignals();
  #running = false;
  #intervals: NodeJS.Timeout[] = [];
  #unlisten: (() => void)[] = [];

  constructor(node: MeshNode, opts: PeerManagerOptions) {
    super();
    this.#node = node;
    this.#opts = opts;
    this.#log = opts.log;
    this.#self = node.peerId.toString();
    this.#discovery = opts.discovery ?? [
      ...(opts.staticPeers.length > 0 ? [new StaticPeers(opts.staticPeers, opts.log)] : []),
      ...(opts.tailscale ? [new TailscalePeers(opts.tailscale, opts.log)] : []),
    ];
    this.#redials = new DialSchedule<Entry>({
      items: () => this.#peers.values(),
      wanted: (e) => !e.connected,
      // peer:connect does the bookkeeping of a dial that succeeds (it may already have).
      dial: async (e, signal) => {
        const target = e.addresses.length > 0 ? dialableFirst(e.addresses).map((a) => multiaddr(`${a}/p2p/${e.peerId}`)) : e.id;
        await node.libp2p.dial(target, { signal });
      },
      failed: (e, err) => this.#log.debug({ peer: e.key.name, failures: e.failures, err }, "mesh: dial failed"),
      // Just dropped: likely back within seconds (a restart), and lookups may be waiting for it.
      maxMs: (e) => (e.lastSeen !== undefined && Date.now() - e.lastSeen < QUICK_REDIAL_WINDOW_MS ? MAX_QUICK_REDIAL_MS : MAX_REDIAL_MS),
      ...(opts.dialIntervalMs !== undefined && { baseMs: opts.dialIntervalMs }),
      ...(opts.dialTimeoutMs !== undefined && { timeoutMs: opts.dialTimeoutMs }),
    });
  }

  async start(): Promise<void> {
    if (this.#running) return;
    const libp2p = this.#node.libp2p;
    await servePeerExchange(this.#node, this);
    this.#running = true;
    this.#redials.start();

    const on = <K extends "peer:connect" | "peer:disconnect" | "peer:identify" | "peer:discovery">(
      type: K,
      fn: (detail: K extends "peer:identify" ? IdentifyResult : K extends "peer:discovery" ? Libp2pPeerInfo : PeerId) => void,
    ) => {
      const listener = (evt: CustomEvent) => fn(evt.detail);
      libp2p.addEventListener(type, listener as never);
      this.#unlisten.push(() => libp2p.removeEventListener(type, listener as never));
    };
    on("peer:connect", (id) => this.#onConnect(id.toString()));
    on("peer:disconnect", (id) => this.#onDisconnect(id.toString()));
    on("peer:identify", (r) => this.#onIdentify(r));
    // libp2p reports every peer new to its peer store as discovered: mDNS finds (node.ts dials
    // those; we track the result) but also peers first met on a connection, which are not mDNS,
    // and the finds of our own modules, which they told us first.
    on("peer:discovery", (p) => {
      if (libp2p.getConnections(p.id).length > 0 || this.#reported.has(p.id.toString())) return;
      const entry = this.#entry(p.id.toString(), "mdns");
      if (entry) for (const ma of p.multiaddrs) this.#addAddress(entry, ma);
      this.#redials.kick();
    });

    for (const d of this.#discovery) {
      const listener = (evt: CustomEvent<Libp2pPeerInfo>) => this.#discovered(d.source, evt.detail);
      d.addEventListener("peer", listener as never);
      this.#unlisten.push(() => d.removeEventListener("peer", listener as never));
      if (d instanceof TailscalePeers) d.onPoll = (targets) => this.emit("tailscale", targets);
      d.begin({
        self: this.#self,
        trusted: this.#node.trusted,
        log: this.#log,
        ...(this.#opts.dialIntervalMs !== undefined && { dialIntervalMs: this.#opts.dialIntervalMs }),
        ...(this.#opts.dialTimeoutMs !== undefined && { dialTimeoutMs: this.#opts.dialTimeoutMs }),
        dial: async (addrs, signal) => (await libp2p.dial(addrs, { signal })).remotePeer,
        ownAddresses: () => this.#node.addresses(),
        knownPeerAt: (addrs) => [...this.#peers.values()].find((e) => e.addresses.some((a) => addrs.has(a)))?.peerId,
      });
    }
    // Connections made before we started (e.g. by mDNS) count too.
    for (const id of new Set(libp2p.getConnections().map((c) => c.remotePeer.toString()))) this.#onConnect(id);

    const every = (ms: number, fn: () => void) => {
      const t = setInterval(fn, ms);
      t.unref();
      this.#intervals.push(t);
    };
    every(this.#opts.exchangeIntervalMs ?? 5 * 60_000, () => {
      for (const e of this.#peers.values()) if (e.connected) void this.#exchange(e);
    });
    this.#redials.kick();
  }

  async stop(): Promise<void> {
    if (!this.#running) return;
    this.#running = false;
    this.#calls.abortAll(new Error("peer manager stopped"));
    for (const d of this.#discovery) d.end();
    for (const t of this.#intervals) clearInterval(t);
    this.#intervals = [];
    this.#redials.stop();
    for (const off of this.#unlisten) off();
    this.#unlisten = [];
    await this.#node.libp2p.unhandle(PROTOCOL_PEERS).catch(() => {}); // the node may be stopping too
  }

  peers(): PeerInfo[] {
    const now = Date.now();
    return [...this.#peers.values()].map((e) => ({
      peerId: e.peerId,
      name: e.key.name,
      publicKey: formatPublicKey(e.key),
      addresses: dialableFirst(e.addresses),
      connected: e.connected,
      ...this.#rtt(e),
      ...(e.connected ? { lastSeen: now } : e.lastSeen !== undefined && { lastSeen: e.lastSeen }),
      sources: SOURCE_ORDER.filter((s) => e.sources.has(s)),
      failures: e.failures,
      ...(e.nextDialAt !== undefined && !e.connected && { nextDialAt: e.nextDialAt }),
    }));
  }

  /** Connected peer IDs, fastest measured RTT first (unmeasured ones last). */
  connectedPeers(): string[] {
    const rtt = (e: Entry) => this.#rtt(e).rttMs ?? Infinity;
    return [...this.#peers.values()]
      .filter((e) => e.connected)
      .map((e) => ({ e, rtt: rtt(e) }))
      .sort((a, b) => a.rtt - b.rtt || (a.e.peerId < b.e.peerId ? -1 : 1))
      .map(({ e }) => e)
      .map((e) => e.peerId);
  }

  /** Addresses still being tried without a known peer ID (for diagnostics). */
  addressCandidates(): AddressCandidate[] {
    return this.#discovery.flatMap((d) => d.candidates());
  }

  // --- what we learn ----------------------------------------------------------------------------

  /** The entry for a trusted peer, created on first sight; undefined for ourselves and strangers. */
  #entry(peerId: string, source?: PeerSource): Entry | undefined {
    if (peerId === this.#self) return undefined;
    let e = this.#peers.get(peerId);
    if (!e) {
      const key = this.#node.trusted.get(peerId);
      if (!key) return undefined;
      e = {
        peerId,
        id: peerIdFromString(peerId),
        key,
        addresses: [],
        pinned: new Set(),
        sources: new Set(),
        connected: false,
        failures: 0,
        dialing: false,
        exchanging: false,
      };
      this.#peers.set(peerId, e);
    }
    if (source) e.sources.add(source);
    return e;
  }

  /** Records a TCP address for a peer; returns whether it was new. */
  #addAddress(e: Entry, ma: Multiaddr, pinned = false): boolean {
    const addr = tcpAddress(ma, e.peerId);
    if (addr === undefined) return false;
    if (pinned) e.pinned.add(addr);
    if (e.addresses.includes(addr)) return false;
    e.addresses.push(addr);
    if (e.addresses.length > MAX_ADDRESSES) {
      const i = e.addresses.findIndex((a) => !e.pinned.has(a));
      e.addresses.splice(i === -1 ? 0 : i, 1);
    }
    return true;
  }

  /** A discovery module found a fleet peer: its addresses are configuration, never evicted. */
  #discovered(source: "static" | "tailscale", p: Libp2pPeerInfo): void {
    if (!this.#running) return;
    const peerId = p.id.toString();
    this.#reported.add(peerId);
    const e = this.#entry(peerId, source);
    if (!e) return;
    for (const ma of p.multiaddrs) this.#addAddress(e, ma, true);
    // A blind dial that found it is a connection already.
    if (this.#node.libp2p.getConnections(p.id).length > 0) this.#onConnect(peerId);
    else this.#redials.kick();
  }

  #onConnect(peerId: string): void {
    if (!this.#running) return;
    const conns = this.#node.libp2p.getConnections(peerIdFromString(peerId));
    const inbound = conns.some((c) => c.direction === "inbound");
    const e = this.#entry(peerId, inbound ? "inbound" : undefined);
    if (!e) return;
    // Where we reached it is dialable; an inbound connection's remote port is not (identify
    // tells us its listen addresses instead).
    for (const c of conns) if (c.direction === "outbound") this.#addAddress(e, c.remoteAddr);
    const wasConnected = e.connected;
    e.connected = true;
    e.failures = 0;
    delete e.nextDialAt;
    e.lastSeen = Date.now();
    if (wasConnected) return;
    this.#log.info({ peer: e.key.name, peerId }, "mesh: peer connected");
    this.emit("connected", peerId);
    void this.#exchange(e);
  }

  #onDisconnect(peerId: string): void {
    if (!this.#running) return;
    const e = this.#peers.get(peerId);
    if (!e?.connected) return;
    e.connected = false;
    e.lastSeen = Date.now();
    e.nextDialAt = Date.now(); // try once right away; failures back off from there
    this.#log.info({ peer: e.key.name, peerId }, "mesh: peer disconnected");
    this.emit("disconnected", peerId);
    this.#redials.kick();
  }

  #onIdentify(r: IdentifyResult): void {
    const e = this.#peers.get(r.peerId.toString());
    if (!e) return;
    for (const ma of r.listenAddrs) this.#addAddress(e, ma);
  }

  /** Merges a peer exchange answer: trusted IDs only, their TCP addresses, dial the new ones. */
  #learn(from: Entry, records: readonly PeerRecord[]): void {
    for (const r of records) {
      if (r.peerId === from.peerId) continue;
      const e = this.#entry(r.peerId, "px");
      if (!e) continue; // ourselves, or not in the fleet: we would refuse it anyway
      let added = false;
      for (const text of r.multiaddrs) {
        try {
          added = this.#addAddress(e, multiaddr(text)) || added;
        } catch {
          // A peer's garbage address costs it nothing but the address.
        }
      }
      // New addresses are worth a try now, whatever the backoff said.
      if (added && !e.connected && !e.dialing) e.nextDialAt = Math.min(e.nextDialAt ?? 0, Date.now());
    }
    this.#redials.kick();
  }

  // --- background work -------------------------------------------------------------------------

  /** The lowest RTT the connection monitor measured on the peer's open connections, if any. */
  #rtt(e: Entry): { rttMs?: number } {
    if (!e.connected) return {};
    let best: number | undefined;
    for (const c of this.#node.libp2p.getConnections(e.id)) {
      if (c.status === "open" && c.rtt !== undefined && (best === undefined || c.rtt < best)) best = c.rtt;
    }
    return best === undefined ? {} : { rttMs: best };
  }

  #signal(timeoutMs: number): AbortSignal {
    return this.#calls.signal(timeoutMs);
  }

  async #exchange(e: Entry): Promise<void> {
    if (e.exchanging || !this.#running) return;
    e.exchanging = true;
    try {
      const records = await fetchPeers(this.#node, e.id, { signal: this.#signal(EXCHANGE_TIMEOUT_MS) });
      if (this.#running) this.#learn(e, records);
    } catch (err) {
      this.#log.debug({ peer: e.key.name, err }, "mesh: peer exchange failed");
    } finally {
      e.exchanging = false;
    }
  }
}
