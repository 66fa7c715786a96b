// /fleetcache/nar/1.0.0 (protocol/PEER-PROTOCOL.md): serving NARs of this host's store to peers,
// and fetching one from a peer. NAR bytes are unframed after a NarOk header, so the only way a
// responder can say "this is not the whole NAR" is a reset: it resets whenever it cannot finish,
// and the requester throws on anything short of the announced size. Hashing the whole NAR is the
// caller's job (NarVerifier), since a transfer may be stitched together from several peers.
import { createHash, timingSafeEqual, type Hash } from "node:crypto";
import type { Stream } from "@libp2p/interface";
import {
  MAX_FRAME_BYTES,
  NAR_ENCODING,
  NAR_ERROR,
  PROTOCOL_NAR,
  PROTOCOL_NAR_V2,
  PROTOCOL_NAR_V3,
  BULK_TLS_PSK,
  BULK_DIRECT_HTTP,
  BULK_DIRECT_MINT,
  decodeNarRequest,
  decodeNarResponseHeader,
  encodeNarRequest,
  encodeNarResponseHeader,
  type MintKey,
  type NarEncoding,
  type NarResponseHeader,
} from "../../protocol/peer-codec.js";
import { parseHash } from "../../protocol/hash.js";
import { encodeNix32 } from "../../protocol/nix32.js";
import { isValidHashPart } from "../../protocol/store-path.js";
import type { Logger } from "../log.js";
import type { LocalStore } from "../store/local-store.js";
import { NarGoneError, primed } from "../source.js";
import type { MeshHandler, MeshNode, MeshStream } from "./node.js";
import { writeAll, writeFrame } from "./stream-io.js";
import { releaseWhenEncrypted } from "./noise-crypto.js";
import { narBuffers } from "../buffer-pool.js";
import { SlotTimeoutError, TransferSlots } from "./transfer-slots.js";
import { CompressedStreamError, type NarCompression } from "./nar-compression.js";
import { FIRST_REQUEST_MS, TIMED_OUT, deadline, readFrameWithin, resetOnAbort } from "./narinfo-service.js";
import type { BulkListener } from "./bulk-listener.js";
import type { DirectListener } from "./direct-listener.js";
import { BulkBody, BulkConnectError, bulkHost, connectBulk, type BulkRoutes } from "./bulk-client.js";
import type { TLSSocket } from "node:tls";
import { Watchdog, lookup, narError, writeBody } from "./nar-answer.js";
import { NarFetchError, REASON_BY_CODE } from "./nar-fetch-error.js";
import type { BulkSessions } from "./bulk-sessions.js";
import { narStreamsAhead } from "./nar-streams-ahead.js";
import { serveSessionConnection } from "./bulk-session-server.js";
import { MAX_BULK_FRAME_BYTES, PROTOCOL_BULK_SESSION, decodeBulkSessionRequest, encodeBulkSession } from "../../protocol/bulk-session.js";

export const MAX_NAR_TRANSFERS_PER_PEER = 8;
/** A NAR stream whose reader takes nothing for this long is reset (spec: 60 s). */
export const NAR_SEND_STALL_MS = 60_000;
/** Requester deadlines (spec recommendations): the header, then progress during the bytes. */
export const NAR_HEADER_DEADLINE_MS = 5_000;
export const NAR_RECEIVE_STALL_MS = 30_000;
/**
 * How long a request past the limit waits for a slot before the answer is "busy": a requester
 * that keeps to the limit may open its next transfer a moment before our side of the last one
 * ends. Well under the requester's header deadline.
 */
export const NAR_SLOT_WAIT_MS = 2_000;

export interface NarServeOptions {
  firstRequestMs?: number;
  sendStallMs?: number;
  /** Concurrent transfers per peer (spec: 8); more wait up to slotWaitMs, then are answered busy. */
  maxTransfersPerPeer?: number;
  slotWaitMs?: number;
  /** Serves /fleetcache/nar/2.0.0 too (compressing when asked and allowed), and counts wire bytes. */
  compression?: NarCompression;
  /** Serves /fleetcache/nar/3.0.0 too (with compression): NAR bodies on this bulk port when the requester can take them. */
  bulk?: BulkListener;
  /** With bulk: serve bulk sessions (/fleetcache/bulk/1.0.0) too (default true; false: as an agent from before them). */
  bulkSessions?: boolean;
  /** With bulk: a bulk session connection without a request for this long is closed (spec: 30 s). */
  sessionIdleMs?: number;
  /** With bulk: answers a 3.0.0 request with bit BULK_DIRECT_HTTP with a ticket for this direct port (NarDirect). */
  direct?: DirectListener;
}

