// Store path validation: Nix's rules, applied to hostile input.
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  isValidHashPart,
  isValidName,
  isValidStorePath,
  MAX_NAME_LENGTH,
  parseBaseName,
  parseStorePath,
  storePathBaseName,
  storePathFromBaseName,
  storePathHashPart,
} from "../protocol/store-path.js";
import { addToStore, needNix, tempDir } from "./helpers/nix.js";
import { writeFileSync } from "node:fs";
import { join } from "node:path";

const H = "xp0dpr9yz5h0fk5c5lpj7zzqjbdh3w8c";

test("hash parts: exactly 32 nix32 characters", () => {
  assert.ok(isValidHashPart(H));
  assert.ok(isValidHashPart("0".repeat(32)));
  for (const bad of [H.slice(1), H + "0", H.replace("x", "e"), H.replace("x", "o"), H.replace("x", "u"), H.replace("x", "t"), H.toUpperCase(), H.slice(1) + "/", H.slice(1) + "\n", ""]) {
    assert.equal(isValidHashPart(bad), false, JSON.stringify(bad));
  }
});

test("hash parts: every UTF-16 code unit is accepted exactly when it is a nix32 character", () => {
  const nix32 = new Set("0123456789abcdfghijklmnpqrsvwxyz");
  for (let c = 0; c < 0x10000; c++) {
    const ch = String.fromCharCode(c);
    for (const at of [0, 17, 31]) {
      const s = H.slice(0, at) + ch + H.slice(at + 1);
      assert.equal(isValidHashPart(s), nix32.has(ch), `U+${c.toString(16)} at ${at}`);
    }
  }
});

test("names: Nix's character set, at most 211 characters, no '.'/'..' component", () => {
  for (const ok of ["hello-2.12", "a", "x+y_z?=1", "-dash", "_", "A.b.c", ".vimrc", "...", ".a-b", "a".repeat(MAX_NAME_LENGTH)]) {
    assert.ok(isValidName(ok), ok);
  }
  for (const bad of ["", ".", "..", ".-x", "..-x", "a/b", "../x", "a b", "a\n", "a\0", "é", "a:b", "a%2f", "a".repeat(MAX_NAME_LENGTH + 1), "a~", "a*"]) {
    assert.equal(isValidName(bad), false, JSON.stringify(bad));
  }
  assert.equal(MAX_NAME_LENGTH, 211);
});

test("parseStorePath splits valid paths and rejects traversal and other directories", () => {
  assert.deepEqual(parseStorePath(`/nix/store/${H}-hello-2.12`), { hashPart: H, name: "hello-2.12" });
  assert.deepEqual(parseBaseName(`${H}-a-b-c`), { hashPart: H, name: "a-b-c" });
  const bad = [
    "/nix/store/../etc",
    `/nix/store/../${H}-x`,
    `/nix/store/${H}-x/../../etc/passwd`,
    `/nix/store/${H}-x/bin`,
    `/nix/store/${H}-..`,
    `/nix/store/${H}-.`,
    `/nix/store/${H}-..-x`,
    `/nix/store/${H}-`,
    `/nix/store/${H}`,
    `/nix/store/${H}x`,
    `/nix/store//${H}-x`,
    `/nix/store/${H.slice(1)}-x`,
    `/nix/store/${H}0-x`,
    `/nix/storex/${H}-x`,
    `/tmp/store/${H}-x`,
    `nix/store/${H}-x`,
    `/nix/store/${H}-x\n`,
    `/nix/store/${H}-x\0`,
    `/nix/store/${H}-${"a".repeat(212)}`,
    "",
  ];
  for (const p of bad) {
    assert.throws(() => parseStorePath(p), /invalid store path/, JSON.stringify(p));
    assert.equal(isValidStorePath(p), false);
  }
});

test("base name <-> full path helpers validate both ways", () => {
  const p = `/nix/store/${H}-hello`;
  assert.equal(storePathBaseName(p), `${H}-hello`);
  assert.equal(storePathFromBaseName(`${H}-hello`), p);
  assert.equal(storePathHashPart(p), H);
  assert.throws(() => storePathBaseName("/nix/store/../etc"), /invalid store path/);
  assert.throws(() => storePathFromBaseName("../etc"), /invalid store path/);
  assert.throws(() => storePathFromBaseName(`${H}-a/b`), /invalid store path name/);
});

test("names agree with Nix 2.8: what it adds we accept, what it refuses we refuse", async (t) => {
  if (!(await needNix(t))) return;
  const { dir, cleanup } = tempDir();
  try {
    const root = join(dir, "store");
    for (const name of ["x+y_z?=1", "-dash", ".vimrc", "A.b.c", "a".repeat(MAX_NAME_LENGTH)]) {
      const f = join(dir, name);
      writeFileSync(f, name);
      const p = await addToStore(root, f);
      assert.equal(parseStorePath(p).name, name);
      assert.equal(storePathFromBaseName(storePathBaseName(p)), p);
    }
    for (const name of ["a".repeat(MAX_NAME_LENGTH + 1), "a~b", "a b", "caf\u00e9"]) {
      assert.equal(isValidName(name), false, name);
      const f = join(dir, name);
      writeFileSync(f, name);
      await assert.rejects(addToStore(root, f), /illegal character|longer than 211/, name);
    }
  } finally {
    cleanup();
  }
});
