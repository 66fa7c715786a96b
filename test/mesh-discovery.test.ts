// Peer discovery and connection management: static peers, peer exchange, Tailscale, redial with
// backoff, RTT ordering. In-process mesh nodes on 127.0.0.1, each with its own key.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { generateKeyPair, type SecretKey } from "../protocol/keys.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { PeerManager, type PeerInfo, type PeerManagerOptions } from "../agent/mesh/peer-manager.js";
import { StaticPeers } from "../agent/mesh/fleet-discovery.js";
import { fetchPeers, peersFor } from "../agent/mesh/peer-exchange.js";
import { parseTailscaleStatus, readTailscaleStatus, tailscaleDialTargets } from "../agent/mesh/tailscale.js";
import { tempDir } from "./helpers/nix.js";
import { startLinkProxy, type LinkProxy } from "../faults/link-proxy.js";
import * as redial from "../agent/mesh/redial.js";

const log = pino({ level: "silent" });
// Compiled to dist/test/; the fixture stays in the source tree.
const FIXTURE = fileURLToPath(new URL("../../test/fixtures/tailscale-status.json", import.meta.url));

const nodes: MeshNode[] = [];
const managers: PeerManager[] = [];
const proxies: LinkProxy[] = [];
after(async () => {
  await Promise.allSettled(managers.map((m) => m.stop()));
  await Promise.allSettled(nodes.map((n) => n.stop()));
  await Promise.allSettled(proxies.map((p) => p.close()));
});

/** The connection monitor's ping interval here: short, yet a ping may take 1.6 s on a busy machine. */
const PING_MS = 2000;

async function node(key: SecretKey, trusted: SecretKey[], listen = "/ip4/127.0.0.1/tcp/0", refused?: string[]): Promise<MeshNode> {
  // `refused` collects the peer IDs the node's gater refused after a handshake.
  const n = await createMeshNode({ key, trusted, listen, log, pingIntervalMs: PING_MS, onRefused: (peerId) => refused?.push(peerId) });
  nodes.push(n);
  return n;
}

async function manager(n: MeshNode, opts: Partial<PeerManagerOptions> = {}): Promise<PeerManager> {
  const m = new PeerManager(n, { staticPeers: [], log, dialIntervalMs: 100, ...opts });
  managers.push(m);
  await m.start();
  return m;
}

const portOf = (n: MeshNode) => Number(/\/tcp\/(\d+)/.exec(n.addresses()[0]!.toString())![1]);
/** "127.0.0.1:port": no peer ID, the dialer learns it from the handshake. */
const hostPort = (n: MeshNode) => `127.0.0.1:${portOf(n)}`;
const id = (n: MeshNode) => n.peerId.toString();
const info = (m: PeerManager, n: MeshNode): PeerInfo | undefined => m.peers().find((p) => p.peerId === id(n));
const sorted = (xs: string[]) => [...xs].sort();

