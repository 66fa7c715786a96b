// NAR dumping checked against real Nix: whole streams and byte ranges must be byte-identical to
// what `nix store dump-path` produces, listings to what `nix copy ...?write-nar-listing=true`
// writes (Nix 2.26 orders the keys of the same JSON differently: see assertSameListing).
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { createHash, randomBytes } from "node:crypto";
import { chmodSync, mkdirSync, readFileSync, symlinkSync, truncateSync, unlinkSync, writeFileSync, appendFileSync } from "node:fs";
import { join } from "node:path";
import { addToStore, assertSameListing, dumpPath, listingRefusal, needNix, nixListing, pathInfo, run, tempDir } from "./helpers/nix.js";
import { narLength, narListing, narStream } from "../agent/store/nar-dump.js";
import { serializeListing } from "../protocol/listing.js";
import type { ListingNode } from "../protocol/listing.js";
import { compareNames, entryNameProblem, padding, stringToken, u64le, validateEntryName } from "../protocol/nar.js";

// ---------- helpers ----------

async function digest(src: AsyncIterable<Buffer | string>): Promise<{ sha256: string; length: number }> {
  const h = createHash("sha256");
  let length = 0;
  for await (const chunk of src) {
    const b = typeof chunk === "string" ? Buffer.from(chunk) : chunk;
    h.update(b);
    length += b.length;
  }
  return { sha256: h.digest("hex"), length };
}

async function collect(src: AsyncIterable<Buffer | string>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of src) parts.push(typeof c === "string" ? Buffer.from(c) : c);
  return Buffer.concat(parts);
}

/** Full output of a command as bytes (for `nix-store --dump` of paths outside a store). */
async function commandBytes(cmd: string, args: string[]): Promise<Buffer> {
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "inherit"] });
  const closed = new Promise<number | null>((resolve) => child.on("close", resolve));
  const out = await collect(child.stdout);
  assert.equal(await closed, 0, `${cmd} ${args.join(" ")} failed`);
  return out;
}

async function nixDump(root: string, storePath: string): Promise<Buffer> {
  const s = dumpPath(root, storePath);
  const out = await collect(s as AsyncIterable<Buffer>);
  await s.done;
  return out;
}

const b = (s: string | number[]) => (typeof s === "string" ? Buffer.from(s, "utf8") : Buffer.from(s));
const pj = (dir: Buffer, name: Buffer | string) => Buffer.concat([dir, b("/"), typeof name === "string" ? b(name) : name]);

/** Bytes the process has read through read(2)-like calls, all threads included. */
function rchar(): number {
  return Number(/rchar: (\d+)/.exec(readFileSync("/proc/self/io", "utf8"))![1]);
}

/** Deterministic pseudo-random numbers, so a failing range is reproducible. */
function prng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s + 0x6d2b79f5) >>> 0;
    let t = s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
  };
}

function regulars(node: ListingNode, out: { narOffset: number; size: number }[] = []) {
  if (node.type === "regular") out.push(node);
  else if (node.type === "directory") for (const e of node.entries) regulars(e.node, out);
  return out;
}

// ---------- the shapes, built once and added to one chroot store ----------

const BIG_SIZE = 3 * (1 << 20) + 5; // several read chunks, size not a multiple of 8

/**
 * Directory with every kind of node and tricky names; `utf8Only` leaves out the names and the
 * symlink target that are not UTF-8, for Nix versions that cannot list those (see nixListing).
 */
