// Bulk sessions (/fleetcache/bulk/1.0.0, agent/mesh/bulk-session*.ts, bulk-sessions.ts) between real
// mesh nodes on 127.0.0.1, from a real Nix chroot store: NARs one after another and in parallel on
// kept TLS connections give Nix's own bytes with no mesh stream per NAR; errors leave a connection
// usable; an abandoned body, a holder that closed a kept connection, and a holder without
// sessions all still end in the right bytes; and the session connection serves nothing to anyone
// without the session's key, nor anything but NARs, nor bytes out of turn.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { generateKeyPair } from "../protocol/keys.js";
import { storePathHashPart } from "../protocol/store-path.js";
import { encodeNix32 } from "../protocol/nix32.js";
import { parseHash } from "../protocol/hash.js";
import { encodeFrame, encodeNarRequest, FrameDecoder, decodeNarResponseHeader } from "../protocol/peer-codec.js";
import { MAX_BULK_FRAME_BYTES, sessionIdentity } from "../protocol/bulk-session.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { openNar, serveNar, NarFetchError } from "../agent/mesh/nar-service.js";
import { NarCompression } from "../agent/mesh/nar-compression.js";
import { BULK_CIPHER, BULK_SESSION_CONNECTIONS, BulkListener } from "../agent/mesh/bulk-listener.js";
import { BulkRoutes } from "../agent/mesh/bulk-client.js";
import { BulkSessions } from "../agent/mesh/bulk-sessions.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { addToStore, dumpNar, hasNix, needNix, pathInfo, tempDir } from "./helpers/nix.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: "silent" });
const ka = generateKeyPair("session-a");
const kb = generateKeyPair("session-b");

interface Fixture {
  path: string;
  narHash: string;
  narSize: number;
}
let root = "";
let paths: Fixture[] = [];
let cleanupDir = () => {};
const cleanups: (() => Promise<unknown> | unknown)[] = [];

before(async () => {
  if (!(await hasNix())) return;
  const { dir, cleanup } = tempDir("fleetcache-bulk-session-");
  cleanupDir = cleanup;
  root = join(dir, "a");
  // Sizes around the edges that matter: tiny, a header and a body in one read, past the 1 MiB
  // gather buffer, and a directory with several files.
  const sizes = [1, 100, 70_000, 128 << 10, (1 << 20) + 3, 3 << 20];
  const made: string[] = [];
  for (const [i, n] of sizes.entries()) {
    writeFileSync(join(dir, `f${i}.bin`), randomBytes(n));
    made.push(await addToStore(root, join(dir, `f${i}.bin`)));
  }
  mkdirSync(join(dir, "tree/sub"), { recursive: true });
  for (let i = 0; i < 5; i++) writeFileSync(join(dir, `tree/sub/${i}`), randomBytes(20_000 * i));
  made.push(await addToStore(root, join(dir, "tree")));
  const infos = await pathInfo(root, made);
  paths = infos.map((p) => ({ path: p.path, narHash: p.narHash, narSize: p.narSize }));
});

after(async () => {
  for (const c of cleanups.reverse()) await c();
  cleanupDir();
});

/** A holder with a bulk port (sessions served) and a requester with bulk sessions, connected both ways. */
async function pair(o: { sessionIdleMs?: number; requesterIdleMs?: number; holderSessions?: boolean } = {}) {
  const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
  const local = new LocalStore(root, new Signer([ka]));
  const bulk = await BulkListener.start("127.0.0.1", 0, log);
  cleanups.push(() => a.stop(), () => b.stop(), () => local.close(), () => bulk.close());
  const holderCompression = new NarCompression("auto");
  // An older holder: the one-time bulk port, no sessions (served by nothing on /fleetcache/bulk/1.0.0).
  await serveNar(a, local, log, { compression: holderCompression, bulk, bulkSessions: o.holderSessions !== false, ...(o.sessionIdleMs !== undefined && { sessionIdleMs: o.sessionIdleMs }) });
  await connectBoth(b, a);
  const routes = new BulkRoutes();
  const sessions = new BulkSessions(b, routes, log, o.requesterIdleMs);
  cleanups.push(() => sessions.close());
  return { a, b, bulk, routes, sessions, peer: a.peerId.toString(), compression: new NarCompression("off"), holderCompression };
}

