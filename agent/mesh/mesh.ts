// The mesh, assembled: the libp2p node, what we announce and serve to peers, what we learn from
// them, and the FleetSource through which the HTTP side reaches all of it.
import { AsyncLocalStorage } from "node:async_hooks";
import { parsePublicKey, Verifier, type PublicKey, type SecretKey } from "../../protocol/keys.js";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Logger } from "../log.js";
import type { MeshTallies } from "../metrics.js";
import type { LocalStore } from "../store/local-store.js";
import { FleetSource } from "./fleet-source.js";
import { openNar } from "./nar-service.js";
import { fetchNarinfo, narinfoStreamCounts, serveNarinfo, warmNarinfoStreams } from "./narinfo-service.js";
import { narStreamsAhead } from "./nar-streams-ahead.js";
import { serveNar } from "./nar-service.js";
import { createMeshNode, type MeshNode } from "./node.js";
import { FleetTable, type FleetRow } from "./fleet-table.js";
import { PeerManager } from "./peer-manager.js";
import { StaticPeers, TailscalePeers } from "./fleet-discovery.js";
import { PeerPenalties } from "./peer-penalties.js";
import { NarCompression, type CompressionMode, type PeerCompressionStatus } from "./nar-compression.js";
import { SummaryPublisher } from "./summary-publisher.js";
import { SummaryTable } from "./summary-table.js";
import { TrustPolicy } from "./trust-policy.js";
import { UpstreamCheck } from "./upstream-check.js";
import { InboundPerHost, type AdmissionOffender } from "./admission.js";
import { BulkListener } from "./bulk-listener.js";
import { BulkRoutes, bulkHost } from "./bulk-client.js";
import { BulkSessions } from "./bulk-sessions.js";
import { bulkListenAddr, directListenAddr } from "../address.js";
import { DirectListener, type ServeNar } from "./direct-listener.js";
import { DirectRoutes } from "./direct-client.js";

export interface MeshOptions {
  key: SecretKey;
  /** "name:base64" Nix public keys of the fleet. */
  trustedKeys: string[];
  listen: string;
  peers: string[];
  mdns: boolean;
  tailscale?: { statusFile?: string; port: number };
  local: LocalStore;
  log: Logger;
  /** Keys of upstream caches (never the fleet's): see trust-policy.ts. */
  upstreamKeys?: PublicKey[];
  /** Upstream caches asked before a fleet-only narinfo is believed (upstream-check.ts). */
  upstreamCaches?: string[];
  /** Summary keys a peer may send in a burst (SummaryBudget.burstKeys). */
  summaryBudget?: number;
  /** How long a lookup waits for a reconnecting peer that alone holds the path (FleetSourceOptions.reconnectWaitMs). */
  reconnectWaitMs?: number;
  /** NAR transfers between agents (default auto: when the link is slow). */
  compression?: CompressionMode;
  /** NAR bodies on the bulk port, mesh port + 1 (default on): served there and taken from peers' (bulk-listener.ts). */
  bulk?: boolean;
  /**
   * LAN-direct NARs (default off; trusted LANs only): a direct port (mesh port + 2) that serves
   * NARs to peers' Nix with `serveDirect`, and Nix's NAR requests redirected to on-link holders'.
   */
  direct?: { serve: ServeNar };
  /** Told of failures operators should see; `peer` is the peer's key name. */
  onError?: (e: { message: string; path?: string; peer?: string }) => void;
}

export interface MeshStatus {
  peerId: string;
  addresses: string[];
  peers: (FleetRow & PeerCompressionStatus & { bytesSent: number; bytesReceived: number; summary?: PeerSummaryTraffic })[];
}

/** Summary traffic received from a peer: full snapshots (resyncs) against deltas and resumes. */
export interface PeerSummaryTraffic {
  snapshotBytes: number;
  deltaBytes: number;
  snapshots: number;
  resumes: number;
}

/** Inbound sockets refused by the per-host limit before any handshake (admission.ts). */
export interface AdmissionStatus {
  refused: number;
  /** The hosts refused most recently, the latest first. */
  recentOffenders: AdmissionOffender[];
}

