// Connecting two in-process mesh nodes in tests. libp2p's dial() returns once the dialer's side
// of the handshake is done, maybe before the other side's: a test that then holds the event loop
// (a large summary publisher start, a store of many paths) can run the other side past its
// inbound handshake deadline (3 s, admission.ts), and the connection is lost under the test.
import type { MeshNode } from "../../agent/mesh/node.js";

/** Dials `to` from `from` and waits until `to` holds the connection too; returns `to`'s peer id. */
export async function connectBoth(from: MeshNode, to: MeshNode, timeoutMs = 30_000): Promise<string> {
  await from.libp2p.dial(to.addresses()[0]!);
  const end = Date.now() + timeoutMs;
  while (to.libp2p.getConnections(from.peerId).length === 0) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${to.peerId} to hold the connection from ${from.peerId}`);
    await new Promise((r) => setTimeout(r, 10));
  }
  return to.peerId.toString();
}
