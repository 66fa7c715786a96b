// The bulk path (/fleetcache/nar/3.0.0, agent/mesh/bulk-*.ts) between real mesh nodes on
// 127.0.0.1, from a real Nix chroot store: NAR bodies on a TLS connection keyed by a one-time
// ticket give Nix's own bytes; an agent without bulk on either side still gets them on the mesh
// stream; an unreachable bulk port falls back; and the bulk port gives nothing to anyone without a
// live ticket (forged, reused, expired, plain TCP, TLS without a PSK, too many idle sockets).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { connect as tcpConnect, createServer, type AddressInfo, type Socket } from "node:net";
import { connect as tlsConnect } from "node:tls";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { generateKeyPair } from "../protocol/keys.js";
import { storePathHashPart } from "../protocol/store-path.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { openNar, serveNar } from "../agent/mesh/nar-service.js";
import { NarCompression, type CompressionMode } from "../agent/mesh/nar-compression.js";
import { BULK_INBOUND_PER_HOST, BulkListener, BulkTicketExpired } from "../agent/mesh/bulk-listener.js";
import { BULK_GATHER_BYTES, BULK_MIN_BYTES, BulkBody, BulkRoutes, connectBulk } from "../agent/mesh/bulk-client.js";
import { Mesh } from "../agent/mesh/mesh.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { addToStore, dumpNar, hasNix, needNix, pathInfo, tempDir } from "./helpers/nix.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: "silent" });
const ka = generateKeyPair("bulk-a");
const kb = generateKeyPair("bulk-b");

let fx: { root: string; path: string; narHash: string; narSize: number; cleanup(): void } | undefined;
const cleanups: (() => Promise<unknown> | unknown)[] = [];

before(async () => {
  if (!(await hasNix())) return;
  const { dir, cleanup } = tempDir("fleetcache-mesh-bulk-");
  const root = join(dir, "a");
  writeFileSync(join(dir, "big.bin"), randomBytes(12 << 20)); // past the 8 MiB held in memory
  const path = await addToStore(root, join(dir, "big.bin"));
  const [info] = await pathInfo(root, [path]);
  fx = { root, path, narHash: info!.narHash, narSize: info!.narSize, cleanup };
});

after(async () => {
  for (const c of cleanups.reverse()) await c();
  fx?.cleanup();
});

/** A holder (serving from the fixture's store, with a bulk port unless `bulk` is false) and a requester, connected. */
async function pair(o: { holderBulk: boolean; mode?: CompressionMode }) {
  const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
  const local = new LocalStore(fx!.root, new Signer([ka]));
  const bulk = o.holderBulk ? await BulkListener.start("127.0.0.1", 0, log) : undefined;
  cleanups.push(() => a.stop(), () => b.stop(), () => local.close(), () => bulk?.close());
  await serveNar(a, local, log, { compression: new NarCompression(o.mode ?? "off"), ...(bulk && { bulk }) });
  await connectBoth(b, a);
  return { a, b, bulk, peer: a.peerId.toString(), compression: new NarCompression(o.mode ?? "off") };
}

async function fetch(b: MeshNode, peer: string, opts: Parameters<typeof openNar>[3]): Promise<Buffer> {
  const req = { hashPart: storePathHashPart(fx!.path), narHash: fx!.narHash, offset: 0, narSize: fx!.narSize };
  const parts: Uint8Array[] = [];
  for await (const c of await openNar(b, peer, req, opts)) parts.push(c);
  return Buffer.concat(parts);
}

const nixDump = (): Promise<Buffer> => dumpNar(fx!.root, fx!.path);

for (const mode of ["off", "zstd"] as const) {
  test(`a NAR body on the bulk port (compression ${mode}) is Nix's own dump, and the mesh stream did not carry it`, async (t) => {
    if (!(await needNix(t))) return;
    const { b, bulk, peer, compression } = await pair({ holderBulk: true, mode });
    const routes = new BulkRoutes();
    const got = await fetch(b, peer, { compression, bulk: routes });
    assert.ok(got.equals(await nixDump()), "the bytes are Nix's NAR");
    assert.equal(bulk!.served, 1, "sent on the bulk port");
    assert.equal(routes.received, 1, "taken from the bulk port");
    assert.equal(routes.fallbacks, 0);
  });
}

