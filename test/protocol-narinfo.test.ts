// narinfo rendering/parsing and fingerprints, checked byte for byte against what Nix writes and
// by letting Nix substitute from a cache made of our narinfo files and signatures.
import { test } from "node:test";
import assert from "node:assert/strict";
import { cpSync, mkdirSync, readFileSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fingerprint, nixCacheInfo, parseNarinfo, renderNarinfo, type Narinfo } from "../protocol/narinfo.js";
import { formatPublicKey, formatSecretKey, generateKeyPair, sign } from "../protocol/keys.js";
import { parseHash, toBase16Hash, toSri } from "../protocol/hash.js";
import type { PathInfo } from "../protocol/path-info.js";
import { plainAndBuiltPaths } from "./helpers/fixtures.js";
import { needNix, nix, pathInfo, run, tempDir, toPathInfo } from "./helpers/nix.js";

const A = "/nix/store/p66ad5ml4vn3a1hxqf78j0446n0pxai6-dep-one";
const S = "/nix/store/sm9wwqr6q9ig0f4h7312mljx7m2vqmh5-with-refs";
const X = "/nix/store/xzzys4vy14niq4zl9fsbpa60fl1lf2mf-dep-two";
const DRV = "/nix/store/k5fn73b31h8vyddg4rah3lia1kfblwby-with-refs.drv";
const NAR_HASH = "sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw";
const SIG = "cache.example.org-1:" + "A".repeat(85) + "w==";

const sample = (): PathInfo => ({
  storePath: S,
  narHash: NAR_HASH,
  narSize: 272,
  references: [A, S, X],
  deriver: DRV,
  sigs: [SIG],
});

test("fingerprint: full paths, nix32 hash, sorted comma-joined references", () => {
  const expected = `1;${S};${NAR_HASH};272;${A},${S},${X}`;
  assert.equal(fingerprint(sample()), expected);
  assert.equal(fingerprint({ ...sample(), references: [X, S, A] }), expected, "sorted by us too");
  const bytes = parseHash(NAR_HASH);
  assert.equal(fingerprint({ ...sample(), narHash: toBase16Hash(bytes) }), expected, "base16 normalised");
  assert.equal(fingerprint({ ...sample(), narHash: toSri(bytes) }), expected, "SRI normalised");
  assert.equal(fingerprint({ ...sample(), references: [] }), `1;${S};${NAR_HASH};272;`);
  assert.throws(() => fingerprint({ ...sample(), narSize: 0 }), /size/);
  assert.throws(() => fingerprint({ ...sample(), references: ["/nix/store/../etc"] }), /invalid store path/);
  assert.throws(() => fingerprint({ ...sample(), storePath: "/tmp/x" }), /invalid store path/);
  assert.throws(() => fingerprint({ ...sample(), narHash: "sha256:nope" }), /invalid hash/);
});

test("renderNarinfo writes Nix's fields in Nix's order", () => {
  const url = "nar/04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw.nar";
  assert.equal(
    renderNarinfo({ ...sample(), references: [X, A, S], ca: "fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw" }, url),
    `StorePath: ${S}\nURL: ${url}\nCompression: none\nFileHash: ${NAR_HASH}\nFileSize: 272\nNarHash: ${NAR_HASH}\nNarSize: 272\n` +
      `References: p66ad5ml4vn3a1hxqf78j0446n0pxai6-dep-one sm9wwqr6q9ig0f4h7312mljx7m2vqmh5-with-refs xzzys4vy14niq4zl9fsbpa60fl1lf2mf-dep-two\n` +
      `Deriver: k5fn73b31h8vyddg4rah3lia1kfblwby-with-refs.drv\nSig: ${SIG}\n` +
      `CA: fixed:r:sha256:04zwf782yjwnh3q6hz5izfd6jyip8kgw6g6yj43fiqhbyhdd0dqw\n`,
  );
  const bare = renderNarinfo({ storePath: A, narHash: NAR_HASH, narSize: 120, references: [], sigs: ["junk", SIG + "x"] }, url);
  assert.ok(bare.endsWith("\nNarSize: 120\nReferences: \n"), "empty References line kept, malformed sigs dropped");
  assert.ok(!bare.includes("Deriver") && !bare.includes("CA:"));
  assert.throws(() => renderNarinfo(sample(), ""), /invalid NAR URL/);
  assert.throws(() => renderNarinfo({ ...sample(), narSize: 0 }, url), /invalid NAR size/);
  assert.throws(() => renderNarinfo(sample(), "nar/x y.nar"), /invalid NAR URL/);
  assert.throws(() => renderNarinfo({ ...sample(), storePath: "/nix/store/../etc" }, url), /invalid store path/);
});

test("parseNarinfo(renderNarinfo(x)) gives x back, plus URL and file fields", () => {
  const url = "nar/abc.nar";
  for (const info of [sample(), { ...sample(), references: [], ca: "text:sha256:094qif9n4cq4fdg459qzbhg1c6wywawwaaivx0k0x8xhbyx4vwic" }, (({ deriver: _d, ...r }) => r)(sample())]) {
    const text = renderNarinfo(info, url);
    const expected: Narinfo = { ...info, url, compression: "none", fileHash: NAR_HASH, fileSize: 272 };
    assert.deepEqual(parseNarinfo(text), expected);
    assert.deepEqual(parseNarinfo(new TextEncoder().encode(text)), expected);
  }
});

