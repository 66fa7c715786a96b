// Notices paths entering and leaving the store (builds, downloads, garbage collection) by polling
// the database: new rows have higher ids, and a row count below what we hold means some were
// deleted, which a rescan of the ids finds. Cheap enough to run every half second.
import { EventEmitter } from "node:events";
import type { NixDb } from "./db.js";
import { hashPartOf } from "../../protocol/store-path.js";

export interface StoreChange {
  /** Hash parts (32 nix32 characters) of paths that became valid. */
  added: string[];
  /** Hash parts of paths that are no longer valid. */
  removed: string[];
}

export class StoreWatcher extends EventEmitter<{ change: [StoreChange]; error: [Error] }> {
  private readonly byId = new Map<number, string>();
  /** Hash part -> row id of the valid path. */
  private readonly ids = new Map<string, number>();
  private maxId = 0;
  private timer: NodeJS.Timeout | undefined;

  constructor(
    private readonly db: NixDb,
    private readonly intervalMs = 500,
  ) {
    super();
    this.poll(); // the initial load: everything is "added"
  }

  /** Hash parts of every valid path, as of the last poll. */
  hashParts(): IterableIterator<string> {
    return this.byId.values();
  }

  get size(): number {
    return this.byId.size;
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
      try {
        this.poll();
      } catch (e) {
        this.emit("error", e as Error);
      }
    }, this.intervalMs);
    this.timer.unref();
    return this;
  }

  stop(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  /** Brings the view up to date and returns (and emits, when non-empty) what changed. */
  poll(): StoreChange {
    const change: StoreChange = { added: [], removed: [] };
    for (const row of this.db.pathsAfter(this.maxId)) {
      const hash = hashPartOf(row.path);
      this.byId.set(row.id, hash);
      this.ids.set(hash, row.id);
      this.maxId = row.id;
      change.added.push(hash);
    }
    if (this.db.pathCount() !== this.byId.size) {
      const live = new Set(this.db.pathsAfter(0).map((r) => r.id));
      for (const [id, hash] of this.byId) {
        if (!live.has(id)) {
          this.byId.delete(id);
          change.removed.push(hash);
        }
      }
      // A hash part is gone only if no live row has it (a re-added path has a new row).
      for (const hash of change.removed) this.ids.delete(hash);
      for (const [id, hash] of this.byId) this.ids.set(hash, id);
    }
    if (change.added.length > 0 || change.removed.length > 0) this.emit("change", change);
    return change;
  }
}
