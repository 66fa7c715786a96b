// The mesh transport: trusted-key gating in both directions, bounded frames, bulk streaming
// with backpressure, and what a reader sees when the sending node goes away mid-transfer.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { setTimeout as sleep } from "node:timers/promises";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { pino } from "pino";
import { generateKeyPair, type SecretKey } from "../protocol/keys.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { libp2pPrivateKey, peerIdOf, trustedPeers } from "../agent/mesh/identity.js";
import {
  DEFAULT_HIGH_WATER_MARK,
  FrameTooLargeError,
  MAX_STREAM_WINDOW,
  StreamReader,
  TruncatedStreamError,
  writeAll,
  writeFrame,
} from "../agent/mesh/stream-io.js";
import { createLibp2p, type Libp2p } from "libp2p";
import { tcp } from "@libp2p/tcp";
import { noise } from "@chainsafe/libp2p-noise";
import { yamux } from "@chainsafe/libp2p-yamux";

const log = pino({ level: "silent" });
const ECHO = "/fleetcache-test/echo/1";
const BULK = "/fleetcache-test/bulk/1";
const MAX_REQUEST = 1024;
const MiB = 1024 * 1024;

const nodes: MeshNode[] = [];
after(async () => {
  await Promise.allSettled(nodes.map((n) => n.stop()));
});

/** Connections a node refused after the handshake (its gater's report), by direction. */
type Refusals = { peerId: string; direction: "inbound" | "outbound" }[];

async function node(key: SecretKey, trusted: SecretKey[], refusals?: Refusals): Promise<MeshNode> {
  const onRefused = (peerId: string, direction: "inbound" | "outbound") => refusals?.push({ peerId, direction });
  const n = await createMeshNode({ key, trusted, listen: "/ip4/127.0.0.1/tcp/0", log, onRefused });
  nodes.push(n);
  return n;
}

/** Polls until `cond` holds; fails after a generous bound (never a timing assertion). */
async function waitFor(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) assert.fail(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

const isDialDenied = (err: Error) => err.name === "DialDeniedError";

const addr = (n: MeshNode) => n.addresses()[0]!;
/** The same address without /p2p/<id>: the dialer learns who answered only from the handshake. */
const bareAddr = (n: MeshNode) => addr(n).decapsulateCode(421);
const text = (s: string) => new TextEncoder().encode(s);
const str = (b: Uint8Array | undefined) => new TextDecoder().decode(b);

/** Echo handler: answers every request frame with "<peer name>:<REQUEST>". Counts calls. */
async function serveEcho(n: MeshNode): Promise<{ calls: number; errors: unknown[] }> {
  const stats = { calls: 0, errors: [] as unknown[] };
  await n.handle(ECHO, async ({ reader, stream, peer }) => {
    stats.calls++;
    try {
      for (;;) {
        const req = await reader.readFrame(MAX_REQUEST);
        if (req === undefined) return;
        await writeFrame(stream, text(`${peer.name}:${str(req).toUpperCase()}`));
      }
    } catch (err) {
      stats.errors.push(err);
      throw err;
    }
  });
  return stats;
}

async function echo(from: MeshNode, to: Parameters<MeshNode["open"]>[0], msg: string): Promise<string> {
  const { stream, reader } = await from.open(to, ECHO);
  await writeFrame(stream, text(msg));
  const res = await reader.readFrame(MAX_REQUEST);
  await stream.close();
  return str(res);
}

test("identity: the Nix key is the libp2p identity", async () => {
  const k = generateKeyPair("host-a-1");
  const n = await node(k, []);
  assert.equal(n.peerId.toString(), peerIdOf(k).toString());
  assert.equal(n.trusted.get(n.peerId.toString())?.name, "host-a-1", "own key is trusted implicitly");
  const map = trustedPeers([k, { name: "alias", publicKey: k.publicKey }]);
  assert.equal(map.size, 1);
});

test("two trusted nodes exchange framed requests and responses", async () => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  const stats = await serveEcho(b);
  assert.equal(await echo(a, addr(b), "hello"), "host-a-1:HELLO");
  // By peer ID once connected, and over one stream several frames.
  const { stream, reader } = await a.open(b.peerId, ECHO);
  for (const m of ["one", "two", ""]) {
    await writeFrame(stream, text(m));
    assert.equal(str(await reader.readFrame(MAX_REQUEST)), `host-a-1:${m.toUpperCase()}`);
  }
  await stream.close();
  assert.equal(stats.calls, 2);
  assert.deepEqual(stats.errors, []);
  assert.equal(a.libp2p.getConnections(b.peerId).length, 1);
});

