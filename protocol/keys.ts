// Nix binary cache signing keys ("name:base64") and Ed25519 signatures over path fingerprints.
// Secret key = 32-byte seed + 32-byte public key (Nix/libsodium layout); public key = 32 bytes.
//
// Verification uses node:crypto (OpenSSL), about 15x faster than pure JS (0.36 against 4.9 ms per
// signature on the shared machine): a peer's narinfo costs at least one, on the lookup's path.
// Signing does too (46 against 509 µs): a holder signs each path the first time a peer or Nix
// asks for it (agent/signer.ts keeps the result), on that lookup's path. Ed25519 signatures are
// deterministic, so both give the same bytes. Deriving a public key from a seed stays with
// @noble/ed25519 (once per start).
import * as ed from "@noble/ed25519";
import { createHash, createPrivateKey, createPublicKey, getRandomValues, sign as cryptoSign, verify as cryptoVerify, type KeyObject } from "node:crypto";

// noble needs a synchronous SHA-512 for its sync API; node's is native and side-effect free.
// Only fill it in if nobody else has, so we never replace another module's choice.
if (!ed.hashes.sha512) {
  ed.hashes.sha512 = (m: Uint8Array) => {
    const d = createHash("sha512").update(m).digest();
    return new Uint8Array(d.buffer, d.byteOffset, d.length);
  };
}

export interface PublicKey {
  name: string;
  /** 32 bytes. */
  publicKey: Uint8Array;
}

export interface SecretKey extends PublicKey {
  /** 32-byte Ed25519 seed (RFC 8032 secret key). */
  seed: Uint8Array;
}

// Names end at the first ':' in a key or signature, and key files are whitespace-trimmed.
const KEY_NAME = /^[^\s:\x00-\x1f\x7f]+$/;

export function isValidKeyName(name: string): boolean {
  return KEY_NAME.test(name);
}

export function parseSecretKey(text: string): SecretKey {
  const { name, bytes } = splitKey(text, 64, "secret");
  const seed = bytes.slice(0, 32);
  const publicKey = bytes.slice(32);
  // A mismatched half would sign with one key and advertise another: refuse it.
  if (!equalBytes(ed.getPublicKey(seed), publicKey)) {
    throw new Error(`invalid secret key "${name}": its public half does not match its seed`);
  }
  return { name, seed, publicKey };
}

export function parsePublicKey(text: string): PublicKey {
  const { name, bytes } = splitKey(text, 32, "public");
  return { name, publicKey: bytes };
}

export function formatSecretKey(key: SecretKey): string {
  return `${key.name}:${Buffer.concat([key.seed, key.publicKey]).toString("base64")}`;
}

/** Accepts a SecretKey too: the public half is formatted. */
export function formatPublicKey(key: PublicKey): string {
  return `${key.name}:${Buffer.from(key.publicKey).toString("base64")}`;
}

export function generateKeyPair(name: string): SecretKey {
  checkName(name);
  const seed = getRandomValues(new Uint8Array(32));
  return { name, seed, publicKey: ed.getPublicKey(seed) };
}

/** Signs a fingerprint (see narinfo.ts); returns "name:base64(64-byte signature)". */
export function sign(key: SecretKey, fingerprint: string): string {
  const msg = Buffer.from(fingerprint, "utf8");
  const obj = privateKeyObject(key);
  const sig = obj ? cryptoSign(null, msg, obj) : ed.sign(msg, key.seed);
  return `${key.name}:${Buffer.from(sig).toString("base64")}`;
}

/** Each secret key imported into OpenSSL once (null: OpenSSL refused it, sign with noble). */
const privateKeys = new WeakMap<SecretKey, KeyObject | null>();
function privateKeyObject(key: SecretKey): KeyObject | null {
  let obj = privateKeys.get(key);
  if (obj === undefined) {
    try {
      const b64 = (b: Uint8Array) => Buffer.from(b).toString("base64url");
      obj = createPrivateKey({ key: { kty: "OKP", crv: "Ed25519", d: b64(key.seed), x: b64(key.publicKey) }, format: "jwk" });
    } catch {
      obj = null;
    }
    privateKeys.set(key, obj);
  }
  return obj;
}

/**
 * Checks signatures against a fixed set of public keys. Each key is imported into OpenSSL once;
 * one the import refuses (not 32 bytes) verifies nothing. Never throws on what it is given to check.
 */
export class Verifier {
  readonly #byName = new Map<string, KeyObject[]>();

  constructor(keys: readonly PublicKey[]) {
    for (const k of keys) {
      let obj: KeyObject;
      try {
        obj = createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: Buffer.from(k.publicKey).toString("base64url") }, format: "jwk" });
      } catch {
        continue;
      }
      this.#byName.set(k.name, [...(this.#byName.get(k.name) ?? []), obj]);
    }
  }

  /** How many keys it checks with. */
  get size(): number {
    let n = 0;
    for (const list of this.#byName.values()) n += list.length;
    return n;
  }

  /**
   * True when `sig` ("name:base64") is a valid signature of `fingerprint` by a key of that name.
   * Malformed input or an unknown key name gives false.
   */
  verify(fingerprint: string, sig: string): boolean {
    const colon = sig.indexOf(":");
    if (colon <= 0) return false;
    const keys = this.#byName.get(sig.slice(0, colon));
    if (!keys) return false;
    const bytes = decodeBase64Exact(sig.slice(colon + 1), 64);
    if (!bytes) return false;
    const msg = Buffer.from(fingerprint, "utf8");
    for (const key of keys) {
      try {
        // OpenSSL follows RFC 8032 (S < L, R compared as encoded), as libsodium does for Nix.
        if (cryptoVerify(null, msg, key, bytes)) return true;
      } catch {
        // not a valid signature
      }
    }
    return false;
  }
}

/**
 * `new Verifier(publicKeys).verify(fingerprint, sig)`, for a one-off check; code that checks
 * repeatedly holds a Verifier (importing the keys costs about 10 µs each).
 */
export function verify(publicKeys: readonly PublicKey[], fingerprint: string, sig: string): boolean {
  return new Verifier(publicKeys).verify(fingerprint, sig);
}

function splitKey(text: string, size: number, kind: string): { name: string; bytes: Uint8Array } {
  const colon = text.indexOf(":");
  if (colon < 0) throw new Error(`invalid ${kind} key: expected "name:base64"`);
  const name = text.slice(0, colon);
  checkName(name);
  const bytes = decodeBase64Exact(text.slice(colon + 1), size);
  if (!bytes) throw new Error(`invalid ${kind} key "${name}": expected base64 of ${size} bytes`);
  return { name, bytes };
}

function checkName(name: string): void {
  if (!isValidKeyName(name)) {
    throw new Error(`invalid key name ${JSON.stringify(name.slice(0, 80))}: must be non-empty, without ':' or whitespace`);
  }
}

/** Canonical padded base64 of exactly `size` bytes, or undefined (Buffer alone is too lenient). */
function decodeBase64Exact(s: string, size: number): Uint8Array | undefined {
  if (s.length !== 4 * Math.ceil(size / 3) || !/^[A-Za-z0-9+/]*={0,2}$/.test(s)) return undefined;
  const buf = Buffer.from(s, "base64");
  if (buf.length !== size || buf.toString("base64") !== s) return undefined;
  return new Uint8Array(buf);
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}
