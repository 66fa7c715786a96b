// The store's valid paths as the Nix daemon lists them (QueryAllValidPaths), for the mesh
// summary. The list is fetched again when the store directory gains or loses entries (inotify)
// and every 30 s in any case, since a watch can miss events or fail. A listing costs time in
// proportion to the store (1M paths: ~70 MB of reply, seconds of the daemon's and our CPU), so
// after one that took T the next waits at least 2T (and 1 s), and the reply is decoded as it
// arrives and compared with the last in slices, with the event loop free in between.
import { EventEmitter } from "node:events";
import { watch, type FSWatcher } from "node:fs";
import type { DaemonClient } from "./daemon-client.js";
import * as packed from "./packed-hash-parts.js";
import type { PathWatcher } from "./metadata.js";
import type { StoreChange } from "./watch.js";

export interface DaemonWatcherOptions {
  /** Least time between two listings prompted by the directory watch (default 1 s; at least twice the last listing's time). */
  minGapMs?: number;
  /** Listing interval without any directory event (default 30 s). */
  intervalMs?: number;
}

/** Records compared per slice of the diff (a few ms). */
const SLICE = 50_000;
const nextTick = () => new Promise<void>((resolve) => setImmediate(resolve));

export class DaemonWatcher extends EventEmitter<{ change: [StoreChange]; error: [Error] }> implements PathWatcher {
  /** The last listing, sorted and packed (see packed-hash-parts.ts). */
  private current: Buffer = Buffer.alloc(0);
  private chain: Promise<unknown> = Promise.resolve();
  private lastRun = 0;
  /** How long the last listing took, from asking to the end of the diff. */
  private lastDuration = 0;
  private pending: NodeJS.Timeout | undefined;
  private interval: NodeJS.Timeout | undefined;
  private fsWatcher: FSWatcher | undefined;
  private readonly minGapMs: number;
  private readonly intervalMs: number;

  constructor(
    private readonly client: DaemonClient,
    /** The store directory's real location (under the store root). */
    private readonly realStoreDir: string,
    opts: DaemonWatcherOptions = {},
  ) {
    super();
    this.minGapMs = opts.minGapMs ?? 1000;
    this.intervalMs = opts.intervalMs ?? 30_000;
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
    this.interval = setInterval(() => this.schedule(0), this.intervalMs).unref();
    try {
      this.fsWatcher = watch(this.realStoreDir, { persistent: false }, () => this.schedule(this.minGapMs));
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

  /** A listing `delayMs` from now, but not sooner than minGapMs after the last one; one at a time. */
  private schedule(delayMs: number): void {
    if (this.pending) return;
    const gap = Math.max(this.minGapMs, 2 * this.lastDuration);
    const wait = Math.max(delayMs, this.lastRun + gap - Date.now(), 0);
    this.pending = setTimeout(() => {
      this.pending = undefined;
      this.refresh().catch((e: Error) => this.emit("error", e));
    }, wait);
    this.pending.unref();
  }

  private async load(): Promise<StoreChange> {
    const started = Date.now();
    const next = await packed.sortedUnique(await this.client.queryAllValidHashParts(), nextTick, SLICE);
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
      if (step % SLICE === SLICE - 1) await nextTick();
    }
    // Only now: until the comparison is done, has() answers from the last complete listing.
    this.current = next;
    this.lastRun = Date.now();
    this.lastDuration = this.lastRun - started;
    if (change.added.length > 0 || change.removed.length > 0) this.emit("change", change);
    return change;
  }
}
