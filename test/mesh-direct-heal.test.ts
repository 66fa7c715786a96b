// LAN-direct NARs from a holder whose bytes are wrong (its store file changed on disk under it,
// its database still has the old NarHash; a lying holder looks the same from here). B's agent
// redirects Nix to that holder's direct port and never sees the bytes, so Nix's first attempt
// fails its hash check: B cannot know. What must not happen is that every later attempt fails the
// same way. Nix's next attempt (a new `nix copy`) asks B for that NAR again soon after B
// redirected it: B relays it instead, verified, asking the holder Nix was sent to first, so a
// holder with wrong bytes is caught and penalised and the NAR comes from an intact holder; with
// no intact holder the attempt fails cleanly (no wrong byte reaches Nix), and the next with a
// 404, not another round. Hosts in network namespaces on one bridge, real Nix as the judge.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { CLI } from "./helpers/agent.js";
import { announcedTo, corruptOnDisk, createFleet, P2P_PORT, type Fleet, type FleetHost } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { addToStore, dumpNar, hasNix, pathInfo } from "./helpers/nix.js";

let fleet: Fleet | undefined;
let A: FleetHost, B: FleetHost, C: FleetHost;
/** On A (corrupted) and C (intact). */
let shared: string;
/** On A only (corrupted). */
let lone: string;
/** On A only, intact. */
let other: string;

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  fleet = await createFleet(["a", "b", "c"]);
  [A, B, C] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
  const add = async (name: string, hosts: FleetHost[]) => {
    const file = join(A.dir, name);
    writeFileSync(file, randomBytes(2 << 20));
    const paths = await Promise.all(hosts.map((h) => addToStore(h.storeRoot, file)));
    assert.ok(paths.every((p) => p === paths[0]), "the same path in every holder's store");
    return paths[0]!;
  };
  shared = await add("shared.bin", [A, C]);
  lone = await add("lone.bin", [A]);
  other = await add("other.bin", [A]);
  await corruptOnDisk(A, shared, 100_000);
  await corruptOnDisk(A, lone, 100_000);
  writeFileSync(join(B.dir, "b.txt"), "b\n");
  await addToStore(B.storeRoot, join(B.dir, "b.txt"));
  await A.start(["--direct-lan"]);
});

after(async () => {
  await fleet?.destroy();
});

function ready(t: { skip: (m: string) => void }): boolean {
  if (fleet) return true;
  t.skip("needs Nix and root for network namespaces");
  return false;
}

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** A fresh agent on B (no memory of earlier redirects or penalties) dialling A only, with A's paths known. */
async function freshB(): Promise<void> {
  await B.start(["--direct-lan", "--peer", `${A.net.ip}:${P2P_PORT}`]);
  await announcedTo(B, A);
}

/** One Nix attempt on B: `nix copy` of `path` from B's agent into `dest`, signatures required; "ok" or Nix's error. */
async function copy(path: string, dest: string): Promise<string> {
  return B.nix([
    "copy", "--from", B.agent!.url, "--to", dest,
    "--option", "trusted-public-keys", fleet!.trustedKeys.join(" "), "--option", "require-sigs", "true",
    "--option", "narinfo-cache-negative-ttl", "0", path,
  ]).then(() => "ok", (e: Error) => e.message);
}

const counters = async (h: FleetHost) => (await h.status()).counters;
/** Nix's error, without the command line before it. */
const nixError = (out: string) => out.slice(out.indexOf("error:"), out.indexOf("error:") + 300);

/** Nix's first attempt at `path`: redirected to A (the only holder B knows), it refuses A's bytes. */
async function firstAttemptFailsInNix(t: { diagnostic: (m: string) => void }, path: string, dest: string): Promise<void> {
  const first = await copy(path, dest);
  t.diagnostic(`first attempt: ${nixError(first)}`);
  assert.match(first, /hash mismatch/i, "Nix fetched A's bytes itself and refused them");
  assert.equal((await counters(B)).directRedirects, 1, "redirected to A");
}
const badNarsOf = async (viewer: FleetHost, name: string) =>
  ((await viewer.status()).peers.find((p) => p.name === name) as { badNars?: number } | undefined)?.badNars ?? 0;

