// NAR bodies with sendfile(2) (agent/http/send-file.ts, native/sendfile.c): the same bytes as
// `nix store dump-path` and as the pooled path, from any Range offset, with the failures a
// transfer can meet (a file shrinking under it, a client hanging up, a slow client against the
// server's timeouts) handled as the pooled path handles them. Real Nix copies from the agent.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { chmodSync, mkdirSync, readdirSync, symlinkSync, truncateSync, writeFileSync, readFileSync } from "node:fs";
import { connect, type AddressInfo, type Socket } from "node:net";
import { constants as osConstants } from "node:os";
import type { Server } from "node:http";
import { join } from "node:path";
import { promisify } from "node:util";
import { createHttpServer } from "../agent/http/server.js";
import type { CacheContext } from "../agent/http/cache-routes.js";
import { loadSendfile, REGION_MIN, type SendfileBinding } from "../agent/http/send-file.js";
import { createLogger } from "../agent/log.js";
import { AgentMetrics, type Outcome } from "../agent/metrics.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import type { PathInfo } from "../protocol/path-info.js";
import { narUrl } from "../protocol/nar-url.js";
import { startAgentProcess } from "./helpers/agent.js";
import { addToStore, dumpPath, hasNix, nix, NIX_FLAGS, run, tempDir } from "./helpers/nix.js";

const execFileP = promisify(execFile);
/** The addon, as loadSendfile finds it (dist/test/ -> build/Release/). */
const ADDON_PATH = new URL("../../build/Release/sendfile.node", import.meta.url).pathname;
const loaded = loadSendfile();

