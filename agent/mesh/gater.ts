// Admits only peers whose peer ID derives from a trusted Nix key. The encrypted-connection hooks
// run after the noise handshake, which proves the remote holds that key, so a peer cannot claim
// someone else's ID; the dial hooks save a pointless handshake with a known-untrusted peer.
import type { ConnectionGater, PeerId } from "@libp2p/interface";
import type { Multiaddr } from "@multiformats/multiaddr";
import { InboundPerHost } from "./admission.js";

/** A connection refused after the handshake: the remote holds a key that is not in the fleet. */
export type RefusedPeer = (peerId: string, direction: "inbound" | "outbound") => void;

/** A trusted peer refused for now (over a per-peer limit, see penalties.ts). */
export type DeniedPeer = (peerId: string) => boolean;

export function meshGater(
  self: string,
  trusted: ReadonlySet<string> | ReadonlyMap<string, unknown>,
  onRefused?: RefusedPeer,
  denied: DeniedPeer = () => false,
  perHost = new InboundPerHost(),
): ConnectionGater {
  const refuse = (direction: "inbound" | "outbound") => (peer: PeerId): boolean => {
    const id = peer.toString();
    const refused = !trusted.has(id);
    if (refused) onRefused?.(id, direction);
    return refused || denied(id);
  };
  return {
    // libp2p refuses self-dials anyway; saying so here keeps our own key out of every dial path.
    // Neither dial hook reports a refusal: nothing was sent, no connection was made.
    denyDialPeer: (peer) => peer.toString() === self || !trusted.has(peer.toString()) || denied(peer.toString()),
    // A multiaddr naming its peer (/p2p/<id>) can be judged before connecting. Everything else
    // is allowed, including private, loopback and CGNAT (tailnet 100.64.0.0/10) addresses: the
    // fleet lives on LANs and tailnets (libp2p's browser default would refuse private ranges).
    denyDialMultiaddr: (ma: Multiaddr) => {
      const id = peerIdIn(ma);
      return id !== undefined && (id === self || !trusted.has(id) || denied(id));
    },
    filterMultiaddrForPeer: () => true,
    // Before any handshake, by remote address only: a host holding idle sockets keeps a few
    // pending slots at most (admission.ts).
    denyInboundConnection: (conn) => perHost.deny(conn),
    denyInboundEncryptedConnection: refuse("inbound"),
    denyOutboundEncryptedConnection: refuse("outbound"),
    // Same check again once upgraded: cheap, and catches any path that skips the one above (a
    // connection refused there never gets here, so none is reported twice).
    denyInboundUpgradedConnection: (peer, conn) => {
      if (refuse("inbound")(peer)) return true;
      perHost.admitted(conn); // a trusted peer's connection: no longer a pending slot of its host
      return false;
    },
    denyOutboundUpgradedConnection: refuse("outbound"),
  };
}

function peerIdIn(ma: Multiaddr): string | undefined {
  let id: string | undefined;
  for (const c of ma.getComponents()) if (c.name === "p2p") id = c.value;
  return id;
}
