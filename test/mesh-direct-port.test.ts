// LAN-direct NARs, the holder's direct port (agent/mesh/direct-listener.ts) and the ticket round
// trip (askDirect, NarDirect) between real mesh nodes on 127.0.0.1, from a real Nix chroot store:
// a ticket opens exactly one request of exactly its NAR, whose bytes are Nix's own dump; nothing
// else on the port gives anything (reused, another NAR's, expired, random, malformed, `..`,
// absolute-form, other methods, oversized headers), and sockets that never finish their headers
// are cut while the port goes on serving.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { connect, type Socket } from "node:net";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { request } from "node:http";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { generateKeyPair } from "../protocol/keys.js";
import { storePathHashPart } from "../protocol/store-path.js";
import type { PathInfo } from "../protocol/path-info.js";
import { parseHash } from "../protocol/hash.js";
import { encodeNix32 } from "../protocol/nix32.js";
import { createMeshNode } from "../agent/mesh/node.js";
import { askDirect, serveNar } from "../agent/mesh/nar-service.js";
import { DirectRoutes } from "../agent/mesh/direct-client.js";
import { NarCompression } from "../agent/mesh/nar-compression.js";
import { BulkListener } from "../agent/mesh/bulk-listener.js";
import { DIRECT_HEADERS_MS, DIRECT_INBOUND_PER_HOST, DirectListener, directSource } from "../agent/mesh/direct-listener.js";
import { sendNar } from "../agent/http/cache-routes.js";
import { loadSendfile } from "../agent/http/send-file.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { mintTicket } from "../protocol/direct-ticket.js";
import { exchange, req as rawReq } from "./helpers/raw-http.js";
import { addToStore, dumpPath, hasNix, needNix, pathInfo, run, tempDir } from "./helpers/nix.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: "silent" });
const ka = generateKeyPair("direct-a");
const kb = generateKeyPair("direct-b");

interface Nar {
  path: string;
  hashPart: string;
  narHash: string;
  narSize: number;
  dump: Buffer;
}
let fx: { root: string; big: Nar; small: Nar; cleanup(): void } | undefined;
const cleanups: (() => Promise<unknown> | unknown)[] = [];

async function nar(root: string, path: string): Promise<Nar> {
  const [info] = await pathInfo(root, [path]);
  const s = dumpPath(root, path);
  const parts: Buffer[] = [];
  for await (const c of s) parts.push(c as Buffer);
  await s.done;
  const narHash = "sha256:" + encodeNix32(parseHash(info!.narHash)); // as the agent writes it (Nix's JSON has SRI)
  return { path, hashPart: storePathHashPart(path), narHash, narSize: info!.narSize, dump: Buffer.concat(parts) };
}

before(async () => {
  if (!(await hasNix())) return;
  const { dir, cleanup } = tempDir("fleetcache-direct-port-");
  const root = join(dir, "a");
  writeFileSync(join(dir, "big.bin"), randomBytes(9 << 20)); // file contents past sendfile's region threshold
  writeFileSync(join(dir, "small.txt"), "small\n");
  const big = await nar(root, await addToStore(root, join(dir, "big.bin")));
  const small = await nar(root, await addToStore(root, join(dir, "small.txt")));
  fx = { root, big, small, cleanup };
});

after(async () => {
  for (const c of cleanups.reverse()) await c();
  fx?.cleanup();
});

/** A holder with a direct port (and, unless `direct` is false, serving tickets for it) and a requester, connected. */
async function pair(o: { direct?: boolean } = {}) {
  const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
  const local = new LocalStore(fx!.root, new Signer([ka]));
  const sendfile = loadSendfile().binding;
  const serve = (req: Parameters<typeof sendNar>[1], res: Parameters<typeof sendNar>[2], info: PathInfo, count: (n: number) => void) =>
    sendNar({ source: directSource(local), local, priority: 30, log, sendfile }, req, res, info, count);
  const direct = await DirectListener.start("127.0.0.1", 0, serve, log, (h) => local.pathInfo(h));
  // Without direct the holder is an agent with direct_lan off: 3.0.0 with its bulk port only.
  const bulk = o.direct === false ? await BulkListener.start("127.0.0.1", 0, log) : undefined;
  cleanups.push(() => a.stop(), () => b.stop(), () => local.close(), () => direct.close(), () => bulk?.close());
  await serveNar(a, local, log, { compression: new NarCompression("off"), ...(o.direct === false ? { bulk } : { direct }) });
  await connectBoth(b, a);
  const peer = a.peerId.toString();
  const ticket = (n: Nar) => askDirect(b, peer, { hashPart: n.hashPart, narHash: n.narHash, narSize: n.narSize });
  return { direct, ticket, local, a, b, peer, bulk };
}

