// Narinfo lookups the store can answer without waiting (hits the watcher vouches for, misses of
// paths it has not seen) are answered in one go, from the request to res.end() with no promise in
// between: most of what Nix asks, and what issue 11 measures against nginx. Checked by a
// "request" listener added after the agent's own: it runs right after the agent's handler
// returns, so the answer must be complete by then. The answers stay byte for byte what they were.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import { connect, type AddressInfo } from "node:net";
import { join } from "node:path";
import { bodyEncoding, type CacheContext } from "../agent/http/cache-routes.js";
import { createHttpServer } from "../agent/http/server.js";
import { createLogger } from "../agent/log.js";
import { AgentMetrics } from "../agent/metrics.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { narUrl } from "../protocol/nar-url.js";
import { renderNarinfo } from "../protocol/narinfo.js";
import { addToStore, needNix, tempDir } from "./helpers/nix.js";

/** Sends one request on a fresh connection and returns the raw answer, up to the connection's end. */
function raw(port: number, request: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = connect(port, "127.0.0.1", () => sock.write(request));
    let out = "";
    sock.on("data", (d: Buffer) => (out += d.toString("latin1")));
    sock.on("close", () => resolve(out));
    sock.on("error", reject);
  });
}

test("narinfo hits and misses known without waiting are answered before the request event returns, headers and bodies as before", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  const root = join(tmp.dir, "store");
  writeFileSync(join(tmp.dir, "f"), "contents\n");
  const storePath = await addToStore(root, join(tmp.dir, "f"));
  const hashPart = storePath.slice(11, 43);
  const local = new LocalStore(root, new Signer([]));
  local.watch();
  const metrics = new AgentMetrics({ storePaths: () => local.pathCount(), peers: () => [], mesh: () => undefined });
  const ctx: CacheContext = { source: local, local, priority: 30, log: createLogger({ level: "silent", pretty: false }), metrics };
  const server = createHttpServer(ctx);
  const endedAtOnce: string[] = [];
  server.on("request", (req: IncomingMessage, res: ServerResponse) => {
    if (!res.writableEnded) endedAtOnce.push(`${req.method} ${req.url}`);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  try {
    const info = (await local.pathInfo(hashPart))!;
    const body = renderNarinfo(info, narUrl(hashPart, info.narHash));
    const miss = "0".repeat(32);
    // Twice each: the first renders the narinfo, the second reuses it.
    for (let i = 0; i < 2; i++) {
      for (const method of ["GET", "HEAD"]) {
        const hit = await raw(port, `${method} /${hashPart}.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
        const [head, got] = hit.split("\r\n\r\n");
        assert.match(head!, new RegExp(
          "^HTTP/1\\.1 200 OK\r\nContent-Type: text/x-nix-narinfo\r\nCache-Control: max-age=60\r\n" +
            `Content-Length: ${Buffer.byteLength(body)}\r\nDate: [^\r]+ GMT\r\nConnection: close$`,
        ), `${method} hit: status line and headers`);
        assert.equal(got, method === "GET" ? body : "", `${method} hit: body`);
        const absent = await raw(port, `${method} /${miss}.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
        assert.match(absent, new RegExp(
          "^HTTP/1\\.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-store\r\n" +
            `Content-Length: 10\r\nDate: [^\r]+ GMT\r\nConnection: close\r\n\r\n${method === "GET" ? "not found\n" : ""}$`,
        ), `${method} miss`);
      }
    }
    // Keep-alive: several answers in a row on one connection, each complete.
    const two = await raw(port, `GET /${hashPart}.narinfo HTTP/1.1\r\nHost: x\r\n\r\nGET /${miss}.narinfo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    assert.match(two, new RegExp(`^HTTP/1\\.1 200 OK\r\n[^]*Keep-Alive: timeout=30\r\n\r\n${body.replace(/[.+]/g, "\\$&")}HTTP/1\\.1 404 Not Found\r\n[^]*\r\n\r\nnot found\n$`));
    assert.deepEqual(endedAtOnce, [], "every one of these answered before the request event returned");
    assert.deepEqual(metrics.narinfo, { hitsLocal: 5, hitsPeer: 0, misses: 5 }, "and counted");
  } finally {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    metrics.close();
    local.close();
    tmp.cleanup();
  }
});

test("narinfo bodies go out as latin1 only when that gives their UTF-8 bytes", () => {
  for (const body of ["StorePath: /nix/store/x\n", "", "Sig: k:abc+/=\n\x7f", "caf\u00e9", "\u00ff", "\u20ac", "a\ud83d\ude00b"]) {
    assert.deepEqual(Buffer.from(body, bodyEncoding(body)), Buffer.from(body, "utf8"), JSON.stringify(body));
  }
  assert.equal(bodyEncoding("StorePath: /nix/store/x\n"), "latin1");
});
