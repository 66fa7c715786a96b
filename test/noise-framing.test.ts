// The receiving side of a mesh connection hands noise whole messages (agent/mesh/noise-framing.ts):
// however small the socket's reads, what a stream reader gets is cut by the sender's messages, not
// by the reads, and the bytes are intact; bytes a reader gives back (unshift) keep their place.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { createServer, connect, type AddressInfo, type Socket } from "node:net";
import { multiaddr } from "@multiformats/multiaddr";
import { pino } from "pino";
import { AbstractMultiaddrConnection } from "@libp2p/utils";
import type { Logger, StreamMessageEvent } from "@libp2p/interface";
import { generateKeyPair } from "../protocol/keys.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { writeAll, writeFrame } from "../agent/mesh/stream-io.js";
import { framedConnection } from "../agent/mesh/noise-framing.js";

const log = pino({ level: "silent" });
const BULK = "/fleetcache-test/bulk/1";
const KiB = 1024;
const MiB = 1024 * KiB;

const nodes: MeshNode[] = [];
after(async () => {
  await Promise.allSettled(nodes.map((n) => n.stop()));
});

/**
 * A TCP relay that passes on what it reads in `slice`-byte writes, one per turn of the event loop,
 * so the receiving socket (in this process, reading promptly) gets reads of about that size: a
 * slow link whose reader keeps up.
 */
async function slicingRelay(target: { host: string; port: number }, slice: number): Promise<{ port: number; close(): void }> {
  const sockets = new Set<Socket>();
  const forward = (from: Socket, to: Socket) => {
    const queue: Buffer[] = [];
    let pumping = false;
    const pump = () => {
      const head = queue[0];
      if (!head || to.destroyed) return void (pumping = false);
      to.write(head.subarray(0, slice));
      if (head.length > slice) queue[0] = head.subarray(slice);
      else queue.shift();
      setImmediate(pump);
    };
    from.on("data", (b: Buffer) => {
      queue.push(b);
      if (!pumping) {
        pumping = true;
        setImmediate(pump);
      }
    });
    from.on("close", () => to.destroy());
    from.on("error", () => to.destroy());
  };
  const server = createServer((client) => {
    const upstream = connect(target.port, target.host);
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.setNoDelay(true); // else the kernel joins the small writes (Nagle) and the reads grow
    }
    forward(client, upstream);
    forward(upstream, client);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as AddressInfo).port,
    close() {
      for (const s of sockets) s.destroy();
      server.close();
    },
  };
}

test("over a link delivering 1 KiB reads, a stream reader gets the sender's messages whole, not the reads", async (t) => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
  nodes.push(a, b);
  const data = randomBytes(4 * MiB);
  await b.handle(BULK, async ({ stream }) => {
    const blocks = function* () {
      for (let at = 0; at < data.length; at += 64 * KiB) yield data.subarray(at, at + 64 * KiB);
    };
    await writeAll(stream, blocks());
  });
  const bPort = Number(/\/tcp\/(\d+)/.exec(b.addresses()[0]!.toString())![1]);
  const relay = await slicingRelay({ host: "127.0.0.1", port: bPort }, KiB);
  after(() => relay.close());
  const { stream, reader } = await a.open(multiaddr(`/ip4/127.0.0.1/tcp/${relay.port}/p2p/${b.peerId.toString()}`), BULK);
  await writeFrame(stream, new Uint8Array([1]));
  const h = createHash("sha256");
  let chunks = 0;
  for await (const c of reader.chunks(data.length)) {
    h.update(c);
    chunks++;
  }
  assert.equal(h.digest("hex"), createHash("sha256").update(data).digest("hex"));
  t.diagnostic(`${chunks} chunks for ${data.length} bytes`);
  // Cut by reads, 4 MiB in 1 KiB reads is about 4,096 chunks; cut by noise messages (64 KiB) and
  // the yamux frames across them, a few per message.
  assert.ok(chunks <= data.length / (16 * KiB), `${chunks} chunks for ${data.length} bytes: cut by the socket's reads`);
});

/** A noise message as on the wire: uint16 big-endian length, then the bytes. */
function message(body: Uint8Array): Uint8Array {
  const out = Buffer.alloc(2 + body.length);
  out.writeUInt16BE(body.length, 0);
  out.set(body, 2);
  return out;
}

