// Compressed NAR transfers end to end, judged by Nix: hosts in their own network namespaces, A
// holding real binaries. Nix on B (mesh_compression = zstd) and on C (off) copies them through
// its own agent with signatures required, and `nix store verify` checks what arrived; the status
// documents, `fleetcache status` and /metrics show the bytes on the wire against the NAR bytes.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, lstatSync, mkdirSync, readdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CLI } from "./helpers/agent.js";
import { createFleet, eventually, P2P_PORT, type Fleet, type FleetHost } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { addToStore, hasNix, pathInfo } from "./helpers/nix.js";

let fleet: Fleet | undefined;
let A: FleetHost, B: FleetHost, C: FleetHost;
let paths: string[];

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  fleet = await createFleet(["a", "b", "c"]);
  [A, B, C] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
  // Two paths of binaries from /usr/bin, and a small text one.
  paths = [];
  const files = readdirSync("/usr/bin").sort().map((n) => join("/usr/bin", n)).filter((f) => {
    const st = lstatSync(f, { throwIfNoEntry: false });
    return st?.isFile() && st.size >= 64 << 10 && st.size <= 2 << 20;
  });
  for (let i = 0; i < 2; i++) {
    const dir = join(A.dir, `bins-${i}`);
    mkdirSync(dir);
    let bytes = 0;
    for (const f of files.filter((_, j) => j % 2 === i)) {
      copyFileSync(f, join(dir, f.slice("/usr/bin/".length)));
      if ((bytes += lstatSync(f).size) > 6 << 20) break;
    }
    paths.push(await addToStore(A.storeRoot, dir));
  }
  writeFileSync(join(A.dir, "notes.txt"), "zstd over the mesh\n".repeat(1000));
  paths.push(await addToStore(A.storeRoot, join(A.dir, "notes.txt")));
  for (const h of [B, C]) {
    writeFileSync(join(h.dir, "own.txt"), `${h.name}\n`);
    await addToStore(h.storeRoot, join(h.dir, "own.txt"));
  }
  const peerA = `${A.net.ip}:${P2P_PORT}`;
  await A.start(); // auto: compresses whenever a requester asks
  await B.start(["--peer", peerA, "--mesh-compression", "zstd"]);
  await C.start(["--peer", peerA, "--mesh-compression", "off"]);
});

after(async () => {
  await fleet?.destroy();
});

function ready(t: { skip: (m: string) => void }): boolean {
  if (fleet) return true;
  t.skip("needs Nix and root for network namespaces");
  return false;
}

/** Nix on `host` copies the paths through its agent with require-sigs, then verifies them. */
async function copyAndVerify(host: FleetHost): Promise<void> {
  const keys = fleet!.trustedKeys.join(" ");
  await eventually(`${host.name} sees A's paths`, async () => {
    for (const p of paths) if ((await host.http(`/${p.slice(11, 43)}.narinfo`)).status !== 200) return false;
    return true;
  });
  const dest = join(host.dir, "dest");
  await host.nix(["copy", "--from", host.agent!.url, "--to", dest, "--option", "trusted-public-keys", keys, "--option", "require-sigs", "true", "--option", "narinfo-cache-negative-ttl", "0", ...paths]);
  await host.nix(["store", "verify", "--store", dest, "--trusted-public-keys", keys, "--sigs-needed", "1", ...paths]);
  const copied = await pathInfo(dest, paths);
  for (const o of await pathInfo(A.storeRoot, paths)) assert.equal(copied.find((c) => c.path === o.path)?.narHash, o.narHash, o.path);
}

/** A sample of the Prometheus text: `name{labels} value`. */
function sample(text: string, series: string): number {
  const line = text.split("\n").find((l) => l.startsWith(series + " "));
  assert.ok(line, `${series} in /metrics`);
  return Number(line.split(" ")[1]);
}

test("B, set to zstd, gets A's binaries compressed: Nix verifies every path, and fewer bytes crossed the wire", async (t) => {
  if (!ready(t)) return;
  await copyAndVerify(B);
  const c = (await B.status()).counters;
  assert.ok(c.compressedNarsFromPeers! >= paths.length, `compressed transfers: ${c.compressedNarsFromPeers}`);
  assert.ok(c.narWireBytesFromPeers! < 0.8 * c.narBytesFromPeers!, `${c.narWireBytesFromPeers} wire bytes for ${c.narBytesFromPeers} NAR bytes`);
  const peer = (await B.status()).peers.find((p) => p.name === "a-1") as unknown as { wireBytesReceived: number; bytesReceived: number; compression: string };
  assert.equal(peer.compression, "zstd");
  assert.equal(peer.wireBytesReceived, c.narWireBytesFromPeers);
  assert.equal(peer.bytesReceived, c.narBytesFromPeers);
  // The holder's side of the same transfers.
  const a = (await A.status()).counters;
  assert.equal(a.narWireBytesToPeers, c.narWireBytesFromPeers);
  assert.ok(a.compressedNarsToPeers! >= paths.length);
  // /metrics and `fleetcache status` say the same.
  const metrics = (await B.http("/metrics")).body;
  assert.equal(sample(metrics, 'fleetcache_peer_nar_wire_bytes_total{direction="received"}'), c.narWireBytesFromPeers);
  assert.equal(sample(metrics, 'fleetcache_peer_nar_bytes_total{direction="received"}'), c.narBytesFromPeers);
  assert.equal(sample(metrics, 'fleetcache_peer_nar_transfers_total{direction="received",encoding="zstd"}'), c.compressedNarsFromPeers);
  const aMetrics = (await A.http("/metrics")).body;
  assert.equal(sample(aMetrics, 'fleetcache_peer_nar_wire_bytes_total{direction="sent"}'), a.narWireBytesToPeers);
  const text = await B.exec(process.execPath, [CLI, "status", "--agent", B.agent!.url]);
  assert.match(text, /from peers \([\d.]+ (B|kB|MB|GB) on the wire\)/);
  assert.match(text, /compressed NAR transfers \(zstd\): \d+ from peers/);
});

test("C, set to off, gets the same paths uncompressed from the same holder: wire bytes equal NAR bytes", async (t) => {
  if (!ready(t)) return;
  await copyAndVerify(C);
  const c = (await C.status()).counters;
  assert.equal(c.compressedNarsFromPeers, 0);
  assert.ok(c.narBytesFromPeers! > 0);
  assert.equal(c.narWireBytesFromPeers, c.narBytesFromPeers);
});