/** Serves NARs of `local` only; never asks another peer. */
export async function serveNar(node: MeshNode, local: LocalStore, log: Logger, opts: NarServeOptions = {}): Promise<void> {
  const firstMs = opts.firstRequestMs ?? FIRST_REQUEST_MS;
  const stallMs = opts.sendStallMs ?? NAR_SEND_STALL_MS;
  const slots = new TransferSlots(opts.maxTransfersPerPeer ?? MAX_NAR_TRANSFERS_PER_PEER);
  const slotWaitMs = opts.slotWaitMs ?? NAR_SLOT_WAIT_MS;
  const compression = opts.compression;
  const bulk = opts.bulk;
  const direct = opts.direct;
  const handler = (version: 1 | 2 | 3): MeshHandler => async ({ stream, reader, peerId, peer }) => {
      const v2 = version >= 2;
      const t0 = performance.now();
      const frame = await readFrameWithin(reader, MAX_FRAME_BYTES.nar, firstMs);
      if (frame === TIMED_OUT) throw new Error(`no NAR request within ${firstMs} ms`);
      if (frame === undefined) return; // opened and closed without asking
      const req = decodeNarRequest(frame, version); // malformed: throws, the stream is reset
      const encoding = v2 ? compression!.choose(req.accept!) : NAR_ENCODING.identity;
      const requestMs = performance.now() - t0;
      const found = await lookup(local, req.hashPart, "sha256:" + req.narHash, req.offset, log);
      const lookupMs = performance.now() - t0 - requestMs;
      if (!("storePath" in found)) return writeFrame(stream, encodeNarResponseHeader(found));
      if (direct && req.bulk! & BULK_DIRECT_HTTP && req.offset === 0) {
        // The requester's Nix fetches it from the direct port: no transfer slot here (the direct port admits its own sockets).
        const { ticket } = direct.issue(req.hashPart, found);
        // Asked for: a minting key too, so that this peer's next tickets need no round trip (NarDirectKey).
        const mint = req.bulk! & BULK_DIRECT_MINT && direct.mints ? direct.issueKey(peerId) : undefined;
        log.debug({ peer: peer.name, path: found.storePath, mintingKey: mint !== undefined }, "mesh: NAR ticket for the direct port issued");
        return writeFrame(stream, encodeNarResponseHeader({ type: "direct", narSize: found.narSize, port: direct.port, ticket, ...(mint && { mint }) }));
      }
      try {
        await slots.acquire(peerId, slotWaitMs);
      } catch (err) {
        if (!(err instanceof SlotTimeoutError)) throw err;
        return writeFrame(stream, encodeNarResponseHeader(narError(NAR_ERROR.busy, `more than ${slots.limit} transfers`)));
      }
      try {
        // The header only once the first bytes are read: a path collected since the lookup is
        // "not-found" (the requester then knows it is gone), not NarOk and a reset.
        let bytes: AsyncGenerator<Buffer>;
        let firstBytesMs = 0;
        try {
          bytes = await primed(local.narStream(found, req.offset, found.narSize));
          firstBytesMs = performance.now() - t0 - requestMs - lookupMs;
        } catch (err) {
          if (!(err instanceof NarGoneError)) throw err;
          return await writeFrame(stream, encodeNarResponseHeader(narError(NAR_ERROR.notFound, "collected since the lookup")));
        }
        if (bulk && req.bulk! & BULK_TLS_PSK) {
          try {
            await sendBulk(stream, bulk, { narSize: found.narSize, encoding, stallMs, body: () => (compression ? compression.encode(peerId, encoding, bytes) : bytes), pooled: encoding === NAR_ENCODING.identity });
          } finally {
            await bytes.return(undefined); // closes the store file if no connection came to read it
          }
          log.debug({ peer: peer.name, path: found.storePath, offset: req.offset, encoding }, "mesh: NAR served on the bulk port");
          return;
        }
        await writeFrame(stream, encodeNarResponseHeader({ type: "ok", narSize: found.narSize, ...(v2 && { encoding }) }));
        const watchdog = new Watchdog(stallMs, `no progress for ${stallMs} ms`);
        try {
          // Compressed, the store's chunks end in zstd (which copies), not on the wire: left to the GC.
          const nar = encoding === NAR_ENCODING.identity ? pooled(bytes) : bytes;
          const wire = compression ? compression.encode(peerId, encoding, nar) : nar;
          const sent = await writeAll(stream, watchdog.feed(wire), { signal: watchdog.signal });
          // narStream throws rather than end early; this only guards against a bug there.
          if (encoding === NAR_ENCODING.identity && sent !== found.narSize - req.offset) throw new Error(`sent ${sent} of ${found.narSize - req.offset} NAR bytes`);
        } finally {
          watchdog.stop();
        }
        // Times from the stream's start: the request's arrival, the store lookup, the first bytes read, the whole.
        log.debug({ peer: peer.name, path: found.storePath, offset: req.offset, encoding, requestMs: round1(requestMs), lookupMs: round1(lookupMs), firstBytesMs: round1(firstBytesMs), totalMs: round1(performance.now() - t0) }, "mesh: NAR served");
      } finally {
        slots.release(peerId);
      }
    };
  // Leave room above our limit so the ninth request gets "busy" rather than a libp2p reset.
  const limits = { maxInboundStreams: 4 * slots.limit, maxOutboundStreams: 64 };
  await node.handle(PROTOCOL_NAR, handler(1), limits);
  if (compression) await node.handle(PROTOCOL_NAR_V2, handler(2), limits);
  if (compression && (bulk || direct)) await node.handle(PROTOCOL_NAR_V3, handler(3), limits);
  if (compression && bulk && opts.bulkSessions !== false) await serveBulkSessions(node, local, log, { bulk, compression, slots, slotWaitMs, stallMs, firstMs, ...(opts.sessionIdleMs !== undefined && { idleMs: opts.sessionIdleMs }) });
}

