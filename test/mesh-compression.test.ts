// Compressed NAR transfers (/fleetcache/nar/2.0.0) over real mesh nodes on 127.0.0.1, from a
// real Nix chroot store holding real binaries: what each side chooses, old peers that know only
// 1.0.0, NARs byte-identical to Nix's own dump, and holders whose compressed streams lie.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, mkdirSync, readdirSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { zstdCompressSync } from "node:zlib";
import { pino } from "pino";
import { generateKeyPair, type PublicKey, type SecretKey } from "../protocol/keys.js";
import { MAX_FRAME_BYTES, NAR_ENCODING, PROTOCOL_NAR_V2, decodeNarRequest, encodeNarResponseHeader } from "../protocol/peer-codec.js";
import { storePathHashPart } from "../protocol/store-path.js";
import type { PathInfo } from "../protocol/path-info.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { send, writeFrame } from "../agent/mesh/stream-io.js";
import { NarFetchError, openNar, serveNar, type NarFetchReason } from "../agent/mesh/nar-service.js";
import { NarCompression, zstdCompress, type CompressionMode } from "../agent/mesh/nar-compression.js";
import { FleetSource } from "../agent/mesh/fleet-source.js";
import { HolderPenalties } from "../agent/mesh/holder-penalties.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { addToStore, dumpNar, hasNix, needNix, tempDir } from "./helpers/nix.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: "silent" });
const MiB = 1024 * 1024;

let fx: { cleanup: () => void; root: string; rootB: string; bins: string; small: string } | undefined;

/** About `bytes` of the files in /usr/bin, copied into `dir`. */
function copyBinaries(dir: string, bytes: number): void {
  mkdirSync(dir, { recursive: true });
  let total = 0;
  for (const name of readdirSync("/usr/bin").sort()) {
    const src = join("/usr/bin", name);
    const st = statSync(src, { throwIfNoEntry: false });
    if (!st?.isFile() || st.size < 64 * 1024 || st.size > 4 * MiB) continue;
    copyFileSync(src, join(dir, name));
    total += st.size;
    if (total >= bytes) return;
  }
}

before(async () => {
  if (!(await hasNix())) return;
  const { dir, cleanup } = tempDir("fleetcache-mesh-compression-");
  const root = join(dir, "a");
  const rootB = join(dir, "b");
  copyBinaries(join(dir, "bins"), 12 * MiB);
  const bins = await addToStore(root, join(dir, "bins"));
  writeFileSync(join(dir, "small.txt"), "a small path\n".repeat(100));
  const small = await addToStore(root, join(dir, "small.txt"));
  writeFileSync(join(dir, "b.txt"), "b\n");
  await addToStore(rootB, join(dir, "b.txt"));
  fx = { cleanup, root, rootB, bins, small };
});

const nodes: MeshNode[] = [];
const stores: LocalStore[] = [];
after(async () => {
  await Promise.allSettled(nodes.map((n) => n.stop()));
  for (const s of stores) s.close();
  fx?.cleanup();
});

async function ready(t: Parameters<typeof needNix>[0]) {
  if (!(await needNix(t))) return undefined;
  assert.ok(fx, "fixture was made");
  return fx;
}

async function meshNode(key: SecretKey, trusted: readonly PublicKey[]): Promise<MeshNode> {
  const n = await createMeshNode({ key, trusted, listen: "/ip4/127.0.0.1/tcp/0", log });
  nodes.push(n);
  return n;
}

/** A holder serving `root`; without `mode`, as an agent from before 2.0.0 (1.0.0 only). */
async function holder(key: SecretKey, trusted: readonly PublicKey[], root: string, mode?: CompressionMode) {
  const node = await meshNode(key, trusted);
  const local = new LocalStore(root, new Signer([key]));
  stores.push(local);
  const compression = mode ? new NarCompression(mode) : undefined;
  await serveNar(node, local, log, compression ? { compression } : {});
  return { node, local, compression };
}

const connect = connectBoth;

const hp = storePathHashPart;

async function collect(src: AsyncIterable<Uint8Array>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of src) parts.push(Buffer.from(c));
  return Buffer.concat(parts);
}

