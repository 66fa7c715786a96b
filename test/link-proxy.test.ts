// The fault suite's link proxy: what it must keep of a TCP stream (bytes, order, FIN, RST,
// backpressure) and what it must add (latency, a rate limit). Timings are asserted only as lower
// bounds: a slow machine makes a link slower, never faster.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { connect, createServer, type AddressInfo, type Server, type Socket } from "node:net";
import { once } from "node:events";
import { performance } from "node:perf_hooks";
import { parseRate, startLinkProxy, type LinkProxy, type LinkProxyOptions } from "../faults/link-proxy.js";

const cleanups: (() => Promise<void>)[] = [];
after(async () => {
  for (const c of cleanups) await c();
});

/** A TCP server on 127.0.0.1 whose connections are handed to `onConn`. */
async function server(onConn: (s: Socket) => void): Promise<{ port: number; srv: Server }> {
  const srv = createServer({ allowHalfOpen: true }, onConn);
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  cleanups.push(() => new Promise((r) => srv.close(() => r())));
  return { port: (srv.address() as AddressInfo).port, srv };
}

async function proxyTo(port: number, opts: Partial<LinkProxyOptions> = {}): Promise<LinkProxy> {
  const p = await startLinkProxy({ target: { host: "127.0.0.1", port }, ...opts });
  cleanups.push(() => p.close());
  return p;
}

function dial(p: LinkProxy): Promise<Socket> {
  const s = connect({ host: p.host, port: p.port, allowHalfOpen: true });
  return once(s, "connect").then(() => s);
}

