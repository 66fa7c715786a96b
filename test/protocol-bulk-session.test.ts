// The bulk session messages (protocol/bulk-session.ts) and the frame collector a session
// connection reads its answers' headers with (protocol/peer-wire.ts): exact bytes, bounds, and
// frames split anywhere across reads.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import {
  decodeBulkSession,
  decodeBulkSessionRequest,
  encodeBulkSession,
  encodeBulkSessionRequest,
  sessionIdOf,
  sessionIdentity,
  MAX_BULK_FRAME_BYTES,
} from "../protocol/bulk-session.js";
import { FrameCollector, PeerProtocolError, encodeFrame, encodeNarResponseHeader } from "../protocol/peer-codec.js";

const session = { port: 37517, sessionId: randomBytes(16), key: randomBytes(32), lifetimeS: 600, connections: 8 };

test("BulkSession round-trips, and its bytes are tag, port, id, key, lifetime, connections", () => {
  const bytes = encodeBulkSession(session);
  assert.equal(bytes[0], 0x2a);
  assert.deepEqual(Buffer.from(bytes.subarray(1, 4)), Buffer.from([0x8d, 0xa5, 0x02])); // 37517 as a varint
  assert.equal(bytes.length, 1 + 3 + 16 + 32 + 2 + 1);
  const back = decodeBulkSession(bytes);
  assert.deepEqual({ ...back, sessionId: Buffer.from(back.sessionId), key: Buffer.from(back.key) }, session);
  assert.deepEqual(encodeBulkSessionRequest(), Uint8Array.of(0x29));
  decodeBulkSessionRequest(Uint8Array.of(0x29));
  assert.throws(() => decodeBulkSessionRequest(Uint8Array.of(0x29, 0)), PeerProtocolError);
  assert.throws(() => decodeBulkSessionRequest(Uint8Array.of(0x2a)), PeerProtocolError);
});

test("BulkSession out of bounds is refused both ways: port 0, lifetime, connections, trailing bytes, truncation", () => {
  for (const bad of [{ port: 0 }, { lifetimeS: 59 }, { lifetimeS: 3601 }, { connections: 0 }, { connections: 65 }, { key: randomBytes(31) }]) {
    assert.throws(() => encodeBulkSession({ ...session, ...bad }), PeerProtocolError, JSON.stringify(Object.keys(bad)));
  }
  const good = encodeBulkSession(session);
  assert.throws(() => decodeBulkSession(Uint8Array.of(...good, 0)), PeerProtocolError, "trailing byte");
  assert.throws(() => decodeBulkSession(good.subarray(0, good.length - 1)), PeerProtocolError, "truncated");
  const lifetimeAt = 1 + 3 + 16 + 32;
  const short = Uint8Array.from(good);
  short[lifetimeAt] = 59;
  short[lifetimeAt + 1] = 8;
  assert.throws(() => decodeBulkSession(short.subarray(0, lifetimeAt + 2)), /lifetime 59/);
});

test("a session's PSK identity is 's' and 32 hex digits, and nothing else is taken for one", () => {
  const id = sessionIdentity(session.sessionId);
  assert.match(id, /^s[0-9a-f]{32}$/);
  assert.equal(sessionIdOf(id), session.sessionId.toString("hex"));
  for (const other of [session.sessionId.toString("hex"), "S" + id.slice(1), id + "0", id.slice(0, -1), id.toUpperCase()]) assert.equal(sessionIdOf(other), undefined, other);
});

test("FrameCollector: a header frame split anywhere across reads, and the bytes after it left alone", () => {
  const frame = encodeFrame(encodeNarResponseHeader({ type: "ok", narSize: 123_456_789 }), MAX_BULK_FRAME_BYTES);
  const body = randomBytes(40);
  const stream = Buffer.concat([frame, body]);
  for (let cut = 0; cut <= stream.length; cut++) {
    const c = new FrameCollector(MAX_BULK_FRAME_BYTES);
    let used = c.take(stream.subarray(0, cut));
    if (!c.done) used += c.take(stream.subarray(used));
    assert.equal(used, frame.length, `cut at ${cut}`);
    assert.ok(c.done);
    assert.deepEqual(Buffer.from(c.frame()), Buffer.from(frame.subarray(1)));
    assert.ok(c.empty, "ready for the next frame");
  }
  // One byte at a time.
  const c = new FrameCollector(MAX_BULK_FRAME_BYTES);
  for (const b of frame) assert.equal(c.take(Uint8Array.of(b)), 1);
  assert.ok(c.done);
});

test("FrameCollector refuses an oversized length before its bytes, and non-minimal or overlong varints", () => {
  assert.throws(() => new FrameCollector(512).take(Uint8Array.of(0x81, 0x04)), /exceeds the limit 512/); // 513
  assert.throws(() => new FrameCollector(512).take(Uint8Array.of(0x80, 0x00)), /non-minimal/);
  assert.throws(() => new FrameCollector(2 ** 53).take(new Uint8Array(9).fill(0x80)), /too long/);
  // A length split across reads is checked as its bytes come.
  const c = new FrameCollector(512);
  assert.equal(c.take(Uint8Array.of(0xff)), 1);
  assert.throws(() => c.take(Uint8Array.of(0x7f)), /exceeds/);
});
