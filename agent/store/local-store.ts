// This host's Nix store as a PathSource: metadata from the database, NARs from the filesystem.
import { join } from "node:path";
import { parseHash, toNix32Hash } from "../../protocol/hash.js";
import { fingerprint } from "../../protocol/narinfo.js";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Listing } from "../../protocol/listing.js";
import type { PathSource } from "../source.js";
import type { Signer } from "../signer.js";
import { NixDb, type DbPathRow } from "./db.js";
import { narListing, narStream } from "./nar-dump.js";

export class LocalStore implements PathSource {
  readonly db: NixDb;

  constructor(
    readonly root: string,
    private readonly signer: Signer,
  ) {
    this.db = new NixDb(root);
  }

  async pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    return this.pathInfoSync(hashPart);
  }

  pathInfoSync(hashPart: string): PathInfo | undefined {
    const row = this.db.pathByHashPart(hashPart);
    return row && this.toPathInfo(row);
  }

  /** Lookup by NAR hash ("sha256:..." in any encoding): a table scan, for legacy NAR URLs only. */
  pathInfoByNarHash(narHash: string): PathInfo | undefined {
    const base16 = "sha256:" + Buffer.from(parseHash(narHash)).toString("hex");
    const row = this.db.pathByNarHash(base16);
    return row && this.toPathInfo(row);
  }

  /** Where a store path's files are on this machine (differs from the logical path in a chroot store). */
  realPath(storePath: string): string {
    return join(this.root, storePath);
  }

  narStream(info: PathInfo, start: number, end: number): AsyncIterable<Buffer> {
    return narStream(this.realPath(info.storePath), { start, end });
  }

  listing(info: PathInfo): Promise<Listing> {
    return narListing(this.realPath(info.storePath));
  }

  pathCount(): number {
    return this.db.pathCount();
  }

  close(): void {
    this.db.close();
  }

  private toPathInfo(row: DbPathRow): PathInfo | undefined {
    if (row.narSize === null) return undefined; // registered by a very old Nix without a size
    const info: PathInfo = {
      storePath: row.path,
      narHash: toNix32Hash(parseHash(row.hash)),
      narSize: row.narSize,
      references: this.db.references(row.id).sort(byteOrder),
      sigs: row.sigs ? row.sigs.split(" ").filter(Boolean) : [],
    };
    if (row.deriver) info.deriver = row.deriver;
    if (row.ca) info.ca = row.ca;
    for (const sig of this.signer.signatures(fingerprint(info))) {
      if (!info.sigs.includes(sig)) info.sigs.push(sig);
    }
    return info;
  }
}

/** Store paths are ASCII, so UTF-16 code unit order equals byte order. */
function byteOrder(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