/** Polls until `cond` holds; a generous bound so a slow machine only makes it slower, not red. */
async function waitFor(what: string, cond: () => boolean, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

test("peer exchange answer: connected fleet peers only, loopback addresses only for a local requester", () => {
  const peer = (peerId: string, connected: boolean) => ({ peerId, connected, addresses: ["/ip4/10.0.0.2/tcp/37516", "/ip4/127.0.0.1/tcp/37516"] });
  const source = { peers: () => [peer("self", true), peer("asker", true), peer("up", true), peer("down", false), peer("stranger", true)] };
  const trusted = new Map(["self", "asker", "up", "down"].map((p) => [p, true]));
  assert.deepEqual(peersFor(source, "self", "asker", trusted, { includeLoopback: false }), [{ peerId: "up", multiaddrs: ["/ip4/10.0.0.2/tcp/37516"] }]);
  assert.deepEqual(peersFor(source, "self", "asker", trusted, { includeLoopback: true }), [
    { peerId: "up", multiaddrs: ["/ip4/10.0.0.2/tcp/37516", "/ip4/127.0.0.1/tcp/37516"] },
  ]);
});

test("peer exchange: a node that knows one member comes to connect to all of them", async () => {
  const [ka, kb, kc] = ["host-a-1", "host-b-1", "host-c-1"].map(generateKeyPair) as [SecretKey, SecretKey, SecretKey];
  const fleet = [ka, kb, kc];
  const a = await node(ka, fleet);
  const b = await node(kb, fleet);
  const c = await node(kc, fleet);
  const ma = await manager(a);
  const mb = await manager(b, { staticPeers: [hostPort(a)] });
  await waitFor("B connected to A, and A knowing B's listen address", () => {
    const bOnA = info(ma, b);
    return mb.connectedPeers().includes(id(a)) && bOnA?.connected === true && bOnA.addresses.includes(`/ip4/127.0.0.1/tcp/${portOf(b)}`);
  });
  assert.deepEqual(info(ma, b)?.sources, ["inbound"]);
  assert.deepEqual(info(mb, a)?.sources, ["static"], "the host:port learned its peer ID");

  const mc = await manager(c, { staticPeers: [hostPort(a)] });
  await waitFor("C connected to B through peer exchange", () => mc.connectedPeers().includes(id(b)));
  assert.ok(info(mc, b)?.sources.includes("px"), `sources ${info(mc, b)?.sources}`);
  for (const [m, others] of [
    [ma, [b, c]],
    [mb, [a, c]],
    [mc, [a, b]],
  ] as const) {
    await waitFor("every manager connected to the other two", () => m.connectedPeers().length === 2);
    assert.deepEqual(sorted(m.connectedPeers()), sorted(others.map(id)));
    for (const o of others) assert.equal(info(m, o)?.connected, true);
  }

  // The responder lists its connected fleet peers, never the requester or itself.
  const fromA = await fetchPeers(c, a.peerId, { signal: AbortSignal.timeout(10_000) });
  assert.deepEqual(fromA.map((p) => p.peerId), [id(b)]);
  assert.ok(fromA[0]!.multiaddrs.includes(`/ip4/127.0.0.1/tcp/${portOf(b)}`), `${fromA[0]!.multiaddrs}`);
});

test("a peer that stops is marked disconnected, redialed with growing backoff, and reconnected when back", async () => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  let b = await node(kb, [ka]);
  const port = portOf(b);
  const base = 100;
  const ma = await manager(a, { staticPeers: [hostPort(b)], dialIntervalMs: base });
  const events: string[] = [];
  ma.on("connected", (p) => events.push(`+${p === id(b) ? "b" : p}`));
  ma.on("disconnected", (p) => events.push(`-${p === id(b) ? "b" : p}`));
  await waitFor("A connected to B", () => info(ma, b)?.connected === true);

  await b.stop();
  await waitFor("B marked disconnected", () => info(ma, b)?.connected === false);
  assert.deepEqual(ma.connectedPeers(), []);

  // Watch the redials fail: failures grow, and each next dial is further out than the last.
  const seen: { failures: number; nextDialAt: number; observedAt: number }[] = [];
  await waitFor("five failed redials", () => {
    const p = info(ma, b)!;
    if (p.failures > 0 && p.nextDialAt !== undefined && p.failures !== seen.at(-1)?.failures) {
      seen.push({ failures: p.failures, nextDialAt: p.nextDialAt, observedAt: Date.now() });
    }
    return p.failures >= 5;
  });
  assert.ok(seen.length >= 2, `observed ${JSON.stringify(seen)}`);
  for (let i = 0; i < seen.length; i++) {
    const k = seen[i]!.failures;
    // After failure k the next dial waits base * 2^(k-1) ± 25 %. The failure came no earlier
    // than the dial it ended (due at an earlier nextDialAt) and no later than we saw it: bounds
    // that hold however slow the machine is (polling may skip counts, never reorder them).
    assert.ok(seen[i]!.nextDialAt - seen[i]!.observedAt <= 1.25 * base * 2 ** (k - 1), `retry ${k} too far out`);
    if (i === 0) continue;
    assert.ok(k > seen[i - 1]!.failures);
    assert.ok(seen[i]!.nextDialAt - seen[i - 1]!.nextDialAt >= 0.75 * base * 2 ** (k - 1), `retry ${k} too soon`);
  }

  // Back on the same port with the same key: the next redial finds it.
  b = await node(kb, [ka], `/ip4/127.0.0.1/tcp/${port}`);
  await waitFor("A reconnected to B", () => info(ma, b)?.connected === true);
  assert.equal(info(ma, b)?.failures, 0);
  assert.equal(info(ma, b)?.nextDialAt, undefined);
  assert.deepEqual(ma.connectedPeers(), [id(b)]);
  assert.deepEqual(events, ["+b", "-b", "+b"]);
});

