// Signing keys and signatures, interoperating with Nix's key files and `nix store sign`.
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  formatPublicKey,
  formatSecretKey,
  generateKeyPair,
  parsePublicKey,
  parseSecretKey,
  sign,
  verify,
  Verifier,
  type SecretKey,
} from "../protocol/keys.js";
import * as ed from "@noble/ed25519";
import { fingerprint } from "../protocol/narinfo.js";
import { plainAndBuiltPaths } from "./helpers/fixtures.js";
import { needNix, nix, pathInfo, run, tempDir, toPathInfo } from "./helpers/nix.js";

// RFC 8032 section 7.1, test 1 (empty message).
const RFC_SEED = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
const RFC_PUB = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";
const RFC_SIG =
  "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b";

const hex = (s: string) => new Uint8Array(Buffer.from(s, "hex"));
const b64 = (b: Uint8Array) => Buffer.from(b).toString("base64");


/** `sig` with one bit flipped (bit `bit` of the 64 signature bytes). */
function flipBit(sig: string, bit: number): string {
  const colon = sig.indexOf(":");
  const bytes = Buffer.from(sig.slice(colon + 1), "base64");
  bytes[bit >> 3]! ^= 1 << (bit & 7);
  return `${sig.slice(0, colon)}:${bytes.toString("base64")}`;
}

async function nixSign(root: string, keyFile: string, paths: string[]): Promise<void> {
  await nix(["store", "sign", "--store", root, "--key-file", keyFile, ...paths]);
}

test("RFC 8032 test vector: our key and signature formats carry the exact Ed25519 values", () => {
  const text = `rfc:${b64(Buffer.concat([hex(RFC_SEED), hex(RFC_PUB)]))}`;
  const key = parseSecretKey(text);
  assert.deepEqual(key.publicKey, hex(RFC_PUB));
  assert.equal(formatSecretKey(key), text);
  assert.equal(formatPublicKey(key), `rfc:${b64(hex(RFC_PUB))}`);
  assert.equal(sign(key, ""), `rfc:${b64(hex(RFC_SIG))}`);
  assert.ok(verify([parsePublicKey(formatPublicKey(key))], "", `rfc:${b64(hex(RFC_SIG))}`));
});

test("generated keys round trip through their text forms and sign verifiably", () => {
  const key = generateKeyPair("host-a.example-1");
  const again = parseSecretKey(formatSecretKey(key));
  assert.deepEqual(again, key);
  const pub = parsePublicKey(formatPublicKey(key));
  assert.deepEqual(pub, { name: key.name, publicKey: key.publicKey });
  assert.notDeepEqual(generateKeyPair("x").seed, generateKeyPair("x").seed);
  const fp = "1;/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f;sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;";
  const sig = sign(key, fp);
  assert.match(sig, /^host-a\.example-1:[A-Za-z0-9+/]{86}==$/);
  assert.equal(sign(key, fp), sig, "Ed25519 is deterministic");
  assert.ok(verify([pub], fp, sig));
  assert.equal(verify([pub], fp + "x", sig), false);
  assert.equal(verify([pub], fp.replace("120", "121"), sig), false);
  // Same key bytes under another name, and another key under the same name: both refused.
  assert.equal(verify([{ name: "other", publicKey: key.publicKey }], fp, sig), false);
  const other = generateKeyPair(key.name);
  assert.equal(verify([other], fp, sig), false);
  assert.ok(verify([other, pub], fp, sig), "any listed key of that name may match");
});

test("verify returns false (never throws) on malformed signatures", () => {
  const key = generateKeyPair("k");
  const fp = "1;x";
  const good = sign(key, fp);
  const body = good.slice(2);
  for (const bad of ["", "k", "k:", ":" + body, "k:" + body.slice(4), "k:" + body + "AAAA", "k:" + body.replace("==", ""), "k:" + body.slice(0, 85) + "B==", "k: " + body, "k:" + "A".repeat(86) + "==", "k:" + "/".repeat(85) + "w=="]) {
    assert.equal(verify([key], fp, bad), false, bad);
  }
  assert.equal(verify([{ name: "k", publicKey: new Uint8Array(32).fill(255) }], fp, good), false);
  assert.equal(verify([], fp, good), false);
});

test("key parsing rejects bad names, lengths, encodings and mismatched halves", () => {
  const key = generateKeyPair("k");
  const secB64 = formatSecretKey(key).slice(2);
  const pubB64 = formatPublicKey(key).slice(2);
  const mismatched = b64(Buffer.concat([key.seed, generateKeyPair("k").publicKey]));
  assert.throws(() => parseSecretKey(`k:${mismatched}`), /does not match its seed/);
  for (const bad of [secB64, `:${secB64}`, `a b:${secB64}`, `a\t:${secB64}`, `k:${pubB64}`, `k:${secB64.slice(0, -4)}`, `k:${secB64} `, `k:${secB64}\n`, `k:${secB64.replace("==", "")}`]) {
    assert.throws(() => parseSecretKey(bad), /invalid (secret key|key name)/, bad);
  }
  for (const bad of [pubB64, `:${pubB64}`, `k:${secB64}`, `k:${pubB64.slice(0, 43)}`, `k:${pubB64.slice(0, 42)}B=`, "k:"]) {
    assert.throws(() => parsePublicKey(bad), /invalid (public key|key name)/, bad);
  }
  for (const name of ["", "a:b", "a b", "a\n", "a\0"]) assert.throws(() => generateKeyPair(name), /invalid key name/, JSON.stringify(name));
});

