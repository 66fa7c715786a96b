// Stores written with Nix's case hack (macOS; `use-case-hack` on Linux too): names that differ
// only by case are on disk as NAME~nix~case~hack~N. The judge is real Nix: the agent's NARs
// equal `nix-store --dump --option use-case-hack true`, Nix copies from it (directly and through a
// peer) with signatures required and verifies, and .ls and /serve show the NAR's names.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, lstatSync, mkdirSync, readFileSync, readlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";
import { parseHash } from "../protocol/hash.js";
import { parseNarinfo } from "../protocol/narinfo.js";
import { narListing, narStream } from "../agent/store/nar-dump.js";
import { freePort, runCli, startAgentProcess, type AgentProcess } from "./helpers/agent.js";
import { eventually } from "./helpers/fleet.js";
import { addToStore, assertSameListing, buildInStore, hasNix, needNix, nix, NIX_FLAGS, pathInfo, run, tempDir } from "./helpers/nix.js";

const execFileP = promisify(execFile);
const HACK = "~nix~case~hack~";

// Collisions of every kind: three files (FOO, Foo, foo), a file and a directory (X, x),
// directories (Dir, dir) with collisions nested inside, an executable that gets the suffix,
// symlinks on both sides, and names that sort differently once the suffix is cut
// (foo~nix~case~hack~2 sorts after foobar on disk, foo before it in the NAR; a~... after a_).
const EXPR = `let
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
  dep = mk "casehack-dep" "/bin/mkdir $out; echo dep > $out/Data; echo DEP > $out/data";
in mk "casehack-tree" ''
  set -e
  /bin/mkdir -p $out/Dir/Sub $out/dir/sub $out/x
  cd $out
  echo shout > FOO; echo upper > Foo; echo lower > foo; echo bar > foobar
  echo A > A; echo a > a; echo a_ > a_; echo tilde > 'b~'
  printf '#!/bin/sh\\necho RUN\\n' > RUN.sh; printf '#!/bin/sh\\necho run\\n' > run.sh; /bin/chmod +x run.sh
  echo X > X; echo in-x > x/inside
  echo one > Dir/Sub/Inner; echo two > Dir/Sub/inner; echo D > Dir/F
  echo d > dir/f; echo big-f > dir/sub/F; echo small-f > dir/sub/f
  /bin/ln -s foo Link; /bin/ln -s Foo link; /bin/ln -s dir/sub/f to-small-f; /bin/ln -s ../Foo dir/up
  echo \${dep} > ref
''
`;

interface Fixture {
  dir: string;
  /** The store written with the case hack, as on a Mac. */
  root: string;
  tree: string;
  closure: string[];
  keyFile: string;
  publicKey: string;
  cleanup(): void;
}

let fx: Fixture | undefined;

before(async () => {
  if (!(await hasNix())) {
    if (process.env.CI === "true") throw new Error("real Nix is required under CI=true");
    return;
  }
  const tmp = tempDir("fleetcache-casehack-");
  const src = join(tmp.dir, "src");
  const root = join(tmp.dir, "hacked");
  writeFileSync(join(tmp.dir, "tree.nix"), EXPR);
  const [tree] = await buildInStore(src, join(tmp.dir, "tree.nix"));
  const closure = (await pathInfo(src, [tree!], true)).map((i) => i.path);
  await nix(["copy", "--no-check-sigs", "--from", src, "--to", root, "--option", "use-case-hack", "true", tree!]);
  await run("nix-store", ["--generate-binary-cache-key", "casehack-1", join(tmp.dir, "sec"), join(tmp.dir, "pub")]);
  fx = {
    dir: tmp.dir, root, tree: tree!, closure,
    keyFile: join(tmp.dir, "sec"), publicKey: readFileSync(join(tmp.dir, "pub"), "utf8").trim(),
    cleanup: tmp.cleanup,
  };
});

after(() => fx?.cleanup());

function ready(t: { skip: (m: string) => void }): Fixture | undefined {
  if (!fx) t.skip("nix not installed");
  return fx;
}

const hashOf = (storePath: string) => storePath.slice(11, 43);

