// nar-compression.ts without a network: the zstd streams both ways (bounded output, corrupt and
// cut-off input told apart) and when "auto" asks for compression (a fake clock times the link).
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { constants, createZstdCompress, zstdCompressSync } from "node:zlib";
import { ACCEPT_ZSTD, NAR_ENCODING } from "../protocol/peer-codec.js";
import { CompressedStreamError, NarCompression, RETRY_EVERY, zstdCompress, zstdDecompress } from "../agent/mesh/nar-compression.js";

const MiB = 1024 * 1024;

async function* pieces(buf: Uint8Array, size = 64 * 1024): AsyncGenerator<Uint8Array> {
  for (let i = 0; i < buf.length; i += size) yield buf.subarray(i, i + size);
}

async function collect(src: AsyncIterable<Uint8Array>): Promise<Buffer> {
  const out: Buffer[] = [];
  for await (const c of src) out.push(Buffer.from(c));
  return Buffer.concat(out);
}

async function decodeFails(wire: Uint8Array, expected: number, reason: CompressedStreamError["reason"]): Promise<number> {
  let got = 0;
  await assert.rejects(
    (async () => {
      for await (const c of zstdDecompress(pieces(wire), expected)) got += c.length;
    })(),
    (err: unknown) => {
      assert.ok(err instanceof CompressedStreamError, String(err));
      assert.equal(err.reason, reason, err.message);
      return true;
    },
  );
  return got;
}

/** Real machine code: compresses as NARs of binaries do. */
const binary = readFileSync(process.execPath).subarray(0, 8 * MiB);

test("zstd: a binary round-trips byte-identical, in fewer bytes", async () => {
  const wire = await collect(zstdCompress(pieces(binary, MiB)));
  assert.ok(wire.length < binary.length * 0.7, `${wire.length} of ${binary.length}`);
  assert.ok((await collect(zstdDecompress(pieces(wire), binary.length))).equals(binary));
});

test("zstd: a bomb is cut off at the expected size; more or fewer bytes than announced fail", async () => {
  const bomb = zstdCompressSync(Buffer.alloc(256 * MiB)); // a few KB on the wire
  assert.ok(bomb.length < 64 * 1024);
  const got = await decodeFails(bomb, 100_000, "size-mismatch");
  assert.ok(got <= 100_000, `yielded ${got} bytes of an announced 100000`);
  const wire = await collect(zstdCompress(pieces(binary)));
  await decodeFails(wire, binary.length - 1, "size-mismatch");
  await decodeFails(wire, binary.length + 1, "size-mismatch");
  // Two whole frames where one was announced: too long as well.
  await decodeFails(Buffer.concat([wire, wire]), binary.length, "size-mismatch");
});

test("zstd: junk and a flipped byte are corrupt; a stream cut off is interrupted; a huge window is refused", async () => {
  const wire = await collect(zstdCompress(pieces(binary)));
  await decodeFails(Buffer.from("this is not a zstd stream at all".repeat(4)), 1000, "corrupt");
  const flipped = Buffer.from(wire);
  const mid = wire.length >> 1;
  flipped[mid] = flipped[mid]! ^ 0x40; // the frame's checksum catches what the block decoder lets through
  await decodeFails(flipped, binary.length, "corrupt");
  await decodeFails(wire.subarray(0, wire.length >> 1), binary.length, "interrupted");
  await decodeFails(new Uint8Array(0), 10, "interrupted");
  // A 128 MiB window would cost the requester 128 MiB per stream (streamed: no content size in
  // the frame header, so the header declares the whole window).
  const z = createZstdCompress({ params: { [constants.ZSTD_c_windowLog]: 27 } });
  z.end(randomBytes(MiB));
  const wide = await collect(z);
  await decodeFails(wide, MiB, "corrupt");
});

test("zstd: a source that fails fails the compressed stream", async () => {
  async function* failing(): AsyncGenerator<Uint8Array> {
    yield binary.subarray(0, MiB);
    throw new Error("disk read failed");
  }
  await assert.rejects(collect(zstdCompress(failing())), /disk read failed/);
});

/** A NarCompression with a clock the test moves; `rtt` is every peer's ping; `onLink` the peers on this host's networks. */
function policy(mode: "auto" | "zstd" | "off", rtt?: number, onLink: string[] = []) {
  const clock = { ms: 0 };
  return { clock, c: new NarCompression(mode, () => rtt, () => clock.ms, (peer) => onLink.includes(peer)) };
}

/**
 * One transfer from `peer`: the wire bytes arrive over `ms` of the fake clock; the consumer then
 * takes `consumerMs` more per 64 KiB piece (a slow Nix: backpressure, not the link).
 */
