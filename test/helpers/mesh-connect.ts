// Connecting two in-process mesh nodes in tests. libp2p's dial() returns once the dialer's side
// of the handshake is done, maybe before the other side's: a test that then holds the event loop
// (a large summary publisher start, a store of many paths) can run the other side past its
// inbound handshake deadline (3 s, admission.ts), and the connection is lost under the test.
import type { MeshNode } from "../../agent/mesh/node.js";

/**
 * Dials `to` from `from` and waits until `to` holds that connection open too; returns `to`'s peer
 * id. "That connection": right after a hang-up `to` still lists the old one (closed) for a while,
 * so one it held before the dial does not count, unless the dial reused a connection already open.
 */
export async function connectBoth(from: MeshNode, to: MeshNode, timeoutMs = 30_000): Promise<string> {
  const held = new Set(to.libp2p.getConnections(from.peerId).map((c) => c.id));
  const had = new Set(from.libp2p.getConnections(to.peerId).map((c) => c.id));
  const conn = await from.libp2p.dial(to.addresses()[0]!);
  const reused = had.has(conn.id);
  const end = Date.now() + timeoutMs;
  while (!to.libp2p.getConnections(from.peerId).some((c) => c.status === "open" && (reused || !held.has(c.id)))) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${to.peerId} to hold the connection from ${from.peerId}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  return to.peerId.toString();
}
