// The local admin API: the status document (GET /api/v1/status) and Prometheus metrics
// (GET /metrics). Both describe this host and its fleet (peers, addresses, traffic), so they
// answer loopback clients only, whatever address the agent listens on.
import type { IncomingMessage, ServerResponse } from "node:http";
import type { RecentError } from "../metrics.js";
import type { CacheContext } from "./cache-routes.js";
import { HttpError, send, sendJson } from "./respond.js";

/** GET /api/v1/status. Times are ms since the epoch unless named *Seconds; bytes are NAR bytes. */
export interface StatusDocument {
  self: {
    name: string;
    publicKey: string;
    /** null without the mesh. */
    peerId: string | null;
    /** Mesh multiaddrs (with /p2p/<peerId>). */
    addresses: string[];
    /** The HTTP listener, "host:port". */
    listen: string;
    /** Valid paths in this host's store. */
    paths: number;
    /** Where store metadata comes from: "database" or "daemon". */
    storeBackend: string;
    /** Whether the agent undoes Nix's case hack (`use_case_hack`); must equal Nix's `use-case-hack`. */
    useCaseHack: boolean;
    version: string;
    uptimeSeconds: number;
  };
  /** Every known fleet peer, connected or not. */
  peers: StatusPeer[];
  counters: StatusCounters & Record<string, number>;
  /** The last few errors (NAR transfer failures, peer errors), oldest first. */
  recentErrors: RecentError[];
  /**
   * Inbound mesh sockets refused before any handshake because their remote host already held its
   * limit of sockets in a handshake: how many, and the hosts refused most recently (latest first,
   * at most 16). Absent without the mesh.
   */
  admission?: { refused: number; recentOffenders: { host: string; refused: number; lastRefusedAt: number }[] };
}

export interface StatusPeer {
  name: string;
  publicKey: string;
  peerId: string;
  addresses: string[];
  connected: boolean;
  /** Round trip of libp2p's last connection-monitor ping; absent until measured, and while disconnected. */
  rttMs?: number;
  /** Paths the peer announces. */
  pathCount?: number;
  /**
   * Now while connected (a connection whose ping fails is closed); when the peer was last
   * connected otherwise (ms since the epoch).
   */
  lastSeen?: number;
  /** NAR bytes this host sent to the peer from its store. */
  bytesSent: number;
  /** NAR bytes received from the peer. */
  bytesReceived: number;
  /** What the NAR bytes sent to and received from the peer took on the wire (less when compressed). */
  wireBytesSent: number;
  wireBytesReceived: number;
  /**
   * NAR bytes per second of waiting on the network, of plain and of zstd transfers from the peer
   * (moving averages, once measured): what "auto" compares.
   */
  plainBytesPerSec?: number;
  zstdBytesPerSec?: number;
  /** Whether this host's next NAR request to the peer accepts zstd ("none": uncompressed). */
  compression: "zstd" | "none";
  /** NARs from the peer that failed NarSize or NarHash (each bars it from that path for 10 min). */
  badNars: number;
  /** Narinfos from the peer, signed by fleet keys only, that contradicted the path's upstream signature (each bars it from that path for 10 min). */
  badNarinfos: number;
  /** While set (ms since the epoch): asked last for every path, after 3 wrong NARs or narinfos within 10 min. */
  penalisedUntil?: number;
  /** How we learned of it: static, mdns, px (peer exchange), tailscale, inbound. */
  sources: string[];
  /** Failed dials since the last successful connection. */
  failures: number;
  /**
   * Disconnected less than 30 s ago: a lookup for a path only it holds waits (up to 5 s) for it
   * to be back instead of answering 404 (an agent restarting).
   */
  reconnecting?: true;
  /** When the next redial is due, while disconnected (ms since the epoch). */
  nextDialAt?: number;
  /**
   * Set once the peer went over a per-peer limit (its summary traffic): why, how often, and until
   * when it is refused (ms since the epoch; past once it may connect again).
   */
  penalty?: { reason: string; count: number; until: number };
  /**
   * Summary traffic received from the peer (all its subscriptions): bytes in snapshot frames (full
   * resyncs) and in delta frames, complete snapshots, and subscriptions resumed from a kept summary.
   */
  summary?: { snapshotBytes: number; deltaBytes: number; snapshots: number; resumes: number };
}