async function bytesOf(cmd: string, args: string[]): Promise<Buffer> {
  const { stdout } = await execFileP(cmd, args, { encoding: "buffer", maxBuffer: 64 << 20 });
  return stdout;
}

/** Nix's dump of a path of the hacked store, with or without undoing the hack. */
const referenceDump = (f: Fixture, storePath: string, caseHack = true) =>
  bytesOf("nix-store", ["--dump", f.root + storePath, "--option", "use-case-hack", String(caseHack)]);

async function startAgent(f: Fixture, extra: string[]): Promise<AgentProcess> {
  return startAgentProcess(["--store-root", f.root, "--sign-key", f.keyFile, "--state-dir", join(f.dir, "state"), ...extra]);
}

async function narOf(agent: AgentProcess, storePath: string, init?: RequestInit): Promise<{ narinfo: ReturnType<typeof parseNarinfo>; nar: Buffer; status: number }> {
  const narinfo = parseNarinfo(await (await fetch(`${agent.url}/${hashOf(storePath)}.narinfo`)).text());
  const res = await fetch(`${agent.url}/${narinfo.url}`, init);
  return { narinfo, nar: Buffer.from(await res.arrayBuffer()), status: res.status };
}

/** Real Nix copies `storePath` from the cache at `url` into `dest`, requiring a signature by one of `keys`. */
const nixCopySigned = (url: string, dest: string, keys: string, storePath: string) =>
  nix([
    "copy", "--from", url, "--to", dest,
    "--option", "trusted-public-keys", keys, "--option", "require-sigs", "true",
    "--option", "narinfo-cache-negative-ttl", "0", storePath,
  ]);

const sha256 = (b: Buffer) => createHash("sha256").update(b).digest("hex");

test("the fixture really is case-hacked on disk", (t) => {
  const f = ready(t);
  if (!f) return;
  const p = (...c: string[]) => join(f.root, f.tree, ...c);
  for (const onDisk of ["FOO", `Foo${HACK}1`, `foo${HACK}2`, "foobar", "A", `a${HACK}1`, "a_", "b~", "RUN.sh", `run.sh${HACK}1`, "X",
    `x${HACK}1/inside`, "Dir/Sub/Inner", `Dir/Sub/inner${HACK}1`, `dir${HACK}1/sub/F`, `dir${HACK}1/sub/f${HACK}1`, "Link", `link${HACK}1`]) {
    assert.ok(existsSync(p(onDisk)) || lstatSync(p(onDisk)).isSymbolicLink(), `${onDisk} on disk`);
  }
  assert.ok(!existsSync(p("foo")) && !existsSync(p("dir")), "no unhacked lowercase names");
  assert.equal(lstatSync(p(`run.sh${HACK}1`)).mode & 0o100, 0o100, "the hacked executable keeps its bit");
  assert.equal(readlinkSync(p(`link${HACK}1`)), "Foo");
});

test("with --use-case-hack: NARs equal nix-store --dump --option use-case-hack true and match NarHash; Nix copies and verifies", async (t) => {
  const f = ready(t);
  if (!f) return;
  const agent = await startAgent(f, ["--use-case-hack"]);
  try {
    for (const storePath of f.closure) {
      const { narinfo, nar, status } = await narOf(agent, storePath);
      assert.equal(status, 200);
      const reference = await referenceDump(f, storePath);
      assert.equal(nar.length, reference.length, `${storePath}: length`);
      assert.ok(nar.equals(reference), `${storePath}: NAR bytes differ from Nix's dump`);
      assert.equal(sha256(nar), Buffer.from(parseHash(narinfo.narHash)).toString("hex"), `${storePath}: NarHash`);
    }
    assert.ok(!(await referenceDump(f, f.tree, false)).equals(await referenceDump(f, f.tree)), "the hack changes the dump");
    const viaStore = await bytesOf("nix", [...NIX_FLAGS, "store", "dump-path", "--store", f.root, "--option", "use-case-hack", "true", f.tree]);
    assert.ok(viaStore.equals(await referenceDump(f, f.tree)), "nix store dump-path agrees with nix-store --dump");
    // A range inside the tree's NAR is the same slice of the reference.
    const reference = await referenceDump(f, f.tree);
    const part = await narOf(agent, f.tree, { headers: { Range: "bytes=1000-2999" } });
    assert.equal(part.status, 206);
    assert.ok(part.nar.equals(reference.subarray(1000, 3000)), "range of the case-hacked NAR");

    // Real Nix, signatures required, into an empty store; then its own check of hashes and signatures.
    const dest = join(f.dir, "dest-direct");
    await nixCopySigned(agent.url, dest, f.publicKey, f.tree);
    await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--trusted-public-keys", f.publicKey, "--sigs-needed", "1", "-r", f.tree]);
    assert.equal(readFileSync(join(dest, f.tree, "foo"), "utf8"), "lower\n", "real names in the copy");
    assert.equal(readFileSync(join(dest, f.tree, "dir/sub/f"), "utf8"), "small-f\n");
  } finally {
    await agent.stop();
  }
});