test("the sendfile addon is built and loads (required under CI=true)", async (t) => {
  if (!loaded.binding) {
    if (process.env.CI === "true") assert.fail(`no sendfile addon under CI: ${loaded.why}`);
    t.skip(loaded.why);
    return;
  }
  // One real call: a file's bytes over a loopback TCP connection.
  const tmp = tempDir();
  t.after(tmp.cleanup);
  const data = randomBytes(200_000);
  writeFileSync(join(tmp.dir, "f"), data);
  const { open } = await import("node:fs/promises");
  const fh = await open(join(tmp.dir, "f"));
  const got: Buffer[] = [];
  const server = (await import("node:net")).createServer((s) => {
    s.on("data", (d: Buffer) => got.push(d));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const sock = connect((server.address() as AddressInfo).port, "127.0.0.1");
  await new Promise((r) => sock.once("connect", r));
  const fd = (sock as unknown as { _handle: { fd: number } })._handle.fd;
  let off = 100;
  while (off < data.length) {
    const [err, sent] = await new Promise<[NodeJS.ErrnoException | null, number]>((r) => loaded.binding!.sendfile(fd, fh.fd, off, data.length - off, (e, n) => r([e, n])));
    if (err && err.code !== "EAGAIN") throw err;
    off += sent;
    if (sent === 0) await new Promise((r) => setTimeout(r, 5));
  }
  sock.end();
  await waitFor(() => got.reduce((n, b) => n + b.length, 0) >= data.length - 100);
  await fh.close();
  server.close();
  assert.deepEqual(Buffer.concat(got), data.subarray(100));
  // With a piece: when the socket is full, the next bytes come back read (into a paused reader).
  const sink = (await import("node:net")).createServer((s) => s.pause()); // takes nothing: the socket fills
  await new Promise<void>((r) => sink.listen(0, "127.0.0.1", r));
  const paused = connect((sink.address() as AddressInfo).port, "127.0.0.1");
  await new Promise((r) => paused.once("connect", r));
  const pfd = (paused as unknown as { _handle: { fd: number } })._handle.fd;
  const big = join(tmp.dir, "big");
  writeFileSync(big, randomBytes(64 << 20));
  const bh = await open(big);
  const piece = Buffer.alloc(4096);
  const [perr, psent, pbytes] = await new Promise<[NodeJS.ErrnoException | null, number, number]>((r) => loaded.binding!.sendfile(pfd, bh.fd, 0, 64 << 20, piece, (e, n, p) => r([e, n, p])));
  assert.equal(perr, null);
  assert.ok(psent > 0 && psent < 64 << 20, `a partial count on a full socket (${psent})`);
  assert.equal(pbytes, 4096);
  assert.deepEqual(piece, readFileSync(big).subarray(psent, psent + 4096), "the bytes after those sent");
  paused.destroy();
  sink.close();
  await bh.close();
  // Bad arguments are refused at once, not on the thread pool.
  assert.throws(() => loaded.binding!.sendfile(-1, fh.fd, 0, 1, () => {}), TypeError);
});

test("sendfileNow sends only bytes in the page cache; the poll wakes when a full socket drains, and closing it leaks nothing", async (t) => {
  if (!loaded.binding) {
    t.skip(loaded.why);
    return;
  }
  const b = loaded.binding;
  assert.equal(typeof b.sendfileNow, "function");
  const tmp = tempDir();
  t.after(tmp.cleanup);
  const file = join(tmp.dir, "f");
  const data = randomBytes(12 << 20);
  writeFileSync(file, data);
  const { open } = await import("node:fs/promises");
  const fh = await open(file);
  t.after(() => fh.close());
  let peer: Socket | undefined;
  const got: Buffer[] = [];
  const peers: Socket[] = [];
  const server = (await import("node:net")).createServer((s) => {
    peer = s;
    peers.push(s);
    s.pause(); // takes nothing until resumed: the socket fills
    s.on("data", (d: Buffer) => got.push(d));
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => server.close());
  // A paused receiver never sees its client's close: without this a failed assertion keeps the process alive.
  t.after(() => peers.forEach((s) => s.destroy()));
  const sock = connect((server.address() as AddressInfo).port, "127.0.0.1");
  t.after(() => sock.destroy());
  await new Promise((r) => sock.once("connect", r));
  await waitFor(() => peer !== undefined);
  const fd = (sock as unknown as { _handle: { fd: number } })._handle.fd;
  // Not in the page cache: nothing is sent, nothing is read on this thread.
  await evict(file);
  assert.equal(b.sendfileNow!(fd, fh.fd, 0, data.length), -ENODATA);
  const { stdout: res } = await execFileP("fincore", ["--bytes", "--noheadings", "--output", "RES", file]);
  assert.ok(Number(res.trim()) < 1 << 20, "sendfileNow read nothing from disk");
  // In the page cache: sent, until the socket is full (a partial count, then -EAGAIN).
  readFileSync(file);
  let off = 0;
  for (let n = b.sendfileNow!(fd, fh.fd, off, data.length); n > 0; n = b.sendfileNow!(fd, fh.fd, off, data.length - off)) off += n;
  assert.ok(off > 0 && off < data.length, `the socket took part of the file (${off} bytes)`);
  assert.equal(b.sendfileNow!(fd, fh.fd, off, data.length - off), -osConstants.errno.EAGAIN);
  // A poll closed while started: no callback, its dup closed.
  const fds = fdCount();
  let closedCalled = false;
  const h = b.pollOpen!(fd, () => (closedCalled = true));
  assert.equal(fdCount(), fds + 1, "the poll watches a dup of the socket");
  assert.equal(b.pollStart!(h), 0);
  b.pollClose!(h);
  b.pollClose!(h); // idempotent
  // A poll that calls back when the reader drains the socket, stopped and started again.
  let wake: ((status: number) => void) | undefined;
  let calls = 0;
  const p = b.pollOpen!(fd, (status) => {
    calls++;
    b.pollStop!(p); // as the agent does when nobody waits
    wake?.(status);
  });
  t.after(() => b.pollClose!(p));
  const writable = (): Promise<number> => new Promise((r) => {
    wake = r;
    assert.equal(b.pollStart!(p), 0);
  });
  const woken = writable();
  peer!.resume();
  assert.equal(await woken, 0);
  while (off < data.length) {
    const n = b.sendfileNow!(fd, fh.fd, off, data.length - off);
    if (n > 0) off += n;
    else if (n === -osConstants.errno.EAGAIN) assert.equal(await writable(), 0);
    else assert.fail(`sendfileNow: ${n}`);
  }
  b.pollClose!(p);
  await waitFor(() => got.reduce((n, d) => n + d.length, 0) >= data.length);
  assert.ok(Buffer.concat(got).equals(data), "the receiver got the file, in order");
  assert.ok(calls > 0);
  await new Promise((r) => setTimeout(r, 20)); // the poll handles' close callbacks
  assert.equal(fdCount(), fds, "every dup closed");
  assert.equal(closedCalled, false, "a closed poll never calls back");
  assert.throws(() => b.pollOpen!(-1, () => {}), TypeError);
  // pollSend: the addon sends at each writability until done, or until the bytes are not cached.
  got.length = 0;
  peer = undefined;
  const sock2 = connect((server.address() as AddressInfo).port, "127.0.0.1");
  t.after(() => sock2.destroy());
  await new Promise((r) => sock2.once("connect", r));
  await waitFor(() => peer !== undefined);
  const fd2 = (sock2 as unknown as { _handle: { fd: number } })._handle.fd;
  let done: ((r: [number, number]) => void) | undefined;
  const q = b.pollOpen!(fd2, (status, sent) => done?.([status, sent]));
  t.after(() => b.pollClose!(q)); // idempotent; a started poll left open would keep the process alive
  const send = (from: number): Promise<[number, number]> => new Promise((r) => {
    done = r;
    assert.equal(b.pollSend!(q, fh.fd, from, data.length - from), 0);
  });
  await evict(file);
  assert.deepEqual(await send(0), [-ENODATA, 0], "not cached: nothing sent, the pool's turn");
  readFileSync(file);
  const sending = send(0);
  peer!.resume();
  assert.deepEqual(await sending, [0, data.length], "all sent, across many socket-fulls");
  b.pollClose!(q);
  await waitFor(() => got.reduce((n, d) => n + d.length, 0) >= data.length);
  assert.ok(Buffer.concat(got).equals(data), "the receiver got the file, in order");
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(fdCount(), fds + 2, "only the second test connection (both ends) is new: every dup closed");
});

test("sendfileNow's page cache check works for an agent that does not own the store's files (not root)", async (t) => {
  if (!loaded.binding || process.getuid?.() !== 0) {
    t.skip(loaded.binding ? "needs root, to run a child as another user" : loaded.why);
    return;
  }
  // The store's files belong to root, 0444; the agent runs as its own user. cachestat(2) refuses
  // such a file (EPERM) and mincore(2) calls all its pages resident: the check must do neither.
  const tmp = tempDir();
  t.after(tmp.cleanup);
  chmodSync(tmp.dir, 0o755);
  const file = join(tmp.dir, "f");
  writeFileSync(file, randomBytes(4 << 20));
  chmodSync(file, 0o444);
  const child = `
    const b = require(${JSON.stringify(ADDON_PATH)});
    const fs = require("node:fs"), net = require("node:net");
    const fd = fs.openSync(${JSON.stringify(file)}, "r");
    const srv = net.createServer((s) => s.pause()).listen(0, "127.0.0.1", () => {
      const c = net.connect(srv.address().port, "127.0.0.1", () => {
        const out = c._handle.fd;
        const evicted = b.sendfileNow(out, fd, 0, 1 << 20);
        fs.readFileSync(${JSON.stringify(file)});
        const cached = b.sendfileNow(out, fd, 0, 1 << 20);
        console.log(JSON.stringify({ uid: process.getuid(), evicted, cached }));
        c.destroy();
        srv.close();
      });
    });`;
  await evict(file);
  const { stdout } = await execFileP(process.execPath, ["-e", child], { uid: 65534, gid: 65534 });
  const r = JSON.parse(stdout) as { uid: number; evicted: number; cached: number };
  assert.equal(r.uid, 65534);
  assert.equal(r.evicted, -ENODATA, "evicted: not sent on the event loop");
  assert.equal(r.cached, 1 << 20, "cached: sent on the event loop");
});

/** The real addon, counting its calls: proof the bytes went the sendfile way, and which way. */
interface Spy extends SendfileBinding {
  /** sendfile calls, on the pool or on the event loop, and the bytes they sent. */
  calls: number;
  bytes: number;
  /** Calls on the pool; calls on the event loop that sent (or failed), that found the bytes not cached. */
  pool: number;
  now: number;
  notCached: number;
  /** Waits for writability (pollStart and pollSend calls); pollSend calls. */
  waits: number;
  pollSends: number;
}

function spy(): Spy {
  type Done = (e: NodeJS.ErrnoException | null, n: number, piece: number) => void;
  const real = loaded.binding!;
  const s: Spy = {
    calls: 0,
    bytes: 0,
    pool: 0,
    now: 0,
    notCached: 0,
    waits: 0,
    pollSends: 0,
    sendfile(out: number, inFd: number, off: number, len: number, ...rest: unknown[]) {
      s.calls++;
      s.pool++;
      const cb = rest.pop() as Done;
      const done = (e: NodeJS.ErrnoException | null, n: number, p = 0): void => {
        s.bytes += n;
        cb(e, n, p);
      };
      if (rest.length > 0) real.sendfile(out, inFd, off, len, rest[0] as Buffer, done);
      else real.sendfile(out, inFd, off, len, done);
    },
    sendfileNow(out: number, inFd: number, off: number, len: number) {
      const n = real.sendfileNow!(out, inFd, off, len);
      if (n === -ENODATA) s.notCached++;
      else {
        s.calls++;
        s.now++;
        if (n > 0) s.bytes += n;
      }
      return n;
    },
    pollOpen: (fd, cb) =>
      real.pollOpen!(fd, (status, sent) => {
        s.bytes += sent;
        cb(status, sent);
      }),
    pollStart(h) {
      s.waits++;
      return real.pollStart!(h);
    },
    pollSend(h, inFd, off, len) {
      s.waits++;
      s.pollSends++;
      return real.pollSend!(h, inFd, off, len);
    },
    pollStop: (h) => real.pollStop!(h),
    pollClose: (h) => real.pollClose!(h),
  } as Spy;
  return s;
}

const ENODATA = osConstants.errno.ENODATA;

/** Drops a file's pages from the page cache (POSIX_FADV_DONTNEED on this file only) and checks it. */
async function evict(file: string): Promise<void> {
  // The kernel may keep pages it is still writing back or reading ahead on a loaded machine
  // (seen: 1.2 MB left once under CI load): ask again a few times before calling it a failure.
  let left = "";
  for (let attempt = 0; attempt < 10; attempt++) {
    await execFileP("sync", [file]); // dirty pages cannot be dropped
    await execFileP("dd", [`if=${file}`, "iflag=nocache", "count=0", "status=none"]);
    left = (await execFileP("fincore", ["--bytes", "--noheadings", "--output", "RES", file])).stdout.trim();
    if (Number(left) < 1 << 20) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.fail(`${file} evicted from the page cache (${left} bytes left)`);
}

let tmp: { dir: string; cleanup: () => void } | undefined;
let root: string;
let local: LocalStore;
const paths: Record<"big" | "tree" | "shrink" | "hangup" | "cold", string> = { big: "", tree: "", shrink: "", hangup: "", cold: "" };
const dumps: Record<string, Buffer> = {};

before(async () => {
  if (!(await hasNix())) {
    if (process.env.CI === "true") throw new Error("real Nix is required under CI=true");
    return;
  }
  tmp = tempDir();
  root = join(tmp.dir, "store");
  // One big file; a tree with files around the region threshold (REGION_MIN), an executable, empty
  // files, small files, a symlink and a subdirectory; files to shrink and to hang up on.
  writeFileSync(join(tmp.dir, "big"), randomBytes(24 << 20));
  const tree = join(tmp.dir, "tree");
  mkdirSync(join(tree, "sub"), { recursive: true });
  const sizes = [0, 1, 4096, 65_536, REGION_MIN - 1, REGION_MIN, REGION_MIN + 1, 262_144, 1 << 20, 3_000_001];
  for (let i = 0; i < 120; i++) writeFileSync(join(tree, `f${String(i).padStart(3, "0")}`), randomBytes(sizes[i % sizes.length]! + (i >= 60 ? i : 0)));
  writeFileSync(join(tree, "empty"), "");
  writeFileSync(join(tree, "sub", "empty"), "");
  writeFileSync(join(tree, "sub", "run"), randomBytes(300_000));
  chmodSync(join(tree, "sub", "run"), 0o755);
  symlinkSync("sub/run", join(tree, "link"));
  writeFileSync(join(tmp.dir, "shrink"), randomBytes(48 << 20));
  writeFileSync(join(tmp.dir, "hangup"), randomBytes(48 << 20));
  writeFileSync(join(tmp.dir, "cold"), randomBytes(24 << 20));
  for (const k of Object.keys(paths) as (keyof typeof paths)[]) paths[k] = await addToStore(root, join(tmp.dir, k));
  local = new LocalStore(root, new Signer([]));
  for (const k of ["big", "tree", "cold"] as const) dumps[k] = await collect(dumpPath(root, paths[k]));
});

after(() => {
  local?.close();
  tmp?.cleanup();
});

async function collect(s: NodeJS.ReadableStream & { done: Promise<void> }): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of s) parts.push(c as Buffer);
  await s.done;
  return Buffer.concat(parts);
}

interface Served {
  server: Server;
  port: number;
  outcomes: Outcome[];
  metrics: AgentMetrics;
  close(): Promise<void>;
}

async function serve(sendfile: SendfileBinding | undefined, timeouts?: { headers: number; keepAlive: number; checkInterval: number }): Promise<Served> {
  const metrics = new AgentMetrics({ storePaths: () => 0, peers: () => [], mesh: () => undefined });
  const outcomes: Outcome[] = [];
  const request = metrics.request.bind(metrics);
  metrics.request = (route, method, outcome, start) => {
    if (route === "nar") outcomes.push(outcome);
    request(route, method, outcome, start);
  };
  const ctx = { source: local, local, priority: 30, log: createLogger({ level: "silent", pretty: false }), metrics, sendfile } as unknown as CacheContext;
  const server = createHttpServer(ctx, timeouts ? { timeouts } : {});
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return {
    server,
    port: (server.address() as AddressInfo).port,
    outcomes,
    metrics,
    close: async () => {
      server.closeAllConnections();
      await new Promise((r) => server.close(r));
      metrics.close();
    },
  };
}

async function infoOf(storePath: string): Promise<PathInfo> {
  return (await local.pathInfo(storePath.slice(11, 43)))!;
}

async function urlOf(storePath: string): Promise<string> {
  return "/" + narUrl(storePath.slice(11, 43), (await infoOf(storePath)).narHash);
}

function ready(t: { skip: (m: string) => void }): boolean {
  if (!tmp) t.skip("nix not installed");
  else if (!loaded.binding) t.skip(loaded.why);
  else return true;
  return false;
}

const fdCount = () => readdirSync("/proc/self/fd").length;

test("NARs sent with sendfile equal nix store dump-path and the pooled path's, byte for byte", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  const [a, b] = [await serve(on), await serve(undefined)];
  try {
    for (const k of ["big", "tree"] as const) {
      const url = await urlOf(paths[k]);
      const withSendfile = Buffer.from(await (await fetch(`http://127.0.0.1:${a.port}${url}`)).arrayBuffer());
      const pooled = Buffer.from(await (await fetch(`http://127.0.0.1:${b.port}${url}`)).arrayBuffer());
      assert.ok(withSendfile.equals(dumps[k]!), `${k}: sendfile NAR differs from nix store dump-path`);
      assert.ok(pooled.equals(dumps[k]!), `${k}: pooled NAR differs from nix store dump-path`);
    }
    assert.ok(on.calls > 0 && on.bytes > 24 << 20, `sendfile carried the file contents (calls ${on.calls}, bytes ${on.bytes})`);
    assert.deepEqual(a.outcomes, ["hit_local", "hit_local"]);
    assert.equal(a.metrics.narBytesServed.local, dumps.big!.length + dumps.tree!.length, "every byte counted once");
  } finally {
    await a.close();
    await b.close();
  }
});

test("Range requests from offsets in the framing and inside file contents, and HEAD", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  const a = await serve(on);
  try {
    const tree = dumps.tree!;
    const big = dumps.big!;
    // The first file's contents start after the magic and the headers: find a big file's.
    const cases: ["big" | "tree", number, number][] = [
      ["tree", 0, 10], // the magic
      ["tree", 5, 300_000], // from inside the magic into file contents
      ["tree", 200, tree.length], // framing to the end
      ["tree", 70_000, 4_000_000], // inside contents, across files and their framing
      ["tree", tree.length - 100_000, tree.length], // the last bytes
      ["big", 123_457, 20_000_003], // mid-file to mid-file
      ["big", 1_000_001, big.length], // mid-file to the end, with the closing framing
      ["big", big.length - 1, big.length],
    ];
    for (const [k, s, e] of cases) {
      const res = await fetch(`http://127.0.0.1:${a.port}${await urlOf(paths[k])}`, { headers: { Range: `bytes=${s}-${e - 1}` } });
      assert.equal(res.status, 206);
      assert.equal(res.headers.get("content-range"), `bytes ${s}-${e - 1}/${dumps[k]!.length}`);
      const got = Buffer.from(await res.arrayBuffer());
      assert.ok(got.equals(dumps[k]!.subarray(s, e)), `${k} [${s}, ${e}) differs`);
    }
    assert.ok(on.calls > 0, "ranges inside large contents were sent with sendfile");
    const head = await fetch(`http://127.0.0.1:${a.port}${await urlOf(paths.big)}`, { method: "HEAD" });
    assert.equal(head.status, 200);
    assert.equal(head.headers.get("content-length"), String(big.length));
    assert.equal((await head.arrayBuffer()).byteLength, 0);
  } finally {
    await a.close();
  }
});

