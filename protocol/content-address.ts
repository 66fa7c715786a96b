// Store paths that name their own contents. A path with `CA: fixed:r:sha256:<hash>` (what
// `nix-store --add`, builtins.path and fetchers with a recursive sha256 make) is named after its
// NAR's SHA-256 and its references (Nix's makeFixedOutputPath, "source" type; the check is Nix's
// ValidPathInfo::isContentAddressed, which is why Nix takes such paths without a signature). A
// narinfo for it whose NarHash is that hash and whose store path is the one those make cannot
// describe other contents, whoever signed it: nobody needs to vouch for it. Other kinds of
// content address (flat files, text, other hash types) do not pin the NarHash and are not judged.
import { createHash } from "node:crypto";
import { parseHash } from "./hash.js";
import { decodeNix32, encodeNix32 } from "./nix32.js";
import { STORE_DIR, type PathInfo } from "./path-info.js";
import { parseStorePath } from "./store-path.js";

const RECURSIVE_SHA256 = /^fixed:r:sha256:([0-9a-df-np-sv-z]{52})$/;

/** Whether `info`'s store path, NarHash and references are bound to each other by its CA field. */
export function namesOwnContents(info: Pick<PathInfo, "storePath" | "narHash" | "references" | "ca">): boolean {
  const m = info.ca === undefined ? null : RECURSIVE_SHA256.exec(info.ca);
  if (!m) return false;
  try {
    const hash = decodeNix32(m[1]!, 32);
    if (!Buffer.from(parseHash(info.narHash)).equals(hash)) return false;
    const { name } = parseStorePath(info.storePath);
    return sourcePath(name, hash, info.references, info.storePath) === info.storePath;
  } catch {
    return false; // malformed: proves nothing
  }
}

/** Nix's makeStorePath(makeType("source", references, self), hash, name); `self` is the path itself among the references. */
function sourcePath(name: string, hash: Uint8Array, references: readonly string[], self: string): string {
  let type = "source";
  for (const r of [...new Set(references)].filter((r) => r !== self).sort()) type += `:${r}`;
  if (references.includes(self)) type += ":self";
  const digest = createHash("sha256").update(`${type}:sha256:${Buffer.from(hash).toString("hex")}:${STORE_DIR}:${name}`).digest();
  const compressed = new Uint8Array(20); // Nix's compressHash: XOR-fold to 160 bits
  for (let i = 0; i < digest.length; i++) compressed[i % 20]! ^= digest[i]!;
  return `${STORE_DIR}/${encodeNix32(compressed)}-${name}`;
}
