// Whether Nix's database may have changed, without opening it: the daemon backend's agent may not
// (see local-store.ts), but it may look at the database's files. Every change Nix makes (a path
// registered or invalidated, a signature added) is a commit, which writes the file `db.sqlite-wal`
// (WAL mode, Nix's default) or `db.sqlite` (Nix's `use-sqlite-wal = false`), and so changes its
// size or modification time. So an answer the daemon gave after the files looked as they do now
// is still its answer now, and a look costs one fstat (~2 µs) instead of two daemon round trips.
//
// What a look cannot see, it must not vouch for:
// - File times have a granularity (a clock tick, a few ms): a second write in the same tick may
//   leave the times and the size as they were. And in WAL mode a commit is visible to readers
//   once SQLite has updated the WAL index in shared memory, right after writing the frames (Nix
//   sets `synchronous = normal` or `off`: no fsync in between). So a look taken less than SETTLED_MS
//   after the newest time on the file vouches for nothing: a later write gets a later time, and
//   the index has long caught up with the write we saw (as git's "racily clean" index entries).
// - SQLite deletes the WAL when the last connection closes (after copying it into db.sqlite) and
//   makes a new one on the next open: the WAL is kept open, and a deleted one (no links) or none
//   at all means looking at db.sqlite (by its path) and the WAL's path instead.
// - A look vouches only for lookups that came in before it: a lookup whose client saw Nix commit
//   (`nix-store --delete` returned) came in after that commit, and a look taken before the lookup
//   came in may predate the commit. So a look is never reused for a later lookup; next() shares
//   one among the lookups that wait for it (all of an event-loop turn's), which is what makes the
//   look cheap per lookup under concurrency: the fstat costs about 5 µs of the agent's CPU in the
//   HTTP path here, more than in a loop on its own (BENCHMARKS.md, "Daemon backend").
import { closeSync, fstatSync, openSync, statSync, type Stats } from "node:fs";
import { join } from "node:path";

/** How long after the last write a look at the files tells every later write apart. */
export const SETTLED_MS = 1000;

export class DbVersion {
  private readonly db: string;
  private readonly wal: string;
  /** The WAL, open while it exists (one fstat a look instead of stats by path). */
  private walFd: number | undefined;
  /** The look that next()'s callers so far wait for, not taken yet, and how many they are. */
  private pending: Promise<string | undefined> | undefined;
  private waiting = 0;
  /** How many next() calls the last look answered. */
  lastShared = 0;
  private closed = false;

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
      const wal = this.walStats();
      // WAL mode (a WAL exists only then): every commit writes the WAL, db.sqlite only gets copies.
      if (wal) return settled(wal, now) ? `wal ${fileVersion(wal)}` : undefined;
      const db = statSync(this.db);
      // Not in WAL mode, or no connection open: commits write db.sqlite (a WAL made since shows above).
      return settled(db, now) ? `db ${fileVersion(db)}` : undefined;
    } catch {
      return undefined; // no database there, or not allowed to look
    }
  }

  /**
   * current() as a look taken after this call sees it, shared by every call made before that
   * look: the look is taken once the event loop has read what it had to read this turn (in
   * setImmediate), so however many lookups came in, one fstat answers for all of them.
   */
  next(): Promise<string | undefined> {
    this.waiting++;
    this.pending ??= new Promise((resolve) =>
      setImmediate(() => {
        this.pending = undefined; // calls from here on wait for a later look
        this.lastShared = this.waiting;
        this.waiting = 0;
        resolve(this.closed ? undefined : this.current());
      }),
    );
    return this.pending;
  }

  close(): void {
    this.closed = true;
    this.closeWal();
  }

  private closeWal(): void {
    if (this.walFd !== undefined) closeSync(this.walFd);
    this.walFd = undefined;
  }

  /** The WAL's metadata, or undefined if there is none. */
  private walStats(): Stats | undefined {
    if (this.walFd !== undefined) {
      const st = fstatSync(this.walFd);
      if (st.nlink > 0) return st;
      this.closeWal(); // deleted: a new one may have been made under the same name
    }
    try {
      this.walFd = openSync(this.wal, "r");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return undefined;
      throw e;
    }
    return fstatSync(this.walFd);
  }
}

/** Whether this process may look at the database's files in `dbDir` (else every lookup asks the daemon). */
export function databaseFilesVisible(dbDir: string): boolean {
  try {
    statSync(join(dbDir, "db.sqlite"));
    closeSync(openSync(join(dbDir, "db.sqlite-wal"), "r"));
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "ENOENT" && (e as NodeJS.ErrnoException).path?.endsWith("-wal") === true;
  }
}

const settled = (st: Stats, now: number) => now - st.mtimeMs >= SETTLED_MS; // false for times in the future too

// Not the change time: each daemon process running as root that opens the WAL changes it (SQLite
// gives a journal the database's owner), and every write changes the modification time anyway.
const fileVersion = (st: Stats) => `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}`;
