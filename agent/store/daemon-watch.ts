// The store's valid paths as the Nix daemon lists them (QueryAllValidPaths), for the mesh
// summary. The list is fetched again when the store directory gains or loses entries (inotify,
// at most once a second) and every 30 s in any case, since a watch can miss events or fail.
import { EventEmitter } from "node:events";
import { watch, type FSWatcher } from "node:fs";
import type { DaemonClient } from "./daemon-client.js";
import { hashPartOf } from "../../protocol/store-path.js";
import type { PathWatcher } from "./metadata.js";
import type { StoreChange } from "./watch.js";

export interface DaemonWatcherOptions {
  /** Least time between two listings prompted by the directory watch (default 1 s). */
  minGapMs?: number;
  /** Listing interval without any directory event (default 30 s). */
  intervalMs?: number;
}

export class DaemonWatcher extends EventEmitter<{ change: [StoreChange]; error: [Error] }> implements PathWatcher {
  private current = new Set<string>();
  private chain: Promise<unknown> = Promise.resolve();
  private lastRun = 0;
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

  hashParts(): IterableIterator<string> {
    return this.current.values();
  }

  get size(): number {
    return this.current.size;
  }

  has(hashPart: string): boolean {
    return this.current.has(hashPart);
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
    const wait = Math.max(delayMs, this.lastRun + this.minGapMs - Date.now(), 0);
    this.pending = setTimeout(() => {
      this.pending = undefined;
      this.refresh().catch((e: Error) => this.emit("error", e));
    }, wait);
    this.pending.unref();
  }

  private async load(): Promise<StoreChange> {
    this.lastRun = Date.now();
    const paths = await this.client.queryAllValidPaths();
    const next = new Set(paths.map(hashPartOf));
    const change: StoreChange = { added: [], removed: [] };
    for (const h of next) if (!this.current.has(h)) change.added.push(h);
    for (const h of this.current) if (!next.has(h)) change.removed.push(h);
    this.current = next;
    if (change.added.length > 0 || change.removed.length > 0) this.emit("change", change);
    return change;
  }
}