test("a body on the bulk port is handed on in whole pooled megabytes, not in TLS's 16 KiB pieces", async (t) => {
  if (!(await needNix(t))) return;
  const { b, peer, compression } = await pair({ holderBulk: true });
  const req = { hashPart: storePathHashPart(fx!.path), narHash: fx!.narHash, offset: 0, narSize: fx!.narSize };
  const parts: Uint8Array[] = [];
  for await (const c of await openNar(b, peer, req, { compression, bulk: new BulkRoutes() })) parts.push(c);
  assert.ok(Buffer.concat(parts).equals(await nixDump()), "the bytes are Nix's NAR");
  // Each piece costs a trip through every step to the HTTP response, and each held one is garbage later.
  // Whole megabytes, but for a partial one handed on where bytes waited 100 ms (BULK_GATHER_MS:
  // a loaded machine can pause a transfer that long, so not an exact count): TLS's pieces would
  // be 64 times as many.
  const whole = Math.floor(fx!.narSize / BULK_GATHER_BYTES);
  const full = parts.filter((c) => c.length === BULK_GATHER_BYTES).length;
  assert.ok(parts.length <= whole + 4, `${parts.length} chunks for ${fx!.narSize} bytes`);
  assert.ok(full >= whole - 3, `${full} whole megabytes of ${whole}`);
});

/** A ticketed bulk connection on 127.0.0.1: the holder's socket, and the requester's with its body. */
async function bulkPair(t: { after(fn: () => unknown): void }) {
  const bulk = await BulkListener.start("127.0.0.1", 0, log);
  t.after(() => bulk.close());
  const ticket = bulk.issue();
  const body = new BulkBody();
  const client = await connectBulk("127.0.0.1", bulk.port, ticket.ticket, ticket.key, 3000, body);
  const server = await ticket.connection;
  t.after(() => server.destroy());
  return { server, client, body };
}

test("bytes that trickle in on a bulk connection go on before a buffer fills, and a short body fails", async (t) => {
  const { server, client, body } = await bulkPair(t);
  const it = body.chunks(client, 1000)[Symbol.asyncIterator]();
  server.write(Buffer.from("first bytes"));
  // The holder sends nothing more until these arrived: a reader waiting for a full buffer would wait for ever.
  const first = await it.next();
  assert.equal(Buffer.from(first.value!).toString(), "first bytes");
  server.end(Buffer.from("and the last"));
  assert.equal(Buffer.from((await it.next()).value!).toString(), "and the last");
  await assert.rejects(it.next(), /ended after 23 of 1000 bytes/);
});

test("a bulk body that came whole before anyone read it is still all there", { timeout: 30_000 }, async (t) => {
  const { server, client, body } = await bulkPair(t);
  const data = randomBytes(300_000);
  server.end(data);
  await new Promise((r) => client.once("end", r)); // the end came and went with no reader
  const parts: Uint8Array[] = [];
  for await (const c of body.chunks(client, data.length)) parts.push(Buffer.from(c));
  assert.ok(Buffer.concat(parts).equals(data));
});

test("a bulk body read slower than it arrives: the socket stops and starts again, and every byte comes in order", async (t) => {
  const { server, client, body } = await bulkPair(t);
  const data = randomBytes(12 << 20);
  server.end(data);
  const parts: Uint8Array[] = [];
  for await (const c of body.chunks(client, data.length)) {
    parts.push(Buffer.from(c));
    if (parts.length === 1) await sleep(200); // meanwhile more than the queue's 2 MiB arrive: reading stops
  }
  assert.ok(Buffer.concat(parts).equals(data));
});

test("bulk is offered only where it pays: bodies of a MiB or more, to a holder whose port was reachable", () => {
  const routes = new BulkRoutes(1000);
  assert.equal(routes.worth("lan", BULK_MIN_BYTES), true);
  assert.equal(routes.worth("lan", BULK_MIN_BYTES - 1), false, "a small body stays on the mesh stream");
  routes.failed("lan", false);
  assert.equal(routes.worth("lan", 64 << 20), true, "a failed handshake costs only that NAR");
  routes.failed("lan", true);
  assert.equal(routes.worth("lan", 64 << 20), false, "an unreachable port is skipped for a while");
});

test("a holder without a bulk port (an older agent, or mesh_bulk off): the NAR comes on the mesh stream", async (t) => {
  if (!(await needNix(t))) return;
  const { b, peer, compression } = await pair({ holderBulk: false });
  const routes = new BulkRoutes();
  assert.ok((await fetch(b, peer, { compression, bulk: routes })).equals(await nixDump()));
  assert.equal(routes.received, 0);
  assert.equal(routes.fallbacks, 0);
});

test("a requester without bulk (an older agent) gets the NAR on the mesh stream from a holder with a bulk port", async (t) => {
  if (!(await needNix(t))) return;
  const { b, bulk, peer, compression } = await pair({ holderBulk: true });
  assert.ok((await fetch(b, peer, { compression })).equals(await nixDump()));
  assert.ok((await fetch(b, peer, {})).equals(await nixDump()), "1.0.0, without compression");
  assert.equal(bulk!.served, 0);
});

