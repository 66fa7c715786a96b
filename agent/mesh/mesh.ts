// The mesh, assembled: the libp2p node, what we announce and serve to peers, what we learn from
// them, and the FleetSource through which the HTTP side reaches all of it.
import { AsyncLocalStorage } from "node:async_hooks";
import { parsePublicKey, type PublicKey, type SecretKey } from "../../protocol/keys.js";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Logger } from "../log.js";
import type { MeshTallies } from "../metrics.js";
import type { LocalStore } from "../store/local-store.js";
import { FleetSource } from "./fleet-source.js";
import { openNar } from "./nar-service.js";
import { fetchNarinfo, serveNarinfo } from "./narinfo-service.js";
import { serveNar } from "./nar-service.js";
import { createMeshNode, type MeshNode } from "./node.js";
import type { PeerPenaltyStatus } from "./holder-penalties.js";
import { PeerManager, type PeerInfo } from "./peer-manager.js";
import { PeerPenalties, type Penalty } from "./peer-penalties.js";
import { SummaryPublisher } from "./summary-publisher.js";
import { SummaryTable } from "./summary-table.js";
import { InboundPerHost, type AdmissionOffender } from "./admission.js";

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
  /** Summary keys a peer may send in a burst (SummaryBudget.burstKeys). */
  summaryBudget?: number;
  /** Told of failures operators should see; `peer` is the peer's key name. */
  onError?: (e: { message: string; path?: string; peer?: string }) => void;
}

export interface MeshStatus {
  peerId: string;
  addresses: string[];
  peers: (PeerInfo & PeerPenaltyStatus & { pathCount?: number; bytesSent: number; bytesReceived: number; penalty?: Penalty; summary?: PeerSummaryTraffic })[];
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
    private readonly sent: SentBytes,
    /** Connections refused after the handshake: the remote's key is not in the fleet. */
    private readonly refused: { connections: number },
    /** Trusted peers that went over a per-peer limit, refused for a backoff. */
    private readonly penalties: PeerPenalties,
    private readonly admission: InboundPerHost,
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
    const admission = new InboundPerHost();
    const node = await createMeshNode({ key: opts.key, trusted, listen: opts.listen, log, mdns: opts.mdns, onRefused, denied, admission });
    try {
      const watcher = local.watch();
      const publisher = new SummaryPublisher(node, watcher, log);
      await publisher.start();
      await serveNarinfo(node, local, log);
      const sent = new SentBytes();
      await serveNar(sent.countingNode(node), sent.countingStore(local), log);
      const summaries = new SummaryTable(node, log, { penalties, ...(opts.summaryBudget ? { budget: { burstKeys: opts.summaryBudget } } : {}) });
      summaries.on("overBudget", (peerId, reason) => opts.onError?.({ message: reason, peer: node.trusted.get(peerId)?.name ?? peerId }));
      const manager = new PeerManager(node, {
        staticPeers: opts.peers,
        log,
        ...(opts.tailscale ? { tailscale: opts.tailscale } : {}),
      });
      // Our own signatures count too: a path this host signed, held by a peer, is acceptable.
      const keys = [...trusted, { name: opts.key.name, publicKey: opts.key.publicKey }];
      const source = new FleetSource(local, manager, summaries, {
        narinfo: (peer, hashPart, signal) => fetchNarinfo(node, peer, hashPart, { trusted: keys, signal, log }),
        nar: (peer, req, signal) => openNar(node, peer, req, { signal, log }),
      }, log, {
        onError: (e) => opts.onError?.({ ...e, peer: node.trusted.get(e.peer)?.name ?? e.peer }),
      });
      // Every fleet member we connect to tells us what it holds (the table resubscribes by itself
      // after a reconnect, and drops the summary of a peer that is gone).
      manager.on("connected", (peerId) => summaries.subscribe(peerId));
      await manager.start();
      return new Mesh(node, source, publisher, summaries, manager, sent, refused, penalties, admission);
    } catch (e) {
      await node.stop();
      throw e;
    }
  }

  status(): MeshStatus {
    return {
      peerId: this.node.peerId.toString(),
      addresses: this.node.addresses().map(String),
      peers: this.manager.peers().map((p) => ({
        ...p,
        pathCount: this.summaries.pathCount(p.peerId),
        bytesSent: this.sent.byPeer.get(p.peerId) ?? 0,
        bytesReceived: this.source.bytesFromPeer.get(p.peerId) ?? 0,
        ...this.source.penalties.status(p.peerId),
        ...(this.penalties.get(p.peerId) && { penalty: { ...this.penalties.get(p.peerId)! } }),
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
    return this.manager.peers().map((p) => ({ connected: p.connected, pathCount: this.summaries.pathCount(p.peerId) }));
  }

  tallies(): MeshTallies {
    const c = this.source.counters;
    return {
      peerQueries: c.peerQueries,
      failovers: c.failovers,
      transferFailures: c.transferFailures,
      bytesFromPeers: c.bytesFromPeers,
      bytesToPeers: this.sent.total,
      refusedConnections: this.refused.connections,
      verifyFailures: c.verifyFailures,
      queuedTransfers: c.queuedTransfers,
      peersPenalised: this.source.penalties.peersPenalised(),
      penalties: this.penalties.total,
      peersRefused: this.penalties.active(),
      summarySnapshotBytes: this.summaries.received.snapshotBytes,
      summaryDeltaBytes: this.summaries.received.deltaBytes,
      admissionRefused: this.admission.refused,
    };
  }

  async stop(): Promise<void> {
    this.publisher.stop();
    this.summaries.stop();
    await this.manager.stop();
    await this.node.stop();
  }
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
    const narStream = (info: PathInfo, start: number, end: number) => this.#count(local.narStream(info, start, end), this.#caller.getStore());
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
