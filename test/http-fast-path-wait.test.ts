// The HTTP fast path (agent/http/fast-path.ts) with answers that need waiting: narinfo lookups
// the source answers only through pathInfo() (the daemon backend, a peer), or when asked again
// from its whenSoon() later in the turn (SOON: the daemon backend's shared look). Against node:http alone
// (`fastPath: false`) over the same source, byte for byte but the Date header: pipelines mixing
// awaited and immediate answers, split at every byte, half-closed while a lookup waits, followed
// by requests node:http must answer; with a real nix-daemon, also a daemon that is gone (503).
// Then what only the fast path does: such requests never reach node:http, one lookup a
// connection at a time however many are pipelined, a client that leaves while a lookup waits
// gets nothing written, the timers spare a waiting connection; real Nix 2.8 and 2.26 copy from
// an agent on the daemon backend; a peer's path through the mesh is answered on the fast path.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import type { Server } from "node:http";
import { connect, type AddressInfo, type Socket } from "node:net";
import { join } from "node:path";
import type { CacheContext } from "../agent/http/cache-routes.js";
import { createHttpServer, type HttpServerOptions } from "../agent/http/server.js";
import { createLogger } from "../agent/log.js";
import { AgentMetrics } from "../agent/metrics.js";
import { Signer } from "../agent/signer.js";
import { NOT_NOW, SOON, type PathSource } from "../agent/source.js";
import { LocalStore } from "../agent/store/local-store.js";
import { readSecretKeyFile } from "../agent/keys-file.js";
import { startAgent } from "../agent/agent.js";
import { loadConfig } from "../agent/config.js";
import { freePort, startAgentProcess } from "./helpers/agent.js";
import { eventually } from "./helpers/fleet.js";
import { plainAndBuiltPaths } from "./helpers/fixtures.js";
import { addToStore, hasNix, nix, NIX_FLAGS, pathInfo, run, tempDir } from "./helpers/nix.js";
import { Daemon } from "./helpers/nix-daemon.js";
import { closing, exchange, req, undated } from "./helpers/raw-http.js";

const silent = createLogger({ level: "silent", pretty: false });
const hp = (p: string) => p.slice(11, 43);
const miss = "0".repeat(32);

let tmp: ReturnType<typeof tempDir> | undefined;
let local: LocalStore | undefined;
/** A path the test sources answer at once, and one they answer only through pathInfo(). */
let hit = "";
let slow = "";
const opened: { server: Server; metrics: AgentMetrics }[] = [];

before(async () => {
  if (!(await hasNix())) {
    if (process.env.CI === "true") throw new Error("these tests need Nix under CI=true");
    return;
  }
  tmp = tempDir();
  const root = join(tmp.dir, "store");
  writeFileSync(join(tmp.dir, "a"), "first\n");
  writeFileSync(join(tmp.dir, "b"), "second\n");
  hit = hp(await addToStore(root, join(tmp.dir, "a")));
  slow = hp(await addToStore(root, join(tmp.dir, "b")));
  local = new LocalStore(root, new Signer([]));
  local.watch();
});

after(async () => {
  for (const { server, metrics } of opened) {
    server.closeAllConnections();
    await new Promise((r) => server.close(r));
    metrics.close();
  }
  local?.close();
  tmp?.cleanup();
});

/** A lookup source over `store` whose pathInfo() waits for `delay()` first; counts lookups in flight. */
class WaitingSource implements PathSource {
  inFlight = 0;
  maxInFlight = 0;
  calls = 0;
  constructor(
    private readonly store: LocalStore,
    private readonly waitsFor: (hashPart: string) => boolean,
    public delay: () => Promise<unknown> = () => new Promise((r) => setTimeout(r, 20)),
  ) {}
  async pathInfo(h: string) {
    this.calls++;
    this.maxInFlight = Math.max(this.maxInFlight, ++this.inFlight);
    try {
      await this.delay();
      return await this.store.pathInfo(h);
    } finally {
      this.inFlight--;
    }
  }
  pathInfoNow(h: string) {
    return this.waitsFor(h) ? NOT_NOW : this.store.pathInfoNow(h);
  }
  narStream(...args: Parameters<LocalStore["narStream"]>) {
    return this.store.narStream(...args);
  }
}