const reqOf = (f: Fixture, offset = 0) => ({ hashPart: storePathHashPart(f.path), narHash: f.narHash, offset, narSize: f.narSize });

async function fetch(b: MeshNode, peer: string, f: Fixture, opts: Parameters<typeof openNar>[3], offset = 0): Promise<Buffer> {
  const parts: Uint8Array[] = [];
  for await (const c of await openNar(b, peer, reqOf(f, offset), opts)) parts.push(Buffer.from(c));
  return Buffer.concat(parts);
}

test("NARs one after another and in parallel on a bulk session: Nix's own bytes, a few kept connections, no mesh stream per NAR", async (t) => {
  if (!(await needNix(t))) return;
  const { b, bulk, routes, sessions, peer, compression } = await pair();
  const opts = { compression, bulk: routes, sessions };
  for (const f of paths) assert.ok((await fetch(b, peer, f, opts)).equals(await dumpNar(root, f.path)), `${f.path}: the bytes are Nix's NAR`);
  assert.equal(sessions.sessions, 1, "one session asked for");
  assert.equal(sessions.connections, 1, "one connection for NARs one after another");
  assert.equal(sessions.received, paths.length);
  assert.equal(bulk.sessionServed, paths.length);
  assert.equal(bulk.served, 0, "no one-time bulk connection");
  // Six at once: each on a connection of its own, the first one reused.
  const wanted = [...paths, ...paths].slice(0, 6);
  const got = await Promise.all(wanted.map((f) => fetch(b, peer, f, opts)));
  for (const [i, f] of wanted.entries()) assert.ok(got[i]!.equals(await dumpNar(root, f.path)), `parallel ${i}`);
  assert.ok(sessions.connections >= 2 && sessions.connections <= 6, `${sessions.connections} connections`);
  assert.equal(sessions.received, paths.length + 6);
  assert.ok(sessions.idle >= 1, "connections are kept for the next NARs");
  // An offset: the rest of the NAR only, from the byte asked for.
  const big = paths.find((f) => f.narSize > 2 << 20)!;
  const rest = await fetch(b, peer, big, opts, 1_000_001);
  assert.ok(rest.equals((await dumpNar(root, big.path)).subarray(1_000_001)));
});

test("a NarError on a session connection leaves it usable, and the next NAR goes on it", async (t) => {
  if (!(await needNix(t))) return;
  const { b, sessions, routes, peer, compression } = await pair();
  const opts = { compression, bulk: routes, sessions };
  const f = paths[2]!;
  await fetch(b, peer, f, opts);
  const wrongHash = { ...f, narHash: "sha256:" + encodeNix32(new Uint8Array(32).fill(7)) };
  await assert.rejects(fetch(b, peer, wrongHash, opts), (e: Error) => e instanceof NarFetchError && e.reason === "not-found");
  await assert.rejects(fetch(b, peer, f, opts, f.narSize + 1), (e: Error) => e instanceof NarFetchError && e.reason === "bad-offset");
  assert.ok((await fetch(b, peer, f, opts)).equals(await dumpNar(root, f.path)));
  assert.equal(sessions.connections, 1, "all on the one connection");
});

test("a body abandoned mid-way closes its connection; both ends carry on, the next NAR arrives whole", async (t) => {
  if (!(await needNix(t))) return;
  const { b, bulk, sessions, routes, peer, compression } = await pair();
  const opts = { compression, bulk: routes, sessions };
  const big = paths.find((f) => f.narSize > 2 << 20)!;
  for await (const _ of await openNar(b, peer, reqOf(big), opts)) break;
  assert.ok((await fetch(b, peer, big, opts)).equals(await dumpNar(root, big.path)));
  assert.equal(sessions.connections, 2, "a new connection after the abandoned one");
  assert.equal(bulk.sessionServed, 1, "the abandoned body was not counted as sent");
});

test("a kept connection the holder closed (idle) is replaced without failing the NAR", async (t) => {
  if (!(await needNix(t))) return;
  const { b, sessions, routes, peer, compression } = await pair({ sessionIdleMs: 200 });
  const opts = { compression, bulk: routes, sessions };
  const f = paths[3]!;
  await fetch(b, peer, f, opts);
  await sleep(600); // the holder closes it at 200 ms; we would keep it for 20 s
  assert.ok((await fetch(b, peer, f, opts)).equals(await dumpNar(root, f.path)));
  assert.equal(sessions.connections, 2);
  assert.equal(routes.fallbacks, 0, "not a failure of the holder's port");
});