test("without the case hack the agent serves the names on disk, and Nix refuses the NAR (the test can fail)", async (t) => {
  const f = ready(t);
  if (!f) return;
  const agent = await startAgent(f, ["--no-use-case-hack"]);
  try {
    const { narinfo, nar } = await narOf(agent, f.tree);
    // The names on disk make a longer NAR than the NarSize announced: the body is cut there.
    assert.ok((await referenceDump(f, f.tree, false)).subarray(0, nar.length).equals(nar), "the dump of the names on disk");
    assert.notEqual(sha256(nar), Buffer.from(parseHash(narinfo.narHash)).toString("hex"), "NarHash mismatch");
    await assert.rejects(nixCopySigned(agent.url, join(f.dir, "dest-nohack"), f.publicKey, f.tree));
  } finally {
    await agent.stop();
  }
});

test(".ls equals the listing Nix writes for the path's NAR, and /serve uses the NAR's names", async (t) => {
  const f = ready(t);
  if (!f) return;
  const agent = await startAgent(f, ["--use-case-hack"]);
  const get = (path: string, init?: RequestInit) => fetch(agent.url + path, init);
  try {
    // Nix's listing of the NAR. Not made in one step: Nix run with use-case-hack lists the names it
    // would give the entries on disk (its NAR parser adds the suffixes), not the NAR's names.
    const nars = join(f.dir, "nar-cache");
    const listed = join(f.dir, "listed-cache");
    await nix(["copy", "--option", "use-case-hack", "true", "--from", f.root, "--to", `file://${nars}?compression=none`, f.tree]);
    await nix(["copy", "--no-check-sigs", "--from", `file://${nars}`, "--to", `file://${listed}?compression=none&write-nar-listing=true`, f.tree]);
    const h = hashOf(f.tree);
    const expected = readFileSync(join(listed, `${h}.ls`));
    const ls = await get(`/${h}.ls`);
    assert.equal(ls.status, 200);
    const ours = Buffer.from(await ls.arrayBuffer());
    assertSameListing(ours, expected, ".ls differs from Nix's");
    assert.ok(!ours.includes(HACK), "no suffix in the listing");

    const text = async (path: string) => {
      const res = await get(path);
      return { status: res.status, body: await res.text() };
    };
    const ok = async (path: string, body: string) => assert.deepEqual(await text(`/serve/${h}/${path}`), { status: 200, body }, path);
    await ok("FOO", "shout\n");
    await ok("Foo", "upper\n");
    await ok("foo", "lower\n");
    await ok("foobar", "bar\n");
    await ok("a", "a\n");
    await ok("x/inside", "in-x\n");
    await ok("Dir/Sub/inner", "two\n");
    await ok("Dir/Sub/Inner", "one\n");
    await ok("dir/f", "d\n");
    await ok("dir/sub/f", "small-f\n");
    await ok("dir/sub/F", "big-f\n");
    await ok("run.sh", "#!/bin/sh\necho run\n");
    // The type comes from the NAR name (on disk it is run.sh~nix~case~hack~1).
    assert.equal((await get(`/serve/${h}/run.sh`, { method: "HEAD" })).headers.get("content-type"), "text/x-shellscript");
    // Symlinks resolve by the NAR's names too: "link" points to "Foo", "Link" to "foo".
    await ok("link", "upper\n");
    await ok("Link", "lower\n");
    await ok("to-small-f", "small-f\n");
    await ok("dir/up", "upper\n");
    // The names on disk are not names in Nix's view of the path: never served, even though the
    // files exist (foo~nix~case~hack~2 is "foo", not a file of that name).
    for (const onDisk of [`foo${HACK}2`, `Foo${HACK}1`, `dir${HACK}1/f`, `dir/sub/f${HACK}1`, `x${HACK}1/inside`, `link${HACK}1`]) {
      const res = await get(`/serve/${h}/${onDisk.split("/").map(encodeURIComponent).join("/")}`);
      assert.equal(res.status, 404, onDisk);
      await res.arrayBuffer();
    }
    // Directory pages list the NAR's names, in NAR order, with links that resolve.
    const page = await text(`/serve/${h}/`);
    assert.equal(page.status, 200);
    assert.ok(!page.body.includes(HACK), page.body);
    const names = [...page.body.matchAll(/<li><a href="([^"]+)">/g)].map((m) => decodeURIComponent(m[1]!)).filter((n) => n !== "../");
    assert.deepEqual(names, ["A", "Dir/", "FOO", "Foo", "Link", "RUN.sh", "X", "a", "a_", "b~", "dir/", "foo", "foobar", "link", "ref", "run.sh", "to-small-f", "x/"]);
    const sub = await text(`/serve/${h}/dir/sub/`);
    assert.match(sub.body, /href="F">F<\/a>[\s\S]*href="f">f<\/a>/);
  } finally {
    await agent.stop();
  }
});

