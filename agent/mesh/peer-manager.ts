// Keeps the mesh connected: learns fleet peers from static addresses, mDNS, peer exchange,
// Tailscale and inbound connections; redials the ones that drop with capped exponential backoff;
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
import { peerAddr } from "../address.js";
import { fetchPeers, isLoopback, servePeerExchange } from "./peer-exchange.js";
import { readTailscaleStatus, tailscaleDialTargets } from "./tailscale.js";
import { CallSignals } from "./call-signals.js";

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

/** An address to dial whose peer ID we do not know yet (a "host:port" peer, a Tailscale host). */
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

export interface PeerManagerOptions {
  /** "host:port", "[v6]:port" or multiaddrs (with or without /p2p/<id>). */
  staticPeers: string[];
  tailscale?: TailscaleOptions;
  log: Logger;
  /** First redial delay; it doubles per failure up to 60 s, with ±25 % jitter (default 1 s). */
  dialIntervalMs?: number;
  /** Per-dial deadline (default 5 s). */
  dialTimeoutMs?: number;
  /** How often connected peers are asked for their peers, besides once on connecting (default 5 min). */
  exchangeIntervalMs?: number;
}

const MAX_BACKOFF_MS = 60_000;
const MAX_ADDRESSES = 16;
const EXCHANGE_TIMEOUT_MS = 10_000;

interface Entry {
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
  failures: number;
  nextDialAt?: number;
  dialing: boolean;
  exchanging: boolean;
}

interface Candidate extends Omit<AddressCandidate, "addrs"> {
  key: string;
  addrs: Multiaddr[];
  dialing: boolean;
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
  readonly #candidates = new Map<string, Candidate>();
  /** Deadlines of dials and exchanges, all aborted by stop() (no AbortSignal.any: call-signals.ts). */
  readonly #calls = new CallSignals();
  #running = false;
  #dialTimer: NodeJS.Timeout | undefined;
  #dialTimerAt = Infinity;
  #intervals: NodeJS.Timeout[] = [];
  #unlisten: (() => void)[] = [];

  constructor(node: MeshNode, opts: PeerManagerOptions) {
    super();
    this.#node = node;
    this.#opts = opts;
    this.#log = opts.log;
    this.#self = node.peerId.toString();
  }

