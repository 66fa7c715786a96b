// The trust policy end to end: one compromised fleet host must not poison the others. Real agents
// in network namespaces, real Nix judging with require-sigs.
//
// An "upstream" binary cache (file://, signed with an upstream key, as cache.nixos.org is) holds
// input-addressed paths whose builders write random bytes, so building the same derivation
// elsewhere gives the same store path with other contents: that is C's forgery, signed only by
// C's fleet key (its agent signs all it serves). A got the genuine paths from upstream (the
// upstream signature is in its store). B asks its agent; B's Nix trusts the upstream key and
// every fleet key, as a fleet host's Nix must.
//
// B and C share a bridge; A sits behind a link proxy (30 ms each way), so B's agent asks C first
// (holders are asked fastest first): on first-answer-wins routing C's forgery won.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { chmodSync, writeFileSync } from "node:fs";
import { DatabaseSync } from "node:sqlite";
import { join } from "node:path";
import type { ChildProcess } from "node:child_process";
import { startProxy } from "../faults/fleet-tools.js";
import { CLI } from "./helpers/agent.js";
import { announcedTo, createFleet, eventually, P2P_PORT, type Fleet, type FleetHost } from "./helpers/fleet.js";
import { canUseNetns, createSites } from "./helpers/netns.js";
import { addToStore, dumpPath, hasNix, NIX_FLAGS, OFFLINE, pathInfo, run, tempDir } from "./helpers/nix.js";

let fleet: Fleet | undefined;
let proxy: ChildProcess | undefined;
let A: FleetHost, B: FleetHost, C: FleetHost;
let tmp: { dir: string; cleanup: () => void } | undefined;
let upstreamPub: string;
let upstreamUrl: string;
let aViaLink: string;
/** Upstream paths: on A (genuine, from upstream) and forged on C; forged on C only; A's own build. */
let shared: string, onlyC: string, fleetOwn: string;
/** Content-addressed (nix-store --add) paths on A and C, fleet-only: the same on both; forged on C with its CA field left out. */
let caShared: string, caForged: string;

const EXPR = `let
  mk = name: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" "/usr/bin/head -c 65536 /dev/urandom > $out" ]; };
in { shared = mk "trust-shared"; onlyC = mk "trust-only-c"; fleetOwn = mk "trust-fleet-own"; }
`;