const keys = () => ({ a: generateKeyPair("host-a-1"), b: generateKeyPair("host-b-1"), c: generateKeyPair("host-c-1") });

async function request(local: LocalStore, storePath: string, offset = 0) {
  const info = (await local.pathInfo(hp(storePath)))!;
  return { info, req: { hashPart: hp(storePath), narHash: info.narHash, narSize: info.narSize, offset } };
}

test("negotiation: a requester that accepts zstd gets Nix's NAR in fewer wire bytes, whole and from an offset", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const a = await holder(k.a, [k.b], f.root, "auto");
  const b = await meshNode(k.b, [k.a]);
  const aId = await connect(b, a.node);
  const want = new NarCompression("zstd");
  const nar = await dumpNar(f.root, f.bins);
  const { req } = await request(a.local, f.bins);
  assert.ok((await collect(await openNar(b, aId, req, { compression: want }))).equals(nar));
  const offset = Math.floor(nar.length / 3);
  assert.ok((await collect(await openNar(b, aId, { ...req, offset }, { compression: want }))).equals(nar.subarray(offset)));
  assert.equal(want.totals.zstdReceived, 2);
  assert.equal(a.compression!.totals.zstdSent, 2);
  const narBytes = nar.length + (nar.length - offset);
  assert.ok(want.totals.wireReceived < 0.75 * narBytes, `${want.totals.wireReceived} wire bytes for ${narBytes} NAR bytes`);
  assert.equal(a.compression!.totals.wireSent, want.totals.wireReceived);
  assert.equal(want.peerStatus(aId).wireBytesReceived, want.totals.wireReceived);
  assert.equal(a.compression!.peerStatus(b.peerId.toString()).wireBytesSent, want.totals.wireReceived);
});

test("negotiation: a holder set to off, or a requester that does not accept zstd, sends the NAR as it is", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const off = await holder(k.a, [k.b], f.root, "off");
  const on = await holder(k.c, [k.b], f.root, "zstd");
  const b = await meshNode(k.b, [k.a, k.c]);
  const offId = await connect(b, off.node);
  const onId = await connect(b, on.node);
  const nar = await dumpNar(f.root, f.bins);
  const { req } = await request(off.local, f.bins);
  const wants = new NarCompression("zstd");
  assert.ok((await collect(await openNar(b, offId, req, { compression: wants }))).equals(nar));
  const refuses = new NarCompression("off");
  assert.ok((await collect(await openNar(b, onId, req, { compression: refuses }))).equals(nar));
  for (const c of [wants, refuses]) {
    assert.deepEqual([c.totals.zstdReceived, c.totals.identityReceived, c.totals.wireReceived], [0, 1, nar.length]);
  }
  assert.deepEqual([off.compression!.totals.identitySent, on.compression!.totals.identitySent], [1, 1]);
});

test("old peers: a holder that knows only 1.0.0 serves a new requester, and a new holder serves an old requester, uncompressed", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const old = await holder(k.a, [k.b], f.root); // 1.0.0 only, as released
  const fresh = await holder(k.c, [k.b], f.root, "zstd");
  const b = await meshNode(k.b, [k.a, k.c]);
  const oldId = await connect(b, old.node);
  const freshId = await connect(b, fresh.node);
  const nar = await dumpNar(f.root, f.bins);
  const { req } = await request(old.local, f.bins);
  const wants = new NarCompression("zstd");
  assert.ok((await collect(await openNar(b, oldId, req, { compression: wants }))).equals(nar));
  assert.deepEqual([wants.totals.zstdReceived, wants.totals.identityReceived], [0, 1]);
  // An old requester: no compression option, so 1.0.0 only.
  assert.ok((await collect(await openNar(b, freshId, req))).equals(nar));
  assert.deepEqual([fresh.compression!.totals.zstdSent, fresh.compression!.totals.identitySent], [0, 1]);
});

/**
 * A holder that speaks 2.0.0 and answers every request NarOk2 zstd with `wire(nar)` as the
 * bytes. `nar` is the NAR it would honestly send.
 */