test("an untrusted node given as a static peer is never connected", async () => {
  const kt = generateKeyPair("trusting-1");
  const kf = generateKeyPair("friend-1");
  const ku = generateKeyPair("untrusted-1");
  const refused: string[] = [];
  const t = await node(kt, [kf], undefined, refused);
  const f = await node(kf, [kt]);
  const u = await node(ku, [kt]); // u would happily talk to t
  let connects = 0;
  // A fleet-wide peer list names this host too: recognised as ours, never dialed.
  const mt = await manager(t, { staticPeers: [hostPort(u), hostPort(f), hostPort(t)] });
  mt.on("connected", () => connects++);
  const candidateU = () => mt.addressCandidates().find((c) => c.addrs[0] === `/ip4/127.0.0.1/tcp/${portOf(u)}`);
  // Twice dialed, and each time refused by t's gater once the handshake showed u's key (not a
  // dial that failed for another reason).
  const refusedU = () => refused.filter((p) => p === id(u)).length;
  await waitFor("the friend connected and the untrusted node refused twice", () => info(mt, f)?.connected === true && refusedU() >= 2 && (candidateU()?.failures ?? 0) >= 2);
  assert.deepEqual([...new Set(refused)], [id(u)], "only u was refused");
  assert.deepEqual(mt.connectedPeers(), [id(f)]);
  assert.equal(info(mt, u), undefined, "never listed");
  assert.equal(candidateU()?.peerId, undefined);
  assert.equal(t.libp2p.getConnections(u.peerId).length, 0);
  assert.equal(connects, 1);
  const own = mt.addressCandidates().find((c) => c.addrs[0] === `/ip4/127.0.0.1/tcp/${portOf(t)}`);
  assert.deepEqual(own, { addrs: [`/ip4/127.0.0.1/tcp/${portOf(t)}`], source: "static", peerId: id(t), failures: 0 });
  // Its peer ID given outright is not dialed at all.
  const mt2 = await manager(await node(kt, [kf]), { staticPeers: [`/ip4/127.0.0.1/tcp/${portOf(u)}/p2p/${id(u)}`] });
  assert.deepEqual(mt2.peers(), []);
  assert.deepEqual(mt2.addressCandidates(), []);
});

