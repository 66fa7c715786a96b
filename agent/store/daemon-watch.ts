// The store's valid paths as the Nix daemon lists them (QueryAllValidPaths), for the mesh
// summary. The list is fetched again when the store directory gains or loses entries (inotify)
// and every 30 s in any case, since a watch can miss events or fail. A listing costs time in
// proportion to the store (1M paths: ~70 MB of reply, seconds of the daemon's and our CPU), so
// after one that took T the next waits at least 2T (and 1 s), counted from its end; and while
// events keep coming (a GC deletes a path after another for minutes) it waits for T of quiet
// (and 1 s), up to 10T (at most 30 s): a store that is expensive to list is listed once the storm is over,
// not over and over during it. Lookups use the list only while Nix's database is unchanged since
// it was asked for (see listedVersion), so a deleted path is a miss at once; only the summary and
// the path count wait. The reply is decoded as it arrives and compared with the last in slices,
// with the event loop free in between.
import { EventEmitter } from "node:events";
import { watch, type FSWatcher } from "node:fs";
import type { DaemonClient } from "./daemon-client.js";
import * as packed from "./packed-hash-parts.js";
import type { PathWatcher } from "./metadata.js";
import type { StoreChange } from "./watch.js";

export interface DaemonWatcherOptions {
  /**
   * Least time between the end of a listing and the next (default 1 s; at least twice the last
   * listing's time), and the least quiet time after a directory event before a listing (also at
   * least the last listing's time).
   */
  minGapMs?: number;
  /** Listing interval without any directory event, and the longest a storm of events holds one back (default 30 s). */
  intervalMs?: number;
  /** The database's version (db-version.ts), read before each listing is asked for: see listedVersion. */
  dbVersion?: () => string | undefined;
}

/**
 * The check and the diff of a listing run in slices of about 2 ms (a count of records would be
 * 5-15 ms a slice on a busy machine: 50,000 records of the diff took that here), looking at the
 * clock every 1,000 records, and yield to the event loop in between.
 */
const SLICE_MS = 2;
const CHECK_EVERY = 1000;
/** A storm of directory events holds the next listing back by up to this many listings' time. */
const STORM_WAIT = 10;
const nextTick = () => new Promise<void>((resolve) => setImmediate(resolve));

/** A pause() that yields to the event loop once SLICE_MS have passed since the last yield. */
function slicer(): () => Promise<void> {
  let start = performance.now();
  return async () => {
    if (performance.now() - start < SLICE_MS) return;
    await nextTick();
    start = performance.now();
  };
}

export class DaemonWatcher extends EventEmitter<{ change: [StoreChange]; error: [Error] }> implements PathWatcher {
  /** The last listing, sorted and packed (see packed-hash-parts.ts). */
  private current: Buffer = Buffer.alloc(0);
  private chain: Promise<unknown> = Promise.resolve();
  private lastRun = 0;
  /** How long the last listing took, from asking to the end of the diff. */
  private lastDuration = 0;
  private pending: NodeJS.Timeout | undefined;
  /** The first and the last change signal since the last listing started (0: none). */
  private firstSignal = 0;
  private lastSignal = 0;
  /** A signal from the interval: no need to wait for quiet. */
  private urgent = false;
  private busy = false;
  private interval: NodeJS.Timeout | undefined;
  private fsWatcher: FSWatcher | undefined;
  private readonly minGapMs: number;
  private readonly intervalMs: number;
  private readonly dbVersion: () => string | undefined;
  /**
   * The database's version before the last complete listing was asked for (undefined: unknown).
   * While the database still has that version, the listing is exactly the store's valid paths.
   */
  listedVersion: string | undefined;

  constructor(
    private readonly client: DaemonClient,
    /** The store directory's real location (under the store root). */
    private readonly realStoreDir: string,
    opts: DaemonWatcherOptions = {},
  ) {
    super();
    this.minGapMs = opts.minGapMs ?? 1000;
    this.intervalMs = opts.intervalMs ?? 30_000;
    this.dbVersion = opts.dbVersion ?? (() => undefined);
  }

  *hashParts(): IterableIterator<string> {
    const list = this.current;
    for (let i = 0; i < packed.count(list); i++) yield packed.hashPartAt(list, i);
  }

