// The requester's side of the bulk path (/fleetcache/nar/3.0.0, bulk-listener.ts): connecting to a
// holder's bulk port with the ticket it gave us over the mesh, and remembering which holders'
// bulk ports we could not reach (a firewall or tailnet ACL that opens only the mesh port), so
// their NARs go on the mesh stream without a wasted attempt each time.
import { connect, type TLSSocket } from "node:tls";
import type { Multiaddr } from "@multiformats/multiaddr";
import type { MeshNode } from "./node.js";
import { onLink } from "./on-link.js";
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

/** A TLS 1.3 connection to a holder's bulk port, authenticated by the ticket's PSK alone. */
export function connectBulk(host: string, port: number, ticket: Uint8Array, key: Uint8Array, timeoutMs: number, signal?: AbortSignal): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const socket = connect({
      host,
      port,
      minVersion: "TLSv1.3",
      ciphers: BULK_CIPHER,
      pskCallback: () => ({ psk: Buffer.from(key), identity: Buffer.from(ticket).toString("hex") }),
      // No certificate: the PSK, known only to the holder we asked over the mesh, authenticates it.
      checkServerIdentity: () => undefined,
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

/**
 * The bytes of a bulk connection; throws if it fails or ends before `expected` bytes (Infinity for
 * a compressed body, whose decoder checks its end). Breaking out destroys the socket.
 */
export async function* bulkChunks(socket: TLSSocket, expected: number): AsyncGenerator<Uint8Array> {
  let n = 0;
  for await (const chunk of socket as AsyncIterable<Buffer>) {
    n += chunk.length;
    yield chunk;
  }
  if (Number.isFinite(expected) && n < expected) throw new Error(`bulk connection ended after ${n} of ${expected} bytes`);
}