export class Mesh {
  private constructor(
    readonly node: MeshNode,
    readonly source: FleetSource,
    private readonly publisher: SummaryPublisher,
    private readonly summaries: SummaryTable,
    private readonly manager: PeerManager,
    private readonly fleet: FleetTable,
    private readonly sent: SentBytes,
    /** Connections refused after the handshake: the remote's key is not in the fleet. */
    private readonly refused: { connections: number },
    /** Trusted peers that went over a per-peer limit, refused for a backoff. */
    private readonly penalties: PeerPenalties,
    /** When NAR transfers are compressed, and their bytes on the wire. */
    readonly compression: NarCompression,
    private readonly admission: InboundPerHost,
    /** The bulk port, when on; and which peers' bulk ports we fall back from. */
    readonly bulk: BulkListener | undefined,
    readonly bulkRoutes: BulkRoutes | undefined,
    /** Kept connections to peers' bulk ports (bulk sessions), with bulk on. */
    readonly bulkSessions: BulkSessions | undefined,
    /** LAN-direct NARs, when on: our direct port, and the redirects to peers'. */
    readonly direct: DirectListener | undefined,
    readonly directRoutes: DirectRoutes | undefined,
  ) {}

  static async start(opts: MeshOptions): Promise<Mesh> {
    const { log, local } = opts;
    const trusted: PublicKey[] = opts.trustedKeys.map(parsePublicKey);
    const refused = { connections: 0 };
    const onRefused = (peerId: string, direction: "inbound" | "outbound") => {
      refused.connections++;
      log.debug({ peerId, direction }, "mesh: refused a connection: the peer's key is not trusted");
    };
    const penalties = new PeerPenalties();
    const denied = (peerId: string) => penalties.isPenalised(peerId);
    // Static peers and Tailscale hosts are libp2p discovery modules, as mDNS is.
    const discovery = [
      ...(opts.peers.length > 0 ? [new StaticPeers(opts.peers, log)] : []),
      ...(opts.tailscale ? [new TailscalePeers(opts.tailscale, log)] : []),
    ];
    const admission = new InboundPerHost();
    const node = await createMeshNode({ key: opts.key, trusted, listen: opts.listen, log, mdns: opts.mdns, discovery, onRefused, denied, admission });
    let bulk: BulkListener | undefined;
    let direct: DirectListener | undefined;
    try {
      const bulkAddr = opts.bulk === false ? undefined : bulkListenAddr(opts.listen);
      if (bulkAddr) {
        // A port taken by something else costs only speed: NARs then go on the mesh stream.
        bulk = await BulkListener.start(bulkAddr.host, bulkAddr.port, log).catch((err: Error) => {
          log.warn({ host: bulkAddr.host, port: bulkAddr.port, err: err.message }, "mesh: cannot open the bulk port; NARs go on the mesh stream");
          return undefined;
        });
        if (bulk) log.info({ host: bulkAddr.host, port: bulk.port }, "mesh: bulk port listening");
      }
      const bulkRoutes = bulk ? new BulkRoutes() : undefined;
      const bulkSessions = bulkRoutes ? new BulkSessions(node, bulkRoutes, log) : undefined;
      const directAddr = opts.direct ? directListenAddr(opts.listen) : undefined;
      if (opts.direct && directAddr) {
        // As the bulk port: a port taken by something else costs only speed (NARs are relayed).
        direct = await DirectListener.start(directAddr.host, directAddr.port, opts.direct.serve, log, (hashPart) => local.pathInfo(hashPart)).catch((err: Error) => {
          log.warn({ host: directAddr.host, port: directAddr.port, err: err.message }, "mesh: cannot open the direct port; peers' NARs are relayed");
          return undefined;
        });
        if (direct) log.info({ host: directAddr.host, port: direct.port }, "mesh: direct port listening (direct_lan: NARs to peers' Nix in plain HTTP)");
      }
      const watcher = local.watch();
      const publisher = new SummaryPublisher(node, watcher, log);
      await publisher.start();
      await serveNarinfo(node, local, log);
      const sent = new SentBytes();
      const compression = new NarCompression(opts.compression ?? "auto", (peerId) => connectionRtt(node, peerId), undefined, (peerId) => bulkHost(node, peerId) !== undefined);
      await serveNar(sent.countingNode(node), sent.countingStore(local), log, { compression, ...(bulk && { bulk }), ...(direct && { direct }) });
      const directRoutes = opts.direct ? new DirectRoutes(node, compression, log) : undefined;
      const summaries = new SummaryTable(node, log, { penalties, ...(opts.summaryBudget ? { budget: { burstKeys: opts.summaryBudget } } : {}) });
      summaries.on("overBudget", (peerId, reason) => opts.onError?.({ message: reason, peer: node.trusted.get(peerId)?.name ?? peerId }));
      const manager = new PeerManager(node, {
        staticPeers: opts.peers,
        discovery,
        log,
        ...(opts.tailscale ? { tailscale: opts.tailscale } : {}),
      });
      const fleet = new FleetTable(manager, summaries, penalties);
      manager.on("connected", (peerId) => warmNarinfoStreams(node, peerId));
      // Our own signatures count too: a path this host signed, held by a peer, is acceptable; so do
      // upstream ones. Which acceptable answer is believed is the trust policy's decision.
      const upstreamKeys = opts.upstreamKeys ?? [];
      const keys = new Verifier([...trusted, { name: opts.key.name, publicKey: opts.key.publicKey }, ...upstreamKeys]);
      const upstreamCheck = opts.upstreamCaches?.length ? new UpstreamCheck(opts.upstreamCaches, upstreamKeys, { log }) : undefined;
      const source = new FleetSource(local, fleet, {
        narinfo: (peer, hashPart, signal) => fetchNarinfo(node, peer, hashPart, { trusted: keys, signal, log }),
        nar: (peer, req, signal) => openNar(node, peer, req, { signal, log, compression, ...(bulkRoutes && { bulk: bulkRoutes }), ...(bulkSessions && { sessions: bulkSessions }) }),
        ...(directRoutes && {
          direct: (peer: string, req: { hashPart: string; narHash: string; narSize: number }) => directRoutes.url(peer, req),
          redirectedTo: (hashPart: string) => directRoutes.redirectedTo(hashPart),
        }),
      }, log, {
        trust: new TrustPolicy(upstreamKeys, upstreamCheck),
        rttMs: (peerId) => connectionRtt(node, peerId),
        onError: (e) => opts.onError?.({ ...e, peer: node.trusted.get(e.peer)?.name ?? e.peer }),
        ...(opts.reconnectWaitMs !== undefined && { reconnectWaitMs: opts.reconnectWaitMs }),
      });
      await manager.start();
      return new Mesh(node, source, publisher, summaries, manager, fleet, sent, refused, penalties, compression, admission, bulk, bulkRoutes, bulkSessions, direct, directRoutes);
    } catch (e) {
      await bulk?.close();
      await direct?.close();
      await node.stop();
      throw e;
    }
  }