test("a holder without bulk sessions (an older agent): NARs go on the one-time bulk port and the mesh stream as before", async (t) => {
  if (!(await needNix(t))) return;
  const { b, sessions, routes, peer, compression } = await pair({ holderSessions: false });
  const opts = { compression, bulk: routes, sessions };
  for (const f of paths) assert.ok((await fetch(b, peer, f, opts)).equals(await dumpNar(root, f.path)));
  assert.equal(sessions.connections, 0);
  assert.equal(sessions.usable(peer), false, "not asked again for a while");
});

/** A raw TLS connection to the bulk port with a session's identity and `key`. */
function rawSession(port: number, id: Uint8Array, key: Uint8Array): Promise<TLSSocket> {
  return new Promise((resolve, reject) => {
    const s = tlsConnect({ host: "127.0.0.1", port, minVersion: "TLSv1.3", ciphers: BULK_CIPHER, pskCallback: () => ({ psk: Buffer.from(key), identity: sessionIdentity(id) }), checkServerIdentity: () => undefined });
    s.once("secureConnect", () => resolve(s));
    s.once("error", reject);
  });
}

const closed = (s: TLSSocket) => new Promise<void>((r) => (s.closed ? r() : s.once("close", () => r())));

async function readHeader(s: TLSSocket) {
  const d = new FrameDecoder(MAX_BULK_FRAME_BYTES);
  for await (const c of s) {
    d.push(c as Buffer);
    const f = d.next();
    if (f) return decodeNarResponseHeader(f);
  }
  throw new Error("closed before a header");
}

test("a session connection: refused without the key, closed on a malformed request, on bytes during a body, and past the connection limit", async (t) => {
  if (!(await needNix(t))) return;
  const { bulk, b } = await pair();
  const s = bulk.issueSession(b.peerId.toString());
  // The wrong key, and an unknown session: the handshake fails.
  await assert.rejects(rawSession(bulk.port, s.sessionId, randomBytes(32)));
  await assert.rejects(rawSession(bulk.port, randomBytes(16), s.key));
  // A request that is not a NarRequest (a narinfo request's tag): closed without an answer.
  const c1 = await rawSession(bulk.port, s.sessionId, s.key);
  c1.write(encodeFrame(Uint8Array.of(0x10, ...new Uint8Array(20)), 512));
  await closed(c1);
  // An oversized frame length: closed before its bytes.
  const c2 = await rawSession(bulk.port, s.sessionId, s.key);
  c2.write(Uint8Array.of(0xff, 0xff, 0x7f));
  await closed(c2);
  // A second request while a body is under way: closed.
  const big = paths.find((f) => f.narSize > 2 << 20)!;
  const req = encodeFrame(encodeNarRequest({ hashPart: storePathHashPart(big.path), narHash: encodeNix32(parseHash(big.narHash)), offset: 0 }), 512);
  const c3 = await rawSession(bulk.port, s.sessionId, s.key);
  c3.write(req);
  c3.once("data", () => c3.write(req));
  await closed(c3);
  // A well-formed request gets its answer, then another on the same connection.
  const c4 = await rawSession(bulk.port, s.sessionId, s.key);
  t.after(() => c4.destroy());
  const small = paths[0]!;
  const sreq = encodeFrame(encodeNarRequest({ hashPart: storePathHashPart(small.path), narHash: encodeNix32(parseHash(small.narHash)), offset: 0 }), 512);
  c4.write(sreq);
  const h = await readHeader(c4);
  assert.deepEqual(h, { type: "ok", narSize: small.narSize });
  // At most BULK_SESSION_CONNECTIONS open at once with one session.
  const open: TLSSocket[] = [c4];
  let refused = 0;
  for (let i = 0; i < BULK_SESSION_CONNECTIONS + 2; i++) {
    try {
      const c = await rawSession(bulk.port, s.sessionId, s.key);
      open.push(c);
      t.after(() => c.destroy());
    } catch {
      refused++;
    }
  }
  await sleep(100);
  const alive = open.filter((c) => !c.destroyed && !c.readableEnded).length;
  assert.ok(alive <= BULK_SESSION_CONNECTIONS, `${alive} open`);
  assert.ok(refused + (open.length - alive) >= 2, "the ones past the limit were refused");
});
