// The holder's direct port (LAN-direct NARs, `direct_lan`; protocol/PEER-PROTOCOL.md, NarDirect):
// plain HTTP on which a peer's Nix fetches a NAR of this host's store itself, sent with sendfile
// as the local NAR route sends it, so neither agent copies, encrypts or hashes its bytes. Nix
// checks them against the NarHash of the signed narinfo it got from its own agent.
// It has no identity of its own: the only thing it serves is GET/HEAD of
// /<ticket>/nar/<hash part>-<NAR hash>.nar, where the ticket is either 16 random bytes (hex) that the
// NAR responder handed to an authenticated fleet peer over the mesh for exactly that NAR, or one
// that peer minted itself with a minting key handed to it the same way (direct-ticket.ts). A
// ticket is good for one request (a one-time one within a few seconds, a minted one while its key
// lives). Everything else is an empty 404/405/400. Sockets are admitted as on the bulk port: a few
// per remote host until a request names a live ticket.
import { randomBytes } from "node:crypto";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import { BULK_TICKET_BYTES } from "../../protocol/peer-codec.js";
import { MAX_MINTS_PER_KEY, MINT_KEY_BYTES, MINT_KEY_ID_BYTES, MINTED_TICKET_BYTES, mintedMacOk, splitMinted } from "../../protocol/direct-ticket.js";
import { narUrl } from "../../protocol/nar-url.js";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Logger } from "../log.js";
import { NarGoneError, NarUnavailableError, type PathSource } from "../source.js";
import { InboundPerHost } from "./admission.js";
import { BULK_HANDSHAKE_MS, BULK_INBOUND_PER_HOST, BULK_TICKET_MS } from "./bulk-listener.js";

/** How long a ticket waits for its request (as a bulk ticket: the redirect is followed at once). */
export const DIRECT_TICKET_MS = BULK_TICKET_MS;
/** Sockets one remote host may hold before a request names a live ticket (as the bulk port). */
export const DIRECT_INBOUND_PER_HOST = BULK_INBOUND_PER_HOST;
/** A request's headers must be in within this (the bulk port's handshake deadline). */
export const DIRECT_HEADERS_MS = BULK_HANDSHAKE_MS;
/** Request line and headers: Nix sends a few hundred bytes. */
export const DIRECT_MAX_HEADER_BYTES = 4096;
/** A response whose reader takes nothing for this long is cut (the mesh's NAR send stall, 60 s). */
export const DIRECT_STALL_MS = 60_000;

/** How long a minting key opens tickets (by this host's clock; the requester stops earlier by its own). */
export const MINT_KEY_LIFETIME_MS = 10 * 60_000;
/** Keys one peer holds at once: the newest and the one before (tickets it minted just before it got the new one are in flight). */
export const MINT_KEYS_PER_PEER = 2;

/** Sends `info`'s NAR as the local NAR route does (Range, HEAD, sendfile); `count` is told of bytes sent. */
export type ServeNar = (req: IncomingMessage, res: ServerResponse, info: PathInfo, count: (n: number) => void) => Promise<unknown>;

interface Ticket {
  /** The one path this ticket opens: /<ticket hex>/nar/<hash part>-<NAR hash>.nar. */
  path: string;
  info: PathInfo;
  timer: NodeJS.Timeout;
}

/** This host's store: the path with this hash part, if held (for minted tickets, which name a NAR nothing here was asked about). */
export type HeldPath = (hashPart: string) => Promise<PathInfo | undefined>;

interface MintKey {
  peer: string;
  key: Buffer;
  /** Nonces of tickets already spent with this key (kept until it expires). */
  nonces: Set<string>;
  timer: NodeJS.Timeout;
}

