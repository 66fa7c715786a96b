// The narinfo and NAR peer services over real mesh nodes on 127.0.0.1, answering from real Nix
// chroot stores: what a requester accepts (only the requested path, only with a trusted
// signature), NAR bytes equal to Nix's own dump, and every way a transfer can go wrong ending
// in an error rather than a short success.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { generateKeyPair, sign, type PublicKey, type SecretKey } from "../protocol/keys.js";
import { fingerprint, parseNarinfo, renderNarinfo } from "../protocol/narinfo.js";
import { narUrl } from "../protocol/nar-url.js";
import { encodeNix32 } from "../protocol/nix32.js";
import {
  PROTOCOL_NAR,
  PROTOCOL_NARINFO,
  encodeNarRequest,
  encodeNarResponseHeader,
  decodeNarResponseHeader,
  encodeNarinfoRequest,
  encodeNarinfoResponse,
  decodeNarinfoResponse,
  MAX_FRAME_BYTES,
} from "../protocol/peer-codec.js";
import { storePathHashPart } from "../protocol/store-path.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { YamuxStream } from "@chainsafe/libp2p-yamux/stream";
import { send, writeAll, writeFrame } from "../agent/mesh/stream-io.js";
import { fetchNarinfo, narinfoStreamCounts, serveNarinfo, warmNarinfoStreams } from "../agent/mesh/narinfo-service.js";
import { NarFetchError, NarVerifier, openNar, serveNar, type NarFetchReason } from "../agent/mesh/nar-service.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { makeShapesClosure, type ShapesClosure } from "./helpers/fixtures.js";
import { addToStore, dumpNar, hasNix, needNix, nix, pathInfo, tempDir, toPathInfo } from "./helpers/nix.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: process.env.PC_DEBUG ? "debug" : "silent" });
const MiB = 1024 * 1024;

interface Fixture {
  cleanup: () => void;
  rootA: string;
  rootB: string;
  rootC: string;
  closure: ShapesClosure;
  /** 64 MiB single file in A's store. */
  bigFile: string;
  /** Directories of 64 files of 1 MiB in A's store; the gc ones are deleted by a test. */
  bigDir: string;
  gcDirs: [string, string];
  /** In A's store, deleted by a test. */
  doomed: string;
  onlyB: string;
  onlyC: string;
}
let fx: Fixture | undefined;

before(async () => {
  if (!(await hasNix())) return;
  const { dir, cleanup } = tempDir("fleetcache-mesh-services-");
  const rootA = join(dir, "a");
  const rootB = join(dir, "b");
  const rootC = join(dir, "c");
  mkdirSync(join(dir, "work"));
  const closure = await makeShapesClosure(rootA, join(dir, "work"));
  const file = (name: string, content: string | Buffer) => {
    writeFileSync(join(dir, name), content);
    return join(dir, name);
  };
  const bigFile = await addToStore(rootA, file("big.bin", randomBytes(64 * MiB)));
  const bigTree = async (name: string) => {
    mkdirSync(join(dir, name));
    for (let i = 0; i < 64; i++) writeFileSync(join(dir, name, `part-${String(i).padStart(2, "0")}`), randomBytes(MiB));
    return addToStore(rootA, join(dir, name));
  };
  const bigDir = await bigTree("bigdir");
  const gcDirs: [string, string] = [await bigTree("gc1"), await bigTree("gc2")];
  const doomed = await addToStore(rootA, file("doomed.txt", `to be collected ${Math.random()}\n`));
  const onlyB = await addToStore(rootB, file("only-b.txt", `only on B ${Math.random()}\n`));
  const onlyC = await addToStore(rootC, file("only-c.txt", `only on C ${Math.random()}\n`));
  fx = { cleanup, rootA, rootB, rootC, closure, bigFile, bigDir, gcDirs, doomed, onlyB, onlyC };
});

const nodes: MeshNode[] = [];
const stores: LocalStore[] = [];
after(async () => {
  await Promise.allSettled(nodes.map((n) => n.stop()));
  for (const s of stores) s.close();
  fx?.cleanup();
});

async function ready(t: Parameters<typeof needNix>[0]): Promise<Fixture | undefined> {
  if (!(await needNix(t))) return undefined;
  assert.ok(fx, "fixture was made");
  return fx;
}

async function meshNode(key: SecretKey, trusted: readonly PublicKey[], nodeLog = log): Promise<MeshNode> {
  const n = await createMeshNode({ key, trusted, listen: "/ip4/127.0.0.1/tcp/0", log: nodeLog });
  nodes.push(n);
  return n;
}

/** A node serving both protocols from the store at `root`, signing narinfos with `signKeys`. */
async function server(key: SecretKey, trusted: readonly PublicKey[], root: string, signKeys: SecretKey[] = [key]) {
  const node = await meshNode(key, trusted);
  const local = new LocalStore(root, new Signer(signKeys));
  stores.push(local);
  await serveNarinfo(node, local, log);
  await serveNar(node, local, log);
  return { node, local };
}

const connect = connectBoth;

const hp = storePathHashPart;
const randomHashPart = () => encodeNix32(randomBytes(20));

async function collect(src: AsyncIterable<Uint8Array>): Promise<Buffer> {
  const parts: Uint8Array[] = [];
  for await (const c of src) parts.push(c);
  return Buffer.concat(parts);
}

