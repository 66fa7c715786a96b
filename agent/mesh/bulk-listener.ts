// The holder's bulk port (/fleetcache/nar/3.0.0, protocol/PEER-PROTOCOL.md): NAR bodies on a plain
// TCP connection secured by Node's TLS 1.3 (OpenSSL frames and encrypts in C++), about half the
// CPU per GB of a libp2p stream (BENCHMARKS.md, "Bulk path"). It has no identity of its own: each
// connection must present a one-time ticket that the NAR responder handed to an authenticated
// fleet peer over the mesh, as a TLS 1.3 external PSK (identity = ticket id, key = a fresh random
// 32-byte secret). No certificate: without a valid ticket the handshake fails before any
// application byte, and a ticket is good for one connection within a few seconds. Sockets are
// admitted as on the mesh port: a few per remote host before their handshake, a short deadline.
import { randomBytes } from "node:crypto";
import type { AddressInfo, Socket } from "node:net";
import { createServer, type Server, type TLSSocket } from "node:tls";
import { BULK_KEY_BYTES, BULK_TICKET_BYTES } from "../../protocol/peer-codec.js";
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

  /** The PSK for a ticket id, once: the ticket is gone from the map as soon as a handshake names it. */
  #claim(socket: object, identity: string): Buffer | null {
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
    for (const p of [...this.#tickets.values()]) p.reject(new BulkTicketExpired("listener closed"));
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    for (const s of this.#sockets) s.destroy();
    await closed;
  }
}
