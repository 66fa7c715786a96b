// This host's Nix store as a PathSource: metadata from the database, NARs from the filesystem.
import { join } from "node:path";
import { parseHash, toNix32Hash } from "../../protocol/hash.js";
import { fingerprint } from "../../protocol/narinfo.js";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Listing } from "../../protocol/listing.js";
import type { PathSource } from "../source.js";
import type { Signer } from "../signer.js";
import { NixDb, type DbPathRow } from "./db.js";
import { StoreWatcher } from "./watch.js";
import { narListing, narStream } from "./nar-dump.js";

/** A row's PathInfo stays valid while the row (id) and its signatures are unchanged. */
interface CachedInfo {
  id: number;
  sigs: string | null;
  info: PathInfo;
  /** When the row was last read. */
  checkedAt: number;
}

const MAX_CACHED = 100_000;
/**
 * While the watcher runs, a cached path whose row id it still sees is served without reading the
 * row again for this long: each read is a WAL read transaction (file locks, ~20 us), more than
 * the rest of a narinfo answer. Deletions are seen by the watcher's poll, re-signing by the next
 * read: both within a second.
 */
const FRESH_MS = 1000;

export class LocalStore implements PathSource {
  readonly db: NixDb;
  // The database is asked on every lookup (so GC shows at once); what is derived from a row
  // (references, hash conversion, our signature) is kept, since it cannot change for that row.
  private readonly infos = new Map<string, CachedInfo>();

  /** Set by watch(): the store's valid paths as of the last poll. */
  watcher: StoreWatcher | undefined;

  constructor(
    readonly root: string,
    private readonly signer: Signer,
  ) {
    this.db = new NixDb(root);
  }

  /**
   * Starts polling the database for changes. From then on a path the watcher has not seen is a
   * miss without a database query (misses are most of what Nix asks); a path added to the store
   * becomes visible within one interval. Hits still read the row, so GC shows at once.
   */
  watch(intervalMs = 250): StoreWatcher {
    this.watcher ??= new StoreWatcher(this.db, intervalMs).start();
    return this.watcher;
  }

  async pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    return this.pathInfoSync(hashPart);
  }

  /** The same PathInfo object is returned while the path is unchanged (callers may cache by it). */
  pathInfoSync(hashPart: string): PathInfo | undefined {
    const watcher = this.watcher?.running ? this.watcher : undefined;
    if (watcher && !watcher.has(hashPart)) return undefined;
    const cached = this.infos.get(hashPart);
    const now = Date.now();
    if (watcher && cached && cached.id === watcher.idOf(hashPart) && now - cached.checkedAt < FRESH_MS) return cached.info;
    const row = this.db.pathByHashPart(hashPart);
    if (!row) return undefined;
    if (cached && cached.id === row.id && cached.sigs === row.sigs) {
      cached.checkedAt = now;
      return cached.info;
    }
    const info = this.toPathInfo(row);
    if (info) {
      if (this.infos.size >= MAX_CACHED) this.infos.delete(this.infos.keys().next().value!);
      this.infos.set(hashPart, { id: row.id, sigs: row.sigs, info, checkedAt: now });
    }
    return info;
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
    this.watcher?.stop();
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