/** Two trusted nodes, b serving echo, connected (handshake done) by a first request from a. */
async function echoPair(): Promise<{ a: MeshNode; b: MeshNode }> {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  await serveEcho(b);
  assert.equal(await echo(a, addr(b), "first"), "host-a-1:FIRST");
  return { a, b };
}

test("small requests and answers cost noise's decoder no thrown RangeError (a stack trace each), and arrive intact", async () => {
  const { a, b } = await echoPair();
  // The library's length reader throws RangeError("Could not decode int16BE") through the global
  // binding whenever its buffer runs dry; count those while requests go back and forth.
  const Real = globalThis.RangeError;
  let dry = 0;
  function Counting(message?: string): RangeError {
    if (message === "Could not decode int16BE") dry++;
    return new Real(message);
  }
  Counting.prototype = Real.prototype; // so that the decoder's `instanceof RangeError` still holds
  globalThis.RangeError = Counting as unknown as RangeErrorConstructor;
  try {
    for (let i = 0; i < 20; i++) assert.equal(await echo(a, b.peerId, `req ${i}`), `host-a-1:REQ ${i}`);
  } finally {
    globalThis.RangeError = Real;
  }
  assert.equal(dry, 0, `${dry} RangeErrors thrown by noise's decoder for 20 requests`);
});

test("a stream's protocol reaches the peer store once per peer and protocol, not per stream, and again after the record changes", async () => {
  const { a, b } = await echoPair();
  const [a0, b0] = [{ ...a.protocolMerges }, { ...b.protocolMerges }];
  for (let i = 0; i < 20; i++) assert.equal(await echo(a, b.peerId, `req ${i}`), `host-a-1:REQ ${i}`);
  // libp2p merges on both ends of every stream; the protocol was recorded by the first. (Identify's
  // own update of the record, which may land meanwhile, lets one more through on each side.)
  for (const [n, before] of [[a, a0], [b, b0]] as const) {
    const passed = n.protocolMerges.passed - before.passed;
    assert.ok(passed <= 1, `${passed} of 20 streams' merges reached the peer store`);
    assert.equal(n.protocolMerges.skipped - before.skipped, 20 - passed);
  }
  assert.ok((await b.libp2p.peerStore.get(a.peerId)).protocols.includes(ECHO), "b's store says a speaks the echo protocol");
  // The record replaced without it (as identify does with a peer's own list): the next stream puts it back.
  await b.libp2p.peerStore.patch(a.peerId, { protocols: [] });
  assert.equal(await echo(a, b.peerId, "again"), "host-a-1:AGAIN");
  assert.ok((await b.libp2p.peerStore.get(a.peerId)).protocols.includes(ECHO), "recorded again after the change");
});

test("a node whose key is not trusted is refused, in both directions", async () => {
  const kt = generateKeyPair("trusting-1");
  const ku = generateKeyPair("untrusted-1");
  const kf = generateKeyPair("friend-1");
  const tRefused: Refusals = [];
  const t = await node(kt, [kf], tRefused); // does not trust u
  const u = await node(ku, [kt]); // would happily talk to t
  const tStats = await serveEcho(t);
  const uStats = await serveEcho(u);
  const fromU = (direction: string) => tRefused.filter((r) => r.peerId === u.peerId.toString() && r.direction === direction).length;

  // u -> t: t refuses the inbound connection once noise has shown it u's key. Each attempt must
  // reach t's gater: a dial that failed for any other reason would prove nothing.
  for (const [i, target] of [addr(t), bareAddr(t)].entries()) {
    await assert.rejects(echo(u, target, "let me in"));
    await waitFor(`t to refuse u's connection #${i + 1}`, () => fromU("inbound") >= i + 1);
  }
  // t -> u: refused before connecting when the dial names u (the peer ID, or an address ending
  // in it: libp2p's DialDeniedError, nothing sent), after the handshake when the address is bare.
  for (const target of [addr(u), u.peerId]) {
    await assert.rejects(echo(t, target, "hello?"), isDialDenied);
  }
  await assert.rejects(echo(t, bareAddr(u), "hello?"), (err: Error) => !isDialDenied(err));
  await waitFor("t to refuse its own outbound connection to u", () => fromU("outbound") === 1);
  assert.equal(tStats.calls, 0, "the trusting side never ran its handler");
  assert.equal(uStats.calls, 0);
  assert.equal(t.libp2p.getConnections().length, 0);
  assert.equal(u.libp2p.getConnections(t.peerId).length, 0);

  // An address claiming a trusted peer's ID does not make it that peer: noise proves the key
  // behind it. (u's own gater would refuse to dial f, whom it does not trust: a second node with
  // u's key that trusts f makes the dial, so that the handshake really happens.)
  const f = await node(kf, [kt]);
  const spoofed = bareAddr(t).encapsulate(`/p2p/${f.peerId.toString()}`);
  await assert.rejects(echo(u, spoofed, "i am friend"), isDialDenied);
  const u2 = await node(ku, [kt, kf]);
  await assert.rejects(echo(u2, spoofed, "i am friend"), (err: Error) => err.name === "EncryptionFailedError" && /does not match expected remote identity/.test(err.message));
  assert.equal(tStats.calls, 0);
  assert.equal(tRefused.filter((r) => r.peerId !== u.peerId.toString()).length, 0, "only u was ever refused");
  // ...while the real friend gets in.
  assert.equal(await echo(f, addr(t), "hi"), "friend-1:HI");
});

