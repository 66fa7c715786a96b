// Which peers count as on this host's own networks (agent/mesh/on-link.ts): the bulk path's rule.
import { test } from "node:test";
import assert from "node:assert/strict";
import type { NetworkInterfaceInfo } from "node:os";
import { LOCAL_NETS_TTL_MS, LocalNetworks, onLink, type Interfaces } from "../agent/mesh/on-link.js";

const v4 = (cidr: string): NetworkInterfaceInfo => ({ address: cidr.split("/")[0]!, netmask: "", family: "IPv4", mac: "", internal: false, cidr });
const v6 = (cidr: string): NetworkInterfaceInfo => ({ address: cidr.split("/")[0]!, netmask: "", family: "IPv6", mac: "", internal: false, cidr, scopeid: 0 });

// A laptop on a home LAN that is also on a tailnet.
const laptop: Interfaces = {
  lo: [v4("127.0.0.1/8"), v6("::1/128")],
  wlan0: [v4("192.168.1.23/24"), v6("fe80::1234/64"), v6("2001:db8:1:2::23/64")],
  tailscale0: [v4("100.101.102.103/32"), v6("fd7a:115c:a1e0::1/128")],
};

test("a peer on the same LAN subnet is on-link, IPv4 and IPv6", () => {
  assert.equal(onLink("192.168.1.77", laptop), true);
  assert.equal(onLink("2001:db8:1:2::99", laptop), true);
  assert.equal(onLink("127.0.0.1", laptop), true);
});

test("a routed peer is not: another subnet, another site, a tailnet peer (the host's own /32 and /128)", () => {
  assert.equal(onLink("192.168.2.77", laptop), false);
  assert.equal(onLink("10.0.0.5", laptop), false);
  assert.equal(onLink("100.101.102.104", laptop), false);
  assert.equal(onLink("fd7a:115c:a1e0::2", laptop), false);
  assert.equal(onLink("2001:db8:1:3::1", laptop), false);
});

test("IPv6 link-local is not (it needs a zone a mesh address lacks), nor anything that is not an IP address", () => {
  assert.equal(onLink("fe80::99", laptop), false);
  assert.equal(onLink("fe80::1234", laptop), false);
  assert.equal(onLink("example.org", laptop), false);
  assert.equal(onLink("", laptop), false);
});

test("this host's own interfaces are what it reads by default", () => {
  assert.equal(onLink("127.0.0.1"), true);
});

test("this host's networks are read once per LOCAL_NETS_TTL_MS, not on every check, and read again after it", () => {
  let reads = 0;
  let now = 0;
  let ifaces: Interfaces = laptop;
  const nets = new LocalNetworks(() => (reads++, ifaces), LOCAL_NETS_TTL_MS, () => now);
  for (let i = 0; i < 100; i++) assert.equal(nets.has("192.168.1.77"), true);
  assert.equal(reads, 1, "one read for 100 checks");
  // The laptop moves to another LAN: seen once the interval has passed, not before.
  ifaces = { lo: laptop.lo, wlan0: [v4("10.9.8.7/24")] };
  now = LOCAL_NETS_TTL_MS - 1;
  assert.equal(nets.has("10.9.8.1"), false);
  now = LOCAL_NETS_TTL_MS;
  assert.equal(nets.has("10.9.8.1"), true);
  assert.equal(nets.has("192.168.1.77"), false);
  assert.equal(reads, 2);
});
