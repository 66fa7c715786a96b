// A store with a few hundred thousand valid paths (FLEETCACHE_SCALE_PATHS, default 200,000; the
// gc-stall benchmark uses a million): paths deleted in many small transactions (as GC does)
// leave the watcher, the mesh summary and the agent's answers; new and re-added paths arrive;
// the database watcher does its work in slices with the event loop free in between; the daemon
// backend's listing agrees with the database. Timings are the benchmark's business, not asserted.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { pino } from "pino";
import { generateKeyPair } from "../protocol/keys.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { SummaryPublisher, SummaryTable } from "../agent/mesh/summary-service.js";
import { DaemonClient } from "../agent/store/daemon-client.js";
import { DaemonWatcher } from "../agent/store/daemon-watch.js";
import { NixDb } from "../agent/store/db.js";
import { StoreWatcher, type StoreChange } from "../agent/store/watch.js";
import { startAgentProcess } from "./helpers/agent.js";
import { eventually } from "./helpers/fleet.js";
import { addToStore, hasNix, needNix, tempDir } from "./helpers/nix.js";
import { Daemon } from "./helpers/nix-daemon.js";
import { addSyntheticPaths, deleteInSmallTransactions, sql } from "./helpers/scale-store.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const PATHS = Number(process.env.FLEETCACHE_SCALE_PATHS ?? 200_000);
const log = pino({ level: "silent" });
const tmp = tempDir();
const root = join(tmp.dir, "store");
let realPath = "";
const cleanups: (() => unknown)[] = [];
after(async () => {
  for (const c of cleanups.reverse()) await c();
  tmp.cleanup();
});

before(async () => {
  if (!(await hasNix())) return;
  writeFileSync(join(tmp.dir, "real"), "a path Nix added\n");
  realPath = await addToStore(root, join(tmp.dir, "real"));
  await addSyntheticPaths(root, PATHS);
});

/** The hash parts of the valid paths, as the database has them now. */
async function dbHashParts(): Promise<Set<string>> {
  return new Set((await sql(root, "SELECT substr(path, 12, 32) FROM ValidPaths")).split("\n").filter(Boolean));
}

async function rows(where: string, limit = -1): Promise<{ id: number; path: string }[]> {
  return (await sql(root, `SELECT id, path FROM ValidPaths WHERE ${where} ORDER BY id LIMIT ${limit}`)).split("\n").filter(Boolean).map((l) => {
    const [id, path] = l.split("|");
    return { id: Number(id), path: path! };
  });
}

const hashOf = (p: string) => p.slice(11, 43);

/** What a consumer of "change" events (the summary publisher) ends up with: net per event, as it nets. */
function follow(start: Iterable<string>, source: { on(e: "change", l: (c: StoreChange) => void): unknown }): Set<string> {
  const set = new Set(start);
  source.on("change", (c) => {
    const net = new Map<string, number>();
    for (const h of c.added) net.set(h, (net.get(h) ?? 0) + 1);
    for (const h of c.removed) net.set(h, (net.get(h) ?? 0) - 1);
    for (const [h, n] of net) {
      if (n > 0) set.add(h);
      else if (n < 0) set.delete(h);
    }
  });
  return set;
}

function assertSameSet(actual: Set<string>, expected: Set<string>, what: string): void {
  const missing = [...expected].filter((h) => !actual.has(h));
  const extra = [...actual].filter((h) => !expected.has(h));
  assert.deepEqual({ missing: missing.slice(0, 5), extra: extra.slice(0, 5), sizes: [actual.size, expected.size] },
    { missing: [], extra: [], sizes: [expected.size, expected.size] }, what);
}