test("Nix-generated key: we parse it, and our signature equals the one `nix store sign` stores", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir();
  try {
    const sec = join(dir, "nix.sec");
    const pub = join(dir, "nix.pub");
    await run("nix-store", ["--generate-binary-cache-key", "nix-made-1", sec, pub]);
    const secText = readFileSync(sec, "utf8");
    const pubText = readFileSync(pub, "utf8");
    const key = parseSecretKey(secText);
    assert.equal(key.name, "nix-made-1");
    assert.equal(formatSecretKey(key), secText);
    assert.equal(formatPublicKey(key), pubText);
    const pubKey = parsePublicKey(pubText);

    const { root, paths } = await plainAndBuiltPaths(dir);
    await nixSign(root, sec, paths);
    const infos = await pathInfo(root, paths);
    assert.equal(infos.length, 2);
    assert.equal(infos[1]!.references.length, 3, "the built path refers to two deps and itself");
    for (const j of infos) {
      const nixSigs = (j.signatures ?? []).filter((s) => s.startsWith("nix-made-1:"));
      assert.equal(nixSigs.length, 1, j.path);
      const fp = fingerprint(toPathInfo(j));
      assert.equal(sign(key, fp), nixSigs[0], `signature of ${j.path}`);
      assert.ok(verify([pubKey], fp, nixSigs[0]!));
      assert.equal(verify([pubKey], fp.replace(/;\d+;/, ";1;"), nixSigs[0]!), false);
    }
  } finally {
    cleanup();
  }
});

test("our generated key works in Nix: `nix store sign` with it gives our signature, which we and Nix verify", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir();
  try {
    const key: SecretKey = generateKeyPair("fleetcache-test-1");
    const sec = join(dir, "ours.sec");
    writeFileSync(sec, formatSecretKey(key), { mode: 0o600 });
    const { root, paths } = await plainAndBuiltPaths(dir);
    await nixSign(root, sec, paths);
    for (const j of await pathInfo(root, paths)) {
      const sigs = (j.signatures ?? []).filter((s) => s.startsWith("fleetcache-test-1:"));
      assert.equal(sigs.length, 1);
      const fp = fingerprint(toPathInfo(j));
      assert.equal(sigs[0], sign(key, fp));
      assert.ok(verify([parsePublicKey(formatPublicKey(key))], fp, sigs[0]!));
    }
    // Nix accepts our public key text as a trusted key, and refuses a different one.
    const verifyWith = (pubText: string) =>
      nix(["store", "verify", "--store", root, "--sigs-needed", "1", "--option", "trusted-public-keys", pubText, ...paths]);
    await verifyWith(formatPublicKey(key));
    await assert.rejects(verifyWith(formatPublicKey(generateKeyPair("fleetcache-test-1"))), /untrusted/);
  } finally {
    cleanup();
  }
});

// The agent verifies with node:crypto (Verifier); Nix signs and checks with libsodium. Keys from
// `nix-store --generate-binary-cache-key`, signatures from `nix store sign`.
test("Verifier: Nix's keys and `nix store sign` signatures verify; a flipped bit, another key or malformed input fail without a throw", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir();
  try {
    const keyFiles = async (name: string, tag: string) => {
      await run("nix-store", ["--generate-binary-cache-key", name, join(dir, `${tag}.sec`), join(dir, `${tag}.pub`)]);
      return { sec: join(dir, `${tag}.sec`), pub: parsePublicKey(readFileSync(join(dir, `${tag}.pub`), "utf8")) };
    };
    const nixKey = await keyFiles("nix-made-1", "a");
    const sameName = await keyFiles("nix-made-1", "b"); // another key under the same name
    const otherName = await keyFiles("other-1", "c");
    const { root, paths } = await plainAndBuiltPaths(dir);
    await nixSign(root, nixKey.sec, paths);
    const v = new Verifier([nixKey.pub]);
    assert.equal(v.size, 1);
    let checked = 0;
    for (const j of await pathInfo(root, paths)) {
      const sig = (j.signatures ?? []).find((s) => s.startsWith("nix-made-1:"))!;
      const fp = fingerprint(toPathInfo(j));
      assert.ok(v.verify(fp, sig), j.path);
      assert.equal(v.verify(fp, sig), ed.verify(Buffer.from(sig.slice(11), "base64"), Buffer.from(fp), nixKey.pub.publicKey), "agrees with @noble");
      // Every bit of the signature counts (R and S halves), and every byte of the fingerprint.
      for (let bit = 0; bit < 512; bit++) assert.equal(v.verify(fp, flipBit(sig, bit)), false, `bit ${bit} flipped`);
      for (let i = 0; i < fp.length; i++) {
        const c = fp.charCodeAt(i) ^ 1;
        assert.equal(v.verify(fp.slice(0, i) + String.fromCharCode(c) + fp.slice(i + 1), sig), false, `fingerprint byte ${i}`);
      }
      assert.equal(new Verifier([sameName.pub]).verify(fp, sig), false, "another key of the same name");
      assert.equal(new Verifier([{ name: "nix-made-1", publicKey: otherName.pub.publicKey }]).verify(fp, sig), false);
      assert.equal(new Verifier([{ name: "other-1", publicKey: nixKey.pub.publicKey }]).verify(fp, sig), false, "the right bytes under another name");
      assert.ok(new Verifier([sameName.pub, otherName.pub, nixKey.pub]).verify(fp, sig), "any key of that name may match");
      assert.equal(new Verifier([]).verify(fp, sig), false);
      checked++;
    }
    assert.equal(checked, 2);
  } finally {
    cleanup();
  }
});