/**
 * A lookup source over `store` that says SOON for the paths `waitsFor` picks and answers them
 * when asked again from whenSoon()'s runs, called together in an immediate (as the daemon
 * backend's shared look); counts the runs.
 */
class SoonSource implements PathSource {
  asked = 0;
  private queued: (() => void)[] = [];
  private looking = false;
  constructor(
    private readonly store: LocalStore,
    private readonly waitsFor: (hashPart: string) => boolean,
  ) {}
  pathInfo(h: string) {
    return this.store.pathInfo(h);
  }
  pathInfoNow(h: string) {
    return this.waitsFor(h) && !this.looking ? SOON : this.store.pathInfoNow(h);
  }
  whenSoon(run: () => void) {
    this.asked++;
    this.queued.push(run);
    if (this.queued.length > 1) return;
    setImmediate(() => {
      const runs = this.queued;
      this.queued = [];
      this.looking = true;
      try {
        for (const r of runs) r();
      } finally {
        this.looking = false;
      }
    });
  }
  narStream(...args: Parameters<LocalStore["narStream"]>) {
    return this.store.narStream(...args);
  }
}

interface Started {
  server: Server;
  port: number;
  metrics: AgentMetrics;
  /** The URLs node:http's request listener saw. */
  seen: string[];
}

async function serve(source: PathSource, store: LocalStore, opts: HttpServerOptions): Promise<Started> {
  const metrics = new AgentMetrics({ storePaths: () => store.pathCount(), peers: () => [], mesh: () => undefined });
  const ctx: CacheContext = { source, local: store, priority: 30, log: silent, metrics };
  const server = createHttpServer(ctx, opts);
  opened.push({ server, metrics });
  const seen: string[] = [];
  server.on("request", (r: { url?: string }) => seen.push(r.url ?? ""));
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return { server, port: (server.address() as AddressInfo).port, metrics, seen };
}

/** The same waiting source behind a server with the fast path and one without. */
async function pair(opts: HttpServerOptions = {}, delay?: () => Promise<unknown>) {
  const sources = [new WaitingSource(local!, (h) => h === slow, delay), new WaitingSource(local!, (h) => h === slow, delay)] as const;
  return { fast: await serve(sources[0], local!, opts), plain: await serve(sources[1], local!, { ...opts, fastPath: false }), sources };
}

/** The same SOON-saying source behind a server with the fast path and one without. */
async function soonPair() {
  const sources = [new SoonSource(local!, (h) => h === slow), new SoonSource(local!, (h) => h === slow)] as const;
  return { fast: await serve(sources[0], local!, {}), plain: await serve(sources[1], local!, { fastPath: false }), sources };
}

const counts = async (m: AgentMetrics) => (await m.text()).split("\n").filter((l) => l.startsWith("fleetcache_http_requests_total")).sort();

test("answers that need waiting: the same bytes as node:http's, pipelined with immediate ones, half-closed while waiting, followed by what node:http answers", { timeout: 120_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  await sameAsNodeHttp(await pair());
});

test("answers asked again later in the turn (SOON): the same bytes as node:http's, in the same cases", { timeout: 120_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  const both = await soonPair();
  await sameAsNodeHttp(both, false); // node:http's route asks pathInfo(): the database's, at once
  t.diagnostic(`asked again: ${both.sources[0].asked} times`);
  assert.ok(both.sources[0].asked >= 11, "the fast path asked again (at least once in each case)");
  assert.equal(both.sources[1].asked, 0, "node:http's route waits for pathInfo() instead");
});