  status(): MeshStatus {
    return {
      peerId: this.node.peerId.toString(),
      addresses: this.node.addresses().map(String),
      peers: this.fleet.rows().map((p) => ({
        ...p,
        bytesSent: this.sent.byPeer.get(p.peerId) ?? 0,
        bytesReceived: this.source.bytesFromPeer.get(p.peerId) ?? 0,
        ...this.compression.peerStatus(p.peerId),
        ...this.#summaryTraffic(p.peerId),
      })),
    };
  }

  #summaryTraffic(peerId: string): { summary?: PeerSummaryTraffic } {
    const t = this.summaries.traffic(peerId);
    return t ? { summary: { snapshotBytes: t.snapshotBytes, deltaBytes: t.deltaBytes, snapshots: t.snapshots, resumes: t.resumes } } : {};
  }

  admissionStatus(): AdmissionStatus {
    return { refused: this.admission.refused, recentOffenders: this.admission.offenders() };
  }

  /** Known peers, for gauges (cheaper than status(): no addresses). */
  peerGauges(): { connected: boolean; pathCount: number | undefined }[] {
    return this.fleet.rows().map((p) => ({ connected: p.connected, pathCount: p.pathCount }));
  }

  tallies(): MeshTallies {
    const c = this.source.counters;
    const streams = narinfoStreamCounts(this.node);
    const ahead = narStreamsAhead(this.node).counts;
    return {
      narinfoStreamsOpened: streams.opened,
      narinfoStreamsReused: streams.reused,
      narinfoStreamsWarmed: streams.warmed,
      narStreamsOpened: ahead.opened,
      narStreamsTakenAhead: ahead.taken,
      peerQueries: c.peerQueries,
      failovers: c.failovers,
      transferFailures: c.transferFailures,
      bytesFromPeers: c.bytesFromPeers,
      bytesToPeers: this.sent.total,
      wireBytesFromPeers: this.compression.totals.wireReceived,
      wireBytesToPeers: this.compression.totals.wireSent,
      compressedFromPeers: this.compression.totals.zstdReceived,
      compressedToPeers: this.compression.totals.zstdSent,
      uncompressedFromPeers: this.compression.totals.identityReceived,
      uncompressedToPeers: this.compression.totals.identitySent,
      refusedConnections: this.refused.connections,
      verifyFailures: c.verifyFailures,
      queuedTransfers: c.queuedTransfers,
      peersPenalised: this.source.penalties.peersPenalised(),
      penalties: this.penalties.total,
      peersRefused: this.penalties.active(),
      narinfoConflicts: c.narinfoConflicts,
      upstreamChecks: this.source.upstreamCheck?.counters.checks ?? 0,
      upstreamCheckFailures: this.source.upstreamCheck?.counters.failures ?? 0,
      summarySnapshotBytes: this.summaries.received.snapshotBytes,
      summaryDeltaBytes: this.summaries.received.deltaBytes,
      admissionRefused: this.admission.refused,
      bulkNarsSent: this.bulk?.served ?? 0,
      bulkNarsReceived: this.bulkRoutes?.received ?? 0,
      bulkFallbacks: this.bulkRoutes?.fallbacks ?? 0,
      bulkRefused: this.bulk?.refused ?? 0,
      bulkSessionNarsSent: this.bulk?.sessionServed ?? 0,
      bulkSessionNarsReceived: this.bulkSessions?.received ?? 0,
      bulkSessionConnections: this.bulkSessions?.connections ?? 0,
      directRequests: this.direct?.counters.requests ?? 0,
      directNarsSent: this.direct?.counters.served ?? 0,
      directRefused: this.direct?.counters.refused ?? 0,
      directBytesSent: this.direct?.counters.bytes ?? 0,
      directRedirects: this.directRoutes?.redirects ?? 0,
      directFallbacks: this.directRoutes?.fallbacks ?? 0,
      directTicketsAsked: this.directRoutes?.asked ?? 0,
      directTicketsMinted: this.directRoutes?.minted ?? 0,
      directRepeatsRelayed: this.directRoutes?.repeats ?? 0,
      directMintedServed: this.direct?.counters.minted ?? 0,
    };
  }

  async stop(): Promise<void> {
    this.publisher.stop();
    this.fleet.stop();
    this.summaries.stop();
    await this.manager.stop();
    this.bulkSessions?.close();
    await this.bulk?.close();
    await this.direct?.close();
    this.directRoutes?.close();
    await this.node.stop();
  }
}

