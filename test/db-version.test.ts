// The database version the daemon backend's cache trusts (agent/store/db-version.ts), on plain
// files standing in for db.sqlite and its WAL, with their times set: every write the version
// must see, a write too recent to vouch for, and a WAL deleted and made anew while it is kept open.
// (Against Nix's own writes: daemon-store.test.ts.)
import { test } from "node:test";
import assert from "node:assert/strict";
import { appendFileSync, rmSync, utimesSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { DbVersion, nativeLooks, SETTLED_MS } from "../agent/store/db-version.js";
import { tempDir } from "./helpers/nix.js";

// Looks with the addon (native/file-version.c) and with fs.fstatSync must see the same.
for (const native of [true, false]) {
  test(`the database version changes with every write to the WAL or the database, and vouches only for settled files (${native ? "addon" : "fstatSync"})`, (t) => {
    if (native && !nativeLooks) {
      // CI builds the addon (.ci/run): a build that silently failed must not pass as a skip.
      assert.ok(process.env.CI !== "true", "the file_version addon is not built (build/Release/file_version.node)");
      return t.skip("the file_version addon is not built");
    }
    const tmp = tempDir();
    const db = join(tmp.dir, "db.sqlite");
    const wal = join(tmp.dir, "db.sqlite-wal");
    // Sets a file's times `ago` ms in the past (as if written then).
    const age = (file: string, ago: number) => {
      const t = (Date.now() - ago) / 1000;
      utimesSync(file, t, t);
    };
    const version = new DbVersion(tmp.dir, { native });
    try {
      assert.equal(version.current(), undefined, "no database");
      writeFileSync(db, "database");
      age(db, 10_000);
      const noWal = version.current();
      assert.ok(noWal, "no WAL: the database file's version");
      assert.equal(version.current(), noWal, "nothing written: the same");

      writeFileSync(wal, "frame 1");
      assert.equal(version.current(), undefined, "a WAL just written vouches for nothing");
      age(wal, SETTLED_MS + 1000);
      const v1 = version.current();
      assert.ok(v1 && v1 !== noWal);
      assert.equal(version.current(), v1);

      // Written in place (same size: as after a checkpoint) and older than SETTLED_MS: the time tells.
      writeFileSync(wal, "frame 2");
      age(wal, SETTLED_MS + 500);
      const v2 = version.current();
      assert.ok(v2 && v2 !== v1, "a write of the same size");

      const past = (Date.now() - SETTLED_MS - 5000) / 1000;
      utimesSync(wal, past, past);
      const v2b = version.current();
      appendFileSync(wal, ", frame 3");
      utimesSync(wal, past, past); // the same time as before: the size tells
      const v3 = version.current();
      assert.ok(v3 && v2b && v3 !== v2b, "an append");

      // The WAL deleted and made anew while the version keeps the old one open: the new one counts,
      // though its size and times are the old one's.
      rmSync(wal);
      writeFileSync(wal, "frame 2, frame 3");
      utimesSync(wal, past, past);
      const v4 = version.current();
      assert.ok(v4 && v4 !== v3, "a new WAL (another inode)");

      // The WAL gone (the last connection closed): the database file again, which the copy changed.
      rmSync(wal);
      writeFileSync(db, "database with the WAL's frames");
      age(db, SETTLED_MS + 500);
      const v5 = version.current();
      assert.ok(v5 && v5 !== v4 && v5 !== noWal);

      // A time in the future (a clock stepped back) vouches for nothing either.
      age(db, -60_000);
      assert.equal(version.current(), undefined);
    } finally {
      version.close();
      tmp.cleanup();
    }
  });
}

test("next(): one look for all the calls before it, taken after them; a call after it waits for another", async () => {
  const tmp = tempDir();
  const wal = join(tmp.dir, "db.sqlite-wal");
  const settle = () => {
    const t = (Date.now() - SETTLED_MS - 1000) / 1000;
    utimesSync(wal, t, t);
  };
  writeFileSync(join(tmp.dir, "db.sqlite"), "database");
  writeFileSync(wal, "frame 1");
  settle();
  const version = new DbVersion(tmp.dir);
  try {
    const v1 = version.current();
    const [a, b] = [version.next(), version.next()];
    assert.equal(a, b, "shared");
    appendFileSync(wal, ", frame 2"); // written after the calls, before the look
    settle();
    const v2 = await a;
    assert.ok(v2 && v2 !== v1, "the look came after the write");
    assert.equal(await b, v2);
    const c = version.next();
    assert.notEqual(c, a, "a call after the look: a look of its own");
    appendFileSync(wal, ", frame 3");
    settle();
    assert.ok((await c) !== v2);
    const d = version.next();
    version.close();
    assert.equal(await d, undefined, "closed: vouches for nothing");
  } finally {
    version.close();
    tmp.cleanup();
  }
});

test("afterLook(): one look for the runs queued before it, standing only while they are called; a run queued meanwhile waits for the next", async () => {
  const tmp = tempDir();
  const wal = join(tmp.dir, "db.sqlite-wal");
  const settle = () => {
    const t = (Date.now() - SETTLED_MS - 1000) / 1000;
    utimesSync(wal, t, t);
  };
  writeFileSync(join(tmp.dir, "db.sqlite"), "database");
  writeFileSync(wal, "frame 1");
  settle();
  const shared: number[] = [];
  const version = new DbVersion(tmp.dir, { onShared: (n) => shared.push(n) });
  try {
    const v1 = version.current();
    const seen: (string | undefined)[] = [];
    let fromNext: string | undefined;
    const done = new Promise<void>((resolve) => {
      version.afterLook(() => seen.push(version.looking ? version.looked : "not looking"));
      const promised = version.next();
      version.afterLook(() => {
        seen.push(version.looked);
        // Written after this look: a run queued now must see it.
        appendFileSync(wal, ", frame 2");
        settle();
        version.afterLook(() => {
          seen.push(version.looked);
          resolve();
        });
      });
      assert.equal(version.looking, false, "no look before the runs are called");
      appendFileSync(wal, ", frame 1b"); // after the calls, before the look
      settle();
      void promised.then((v) => (fromNext = v));
    });
    await done;
    await new Promise((r) => setImmediate(r));
    assert.equal(version.looking, false, "not after its runs");
    assert.ok(seen[0]?.startsWith("wal ") && seen[0] !== v1, `looking while runs are called, a look after the calls and the write: ${seen[0]}`);
    assert.equal(seen[1], seen[0], "one look for the runs queued before it");
    assert.ok(seen[2] !== undefined && seen[2] !== seen[1], "a run queued while runs were called: a later look");
    assert.equal(fromNext, seen[0], "next() shares afterLook()'s look");
    assert.deepEqual(shared, [3, 1], "lookups told after each look (two runs and a next(), then one)");
  } finally {
    version.close();
    tmp.cleanup();
  }
});