  get size(): number {
    return packed.count(this.current);
  }

  has(hashPart: string): boolean {
    return packed.includes(this.current, hashPart);
  }

  get running(): boolean {
    return this.interval !== undefined;
  }

  start(): this {
    if (this.running) return this;
    // Without a listing pending or under way (a storm of events has its own bound).
    this.interval = setInterval(() => this.firstSignal || this.busy || this.signal(true), this.intervalMs).unref();
    try {
      this.fsWatcher = watch(this.realStoreDir, { persistent: false }, () => this.signal(false));
      this.fsWatcher.on("error", (e) => this.emit("error", e));
    } catch (e) {
      // e.g. out of inotify watches: the interval still keeps the list current.
      this.emit("error", e as Error);
    }
    return this;
  }

  stop(): void {
    clearInterval(this.interval);
    clearTimeout(this.pending);
    this.interval = this.pending = undefined;
    this.fsWatcher?.close();
    this.fsWatcher = undefined;
  }

  /** Lists the valid paths now (after any listing under way) and returns (and emits) what changed. */
  refresh(): Promise<StoreChange> {
    const next = this.chain.then(() => this.load());
    this.chain = next.catch(() => {});
    return next;
  }

  /** The store may have changed: a listing when due() says (one timer, however many signals). */
  private signal(urgent: boolean): void {
    const now = Date.now();
    if (!this.firstSignal) this.firstSignal = now;
    this.lastSignal = now;
    this.urgent ||= urgent;
    if (!this.pending && !this.busy) this.arm();
  }

  /** When the next listing may start, for the signals so far (see the top of this file). */
  private due(): number {
    const gap = Math.max(this.minGapMs, 2 * this.lastDuration);
    const latest = this.firstSignal + Math.min(this.intervalMs, Math.max(gap, STORM_WAIT * this.lastDuration));
    // Quiet as long as a listing takes: a pause between two bursts of deletions is no reason to list.
    const quiet = this.urgent ? 0 : this.lastSignal + Math.max(this.minGapMs, this.lastDuration);
    return Math.max(this.lastRun + gap, Math.min(quiet, latest));
  }

  private arm(): void {
    this.pending = setTimeout(() => {
      this.pending = undefined;
      if (this.busy || !this.firstSignal) return; // the listing under way re-arms at its end
      if (Date.now() < this.due()) return this.arm(); // more signals came: wait on
      // A listing that stop() and the client's close() cut short is nobody's error.
      this.refresh().catch((e: Error) => this.running && this.emit("error", e));
    }, Math.max(0, this.due() - Date.now()));
    this.pending.unref();
  }

  private async load(): Promise<StoreChange> {
    // Signals from now on may not be in this listing: they prompt the next one.
    this.firstSignal = this.lastSignal = 0;
    this.urgent = false;
    this.busy = true;
    try {
      return await this.list();
    } finally {
      this.busy = false;
      if (this.firstSignal && !this.pending && this.running) this.arm();
    }
  }

  private async list(): Promise<StoreChange> {
    const started = Date.now();
    const version = this.dbVersion();
    const listed = await this.client.queryAllValidHashParts();
    const pause = slicer();
    const next = await packed.sortedUnique(listed, pause, CHECK_EVERY);
    const change: StoreChange = { added: [], removed: [] };
    // A merge of the two sorted lists, a slice at a time.
    const old = this.current;
    const [m, n] = [packed.count(old), packed.count(next)];
    for (let i = 0, j = 0, step = 0; i < m || j < n; step++) {
      const c = i === m ? 1 : j === n ? -1 : packed.compareAt(old, i, next, j);
      if (c < 0) change.removed.push(packed.hashPartAt(old, i++));
      else if (c > 0) change.added.push(packed.hashPartAt(next, j++));
      else {
        i++;
        j++;
      }
      if (step % CHECK_EVERY === CHECK_EVERY - 1) await pause();
    }
    // Only now: until the comparison is done, has() answers from the last complete listing.
    this.current = next;
    this.listedVersion = version;
    this.lastRun = Date.now();
    this.lastDuration = this.lastRun - started;
    if (change.added.length > 0 || change.removed.length > 0) this.emit("change", change);
    return change;
  }
}
