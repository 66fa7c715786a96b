// The binary cache protocol Nix speaks: nix-cache-info, narinfo and NAR downloads.
import type { IncomingMessage, ServerResponse } from "node:http";
import { finished } from "node:stream/promises";
import { narUrl, parseNarUrl } from "../../protocol/nar-url.js";
import { nixCacheInfo, renderNarinfo } from "../../protocol/narinfo.js";
import type { PathInfo } from "../../protocol/path-info.js";
import { isValidHashPart } from "../../protocol/store-path.js";
import { narBuffers } from "../buffer-pool.js";
import { NarGoneError, NarUnavailableError, NOT_NOW, primed, SOON, type PathSource } from "../source.js";
import type { LocalStore } from "../store/local-store.js";
import { StoreUnavailableError } from "../store/daemon-client.js";
import { parseRange } from "./range.js";
import { ReadPace } from "./read-pace.js";
import { HttpError, send, sendError } from "./respond.js";
import type { Logger } from "../log.js";
import type { AgentMetrics, Outcome } from "../metrics.js";
import { drainOrClose } from "../drain.js";
import type { NarPiece } from "../store/nar-dump.js";
import { REGION_MIN, sendRegion, type SendfileBinding } from "./send-file.js";
import type { Reply } from "./fast-path.js";

export interface CacheContext {
  /** Where narinfo and NAR requests are answered from. */
  source: PathSource;
  /** This host's store, for lookups only it can do (legacy NAR URLs that carry no hash part). */
  local: LocalStore;
  priority: number;
  log: Logger;
  /** The agent's status document (self, peers, counters) for operators. */
  status?: () => unknown;
  /** Request counts, latencies, bytes served, recent errors. */
  metrics?: AgentMetrics;
  /** Whether a PathInfo the source returned came from a peer (else from this host's store). */
  fromPeer?: (info: PathInfo) => boolean;
  /**
   * The sendfile addon (send-file.ts), when NAR bodies from this host's store go out with
   * sendfile(2); undefined: file contents are read into pooled buffers and written.
   */
  sendfile?: SendfileBinding | undefined;
  /** The operators' dashboard (GET / and /dashboard/...), when one is installed. */
  dashboard?: (req: IncomingMessage, res: ServerResponse, path: string) => void | Promise<void>;
}

// Rendered narinfos with their headers, by the PathInfo they came from (sources reuse the object
// while the path is unchanged, so a repeated lookup costs a map lookup). The header arrays are
// built once: res.writeHead only reads them. Bodies are strings: res.end() sends a string body
// in one write with the status line and headers, where a Buffer takes a second, gathered one
// (about 5 µs of CPU a request here, a sixth of a bare node:http answer; BENCHMARKS.md).
// An ASCII body (every narinfo Nix writes) goes out as "latin1": the same bytes, copied as they
// are, where "utf8" has Node convert them.
// The same Reply objects serve node:http (res.writeHead and res.end) and the fast path
// (fast-path.ts), so both send the same status, headers and body.
const rendered = new WeakMap<PathInfo, Reply>();

const NOT_FOUND_HEADERS = { "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store" };
const NOT_FOUND_BODY = "not found\n";
const NOT_FOUND: Reply = Object.freeze({
  status: 404,
  head: Object.freeze(flat({ ...NOT_FOUND_HEADERS, "Content-Length": String(Buffer.byteLength(NOT_FOUND_BODY)) })),
  body: NOT_FOUND_BODY,
  encoding: "latin1", // ASCII
});

/** Headers as res.writeHead takes them fastest: names and values, flat. */
function flat(headers: Record<string, string>): string[] {
  return Object.entries(headers).flat();
}

export function handleCacheInfo(ctx: CacheContext, req: IncomingMessage, res: ServerResponse): void {
  send(req, res, 200, nixCacheInfo(ctx.priority), { "Content-Type": "text/x-nix-cache-info" });
}

/** handleCacheInfo's answer as a Reply, for the fast path. */
export function cacheInfoReply(priority: number): Reply {
  const body = nixCacheInfo(priority);
  return { status: 200, head: flat({ "Content-Type": "text/x-nix-cache-info", "Content-Length": String(Buffer.byteLength(body)) }), body, encoding: bodyEncoding(body) };
}

/**
 * Answers a narinfo request: at once (returning the outcome) when the source knows the answer
 * without waiting, else once it has asked (returning a promise).
 */