/** Everything a socket sends until its FIN, with the time the FIN came. */
async function readAll(s: Socket): Promise<{ data: Buffer; endAt: number }> {
  const parts: Buffer[] = [];
  s.on("data", (d: Buffer) => parts.push(d));
  await once(s, "end");
  return { data: Buffer.concat(parts), endAt: performance.now() };
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

test("bytes arrive identical in both directions at once, with backpressure (small high-water mark)", async () => {
  const toServer = randomBytes(6 << 20);
  const toClient = randomBytes(5 << 20);
  let serverGot: Promise<{ data: Buffer }> | undefined;
  const { port } = await server((s) => {
    serverGot = readAll(s);
    s.end(toClient);
  });
  // A high-water mark far below the data: the proxy must pause its senders, not buffer it all.
  const p = await proxyTo(port, { highWaterBytes: 64 << 10, up: { latencyMs: 5 }, down: { latencyMs: 5 } });
  const c = await dial(p);
  const clientGot = readAll(c);
  c.end(toServer);
  assert.equal(sha((await clientGot).data), sha(toClient));
  await new Promise((r) => setImmediate(r));
  assert.equal(sha((await serverGot!).data), sha(toServer));
  assert.deepEqual(p.stats(), { connections: 1, bytesUp: toServer.length, bytesDown: toClient.length });
});

test("a round trip takes at least the latency of both directions", async () => {
  const { port } = await server((s) => s.pipe(s)); // echo
  const p = await proxyTo(port, { up: { latencyMs: 80 }, down: { latencyMs: 40 } });
  const c = await dial(p);
  for (let i = 0; i < 3; i++) {
    const t0 = performance.now();
    c.write(`ping ${i}`);
    const [reply] = (await once(c, "data")) as [Buffer];
    assert.equal(reply.toString(), `ping ${i}`);
    assert.ok(performance.now() - t0 >= 120 - 1, `round trip ${performance.now() - t0} ms`);
  }
  c.destroy();
});

test("the rate limit holds: 1 MiB at 2 MiB/s takes at least half a second less one burst", async () => {
  const data = randomBytes(1 << 20);
  const { port } = await server((s) => void readAll(s).then(({ data: got }) => s.end(sha(got))));
  const rate = parseRate("2MiB");
  const burst = 32 << 10;
  const p = await proxyTo(port, { up: { rateBytesPerSec: rate, burstBytes: burst } });
  const c = await dial(p);
  const t0 = performance.now();
  const reply = readAll(c);
  c.end(data);
  const { data: digest, endAt } = await reply;
  assert.equal(digest.toString(), sha(data));
  const ms = endAt - t0;
  assert.ok(ms >= ((data.length - burst) / rate) * 1000 - 1, `1 MiB took ${ms} ms`);
});

test("half-close: the client's FIN reaches the server after its data, and the server can still answer", async () => {
  const { port } = await server((s) => {
    const parts: Buffer[] = [];
    s.on("data", (d: Buffer) => parts.push(d));
    s.on("end", () => s.end(`got ${Buffer.concat(parts).toString()}`));
  });
  const p = await proxyTo(port, { up: { latencyMs: 20 }, down: { latencyMs: 20 } });
  const c = await dial(p);
  const reply = readAll(c);
  c.end("hello");
  assert.equal((await reply).data.toString(), "got hello");
  await once(c, "close");
});

test("a reset on one side reaches the other as a reset, not a clean end", async () => {
  let serverSide: Socket | undefined;
  const { port } = await server((s) => {
    serverSide = s;
  });
  const p = await proxyTo(port, { up: { latencyMs: 10 }, down: { latencyMs: 10 } });
  const c = await dial(p);
  c.write("x");
  while (!serverSide) await new Promise((r) => setTimeout(r, 5));
  const s = serverSide;
  let ended = false;
  s.on("end", () => (ended = true));
  const err = once(s, "error");
  c.resetAndDestroy();
  const [e] = (await err) as [NodeJS.ErrnoException];
  assert.equal(e.code, "ECONNRESET");
  assert.equal(ended, false, "no FIN before the reset");
});

test("a target that refuses the connection resets the client", async () => {
  const { port, srv } = await server(() => {});
  await new Promise((r) => srv.close(r)); // nothing listens there any more
  const p = await proxyTo(port);
  const c = await dial(p);
  const [e] = (await once(c, "error")) as [NodeJS.ErrnoException];
  assert.equal(e.code, "ECONNRESET");
});

test("a frozen link passes nothing and closes nothing; thawed, it delivers what was held", async () => {
  const { port } = await server((s) => s.pipe(s));
  const p = await proxyTo(port, { up: { latencyMs: 5 }, down: { latencyMs: 5 } });
  const c = await dial(p);
  const got: Buffer[] = [];
  c.on("data", (d: Buffer) => got.push(d));
  let closed = false;
  c.on("close", () => (closed = true));
  p.freeze();
  c.write("held");
  await new Promise((r) => setTimeout(r, 300));
  assert.equal(Buffer.concat(got).toString(), "");
  assert.equal(closed, false);
  p.thaw();
  while (Buffer.concat(got).length < 4) await new Promise((r) => setTimeout(r, 10));
  assert.equal(Buffer.concat(got).toString(), "held");
  c.destroy();
});

test("a refusing link resets open connections and refuses new ones; healed, it carries again", async () => {
  const { port } = await server((s) => {
    s.on("error", () => {}); // the proxy resets its side too
    s.pipe(s);
  });
  const p = await proxyTo(port, { up: { latencyMs: 5 }, down: { latencyMs: 5 } });
  const open = await dial(p);
  const reset = once(open, "error");
  await p.refuse();
  const [e] = (await reset) as [NodeJS.ErrnoException];
  assert.equal(e.code, "ECONNRESET", "an open connection is reset, not ended");
  const refused = connect({ host: p.host, port: p.port });
  const [e2] = (await once(refused, "error")) as [NodeJS.ErrnoException];
  assert.equal(e2.code, "ECONNREFUSED", "a new connection is refused at once");
  await p.heal();
  const c = await dial(p);
  const got = new Promise<string>((r) => c.once("data", (d: Buffer) => r(d.toString())));
  c.write("back");
  assert.equal(await got, "back");
  c.destroy();
});

test("another port of the same link leads to its own target, shares the link's rate and is cut with it", async () => {
  const echo = (tag: string) => (s: Socket) => {
    s.on("error", () => {});
    void readAll(s).then(({ data }) => s.end(`${tag}:${sha(data)}`));
  };
  const first = await server(echo("first"));
  const second = await server(echo("second"));
  const rate = parseRate("2MiB");
  const burst = 32 << 10;
  const p = await proxyTo(first.port, { also: [{ port: 0, target: { host: "127.0.0.1", port: second.port } }], up: { rateBytesPerSec: rate, burstBytes: burst } });
  assert.equal(p.also.length, 1);
  const data = randomBytes(512 << 10);
  const send = async (port: number) => {
    const c = connect({ host: p.host, port, allowHalfOpen: true });
    await once(c, "connect");
    const reply = readAll(c);
    c.end(data);
    return reply;
  };
  const t0 = performance.now();
  const [a, b] = await Promise.all([send(p.port), send(p.also[0]!)]);
  assert.equal(a.data.toString(), `first:${sha(data)}`);
  assert.equal(b.data.toString(), `second:${sha(data)}`);
  // One link: 1 MiB in all at 2 MiB/s, however many ports it came through.
  const ms = Math.max(a.endAt, b.endAt) - t0;
  assert.ok(ms >= ((2 * data.length - burst) / rate) * 1000 - 1, `2 x 512 KiB over one 2 MiB/s link took ${ms} ms`);
  await p.refuse();
  const refused = connect({ host: p.host, port: p.also[0]! });
  const [e] = (await once(refused, "error")) as [NodeJS.ErrnoException];
  assert.equal(e.code, "ECONNREFUSED", "the other port is cut with the link");
  await p.heal();
  const again = await send(p.also[0]!);
  assert.equal(again.data.toString(), `second:${sha(data)}`);
});

test("rates are parsed strictly", () => {
  assert.equal(parseRate("1MiB"), 1 << 20);
  assert.equal(parseRate("512KiB/s"), 512 << 10);
  assert.equal(parseRate("1000"), 1000);
  assert.throws(() => parseRate("fast"));
});
