// Memory per NAR client: reads from the store follow the client's pace, so a slow client holds a
// small read, never a 1 MiB one (500 slow clients used to hold 700 MiB).
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { connect, type AddressInfo } from "node:net";
import { join } from "node:path";
import { createHttpServer } from "../agent/http/server.js";
import type { CacheContext } from "../agent/http/cache-routes.js";
import { MAX_READ, MIN_READ, ReadPace } from "../agent/http/read-pace.js";
import { createLogger } from "../agent/log.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import type { PathInfo } from "../protocol/path-info.js";
import { narUrl } from "../protocol/nar-url.js";
import { addToStore, needNix, tempDir } from "./helpers/nix.js";

/** A clock the test moves by hand. */
function clock(): { now: () => number; advance: (ms: number) => void } {
  let t = 0;
  return { now: () => t, advance: (ms) => void (t += ms) };
}

test("ReadPace: a client taking 64 KiB/s keeps 64 KiB reads, however long it runs", () => {
  const c = clock();
  const pace = new ReadPace(c.now);
  for (let i = 0; i < 1000; i++) {
    c.advance(1000);
    pace.took(64 << 10);
    assert.equal(pace.size, MIN_READ);
  }
});

test("ReadPace: a fast client reaches the largest reads (256 KiB) after 8 MiB, doubling at most once per 50 ms", () => {
  const c = clock();
  const pace = new ReadPace(c.now);
  const sizes: number[] = [];
  for (let i = 0; i < 400; i++) {
    c.advance(1);
    pace.took(pace.size); // 64 KiB/ms and more: far faster than any read size needs
    if (sizes.at(-1) !== pace.size) sizes.push(pace.size);
  }
  assert.deepEqual(sizes, [64, 128, 256].map((k) => k << 10));
  assert.equal(pace.size, MAX_READ);
});

test("ReadPace: a burst the kernel's buffers absorb does not make a slow client look fast; a client that slows down gets small reads again", () => {
  const c = clock();
  const pace = new ReadPace(c.now);
  for (let i = 0; i < 64; i++) {
    c.advance(0.5);
    pace.took(64 << 10); // 4 MiB in 32 ms: socket buffers filling
  }
  for (let i = 0; i < 100; i++) {
    c.advance(1000);
    pace.took(64 << 10);
    assert.equal(pace.size, MIN_READ, "still small after the burst");
  }
  const fast = new ReadPace(c.now);
  for (let i = 0; i < 1000; i++) {
    c.advance(1);
    fast.took(fast.size);
  }
  assert.equal(fast.size, MAX_READ);
  c.advance(16_000);
  fast.took(MAX_READ); // then 256 KiB took 16 s
  assert.equal(fast.size, MIN_READ);
});

test("a slow HTTP client's NAR is read from the store 64 KiB at a time, not 1 MiB", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  const root = join(tmp.dir, "store");
  writeFileSync(join(tmp.dir, "big.bin"), randomBytes(24 << 20));
  const path = await addToStore(root, join(tmp.dir, "big.bin"));
  const local = new LocalStore(root, new Signer([]));
  // The real store, watched: every read it hands out is recorded.
  const reads: number[] = [];
  const source = {
    pathInfo: (h: string) => local.pathInfo(h),
    async *narStream(info: PathInfo, start: number, end: number, readSize?: () => number) {
      for await (const chunk of local.narStream(info, start, end, readSize)) {
        reads.push(chunk.length);
        yield chunk;
      }
    },
  };
  const ctx = { source, local, priority: 30, log: createLogger({ level: "silent", pretty: false }) } as unknown as CacheContext;
  const server = createHttpServer(ctx);
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  try {
    const info = (await local.pathInfo(path.slice(11, 43)))!;
    // A client that takes 3 MiB at 512 KiB/s (64 KiB in 125 ms), then hangs up.
    const received = await new Promise<number>((resolve, reject) => {
      const sock = connect(port, "127.0.0.1", () => sock.write(`GET /${narUrl(path.slice(11, 43), info.narHash)} HTTP/1.1\r\nHost: x\r\n\r\n`));
      const started = Date.now();
      let got = 0;
      sock.on("data", (d: Buffer) => {
        got += d.length;
        if (got >= 3 << 20) {
          sock.destroy();
          resolve(got);
          return;
        }
        const ahead = got / (512 << 10) - (Date.now() - started) / 1000;
        if (ahead > 0) {
          sock.pause();
          setTimeout(() => sock.resume(), ahead * 1000);
        }
      });
      sock.on("error", reject);
    });
    assert.ok(received >= 3 << 20);
    assert.ok(reads.length > 0);
    assert.ok(Math.max(...reads) <= MIN_READ, `largest read ${Math.max(...reads)} bytes`);
  } finally {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    local.close();
    tmp.cleanup();
  }
});
