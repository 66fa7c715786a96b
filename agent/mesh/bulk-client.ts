// The requester's side of the bulk path (/fleetcache/nar/3.0.0, bulk-listener.ts): connecting to a
// holder's bulk port with the ticket it gave us over the mesh, and remembering which holders'
// bulk ports we could not reach (a firewall or tailnet ACL that opens only the mesh port), so
// their NARs go on the mesh stream without a wasted attempt each time.
import { connect, createSecureContext, type ConnectionOptions, type SecureContext, type TLSSocket } from "node:tls";
import type { Multiaddr } from "@multiformats/multiaddr";
import type { MeshNode } from "./node.js";
import { onLink } from "./on-link.js";
import { narBuffers, type BufferPool } from "../buffer-pool.js";
import { BULK_CIPHER, BULK_HANDSHAKE_MS } from "./bulk-listener.js";

/** After a failed bulk connection, a holder's NARs use the mesh stream for this long. */
export const BULK_RETRY_AFTER_MS = 10 * 60_000;
/**
 * Bodies smaller than this stay on the mesh stream: a bulk connection costs 1.6-2.1 ms of CPU at
 * both ends and two round trips (TCP, then TLS) before its first byte (BENCHMARKS.md, "Bulk path").
 */
export const BULK_MIN_BYTES = 1 << 20;

export class BulkRoutes {
  readonly #failedUntil = new Map<string, number>();
  /** Bulk connections that failed (each one fell back to the mesh stream). */
  fallbacks = 0;
  /** NAR bodies taken on a bulk connection (connected; whether they checked out is the verifier's). */
  received = 0;

  constructor(readonly connectMs = BULK_HANDSHAKE_MS) {}

  /**
   * Whether to offer bulk to this holder for a body of `bytes`: a MiB or more, and its port not
   * found unreachable lately. (Whether the holder is on this host's LAN is bulkHost's question.)
   */
  worth(peerId: string, bytes: number): boolean {
    return bytes >= BULK_MIN_BYTES && this.#usable(peerId);
  }

  /** Whether this holder's bulk port was not found unreachable lately. */
  reachable(peerId: string): boolean {
    return this.#usable(peerId);
  }

  #usable(peerId: string): boolean {
    const until = this.#failedUntil.get(peerId);
    if (until === undefined) return true;
    if (Date.now() < until) return false;
    this.#failedUntil.delete(peerId);
    return true;
  }

  /**
   * A bulk connection to this holder failed. `unreachable` (no TCP connection: a firewall or an ACL
   * that opens only the mesh port) keeps its next NARs on the mesh stream for a while; a failed
   * handshake (a ticket that expired under load, a restarting holder) costs only this NAR.
   */
  failed(peerId: string, unreachable: boolean): void {
    this.fallbacks++;
    if (unreachable) this.#failedUntil.set(peerId, Date.now() + BULK_RETRY_AFTER_MS);
  }
}

/**
 * The IP address the mesh connection to `peerId` uses, when it is on one of this host's networks
 * (on-link.ts): its bulk port is on the same host. None for a routed peer (another site, a
 * tailnet), whose NARs stay on the warm mesh connection, nor for a connection without an IP
 * address (a relay).
 */
export function bulkHost(node: MeshNode, peerId: string): string | undefined {
  for (const c of node.libp2p.getConnections()) {
    if (c.remotePeer.toString() !== peerId || c.status !== "open" || c.limits) continue;
    const ip = ipOf(c.remoteAddr);
    if (ip && onLink(ip)) return ip;
  }
  return undefined;
}

function ipOf(ma: Multiaddr): string | undefined {
  for (const c of ma.getComponents()) if (c.name === "ip4" || c.name === "ip6") return c.value;
  return undefined;
}

/** A bulk connection that failed; `reached`: the TCP connection was made (the handshake or the holder failed, not the route). */
export class BulkConnectError extends Error {
  override name = "BulkConnectError";
  constructor(
    message: string,
    readonly reached: boolean,
  ) {
    super(message);
  }
}

/**
 * One TLS context for every bulk connection: without it Node makes a new one (an OpenSSL SSL_CTX)
 * per connection, about half a millisecond of CPU per NAR. It holds no key: each connection's PSK
 * comes from its own callback.
 */