/** Runs `p`, expecting a NarFetchError with this reason. */
async function rejectsWith(p: Promise<unknown>, reason: NarFetchReason): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof NarFetchError, `expected NarFetchError, got ${String(err)}`);
    assert.equal(err.reason, reason, err.message);
    return true;
  });
}

const keys = () => ({ a: generateKeyPair("host-a-1"), b: generateKeyPair("host-b-1"), c: generateKeyPair("host-c-1") });

/** Hosts A, B and C serving their stores, all trusting each other. */
async function threeServers(f: { rootA: string; rootB: string; rootC: string }) {
  const k = keys();
  const all = [k.a, k.b, k.c];
  return { k, all, a: await server(k.a, all, f.rootA), b: await server(k.b, all, f.rootB), c: await server(k.c, all, f.rootC) };
}

test("narinfo: B gets each of A's paths as Nix describes them, verified; unknown paths are undefined", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  const paths = [...f.closure.paths, f.bigFile, f.bigDir];
  const nixInfos = await pathInfo(f.rootA, paths);
  assert.equal(nixInfos.length, paths.length);
  let withDeriver = 0;
  for (const j of nixInfos) {
    const want = toPathInfo(j);
    const hashPart = hp(want.storePath);
    const got = await fetchNarinfo(b.node, aId, hashPart, { trusted: [k.a], log });
    assert.ok(got, `narinfo of ${want.storePath}`);
    assert.equal(got.storePath, want.storePath);
    assert.equal(got.narHash, want.narHash);
    assert.equal(got.narSize, want.narSize);
    assert.deepEqual(got.references, want.references);
    assert.equal(got.deriver, want.deriver);
    if (want.deriver) withDeriver++;
    assert.equal(got.url, narUrl(hashPart, want.narHash));
    assert.ok(got.sigs.includes(sign(k.a, fingerprint(want))), "signed by A");
    // Exactly what A's HTTP cache would serve for /<hash>.narinfo.
    const http = renderNarinfo((await a.local.pathInfo(hashPart))!, narUrl(hashPart, want.narHash));
    assert.deepEqual(got, parseNarinfo(http));
  }
  assert.ok(withDeriver >= 2, "built paths with derivers were covered");

  assert.equal(await fetchNarinfo(b.node, aId, randomHashPart(), { trusted: [k.a], log }), undefined);
  // A path B holds is not A's to answer.
  assert.equal(await fetchNarinfo(b.node, aId, hp(f.onlyB), { trusted: [k.a, k.b], log }), undefined);
  await assert.rejects(fetchNarinfo(b.node, aId, "not-a-hash-part", { trusted: [k.a] }), TypeError);

  // One stream can carry several requests, answered in turn.
  const { stream, reader } = await b.node.open(aId, PROTOCOL_NARINFO);
  for (const hashPart of [hp(f.closure.built), randomHashPart(), hp(f.closure.tree)]) {
    await writeFrame(stream, encodeNarinfoRequest(hashPart));
    const res = decodeNarinfoResponse((await reader.readFrame(MAX_FRAME_BYTES.narinfo))!);
    if (res.type === "found") assert.equal(hp(parseNarinfo(res.narinfo).storePath), hashPart);
    else assert.equal((await a.local.pathInfo(hashPart)), undefined, "not-found only for an unknown path");
  }
  await stream.close();
  assert.equal(await reader.readFrame(MAX_FRAME_BYTES.narinfo), undefined, "the responder closes after our FIN");
});

test("narinfo: refused unless a signature verifies with a key the requester trusts", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const extra = generateKeyPair("extra-signer-1");
  const impostor = generateKeyPair("host-a-1"); // A's key name, other key material
  // D is a trusted fleet member (B lets it connect), but its narinfos carry only `extra`'s
  // signature; E signs with a key that merely has A's name. Both serve A's store.
  const kd = generateKeyPair("host-d-1");
  const ke = generateKeyPair("host-e-1");
  const d = await server(kd, [k.b], f.rootA, [extra]);
  const e = await server(ke, [k.b], f.rootA, [impostor]);
  const b = await server(k.b, [kd, ke], f.rootB);
  const dId = await connect(b.node, d.node);
  const eId = await connect(b.node, e.node);
  const hashPart = hp(f.closure.built);

  assert.equal(await fetchNarinfo(b.node, dId, hashPart, { trusted: [k.a, kd, ke], log }), undefined, "extra's signature is not trusted");
  assert.equal(await fetchNarinfo(b.node, eId, hashPart, { trusted: [k.a, kd, ke], log }), undefined, "a name is not a key");
  // Controls: the same answers are accepted once their signer is trusted.
  const viaD = await fetchNarinfo(b.node, dId, hashPart, { trusted: [extra], log });
  assert.equal(viaD?.storePath, f.closure.built);
  const viaE = await fetchNarinfo(b.node, eId, hashPart, { trusted: [impostor], log });
  assert.equal(viaE?.storePath, f.closure.built);
});

