// A NAR over 4 GiB: sizes and offsets past 2^32 must be exact, and streaming it must not make
// the process grow with the file. Separate file so it can be run alone; it takes ~40 s here.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { open, readFile, rm } from "node:fs/promises";
import { join } from "node:path";
import { startAgentProcess } from "./helpers/agent.js";
import { addToStore, dumpPath, hasNix, needNix, nix, pathInfo, run, tempDir } from "./helpers/nix.js";
import { narLength, narListing, narStream } from "../agent/store/nar-dump.js";

// Over 2^32 and not a multiple of 8, so the size field's high word and the padding both matter.
const SIZE = 2 ** 32 + (200 << 20) + 3;
const CONTENTS_AT = 96; // a single-file NAR's contents start after magic + "(" type regular contents <u64>
const RSS_LIMIT = 100 << 20;

/** Writes SIZE bytes: a random block whose length divides neither 2^k chunk sizes nor 8. */
async function writeBigFile(path: string): Promise<void> {
  const block = randomBytes((1 << 20) + 13);
  const fh = await open(path, "w");
  try {
    for (let at = 0; at < SIZE; ) {
      const n = Math.min(block.length, SIZE - at);
      await fh.write(block, 0, n, at);
      at += n;
    }
  } finally {
    await fh.close();
  }
}

async function rchar(): Promise<number> {
  return Number(/rchar: (\d+)/.exec(await readFile("/proc/self/io", "utf8"))![1]);
}

async function collect(src: AsyncIterable<Buffer>): Promise<Buffer> {
  const parts: Buffer[] = [];
  for await (const c of src) parts.push(c);
  return Buffer.concat(parts);
}

// One >4 GiB store path shared by both tests (making it is most of the time).
let fixture: { dir: string; cleanup: () => void; root: string; storePath: string; madeIn: number } | undefined;

before(async () => {
  if (!(await hasNix())) return;
  const t0 = Date.now();
  const { dir, cleanup } = tempDir("fleetcache-nar-large-");
  const src = join(dir, "big.bin");
  await writeBigFile(src);
  const root = join(dir, "store");
  const storePath = await addToStore(root, src);
  await rm(src);
  fixture = { dir, cleanup, root, storePath, madeIn: Date.now() - t0 };
});

after(() => fixture?.cleanup());