test("two agents meshed on loopback: Nix copies the case-hacked holder's path through its own agent and verifies", async (t) => {
  const f = ready(t);
  if (!f) return;
  const keygen = async (name: string) => {
    const r = await runCli(["keygen", name, "--out", join(f.dir, `${name}.sec`)]);
    assert.equal(r.code, 0, r.stderr);
    return r.stdout.trim();
  };
  const pubB = await keygen("casehack-b-1");
  const rootB = join(f.dir, "b-store");
  mkdirSync(join(f.dir, "b-work"), { recursive: true });
  writeFileSync(join(f.dir, "b-work", "b.txt"), "b\n");
  await addToStore(rootB, join(f.dir, "b-work", "b.txt"));
  const [portA, portB] = [await freePort(), await freePort()];
  const mesh = (port: number, other: number, otherKey: string) => ["--p2p-listen", `127.0.0.1:${port}`, "--peer", `127.0.0.1:${other}`, "--trusted-key", otherKey];
  let a: AgentProcess | undefined, b: AgentProcess | undefined;
  try {
    a = await startAgent(f, ["--use-case-hack", ...mesh(portA, portB, pubB)]);
    b = await startAgentProcess(["--store-root", rootB, "--sign-key", join(f.dir, "casehack-b-1.sec"), "--state-dir", join(f.dir, "b-state"), ...mesh(portB, portA, f.publicKey)]);
    await eventually("B knows A's paths", async () => (await fetch(`${b!.url}/${hashOf(f.tree)}.narinfo`)).status === 200);
    const dest = join(f.dir, "dest-mesh");
    await nixCopySigned(b.url, dest, `${f.publicKey} ${pubB}`, f.tree);
    await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--trusted-public-keys", `${f.publicKey} ${pubB}`, "--sigs-needed", "1", "-r", f.tree]);
    assert.equal(readFileSync(join(dest, f.tree, "dir/sub/F"), "utf8"), "big-f\n");
    // B really got it from A (its own store has no such path).
    assert.ok(!existsSync(join(rootB, f.tree)));

    // The same holder without the hack sends the names on disk: B's agent finds the NAR wrong and
    // Nix gets no complete NAR (so this test can fail).
    await a.stop();
    a = await startAgent(f, ["--no-use-case-hack", ...mesh(portA, portB, pubB)]);
    await eventually("B knows A's paths again", async () => (await fetch(`${b!.url}/${hashOf(f.tree)}.narinfo`)).status === 200);
    await assert.rejects(nixCopySigned(b.url, join(f.dir, "dest-mesh-nohack"), `${f.publicKey} ${pubB}`, f.tree));
    assert.match(b.logs(), /hash-mismatch: NAR hash differs/);
  } finally {
    await a?.stop();
    await b?.stop();
  }
});

