// Read-only access to Nix's SQLite database. Reading it directly (rather than asking the daemon)
// answers a narinfo with two indexed queries; every request sees the database as it is now, so
// builds, downloads and garbage collection are reflected at once and nothing goes stale.
import { DatabaseSync, type StatementSync } from "node:sqlite";
import { join } from "node:path";
import { STORE_DIR } from "../../protocol/path-info.js";

/** A row of ValidPaths as Nix stores it (hash is "sha256:<base16>"). */
export interface DbPathRow {
  id: number;
  path: string;
  hash: string;
  deriver: string | null;
  narSize: number | null;
  sigs: string | null;
  ca: string | null;
}

export class NixDb {
  private readonly db: DatabaseSync;
  private readonly byHashPart: StatementSync;
  private readonly byNarHash: StatementSync;
  private readonly refs: StatementSync;
  private readonly count: StatementSync;
  private readonly hashesAfter: StatementSync;
  private readonly version: StatementSync;
  private readonly countRange: StatementSync;
  private readonly idsRange: StatementSync;

  constructor(storeRoot: string) {
    const file = join(storeRoot, "nix/var/nix/db/db.sqlite");
    // Read-only never creates the file: a missing database is an error. Nix holds write locks
    // briefly; the timeout (SQLite's busy timeout) waits rather than fails a request.
    this.db = new DatabaseSync(file, { readOnly: true, timeout: 2000 });
    // A 16 MB page cache, as better-sqlite3 had (SQLite's default is 2 MB): with a million paths,
    // hash-part lookups and references took 1.4-1.6x as long with the default (BENCHMARKS.md).
    this.db.exec("PRAGMA cache_size = -16000");
    const cols = "id, path, hash, deriver, narSize, sigs, ca";
    // A range on the unique path index: "<hashPart>-" up to "<hashPart>." ('.' follows '-').
    this.byHashPart = this.db.prepare(`SELECT ${cols} FROM ValidPaths WHERE path >= ? AND path < ? LIMIT 1`);
    // No index on hash: a scan, used only for the rare NAR URL form that carries nothing else.
    this.byNarHash = this.db.prepare(`SELECT ${cols} FROM ValidPaths WHERE hash = ? LIMIT 1`);
    this.refs = this.db.prepare(
      "SELECT p.path AS path FROM Refs r JOIN ValidPaths p ON p.id = r.reference WHERE r.referrer = ?",
    );
    this.count = this.db.prepare("SELECT count(*) AS n FROM ValidPaths");
    // The hash part as a string of its own: a slice of the path would keep the whole path alive
    // (a million paths: ~60 MB more).
    this.hashesAfter = this.db.prepare(`SELECT id, substr(path, ${STORE_DIR.length + 2}, 32) AS hashPart FROM ValidPaths WHERE id > ? ORDER BY id LIMIT ?`);
    // Changes when another connection commits: one integer, no table read (a count of 1M rows is ~50-100 ms).
    this.version = this.db.prepare("PRAGMA data_version");
    // Ranges of the primary key: a count of 16k ids is ~0.5 ms.
    this.countRange = this.db.prepare("SELECT count(*) AS n FROM ValidPaths WHERE id >= ? AND id < ?");
    this.idsRange = this.db.prepare("SELECT id FROM ValidPaths WHERE id >= ? AND id < ? ORDER BY id");
  }

  /** The valid path whose hash part is `hashPart` (already validated by the caller). */
  pathByHashPart(hashPart: string): DbPathRow | undefined {
    const prefix = `${STORE_DIR}/${hashPart}`;
    return this.byHashPart.get(prefix + "-", prefix + ".") as DbPathRow | undefined;
  }

  /** The first valid path whose NAR hash is `base16` ("sha256:<base16>"). */
  pathByNarHash(hash: string): DbPathRow | undefined {
    return this.byNarHash.get(hash) as DbPathRow | undefined;
  }

  references(id: number): string[] {
    return (this.refs.all(id) as { path: string }[]).map((r) => r.path);
  }

  pathCount(): number {
    return (this.count.get() as { n: number }).n;
  }

  /**
   * Up to `limit` paths registered after row `id`, by id, as their hash parts. Ids only grow
   * (AUTOINCREMENT): a re-added path gets a new one, and no row ever appears below an id seen.
   */
  hashPartsAfter(id: number, limit = -1): { id: number; hashPart: string }[] {
    return this.hashesAfter.all(id, limit) as { id: number; hashPart: string }[];
  }

  /** A number that changes whenever another connection (Nix) has committed to the database. */
  dataVersion(): number {
    return (this.version.get() as { data_version: number }).data_version;
  }

  /** Valid paths with row ids in [from, to). */
  countIds(from: number, to: number): number {
    return (this.countRange.get(from, to) as { n: number }).n;
  }

  /** The row ids in [from, to), ascending. */
  idsBetween(from: number, to: number): number[] {
    return (this.idsRange.all(from, to) as { id: number }[]).map((r) => r.id);
  }

  close(): void {
    this.db.close();
  }
}