/** Sends a GET on a raw socket, paused; returns the socket and a promise of everything it received. */
function rawGet(port: number, path: string): { sock: ReturnType<typeof connect>; all: Promise<Buffer> } {
  const sock = connect(port, "127.0.0.1", () => sock.write(`GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`));
  sock.pause();
  const chunks: Buffer[] = [];
  const all = new Promise<Buffer>((resolve) => {
    sock.on("data", (d: Buffer) => chunks.push(d));
    sock.on("close", () => resolve(Buffer.concat(chunks)));
    sock.on("error", () => {});
  });
  return { sock, all };
}

test("a file that shrinks mid-transfer cuts the connection: the client sees a short body", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  const a = await serve(on);
  try {
    const info = await infoOf(paths.shrink);
    const { sock, all } = rawGet(a.port, await urlOf(paths.shrink));
    // The client reads nothing: the agent fills the socket buffers and waits. Then the file shrinks.
    await waitFor(() => on.calls > 0);
    await new Promise((r) => setTimeout(r, 200));
    truncateSync(join(root, paths.shrink), 8 << 20);
    sock.resume();
    const got = await all;
    const body = got.subarray(got.indexOf("\r\n\r\n") + 4);
    assert.match(got.subarray(0, 20).toString(), /^HTTP\/1\.1 200 /);
    assert.ok(body.length < info.narSize, `short body (${body.length} of ${info.narSize})`);
    await waitFor(() => a.outcomes.length === 1);
    assert.deepEqual(a.outcomes, ["server_error"]);
    assert.equal((await fetch(`http://127.0.0.1:${a.port}/nix-cache-info`)).status, 200, "the agent lives on");
  } finally {
    await a.close();
  }
});

