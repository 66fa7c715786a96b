// HTTP behaviour beyond what `nix copy` exercises: ranges, HEAD, listings, files, bad input, GC.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { request } from "node:http";
import { connect } from "node:net";
import { join } from "node:path";
import { parseNarinfo } from "../protocol/narinfo.js";
import { hashPartOf } from "../protocol/store-path.js";
import type { AgentProcess } from "./helpers/agent.js";
import { shapesHttp, startShapesAgent, type ShapesAgent, type ShapesClosure } from "./helpers/fixtures.js";
import { addToStore, assertSameListing, listingRefusal, nix, nixListing, run } from "./helpers/nix.js";
import { writeFileSync } from "node:fs";

let shapes: ShapesAgent | undefined;
let tmp: { dir: string };
let storeRoot: string;
let closure: ShapesClosure;
let agent: AgentProcess;

before(async () => {
  shapes = await startShapesAgent();
  if (!shapes) return;
  ({ storeRoot, closure, agent } = shapes);
  tmp = { dir: shapes.dir };
});

after(() => shapes?.stop());

const { get, ready, narUrlOf, fullNar } = shapesHttp(() => shapes);

/** Sends raw bytes and returns the raw answer (for requests fetch() refuses to make). */
function raw(bytes: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = connect(agent.port, "127.0.0.1", () => sock.end(bytes));
    let out = "";
    sock.on("data", (d) => (out += d.toString("latin1")));
    sock.on("end", () => resolve(out));
    sock.on("close", () => resolve(out));
    sock.on("error", reject);
  });
}

async function assertAlive(): Promise<void> {
  const res = await get("/health");
  assert.equal(res.status, 200, "agent still answers after bad input");
}

