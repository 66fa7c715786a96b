// The NAR responder reads into reused buffers (agent/buffer-pool.ts) and gives each back once
// noise has encrypted it (releaseWhenEncrypted in agent/mesh/noise-crypto.ts). Given back
// earlier, a read for another transfer overwrites bytes still queued (as views, not copies) in
// yamux or noise for a reader that is slow: that reader's NAR comes out wrong. These tests catch
// that, end to end and at the encrypter.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pino } from "pino";
import { Uint8ArrayList } from "uint8arraylist";
import { generateKeyPair } from "../protocol/keys.js";
import { storePathHashPart } from "../protocol/store-path.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { NarVerifier, openNar, serveNar } from "../agent/mesh/nar-service.js";
import { noiseCrypto, releaseWhenEncrypted } from "../agent/mesh/noise-crypto.js";
import { narBuffers } from "../agent/buffer-pool.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { addToStore, needNix, tempDir } from "./helpers/nix.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: "silent" });

test("encrypter: a chunk is released once, after the message holding its last byte is encrypted", () => {
  const k = randomBytes(32);
  const ad = new Uint8Array(0);
  const nonce = new Uint8Array(12);
  const chunk = randomBytes(100_000);
  let released = 0;
  releaseWhenEncrypted(chunk, () => released++);
  const other = randomBytes(70_000); // another buffer in the same messages: no effect
  // As noise cuts a yamux frame: a header, then the chunk in messages of up to 65,519 bytes.
  noiseCrypto.chaCha20Poly1305Encrypt(new Uint8ArrayList(randomBytes(12), chunk.subarray(0, 65_507)), nonce, ad, k);
  assert.equal(released, 0, "its first part is encrypted, the rest still queued");
  noiseCrypto.chaCha20Poly1305Encrypt(new Uint8ArrayList(chunk.subarray(65_507, 99_000), other.subarray(0, 30_000)), nonce, ad, k);
  assert.equal(released, 0, "a piece that stops short of its end");
  noiseCrypto.chaCha20Poly1305Encrypt(new Uint8ArrayList(chunk.subarray(99_000), other.subarray(30_000)), nonce, ad, k);
  assert.equal(released, 1, "released with its last byte (a small message: the library's cipher)");
  noiseCrypto.chaCha20Poly1305Encrypt(chunk, nonce, ad, k);
  assert.equal(released, 1, "only once");
  // A whole buffer sent as one message.
  const whole = randomBytes(65_519);
  releaseWhenEncrypted(whole, () => released++);
  noiseCrypto.chaCha20Poly1305Encrypt(whole, nonce, ad, k);
  assert.equal(released, 2);
});

/** Takes every free buffer from the NAR pool and fills it with other bytes (never gives them back). */
function scribbleOverPool(): void {
  for (let size = 64 << 10; size <= 1 << 20; size *= 2) {
    for (;;) {
      const before = narBuffers.freeBytes;
      const buf = narBuffers.acquire(size);
      if (narBuffers.freeBytes === before) break; // a fresh one: none of this size left
      buf.fill(0xee);
    }
  }
  assert.equal(narBuffers.freeBytes, 0);
}

test("a slow reader's NAR stays intact while other transfers from the same holder reuse the pool", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir("fleetcache-mesh-nar-pool-");
  const root = join(tmp.dir, "store");
  // X: small files (gathered with their framing into pooled buffers) and a larger one; Y: one file.
  const treeX = join(tmp.dir, "x");
  mkdirSync(treeX);
  for (let i = 0; i < 200; i++) writeFileSync(join(treeX, `f${i}`), randomBytes(1000 + ((i * 7919) % 30_000)));
  writeFileSync(join(treeX, "big"), randomBytes(6 << 20));
  const fileY = join(tmp.dir, "y");
  writeFileSync(fileY, randomBytes(12 << 20));
  const [pathX, pathY] = [await addToStore(root, treeX), await addToStore(root, fileY)];
  const local = new LocalStore(root, new Signer([]));
  const [ka, kb] = [generateKeyPair("pool-a-1"), generateKeyPair("pool-b-1")];
  const nodes: MeshNode[] = [];
  try {
    const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
    nodes.push(a);
    const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
    nodes.push(b);
    await serveNar(a, local, log);
    await connectBoth(b, a);
    const aId = a.peerId.toString();
    const request = async (storePath: string) => {
      const info = (await local.pathInfo(storePathHashPart(storePath)))!;
      return { hashPart: storePathHashPart(storePath), narHash: info.narHash, narSize: info.narSize, offset: 0 };
    };
    const [reqX, reqY] = [await request(pathX), await request(pathY)];

    // Three readers of X take one chunk each, then stall: the holder's windows fill, and chunks
    // of X wait in its yamux queues, unencrypted...
    const stalled = await Promise.all([0, 1, 2].map(async () => {
      const it = (await openNar(b, aId, reqX))[Symbol.asyncIterator]();
      const first = await it.next();
      assert.ok(!first.done);
      const verifier = new NarVerifier(reqX.narHash, reqX.narSize);
      verifier.update(first.value);
      return { it, verifier };
    }));
    await new Promise((r) => setTimeout(r, 500));
    // ...while every buffer in the pool is taken and written over (the pool hands out the last
    // one given back first, so other transfers alone might never reach one given back early)...
    assert.ok(narBuffers.freeBytes > 0, "the holder gave buffers back to the pool");
    scribbleOverPool();
    // ...and Y is fetched whole, again and again, read into buffers from the same pool.
    for (let i = 0; i < 4; i++) {
      const verifier = new NarVerifier(reqY.narHash, reqY.narSize);
      for await (const c of await openNar(b, aId, reqY)) verifier.update(c);
      verifier.finish(); // throws on a wrong byte
    }
    for (const [i, { it, verifier }] of stalled.entries()) {
      for (let r = await it.next(); !r.done; r = await it.next()) verifier.update(r.value);
      assert.doesNotThrow(() => verifier.finish(), `stalled reader ${i}`);
    }
  } finally {
    await Promise.allSettled(nodes.map((n) => n.stop()));
    local.close();
    tmp.cleanup();
  }
});
