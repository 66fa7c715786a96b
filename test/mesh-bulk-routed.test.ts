// The bulk path (agent/mesh/bulk-*.ts) is for holders on the requester's own networks. A holder at
// another site, reached through a router, sends its NARs on the warm mesh connection: a bulk
// connection per NAR would cost it two round trips and a TCP slow start (BENCHMARKS.md, "The bulk
// path over a WAN"). Two sites joined by the link proxy, which carries the bulk port too, so only
// the agent's own rule keeps the body off it. Nix on B copies a 2 MiB path held by A.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { addBlob, linkedFleet, narinfoVia, type LinkedFleet } from "../faults/fleet-tools.js";
import { eventually } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { hasNix, NIX_FLAGS } from "./helpers/nix.js";

let net: LinkedFleet | undefined;

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  net = await linkedFleet({ latencyMs: 5 });
});

after(async () => {
  await net?.destroy();
});

test("a holder reached through a router sends a 2 MiB NAR on the mesh stream, not on its bulk port; Nix copies it", async (t) => {
  if (!net) return t.skip("needs Nix and network namespaces (root)");
  const { a, b } = net;
  const path = await addBlob(a, "routed-blob", 2 << 20);
  await addBlob(b, "b-own", 1024); // an agent needs a store of its own
  await a.start();
  await b.start(["--peer", net.aViaLink]);
  await eventually("B sees A's path", () => narinfoVia(b, path), 60_000);
  const dest = join(b.dir, "dest");
  await b.net.exec("nix", [
    ...NIX_FLAGS, "copy", "--from", b.agent!.url, "--to", dest, "--option", "trusted-public-keys", net.fleet.trustedKeys.join(" "),
    "--option", "require-sigs", "true", "--option", "substituters", "", path,
  ]);
  await b.net.exec("nix", [...NIX_FLAGS, "store", "verify", "--store", dest, "--no-trust", path]);
  const counters = (await b.status()).counters;
  assert.ok(counters.narBytesFromPeers! >= 2 << 20, `B took the NAR from A: ${counters.narBytesFromPeers} bytes`);
  // Present (bulk is on in both agents), and 0.
  assert.equal(counters.bulkNarsReceived, 0, "no NAR body on the bulk port of a routed holder");
  assert.equal(counters.bulkFallbacks, 0, "and no bulk connection tried");
  assert.equal(counters.bulkSessionNarsReceived, 0, "nor on a bulk session");
  assert.equal(counters.bulkSessionConnections, 0);
  assert.equal((await a.status()).counters.bulkNarsSent, 0);
  assert.equal((await a.status()).counters.bulkSessionNarsSent, 0);
  const stats = await net.linkStats();
  assert.ok(stats.bytesDown >= 2 << 20, `the NAR crossed the link: ${stats.bytesDown} bytes A -> B`);
});
