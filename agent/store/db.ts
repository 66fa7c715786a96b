// Read-only access to Nix's SQLite database. Reading it directly (rather than asking the daemon)
// answers a narinfo with two indexed queries; every request sees the database as it is now, so
// builds, downloads and garbage collection are reflected at once and nothing goes stale.
import Database from "better-sqlite3";
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
  private readonly db: Database.Database;
  private readonly byHashPart: Database.Statement<[string, string], DbPathRow>;
  private readonly byNarHash: Database.Statement<[string], DbPathRow>;
  private readonly refs: Database.Statement<[number], { path: string }>;
  private readonly count: Database.Statement<[], { n: number }>;
  private readonly hashesAfter: Database.Statement<[number, number], { id: number; hashPart: string }>;
  private readonly version: Database.Statement<[], number>;
  private readonly countRange: Database.Statement<[number, number], number>;
  private readonly idsRange: Database.Statement<[number, number], number>;

  constructor(storeRoot: string) {
    const file = join(storeRoot, "nix/var/nix/db/db.sqlite");
    this.db = new Database(file, { readonly: true, fileMustExist: true });
    // Nix holds write locks briefly; wait rather than fail a request.
    this.db.pragma("busy_timeout = 2000");
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
    this.version = this.db.prepare("PRAGMA data_version").pluck() as Database.Statement<[], number>;
    // Ranges of the primary key: a count of 16k ids is ~0.5 ms.
    this.countRange = this.db.prepare("SELECT count(*) FROM ValidPaths WHERE id >= ? AND id < ?").pluck() as Database.Statement<[number, number], number>;
    this.idsRange = this.db.prepare("SELECT id FROM ValidPaths WHERE id >= ? AND id < ? ORDER BY id").pluck() as Database.Statement<[number, number], number>;
  }

  /** The valid path whose hash part is `hashPart` (already validated by the caller). */
  pathByHashPart(hashPart: string): DbPathRow | undefined {
    const prefix = `${STORE_DIR}/${hashPart}`;
    return this.byHashPart.get(prefix + "-", prefix + ".");
  }

  /** The first valid path whose NAR hash is `base16` ("sha256:<base16>"). */
  pathByNarHash(hash: string): DbPathRow | undefined {
    return this.byNarHash.get(hash);
  }

  references(id: number): string[] {
    return this.refs.all(id).map((r) => r.path);
  }

  pathCount(): number {
    return this.count.get()!.n;
  }

  /**
   * Up to `limit` paths registered after row `id`, by id, as their hash parts. Ids only grow
   * (AUTOINCREMENT): a re-added path gets a new one, and no row ever appears below an id seen.
   */
  hashPartsAfter(id: number, limit = -1): { id: number; hashPart: string }[] {
    return this.hashesAfter.all(id, limit);
  }

  /** A number that changes whenever another connection (Nix) has committed to the database. */
  dataVersion(): number {
    return this.version.get()!;
  }

  /** Valid paths with row ids in [from, to). */
  countIds(from: number, to: number): number {
    return this.countRange.get(from, to)!;
  }

  /** The row ids in [from, to), ascending. */
  idsBetween(from: number, to: number): number[] {
    return this.idsRange.all(from, to);
  }

  close(): void {
    this.db.close();
  }
}