export function handleNarinfo(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, hashPart: string): Outcome | Promise<Outcome> {
  if (!isValidHashPart(hashPart)) throw new HttpError(400, `invalid store path hash "${hashPart}": expected 32 nix32 characters`);
  let now: PathInfo | undefined | typeof NOT_NOW | typeof SOON = NOT_NOW;
  try {
    if (ctx.source.pathInfoNow) now = ctx.source.pathInfoNow(hashPart);
  } catch (e) {
    storeUnavailable(e);
  }
  // SOON: node:http's route waits for pathInfo() instead (the fast path answers most of these).
  if (now !== NOT_NOW && now !== SOON) return answerNarinfo(ctx, req, res, hashPart, now);
  return ctx.source.pathInfo(hashPart).then((info) => answerNarinfo(ctx, req, res, hashPart, info), storeUnavailable);
}

function answerNarinfo(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, hashPart: string, info: PathInfo | undefined): Outcome {
  const answer = narinfoReply(hashPart, info);
  res.writeHead(answer.status, answer.head as string[]);
  if (req.method === "HEAD") res.end();
  else res.end(answer.body, answer.encoding);
  return narinfoOutcome(ctx, info);
}

/** narinfoLookup's answer for a request node:http's route must answer itself. */
export const LEAVE = Symbol("leave to node:http");

/**
 * For the fast path: the store's answer for a narinfo request, at once when it needs no waiting,
 * SOON when it will have it at once if asked again from the source's whenSoon() (then not
 * counted yet), else a promise of it (pathInfo(), as handleNarinfo asks); LEAVE for what
 * node:http's route answers itself (an invalid hash part, a store that failed at once).
 */
export function narinfoLookup(ctx: CacheContext, hashPart: string): PathInfo | undefined | Promise<PathInfo | undefined> | typeof SOON | typeof LEAVE {
  if (!isValidHashPart(hashPart)) return LEAVE;
  try {
    const now = ctx.source.pathInfoNow ? ctx.source.pathInfoNow(hashPart) : NOT_NOW;
    if (now === SOON) return ctx.source.whenSoon ? SOON : ctx.source.pathInfo(hashPart);
    return now === NOT_NOW ? ctx.source.pathInfo(hashPart) : now;
  } catch {
    return LEAVE;
  }
}

/** The narinfo answer for `info` (the 404 when there is none), rendered once per PathInfo. */
export function narinfoReply(hashPart: string, info: PathInfo | undefined): Reply {
  if (!info) return NOT_FOUND;
  let answer = rendered.get(info);
  if (!answer) {
    const body = renderNarinfo(info, narUrl(hashPart, info.narHash));
    // Short-lived: a garbage-collected path must not linger in an intermediate cache.
    const head = flat({ "Content-Type": "text/x-nix-narinfo", "Cache-Control": "max-age=60", "Content-Length": String(Buffer.byteLength(body)) });
    answer = { status: 200, body, head: Object.freeze(head), encoding: bodyEncoding(body) };
    rendered.set(info, answer);
  }
  return answer;
}

export function narinfoOutcome(ctx: CacheContext, info: PathInfo | undefined): Outcome {
  return !info ? "miss" : ctx.fromPeer?.(info) ? "hit_peer" : "hit_local";
}

/** "latin1" when every character is ASCII (then its bytes are the UTF-8 ones), else "utf8". */
export function bodyEncoding(body: string): BufferEncoding {
  return Buffer.byteLength(body, "utf8") === body.length ? "latin1" : "utf8";
}

export async function handleNar(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, path: string, query: string): Promise<Outcome> {
  const ref = parseNarUrl(path, query);
  if (!ref) throw new HttpError(400, "malformed NAR URL: expected /nar/<store hash>-<nar hash>.nar, both canonical nix32");
  let info: PathInfo | undefined;
  if (ref.hashPart) info = await ctx.source.pathInfo(ref.hashPart).catch(storeUnavailable);
  // With the daemon backend this form (harmonia's nar/<narhash>.nar) is always a 404: the daemon
  // cannot look a path up by its NAR hash. The forms carrying the hash part work.
  else if (ref.narHash) info = await ctx.local.pathInfoByNarHash("sha256:" + ref.narHash).catch(storeUnavailable);
  // A URL naming a NAR hash must get exactly those bytes: a path rebuilt with other content is a 404.
  if (!info || (ref.narHash && info.narHash !== "sha256:" + ref.narHash)) {
    send(req, res, 404, "not found\n", NOT_FOUND_HEADERS);
    return "miss";
  }
  // LAN-direct NARs: a whole NAR an on-link peer holds is fetched by Nix from that peer itself.
  // A Range (a resumed download) or HEAD stays here, relayed and verified.
  if (req.method === "GET" && req.headers.range === undefined && ctx.source.directUrl) {
    const location = await ctx.source.directUrl(info);
    if (location) {
      // Not cacheable: the ticket in it works once, for a few seconds.
      res.writeHead(307, { Location: location, "Cache-Control": "no-store", "Content-Length": "0" });
      res.end();
      return "hit_peer";
    }
  }
  return sendNar(ctx, req, res, info);
}