/** The byte comparisons; `slowPlain`: node:http's lookups wait (then node:http's 400 quirk below shows). */
async function sameAsNodeHttp({ fast, plain }: { fast: Started; plain: Started }, slowPlain = true) {
  const h = `/${hit}.narinfo`;
  const s = `/${slow}.narinfo`;
  const m = `/${miss}.narinfo`;
  const cases: [string, string][] = [
    ["slow", req(s)],
    ["HEAD slow", req(s, "", "HEAD")],
    ["slow, fast, slow, miss, slow", req(s) + req(h) + req(s) + req(m) + req(s, "", "HEAD")],
    ["fast, slow, nix-cache-info", req(h) + req(s) + req("/nix-cache-info")],
    ["slow, then other routes", req(s) + req("/health") + req(s) + req("/version")],
    ["slow, then Connection: close", req(s) + closing(h)],
    ["slow with Connection: close", closing(s) + req(h)],
    ["slow, then a body", req(s) + req(h, "Content-Length: 5\r\n") + "hello" + req(m)],
    ["slow, then a big head", req(s) + req(h, `X-Big: ${"a".repeat(8000)}\r\n`) + req(m)],
    ["slow, then HTTP/1.0", req(s) + req(h, "", "GET", "HTTP/1.0")],
    ["many slow", req(s).repeat(20) + req(h)],
  ];
  for (const [name, text] of cases) {
    // Bytes after a request that closes the connection are node:http's quirk (http-fast-path.test.ts): not here.
    for (const keepOpen of text.includes("Connection: close") || text.includes("HTTP/1.0") ? [false] : [false, true]) {
      const parts = keepOpen ? [text + closing(h)] : [text];
      const [a, b] = await Promise.all([exchange(fast.port, parts, keepOpen), exchange(plain.port, parts, keepOpen)]);
      assert.equal(undated(a), undated(b), `${name}${keepOpen ? " (closed by a last request)" : " (half-closed)"}`);
      assert.ok(b.length > 0, `${name}: node:http answered something`);
    }
  }
  // Each request looked up and counted once, the same way.
  assert.deepEqual(await counts(fast.metrics), await counts(plain.metrics));
  assert.deepEqual(fast.metrics.narinfo, plain.metrics.narinfo);
  // One difference, as after a Connection: close request (http-fast-path.test.ts): a request
  // node:http cannot parse behind one still waiting makes node:http write its 400 and close,
  // dropping the answer in progress; the fast path writes that answer before handing over.
  // The same for an incomplete head at the client's FIN.
  const statuses = (raw: string) => [...raw.matchAll(/^HTTP\/1\.1 (\d+)/gm)].map((x) => x[1]);
  if (!slowPlain) return;
  for (const then of ["GARBAGE\r\n\r\n", `GET ${h} HTTP/1.1\r\nHo`]) {
    assert.deepEqual(statuses(await exchange(plain.port, [req(s) + then])), ["400"], JSON.stringify(then));
    assert.deepEqual(statuses(await exchange(fast.port, [req(s) + then])), ["200", "400"], JSON.stringify(then));
  }
}

test("narinfo lookups that wait are answered by the fast path, not node:http, in order", { timeout: 60_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  const { fast, plain, sources } = await pair();
  const h = `/${hit}.narinfo`;
  const s = `/${slow}.narinfo`;
  const text = req(s) + req(h) + req(s, "", "HEAD") + req(`/${miss}.narinfo`) + req("/nix-cache-info") + req(s);
  const [a, b] = await Promise.all([exchange(fast.port, [text]), exchange(plain.port, [text])]);
  assert.equal(undated(a), undated(b));
  assert.equal(a.match(/^HTTP\/1\.1 /gm)?.length, 6);
  assert.equal(sources[0].calls, 3, "three lookups waited");
  assert.deepEqual(fast.seen, [], "node:http saw none of them");
  // Split at every byte: the same answers.
  const expected = undated(await exchange(plain.port, [text + closing(h)], true));
  const offsets = Array.from({ length: text.length }, (_, i) => i + 1);
  for (let i = 0; i < offsets.length; i += 25) {
    await Promise.all(
      offsets.slice(i, i + 25).map(async (k) => {
        const all = text + closing(h);
        assert.equal(undated(await exchange(fast.port, [all.slice(0, k), all.slice(k)], true)), expected, `split at byte ${k}`);
      }),
    );
  }
  assert.ok(fast.seen.every((u) => u === h), "only the Connection: close requests reached node:http");
});