interface Got {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

function get(port: number, path: string, method = "GET", headers: Record<string, string> = {}): Promise<Got> {
  return new Promise((resolve, reject) => {
    const r = request({ host: "127.0.0.1", port, path, method, headers, agent: false }, (res) => {
      const parts: Buffer[] = [];
      res.on("data", (c: Buffer) => parts.push(c));
      res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body: Buffer.concat(parts) }));
      res.on("error", reject);
    });
    r.on("error", reject);
    r.end();
  });
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

test("a direct ticket opens one GET of its NAR: Nix's own dump, with Content-Length and Accept-Ranges; then nothing", async (t) => {
  if (!(await needNix(t))) return;
  const { direct, ticket } = await pair();
  for (const n of [fx!.big, fx!.small]) {
    const tk = await ticket(n);
    assert.ok(typeof tk === "object", `a ticket, not ${String(tk)}`);
    assert.equal(tk.port, direct.port);
    assert.match(tk.path, new RegExp(`^/[0-9a-f]{32}/nar/${n.hashPart}-${n.narHash.replace("sha256:", "")}\\.nar$`));
    const got = await get(tk.port, tk.path);
    assert.equal(got.status, 200);
    assert.equal(got.headers["content-length"], String(n.narSize));
    assert.equal(got.headers["accept-ranges"], "bytes");
    assert.equal(sha(got.body), sha(n.dump), "the bytes are Nix's NAR");
    const again = await get(tk.port, tk.path);
    assert.deepEqual([again.status, again.body.length], [404, 0], "a ticket is good for one request");
  }
  assert.equal(direct.counters.served, 2);
  assert.equal(direct.counters.bytes, fx!.big.narSize + fx!.small.narSize);
  assert.equal(direct.counters.refused, 2);
});

test("HEAD spends the ticket too; a Range on a ticket gets its part", async (t) => {
  if (!(await needNix(t))) return;
  const { ticket } = await pair();
  const n = fx!.big;
  const h = await ticket(n);
  assert.ok(typeof h === "object");
  const head = await get(h.port, h.path, "HEAD");
  assert.deepEqual([head.status, head.headers["content-length"], head.body.length], [200, String(n.narSize), 0]);
  assert.equal((await get(h.port, h.path)).status, 404);
  const r = await ticket(n);
  assert.ok(typeof r === "object");
  const part = await get(r.port, r.path, "GET", { Range: "bytes=1000-1999" });
  assert.equal(part.status, 206);
  assert.ok(part.body.equals(n.dump.subarray(1000, 2000)));
});