test("Verifier: malformed keys are left out and malformed signatures refused, never a throw; S + L is refused as libsodium does", () => {
  const key = generateKeyPair("k");
  const fp = "1;/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f;sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw;120;";
  const good = sign(key, fp);
  // Keys that are no keys: 31 and 33 bytes (not importable: left out), 32 bytes off the curve or
  // of small order (importable, verify nothing).
  const junk = [new Uint8Array(31), new Uint8Array(33), new Uint8Array(32).fill(255), new Uint8Array(32), Uint8Array.from([1, ...new Uint8Array(31)])];
  const v = new Verifier([...junk.map((publicKey) => ({ name: "k", publicKey })), key]);
  assert.equal(v.size, 4, "the 31- and 33-byte keys are left out");
  assert.ok(v.verify(fp, good), "the real key among junk still verifies");
  for (const publicKey of junk) assert.equal(new Verifier([{ name: "k", publicKey }]).verify(fp, good), false);
  const body = good.slice(2);
  for (const bad of ["", "k", "k:", ":" + body, "k:" + body.slice(4), "k:" + body + "AAAA", "k:" + body.replace("==", ""), "k:" + body.slice(0, 85) + "B==", "k: " + body, "k:" + "A".repeat(86) + "==", "k:" + "/".repeat(85) + "w==", "k:" + body + "\n", "\u0000:" + body]) {
    assert.equal(v.verify(fp, bad), false, JSON.stringify(bad));
  }
  // Ed25519's malleability: S + L (the group order) is the same point arithmetic; RFC 8032 and
  // libsodium refuse S >= L, so must we (else one signature has two valid encodings).
  const L = (1n << 252n) + 27742317777372353535851937790883648493n;
  const bytes = Buffer.from(body, "base64");
  let s = 0n;
  for (let i = 31; i >= 0; i--) s = (s << 8n) | BigInt(bytes[32 + i]!);
  let sl = s + L;
  for (let i = 0; i < 32; i++, sl >>= 8n) bytes[32 + i] = Number(sl & 255n);
  assert.ok(s + L < 1n << 256n);
  assert.equal(v.verify(fp, `k:${bytes.toString("base64")}`), false);
});

test("Verifier agrees with @noble/ed25519 (RFC 8032 rules) on valid and tampered signatures", () => {
  for (let i = 0; i < 50; i++) {
    const key = generateKeyPair(`k${i}`);
    const fp = `1;/nix/store/${"a".repeat(32)}-p${i};sha256:${"1".repeat(52)};${i};`;
    const sig = sign(key, fp);
    const tampered = flipBit(sig, (i * 37) % 512);
    for (const s of [sig, tampered]) {
      const raw = Buffer.from(s.slice(s.indexOf(":") + 1), "base64");
      let noble: boolean;
      try {
        noble = ed.verify(raw, Buffer.from(fp), key.publicKey, { zip215: false });
      } catch {
        noble = false;
      }
      assert.equal(new Verifier([key]).verify(fp, s), noble, `${i} ${s === sig ? "valid" : "tampered"}`);
    }
  }
});

test("sign (OpenSSL) gives the bytes RFC 8032 Ed25519 gives (@noble/ed25519), for many keys and fingerprints", () => {
  for (let i = 0; i < 200; i++) {
    const key = generateKeyPair(`k-${i}`);
    const fp = `1;/nix/store/${"x".repeat(32)}-p${i};sha256:${"0".repeat(52)};${i * 977};${"/nix/store/r,".repeat(i % 7)}`;
    const expected = `k-${i}:${Buffer.from(ed.sign(Buffer.from(fp), key.seed)).toString("base64")}`;
    assert.equal(sign(key, fp), expected);
    // A copy of the key (another object, as a reloaded key file) signs the same.
    assert.equal(sign({ ...key }, fp), expected);
  }
});
