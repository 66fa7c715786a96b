// The worker protocol codec: encodings as Nix writes them, decoding fed in pieces, hostile input.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  ByteQueue, DaemonError, Incremental, LIMITS, ProtocolError, WireWriter, daemonInfo, encodeClientVersion,
  encodeQueryPathInfo, protocolVersion, queryAllValidPathHashParts, queryAllValidPathsReply, queryPathFromHashPartReply, queryPathInfoReply,
  serverHello, stderrStream, STDERR_ERROR, STDERR_LAST, STDERR_NEXT, STDERR_READ, STDERR_RESULT, STDERR_START_ACTIVITY,
  STDERR_STOP_ACTIVITY, STDERR_WRITE, WORKER_MAGIC_2, type Decoder,
} from "../protocol/daemon-wire.js";

const V134 = protocolVersion(1, 34);
const P = "/nix/store/xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c-f";

/** Decodes `bytes` in one piece and byte by byte; both must agree. */
function decode<T>(bytes: Buffer, decoder: (q: ByteQueue) => Decoder<T>): T {
  const whole = new Incremental(new ByteQueue(), decoder);
  assert.ok(whole.push(bytes), "complete input decodes");
  const trickle = new Incremental(new ByteQueue(), decoder);
  for (let i = 0; i < bytes.length; i++) {
    assert.equal(trickle.push(bytes.subarray(i, i + 1)), i === bytes.length - 1, `finished only at the last byte (at ${i})`);
  }
  assert.deepEqual(trickle.value, whole.value);
  return whole.value;
}

test("strings are length, bytes and zero padding to 8", () => {
  assert.equal(new WireWriter().string("abc").build().toString("hex"), "0300000000000000" + "6162630000000000");
  assert.equal(new WireWriter().string("").build().toString("hex"), "0000000000000000");
  assert.equal(new WireWriter().string("12345678").build().length, 16);
  assert.equal(encodeQueryPathInfo(P).subarray(0, 8).readBigUInt64LE(), 26n);
  // Version 1.34, then the affinity and reserve-space words.
  assert.deepEqual([...encodeClientVersion(V134)], [...new WireWriter().u64(0x122).u64(0).u64(0).build()]);
});

test("handshake words: magic and version, then Nix's version string and trusted flag by protocol", () => {
  assert.equal(decode(new WireWriter().u64(WORKER_MAGIC_2).u64(0x126).build(), serverHello), 0x126);
  assert.throws(() => decode(new WireWriter().u64(0x12345).u64(0x126).build(), serverHello), ProtocolError);
  assert.deepEqual(decode(new WireWriter().string("2.8.0").build(), (q) => daemonInfo(q, V134)), { nixVersion: "2.8.0" });
  assert.deepEqual(decode(new WireWriter().string("2.18.1").u64(1).build(), (q) => daemonInfo(q, protocolVersion(1, 35))), { nixVersion: "2.18.1", trusted: true });
  const old = new Incremental(new ByteQueue(), (q) => daemonInfo(q, protocolVersion(1, 32)));
  assert.ok(old.push(), "nothing to read before 1.33");
  assert.deepEqual(old.value, {});
});

test("the stderr stream: log lines and activities are consumed, LAST ends it", () => {
  const w = new WireWriter()
    .u64(STDERR_NEXT).string("building...\n")
    .u64(STDERR_START_ACTIVITY).u64(7).u64(3).u64(105).string("querying").u64(2).u64(0).u64(42).u64(1).string("x").u64(0)
    .u64(STDERR_RESULT).u64(7).u64(101).u64(1).u64(1).string("done")
    .u64(STDERR_STOP_ACTIVITY).u64(7)
    .u64(STDERR_LAST)
    .string(P);
  const [logs, path] = decode(w.build(), function* (q) {
    const l = yield* stderrStream(q, V134);
    return [l, yield* queryPathFromHashPartReply(q)] as const;
  });
  assert.deepEqual(logs, ["building...\n"]);
  assert.equal(path, P);
  assert.equal(decode(new WireWriter().u64(STDERR_LAST).string("").build(), function* (q) {
    yield* stderrStream(q, V134);
    return yield* queryPathFromHashPartReply(q);
  }), undefined);
});

test("STDERR_ERROR becomes a DaemonError with Nix's message (structured since 1.26, plain before)", () => {
  const structured = new WireWriter().u64(STDERR_ERROR).string("Error").u64(0).string("Error").string("path '/x' is not valid").u64(0).u64(1).u64(0).string("while querying").build();
  for (const bytes of [structured, structured.subarray(0, 40)]) {
    const inc = new Incremental(new ByteQueue(), (q) => stderrStream(q, V134));
    if (bytes.length < structured.length) {
      assert.equal(inc.push(bytes), false, "a partial error waits for the rest");
      continue;
    }
    assert.throws(() => inc.push(bytes), (e: unknown) => e instanceof DaemonError && e.message === "path '/x' is not valid" && e.traces[0] === "while querying");
  }
  const plain = new WireWriter().u64(STDERR_ERROR).string("old failure").u64(1).build();
  assert.throws(() => decode(plain, (q) => stderrStream(q, protocolVersion(1, 25))), (e: unknown) => e instanceof DaemonError && e.message === "old failure");
});