let bulkContext: SecureContext | undefined;

/** Where a bulk connection's decrypted bytes go: `onread` for tls.connect (BulkBody, SessionConnection). */
export interface BulkReader {
  readonly onread: { buffer(): Buffer; callback(n: number): boolean };
}

/**
 * A TLS 1.3 connection to a holder's bulk port, authenticated by a PSK alone: a one-time
 * ticket's (its bytes, sent as hex) or a bulk session's (`ticket` the PSK identity as text).
 */
export function connectBulk(host: string, port: number, ticket: Uint8Array | string, key: Uint8Array, timeoutMs: number, body: BulkReader, signal?: AbortSignal): Promise<TLSSocket> {
  const identity = typeof ticket === "string" ? ticket : Buffer.from(ticket).toString("hex");
  return new Promise((resolve, reject) => {
    bulkContext ??= createSecureContext({ minVersion: "TLSv1.3", ciphers: BULK_CIPHER });
    // allowHalfOpen: tls.connect passes it on to the socket, though @types/node leaves it out.
    const socket = connect(<ConnectionOptions & { allowHalfOpen: boolean; onread: BulkReader["onread"] }>{
      host,
      port,
      secureContext: bulkContext,
      minVersion: "TLSv1.3",
      ciphers: BULK_CIPHER,
      pskCallback: () => ({ psk: Buffer.from(key), identity }),
      // No certificate: the PSK, known only to the holder we asked over the mesh, authenticates it.
      checkServerIdentity: () => undefined,
      // We send nothing, so nothing to close: at the holder's end bulkChunks destroys the socket,
      // sparing a close_notify and a shutdown per NAR that Node would otherwise send back.
      allowHalfOpen: true,
      // The body's bytes go straight into pooled buffers (BulkBody), never into 'data' events.
      onread: body.onread,
    });
    let reached = false;
    socket.once("connect", () => (reached = true));
    const fail = (err: Error) => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      socket.destroy();
      reject(new BulkConnectError(err.message, reached));
    };
    const onAbort = () => fail(signal!.reason instanceof Error ? signal!.reason : new Error("aborted"));
    const timer = setTimeout(() => fail(new Error(`no bulk connection to ${host}:${port} within ${timeoutMs} ms`)), timeoutMs);
    signal?.addEventListener("abort", onAbort, { once: true });
    socket.once("error", fail);
    socket.once("secureConnect", () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
      socket.off("error", fail);
      // An error before anyone reads (the holder reset): the reader sees it, or the short count.
      socket.on("error", () => {});
      resolve(socket);
    });
  });
}

/** A bulk body is handed on in pooled buffers of this size (the size of the store's reads). */
export const BULK_GATHER_BYTES = 1 << 20;
/** Gathered bytes wait at most this long for their buffer to fill (a slow link still makes progress). */
export const BULK_GATHER_MS = 100;
/** Past this many bytes gathered and not yet taken, the socket stops reading (TCP pushes back on the holder). */
export const BULK_QUEUE_BYTES = 2 * BULK_GATHER_BYTES;

/**
 * Chunks a socket's `onread` callback handed on, waiting for their consumer; `queued` (bytes) is
 * what decides when the socket stops reading.
 */
export class ChunkQueue {
  readonly #chunks: Buffer[] = [];
  queued = 0;
  #wake: (() => void) | undefined;

  push(chunk: Buffer): void {
    this.#chunks.push(chunk);
    this.queued += chunk.length;
    this.notify();
  }

  shift(): Buffer | undefined {
    const chunk = this.#chunks.shift();
    if (chunk) this.queued -= chunk.length;
    return chunk;
  }

  /** Wakes the consumer waiting in wait() (a chunk, the end or a failure). */
  notify(): void {
    const w = this.#wake;
    this.#wake = undefined;
    w?.();
  }