export interface DirectCounters {
  /** Requests received (any method, any path). */
  requests: number;
  /** NAR responses begun for a live ticket. */
  served: number;
  /** Requests and sockets refused: no such ticket (forged, used, expired, another NAR's), a bad request, or over the per-host limit. */
  refused: number;
  /** NAR bytes sent. */
  bytes: number;
  /** Of `served`: NARs sent for a ticket the requester minted. */
  minted: number;
}

const TICKET_PATH = /^\/([0-9a-f]{32})\//;
/** A minted ticket's path; the tail is checked against the MAC, and then as a NAR URL. */
const MINTED_PATH = new RegExp(`^/([0-9a-f]{${2 * MINTED_TICKET_BYTES}})/(nar/([0-9a-df-np-sv-z]{32})-[0-9a-df-np-sv-z]{52}\\.nar)$`);

export class DirectListener {
  readonly #tickets = new Map<string, Ticket>();
  /** Minting keys by key id (hex). */
  readonly #keys = new Map<string, MintKey>();
  /** Key ids per peer, oldest first. */
  readonly #peerKeys = new Map<string, string[]>();
  /** Minted tickets refused per peer whose key id they named (a bad MAC, a reused nonce): for the log and tests. */
  readonly mintRefusals = new Map<string, number>();
  readonly admission = new InboundPerHost(DIRECT_INBOUND_PER_HOST);
  readonly counters: DirectCounters = { requests: 0, served: 0, refused: 0, bytes: 0, minted: 0 };
  /** The port listened on (kept: the server's address is gone once it closes). */
  port = 0;

  private constructor(
    readonly server: Server,
    readonly log: Logger,
    readonly held: HeldPath | undefined,
  ) {}

