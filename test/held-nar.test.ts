// HeldNar: what FleetSource holds back of a peer's NAR until verified, in memory and then in an
// unlinked temporary file that must not outlive the request.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readdirSync, readFileSync, readlinkSync } from "node:fs";
import { tmpdir } from "node:os";
import { HeldNar } from "../agent/mesh/held-nar.js";
import { BufferPool } from "../agent/buffer-pool.js";

/** Spool files this process has open (unlinked: no other way to see them). */
function openSpools(): number {
  let n = 0;
  for (const fd of readdirSync("/proc/self/fd")) {
    try {
      if (/fleetcache-nar-/.test(readlinkSync(`/proc/self/fd/${fd}`))) n++;
    } catch {
      // closed meanwhile
    }
  }
  return n;
}

async function all(it: AsyncIterable<Buffer>): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const b of it) out.push(Buffer.from(b));
  return Buffer.concat(out);
}

test("spooling: nothing flows while held, everything comes back in order, and the file is gone after", async () => {
  const data = randomBytes(3 << 20);
  const held = new HeldNar(64 << 10, true);
  for (let o = 0; o < data.length; o += 50_000) assert.deepEqual(await held.push(data.subarray(o, o + 50_000)), [], "nothing flows");
  assert.equal(held.size, data.length);
  assert.equal(openSpools(), 1, "past the memory limit, a spool file");
  assert.ok((await all(held.drain())).equals(data));
  assert.equal(openSpools(), 0, "closed after the drain");
});

test("pooled chunks go back to the pool once in the spool file, and the file is read back into pooled buffers", async (t) => {
  const pool = new BufferPool(64 << 20);
  const data = randomBytes(12 << 20);
  const held = new HeldNar(1 << 20, true, tmpdir(), pool);
  t.after(() => held.discard()); // its file closed even if an assertion fails first
  // As a bulk body's chunks come (bulk-client.ts); all taken first, so none is a reused one.
  const chunks = Array.from({ length: 12 }, (_, i) => {
    const chunk = pool.acquire(1 << 20);
    data.copy(chunk, 0, i << 20, (i + 1) << 20);
    return chunk;
  });
  for (const chunk of chunks) await held.push(chunk);
  // All but the memory's first MiB and the last batch waiting to be written went to the file.
  assert.equal(pool.freeBytes, 10 << 20, "the chunks written to the file are back in the pool");
  const out: Buffer[] = [];
  for await (const b of held.drain()) out.push(b);
  assert.ok(Buffer.concat(out).equals(data), "everything comes back in order");
  // As the HTTP response does once it has written them: every one is the pool's (release ignores others).
  let pooled = 0;
  for (const b of out) {
    const free = pool.freeBytes;
    pool.release(b);
    if (pool.freeBytes > free) pooled++;
  }
  assert.equal(pooled, out.length, "the read-back buffers are the pool's too");
});

test("a discarded spool (a wrong NAR, a client gone) closes its file", async () => {
  const held = new HeldNar(1024, true);
  for (let i = 0; i < 3; i++) await held.push(randomBytes(1 << 20)); // past the first batch: the file is open
  assert.equal(openSpools(), 1);
  await held.discard();
  assert.equal(openSpools(), 0);
  assert.equal(held.size, 0);
});

test("without a spool, all but the last chunk past the memory limit flow on", async () => {
  const held = new HeldNar(1000, false);
  const flowed: Buffer[] = [];
  for (let i = 0; i < 5; i++) flowed.push(...(await held.push(Buffer.alloc(600, i))));
  assert.ok(flowed.length > 0 && held.size <= 1000 + 600, `held ${held.size} bytes`);
  const rest = await all(held.drain());
  assert.equal(Buffer.concat(flowed).length + rest.length, 3000);
  assert.equal(openSpools(), 0, "no file without a spool");
});

/** Write system calls this process has made so far (all its threads: the file writes run in libuv's pool). */
function writeCalls(): number {
  return Number(/^syscw: (\d+)$/m.exec(readFileSync("/proc/self/io", "utf8"))![1]);
}

test("small chunks bound for the spool file are written in batches, not a write each", async () => {
  const data = randomBytes(4 << 20);
  const held = new HeldNar(64 << 10, true);
  const before = writeCalls();
  for (let o = 0; o < data.length; o += 2048) await held.push(data.subarray(o, o + 2048)); // a slow link's reads
  const writes = writeCalls() - before;
  assert.ok(writes < 64, `${writes} write calls for ${data.length / 2048} chunks`);
  assert.equal(held.size, data.length);
  assert.ok((await all(held.drain())).equals(data), "all of it back, in order");
  assert.equal(openSpools(), 0);
});

test("without a spool, many small chunks flow on in order and the last stays held", async () => {
  const data = randomBytes(1 << 20);
  const held = new HeldNar(256 << 10, false);
  const flowed: Buffer[] = [];
  for (let o = 0; o < data.length; o += 100) flowed.push(...(await held.push(data.subarray(o, o + 100))));
  assert.ok(held.size <= (256 << 10) + 100 && held.size >= 100, `held ${held.size} bytes`);
  assert.ok(Buffer.concat([...flowed, await all(held.drain())]).equals(data));
});