test("parseNarinfo: defaults, unknown keys, base16 hashes, old-style fields", () => {
  const hex = toBase16Hash(parseHash(NAR_HASH));
  const n = parseNarinfo(`StorePath: ${A}\nURL: nar/x.nar.xz\nNarHash: ${hex}\nNarSize: 120\nSystem: x86_64-linux\nDeriver: unknown-deriver\nSig: ${SIG}\nSig: ${SIG}`);
  assert.deepEqual(n, { storePath: A, url: "nar/x.nar.xz", compression: "bzip2", narHash: NAR_HASH, narSize: 120, references: [], sigs: [SIG] });
});

test("parseNarinfo rejects hostile and broken input", () => {
  const good = renderNarinfo(sample(), "nar/abc.nar");
  const swap = (re: RegExp, s: string) => {
    const out = good.replace(re, s);
    assert.notEqual(out, good, `pattern ${re} must apply`);
    return out;
  };
  const cases: [string | Uint8Array, RegExp][] = [
    [good + "X: " + "a".repeat(64 * 1024) + "\n", /larger than 65536 bytes/],
    [new Uint8Array(64 * 1024 + 1).fill(0x41), /larger than 65536 bytes/],
    [good + "X: y\n".repeat(1100), /more than 1024 lines/],
    [Buffer.concat([Buffer.from(good), Buffer.from([0x58, 0x3a, 0x20, 0xff, 0xfe, 0x0a])]), /not valid UTF-8/],
    [good + "X: \ud800\n", /not valid UTF-8/],
    [swap(/^StorePath: .*\n/m, ""), /missing StorePath/],
    [swap(/^NarHash: .*\n/m, ""), /missing NarHash/],
    [swap(/^NarSize: .*\n/m, ""), /missing NarSize/],
    [swap(/^URL: .*\n/m, ""), /missing URL/],
    [swap(/^URL: .*\n/m, "URL: \n"), /URL is empty/],
    [swap(/^URL: .*\n/m, "URL: a b\n"), /URL is empty or contains whitespace/],
    [swap(/^StorePath: .*\n/m, "StorePath: /nix/store/../etc\n"), /invalid store path/],
    [swap(/^StorePath: .*\n/m, `StorePath: ${S}/../../etc/passwd\n`), /invalid store path/],
    [swap(/^StorePath: .*\n/m, "StorePath: /etc/passwd\n"), /invalid store path/],
    [swap(/^StorePath: .*\n/m, `StorePath: ${S.toUpperCase()}\n`), /invalid store path/],
    [swap(/^NarHash: .*\n/m, "NarHash: sha256:0000\n"), /invalid hash/],
    [swap(/^NarHash: .*\n/m, `NarHash: md5:${"0".repeat(32)}\n`), /unsupported hash type/],
    [swap(/^NarHash: .*\n/m, `NarHash: sha256:e${NAR_HASH.slice(8)}\n`), /bad character/],
    [swap(/^FileHash: .*\n/m, "FileHash: sha256:zz\n"), /invalid hash/],
    [swap(/^NarSize: .*\n/m, "NarSize: 0\n"), /NarSize must be positive/],
    [swap(/^NarSize: .*\n/m, "NarSize: -1\n"), /invalid NarSize/],
    [swap(/^NarSize: .*\n/m, "NarSize: 1e3\n"), /invalid NarSize/],
    [swap(/^NarSize: .*\n/m, "NarSize: 0x10\n"), /invalid NarSize/],
    [swap(/^NarSize: .*\n/m, "NarSize: 0272\n"), /invalid NarSize/],
    [swap(/^NarSize: .*\n/m, "NarSize: 99999999999999999999\n"), /invalid NarSize/],
    [swap(/^NarSize: .*\n/m, "NarSize:  272\n"), /invalid NarSize/],
    [swap(/^FileSize: .*\n/m, "FileSize: 1.5\n"), /invalid FileSize/],
    [swap(/^References: .*\n/m, "References: ../../etc\n"), /invalid store path/],
    [swap(/^References: .*\n/m, `References: ${A}\n`), /invalid store path/],
    [swap(/^References: .*\n/m, "References: p66ad5ml4vn3a1hxqf78j0446n0pxai6-dep-one  xzzys4vy14niq4zl9fsbpa60fl1lf2mf-dep-two\n"), /invalid store path/],
    [swap(/^References: .*\n/m, "References: p66ad5ml4vn3a1hxqf78j0446n0pxai6-dep-one p66ad5ml4vn3a1hxqf78j0446n0pxai6-dep-one\n"), /duplicate reference/],
    [swap(/^Deriver: .*\n/m, "Deriver: ../x.drv\n"), /invalid store path/],
    [swap(/^Sig: .*\n/m, "Sig: nokeyname\n"), /invalid signature/],
    [swap(/^Sig: .*\n/m, "Sig: k:c2ln\n"), /invalid signature/],
    [good + "CA: sha256:abc\n", /invalid CA/],
    [swap(/^Compression: .*\n/m, "Compression: ../../x\n"), /invalid Compression/],
    [good + "NarSize: 1\n", /duplicate field "NarSize"/],
    [good + "StorePath: " + A + "\n", /duplicate field "StorePath"/],
    [good + "no colon here\n", /expected "Key: value"/],
    [good + ": empty key\n", /expected "Key: value"/],
    [good + "Key:nospace\n", /expected ": "/],
    [good.replace(/\n/g, "\r\n"), /control character/],
    [good + "X: a\0b\n", /control character/],
    ["", /missing StorePath/],
  ];
  for (const [input, re] of cases) {
    assert.throws(() => parseNarinfo(input), re, (typeof input === "string" ? input : "<bytes>").slice(0, 200));
  }
  assert.throws(() => parseNarinfo(good, { maxBytes: good.length - 1 }), /larger than/);
  assert.throws(() => parseNarinfo(good, { maxLines: 5 }), /more than 5 lines/);
  assert.deepEqual(parseNarinfo(good, { maxBytes: good.length }).storePath, S);
});