/**
 * Bulk sessions (/fleetcache/bulk/1.0.0): a key, asked for on the mesh, for TLS connections to
 * the bulk port that carry one NAR request after another (bulk-session-server.ts).
 */
async function serveBulkSessions(
  node: MeshNode,
  local: LocalStore,
  log: Logger,
  o: { bulk: BulkListener; compression: NarCompression; slots: TransferSlots; slotWaitMs: number; stallMs: number; firstMs: number; idleMs?: number },
): Promise<void> {
  const { bulk, compression } = o;
  bulk.serveSessions((socket, peerId, run) =>
    serveSessionConnection(socket, peerId, {
      local,
      log,
      slots: o.slots,
      slotWaitMs: o.slotWaitMs,
      stallMs: o.stallMs,
      ...(o.idleMs !== undefined && { idleMs: o.idleMs }),
      name: (p) => node.trusted.get(p)?.name ?? p,
      // Counted as the mesh's NARs are: wire bytes sent to the peer, a plain transfer.
      wire: (p, nar) => compression.encode(p, NAR_ENCODING.identity, nar),
      onServed: () => bulk.sessionServed++,
    }, run),
  );
  await node.handle(
    PROTOCOL_BULK_SESSION,
    async ({ stream, reader, peerId, peer }) => {
      const frame = await readFrameWithin(reader, MAX_BULK_FRAME_BYTES, o.firstMs);
      if (frame === TIMED_OUT) throw new Error(`no bulk session request within ${o.firstMs} ms`);
      if (frame === undefined) return;
      decodeBulkSessionRequest(frame); // malformed: throws, the stream is reset
      await writeFrame(stream, encodeBulkSession(bulk.issueSession(peerId)));
      log.debug({ peer: peer.name }, "mesh: bulk session issued");
    },
    { maxInboundStreams: 4, maxOutboundStreams: 4 },
  );
}

/**
 * The body on the bulk port: a ticket in a NarBulk header, then the bytes on the one TLS
 * connection that presents it. The mesh stream ending first (the requester gave up or fell back)
 * withdraws the ticket; no connection in time is a failure (the stream is reset).
 */