/** The receiving end of a TCP connection as a libp2p connection (what @libp2p/tcp makes of a socket). */
class SocketConnection extends AbstractMultiaddrConnection {
  constructor(readonly socket: Socket) {
    const log = Object.assign(() => {}, { error: () => {}, trace: () => {}, enabled: false, newScope: () => log }) as unknown as Logger;
    super({ remoteAddr: multiaddr(`/ip4/127.0.0.1/tcp/${socket.remotePort}`), direction: "inbound", log });
    socket.on("data", (b: Buffer) => this.onData(b));
  }
  sendData(data: Parameters<AbstractMultiaddrConnection["sendData"]>[0]) {
    for (const b of data) this.socket.write(b);
    return { sentBytes: data.byteLength, canSendMore: true };
  }
  sendReset() {
    this.socket.resetAndDestroy();
  }
  sendPause() {
    this.socket.pause();
  }
  sendResume() {
    this.socket.resume();
  }
  async sendClose() {
    this.socket.end();
  }
}

/** A TCP connection on loopback: the sending socket, and the receiving end as a libp2p connection. */
async function tcpPair(): Promise<{ sender: Socket; receiver: SocketConnection; close(): void }> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const accepted = new Promise<Socket>((resolve) => server.once("connection", resolve));
  const sender = connect((server.address() as AddressInfo).port, "127.0.0.1");
  sender.setNoDelay(true);
  const receiver = new SocketConnection(await accepted);
  return {
    sender,
    receiver,
    close() {
      sender.destroy();
      receiver.socket.destroy();
      server.close();
    },
  };
}

/** Writes `bytes` cut at `cuts`, and waits for each piece to be read before the next (one read each). */
async function sendInPieces(sender: Socket, receiver: SocketConnection, bytes: Uint8Array, cuts: number[] = []): Promise<void> {
  let at = 0;
  for (const end of [...cuts, bytes.length]) {
    const read = new Promise((r) => receiver.socket.once("data", r));
    sender.write(bytes.subarray(at, end));
    await read;
    at = end;
  }
}

/** What one event carried: its pieces, copied. */
const piecesOf = (evt: StreamMessageEvent) => (evt.data instanceof Uint8Array ? [evt.data] : [...evt.data]).map((p) => Buffer.from(p));

/**
 * Checks events against the messages they should carry: their bytes together are the wire's, and
 * each event holds one message whose body is one piece (what noise decrypts without a copy).
 */
function assertFramed(events: Buffer[][], bodies: Buffer[], what: string): void {
  assert.deepEqual(Buffer.concat(events.flat()), Buffer.concat(bodies.map((b) => message(b))), `${what}: the bytes, in order`);
  assert.equal(events.length, bodies.length, `${what}: one event per message`);
  events.forEach((e, i) => assert.ok(e.some((p) => p.equals(bodies[i]!) || p.subarray(2).equals(bodies[i]!)), `${what}: message ${i}'s body in one piece`));
}

test("framer: one message per event, its body in one piece; the handshake reader's stay its own; unshifted bytes keep their place", async () => {
  const { sender, receiver, close } = await tcpPair();
  after(close);
  const framed = framedConnection(receiver);
  const [m1, m2, m3, m4, m5] = [randomBytes(65_535), randomBytes(300), randomBytes(65_535), randomBytes(40_000), randomBytes(20)];
  // The handshake's reader keeps what it gets (as lpStream does) and reads it later.
  const kept: StreamMessageEvent[] = [];
  const keep = (evt: StreamMessageEvent) => kept.push(evt);
  framed.addEventListener("message", keep);
  const wire = Buffer.concat([message(m1), message(m2), message(m3)]);
  await sendInPieces(sender, receiver, wire, [1, 30_000, 65_537 + 1, 65_537 + 302 + 10, 65_537 + 302 + 40_000]);
  // Copied only now, after later messages arrived: none was handed out in a buffer used again.
  assertFramed(kept.map(piecesOf), [m1, m2, m3], "handshake phase");

  // The handshake is over: its reader lets go and gives back m3, unread, while m4's first part is in.
  framed.removeEventListener("message", keep);
  // What it had not read: all of m3 (whose length came with m2's event).
  const unread = Buffer.concat(kept.flatMap(piecesOf)).subarray(message(m1).length + message(m2).length);
  assert.ok(unread.equals(message(m3)));
  const rest = Buffer.concat([message(m4), message(m5)]);
  await sendInPieces(sender, receiver, rest.subarray(0, 20_000));
  framed.unshift(unread);
  const seen: Buffer[][] = [];
  framed.addEventListener("message", (evt: StreamMessageEvent) => seen.push(piecesOf(evt)));
  await sendInPieces(sender, receiver, rest.subarray(20_000), [5_000, 20_002, 20_003]); // m5's length split too
  assertFramed(seen, [m3, m4, m5], "given back, then the rest");
});