test("Tailscale: the recorded status lists the online peers' addresses, strictly parsed", async () => {
  const json = JSON.parse(await readFile(FIXTURE, "utf8")) as unknown;
  const peers = parseTailscaleStatus(json);
  assert.deepEqual(
    peers.map((p) => [p.hostName, p.online]),
    [
      ["builder-1", true],
      ["alice-laptop", false],
      ["nas", true],
      ["ci-runner-old", false],
    ],
    "every peer, not Self",
  );
  assert.deepEqual(peers[0]!.ips, ["100.88.41.3", "fd7a:115c:a1e0::a901:2903"]);
  const targets = tailscaleDialTargets(peers, 37516);
  assert.deepEqual(
    targets.map((t) => [t.hostName, t.addrs.map(String)]),
    [
      ["builder-1", ["/ip4/100.88.41.3/tcp/37516", "/ip6/fd7a:115c:a1e0::a901:2903/tcp/37516"]],
      ["nas", ["/ip4/100.117.200.9/tcp/37516", "/ip6/fd7a:115c:a1e0::8c01:c809/tcp/37516"]],
    ],
    "offline peers are skipped",
  );
  // Through the command path too.
  assert.deepEqual(await readTailscaleStatus({ statusCommand: ["cat", FIXTURE] }), peers);

  // Junk is ignored, not trusted.
  for (const junk of [null, 42, "x", [], {}, { Peer: null }, { Peer: [] }, { BackendState: "Stopped", Peer: { k: { HostName: "a", TailscaleIPs: ["100.64.0.1"], Online: true } } }]) {
    assert.deepEqual(parseTailscaleStatus(junk), [], JSON.stringify(junk));
  }
  assert.deepEqual(
    parseTailscaleStatus({
      Peer: {
        a: null,
        b: "peer",
        c: { HostName: 7, TailscaleIPs: ["100.64.0.1"], Online: true },
        d: { HostName: "d", TailscaleIPs: "100.64.0.1", Online: true },
        e: { HostName: "e", TailscaleIPs: ["100.64.0.1"], Online: "yes" },
        f: { HostName: "f", TailscaleIPs: ["not-an-ip", 3, null, "100.64.0.9", "300.1.1.1"], Online: true },
        g: { HostName: "g", TailscaleIPs: ["/ip4/1.2.3.4"], Online: true },
      },
    }),
    [{ hostName: "f", ips: ["100.64.0.9"], online: true }],
  );
});

test("Tailscale: an online peer in the status is dialed at the mesh port; an offline one is not", async (t) => {
  const ka = generateKeyPair("host-a-1");
  const kx = generateKeyPair("host-x-1");
  const ky = generateKeyPair("host-y-1");
  const a = await node(ka, [kx, ky]);
  const x = await node(kx, [ka]);
  const port = portOf(x);
  // Same port on another loopback address: reachable, trusted, but offline in the status.
  const y = await node(ky, [ka], `/ip4/127.0.0.2/tcp/${port}`);
  const tmp = tempDir();
  t.after(tmp.cleanup);
  const statusFile = join(tmp.dir, "status.json");
  const peer = (host: string, ip: string, online: boolean) => ({ HostName: host, DNSName: `${host}.tail4c2d9.ts.net.`, TailscaleIPs: [ip], Online: online, OS: "linux" });
  await writeFile(
    statusFile,
    JSON.stringify({
      BackendState: "Running",
      Self: peer("host-a", "127.0.0.3", true),
      Peer: { "nodekey:01": peer("host-x", "127.0.0.1", true), "nodekey:02": peer("host-y", "127.0.0.2", false) },
    }),
  );
  const polls: number[] = [];
  const ma = await manager(a, { tailscale: { statusFile, port, intervalMs: 100 } });
  ma.on("tailscale", (targets) => polls.push(targets));
  await waitFor("A connected to X via Tailscale", () => info(ma, x)?.connected === true);
  assert.deepEqual(info(ma, x)?.sources, ["tailscale"]);
  assert.ok(info(ma, x)?.addresses.includes(`/ip4/127.0.0.1/tcp/${port}`));
  // Three more polls of the same status, each acted on (and each a chance to dial Y): the
  // offline peer and Self never become candidates, and Y is never dialed.
  const seen = polls.length;
  await waitFor("three more Tailscale polls", () => polls.length >= seen + 3);
  assert.ok(polls.slice(seen).every((n) => n === 1), `each poll found one online peer: ${polls}`);
  assert.deepEqual(ma.addressCandidates().map((c) => c.addrs), [[`/ip4/127.0.0.1/tcp/${port}`]]);
  assert.deepEqual(ma.connectedPeers(), [id(x)]);
  assert.equal(a.libp2p.getConnections(y.peerId).length, 0);
  assert.equal(y.libp2p.getConnections().length, 0, "Y never saw a connection");
});