/** For a failed store lookup: a store that cannot answer now (the daemon is gone) is a 503, not a 404. */
export function storeUnavailable(e: unknown): never {
  if (e instanceof StoreUnavailableError) throw new HttpError(503, `the Nix store cannot be asked right now: ${e.message}`);
  throw e;
}

/**
 * Sends `info`'s NAR from ctx.source (Range, If-Range, HEAD; sendfile regions when ctx.sendfile).
 * `countBytes` replaces the metrics' NAR byte counters (the direct port counts its own).
 */
export async function sendNar(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, info: PathInfo, countBytes?: (n: number) => void): Promise<Outcome> {
  const size = info.narSize;
  const etag = `"${info.narHash.replace(/^sha256:/, "")}"`;
  const headers = {
    "Content-Type": "application/x-nix-nar",
    "Accept-Ranges": "bytes",
    ETag: etag,
    // The URL names the content by hash: the bytes behind it never change.
    "Cache-Control": "public, max-age=31536000, immutable",
  };
  const ifRange = req.headers["if-range"];
  const range = ifRange !== undefined && ifRange !== etag ? { kind: "full" as const } : parseRange(req.headers.range, size);
  if (range.kind === "unsatisfiable") {
    sendError(req, res, 416, "range not satisfiable", { "Content-Range": `bytes */${size}` });
    return "client_error";
  }
  const [start, end] = range.kind === "partial" ? [range.start, range.end] : [0, size];
  const status = range.kind === "partial" ? 206 : 200;
  const head = { ...headers, "Content-Length": end - start, ...(status === 206 ? { "Content-Range": `bytes ${start}-${end - 1}/${size}` } : {}) };
  const outcome = ctx.fromPeer?.(info) ? "hit_peer" : "hit_local";
  if (req.method === "HEAD") {
    // HEAD needs no bytes: it is answered from the path's metadata, without asking a source.
    res.writeHead(status, head);
    res.end();
    return outcome;
  }
  // Counted as they go, so a scrape during a long transfer sees progress.
  const served = ctx.metrics?.narBytesServed;
  const key = outcome === "hit_peer" ? "peer" : "local";
  const count = countBytes ?? (served ? (n: number) => void (served[key] += n) : undefined);
  // Reads follow the client's pace, so a slow client holds a small read, not a large one.
  const pace = new ReadPace();
  const readSize = () => pace.size;
  // With sendfile, large file contents of this host's store come as regions (peers' bytes never).
  const pieces: AsyncIterable<NarPiece> = ctx.sendfile && ctx.source.narPieces
    ? ctx.source.narPieces(info, start, end, { readSize, regionMin: REGION_MIN })
    : ctx.source.narStream(info, start, end, readSize);
  const chunks = checkedLength(pieces, end - start, count, pace);
  // The status goes out only once a source has produced the first chunk: a source failing before
  // that gets a real error status, not a 200 followed by a dropped connection.
  let body: AsyncGenerator<NarPiece>;
  try {
    body = await primed(chunks);
  } catch (e) {
    return failedBeforeFirstByte(ctx, req, res, info, e);
  }
  res.writeHead(status, head);
  try {
    await writeBody(body, res, ctx.sendfile, count);
    return outcome;
  } catch (e) {
    // writeBody has destroyed the socket, so the client sees a short body against Content-Length,
    // never a complete-looking one. A client hanging up is not worth more than a debug line.
    const gone = (e as NodeJS.ErrnoException).code === "ERR_STREAM_PREMATURE_CLOSE";
    const message = (e as Error).message;
    ctx.log[gone ? "debug" : "warn"]({ path: info.storePath, start, end, err: message }, "NAR transfer aborted");
    if (gone) return "aborted";
    ctx.metrics?.errors.add({ message: `NAR transfer to the client failed: ${message}`, path: info.storePath });
    return "server_error";
  }
}

