// The requester's bulk sessions (PEER-PROTOCOL.md, "Bulk sessions"): per holder, a session key
// asked for once on the mesh, and TLS connections to its bulk port kept open between NARs, so a
// NAR costs one request frame on a warm connection instead of a mesh stream (1.6 ms of CPU) and,
// for a big body, a TLS handshake. Used for plain NARs from holders on this host's networks
// (nar-service.ts decides); when no session connection can be had, the caller uses the mesh.
import {
  MAX_BULK_FRAME_BYTES,
  PROTOCOL_BULK_SESSION,
  decodeBulkSession,
  encodeBulkSessionRequest,
  sessionIdentity,
  type BulkSession,
} from "../../protocol/bulk-session.js";
import { TAG_NAR_ERROR, type NarResponseHeader } from "../../protocol/peer-codec.js";
import type { Logger } from "../log.js";
import type { MeshNode } from "./node.js";
import { BulkConnectError, connectBulk, type BulkRoutes } from "./bulk-client.js";
import { SessionConnection, SessionConnectionError } from "./bulk-session-connection.js";
import { NarFetchError, REASON_BY_CODE } from "./nar-fetch-error.js";
import { deadline } from "./narinfo-service.js";
import { writeFrame } from "./stream-io.js";

/** A kept connection idle this long is closed (spec: before the responder's 30 s). */
export const SESSION_IDLE_CLOSE_MS = 20_000;
/** A holder that has no sessions (an older agent, no bulk port) is not asked again for this long. */
export const SESSION_RETRY_AFTER_MS = 10 * 60_000;
/** A session is used until this long before its lifetime (the responder's clock) runs out. */
const LIFETIME_MARGIN_MS = 60_000;

interface PeerSessions {
  session?: { s: BulkSession; until: number };
  asking?: Promise<BulkSession | undefined>;
  idle: SessionConnection[];
  /** Connections open (idle or answering). */
  open: number;
  noSessionsUntil?: number;
}

export interface SessionRequest {
  hashPart: string;
  /** nix32, without "sha256:". */
  narHash: string;
  offset: number;
  narSize: number;
}

export interface SessionBody {
  /** Exactly narSize - offset bytes, or a throw; the connection goes back to the pool at the end. */
  chunks: AsyncGenerator<Buffer>;
  /** Ends the transfer early (the connection is closed). */
  abort(): void;
}

export class BulkSessions {
  readonly #peers = new Map<string, PeerSessions>();
  /** Sessions received, connections opened, NARs asked for on a kept connection. */
  sessions = 0;
  connections = 0;
  reused = 0;
  /** NAR bodies received whole on session connections. */
  received = 0;
  #closed = false;

  constructor(
    private readonly node: MeshNode,
    private readonly routes: BulkRoutes,
    private readonly log?: Logger,
    private readonly idleMs = SESSION_IDLE_CLOSE_MS,
  ) {
    // A holder whose mesh connection closed may have restarted and forgotten its sessions.
    node.libp2p.addEventListener("peer:disconnect", (e) => {
      const p = this.#peers.get(e.detail.toString());
      if (p) p.session = undefined;
    });
  }

