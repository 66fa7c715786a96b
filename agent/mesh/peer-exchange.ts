// /fleetcache/peers/1.0.0 (protocol/PEER-PROTOCOL.md): one PeersRequest, one PeersResponse per
// stream. An agent that knows one member of the fleet thus learns all of them.
import type { PeerId } from "@libp2p/interface";
import {
  decodePeersRequest,
  decodePeersResponse,
  encodePeersRequest,
  encodePeersResponse,
  MAX_ADDRS_PER_PEER,
  MAX_FRAME_BYTES,
  MAX_MULTIADDR_BYTES,
  MAX_PEERS,
  PROTOCOL_PEERS,
  type PeerRecord,
} from "../../protocol/peer-codec.js";
import type { MeshNode } from "./node.js";
import { writeFrame } from "./stream-io.js";

/** What the responder needs from the peer manager. */
export interface PeerExchangeSource {
  peers(): readonly { peerId: string; addresses: readonly string[]; connected: boolean }[];
}

/** The spec's responder deadline for the request frame. */
export const PEERS_REQUEST_TIMEOUT_MS = 10_000;
/** A PeersRequest is a single tag byte: no reason to buffer a bigger frame before refusing it. */
const MAX_REQUEST_FRAME = 16;
/** Per remote peer, as the spec allows. */
const MAX_INBOUND_PEERS_STREAMS = 4;

/** A loopback multiaddr: from another host, dialing it reaches that host itself. */
export const isLoopback = (addr: string): boolean =>
  addr.startsWith("/ip4/127.") || addr.startsWith("/ip6/::1/") || addr.startsWith("/dns/localhost/");

/**
 * The response for `requester`: connected fleet peers other than it and us, with the addresses
 * we know for them (loopback ones only for a requester on our loopback, i.e. this same host).
 */
export function peersFor(
  source: PeerExchangeSource,
  self: string,
  requester: string,
  trusted: ReadonlyMap<string, unknown>,
  opts: { includeLoopback: boolean },
): PeerRecord[] {
  const out: PeerRecord[] = [];
  for (const p of source.peers()) {
    if (!p.connected || p.peerId === self || p.peerId === requester || !trusted.has(p.peerId)) continue;
    const multiaddrs = p.addresses
      .filter((a) => a.length <= MAX_MULTIADDR_BYTES && (opts.includeLoopback || !isLoopback(a)))
      .slice(0, MAX_ADDRS_PER_PEER);
    out.push({ peerId: p.peerId, multiaddrs });
    if (out.length === MAX_PEERS) break;
  }
  return out;
}

/** Answers PeersRequests from the manager's current view (registered by PeerManager.start()). */
export async function servePeerExchange(node: MeshNode, source: PeerExchangeSource): Promise<void> {
  const self = node.peerId.toString();
  await node.handle(
    PROTOCOL_PEERS,
    async ({ stream, reader, peerId, connection }) => {
      const timer = setTimeout(() => stream.abort(new Error("no peers request within 10 s")), PEERS_REQUEST_TIMEOUT_MS);
      let request: Uint8Array | undefined;
      try {
        request = await reader.readFrame(MAX_REQUEST_FRAME);
      } finally {
        clearTimeout(timer);
      }
      if (request === undefined) throw new Error("peers stream ended before a request");
      decodePeersRequest(request);
      const includeLoopback = isLoopback(connection.remoteAddr.toString());
      await writeFrame(stream, encodePeersResponse(peersFor(source, self, peerId, node.trusted, { includeLoopback })));
    },
    { maxInboundStreams: MAX_INBOUND_PEERS_STREAMS },
  );
}

/** Asks `peer` whom it is connected to. Rejects on any protocol error, timeout or abort. */
export async function fetchPeers(node: MeshNode, peer: PeerId | string, opts: { signal?: AbortSignal } = {}): Promise<PeerRecord[]> {
  const { signal } = opts;
  const { stream, reader } = await node.open(peer, PROTOCOL_PEERS, { signal });
  // readFrame takes no signal: aborting the stream makes it throw.
  const onAbort = () => stream.abort(new Error("peer exchange aborted"));
  signal?.addEventListener("abort", onAbort, { once: true });
  try {
    signal?.throwIfAborted();
    await writeFrame(stream, encodePeersRequest(), { signal });
    await stream.close({ signal });
    const frame = await reader.readFrame(MAX_FRAME_BYTES.peers);
    if (frame === undefined) throw new Error("peers stream ended without a response");
    return decodePeersResponse(frame);
  } catch (err) {
    stream.abort(err instanceof Error ? err : new Error(String(err)));
    throw err;
  } finally {
    signal?.removeEventListener("abort", onAbort);
  }
}
