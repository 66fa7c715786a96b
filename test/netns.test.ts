// The multi-host harness itself: namespaces reach each other over the bridge and nothing else.
import { test } from "node:test";
import assert from "node:assert/strict";
import { canUseNetns, createNetwork } from "./helpers/netns.js";
import { run } from "./helpers/nix.js";

test("simulated hosts reach each other, and are removed afterwards", async (t) => {
  if (!(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("network namespaces are required under CI=true (run as root with iproute2)");
    return t.skip("needs root and iproute2");
  }
  const net = await createNetwork(3);
  const names = net.hosts.map((h) => h.ns);
  try {
    const [a, b, c] = net.hosts;
    await a!.exec("ping", ["-c", "1", "-W", "2", b!.ip]);
    await c!.exec("ping", ["-c", "1", "-W", "2", a!.ip]);
    // No way out of the test network: no default route in any namespace.
    for (const h of net.hosts) assert.doesNotMatch(await run("ip", ["-n", h.ns, "route"]), /default/);
  } finally {
    await net.destroy();
  }
  const left = await run("ip", ["netns", "list"]);
  for (const n of names) assert.ok(!left.includes(n), `${n} removed`);
});
