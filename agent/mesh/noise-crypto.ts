// The noise encrypter's ChaCha20-Poly1305, with fewer fresh allocations per message than the
// library's default (same cipher, same wire bytes; only where the output lands differs).
//
// @chainsafe/libp2p-noise's Node implementation copies every encrypted message once more
// (Buffer.concat of ciphertext and tag) and every decrypted one when a message arrives in
// pieces. On Node 24 on these VMs each fresh page touched costs a page fault (about 2.7 CPU s
// per GB, see BENCHMARKS.md), so a 64 KiB copy per message is a large share of a stream's cost.
// Here the ciphertext and its tag go out as two pieces of one list (the TCP socket writes them
// one after the other), and a ciphertext that arrived in pieces is fed to the decipher piece by
// piece. Handshake crypto and small messages stay with the library's default.
//
// The encrypter is also the last reader of what a sender hands to stream.send(): yamux and noise
// queue views of the caller's buffer (no copies) until it is encrypted, and nothing reads the
// plaintext after that. releaseWhenEncrypted() lets a sender reuse a buffer from that moment on.
import { createCipheriv, createDecipheriv } from "node:crypto";
import { defaultCrypto } from "@chainsafe/libp2p-noise/crypto";
import type { ICryptoInterface } from "@chainsafe/libp2p-noise";
import { Uint8ArrayList } from "uint8arraylist";

const TAG = 16;

/** On the ArrayBuffer of a chunk handed to a stream: where its bytes end, and whom to tell. */
const PENDING = Symbol("released once encrypted");
type Pending = { end: number; release: () => void };
type Marked = ArrayBufferLike & { [PENDING]?: Pending | undefined };

/** Below this the library's WASM cipher is faster than a Node cipher object (its own threshold). */
const SMALL = 1200;

export const noiseCrypto: ICryptoInterface = {
  ...defaultCrypto,
  chaCha20Poly1305Encrypt(plaintext, nonce, ad, k) {
    const out = encrypt(plaintext, nonce, ad, k);
    encrypted(plaintext);
    return out;
  },
  // The plaintext is always fresh memory, never written into the library's `dst` (a view of the
  // ciphertext): noise-framing.ts reuses the ciphertext's buffer once a message is decrypted.
  chaCha20Poly1305Decrypt(ciphertext, nonce, ad, k) {
    if (ciphertext.byteLength < SMALL) return defaultCrypto.chaCha20Poly1305Decrypt(ciphertext, nonce, ad, k);
    const textLength = ciphertext.byteLength - TAG;
    const decipher = createDecipheriv("chacha20-poly1305", k, nonce, { authTagLength: TAG });
    decipher.setAAD(ad, { plaintextLength: textLength });
    if (ciphertext instanceof Uint8Array) {
      decipher.setAuthTag(ciphertext.subarray(textLength));
      const out = decipher.update(ciphertext.subarray(0, textLength));
      decipher.final(); // throws if the tag does not match: nothing decrypted is returned then
      return out;
    }
    decipher.setAuthTag(ciphertext.subarray(textLength)); // 16 bytes: a copy only if split
    const out = new Uint8ArrayList();
    for (const piece of ciphertext.sublist(0, textLength)) out.append(decipher.update(piece));
    decipher.final();
    return out;
  },
};

function encrypt(plaintext: Uint8Array | Uint8ArrayList, nonce: Uint8Array, ad: Uint8Array, k: Uint8Array): Uint8Array | Uint8ArrayList {
  if (plaintext.byteLength < SMALL) return defaultCrypto.chaCha20Poly1305Encrypt(plaintext, nonce, ad, k);
  const cipher = createCipheriv("chacha20-poly1305", k, nonce, { authTagLength: TAG });
  cipher.setAAD(ad, { plaintextLength: plaintext.byteLength });
  const out = new Uint8ArrayList();
  for (const piece of plaintext instanceof Uint8Array ? [plaintext] : plaintext) out.append(cipher.update(piece));
  const final = cipher.final(); // empty for a stream cipher; kept for form
  if (final.byteLength > 0) out.append(final);
  out.append(cipher.getAuthTag());
  return out;
}

/**
 * Calls `release` once the noise encrypter has read the last byte of `chunk`, which the caller
 * is about to send on a mesh stream (call this first). A stream's bytes are encrypted in order,
 * so by then all of the chunk is; until then yamux or noise may still hold views of it. One
 * chunk per ArrayBuffer at a time. A chunk that is never encrypted (its stream was reset) is
 * never released: it is left to the GC, never handed out twice.
 */
export function releaseWhenEncrypted(chunk: Uint8Array, release: () => void): void {
  (chunk.buffer as Marked)[PENDING] = { end: chunk.byteOffset + chunk.byteLength, release };
}

/** After a message is encrypted: releases the chunks whose last byte was in it. */
function encrypted(plaintext: Uint8Array | Uint8ArrayList): void {
  for (const piece of plaintext instanceof Uint8Array ? [plaintext] : plaintext) {
    const ab = piece.buffer as Marked;
    const pending = ab[PENDING];
    if (pending === undefined || piece.byteOffset + piece.byteLength !== pending.end) continue;
    ab[PENDING] = undefined;
    pending.release();
  }
}