test("database watcher: GC in small transactions, new rows and re-added paths reach the watcher and a peer's summary table", async (t) => {
  if (!(await needNix(t))) return;
  const db = new NixDb(root);
  const watcher = new StoreWatcher(db, 50);
  cleanups.push(() => (watcher.stop(), db.close()));
  assert.equal(watcher.size, PATHS + 1);
  const seen = follow(watcher.hashParts(), watcher);

  // The summary a peer holds of this store, over a real mesh connection on loopback.
  const ka = generateKeyPair("scale-a-1");
  const kb = generateKeyPair("scale-b-1");
  const nodes: MeshNode[] = [];
  for (const [k, trusted] of [[ka, kb], [kb, ka]] as const) nodes.push(await createMeshNode({ key: k, trusted: [trusted], listen: "/ip4/127.0.0.1/tcp/0", log }));
  cleanups.push(() => Promise.allSettled(nodes.map((n) => n.stop())));
  const [a, b] = nodes as [MeshNode, MeshNode];
  await connectBoth(b, a);
  const publisher = new SummaryPublisher(a, watcher, log);
  await publisher.start();
  const table = new SummaryTable(b, log);
  cleanups.push(() => (publisher.stop(), table.stop()));
  const aId = a.peerId.toString();
  table.subscribe(aId);
  await eventually("the snapshot at the peer", async () => table.pathCount(aId) === PATHS + 1);

  // GC: 1 % of the paths, spread over the whole table, one transaction each, while the watcher polls.
  const doomed = await rows("id % 100 = 7");
  watcher.start();
  await deleteInSmallTransactions(root, doomed.map((r) => r.id));
  // New rows, and paths re-added: two deleted earlier, and two deleted and re-added between polls.
  await addSyntheticPaths(root, 500, PATHS);
  const flapping = await rows("id % 100 = 9", 2);
  await sql(root, ["BEGIN;", ...[...doomed.slice(0, 2), ...flapping].map((r) => `DELETE FROM ValidPaths WHERE path = '${r.path}'; INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES ('${r.path}', 'sha256:${"0".repeat(64)}', 1, 1);`), "COMMIT;"].join("\n"));
  watcher.stop();
  await watcher.poll();

  const expected = await dbHashParts();
  assert.equal(expected.size, PATHS + 1 - doomed.length + 2 + 500);
  assertSameSet(new Set(watcher.hashParts()), expected, "the watcher's paths");
  assertSameSet(seen, expected, "what the change events add up to");
  for (const r of doomed.slice(2, 50)) assert.ok(!watcher.has(hashOf(r.path)), r.path);
  for (const r of [...doomed.slice(0, 2), ...flapping]) assert.ok(watcher.has(hashOf(r.path)), `re-added ${r.path}`);
  await eventually("the peer's summary to follow", async () => table.pathCount(aId) === expected.size);
  for (const r of doomed.slice(2, 50)) assert.deepEqual(table.holders(hashOf(r.path)), [], r.path);
  for (const r of [...doomed.slice(0, 2), ...flapping]) assert.deepEqual(table.holders(hashOf(r.path)), [aId], r.path);

  // A pass over the whole table leaves the event loop free between slices (a synchronous
  // rescan, as before, let nothing run until it was done).
  await deleteInSmallTransactions(root, (await rows("id % 100 = 11")).map((r) => r.id), 50);
  let ticks = 0;
  let counting = true;
  const tick = () => {
    ticks++;
    if (counting) setImmediate(tick);
  };
  setImmediate(tick);
  const change = await watcher.poll();
  counting = false;
  assert.ok(change.removed.length > 0);
  assert.ok(ticks >= PATHS / 16384, `${ticks} turns of the event loop during the pass`);
  assertSameSet(new Set(watcher.hashParts()), await dbHashParts(), "after the second GC");
});

test("agent on the big store (database backend): deleted paths are 404, new ones found, counts and the event-loop metric exported", async (t) => {
  if (!(await needNix(t))) return;
  const started = Date.now();
  const agent = await startAgentProcess(["--store-root", root, "--state-dir", join(tmp.dir, "state")]);
  cleanups.push(() => agent.stop());
  t.diagnostic(`agent serving ${PATHS} paths after ${Date.now() - started} ms`);
  const get = async (p: string) => (await fetch(`${agent.url}/${hashOf(p)}.narinfo`)).status;
  const status = async () => ((await (await fetch(`${agent.url}/api/v1/status`)).json()) as { self: { paths: number } }).self.paths;
  const loopSamples = async () => Number(/^fleetcache_event_loop_delay_seconds_count (\d+)$/m.exec(await (await fetch(`${agent.url}/metrics`)).text())?.[1]);

  const live = await rows("id % 1000 = 5");
  assert.equal(await get(realPath), 200);
  for (const r of live.slice(0, 20)) assert.equal(await get(r.path), 200, r.path);
  assert.equal(await status(), (await dbHashParts()).size);
  const samples = await loopSamples();
  assert.ok(Number.isInteger(samples), "fleetcache_event_loop_delay_seconds is exported");

  await deleteInSmallTransactions(root, live.map((r) => r.id));
  await addSyntheticPaths(root, 100, PATHS + 10_000);
  const fresh = await rows(`path LIKE '%-scale-${PATHS + 10_050}'`);
  assert.equal(fresh.length, 1);
  const count = (await dbHashParts()).size;
  await eventually("the agent's count to follow the database", async () => (await status()) === count);
  for (const r of live.slice(0, 50)) assert.equal(await get(r.path), 404, r.path);
  assert.equal(await get(fresh[0]!.path), 200);
  await eventually("the event-loop histogram's next sample (one a second)", async () => (await loopSamples()) > samples);
});

test("daemon backend: the listing of the big store equals the database, and follows GC, new and re-added paths", async (t) => {
  if (!(await needNix(t))) return;
  const daemon = new Daemon(root);
  await daemon.start();
  cleanups.push(() => daemon.stop());
  const client = new DaemonClient(daemon.socket);
  const watcher = new DaemonWatcher(client, join(root, "nix/store"));
  cleanups.push(() => (watcher.stop(), client.close()));
  await watcher.refresh();
  assertSameSet(new Set(watcher.hashParts()), await dbHashParts(), "first listing");
  const seen = follow(watcher.hashParts(), watcher);

  const doomed = await rows("id % 100 = 13");
  await deleteInSmallTransactions(root, doomed.map((r) => r.id));
  await addSyntheticPaths(root, 300, PATHS + 20_000);
  await sql(root, doomed.slice(0, 3).map((r) => `INSERT INTO ValidPaths (path, hash, registrationTime, narSize) VALUES ('${r.path}', 'sha256:${"0".repeat(64)}', 1, 1);`).join("\n"));
  const change = await watcher.refresh();
  assert.equal(change.removed.length, doomed.length - 3);
  assert.equal(change.added.length, 300);
  const expected = await dbHashParts();
  assertSameSet(new Set(watcher.hashParts()), expected, "second listing");
  assertSameSet(seen, expected, "what the change events add up to");
  assert.equal(watcher.size, expected.size);
  assert.ok(!watcher.has(hashOf(doomed[5]!.path)) && watcher.has(hashOf(doomed[0]!.path)) && watcher.has(hashOf(realPath)));
  assert.ok(!watcher.has("not a hash part"));
});