test("an unreachable bulk port: the NAR comes on the mesh stream, and that holder's next NARs skip the bulk port", async (t) => {
  if (!(await needNix(t))) return;
  const { b, bulk, peer, compression } = await pair({ holderBulk: true });
  await bulk!.close(); // the port is in tickets, but nothing listens (as behind a firewall that rejects)
  const routes = new BulkRoutes();
  assert.ok((await fetch(b, peer, { compression, bulk: routes })).equals(await nixDump()));
  assert.equal(routes.fallbacks, 1, "one failed bulk connection");
  assert.ok((await fetch(b, peer, { compression, bulk: routes })).equals(await nixDump()));
  assert.equal(routes.fallbacks, 1, "not tried again");
  assert.equal(routes.received, 0);
});

test("a requester that abandons a NAR mid-body on the bulk port: both ends carry on, the next NAR arrives whole", async (t) => {
  if (!(await needNix(t))) return;
  const { b, bulk, peer, compression } = await pair({ holderBulk: true });
  const routes = new BulkRoutes();
  const req = { hashPart: storePathHashPart(fx!.path), narHash: fx!.narHash, offset: 0, narSize: fx!.narSize };
  for (let i = 0; i < 3; i++) {
    for await (const c of await openNar(b, peer, req, { compression, bulk: routes })) {
      assert.ok(c.length > 0);
      break; // destroys the TLS connection while the holder is still writing
    }
    await sleep(100); // the holder sees the reset while writing
  }
  const abandoned = new AbortController();
  const it = await openNar(b, peer, req, { compression, bulk: routes, signal: abandoned.signal });
  abandoned.abort(new Error("client went away"));
  await assert.rejects(async () => {
    for await (const _ of it) void _;
  });
  await sleep(100);
  assert.ok((await fetch(b, peer, { compression, bulk: routes })).equals(await nixDump()));
  // The aborted one may end before the holder's side of the handshake does.
  assert.ok(bulk!.served >= 4, `served ${bulk!.served}`);
  assert.equal(routes.fallbacks, 0);
});

test("a failed handshake on a reachable bulk port costs only that NAR its retry on the mesh stream", async (t) => {
  if (!(await needNix(t))) return;
  const { b, bulk, peer, compression } = await pair({ holderBulk: true });
  // The holder hands out keys that do not match its tickets: every handshake fails after TCP connected.
  const issue = bulk!.issue.bind(bulk);
  bulk!.issue = (ms?: number) => ({ ...issue(ms), key: randomBytes(32) });
  const routes = new BulkRoutes();
  assert.ok((await fetch(b, peer, { compression, bulk: routes })).equals(await nixDump()));
  assert.ok((await fetch(b, peer, { compression, bulk: routes })).equals(await nixDump()));
  assert.equal(routes.fallbacks, 2, "tried again for the second NAR");
  assert.equal(routes.received, 0);
  assert.equal(bulk!.served, 0);
});

test("a bulk port taken by another program: the mesh starts without one, and serves NARs on the mesh stream", async (t) => {
  if (!(await needNix(t))) return;
  // A squatter on some free port P, with P - 1 free too (checked by listening on it), so the mesh
  // can have P - 1 and finds its bulk port (mesh port + 1) taken. Retried: other programs take
  // ports too, and P - 1 may be one of theirs.
  let squatter = createServer(() => {});
  let port = 0;
  for (let attempt = 0; attempt < 20 && port === 0; attempt++) {
    squatter = createServer(() => {});
    await new Promise<void>((r) => squatter.listen(0, "127.0.0.1", r));
    const below = (squatter.address() as AddressInfo).port - 1;
    if (below > 1024 && (await canListen(below))) port = below;
    else await new Promise<void>((r) => squatter.close(() => r()));
  }
  assert.ok(port > 0, "found a free port below a taken one");
  t.after(() => squatter.close());
  const local = new LocalStore(fx!.root, new Signer([ka]));
  const mesh = await Mesh.start({ key: ka, trustedKeys: [], listen: `127.0.0.1:${port}`, peers: [], mdns: false, local, log });
  t.after(async () => {
    await mesh.stop();
    local.close();
  });
  assert.equal(mesh.bulk, undefined, "no bulk port");
  assert.ok(mesh.node.addresses().some((a) => a.toString().includes(`/tcp/${port}`)), "the mesh listens");
});

/** Tries a TLS connection with this ticket and key; the error, or undefined if it connected (kept open until `done`). */
async function tryTicket(bulk: BulkListener, ticket: Uint8Array, key: Uint8Array, done?: { after(fn: () => void): void }): Promise<Error | undefined> {
  try {
    const s = await connectBulk("127.0.0.1", bulk.port, ticket, key, 3000, new BulkBody());
    done?.after(() => s.destroy());
    return undefined;
  } catch (err) {
    return err as Error;
  }
}