  /**
   * Listens on `host:port` (port 0: any free port); `serve` sends a NAR from this host's store.
   * Without `held`, no minting keys are handed out (minted tickets name NARs only it can find).
   */
  static async start(host: string, port: number, serve: ServeNar, log: Logger, held?: HeldPath): Promise<DirectListener> {
    const server = createServer({
      maxHeaderSize: DIRECT_MAX_HEADER_BYTES,
      headersTimeout: DIRECT_HEADERS_MS,
      requestTimeout: DIRECT_HEADERS_MS + 2_000,
      // How often Node checks the two timeouts above (default 30 s: a slowloris would hold its socket that long).
      connectionsCheckingInterval: 500,
      keepAliveTimeout: DIRECT_HEADERS_MS,
    });
    const self = new DirectListener(server, log, held);
    server.timeout = DIRECT_STALL_MS;
    server.maxHeadersCount = 32;
    // Node's headersTimeout is checked only when bytes arrive (Node 24): a socket that sent half a
    // request line and then nothing would be held for ever. So a deadline of our own, from the
    // connection (and from the end of each response, on a kept-alive one) to the next request.
    const deadlines = new WeakMap<Socket, NodeJS.Timeout>();
    const arm = (sock: Socket) => {
      clearTimeout(deadlines.get(sock));
      deadlines.set(sock, setTimeout(() => sock.destroy(), DIRECT_HEADERS_MS));
    };
    server.on("connection", (sock: Socket) => {
      if (self.admission.denySocket(sock.remoteAddress, sock)) {
        self.counters.refused++;
        return sock.destroy();
      }
      arm(sock);
      sock.once("close", () => clearTimeout(deadlines.get(sock)));
    });
    server.on("request", (req: IncomingMessage, res: ServerResponse) => {
      clearTimeout(deadlines.get(req.socket));
      res.once("finish", () => arm(req.socket));
      self.#handle(req, res, serve).catch((err: Error) => {
        log.warn({ err: err.message }, "mesh: direct NAR request failed");
        res.destroy();
      });
    });
    // Malformed HTTP, oversized headers, a request not in by its deadline: an empty 4xx and the
    // socket closed (destroyed once written: ended alone, a client that keeps sending holds it).
    server.on("clientError", (err: NodeJS.ErrnoException, socket) => {
      self.counters.refused++;
      const status = err.code === "HPE_HEADER_OVERFLOW" ? "431 Request Header Fields Too Large" : err.code === "ERR_HTTP_REQUEST_TIMEOUT" ? "408 Request Timeout" : "400 Bad Request";
      if (!socket.writable) return socket.destroy();
      socket.end(`HTTP/1.1 ${status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`, () => socket.destroy());
    });
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => {
        server.off("error", reject);
        resolve();
      });
    });
    server.on("error", (err) => log.warn({ err: err.message }, "mesh: direct listener error"));
    self.port = (server.address() as AddressInfo).port;
    return self;
  }

  /**
   * A one-time ticket for one request of `info`'s whole NAR within `ttlMs`; returns the URL path
   * it opens (/<ticket hex>/nar/<hash part>-<NAR hash>.nar) and the ticket's bytes.
   */
  issue(hashPart: string, info: PathInfo, ttlMs = DIRECT_TICKET_MS): { ticket: Uint8Array; path: string } {
    const ticket = randomBytes(BULK_TICKET_BYTES);
    const id = ticket.toString("hex");
    const path = directPath(id, hashPart, info.narHash);
    const timer = setTimeout(() => this.#tickets.delete(id), ttlMs);
    timer.unref();
    this.#tickets.set(id, { path, info, timer });
    return { ticket, path };
  }

  /** Whether minting keys can be handed out. */
  get mints(): boolean {
    return this.held !== undefined;
  }

  /**
   * A new minting key for `peer` (its tickets are accounted to it), good for `lifetimeMs` by this
   * host's clock. The peer's key before the last stays good until it expires; older ones are retired.
   */
  issueKey(peer: string, lifetimeMs = MINT_KEY_LIFETIME_MS): { keyId: Buffer; key: Buffer; lifetimeS: number } {
    const keyId = randomBytes(MINT_KEY_ID_BYTES);
    const key = randomBytes(MINT_KEY_BYTES);
    const id = keyId.toString("hex");
    const timer = setTimeout(() => this.#retire(id), lifetimeMs);
    timer.unref();
    this.#keys.set(id, { peer, key, nonces: new Set(), timer });
    const ids = [...(this.#peerKeys.get(peer) ?? []), id];
    this.#peerKeys.set(peer, ids.slice(-MINT_KEYS_PER_PEER));
    for (const old of ids.slice(0, -MINT_KEYS_PER_PEER)) this.#retire(old);
    return { keyId, key, lifetimeS: Math.max(1, Math.floor(lifetimeMs / 1000)) };
  }

  #retire(id: string): void {
    const k = this.#keys.get(id);
    if (!k) return;
    clearTimeout(k.timer);
    this.#keys.delete(id);
    const ids = this.#peerKeys.get(k.peer)?.filter((i) => i !== id) ?? [];
    if (ids.length > 0) this.#peerKeys.set(k.peer, ids);
    else this.#peerKeys.delete(k.peer);
  }

  /**
   * The NAR a minted ticket opens, or why not: "refuse" (a bad MAC or a spent nonce under a live
   * key), "unknown" (no such key: expired, retired, or issued before this agent restarted), "gone"
   * (not held here).
   */
  async #minted(ticketHex: string, urlTail: string, hashPart: string): Promise<PathInfo | "refuse" | "unknown" | "gone"> {
    const ticket = Buffer.from(ticketHex, "hex");
    const parts = splitMinted(ticket)!;
    const id = parts.keyId.toString("hex");
    const k = this.#keys.get(id);
    if (!k) return "unknown";
    const nonce = parts.nonce.toString("hex");
    if (!mintedMacOk(k.key, ticket, urlTail) || k.nonces.has(nonce)) {
      this.mintRefusals.set(k.peer, (this.mintRefusals.get(k.peer) ?? 0) + 1);
      return "refuse";
    }
    k.nonces.add(nonce);
    // The memory a key may take is bounded: past its quota the peer asks for a new one.
    if (k.nonces.size >= MAX_MINTS_PER_KEY) this.#retire(id);
    const info = await this.held!(hashPart);
    return info && urlTail === narUrl(hashPart, info.narHash) ? info : "gone";
  }

  async #handle(req: IncomingMessage, res: ServerResponse, serve: ServeNar): Promise<void> {
    this.counters.requests++;
    if (req.method !== "GET" && req.method !== "HEAD") return this.#refuse(res, 405, { Allow: "GET, HEAD" });
    const minted = this.held && MINTED_PATH.exec(req.url ?? "");
    if (minted) {
      const info = await this.#minted(minted[1]!, minted[2]!, minted[3]!);
      if (info === "refuse") return this.#refuse(res, 404);
      // Not held (collected, or the requester's view of this host is stale), or a key this agent
      // no longer knows (it restarted, or the key ran out while the redirect was on its way): as a
      // path collected since its one-time ticket, a 502, which Nix retries through its agent; a
      // 404 would make Nix give the path up for this run. A forged key id gains nothing by it.
      if (info === "gone" || info === "unknown") return this.#refuse(res, 502);
      this.admission.admitted(req.socket);
      this.counters.served++;
      this.counters.minted++;
      await serve(req, res, info, (n) => (this.counters.bytes += n));
      return;
    }
    // The ticket is spent by the first request that names it, whatever else that request says.
    const id = TICKET_PATH.exec(req.url ?? "")?.[1];
    const t = id === undefined ? undefined : this.#tickets.get(id);
    if (!t) return this.#refuse(res, 404);
    this.#tickets.delete(id!);
    clearTimeout(t.timer);
    if (req.url !== t.path) return this.#refuse(res, 404);
    this.admission.admitted(req.socket);
    this.counters.served++;
    const started = performance.now();
    await serve(req, res, t.info, (n) => (this.counters.bytes += n));
    this.log.debug({ path: t.info.storePath, ms: Math.round((performance.now() - started) * 10) / 10 }, "mesh: NAR sent on the direct port");
  }

  #refuse(res: ServerResponse, status: number, headers: Record<string, string> = {}): void {
    this.counters.refused++;
    res.writeHead(status, { ...headers, "Content-Length": "0", "Cache-Control": "no-store" });
    res.end();
  }

  /** Live tickets (for tests). */
  get tickets(): number {
    return this.#tickets.size;
  }

  /** Live minting keys (for tests). */
  get keys(): number {
    return this.#keys.size;
  }

  async close(): Promise<void> {
    for (const id of [...this.#keys.keys()]) this.#retire(id);
    for (const t of this.#tickets.values()) clearTimeout(t.timer);
    this.#tickets.clear();
    const closed = new Promise<void>((r) => this.server.close(() => r()));
    this.server.closeAllConnections();
    await closed;
  }
}

/** The URL path a direct ticket opens. */
export function directPath(ticketHex: string, hashPart: string, narHash: string): string {
  return `/${ticketHex}/${narUrl(hashPart, narHash)}`;
}

/**
 * The store as the direct port's NAR source: a path collected between its ticket and the request
 * is a 502, not the local route's 404. Nix gives a path up on a 404 ("not in this cache") but
 * retries a 502 from its agent's URL, which can then fail over to another holder.
 */
export function directSource(local: PathSource): PathSource {
  return {
    pathInfo: (hashPart) => local.pathInfo(hashPart),
    narStream: (info, start, end, readSize) => notGone(local.narStream(info, start, end, readSize)),
    ...(local.narPieces && { narPieces: (info, start, end, opts) => notGone(local.narPieces!(info, start, end, opts)) }),
  };
}

async function* notGone<T>(chunks: AsyncIterable<T>): AsyncGenerator<T> {
  try {
    yield* chunks;
  } catch (e) {
    if (e instanceof NarGoneError) throw new NarUnavailableError(e.message, { cause: e });
    throw e;
  }
}