test("narinfo: a slow answer is waited for as long as the caller's signal allows, not cut at a shorter deadline of its own", async (t) => {
  // The lookup's deadline is FleetSource's (stretched over a slow or busy link, up to 6 s). The
  // request used to end itself at 2 s whatever that deadline was: over a WAN link whose queue a NAR
  // had filled, an answer on its way was dropped and Nix got a 404 for a held path (wan-latency).
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const b = await server(k.b, [k.a], f.rootB);
  // A's answers take 2.5 s (a queue on the way, as far as B can tell).
  const aNode = await meshNode(k.a, [k.b]);
  const local = new LocalStore(f.rootA, new Signer([k.a]));
  stores.push(local);
  const slow = Object.create(local) as LocalStore;
  slow.pathInfo = async (hashPart: string) => (await sleep(2500), local.pathInfo(hashPart));
  await serveNarinfo(aNode, slow, log);
  const aId = await connect(b.node, aNode);
  const hashPart = hp(f.closure.paths[0]!);
  assert.equal(await fetchNarinfo(b.node, aId, hashPart, { trusted: [k.a], signal: AbortSignal.timeout(500), log }), undefined, "the caller's deadline ends it");
  const got = await fetchNarinfo(b.node, aId, hashPart, { trusted: [k.a], signal: AbortSignal.timeout(6000), log });
  assert.equal(got?.storePath, f.closure.paths[0], "answered at 2.5 s within the caller's 6 s");
});

test("narinfo: Nix's burst of parallel lookups reuses the streams of the burst before instead of opening new ones", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  // Nix 2.8 and 2.26 look a closure's paths up at once, over up to 25 connections (http-connections).
  const paths = [...f.closure.paths, f.bigFile, f.bigDir];
  const ask = (n: number) => Promise.all(Array.from({ length: n }, (_, i) => fetchNarinfo(b.node, aId, hp(paths[i % paths.length]!), { trusted: [k.a], log, timeoutMs: 20_000 })));
  const c0 = narinfoStreamCounts(b.node);
  // On a connection just made: past yamux's default of 10 streams opened before the responder had
  // set the connection up, the whole connection was aborted (MaxEarlyStreamsError) and every
  // lookup of the burst failed.
  const kept = (await ask(25)).filter(Boolean).length;
  assert.equal(kept, 25, "every lookup of the first burst answered");
  const c1 = narinfoStreamCounts(b.node);
  assert.equal(c1.opened - c0.opened + c1.reused - c0.reused, 25);
  for (const [i, got] of (await ask(kept)).entries()) assert.equal(got?.storePath, paths[i % paths.length], "every lookup of the second burst answered, verified");
  const c2 = narinfoStreamCounts(b.node);
  assert.deepEqual({ opened: c2.opened - c1.opened, reused: c2.reused - c1.reused }, { opened: 0, reused: kept });
});

test("narinfo: streams opened ahead when a peer connects carry Nix's first burst; unused ones are closed in time", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  // The pool's idle streams, once there are n of them (or 10 s have passed).
  const idleWithin = async (node: MeshNode, n: number) => {
    for (let waited = 0; narinfoStreamCounts(node).idle !== n && waited < 10_000; waited += 20) await sleep(20);
    return narinfoStreamCounts(node).idle;
  };
  warmNarinfoStreams(b.node, aId); // as the mesh does on "connected"
  assert.equal(await idleWithin(b.node, 25), 25, "25 streams open and idle before any lookup");
  const c0 = narinfoStreamCounts(b.node);
  const paths = [...f.closure.paths, f.bigFile, f.bigDir];
  const got = await Promise.all(Array.from({ length: 25 }, (_, i) => fetchNarinfo(b.node, aId, hp(paths[i % paths.length]!), { trusted: [k.a], log, timeoutMs: 20_000 })));
  for (const [i, info] of got.entries()) assert.equal(info?.storePath, paths[i % paths.length], "every lookup of the burst answered, verified");
  const c1 = narinfoStreamCounts(b.node);
  assert.deepEqual({ opened: c1.opened - c0.opened, reused: c1.reused - c0.reused }, { opened: 0, reused: 25 }, "the first burst opened no stream of its own");
  // Warming again tops the pool up to the count: the burst's 25 are idle, so nothing opens.
  warmNarinfoStreams(b.node, aId);
  assert.equal(narinfoStreamCounts(b.node).warmed, c1.warmed);

  // A second requester whose warm streams go unused: closed by it (before the responder's 10 s
  // first-request limit would reset them); a later lookup opens a stream of its own and is answered.
  const k2 = generateKeyPair("host-d-1");
  const a2 = await server(k.a, [k2], f.rootA);
  const d = await server(k2, [k.a], f.rootB);
  const a2Id = await connect(d.node, a2.node);
  warmNarinfoStreams(d.node, a2Id, { count: 3, idleMs: 300 });
  assert.equal(await idleWithin(d.node, 3), 3);
  await sleep(600);
  assert.equal(narinfoStreamCounts(d.node).idle, 0, "unused warm streams closed after their idle time");
  const d0 = narinfoStreamCounts(d.node);
  assert.equal((await fetchNarinfo(d.node, a2Id, hp(f.bigFile), { trusted: [k.a], log }))?.storePath, f.bigFile);
  assert.equal(narinfoStreamCounts(d.node).opened - d0.opened, 1);
});