test("3,000 pipelined lookups that wait: one in flight at a time, every answer in order", { timeout: 120_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  const { fast, plain, sources } = await pair({}, () => new Promise((r) => setImmediate(r)));
  const text = (req(`/${slow}.narinfo`) + req(`/${hit}.narinfo`)).repeat(1500) + closing(`/${slow}.narinfo`);
  const [a, b] = await Promise.all([exchange(fast.port, [text], true), exchange(plain.port, [text], true)]);
  assert.equal(a.match(/^HTTP\/1\.1 /gm)?.length, 3001);
  assert.equal(undated(a), undated(b));
  t.diagnostic(`lookups in flight at most: fast path ${sources[0].maxInFlight}, node:http ${sources[1].maxInFlight}`);
  assert.equal(sources[0].maxInFlight, 1, "one lookup in flight on the connection");
  assert.equal(sources[0].calls, 1501);
});

/** A connected socket, its server side, and the server's socket count. */
async function connected(s: Started): Promise<{ client: Socket; server: Socket }> {
  const serverSide = new Promise<Socket>((r) => s.server.once("connection", r));
  const client = connect(s.port, "127.0.0.1");
  client.on("error", () => {});
  await new Promise((r) => client.once("connect", r));
  return { client, server: await serverSide };
}

test("a client that closes or resets while its lookup waits gets nothing written, and nothing is left open", { timeout: 60_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  let release: () => void = () => {};
  const gate = () => new Promise<void>((r) => (release = r));
  const { fast, sources } = await pair({}, gate);
  for (const how of ["reset", "close"] as const) {
    const { client, server } = await connected(fast);
    const closed = new Promise((r) => server.once("close", r));
    client.write(req(`/${slow}.narinfo`) + req(`/${hit}.narinfo`));
    await eventually("the lookup waits", async () => sources[0].inFlight === 1);
    await new Promise((r) => setTimeout(r, 50));
    if (how === "reset") {
      // An RST: the connection is gone at once; the answer, when it comes, is written nowhere.
      client.resetAndDestroy();
      await closed;
      release();
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(server.bytesWritten, 0, "reset: nothing written");
    } else {
      // A FIN is a half-close to the server (as to node:http): answered, then closed.
      client.destroy();
      await new Promise((r) => setTimeout(r, 50));
      release();
      await closed;
    }
    assert.equal(await new Promise((r) => fast.server.getConnections((_e, n) => r(n))), 0, `${how}: no connection left`);
  }
  assert.deepEqual(fast.seen, []);
});

test("connection cap: a connection whose lookup waits is busy, not reaped as idle to make room", { timeout: 60_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  let release: () => void = () => {};
  const { fast, sources } = await pair({ maxConnections: 3 }, () => new Promise<void>((r) => (release = r)));
  const opened: Socket[] = [];
  try {
    // The oldest connection waits for its lookup; two more sit idle.
    const waiting = await connected(fast);
    opened.push(waiting.client);
    let got = "";
    waiting.client.on("data", (d: Buffer) => (got += d.toString("latin1")));
    waiting.client.write(req(`/${slow}.narinfo`));
    await eventually("the lookup waits", async () => sources[0].inFlight === 1);
    const idle = [await connected(fast), await connected(fast)];
    opened.push(...idle.map((c) => c.client));
    const closed = new Set<string>();
    for (const [name, c] of [["waiting", waiting], ["idle 1", idle[0]!], ["idle 2", idle[1]!]] as const) c.server.once("close", () => closed.add(name));
    // Two newcomers over the cap: the idle ones make room, the waiting one is kept.
    for (let i = 0; i < 2; i++) opened.push((await connected(fast)).client);
    await eventually("two connections closed", async () => closed.size >= 2);
    assert.deepEqual([...closed].sort(), ["idle 1", "idle 2"]);
    release();
    await eventually("the waiting connection is answered", async () => got.includes("\r\n\r\nStorePath: "));
  } finally {
    for (const s of opened) s.destroy();
  }
});