test("an oversized frame resets its stream; the next request works", async () => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  const stats = await serveEcho(b);

  const { stream, reader } = await a.open(addr(b), ECHO);
  await writeFrame(stream, new Uint8Array(MAX_REQUEST + 1));
  await assert.rejects(reader.readFrame(MAX_REQUEST), (err: Error) => err.name === "StreamResetError");
  assert.equal(stream.status, "reset");
  assert.ok(stats.errors[0] instanceof FrameTooLargeError);

  // A length prefix alone, announcing 1 TiB, is refused before any payload is buffered.
  const big = await a.open(addr(b), ECHO);
  big.stream.send(Uint8Array.from([0x80, 0x80, 0x80, 0x80, 0x80, 0x20]));
  await assert.rejects(big.reader.readFrame(MAX_REQUEST));
  assert.ok(stats.errors[1] instanceof FrameTooLargeError);

  // Our own reader refuses an oversized answer the same way.
  const small = await a.open(addr(b), ECHO);
  await writeFrame(small.stream, text("x".repeat(100)));
  await assert.rejects(small.reader.readFrame(10), FrameTooLargeError);
  assert.equal(small.stream.status, "aborted");

  assert.equal(await echo(a, addr(b), "still there"), "host-a-1:STILL THERE");
  assert.equal(a.libp2p.getConnections(b.peerId).length, 1, "one connection throughout");
});

/**
 * BULK serves `size` bytes (a repeated random block) after a request frame naming the size,
 * counting what it has handed to the stream so tests can see how far the sender runs ahead.
 */
const BLOCK = randomBytes(256 * 1024);
// node --test gives no --expose-gc; the flag can still be set at run time for a new context.
setFlagsFromString("--expose-gc");
const gc = runInNewContext("gc") as () => void;
/** JS heap plus Buffers/ArrayBuffers: what the process holds on to, measured after gc(). */
const retained = () => {
  const m = process.memoryUsage();
  return m.heapUsed + m.arrayBuffers;
};
function expectedHash(size: number): string {
  const h = createHash("sha256");
  for (let left = size; left > 0; left -= BLOCK.length) h.update(BLOCK.subarray(0, Math.min(left, BLOCK.length)));
  return h.digest("hex");
}
async function serveBulk(n: MeshNode): Promise<{ sent: number; maxQueued: number }> {
  const progress = { sent: 0, maxQueued: 0 };
  await n.handle(BULK, async ({ reader, stream }) => {
    const size = Number(str(await reader.readFrame(32)));
    progress.sent = 0;
    progress.maxQueued = 0;
    async function* blocks() {
      for (let left = size; left > 0; left -= BLOCK.length) {
        const b = BLOCK.subarray(0, Math.min(left, BLOCK.length));
        progress.maxQueued = Math.max(progress.maxQueued, stream.writeBufferLength);
        progress.sent += b.length;
        yield b;
      }
    }
    await writeAll(stream, blocks());
  });
  return progress;
}