test("the daemon asking for or sending data, or an unknown message, is a protocol error", () => {
  for (const code of [STDERR_READ, STDERR_WRITE, 0x12345678]) {
    assert.throws(() => decode(new WireWriter().u64(code).u64(8).build(), (q) => stderrStream(q, V134)), ProtocolError);
  }
});

test("QueryPathInfo reply round trip, and the not-valid answer", () => {
  const hash = "1c37d01af40be2e80691de3cc3df44377a699afbb17c68f080964b2fd071fc13";
  const bytes = new WireWriter()
    .u64(1).string("/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv").string(hash).strings([P, "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-y"])
    .u64(1795331114).u64(120).u64(1).strings(["k-1:c2ln"]).string("fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw")
    .build();
  assert.deepEqual(decode(bytes, (q) => queryPathInfoReply(q, V134)), {
    deriver: "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-x.drv",
    narHash: hash,
    references: [P, "/nix/store/bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb-y"],
    registrationTime: 1795331114,
    narSize: 120,
    ultimate: true,
    sigs: ["k-1:c2ln"],
    ca: "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw",
  });
  const noDeriver = new WireWriter().u64(1).string("").string(hash).strings([]).u64(1).u64(8).u64(0).strings([]).string("").build();
  const info = decode(noDeriver, (q) => queryPathInfoReply(q, V134))!;
  assert.ok(!("deriver" in info) && !("ca" in info));
  assert.equal(decode(new WireWriter().u64(0).build(), (q) => queryPathInfoReply(q, V134)), undefined);
  assert.deepEqual(decode(new WireWriter().strings([P, P]).build(), queryAllValidPathsReply), [P, P]);
});

test("QueryAllValidPaths as packed hash parts: 32 bytes a path, decoded in pieces; anything but a store path refused", () => {
  const Q = "/nix/store/00000000000000000000000000000000-a-much-longer-name-than-eight-bytes.drv";
  const packed = decode(new WireWriter().strings([P, Q, P]).build(), (q) => queryAllValidPathHashParts(q));
  assert.equal(packed.toString("latin1"), P.slice(11, 43) + Q.slice(11, 43) + P.slice(11, 43));
  assert.equal(decode(new WireWriter().strings([]).build(), (q) => queryAllValidPathHashParts(q)).length, 0);
  // More paths than the first allocation holds (65,536): the buffer grows.
  const many = Array.from({ length: 70_000 }, (_, i) => `/nix/store/${String(i).padStart(32, "0")}-p`);
  const big = new Incremental(new ByteQueue(), (q) => queryAllValidPathHashParts(q));
  assert.ok(big.push(new WireWriter().strings(many).build()));
  assert.equal(big.value.length, 70_000 * 32);
  assert.equal(big.value.toString("latin1", 69_999 * 32), "00000000000000000000000000069999");
  const refuse = (items: string[]) => () => new Incremental(new ByteQueue(), (q) => queryAllValidPathHashParts(q)).push(new WireWriter().strings(items).build());
  assert.throws(refuse(["/nix/store/tooshort"]), /not a path in \/nix\/store/);
  assert.throws(refuse(["/gnu/store/00000000000000000000000000000000-x"]), /not a path in/);
  assert.throws(() => new Incremental(new ByteQueue(), (q) => queryAllValidPathHashParts(q)).push(new WireWriter().u64(LIMITS.list + 1).build()), /exceeds the limit/);
  const badPad = Buffer.concat([new WireWriter().u64(1).u64(P.length).build(), Buffer.from(P), Buffer.from([1, 0, 0, 0, 0, 0, 0, 0].slice(0, (8 - (P.length % 8)) % 8))]);
  assert.throws(() => new Incremental(new ByteQueue(), (q) => queryAllValidPathHashParts(q)).push(badPad), /padding/);
});

test("hostile lengths and counts are refused before anything is allocated or awaited", () => {
  const q = () => new Incremental(new ByteQueue(), (x) => queryAllValidPathsReply(x));
  assert.throws(() => q().push(new WireWriter().u64(LIMITS.list + 1).build()), /exceeds the limit/);
  assert.throws(() => q().push(new WireWriter().u64(1).u64(LIMITS.string + 1).build()), /exceeds the limit/);
  assert.throws(() => q().push(new WireWriter().u64(2n ** 63n).build()), /too large/);
  assert.throws(() => q().push(Buffer.concat([new WireWriter().u64(1).u64(3).build(), Buffer.from("abc\0\0\0\0\x01")])), /padding/);
  const fields = new WireWriter().u64(STDERR_START_ACTIVITY).u64(1).u64(1).u64(1).string("").u64(1_000_000).build();
  assert.throws(() => new Incremental(new ByteQueue(), (x) => stderrStream(x, V134)).push(fields), /fields exceed/);
  const traces = new WireWriter().u64(STDERR_ERROR).string("Error").u64(0).string("").string("m").u64(0).u64(2n ** 40n).build();
  assert.throws(() => new Incremental(new ByteQueue(), (x) => stderrStream(x, V134)).push(traces), /traces exceed/);
});