function buildTree(dir: Buffer, utf8Only = false): void {
  mkdirSync(dir);
  writeFileSync(pj(dir, "exe"), "#!/bin/sh\necho hi\n", { mode: 0o755 });
  writeFileSync(pj(dir, "empty"), "");
  mkdirSync(pj(dir, "emptydir"));
  writeFileSync(pj(dir, "eight"), "12345678");
  writeFileSync(pj(dir, "seven"), "1234567");
  writeFileSync(pj(dir, "big"), randomBytes(BIG_SIZE));
  const links = pj(dir, "links");
  mkdirSync(links);
  symlinkSync("../exe", pj(links, "rel"));
  symlinkSync("/nix/store/00000000000000000000000000000000-absent/bin/x", pj(links, "abs"));
  symlinkSync("nowhere/at/all", pj(links, "dangling"));
  symlinkSync("../emptydir", pj(links, "todir"));
  symlinkSync(b([...(utf8Only ? [] : [0xfe]), 0x01, 0x22, 0x5c, 0x0a]), pj(links, "oddtarget")); // target bytes needing escapes
  const sort = pj(dir, "sort");
  mkdirSync(sort);
  const names = ["B", "a", "_", "Z", "a.b", "a-b", "a~", "aa", "é", "日本", "e"].map((n) => b(n));
  if (!utf8Only) names.push(b([0xff, 0xfe]), b([0x80]), b([0xc3])); // not UTF-8
  names.push(b("nl\nx"), b("tab\tx"), b("cr\rx"), b("ctl\x01x"), b("esc\x1bx"), b("del\x7fx"), b('quo"te'), b("back\\slash"));
  names.forEach((n, i) => writeFileSync(pj(sort, n), `file ${i}\n`));
  mkdirSync(pj(sort, "sub"));
  writeFileSync(pj(pj(sort, "sub"), "x"), "x");
}

function buildDeep(dir: Buffer, levels: number): void {
  let d = dir;
  mkdirSync(d);
  for (let i = 0; i < levels; i++) {
    d = pj(d, `d${i % 10}`);
    mkdirSync(d);
  }
  writeFileSync(pj(d, "bottom"), "deep\n", { mode: 0o755 });
}

interface Shapes {
  root: string; // chroot store
  paths: Record<string, string>; // shape name -> store path
  src: string; // unstored sources
}

let shapes: Promise<Shapes> | undefined;
let cleanupShapes: (() => void) | undefined;

function getShapes(): Promise<Shapes> {
  shapes ??= (async () => {
    const t = tempDir("fleetcache-nar-");
    cleanupShapes = t.cleanup;
    const src = join(t.dir, "src");
    mkdirSync(src);
    const S = b(src);
    buildTree(pj(S, "tree"));
    buildTree(pj(S, "tree-utf8"), true);
    buildDeep(pj(S, "deep"), 100);
    writeFileSync(join(src, "single"), "just one file, 29 bytes long\n");
    writeFileSync(join(src, "single-exe"), "#!/bin/sh\n", { mode: 0o700 });
    symlinkSync("/nix/store/11111111111111111111111111111111-target", join(src, "link"));
    const root = join(t.dir, "store");
    const paths: Record<string, string> = {};
    for (const name of ["tree", "tree-utf8", "deep", "single", "single-exe", "link"]) {
      paths[name] = await addToStore(root, join(src, name));
    }
    return { root, paths, src };
  })();
  return shapes;
}

test.after(() => cleanupShapes?.());

// ---------- pure token layer ----------

test("token encoding: length prefix, bytes, zero padding to 8", () => {
  assert.deepEqual([0, 1, 7, 8, 9, 13, 16].map(padding), [0, 7, 1, 0, 7, 3, 0]);
  assert.deepEqual(stringToken(""), Buffer.alloc(8));
  assert.deepEqual(stringToken("("), Buffer.from([1, 0, 0, 0, 0, 0, 0, 0, 0x28, 0, 0, 0, 0, 0, 0, 0]));
  assert.equal(stringToken("12345678").length, 16);
  assert.equal(stringToken(b([0xff, 0xfe])).subarray(8, 10).toString("hex"), "fffe");
  assert.deepEqual(u64le(2 ** 32 + 5), Buffer.from([5, 0, 0, 0, 1, 0, 0, 0]));
  assert.throws(() => u64le(-1));
});