test("a holder with wrong bytes and no intact one: Nix's first attempt fails its hash check, the next fails cleanly (relayed, caught, penalised), and the one after is a 404, not another round", { timeout: 180_000 }, async (t) => {
  if (!ready(t)) return;
  await freshB();
  const dest = join(B.dir, "dest-lone");
  await firstAttemptFailsInNix(t, lone, dest);

  const second = await copy(lone, dest);
  t.diagnostic(`second attempt: ${nixError(second)}`);
  assert.notEqual(second, "ok");
  assert.doesNotMatch(second, /hash mismatch/i, "no wrong byte reached Nix");
  const b = await counters(B);
  assert.equal(b.directRedirects, 1, "not redirected again");
  assert.equal(b.directRepeatsRelayed, 1, "relayed as asked for again");
  assert.equal(b.verifyFailures, 1, "B fetched A's bytes and caught them");
  assert.equal(await badNarsOf(B, "a-1"), 1, "A is penalised");

  const third = await copy(lone, dest);
  assert.notEqual(third, "ok");
  assert.equal((await counters(B)).verifyFailures, 1, "A was not asked again for that NAR");
  assert.equal((await counters(B)).directRedirects, 1);
  t.diagnostic(`third attempt: ${nixError(third)}`);
  // Nix 2.8 lists an invalid path with "valid": false, 2.26 with null (the helper throws).
  const installed = await pathInfo(dest, [lone]).catch(() => []);
  assert.ok(installed.every((i) => i.narHash === undefined), `nothing installed: ${JSON.stringify(installed)}`);
});

test("a holder with wrong bytes and an intact one: Nix's first attempt fails its hash check, the next gets the NAR relayed from the intact holder, verified; the bad holder's other NARs are relayed, not redirected", { timeout: 180_000 }, async (t) => {
  if (!ready(t)) return;
  // C is not up yet, so that B sends Nix to A: the failure to heal from.
  await C.stop();
  await freshB();
  const dest = join(B.dir, "dest-shared");
  await firstAttemptFailsInNix(t, shared, dest);
  await C.start(["--direct-lan", "--peer", `${B.net.ip}:${P2P_PORT}`]);
  await announcedTo(B, C);

  const second = await copy(shared, dest);
  assert.equal(second, "ok", "Nix's second attempt succeeds");
  const keys = fleet!.trustedKeys.join(" ");
  await B.nix(["store", "verify", "--store", dest, "--trusted-public-keys", keys, "--sigs-needed", "1", shared]);
  assert.equal(sha(await dumpNar(dest, shared)), sha(await dumpNar(C.storeRoot, shared)), "byte-identical with C's");
  const b = await counters(B);
  assert.equal(b.directRedirects, 1, "not redirected again");
  assert.equal(b.directRepeatsRelayed, 1, "relayed as asked for again");
  assert.equal(b.verifyFailures, 1, "A, the holder Nix was sent to, was asked first, and caught");
  assert.ok(b.narBytesFromPeers! >= (await pathInfo(C.storeRoot, [shared]))[0]!.narSize, "relayed");
  assert.ok((await counters(C)).narBytesToPeers! > 0, "from C");
  assert.equal(await badNarsOf(B, "a-1"), 1, "A is penalised");
  const text = await B.exec(process.execPath, [CLI, "status", "--agent", B.agent!.url]);
  assert.match(text, /LAN-direct NARs: 1 redirected to peers \(0 relayed instead, 1 relayed as asked for again\)/);
  assert.match((await B.http("/metrics")).body, /^fleetcache_direct_repeats_relayed_total 1$/m);

  // A's other NARs, for the penalty's duration: relayed and verified, never redirected.
  assert.equal(await copy(other, join(B.dir, "dest-other")), "ok");
  assert.equal(sha(await dumpNar(join(B.dir, "dest-other"), other)), sha(await dumpNar(A.storeRoot, other)));
  assert.equal((await counters(B)).directRedirects, 1, "A's other NAR was not redirected to it");
});