test("narinfo: a stream carries many lookups without a window update per frame, and still past its 256 KiB window", async (t) => {
  const f = await ready(t);
  if (!f) return;
  // Count the updates js-yamux's streams would send (A's and B's, both in this process).
  const proto = YamuxStream.prototype;
  const eager = proto.sendWindowUpdate;
  let updates = 0;
  proto.sendWindowUpdate = function (this: YamuxStream) {
    if (this.protocol === PROTOCOL_NARINFO) updates++;
    eager.call(this);
  };
  // And the data frames they send: a frame's length prefix and payload in one.
  const sendData = proto.sendData;
  let dataFrames = 0;
  proto.sendData = function (this: YamuxStream, ...args: Parameters<YamuxStream["sendData"]>) {
    if (this.protocol === PROTOCOL_NARINFO) dataFrames++;
    return sendData.apply(this, args);
  };
  t.after(() => {
    proto.sendWindowUpdate = eager;
    proto.sendData = sendData;
  });
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  const paths = [...f.closure.paths, f.bigFile, f.bigDir];
  const c0 = narinfoStreamCounts(b.node);
  let answerBytes = 0;
  for (let i = 0; i < 800; i++) {
    const path = paths[i % paths.length]!;
    const got = await fetchNarinfo(b.node, aId, hp(path), { trusted: [k.a], log, timeoutMs: 20_000 });
    assert.equal(got?.storePath, path);
    answerBytes += renderNarinfo(got, got.url).length;
  }
  const c1 = narinfoStreamCounts(b.node);
  assert.equal(c1.opened - c0.opened, 1, "one stream for all");
  assert.ok(answerBytes > 256 * 1024, `${answerBytes} bytes of answers: more than one window, so it was refilled`);
  // Eager: one for every request A read and every answer B read (1,600); half-window: a handful.
  assert.ok(updates <= 20, `${updates} window updates for 800 lookups`);
  assert.ok(dataFrames <= 2 * 800 + 10, `${dataFrames} data frames for 800 requests and answers`);
});

test("narinfo: a peer that lies, sends junk, stalls or resets gives undefined, never a throw", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const liar = await meshNode(k.c, [k.b]);
  const b = await server(k.b, [k.c], f.rootB);
  const cId = await connect(b.node, liar);
  // The liar's answers are A's real, validly signed narinfo of `built`, whatever is asked.
  const builtHp = hp(f.closure.built);
  const genuine = renderNarinfo((await a.local.pathInfo(builtHp))!, "nar/x.nar");
  let mode: "other-path" | "junk" | "empty-close" | "silent" | "reset" = "other-path";
  await liar.handle(PROTOCOL_NARINFO, async ({ stream, reader }) => {
    await reader.readFrame(MAX_FRAME_BYTES.narinfo);
    if (mode === "other-path") await writeFrame(stream, encodeNarinfoResponse({ type: "found", narinfo: genuine }));
    else if (mode === "junk") await writeFrame(stream, encodeNarinfoResponse({ type: "found", narinfo: "StorePath: nonsense\n" }));
    else if (mode === "silent") await new Promise((resolve) => stream.addEventListener("close", resolve)); // until the requester gives up
    else if (mode === "reset") throw new Error("reset on purpose");
  });
  const ask = (hashPart: string) => fetchNarinfo(b.node, cId, hashPart, { trusted: [k.a], log, timeoutMs: 300 });

  assert.equal((await ask(builtHp))?.storePath, f.closure.built, "control: the genuine answer to its own question passes");
  assert.equal(await ask(hp(f.closure.tree)), undefined, "a valid narinfo of another path");
  for (const m of ["junk", "empty-close", "silent", "reset"] as const) {
    mode = m;
    assert.equal(await ask(builtHp), undefined, m);
  }
});

test("NAR: every NAR streams byte-identical to nix store dump-path, whole and from an offset", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  for (const p of f.closure.paths) {
    const info = (await a.local.pathInfo(hp(p)))!;
    const nar = await dumpNar(f.rootA, p);
    assert.equal(nar.length, info.narSize);
    const req = { hashPart: hp(p), narHash: info.narHash, narSize: info.narSize };
    assert.ok((await collect(await openNar(b.node, aId, { ...req, offset: 0 }))).equals(nar), `NAR of ${p}`);
    for (const offset of [1, Math.floor(info.narSize / 2), info.narSize - 1, info.narSize]) {
      const part = await collect(await openNar(b.node, aId, { ...req, offset }));
      assert.ok(part.equals(nar.subarray(offset)), `NAR of ${p} from ${offset}`);
    }
  }
  // The large ones through the verifier, as the router will check them.
  for (const p of [f.bigFile, f.bigDir]) {
    const [j] = await pathInfo(f.rootA, [p]);
    const info = toPathInfo(j!);
    const verifier = new NarVerifier(info.narHash, info.narSize);
    for await (const chunk of await openNar(b.node, aId, { hashPart: hp(p), narHash: info.narHash, offset: 0, narSize: info.narSize })) {
      verifier.update(chunk);
    }
    verifier.finish();
    assert.equal(verifier.bytes, info.narSize);
  }
});

test("NAR: a transfer broken off at one holder continues from another at the same offset", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const a2 = await server(k.c, [k.b], f.rootA); // a second holder of the same paths
  const b = await server(k.b, [k.a, k.c], f.rootB);
  const aId = await connect(b.node, a.node);
  const a2Id = await connect(b.node, a2.node);
  const info = (await a.local.pathInfo(hp(f.bigDir)))!;
  const req = { hashPart: hp(f.bigDir), narHash: info.narHash, narSize: info.narSize };
  const verifier = new NarVerifier(info.narHash, info.narSize);
  for await (const chunk of await openNar(b.node, aId, { ...req, offset: 0 })) {
    verifier.update(chunk);
    if (verifier.bytes >= 5 * MiB) break; // "A failed": we abandon it
  }
  assert.ok(verifier.bytes < info.narSize);
  for await (const chunk of await openNar(b.node, a2Id, { ...req, offset: verifier.bytes })) verifier.update(chunk);
  verifier.finish();
});