test("entry names compare by raw bytes and are validated", () => {
  const names = ["é", "a", "B", "_", "Z", "a.b", "a-b", "a", "aa", "日本"].map((n) => b(n));
  names.push(b([0xff]), b([0x80, 0x41]));
  const sorted = [...names].sort(compareNames).map((n) => n.toString("hex"));
  const expected = ["B", "Z", "_", "a", "a", "a-b", "a.b", "aa", "é", "日本"].map((n) => b(n).toString("hex"));
  // 0x80 0x41 sorts before é (0xc3 0xa9), 0xff after 日 (0xe6).
  expected.splice(8, 0, "8041");
  expected.push("ff");
  assert.deepEqual(sorted, expected);
  for (const bad of ["", ".", "..", "a/b", "/", "a\0b"]) assert.throws(() => validateEntryName(b(bad)), bad);
  for (const ok of ["...", ".a", "a..", "é"]) assert.equal(entryNameProblem(b(ok)), undefined);
  assert.equal(entryNameProblem(b([0xff, 0xfe])), undefined);
});

// ---------- whole NARs against Nix ----------

test("narStream is byte-identical to nix store dump-path for every shape", async (t) => {
  if (!(await needNix(t))) return;
  const { root, paths } = await getShapes();
  for (const [name, storePath] of Object.entries(paths)) {
    const theirs = await digest(dumpPath(root, storePath) as AsyncIterable<Buffer>);
    const ours = await digest(narStream(root + storePath));
    assert.deepEqual(ours, theirs, name);
    assert.equal(await narLength(root + storePath), theirs.length, `narLength ${name}`);
  }
  // Nix's own hash of the same path agrees with what both produced.
  const [info] = await pathInfo(root, [paths.tree!]);
  assert.equal(info!.narSize, await narLength(root + paths.tree!));
});

test("executable means the owner's x bit only, as nix-store --dump of an unstored tree", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir();
  try {
    const d = join(dir, "modes");
    mkdirSync(d);
    const modes: Record<string, number> = { u: 0o744, g: 0o654, o: 0o645, none: 0o644, uonly: 0o500 };
    for (const [n, m] of Object.entries(modes)) {
      writeFileSync(join(d, n), n);
      chmodSync(join(d, n), m);
    }
    const theirs = await commandBytes("nix-store", ["--dump", d]);
    assert.ok((await collect(narStream(d))).equals(theirs));
    const listing = await narListing(d);
    assert.equal(listing.root.type, "directory");
    const exec = Object.fromEntries(
      (listing.root.type === "directory" ? listing.root.entries : []).map((e) => [
        e.name.toString(),
        e.node.type === "regular" && e.node.executable,
      ]),
    );
    assert.deepEqual(exec, { g: false, none: false, o: false, u: true, uonly: true });
  } finally {
    cleanup();
  }
});

test("chunk sizes around the gather buffer all give the same NAR", async (t) => {
  if (!(await needNix(t))) return;
  const { root, paths } = await getShapes();
  const theirs = await nixDump(root, paths.tree!);
  for (const chunkSize of [1000, 4096, 65535, 65536, 65537, 1 << 20, 4 << 20]) {
    const ours = await collect(narStream(root + paths.tree!, { chunkSize }));
    assert.ok(ours.equals(theirs), `chunkSize ${chunkSize}`);
  }
});

// ---------- ranges ----------

