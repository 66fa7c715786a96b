// The holder's bulk port (/fleetcache/nar/3.0.0, protocol/PEER-PROTOCOL.md): NAR bodies on a plain
// TCP connection secured by Node's TLS 1.3 (OpenSSL frames and encrypts in C++), about half the
// CPU per GB of a libp2p stream (BENCHMARKS.md, "Bulk path"). It has no identity of its own: each
// connection must present a one-time ticket that the NAR responder handed to an authenticated
// fleet peer over the mesh, as a TLS 1.3 external PSK (identity = ticket id, key = a fresh random
// 32-byte secret). No certificate: without a valid ticket the handshake fails before any
// application byte, and a ticket is good for one connection within a few seconds. A bulk session
// (PEER-PROTOCOL.md, "Bulk sessions") is a key of the same kind for one peer's kept connections,
// each carrying NAR requests one after another (bulk-session-server.ts). Sockets are admitted as
// on the mesh port: a few per remote host before their handshake, a short deadline.
import { AsyncLocalStorage } from "node:async_hooks";
import { randomBytes } from "node:crypto";
import type { AddressInfo, Socket } from "node:net";
import { createServer, type Server, type TLSSocket } from "node:tls";
import { BULK_KEY_BYTES, BULK_TICKET_BYTES } from "../../protocol/peer-codec.js";
import { BULK_SESSION_ID_BYTES, BULK_SESSION_KEY_BYTES, sessionIdOf, type BulkSession } from "../../protocol/bulk-session.js";
import type { Logger } from "../log.js";
import { INBOUND_CONNECTION_SETTINGS, InboundPerHost } from "./admission.js";

/** The one suite offered: TLS 1.3 PSKs are bound to SHA-256 here (OpenSSL's PSK callback); AES-GCM is hardware-accelerated. */
export const BULK_CIPHER = "TLS_AES_128_GCM_SHA256";
/** How long a ticket waits for its connection. */
export const BULK_TICKET_MS = 5_000;
/**
 * Sockets one remote host may hold on the bulk port before their handshake is done: a peer opens
 * one per NAR, up to 8 at once (nar-service.ts, MAX_NAR_TRANSFERS_PER_PEER), so twice that. The
 * mesh port's limit (4) refused parallel transfers' handshakes (mesh-narroute's 16 downloads).
 */
export const BULK_INBOUND_PER_HOST = 16;
/** A connection must finish its TLS handshake within this (the mesh port's deadline). */
export const BULK_HANDSHAKE_MS = INBOUND_CONNECTION_SETTINGS.inboundUpgradeTimeout;

/** A bulk session admits new connections for this long (PEER-PROTOCOL.md, "Bulk sessions"). */
export const BULK_SESSION_LIFETIME_S = 600;
/** Connections one session may have open at once: the NAR transfer limit per peer (nar-service.ts). */
export const BULK_SESSION_CONNECTIONS = 8;
/** Sessions kept per peer: its connections made with the one before may still be opening. */
const SESSIONS_PER_PEER = 2;

/**
 * Where a session's connections go once their handshake is done (the NAR request loop). `run`
 * runs a function in the async context of the mesh request that issued the session, so what
 * tracks work per peer there (the mesh's bytes-sent count) sees the connection's work too.
 */
export type SessionHandler = (socket: TLSSocket, peerId: string, run: <R>(fn: () => R) => R) => void;

interface Session {
  id: string;
  peerId: string;
  key: Buffer;
  /** New connections until then (performance.now() ms). */
  until: number;
  open: number;
  run: <R>(fn: () => R) => R;
}

export class BulkTicketExpired extends Error {
  override name = "BulkTicketExpired";
}

export interface BulkTicket {
  ticket: Uint8Array;
  key: Uint8Array;
  /** The TLS connection that presented this ticket; rejects once it expired or was cancelled. */
  connection: Promise<TLSSocket>;
  /** Withdraws the ticket (the NAR stream ended first); a later connection with it is refused. */
  cancel(): void;
}

interface Pending {
  key: Buffer;
  resolve(socket: TLSSocket): void;
  reject(err: Error): void;
}

export class BulkListener {
  readonly #tickets = new Map<string, Pending>();
  /** Sockets whose handshake used a ticket, to the ticket's waiter. */
  readonly #claimed = new WeakMap<object, Pending>();
  readonly #sessions = new Map<string, Session>();
  /** Each peer's live session ids, oldest first. */
  readonly #sessionsOf = new Map<string, string[]>();
  /** Sockets whose handshake named a session. */
  readonly #sessionSockets = new WeakMap<object, Session>();
  #onSession: SessionHandler | undefined;
  /** Connections made with a bulk session (each carries any number of NARs). */
  sessionConnections = 0;
  /** NAR bodies sent whole on session connections. */
  sessionServed = 0;
  readonly admission = new InboundPerHost(BULK_INBOUND_PER_HOST);
  /** Open sockets, destroyed by close(). */
  readonly #sockets = new Set<Socket>();
  /** Connections refused: no such ticket (forged, used, expired) or over the per-host limit. */
  refused = 0;
  /** NAR bodies begun on a bulk connection (its ticket presented). */
  served = 0;
  /** The port listened on (kept: the server's address is gone once it closes). */
  port = 0;

  private constructor(
    readonly server: Server,
    readonly log: Logger,
  ) {}

