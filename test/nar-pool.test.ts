// NAR bytes are read into reused buffers (agent/buffer-pool.ts). A buffer may go back to the pool
// only once the socket has written it: given back earlier, a read for another client overwrites
// bytes still queued for a slow one. These tests catch that.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import { connect, type AddressInfo } from "node:net";
import { join } from "node:path";
import { BufferPool } from "../agent/buffer-pool.js";
import { createHttpServer } from "../agent/http/server.js";
import type { CacheContext } from "../agent/http/cache-routes.js";
import { createLogger } from "../agent/log.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { narUrl } from "../protocol/nar-url.js";
import { encodeNix32 } from "../protocol/nix32.js";
import { addToStore, needNix, tempDir } from "./helpers/nix.js";

test("BufferPool: reuses what is released, ignores foreign and twice-released buffers", () => {
  const pool = new BufferPool(1 << 20);
  const a = pool.acquire(100_000);
  assert.equal(a.length, 128 << 10, "rounded up to a power of two");
  pool.release(a.subarray(0, 10)); // a view of it gives it back
  assert.equal(pool.freeBytes, 128 << 10);
  pool.release(a); // twice: ignored
  assert.equal(pool.freeBytes, 128 << 10);
  const b = pool.acquire(128 << 10);
  assert.equal(b.buffer, a.buffer, "the released buffer is handed out again");
  const c = pool.acquire(128 << 10);
  assert.notEqual(c.buffer, b.buffer, "never the same buffer to two holders");
  pool.release(Buffer.from("framing bytes")); // shares Node's slab with other small Buffers
  pool.release(Buffer.allocUnsafe(128 << 10)); // not the pool's
  assert.equal(pool.freeBytes, 0);
  for (const x of [b, c, pool.acquire(1 << 19), pool.acquire(1 << 19)]) pool.release(x);
  assert.ok(pool.freeBytes <= 1 << 20, "free memory bounded");
});

/** Everything `port` sends for a GET of `path`, read only after `wait` resolves: a client that stalls. */
function stalledGet(port: number, path: string, wait: Promise<void>): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const sock = connect(port, "127.0.0.1", () => sock.write(`GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`));
    sock.pause();
    const chunks: Buffer[] = [];
    sock.on("data", (d: Buffer) => chunks.push(d));
    sock.on("end", () => resolve(Buffer.concat(chunks)));
    sock.on("error", reject);
    void wait.then(() => sock.resume());
  });
}

function body(response: Buffer): Buffer {
  const end = response.indexOf("\r\n\r\n");
  assert.match(response.subarray(0, end).toString(), /^HTTP\/1\.1 200 /);
  return response.subarray(end + 4);
}

const narHashOf = (b: Buffer) => "sha256:" + encodeNix32(createHash("sha256").update(b).digest());

test("a stalled client's NAR stays intact while other clients' reads reuse the pool", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  const root = join(tmp.dir, "store");
  // A: small files (gathered with their NAR framing into pooled buffers) and a larger one.
  const treeA = join(tmp.dir, "a");
  mkdirSync(treeA);
  for (let i = 0; i < 300; i++) writeFileSync(join(treeA, `f${i}`), randomBytes(1000 + ((i * 7919) % 30_000)));
  writeFileSync(join(treeA, "big"), randomBytes(6 << 20));
  const fileB = join(tmp.dir, "b");
  writeFileSync(fileB, randomBytes(20 << 20));
  const [pathA, pathB] = [await addToStore(root, treeA), await addToStore(root, fileB)];
  const local = new LocalStore(root, new Signer([]));
  const ctx = { source: local, local, priority: 30, log: createLogger({ level: "silent", pretty: false }) } as unknown as CacheContext;
  const server = createHttpServer(ctx);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  try {
    const infoA = (await local.pathInfo(pathA.slice(11, 43)))!;
    const infoB = (await local.pathInfo(pathB.slice(11, 43)))!;
    const urlA = "/" + narUrl(pathA.slice(11, 43), infoA.narHash);
    const urlB = "/" + narUrl(pathB.slice(11, 43), infoB.narHash);
    // Three clients stall on A with socket buffers full and chunks queued behind them...
    let go!: () => void;
    const wait = new Promise<void>((r) => (go = r));
    const stalled = [0, 1, 2].map(() => stalledGet(port, urlA, wait));
    await new Promise((r) => setTimeout(r, 500));
    // ...while B is downloaded whole, again and again, reading into buffers from the same pool.
    for (let i = 0; i < 4; i++) {
      const b = body(await stalledGet(port, urlB, Promise.resolve()));
      assert.equal(b.length, infoB.narSize);
      assert.equal(narHashOf(b), infoB.narHash, `B, download ${i}`);
    }
    go();
    for (const [i, r] of stalled.entries()) {
      const a = body(await r);
      assert.equal(a.length, infoA.narSize, `stalled client ${i}: length`);
      assert.equal(narHashOf(a), infoA.narHash, `stalled client ${i}: bytes`);
    }
  } finally {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    local.close();
    tmp.cleanup();
  }
});

test("a client that hangs up while the next chunk is being read: the source is closed, the request ends", async () => {
  // A source that yields one chunk, then waits for the test before producing the rest.
  const hash = "1bcdfghijklmnpqrsvwxyz0123456789";
  const info = { storePath: `/nix/store/${hash}-x`, narHash: "sha256:" + "1".repeat(52), narSize: 3 << 16, references: [], sigs: [] };
  let openGate!: () => void;
  const gate = new Promise<void>((r) => (openGate = r));
  let sourceClosed!: () => void;
  const closed = new Promise<string>((r) => (sourceClosed = () => r("closed")));
  const source = {
    pathInfo: async (h: string) => (h === hash ? info : undefined),
    async *narStream() {
      try {
        yield Buffer.alloc(1 << 16, 1);
        await gate;
        yield Buffer.alloc(1 << 16, 2);
        yield Buffer.alloc(1 << 16, 3);
      } finally {
        sourceClosed();
      }
    },
  };
  const ctx = { source, local: source, priority: 30, log: createLogger({ level: "silent", pretty: false }) } as unknown as CacheContext;
  const server = createHttpServer(ctx);
  let serverSideClosed!: () => void;
  const serverSide = new Promise<void>((r) => (serverSideClosed = r));
  server.on("connection", (s) => s.on("close", () => serverSideClosed()));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  try {
    await new Promise<void>((resolve, reject) => {
      const sock = connect(port, "127.0.0.1", () => sock.write(`GET /${narUrl(hash, info.narHash)} HTTP/1.1\r\nHost: x\r\n\r\n`));
      sock.once("data", () => {
        sock.destroy(); // hangs up after the first bytes, while the source waits
        resolve();
      });
      sock.on("error", reject);
    });
    await serverSide; // the agent has seen the connection close
    openGate();
    const outcome = await Promise.race([closed, new Promise<string>((r) => setTimeout(() => r("still open after 10 s"), 10_000).unref())]);
    assert.equal(outcome, "closed", "the NAR source (its open file) must be closed when the client is gone");
  } finally {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
  }
});
