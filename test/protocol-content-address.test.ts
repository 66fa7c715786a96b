// Paths whose name proves their contents (CA fixed:r:sha256), judged against what real Nix makes:
// `nix-store --add` of a file and a directory, and a fixed-output derivation's output.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { namesOwnContents } from "../protocol/content-address.js";
import type { PathInfo } from "../protocol/path-info.js";
import { plainAndBuiltPaths } from "./helpers/fixtures.js";
import { addToStore, buildInStore, needNix, pathInfo, tempDir, toPathInfo } from "./helpers/nix.js";

test("content-addressed paths from Nix name their contents; input-addressed ones and any altered field do not", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir();
  try {
    const { root, paths } = await plainAndBuiltPaths(dir); // an added file, and a build with references
    mkdirSync(join(dir, "fod"));
    writeFileSync(join(dir, "fod", "f"), "fixed output\n");
    const addedDir = await addToStore(root, join(dir, "fod"));
    const infos = new Map((await pathInfo(root, [...paths, addedDir])).map((j) => [j.path, toPathInfo(j)]));
    const [added, built, tree] = [paths[0]!, paths[1]!, addedDir].map((p) => infos.get(p)!) as [PathInfo, PathInfo, PathInfo];
    assert.match(added.ca ?? "", /^fixed:r:sha256:/);
    assert.ok(namesOwnContents(added), "nix-store --add of a file");
    assert.ok(namesOwnContents(tree), "nix-store --add of a directory");
    assert.equal(built.ca, undefined);
    assert.equal(namesOwnContents(built), false, "an input-addressed build proves nothing");

    // A fixed-output derivation (what fetchers are) with a recursive sha256, built in another store.
    const root2 = join(dir, "store2");
    writeFileSync(join(dir, "fod.nix"), `derivation { name = "fod"; system = builtins.currentSystem; builder = "/bin/sh";
      args = [ "-c" "/bin/mkdir $out; printf 'fixed output\\\\n' > $out/f" ];
      outputHashMode = "recursive"; outputHashAlgo = "sha256"; outputHash = "${tree.narHash}"; }`);
    const [fodOut] = await buildInStore(root2, join(dir, "fod.nix"));
    assert.equal(fodOut, tree.storePath, "the output is named after its NAR hash, like the added directory");
    const [fod] = (await pathInfo(root2, [fodOut!])).map(toPathInfo);
    assert.ok(namesOwnContents(fod!), `fixed-output derivation output (CA ${fod!.ca})`);

    // Every field the name binds, altered: no longer proven.
    const otherHash = "sha256:" + "1".repeat(52);
    const altered: Partial<PathInfo>[] = [
      { narHash: otherHash },
      { ca: `fixed:r:${otherHash}` },
      { ca: `fixed:r:sha256:${otherHash.slice(7)}`, narHash: otherHash }, // consistent with each other, not with the name
      { ca: added.ca!.replace("fixed:r:", "fixed:") }, // flat: the hash is the file's, not the NAR's
      { ca: added.ca!.replace("fixed:r:sha256:", "text:sha256:") },
      { ca: undefined },
      { ca: added.ca + " " },
      { ca: "fixed:r:sha256:" + "e".repeat(52) }, // not nix32
      { references: [built.storePath] },
      { references: [added.storePath] }, // a self-reference changes the name too
      { storePath: added.storePath.replace(/-[^/]*$/, "-renamed") },
      { storePath: built.storePath },
      { storePath: "not a store path" },
      { narHash: "junk" },
    ];
    for (const change of altered) assert.equal(namesOwnContents({ ...added, ...change }), false, JSON.stringify(change));
  } finally {
    cleanup();
  }
});
