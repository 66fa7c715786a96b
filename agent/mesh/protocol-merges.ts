// libp2p (3.x, connection.js) records in its peer store, on every stream it opens or accepts, that
// the peer speaks the stream's protocol: peerStore.merge(peer, { protocols: [p] }), which takes
// the peer's write lock, reads and decodes its record, encodes it and writes it back (always: the
// write refreshes the record's `updated` time). A NAR from a peer opens one stream, so both agents
// paid it per NAR: 3-5 % of their CPU in the relay case (BENCHMARKS.md, "Relay: CPU per byte").
// Here such a merge goes through once per peer and protocol per REFRESH_MS (so a peer in use still
// has its record refreshed and never ages out of the store), and at once again after any change
// to the peer's record (identify replaces the protocol list a peer announces).
import type { Libp2p, PeerId, PeerStore, PeerUpdate } from "@libp2p/interface";

/** A protocol merge for a peer within this long of the last one that went through is skipped. */
export const REFRESH_MS = 60_000;

export interface MergeCounts {
  /** Protocol merges that went to the peer store. */
  passed: number;
  /** Protocol merges answered without it (the protocol recorded for the peer lately). */
  skipped: number;
}

type Merge = PeerStore["merge"];
type Peer = Awaited<ReturnType<Merge>>;

/** Makes `libp2p`'s per-stream protocol merges (one protocol, nothing else) cheap when repeated. */
export function fewerProtocolMerges(libp2p: Libp2p, refreshMs = REFRESH_MS): MergeCounts {
  const counts: MergeCounts = { passed: 0, skipped: 0 };
  const store = libp2p.peerStore;
  const merge: Merge = store.merge.bind(store);
  /** Per peer: protocol -> when its merge went through, and the record it returned. */
  const recent = new Map<string, Map<string, { at: number; peer: Peer }>>();
  libp2p.addEventListener("peer:update", (evt: CustomEvent<PeerUpdate>) => recent.delete(evt.detail.peer.id.toString()));
  libp2p.addEventListener("peer:disconnect", (evt: CustomEvent<PeerId>) => recent.delete(evt.detail.toString()));
  store.merge = async (id: PeerId, data: Parameters<Merge>[1], options?: Parameters<Merge>[2]): Promise<Peer> => {
    const protocol = data.protocols?.length === 1 && Object.keys(data).length === 1 ? data.protocols[0]! : undefined;
    if (protocol === undefined) return merge(id, data, options);
    const key = id.toString();
    const seen = recent.get(key)?.get(protocol);
    const now = Date.now();
    if (seen && now - seen.at < refreshMs) {
      counts.skipped++;
      return seen.peer; // the callers (connection.js) do not use it
    }
    counts.passed++;
    const peer = await merge(id, data, options);
    // After the merge: its own 'peer:update' (the protocol was new) has cleared the entry already.
    if (peer.protocols.includes(protocol)) {
      let m = recent.get(key);
      if (!m) recent.set(key, (m = new Map()));
      m.set(protocol, { at: now, peer });
    }
    return peer;
  };
  return counts;
}