test("frames that arrive in pieces are put together in the caller's scratch buffer, intact", async () => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  const SCRATCH = "/fleetcache-test/scratch/1";
  // Frames larger than a noise message (64 KiB) always arrive in at least two pieces.
  const frames = [150_000, 100_000, 70_000, 10, 120_000].map((n) => new Uint8Array(randomBytes(n)));
  await b.handle(SCRATCH, async ({ stream }) => {
    for (const f of frames) await writeFrame(stream, f);
    await stream.close();
  });
  const { reader } = await a.open(addr(b), SCRATCH);
  const scratch = new Uint8Array(128 * 1024);
  let inScratch = 0;
  for (const f of frames) {
    const got = await reader.readFrame(200_000, scratch);
    assert.ok(got);
    assert.equal(Buffer.compare(got, f), 0, `a frame of ${f.length} bytes, intact`);
    if (got.buffer === scratch.buffer) inScratch++;
    if (f.length > scratch.length) assert.notEqual(got.buffer, scratch.buffer, "too large for the scratch: a fresh array");
  }
  assert.ok(inScratch >= 2, `${inScratch} frames put together in the scratch buffer`);
  assert.equal(await reader.readFrame(200_000, scratch), undefined);
});

test("200 MB stream arrives complete, fast, with bounded memory and backpressure", async (t) => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  const progress = await serveBulk(b);

  async function fetchBulk(size: number, slow: boolean) {
    const { stream, reader } = await a.open(addr(b), BULK);
    await writeFrame(stream, text(String(size)));
    gc();
    const rss0 = process.memoryUsage().rss;
    const retained0 = retained();
    let rssMax = rss0;
    let retainedMax = retained0;
    let ahead = 0; // bytes the server has produced that we have not consumed yet
    let held = 0; // bytes received and not yet consumed
    const h = createHash("sha256");
    const start = performance.now();
    let nextSample = MiB;
    for await (const chunk of reader.chunks(size)) {
      h.update(chunk);
      ahead = Math.max(ahead, progress.sent - reader.bytesRead);
      held = Math.max(held, reader.buffered);
      if (reader.bytesRead >= nextSample) {
        nextSample += MiB;
        rssMax = Math.max(rssMax, process.memoryUsage().rss);
        if (slow) {
          // A consumer slower than the network (a slow disk or HTTP client): ~50 MiB/s. Slow
          // anyway, so it can afford a full GC to see what is actually retained.
          await sleep(20);
          gc();
          retainedMax = Math.max(retainedMax, retained());
        }
      }
    }
    const secs = (performance.now() - start) / 1000;
    await stream.close();
    return {
      hash: h.digest("hex"),
      bytes: reader.bytesRead,
      secs,
      rssGrowth: rssMax - rss0,
      retainedGrowth: retainedMax - retained0,
      ahead,
      held,
      queued: progress.maxQueued,
    };
  }

  const size = 200 * MiB;
  const fast = await fetchBulk(size, false);
  assert.equal(fast.bytes, size);
  assert.equal(fast.hash, expectedHash(size));
  const mbps = size / MiB / fast.secs;
  t.diagnostic(
    `200 MiB in ${fast.secs.toFixed(2)} s = ${mbps.toFixed(0)} MiB/s; RSS growth ${(fast.rssGrowth / MiB).toFixed(1)} MiB ` +
      `(both nodes in this process); sender at most ${(fast.ahead / MiB).toFixed(1)} MiB ahead, reader held <= ${(fast.held / MiB).toFixed(1)} MiB`,
  );
  // At full speed RSS growth is mostly garbage (each block is encrypted, framed and decrypted)
  // awaiting the collector; a reader that buffered the transfer would grow by 200 MiB.
  assert.ok(fast.rssGrowth < 128 * MiB, `RSS grew ${fast.rssGrowth / MiB} MiB`);

  // A slow reader must hold the sender back. Between the two ends sit the sender's queue (one
  // block), socket buffers, and the reader's: its high-water mark plus up to two yamux windows
  // (the one in flight when it paused, handed over on resume, and the one resume grants).
  // Measured independent of size (32, 64 and 128 MiB gave the same figures).
  const slowSize = 64 * MiB;
  const slow = await fetchBulk(slowSize, true);
  assert.equal(slow.hash, expectedHash(slowSize));
  t.diagnostic(
    `slow reader: ${(slowSize / MiB / slow.secs).toFixed(0)} MiB/s; sender at most ${(slow.ahead / MiB).toFixed(1)} MiB ahead ` +
      `(its queue <= ${(slow.queued / MiB).toFixed(2)} MiB, reader held <= ${(slow.held / MiB).toFixed(1)} MiB); ` +
      `RSS growth ${(slow.rssGrowth / MiB).toFixed(1)} MiB, retained after GC ${(slow.retainedGrowth / MiB).toFixed(1)} MiB`,
  );
  assert.ok(slow.queued <= BLOCK.length, `sender queued ${slow.queued} bytes`);
  assert.ok(slow.held <= 2 * MAX_STREAM_WINDOW + DEFAULT_HIGH_WATER_MARK + BLOCK.length, `reader held ${slow.held} bytes`);
  assert.ok(slow.ahead < 24 * MiB, `sender ran ${slow.ahead / MiB} MiB ahead of a slow reader`);
  assert.ok(slow.retainedGrowth < 32 * MiB, `retained memory grew ${slow.retainedGrowth / MiB} MiB`);
  assert.ok(slow.rssGrowth < 64 * MiB, `RSS grew ${slow.rssGrowth / MiB} MiB`);
});