test("hostile requests on the direct port: another NAR's ticket, expired, random, malformed, `..`, absolute-form, other methods, huge headers: empty 4xx, tickets spent", async (t) => {
  if (!(await needNix(t))) return;
  const { direct, ticket } = await pair();
  const { big, small } = fx!;
  const port = direct.port;
  const hex = (p: string) => p.slice(1, 33);
  const smallFile = `nar/${small.hashPart}-${small.narHash.replace("sha256:", "")}.nar`;
  const bigFile = `nar/${big.hashPart}-${big.narHash.replace("sha256:", "")}.nar`;

  // Ticket for X used for Y: refused, and the ticket is gone (X cannot be had with it after).
  const x = await ticket(big);
  assert.ok(typeof x === "object");
  assert.equal((await get(port, `/${hex(x.path)}/${smallFile}`)).status, 404);
  assert.equal((await get(port, x.path)).status, 404, "spent by the wrong request");

  // Expired: a ticket issued for 50 ms.
  const expired = direct.issue(big.hashPart, { storePath: big.path, narHash: big.narHash, narSize: big.narSize, references: [], sigs: [] }, 50);
  await sleep(150);
  assert.equal((await get(port, expired.path)).status, 404);

  // Random tickets, and paths that are not a ticket's at all.
  for (const path of [
    `/${randomBytes(16).toString("hex")}/${bigFile}`,
    `/${"0".repeat(32)}/${bigFile}`,
    "/",
    "/nar",
    `/${bigFile}`,
    "/../../../../etc/passwd",
    `/${randomBytes(16).toString("hex")}/../../../etc/passwd`,
    `/${randomBytes(16).toString("hex").toUpperCase()}/${bigFile}`,
    `/${"a".repeat(3000)}`,
  ]) {
    const got = await get(port, path);
    assert.deepEqual([got.status, got.body.length], [404, 0], path.slice(0, 80));
  }

  // A live ticket with `..`, a query, a trailing slash, another case: spent, nothing served.
  for (const mangle of [(p: string) => p.replace("/nar/", "/nar/../nar/"), (p: string) => p + "?x=1", (p: string) => p + "/", (p: string) => p.toUpperCase().replace(/^\/[0-9A-F]{32}/, (m) => m.toLowerCase())]) {
    const tk = await ticket(big);
    assert.ok(typeof tk === "object");
    const got = await get(port, mangle(tk.path));
    assert.deepEqual([got.status, got.body.length], [404, 0], mangle(tk.path));
    assert.equal((await get(port, tk.path)).status, 404, "the mangled request spent it");
  }

  // Absolute-form request target with a live ticket: refused (and the ticket, never named in path form, not spent).
  const abs = await ticket(small);
  assert.ok(typeof abs === "object");
  const rawAbs = await exchange(port, [rawReq(`http://127.0.0.1:${port}${abs.path}`, "Connection: close\r\n")]);
  assert.match(rawAbs, /^HTTP\/1\.1 404 /);
  assert.doesNotMatch(rawAbs, /\r\n\r\n./s, "no body");

  // Other methods: 405, the ticket untouched.
  const post = await ticket(small);
  assert.ok(typeof post === "object");
  for (const m of ["POST", "PUT", "DELETE", "OPTIONS"]) {
    const got = await get(port, post.path, m);
    assert.deepEqual([got.status, got.headers.allow], [405, "GET, HEAD"], m);
  }
  const ok = await get(port, post.path);
  assert.equal(ok.status, 200, "GET after refused methods");
  assert.ok(ok.body.equals(small.dump));

  // Headers past the bound, garbage instead of HTTP: 4xx from Node's parser, nothing served.
  const huge = await exchange(port, [rawReq(`/${"b".repeat(32)}/x`, `X-Pad: ${"p".repeat(8000)}\r\n`)]);
  assert.match(huge, /^HTTP\/1\.1 431 /);
  const junk = await exchange(port, ["\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n"]);
  assert.match(junk, /^HTTP\/1\.1 400 /);

  assert.equal(direct.counters.served, 1, "only the one honest GET was served");
  const fine = await ticket(big);
  assert.ok(typeof fine === "object");
  assert.equal(sha((await get(port, fine.path)).body), sha(big.dump), "the port still serves");
});