  /** Whether a session may be tried with this holder now. */
  usable(peerId: string): boolean {
    if (this.#closed || !this.routes.reachable(peerId)) return false;
    const until = this.#peers.get(peerId)?.noSessionsUntil;
    return until === undefined || Date.now() >= until;
  }

  /**
   * Asks `peerId` (at `host`, on one of this host's networks) for a NAR on a session connection.
   * Resolves with its body once the holder said NarOk with the expected size; throws
   * NarFetchError for the holder's NarError, a wrong size, a deadline or a broken connection;
   * resolves undefined when no session connection could be had (use the mesh stream).
   */
  async fetch(peerId: string, host: string, req: SessionRequest, opts: { signal?: AbortSignal; headerTimeoutMs: number }): Promise<SessionBody | undefined> {
    const signal = deadline(opts.headerTimeoutMs, opts.signal);
    for (let attempt = 0; ; attempt++) {
      const conn = await this.#connection(peerId, host, signal);
      if (!conn) return undefined;
      const reused = conn.answered > 0;
      if (reused) this.reused++;
      let header: NarResponseHeader;
      const onAbort = () => conn.destroy();
      signal.addEventListener("abort", onAbort, { once: true });
      try {
        header = await conn.request(req);
      } catch (err) {
        conn.destroy();
        // A kept connection the holder had closed (idle, restarted) before it saw the request: ask on a new one.
        if (err instanceof SessionConnectionError && err.beforeAnswer && reused && attempt === 0 && !signal.aborted) continue;
        if (signal.aborted && !opts.signal?.aborted) throw new NarFetchError("timeout", "no NAR header in time", { cause: err });
        throw new NarFetchError("failed", (err as Error).message, { cause: err });
      } finally {
        signal.removeEventListener("abort", onAbort);
      }
      if (header.type === "error") {
        this.#release(peerId, conn);
        throw new NarFetchError(REASON_BY_CODE[header.code] ?? "internal", `peer: ${header.message}`);
      }
      if (header.type !== "ok" || header.narSize !== req.narSize) {
        conn.destroy();
        throw new NarFetchError("size-mismatch", `peer announced ${header.type === "ok" ? header.narSize : "?"} bytes, the narinfo says ${req.narSize}`);
      }
      return { chunks: this.#body(peerId, conn), abort: () => conn.destroy() };
    }
  }

  async *#body(peerId: string, conn: SessionConnection): AsyncGenerator<Buffer> {
    let complete = false;
    try {
      yield* conn.body();
      complete = true;
    } finally {
      if (complete) {
        this.received++;
        this.#release(peerId, conn);
      } else conn.destroy();
    }
  }

  /** A connection between answers goes back to the holder's idle list, closed after idleMs. */
  #release(peerId: string, conn: SessionConnection): void {
    const p = this.#peers.get(peerId);
    if (!p || !conn.usable || this.#closed) return conn.destroy();
    p.idle.push(conn);
    const timer = setTimeout(() => {
      const i = p.idle.indexOf(conn);
      if (i >= 0) p.idle.splice(i, 1);
      conn.destroy();
    }, this.idleMs);
    timer.unref();
    idleTimers.set(conn, timer);
  }

  /** A kept connection, or a new one (with a session, asked for if needed); undefined if none can be had. */
  async #connection(peerId: string, host: string, signal: AbortSignal): Promise<SessionConnection | undefined> {
    let p = this.#peers.get(peerId);
    if (!p) this.#peers.set(peerId, (p = { idle: [], open: 0 }));
    for (let conn = p.idle.pop(); conn; conn = p.idle.pop()) {
      clearTimeout(idleTimers.get(conn));
      if (conn.usable) return conn;
    }
    for (let attempt = 0; attempt < 2; attempt++) {
      const s = await this.#session(peerId, p, signal);
      if (!s || signal.aborted) return undefined;
      // Over the session's connection limit (more transfers than a holder allows): the mesh stream.
      if (p.open >= s.connections) return undefined;
      const conn = new SessionConnection();
      p.open++;
      let socket;
      try {
        socket = await connectBulk(host, s.port, sessionIdentity(s.sessionId), s.key, this.routes.connectMs, conn, signal);
      } catch (err) {
        p.open--;
        if (signal.aborted) return undefined;
        const reached = err instanceof BulkConnectError && err.reached;
        // Reached but refused: the session may be gone (the holder restarted, or it lapsed early); one more with a fresh one.
        if (reached && attempt === 0) {
          p.session = undefined;
          continue;
        }
        this.routes.failed(peerId, !reached);
        this.log?.info({ peer: peerId, host, port: s.port, unreachable: !reached, err: (err as Error).message }, "mesh: bulk session connection failed; using the mesh stream");
        return undefined;
      }
      socket.once("close", () => p.open--);
      // A request frame after each body: Nagle would hold it until the holder's delayed ACK.
      socket.setNoDelay(true);
      conn.attach(socket);
      this.connections++;
      if (this.#closed) conn.destroy();
      return conn;
    }
    return undefined;
  }

  /** The holder's live session, asked for once at a time. */
  async #session(peerId: string, p: PeerSessions, signal: AbortSignal): Promise<BulkSession | undefined> {
    if (p.session && performance.now() < p.session.until) return p.session.s;
    p.session = undefined;
    p.asking ??= this.#ask(peerId, p, signal).finally(() => (p.asking = undefined));
    return p.asking;
  }

  async #ask(peerId: string, p: PeerSessions, signal: AbortSignal): Promise<BulkSession | undefined> {
    let ms;
    try {
      ms = await this.node.open(peerId, [PROTOCOL_BULK_SESSION], { signal });
    } catch (err) {
      // An agent without sessions refuses the protocol; anything else (a deadline, a closed connection) costs only this NAR.
      if ((err as Error).name === "UnsupportedProtocolError") {
        p.noSessionsUntil = Date.now() + SESSION_RETRY_AFTER_MS;
        this.log?.debug({ peer: peerId, err: (err as Error).message }, "mesh: no bulk sessions with this holder");
      }
      return undefined;
    }
    try {
      await writeFrame(ms.stream, encodeBulkSessionRequest(), { signal });
      const frame = await ms.reader.readFrame(MAX_BULK_FRAME_BYTES);
      if (frame === undefined) throw new Error("stream ended without an answer");
      if (frame[0] === TAG_NAR_ERROR) {
        p.noSessionsUntil = Date.now() + SESSION_RETRY_AFTER_MS;
        ms.stream.close().catch(() => {});
        return undefined;
      }
      const s = decodeBulkSession(frame);
      ms.stream.close().catch(() => {});
      const lifetimeMs = s.lifetimeS * 1000;
      const margin = lifetimeMs < 2 * LIFETIME_MARGIN_MS ? lifetimeMs / 2 : LIFETIME_MARGIN_MS;
      p.session = { s, until: performance.now() + lifetimeMs - margin };
      this.sessions++;
      return s;
    } catch (err) {
      ms.stream.abort(err instanceof Error ? err : new Error(String(err)));
      this.log?.debug({ peer: peerId, err: (err as Error).message }, "mesh: asking for a bulk session failed");
      return undefined;
    }
  }

  /** Closes every kept connection; no more sessions are used. */
  close(): void {
    this.#closed = true;
    for (const p of this.#peers.values()) {
      for (const c of p.idle.splice(0)) {
        clearTimeout(idleTimers.get(c));
        c.destroy();
      }
    }
  }

  /** Connections kept open between NARs, over all holders (for status and tests). */
  get idle(): number {
    let n = 0;
    for (const p of this.#peers.values()) n += p.idle.length;
    return n;
  }
}

const idleTimers = new WeakMap<SessionConnection, NodeJS.Timeout>();
