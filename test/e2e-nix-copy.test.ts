// The judge is the real Nix client: it copies every shape of store path from the agent with
// signatures required, and its own tools agree with what the agent served, byte for byte.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { parseHash } from "../protocol/hash.js";
import { parseNarinfo } from "../protocol/narinfo.js";
import type { AgentProcess } from "./helpers/agent.js";
import { startShapesAgent, type ShapesAgent, type ShapesClosure } from "./helpers/fixtures.js";
import { dumpPath, nix, NIX_FLAGS, pathInfo, run, UNSIGNED_REFUSED, type NixPathInfoJson } from "./helpers/nix.js";

let shapes: ShapesAgent | undefined;
let tmp: { dir: string };
let storeRoot: string;
let closure: ShapesClosure;
let agent: AgentProcess;
let publicKey: string;
let infos: NixPathInfoJson[];

before(async () => {
  shapes = await startShapesAgent();
  if (!shapes) return;
  ({ storeRoot, closure, agent, publicKey } = shapes);
  tmp = { dir: shapes.dir };
  infos = await pathInfo(storeRoot, closure.paths, true);
});

after(() => shapes?.stop());

function skipUnlessReady(t: { skip: (m: string) => void }): boolean {
  if (agent) return true;
  t.skip("nix not installed");
  return false;
}

async function get(path: string, init?: RequestInit): Promise<Response> {
  return fetch(agent.url + path, init);
}

test("nix copy from the agent, signatures required, then nix store verify", async (t) => {
  if (!skipUnlessReady(t)) return;
  const dest = join(tmp.dir, "dest");
  await nix([
    "copy", "--from", agent.url, "--to", dest,
    "--option", "trusted-public-keys", publicKey, "--option", "require-sigs", "true",
    "--option", "narinfo-cache-negative-ttl", "0",
    ...closure.paths,
  ]);
  // Everything arrived, with the same metadata as the source.
  const copied = await pathInfo(dest, closure.paths, true);
  assert.deepEqual(
    copied.map((i) => [i.path, i.narHash, i.narSize, i.references, i.deriver, i.ca]).sort(),
    infos.map((i) => [i.path, i.narHash, i.narSize, i.references, i.deriver, i.ca]).sort(),
  );
  // Nix re-hashes the contents and checks our signatures with the trusted key.
  await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--all", "--trusted-public-keys", publicKey, "--sigs-needed", "1"]);
});

test("nix copy refuses the agent's input-addressed paths when its key is not trusted", async (t) => {
  if (!skipUnlessReady(t)) return;
  const dest = join(tmp.dir, "dest-untrusted");
  const other = "other-1:" + Buffer.alloc(32, 7).toString("base64");
  await assert.rejects(
    nix(["copy", "--from", agent.url, "--to", dest, "--option", "trusted-public-keys", other, "--option", "require-sigs", "true", closure.built]),
    UNSIGNED_REFUSED,
  );
});

test("every NAR equals nix store dump-path, byte for byte", async (t) => {
  if (!skipUnlessReady(t)) return;
  for (const info of infos) {
    const narinfo = parseNarinfo(await (await get(`/${info.path.slice(11, 43)}.narinfo`)).text());
    const res = await get("/" + narinfo.url);
    assert.equal(res.status, 200, info.path);
    const ours = Buffer.from(await res.arrayBuffer());
    const theirs = await collect(dumpPath(storeRoot, info.path));
    assert.equal(ours.length, theirs.length, `${info.path}: length`);
    assert.ok(ours.equals(theirs), `${info.path}: NAR bytes differ from nix store dump-path`);
  }
});

test("narinfo fields equal nix path-info --json", async (t) => {
  if (!skipUnlessReady(t)) return;
  for (const info of infos) {
    const res = await get(`/${info.path.slice(11, 43)}.narinfo`);
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-type"), "text/x-nix-narinfo");
    const text = await res.text();
    const n = parseNarinfo(text);
    assert.equal(n.storePath, info.path);
    assert.deepEqual(parseHash(n.narHash), parseHash(info.narHash));
    assert.equal(n.narSize, info.narSize);
    assert.deepEqual(n.references, [...info.references].sort());
    assert.equal(n.deriver, info.deriver);
    assert.equal(n.ca, info.ca);
    assert.match(text, /^Compression: none$/m);
    assert.ok(n.sigs.some((s) => s.startsWith("shapes-test-1:")), "carries our signature");
  }
});

test("the paths cover every shape, and the built one has a deriver, references and a CA-less log", async (t) => {
  if (!skipUnlessReady(t)) return;
  const built = infos.find((i) => i.path === closure.built)!;
  assert.ok(built.deriver, "built path has a deriver");
  assert.ok(built.references.includes(closure.builtDep) && built.references.includes(closure.built), "dep and self references");
  assert.ok(infos.find((i) => i.path === closure.tree)!.ca?.startsWith("fixed:r:sha256:"), "added path is content-addressed");
  const log = await get(`/log/${built.deriver!.slice(11)}`);
  assert.equal(log.status, 200);
  const expected = await run("nix-store", ["--store", storeRoot, "--read-log", built.deriver!]);
  assert.equal(await log.text(), expected);
});

async function collect(stream: NodeJS.ReadableStream & { done: Promise<void> }): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const c of stream) chunks.push(c as Buffer);
  await stream.done;
  return Buffer.concat(chunks);
}