test("a slowloris on the direct port: sockets past the per-host limit are refused, silent ones cut after the header deadline, the port serves on", { timeout: 60_000 }, async (t) => {
  if (!(await needNix(t))) return;
  const { direct, ticket } = await pair();
  const open = (): Promise<Socket> =>
    new Promise((resolve, reject) => {
      const s = connect(direct.port, "127.0.0.1", () => resolve(s));
      s.on("error", () => {});
      s.once("error", reject);
    });
  const closed = (s: Socket) => new Promise<void>((r) => (s.destroyed ? r() : s.once("close", () => r())));
  const slow: Socket[] = [];
  for (let i = 0; i < DIRECT_INBOUND_PER_HOST; i++) {
    const s = await open();
    s.write("GET /"); // a request line begun, never finished
    slow.push(s);
  }
  t.after(() => slow.forEach((s) => s.destroy()));
  // One more from the same host is refused at once, before anything is read.
  const extra = await open();
  await closed(extra);
  assert.ok(direct.counters.refused >= 1);
  // The trickling ones are cut by the header deadline (checked every 500 ms), not held for ever.
  const started = Date.now();
  for (const s of slow) {
    s.write("x"); // keeps trickling
    await closed(s);
  }
  const took = Date.now() - started;
  assert.ok(took < 30_000, `slow sockets cut after ${took} ms (deadline ${DIRECT_HEADERS_MS} ms)`);
  const tk = await ticket(fx!.big);
  assert.ok(typeof tk === "object");
  assert.equal(sha((await get(tk.port, tk.path)).body), sha(fx!.big.dump), "the port serves after the slowloris");
});

test("askDirect: a holder without direct (direct_lan off) answers with the body, dropped: no-direct; a NAR it lacks: refused", async (t) => {
  if (!(await needNix(t))) return;
  const off = await pair({ direct: false });
  assert.equal(await off.ticket(fx!.big), "no-direct");
  assert.equal(off.direct.counters.requests, 0);
  const on = await pair();
  const other = { ...fx!.small, narHash: "sha256:" + "0".repeat(52) };
  assert.equal(await on.ticket(other), "refused");
  assert.equal(on.direct.tickets, 0, "no ticket for a NAR not held");
});

test("DirectRoutes: a URL on the holder's address for an on-link holder; none over a compressing link, and none (without asking) from a holder that did not offer direct", async (t) => {
  if (!(await needNix(t))) return;
  const n = fx!.big;
  const req = { hashPart: n.hashPart, narHash: n.narHash, narSize: n.narSize };
  const on = await pair();
  const routes = new DirectRoutes(on.b, new NarCompression("off"));
  const url = await routes.url(on.peer, req);
  assert.match(url ?? "", new RegExp(`^http://127\\.0\\.0\\.1:${on.direct.port}/[0-9a-f]{32}/nar/${n.hashPart}-`));
  const got = await get(on.direct.port, new URL(url!).pathname);
  assert.equal(sha(got.body), sha(n.dump));
  assert.deepEqual([routes.redirects, routes.fallbacks], [1, 0]);
  // A link slow enough for zstd (here: compression forced on) is relayed; the holder is not even asked.
  const zstd = new DirectRoutes(on.b, new NarCompression("zstd"));
  assert.equal(await zstd.url(on.peer, req), undefined);
  assert.equal(on.direct.tickets, 0, "no ticket was asked for");
  // A holder without direct answers with the body once; it is not asked again for a while.
  const off = await pair({ direct: false });
  const r = new DirectRoutes(off.b, new NarCompression("off"));
  assert.equal(await r.url(off.peer, req), undefined);
  assert.equal(await r.url(off.peer, req), undefined);
  assert.deepEqual([r.redirects, r.fallbacks], [0, 1], "asked once");
});

test("DirectRoutes: a holder whose direct port cannot be reached from here (a firewall) is relayed, and not asked again for a while", async (t) => {
  if (!(await needNix(t))) return;
  const n = fx!.small;
  const req = { hashPart: n.hashPart, narHash: n.narHash, narSize: n.narSize };
  const p = await pair();
  // The holder still hands out tickets for its port, but nothing listens there any more.
  await new Promise<void>((r) => p.direct.server.close(() => r()));
  const routes = new DirectRoutes(p.b, new NarCompression("off"));
  assert.equal(await routes.url(p.peer, req), undefined);
  assert.equal(await routes.url(p.peer, req), undefined);
  assert.deepEqual([routes.redirects, routes.fallbacks], [0, 1], "probed and asked once");
});