test("a client hanging up mid-sendfile is 'aborted', the agent lives on, no descriptor leaks", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  const a = await serve(on);
  try {
    const url = await urlOf(paths.hangup);
    await fetch(`http://127.0.0.1:${a.port}/nix-cache-info`); // warm the server's lazily opened state
    const fds = fdCount();
    for (let i = 0; i < 5; i++) {
      const { sock, all } = rawGet(a.port, url);
      let seen = 0;
      sock.on("data", (d: Buffer) => (seen += d.length));
      sock.resume();
      await waitFor(() => seen > (4 << 20) && on.calls > 0);
      sock.resetAndDestroy(); // RST: the agent's next sendfile gets ECONNRESET or EPIPE
      await all;
      await waitFor(() => a.outcomes.length === i + 1);
    }
    assert.deepEqual(a.outcomes, ["aborted", "aborted", "aborted", "aborted", "aborted"]);
    await waitFor(() => fdCount() <= fds);
    assert.equal(fdCount(), fds, "descriptors back to where they were");
    const whole = Buffer.from(await (await fetch(`http://127.0.0.1:${a.port}${url}`)).arrayBuffer());
    assert.equal(whole.length, (await infoOf(paths.hangup)).narSize, "the next client gets the whole NAR");
  } finally {
    await a.close();
  }
});

