// Notices paths entering and leaving the store (builds, downloads, garbage collection) by polling
// the database, without holding the event loop for long even with millions of paths:
// - `PRAGMA data_version` says whether Nix committed anything since the last look (~3 us);
// - new rows have higher ids than any seen (AUTOINCREMENT), so `id > last` finds them;
// - deleted rows are found by comparing row counts over id ranges with our own counts and
//   narrowing the ranges that differ down to blocks of 1024 ids, whose ids are then read.
//   Ranges are checked a slice at a time with the event loop free in between, instead of one
//   count(*) and a full rescan of every id. Counting reads the whole table (1M rows: ~0.3 s of
//   CPU in ~250 slices of ~1 ms), so while Nix keeps committing (a GC invalidates one path per
//   transaction) the next such scan waits twice as long as the last one took: at most a third
//   of a core, and deletions show within about three scans' time.
import { EventEmitter } from "node:events";
import type { NixDb } from "./db.js";

export interface StoreChange {
  /** Hash parts (32 nix32 characters) of paths that became valid. */
  added: string[];
  /** Hash parts of paths that are no longer valid. */
  removed: string[];
}

/** Ids per block: the unit whose ids are read when its count differs. */
const BLOCK = 1024;
/** Ids per slice of the deletion scan (counted in one query, ~1 ms; the event loop runs between slices). */
const SLICE = 4 * BLOCK;
/** New rows read per query (a big `nix copy` may add many at once). */
const ADD_BATCH = 20_000;

const nextTick = () => new Promise<void>((resolve) => setImmediate(resolve));

export class StoreWatcher extends EventEmitter<{ change: [StoreChange]; error: [Error] }> {
  /** Row id -> hash part, for every row seen and not yet seen deleted. */
  private readonly byId = new Map<number, string>();
  /** Hash part -> row id of the valid path (a re-added path's newest row). */
  private readonly ids = new Map<string, number>();
  /** Rows of byId per block of ids (index: id / BLOCK). */
  private readonly blockCounts: number[] = [];
  private maxId = 0;
  private version: number;
  /** Nix committed since the last deletion scan began. */
  private scanDue = false;
  /** When the last deletion scan ended, and how long it took (ms). */
  private lastScanEnd = 0;
  private lastScanMs = 0;
  private timer: NodeJS.Timeout | undefined;
  /** The pass under way or last finished; passes run one at a time. */
  private chain: Promise<unknown> = Promise.resolve();
  private busy = false;

  constructor(
    private readonly db: NixDb,
    private readonly intervalMs = 500,
  ) {
    super();
    // The initial load, synchronous: lookups must not miss paths the watcher has not read yet.
    this.version = db.dataVersion();
    const ignored: StoreChange = { added: [], removed: [] };
    for (let rows = db.hashPartsAfter(0, ADD_BATCH); rows.length > 0; rows = db.hashPartsAfter(this.maxId, ADD_BATCH)) {
      for (const row of rows) this.add(row, ignored);
      ignored.added.length = 0;
    }
  }

  /** Hash parts of every valid path, as of the last poll. */
  hashParts(): IterableIterator<string> {
    return this.ids.keys();
  }

  get size(): number {
    return this.ids.size;
  }

  /** Whether the path was valid at the last poll (at most one interval ago, while running). */
  has(hashPart: string): boolean {
    return this.ids.has(hashPart);
  }

  /** The database row id of the valid path with this hash part, as of the last poll. */
  idOf(hashPart: string): number | undefined {
    return this.ids.get(hashPart);
  }

  get running(): boolean {
    return this.timer !== undefined;
  }

