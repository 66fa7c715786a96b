// SHA-256 hashes as Nix writes them. Nix accepts base16, nix32 and base64 after "sha256:", and
// SRI "sha256-<base64>"; the DB holds base16, narinfo and fingerprints use nix32, and
// `nix path-info --json` prints SRI. We parse all of them to bytes and print the one needed.
import { decodeNix32, encodeNix32 } from "./nix32.js";

const SHA256_BYTES = 32;
const HEX = /^[0-9a-fA-F]{64}$/;
// Canonical padded base64 of 32 bytes: 43 characters, the last one carrying 2 zero bits, then "=".
const BASE64_32 = /^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$/;

/** Parses "sha256:<base16|nix32|base64>" or "sha256-<base64>" into 32 bytes; throws otherwise. */
export function parseHash(s: string): Uint8Array {
  const m = /^([a-z0-9]+)([:-])(.*)$/s.exec(s);
  if (!m) throw new Error(`invalid hash ${preview(s)}: expected "sha256:<hash>" or "sha256-<base64>"`);
  const [, type, sep, body] = m as unknown as [string, string, string, string];
  if (type !== "sha256") throw new Error(`unsupported hash type "${type}" in ${preview(s)}: only sha256`);
  if (sep === "-") {
    if (!BASE64_32.test(body)) throw new Error(`invalid SRI hash ${preview(s)}: expected 44 base64 characters`);
    return fromBase64(body);
  }
  if (body.length === 64 && HEX.test(body)) return new Uint8Array(Buffer.from(body, "hex"));
  if (body.length === 52) {
    try {
      return decodeNix32(body, SHA256_BYTES);
    } catch (e) {
      throw new Error(`invalid hash ${preview(s)}: ${(e as Error).message}`);
    }
  }
  if (body.length === 44 && BASE64_32.test(body)) return fromBase64(body);
  throw new Error(`invalid hash ${preview(s)}: expected 64 base16, 52 nix32 or 44 base64 characters`);
}

/** "sha256:<nix32>", the form of NarHash/FileHash and of signature fingerprints. */
export function toNix32Hash(bytes: Uint8Array): string {
  return "sha256:" + encodeNix32(checkLength(bytes));
}

/** "sha256:<base16>", the form in the Nix database. */
export function toBase16Hash(bytes: Uint8Array): string {
  return "sha256:" + Buffer.from(checkLength(bytes)).toString("hex");
}

/** "sha256-<base64>" (SRI), the form `nix path-info --json` prints. */
export function toSri(bytes: Uint8Array): string {
  return "sha256-" + Buffer.from(checkLength(bytes)).toString("base64");
}

/** Any accepted form -> "sha256:<nix32>". */
export function normalizeHash(s: string): string {
  return toNix32Hash(parseHash(s));
}

function checkLength(bytes: Uint8Array): Uint8Array {
  if (bytes.length !== SHA256_BYTES) throw new Error(`a sha256 hash has 32 bytes, got ${bytes.length}`);
  return bytes;
}

function fromBase64(s: string): Uint8Array {
  return new Uint8Array(Buffer.from(s, "base64"));
}

// Hostile input can be huge: quote only its start in error messages.
function preview(s: string): string {
  return JSON.stringify(s.length > 80 ? s.slice(0, 80) + "…" : s);
}