async function transfer(p: ReturnType<typeof policy>, peer: string, nar: Uint8Array, encoding: 0 | 1, ms: number, consumerMs = 0): Promise<void> {
  const wire = encoding === NAR_ENCODING.zstd ? await collect(zstdCompress(pieces(nar))) : Buffer.from(nar);
  const step = ms / Math.ceil(wire.length / (64 * 1024));
  async function* arriving(): AsyncGenerator<Uint8Array> {
    for await (const c of pieces(wire)) {
      p.clock.ms += step;
      yield c;
    }
  }
  const out: Buffer[] = [];
  for await (const c of p.c.receive(peer, encoding, nar.length, arriving())) {
    p.clock.ms += (consumerMs * c.length) / (64 * 1024);
    out.push(Buffer.from(c));
  }
  assert.ok(Buffer.concat(out).equals(Buffer.from(nar)));
}

test("auto: before any transfer, only a peer whose ping says WAN is asked for zstd; off never, zstd always", () => {
  assert.equal(policy("auto", 0.3).c.accept("p"), 0);
  assert.equal(policy("auto", undefined).c.accept("p"), 0);
  assert.equal(policy("auto", 20).c.accept("p"), ACCEPT_ZSTD);
  assert.equal(policy("off", 20).c.accept("p"), 0);
  assert.equal(policy("zstd", 0.1).c.accept("p"), ACCEPT_ZSTD);
  assert.equal(policy("off").c.choose(ACCEPT_ZSTD), NAR_ENCODING.identity);
  assert.equal(policy("auto").c.choose(ACCEPT_ZSTD), NAR_ENCODING.zstd);
  assert.equal(policy("auto").c.choose(0), NAR_ENCODING.identity);
  assert.equal(policy("zstd").c.choose(0), NAR_ENCODING.identity);
});

test("auto: before any transfer, a peer on this host's network is asked for plain NARs whatever its ping (a loaded host's pings run long on a LAN)", async () => {
  // Small NARs (under MIN_SAMPLE_BYTES) are never timed: with the ping's guess alone, a closure of
  // small paths from an on-link holder went compressed for as long as either agent was busy.
  const p = policy("auto", 20, ["lan"]);
  assert.equal(p.c.accept("lan"), 0, "on-link: plain");
  assert.equal(p.c.peerStatus("lan").compression, "none");
  assert.equal(p.c.accept("wan"), ACCEPT_ZSTD, "routed, with a WAN ping: zstd from the first transfer");
  await transfer(p, "lan", Buffer.alloc(64 * 1024, 7), NAR_ENCODING.identity, 50); // small: not timed
  assert.equal(p.c.accept("lan"), 0);
  // A slow LAN (Wi-Fi) is found by measuring, as for any peer: 8 MiB in 800 ms.
  await transfer(p, "lan", binary, NAR_ENCODING.identity, 800);
  assert.equal(p.c.accept("lan"), ACCEPT_ZSTD, "measured slow: zstd");
});

test("auto: a slow link from a peer turns zstd on, a fast one does not, measured per peer", async () => {
  const p = policy("auto", 0.3);
  // 8 MiB in 800 ms (10 MiB/s): slow; the same in 40 ms (200 MiB/s): fast.
  await transfer(p, "slow", binary, NAR_ENCODING.identity, 800);
  await transfer(p, "fast", binary, NAR_ENCODING.identity, 40);
  assert.equal(p.c.accept("slow"), ACCEPT_ZSTD);
  assert.equal(p.c.accept("fast"), 0);
  assert.equal(p.c.peerStatus("slow").compression, "zstd");
  assert.equal(p.c.peerStatus("slow").plainBytesPerSec, Math.round(binary.length / 0.8));
  // Compressed, the slow link delivers the NAR in half the time: zstd stays on.
  await transfer(p, "slow", binary, NAR_ENCODING.zstd, 400);
  assert.equal(p.c.accept("slow"), ACCEPT_ZSTD);
  assert.deepEqual([p.c.totals.zstdReceived, p.c.totals.identityReceived], [1, 2]);
  assert.ok(p.c.peerStatus("slow").wireBytesReceived < 2 * binary.length);
  assert.equal(p.c.peerStatus("fast").wireBytesReceived, binary.length);
});