test("a slow client: the transfer outlasts the server's timeouts, memory stays flat", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  // Timeouts of 300 ms (the agent's are 20-30 s); curl takes the 24 MiB NAR at 8 MiB/s, about 3 s.
  const a = await serve(on, { headers: 300, keepAlive: 300, checkInterval: 50 });
  try {
    const fds = fdCount();
    const before = process.memoryUsage();
    let peakArrayBuffers = before.arrayBuffers;
    let peakRss = before.rss;
    const sampler = setInterval(() => {
      const m = process.memoryUsage();
      peakArrayBuffers = Math.max(peakArrayBuffers, m.arrayBuffers);
      peakRss = Math.max(peakRss, m.rss);
    }, 20);
    const { stdout } = await execFileP("curl", ["-s", "--limit-rate", "8M", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", `http://127.0.0.1:${a.port}${await urlOf(paths.big)}`]);
    clearInterval(sampler);
    assert.equal(stdout, `200 ${dumps.big!.length}`, "the whole NAR arrived");
    assert.deepEqual(a.outcomes, ["hit_local"]);
    assert.ok(on.calls > 0);
    const grew = peakArrayBuffers - before.arrayBuffers;
    assert.ok(grew < 4 << 20, `buffers held for the slow client: +${(grew / 2 ** 20).toFixed(1)} MiB (NAR 24 MiB)`);
    t.diagnostic(`arrayBuffers +${(grew / 2 ** 20).toFixed(2)} MiB, rss +${((peakRss - before.rss) / 2 ** 20).toFixed(1)} MiB, sendfile calls ${on.calls}`);
    await waitFor(() => fdCount() <= fds);
  } finally {
    await a.close();
  }
});

test("keep-alive: the next request on the connection is answered after a sendfile body", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  const a = await serve(on);
  try {
    const base = `http://127.0.0.1:${a.port}`;
    const w = ["-o", "/dev/null", "-w", "%{http_code} %{size_download} %{num_connects}\n"];
    const { stdout } = await execFileP("curl", ["-s", ...w, base + (await urlOf(paths.big)), ...w, base + (await urlOf(paths.tree)), ...w, base + "/nix-cache-info"]);
    const lines = stdout.trim().split("\n");
    assert.deepEqual(lines.slice(0, 2), [`200 ${dumps.big!.length} 1`, `200 ${dumps.tree!.length} 0`], "one connection for all");
    assert.match(lines[2]!, /^200 \d+ 0$/);
    assert.ok(on.calls > 0);
  } finally {
    await a.close();
  }
});

