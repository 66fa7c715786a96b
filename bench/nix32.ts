// Random store hash parts for the miss measurements (nix32 itself is protocol/nix32.ts).
import { randomBytes } from "node:crypto";
import { encodeNix32 } from "../protocol/nix32.js";

/** `count` distinct random 32-character store hash parts, none of them in `avoid`. */
export function randomHashParts(count: number, avoid: ReadonlySet<string>): string[] {
  const out = new Set<string>();
  while (out.size < count) {
    const h = encodeNix32(randomBytes(20));
    if (!avoid.has(h)) out.add(h);
  }
  return [...out];
}