async function sendBulk(
  stream: Stream,
  bulk: BulkListener,
  // pooled: the body's chunks are the store's reads, back to the pool once written.
  o: { narSize: number; encoding: NarEncoding; stallMs: number; body: () => AsyncIterable<Uint8Array>; pooled: boolean },
): Promise<void> {
  const t = bulk.issue();
  const onClose = () => t.cancel();
  stream.addEventListener("close", onClose);
  let socket: TLSSocket;
  try {
    await writeFrame(stream, encodeNarResponseHeader({ type: "bulk", narSize: o.narSize, encoding: o.encoding, port: bulk.port, ticket: t.ticket, key: t.key }));
    socket = await t.connection;
  } finally {
    stream.removeEventListener("close", onClose);
    t.cancel();
  }
  bulk.served++;
  // A reset by the requester while we end: writeBody has seen what matters; nothing to report.
  socket.on("error", () => {});
  // The mesh stream reset under us (the requester aborted): stop reading the store.
  const onReset = () => socket.destroy();
  stream.addEventListener("close", onReset);
  try {
    await writeBody(socket, o.body(), o.pooled, o.stallMs);
    await new Promise<void>((resolve, reject) => socket.end((err?: Error | null) => (err ? reject(err) : resolve())));
  } catch (err) {
    socket.destroy();
    throw err;
  } finally {
    stream.removeEventListener("close", onReset);
  }
}

/**
 * The store's chunks, each to go back to the NAR buffer pool once noise has encrypted it: from
 * then on nothing reads it (libp2p queues views of it, no copies, until then). Released earlier,
 * a read for another transfer could overwrite bytes still queued for this one.
 */
async function* pooled(chunks: AsyncIterable<Buffer>): AsyncGenerator<Buffer> {
  for await (const chunk of chunks) {
    releaseWhenEncrypted(chunk, () => narBuffers.release(chunk));
    yield chunk;
  }
}

// --- requester --------------------------------------------------------------------------------

export { NarFetchError, type NarFetchReason } from "./nar-fetch-error.js";

export interface NarFetchRequest {
  hashPart: string;
  /** "sha256:<hash>" (any encoding parseHash accepts) from the verified narinfo. */
  narHash: string;
  offset: number;
  /** NarSize from the verified narinfo: the peer must announce exactly this. */
  narSize: number;
}

export interface OpenNarOptions {
  /** Aborting resets the stream, before or during the bytes. */
  signal?: AbortSignal;
  headerTimeoutMs?: number;
  /** Longest wait for the next bytes while the caller is asking for them. */
  stallMs?: number;
  log?: Logger;
  /** Asks for /fleetcache/nar/2.0.0 (compressed if the policy accepts), falling back to 1.0.0. */
  compression?: NarCompression;
  /** With compression: asks for /fleetcache/nar/3.0.0 and takes the body on the holder's bulk port when offered. */
  bulk?: BulkRoutes;
  /** With compression and bulk: plain NARs from a holder on this host's networks on a bulk session's kept connection. */
  sessions?: BulkSessions;
}

/**
 * Asks `peerId` for NAR bytes [offset, narSize). Throws NarFetchError unless the peer answers
 * NarOk with the expected size within the header deadline. The iterable then yields exactly
 * narSize - offset bytes or throws (NarFetchError "interrupted"/"stalled"); it never ends early.
 * Its chunks are views of buffers libp2p allocated for them and never reuses: safe to keep.
 * Consume it to the end or break out of it: either releases the stream.
 */
