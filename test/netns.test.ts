// The multi-host harness itself: namespaces reach each other over the bridge and nothing else.
import { test } from "node:test";
import assert from "node:assert/strict";
import { canUseNetns, createNetwork, rateBytesPerSecond, shapeLink, shapingStats } from "./helpers/netns.js";
import { run } from "./helpers/nix.js";

const needsNetns = async (t: { skip(m: string): void }): Promise<boolean> => {
  if (await canUseNetns()) return true;
  if (process.env.CI === "true") throw new Error("network namespaces are required under CI=true (run as root with iproute2)");
  t.skip("needs root and iproute2");
  return false;
};

test("simulated hosts reach each other, and are removed afterwards", async (t) => {
  if (!(await needsNetns(t))) return;
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

test("tc rates in bytes per second", () => {
  assert.equal(rateBytesPerSecond("1gbit"), 125e6);
  assert.equal(rateBytesPerSecond("2500mbit"), 312.5e6);
  assert.equal(rateBytesPerSecond("40mbit"), 5e6);
  for (const bad of ["1gbps", "fast", "1 gbit", "gbit", ""]) assert.throws(() => rateBytesPerSecond(bad), /not a rate/, bad);
});

test("a shaped link: a token bucket each way inside the host's namespace, none in the root namespace, gone with the host", async (t) => {
  if (!(await needsNetns(t))) return;
  // Other programs may add and remove interfaces meanwhile: compare only what shaping would leave.
  const shapingInRoot = async () => (await run("tc", ["qdisc", "show"])).split("\n").filter((l) => /tbf|ingress|ifb/.test(l)).join("\n") + (await run("ip", ["-o", "link", "show", "type", "ifb"]));
  const before = await shapingInRoot();
  const net = await createNetwork(2);
  const [a, b] = net.hosts as [NonNullable<(typeof net.hosts)[0]>, NonNullable<(typeof net.hosts)[0]>];
  try {
    await shapeLink(a, "1gbit");
    // Both directions pass through a's buckets: its egress on eth0, its ingress by way of ifb0.
    await b.exec("ping", ["-c", "3", "-i", "0.2", "-W", "2", a.ip]);
    const stats = await shapingStats(a);
    assert.deepEqual(stats.map((q) => q.dev).sort(), ["eth0", "ifb0"]);
    for (const q of stats) assert.ok(q.sentBytes > 0 && q.dropped === 0, `${q.dev}: ${JSON.stringify(q)}`);
    assert.match(await run("tc", ["-n", a.ns, "qdisc", "show", "dev", "eth0"]), /tbf .*rate 1Gbit burst 500000b/);
    assert.deepEqual(await shapingStats(b), [], "b is not shaped");
    assert.equal(await shapingInRoot(), before, "no token bucket, ingress qdisc or IFB device in the root namespace");
  } finally {
    await net.destroy();
  }
  assert.ok(!(await run("ip", ["netns", "list"])).includes(a.ns), "the shaped host is removed");
});
