// The store watcher sees what real Nix commands do to a store: additions, GC, re-additions.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { NixDb } from "../agent/store/db.js";
import { StoreWatcher } from "../agent/store/watch.js";
import { addToStore, needNix, run, tempDir } from "./helpers/nix.js";

const hashOf = (p: string) => p.slice(11, 43);

test("additions, deletions and re-additions are reported, with the full set kept current", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  try {
    const root = join(tmp.dir, "store");
    const file = (name: string) => {
      writeFileSync(join(tmp.dir, name), name);
      return join(tmp.dir, name);
    };
    const a = await addToStore(root, file("a"));
    const db = new NixDb(root);
    const watcher = new StoreWatcher(db);
    assert.deepEqual([...watcher.hashParts()], [hashOf(a)]);
    assert.deepEqual(await watcher.poll(), { added: [], removed: [] });

    const b = await addToStore(root, file("b"));
    const c = await addToStore(root, file("c"));
    assert.deepEqual(await watcher.poll(), { added: [hashOf(b), hashOf(c)], removed: [] });

    // One deleted and one added between two polls: the count alone would not change.
    await run("nix-store", ["--store", root, "--delete", b]);
    const d = await addToStore(root, file("d"));
    assert.deepEqual(await watcher.poll(), { added: [hashOf(d)], removed: [hashOf(b)] });
    assert.ok(!watcher.has(hashOf(b)) && watcher.has(hashOf(d)) && watcher.has(hashOf(a)));

    // Re-added: a new row, so reported as added again.
    await addToStore(root, file("b"));
    assert.deepEqual(await watcher.poll(), { added: [hashOf(b)], removed: [] });
    assert.deepEqual(new Set(watcher.hashParts()), new Set([a, b, c, d].map(hashOf)));
    assert.ok(watcher.has(hashOf(b)), "re-added");

    // Polling on a timer emits the same changes.
    watcher.start();
    const seen = new Promise((resolve) => watcher.once("change", resolve));
    await run("nix-store", ["--store", root, "--delete", c]);
    const keepAlive = setTimeout(() => {}, 10_000); // the watcher's timer does not hold the process
    assert.deepEqual(await seen, { added: [], removed: [hashOf(c)] });
    clearTimeout(keepAlive);
    watcher.stop();
    db.close();
  } finally {
    tmp.cleanup();
  }
});