export async function openNar(node: MeshNode, peerId: string, req: NarFetchRequest, opts: OpenNarOptions = {}): Promise<AsyncIterable<Uint8Array>> {
  if (!isValidHashPart(req.hashPart)) throw new TypeError(`invalid store path hash part ${JSON.stringify(req.hashPart)}`);
  if (!Number.isSafeInteger(req.narSize) || req.narSize <= 0) throw new RangeError(`invalid NAR size ${req.narSize}`);
  if (!Number.isSafeInteger(req.offset) || req.offset < 0) throw new RangeError(`invalid offset ${req.offset}`);
  const narHash = encodeNix32(parseHash(req.narHash));

  const compression = opts.compression;
  // Counted for this NAR already (compression.accept), when a bulk session was considered.
  let counted: number | undefined;
  if (opts.sessions && compression && opts.sessions.usable(peerId) && !compression.wantsZstd(peerId)) {
    const host = bulkHost(node, peerId);
    if (host) {
      counted = compression.accept(peerId); // may start a zstd probe: then the mesh it is
      if (counted === 0) {
        const t0 = performance.now();
        const got = await opts.sessions.fetch(peerId, host, { ...req, narHash }, { ...(opts.signal && { signal: opts.signal }), headerTimeoutMs: opts.headerTimeoutMs ?? NAR_HEADER_DEADLINE_MS });
        if (got) {
          opts.log?.debug({ peer: peerId, hashPart: req.hashPart, answer: "session", headerMs: round1(performance.now() - t0) }, "mesh: NAR header");
          const onAbort = () => got.abort();
          opts.signal?.addEventListener("abort", onAbort, { once: true });
          const done = () => opts.signal?.removeEventListener("abort", onAbort);
          const abort = () => got.abort();
          const wire = body(abort, got.chunks, opts.stallMs ?? NAR_RECEIVE_STALL_MS, done);
          return decoded(abort, compression.receive(peerId, NAR_ENCODING.identity, req.narSize - req.offset, wire));
        }
      }
    }
  }

  const headerSignal = deadline(opts.headerTimeoutMs ?? NAR_HEADER_DEADLINE_MS, opts.signal);
  let ms: MeshStream | undefined;
  let header: NarResponseHeader;
  let release = () => {};
  let accept: number | undefined; // set when the peer speaks 2.0.0
  let bulk: number | undefined; // set when it speaks 3.0.0
  // Only where it pays (BulkRoutes.worth) and the bulk port can be reached at the mesh connection's address.
  const bulkAt = compression && opts.bulk?.worth(peerId, req.narSize - req.offset) ? bulkHost(node, peerId) : undefined;
  const t0 = performance.now();
  let openMs = 0;
  try {
    // An agent that does not know 3.0.0 or 2.0.0 refuses it in multistream-select, and the next follows.
    const protocols = bulkAt ? [PROTOCOL_NAR_V3, PROTOCOL_NAR_V2, PROTOCOL_NAR] : compression ? [PROTOCOL_NAR_V2, PROTOCOL_NAR] : [PROTOCOL_NAR];
    ms = await narStreamsAhead(node).take(peerId, protocols, headerSignal);
    openMs = performance.now() - t0;
    if (compression && ms.stream.protocol !== PROTOCOL_NAR) accept = counted ?? compression.accept(peerId);
    if (ms.stream.protocol === PROTOCOL_NAR_V3) bulk = BULK_TLS_PSK;
    release = resetOnAbort(ms.stream, headerSignal);
    await writeFrame(ms.stream, encodeNarRequest({ hashPart: req.hashPart, narHash, offset: req.offset, ...(accept !== undefined && { accept }), ...(bulk !== undefined && { bulk }) }), { signal: headerSignal });
    const frame = await ms.reader.readFrame(MAX_FRAME_BYTES.nar);
    if (frame === undefined) throw new Error("stream ended without an answer");
    try {
      header = decodeNarResponseHeader(frame, accept, bulk);
    } catch (err) {
      throw new NarFetchError("protocol", (err as Error).message, { cause: err });
    }
  } catch (err) {
    ms?.stream.abort(err instanceof Error ? err : new Error(String(err)));
    if (err instanceof NarFetchError) throw err;
    if (headerSignal.aborted && !opts.signal?.aborted) throw new NarFetchError("timeout", "no NAR header in time", { cause: err });
    throw new NarFetchError("failed", (err as Error).message ?? String(err), { cause: err });
  } finally {
    release();
  }

  const { stream, reader } = ms;
  // Where a peer NAR's first round trip goes: opening the stream (and choosing its protocol), then the holder's answer.
  opts.log?.debug({ peer: peerId, hashPart: req.hashPart, answer: header.type, openMs: round1(openMs), headerMs: round1(performance.now() - t0) }, "mesh: NAR header");
  if (header.type === "error") {
    stream.close().catch(() => {});
    opts.log?.debug({ peer: peerId, hashPart: req.hashPart, code: header.code, message: header.message }, "mesh: peer refused NAR");
    throw new NarFetchError(REASON_BY_CODE[header.code] ?? "internal", `peer: ${header.message}`);
  }
  if (header.narSize !== req.narSize) {
    stream.abort(new Error("unexpected NAR size"));
    throw new NarFetchError("size-mismatch", `peer announced ${header.narSize} bytes, the narinfo says ${req.narSize}`);
  }
  if (header.type === "direct") {
    // Never asked for here (decodeNarResponseHeader refuses it unless it was): askDirect's answer.
    stream.abort(new Error("unexpected NarDirect"));
    throw new NarFetchError("protocol", "NarDirect in answer to a transfer");
  }
  if (header.type === "bulk") {
    let socket: TLSSocket;
    const received = new BulkBody();
    try {
      socket = await connectBulk(bulkAt!, header.port, header.ticket, header.key, opts.bulk!.connectMs, received, opts.signal);
    } catch (err) {
      stream.abort(new Error("bulk connection failed"));
      if (opts.signal?.aborted) throw new NarFetchError("failed", "aborted", { cause: err });
      // This NAR goes on the mesh stream; a port we cannot reach at all (a firewall, an ACL that
      // opens only the mesh port) sends this holder's next NARs there too, for a while.
      const unreachable = !(err instanceof BulkConnectError && err.reached);
      opts.bulk!.failed(peerId, unreachable);
      opts.log?.info({ peer: peerId, host: bulkAt, port: header.port, unreachable, err: (err as Error).message }, "mesh: bulk connection failed; using the mesh stream");
      return openNar(node, peerId, req, { ...opts, bulk: undefined });
    }
    // The stream carries nothing more; it ends once the holder is done. A reset of it (the holder
    // gave up) does not cut the body: the TLS connection's own end is what counts.
    stream.close().catch(() => {});
    opts.bulk!.received++;
    const unregister = opts.signal ? resetOnAbort(stream, opts.signal) : () => {};
    const onAbort = () => socket.destroy();
    opts.signal?.addEventListener("abort", onAbort, { once: true });
    const done = () => {
      unregister();
      opts.signal?.removeEventListener("abort", onAbort);
    };
    const expected = header.encoding === NAR_ENCODING.identity ? req.narSize - req.offset : Infinity;
    const abort = (err: Error) => {
      socket.destroy(err);
      stream.abort(err);
    };
    const wire = body(abort, received.chunks(socket, expected), opts.stallMs ?? NAR_RECEIVE_STALL_MS, done);
    return compression ? decoded(abort, compression.receive(peerId, header.encoding, req.narSize - req.offset, wire)) : wire;
  }
  // We send nothing more; half-closing now lets the stream end fully once the responder is done.
  stream.close().catch(() => {});
  // Registered now, not when iteration starts, so an abort also frees a stream nobody reads.
  const unregister = opts.signal ? resetOnAbort(stream, opts.signal) : () => {};
  const encoding = header.encoding ?? NAR_ENCODING.identity;
  // A compressed stream's length is unknown: it ends with the responder's close, and decodes to exactly the NAR's bytes.
  const abort = (err: Error) => stream.abort(err);
  const wire = body(abort, reader.chunks(encoding === NAR_ENCODING.identity ? req.narSize - req.offset : Infinity), opts.stallMs ?? NAR_RECEIVE_STALL_MS, unregister);
  return compression ? decoded(abort, compression.receive(peerId, encoding, req.narSize - req.offset, wire)) : wire;
}