/** The shortest ping RTT of the open connections to a peer, if measured. */
function connectionRtt(node: MeshNode, peerId: string): number | undefined {
  let best: number | undefined;
  for (const c of node.libp2p.getConnections()) {
    if (c.remotePeer.toString() === peerId && c.status === "open" && c.rtt !== undefined) best = Math.min(best ?? Infinity, c.rtt);
  }
  return best;
}

/**
 * NAR bytes sent to each peer. The NAR service reads the store without knowing who asked, so the
 * service is given a node whose handlers run with the caller's peer ID in async context, and a
 * store whose NAR streams count what they hand over under that ID.
 */
class SentBytes {
  readonly byPeer = new Map<string, number>();
  total = 0;
  readonly #caller = new AsyncLocalStorage<string>();

  countingNode(node: MeshNode): MeshNode {
    return { ...node, handle: (protocol, handler, o) => node.handle(protocol, (req) => this.#caller.run(req.peerId, () => handler(req)), o) };
  }

  countingStore(local: LocalStore): LocalStore {
    const narStream = (info: PathInfo, start: number, end: number, readSize?: () => number) =>
      this.#count(local.narStream(info, start, end, readSize), this.#caller.getStore());
    // Everything else is the store itself, methods bound to it.
    return new Proxy(local, {
      get: (target, prop) => {
        if (prop === "narStream") return narStream;
        const v: unknown = Reflect.get(target, prop, target);
        return typeof v === "function" ? v.bind(target) : v;
      },
    });
  }

  async *#count(chunks: AsyncIterable<Buffer>, peer: string | undefined): AsyncGenerator<Buffer> {
    for await (const chunk of chunks) {
      this.total += chunk.length;
      if (peer !== undefined) this.byPeer.set(peer, (this.byPeer.get(peer) ?? 0) + chunk.length);
      yield chunk;
    }
  }
}
