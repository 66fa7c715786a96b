// nix32 and hash parsing, checked against fixed vectors and against `nix hash`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { decodeNix32, encodeNix32, isNix32, nix32Length } from "../protocol/nix32.js";
import { normalizeHash, parseHash, toBase16Hash, toNix32Hash, toSri } from "../protocol/hash.js";
import { needNix, nix } from "./helpers/nix.js";

// One NAR hash as Nix 2.8 printed it in a narinfo (nix32) and in `nix path-info --json` (SRI).
const VEC_NIX32 = "04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw";
const VEC_SRI = "sha256-HDfQGvQL4ugGkd48w99EN3ppmvuxfGjwgJZLL9Bx/BM=";

test("nix32 lengths: 52 for sha256, 32 for a store path hash", () => {
  assert.equal(nix32Length(32), 52);
  assert.equal(nix32Length(20), 32);
  assert.equal(nix32Length(0), 0);
  assert.equal(encodeNix32(new Uint8Array(32)), "0".repeat(52));
});

test("nix32 round trips random bytes of every length up to 70", () => {
  for (let len = 0; len <= 70; len++) {
    for (let k = 0; k < 5; k++) {
      const bytes = new Uint8Array(randomBytes(len));
      const s = encodeNix32(bytes);
      assert.equal(s.length, nix32Length(len));
      assert.ok(isNix32(s));
      assert.deepEqual(decodeNix32(s, len), bytes);
      assert.deepEqual(decodeNix32(s), bytes);
    }
  }
});

test("nix32 matches a hash printed by Nix, both directions", () => {
  const bytes = parseHash(VEC_SRI);
  assert.equal(encodeNix32(bytes), VEC_NIX32);
  assert.equal(toNix32Hash(bytes), "sha256:" + VEC_NIX32);
  assert.equal(toSri(parseHash("sha256:" + VEC_NIX32)), VEC_SRI);
});

test("nix32 decode rejects foreign characters, wrong lengths and leftover bits", () => {
  const good = VEC_NIX32;
  for (const c of ["e", "o", "u", "t", "A", "-", "é", " "]) {
    assert.throws(() => decodeNix32(c + good.slice(1), 32), /bad character/, c);
    assert.throws(() => decodeNix32(good.slice(0, 20) + c + good.slice(21), 32), /bad character/, c);
  }
  assert.throws(() => decodeNix32(good.slice(1), 32), /length/);
  assert.throws(() => decodeNix32(good + "0", 32), /length/);
  assert.throws(() => decodeNix32(good, 31), /length/);
  assert.throws(() => decodeNix32("0".repeat(51)), /length/); // 51 chars encode no whole byte count
  // 52 chars carry 260 bits for 256: the first character may only be 0 or 1.
  assert.deepEqual(decodeNix32("1" + good.slice(1), 32).length, 32);
  for (const c of ["2", "9", "z"]) assert.throws(() => decodeNix32(c + good.slice(1), 32), /non-zero bits/);
});

test("nix32 agrees with `nix hash to-base32` / `to-base16` on random hashes", async (t) => {
  if (!(await needNix(t))) return;
  const sha256 = Array.from({ length: 8 }, () => randomBytes(32));
  const sha1 = Array.from({ length: 4 }, () => randomBytes(20)); // store path hash parts are 20 bytes
  const nix256 = (await nix(["hash", "to-base32", "--type", "sha256", ...sha256.map((b) => b.toString("hex"))])).trim().split("\n");
  const nix160 = (await nix(["hash", "to-base32", "--type", "sha1", ...sha1.map((b) => b.toString("hex"))])).trim().split("\n");
  assert.deepEqual(nix256, sha256.map((b) => encodeNix32(b)));
  assert.deepEqual(nix160, sha1.map((b) => encodeNix32(b)));
  assert.ok(nix160.every((s) => s.length === 32));
  const back = (await nix(["hash", "to-base16", "--type", "sha256", ...sha256.map((b) => encodeNix32(b))])).trim().split("\n");
  assert.deepEqual(back, sha256.map((b) => b.toString("hex")));
  assert.deepEqual(sha256.map((b) => Buffer.from(decodeNix32(nix256[sha256.indexOf(b)]!, 32))), sha256);
  const sri = (await nix(["hash", "to-sri", "--type", "sha256", ...nix256])).trim().split("\n");
  assert.deepEqual(sri, sha256.map((b) => toSri(b)));
});

test("parseHash accepts every form Nix uses for sha256, all to the same bytes", () => {
  const bytes = parseHash(VEC_SRI);
  const hex = Buffer.from(bytes).toString("hex");
  const b64 = Buffer.from(bytes).toString("base64");
  for (const form of [`sha256:${hex}`, `sha256:${hex.toUpperCase()}`, `sha256:${VEC_NIX32}`, `sha256:${b64}`, `sha256-${b64}`]) {
    assert.deepEqual(parseHash(form), bytes, form);
    assert.equal(normalizeHash(form), "sha256:" + VEC_NIX32);
  }
  assert.equal(toBase16Hash(bytes), `sha256:${hex}`);
  assert.throws(() => toNix32Hash(new Uint8Array(31)), /32 bytes/);
});

test("parseHash rejects other types, bare hashes and malformed bodies", () => {
  const bytes = parseHash(VEC_SRI);
  const hex = Buffer.from(bytes).toString("hex");
  const b64 = Buffer.from(bytes).toString("base64");
  const bad: [string, RegExp][] = [
    [hex, /invalid hash/],
    [VEC_NIX32, /invalid hash/],
    [`md5:${hex.slice(0, 32)}`, /unsupported hash type "md5"/],
    [`sha512:${hex}${hex}`, /unsupported hash type "sha512"/],
    [`SHA256:${hex}`, /invalid hash/],
    [`sha256:${hex.slice(1)}`, /invalid hash/],
    [`sha256:${hex}0`, /invalid hash/],
    [`sha256:${hex.slice(1)}g`, /invalid hash/],
    [`sha256:e${VEC_NIX32.slice(1)}`, /bad character/],
    [`sha256:z${VEC_NIX32.slice(1)}`, /non-zero bits/],
    [`sha256-${b64.slice(0, 42)}B=`, /invalid SRI/], // non-canonical: stray low bits
    [`sha256-${b64.slice(0, 43)}`, /invalid SRI/], // no padding
    [`sha256-${b64} `, /invalid SRI/],
    [`sha256:${hex}\n`, /invalid hash/],
    ["sha256:", /invalid hash/],
    ["", /invalid hash/],
    [`sha256:${"0".repeat(100000)}`, /invalid hash/],
  ];
  for (const [s, re] of bad) assert.throws(() => parseHash(s), re, s.slice(0, 90));
});
