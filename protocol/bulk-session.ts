// /fleetcache/bulk/1.0.0 (PEER-PROTOCOL.md, "Bulk sessions"): the key a requester uses to keep TLS
// connections to a holder's bulk port open and ask for one NAR after another on them. The
// requests and answers on those connections are 1.0.0's NarRequest, NarOk and NarError (peer-codec).
import { PeerProtocolError, Reader, Writer } from "./peer-wire.js";

export const PROTOCOL_BULK_SESSION = "/fleetcache/bulk/1.0.0";
export const TAG_BULK_SESSION_REQUEST = 0x29;
export const TAG_BULK_SESSION = 0x2a;
export const BULK_SESSION_ID_BYTES = 16;
export const BULK_SESSION_KEY_BYTES = 32;
export const MIN_BULK_SESSION_LIFETIME_S = 60;
export const MAX_BULK_SESSION_LIFETIME_S = 3600;
export const MAX_BULK_SESSION_CONNECTIONS = 64;
/** Largest frame on the session stream and on a session connection, both ways. */
export const MAX_BULK_FRAME_BYTES = 512;

export interface BulkSession {
  port: number;
  sessionId: Uint8Array;
  key: Uint8Array;
  /** Seconds from the answer during which new connections are admitted (responder's clock). */
  lifetimeS: number;
  /** Connections the session admits open at once. */
  connections: number;
}

export function encodeBulkSessionRequest(): Uint8Array {
  return Uint8Array.of(TAG_BULK_SESSION_REQUEST);
}

export function decodeBulkSessionRequest(payload: Uint8Array): void {
  const r = new Reader(payload, "bulk session request");
  if (r.u8() !== TAG_BULK_SESSION_REQUEST) r.fail("unknown message tag");
  r.end();
}

export function encodeBulkSession(m: BulkSession): Uint8Array {
  if (m.sessionId.length !== BULK_SESSION_ID_BYTES || m.key.length !== BULK_SESSION_KEY_BYTES) throw new PeerProtocolError("bulk session: bad id or key length");
  if (m.port < 1) throw new PeerProtocolError("bulk session: port 0");
  if (m.lifetimeS < MIN_BULK_SESSION_LIFETIME_S || m.lifetimeS > MAX_BULK_SESSION_LIFETIME_S) throw new PeerProtocolError("bulk session: lifetime out of range");
  if (m.connections < 1 || m.connections > MAX_BULK_SESSION_CONNECTIONS) throw new PeerProtocolError("bulk session: connections out of range");
  return new Writer(64)
    .u8(TAG_BULK_SESSION)
    .uint("port", m.port, 65535)
    .fixed(m.sessionId)
    .fixed(m.key)
    .uint("lifetime", m.lifetimeS, MAX_BULK_SESSION_LIFETIME_S)
    .uint("connections", m.connections, MAX_BULK_SESSION_CONNECTIONS)
    .finish();
}

/** A BulkSession; anything else throws PeerProtocolError (the caller first sees whether the tag is NarError's). */
export function decodeBulkSession(payload: Uint8Array): BulkSession {
  const r = new Reader(payload, "bulk session");
  if (r.u8() !== TAG_BULK_SESSION) r.fail("unknown message tag");
  const port = r.uint("port", 65535);
  if (port === 0) r.fail("port 0");
  const sessionId = r.fixed("session id", BULK_SESSION_ID_BYTES).slice();
  const key = r.fixed("key", BULK_SESSION_KEY_BYTES).slice();
  const lifetimeS = r.uint("lifetime", MAX_BULK_SESSION_LIFETIME_S);
  if (lifetimeS < MIN_BULK_SESSION_LIFETIME_S) r.fail(`lifetime ${lifetimeS} s under ${MIN_BULK_SESSION_LIFETIME_S}`);
  const connections = r.uint("connections", MAX_BULK_SESSION_CONNECTIONS);
  if (connections === 0) r.fail("connections 0");
  r.end();
  return { port, sessionId, key, lifetimeS, connections };
}

/** The TLS PSK identity of a session's connections: "s" and the session id in lowercase hex. */
export function sessionIdentity(sessionId: Uint8Array): string {
  return "s" + Buffer.from(sessionId).toString("hex");
}

const SESSION_IDENTITY = new RegExp(`^s[0-9a-f]{${2 * BULK_SESSION_ID_BYTES}}$`);

/** The session id hex of a PSK identity, or undefined if it is not a session's. */
export function sessionIdOf(identity: string): string | undefined {
  return SESSION_IDENTITY.test(identity) ? identity.slice(1) : undefined;
}