  wait(): Promise<void> {
    return new Promise<void>((resolve) => (this.#wake = resolve));
  }
}

/**
 * Where a bulk connection's body goes: pooled 1 MiB buffers that Node's TLS decrypts straight into
 * (the socket's `onread` option), each handed on once full (or at the end). Read the usual way,
 * TLS hands over 16 KiB pieces (one SSL_read each), each a fresh Buffer and an event, then a trip
 * through every async step down to the HTTP response, and the held ones were garbage for full
 * collections (BENCHMARKS.md, "Per-NAR costs at 5 MiB"). The consumer owns the buffers handed on
 * and gives them back (the HTTP response does, once written). Bytes that wait BULK_GATHER_MS
 * without filling their buffer go on in a copy of their own size, so a slow link neither looks
 * stalled nor pins a pooled megabyte per few bytes.
 */
export class BulkBody {
  readonly #queue = new ChunkQueue();
  /** The buffer being filled: bytes [#handed, #filled) are not handed on yet. */
  #cur: Buffer | undefined;
  #filled = 0;
  #handed = 0;
  #timer: NodeJS.Timeout | undefined;
  #ended = false;
  #failure: Error | undefined;
  /** The callback said stop: the socket reads nothing until resumed. */
  #stopped = false;

  constructor(private readonly pool: BufferPool = narBuffers) {}

  /**
   * For tls.connect: Node asks `buffer` where the next read goes (once at the start, then after
   * each callback), so the position handed out is never moved back while Node may write there.
   */
  readonly onread = {
    buffer: (): Buffer => {
      this.#cur ??= this.pool.acquire(BULK_GATHER_BYTES);
      return this.#cur.subarray(this.#filled);
    },
    callback: (n: number): boolean => {
      this.#filled += n;
      if (this.#filled === this.#cur!.length) {
        this.#queue.push(this.#cur!.subarray(this.#handed));
        this.#cur = undefined;
        this.#filled = this.#handed = 0;
        clearTimeout(this.#timer);
        this.#timer = undefined;
      } else if (this.#timer === undefined) {
        // Armed by a buffer's first bytes, not per read (a timer per 16 KiB costs more than it saves).
        this.#timer = setTimeout(() => this.#flushPartial(), BULK_GATHER_MS);
      }
      // false: Node stops reading the socket until chunks() has taken enough to resume it.
      this.#stopped = this.#queue.queued >= BULK_QUEUE_BYTES;
      return !this.#stopped;
    },
  };

  #flushPartial(): void {
    this.#timer = undefined;
    if (this.#filled === this.#handed) return;
    this.#queue.push(Buffer.from(this.#cur!.subarray(this.#handed, this.#filled))); // a copy: the buffer goes on filling
    this.#handed = this.#filled;
  }

  /**
   * The body's bytes; throws if the connection fails or ends before `expected` bytes (Infinity
   * for a compressed body, whose decoder checks its end). Breaking out destroys the socket.
   */
  async *chunks(socket: TLSSocket, expected: number): AsyncGenerator<Uint8Array> {
    const onEnd = () => {
      clearTimeout(this.#timer);
      if (this.#filled > this.#handed) this.#queue.push(this.#cur!.subarray(this.#handed, this.#filled));
      this.#cur = undefined;
      this.#ended = true;
      this.#queue.notify();
    };
    const onError = (err: Error) => {
      this.#failure ??= err;
      this.#queue.notify();
    };
    // A reset or a destroy ends without 'end': the body is cut short.
    const onClose = () => onError(new Error("bulk connection closed before its end"));
    socket.once("end", onEnd);
    socket.on("error", onError);
    socket.once("close", onClose);
    // What happened before we listened (the body may have come whole before the first next()).
    if (socket.readableEnded) onEnd();
    else if (socket.destroyed) onError(socket.errored ?? new Error("bulk connection closed before its end"));
    let n = 0;
    try {
      for (;;) {
        const chunk = this.#queue.shift();
        if (chunk) {
          if (this.#stopped && this.#queue.queued < BULK_QUEUE_BYTES) {
            this.#stopped = false;
            socket.resume(); // starts the reads again
          }
          n += chunk.length;
          yield chunk;
          continue;
        }
        if (this.#ended) break;
        if (this.#failure) throw this.#failure;
        await this.#queue.wait();
      }
    } finally {
      clearTimeout(this.#timer);
      socket.off("end", onEnd);
      socket.off("error", onError);
      socket.off("close", onClose);
      socket.destroy(); // ended already, or abandoned: either way nothing more is read
    }
    if (Number.isFinite(expected) && n < expected) throw new Error(`bulk connection ended after ${n} of ${expected} bytes`);
  }
}