  async start(): Promise<void> {
    if (this.#running) return;
    const libp2p = this.#node.libp2p;
    await servePeerExchange(this.#node, this);
    this.#running = true;

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
    // those; we track the result) but also peers first met on a connection, which are not mDNS.
    on("peer:discovery", (p) => {
      if (libp2p.getConnections(p.id).length > 0) return;
      const entry = this.#entry(p.id.toString(), "mdns");
      if (entry) for (const ma of p.multiaddrs) this.#addAddress(entry, ma);
      this.#kick();
    });

    for (const s of this.#opts.staticPeers) this.#addStatic(s);
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
    const ts = this.#opts.tailscale;
    if (ts) {
      void this.#pollTailscale(ts);
      every(ts.intervalMs ?? 30_000, () => void this.#pollTailscale(ts));
    }
    this.#kick();
  }

  async stop(): Promise<void> {
    if (!this.#running) return;
    this.#running = false;
    this.#calls.abortAll(new Error("peer manager stopped"));
    for (const t of this.#intervals) clearInterval(t);
    this.#intervals = [];
    clearTimeout(this.#dialTimer);
    this.#dialTimer = undefined;
    this.#dialTimerAt = Infinity;
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
    return [...this.#candidates.values()].map((c) => ({
      addrs: c.addrs.map(String),
      source: c.source,
      ...(c.peerId !== undefined && { peerId: c.peerId }),
      failures: c.failures,
      ...(c.nextDialAt !== undefined && { nextDialAt: c.nextDialAt }),
    }));
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

  #addStatic(spec: string): void {
    let ma: Multiaddr;
    try {
      ma = peerAddr(spec);
    } catch (err) {
      this.#log.warn({ peer: spec, err }, "mesh: ignoring invalid static peer");
      return;
    }
    const id = peerIdIn(ma);
    if (id === undefined) {
      this.#addCandidate(ma.toString(), [ma], "static");
      return;
    }
    const e = this.#entry(id, "static");
    if (!e) {
      if (id !== this.#self) this.#log.warn({ peer: spec }, "mesh: static peer's ID is not derived from a trusted key; not dialing it");
      return;
    }
    this.#addAddress(e, ma, true);
  }

  #addCandidate(key: string, addrs: Multiaddr[], source: "static" | "tailscale"): void {
    if (this.#candidates.has(key)) return;
    this.#candidates.set(key, { key, addrs, source, failures: 0, dialing: false });
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
    this.#kick();
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
    this.#kick();
  }

  // --- background work -------------------------------------------------------------------------

  /** Starts due dials and arms the timer for the next one. */
  #kick(): void {
    if (!this.#running) return;
    const now = Date.now();
    let next = Infinity;
    for (const e of this.#peers.values()) {
      if (e.connected || e.dialing) continue;
      const at = e.nextDialAt ?? now;
      if (at <= now) void this.#dialPeer(e);
      else next = Math.min(next, at);
    }
    for (const c of this.#candidates.values()) {
      if (c.dialing || c.peerId !== undefined) continue;
      if (this.#resolveByAddress(c)) continue;
      const at = c.nextDialAt ?? now;
      if (at <= now) void this.#dialCandidate(c);
      else next = Math.min(next, at);
    }
    if (next < this.#dialTimerAt) {
      clearTimeout(this.#dialTimer);
      this.#dialTimerAt = next;
      this.#dialTimer = setTimeout(() => {
        this.#dialTimerAt = Infinity;
        this.#kick();
      }, Math.max(0, next - now));
      this.#dialTimer.unref();
    }
  }

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

  #backoff(failures: number): number {
    const base = this.#opts.dialIntervalMs ?? 1000;
    const delay = Math.min(MAX_BACKOFF_MS, base * 2 ** Math.min(failures - 1, 30));
    return Math.round(delay * (0.75 + Math.random() * 0.5));
  }

  async #dialPeer(e: Entry): Promise<void> {
    e.dialing = true;
    const target = e.addresses.length > 0 ? dialableFirst(e.addresses).map((a) => multiaddr(`${a}/p2p/${e.peerId}`)) : e.id;
    try {
      await this.#node.libp2p.dial(target, { signal: this.#signal(this.#opts.dialTimeoutMs ?? 5000) });
      // peer:connect does the bookkeeping (it may already have).
    } catch (err) {
      if (!this.#running) return;
      e.failures++;
      e.nextDialAt = Date.now() + this.#backoff(e.failures);
      this.#log.debug({ peer: e.key.name, failures: e.failures, err }, "mesh: dial failed");
    } finally {
      e.dialing = false;
      this.#kick();
    }
  }

  /**
   * A candidate whose address a known peer already has belongs to that peer: no blind dial. One
   * of our own addresses is us (a fleet-wide peer list usually names every host, this one too).
   */
  #resolveByAddress(c: Candidate): boolean {
    const addrs = new Set(c.addrs.map((a) => tcpAddress(a, "")));
    const own = new Set(this.#node.addresses().map((a) => tcpAddress(a, this.#self)));
    if ([...addrs].every((a) => own.has(a))) {
      c.peerId = this.#self;
      return true;
    }
    for (const e of this.#peers.values()) {
      if (e.addresses.some((a) => addrs.has(a))) {
        c.peerId = e.peerId;
        e.sources.add(c.source);
        for (const a of c.addrs) this.#addAddress(e, a, true);
        return true;
      }
    }
    return false;
  }

  async #dialCandidate(c: Candidate): Promise<void> {
    c.dialing = true;
    try {
      const conn = await this.#node.libp2p.dial(c.addrs, { signal: this.#signal(this.#opts.dialTimeoutMs ?? 5000) });
      if (!this.#running) return;
      // The gater let it through, so it is a trusted peer: its entry takes over redialing.
      const e = this.#entry(conn.remotePeer.toString(), c.source);
      if (!e) return;
      c.peerId = e.peerId;
      c.failures = 0;
      delete c.nextDialAt;
      for (const a of c.addrs) this.#addAddress(e, a, true);
      this.#onConnect(e.peerId);
    } catch (err) {
      if (!this.#running) return;
      if (err instanceof Error && err.name === "InvalidPeerIdError" && /dial self/.test(err.message)) {
        c.peerId = this.#self; // another name for one of our addresses
        return;
      }
      c.failures++;
      c.nextDialAt = Date.now() + this.#backoff(c.failures);
      this.#log.debug({ addrs: c.addrs.map(String), failures: c.failures, err }, "mesh: dial failed");
    } finally {
      c.dialing = false;
      this.#kick();
    }
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

  async #pollTailscale(ts: TailscaleOptions): Promise<void> {
    let targets;
    try {
      targets = tailscaleDialTargets(await readTailscaleStatus(ts, this.#signal(15_000)), ts.port);
    } catch (err) {
      this.#log.warn({ err }, "mesh: reading the Tailscale status failed");
      return;
    }
    if (!this.#running) return;
    // Hosts that went offline or left the tailnet are no longer worth dialing blind; the ones
    // already known as peers keep their addresses in their entries.
    const keys = new Set<string>();
    for (const t of targets) {
      const key = `tailscale:${t.addrs.map(String).join(",")}`;
      keys.add(key);
      this.#addCandidate(key, t.addrs, "tailscale");
    }
    for (const [key, c] of this.#candidates) if (c.source === "tailscale" && !keys.has(key)) this.#candidates.delete(key);
    this.#kick();
    this.emit("tailscale", targets.length);
  }
}

/** The multiaddr as a dialable TCP address without /p2p/, or undefined (other peer, other transport, unspecified host). */
function tcpAddress(ma: Multiaddr, peerId: string): string | undefined {
  const parts = ma.getComponents();
  const p2p = parts.filter((c) => c.name === "p2p");
  if (p2p.some((c) => c.value !== peerId) && peerId !== "") return undefined;
  const rest = parts.filter((c) => c.name !== "p2p");
  const [host, tcp] = rest;
  if (rest.length !== 2 || !host || tcp?.name !== "tcp") return undefined;
  if (!["ip4", "ip6", "dns", "dns4", "dns6"].includes(host.name)) return undefined;
  if (host.value === "0.0.0.0" || host.value === "::" || tcp.value === "0") return undefined;
  return `/${host.name}/${host.value}/tcp/${tcp.value}`;
}

function peerIdIn(ma: Multiaddr): string | undefined {
  return ma.getComponents().findLast((c) => c.name === "p2p")?.value;
}

/** Loopback addresses last: another host dialing them would reach itself. */
function dialableFirst(addrs: readonly string[]): string[] {
  return [...addrs.filter((a) => !isLoopback(a)), ...addrs.filter(isLoopback)];
}
