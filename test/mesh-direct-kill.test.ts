// LAN-direct NARs when the holder dies mid-NAR: hosts A and C both hold a 24 MiB path, their
// links slowed to 40 Mbit/s (tc tbf on their interface) so the NAR takes seconds; Nix on B,
// redirected by B's agent to one holder's direct port, is cut off when that holder's agent is
// killed part-way. What Nix does next is Nix's: it asks B's URL again (its retry), with a Range
// from the byte it reached if it resumes, and B relays from the other holder (verified). The
// test records what the Nix version did (its diagnostics) and asserts what 2.8 and 2.26 both did:
// resume through B with a Range, relayed and verified, and an intact path in B's store.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { announcedTo, createFleet, P2P_PORT, type Fleet, type FleetHost } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { addToStore, dumpNar, hasNix, pathInfo } from "./helpers/nix.js";

let fleet: Fleet | undefined;
let A: FleetHost, B: FleetHost, C: FleetHost;
let big: string;

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  fleet = await createFleet(["a", "b", "c"]);
  [A, B, C] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
  const file = join(A.dir, "big.bin");
  writeFileSync(file, randomBytes(24 << 20));
  big = await addToStore(A.storeRoot, file);
  assert.equal(await addToStore(C.storeRoot, file), big, "the same path in both holders' stores");
  narSize = (await pathInfo(A.storeRoot, [big]))[0]!.narSize;
  writeFileSync(join(B.dir, "b.txt"), "b\n");
  await addToStore(B.storeRoot, join(B.dir, "b.txt"));
  // 24 MiB at 40 Mbit/s: about 5 s from either holder.
  for (const h of [A, C]) await h.exec("tc", ["qdisc", "add", "dev", "eth0", "root", "tbf", "rate", "40mbit", "burst", "64kb", "latency", "500ms"]);
  await A.start(["--direct-lan"]);
  await C.start(["--direct-lan"]);
  await B.start(["--direct-lan", "--peer", `${A.net.ip}:${P2P_PORT}`, "--peer", `${C.net.ip}:${P2P_PORT}`]);
  await announcedTo(B, A);
  await announcedTo(B, C);
});

after(async () => {
  await fleet?.destroy();
});

let narSize = 0;
const s0NarSize = () => narSize;
const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

test("the holder's agent killed mid-NAR on the direct port: Nix resumes through B with a Range, relayed from the other holder, intact", { timeout: 240_000 }, async (t) => {
  if (!fleet) return t.skip("needs Nix and root for network namespaces");
  const dest = join(B.dir, "dest");
  const keys = fleet.trustedKeys.join(" ");
  const copy = B.nix(["copy", "--from", B.agent!.url, "--to", dest, "--option", "trusted-public-keys", keys, "--option", "require-sigs", "true", big]).then(
    () => "ok",
    (e: Error) => e.message,
  );
  // The holder Nix was sent to is the one whose direct port began a NAR: kill it a second in.
  let victim: FleetHost | undefined;
  for (let i = 0; i < 100 && !victim; i++) {
    for (const h of [A, C]) if (((await h.status()).counters.directNarsSent ?? 0) > 0) victim = h;
    if (!victim) await sleep(50);
  }
  assert.ok(victim, "Nix was redirected to a holder's direct port");
  const survivor = victim === A ? C : A;
  await sleep(1000);
  const sentBefore = (await victim.status()).counters.directBytesSent!;
  await victim.crash();
  const result = await copy;
  const b = (await B.status()).counters;
  const s = (await survivor.status()).counters;
  const version = (await B.nix(["--version"])).trim();
  // B's "peer NAR sent" lines: bytes = what one response relayed (the NAR from a Range's first byte on).
  const relayed = B.agent!.logs().split("\n").filter((l) => l.includes('"peer NAR sent"')).map((l) => (JSON.parse(l) as { bytes: number }).bytes);
  t.diagnostic(`B relayed ${relayed.length} response(s) after the redirect: ${relayed.join(", ")} bytes (NAR ${s0NarSize()} bytes)`);
  t.diagnostic(`${version}: copy ${result === "ok" ? "succeeded" : `failed: ${result.slice(0, 300)}`}`);
  t.diagnostic(`victim ${victim.name} had sent ${sentBefore} bytes by the kill; B: redirects ${b.directRedirects}, fallbacks ${b.directFallbacks}, bytes relayed from peers ${b.narBytesFromPeers}; survivor ${survivor.name}: direct NARs ${s.directNarsSent}, bytes to peers ${s.narBytesToPeers}`);
  // Nix 2.8 and 2.26 alike (one run each, 06:33 UTC): the download from the direct port breaks,
  // Nix retries B's URL with a Range from the byte it had, B relays that part from the survivor
  // (verified from byte 0), and the copy succeeds.
  assert.equal(result, "ok", "the copy succeeded");
  assert.equal(b.directRedirects, 1, "the retry was not redirected: it carried a Range");
  assert.equal(relayed.length, 1);
  assert.ok(relayed[0]! < narSize && relayed[0]! > 0, `resumed part-way: ${relayed[0]} of ${narSize} bytes relayed to Nix`);
  assert.equal(s.narBytesToPeers, narSize, "the survivor sent B the whole NAR, which B verified");
  assert.equal(sha(await dumpNar(dest, big)), sha(await dumpNar(survivor.storeRoot, big)), "byte-identical");
  await B.nix(["store", "verify", "--store", dest, "--trusted-public-keys", keys, "--sigs-needed", "1", big]);
});
