// NAR URLs: the forms we accept, and the non-canonical hashes we refuse.
import { test } from "node:test";
import assert from "node:assert/strict";
import { narUrl, parseNarUrl } from "../protocol/nar-url.js";

const h = "0".repeat(31) + "1";
const nar = "1" + "b".repeat(51);

test("every accepted form parses, and our own URL round-trips", () => {
  assert.deepEqual(parseNarUrl("/" + narUrl(h, "sha256:" + nar), ""), { hashPart: h, narHash: nar });
  assert.deepEqual(parseNarUrl(`/nar/${nar}.nar`, `hash=${h}`), { hashPart: h, narHash: nar });
  assert.deepEqual(parseNarUrl(`/nar/${nar}.nar`, ""), { narHash: nar });
  assert.deepEqual(parseNarUrl(`/nar/${h}.nar`, ""), { hashPart: h });
});

test("a NAR hash of 52 nix32 characters with bits set beyond 256 is not a NAR URL", () => {
  for (const first of ["2", "9", "z"]) {
    const bad = first + nar.slice(1);
    assert.equal(parseNarUrl(`/nar/${bad}.nar`, ""), undefined, bad);
    assert.equal(parseNarUrl(`/nar/${h}-${bad}.nar`, ""), undefined, bad);
    assert.equal(parseNarUrl(`/nar/${bad}.nar`, `hash=${h}`), undefined, bad);
  }
});