test("use_case_hack: flag, environment and TOML; off by default on Linux", async () => {
  const tmp = tempDir();
  try {
    const cfg = async (args: string[], env: NodeJS.ProcessEnv = {}) => {
      const r = await runCli(["agent", "--check-config", ...args], env);
      assert.equal(r.code, 0, r.stderr);
      return JSON.parse(r.stdout).useCaseHack as unknown;
    };
    const toml = join(tmp.dir, "c.toml");
    writeFileSync(toml, "use_case_hack = true\n");
    assert.equal(await cfg([]), process.platform === "darwin");
    assert.equal(await cfg(["--config", toml]), true);
    assert.equal(await cfg(["--config", toml], { FLEETCACHE_USE_CASE_HACK: "false" }), false);
    assert.equal(await cfg(["--config", toml, "--no-use-case-hack"]), false);
    assert.equal(await cfg(["--use-case-hack"], { FLEETCACHE_USE_CASE_HACK: "0" }), true);
    writeFileSync(toml, 'use_case_hack = "sometimes"\n');
    const bad = await runCli(["agent", "--check-config", "--config", toml]);
    assert.equal(bad.code, 2);
    assert.match(bad.stderr, /use_case_hack: expected true or false/);
  } finally {
    tmp.cleanup();
  }
});

test("a directory Nix cannot dump (two entries with one name after the cut) is refused as Nix refuses it", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  try {
    const d = join(tmp.dir, "d");
    mkdirSync(d);
    writeFileSync(join(d, "a"), "1");
    writeFileSync(join(d, `a${HACK}1`), "2");
    await assert.rejects(bytesOf("nix-store", ["--dump", d, "--option", "use-case-hack", "true"]), /collision/);
    const drain = async () => {
      for await (const _ of narStream(d, { caseHack: true }));
    };
    await assert.rejects(drain(), /file name collision/);
    await assert.rejects(narListing(d, { caseHack: true }), /file name collision/);
    // Without the hack, both are ordinary names.
    const plain: Buffer[] = [];
    for await (const c of narStream(d)) plain.push(c);
    assert.ok(Buffer.concat(plain).equals(await bytesOf("nix-store", ["--dump", d])));

    // Such a path in a store (added without the hack, as a NAR from elsewhere could make it):
    // the agent with the hack refuses it on every route and carries on.
    const root = join(tmp.dir, "store");
    const storePath = await addToStore(root, d);
    const keyFile = join(tmp.dir, "sec");
    await run("nix-store", ["--generate-binary-cache-key", "collide-1", keyFile, join(tmp.dir, "pub")]);
    const agent = await startAgentProcess(["--store-root", root, "--sign-key", keyFile, "--state-dir", join(tmp.dir, "state"), "--use-case-hack"]);
    try {
      const h = hashOf(storePath);
      for (const path of [`/${h}.ls`, `/serve/${h}/`, `/serve/${h}/a`]) {
        const res = await fetch(agent.url + path);
        assert.equal(res.status, 500, path);
        await res.arrayBuffer();
      }
      const narinfo = parseNarinfo(await (await fetch(`${agent.url}/${h}.narinfo`)).text());
      // The collision is found before the first NAR byte, so the answer is an error status,
      // never a 200 with a NAR that looks complete.
      const nar = await fetch(`${agent.url}/${narinfo.url}`);
      await nar.arrayBuffer();
      assert.equal(nar.status, 500, "the NAR of a path Nix cannot dump");
      assert.equal((await fetch(`${agent.url}/health`)).status, 200);
    } finally {
      await agent.stop();
    }
  } finally {
    tmp.cleanup();
  }
});