test("nix-cache-info announces the store, mass query and priority", async (t) => {
  if (!ready(t)) return;
  const res = await get("/nix-cache-info");
  assert.equal(res.status, 200);
  assert.equal(await res.text(), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n");
});

test("HEAD narinfo and NAR: headers without a body", async (t) => {
  if (!ready(t)) return;
  const h = await get(`/${hashPartOf(closure.tree)}.narinfo`, { method: "HEAD" });
  assert.equal(h.status, 200);
  assert.equal(await h.text(), "");
  // The headers of a rendered narinfo are built once and reused: they must stay right every time.
  for (let i = 0; i < 3; i++) {
    const g = await get(`/${hashPartOf(closure.tree)}.narinfo`);
    const text = await g.text();
    assert.equal(Number(g.headers.get("content-length")), Buffer.byteLength(text));
    assert.equal(Number(h.headers.get("content-length")), Buffer.byteLength(text), "HEAD announces the GET's length");
    assert.equal(g.headers.get("content-type"), "text/x-nix-narinfo");
    assert.match(text, new RegExp(`^StorePath: ${closure.tree}\n`));
  }
  const miss = await get(`/${"0".repeat(32)}.narinfo`, { method: "HEAD" });
  assert.equal(miss.status, 404);
  assert.equal(await miss.text(), "");
  const nar = await get(await narUrlOf(closure.tree), { method: "HEAD" });
  assert.equal(nar.status, 200);
  assert.equal(Number(nar.headers.get("content-length")), (await fullNar(closure.tree)).length);
  assert.equal(nar.headers.get("accept-ranges"), "bytes");
  assert.equal(await nar.text(), "");
});

test("Range requests on NARs: 206 slices equal the reference dump, 416 beyond the end", async (t) => {
  if (!ready(t)) return;
  const full = await fullNar(closure.tree);
  const url = await narUrlOf(closure.tree);
  const size = full.length;
  const cases: [string, number, number][] = [
    ["bytes=0-0", 0, 1],
    ["bytes=0-99", 0, 100],
    ["bytes=13-", 13, size],
    ["bytes=-50", size - 50, size],
    [`bytes=${size - 1}-${size + 100}`, size - 1, size],
    [`bytes=1000-2047`, 1000, 2048],
    [`bytes=-${size + 10}`, 0, size],
  ];
  for (const [range, start, end] of cases) {
    const res = await get(url, { headers: { Range: range } });
    assert.equal(res.status, 206, range);
    assert.equal(res.headers.get("content-range"), `bytes ${start}-${end - 1}/${size}`, range);
    const body = Buffer.from(await res.arrayBuffer());
    assert.ok(body.equals(full.subarray(start, end)), `${range}: slice differs`);
  }
  const bad = await get(url, { headers: { Range: `bytes=${size}-` } });
  assert.equal(bad.status, 416);
  assert.equal(bad.headers.get("content-range"), `bytes */${size}`);
  // An If-Range that does not match means "send it all".
  const stale = await get(url, { headers: { Range: "bytes=0-9", "If-Range": '"other"' } });
  assert.equal(stale.status, 200);
  assert.equal((await stale.arrayBuffer()).byteLength, size);
});

test("NAR URL forms of nix-serve and harmonia lead to the same bytes", async (t) => {
  if (!ready(t)) return;
  const full = await fullNar(closure.built);
  const narinfo = parseNarinfo(await (await get(`/${hashPartOf(closure.built)}.narinfo`)).text());
  const narHash32 = narinfo.narHash.replace("sha256:", "");
  const hash = hashPartOf(closure.built);
  for (const url of [`/nar/${hash}-${narHash32}.nar`, `/nar/${narHash32}.nar?hash=${hash}`, `/nar/${narHash32}.nar`, `/nar/${hash}.nar`]) {
    const res = await get(url);
    assert.equal(res.status, 200, url);
    assert.ok(Buffer.from(await res.arrayBuffer()).equals(full), url);
  }
  // A NAR URL whose hash does not match the path's content is not served.
  const wrong = narHash32.replace(/^./, (c) => (c === "0" ? "1" : "0"));
  const res = await get(`/nar/${hash}-${wrong}.nar`);
  assert.equal(res.status, 404);
});

test(".ls listing matches what Nix writes, /serve reads files and follows symlinks inside the store", async (t) => {
  if (!ready(t)) return;
  const cache = join(tmp.dir, "file-cache");
  // Names that are not UTF-8 (the tree has one) are written raw by Nix 2.8, and so by us; Nix
  // 2.26 refuses to list them (see nixListing), so the built path's listing is compared too.
  for (const path of [closure.tree, closure.built]) {
    const res = await get(`/${hashPartOf(path)}.ls`);
    assert.equal(res.status, 200);
    const ours = Buffer.from(await res.arrayBuffer());
    const theirs = await nixListing(storeRoot, path, cache);
    if (typeof theirs === "string") assert.equal(theirs, listingRefusal(ours), `Nix refused the listing of ${path}`);
    else assertSameListing(ours, theirs, `.ls of ${path}`);
  }

  const h = hashPartOf(closure.tree);
  const file = await get(`/serve/${h}/hello.txt`);
  assert.equal(file.status, 200);
  assert.equal(await file.text(), "hello, fleet\n");
  assert.equal(await (await get(`/serve/${h}/rel-link`)).text(), "hello, fleet\n");
  assert.equal(await (await get(`/serve/${h}/sub/up-link`)).text(), "hello, fleet\n");
  assert.equal(await (await get(`/serve/${h}/dir-link/inner`)).text(), "inner\n");
  assert.equal(await (await get(`/serve/${h}/n-%E6%97%A5%E6%9C%AC`)).text(), "日本");
  const dir = await get(`/serve/${h}/sub/`);
  assert.equal(dir.status, 200);
  assert.match(await dir.text(), /inner/);
  const redirect = await get(`/serve/${h}/sub`, { redirect: "manual" });
  assert.equal(redirect.status, 301);
  // A built path's symlink into another store path is followed.
  assert.equal(await (await get(`/serve/${hashPartOf(closure.builtSymlink)}`)).text(), "dependency\n");
  // Symlinks out of the store or to nowhere are refused.
  assert.equal((await get(`/serve/${h}/abs-link/`)).status, 403);
  assert.equal((await get(`/serve/${h}/dangling`)).status, 404);
  assert.equal((await get(`/serve/${hashPartOf(closure.symlinkPath)}`)).status, 404);
  const part = await get(`/serve/${h}/hello.txt`, { headers: { Range: "bytes=7-11" } });
  assert.equal(part.status, 206);
  assert.equal(await part.text(), "fleet");
});

test("malformed hashes are 400, unknown paths 404 with Cache-Control: no-store", async (t) => {
  if (!ready(t)) return;
  for (const bad of ["abc", "e".repeat(32), "0".repeat(31), "0".repeat(33), "O".repeat(32), "%30".repeat(32), "0".repeat(31) + "!"]) {
    const res = await get(`/${bad}.narinfo`);
    assert.equal(res.status, 400, bad);
    assert.equal((await get(`/${bad}.ls`)).status, 400, bad);
    assert.equal((await get(`/serve/${bad}/x`)).status, 400, bad);
  }
  const unknown = await get(`/${"0".repeat(32)}.narinfo`);
  assert.equal(unknown.status, 404);
  assert.equal(unknown.headers.get("cache-control"), "no-store");
  assert.equal((await get(`/nar/${"0".repeat(32)}-${"0".repeat(52)}.nar`)).status, 404);
  assert.equal((await get(`/nar/garbage.nar`)).status, 400);
  assert.equal((await get(`/log/${"0".repeat(32)}-nothing.drv`)).status, 404);
  assert.equal((await get(`/log/nothing`)).status, 400);
  assert.equal((await get(`/no/such/route`)).status, 404);
  await assertAlive();
});

test("path traversal is refused on every route, and nothing outside the store is served", async (t) => {
  if (!ready(t)) return;
  const h = hashPartOf(closure.tree);
  writeFileSync(join(storeRoot, "secret.txt"), "SECRET");
  const attempts = [
    `/serve/${h}/../../../etc/passwd`,
    `/serve/${h}/%2e%2e/%2e%2e/etc/passwd`,
    `/serve/${h}/..%2f..%2fetc%2fpasswd`,
    `/serve/${h}/sub/%2e%2e%2f%2e%2e%2fsecret.txt`,
    `/serve/${h}/%00`,
    `/serve/${h}/..\\..\\secret.txt`,
    `/log/../../../etc/passwd`,
    `/log/..%2f..%2fetc%2fpasswd`,
    `/nar/../../etc/passwd`,
    `/../../etc/passwd`,
    `/..%2f..%2fsecret.txt.narinfo`,
    `/%2e%2e/secret.txt.ls`,
    `/serve/../secret.txt`,
  ];
  for (const path of attempts) {
    const answer = await raw(`GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`);
    const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(answer)?.[1]);
    assert.ok(status >= 400 && status < 500, `${path}: got ${status}`);
    assert.doesNotMatch(answer, /SECRET|root:x:0/, path);
  }
  await assertAlive();
});

