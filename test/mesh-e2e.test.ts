// The mesh end to end: hosts in their own network namespaces, each with its own store and agent.
// Nix on host C, which knows only host A, copies closures held by A and by B through C's
// localhost agent, with signatures required.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseHash } from "../protocol/hash.js";
import { parseNarinfo } from "../protocol/narinfo.js";
import { announcedTo, createFleet, eventually, P2P_PORT, type Fleet, type FleetHost } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { addToStore, hasNix, OFFLINE, pathInfo, run } from "./helpers/nix.js";

let fleet: Fleet | undefined;
let A: FleetHost, B: FleetHost, C: FleetHost, D: FleetHost;
/** The fleet's keys: A, B and C trust each other. D is an outsider on the same network. */
let fleetKeys: string[];
let closureA: string[], closureB: string[];

// Two closures sharing a dependency: A builds one, B the other.
const EXPR = `{ which }:
let
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
  shared = mk "mesh-shared" "/bin/mkdir $out; echo shared > $out/data";
  # 2 MiB made with the shell's own string doubling (the builder has no coreutils): a body past a
  # gather buffer of the bulk connection (1 MiB); the others are small.
  a = mk "mesh-only-a" "/bin/mkdir $out; echo \${shared} > $out/ref; echo a > $out/a; s=a; for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21; do s=$s$s; done; printf %s $s > $out/big";
  b = mk "mesh-only-b" "/bin/mkdir $out; echo \${shared} > $out/ref; echo b > $out/b";
in if which == "a" then a else b
`;

async function buildClosure(host: FleetHost, which: "a" | "b"): Promise<string[]> {
  const file = join(host.dir, "closure.nix");
  writeFileSync(file, EXPR);
  const out = (await run("nix-build", ["--store", host.storeRoot, ...OFFLINE, file, "--argstr", "which", which, "--no-out-link"])).trim();
  return (await pathInfo(host.storeRoot, [out], true)).map((i) => i.path);
}

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  fleet = await createFleet(["a", "b", "c", "d"]);
  [A, B, C, D] = fleet.hosts as [FleetHost, FleetHost, FleetHost, FleetHost];
  fleetKeys = [A.publicKey, B.publicKey, C.publicKey];
  closureA = await buildClosure(A, "a");
  closureB = await buildClosure(B, "b");
  // C's store must exist for its agent: one unrelated path.
  writeFileSync(join(C.dir, "c.txt"), "c\n");
  await addToStore(C.storeRoot, join(C.dir, "c.txt"));
  const peerA = `${A.net.ip}:${P2P_PORT}`;
  await A.start([], fleetKeys);
  await B.start(["--peer", peerA], fleetKeys);
  await C.start(["--peer", peerA], fleetKeys); // C knows only A
});

after(async () => {
  await fleet?.destroy();
});

function ready(t: { skip: (m: string) => void }): boolean {
  if (fleet) return true;
  t.skip("needs Nix and root for network namespaces");
  return false;
}

const hashOf = (p: string) => p.slice(11, 43);

test("peer exchange: C, told only of A, connects to B as well", async (t) => {
  if (!ready(t)) return;
  const status = await eventually("C connected to A and B", async () => {
    const s = await C.status();
    const connected = s.peers.filter((p) => p.connected).map((p) => p.name);
    return connected.includes("a-1") && connected.includes("b-1") ? s : undefined;
  });
  assert.equal(status.peers.find((p) => p.name === "b-1")?.connected, true);
});

test("Nix on C copies both closures through C's agent with require-sigs, and verifies them", async (t) => {
  if (!ready(t)) return;
  // Wait until C has both peers' summaries.
  await eventually("C sees every path of A and B", async () => {
    for (const p of [...closureA, ...closureB]) if ((await C.http(`/${hashOf(p)}.narinfo`)).status !== 200) return false;
    return true;
  });
  const dest = join(C.dir, "dest");
  await C.nix([
    "copy", "--from", C.agent!.url, "--to", dest,
    "--option", "trusted-public-keys", fleetKeys.join(" "), "--option", "require-sigs", "true",
    "--option", "narinfo-cache-negative-ttl", "0",
    ...closureA, ...closureB,
  ]);
  await C.nix(["store", "verify", "--store", dest, "--trusted-public-keys", fleetKeys.join(" "), "--sigs-needed", "1", ...closureA, ...closureB]);
  const copied = await pathInfo(dest, [...closureA, ...closureB]);
  const originals = [...(await pathInfo(A.storeRoot, closureA)), ...(await pathInfo(B.storeRoot, closureB))];
  for (const o of originals) assert.equal(copied.find((c) => c.path === o.path)?.narHash, o.narHash, o.path);
  const s = await C.status();
  assert.ok(s.counters.peerHits! > 0 && s.counters.bytesFromPeers! > 0, "the paths came from peers");
  // Every body, small or large, came on a bulk session's kept connection to A's or B's bulk port
  // (default on): no one-time bulk connection, no mesh stream, none fell back.
  const [cA, cB] = [(await A.status()).counters, (await B.status()).counters];
  const n = new Set([...closureA, ...closureB]).size; // mesh-shared is in both
  assert.equal(s.counters.bulkSessionNarsReceived, n, `sessions: C received ${s.counters.bulkSessionNarsReceived} of ${n}`);
  assert.equal(cA.bulkSessionNarsSent! + cB.bulkSessionNarsSent!, n, "A and B sent them on bulk sessions");
  assert.ok(s.counters.bulkSessionConnections! >= 2 && s.counters.bulkSessionConnections! < n, `${s.counters.bulkSessionConnections} connections for ${n} NARs`);
  assert.equal(s.counters.bulkNarsReceived, 0);
  assert.equal(s.counters.bulkFallbacks, 0);
});