test("a full socket is waited for with the poll: no file bytes pass through Node's writes", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  const a = await serve(on);
  const sockets: Socket[] = [];
  a.server.on("connection", (s: Socket) => sockets.push(s));
  try {
    const url = await urlOf(paths.big);
    readFileSync(join(root, paths.big)); // in the page cache
    const { sock, all } = rawGet(a.port, url);
    await new Promise((r) => setTimeout(r, 300)); // the client reads nothing: the socket fills
    sock.resume();
    await waitFor(() => a.outcomes.length === 1); // the response ended: every byte is in the kernel
    sock.destroy();
    await all;
    assert.deepEqual(a.outcomes, ["hit_local"]);
    const server = sockets[0]!;
    // Node wrote the headers and the NAR's framing; the 24 MiB of contents went by sendfile,
    // also while the client was not reading (the old way wrote 64 KiB pieces meanwhile).
    assert.ok(server.bytesWritten < 4096, `bytes written through Node: ${server.bytesWritten}`);
    assert.ok(on.waits > 0, "the agent waited for writability");
  } finally {
    await a.close();
  }
});

test("file contents in the page cache go out on the event loop, evicted ones through the thread pool", async (t) => {
  if (!ready(t)) return;
  const file = join(root, paths.cold);
  const url = await urlOf(paths.cold);
  // Evicted: the first bytes are not in the page cache, so the first call must go to the pool.
  {
    const on = spy();
    const a = await serve(on);
    try {
      await evict(file);
      const body = Buffer.from(await (await fetch(`http://127.0.0.1:${a.port}${url}`)).arrayBuffer());
      assert.ok(body.equals(dumps.cold!), "the NAR equals nix store dump-path");
      assert.ok(on.notCached > 0 && on.pool > 0, `not cached ${on.notCached}, pool calls ${on.pool}`);
      t.diagnostic(`evicted: pool calls ${on.pool}, event-loop calls ${on.now}, not cached ${on.notCached}`);
    } finally {
      await a.close();
    }
  }
  // In the page cache (the download above read it): no trip to the pool at all.
  {
    const on = spy();
    const a = await serve(on);
    try {
      const body = Buffer.from(await (await fetch(`http://127.0.0.1:${a.port}${url}`)).arrayBuffer());
      assert.ok(body.equals(dumps.cold!), "the NAR equals nix store dump-path");
      assert.equal(on.pool, 0, "no sendfile on the pool");
      assert.ok(on.now > 0 && on.bytes === 24 << 20, `event-loop calls ${on.now}, bytes ${on.bytes}`);
    } finally {
      await a.close();
    }
  }
});