test("a sender stopped mid-transfer makes the receiver's read fail, never look complete", async (t) => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  await serveBulk(b);

  const size = 200 * MiB;
  const { stream, reader } = await a.open(addr(b), BULK);
  await writeFrame(stream, text(String(size)));
  let stopped: Promise<void> | undefined;
  const outcome = await (async () => {
    for await (const _ of reader.chunks(size)) {
      if (!stopped && reader.bytesRead >= 20 * MiB) stopped = b.stop();
    }
    return "complete";
  })().catch((err: Error) => err);
  await stopped;
  t.diagnostic(`after ${(reader.bytesRead / MiB).toFixed(1)} MiB: ${outcome instanceof Error ? `${outcome.name}: ${outcome.message}` : outcome}`);
  assert.ok(outcome instanceof Error, "reading with the expected length throws");
  assert.ok(reader.bytesRead < size);
});

test("without an expected length, a sender stopped mid-transfer is detectable from the byte count", async (t) => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  await serveBulk(b);

  const size = 200 * MiB;
  const { stream, reader } = await a.open(addr(b), BULK);
  await writeFrame(stream, text(String(size)));
  let stopped: Promise<void> | undefined;
  const outcome = await (async () => {
    for await (const _ of reader.chunks()) {
      if (!stopped && reader.bytesRead >= 20 * MiB) stopped = b.stop();
    }
    return "ended";
  })().catch((err: Error) => err);
  await stopped;
  t.diagnostic(`after ${(reader.bytesRead / MiB).toFixed(1)} MiB: ${outcome instanceof Error ? `${outcome.name}: ${outcome.message}` : outcome}`);
  assert.ok(reader.bytesRead < size);
  if (outcome instanceof Error) assert.ok(outcome instanceof TruncatedStreamError || /reset|abort|closed/i.test(outcome.name + outcome.message));
});

/**
 * A peer on the libraries' stock settings, as an agent from before the mesh's own noise cipher
 * code (agent/mesh/noise-crypto.ts): the wire bytes must be the same.
 */
async function stockPeer(key: SecretKey): Promise<Libp2p> {
  const n = await createLibp2p({
    privateKey: await libp2pPrivateKey(key),
    addresses: { listen: ["/ip4/127.0.0.1/tcp/0"] },
    transports: [tcp()],
    connectionEncrypters: [noise()],
    streamMuxers: [yamux()],
  });
  after(() => n.stop());
  return n;
}

test("a peer on stock libp2p settings and this node stream 32 MiB both ways, intact", async () => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const old = await stockPeer(kb);
  const size = 32 * MiB;
  // The stock peer sends, then receives from us.
  await old.handle(BULK, async (stream) => {
    const reader = new StreamReader(stream);
    const want = Number(str(await reader.readFrame(32)));
    const blocks = function* () {
      for (let left = want; left > 0; left -= BLOCK.length) yield BLOCK.subarray(0, Math.min(left, BLOCK.length));
    };
    await writeAll(stream, blocks());
    await stream.close();
  });
  const { stream, reader } = await a.open(old.getMultiaddrs()[0]!, BULK);
  await writeFrame(stream, text(String(size)));
  const h = createHash("sha256");
  for await (const c of reader.chunks(size)) h.update(c);
  assert.equal(h.digest("hex"), expectedHash(size));
  await stream.close();

  await serveBulk(a);
  const back = await old.dialProtocol(addr(a), BULK);
  const backReader = new StreamReader(back);
  await writeFrame(back, text(String(size)));
  const h2 = createHash("sha256");
  for await (const c of backReader.chunks(size)) h2.update(c);
  assert.equal(h2.digest("hex"), expectedHash(size));
  await back.close();
});
