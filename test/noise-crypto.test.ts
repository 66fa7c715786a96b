// The mesh's ChaCha20-Poly1305 for noise (agent/mesh/noise-crypto.ts) must be byte-for-byte the
// library's: same ciphertext and tag for the same key, nonce and data, whether the data comes as
// one buffer or in pieces, and a tampered message must fail whole.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { defaultCrypto } from "@chainsafe/libp2p-noise/crypto";
import { Uint8ArrayList } from "uint8arraylist";
import { noiseCrypto } from "../agent/mesh/noise-crypto.js";

const bytes = (x: Uint8Array | Uint8ArrayList) => Buffer.from(x instanceof Uint8Array ? x : x.subarray());
/** The same bytes as a list of uneven pieces, as a message spanning socket reads arrives. */
const pieces = (b: Uint8Array, cuts: number[]) => new Uint8ArrayList(...[0, ...cuts].map((c, i, a) => b.subarray(c, a[i + 1] ?? b.length)));

test("noise cipher: the library's ciphertext, for whole and split messages, small and large", () => {
  const k = randomBytes(32);
  const nonce = randomBytes(12);
  const ad = randomBytes(32);
  for (const size of [0, 100, 1199, 1200, 4096, 65519]) {
    const plain = randomBytes(size);
    const theirs = bytes(defaultCrypto.chaCha20Poly1305Encrypt(plain, nonce, ad, k));
    assert.deepEqual(bytes(noiseCrypto.chaCha20Poly1305Encrypt(plain, nonce, ad, k)), theirs, `encrypt ${size}`);
    if (size > 10) assert.deepEqual(bytes(noiseCrypto.chaCha20Poly1305Encrypt(pieces(plain, [1, size >> 1]), nonce, ad, k)), theirs, `encrypt ${size} in pieces`);
    assert.deepEqual(bytes(noiseCrypto.chaCha20Poly1305Decrypt(theirs, nonce, ad, k)), plain, `decrypt ${size}`);
    // Split inside the text and inside the tag.
    const cuts = size > 10 ? [3, size >> 1, size + 7] : [size + 7];
    assert.deepEqual(bytes(noiseCrypto.chaCha20Poly1305Decrypt(pieces(theirs, cuts), nonce, ad, k)), plain, `decrypt ${size} in pieces`);
  }
});

test("noise cipher: a flipped bit in the text, the tag or the associated data fails the message", () => {
  const k = randomBytes(32);
  const nonce = randomBytes(12);
  const ad = randomBytes(32);
  const plain = randomBytes(65519);
  const sealed = bytes(noiseCrypto.chaCha20Poly1305Encrypt(plain, nonce, ad, k));
  for (const at of [0, 40_000, sealed.length - 1]) {
    const bad = Buffer.from(sealed);
    bad[at] = bad[at]! ^ 1;
    assert.throws(() => noiseCrypto.chaCha20Poly1305Decrypt(bad, nonce, ad, k), `byte ${at}`);
    assert.throws(() => noiseCrypto.chaCha20Poly1305Decrypt(pieces(bad, [5, 30_000]), nonce, ad, k), `byte ${at}, in pieces`);
  }
  const otherAd = Buffer.from(ad);
  otherAd[0] = otherAd[0]! ^ 1;
  assert.throws(() => noiseCrypto.chaCha20Poly1305Decrypt(sealed, nonce, otherAd, k));
});

test("noise cipher: the plaintext is fresh memory, never the library's dst (noise-framing.ts reuses the ciphertext's buffer)", () => {
  const k = randomBytes(32);
  const nonce = randomBytes(12);
  const ad = randomBytes(32);
  for (const size of [100, 65519]) {
    const plain = randomBytes(size);
    const sealed = Buffer.from(bytes(noiseCrypto.chaCha20Poly1305Encrypt(plain, nonce, ad, k)));
    const dst = sealed.subarray(0, size); // what the library passes: the ciphertext's own bytes
    const out = noiseCrypto.chaCha20Poly1305Decrypt(sealed, nonce, ad, k, dst); // not copied here
    sealed.fill(0); // the buffer reused for the next message
    assert.deepEqual(bytes(out), plain, `${size}: the plaintext must not change with the ciphertext's buffer`);
  }
});