test("the server closing a connection while it waits for the client frees the poll and its descriptor", async (t) => {
  if (!ready(t)) return;
  const on = spy();
  const a = await serve(on);
  try {
    await fetch(`http://127.0.0.1:${a.port}/nix-cache-info`); // warm the server's lazily opened state
    a.server.closeAllConnections(); // and close that keep-alive connection before counting
    await new Promise((r) => setTimeout(r, 50));
    readFileSync(join(root, paths.hangup));
    const fds = fdCount();
    const { sock, all } = rawGet(a.port, await urlOf(paths.hangup)); // never reads
    await waitFor(() => on.waits > 0);
    await new Promise((r) => setTimeout(r, 50));
    a.server.closeAllConnections();
    // With the client still not reading (nothing would wake the poll), its dup is closed.
    await waitFor(() => fdCount() <= fds + 1, 5_000).catch(() => {});
    assert.equal(fdCount(), fds + 1, "only the test client's own socket is left (the poll's dup closed)");
    sock.resume();
    const closed = await Promise.race([all.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 10_000))]);
    assert.ok(closed, "the client saw the connection close");
    await waitFor(() => fdCount() <= fds);
  } finally {
    await a.close();
  }
});

test("nix copy --from the agent (sendfile on), signatures required, then nix store verify", async (t) => {
  if (!ready(t)) return;
  const work = tempDir();
  t.after(work.cleanup);
  await run("nix-store", ["--generate-binary-cache-key", "sendfile-test-1", join(work.dir, "sec"), join(work.dir, "pub")]);
  const publicKey = readFileSync(join(work.dir, "pub"), "utf8").trim();
  const agent = await startAgentProcess(["--store-root", root, "--sign-key", join(work.dir, "sec"), "--state-dir", join(work.dir, "state")]);
  t.after(() => agent.stop());
  assert.match(agent.logs(), /"narSend":"sendfile"/, "the agent says it sends NARs with sendfile");
  const dest = join(work.dir, "dest");
  await nix([
    "copy", "--from", agent.url, "--to", dest,
    "--option", "trusted-public-keys", publicKey, "--option", "require-sigs", "true",
    "--option", "narinfo-cache-negative-ttl", "0",
    paths.big, paths.tree,
  ]);
  await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--trusted-public-keys", publicKey, "--sigs-needed", "1", paths.big, paths.tree]);
  const copied = await collect(dumpPath(dest, paths.tree));
  assert.ok(copied.equals(dumps.tree!));
});

async function waitFor(cond: () => boolean, ms = 20_000): Promise<void> {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error("timed out waiting");
    await new Promise((r) => setTimeout(r, 10));
  }
}
