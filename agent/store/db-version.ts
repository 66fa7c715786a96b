// Whether Nix's database may have changed, without opening it: the daemon backend's agent may not
// (see local-store.ts), but it may look at the metadata of the database's files. Every change Nix
// makes (a path registered or invalidated, a signature added) is a write to `db.sqlite-wal` (WAL
// mode) or `db.sqlite` (other journal modes, and checkpoints), which changes their size or times,
// or replaces a file (inode). So an answer the daemon gave while the files looked the same as now
// is still the daemon's answer now. Two stat calls (a few µs) instead of two daemon round trips.
//
// File times have a granularity (a clock tick, a few ms): a write in the same tick as the last
// one, leaving the size unchanged, would leave the files looking the same. So a look taken less
// than SETTLED_MS after the newest time on the files vouches for nothing (as git's "racily
// clean" index entries): any write after a look that does vouch gets a later time.
import { statSync } from "node:fs";
import { join } from "node:path";

/** How long after the last write the files' metadata tells every later write apart (ticks are <= 10 ms). */
export const SETTLED_MS = 250;

export class DbVersion {
  private readonly db: string;
  private readonly wal: string;

  /** `dbDir`: Nix's database directory, `<root>/nix/var/nix/db`. */
  constructor(dbDir: string) {
    this.db = join(dbDir, "db.sqlite");
    this.wal = join(dbDir, "db.sqlite-wal");
  }

  /**
   * A token equal to an earlier one only if Nix has not written its database in between; or
   * undefined when it cannot tell (the files cannot be seen, or were written under SETTLED_MS ago).
   */
  current(now = Date.now()): string | undefined {
    try {
      const db = statSync(this.db);
      // No WAL file: not in WAL mode, or every connection has closed (the WAL was checkpointed).
      const wal = statSync(this.wal, { throwIfNoEntry: false });
      const newest = Math.max(db.mtimeMs, db.ctimeMs, wal?.mtimeMs ?? 0, wal?.ctimeMs ?? 0);
      if (!(now - newest >= SETTLED_MS)) return undefined; // also a file time in the future
      const w = wal ? `${wal.ino}:${wal.size}:${wal.mtimeMs}:${wal.ctimeMs}` : "-";
      return `${db.ino}:${db.size}:${db.mtimeMs}:${db.ctimeMs}/${w}`;
    } catch {
      return undefined; // no database there, or not allowed to look
    }
  }
}
