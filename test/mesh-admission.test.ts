// Admission on the mesh port: a host without a key that holds idle sockets (and reopens them
// when closed) must not keep a trusted peer from connecting (issue 10, scenario 5). With
// libp2p's defaults (10 pending handshakes, 10 s each, no limit per remote host) the idle sockets
// filled the pending queue and every trusted dial was refused.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { connect, type Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { pino } from "pino";
import { generateKeyPair } from "../protocol/keys.js";
import { createMeshNode, type MeshNode } from "../agent/mesh/node.js";
import { InboundPerHost, RECENT_OFFENDERS } from "../agent/mesh/admission.js";
import type { MultiaddrConnection } from "@libp2p/interface";
import { multiaddr } from "@multiformats/multiaddr";

const log = pino({ level: "silent" });
const IDLE = 30;

const nodes: MeshNode[] = [];
const sockets = new Set<Socket>();
let flooding = true;
after(async () => {
  flooding = false;
  for (const s of sockets) s.destroy();
  await Promise.allSettled(nodes.map((n) => n.stop()));
});

test(`${IDLE} idle sockets from one host, reopened when closed, do not keep a trusted peer out`, async () => {
  const [ka, kb] = [generateKeyPair("a-1"), generateKeyPair("b-1")];
  const a = await createMeshNode({ key: ka, trusted: [kb], listen: "/ip4/127.0.0.1/tcp/0", log });
  nodes.push(a);
  const b = await createMeshNode({ key: kb, trusted: [ka], listen: "/ip4/127.0.0.1/tcp/0", log });
  nodes.push(b);
  const port = Number(a.addresses()[0]!.getComponents().find((c) => c.name === "tcp")!.value);

  // The attacker's sockets come from another loopback address, so "per remote host" applies to
  // them and not to B (which dials from 127.0.0.1). They never send a byte.
  let accepted = 0;
  const hold = () => {
    if (!flooding) return;
    const s = connect({ host: "127.0.0.1", port, localAddress: "127.0.0.2" });
    sockets.add(s);
    s.on("connect", () => accepted++);
    s.on("error", () => undefined);
    s.on("close", () => {
      sockets.delete(s);
      setTimeout(hold, 10);
    });
  };
  for (let i = 0; i < IDLE; i++) hold();
  // Long enough for the attacker to fill libp2p's default queue (5 new sockets per second per host).
  while (accepted < 3 * IDLE) await sleep(50);
  await sleep(2500);

  // B retries until connected, as the agent's redial would; each refused dial fails fast.
  const end = Date.now() + 8_000;
  let connected = false;
  let lastError: unknown;
  while (!connected && Date.now() < end) {
    try {
      await b.libp2p.dial(a.addresses()[0]!, { signal: AbortSignal.timeout(2_000) });
      connected = a.libp2p.getConnections(b.peerId).length > 0;
    } catch (e) {
      lastError = e;
    }
    if (!connected) await sleep(100);
  }
  assert.ok(connected, `B never connected while the idle sockets were held: ${(lastError as Error | undefined)?.message ?? "A never saw the connection"}`);
});

test("a host's pending sockets are limited, but its admitted connections do not count (hosts behind one NAT address)", () => {
  const perHost = new InboundPerHost(2);
  const socket = (ip: string) => {
    const listeners: (() => void)[] = [];
    const conn = {
      remoteAddr: multiaddr(`/ip4/${ip}/tcp/4001`),
      addEventListener: (_: string, fn: () => void) => void listeners.push(fn),
    } as unknown as MultiaddrConnection;
    return { conn, close: () => listeners.forEach((fn) => fn()) };
  };
  const [s1, s2, s3] = [socket("10.0.0.9"), socket("10.0.0.9"), socket("10.0.0.9")];
  assert.equal(perHost.deny(s1.conn), false);
  assert.equal(perHost.deny(s2.conn), false);
  assert.equal(perHost.deny(s3.conn), true, "a third socket still in its handshake is refused");
  assert.equal(perHost.deny(socket("10.0.0.10").conn), false, "other hosts are not affected");
  perHost.admitted(s1.conn); // a trusted peer's handshake passed
  perHost.admitted(s1.conn); // once only
  assert.equal(perHost.count("10.0.0.9"), 1);
  assert.equal(perHost.deny(s3.conn), false, "an admitted connection frees its host's slot");
  s1.close(); // closing an admitted connection changes nothing more
  s2.close();
  assert.equal(perHost.count("10.0.0.9"), 1);
});

test("refusals are counted, and the hosts refused most recently listed (at most RECENT_OFFENDERS)", () => {
  const perHost = new InboundPerHost(1);
  const socket = (ip: string) =>
    ({ remoteAddr: multiaddr(`/ip4/${ip}/tcp/4001`), addEventListener: () => undefined }) as unknown as MultiaddrConnection;
  assert.equal(perHost.deny(socket("10.0.0.1")), false);
  assert.equal(perHost.deny(socket("10.0.0.1")), true);
  assert.equal(perHost.deny(socket("10.0.0.1")), true);
  assert.equal(perHost.refused, 2);
  assert.deepEqual(perHost.offenders().map((o) => [o.host, o.refused]), [["10.0.0.1", 2]]);
  // A flood from many addresses: the list keeps the latest RECENT_OFFENDERS, the count all.
  for (let i = 0; i < RECENT_OFFENDERS + 5; i++) {
    perHost.deny(socket(`10.1.0.${i}`));
    perHost.deny(socket(`10.1.0.${i}`));
  }
  perHost.deny(socket("10.0.0.1")); // refused again: first in the list once more
  assert.equal(perHost.refused, 2 + RECENT_OFFENDERS + 5 + 1);
  const hosts = perHost.offenders().map((o) => o.host);
  assert.equal(hosts.length, RECENT_OFFENDERS);
  assert.equal(hosts[0], "10.0.0.1");
  assert.equal(perHost.offenders()[0]!.refused, 1, "counted again from its return to the list");
  assert.equal(hosts[1], `10.1.0.${RECENT_OFFENDERS + 4}`);
  assert.ok(!hosts.includes("10.1.0.0"), "the oldest offenders dropped out");
});
