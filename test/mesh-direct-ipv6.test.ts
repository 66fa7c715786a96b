// LAN-direct NARs between hosts that have only IPv6 addresses (a v6-only LAN): B's agent must
// judge A's IPv6 mesh address on-link, redirect Nix to `http://[addr]:port/...` (brackets, or
// curl reads the address as a host name with a port), and A's direct port must listen on it.
// Real Nix copies a closure with signatures required, through B's agent; the counters prove the
// bytes came from A's direct port and not through B.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { announcedTo, createFleet, P2P_PORT, type Fleet, type FleetHost } from "./helpers/fleet.js";
import { canUseNetns, createNetwork } from "./helpers/netns.js";
import { dumpNar, hasNix, OFFLINE, pathInfo, run } from "./helpers/nix.js";

let fleet: Fleet | undefined;
let A: FleetHost, B: FleetHost;
let closure: string[];
// A unique-local /64 per run; hosts ::1 and ::2.
// Groups without leading zeros, as the agent prints an address.
const group = (n: number) => randomBytes(n).readUIntBE(0, n).toString(16);
const prefix = `fd${randomBytes(1).toString("hex")}:${group(2)}:${group(2)}::`;
const v6 = (i: number) => `${prefix}${i}`;

const EXPR = `
let
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = "/bin/sh"; args = [ "-c" script ]; };
  small = mk "v6-small" "/bin/mkdir $out; echo small > $out/data";
in mk "v6-top" "/bin/mkdir $out; echo \${./big.bin} > $out/big-ref; echo \${small} > $out/small-ref"
`;

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  const net = await createNetwork(2);
  // IPv6 only: the IPv4 addresses go, each host gets a ULA (nodad: usable at once, no
  // duplicate-address detection delay).
  for (const [i, h] of net.hosts.entries()) {
    await run("ip", ["-n", h.ns, "addr", "del", `${h.ip}/24`, "dev", "eth0"]);
    await run("ip", ["-n", h.ns, "addr", "add", `${v6(i + 1)}/64`, "dev", "eth0", "nodad"]);
  }
  fleet = await createFleet(["a", "b"], net);
  [A, B] = fleet.hosts as [FleetHost, FleetHost];
  writeFileSync(join(A.dir, "big.bin"), randomBytes(3 << 20));
  const file = join(A.dir, "closure.nix");
  writeFileSync(file, EXPR);
  const out = (await run("nix-build", ["--store", A.storeRoot, ...OFFLINE, file, "--no-out-link"])).trim();
  closure = (await pathInfo(A.storeRoot, [out], true)).map((i) => i.path);
  writeFileSync(join(B.dir, "b.txt"), "b\n");
  await run("nix-store", ["--store", B.storeRoot, "--add", join(B.dir, "b.txt")]);
});

after(async () => {
  await fleet?.destroy();
});

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

test("IPv6-only LAN: B redirects Nix to A's direct port at [A's IPv6 address], Nix copies the closure verified and byte-identical", { timeout: 180_000 }, async (t) => {
  if (!fleet) return t.skip("needs Nix and root for network namespaces");
  const listen = ["--p2p-listen", `[::]:${P2P_PORT}`, "--direct-lan"];
  await A.start(listen);
  await B.start([...listen, "--peer", `[${v6(1)}]:${P2P_PORT}`]);
  await announcedTo(B, A);

  // The redirect itself: a bracketed IPv6 address.
  const big = (await pathInfo(A.storeRoot, closure)).sort((x, y) => y.narSize - x.narSize)[0]!;
  const url = /^URL: (.*)$/m.exec((await B.http(`/${big.path.slice(11, 43)}.narinfo`)).body)![1]!;
  const head = await B.exec("curl", ["-sS", "-o", "/dev/null", "-D", "-", `${B.agent!.url}/${url}`]);
  assert.match(head, /^HTTP\/1\.1 307 /);
  const location = /^location: (.*)\r$/im.exec(head)![1]!;
  assert.ok(location.startsWith(`http://[${v6(1)}]:${P2P_PORT + 2}/`), location);
  // A fresh B for Nix: this one would relay the NAR curl was redirected for (asked for again soon).
  await B.start([...listen, "--peer", `[${v6(1)}]:${P2P_PORT}`]);
  await announcedTo(B, A);

  const keys = fleet.trustedKeys.join(" ");
  const dest = join(B.dir, "dest");
  const before = (await B.status()).counters;
  await B.nix([
    "copy", "--from", B.agent!.url, "--to", dest,
    "--option", "trusted-public-keys", keys, "--option", "require-sigs", "true",
    "--option", "narinfo-cache-negative-ttl", "0",
    ...closure,
  ]);
  await B.nix(["store", "verify", "--store", dest, "--trusted-public-keys", keys, "--sigs-needed", "1", ...closure]);
  for (const p of closure) assert.equal(sha(await dumpNar(dest, p)), sha(await dumpNar(A.storeRoot, p)), `NAR of ${p}`);
  const [a, b] = [(await A.status()).counters, (await B.status()).counters];
  assert.equal(b.directRedirects! - (before.directRedirects ?? 0), closure.length, "every NAR of the copy redirected");
  assert.equal(b.directFallbacks, 0);
  assert.equal(b.narBytesFromPeers, 0, "B relayed nothing");
  // The curl above fetched nothing (its 307 was not followed); Nix fetched each NAR once.
  assert.equal(a.directNarsSent, closure.length, "every NAR sent by A's direct port");
});
