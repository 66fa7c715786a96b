// Connection limits of the HTTP listener: idle keep-alive sockets must not lock new clients out.
import { test } from "node:test";
import assert from "node:assert/strict";
import { get as httpGet } from "node:http";
import { connect, type AddressInfo, type Socket } from "node:net";
import { createLogger } from "../agent/log.js";
import { createHttpServer } from "../agent/http/server.js";
import type { CacheContext } from "../agent/http/cache-routes.js";

// Only /health is asked here: the routes that need a store never run.
const ctx = { priority: 30, log: createLogger({ level: "silent", pretty: false }) } as unknown as CacheContext;

/** A socket that asked for /health once, got its whole answer, and now sits idle (keep-alive). */
function idleAfterRequest(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const sock = connect(port, "127.0.0.1", () => sock.write("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"));
    let got = "";
    const onData = (d: Buffer) => {
      got += d.toString("latin1");
      if (/\r\n\r\n[^]*\n$/.test(got)) {
        sock.off("data", onData);
        resolve(sock);
      }
    };
    sock.on("data", onData);
    sock.on("error", reject);
  });
}

/** A socket that connected and has not sent a byte. */
function silent(port: number): Promise<Socket> {
  return new Promise((resolve, reject) => {
    const sock = connect(port, "127.0.0.1", () => resolve(sock));
    sock.on("error", reject);
  });
}

function status(port: number): Promise<number> {
  return new Promise((resolve, reject) => {
    httpGet({ host: "127.0.0.1", port, path: "/health", agent: false }, (res) => {
      res.resume();
      res.on("end", () => resolve(res.statusCode!));
    }).on("error", reject);
  });
}

test("with every connection slot held by idle sockets, a new client is answered and the oldest idle ones are closed", async () => {
  const limit = 200;
  const server = createHttpServer(ctx, { maxConnections: limit });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  const sockets: Socket[] = [];
  const closed = new Set<Socket>();
  try {
    // Half keep-alive sockets after an answer, half that never sent a request; the oldest first.
    for (let i = 0; i < limit; i++) {
      const s = i % 2 === 0 ? await idleAfterRequest(port) : await silent(port);
      s.on("close", () => closed.add(s));
      s.on("error", () => {});
      sockets.push(s);
    }
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(closed.size, 0, "below the limit nothing is closed");
    // Newcomers that stay connected too: each takes the slot of the longest-idle socket.
    for (let i = 0; i < 20; i++) sockets.push(await idleAfterRequest(port));
    assert.equal(await status(port), 200, "a newcomer is answered");
    await new Promise((r) => setTimeout(r, 100));
    assert.ok(closed.size >= 21, `idle sockets were closed to make room (${closed.size})`);
    // The ones closed are the oldest.
    const newestClosed = Math.max(...[...closed].map((s) => sockets.indexOf(s)));
    assert.ok(newestClosed < limit / 2, `the oldest idle sockets went first (newest closed: #${newestClosed})`);
  } finally {
    for (const s of sockets) s.destroy();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
});

test("sockets with a request in progress are not reaped; with no idle socket left a newcomer is refused", async () => {
  const limit = 20;
  // A route that never answers stands for long transfers: /dashboard with a handler that waits.
  let release!: () => void;
  const waiting = new Promise<void>((r) => (release = r));
  const busyCtx = { ...ctx, dashboard: async (_req: unknown, res: import("node:http").ServerResponse) => {
    await waiting;
    res.end("done");
  } } as unknown as CacheContext;
  const server = createHttpServer(busyCtx, { maxConnections: limit });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  const answers: Promise<string>[] = [];
  const sockets: Socket[] = [];
  try {
    for (let i = 0; i < limit; i++) {
      const s = await silent(port);
      sockets.push(s);
      answers.push(new Promise((resolve) => {
        let got = "";
        s.on("data", (d: Buffer) => (got += d.toString("latin1")));
        s.on("close", () => resolve(got));
        s.on("error", () => {});
      }));
      s.write("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    }
    await new Promise((r) => setTimeout(r, 200));
    await assert.rejects(status(port), "a newcomer is refused while every slot is busy");
    release();
    for (const a of answers) assert.match(await a, /^HTTP\/1\.1 200[^]*done$/, "every busy request completed");
    assert.equal(await status(port), 200, "and afterwards new clients are answered");
  } finally {
    release();
    for (const s of sockets) s.destroy();
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
});