test("a path collected between its ticket and the request: 502 (Nix retries through its agent, which can fail over), not 404", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir("fleetcache-direct-gone-");
  t.after(cleanup);
  writeFileSync(join(dir, "gone.txt"), "collected soon\n");
  const gone = await nar(fx!.root, await addToStore(fx!.root, join(dir, "gone.txt")));
  const { ticket } = await pair();
  const tk = await ticket(gone);
  assert.ok(typeof tk === "object");
  await run("nix-store", ["--store", fx!.root, "--delete", gone.path]);
  const got = await get(tk.port, tk.path);
  assert.equal(got.status, 502);
});

test("minted tickets: asked with bit 4, the first ticket brings a minting key; a ticket minted with it opens its NAR once; another NAR's MAC, a reused nonce, a wrong key, truncated/overlong/uppercase tickets: empty 404; an unknown, expired or retired key, or a NAR not held: 502; the port serves on", async (t) => {
  if (!(await needNix(t))) return;
  const { direct, b, peer } = await pair();
  const { big, small } = fx!;
  const first = await askDirect(b, peer, { hashPart: big.hashPart, narHash: big.narHash, narSize: big.narSize }, { wantKey: true });
  assert.ok(typeof first === "object" && first.mint, "a one-time ticket and a minting key");
  const { keyId, key, lifetimeS } = first.mint;
  assert.ok(lifetimeS >= 60 && lifetimeS <= 3600, `lifetime ${lifetimeS} s`);
  assert.equal((await get(first.port, first.path)).status, 200, "the one-time ticket works as before");
  const tail = (n: Nar) => `nar/${n.hashPart}-${n.narHash.replace("sha256:", "")}.nar`;
  const hexOf = (n: Nar, nonce = randomBytes(12), k: Uint8Array = key, id: Uint8Array = keyId) => mintTicket(k, id, nonce, tail(n)).toString("hex");
  const refused = async (path: string, why: string, status = 404) => assert.deepEqual(await get(direct.port, path).then((g) => [g.status, g.body.length]), [status, 0], why);
  // A key the holder does not know (expired, retired, from before a restart): 502, which Nix retries through its agent.
  const unknownKey = (path: string, why: string) => refused(path, why, 502);

  // Honest: the NAR, Nix's bytes, once.
  const honest = `/${hexOf(small)}/${tail(small)}`;
  const got = await get(direct.port, honest);
  assert.equal(got.status, 200);
  assert.ok(got.body.equals(small.dump), "Nix's NAR");
  await refused(honest, "a reused nonce");
  // The same nonce with a fresh MAC for the other NAR is still a reused nonce.
  await refused(`/${hexOf(big, Buffer.from(honest.slice(17, 41), "hex"))}/${tail(big)}`, "a reused nonce, other NAR");

  // A MAC for one NAR on another's path; the ticket is not spent by it (its MAC was never right there).
  const forSmall = hexOf(small);
  await refused(`/${forSmall}/${tail(big)}`, "another NAR's MAC");
  await refused(`/${hexOf(small, randomBytes(12), randomBytes(32))}/${tail(small)}`, "a wrong key");
  await unknownKey(`/${hexOf(small, randomBytes(12), key, randomBytes(8))}/${tail(small)}`, "an unknown key id");
  await refused(`/${forSmall.slice(0, -2)}/${tail(small)}`, "truncated");
  await refused(`/${forSmall}00/${tail(small)}`, "overlong");
  await refused(`/${forSmall.toUpperCase()}/${tail(small)}`, "uppercase hex");
  await refused(`/${forSmall}/${tail(small)}?x=1`, "a query");
  await refused(`/${forSmall}/${tail(small).replace("nar/", "nar/../nar/")}`, "dot segments");
  assert.equal((await get(direct.port, `/${forSmall}/${tail(small)}`, "HEAD")).status, 200, "HEAD spends it");
  await refused(`/${forSmall}/${tail(small)}`, "spent by HEAD");
  assert.ok((direct.mintRefusals.get(b.peerId.toString()) ?? 0) >= 4, "refusals under a live key are accounted to its peer");

  // Expired by the holder's clock: a key issued for 50 ms.
  const short = direct.issueKey(b.peerId.toString(), 50);
  await sleep(150);
  await unknownKey(`/${hexOf(small, randomBytes(12), short.key, short.keyId)}/${tail(small)}`, "an expired key");
  // Retired: a peer holds its last two keys; the first is gone after two more.
  direct.issueKey(b.peerId.toString());
  const last = direct.issueKey(b.peerId.toString());
  await unknownKey(`/${hexOf(small)}/${tail(small)}`, "a retired key");
  assert.equal((await get(direct.port, `/${hexOf(small, randomBytes(12), last.key, last.keyId)}/${tail(small)}`)).status, 200, "the newest key works");

  // A NAR this holder no longer has: 502, as for a one-time ticket (Nix retries through its agent).
  const { dir, cleanup } = tempDir("fleetcache-direct-minted-gone-");
  t.after(cleanup);
  writeFileSync(join(dir, "gone.txt"), "collected before the minted ticket\n");
  const gone = await nar(fx!.root, await addToStore(fx!.root, join(dir, "gone.txt")));
  await run("nix-store", ["--store", fx!.root, "--delete", gone.path]);
  assert.equal((await get(direct.port, `/${hexOf(gone, randomBytes(12), last.key, last.keyId)}/${tail(gone)}`)).status, 502);

  assert.equal(direct.counters.minted, 3, "only the honest minted tickets were served");
  assert.equal(direct.counters.served, 4);
  assert.equal(sha((await get(direct.port, `/${hexOf(big, randomBytes(12), last.key, last.keyId)}/${tail(big)}`)).body), sha(big.dump), "the port still serves");
});