test("any byte range equals the same slice of Nix's dump", async (t) => {
  if (!(await needNix(t))) return;
  const { root, paths } = await getShapes();
  for (const name of ["tree", "single", "link", "deep"]) {
    const storePath = paths[name]!;
    const full = await nixDump(root, storePath);
    const listing = await narListing(root + storePath);
    // Interesting offsets: header edges, first/last content bytes, padding, the end.
    const points = new Set<number>([0, 1, 7, 8, 9, 15, 16, full.length - 9, full.length - 8, full.length - 1, full.length]);
    for (const r of regulars(listing.root)) {
      for (const d of [-9, -8, -1, 0, 1, 7, 8]) points.add(r.narOffset + d);
      const endC = r.narOffset + r.size;
      for (const d of [-1, 0, 1, 3, padding(r.size), padding(r.size) + 1]) points.add(endC + d);
      points.add(r.narOffset + (1 << 20)); // a chunk boundary inside big files
    }
    const pts = [...points].filter((p) => p >= 0 && p <= full.length).sort((x, y) => x - y);
    const rand = prng(name.length * 7919);
    const pairs: [number, number][] = [[0, full.length]];
    for (let i = 0; i < 150; i++) {
      const pick = () => (rand() < 0.7 ? pts[Math.floor(rand() * pts.length)]! : Math.floor(rand() * (full.length + 1)));
      const x = pick();
      const y = rand() < 0.3 ? Math.min(full.length, x + Math.floor(rand() * 20)) : pick();
      pairs.push([Math.min(x, y), Math.max(x, y)]);
    }
    for (const [start, end] of pairs) {
      const ours = await collect(narStream(root + storePath, { start, end }));
      assert.ok(ours.equals(full.subarray(start, end)), `${name} [${start}, ${end}) of ${full.length}`);
    }
    // Open-ended and beyond-the-end ranges.
    assert.ok((await collect(narStream(root + storePath, { start: 5 }))).equals(full.subarray(5)));
    assert.equal((await collect(narStream(root + storePath, { start: full.length + 10 }))).length, 0);
    assert.ok((await collect(narStream(root + storePath, { end: full.length + 100 }))).equals(full));
  }
});

test("bytes outside the range are never read from files", async () => {
  const { dir, cleanup } = tempDir();
  try {
    const d = join(dir, "r");
    mkdirSync(d);
    const big = randomBytes(8 << 20);
    writeFileSync(join(d, "a"), big);
    writeFileSync(join(d, "b"), "tail file\n");
    const full = await collect(narStream(d));
    const listing = await narListing(d);
    const [a, bb] = regulars(listing.root);
    assert.ok(a && bb && a.size === big.length);
    assert.ok(full.subarray(a.narOffset, a.narOffset + a.size).equals(big));

    const measure = async (start: number, end?: number) => {
      const before = rchar();
      const out = await collect(narStream(d, { start, end }));
      const read = rchar() - before;
      assert.ok(out.equals(full.subarray(start, end)), `[${start}, ${end})`);
      return read;
    };
    // Starting inside b's header: a (8 MiB) is skipped by its size alone.
    assert.ok((await measure(bb.narOffset - 20)) < 256 << 10);
    // Ending right where a's contents start: a is not opened.
    assert.ok((await measure(0, a.narOffset)) < 256 << 10);
    // 100 bytes from the middle of a: only those are read, not the MiB before them.
    assert.ok((await measure(a.narOffset + (4 << 20), a.narOffset + (4 << 20) + 100)) < 256 << 10);
    // Control: the whole of a is read when it is in the range (so the counter does measure).
    assert.ok((await measure(0)) >= big.length);
    // The walk itself stops at `end`: a fifo after the range is never even looked at.
    await run("mkfifo", [join(d, "z-fifo")]);
    assert.ok((await collect(narStream(d, { end: bb.narOffset }))).equals(full.subarray(0, bb.narOffset)));
    await assert.rejects(collect(narStream(d)), /not a regular file/);
  } finally {
    cleanup();
  }
});

// ---------- listing ----------

test("narListing serializes as Nix writes .ls: the bytes of Nix 2.8, the JSON of Nix 2.26", async (t) => {
  if (!(await needNix(t))) return;
  const { root, paths } = await getShapes();
  const { dir: cache, cleanup } = tempDir();
  try {
    const compared = [];
    for (const [name, storePath] of Object.entries(paths)) {
      const ours = serializeListing(await narListing(root + storePath));
      const theirs = await nixListing(root, storePath, cache);
      if (typeof theirs === "string") {
        // Nix 2.26 refuses some paths (see nixListing): only for the reason the path gives it.
        assert.equal(theirs, listingRefusal(ours), `${name}: Nix refused its listing`);
        t.diagnostic(`${name}: this Nix writes no listing (${theirs})`);
        continue;
      }
      assertSameListing(ours, theirs, name);
      compared.push(name);
    }
    assert.ok(compared.includes("tree-utf8") && compared.length >= 4, `compared with Nix: ${compared.join(", ")}`);
  } finally {
    cleanup();
  }
});

