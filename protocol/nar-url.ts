// Where a NAR is found in a fleetcache binary cache. The URL depends only on the path and its
// content (store hash part + NAR hash), never on which host serves it: Nix remembers a narinfo's
// URL for 30 days, and any agent of the fleet can resolve and verify it.
//
// Accepted forms (the first is what we write; the others keep nix-serve and harmonia clients
// working after a migration):
//   nar/<hashPart>-<narHash nix32>.nar     ours, and nix-serve's
//   nar/<narHash nix32>.nar?hash=<hashPart> harmonia's
//   nar/<narHash nix32>.nar                 harmonia's, without the query
//   nar/<hashPart>.nar                      early nix-serve

import { decodeNix32 } from "./nix32.js";

const NIX32 = "[0-9a-df-np-sv-z]";
const CANONICAL = new RegExp(`^/nar/(${NIX32}{32})-(${NIX32}{52})\\.nar$`);
const BY_NAR_HASH = new RegExp(`^/nar/(${NIX32}{52})\\.nar$`);
const BY_HASH_PART = new RegExp(`^/nar/(${NIX32}{32})\\.nar$`);
const HASH_QUERY = new RegExp(`(?:^|&)hash=(${NIX32}{32})(?:&|$)`);

/** What a NAR URL names: a store path hash part, a NAR hash (nix32, no "sha256:"), or both. */
export interface NarRef {
  hashPart?: string;
  narHash?: string;
}

/** The relative URL we put in a narinfo, given "sha256:<nix32>" NAR hash. */
export function narUrl(hashPart: string, narHash: string): string {
  return `nar/${hashPart}-${narHash.replace(/^sha256:/, "")}.nar`;
}

/**
 * Parses a request path (and query, without "?") under /nar/; undefined if it is not a NAR URL we
 * know. A NAR hash must be canonical nix32: 52 characters hold 260 bits, and a SHA-256 whose four
 * spare bits are set names no NAR (only the canonical form can equal a narinfo's NarHash).
 */
export function parseNarUrl(path: string, query: string): NarRef | undefined {
  const ref = matchNarUrl(path, query);
  return ref?.narHash !== undefined && !isCanonicalSha256(ref.narHash) ? undefined : ref;
}

function matchNarUrl(path: string, query: string): NarRef | undefined {
  let m = CANONICAL.exec(path);
  if (m) return { hashPart: m[1]!, narHash: m[2]! };
  m = BY_NAR_HASH.exec(path);
  if (m) {
    const q = HASH_QUERY.exec(query);
    return q ? { hashPart: q[1]!, narHash: m[1]! } : { narHash: m[1]! };
  }
  m = BY_HASH_PART.exec(path);
  if (m) return { hashPart: m[1]! };
  return undefined;
}

function isCanonicalSha256(nix32: string): boolean {
  try {
    decodeNix32(nix32, 32);
    return true;
  } catch {
    return false;
  }
}
