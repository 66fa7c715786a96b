// Failures a client must get a clean answer for: a NAR whose source fails before its first byte,
// hashes that look like nix32 but are not canonical, and clients that half-close their socket.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { connect } from "node:net";
import { rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { hashPartOf } from "../protocol/store-path.js";
import type { AgentProcess } from "./helpers/agent.js";
import { shapesHttp, startShapesAgent, type ShapesAgent, type ShapesClosure } from "./helpers/fixtures.js";
import { addToStore, nix, run } from "./helpers/nix.js";

let shapes: ShapesAgent | undefined;
let storeRoot: string;
let closure: ShapesClosure;
let agent: AgentProcess;

before(async () => {
  shapes = await startShapesAgent();
  if (!shapes) return;
  ({ storeRoot, closure, agent } = shapes);
});

after(() => shapes?.stop());

const { get, ready, narUrlOf, fullNar } = shapesHttp(() => shapes);

/** Writes `request`, then half-closes (FIN) the socket's write side; resolves with every byte the agent sent. */
function halfClosed(request: string): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const sock = connect(agent.port, "127.0.0.1", () => sock.end(request));
    const chunks: Buffer[] = [];
    sock.on("data", (d: Buffer) => chunks.push(d));
    sock.on("close", () => resolve(Buffer.concat(chunks)));
    sock.on("error", reject);
  });
}

/** Status, headers and body of one raw HTTP/1.1 answer with a Content-Length. */
function parseAnswer(raw: Buffer): { status: number; headers: Map<string, string>; body: Buffer } {
  const end = raw.indexOf("\r\n\r\n");
  assert.ok(end > 0, `no complete header block in ${JSON.stringify(raw.subarray(0, 200).toString("latin1"))}`);
  const [statusLine, ...lines] = raw.subarray(0, end).toString("latin1").split("\r\n");
  const headers = new Map(lines.map((l) => [l.slice(0, l.indexOf(":")).toLowerCase(), l.slice(l.indexOf(":") + 1).trim()]));
  return { status: Number(statusLine!.split(" ")[1]), headers, body: raw.subarray(end + 4) };
}

test("NAR URLs with 52 nix32 characters that are not a canonical SHA-256 are a 400, never a 500", async (t) => {
  if (!ready(t)) return;
  const h = hashPartOf(closure.tree);
  // 52 nix32 characters carry 260 bits; a SHA-256 has 256, so the first character can only be 0 or 1.
  const nonCanonical = "z" + "0".repeat(51);
  for (const url of [`/nar/${nonCanonical}.nar`, `/nar/${h}-${nonCanonical}.nar`, `/nar/${nonCanonical}.nar?hash=${h}`]) {
    const res = await get(url);
    assert.equal(res.status, 400, url);
    assert.match(await res.text(), /NAR/);
  }
  assert.doesNotMatch(agent.logs(), /internal error/, "nothing was logged as an internal error");
  assert.equal((await get("/health")).status, 200);
});

test("a client that half-closes after its request gets the whole answer on the NAR, .ls and /serve routes", async (t) => {
  if (!ready(t)) return;
  const h = hashPartOf(closure.tree);
  const narUrl = await narUrlOf(closure.tree);
  const nar = parseAnswer(await halfClosed(`GET ${narUrl} HTTP/1.1\r\nHost: x\r\n\r\n`));
  assert.equal(nar.status, 200);
  assert.ok(nar.body.equals(await fullNar(closure.tree)), "the whole NAR arrived");
  const ls = parseAnswer(await halfClosed(`GET /${h}.ls HTTP/1.1\r\nHost: x\r\n\r\n`));
  assert.equal(ls.status, 200);
  assert.equal(ls.body.length, Number(ls.headers.get("content-length")));
  assert.equal(JSON.parse(ls.body.toString()).version, 1);
  const file = parseAnswer(await halfClosed(`GET /serve/${h}/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n`));
  assert.equal(file.status, 200);
  assert.equal(file.body.toString(), "hello, fleet\n");
  const head = parseAnswer(await halfClosed(`HEAD ${narUrl} HTTP/1.1\r\nHost: x\r\n\r\n`));
  assert.equal(head.status, 200);
  // Two pipelined requests, then FIN: both are answered, in order.
  const two = (await halfClosed(`GET /${h}.narinfo HTTP/1.1\r\nHost: x\r\n\r\nGET /serve/${h}/hello.txt HTTP/1.1\r\nHost: x\r\n\r\n`)).toString("latin1");
  assert.equal(two.match(/^HTTP\/1\.1 200/gm)?.length, 2, two.slice(0, 300));
  assert.match(two, /hello, fleet\n$/);
});

test("a NAR whose files vanished (GC) before the first byte is a 404 before any header is sent, and Nix says so", async (t) => {
  if (!ready(t)) return;
  writeFileSync(join(shapes!.dir, "vanishing.txt"), "here a moment ago\n".repeat(1000));
  const path = await addToStore(storeRoot, join(shapes!.dir, "vanishing.txt"));
  // The agent sees a new path within a quarter of a second (it polls the database).
  for (let i = 0; i < 100 && (await get(`/${hashPartOf(path)}.narinfo`)).status !== 200; i++) await new Promise((r) => setTimeout(r, 50));
  const narUrl = await narUrlOf(path);
  // The files go, the database row stays: the moment between a GC's unlink and its commit.
  await run("chmod", ["-R", "u+w", join(storeRoot, path)]).catch(() => "");
  rmSync(join(storeRoot, path), { recursive: true, force: true });
  assert.equal((await get(`/${hashPartOf(path)}.narinfo`)).status, 200, "the store still lists the path");

  const res = await get(narUrl);
  assert.equal(res.status, 404, "no 200 with headers followed by a dropped connection");
  assert.equal(res.headers.get("cache-control"), "no-store");
  await res.text();
  // HEAD needs no bytes: it answers from the path's metadata, as before.
  assert.equal((await get(narUrl, { method: "HEAD" })).status, 200);

  // Nix 2.8 takes the 404 as "not in this cache" (no retries) and says which file is missing.
  const dest = join(shapes!.dir, "dest-vanished");
  await assert.rejects(
    nix(["copy", "--from", agent.url, "--to", dest, "--option", "require-sigs", "false", "--option", "narinfo-cache-negative-ttl", "0", path]),
    /does not exist in binary cache/,
  );
  assert.equal((await get("/health")).status, 200);
});