export interface StatusCounters {
  /** Narinfo requests (GET/HEAD) answered from this host's store, from a peer, or 404. */
  narinfoHitsLocal: number;
  narinfoHitsPeer: number;
  narinfoMisses: number;
  /** NAR bytes sent to HTTP clients, whatever their source. */
  narBytesServed: number;
  /** NAR bytes received from peers (decoded: what their NARs hold). */
  narBytesFromPeers: number;
  /** What those NARs took on the wire (less when compressed). */
  narWireBytesFromPeers: number;
  /** NAR bytes sent to peers from this host's store, and what they took on the wire. */
  narBytesToPeers: number;
  narWireBytesToPeers: number;
  /** NAR transfers that came / went zstd-compressed. */
  compressedNarsFromPeers: number;
  compressedNarsToPeers: number;
  peerQueries: number;
  failovers: number;
  transferFailures: number;
  /** NARs from peers that failed NarSize or NarHash. */
  verifyFailures: number;
  /** NAR requests that waited for a transfer slot (every holder at its limit). */
  queuedTransfers: number;
  /** Mesh connections refused after the handshake: the peer's key is not in the fleet. */
  refusedConnections: number;
  /** Times a fleet peer went over a per-peer limit and was disconnected. */
  peerPenalties: number;
  /** Fleet-only narinfos from peers that contradicted an upstream signature (absent without the mesh). */
  narinfoConflicts?: number;
  /** Questions to the upstream caches, and those that got no answer. */
  upstreamChecks: number;
  upstreamCheckFailures: number;
  /** Summary bytes received from all peers, in snapshot frames and in delta frames. */
  summarySnapshotBytes: number;
  summaryDeltaBytes: number;
  /** Inbound mesh sockets refused by the per-remote-host limit (see `admission`). */
  admissionRefused: number;
  /** NAR bodies sent and received on the bulk port, bulk connections that fell back to the mesh stream, and bulk connections refused. */
  bulkNarsSent?: number;
  bulkNarsReceived?: number;
  bulkFallbacks?: number;
  bulkRefused?: number;
  /** Bulk sessions: NARs sent and received on kept connections, and the connections opened to peers. */
  bulkSessionNarsSent?: number;
  bulkSessionNarsReceived?: number;
  bulkSessionConnections?: number;
  /** LAN-direct NARs: our direct port's requests, NARs, refusals and bytes; redirects of Nix to peers' direct ports and fallbacks to relaying. */
  directRequests?: number;
  directNarsSent?: number;
  directRefused?: number;
  directBytesSent?: number;
  directRedirects?: number;
  directFallbacks?: number;
  /** Of the redirects: tickets asked of holders, tickets minted here; of directNarsSent, those for minted tickets. */
  directTicketsAsked?: number;
  directTicketsMinted?: number;
  directMintedServed?: number;
  /** NAR requests relayed, not redirected, because Nix asked for the NAR again soon after a redirect for it. */
  directRepeatsRelayed?: number;
}

/** Whether a socket's remote address is this host's loopback (IPv4, IPv6, or IPv4-mapped). */
export function isLoopback(addr: string | undefined): boolean {
  return addr !== undefined && (addr.startsWith("127.") || addr === "::1" || addr.startsWith("::ffff:127."));
}

export function requireLoopback(req: IncomingMessage): void {
  if (!isLoopback(req.socket.remoteAddress)) throw new HttpError(403, "the admin API answers only on loopback");
}

export function handleStatus(ctx: CacheContext, req: IncomingMessage, res: ServerResponse): void {
  if (!ctx.status) throw new HttpError(404, "not found");
  requireLoopback(req);
  sendJson(req, res, 200, ctx.status(), { "Cache-Control": "no-store" });
}

export async function handleMetrics(ctx: CacheContext, req: IncomingMessage, res: ServerResponse): Promise<void> {
  if (!ctx.metrics) throw new HttpError(404, "not found");
  requireLoopback(req);
  const text = await ctx.metrics.text();
  send(req, res, 200, text, { "Content-Type": ctx.metrics.contentType, "Cache-Control": "no-store" });
}
