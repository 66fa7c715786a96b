// Nix's base32 ("nix32"), written from the description in shared/NIX-FACTS.md and checked
// against `nix hash to-base32`: only what the benchmark needs (encoding, random hash parts).
import { randomBytes } from "node:crypto";

export const NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz";

/** Encodes bytes the way Nix prints hashes in base32 (last 5-bit group first). */
export function nix32Encode(bytes: Uint8Array): string {
  const len = Math.floor((bytes.length * 8 - 1) / 5) + 1;
  let out = "";
  for (let n = len - 1; n >= 0; n--) {
    const bit = n * 5;
    const i = Math.floor(bit / 8);
    const j = bit % 8;
    const lo = (bytes[i] ?? 0) >> j;
    const hi = i + 1 < bytes.length ? (bytes[i + 1] ?? 0) << (8 - j) : 0;
    out += NIX32_ALPHABET[(lo | hi) & 0x1f];
  }
  return out;
}

/** `count` distinct random 32-character store hash parts, none of them in `avoid`. */
export function randomHashParts(count: number, avoid: ReadonlySet<string>): string[] {
  const out = new Set<string>();
  while (out.size < count) {
    const h = nix32Encode(randomBytes(20));
    if (!avoid.has(h)) out.add(h);
  }
  return [...out];
}
