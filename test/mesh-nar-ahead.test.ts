// NAR streams opened ahead (agent/mesh/nar-streams-ahead.ts): a NAR asked of a holder on the
// mesh opens one more stream to it in the background, and the next NAR for that holder takes it
// instead of paying multistream-select's round trip. Here: the next NAR does take it and its bytes
// are right; a stream ahead nobody takes is closed; one the holder gave up on is not used; and,
// across a link with latency, Nix copies a closure through B with NARs on streams opened ahead.
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { pino } from "pino";
import { generateKeyPair } from "../protocol/keys.js";
import { storePathHashPart } from "../protocol/store-path.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { NarVerifier, openNar, serveNar } from "../agent/mesh/nar-service.js";
import { NarStreamsAhead, narStreamsAhead } from "../agent/mesh/nar-streams-ahead.js";
import { PROTOCOL_NAR } from "../protocol/peer-codec.js";
import { Signer } from "../agent/signer.js";
import { LocalStore } from "../agent/store/local-store.js";
import { addToStore, hasNix, needNix, NIX_FLAGS, tempDir } from "./helpers/nix.js";
import { addBlob, linkedFleet, narinfoVia } from "../faults/fleet-tools.js";
import { eventually } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { connectBoth } from "./helpers/mesh-connect.js";

const log = pino({ level: "silent" });

async function waitFor(what: string, cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Holder A serving NARs of a store with `count` small paths, requester B connected to it (both sides up). */
async function holderAndRequester(count: number, firstRequestMs?: number) {
  const tmp = tempDir("fleetcache-nar-ahead-");
  const root = join(tmp.dir, "store");
  const paths: string[] = [];
  for (let i = 0; i < count; i++) {
    const f = join(tmp.dir, `blob-${i}`);
    writeFileSync(f, randomBytes(20_000 + i * 1000));
    paths.push(await addToStore(root, f));
  }
  const local = new LocalStore(root, new Signer([]));
  const [ka, kb] = [generateKeyPair("ahead-a-1"), generateKeyPair("ahead-b-1")];
  const nodes: MeshNode[] = [];
  const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
  nodes.push(a);
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
  nodes.push(b);
  await serveNar(a, local, log, { ...(firstRequestMs !== undefined && { firstRequestMs }) });
  await connectBoth(b, a);
  const requests = await Promise.all(paths.map(async (p) => {
    const info = (await local.pathInfo(storePathHashPart(p)))!;
    return { hashPart: storePathHashPart(p), narHash: info.narHash, narSize: info.narSize, offset: 0 };
  }));
  return {
    a,
    b,
    aId: a.peerId.toString(),
    requests,
    async close() {
      await Promise.allSettled(nodes.map((n) => n.stop()));
      local.close();
      tmp.cleanup();
    },
  };
}

test("the next NAR from a holder takes the stream opened ahead, and its bytes are right", async (t) => {
  if (!(await needNix(t))) return;
  const h = await holderAndRequester(6);
  try {
    const ahead = narStreamsAhead(h.b);
    for (const [i, req] of h.requests.entries()) {
      const verifier = new NarVerifier(req.narHash, req.narSize);
      for await (const c of await openNar(h.b, h.aId, req)) verifier.update(c);
      verifier.finish(); // throws on a wrong byte
      if (i === 0) assert.equal(ahead.counts.opened, 1, "the first NAR opened its own stream");
      // One after another, as Nix's copy asks: the stream ahead is open by the next request.
      await waitFor("a stream ahead to be open", () => ahead.idle === 1);
    }
    assert.equal(ahead.counts.opened, 1, `only the first NAR opened a stream: ${JSON.stringify(ahead.counts)}`);
    assert.equal(ahead.counts.taken, 5, "the other five took one opened ahead");
  } finally {
    await h.close();
  }
});

test("a stream ahead nobody takes is closed; one the holder gave up on is not used", async (t) => {
  if (!(await needNix(t))) return;
  // The holder waits 400 ms for a stream's first request (the agent: 10 s).
  const h = await holderAndRequester(2, 400);
  try {
    const countStreams = () => h.b.libp2p.getConnections(h.a.peerId).flatMap((c) => c.streams).filter((s) => s.protocol === PROTOCOL_NAR).length;
    // Closed by us before the holder's limit.
    const quick = new NarStreamsAhead(h.b, { idleMs: 100 });
    const first = await quick.take(h.aId, [PROTOCOL_NAR], AbortSignal.timeout(5000));
    first.stream.abort(new Error("not used in this test"));
    await waitFor("the stream ahead to open", () => quick.idle === 1);
    await waitFor("the unused stream ahead to be closed", () => quick.idle === 0 && countStreams() === 0);

    // Kept past the holder's limit: the holder resets it, and the next take opens a new one.
    const slow = new NarStreamsAhead(h.b, { idleMs: 60_000 });
    (await slow.take(h.aId, [PROTOCOL_NAR], AbortSignal.timeout(5000))).stream.abort(new Error("not used in this test"));
    await waitFor("the stream ahead to open", () => slow.idle === 1);
    await new Promise((r) => setTimeout(r, 1000)); // past the holder's 400 ms
    const ms = await slow.take(h.aId, [PROTOCOL_NAR], AbortSignal.timeout(5000));
    assert.equal(slow.counts.taken, 0, "the stream the holder reset was not taken");
    assert.equal(slow.counts.opened, 2);
    ms.stream.abort(new Error("done"));
  } finally {
    await h.close();
  }
});

test("across a link with latency, Nix copies a closure through B with NARs on streams opened ahead", async (t) => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return t.skip("needs Nix and network namespaces (root)");
  }
  const net = await linkedFleet({ latencyMs: 20 });
  try {
    const { a, b } = net;
    const paths: string[] = [];
    for (let i = 0; i < 12; i++) paths.push(await addBlob(a, `ahead-${i}`, 30_000 + i));
    await addBlob(b, "b-own", 1024);
    await a.start();
    await b.start(["--peer", net.aViaLink]);
    await eventually("B sees A's paths", () => narinfoVia(b, paths.at(-1)!), 60_000);
    const dest = join(b.dir, "dest");
    await b.net.exec("nix", [
      ...NIX_FLAGS, "copy", "--from", b.agent!.url, "--to", dest, "--option", "trusted-public-keys", net.fleet.trustedKeys.join(" "),
      "--option", "require-sigs", "true", "--option", "substituters", "", ...paths,
    ]);
    await b.net.exec("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--no-trust", ...paths]);
    const c = (await b.status()).counters;
    assert.equal(c.narStreamsOpened! + c.narStreamsTakenAhead!, 12, `every NAR went on the mesh: ${JSON.stringify(c)}`);
    assert.ok(c.narStreamsTakenAhead! >= 6, `most took a stream opened ahead: ${c.narStreamsTakenAhead} of 12`);
  } finally {
    await net.destroy();
  }
});