test("NAR: wrong NAR hash, unknown path, offset past the end and a size disagreement are errors", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  const info = (await a.local.pathInfo(hp(f.closure.tree)))!;
  const other = (await a.local.pathInfo(hp(f.closure.singleFile)))!;
  const req = { hashPart: hp(f.closure.tree), narHash: info.narHash, offset: 0, narSize: info.narSize };

  await rejectsWith(openNar(b.node, aId, { ...req, narHash: other.narHash }), "not-found");
  await rejectsWith(openNar(b.node, aId, { ...req, hashPart: randomHashPart() }), "not-found");
  await rejectsWith(openNar(b.node, aId, { ...req, hashPart: hp(f.onlyB) }), "not-found");
  await rejectsWith(openNar(b.node, aId, { ...req, offset: info.narSize + 1 }), "bad-offset");
  await rejectsWith(openNar(b.node, aId, { ...req, narSize: info.narSize + 1 }), "size-mismatch");
  await assert.rejects(openNar(b.node, aId, { ...req, narSize: 0 }), RangeError);
  // And the responder is still fine.
  assert.equal((await collect(await openNar(b.node, aId, req))).length, info.narSize);
});

test("NarVerifier: right bytes pass; a wrong hash, a short stream and a long one fail", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const nar = await dumpNar(f.rootA, f.closure.tree);
  const [j] = await pathInfo(f.rootA, [f.closure.tree]);
  const { narHash, narSize } = toPathInfo(j!);
  const [o] = await pathInfo(f.rootA, [f.closure.singleFile]);
  const feed = (v: NarVerifier, bytes: Buffer) => {
    for (let at = 0; at < bytes.length; at += 1000) v.update(bytes.subarray(at, at + 1000));
    return v;
  };

  feed(new NarVerifier(narHash, narSize), nar).finish();
  assert.throws(() => feed(new NarVerifier(toPathInfo(o!).narHash, narSize), nar).finish(), (e: NarFetchError) => e.reason === "hash-mismatch");
  const short = feed(new NarVerifier(narHash, narSize), nar.subarray(0, narSize - 1));
  assert.equal(short.bytes, narSize - 1);
  assert.throws(() => short.finish(), (e: NarFetchError) => e.reason === "size-mismatch");
  const long = feed(new NarVerifier(narHash, narSize), nar);
  assert.throws(() => long.update(Uint8Array.of(0)), (e: NarFetchError) => e.reason === "size-mismatch");
  // One flipped byte, right length.
  const flipped = Buffer.from(nar);
  flipped[flipped.length - 20]! ^= 1;
  assert.throws(() => feed(new NarVerifier(narHash, narSize), flipped).finish(), (e: NarFetchError) => e.reason === "hash-mismatch");
  assert.throws(() => new NarVerifier("md5:abc", 1));
});

test("a path collected between narinfo and NAR, or while its NAR streams, is an error, never a short success", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);

  const doomed = await fetchNarinfo(b.node, aId, hp(f.doomed), { trusted: [k.a], log });
  assert.ok(doomed);
  await nix(["store", "delete", "--store", f.rootA, f.doomed]);
  await rejectsWith(
    openNar(b.node, aId, { hashPart: hp(f.doomed), narHash: doomed.narHash, offset: 0, narSize: doomed.narSize }),
    "not-found",
  );
  assert.equal(await fetchNarinfo(b.node, aId, hp(f.doomed), { trusted: [k.a], log }), undefined);

  // The files go while the database still lists the path (a GC in progress). Backpressure keeps
  // A's reads within a few MiB of ours, so most of the 64 files are still to be opened.
  // At the wire: after NarOk, A resets the stream rather than end it cleanly...
  const [raw, viaOpenNar] = f.gcDirs;
  const rawInfo = (await a.local.pathInfo(hp(raw)))!;
  const { stream, reader } = await b.node.open(aId, PROTOCOL_NAR);
  await writeFrame(stream, encodeNarRequest({ hashPart: hp(raw), narHash: rawInfo.narHash.slice(7), offset: 0 }));
  assert.deepEqual(decodeNarResponseHeader((await reader.readFrame(MAX_FRAME_BYTES.nar))!), { type: "ok", narSize: rawInfo.narSize });
  const rawOutcome = await (async () => {
    for await (const _ of reader.chunks()) {
      if (existsSync(a.local.realPath(raw))) rmSync(a.local.realPath(raw), { recursive: true, force: true });
    }
    return "clean end";
  })().catch((err: Error) => err);
  assert.ok(rawOutcome instanceof Error && /reset/i.test(rawOutcome.name + rawOutcome.message), `raw outcome: ${String(rawOutcome)}`);
  assert.ok(reader.bytesRead < rawInfo.narSize);

  // ...and openNar's iterator throws.
  const info = (await a.local.pathInfo(hp(viaOpenNar)))!;
  let received = 0;
  const outcome = await (async () => {
    for await (const chunk of await openNar(b.node, aId, { hashPart: hp(viaOpenNar), narHash: info.narHash, offset: 0, narSize: info.narSize })) {
      if (received === 0) rmSync(a.local.realPath(viaOpenNar), { recursive: true, force: true });
      received += chunk.length;
    }
    return "complete";
  })().catch((err: unknown) => err);
  assert.ok(outcome instanceof NarFetchError, `transfer outcome: ${String(outcome)}`);
  assert.equal(outcome.reason, "interrupted");
  assert.ok(received < info.narSize, `received ${received} of ${info.narSize}`);
});