test("a link is known to be slow only by measurement (LAN-direct's test): a long ping alone, as on a loaded host, is not", async () => {
  // LAN-direct NARs are never timed here, so a ping of 5 ms or more (one agent's event loop
  // busy) used to turn an on-link holder's direct NARs into relayed ones, silently and for good.
  const p = policy("auto", 20);
  assert.equal(p.c.wantsZstd("p"), true, "the ping's guess still picks zstd for relayed NARs");
  assert.equal(p.c.slowLinkKnown("p"), false, "but says nothing about the link");
  await transfer(p, "p", binary, NAR_ENCODING.identity, 40); // 200 MiB/s
  assert.equal(p.c.slowLinkKnown("p"), false, "measured fast");
  await transfer(p, "q", binary, NAR_ENCODING.identity, 800); // 10 MiB/s
  assert.equal(p.c.slowLinkKnown("q"), true, "measured slow");
  const r = policy("auto", 20);
  await transfer(r, "r", binary, NAR_ENCODING.zstd, 100);
  assert.equal(r.c.slowLinkKnown("r"), false, "a zstd figure alone says nothing of the plain link");
  await transfer(r, "r", binary, NAR_ENCODING.identity, 160); // 50 MiB/s plain, zstd delivered 80
  assert.equal(r.c.slowLinkKnown("r"), true, "zstd measured better than plain");
  assert.equal(policy("zstd", 0.1).c.slowLinkKnown("p"), true, "zstd set by the operator");
  assert.equal(policy("off", 20).c.slowLinkKnown("p"), false, "off: never");
});

test("auto: a slow client is not a slow link (only waits for the network are timed)", async () => {
  const p = policy("auto", 0.3);
  // The bytes arrive at 200 MiB/s; Nix takes them at 5 MiB/s.
  await transfer(p, "lan", binary, NAR_ENCODING.identity, 40, 12.5);
  assert.ok(p.clock.ms > 1500);
  assert.equal(p.c.accept("lan"), 0);
});

test("auto: where zstd does not deliver more (incompressible NARs, a busy holder), plain wins, and zstd is retried now and then", async () => {
  const p = policy("auto", 50); // a WAN ping: the first transfer is compressed
  const noise = randomBytes(2 * MiB);
  const asked: number[] = [];
  for (let i = 0; i < 2 * RETRY_EVERY + 1; i++) {
    const zstd = p.c.accept("w") === ACCEPT_ZSTD;
    if (zstd) asked.push(i);
    // Over a 5 MiB/s link either way: compressing gains nothing.
    await transfer(p, "w", noise, zstd ? NAR_ENCODING.zstd : NAR_ENCODING.identity, 400);
  }
  // The first (no figures yet, WAN ping), then plain to measure the link, then one probe in 16.
  assert.deepEqual(asked, [0, RETRY_EVERY - 1, 2 * RETRY_EVERY - 1]);
});

test("auto: a zstd figure alone (a first transfer over a LAN whose ping was slow) is followed by a plain one, and the LAN then stays plain", async () => {
  const p = policy("auto", 8);
  assert.equal(p.c.accept("l"), ACCEPT_ZSTD);
  await transfer(p, "l", binary, NAR_ENCODING.zstd, 200); // the holder's compressor set the pace
  assert.equal(p.c.accept("l"), 0); // one plain transfer measures the link...
  assert.equal(p.c.accept("l"), ACCEPT_ZSTD); // ...while the others in parallel stay zstd
  await transfer(p, "l", binary, NAR_ENCODING.identity, 40);
  for (let i = 0; i < 2 * RETRY_EVERY; i++) assert.equal(p.c.accept("l"), 0, `request ${i}`);
});

/**
 * A link of the fake clock: it delivers one piece every `msPerPiece`, to the transfers waiting
 * in turn, so parallel transfers share it as they share a real one.
 */
function sharedLink(p: ReturnType<typeof policy>, msPerPiece: number) {
  const waiting: (() => void)[] = [];
  let running = true;
  const driver = (async () => {
    while (running) {
      await new Promise((r) => setImmediate(r));
      const next = waiting.shift();
      if (!next) continue;
      p.clock.ms += msPerPiece;
      next();
    }
  })();
  return {
    async *wire(buf: Uint8Array): AsyncGenerator<Uint8Array> {
      for await (const c of pieces(buf)) {
        await new Promise<void>((r) => waiting.push(r));
        yield c;
      }
    },
    stop: async () => {
      running = false;
      await driver;
    },
  };
}

test("auto: parallel transfers share the link: their figure is the link's rate, not a share of it", async () => {
  const nar = binary.subarray(0, 2 * MiB);
  const linkRate = (64 * 1024 * 1000) / 10; // a 64 KiB piece every 10 ms
  for (const parallel of [1, 4]) {
    const p = policy("auto");
    const link = sharedLink(p, 10);
    await Promise.all(Array.from({ length: parallel }, () => collect(p.c.receive("peer", NAR_ENCODING.identity, nar.length, link.wire(nar)))));
    await link.stop();
    const figure = p.c.peerStatus("peer").plainBytesPerSec!;
    assert.ok(Math.abs(figure - linkRate) < 0.15 * linkRate, `${parallel} in parallel: ${figure} B/s for a link of ${linkRate}`);
  }
});
