// `fleetcache status` against two real agents meshed on loopback, after a real transfer from one
// to the other; and `doctor`'s per-peer check once a peer is gone.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { startAgentProcess, type AgentProcess, runCli as fleetcache, freePort } from "./helpers/agent.js";
import { makeShapesClosure } from "./helpers/fixtures.js";
import { eventually } from "./helpers/fleet.js";
import { addToStore, needNix, pathInfo, tempDir } from "./helpers/nix.js";




interface Peer {
  name: string;
  publicKey: string;
  connected: boolean;
  pathCount?: number;
  addresses: string[];
}

test("status shows this host, the peer, and the lookups after a transfer between two agents", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  let a: AgentProcess | undefined, b: AgentProcess | undefined;
  try {
    const keygen = async (name: string) => {
      const r = await fleetcache(["keygen", name, "--out", join(tmp.dir, `${name}.sec`)]);
      assert.equal(r.code, 0, r.stderr);
      return r.stdout.trim();
    };
    const [pubA, pubB] = [await keygen("status-a-1"), await keygen("status-b-1")];
    const rootA = join(tmp.dir, "a");
    const rootB = join(tmp.dir, "b");
    const closure = await makeShapesClosure(rootA, tmp.dir);
    writeFileSync(join(tmp.dir, "b.txt"), "b\n");
    await addToStore(rootB, join(tmp.dir, "b.txt"));
    const [portA, portB] = [await freePort(), await freePort()];
    const mesh = (root: string, key: string, port: number, other: number, otherKey: string) => [
      "--store-root", root, "--sign-key", join(tmp.dir, `${key}.sec`),
      "--p2p-listen", `127.0.0.1:${port}`, "--peer", `127.0.0.1:${other}`, "--trusted-key", otherKey,
    ];
    a = await startAgentProcess(mesh(rootA, "status-a-1", portA, portB, pubB));
    b = await startAgentProcess(mesh(rootB, "status-b-1", portB, portA, pubA));

    const statusB = async () => {
      const r = await fleetcache(["status", "--agent", b!.url, "--json"]);
      assert.equal(r.code, 0, r.stderr);
      return JSON.parse(r.stdout) as { self: Record<string, unknown>; peers: Peer[]; counters: Record<string, number> };
    };
    await eventually("B sees A connected and announcing its paths", async () => {
      const s = await statusB();
      return s.peers.some((p) => p.connected && (p.pathCount ?? 0) >= closure.paths.length);
    });

    // A real transfer: prefetch on B brings A's closure through B's agent.
    const dest = join(tmp.dir, "dest");
    const fetched = await fleetcache(["prefetch", "--agent", b.url, "--store", dest, closure.built], {
      NIX_CONFIG: `trusted-public-keys = ${pubA} ${pubB}\nrequire-sigs = true`,
    });
    assert.equal(fetched.code, 0, fetched.stderr);
    const narBytes = (await pathInfo(rootA, [closure.built], true)).reduce((n, i) => n + i.narSize, 0);

    const s = await statusB();
    assert.equal(s.self.name, "status-b-1");
    assert.equal(s.self.publicKey, pubB);
    assert.equal(s.peers.length, 1);
    const peer = s.peers[0]!;
    assert.equal(peer.name, "status-a-1");
    assert.equal(peer.publicKey, pubA);
    assert.equal(peer.connected, true);
    // Counters under their current or earlier names.
    const c = (...names: string[]) => names.map((n) => s.counters[n]).find((v) => typeof v === "number") ?? 0;
    assert.ok(c("narinfoHitsPeer", "peerHits") >= 2, JSON.stringify(s.counters));
    assert.ok(c("narBytesFromPeers", "bytesFromPeers") >= narBytes, JSON.stringify(s.counters));

    // The human summary says the same.
    const text = await fleetcache(["status", "--agent", b.url]);
    assert.equal(text.code, 0, text.stderr);
    assert.match(text.stdout, new RegExp(`^fleetcache agent ${b.url} \\(version `));
    assert.match(text.stdout, /\n {2}host {5}status-b-1\n/);
    assert.match(text.stdout, /\n {2}store {4}\d+ paths \(metadata from the Nix database\)\n/, "root: the database backend");
    assert.match(text.stdout, /\npeers: 1 known, 1 connected\n {2}status-a-1 {2}connected, (rtt [\d.]+ ms, )?\d+ paths/);
    assert.match(text.stdout, new RegExp(`narinfo: \\d+ from this host, ${c("narinfoHitsPeer", "peerHits")} from peers, \\d+ misses`));
    assert.match(text.stdout, /NAR: .* served, [\d.]+ kB from peers/);
    assert.match(text.stdout, /\n {6}summary received: [\d.]+ k?B in 1 snapshots, 0 B in deltas, 0 resumes\n/);
    assert.match(text.stdout, /\nadmission: 0 inbound sockets refused by the per-host limit\n/);
    assert.match(text.stdout, /\nrecent errors: /);
    if (typeof (peer as { bytesReceived?: unknown }).bytesReceived === "number") {
      // Agents that count traffic per peer: B received the closure's NARs from A.
      assert.ok((peer as unknown as { bytesReceived: number }).bytesReceived >= narBytes);
      assert.match(text.stdout, /status-a-1 {2}connected, .*received [\d.]+ kB/);
    }
    for (const l of text.stdout.trimEnd().split("\n")) t.diagnostic(l);

    // A goes away: B's status shows it disconnected, and doctor warns about it with the fix.
    await a.stop();
    await eventually("B sees A disconnected", async () => (await statusB()).peers.some((p) => !p.connected));
    const down = await fleetcache(["status", "--agent", b.url]);
    assert.match(down.stdout, /peers: 1 known, 0 connected\n {2}status-a-1 {2}DISCONNECTED/);
    const doc = await fleetcache(["doctor", "--agent", b.url, "--json"]);
    const peerCheck = (JSON.parse(doc.stdout) as { check: string; verdict: string; message: string; fix?: string }[]).find((x) => x.check === "peer status-a-1");
    assert.equal(peerCheck?.verdict, "warn");
    assert.match(peerCheck!.message, new RegExp(`127\\.0\\.0\\.1/tcp/${portA}`));
    assert.match(peerCheck!.fix!, /TCP 37516/);
  } finally {
    await a?.stop();
    await b?.stop();
    tmp.cleanup();
  }
});

test("status exits 1 with what to check when no agent answers, 2 on usage errors", async () => {
  const port = await freePort(); // nothing listens there now
  const r = await fleetcache(["status", "--agent", `http://127.0.0.1:${port}`]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /cannot reach the fleetcache agent at http:\/\/127\.0\.0\.1:\d+: connection refused/);
  assert.match(r.stderr, /Check that the agent runs/);
  const env = await fleetcache(["status"], { FLEETCACHE_AGENT: `http://127.0.0.1:${port}` });
  assert.equal(env.code, 1);
  assert.match(env.stderr, new RegExp(`127\\.0\\.0\\.1:${port}`));
  assert.equal((await fleetcache(["status", "--agent", "not a url"])).code, 2);
  assert.equal((await fleetcache(["status", "--bogus"])).code, 2);
  const help = await fleetcache(["status", "--help"]);
  assert.equal(help.code, 0);
  assert.match(help.stdout, /--json/);
});
