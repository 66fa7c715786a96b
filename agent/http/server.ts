// The agent's HTTP listener: limits on what a client may send, routing, and error answers.
// Every request is hostile until validated; a client's mistake gets a 4xx and the agent lives on.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { VERSION } from "../version.js";
import { cacheInfoReply, handleCacheInfo, handleNar, handleNarinfo, LEAVE, narinfoLookup, narinfoOutcome, narinfoReply, type CacheContext } from "./cache-routes.js";
import { AskAgain, installFastPath, type FastAnswer } from "./fast-path.js";
import { SOON } from "../source.js";
import type { Outcome, Route } from "../metrics.js";
import { handleMetrics, handleStatus, requireLoopback } from "./admin-routes.js";
import { limitConnections } from "./connections.js";
import { HttpError, sendError, sendJson } from "./respond.js";
import { handleListing, handleLog, handleServe } from "./store-routes.js";

const MAX_URL_LENGTH = 4096;
const MAX_HEADER_BYTES = 16 * 1024;
/** Open connections; past this the longest-idle ones are closed (connections.ts). */
const MAX_CONNECTIONS = 4096;

export interface HttpServerOptions {
  /** Open connections allowed (default 4096); tests use fewer. */
  maxConnections?: number;
  /** The fast path for narinfo and nix-cache-info requests (fast-path.ts); default on. Off: node:http answers everything. */
  fastPath?: boolean;
  /** Tests only: shorter timeouts (ms) than the agent's. */
  timeouts?: { headers: number; keepAlive: number; checkInterval: number };
}

export function createHttpServer(ctx: CacheContext, opts: HttpServerOptions = {}): Server {
  return createListener((req, res) => route(ctx, req, res), opts, opts.fastPath === false ? undefined : fastAnswer(ctx));
}

/**
 * The requests the fast path answers itself: narinfo lookups (as handleNarinfo does, with the
 * same Reply objects and metrics: at once when the source knows the answer without waiting, or
 * when asked again from the source's whenSoon(), else once its pathInfo() has answered) and
 * nix-cache-info. Everything else, and the connection with it, goes to node:http and route(); so
 * does a lookup that fails (node:http asks again and answers 503 or 500 as it does).
 */
function fastAnswer(ctx: CacheContext): FastAnswer {
  const cacheInfo = cacheInfoReply(ctx.priority);
  // One object for every "ask again": no allocation a lookup.
  const soon = new AskAgain((run) => ctx.source.whenSoon!(run));
  return (method, target) => {
    // "/" + 32 characters of hash part + ".narinfo"
    if (target.length === 41 && target.endsWith(".narinfo")) {
      const start = ctx.metrics ? performance.now() : 0;
      const hashPart = target.slice(1, 33);
      const info = narinfoLookup(ctx, hashPart);
      if (info === LEAVE) return undefined;
      // Asked again (and counted then, its time measured from then: the rest of this turn is not in it).
      if (info === SOON) return soon;
      if (info instanceof Promise) {
        return info.then((info) => {
          ctx.metrics?.request("narinfo", method, narinfoOutcome(ctx, info), start);
          return narinfoReply(hashPart, info);
        });
      }
      ctx.metrics?.request("narinfo", method, narinfoOutcome(ctx, info), start);
      return narinfoReply(hashPart, info);
    }
    if (target === "/nix-cache-info") {
      ctx.metrics?.request("nix-cache-info", method, "ok", ctx.metrics ? performance.now() : 0);
      return cacheInfo;
    }
    return undefined;
  };
}

/**
 * The agent's node:http server (limits, timeouts, connection cap, half-open and malformed-request
 * handling) around `answer`; bench/bare-narinfo.ts measures it with a fixed answer.
 */
export function createListener(answer: (req: IncomingMessage, res: ServerResponse) => void, opts: HttpServerOptions = {}, fast?: FastAnswer): Server {
  const t = opts.timeouts;
  const server = createServer({
    maxHeaderSize: MAX_HEADER_BYTES, // larger headers are answered 431 by Node itself
    requestTimeout: t ? t.headers : 30_000, // time to receive a whole request, not to send a response
    headersTimeout: t ? t.headers : 20_000,
    keepAliveTimeout: t ? t.keepAlive : 30_000,
    ...(t && { connectionsCheckingInterval: t.checkInterval, keepAliveTimeoutBuffer: 0 }),
  });
  const limiter = limitConnections(server, opts.maxConnections ?? MAX_CONNECTIONS);
  // The only request listener: the limiter's bookkeeping, then the answer.
  server.on("request", (req: IncomingMessage, res: ServerResponse) => {
    limiter.track(req, res);
    answer(req, res);
  });
  if (fast) installFastPath(server, fast, limiter);
  // A client may send its request and then close its side (FIN, as `nc -N` or a shutdown()
  // after writing do). Node otherwise ends the socket at that FIN, dropping every answer not yet
  // written, which is every answer that waits on the store. With this it answers what was
  // asked, then closes. (Node's http.Server has this flag on Node 20, 22 and 24 but does not
  // declare it in its types; test/http-failures.test.ts fails if it ever stops working.)
  (server as Server & { httpAllowHalfOpen: boolean }).httpAllowHalfOpen = true;
  server.on("clientError", (err: NodeJS.ErrnoException, socket) => {
    // Malformed HTTP: answer if the socket is still usable, then close it.
    if (socket.writable && !(err.code === "ECONNRESET")) {
      const status = err.code === "HPE_HEADER_OVERFLOW" ? "431 Request Header Fields Too Large" : "400 Bad Request";
      socket.end(`HTTP/1.1 ${status}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n`);
    } else {
      socket.destroy();
    }
  });
  return server;
}