/**
 * The answer when no byte could be had. Nix (2.8 to 2.26, filetransfer.cc) takes a 404 as "not in
 * this cache" (no retry; the next substituter is tried, or the path built); it retries a 5xx
 * other than 501/505/511 up to download-attempts times (5), with backoff, then fails the
 * substitution. So: 404 when the path is gone everywhere, 502 when holders exist but failed (a
 * peer restarting may be back by the retry), 503 when the store cannot be asked, 500 otherwise.
 */
function failedBeforeFirstByte(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, info: PathInfo, e: unknown): Outcome {
  const message = (e as Error).message;
  if (e instanceof NarGoneError) {
    ctx.log.info({ path: info.storePath, err: message }, "NAR gone before its first byte");
    send(req, res, 404, "not found\n", NOT_FOUND_HEADERS);
    return "miss";
  }
  if (e instanceof StoreUnavailableError) {
    sendError(req, res, 503, `the Nix store cannot be asked right now: ${message}`);
    return "server_error";
  }
  const status = e instanceof NarUnavailableError ? 502 : 500;
  ctx.log[status === 502 ? "warn" : "error"]({ path: info.storePath, err: message }, "NAR source failed before its first byte");
  ctx.metrics?.errors.add({ message: `NAR source failed before its first byte: ${message}`, path: info.storePath });
  sendError(req, res, status, status === 502 ? "no holder of this path could send it" : "reading the NAR failed");
  return "server_error";
}

/**
 * Writes the chunks to `res` with backpressure, then ends it. Each chunk goes back to the NAR
 * buffer pool in its write's callback, once the socket has written it (or dropped it): never
 * earlier, or a read for another client would overwrite bytes still queued for this one.
 * (Chunks from elsewhere, a peer's, are not the pool's, and release() ignores them.)
 * A FileRegion is sent with sendfile (send-file.ts) once every earlier write's callback has run,
 * so that the kernel has the bytes before it; `count` is told of its bytes as they go.
 * On failure, of the source or of the client, destroys `res` and throws.
 */
async function writeBody(body: AsyncGenerator<NarPiece>, res: ServerResponse, sendfile?: SendfileBinding, count?: (n: number) => void): Promise<void> {
  let inFlight = 0; // writes whose callback has not run
  let flushed: (() => void) | undefined;
  try {
    for await (const piece of body) {
      if (!Buffer.isBuffer(piece)) {
        if (inFlight > 0 && !res.destroyed) {
          await new Promise<void>((resolve) => {
            flushed = resolve;
            res.once("close", resolve);
          });
          res.off("close", flushed!);
          flushed = undefined;
        }
        await sendRegion(sendfile, res, piece, count);
        continue;
      }
      inFlight++;
      const written = (): void => {
        narBuffers.release(piece);
        if (--inFlight === 0) flushed?.();
      };
      // A response whose client left while the chunk was being read is destroyed already: its
      // write returns false and neither "drain" nor "close" will come (that close has passed).
      if (!res.write(piece, written) && !res.destroyed) await drainOrClose(res);
      if (res.destroyed) throw prematureClose();
    }
    res.end();
    await finished(res);
  } catch (e) {
    res.destroy();
    throw e;
  }
}

function prematureClose(): Error {
  return Object.assign(new Error("the client closed the connection"), { code: "ERR_STREAM_PREMATURE_CLOSE" });
}

/**
 * Passes chunks through, and fails unless exactly `expected` bytes went by; tells `pace` when each
 * was taken. Counts Buffers; a region's bytes are counted as sendRegion sends them.
 */
async function* checkedLength(chunks: AsyncIterable<NarPiece>, expected: number, count?: (n: number) => void, pace?: ReadPace): AsyncGenerator<NarPiece> {
  let seen = 0;
  for await (const chunk of chunks) {
    seen += chunk.length;
    if (seen > expected) throw new Error(`NAR is longer than the ${expected} bytes announced`);
    if (Buffer.isBuffer(chunk)) count?.(chunk.length);
    yield chunk;
    pace?.took(chunk.length); // resumed: the response has taken the chunk (or buffered under its limit)
  }
  if (seen !== expected) throw new Error(`NAR ended after ${seen} of ${expected} bytes`);
}
