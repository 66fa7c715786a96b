// The requester's side of the bulk path (/fleetcache/nar/3.0.0, bulk-listener.ts): connecting to a
// holder's bulk port with the ticket it gave us over the mesh, and remembering which holders'
// bulk ports we could not reach (a firewall or tailnet ACL that opens only the mesh port), so
// their NARs go on the mesh stream without a wasted attempt each time.
import { connect, createSecureContext, type ConnectionOptions, type SecureContext, type TLSSocket } from "node:tls";
import type { Multiaddr } from "@multiformats/multiaddr";
import type { MeshNode } from "./node.js";
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
   * found unreachable lately. Not decided by RTT: libp2p's ping RTT includes the event loops of
   * both agents, and under load it ran over 20 ms between network namespaces (CI), so a LAN
   * holder looked far. Over a WAN a bulk body costs two extra round trips (TCP, TLS).
   */
  worth(peerId: string, bytes: number): boolean {
    return bytes >= BULK_MIN_BYTES && this.#usable(peerId);
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
 * The IP address the mesh connection to `peerId` uses: its bulk port is on the same host. None for
 * a connection without one (a relay), which then takes no bulk transfer.
 */
export function bulkHost(node: MeshNode, peerId: string): string | undefined {
  for (const c of node.libp2p.getConnections()) {
    if (c.remotePeer.toString() !== peerId || c.status !== "open" || c.limits) continue;
    const ip = ipOf(c.remoteAddr);
    if (ip) return ip;
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

/** A TLS 1.3 connection to a holder's bulk port, authenticated by the ticket's PSK alone. */
export function connectBulk(host: string, port: number, ticket: Uint8Array, key: Uint8Array, timeoutMs: number, signal?: AbortSignal): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    bulkContext ??= createSecureContext({ minVersion: "TLSv1.3", ciphers: BULK_CIPHER });
    // allowHalfOpen: tls.connect passes it on to the socket, though @types/node leaves it out.
    const socket = connect(<ConnectionOptions & { allowHalfOpen: boolean }>{
      host,
      port,
      secureContext: bulkContext,
      minVersion: "TLSv1.3",
      ciphers: BULK_CIPHER,
      pskCallback: () => ({ psk: Buffer.from(key), identity: Buffer.from(ticket).toString("hex") }),
      // No certificate: the PSK, known only to the holder we asked over the mesh, authenticates it.
      checkServerIdentity: () => undefined,
      // We send nothing, so nothing to close: at the holder's end bulkChunks destroys the socket,
      // sparing a close_notify and a shutdown per NAR that Node would otherwise send back.
      allowHalfOpen: true,
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
/** Past this many bytes gathered and not yet taken, the socket is paused (TCP pushes back on the holder). */
const BULK_QUEUE_BYTES = 2 * BULK_GATHER_BYTES;

/**
 * The bytes of a bulk connection; throws if it fails or ends before `expected` bytes (Infinity for
 * a compressed body, whose decoder checks its end). Breaking out destroys the socket.
 *
 * Node's TLS hands over what it decrypts in pieces of at most 16 KiB (one SSL_read each), each a
 * fresh Buffer; passed on one by one, every piece costs an event and a trip through each async
 * step down to the HTTP response, and the held ones live on as garbage for the GC. They are
 * copied instead into 1 MiB buffers from the NAR buffer pool, handed on when full (or at the
 * end): the consumer owns them and gives them back (the HTTP response does, once written). Bytes
 * that wait BULK_GATHER_MS without filling a buffer go on in a copy of their own size, so a
 * slow link neither looks stalled nor pins a pooled megabyte per few bytes.
 */
export async function* bulkChunks(socket: TLSSocket, expected: number, pool: BufferPool = narBuffers): AsyncGenerator<Uint8Array> {
  const queue: Buffer[] = [];
  let queued = 0;
  let cur: Buffer | undefined; // the buffer being filled
  let filled = 0;
  let ended = false;
  let failure: Error | undefined;
  let wake: (() => void) | undefined;
  let timer: NodeJS.Timeout | undefined;
  const notify = () => {
    const w = wake;
    wake = undefined;
    w?.();
  };
  const handOn = (chunk: Buffer) => {
    queue.push(chunk);
    queued += chunk.length;
    if (queued >= BULK_QUEUE_BYTES) socket.pause();
    notify();
  };
  const flushPartial = () => {
    timer = undefined;
    if (filled === 0) return;
    handOn(Buffer.from(cur!.subarray(0, filled))); // a copy: cur goes on filling
    filled = 0;
  };
  const onData = (piece: Buffer) => {
    for (let at = 0; at < piece.length; ) {
      cur ??= pool.acquire(BULK_GATHER_BYTES);
      const n = piece.copy(cur, filled, at);
      filled += n;
      at += n;
      if (filled === cur.length) {
        handOn(cur);
        cur = undefined;
        filled = 0;
        clearTimeout(timer);
        timer = undefined;
      }
    }
    // Armed by a buffer's first bytes, not re-armed per piece (a timer per 16 KiB costs more than it saves).
    if (filled > 0 && timer === undefined) timer = setTimeout(flushPartial, BULK_GATHER_MS);
  };
  const onEnd = () => {
    clearTimeout(timer);
    if (filled > 0) handOn(cur!.subarray(0, filled));
    cur = undefined;
    ended = true;
    notify();
  };
  const onError = (err: Error) => {
    failure ??= err;
    notify();
  };
  // A reset or a destroy ends without 'end': the body is cut short.
  const onClose = () => onError(new Error("bulk connection closed before its end"));
  socket.on("data", onData);
  socket.once("end", onEnd);
  socket.on("error", onError);
  socket.once("close", onClose);
  let n = 0;
  try {
    for (;;) {
      const chunk = queue.shift();
      if (chunk) {
        queued -= chunk.length;
        if (queued < BULK_QUEUE_BYTES && socket.isPaused()) socket.resume();
        n += chunk.length;
        yield chunk;
        continue;
      }
      if (ended) break;
      if (failure) throw failure;
      await new Promise<void>((resolve) => (wake = resolve));
    }
  } finally {
    clearTimeout(timer);
    socket.off("data", onData);
    socket.off("end", onEnd);
    socket.off("error", onError);
    socket.off("close", onClose);
    socket.destroy(); // ended already, or abandoned: either way nothing more is read
  }
  if (Number.isFinite(expected) && n < expected) throw new Error(`bulk connection ended after ${n} of ${expected} bytes`);
}