async function build(root: string, attr: string, expr: string): Promise<string> {
  return (await run("nix-build", ["--store", root, ...OFFLINE, expr, "-A", attr, "--no-out-link"])).trim();
}

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  tmp = tempDir("fleetcache-trust-");
  const expr = join(tmp.dir, "trust.nix");
  writeFileSync(expr, EXPR);
  // The upstream cache: built elsewhere, signed with the upstream key.
  const upSec = join(tmp.dir, "upstream.sec");
  const upPubFile = join(tmp.dir, "upstream.pub");
  await run("nix-store", ["--generate-binary-cache-key", "upstream-1", upSec, upPubFile]);
  upstreamPub = (await run("cat", [upPubFile])).trim();
  const builder = join(tmp.dir, "builder");
  const up = [await build(builder, "shared", expr), await build(builder, "onlyC", expr)];
  await run("nix", [...NIX_FLAGS, "store", "sign", "--store", builder, "--key-file", upSec, ...up]);
  upstreamUrl = `file://${join(tmp.dir, "upstream")}`;
  await run("nix", [...NIX_FLAGS, "copy", "--from", builder, "--to", `${upstreamUrl}?compression=none`, ...up]);

  const sites = await createSites([2, 1]);
  fleet = await createFleet(["a", "b", "c"], { hosts: [sites.sites[1]![0]!, sites.sites[0]![0]!, sites.sites[0]![1]!], destroy: sites.destroy });
  [A, B, C] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
  aViaLink = `${sites.link.linkIps[0]}:${P2P_PORT}`;
  proxy = (await startProxy(sites.link, aViaLink, `${A.net.ip}:${P2P_PORT}`, { latencyMs: 30 })).child;

  // A: the genuine paths, from upstream (its store keeps the upstream signature), and a build of its own.
  await run("nix", [...NIX_FLAGS, "copy", "--from", upstreamUrl, "--to", A.storeRoot, "--option", "trusted-public-keys", upstreamPub, up[0]!]);
  fleetOwn = await build(A.storeRoot, "fleetOwn", expr);
  // C: the same store paths with other contents, its own builds.
  shared = await build(C.storeRoot, "shared", expr);
  onlyC = await build(C.storeRoot, "onlyC", expr);
  assert.deepEqual([shared, onlyC], up);
  const [genuine] = await pathInfo(A.storeRoot, [shared]);
  const [forged] = await pathInfo(C.storeRoot, [shared]);
  assert.notEqual(genuine!.narHash, forged!.narHash, "C's path is a forgery");
  assert.ok(genuine!.signatures?.some((s) => s.startsWith("upstream-1:")), "A's copy carries the upstream signature");

  // Content-addressed paths, fleet-only on A and C. C forges one: other bytes in its store, its
  // database given their NarHash and no CA field (which Nix would check the bytes against).
  for (const n of ["ca-shared", "ca-forged"]) writeFileSync(join(tmp.dir, n), `${n}: genuine\n`);
  caShared = await addToStore(A.storeRoot, join(tmp.dir, "ca-shared"));
  caForged = await addToStore(A.storeRoot, join(tmp.dir, "ca-forged"));
  assert.equal(await addToStore(C.storeRoot, join(tmp.dir, "ca-shared")), caShared);
  assert.equal(await addToStore(C.storeRoot, join(tmp.dir, "ca-forged")), caForged);
  const onDisk = join(C.storeRoot, caForged);
  chmodSync(onDisk, 0o644);
  writeFileSync(onDisk, "ca-forged: FORGED\n");
  chmodSync(onDisk, 0o444);
  const forgedNar = await narOf(C.storeRoot, caForged);
  const db = new DatabaseSync(join(C.storeRoot, "nix/var/nix/db/db.sqlite"));
  db.prepare("UPDATE ValidPaths SET hash = ?, narSize = ?, ca = NULL WHERE path = ?").run(`sha256:${forgedNar.sha}`, forgedNar.size, caForged);
  db.close();

  writeFileSync(join(B.dir, "b.txt"), "b\n");
  await addToStore(B.storeRoot, join(B.dir, "b.txt")); // an agent needs a store of its own
  await A.start();
  await B.start(["--peer", aViaLink], undefined, bEnv());
  await C.start(["--peer", `${B.net.ip}:${P2P_PORT}`]);
  await announcedTo(B, A);
  await announcedTo(B, C);
  await cAskedFirst();
});

after(async () => {
  proxy?.kill("SIGTERM");
  await fleet?.destroy();
  tmp?.cleanup();
});

function ready(t: { skip: (m: string) => void }): boolean {
  if (fleet) return true;
  t.skip("needs Nix and root for network namespaces");
  return false;
}

/**
 * B's Nix trusts the upstream key and the fleet's keys (NIX_CONFIG, which the agent reads too: its
 * upstream keys default to Nix's trusted keys that are not the fleet's). `extra` adds settings.
 */
function bEnv(extra: NodeJS.ProcessEnv = {}): NodeJS.ProcessEnv {
  return { NIX_CONFIG: `trusted-public-keys = ${upstreamPub} ${fleet!.trustedKeys.join(" ")}`, ...extra };
}

/** B's agent ranks C (same bridge) before A (behind the link): C is the first holder asked. */
async function cAskedFirst(): Promise<void> {
  await eventually("B measured both round trips, C's the shorter", async () => {
    const peers = (await B.status()).peers as { name: string; rttMs?: number }[];
    const a = peers.find((p) => p.name === "a-1")?.rttMs;
    const c = peers.find((p) => p.name === "c-1")?.rttMs;
    return a !== undefined && c !== undefined && c < a;
  }, 60_000);
}

