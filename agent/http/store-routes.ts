// Routes for people and tools beyond substitution: NAR listings, build logs, files in a path.
import type { IncomingMessage, ServerResponse } from "node:http";
import { createReadStream } from "node:fs";
import { readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { pipeline } from "node:stream/promises";
import bz2 from "unbzip2-stream";
import { serializeListing } from "../../protocol/listing.js";
import type { PathInfo } from "../../protocol/path-info.js";
import { isValidHashPart, isValidName } from "../../protocol/store-path.js";
import { narEntries } from "../store/case-hack.js";
import { resolveInStore } from "../store/store-files.js";
import { storeUnavailable, type CacheContext } from "./cache-routes.js";
import { parseRange } from "./range.js";
import { HttpError, send, sendError } from "./respond.js";

async function requireLocalPath(ctx: CacheContext, hashPart: string): Promise<PathInfo> {
  if (!isValidHashPart(hashPart)) throw new HttpError(400, `invalid store path hash "${hashPart}": expected 32 nix32 characters`);
  const info = await ctx.local.pathInfo(hashPart).catch(storeUnavailable);
  if (!info) throw new HttpError(404, "not found");
  return info;
}

/** GET /<hash>.ls: the NAR listing, in the JSON format Nix writes next to NARs. */
export async function handleListing(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, hashPart: string): Promise<void> {
  const info = await requireLocalPath(ctx, hashPart);
  const listing = serializeListing(await ctx.local.listing(info));
  send(req, res, 200, listing, { "Content-Type": "application/json", "Cache-Control": "max-age=60" });
}

/** GET /log/<hash>-<name>.drv: the build log, decompressed (Nix keeps them bzip2'ed by default). */
export async function handleLog(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, drv: string): Promise<void> {
  const m = /^([^-/]{32})-([^/]+\.drv)$/.exec(drv);
  if (!m || !isValidHashPart(m[1]!) || !isValidName(m[2]!)) {
    throw new HttpError(400, "malformed derivation name: expected /log/<hash>-<name>.drv");
  }
  const dir = join(ctx.local.root, "nix/var/log/nix/drvs", drv.slice(0, 2));
  const base = join(dir, drv.slice(2));
  for (const [file, compressed] of [[base + ".bz2", true], [base, false]] as const) {
    const st = await stat(file).catch(() => undefined);
    if (!st?.isFile()) continue;
    res.writeHead(200, { "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache" });
    if (req.method === "HEAD") return void res.end();
    const input = createReadStream(file);
    await (compressed ? pipeline(input, bz2(), res) : pipeline(input, res)).catch((e: Error) =>
      ctx.log.warn({ drv, err: e.message }, "sending build log failed"),
    );
    return;
  }
  throw new HttpError(404, "no build log for this derivation");
}

const CONTENT_TYPES: Record<string, string> = {
  html: "text/html; charset=utf-8", htm: "text/html; charset=utf-8", txt: "text/plain; charset=utf-8",
  css: "text/css", js: "text/javascript", json: "application/json", svg: "image/svg+xml", png: "image/png",
  jpg: "image/jpeg", jpeg: "image/jpeg", gif: "image/gif", pdf: "application/pdf", xml: "application/xml",
  md: "text/markdown; charset=utf-8", sh: "text/x-shellscript", nix: "text/plain; charset=utf-8",
};

/** GET /serve/<hash>/<file>: a file inside a store path, or a directory's listing. */
export async function handleServe(ctx: CacheContext, req: IncomingMessage, res: ServerResponse, hashPart: string, rest: string): Promise<void> {
  const info = await requireLocalPath(ctx, hashPart);
  const components = decodeComponents(rest);
  const basename = info.storePath.slice("/nix/store/".length);
  const isValid = (b: string) =>
    isValidHashPart(b.slice(0, 32)) ? ctx.local.isValidPath("/nix/store/" + b).catch(storeUnavailable) : Promise.resolve(false);
  const found = await resolveInStore(ctx.local.root, basename, components, isValid, ctx.local.caseHack);
  if (found.kind === "not-found") throw new HttpError(404, found.reason);
  if (found.kind === "forbidden") throw new HttpError(403, found.reason);
  const { stat: st, realPath } = found;
  if (st.isDirectory()) {
    if (!rest.endsWith("/")) {
      // Relative links in the listing need the trailing slash.
      res.writeHead(301, { Location: `/serve/${hashPart}${rest}/`, "Content-Length": 0 });
      return void res.end();
    }
    return sendDirectory(req, res, realPath, found.logicalPath, ctx.local.caseHack);
  }
  if (!st.isFile()) throw new HttpError(404, "not a regular file");
  const ext = /\.([A-Za-z0-9]+)$/.exec(found.logicalPath)?.[1]?.toLowerCase() ?? ""; // the name on disk may end in a case-hack suffix
  const headers = {
    "Content-Type": CONTENT_TYPES[ext] ?? "application/octet-stream",
    "Accept-Ranges": "bytes",
    "Cache-Control": "no-cache",
    // Files are from arbitrary packages: don't let a browser run them as part of this origin.
    "Content-Security-Policy": "sandbox",
    "X-Content-Type-Options": "nosniff",
  };
  const range = parseRange(req.headers.range, st.size);
  if (range.kind === "unsatisfiable") return sendError(req, res, 416, "range not satisfiable", { "Content-Range": `bytes */${st.size}` });
  const [start, end] = range.kind === "partial" ? [range.start, range.end] : [0, st.size];
  res.writeHead(range.kind === "partial" ? 206 : 200, {
    ...headers,
    "Content-Length": end - start,
    ...(range.kind === "partial" ? { "Content-Range": `bytes ${start}-${end - 1}/${st.size}` } : {}),
  });
  if (req.method === "HEAD" || end === start) return void res.end();
  await pipeline(createReadStream(realPath, { start, end: end - 1 }), res).catch((e: Error) =>
    ctx.log.debug({ path: realPath, err: e.message }, "serving file aborted"),
  );
}

/** URL path components after /serve/<hash>, decoded; traversal attempts are refused. */
function decodeComponents(rest: string): string[] {
  if (rest !== "" && !rest.startsWith("/")) throw new HttpError(400, "malformed path");
  const out: string[] = [];
  for (const raw of rest.split("/").slice(1)) {
    let c: string;
    try {
      c = decodeURIComponent(raw);
    } catch {
      throw new HttpError(400, "malformed percent-encoding in path");
    }
    if (c === "." || c === ".." || c.includes("/") || c.includes("\0") || c.includes("\\")) {
      throw new HttpError(400, "path traversal is not allowed");
    }
    if (c !== "") out.push(c);
  }
  return out;
}

/** A directory's page: its entries by their NAR names, in NAR order. */
async function sendDirectory(req: IncomingMessage, res: ServerResponse, realPath: string, logicalPath: string, caseHack: boolean): Promise<void> {
  const entries = narEntries(await readdir(realPath, { withFileTypes: true, encoding: "buffer" }), (e) => e.name, caseHack, realPath);
  const rows = entries
    .map(({ name: raw, onDisk: e }) => {
      const n = raw.toString();
      const name = n + (e.isDirectory() ? "/" : "");
      return `<li><a href="${escapeHtml(encodeURIComponent(n))}${e.isDirectory() ? "/" : ""}">${escapeHtml(name)}</a>${e.isSymbolicLink() ? " (symlink)" : ""}</li>`;
    })
    .join("\n");
  const title = escapeHtml(logicalPath);
  const html = `<!doctype html>\n<meta charset="utf-8">\n<title>${title}</title>\n<h1>${title}</h1>\n<ul>\n<li><a href="../">../</a></li>\n${rows}\n</ul>\n`;
  send(req, res, 200, html, { "Content-Type": "text/html; charset=utf-8", "Cache-Control": "no-cache", "Content-Security-Policy": "default-src 'none'" });
}

function escapeHtml(s: string): string {
  return s.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