test("nixCacheInfo", () => {
  assert.equal(nixCacheInfo(30), "StoreDir: /nix/store\nWantMassQuery: 1\nPriority: 30\n");
  assert.throws(() => nixCacheInfo(-1), /priority/);
  assert.throws(() => nixCacheInfo(1.5), /priority/);
});

test("agrees with Nix: our narinfo equals the one `nix copy` writes, and Nix substitutes from ours", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir();
  try {
    // A store with a plain CA file and a built, input-addressed path with a deriver and references.
    const { root, paths } = await plainAndBuiltPaths(dir);
    const [plain, built] = paths as [string, string];
    // Give the built path a signature so Nix's narinfo carries a Sig line too.
    const sec = join(dir, "nix.sec");
    await run("nix-store", ["--generate-binary-cache-key", "nix-side-1", sec, join(dir, "nix.pub")]);
    await nix(["store", "sign", "--store", root, "--key-file", sec, built]);

    const nixCache = join(dir, "nix-cache");
    await nix(["copy", "--store", root, "--to", `file://${nixCache}?compression=none`, plain, built]);
    const infos = (await pathInfo(root, [plain, built], true)).map(toPathInfo);
    assert.equal(infos.length, 4, "plain, built and its two dependencies");
    const builtInfo = infos.find((i) => i.storePath === built)!;
    assert.ok(builtInfo.deriver && builtInfo.references.length === 3 && builtInfo.sigs.length === 1);
    assert.ok(infos.find((i) => i.storePath === plain)!.ca);

    const narUrl = (i: PathInfo) => `nar/${i.narHash.slice("sha256:".length)}.nar`;
    for (const info of infos) {
      const hashPart = info.storePath.slice(11, 43);
      const nixText = readFileSync(join(nixCache, `${hashPart}.narinfo`), "utf8");
      assert.equal(renderNarinfo(info, narUrl(info)), nixText, `narinfo of ${info.storePath}`);
      assert.deepEqual(parseNarinfo(nixText), { ...info, url: narUrl(info), compression: "none", fileHash: info.narHash, fileSize: info.narSize });
    }

    // Our cache: Nix's NAR files, our narinfo files signed only by our key, our nix-cache-info.
    const ours = generateKeyPair("fleetcache-test-1");
    const cache = join(dir, "our-cache");
    mkdirSync(cache);
    cpSync(join(nixCache, "nar"), join(cache, "nar"), { recursive: true });
    assert.equal(readdirSync(join(cache, "nar")).length, 4);
    writeFileSync(join(cache, "nix-cache-info"), nixCacheInfo(30));
    for (const info of infos) {
      const signed = { ...info, sigs: [sign(ours, fingerprint(info))] };
      writeFileSync(join(cache, `${info.storePath.slice(11, 43)}.narinfo`), renderNarinfo(signed, narUrl(info)));
    }
    writeFileSync(join(dir, "ours.sec"), formatSecretKey(ours), { mode: 0o600 });
    const copyFrom = (trusted: string, dest: string) =>
      nix(["copy", "--from", `file://${cache}`, "--to", join(dir, dest), "--option", "require-sigs", "true", "--option", "trusted-public-keys", trusted, built!]);
    // The built path is input-addressed: only a valid signature by a trusted key lets it in.
    await assert.rejects(copyFrom(formatPublicKey(generateKeyPair("fleetcache-test-1")), "dest-wrong-key"), /signature/);
    await copyFrom(formatPublicKey(ours), "dest");
    const copied = (await pathInfo(join(dir, "dest"), [built!], true)).map(toPathInfo);
    assert.deepEqual(
      copied.map((i) => [i.storePath, i.narHash, i.narSize, i.references]),
      infos.filter((i) => i.storePath !== plain).map((i) => [i.storePath, i.narHash, i.narSize, i.references]),
    );
    assert.ok(copied.find((i) => i.storePath === built)!.sigs.includes(sign(ours, fingerprint(builtInfo))));
  } finally {
    cleanup();
  }
});
