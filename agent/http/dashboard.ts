// The operators' dashboard at GET /: a static page, script, stylesheet and icon, compiled into the
// agent (no build step, no external resources). The page reads /api/v1/status from the same
// origin, so it shows data only where that API answers (loopback).
import { createHash } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import { DASHBOARD_ICON_SVG } from "./dashboard/icon.js";
import { DASHBOARD_HTML } from "./dashboard/page.js";
import { DASHBOARD_JS } from "./dashboard/script.js";
import { DASHBOARD_CSS } from "./dashboard/style.js";
import { send, sendError } from "./respond.js";

interface Asset {
  type: string;
  body: Buffer;
  etag: string;
}

function asset(type: string, text: string): Asset {
  const body = Buffer.from(text);
  return { type, body, etag: `"${createHash("sha256").update(body).digest("base64url").slice(0, 22)}"` };
}

const ASSETS = new Map<string, Asset>([
  ["/", asset("text/html; charset=utf-8", DASHBOARD_HTML)],
  ["/dashboard/app.js", asset("text/javascript; charset=utf-8", DASHBOARD_JS)],
  ["/dashboard/style.css", asset("text/css; charset=utf-8", DASHBOARD_CSS)],
  ["/dashboard/icon.svg", asset("image/svg+xml", DASHBOARD_ICON_SVG)],
]);

/** The request paths handleDashboard answers. */
export const DASHBOARD_PATHS: ReadonlySet<string> = new Set(ASSETS.keys());

export function isDashboardPath(path: string): boolean {
  return ASSETS.has(path);
}

// Only this origin, no inline code, no framing: a page about the fleet must not be a way into it.
const SECURITY_HEADERS = {
  "Content-Security-Policy":
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; " +
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "X-Frame-Options": "DENY",
};

/**
 * Answers GET/HEAD for the dashboard's paths: `/` and `/dashboard/...` (`path` is the request's
 * path without the query string; taken from req.url when omitted). 404 for other paths.
 */
export function handleDashboard(req: IncomingMessage, res: ServerResponse, path?: string): void {
  if (path === undefined) {
    const url = req.url ?? "/";
    const q = url.indexOf("?");
    path = q === -1 ? url : url.slice(0, q);
  }
  const a = ASSETS.get(path);
  if (!a) return sendError(req, res, 404, "not found");
  if (req.method !== "GET" && req.method !== "HEAD") return sendError(req, res, 405, "only GET and HEAD are supported", { Allow: "GET, HEAD" });
  // Revalidate every time (the page changes with the agent's version), but cheaply.
  const headers = { "Content-Type": a.type, "Cache-Control": "no-cache", ETag: a.etag, ...SECURITY_HEADERS };
  if (req.headers["if-none-match"] === a.etag) {
    res.writeHead(304, headers);
    res.end();
    return;
  }
  send(req, res, 200, a.body, headers);
}
