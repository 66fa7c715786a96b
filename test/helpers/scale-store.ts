// Stores with very many valid paths, for scale tests and the gc-stall benchmark: a real chroot
// store made by Nix, then synthetic ValidPaths rows added with the sqlite3 CLI while no Nix
// process runs. The rows have valid store path names and NAR hashes (no files behind them: the
// database and the daemon only read rows, and GC of a path without files just invalidates it).
import { run } from "./nix.js";
import { join } from "node:path";

export const dbFile = (root: string) => join(root, "nix/var/nix/db/db.sqlite");

/** Runs SQL against the store's database with the sqlite3 CLI (Nix's own retry-free way aside). */
export function sql(root: string, script: string): Promise<string> {
  return run("sqlite3", ["-batch", "-cmd", ".timeout 10000", dbFile(root), script]);
}

/**
 * Adds `count` rows named `/nix/store/<random hash part>-scale-<n>` (n from `first`), in one
 * transaction. Hash parts are 32 hex digits of randomblob() with 'e' (not in nix32) made 'z':
 * valid nix32, 128 random bits less the e/z merge.
 */
export async function addSyntheticPaths(root: string, count: number, first = 0): Promise<void> {
  const hashPart = "replace(lower(hex(randomblob(16))), 'e', 'z')";
  // A big page cache keeps the random inserts into the path index off the disk (3x faster).
  await sql(root, `
    PRAGMA cache_size = -262144;
    BEGIN;
    WITH RECURSIVE n(i) AS (SELECT ${first} UNION ALL SELECT i + 1 FROM n WHERE i < ${first + count - 1})
    INSERT INTO ValidPaths (path, hash, registrationTime, narSize)
      SELECT '/nix/store/' || ${hashPart} || '-scale-' || i, 'sha256:' || lower(hex(randomblob(32))), 1700000000, 120 FROM n;
    COMMIT;`);
}

/** Deletes rows one transaction at a time (as Nix's GC invalidates each path on its own). */
export async function deleteInSmallTransactions(root: string, ids: number[], perTransaction = 1): Promise<void> {
  const parts: string[] = [];
  for (let i = 0; i < ids.length; i += perTransaction) {
    parts.push(`BEGIN; DELETE FROM ValidPaths WHERE id IN (${ids.slice(i, i + perTransaction).join(",")}); COMMIT;`);
  }
  // One sqlite3 process for all of them (a process per path would measure fork, not SQLite).
  for (let i = 0; i < parts.length; i += 20_000) await sql(root, parts.slice(i, i + 20_000).join("\n"));
}

/** `count` valid paths spread over the table: every (total/count)th row, with their ids. */
export async function samplePaths(root: string, count: number): Promise<{ id: number; path: string }[]> {
  const out = await sql(root, `SELECT id, path FROM ValidPaths WHERE id % (SELECT max(1, count(*) / ${count}) FROM ValidPaths) = 0 ORDER BY id LIMIT ${count}`);
  return out.trim().split("\n").filter(Boolean).map((line) => {
    const [id, path] = line.split("|");
    return { id: Number(id), path: path! };
  });
}