test("connectedPeers() is ordered by measured RTT", async () => {
  const keys = ["host-a-1", "host-b-1", "host-c-1", "host-d-1"].map(generateKeyPair);
  const [a, ...others] = await Promise.all(keys.map((k) => node(k, keys)));
  const ma = await manager(a!, { staticPeers: others.map(hostPort) });
  await waitFor("all peers connected with an RTT", () => {
    const ps = ma.peers();
    return ps.length === 3 && ps.every((p) => p.connected && typeof p.rttMs === "number");
  });
  const rtt = new Map(ma.peers().map((p) => [p.peerId, p.rttMs!]));
  const order = ma.connectedPeers();
  assert.deepEqual(sorted(order), sorted(others.map(id)));
  const rtts = order.map((p) => rtt.get(p)!);
  assert.deepEqual(rtts, [...rtts].sort((x, y) => x - y), `order ${order} with RTTs ${rtts}`);
  for (const r of rtts) assert.ok(Number.isFinite(r) && r >= 0);
});

/** A link with `latencyMs` each way in front of the node; dial "127.0.0.1:<port>" to go through it. */
async function linkTo(n: MeshNode, latencyMs: number): Promise<LinkProxy> {
  const p = await startLinkProxy({ target: { host: "127.0.0.1", port: portOf(n) }, up: { latencyMs }, down: { latencyMs } });
  proxies.push(p);
  return p;
}

test("one pinger: over a link with 50 ms each way, pings every 2 s for 12 s close no connection", async () => {
  // Two pingers on one connection (libp2p's monitor and one of our own) collide on the ping
  // protocol's single outbound stream, and the failed ping closes a healthy connection. With
  // 50 ms each way a ping takes over 100 ms, so pingers that are not in step collide within 6 s.
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  const link = await linkTo(b, 50);
  const closed: string[] = [];
  for (const n of [a, b]) n.libp2p.addEventListener("connection:close", (e) => closed.push(`${e.detail.remotePeer}`));
  const ma = await manager(a, { staticPeers: [`127.0.0.1:${link.port}`] });
  await manager(b, {});
  await waitFor("A connected to B with an RTT measured", () => info(ma, b)?.rttMs !== undefined);
  const conn = a.libp2p.getConnections(b.peerId)[0]!;
  await sleep(6 * PING_MS);
  assert.deepEqual(closed, [], "no connection closed");
  assert.equal(conn.status, "open");
  assert.deepEqual(a.libp2p.getConnections(b.peerId).map((c) => c.id), [conn.id], "still the first connection");
  // Measured through the link: at least the latency of both directions.
  assert.ok(info(ma, b)!.rttMs! >= 100, `RTT ${info(ma, b)!.rttMs} ms`);
  assert.equal(link.stats().connections, 1);
});

test("a peer that goes silent without a FIN is dropped, and reconnected once it answers again", async () => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  const link = await linkTo(b, 5);
  const ma = await manager(a, { staticPeers: [`127.0.0.1:${link.port}`] });
  await waitFor("A connected to B", () => info(ma, b)?.connected === true);
  // Nothing closes: the link stops carrying anything, as when a host loses power.
  link.freeze();
  await waitFor("B marked disconnected", () => info(ma, b)?.connected === false);
  assert.equal(a.libp2p.getConnections(b.peerId).length, 0);
  link.thaw();
  await waitFor("A reconnected to B", () => info(ma, b)?.connected === true);
});