test("narOffset points at each file's contents in the stream", async (t) => {
  if (!(await needNix(t))) return;
  const { root, paths } = await getShapes();
  const full = await nixDump(root, paths.tree!);
  const listing = await narListing(root + paths.tree!);
  const big = listing.root.type === "directory" ? listing.root.entries.find((e) => e.name.equals(b("big"))) : undefined;
  assert.ok(big && big.node.type === "regular" && big.node.size === BIG_SIZE);
  const onDisk = readFileSync(join(root, paths.tree!, "big"));
  assert.ok(full.subarray(big.node.narOffset, big.node.narOffset + BIG_SIZE).equals(onDisk));
});

// ---------- refusing to produce a wrong NAR ----------

async function drainAfterFirst(src: AsyncGenerator<Buffer>, afterFirst: () => void): Promise<void> {
  let first = true;
  for await (const _ of src) {
    if (first) afterFirst();
    first = false;
  }
}

test("a file that grows, shrinks or disappears mid-stream makes the stream throw", async () => {
  const { dir, cleanup } = tempDir();
  try {
    const d = join(dir, "m");
    mkdirSync(d);
    const f = join(d, "f");
    const reset = () => writeFileSync(f, randomBytes(3 << 20));
    reset();
    writeFileSync(join(d, "g"), "later");
    const chunkSize = 1 << 20;

    await assert.rejects(drainAfterFirst(narStream(d, { chunkSize }), () => appendFileSync(f, "more")), /grew/);
    reset();
    await assert.rejects(drainAfterFirst(narStream(d, { chunkSize }), () => truncateSync(f, 1 << 20)), /shrank/);
    reset();
    await assert.rejects(drainAfterFirst(narStream(d, { chunkSize }), () => unlinkSync(join(d, "g"))), /ENOENT/);
    // A range that ends mid-file reads no EOF probe: a shrink is still caught by the short read.
    reset();
    const listing = await narListing(d);
    const fOffset = regulars(listing.root)[0]!.narOffset;
    await assert.rejects(
      drainAfterFirst(narStream(d, { chunkSize, end: fOffset + (2 << 20) }), () => truncateSync(f, 1536 << 10)),
      /shrank/,
    );
    // Unchanged, the same range streams fine (so the failures above are the changes' doing).
    reset();
    await drainAfterFirst(narStream(d, { chunkSize, end: fOffset + (2 << 20) }), () => {});
  } finally {
    cleanup();
  }
});

test("sockets, fifos and devices are refused", async () => {
  const { dir, cleanup } = tempDir();
  try {
    const d = join(dir, "f");
    mkdirSync(d);
    await run("mkfifo", [join(d, "pipe")]);
    await assert.rejects(collect(narStream(d)), /not a regular file, symlink or directory/);
    await assert.rejects(narListing(d), /not a regular file/);
    await assert.rejects(collect(narStream("/dev/null")), /not a regular file/);
    const d2 = join(dir, "s");
    mkdirSync(d2);
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(join(d2, "sock"), resolve));
    try {
      await assert.rejects(collect(narStream(d2)), /not a regular file/);
    } finally {
      server.close();
    }
  } finally {
    cleanup();
  }
});

test("bad ranges are rejected", async () => {
  await assert.rejects(collect(narStream("/", { start: 5, end: 4 })), RangeError);
  await assert.rejects(collect(narStream("/", { start: -1 })), RangeError);
  await assert.rejects(collect(narStream("/", { start: 0.5 })), RangeError);
  assert.equal((await collect(narStream("/", { start: 3, end: 3 }))).length, 0);
});