test("a path no peer announces is a 404 from memory, with no peer asked", async (t) => {
  if (!ready(t)) return;
  const before = (await C.status()).counters;
  for (let i = 0; i < 20; i++) {
    const res = await C.http(`/${"1".repeat(31)}${"abcdfghijklmnpqrsvwxyz0"[i]}.narinfo`);
    assert.equal(res.status, 404);
  }
  const afterwards = (await C.status()).counters;
  assert.equal(afterwards.peerQueries, before.peerQueries, "no peer was asked");
  assert.equal(afterwards.misses! - before.misses!, 20);
});

test("a path GC'd on its only holder after being announced falls back cleanly to 404", async (t) => {
  if (!ready(t)) return;
  writeFileSync(join(A.dir, "ephemeral"), "soon gone\n");
  const path = await addToStore(A.storeRoot, join(A.dir, "ephemeral"));
  await eventually("C sees the new path", async () => (await C.http(`/${hashOf(path)}.narinfo`)).status === 200);
  const narUrl = "/" + parseNarinfo((await C.http(`/${hashOf(path)}.narinfo`)).body).url;
  await run("nix-store", ["--store", A.storeRoot, "--delete", path]);
  // Whether or not the removal has reached C yet, the NAR is never served truncated or wrong...
  const nar = await C.http(narUrl).catch((e: Error) => ({ status: 0, body: e.message }));
  assert.ok(nar.status === 404 || nar.status === 0, `NAR of a collected path: ${nar.status}`);
  // ...and the narinfo turns into a 404 once A's summary delta arrives.
  await eventually("C forgets the collected path", async () => (await C.http(`/${hashOf(path)}.narinfo`)).status === 404);
});

/** Removes a path's files from a host's store and leaves its database row: the moment inside a GC. */
async function vanish(host: FleetHost, path: string): Promise<void> {
  await run("chmod", ["-R", "u+w", join(host.storeRoot, path)]);
  await run("rm", ["-rf", join(host.storeRoot, path)]);
}

test("when the only holder has lost the path's files (a GC under way), C answers 404 and Nix takes the path as absent", async (t) => {
  if (!ready(t)) return;
  writeFileSync(join(A.dir, "lost-on-a"), "A will lose these bytes\n".repeat(100));
  const path = await addToStore(A.storeRoot, join(A.dir, "lost-on-a"));
  await eventually("C sees the new path", async () => (await C.http(`/${hashOf(path)}.narinfo`)).status === 200);
  const narUrl = "/" + parseNarinfo((await C.http(`/${hashOf(path)}.narinfo`)).body).url;
  await vanish(A, path); // A still announces it; asked for the NAR, it finds no files and says "not found"
  const nar = await C.http(narUrl);
  assert.equal(nar.status, 404, "every holder lost it: gone, not a failure to retry");
  // A 404 is "not in this cache" to Nix: no retries, the next substituter or a build.
  await assert.rejects(
    C.nix(["copy", "--from", C.agent!.url, "--to", join(C.dir, "dest-404"), "--option", "require-sigs", "false", "--option", "narinfo-cache-negative-ttl", "0", path]),
    /does not exist in binary cache/,
  );
});

test("when the only holder sends wrong bytes, C answers 502 before any header (no 200 and a dropped connection), and stops offering that holder", async (t) => {
  if (!ready(t)) return;
  const text = "A will rot these bytes\n".repeat(100);
  writeFileSync(join(A.dir, "rotten-on-a"), text);
  const path = await addToStore(A.storeRoot, join(A.dir, "rotten-on-a"));
  await eventually("C sees the new path", async () => (await C.http(`/${hashOf(path)}.narinfo`)).status === 200);
  const narUrl = "/" + parseNarinfo((await C.http(`/${hashOf(path)}.narinfo`)).body).url;
  // Bit rot: same size, other bytes; A's database keeps the old NarHash. The NAR is one chunk,
  // held back until its hash checks out, so C knows before sending anything.
  const file = join(A.storeRoot, path);
  await run("chmod", ["u+w", file]);
  writeFileSync(file, text.toUpperCase());
  const nar = await C.http(narUrl);
  assert.equal(nar.status, 502, "a holder failed: a 5xx before any header, which Nix retries");
  // A is now barred for this path (it sent wrong bytes): with no other holder, the path is absent
  // to Nix (404: next substituter or a build) rather than retried against the same bad bytes.
  assert.equal((await C.http(`/${hashOf(path)}.narinfo`)).status, 404, "the bad holder is not offered again");
  // The rotten path stays in A's store: deleting it here would let the next test's addition on A
  // leave A's path count unchanged, which announcedTo() cannot tell from a summary not yet sent.
});

