// The one address parser: HTTP listen, mesh listen and peer addresses.
import { test } from "node:test";
import assert from "node:assert/strict";
import { AddressError, meshListenAddr, meshListenPort, parseHostPort, peerAddr } from "../agent/address.js";

test("host:port: IPv4, [IPv6] and host names; typos and bad ports are refused", () => {
  assert.deepEqual(parseHostPort("127.0.0.1:37515"), { host: "127.0.0.1", port: 37515, kind: "ip4" });
  assert.deepEqual(parseHostPort("[::1]:0"), { host: "::1", port: 0, kind: "ip6" });
  assert.deepEqual(parseHostPort("localhost:1"), { host: "localhost", port: 1, kind: "dns" });
  assert.deepEqual(parseHostPort("builder-1.tail4c2d9.ts.net.:2"), { host: "builder-1.tail4c2d9.ts.net.", port: 2, kind: "dns" });
  for (const bad of ["nonsense", "1.2.3.4:99999", "1.2.3.4:", ":80", "300.1.2.3:1", "1.2.3:1", "[1.2.3.4]:1", "[::1:1", "::1:1", "bad host:1", "-x:1", "a_b:1", "1.2.3.4:1:2"]) {
    assert.throws(() => parseHostPort(bad), AddressError, bad);
  }
});

test("mesh listen: IP:PORT or a TCP multiaddr, never a host name", () => {
  assert.equal(meshListenAddr("0.0.0.0:37516").toString(), "/ip4/0.0.0.0/tcp/37516");
  assert.equal(meshListenAddr("[::]:1").toString(), "/ip6/::/tcp/1");
  assert.equal(meshListenAddr("/ip4/127.0.0.1/tcp/0").toString(), "/ip4/127.0.0.1/tcp/0");
  assert.equal(meshListenPort("[::]:4001"), 4001);
  assert.equal(meshListenPort("/ip6/::/tcp/4002"), 4002);
  assert.throws(() => meshListenAddr("localhost:37599"), /not an IP address/);
  for (const bad of ["/ip4/127.0.0.1/udp/1", "/dns4/x/tcp/1", "/ip4/127.0.0.1", "/ip4/1.2.3.4/tcp/1/ws", "/nonsense", "/ip4/999.1.1.1/tcp/1"]) {
    assert.throws(() => meshListenAddr(bad), /TCP multiaddr/, bad);
  }
});

test("peers: host:port (names become /dns), [v6]:port and any multiaddr", () => {
  assert.equal(peerAddr("10.0.0.5:37516").toString(), "/ip4/10.0.0.5/tcp/37516");
  assert.equal(peerAddr("[fd7a:115c:a1e0::1]:37516").toString(), "/ip6/fd7a:115c:a1e0::1/tcp/37516");
  assert.equal(peerAddr("builder-1.tail4c2d9.ts.net:37516").toString(), "/dns/builder-1.tail4c2d9.ts.net/tcp/37516");
  assert.equal(peerAddr("/ip4/10.0.0.5/tcp/1").toString(), "/ip4/10.0.0.5/tcp/1");
  assert.equal(peerAddr("/dns4/b/tcp/1").toString(), "/dns4/b/tcp/1");
  for (const bad of ["builder-1", "10.0.0.5:99999", "bad host:1", "10.0.0.5:0", "/not-a-protocol/x"]) {
    assert.throws(() => peerAddr(bad), AddressError, bad);
  }
});
