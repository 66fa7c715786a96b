// Store metadata read straight from Nix's database (needs write access to its directory, i.e.
// root, because of WAL mode): two indexed queries a lookup, and none for a hit the watcher vouches for.
import { parseHash } from "../../protocol/hash.js";
import type { PathInfo } from "../../protocol/path-info.js";
import { hashPartOf } from "../../protocol/store-path.js";
import type { Signer } from "../signer.js";
import { NixDb, type DbPathRow } from "./db.js";
import { toPathInfo, type StoreMetadata } from "./metadata.js";
import { StoreWatcher } from "./watch.js";

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

export class DatabaseMetadata implements StoreMetadata {
  readonly backend = "database";
  readonly db: NixDb;
  // The database is asked on every lookup (so GC shows at once); what is derived from a row
  // (references, hash conversion, our signature) is kept, since it cannot change for that row.
  private readonly infos = new Map<string, CachedInfo>();
  private watcher: StoreWatcher | undefined;

  constructor(
    root: string,
    private readonly signer: Signer,
    private readonly pollMs = 250,
  ) {
    this.db = new NixDb(root);
  }

  /**
   * Starts polling the database for changes. From then on a path the watcher has not seen is a
   * miss without a database query (misses are most of what Nix asks); a path added to the store
   * becomes visible within one interval. Hits still read the row, so GC shows at once.
   */
  watch(): StoreWatcher {
    this.watcher ??= new StoreWatcher(this.db, this.pollMs).start();
    return this.watcher;
  }

  async pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    return this.pathInfoNow(hashPart);
  }

  /**
   * Always synchronous: the watcher's view and the cache are in memory, and node:sqlite reads
   * synchronously. The same PathInfo object is returned while the path is unchanged (callers
   * may cache by it).
   */
  pathInfoNow(hashPart: string): PathInfo | undefined {
    const watcher = this.watcher?.running ? this.watcher : undefined;
    // One lookup in the watcher's view for both questions: known at all, and under which row.
    const id = watcher?.idOf(hashPart);
    if (watcher && id === undefined) return undefined;
    const cached = this.infos.get(hashPart);
    const now = Date.now();
    if (watcher && cached && cached.id === id && now - cached.checkedAt < FRESH_MS) return cached.info;
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

  /** A table scan: for legacy NAR URLs only. */
  async pathInfoByNarHash(narHash: string): Promise<PathInfo | undefined> {
    const base16 = "sha256:" + Buffer.from(parseHash(narHash)).toString("hex");
    const row = this.db.pathByNarHash(base16);
    return row && this.toPathInfo(row);
  }

  async isValidPath(storePath: string): Promise<boolean> {
    return this.db.pathByHashPart(hashPartOf(storePath))?.path === storePath;
  }

  /** From the watcher while it runs: count(*) reads the whole table (~50-100 ms for 1M paths). */
  pathCount(): number {
    return this.watcher?.running ? this.watcher.size : this.db.pathCount();
  }

  close(): void {
    this.watcher?.stop();
    this.db.close();
  }

  private toPathInfo(row: DbPathRow): PathInfo | undefined {
    if (row.narSize === null) return undefined; // registered by a very old Nix without a size
    return toPathInfo({
      storePath: row.path,
      narHash: row.hash,
      narSize: row.narSize,
      references: this.db.references(row.id),
      deriver: row.deriver,
      sigs: row.sigs ? row.sigs.split(" ").filter(Boolean) : [],
      ca: row.ca,
    }, this.signer);
  }
}