/** What a request turned out to be, for the metrics. */
interface Exchange {
  route: Route;
  /** Set by handlers that know better than the status code (hits, misses, failed transfers). */
  outcome: Outcome | undefined;
}

/**
 * Answers one request. A request that can be answered without waiting (a narinfo the store knows
 * from memory, hit or miss: most of what Nix asks) runs from here to res.end() and its metrics in
 * one go, without a promise; the rest continue when their handler's promise settles.
 */
function route(ctx: CacheContext, req: IncomingMessage, res: ServerResponse): void {
  const start = ctx.metrics ? performance.now() : 0;
  const ex: Exchange = { route: "other", outcome: undefined };
  let pending: Promise<void> | void = undefined;
  try {
    const url = req.url ?? "";
    if (url.length > MAX_URL_LENGTH) throw new HttpError(414, "URL too long");
    if (req.method !== "GET" && req.method !== "HEAD") throw new HttpError(405, "only GET and HEAD are supported");
    if (!url.startsWith("/")) throw new HttpError(400, "malformed request target");
    const q = url.indexOf("?");
    const path = q === -1 ? url : url.slice(0, q);
    const query = q === -1 ? "" : url.slice(q + 1);
    pending = dispatch(ctx, req, res, path, query, ex);
  } catch (e) {
    failed(ctx, req, res, ex, e);
  }
  if (!pending) return done(ctx, req, res, ex, start);
  pending.then(
    () => done(ctx, req, res, ex, start),
    (e: unknown) => {
      failed(ctx, req, res, ex, e);
      done(ctx, req, res, ex, start);
    },
  );
}

function failed(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, ex: Exchange, e: unknown): void {
  ex.outcome = undefined; // the status code says it
  if (res.headersSent) {
    res.destroy();
  } else if (e instanceof HttpError) {
    sendError(req, res, e.status, e.message, e.status === 405 ? { Allow: "GET, HEAD" } : {});
  } else {
    ctx.log.error({ url: req.url, err: e }, "internal error");
    ctx.metrics?.errors.add({ message: `internal error answering ${ex.route} request: ${(e as Error).message}` });
    sendError(req, res, 500, "internal error");
  }
}

function done(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, ex: Exchange, start: number): void {
  ctx.metrics?.request(ex.route, req.method, ex.outcome ?? outcomeOf(res), start);
}

function outcomeOf(res: ServerResponse): Outcome {
  if (!res.writableEnded) return "aborted"; // destroyed before the answer was complete
  const s = res.statusCode;
  return s >= 500 ? "server_error" : s >= 400 ? "client_error" : "ok";
}

/** Routes the request; returns the handler's promise when it has to wait. */
function dispatch(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, path: string, query: string, ex: Exchange): Promise<void> | void {
  // indexOf, not lastIndexOf: V8's lastIndexOf is a call into its runtime (~0.15 µs a request).
  if (path.endsWith(".narinfo") && path.indexOf("/", 1) === -1) {
    ex.route = "narinfo";
    const outcome = handleNarinfo(ctx, req, res, path.slice(1, -8));
    if (typeof outcome === "string") ex.outcome = outcome;
    else return outcome.then((o) => void (ex.outcome = o));
    return;
  }
  if (path.startsWith("/nar/")) {
    ex.route = "nar";
    return handleNar(ctx, req, res, path, query).then((o) => void (ex.outcome = o));
  }
  if (path === "/nix-cache-info") {
    ex.route = "nix-cache-info";
    return handleCacheInfo(ctx, req, res);
  }
  if (path.endsWith(".ls") && path.indexOf("/", 1) === -1) {
    ex.route = "ls";
    return handleListing(ctx, req, res, path.slice(1, -3));
  }
  if (path.startsWith("/log/")) {
    ex.route = "log";
    return handleLog(ctx, req, res, path.slice(5));
  }
  if (path.startsWith("/serve/")) {
    ex.route = "serve";
    const slash = path.indexOf("/", 7);
    return handleServe(ctx, req, res, slash === -1 ? path.slice(7) : path.slice(7, slash), slash === -1 ? "" : path.slice(slash));
  }
  if (path === "/health") {
    ex.route = "health";
    return sendJson(req, res, 200, { status: "ok" }, { "Cache-Control": "no-store" });
  }
  if (path === "/version") {
    ex.route = "version";
    return sendJson(req, res, 200, { name: "fleetcache", version: VERSION });
  }
  if (path === "/api/v1/status") {
    ex.route = "status";
    return handleStatus(ctx, req, res);
  }
  if (path === "/metrics") {
    ex.route = "metrics";
    return handleMetrics(ctx, req, res);
  }
  if ((path === "/" || path.startsWith("/dashboard/")) && ctx.dashboard) {
    ex.route = "dashboard";
    requireLoopback(req);
    return ctx.dashboard(req, res, path);
  }
  throw new HttpError(404, "not found");
}