test("DirectRoutes: only the first NAR from a holder asks for a ticket (and a key), the next are minted here; a NAR asked for again soon is relayed; a disconnect drops the key", async (t) => {
  if (!(await needNix(t))) return;
  const { direct, a, b, peer } = await pair();
  const routes = new DirectRoutes(b, new NarCompression("off"));
  t.after(() => routes.close());
  const req = (n: Nar) => ({ hashPart: n.hashPart, narHash: n.narHash, narSize: n.narSize });
  const fetchVia = async (n: Nar) => {
    const url = await routes.url(peer, req(n));
    assert.ok(url, "a redirect");
    const got = await get(direct.port, new URL(url).pathname);
    assert.equal(got.status, 200);
    assert.ok(got.body.equals(n.dump));
    return new URL(url).pathname;
  };
  const p1 = await fetchVia(fx!.big);
  assert.match(p1, /^\/[0-9a-f]{32}\//, "the first: a one-time ticket");
  assert.match(await fetchVia(fx!.small), /^\/[0-9a-f]{72}\//, "then minted");
  assert.deepEqual([routes.asked, routes.minted, routes.redirects, direct.tickets], [1, 1, 2, 0]);
  // Nix asking for the same NAR again (a hash mismatch, a 502, a broken download): relayed, the
  // holder it was sent to remembered (the relay asks it first), for a minted or an asked ticket alike.
  assert.equal(await routes.url(peer, req(fx!.small)), undefined, "a repeat of a minted redirect is relayed");
  assert.equal(await routes.url(peer, req(fx!.big)), undefined, "a repeat of an asked-for redirect is relayed");
  assert.equal(await routes.url(peer, req(fx!.small)), undefined, "and again, within the window");
  assert.deepEqual([routes.repeats, routes.redirects, routes.asked, routes.minted], [3, 2, 1, 1]);
  assert.equal(routes.redirectedTo(fx!.small.hashPart), peer);
  assert.equal(routes.redirectedTo("0".repeat(32)), undefined);
  // The holder's agent restarted: the connection closes, the key is dropped, the next NAR asks.
  const { dir, cleanup } = tempDir("fleetcache-direct-routes-");
  t.after(cleanup);
  writeFileSync(join(dir, "third.txt"), "a NAR not redirected before\n");
  const third = await nar(fx!.root, await addToStore(fx!.root, join(dir, "third.txt")));
  await b.libp2p.hangUp(a.peerId);
  await connectBoth(b, a);
  assert.match(await fetchVia(third), /^\/[0-9a-f]{32}\//);
  assert.equal(routes.asked, 2);
  assert.equal(direct.keys, 2, "a new key after the reconnect");
});
