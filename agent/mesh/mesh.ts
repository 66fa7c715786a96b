// The mesh, assembled: the libp2p node, what we announce and serve to peers, what we learn from
// them, and the FleetSource through which the HTTP side reaches all of it.
import { parsePublicKey, type PublicKey, type SecretKey } from "../../protocol/keys.js";
import type { Logger } from "../log.js";
import type { LocalStore } from "../store/local-store.js";
import type { StoreWatcher } from "../store/watch.js";
import { FleetSource } from "./fleet-source.js";
import { openNar } from "./nar-service.js";
import { fetchNarinfo, serveNarinfo } from "./narinfo-service.js";
import { serveNar } from "./nar-service.js";
import { createMeshNode, type MeshNode } from "./node.js";
import { PeerManager, type PeerInfo } from "./peer-manager.js";
import { SummaryPublisher } from "./summary-publisher.js";
import { SummaryTable } from "./summary-table.js";

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
}

export interface MeshStatus {
  peerId: string;
  addresses: string[];
  peers: (PeerInfo & { pathCount?: number })[];
}

export class Mesh {
  private constructor(
    readonly node: MeshNode,
    readonly source: FleetSource,
    private readonly watcher: StoreWatcher,
    private readonly publisher: SummaryPublisher,
    private readonly summaries: SummaryTable,
    private readonly manager: PeerManager,
  ) {}

  static async start(opts: MeshOptions): Promise<Mesh> {
    const { log, local } = opts;
    const trusted: PublicKey[] = opts.trustedKeys.map(parsePublicKey);
    const node = await createMeshNode({ key: opts.key, trusted, listen: opts.listen, log, mdns: opts.mdns });
    try {
      const watcher = local.watch();
      const publisher = new SummaryPublisher(node, watcher, log);
      await publisher.start();
      await serveNarinfo(node, local, log);
      await serveNar(node, local, log);
      const summaries = new SummaryTable(node, log);
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
      }, log);
      // Every fleet member we connect to tells us what it holds (the table resubscribes by itself
      // after a reconnect, and drops the summary of a peer that is gone).
      manager.on("connected", (peerId) => summaries.subscribe(peerId));
      await manager.start();
      return new Mesh(node, source, watcher, publisher, summaries, manager);
    } catch (e) {
      await node.stop();
      throw e;
    }
  }

  status(): MeshStatus {
    return {
      peerId: this.node.peerId.toString(),
      addresses: this.node.addresses().map(String),
      peers: this.manager.peers().map((p) => ({ ...p, pathCount: this.summaries.pathCount(p.peerId) })),
    };
  }

  async stop(): Promise<void> {
    this.publisher.stop();
    this.summaries.stop();
    await this.manager.stop();
    await this.node.stop();
  }
}
