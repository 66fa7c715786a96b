// Small helpers to answer a request with a complete body (HEAD gets the same headers, no body).
import type { IncomingMessage, ServerResponse } from "node:http";

export type Headers = Record<string, string | number>;

export function send(req: IncomingMessage, res: ServerResponse, status: number, body: string | Buffer, headers: Headers): void {
  const buf = typeof body === "string" ? Buffer.from(body) : body;
  res.writeHead(status, { ...headers, "Content-Length": buf.length });
  res.end(req.method === "HEAD" ? undefined : buf);
}

/** A client-visible error. 4xx answers say what was wrong; nothing is cached. */
export function sendError(req: IncomingMessage, res: ServerResponse, status: number, message: string, extra: Headers = {}): void {
  send(req, res, status, message.endsWith("\n") ? message : message + "\n", {
    "Content-Type": "text/plain; charset=utf-8",
    "Cache-Control": "no-store",
    ...extra,
  });
}

export function sendJson(req: IncomingMessage, res: ServerResponse, status: number, value: unknown, extra: Headers = {}): void {
  send(req, res, status, JSON.stringify(value) + "\n", { "Content-Type": "application/json", ...extra });
}

/** Thrown by route handlers for a client's mistake; the server turns it into a 4xx answer. */
export class HttpError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}
