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
//   came in may predate the commit. So a look is never reused for a later lookup; afterLook() and
//   next() share one among the lookups that wait for it (all of an event-loop turn's), which is
//   what makes the look cheap per lookup under concurrency (BENCHMARKS.md, "Daemon backend").
//
// Why a shared look vouches for every lookup answered from afterLook()'s runs: the look is taken
// in an immediate (the event loop's check phase), right before the runs queued until then are
// called, one after the other, in that same callback. A run asks for requests that came in before
// it was called (the fast path's: the one that was told to ask again, and those pipelined behind
// it, all read in earlier callbacks), so before the look. Nothing read while the runs are called
// can reach them: Node reads sockets only in the poll phase, and the promises the runs settle
// react only after the callback. The look stands only while the runs are called (`looking`):
// a run queued meanwhile, or a lookup after the callback, waits for a later look.
import { closeSync, fstatSync, openSync, statSync, type Stats } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";

/** How long after the last write a look at the files tells every later write apart. */
export const SETTLED_MS = 1000;

export class DbVersion {
  private readonly db: string;
  private readonly wal: string;
  /** The WAL, open while it exists (one fstat a look instead of stats by path). */
  private walFd: number | undefined;
  /** The runs waiting for the next shared look (afterLook), whether its immediate is set, and how many lookups wait. */
  private queue: (() => void)[] = [];
  private armed = false;
  private waiting = 0;
  /** The promise next()'s callers so far share, not resolved yet. */
  private pending: Promise<string | undefined> | undefined;
  /** True only while the runs of a shared look are called; `looked` is that look. */
  looking = false;
  looked: string | undefined;
  private closed = false;
  /** The last look's file metadata (DEV, INO, SIZE, MTIME, NLINK), and the look before's with its token. */
  private readonly st = new Float64Array(5);
  private readonly last = new Float64Array(5);
  private lastKind = "";
  private lastToken: string | undefined;

  /** Looks with the addon when it is built, else with fs.fstatSync (`native: false`: always, for tests). */
  private readonly look: (fd: number, out: Float64Array) => void;

  /** Told after each shared look how many lookups it answered (afterLook() runs and next() calls). */
  private readonly onShared: ((lookups: number) => void) | undefined;

  /** `dbDir`: Nix's database directory, `<root>/nix/var/nix/db`. */
  constructor(dbDir: string, opts: { native?: boolean; onShared?: (lookups: number) => void } = {}) {
    this.look = opts.native === false || !native ? fstatLook : native.look;
    this.onShared = opts.onShared;
    this.db = join(dbDir, "db.sqlite");
    this.wal = join(dbDir, "db.sqlite-wal");
  }

  /**
   * A token equal to an earlier one only if Nix has not written its database in between; or
   * undefined when it cannot tell (the files cannot be seen, or were written under SETTLED_MS ago).
   */
  current(now = Date.now()): string | undefined {
    try {
      // WAL mode (a WAL exists only then): every commit writes the WAL, db.sqlite only gets copies.
      if (this.walLook()) return this.token("wal", now);
      // Not in WAL mode, or no connection open: commits write db.sqlite (a WAL made since shows above).
      copyStats(statSync(this.db), this.st);
      return this.token("db", now);
    } catch {
      return undefined; // no database there, or not allowed to look
    }
  }

  /** The version of the file last looked at (in `st`); the string is made anew only when it changed. */
  private token(kind: string, now: number): string | undefined {
    const st = this.st;
    if (!(now - st[MTIME]! >= SETTLED_MS)) return undefined; // false for times in the future too
    const last = this.last;
    if (this.lastToken === undefined || this.lastKind !== kind || st[DEV] !== last[DEV] || st[INO] !== last[INO] || st[SIZE] !== last[SIZE] || st[MTIME] !== last[MTIME]) {
      last.set(st);
      this.lastKind = kind;
      this.lastToken = `${kind} ${st[DEV]}:${st[INO]}:${st[SIZE]}:${st[MTIME]}`;
    }
    return this.lastToken;
  }

