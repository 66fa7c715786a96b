// The agent's HTTP listener: limits on what a client may send, routing, and error answers.
// Every request is hostile until validated; a client's mistake gets a 4xx and the agent lives on.
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { VERSION } from "../version.js";
import { handleCacheInfo, handleNar, handleNarinfo, type CacheContext } from "./cache-routes.js";
import { HttpError, sendError, sendJson } from "./respond.js";
import { handleListing, handleLog, handleServe } from "./store-routes.js";

const MAX_URL_LENGTH = 4096;
const MAX_HEADER_BYTES = 16 * 1024;

export function createHttpServer(ctx: CacheContext): Server {
  const server = createServer(
    {
      maxHeaderSize: MAX_HEADER_BYTES, // larger headers are answered 431 by Node itself
      requestTimeout: 30_000, // time to receive a whole request, not to send a response
      headersTimeout: 20_000,
      keepAliveTimeout: 30_000,
    },
    (req, res) => void route(ctx, req, res),
  );
  server.maxConnections = 4096;
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

async function route(ctx: CacheContext, req: IncomingMessage, res: ServerResponse): Promise<void> {
  try {
    const url = req.url ?? "";
    if (url.length > MAX_URL_LENGTH) throw new HttpError(414, "URL too long");
    if (req.method !== "GET" && req.method !== "HEAD") throw new HttpError(405, "only GET and HEAD are supported");
    if (!url.startsWith("/")) throw new HttpError(400, "malformed request target");
    const q = url.indexOf("?");
    const path = q === -1 ? url : url.slice(0, q);
    const query = q === -1 ? "" : url.slice(q + 1);
    await dispatch(ctx, req, res, path, query);
  } catch (e) {
    if (res.headersSent) {
      res.destroy();
    } else if (e instanceof HttpError) {
      sendError(req, res, e.status, e.message, e.status === 405 ? { Allow: "GET, HEAD" } : {});
    } else {
      ctx.log.error({ url: req.url, err: e }, "internal error");
      sendError(req, res, 500, "internal error");
    }
  }
}

async function dispatch(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, path: string, query: string): Promise<void> {
  if (path.endsWith(".narinfo") && path.lastIndexOf("/") === 0) return handleNarinfo(ctx, req, res, path.slice(1, -8));
  if (path.startsWith("/nar/")) return handleNar(ctx, req, res, path, query);
  if (path === "/nix-cache-info") return handleCacheInfo(ctx, req, res);
  if (path.endsWith(".ls") && path.lastIndexOf("/") === 0) return handleListing(ctx, req, res, path.slice(1, -3));
  if (path.startsWith("/log/")) return handleLog(ctx, req, res, path.slice(5));
  if (path.startsWith("/serve/")) {
    const slash = path.indexOf("/", 7);
    return handleServe(ctx, req, res, slash === -1 ? path.slice(7) : path.slice(7, slash), slash === -1 ? "" : path.slice(slash));
  }
  if (path === "/health") return sendJson(req, res, 200, { status: "ok" }, { "Cache-Control": "no-store" });
  if (path === "/version") return sendJson(req, res, 200, { name: "fleetcache", version: VERSION });
  if (path === "/api/v1/status" && ctx.status) {
    // Operator data (peers, addresses): for this host only, whatever address the agent listens on.
    if (!isLoopback(req.socket.remoteAddress)) throw new HttpError(403, "the admin API answers only on loopback");
    return sendJson(req, res, 200, ctx.status(), { "Cache-Control": "no-store" });
  }
  throw new HttpError(404, "not found");
}

function isLoopback(addr: string | undefined): boolean {
  return addr !== undefined && (addr.startsWith("127.") || addr === "::1" || addr.startsWith("::ffff:127."));
}