/** `nix copy` from B's agent into a fresh store, signatures required; the error text, or undefined. */
async function copyOnB(dest: string, path: string, substituters?: string): Promise<string | undefined> {
  const trusted = ["--option", "trusted-public-keys", `${upstreamPub} ${fleet!.trustedKeys.join(" ")}`, "--option", "require-sigs", "true"];
  const common = [...trusted, "--option", "narinfo-cache-negative-ttl", "0"];
  const args = substituters
    ? ["nix-store", ["--store", dest, "--realise", path, "--option", "substituters", substituters, ...common]] as const
    : ["nix", [...NIX_FLAGS, "copy", "--from", B.agent!.url, "--to", dest, ...common, path]] as const;
  return B.exec(args[0], [...args[1]]).then(() => undefined, (e: Error) => e.message);
}

async function dumpSha(root: string, path: string): Promise<string> {
  return (await narOf(root, path)).sha;
}

/** The NAR Nix makes of `path` as it is on disk: sha256 (base16) and size. */
async function narOf(root: string, path: string): Promise<{ sha: string; size: number }> {
  const dump = dumpPath(root, path);
  const h = createHash("sha256");
  let size = 0;
  for await (const c of dump) {
    h.update(c as Buffer);
    size += (c as Buffer).length;
  }
  await dump.done;
  return { sha: h.digest("hex"), size };
}

/** The path in `dest` is A's genuine one: the same NAR, and it verifies against the upstream key alone. */
async function assertGenuine(dest: string, path: string): Promise<void> {
  assert.equal(await dumpSha(dest, path), await dumpSha(A.storeRoot, path), "B holds A's (upstream's) contents, not C's");
  await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--trusted-public-keys", upstreamPub, "--sigs-needed", "1", path]);
}

test("a path upstream signed, forged by a fleet host that is asked first: Nix on B gets the genuine contents", async (t) => {
  if (!ready(t)) return;
  const dest = join(tmp!.dir, "dest-shared");
  const err = await copyOnB(dest, shared);
  assert.equal(err, undefined, `nix copy failed: ${err}`);
  await assertGenuine(dest, shared);
  // C's conflicting answer is counted against it, in the status and the metrics.
  const s = await B.status();
  const c = s.peers.find((p) => p.name === "c-1") as { badNarinfos?: number } | undefined;
  assert.ok((c?.badNarinfos ?? 0) >= 1, `C is penalised for its forged narinfo: ${JSON.stringify(c)}`);
  assert.ok((s.counters.narinfoConflicts ?? 0) >= 1);
  assert.match((await B.http("/metrics")).body, /^fleetcache_narinfo_conflicts_total [1-9]/m);
  const text = await B.exec(process.execPath, [CLI, "status", "--agent", B.agent!.url]);
  assert.match(text, /\n {2}c-1 {2}connected, .*[1-9]\d* narinfos contradicting upstream/);
});

test("the fleet's own builds (no upstream signature) still flow", async (t) => {
  if (!ready(t)) return;
  const dest = join(tmp!.dir, "dest-own");
  const t0 = performance.now();
  const err = await copyOnB(dest, fleetOwn);
  t.diagnostic(`FIGURE nix copy of a fleet-only path from A (30 ms each way) through B: ${Math.round(performance.now() - t0)} ms`);
  assert.equal(err, undefined, `nix copy failed: ${err}`);
  assert.equal(await dumpSha(dest, fleetOwn), await dumpSha(A.storeRoot, fleetOwn));
});