async function lyingHolder(key: SecretKey, trusted: readonly PublicKey[], local: LocalStore, wire: (nar: Buffer) => Promise<Buffer> | Buffer) {
  const node = await meshNode(key, trusted);
  await node.handle(PROTOCOL_NAR_V2, async ({ stream, reader }) => {
    const r = decodeNarRequest((await reader.readFrame(MAX_FRAME_BYTES.nar))!, true);
    const info = (await local.pathInfo(r.hashPart))!;
    const nar = (await collect(local.narStream(info, r.offset, info.narSize)));
    await writeFrame(stream, encodeNarResponseHeader({ type: "ok", narSize: info.narSize, encoding: NAR_ENCODING.zstd }));
    await send(stream, await wire(nar));
  });
  return node;
}

async function rejectsWith(p: Promise<unknown>, reason: NarFetchReason): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof NarFetchError, `expected NarFetchError, got ${String(err)}`);
    assert.equal(err.reason, reason, err.message);
    return true;
  });
}

test("hostile holders: a corrupt zstd stream, a bomb and an unasked-for encoding all fail; a bomb yields at most NarSize bytes", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const local = new LocalStore(f.root, new Signer([k.a]));
  stores.push(local);
  const corrupt = await lyingHolder(k.a, [k.b], local, async (nar) => {
    const z = await collect(zstdCompress((async function* () { yield nar; })()));
    const mid = z.length >> 1;
    z[mid] = z[mid]! ^ 0x40;
    return z;
  });
  const bomb = await lyingHolder(k.c, [k.b], local, () => zstdCompressSync(Buffer.alloc(256 * MiB)));
  const b = await meshNode(k.b, [k.a, k.c]);
  const corruptId = await connect(b, corrupt);
  const bombId = await connect(b, bomb);
  const { req } = await request(local, f.small);
  const wants = new NarCompression("zstd");
  await rejectsWith(collect(await openNar(b, corruptId, req, { compression: wants })), "corrupt");
  let got = 0;
  await rejectsWith(
    (async () => {
      for await (const c of await openNar(b, bombId, req, { compression: wants })) got += c.length;
    })(),
    "size-mismatch",
  );
  assert.ok(got <= req.narSize, `the bomb yielded ${got} bytes of a ${req.narSize}-byte NAR`);
  // zstd to a requester that accepted none: a malformed header.
  await rejectsWith(openNar(b, corruptId, req, { compression: new NarCompression("off") }), "protocol");
});

test("a holder whose zstd stream is corrupt is penalised, and the NAR comes from the next holder", async (t) => {
  const f = await ready(t);
  if (!f) return;
  const k = keys();
  const local = new LocalStore(f.root, new Signer([k.a]));
  stores.push(local);
  const corrupt = await lyingHolder(k.a, [k.b], local, async (nar) => {
    const z = await collect(zstdCompress((async function* () { yield nar; })()));
    const at = z.length - 8; // in the last block or the checksum: after bytes went out
    z[at] = z[at]! ^ 0xff;
    return z;
  });
  const good = await holder(k.c, [k.b], f.root, "auto");
  const b = await meshNode(k.b, [k.a, k.c]);
  const corruptId = await connect(b, corrupt);
  const goodId = await connect(b, good.node);
  const compression = new NarCompression("zstd");
  const emptyStore = new LocalStore(f.rootB, new Signer([k.b]));
  stores.push(emptyStore);
  const order = [corruptId, goodId]; // the liar is asked first
  const source = new FleetSource(emptyStore, { holders: () => order, reconnectingHolders: () => [], onChange: () => () => {}, holderPenalties: new HolderPenalties() }, {
    narinfo: async () => undefined,
    nar: (peer, r, signal) => openNar(b, peer, r, { signal, log, compression }),
  }, log);
  // Both NARs are held back whole until verified (held-nar.ts), so each starts over from the
  // next holder once the corrupt stream shows.
  for (const p of [f.small, f.bins]) {
    const { info } = await request(local, p);
    const pathInfo: PathInfo = { ...info };
    const got = await collect(source.narStream(pathInfo, 0, info.narSize));
    assert.ok(got.equals(await dumpNar(f.root, p)), p);
  }
  assert.equal(source.penalties.status(corruptId).badNars, 2);
  assert.equal(source.penalties.status(goodId).badNars, 0);
  assert.equal(source.counters.verifyFailures, 2);
  assert.equal(compression.totals.zstdReceived, 4);
});