const pending = Symbol("pending");
const state = (p: Promise<unknown>) => Promise.race([p.then(() => "connected", (e: Error) => e), sleep(50).then(() => pending)]);

test("forged, reused and expired tickets are refused in the handshake, and the ticket's owner is not handed their socket", async (t) => {
  const bulk = await BulkListener.start("127.0.0.1", 0, log);
  t.after(() => bulk.close());
  const live = bulk.issue();
  // A made-up ticket, with the live ticket's key or any other.
  assert.ok(await tryTicket(bulk, randomBytes(16), live.key), "a forged ticket id fails");
  assert.ok(await tryTicket(bulk, randomBytes(16), randomBytes(32)), "a forged ticket fails");
  assert.equal(await state(live.connection), pending, "the live ticket is untouched");
  assert.equal(bulk.refused, 2);
  // The right ticket, once.
  assert.equal(await tryTicket(bulk, live.ticket, live.key, t), undefined, "the live ticket connects");
  assert.equal(await state(live.connection), "connected");
  assert.ok(await tryTicket(bulk, live.ticket, live.key), "the same ticket again fails");
  assert.equal(bulk.refused, 3);
  // The right ticket id with a wrong key fails, and uses the ticket up.
  const other = bulk.issue();
  assert.ok(await tryTicket(bulk, other.ticket, randomBytes(32)), "a wrong key fails");
  assert.ok(await tryTicket(bulk, other.ticket, other.key), "the ticket is gone after one handshake");
  assert.equal(await state(other.connection), pending, "no socket for the wrong key");
  // Expired.
  const short = bulk.issue(30);
  await sleep(100);
  assert.ok(await tryTicket(bulk, short.ticket, short.key), "an expired ticket fails");
  assert.ok((await state(short.connection)) instanceof BulkTicketExpired);
  // Cancelled (the mesh stream ended first).
  const cancelled = bulk.issue();
  cancelled.cancel();
  assert.ok(await tryTicket(bulk, cancelled.ticket, cancelled.key), "a cancelled ticket fails");
});

/** Everything a socket receives until the other side closes it (or `ms` pass). */
function drain(sock: Socket, ms = 5000): Promise<{ bytes: Buffer; closed: boolean }> {
  return new Promise((resolve) => {
    const parts: Buffer[] = [];
    const timer = setTimeout(() => {
      sock.destroy();
      resolve({ bytes: Buffer.concat(parts), closed: false });
    }, ms);
    sock.on("data", (b: Buffer) => parts.push(b));
    sock.on("error", () => {});
    sock.on("close", () => {
      clearTimeout(timer);
      resolve({ bytes: Buffer.concat(parts), closed: true });
    });
  });
}

test("the bulk port gives nothing without a ticket: plain TCP, TLS without a PSK, and more idle sockets than the per-host limit", async (t) => {
  const bulk = await BulkListener.start("127.0.0.1", 0, log);
  t.after(() => bulk.close());
  bulk.issue(); // a live ticket exists: it must not matter
  // An HTTP request: the server reads it as a bad TLS record and closes; at most an alert comes back.
  const http = tcpConnect(bulk.port, "127.0.0.1");
  http.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  const h = await drain(http);
  assert.ok(h.closed, "closed by the server");
  assert.ok(h.bytes.length === 0 || h.bytes[0] === 0x15, `nothing but a TLS alert: ${h.bytes.subarray(0, 16).toString("hex")}`);
  // A TLS 1.3 client with no PSK (certificate authentication): no shared way to authenticate.
  const tls = tlsConnect({ host: "127.0.0.1", port: bulk.port, rejectUnauthorized: false, minVersion: "TLSv1.3" });
  let secure = false;
  tls.on("secureConnect", () => (secure = true));
  const r = await drain(tls as unknown as Socket);
  assert.ok(r.closed && !secure && r.bytes.length === 0, "no handshake, no bytes");
  // Idle sockets: the per-host limit, then refused at once.
  const idle = Array.from({ length: BULK_INBOUND_PER_HOST }, () => tcpConnect(bulk.port, "127.0.0.1"));
  t.after(() => idle.forEach((s) => s.destroy()));
  await Promise.all(idle.map((s) => new Promise((r) => s.once("connect", r))));
  await sleep(50);
  const refusedBefore = bulk.refused;
  const extra = await drain(tcpConnect(bulk.port, "127.0.0.1"), 2000);
  assert.ok(extra.closed, "the socket over the limit is closed at once");
  assert.equal(bulk.refused, refusedBefore + 1);
});

/** Whether a TCP server can listen on 127.0.0.1:port now (closed again at once). */
function canListen(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const probe = createServer();
    probe.once("error", () => resolve(false));
    probe.listen(port, "127.0.0.1", () => probe.close(() => resolve(true)));
  });
}