/** Decoding errors as the holder's fault; the stream is reset unless the NAR came whole. */
async function* decoded(abort: (err: Error) => void, chunks: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  let complete = false;
  try {
    yield* chunks;
    complete = true;
  } catch (err) {
    if (err instanceof CompressedStreamError) throw new NarFetchError(err.reason, err.message, { cause: err });
    throw err;
  } finally {
    if (!complete) abort(new Error("NAR transfer abandoned"));
  }
}

/** `abort`: resets the transfer (the mesh stream, or the bulk connection and its stream). */
async function* body(abort: (err: Error) => void, chunks: AsyncGenerator<Uint8Array>, stallMs: number, unregister: () => void): AsyncGenerator<Uint8Array> {
  let complete = false;
  let timer: NodeJS.Timeout | undefined;
  let stalled = false;
  try {
    for (;;) {
      // Only while we wait on the network: a slow consumer is backpressure, not a stall.
      timer = setTimeout(() => {
        stalled = true;
        abort(new Error(`no NAR bytes for ${stallMs} ms`));
      }, stallMs);
      let next: IteratorResult<Uint8Array>;
      try {
        next = await chunks.next();
      } catch (err) {
        throw new NarFetchError(stalled ? "stalled" : "interrupted", (err as Error).message ?? String(err), { cause: err });
      } finally {
        clearTimeout(timer);
      }
      if (next.done) break;
      yield next.value;
    }
    complete = true;
  } finally {
    clearTimeout(timer);
    unregister();
    // Abandoned by the consumer or failed: reset, so the responder stops reading its disk.
    if (!complete) abort(new Error("NAR transfer abandoned"));
  }
}