test("stopping the responder in the middle of a 64 MiB NAR makes the iterator throw", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  const info = (await a.local.pathInfo(hp(f.bigFile)))!;
  let received = 0;
  let stopping: Promise<void> | undefined;
  const outcome = await (async () => {
    for await (const chunk of await openNar(b.node, aId, { hashPart: hp(f.bigFile), narHash: info.narHash, offset: 0, narSize: info.narSize })) {
      received += chunk.length;
      if (!stopping && received >= 4 * MiB) stopping = a.node.stop();
    }
    return "complete";
  })().catch((err: unknown) => err);
  await stopping;
  t.diagnostic(`after ${(received / MiB).toFixed(1)} MiB: ${String(outcome)}`);
  assert.ok(outcome instanceof NarFetchError, `transfer outcome: ${String(outcome)}`);
  assert.ok(received < info.narSize);
});

test("NAR requester: a short clean end, a stall, a wrong size or a junk header from the peer all throw", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const liar = await meshNode(k.c, [k.b]);
  const b = await server(k.b, [k.c], f.rootB);
  const cId = await connect(b.node, liar);
  const narSize = 1000;
  let mode: "short" | "stall" | "long" | "junk" | "unknown-code" = "short";
  await liar.handle(PROTOCOL_NAR, async ({ stream, reader }) => {
    await reader.readFrame(MAX_FRAME_BYTES.nar);
    if (mode === "junk") return writeFrame(stream, Uint8Array.of(0x21));
    if (mode === "unknown-code") return writeFrame(stream, encodeNarResponseHeader({ type: "error", code: 200, message: "?" }));
    await writeFrame(stream, encodeNarResponseHeader({ type: "ok", narSize: mode === "long" ? narSize + 1 : narSize }));
    await writeAll(stream, [new Uint8Array(400)]);
    if (mode === "stall") await new Promise((resolve) => stream.addEventListener("close", resolve)); // until the requester resets
    // "short": a clean FIN after 400 of 1000 bytes
  });
  const req = { hashPart: randomHashPart(), narHash: "sha256:" + encodeNix32(randomBytes(32)), offset: 0, narSize };
  const drain = async () => {
    let n = 0;
    for await (const c of await openNar(b.node, cId, req, { stallMs: 300 })) n += c.length;
    return n;
  };

  await rejectsWith(drain(), "interrupted");
  mode = "stall";
  await rejectsWith(drain(), "stalled");
  mode = "long";
  await rejectsWith(drain(), "size-mismatch");
  mode = "junk";
  await rejectsWith(drain(), "protocol");
  mode = "unknown-code";
  await rejectsWith(drain(), "internal");
});

test("malformed frames reset only their own stream; the responders keep serving", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a.node);
  const hashPart = hp(f.closure.built);
  const info = (await a.local.pathInfo(hashPart))!;
  const narReq = encodeNarRequest({ hashPart, narHash: info.narHash.slice(7), offset: 0 });

  // A narinfo stream kept open across the bad ones.
  const kept = await b.node.open(aId, PROTOCOL_NARINFO);
  const askKept = async () => {
    await writeFrame(kept.stream, encodeNarinfoRequest(hashPart));
    return decodeNarinfoResponse((await kept.reader.readFrame(MAX_FRAME_BYTES.narinfo))!);
  };
  assert.equal((await askKept()).type, "found");

  const frame = (payload: Uint8Array) => Buffer.concat([Buffer.from([payload.length]), payload]);
  const badNarinfo: [string, Uint8Array][] = [
    ["unknown tag", frame(Uint8Array.of(0x01, ...new Uint8Array(20)))],
    ["short hash", frame(Uint8Array.of(0x10, ...new Uint8Array(19)))],
    ["trailing byte", frame(Uint8Array.of(0x10, ...new Uint8Array(21)))],
    ["a NAR request", frame(narReq)],
    ["a response", frame(encodeNarinfoResponse({ type: "not-found" }))],
    ["oversized", Uint8Array.from([0x80, 0x80, 0x80, 0x80, 0x01])],
    ["truncated", Uint8Array.of(30, 0x10, 1, 2)],
  ];
  const badNar: [string, Uint8Array][] = [
    ["unknown tag", frame(Uint8Array.of(0x99))],
    ["a narinfo request", frame(encodeNarinfoRequest(hashPart))],
    ["short NAR hash", frame(narReq.subarray(0, narReq.length - 2))],
    ["trailing byte", frame(Uint8Array.of(...narReq, 0))],
    ["non-minimal offset", frame(Uint8Array.of(...narReq.subarray(0, narReq.length - 1), 0x80, 0x00))],
    ["oversized", Uint8Array.from([0x81, 0x04])],
    ["truncated", Uint8Array.of(60, 0x20)],
  ];
  for (const [protocol, cases] of [[PROTOCOL_NARINFO, badNarinfo], [PROTOCOL_NAR, badNar]] as const) {
    for (const [name, bytes] of cases) {
      const { stream, reader } = await b.node.open(aId, protocol);
      stream.send(bytes);
      // "truncated" needs the end of our side to show it is truncated.
      if (name === "truncated") await stream.close();
      await assert.rejects(reader.readFrame(MAX_FRAME_BYTES.narinfo), (err: Error) => /reset/i.test(err.name + err.message), `${protocol} ${name}`);
    }
  }

  assert.equal((await askKept()).type, "found", "the other stream on the connection still works");
  await kept.stream.close();
  assert.ok(await fetchNarinfo(b.node, aId, hashPart, { trusted: [k.a], log }));
  const nar = await collect(await openNar(b.node, aId, { hashPart, narHash: info.narHash, offset: 0, narSize: info.narSize }));
  assert.equal(nar.length, info.narSize);
  assert.equal(b.node.libp2p.getConnections(a.node.peerId).length, 1, "one connection throughout");
});