  /**
   * Calls `run` right after a look taken after this call, shared with every run queued before
   * that look: the look is taken once the event loop has read what it had to read this turn (in
   * an immediate), so however many lookups came in, one fstat answers for all of them. While the
   * runs are called, `looking` is true and `looked` is that look (see the top of this file: it
   * vouches only for requests that came in before the run was called). Runs do not throw (one
   * that does is rethrown after the others ran).
   */
  afterLook(run: () => void): void {
    this.queue.push(run);
    this.waiting++;
    if (!this.armed) {
      this.armed = true;
      setImmediate(this.lookNow);
    }
  }

  private readonly lookNow = (): void => {
    const runs = this.queue;
    const lookups = this.waiting;
    // Runs queued from here on (from these runs too) wait for a later look.
    this.queue = [];
    this.armed = false;
    this.waiting = 0;
    this.pending = undefined;
    this.looked = this.closed ? undefined : this.current();
    this.looking = true;
    let failure: { error: unknown } | undefined;
    try {
      this.onShared?.(lookups);
      for (const run of runs) {
        try {
          run();
        } catch (error) {
          failure ??= { error };
        }
      }
    } finally {
      this.looking = false;
    }
    if (failure) throw failure.error;
  };

  /** afterLook()'s look as a promise, one for all the calls before the look (for code that awaits). */
  next(): Promise<string | undefined> {
    if (this.pending) {
      this.waiting++;
      return this.pending;
    }
    const looked = new Promise<string | undefined>((resolve) => this.afterLook(() => resolve(this.looked)));
    this.pending = looked;
    return looked;
  }

  close(): void {
    this.closed = true;
    this.closeWal();
  }

  private closeWal(): void {
    if (this.walFd !== undefined) closeSync(this.walFd);
    this.walFd = undefined;
  }

  /** Looks at the WAL (into `st`); false if there is none. */
  private walLook(): boolean {
    if (this.walFd !== undefined) {
      this.look(this.walFd, this.st);
      if (this.st[NLINK]! > 0) return true;
      this.closeWal(); // deleted: a new one may have been made under the same name
    }
    try {
      this.walFd = openSync(this.wal, "r");
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") return false;
      throw e;
    }
    this.look(this.walFd, this.st);
    return true;
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

// Not the change time: each daemon process running as root that opens the WAL changes it (SQLite
// gives a journal the database's owner), and every write changes the modification time anyway.
const [DEV, INO, SIZE, MTIME, NLINK] = [0, 1, 2, 3, 4];

interface FileVersionBinding {
  fileVersion(fd: number, out: Float64Array): number;
}

/**
 * The addon (native/file-version.c): fstat without the Stats object fs.fstatSync makes, about
 * 2 µs less CPU a narinfo hit in the agent (BENCHMARKS.md, "Daemon backend").
 */
const native = ((): { look(fd: number, out: Float64Array): void } | undefined => {
  try {
    const addon = new URL("../../../build/Release/file_version.node", import.meta.url);
    const binding = createRequire(import.meta.url)(addon.pathname) as FileVersionBinding;
    if (typeof binding.fileVersion !== "function") return undefined;
    return {
      look(fd, out) {
        const errno = binding.fileVersion(fd, out);
        if (errno !== 0) throw Object.assign(new Error(`fstat of fd ${fd}: errno ${errno}`), { errno });
      },
    };
  } catch {
    return undefined; // not built: fstatSync
  }
})();

/** Whether looks use the addon (else fs.fstatSync). */
export const nativeLooks = native !== undefined;

/** fstat(fd) into `out` (DEV, INO, SIZE, MTIME in ms, NLINK). */
function fstatLook(fd: number, out: Float64Array): void {
  copyStats(fstatSync(fd), out);
}

function copyStats(st: Stats, out: Float64Array): void {
  out[DEV] = st.dev;
  out[INO] = st.ino;
  out[SIZE] = st.size;
  out[MTIME] = st.mtimeMs;
  out[NLINK] = st.nlink;
}