test("other methods are 405, oversized URLs 414, oversized headers 431, garbage 400", async (t) => {
  if (!ready(t)) return;
  for (const method of ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"]) {
    const res = await get(`/nix-cache-info`, { method });
    assert.equal(res.status, 405, method);
    assert.equal(res.headers.get("allow"), "GET, HEAD");
  }
  assert.equal((await get("/" + "a".repeat(5000))).status, 414);
  const big = await new Promise<number>((resolve, reject) => {
    const req = request(agent.url + "/nix-cache-info", { headers: { "X-Big": "x".repeat(20_000) } }, (res) => resolve(res.statusCode!));
    req.on("error", reject);
    req.end();
  });
  assert.equal(big, 431);
  assert.match(await raw("NOT HTTP AT ALL\r\n\r\n"), /^HTTP\/1\.1 400/);
  assert.match(await raw("GET nix-cache-info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), /^HTTP\/1\.1 400/);
  await assertAlive();
});

test("a path deleted by GC disappears within a second, and comes back when re-added", async (t) => {
  if (!ready(t)) return;
  const file = join(tmp.dir, "ephemeral.txt");
  writeFileSync(file, "here today\n");
  const path = await addToStore(storeRoot, file);
  const url = `/${hashPartOf(path)}.narinfo`;
  const within = async (ms: number, want: number): Promise<number> => {
    const since = Date.now();
    let got = (await get(url)).status;
    while (got !== want && Date.now() - since < ms) got = (await get(url)).status;
    return got;
  };
  assert.equal(await within(1000, 200), 200, "a new path is served within a second");
  const narUrl = await narUrlOf(path);
  await run("nix-store", ["--store", storeRoot, "--delete", path]);
  assert.equal(await within(1000, 404), 404, "narinfo gone within a second");
  assert.equal((await get(narUrl)).status, 404, "NAR gone too");
  const again = await addToStore(storeRoot, file);
  assert.equal(again, path);
  assert.equal(await within(1000, 200), 200, "re-added path is served again within a second");
  assert.ok(Buffer.from(await (await get(narUrl)).arrayBuffer()).equals(await fullNar(path)));
});

test("a signature added to a path in the store (nix store sign) shows in its narinfo within a second", async (t) => {
  if (!ready(t)) return;
  const url = `/${hashPartOf(closure.built)}.narinfo`;
  assert.doesNotMatch(await (await get(url)).text(), /^Sig: resigned-1:/m);
  await run("nix-store", ["--generate-binary-cache-key", "resigned-1", join(tmp.dir, "re.sec"), join(tmp.dir, "re.pub")]);
  await nix(["store", "sign", "--store", storeRoot, "--key-file", join(tmp.dir, "re.sec"), closure.built]);
  const since = Date.now();
  let text = "";
  while (Date.now() - since < 1000 && !/^Sig: resigned-1:/m.test(text)) text = await (await get(url)).text();
  assert.match(text, /^Sig: resigned-1:/m);
});