test("responders never forward: a path only C holds is not-found from B, even while B talks to C", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const { all, a, b, c } = await threeServers(f);
  const cFromB = await connect(b.node, c.node);
  const bId = await connect(a.node, b.node);
  const cId = await connect(a.node, c.node);
  const hashPart = hp(f.onlyC);
  const atC = await fetchNarinfo(b.node, cFromB, hashPart, { trusted: all, log });
  assert.equal(atC?.storePath, f.onlyC, "B can reach C and C has it");

  assert.equal(await fetchNarinfo(a.node, bId, hashPart, { trusted: all, log }), undefined);
  const req = { hashPart, narHash: atC.narHash, offset: 0, narSize: atC.narSize };
  await rejectsWith(openNar(a.node, bId, req), "not-found");
  // Control: asked directly, C answers A.
  assert.equal((await fetchNarinfo(a.node, cId, hashPart, { trusted: all, log }))?.storePath, f.onlyC);
  assert.equal((await collect(await openNar(a.node, cId, req))).length, atC.narSize);
});

test("per-peer limits: a ninth NAR transfer is busy, a 65th narinfo stream is reset; other peers are unaffected", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const { all, a, b, c } = await threeServers(f);
  const aId = await connect(b.node, a.node);
  const aFromC = await connect(c.node, a.node);
  const info = (await a.local.pathInfo(hp(f.bigFile)))!;
  const req = { hashPart: hp(f.bigFile), narHash: info.narHash, offset: 0, narSize: info.narSize };

  // Eight transfers B does not read: each holds A's slot, held back by backpressure.
  const holds = Array.from({ length: 8 }, () => new AbortController());
  for (const h of holds) await openNar(b.node, aId, req, { signal: h.signal });
  await rejectsWith(openNar(b.node, aId, req), "busy");
  // C is another peer, with its own eight.
  const small = (await a.local.pathInfo(hp(f.closure.tree)))!;
  const smallReq = { hashPart: hp(f.closure.tree), narHash: small.narHash, offset: 0, narSize: small.narSize };
  assert.equal((await collect(await openNar(c.node, aFromC, smallReq))).length, small.narSize);
  // Aborting one frees its slot once A sees the reset.
  holds[0]!.abort();
  const retry = async () => {
    for (let i = 0; i < 100; i++) {
      try {
        return await openNar(b.node, aId, smallReq);
      } catch (err) {
        if (!(err instanceof NarFetchError && err.reason === "busy")) throw err;
        await sleep(50);
      }
    }
    throw new Error("the slot was never freed");
  };
  assert.equal((await collect(await retry())).length, small.narSize);
  // Eight held again; a ninth request waits (up to 2 s) for a slot: one freed meanwhile serves it.
  const h9 = new AbortController();
  holds.push(h9);
  await openNar(b.node, aId, req, { signal: h9.signal });
  const ninth = openNar(b.node, aId, smallReq);
  await sleep(100); // the request has reached A and waits there
  holds[1]!.abort();
  assert.equal((await collect(await ninth)).length, small.narSize, "served once a slot freed, not busy");
  for (const h of holds) h.abort();

  // Narinfo: 64 open streams, each with an answered request so its handler surely runs.
  const hashPart = hp(f.closure.built);
  const open = [];
  for (let i = 0; i < 64; i++) {
    const s = await b.node.open(aId, PROTOCOL_NARINFO);
    await writeFrame(s.stream, encodeNarinfoRequest(hashPart));
    assert.equal(decodeNarinfoResponse((await s.reader.readFrame(MAX_FRAME_BYTES.narinfo))!).type, "found");
    open.push(s);
  }
  const extra = await b.node.open(aId, PROTOCOL_NARINFO);
  await writeFrame(extra.stream, encodeNarinfoRequest(hashPart)).catch(() => {});
  await assert.rejects(extra.reader.readFrame(MAX_FRAME_BYTES.narinfo), "the 65th stream is reset");
  assert.equal(await fetchNarinfo(b.node, aId, hashPart, { trusted: all, log }), undefined);
  assert.ok(await fetchNarinfo(c.node, aFromC, hashPart, { trusted: all, log }), "C has its own 64");
  await open[0]!.stream.close();
  let ok;
  for (let i = 0; i < 100 && !ok; i++) {
    ok = await fetchNarinfo(b.node, aId, hashPart, { trusted: all, log });
    if (!ok) await sleep(50);
  }
  assert.ok(ok, "a closed stream frees its slot");
  for (const s of open) await s.stream.close();
});