test("a waiting connection is busy: the headers and keep-alive timeouts and closeIdleConnections() spare it, as node:http does", { timeout: 60_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  const timeouts = { headers: 200, keepAlive: 300, checkInterval: 50 };
  // Each lookup waits 1.2 s, far longer than either timeout.
  const { fast, plain } = await pair({ timeouts }, () => new Promise((r) => setTimeout(r, 1200)));
  const h = `/${hit}.narinfo`;
  const s = `/${slow}.narinfo`;
  const closeIdle = () => {
    for (const x of [fast, plain]) x.server.closeIdleConnections();
  };
  // An answer (which arms the keep-alive timer), then a lookup that waits, then silence until the
  // keep-alive timeout closes the connection; closeIdleConnections() in the middle of the wait.
  const timer = setTimeout(closeIdle, 600);
  const [a, b] = await Promise.all([exchange(fast.port, [req(h), req(s)], true), exchange(plain.port, [req(h), req(s)], true)]);
  clearTimeout(timer);
  assert.equal(undated(a), undated(b));
  assert.equal(a.match(/^HTTP\/1\.1 200 /gm)?.length, 2, "both answered");
  assert.deepEqual(fast.seen, []);
});

// The daemon backend: a real nix-daemon on a chroot store.
test("daemon backend: pipelines split at every byte, real Nix copies with signatures required, and a daemon that is gone is node:http's 503", { timeout: 120_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  const dir = tempDir();
  const { root, paths } = await plainAndBuiltPaths(dir.dir);
  await run("nix-store", ["--generate-binary-cache-key", "wait-test-1", join(dir.dir, "sec"), join(dir.dir, "pub")]);
  const publicKey = readFileSync(join(dir.dir, "pub"), "utf8").trim();
  writeFileSync(join(dir.dir, "later"), "asked only once the daemon is gone\n");
  const later = hp(await addToStore(root, join(dir.dir, "later")));
  const daemon = new Daemon(root);
  await daemon.start();
  const store = await LocalStore.open(root, new Signer([readSecretKeyFile(join(dir.dir, "sec"))]), { backend: "daemon", daemonSocket: daemon.socket });
  store.watch().on("error", () => {}); // the daemon stopped below
  try {
    assert.equal(store.backend, "daemon");
    // Counts the lookups that had to wait (pathInfo), were asked again after the turn's shared
    // look (SOON), or were answered at once, to show the pipelines mixed these kinds.
    let [waited, soon, atOnce] = [0, 0, 0];
    const source: PathSource = {
      pathInfo: (h) => (waited++, store.pathInfo(h)),
      pathInfoNow: (h) => {
        const now = store.pathInfoNow(h);
        if (now === SOON) soon++;
        else if (now !== NOT_NOW) atOnce++;
        return now;
      },
      whenSoon: (run) => store.whenSoon(run),
      narStream: store.narStream.bind(store),
    };
    const fast = await serve(source, store, {});
    const plain = await serve(store, store, { fastPath: false });
    const [p1, p2] = paths.map((p) => `/${hp(p)}.narinfo`) as [string, string];
    const m = `/${miss}.narinfo`;
    const text = req(p1) + req(p2) + req(m) + req(p1, "", "HEAD") + req("/nix-cache-info") + req(p2) + req(m) + req(p1) + closing(p2);
    const expected = undated(await exchange(plain.port, [text], true));
    assert.match(expected, /^HTTP\/1\.1 200 OK\r\n[^]*StorePath: [^]*Sig: wait-test-1:/);
    const offsets = Array.from({ length: text.length - 1 }, (_, i) => i + 1);
    // Twenty exchanges at a time (the backend's lookups then share looks: they wait), then one
    // at a time (answered from memory at once, once the backend looks on its own again).
    for (let i = 0; i < offsets.length; i += 20) {
      await Promise.all(
        offsets.slice(i, i + 20).map(async (k) => {
          assert.equal(undated(await exchange(fast.port, [text.slice(0, k), text.slice(k)], true)), expected, `split at byte ${k}`);
        }),
      );
    }
    for (const k of offsets.filter((k) => k % 9 === 0)) {
      assert.equal(undated(await exchange(fast.port, [text.slice(0, k), text.slice(k)], true)), expected, `split at byte ${k}, alone`);
    }
    assert.equal(undated(await exchange(fast.port, [...text], true)), expected, "one byte a write");
    t.diagnostic(`lookups that waited: ${waited}, asked again after a shared look: ${soon}, answered at once: ${atOnce}`);
    assert.ok(waited > 0 && soon > 0 && atOnce > 0, `lookups that waited (${waited}), asked again (${soon}) and answered at once (${atOnce})`);
    assert.equal(fast.seen.length, offsets.length + offsets.filter((k) => k % 9 === 0).length + 1, "node:http saw only the last (Connection: close) request of each exchange");

    // Real Nix (2.8, or 2.26 when test/run puts it first on PATH) copies the closure.
    const dest = join(dir.dir, "dest");
    await nix([
      "copy", "--from", `http://127.0.0.1:${fast.port}`, "--to", dest,
      "--option", "trusted-public-keys", publicKey, "--option", "require-sigs", "true",
      "--option", "narinfo-cache-negative-ttl", "0", "--option", "narinfo-cache-positive-ttl", "0",
      ...paths,
    ]);
    assert.deepEqual((await pathInfo(dest, paths)).map((i) => i.path).sort(), [...paths].sort());
    await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--all", "--trusted-public-keys", publicKey, "--sigs-needed", "1"]);

    // The daemon gone: a path the agent has not asked for yet needs the daemon; the lookup fails
    // on the fast path and node:http, given the request, asks again and answers 503.
    await daemon.stop();
    const seenBefore = fast.seen.length;
    const gone = req(p1) + req(`/${later}.narinfo`) + req(p1);
    const [a, b] = await Promise.all([exchange(fast.port, [gone]), exchange(plain.port, [gone])]);
    assert.match(b, /^HTTP\/1\.1 200 [^]*HTTP\/1\.1 503 [^]*HTTP\/1\.1 200 /);
    assert.equal(undated(a), undated(b));
    assert.deepEqual(fast.seen.slice(seenBefore), [`/${later}.narinfo`, p1], "handed over at the failed lookup");
  } finally {
    await daemon.stop();
    store.close();
    dir.cleanup();
  }
});

