// Sorted lists of store hash parts packed into one buffer (32 ASCII bytes each): how the daemon
// watcher holds a store's paths. A million paths are one 32 MB buffer instead of a million
// strings in a Set, so listing the store again creates nothing for the garbage collector to trace.
import { HASH_PART_BYTES as W } from "../../protocol/daemon-wire.js";

export const count = (list: Buffer) => list.length / W;

export const hashPartAt = (list: Buffer, i: number) => list.toString("latin1", i * W, (i + 1) * W);

/**
 * Record i of a against record j of b, bytewise (equal to string order for ASCII). In JS: random
 * hash parts differ within a byte or two, and a native Buffer.compare per record costs ~10x more.
 */
export function compareAt(a: Buffer, i: number, b: Buffer, j: number): number {
  const x = i * W;
  const y = j * W;
  for (let k = 0; k < W; k++) {
    const d = a[x + k]! - b[y + k]!;
    if (d !== 0) return d;
  }
  return 0;
}

/**
 * The list in ascending order, without duplicates. The daemon's listing normally comes sorted
 * already (SQLite reads the paths from their unique index): then it is only checked.
 */
export async function sortedUnique(list: Buffer, pause: () => Promise<void>, slice: number): Promise<Buffer> {
  const n = count(list);
  let sorted = true;
  for (let i = 1; i < n && sorted; i++) {
    sorted = compareAt(list, i - 1, list, i) < 0;
    if (i % slice === 0) await pause();
  }
  if (sorted) return list;
  const parts = [...new Set(Array.from({ length: n }, (_, i) => hashPartAt(list, i)))].sort();
  return Buffer.from(parts.join(""), "latin1");
}

export function includes(list: Buffer, hashPart: string): boolean {
  if (hashPart.length !== W) return false;
  const key = Buffer.from(hashPart, "latin1");
  let lo = 0;
  let hi = count(list) - 1;
  while (lo <= hi) {
    const mid = (lo + hi) >>> 1;
    const c = compareAt(list, mid, key, 0);
    if (c === 0) return true;
    if (c < 0) lo = mid + 1;
    else hi = mid - 1;
  }
  return false;
}