test("a >4 GiB file streams byte-identical to Nix, in bounded memory", { timeout: 15 * 60_000 }, async (t) => {
  if (!(await needNix(t)) || !fixture) return;
  const { root, storePath } = fixture;
  {
    const fsPath = root + storePath;
    const t1 = Date.now();

    // Ours, watching resident memory after every chunk.
    const baseline = process.memoryUsage.rss();
    let peak = baseline;
    const ours = createHash("sha256");
    let ourLen = 0;
    for await (const chunk of narStream(fsPath)) {
      ours.update(chunk);
      ourLen += chunk.length;
      peak = Math.max(peak, process.memoryUsage.rss());
    }
    const ourHash = ours.digest("hex");
    const t2 = Date.now();

    // Nix's, keeping a few slices to check ranges against: across the 2^32 NAR offset, across
    // 2^32 within the file's contents, and the tail (last content bytes, padding, closing token).
    const total = CONTENTS_AT + SIZE + 5 + 16;
    const slices = [
      [2 ** 32 - 50, 2 ** 32 + 50],
      [CONTENTS_AT + 2 ** 32 - 7, CONTENTS_AT + 2 ** 32 + 9],
      [total - 200, total],
      [90, 100],
    ].map(([start, end]) => ({ start: start!, end: end!, bytes: Buffer.alloc(end! - start!) }));
    const theirs = createHash("sha256");
    let pos = 0;
    const dump = dumpPath(root, storePath);
    for await (const chunk of dump as AsyncIterable<Buffer>) {
      theirs.update(chunk);
      for (const s of slices) {
        const lo = Math.max(s.start, pos);
        const hi = Math.min(s.end, pos + chunk.length);
        if (lo < hi) chunk.copy(s.bytes, lo - s.start, lo - pos, hi - pos);
      }
      pos += chunk.length;
    }
    await dump.done;
    const t3 = Date.now();

    assert.equal(pos, total);
    assert.equal(ourLen, pos);
    assert.equal(ourHash, theirs.digest("hex"));
    assert.equal(await narLength(fsPath), total);
    const [info] = await pathInfo(root, [storePath]);
    assert.equal(info?.narSize, total);
    assert.deepEqual(await narListing(fsPath), {
      version: 1,
      root: { type: "regular", size: SIZE, executable: false, narOffset: CONTENTS_AT },
    });

    // Ranges far into the file read only what they return.
    for (const s of slices) {
      const before = await rchar();
      const got = await collect(narStream(fsPath, { start: s.start, end: s.end }));
      assert.ok(got.equals(s.bytes), `range [${s.start}, ${s.end})`);
      assert.ok((await rchar()) - before < 1 << 20, `range [${s.start}, ${s.end}) read too much`);
    }

    const growth = peak - baseline;
    t.diagnostic(
      `write ${(fixture.madeIn / 1000).toFixed(1)} s (incl. nix-store --add), ours ${((t2 - t1) / 1000).toFixed(1)} s ` +
        `(${(total / 1e6 / ((t2 - t1) / 1000)).toFixed(0)} MB/s incl. sha256), nix dump-path ${((t3 - t2) / 1000).toFixed(1)} s, ` +
        `RSS growth ${(growth / 2 ** 20).toFixed(1)} MiB`,
    );
    assert.ok(growth < RSS_LIMIT, `RSS grew by ${(growth / 2 ** 20).toFixed(1)} MiB while streaming`);
  }
});

test("nix copy of the >4 GiB path through the agent, with the agent's memory flat", { timeout: 15 * 60_000 }, async (t) => {
  if (!(await needNix(t)) || !fixture) return;
  const { dir, root, storePath } = fixture;
  await run("nix-store", ["--generate-binary-cache-key", "large-1", join(dir, "sec"), join(dir, "pub")]);
  const agent = await startAgentProcess(["--store-root", root, "--sign-key", join(dir, "sec"), "--state-dir", join(dir, "state")]);
  const dest = join(dir, "dest");
  try {
    const rssBefore = vmRss(agent.child.pid!);
    let rssPeak = rssBefore;
    const sampler = setInterval(() => (rssPeak = Math.max(rssPeak, vmRss(agent.child.pid!))), 50);
    const t0 = Date.now();
    try {
      await nix([
        "copy", "--from", agent.url, "--to", dest, "--option", "require-sigs", "true",
        "--option", "trusted-public-keys", readFileSync(join(dir, "pub"), "utf8"), storePath,
      ]);
    } finally {
      clearInterval(sampler);
    }
    const seconds = (Date.now() - t0) / 1000;
    // Nix hashed what it received against the signed NarHash; verify re-reads what it wrote.
    await nix(["store", "verify", "--store", dest, storePath]);
    const [copied] = await pathInfo(dest, [storePath]);
    const [orig] = await pathInfo(root, [storePath]);
    assert.equal(copied?.narHash, orig?.narHash);
    const growth = rssPeak - rssBefore;
    t.diagnostic(`nix copy ${seconds.toFixed(1)} s (${(orig!.narSize / 1e6 / seconds).toFixed(0)} MB/s); agent RSS ${(rssBefore / 2 ** 20).toFixed(0)} -> peak ${(rssPeak / 2 ** 20).toFixed(0)} MiB`);
    assert.ok(growth < RSS_LIMIT, `agent RSS grew by ${(growth / 2 ** 20).toFixed(1)} MiB serving a ${orig!.narSize}-byte NAR`);
  } finally {
    await agent.stop();
    await rm(dest, { recursive: true, force: true });
  }
});

/** Resident memory of another process, from /proc. */
function vmRss(pid: number): number {
  const kb = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))?.[1];
  return Number(kb ?? 0) * 1024;
}