// The daemon backend under concurrent connections (as wrk -c8, or Nix's parallel connections):
// lookups of a turn share one look at Nix's database files and are asked again right after it,
// answered on the fast path in that turn without a promise a lookup (pathInfo() is never called).
test("daemon backend, concurrent connections: lookups sharing a look are asked again after it and answered at once, never through pathInfo()", { timeout: 120_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  const dir = tempDir();
  const { root, paths } = await plainAndBuiltPaths(dir.dir);
  const daemon = new Daemon(root);
  await daemon.start();
  const store = await LocalStore.open(root, new Signer([]), { backend: "daemon", daemonSocket: daemon.socket });
  const meta = (store as unknown as { meta: { client: { requests: number }; dbVersion: { current(now?: number): string | undefined }; watcher: { refresh(): Promise<unknown> } } }).meta;
  try {
    const fast = await serve(store, store, {});
    const plain = await serve(store, store, { fastPath: false });
    const targets = [...paths.map((p) => `/${hp(p)}.narinfo`), `/${miss}.narinfo`];
    const get = async (port: number, target: string) => {
      const r = await fetch(`http://127.0.0.1:${port}${target}`);
      return `${r.status} ${r.headers.get("content-type")}\n${await r.text()}`;
    };
    // Until every answer comes from memory (the daemon asked once, the database quiet for a
    // second, the store listed since: the miss).
    const expected = new Map<string, string>();
    await eventually("answers from memory", async () => {
      await meta.watcher.refresh();
      const before = meta.client.requests;
      for (const target of targets) expected.set(target, await get(plain.port, target));
      return meta.client.requests === before && meta.dbVersion.current() !== undefined;
    }, 20_000);
    assert.match(expected.get(targets[0]!)!, /^200 text\/x-nix-narinfo\nStorePath: /);
    assert.match(expected.get(targets.at(-1)!)!, /^404 /);
    let [waited, looks] = [0, 0];
    const pathInfo = store.pathInfo.bind(store);
    store.pathInfo = (h) => (waited++, pathInfo(h));
    const current = meta.dbVersion.current.bind(meta.dbVersion);
    meta.dbVersion.current = (now) => (looks++, current(now));
    const requests = meta.client.requests;
    // Eight connections, each asking again as soon as answered, 60 lookups each.
    const perConnection = 60;
    await Promise.all(
      Array.from({ length: 8 }, async (_, c) => {
        for (let i = 0; i < perConnection; i++) {
          const target = targets[(c + i) % targets.length]!;
          assert.equal(await get(fast.port, target), expected.get(target), target);
        }
      }),
    );
    const lookups = 8 * perConnection;
    t.diagnostic(`${lookups} lookups, ${looks} looks, pathInfo() called ${waited} times`);
    assert.ok(looks < lookups / 2, `lookups shared looks (${looks} looks for ${lookups})`);
    assert.equal(waited, 0, "no lookup waited for a promise");
    assert.deepEqual(fast.seen, [], "node:http saw none of them");
    assert.equal(meta.client.requests, requests, "all from memory: no daemon request");
  } finally {
    await daemon.stop();
    store.close();
    dir.cleanup();
  }
});

