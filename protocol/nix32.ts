// Nix's base32 ("nix32"): the encoding of store path hash parts and of hashes in narinfo files.
// It is not RFC 4648: the alphabet omits e, o, u and t, and the bit order is Nix's own. View the
// bytes as one little-endian bit string; the character for 5-bit group n (bits 5n..5n+4) is
// written at string position len-1-n, so the most significant group comes first.

export const NIX32_ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz";

// Character code -> digit value, -1 for characters outside the alphabet.
const DIGIT = new Int8Array(128).fill(-1);
for (let i = 0; i < NIX32_ALPHABET.length; i++) DIGIT[NIX32_ALPHABET.charCodeAt(i)] = i;

/** Number of nix32 characters for `byteLength` bytes (52 for sha256, 32 for a store path hash). */
export function nix32Length(byteLength: number): number {
  return byteLength === 0 ? 0 : Math.floor((byteLength * 8 - 1) / 5) + 1;
}

export function encodeNix32(bytes: Uint8Array): string {
  const len = nix32Length(bytes.length);
  let out = "";
  for (let n = len - 1; n >= 0; n--) {
    const bit = n * 5;
    const i = bit >> 3;
    const shift = bit & 7;
    // A group may straddle two bytes; past the last byte the missing high bits are zero.
    const pair = bytes[i]! | ((bytes[i + 1] ?? 0) << 8);
    out += NIX32_ALPHABET[(pair >> shift) & 0x1f];
  }
  return out;
}

/** True when `s` consists only of nix32 characters (any length). */
export function isNix32(s: string): boolean {
  for (let k = 0; k < s.length; k++) {
    const c = s.charCodeAt(k);
    if (c >= 128 || DIGIT[c] === -1) return false;
  }
  return true;
}

/**
 * Decodes nix32. Without `byteLength` the length is inferred (the longest byte string whose
 * encoding has s.length characters). Throws on foreign characters, a length that does not
 * match, and set bits beyond the last byte (which would make two strings decode alike).
 */
export function decodeNix32(s: string, byteLength?: number): Uint8Array {
  const size = byteLength ?? Math.floor((s.length * 5) / 8);
  if (!Number.isInteger(size) || size < 0 || nix32Length(size) !== s.length) {
    throw new Error(`invalid nix32 string: length ${s.length} does not encode ${byteLength ?? "whole"} bytes`);
  }
  const out = new Uint8Array(size);
  const len = s.length;
  for (let k = 0; k < len; k++) {
    const c = s.charCodeAt(k);
    const digit = c < 128 ? DIGIT[c]! : -1;
    if (digit < 0) throw new Error(`invalid nix32 string: bad character ${JSON.stringify(s[k])} at ${k}`);
    const bit = (len - 1 - k) * 5;
    const i = bit >> 3;
    const shift = bit & 7;
    const v = digit << shift; // up to 12 bits: low byte into out[i], the rest into out[i+1]
    out[i]! |= v & 0xff;
    const high = v >> 8;
    if (i + 1 < size) out[i + 1]! |= high;
    else if (high !== 0) throw new Error("invalid nix32 string: non-zero bits beyond the encoded bytes");
  }
  return out;
}
