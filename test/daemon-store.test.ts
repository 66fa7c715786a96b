// The daemon backend against a real nix-daemon serving a chroot store: the client's answers equal
// Nix's own, and an agent running as an unprivileged user (which cannot open the database) serves
// the store through the daemon, never stale, with 503 while the daemon is gone.
import { test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmodSync, chownSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { join } from "node:path";
import { Signer } from "../agent/signer.js";
import { DaemonClient } from "../agent/store/daemon-client.js";
import { encodeQueryAllValidPaths } from "../protocol/daemon-wire.js";
import { DaemonWatcher } from "../agent/store/daemon-watch.js";
import { databaseFilesVisible, DbVersion } from "../agent/store/db-version.js";
import { LocalStore } from "../agent/store/local-store.js";
import { SOON } from "../agent/source.js";
import type { PathInfo } from "../protocol/path-info.js";
import type { StoreChange } from "../agent/store/watch.js";
import { runCli, startAgentProcess } from "./helpers/agent.js";
import { plainAndBuiltPaths } from "./helpers/fixtures.js";
import { addToStore, needNix, nix, NIX_FLAGS, pathInfo, run, tempDir, toPathInfo, UNSIGNED_REFUSED } from "./helpers/nix.js";
import { Daemon } from "./helpers/nix-daemon.js";

const NOBODY = 65534;
const hp = (p: string) => p.slice(11, 43);

/** A chroot store with a plain path, a signed built path with references and a deriver, and its daemon. */
async function fixture() {
  const tmp = tempDir();
  chmodSync(tmp.dir, 0o755); // the unprivileged agent must reach the store
  const { root, paths } = await plainAndBuiltPaths(tmp.dir);
  const [plain, built] = paths as [string, string];
  await run("nix-store", ["--generate-binary-cache-key", "daemon-test-1", join(tmp.dir, "sec"), join(tmp.dir, "pub")]);
  await nix(["store", "sign", "--store", root, "--key-file", join(tmp.dir, "sec"), built]);
  for (const d of ["", "nix", "nix/var", "nix/var/nix"]) chmodSync(join(root, d), 0o755);
  const daemon = new Daemon(root);
  await daemon.start();
  return { tmp, root, plain, built, daemon, publicKey: readFileSync(join(tmp.dir, "pub"), "utf8").trim() };
}

test("the daemon client's path infos equal `nix path-info --json` (deriver, references, signatures, CA)", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  const store = await LocalStore.open(f.root, new Signer([]), { backend: "daemon", daemonSocket: f.daemon.socket });
  try {
    assert.equal(store.backend, "daemon");
    const expected = await pathInfo(f.root, [f.built], true);
    assert.ok(expected.length >= 3, "the built path and its references");
    assert.ok(expected.some((j) => j.ca) && expected.some((j) => j.deriver) && expected.some((j) => (j.signatures ?? []).length > 0));
    for (const j of expected) assert.deepEqual(await store.pathInfo(hp(j.path)), toPathInfo(j), j.path);
    assert.equal(store.pathCount(), (await nix(["path-info", "--store", f.root, "--all"])).trim().split("\n").length);
    assert.equal(await store.pathInfo("0".repeat(32)), undefined);
    assert.equal(await store.isValidPath(f.plain), true);
    assert.equal(await store.isValidPath(f.plain + "x"), false);
    // Raw answers: registration time and the not-valid reply of QueryPathInfo.
    const client = new DaemonClient(f.daemon.socket);
    const raw = await client.queryPathInfo(f.built);
    assert.equal(raw?.registrationTime, expected.find((j) => j.path === f.built)!.registrationTime);
    assert.equal(await client.queryPathInfo(`/nix/store/${"0".repeat(32)}-gone`), undefined);
    await assert.rejects(client.queryPathInfo("/tmp/not-in-store"), /is not in the Nix store/, "Nix's message");
    assert.equal(await client.queryPathFromHashPart(hp(f.plain)), f.plain, "the connection pool recovers after an error");
    client.close();
    // Many requests at once over two connections: each gets its own answer.
    const pooled = new DaemonClient(f.daemon.socket, { maxConnections: 2 });
    const want = Array.from({ length: 60 }, (_, i) => expected[i % expected.length]!.path);
    assert.deepEqual(await Promise.all(want.map((p) => pooled.queryPathFromHashPart(hp(p)))), want);
    pooled.close();
  } finally {
    store.close();
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

/** Asks for `hashPart` until an answer costs the daemon no request (cached), at most 20 s; returns it. */
async function untilCached(store: LocalStore, client: DaemonClient, hashPart: string) {
  for (let i = 0; i < 200; i++) {
    const before = client.requests;
    const info = await store.pathInfo(hashPart);
    if (client.requests === before) return info;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`${hashPart} was never answered from the cache`);
}

/** Waits until the database's files vouch for a version again (a second after Nix wrote it). */
async function untilSettled(root: string) {
  const dbVersion = new DbVersion(join(root, "nix/var/nix/db"));
  while (dbVersion.current() === undefined) await new Promise((r) => setTimeout(r, 100));
  dbVersion.close();
}

test("the daemon backend caches hits, never stale: new signatures, deletions, re-additions and additions show at once", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  const store = await LocalStore.open(f.root, new Signer([]), { backend: "daemon", daemonSocket: f.daemon.socket });
  store.watch();
  const client = (store as unknown as { meta: { client: DaemonClient } }).meta.client;
  const sigsOf = async (path: string) => (await store.pathInfo(hp(path)))?.sigs;
  try {
    // A hit is answered from the cache once the database has been quiet (a signed path, its references).
    const built = await untilCached(store, client, hp(f.built));
    assert.ok(built && built.sigs.length === 1);
    assert.equal(await store.pathInfo(hp(f.built)), built, "the same object: the HTTP side reuses its narinfo");
    assert.equal(store.pathInfoNow(hp(f.built)), built, "and without waiting: the HTTP side answers it in one go");
    const plain = await untilCached(store, client, hp(f.plain));
    assert.deepEqual(plain?.sigs, []);

    // A signature added by Nix shows at the next lookup, however recent the cached answer.
    await nix(["store", "sign", "--store", f.root, "--key-file", join(f.tmp.dir, "sec"), f.plain]);
    assert.deepEqual(await sigsOf(f.plain), (await pathInfo(f.root, [f.plain]))[0]!.signatures, "the new signature, at once");
    assert.equal((await sigsOf(f.plain))?.length, 1);

    // Deleted: a miss at once, with no listing in between.
    await untilCached(store, client, hp(f.plain));
    await run("nix-store", ["--store", f.root, "--delete", f.plain]);
    assert.equal(await store.pathInfo(hp(f.plain)), undefined, "deleted: not stale");
    // Re-added (same contents, same path: its files are back) without a signature: the cached
    // signed answer must not come back, though the files exist again.
    writeFileSync(join(f.tmp.dir, "plain.txt"), "plain\n");
    assert.equal(await addToStore(f.root, join(f.tmp.dir, "plain.txt")), f.plain);
    assert.deepEqual(await sigsOf(f.plain), [], "re-added unsigned: no signature from before");

    // The same, with no lookup between deletion and re-addition, after a cached signed answer,
    // and asked only once the database's files vouch for a version again (a second after).
    await nix(["store", "sign", "--store", f.root, "--key-file", join(f.tmp.dir, "sec"), f.plain]);
    assert.equal((await untilCached(store, client, hp(f.plain)))?.sigs.length, 1);
    await run("nix-store", ["--store", f.root, "--delete", f.plain]);
    assert.equal(await addToStore(f.root, join(f.tmp.dir, "plain.txt")), f.plain);
    await untilSettled(f.root);
    assert.deepEqual(await sigsOf(f.plain), [], "deleted and re-added between two lookups: not stale");

    // Misses are answered from the last listing while the database is unchanged since; a path
    // added then is found at once (no listing in between), then cached like the rest.
    writeFileSync(join(f.tmp.dir, "new.txt"), "new\n");
    const watcher = (store as unknown as { meta: { watcher: DaemonWatcher } }).meta.watcher;
    for (let i = 0; ; i++) {
      await watcher.refresh();
      const before = client.requests;
      assert.equal(await store.pathInfo("0".repeat(32)), undefined);
      assert.equal(await store.pathInfo("v".repeat(32)), undefined);
      if (client.requests === before) break;
      assert.ok(i < 100, "a miss was never answered from the listing");
      await new Promise((r) => setTimeout(r, 200));
    }
    watcher.stop(); // no listing from here on
    const added = await addToStore(f.root, join(f.tmp.dir, "new.txt"));
    await untilSettled(f.root); // not only while the write is recent
    assert.ok(!watcher.has(hp(added)), "not listed yet");
    assert.equal((await store.pathInfo(hp(added)))?.storePath, added, "added: found at once");
    assert.equal((await untilCached(store, client, hp(added)))?.storePath, added);
    assert.equal(await untilCached(store, client, hp(f.built)), built, "untouched paths keep their answer");
  } finally {
    store.close();
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

/** `nix-store ARGS` through the daemon, blocking: nothing of this process runs until Nix has committed. */
function viaDaemonSync(daemon: Daemon, args: string[]): string {
  const env = { ...process.env, NIX_DAEMON_SOCKET_PATH: daemon.socket };
  return execFileSync("nix-store", ["--store", "daemon", ...args], { env, encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim();
}

test("the daemon backend's lookups of one event-loop turn share one look at the database's files, never one from before they came in", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  const store = await LocalStore.open(f.root, new Signer([]), { backend: "daemon", daemonSocket: f.daemon.socket });
  const meta = (store as unknown as { meta: { client: DaemonClient; dbVersion: DbVersion; watcher: DaemonWatcher } }).meta;
  let looks = 0;
  const current = meta.dbVersion.current.bind(meta.dbVersion);
  meta.dbVersion.current = (now?: number) => (looks++, current(now));
  writeFileSync(join(f.tmp.dir, "plain.txt"), "plain\n");
  try {
    await untilCached(store, meta.client, hp(f.plain));
    // A lookup that came in after a deletion is never answered from a look taken before it: one
    // lookup before `nix-store --delete` through the daemon and one after, in the same turn.
    const early = store.pathInfo(hp(f.plain));
    viaDaemonSync(f.daemon, ["--delete", f.plain]);
    const late = store.pathInfo(hp(f.plain));
    assert.equal(await late, undefined, "deleted before the lookup came in: a miss");
    await early; // came in before the deletion: either answer is right

    // Nor is one that came in after an addition, though a lookup before it was a miss from the listing.
    await untilSettled(f.root);
    for (let i = 0; ; i++) {
      await meta.watcher.refresh();
      const before = meta.client.requests;
      assert.equal(await store.pathInfo(hp(f.plain)), undefined);
      if (meta.client.requests === before) break; // a miss from the listing
      assert.ok(i < 100, "the miss was never answered from the listing");
      await new Promise((r) => setTimeout(r, 200));
    }
    const missed = store.pathInfo(hp(f.plain));
    assert.equal(viaDaemonSync(f.daemon, ["--add", join(f.tmp.dir, "plain.txt")]), f.plain);
    const found = store.pathInfo(hp(f.plain));
    assert.equal((await found)?.storePath, f.plain, "added before the lookup came in: found");
    await missed;

    // Twenty lookups at once (as from concurrent connections): one look, no daemon request.
    const built = await untilCached(store, meta.client, hp(f.built));
    const plainInfo = await untilCached(store, meta.client, hp(f.plain));
    const [looks0, requests0] = [looks, meta.client.requests];
    const answers = await Promise.all(Array.from({ length: 20 }, (_, i) => store.pathInfo(hp(i % 2 ? f.built : f.plain))));
    assert.equal(looks - looks0, 1, "one look for all of them");
    assert.equal(meta.client.requests, requests0, "all answered from memory");
    assert.equal(answers[1], built);
    await store.pathInfo(hp(f.built));
    assert.equal(looks - looks0, 2, "a lookup after that look: a look of its own");

    // Without waiting (the HTTP side's first try), lookups look on their own while they come one
    // to a turn; after a turn with several they share (SOON: asked again from whenSoon(), or
    // pathInfo(), after the shared look), and after shared looks of one lookup each they look on
    // their own again.
    const turn = () => new Promise((r) => setImmediate(r));
    const toShare = async () => {
      for (let i = 0; i < 40; i++) assert.equal((store.pathInfoNow(hp(i % 2 ? f.plain : f.built)) as PathInfo).sigs.length, i % 2 ? 0 : 1, "forty in a turn");
      await turn();
    };
    for (let i = 0; i < 40; i++) {
      await turn();
      assert.equal(store.pathInfoNow(hp(f.built)), built, "one a turn: each looks on its own");
    }
    await toShare();
    assert.equal(store.pathInfoNow(hp(f.built)), SOON, "then they share");
    const looks1 = looks;
    for (let i = 0; i < 8; i++) assert.equal(await store.pathInfo(hp(f.built)), built);
    assert.equal(looks - looks1, 8, "a shared look each, one lookup to each");
    assert.equal(store.pathInfoNow(hp(f.built)), built, "then they look on their own again");

    // Asked again from whenSoon()'s runs: one look for all of them, taken after they were queued,
    // answered at once from memory; the look stands only while its runs are called.
    await toShare();
    const [looks2, requests2] = [looks, meta.client.requests];
    const asked = [f.built, f.plain, f.built, f.plain, f.built];
    const again = await new Promise<unknown[]>((resolve) => {
      const got: unknown[] = [];
      for (const p of asked) {
        assert.equal(store.pathInfoNow(hp(p)), SOON);
        store.whenSoon(() => got.push(store.pathInfoNow(hp(p))) === asked.length && resolve(got));
      }
    });
    assert.equal(looks - looks2, 1, "one look for the five");
    assert.equal(meta.client.requests, requests2, "no daemon request");
    assert.deepEqual(again.map((i) => (i as PathInfo).storePath), asked);
    assert.equal(again[0], built);
    assert.equal(store.pathInfoNow(hp(f.built)), SOON, "after its runs, that look answers nothing");
    // Deleted after a look, before the next lookup came in: that lookup's look is a later one (a
    // run queued while runs are called waits for it), so the cached answer is not given.
    const afterDelete = await new Promise((resolve) =>
      store.whenSoon(() => {
        viaDaemonSync(f.daemon, ["--delete", f.plain]);
        store.whenSoon(() => resolve(store.pathInfoNow(hp(f.plain))));
      }),
    );
    assert.notEqual(afterDelete, plainInfo, "not the answer from before the deletion");
    assert.equal(await store.pathInfo(hp(f.plain)), undefined, "deleted: a miss");
  } finally {
    store.close();
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

test("under concurrent lookups, a path deleted or added through the daemon is a 404 or a 200 for the agent's next answer", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  mkdirSync(join(f.tmp.dir, "state"));
  const agent = await startAgentProcess(["--store-root", f.root, "--sign-key", join(f.tmp.dir, "sec"), "--state-dir", join(f.tmp.dir, "state"),
    "--store-backend", "daemon", "--daemon-socket", f.daemon.socket]);
  const get = async (path: string) => (await fetch(agent.url + path).then(async (r) => (await r.arrayBuffer(), r))).status;
  const daemonEnv = { NIX_DAEMON_SOCKET_PATH: f.daemon.socket };
  writeFileSync(join(f.tmp.dir, "plain.txt"), "plain\n");
  // Four connections asking for a cached hit all along, so that lookups share looks.
  let loading = true;
  const load = Array.from({ length: 4 }, async () => {
    let n = 0;
    for (; loading; n++) assert.equal(await get(`/${hp(f.built)}.narinfo`), 200);
    return n;
  });
  try {
    for (let round = 0; round < 3; round++) {
      // Settled and answered from memory, then deleted: the next answer is a 404.
      await untilSettled(f.root);
      for (let i = 0; i < 3; i++) assert.equal(await get(`/${hp(f.plain)}.narinfo`), 200);
      await run("nix-store", ["--store", "daemon", "--delete", f.plain], { env: daemonEnv });
      assert.equal(await get(`/${hp(f.plain)}.narinfo`), 404, `round ${round}: deleted, not stale`);
      // Settled and a miss, then added: the next answer is a 200.
      await untilSettled(f.root);
      for (let i = 0; i < 3; i++) assert.equal(await get(`/${hp(f.plain)}.narinfo`), 404);
      assert.equal((await run("nix-store", ["--store", "daemon", "--add", join(f.tmp.dir, "plain.txt")], { env: daemonEnv })).trim(), f.plain);
      assert.equal(await get(`/${hp(f.plain)}.narinfo`), 200, `round ${round}: added, found at once`);
    }
  } finally {
    loading = false;
    const served = await Promise.all(load).finally(async () => {
      await agent.stop();
      await f.daemon.stop();
      f.tmp.cleanup();
    });
    assert.ok(served.every((n) => n > 0), "the load ran");
  }
});

test("the database's version changes with every commit, with and without Nix's WAL (use-sqlite-wal)", async (t) => {
  if (!(await needNix(t))) return;
  for (const wal of ["true", "false"]) {
    const tmp = tempDir();
    try {
      const root = join(tmp.dir, "store");
      const opt = ["--option", "use-sqlite-wal", wal];
      writeFileSync(join(tmp.dir, "a.txt"), "a\n");
      const a = (await run("nix-store", ["--store", root, ...opt, "--add", join(tmp.dir, "a.txt")])).trim();
      await run("nix-store", ["--generate-binary-cache-key", "wal-test-1", join(tmp.dir, "sec"), join(tmp.dir, "pub")]);
      const version = new DbVersion(join(root, "nix/var/nix/db"));
      const settledVersion = async () => {
        for (let v = version.current(); ; v = version.current()) {
          if (v !== undefined) return v;
          await new Promise((r) => setTimeout(r, 100));
        }
      };
      const v0 = await settledVersion();
      assert.equal(version.current(), v0, "unchanged while Nix writes nothing");
      await run("nix", [...NIX_FLAGS, "store", "sign", "--store", root, ...opt, "--key-file", join(tmp.dir, "sec"), a]);
      const v1 = await settledVersion();
      assert.notEqual(v1, v0, `wal ${wal}: a signature changes the version`);
      await run("nix-store", ["--store", root, ...opt, "--delete", a]);
      assert.notEqual(await settledVersion(), v1, `wal ${wal}: a deletion changes the version`);
      version.close();
      assert.equal(databaseFilesVisible(join(root, "nix/var/nix/db")), true);
    } finally {
      tmp.cleanup();
    }
  }
  const nowhere = "/nonexistent-fleetcache-test/nix/var/nix/db";
  assert.equal(new DbVersion(nowhere).current(), undefined, "no database: no version");
  assert.equal(databaseFilesVisible(nowhere), false);
});

test("the daemon watcher reports paths added and removed", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  const client = new DaemonClient(f.daemon.socket);
  const watcher = new DaemonWatcher(client, join(f.root, "nix/store"), { minGapMs: 200 });
  try {
    await watcher.refresh();
    assert.ok(watcher.has(hp(f.plain)) && watcher.has(hp(f.built)));
    watcher.start();
    const changes: StoreChange[] = [];
    watcher.on("change", (c) => changes.push(c));
    writeFileSync(join(f.tmp.dir, "new.txt"), "new\n");
    const added = await addToStore(f.root, join(f.tmp.dir, "new.txt"));
    // The directory watch prompts a listing (no timing asserted: wait for the event however long).
    const keepAlive = setTimeout(() => {}, 60_000);
    while (!changes.some((c) => c.added.includes(hp(added)))) await new Promise((r) => watcher.once("change", r));
    clearTimeout(keepAlive);
    assert.ok(watcher.has(hp(added)));
    await run("nix-store", ["--store", f.root, "--delete", added]);
    await watcher.refresh(); // the directory watch may have been quicker: either reports it once
    assert.ok(!watcher.has(hp(added)));
    assert.deepEqual(changes.filter((c) => c.removed.length > 0), [{ added: [], removed: [hp(added)] }]);
    assert.ok(watcher.has(hp(f.plain)), "the rest stays");
  } finally {
    watcher.stop();
    client.close();
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

/**
 * A unix-socket relay in front of the real daemon that holds back the daemon's reply on any
 * connection that asked QueryAllValidPaths: a listing that takes as long as we like (until
 * release(), or holdMs each when given). Counts the listings asked.
 */
function listingHoldingRelay(daemonSocket: string, path: string, holdMs?: number) {
  const held: { to: Socket; chunks: Buffer[]; on: boolean }[] = [];
  const flush = (h: (typeof held)[number]) => {
    h.on = false;
    for (const c of h.chunks.splice(0)) h.to.write(c);
  };
  let listingAsked: () => void = () => {};
  const asked = new Promise<void>((resolve) => (listingAsked = resolve));
  const relay = {
    listings: 0,
    /** Connections the daemon's side ended before the client's (for a failing test's message). */
    closedByDaemon: [] as string[],
    asked,
    listen: () => new Promise<void>((resolve) => server.listen(path, resolve)),
    release: () => held.forEach(flush),
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
  const server: Server = createServer((client) => {
    const daemon = connect(daemonSocket);
    let hold: (typeof held)[number] | undefined;
    client.on("data", (d: Buffer) => {
      if (d.equals(encodeQueryAllValidPaths())) {
        hold = { to: client, chunks: [], on: true };
        held.push(hold);
        relay.listings++;
        listingAsked();
        if (holdMs !== undefined) setTimeout(flush, holdMs, hold);
      }
      daemon.write(d);
    });
    daemon.on("data", (d: Buffer) => (hold?.on ? hold.chunks.push(d) : client.write(d)));
    client.on("close", () => daemon.destroy());
    daemon.on("close", () => {
      if (!client.destroyed) relay.closedByDaemon.push(`after ${daemon.bytesRead} bytes${hold?.on ? `, ${hold.chunks.length} chunks of them held` : ""}`);
      client.destroy();
    });
    client.on("error", () => {});
    daemon.on("error", () => {});
  });
  return relay;
}

test("a lookup never waits behind a store listing, even with one pooled connection", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  const relay = listingHoldingRelay(f.daemon.socket, join(f.tmp.dir, "relay.sock"));
  await relay.listen();
  const client = new DaemonClient(join(f.tmp.dir, "relay.sock"), { maxConnections: 1 });
  try {
    assert.equal(await client.queryPathFromHashPart(hp(f.plain)), f.plain, "the pool's one connection is open and idle");
    let listed = false;
    const listing = client.queryAllValidHashParts().then((b) => ((listed = true), b));
    await relay.asked; // the daemon is answering the listing, and its reply is held back
    // Without its own connection the listing would hold the pool's only one: the lookup would
    // wait for release(), which comes only after it (or, to end the test, after 30 s).
    const lookup = client.queryPathFromHashPart(hp(f.built)).then((p) => client.queryPathInfo(p!).then((i) => ({ p, i })));
    let timer: NodeJS.Timeout | undefined;
    const first = await Promise.race([lookup.then(() => "lookup"), new Promise((r) => (timer = setTimeout(r, 30_000, "listing held for 30 s")))]);
    clearTimeout(timer);
    assert.equal(first, "lookup", "the lookup completed while the listing was under way");
    assert.equal(listed, false, "the listing was still held");
    const { p, i } = await lookup;
    assert.equal(p, f.built);
    assert.ok(i?.narHash);
    relay.release();
    const all = await listing;
    const expected = (await nix(["path-info", "--store", f.root, "--all"])).trim().split("\n").map(hp).sort();
    assert.deepEqual(Array.from({ length: all.length / 32 }, (_, k) => all.toString("latin1", k * 32, k * 32 + 32)).sort(), expected);
  } finally {
    relay.release();
    client.close();
    await relay.close();
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

test("a storm of store changes is listed once, after it, not over and over during it", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  // Every listing takes at least 1 s (held by the relay), so a storm may hold the next one
  // back by 10 s or more; 2.5 s of quiet ends the storm (the test's events come every 100 ms).
  const relay = listingHoldingRelay(f.daemon.socket, join(f.tmp.dir, "relay.sock"), 1000);
  await relay.listen();
  const client = new DaemonClient(join(f.tmp.dir, "relay.sock"));
  const watcher = new DaemonWatcher(client, join(f.root, "nix/store"), { minGapMs: 2500, intervalMs: 60_000 });
  const keepAlive = setInterval(() => {}, 1000);
  try {
    await watcher.refresh();
    watcher.start();
    const before = relay.listings;
    const changes: StoreChange[] = [];
    watcher.on("change", (c) => changes.push(c));
    // A failed listing fails the test with what the relay and the daemon saw (not as an uncaught
    // "error" event that hides the assertion that failed first).
    const errors: string[] = [];
    watcher.on("error", (e) => errors.push(e.message));
    const account = () => `the daemon's side ended: ${relay.closedByDaemon.join("; ") || "none"}; the daemon's stderr: ${f.daemon.log()}`;
    // The storm: a path added, entries coming and going in the store directory for at least 6 s,
    // a path deleted in the middle of it. The storm goes on until the deletion is done: on a loaded
    // machine a nix-store run (in the Nix 2.26 chroot) took longer than the 2.5 s of quiet, so a
    // deletion after the storm was a storm of its own.
    writeFileSync(join(f.tmp.dir, "storm.txt"), "storm\n");
    const added = await addToStore(f.root, join(f.tmp.dir, "storm.txt"));
    let deleted = false;
    const deletion = new Promise((r) => setTimeout(r, 3000))
      .then(() => run("nix-store", ["--store", f.root, "--delete", f.plain]))
      .finally(() => (deleted = true));
    for (let i = 0; i < 60 || !deleted; i++) {
      writeFileSync(join(f.root, "nix/store", `.storm-${i}`), "");
      rmSync(join(f.root, "nix/store", `.storm-${i}`));
      await new Promise((r) => setTimeout(r, 100));
    }
    await deletion;
    assert.equal(relay.listings, before, "no listing while the store kept changing");
    while (!changes.some((c) => c.added.includes(hp(added))) && errors.length === 0) {
      await new Promise((r) => watcher.once("change", r).once("error", r));
    }
    assert.deepEqual(errors, [], `no listing failed (${account()})`);
    assert.deepEqual(changes, [{ added: [hp(added)], removed: [hp(f.plain)] }], "one listing saw the whole storm");
    assert.equal(relay.listings, before + 1);
  } finally {
    clearInterval(keepAlive);
    watcher.stop();
    client.close();
    await relay.close();
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

test("a listing cut short by close() is not blamed on the daemon, and a stopped watcher does not report it", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  // Each relay holds its listings until released: they are under way when the client closes.
  const relay = listingHoldingRelay(f.daemon.socket, join(f.tmp.dir, "relay.sock"));
  const relay2 = listingHoldingRelay(f.daemon.socket, join(f.tmp.dir, "relay2.sock"));
  await Promise.all([relay.listen(), relay2.listen()]);
  const client = new DaemonClient(join(f.tmp.dir, "relay.sock"));
  const client2 = new DaemonClient(join(f.tmp.dir, "relay2.sock"));
  const watcher = new DaemonWatcher(client2, join(f.root, "nix/store"), { minGapMs: 100 });
  const errors: string[] = [];
  watcher.on("error", (e) => errors.push(e.message));
  try {
    const listing = client.queryAllValidHashParts();
    await relay.asked;
    client.close();
    await assert.rejects(listing, (e: Error) => /the daemon client is closed/.test(e.message), "our own close, not the daemon's");

    // The agent stops (watcher, then client, as DaemonMetadata.close does) during a listing of the watcher's.
    watcher.start();
    writeFileSync(join(f.root, "nix/store", ".poke"), "");
    rmSync(join(f.root, "nix/store", ".poke"));
    await relay2.asked;
    watcher.stop();
    client2.close();
    // Queued behind the cut listing: when it fails, the cut one has failed and been reported, if at all.
    await assert.rejects(watcher.refresh(), /the daemon client is closed/);
    assert.deepEqual(errors, [], "a stopped watcher reports no error");
  } finally {
    client.close();
    client2.close();
    relay.release();
    relay2.release();
    await Promise.all([relay.close(), relay2.close()]);
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

test("an unprivileged agent picks the daemon and serves Nix: nix copy, live additions and deletions, 503 without a daemon", async (t) => {
  if (!(await needNix(t))) return;
  const f = await fixture();
  const state = join(f.tmp.dir, "state");
  mkdirSync(state);
  chownSync(state, NOBODY, NOBODY);
  chownSync(join(f.tmp.dir, "sec"), NOBODY, NOBODY);
  const asNobody = ["setpriv", `--reuid=${NOBODY}`, `--regid=${NOBODY}`, "--clear-groups"];
  const agent = await startAgentProcess(["--store-root", f.root, "--sign-key", join(f.tmp.dir, "sec"), "--state-dir", state, "--store-backend", "auto"], {}, asNobody);
  const get = async (path: string) => (await fetch(agent.url + path)).status;
  try {
    const status = (await (await fetch(agent.url + "/api/v1/status")).json()) as { self: { storeBackend: string; paths: number } };
    assert.equal(status.self.storeBackend, "daemon", "auto chose the daemon: the database directory is not writable");
    assert.doesNotMatch(agent.logs(), /cannot look at the Nix database/, "but it may look at the database's files");
    assert.ok(status.self.paths >= 4);

    const dest = join(f.tmp.dir, "dest");
    await run("nix", [...NIX_FLAGS, "copy", "--from", agent.url, "--to", dest, "--option", "require-sigs", "true",
      "--option", "trusted-public-keys", f.publicKey, "--option", "substituters", "", f.built]);
    await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "-r", "--option", "trusted-public-keys", f.publicKey, f.built]);
    assert.deepEqual((await pathInfo(dest, [f.built], true)).map(toPathInfo).map((i) => i.narHash), (await pathInfo(f.root, [f.built], true)).map(toPathInfo).map((i) => i.narHash));

    // Answers are cached, but a signature added by Nix is served at once: Nix trusting only a
    // new key refuses the closure just served, and takes it right after `nix store sign`.
    await run("nix-store", ["--generate-binary-cache-key", "daemon-test-2", join(f.tmp.dir, "sec2"), join(f.tmp.dir, "pub2")]);
    const copyTrusting2 = (to: string) => run("nix", [...NIX_FLAGS, "copy", "--from", agent.url, "--to", to,
      "--option", "require-sigs", "true", "--option", "trusted-public-keys", readFileSync(join(f.tmp.dir, "pub2"), "utf8").trim(),
      "--option", "substituters", "", f.built], { env: { XDG_CACHE_HOME: mkdtempSync(join(f.tmp.dir, "cache-")) } }); // none cached by Nix
    for (let i = 0; i < 3; i++) await fetch(`${agent.url}/${hp(f.built)}.narinfo`).then((r) => r.text());
    await assert.rejects(copyTrusting2(join(f.tmp.dir, "dest2")), UNSIGNED_REFUSED);
    await nix(["store", "sign", "--store", f.root, "--key-file", join(f.tmp.dir, "sec2"), "-r", f.built]);
    await copyTrusting2(join(f.tmp.dir, "dest3"));
    await run("nix", [...NIX_FLAGS, "store", "verify", "--store", join(f.tmp.dir, "dest3"), "-r",
      "--option", "trusted-public-keys", readFileSync(join(f.tmp.dir, "pub2"), "utf8").trim(), f.built]);

    // Answers are live: a path added now is served, a deleted one is a miss at once.
    writeFileSync(join(f.tmp.dir, "later.txt"), "later\n");
    const later = await addToStore(f.root, join(f.tmp.dir, "later.txt"));
    assert.equal(await get(`/${hp(later)}.narinfo`), 200);
    const narinfo = await (await fetch(`${agent.url}/${hp(later)}.narinfo`)).text();
    const url = /^URL: (.*)$/m.exec(narinfo)![1]!;
    assert.equal(await get("/" + url), 200, "its NAR too");
    // Asked again once the database has been quiet for a while: answered from the cache.
    for (let i = 0; i < 4; i++) await new Promise((r) => setTimeout(r, 300)).then(() => get(`/${hp(later)}.narinfo`));
    await run("nix-store", ["--store", f.root, "--delete", later]);
    assert.equal(await get(`/${hp(later)}.narinfo`), 404, "deleted: not stale");
    assert.equal(await get(`/${"0".repeat(32)}.narinfo`), 404);
    // The legacy NAR URL carrying only the NAR hash cannot be answered by the daemon (documented).
    const narHash = /^NarHash: sha256:(.*)$/m.exec(narinfo)![1]!;
    assert.equal(await get(`/nar/${narHash}.nar`), 404);

    await f.daemon.stop();
    assert.equal(await get(`/${hp(f.plain)}.narinfo`), 503, "no daemon: unavailable, not absent");
    assert.equal(await get(`/${hp(f.plain)}.ls`), 503);
    await f.daemon.start();
    assert.equal(await get(`/${hp(f.plain)}.narinfo`), 200, "reconnected");
    assert.equal(agent.child.exitCode, null, "the agent lived through it");
  } finally {
    await agent.stop();
    await f.daemon.stop();
    f.tmp.cleanup();
  }
});

test("with the daemon backend, an unreachable daemon is a start-up error", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  try {
    const r = await runCli(["agent", "--store-root", tmp.dir, "--state-dir", join(tmp.dir, "state"), "--store-backend", "daemon",
      "--daemon-socket", join(tmp.dir, "no-socket"), "--listen", "127.0.0.1:0", "--p2p-listen", "off", "--no-mdns"]);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /cannot reach the Nix daemon/);
  } finally {
    tmp.cleanup();
  }
});