  /** Listens on `host:port` (port 0: any free port). */
  static async start(host: string, port: number, log: Logger): Promise<BulkListener> {
    let self!: BulkListener;
    const server = createServer({
      minVersion: "TLSv1.3",
      ciphers: BULK_CIPHER,
      handshakeTimeout: BULK_HANDSHAKE_MS,
      pskCallback: (socket, identity) => self.#claim(socket, identity),
    });
    self = new BulkListener(server, log);
    server.on("connection", (sock: Socket) => {
      if (self.admission.denySocket(sock.remoteAddress, sock)) {
        self.refused++;
        return sock.destroy();
      }
      self.#sockets.add(sock);
      sock.once("close", () => self.#sockets.delete(sock));
    });
    server.on("secureConnection", (socket: TLSSocket) => {
      const session = self.#sessionSockets.get(socket);
      if (session) return self.#sessionConnected(socket, session);
      const pending = self.#claimed.get(socket);
      // No ticket behind this handshake (a TLS session resumed from an earlier connection): nothing.
      if (!pending) return socket.destroy();
      self.admission.admitted(socket);
      pending.resolve(socket);
    });
    // A failed handshake (no ticket, wrong key, timeout): Node destroys the socket; nothing to do.
    server.on("tlsClientError", () => {});
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => {
        server.off("error", reject);
        resolve();
      });
    });
    server.on("error", (err) => log.warn({ err: err.message }, "mesh: bulk listener error"));
    self.port = (server.address() as AddressInfo).port;
    return self;
  }

  /** A one-time ticket for one connection within `ttlMs`. */
  issue(ttlMs = BULK_TICKET_MS): BulkTicket {
    const ticket = randomBytes(BULK_TICKET_BYTES);
    const key = randomBytes(BULK_KEY_BYTES);
    const id = ticket.toString("hex");
    let timer: NodeJS.Timeout | undefined;
    const connection = new Promise<TLSSocket>((resolve, reject) => {
      const settle = () => {
        clearTimeout(timer);
        this.#tickets.delete(id);
      };
      this.#tickets.set(id, {
        key,
        resolve: (s) => (settle(), resolve(s)),
        reject: (e) => (settle(), reject(e)),
      });
    });
    connection.catch(() => {}); // the caller may never wait for it (the stream failed first)
    const expire = (why: string) => this.#tickets.get(id)?.reject(new BulkTicketExpired(why));
    timer = setTimeout(() => expire(`no bulk connection within ${ttlMs} ms`), ttlMs);
    return { ticket, key, connection, cancel: () => expire("cancelled") };
  }

  /** Serve bulk sessions: their connections go to `handler`. Without it no session is issued. */
  serveSessions(handler: SessionHandler): void {
    this.#onSession = handler;
  }

  get servesSessions(): boolean {
    return this.#onSession !== undefined;
  }

  /**
   * A new session for `peerId` (the authenticated mesh peer that asked): its connections' NAR
   * requests are that peer's. The peer's sessions before the last are forgotten.
   */
  issueSession(peerId: string, lifetimeS = BULK_SESSION_LIFETIME_S): BulkSession {
    if (!this.#onSession) throw new Error("bulk sessions are not served");
    const sessionId = randomBytes(BULK_SESSION_ID_BYTES);
    const key = randomBytes(BULK_SESSION_KEY_BYTES);
    const id = sessionId.toString("hex");
    this.#sessions.set(id, { id, peerId, key, until: performance.now() + lifetimeS * 1000, open: 0, run: AsyncLocalStorage.snapshot() });
    const ids = this.#sessionsOf.get(peerId) ?? [];
    ids.push(id);
    while (ids.length > SESSIONS_PER_PEER) this.#sessions.delete(ids.shift()!);
    this.#sessionsOf.set(peerId, ids);
    return { port: this.port, sessionId, key, lifetimeS, connections: BULK_SESSION_CONNECTIONS };
  }

  #sessionConnected(socket: TLSSocket, session: Session): void {
    // Counted once connected (a handshake may still fail after the PSK was found); the PSK
    // callback turns handshakes away once the session is full, this catches a race of several.
    if (session.open >= BULK_SESSION_CONNECTIONS || !this.#onSession) {
      this.refused++;
      return void socket.destroy();
    }
    session.open++;
    // Small frames both ways between bodies: Nagle would hold our header until the requester's
    // delayed ACK of the last one (up to 40 ms a NAR).
    socket.setNoDelay(true);
    socket.once("close", () => session.open--);
    this.admission.admitted(socket);
    this.sessionConnections++;
    this.#onSession(socket, session.peerId, session.run);
  }

  /** The PSK of a live session with room for another connection. */
  #claimSession(socket: object, id: string): Buffer | null {
    const session = this.#sessions.get(id);
    if (!session || performance.now() > session.until || session.open >= BULK_SESSION_CONNECTIONS) {
      this.refused++;
      return null;
    }
    this.#sessionSockets.set(socket, session);
    return session.key;
  }

  /** The PSK for a ticket id, once: the ticket is gone from the map as soon as a handshake names it. */
  #claim(socket: object, identity: string): Buffer | null {
    const sessionId = sessionIdOf(identity);
    if (sessionId !== undefined) return this.#claimSession(socket, sessionId);
    const pending = /^[0-9a-f]{32}$/.test(identity) ? this.#tickets.get(identity) : undefined;
    if (!pending) {
      this.refused++;
      return null; // "unknown_psk_identity": the handshake ends here
    }
    this.#tickets.delete(identity);
    this.#claimed.set(socket, pending);
    return pending.key;
  }

  async close(): Promise<void> {
    this.#sessions.clear();
    this.#sessionsOf.clear();
    for (const p of [...this.#tickets.values()]) p.reject(new BulkTicketExpired("listener closed"));
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const s of this.#sockets) s.destroy();
    await closed;
  }
}