test("a path collected on C before its first byte is sent from a peer that still holds it", async (t) => {
  if (!ready(t)) return;
  const file = join(A.dir, "on-a-and-c");
  writeFileSync(file, "both hold this\n".repeat(100));
  const path = await addToStore(A.storeRoot, file);
  assert.equal(await addToStore(C.storeRoot, file), path);
  await announcedTo(C, A);
  const narUrl = "/" + parseNarinfo((await C.http(`/${hashOf(path)}.narinfo`)).body).url;
  await vanish(C, path);
  const out = join(C.dir, "fallback.nar");
  const status = await C.exec("curl", ["-sS", "-o", out, "-w", "%{http_code}", `${C.agent!.url}${narUrl}`]);
  assert.equal(status.trim(), "200");
  const [info] = await pathInfo(A.storeRoot, [path]);
  const got = createHash("sha256").update(readFileSync(out)).digest();
  assert.ok(got.equals(Buffer.from(parseHash(info!.narHash))), "C served A's bytes");
});

test("a peer killed in the middle of a large NAR: the transfer completes from another holder", async (t) => {
  if (!ready(t)) return;
  const big = join(A.dir, "big.bin");
  const block = createHash("sha512").update("fleet").digest();
  const buf = Buffer.alloc(96 << 20);
  for (let i = 0; i < buf.length; i += block.length) block.copy(buf, i, 0, Math.min(block.length, buf.length - i));
  for (let i = 0; i < buf.length; i += 4096) buf.writeUInt32LE(i, i); // not compressible to nothing
  writeFileSync(big, buf);
  const path = await addToStore(A.storeRoot, big);
  // Only A has it when C looks it up, so C's narinfo (and first NAR source) is A.
  await eventually("C sees the big path", async () => (await C.http(`/${hashOf(path)}.narinfo`)).status === 200);
  const narinfo = parseNarinfo((await C.http(`/${hashOf(path)}.narinfo`)).body);
  // Now B holds it too (same content, same content-addressed path).
  assert.equal(await addToStore(B.storeRoot, big), path);
  await announcedTo(C, B);
  const out = join(C.dir, "big.nar");
  // A slow download through C, so that A can be killed while it is sending.
  const download = C.exec("curl", ["-sS", "--fail", "--limit-rate", "16M", "-o", out, `${C.agent!.url}/${narinfo.url}`]);
  // C holds a peer NAR until it is verified, so curl's rate limit does not slow A, which sends at
  // hundreds of MB/s: watch C's count closely and crash A (SIGKILL) as soon as it is sending. (With
  // a 200 ms poll and a graceful stop, A had sometimes sent all 96 MiB first: no failover.)
  const before = (await C.status()).counters.bytesFromPeers ?? 0;
  for (let i = 0; ((await C.status()).counters.bytesFromPeers ?? 0) - before < 4 << 20; i++) {
    assert.ok(i < 3000, "the download got under way");
    await new Promise((r) => setTimeout(r, 10));
  }
  await A.crash();
  await download.catch((e: Error) => {
    throw new Error(`${e.message}\nC's log:\n${C.agent!.logs().split("\n").filter((l) => /NAR|transfer|peer/.test(l)).slice(-15).join("\n")}`);
  });
  const got = createHash("sha256").update(readFileSync(out)).digest();
  assert.ok(got.equals(Buffer.from(parseHash(narinfo.narHash))), "the NAR is complete and correct");
  const s = await C.status();
  assert.ok(s.counters.failovers! >= 1, "another holder took over");
  await A.start([], fleetKeys); // for the tests after this one
});

test("an agent whose key is not trusted is refused, and its paths are never offered", async (t) => {
  if (!ready(t)) return;
  // D trusts the fleet and dials C, but nobody in the fleet trusts D's key.
  writeFileSync(join(D.dir, "secret-of-d"), "d only\n");
  const dPath = await addToStore(D.storeRoot, join(D.dir, "secret-of-d"));
  const refusedBefore = (await C.status()).counters.refusedConnections!;
  await D.start(["--peer", `${C.net.ip}:${P2P_PORT}`], [...fleetKeys, D.publicKey]);
  // The proof that D really dialed: C completed a handshake with it and refused its key.
  await eventually("C to refuse D's connection", async () => (await C.status()).counters.refusedConnections! > refusedBefore);
  const s = await C.status();
  assert.match((await C.http("/metrics")).body, /^fleetcache_peer_connections_refused_total [1-9]/m, "operators see the refusal");
  assert.ok(!s.peers.some((p) => p.name === "d-1"), "C does not list D as a peer");
  assert.equal((await C.http(`/${hashOf(dPath)}.narinfo`)).status, 404, "D's path is not offered");
  const d = await D.status();
  assert.ok(!d.peers.some((p) => p.connected), "D got no connection to anyone");
});