test("a content-addressed path whose forger (asked first) left its CA field out: Nix on B gets the contents its name proves, from A", async (t) => {
  if (!ready(t)) return;
  assert.notEqual(await dumpSha(C.storeRoot, caForged), await dumpSha(A.storeRoot, caForged), "C's copy is a forgery");
  const dest = join(tmp!.dir, "dest-ca-forged");
  const err = await copyOnB(dest, caForged);
  assert.equal(err, undefined, `nix copy failed: ${err}`);
  assert.equal(await dumpSha(dest, caForged), await dumpSha(A.storeRoot, caForged), "B holds A's contents, not C's");
  const [info] = await pathInfo(dest, [caForged]);
  assert.match(info!.ca ?? "", /^fixed:r:sha256:/, "Nix installed it as content-addressed (and checked the bytes against that)");
});

test("a content-addressed path both hold settles on the first holder's answer: the holder behind the link is not asked", async (t) => {
  if (!ready(t)) return;
  const queries = async () => (await B.status()).counters.peerQueries ?? 0;
  const before = await queries();
  const r = await B.http(`/${caShared.slice(11, 43)}.narinfo`);
  assert.equal(r.status, 200, r.body);
  assert.match(r.body, /^CA: fixed:r:sha256:/m);
  assert.equal((await queries()) - before, 1, "C's answer, whose store path names its contents, was enough");
  const dest = join(tmp!.dir, "dest-ca-shared");
  assert.equal(await copyOnB(dest, caShared), undefined);
  assert.equal(await dumpSha(dest, caShared), await dumpSha(A.storeRoot, caShared));
});

test("without the upstream check, a path only the forger holds is taken from it (the documented limit)", async (t) => {
  if (!ready(t)) return;
  const dest = join(tmp!.dir, "dest-only-c-nocheck");
  const err = await copyOnB(dest, onlyC);
  assert.equal(err, undefined, `nix copy failed: ${err}`);
  assert.equal(await dumpSha(dest, onlyC), await dumpSha(C.storeRoot, onlyC));
});

test("with the upstream check: the forger's sole copy is refused (Nix fails cleanly or gets upstream's), fleet builds still flow", async (t) => {
  if (!ready(t)) return;
  await B.start(["--peer", aViaLink], undefined, bEnv({ FLEETCACHE_UPSTREAM_CACHES: upstreamUrl }));
  await announcedTo(B, A);
  await announcedTo(B, C);
  await cAskedFirst();
  // The agent alone: no answer at all rather than the forgery.
  const dest = join(tmp!.dir, "dest-only-c");
  const err = await copyOnB(dest, onlyC);
  assert.ok(err, "nix copy of the forged path fails");
  const present = await run("nix", [...NIX_FLAGS, "path-info", "--store", dest, onlyC]).then(() => true, () => false);
  assert.equal(present, false, "nothing was installed");
  // With upstream after the agent, as a host's Nix is configured: upstream's genuine contents.
  const dest2 = join(tmp!.dir, "dest-only-c-up");
  const err2 = await copyOnB(dest2, onlyC, `${B.agent!.url} ${upstreamUrl}`);
  assert.equal(err2, undefined, `nix-store --realise failed: ${err2}`);
  const [got] = await pathInfo(dest2, [onlyC]);
  const [forged] = await pathInfo(C.storeRoot, [onlyC]);
  assert.notEqual(got!.narHash, forged!.narHash);
  await run("nix", [...NIX_FLAGS, "store", "verify", "--store", dest2, "--trusted-public-keys", upstreamPub, "--sigs-needed", "1", onlyC]);
  // The forged shared path still loses, and A's own build still flows (upstream does not have it).
  const dest3 = join(tmp!.dir, "dest-check");
  assert.equal(await copyOnB(dest3, shared), undefined);
  await assertGenuine(dest3, shared);
  assert.equal(await copyOnB(dest3, fleetOwn), undefined);
  assert.equal(await dumpSha(dest3, fleetOwn), await dumpSha(A.storeRoot, fleetOwn));
});
