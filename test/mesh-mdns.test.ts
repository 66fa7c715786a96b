// mDNS between hosts on one LAN segment (network namespaces on a bridge): agents that were told
// of no peer find each other, connect, and serve each other's paths.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { createFleet, eventually } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { addToStore, hasNix } from "./helpers/nix.js";

test("agents with --mdns and no peers configured find each other", async (t) => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("needs Nix and network namespaces (root) under CI=true");
    return t.skip("needs Nix and root for network namespaces");
  }
  const fleet = await createFleet(["m1", "m2"]);
  try {
    const [A, B] = fleet.hosts as [NonNullable<(typeof fleet.hosts)[0]>, NonNullable<(typeof fleet.hosts)[0]>];
    for (const h of fleet.hosts) {
      writeFileSync(join(h.dir, "f"), `from ${h.name}\n`);
      await addToStore(h.storeRoot, join(h.dir, "f"));
    }
    writeFileSync(join(A.dir, "only-a"), "only on m1\n");
    const onlyA = await addToStore(A.storeRoot, join(A.dir, "only-a"));
    await A.start(["--mdns"]);
    await B.start(["--mdns"]);
    const peer = await eventually("m2 discovers and connects to m1", async () => {
      const p = (await B.status()).peers.find((x) => x.name === "m1-1" && x.connected);
      return p;
    }, 30_000);
    assert.ok(peer.addresses.some((a) => a.includes(A.net.ip)), "found at m1's LAN address");
    await eventually("m2 serves m1's path", async () => (await B.http(`/${onlyA.slice(11, 43)}.narinfo`)).status === 200, 30_000);
  } finally {
    await fleet.destroy();
  }
});