// The mesh: agent A (a process) holds a path; agent B (in this process, to see its node:http
// requests) has none, and answers a narinfo for A's path from A, on the fast path.
test("mesh: a peer's narinfo, asked of the other agent, is answered on its fast path (hit_peer)", { timeout: 120_000 }, async (t) => {
  if (!local) return t.skip("needs Nix");
  const dir = tempDir();
  const [rootA, rootB] = [join(dir.dir, "a"), join(dir.dir, "b")];
  writeFileSync(join(dir.dir, "held"), "held by A\n");
  const held = await addToStore(rootA, join(dir.dir, "held"));
  writeFileSync(join(dir.dir, "own"), "B's own\n");
  await addToStore(rootB, join(dir.dir, "own"));
  const keys = [];
  for (const n of ["a", "b"]) {
    await run("nix-store", ["--generate-binary-cache-key", `wait-${n}-1`, join(dir.dir, `${n}.sec`), join(dir.dir, `${n}.pub`)]);
    keys.push(readFileSync(join(dir.dir, `${n}.pub`), "utf8").trim());
  }
  const [pubA, pubB] = keys as [string, string];
  const [portA, portB] = [await freePort(), await freePort()];
  const a = await startAgentProcess([
    "--store-root", rootA, "--sign-key", join(dir.dir, "a.sec"), "--state-dir", join(dir.dir, "a-state"),
    "--p2p-listen", `127.0.0.1:${portA}`, "--peer", `127.0.0.1:${portB}`, "--trusted-key", pubB, "--no-mesh-bulk",
  ]);
  const config = loadConfig({
    flags: {
      listen: "127.0.0.1:0", storeRoot: rootB, signKeyFiles: [join(dir.dir, "b.sec")], stateDir: join(dir.dir, "b-state"),
      p2pListen: `127.0.0.1:${portB}`, peers: [`127.0.0.1:${portA}`], trustedKeys: [pubA], mdns: false, meshBulk: false, upstreamKeys: [],
    },
    env: {},
  });
  const b = await startAgent(config, silent);
  try {
    const seen: string[] = [];
    b.server.on("request", (r: { url?: string }) => seen.push(r.url ?? ""));
    const url = `http://127.0.0.1:${b.address.port}/${hp(held)}.narinfo`;
    const body = await eventually("B answers A's path", async () => {
      const r = await fetch(url);
      return r.status === 200 ? r.text() : (await r.arrayBuffer(), undefined);
    });
    assert.match(body, new RegExp(`^StorePath: ${held}\n[^]*Sig: wait-a-1:`, "m"));
    assert.ok(b.metrics.narinfo.hitsPeer >= 1, JSON.stringify(b.metrics.narinfo));
    assert.deepEqual(seen, [], "node:http saw no request: the fast path answered, also while B asked A");
  } finally {
    await b.stop();
    await a.stop();
    dir.cleanup();
  }
});
