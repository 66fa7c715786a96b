// A bounded map that keeps about the most recently used entries: when full, it evicts the oldest
// entry not used since it was last passed over ("second chance", the CLOCK page-replacement
// policy). A hit only sets a flag on its entry. Moving the entry to the end of a Map on every hit,
// as an exact LRU does, cost the daemon backend about 2 µs of CPU a narinfo hit at 4 connections:
// each delete and set leaves a hole that makes V8 rebuild the Map's table every few dozen hits,
// and the garbage it made (and kept alive) drove the young generation to double and full
// collections to run several times a second (BENCHMARKS.md, "Daemon backend").

interface Slot<V> {
  value: V;
  used: boolean;
}

export class RecentlyUsed<K, V> {
  /** Insertion order: the oldest first (an entry passed over is inserted again, at the end). */
  private readonly slots = new Map<K, Slot<V>>();

  constructor(readonly capacity: number) {
    if (!(capacity >= 1)) throw new RangeError(`capacity must be at least 1, not ${capacity}`);
  }

  get size(): number {
    return this.slots.size;
  }

  /** The entry's value, marked as used (kept over entries not used since). */
  get(key: K): V | undefined {
    const slot = this.slots.get(key);
    if (slot === undefined) return undefined;
    slot.used = true;
    return slot.value;
  }

  /** The value without marking it used. */
  peek(key: K): V | undefined {
    return this.slots.get(key)?.value;
  }

  /** Sets the entry (a new one counts as used once it is asked for); evicts one first if full. */
  set(key: K, value: V): void {
    const slot = this.slots.get(key);
    if (slot !== undefined) {
      slot.value = value;
      return;
    }
    if (this.slots.size >= this.capacity) this.evictOne();
    this.slots.set(key, { value, used: false });
  }

  delete(key: K): boolean {
    return this.slots.delete(key);
  }

  /**
   * Evicts the oldest entry not used since it was last passed over; the used ones passed over go
   * to the end, unmarked. At most PASS_OVER of them an eviction, so that one set() never walks a
   * big map (100,000 entries all used: milliseconds): after that the next one goes, used or not.
   */
  private evictOne(): void {
    let passed = 0;
    for (const [key, slot] of this.slots) {
      this.slots.delete(key);
      if (!slot.used || ++passed > PASS_OVER) return;
      slot.used = false;
      this.slots.set(key, slot); // visited again by this loop only after every older entry
    }
  }
}

/** Used entries an eviction may pass over before it evicts one anyway. */
const PASS_OVER = 32;