  start(): this {
    this.timer ??= setInterval(() => {
      if (this.busy) return; // a long pass: the next tick looks again
      this.queue(true).catch((e: Error) => {
        if (this.running) this.emit("error", e); // after stop() the database may be closed
      });
    }, this.intervalMs);
    this.timer.unref();
    return this;
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /**
   * Brings the view up to date (after any pass under way) and resolves to, and emits when
   * non-empty, what changed. The view is updated as the pass goes: a deleted path leaves has()
   * as soon as its block is read, before the pass ends.
   */
  poll(): Promise<StoreChange> {
    return this.queue(false);
  }

  private queue(paced: boolean): Promise<StoreChange> {
    const next = this.chain.then(() => this.pass(paced));
    this.chain = next.catch(() => {});
    return next;
  }

  /** New rows, then (unless `paced` says it is too soon after the last) deleted ones. */
  private async pass(paced: boolean): Promise<StoreChange> {
    const change: StoreChange = { added: [], removed: [] };
    // Read before the rows: a commit after this read changes it again, so the next pass looks.
    const version = this.db.dataVersion();
    if (version !== this.version) this.scanDue = true;
    const scan = this.scanDue && (!paced || Date.now() - this.lastScanEnd >= 2 * this.lastScanMs);
    if (version === this.version && !scan) return change;
    this.busy = true;
    try {
      this.version = version;
      for (;;) {
        const rows = this.db.hashPartsAfter(this.maxId, ADD_BATCH);
        for (const row of rows) this.add(row, change);
        if (rows.length < ADD_BATCH) break;
        await nextTick();
      }
      // Every row up to maxId has been read, and rows never appear below it: in any id range
      // the database can only have fewer rows than we know of, never others.
      if (scan) {
        this.scanDue = false;
        const started = Date.now();
        const end = this.maxId + 1;
        for (let from = 0; from < end; from += SLICE) {
          this.checkRange(from, Math.min(from + SLICE, end), change);
          await nextTick();
        }
        this.lastScanEnd = Date.now();
        this.lastScanMs = this.lastScanEnd - started;
      }
    } finally {
      this.busy = false;
    }
    if (change.added.length > 0 || change.removed.length > 0) this.emit("change", change);
    return change;
  }

  /** Finds deleted rows in [from, to): counts, narrowed down by quarters to single blocks. */
  private checkRange(from: number, to: number, change: StoreChange): void {
    const ours = this.known(from, to);
    if (ours === 0 || this.db.countIds(from, to) === ours) return;
    if (to - from <= BLOCK) {
      const live = this.db.idsBetween(from, to);
      let i = 0;
      for (let id = from; id < to; id++) {
        if (live[i] === id) {
          i++;
          continue;
        }
        const hash = this.byId.get(id);
        if (hash !== undefined) this.remove(id, hash, change);
      }
      return;
    }
    const step = Math.max(BLOCK, Math.ceil((to - from) / 4 / BLOCK) * BLOCK);
    for (let f = from; f < to; f += step) this.checkRange(f, Math.min(f + step, to), change);
  }

  /** How many rows we know of in [from, to): whole blocks from their counts, the rest one by one. */
  private known(from: number, to: number): number {
    let n = 0;
    let id = from;
    while (id < to) {
      const block = Math.floor(id / BLOCK);
      const blockEnd = (block + 1) * BLOCK;
      if (id === block * BLOCK && blockEnd <= to) {
        n += this.blockCounts[block] ?? 0;
        id = blockEnd;
      } else {
        for (const end = Math.min(blockEnd, to); id < end; id++) if (this.byId.has(id)) n++;
      }
    }
    return n;
  }

  private add(row: { id: number; hashPart: string }, change: StoreChange): void {
    const hash = row.hashPart;
    this.byId.set(row.id, hash);
    const block = Math.floor(row.id / BLOCK);
    this.blockCounts[block] = (this.blockCounts[block] ?? 0) + 1;
    this.ids.set(hash, row.id); // a re-added path: its new row
    this.maxId = row.id;
    change.added.push(hash);
  }

  private remove(id: number, hash: string, change: StoreChange): void {
    this.byId.delete(id);
    this.blockCounts[Math.floor(id / BLOCK)]!--;
    // The old row of a path re-added since (seen first) takes nothing away.
    if (this.ids.get(hash) !== id) return;
    this.ids.delete(hash);
    change.removed.push(hash);
  }
}