test("redial schedule: after any number of failed dials, a healed link is redialed in time to resync within 25 s", () => {
  // The worst case after a partition heals: a dial into the dead link started just before the
  // heal fails only at its deadline, then the longest redial delay (jitter at its top) passes.
  // What follows (handshake, summary resume) needs a few seconds more; the goal is 25 s in all.
  const { DIAL_TIMEOUT_MS, redialDelay } = redial;
  const HEAL_GOAL_MS = 25_000;
  const AFTER_CONNECT_MS = 3_000;
  let worst = 0;
  for (let failures = 1; failures <= 100; failures++) worst = Math.max(worst, redialDelay(failures, 1000, undefined, () => 0.999_999));
  assert.ok(DIAL_TIMEOUT_MS + worst + AFTER_CONNECT_MS <= HEAL_GOAL_MS, `a heal may wait ${DIAL_TIMEOUT_MS} + ${worst} ms before the redial`);
  // Still a backoff: the first redials come quickly, later ones further apart, never below the base.
  const mid = (f: number) => redialDelay(f, 1000, undefined, () => 0.5);
  assert.deepEqual([1, 2, 3, 4].map(mid), [1000, 2000, 4000, 8000]);
});

test("static peers as a libp2p discovery module: libp2p announces them (peer:discovery), with and without a peer ID, labelled static", async () => {
  const [ka, kb, kc] = ["host-a-1", "host-b-1", "host-c-1"].map(generateKeyPair) as [SecretKey, SecretKey, SecretKey];
  const b = await node(kb, [ka]);
  const c = await node(kc, [ka]);
  // B with its peer ID, C as "host:port" (its ID is learned from a blind dial).
  const specs = [`/ip4/127.0.0.1/tcp/${portOf(b)}/p2p/${id(b)}`, hostPort(c)];
  const statics = new StaticPeers(specs, log);
  const a = await createMeshNode({ key: ka, trusted: [kb, kc], listen: "/ip4/127.0.0.1/tcp/0", log, pingIntervalMs: PING_MS, discovery: [statics] });
  nodes.push(a);
  const discovered: string[] = [];
  a.libp2p.addEventListener("peer:discovery", (e) => discovered.push(e.detail.id.toString()));
  const ma = await manager(a, { staticPeers: specs, discovery: [statics] });
  await waitFor("A connected to B and C", () => info(ma, b)?.connected === true && info(ma, c)?.connected === true);
  await waitFor("libp2p announced both", () => discovered.includes(id(b)) && discovered.includes(id(c)));
  assert.deepEqual(info(ma, b)?.sources, ["static"]);
  assert.deepEqual(info(ma, c)?.sources, ["static"], "a static peer is not taken for an mDNS find");
  const stored = await a.libp2p.peerStore.get(c.peerId);
  assert.ok(stored.addresses.some((x) => x.multiaddr.toString() === `/ip4/127.0.0.1/tcp/${portOf(c)}`), "libp2p's peer store has the static address");
  assert.deepEqual(ma.addressCandidates().map((x) => x.peerId), [id(c)], "the host:port resolved to C");
});

test("a peer that just dropped is redialed at most 2 s apart (an agent restarting), whatever the backoff has reached", async () => {
  const ka = generateKeyPair("host-a-1");
  const kb = generateKeyPair("host-b-1");
  const a = await node(ka, [kb]);
  const b = await node(kb, [ka]);
  const ma = await manager(a, { staticPeers: [hostPort(b)], dialIntervalMs: 100 });
  await waitFor("A connected to B", () => info(ma, b)?.connected === true);
  await b.stop();
  // Doubling from 100 ms, failure 7 would wait 6.4 s ± 25 %; within 30 s of the drop it waits at most 2 s ± 25 %.
  let late: { failures: number; wait: number } | undefined;
  await waitFor("seven failed redials", () => {
    const p = info(ma, b)!;
    if (p.failures >= 7 && p.nextDialAt !== undefined && late === undefined) late = { failures: p.failures, wait: p.nextDialAt - Date.now() };
    return late !== undefined;
  });
  assert.ok(late!.wait <= 1.25 * redial.MAX_QUICK_REDIAL_MS, `redial after failure ${late!.failures} due in ${late!.wait} ms`);
});