test("responder timeouts: no request resets the stream, an idle narinfo stream is closed, a stuck reader is reset", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  // A's log: the signal that its watchdog gave up on a reader (the stream reset that follows).
  const aLog: { protocol?: string; msg: string; err?: { message?: string } }[] = [];
  const a = await meshNode(k.a, [k.b], pino({ level: "debug" }, { write: (line: string) => void aLog.push(JSON.parse(line)) }));
  const local = new LocalStore(f.rootA, new Signer([k.a]));
  stores.push(local);
  await serveNarinfo(a, local, log, { firstRequestMs: 200, idleMs: 200 });
  await serveNar(a, local, log, { firstRequestMs: 200, sendStallMs: 200 });
  const b = await server(k.b, [k.a], f.rootB);
  const aId = await connect(b.node, a);

  for (const protocol of [PROTOCOL_NARINFO, PROTOCOL_NAR]) {
    const { reader } = await b.node.open(aId, protocol);
    await assert.rejects(reader.readFrame(MAX_FRAME_BYTES.narinfo), `${protocol}: silent stream reset`);
  }
  const { stream, reader } = await b.node.open(aId, PROTOCOL_NARINFO);
  await writeFrame(stream, encodeNarinfoRequest(hp(f.closure.built)));
  assert.equal(decodeNarinfoResponse((await reader.readFrame(MAX_FRAME_BYTES.narinfo))!).type, "found");
  assert.equal(await reader.readFrame(MAX_FRAME_BYTES.narinfo), undefined, "idle stream closed cleanly");

  // Nobody reads a 64 MiB NAR for a while: A gives up and resets rather than wait forever.
  const info = (await local.pathInfo(hp(f.bigFile)))!;
  const nar = await openNar(b.node, aId, { hashPart: hp(f.bigFile), narHash: info.narHash, offset: 0, narSize: info.narSize });
  const stalled = () => aLog.some((l) => l.protocol === PROTOCOL_NAR && l.msg === "mesh: handler failed; resetting stream" && /no progress for 200 ms/.test(l.err?.message ?? ""));
  for (let i = 0; i < 200 && !stalled(); i++) await sleep(50);
  assert.ok(stalled(), "A's watchdog reset the NAR stream nobody read");
  await rejectsWith(collect(nar), "interrupted");
});

test("narinfo: a peer pipelining requests gets a few answers per event-loop turn, so local work runs in between", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await meshNode(k.b, [k.a]);
  const aId = await connect(b, a.node);
  const n = 2000;
  const s = await b.open(aId, PROTOCOL_NARINFO);
  // Turns of the event loop while A answers: each is a chance for A's local lookups.
  let turns = 0;
  let ticking = true;
  const tick = () => {
    turns++;
    if (ticking) setImmediate(tick);
  };
  const request = encodeNarinfoRequest(hp(f.closure.built));
  const burst = Buffer.concat(Array.from({ length: n }, () => Buffer.concat([Buffer.from([request.length]), request])));
  await send(s.stream, burst); // all at once: the requests sit in A's buffer together
  setImmediate(tick);
  for (let i = 0; i < n; i++) assert.equal(decodeNarinfoResponse((await s.reader.readFrame(MAX_FRAME_BYTES.narinfo))!).type, "found");
  ticking = false;
  t.diagnostic(`${n} pipelined requests answered over ${turns} event-loop turns`);
  // 4 a turn (NARINFO_PER_TURN): about 500 turns; before, all were answered in 4.
  assert.ok(turns >= n / 8, `${turns} turns for ${n} answers`);
  await s.stream.close();
});

test("narinfo: requests pipelined on many streams by one peer are answered a few per event-loop turn", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await server(k.a, [k.b], f.rootA);
  const b = await meshNode(k.b, [k.a]);
  const aId = await connect(b, a.node);
  const streams = 16;
  const each = 200;
  const request = encodeNarinfoRequest(hp(f.closure.built));
  const burst = Buffer.concat(Array.from({ length: each }, () => Buffer.concat([Buffer.from([request.length]), request])));
  const opened = await Promise.all(Array.from({ length: streams }, () => b.open(aId, PROTOCOL_NARINFO)));
  let turns = 0;
  let ticking = true;
  const tick = () => {
    turns++;
    if (ticking) setImmediate(tick);
  };
  await Promise.all(opened.map((s) => send(s.stream, burst)));
  setImmediate(tick);
  await Promise.all(
    opened.map(async (s) => {
      for (let i = 0; i < each; i++) assert.equal(decodeNarinfoResponse((await s.reader.readFrame(MAX_FRAME_BYTES.narinfo))!).type, "found");
      await s.stream.close();
    }),
  );
  ticking = false;
  t.diagnostic(`${streams * each} requests on ${streams} streams answered over ${turns} event-loop turns`);
  // 4 a turn (NARINFO_PER_TURN): at least 800 turns; one per stream per turn would be about 200.
  assert.ok(turns >= (streams * each) / 8, `${turns} turns for ${streams * each} answers`);
});
