// NixDb (agent/store/db.ts, Node's node:sqlite) on the database real Nix writes: read-only, current
// while Nix holds it open in WAL mode, never created when missing, and quiet on stderr.
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { pathToFileURL } from "node:url";
import { NixDb } from "../agent/store/db.js";
import { hashPartOf } from "../protocol/store-path.js";
import { eventually } from "./helpers/fleet.js";
import { addToStore, needNix, pathInfo, run, tempDir } from "./helpers/nix.js";

test("reads the database read-only while Nix holds it open, and sees Nix's writes at once", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  t.after(tmp.cleanup);
  const root = join(tmp.dir, "store");
  const file = (name: string) => {
    writeFileSync(join(tmp.dir, name), `${name}\n`);
    return join(tmp.dir, name);
  };
  const a = await addToStore(root, file("a"));
  // nix-store --serve keeps the store's database open (its -wal and -shm files exist) until stdin closes.
  const serve = spawn("nix-store", ["--store", root, "--serve", "--write"], { stdio: ["pipe", "ignore", "ignore"] });
  t.after(() => serve.stdin!.end());
  const dbFile = join(root, "nix/var/nix/db/db.sqlite");
  await eventually("Nix has the database open in WAL mode", async () => existsSync(`${dbFile}-wal`) && existsSync(`${dbFile}-shm`), 10_000);

  const db = new NixDb(root);
  t.after(() => db.close());
  assert.equal(db.pathCount(), 1);
  const row = db.pathByHashPart(hashPartOf(a));
  const [info] = await pathInfo(root, [a]);
  assert.equal(row?.path, a);
  assert.equal(row?.narSize, info!.narSize);
  assert.match(row?.hash ?? "", /^sha256:[0-9a-f]{64}$/);
  assert.deepEqual(db.references(row!.id), []);
  assert.equal(db.pathByHashPart("0".repeat(32)), undefined);

  // Another Nix process adds a path: the handle opened before sees it at once.
  const v0 = db.dataVersion();
  const b = (await run("nix-store", ["--store", root, "--add", file("b")])).trim();
  assert.equal(db.pathCount(), 2);
  assert.deepEqual(db.hashPartsAfter(row!.id).map((r) => r.hashPart), [hashPartOf(b)]);
  assert.notEqual(db.dataVersion(), v0, "Nix's commit changes data_version, which the watcher polls");
  assert.equal(db.pathByHashPart(hashPartOf(b))?.path, b);
  assert.ok(existsSync(`${dbFile}-wal`), "Nix still has it open");
});

test("a missing database is an error, and no empty one is created", (t) => {
  const tmp = tempDir();
  t.after(tmp.cleanup);
  assert.throws(() => new NixDb(tmp.dir), /unable to open database file/);
  assert.equal(existsSync(join(tmp.dir, "nix/var/nix/db/db.sqlite")), false);
});

test("opening the database prints nothing on stderr (the agent's log stays JSON lines)", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  t.after(tmp.cleanup);
  const root = join(tmp.dir, "store");
  writeFileSync(join(tmp.dir, "a"), "a\n");
  await addToStore(root, join(tmp.dir, "a"));
  // A fresh process: a warning about node:sqlite (Node 22 prints an ExperimentalWarning) comes once.
  const dbModule = pathToFileURL(join(import.meta.dirname, "../agent/store/db.js")).href;
  const script = `const { NixDb } = await import(${JSON.stringify(dbModule)}); console.log(new NixDb(${JSON.stringify(root)}).pathCount());`;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: ["ignore", "pipe", "pipe"] });
  let stdout = "";
  let stderr = "";
  child.stdout.on("data", (d: Buffer) => (stdout += d));
  child.stderr.on("data", (d: Buffer) => (stderr += d));
  const code = await new Promise<number | null>((resolve) => child.on("exit", resolve));
  assert.equal(code, 0, stderr);
  assert.equal(stdout.trim(), "1");
  assert.equal(stderr, "");
});