/**
 * Running size and sha256 check of a NAR, which may arrive in pieces from several peers (feed
 * them in order). update() throws as soon as there are too many bytes; finish() throws unless
 * exactly narSize bytes with the expected hash went by.
 */
export class NarVerifier {
  readonly #expected: Uint8Array;
  readonly #hash: Hash = createHash("sha256");
  #bytes = 0;

  constructor(
    readonly narHash: string,
    readonly narSize: number,
  ) {
    this.#expected = parseHash(narHash);
    if (!Number.isSafeInteger(narSize) || narSize <= 0) throw new RangeError(`invalid NAR size ${narSize}`);
  }

  get bytes(): number {
    return this.#bytes;
  }

  update(chunk: Uint8Array): void {
    if (this.#bytes + chunk.length > this.narSize) {
      throw new NarFetchError("size-mismatch", `NAR longer than its ${this.narSize} bytes`);
    }
    this.#hash.update(chunk);
    this.#bytes += chunk.length;
  }

  finish(): void {
    if (this.#bytes !== this.narSize) {
      throw new NarFetchError("size-mismatch", `NAR ended after ${this.#bytes} of ${this.narSize} bytes`);
    }
    const got = this.#hash.digest();
    if (!timingSafeEqual(got, this.#expected)) throw new NarFetchError("hash-mismatch", `NAR hash differs from ${this.narHash}`);
  }
}

// --- requester: a ticket for the direct port ----------------------------------------------------

/** Where the requester's Nix gets a NAR straight from the holder (LAN-direct NARs). */
export interface DirectTicket {
  /** The holder's direct port, at the address of the mesh connection. */
  port: number;
  /** The URL path the ticket opens: /<ticket hex>/nar/<hash part>-<NAR hash>.nar. */
  path: string;
  /** When asked for (and the holder mints): a key for tickets to this holder's next NARs. */
  mint?: MintKey;
}

/**
 * Asks `peerId` for a ticket to its direct port for the whole NAR (one round trip on a 3.0.0
 * stream with BULK_DIRECT_HTTP). "no-direct" when the holder answers with the body instead (an
 * older agent, or direct_lan off there: the body is dropped), "refused" when it answers NarError
 * (not held, busy). Throws on a broken stream, a malformed answer or the deadline.
 */
export async function askDirect(node: MeshNode, peerId: string, req: Omit<NarFetchRequest, "offset">, opts: { signal?: AbortSignal; headerTimeoutMs?: number; wantKey?: boolean } = {}): Promise<DirectTicket | "no-direct" | "refused"> {
  const bulk = BULK_DIRECT_HTTP | (opts.wantKey ? BULK_DIRECT_MINT : 0);
  if (!isValidHashPart(req.hashPart)) throw new TypeError(`invalid store path hash part ${JSON.stringify(req.hashPart)}`);
  const narHash = encodeNix32(parseHash(req.narHash));
  const signal = deadline(opts.headerTimeoutMs ?? NAR_HEADER_DEADLINE_MS, opts.signal);
  let ms: MeshStream | undefined;
  let release = () => {};
  try {
    ms = await node.open(peerId, [PROTOCOL_NAR_V3], { signal });
    release = resetOnAbort(ms.stream, signal);
    await writeFrame(ms.stream, encodeNarRequest({ hashPart: req.hashPart, narHash, offset: 0, accept: 0, bulk }), { signal });
    const frame = await ms.reader.readFrame(MAX_FRAME_BYTES.nar);
    if (frame === undefined) throw new Error("stream ended without an answer");
    const header = decodeNarResponseHeader(frame, 0, bulk);
    if (header.type !== "direct") {
      // A body we did not ask for, or an error: dropped; the caller relays the NAR as usual.
      ms.stream.abort(new Error("no direct ticket"));
      return header.type === "error" ? "refused" : "no-direct";
    }
    if (header.narSize !== req.narSize) throw new NarFetchError("size-mismatch", `peer announced ${header.narSize} bytes, the narinfo says ${req.narSize}`);
    ms.stream.close().catch(() => {});
    return { port: header.port, path: `/${Buffer.from(header.ticket).toString("hex")}/nar/${req.hashPart}-${narHash}.nar`, ...(header.mint && { mint: header.mint }) };
  } catch (err) {
    ms?.stream.abort(err instanceof Error ? err : new Error(String(err)));
    throw err;
  } finally {
    release();
  }
}

const round1 = (ms: number) => Math.round(ms * 10) / 10;
