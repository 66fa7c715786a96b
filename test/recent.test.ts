// The daemon backend's answer cache (agent/store/recent.ts): bounded, keeps what was used since
// it was last passed over, and a hit does not reorder anything.
import { test } from "node:test";
import assert from "node:assert/strict";
import { RecentlyUsed } from "../agent/store/recent.js";

const keys = (c: RecentlyUsed<string, number>, all: string[]) => all.filter((k) => c.peek(k) !== undefined);

test("full: the oldest entry not used since it was passed over goes; used ones get a second chance", () => {
  const c = new RecentlyUsed<string, number>(3);
  c.set("a", 1);
  c.set("b", 2);
  c.set("c", 3);
  assert.equal(c.get("a"), 1, "a used");
  c.set("d", 4);
  assert.deepEqual(keys(c, ["a", "b", "c", "d"]), ["a", "c", "d"], "b, the oldest unused, went; a was kept");
  c.set("e", 5);
  assert.deepEqual(keys(c, ["a", "b", "c", "d", "e"]), ["a", "d", "e"], "then c");
  // a was passed over (its mark cleared): unused since, it is next.
  c.set("f", 6);
  assert.deepEqual(keys(c, ["a", "d", "e", "f"]), ["d", "e", "f"]);
  assert.equal(c.size, 3);
});

test("setting an entry again replaces its value in place; peek() and a miss mark nothing", () => {
  const c = new RecentlyUsed<string, number>(2);
  c.set("a", 1);
  c.set("b", 2);
  c.set("a", 10);
  assert.equal(c.peek("a"), 10);
  assert.equal(c.get("zz"), undefined);
  c.set("c", 3);
  assert.deepEqual(keys(c, ["a", "b", "c"]), ["b", "c"], "a, still the oldest and unused, went");
  assert.equal(c.delete("b"), true);
  assert.equal(c.size, 1);
});

test("all used: an eviction passes over a bounded number of them, then evicts; the map stays bounded", () => {
  const n = 10_000;
  const c = new RecentlyUsed<number, number>(n);
  for (let i = 0; i < n; i++) c.set(i, i);
  for (let i = 0; i < n; i++) c.get(i);
  c.set(n, n);
  assert.equal(c.size, n);
  // Passed over: at most a few dozen, not the whole map; the one evicted is among the oldest.
  let moved = 0;
  for (let i = 0; i < n; i++) if (c.peek(i) === undefined) moved = i;
  assert.ok(moved > 0 && moved < 100, `evicted entry ${moved}`);
  for (let i = 0; i < 3 * n; i++) {
    c.set(n + 1 + i, i);
    c.get(i % 7);
  }
  assert.equal(c.size, n);
  for (let k = 0; k < 7; k++) assert.notEqual(c.peek(k), undefined, `${k}, used all along, kept`);
});

test("a capacity below one is refused", () => {
  assert.throws(() => new RecentlyUsed(0), RangeError);
});
