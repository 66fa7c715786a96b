// The only holder of a path restarts (an upgrade: SIGTERM, start again) while another host
// substitutes through its own agent. The asking agent keeps the holder's summary for a short grace
// (the peer shows as reconnecting) and holds lookups of the paths only it has until it is back,
// instead of answering 404 at once; a holder that stays away is forgotten after the grace.
// Hosts in network namespaces, real agents, Nix as the judge.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { createFleet, eventually, announcedTo, P2P_PORT, type Fleet, type FleetHost } from "./helpers/fleet.js";
import { canUseNetns } from "./helpers/netns.js";
import { hasNix, NIX_FLAGS } from "./helpers/nix.js";
import { addBlob, hashPart } from "../faults/fleet-tools.js";
import { parseNarinfo } from "../protocol/narinfo.js";

let fleet: Fleet | undefined;
let A: FleetHost, B: FleetHost;
const paths: string[] = [];

before(async () => {
  if (!(await hasNix()) || !(await canUseNetns())) {
    if (process.env.CI === "true") throw new Error("the mesh tests need Nix and network namespaces (root) under CI=true");
    return;
  }
  fleet = await createFleet(["a", "b"]);
  [A, B] = fleet.hosts as [FleetHost, FleetHost];
  for (let i = 0; i < 4; i++) paths.push(await addBlob(A, `restart-${i}`, 32 << 10));
  await addBlob(B, "b-own", 1024);
  await A.start();
  // B waits up to 25 s (default 5) for a reconnecting holder: A's restart takes 2-5 s, longer on
  // a loaded machine, and the test is about the wait, not its default length.
  await B.start(["--peer", `${A.net.ip}:${P2P_PORT}`, "--reconnect-wait", "25"]);
  await announcedTo(B, A);
});

after(async () => {
  await fleet?.destroy();
});

function ready(t: { skip: (m: string) => void }): boolean {
  if (!fleet) t.skip("needs Nix and network namespaces (root)");
  return fleet !== undefined;
}

/** `nix copy` of one path from B's agent into a fresh store, signatures required, no negative cache. */
async function substituteOnB(path: string, tag: string): Promise<void> {
  const dir = join(B.dir, `sub-${tag}`);
  await B.exec("env", [
    `XDG_CACHE_HOME=${join(dir, "cache")}`, "nix", ...NIX_FLAGS, "copy", "--from", B.agent!.url, "--to", join(dir, "store"),
    "--option", "trusted-public-keys", fleet!.trustedKeys.join(" "), "--option", "require-sigs", "true",
    "--option", "narinfo-cache-negative-ttl", "0", "--option", "substituters", "", path,
  ]);
}

test("the only holder restarts: lookups and NARs started while it is away are answered once it is back, not 404", async (t) => {
  if (!ready(t)) return;
  // The narinfo of paths[0] is fetched before the restart; its NAR is asked for during it (as
  // when Nix had the narinfo just before the holder went away).
  const narUrl = "/" + parseNarinfo((await B.http(`/${hashPart(paths[0]!)}.narinfo`)).body).url;
  await A.stop();
  // B has seen the connection close (a FIN: at once) before anything is asked.
  await eventually("B sees A disconnected", async () => (await B.status()).peers.some((p) => p.publicKey === A.publicKey && !p.connected), 10_000);
  const asked = Promise.all([
    B.http(`/${hashPart(paths[1]!)}.narinfo`),
    B.http(narUrl, ["-o", "/dev/null"]),
    substituteOnB(paths[2]!, "during").then(() => "ok", (e: Error) => e.message),
  ]);
  await A.start();
  const [narinfo, nar, nixCopy] = await asked;
  assert.equal(narinfo.status, 200, "narinfo asked while the holder was away");
  assert.equal(parseNarinfo(narinfo.body).storePath, paths[1]);
  assert.equal(nar.status, 200, "NAR asked while the holder was away");
  assert.equal(nixCopy, "ok", "nix copy started while the holder was away");
});

test("a holder that does not come back within the grace is forgotten: its paths are a 404", async (t) => {
  if (!ready(t)) return;
  await eventually("B has A back", async () => (await B.http(`/${hashPart(paths[3]!)}.narinfo`)).status === 200, 20_000);
  await A.stop();
  // While it may still come back, B says so (status, CLI); a lookup is held, then answered 404.
  const onB = async () => (await B.status()).peers.find((x) => x.publicKey === A.publicKey) as { connected: boolean; reconnecting?: boolean } | undefined;
  await eventually("A reconnecting on B", async () => (await onB())?.reconnecting === true, 10_000);
  const res = await B.http(`/${hashPart(paths[3]!)}.narinfo`);
  assert.equal(res.status, 404);
  // Once the grace has passed, no lookup waits for it any more, and status no longer lists it as reconnecting.
  await eventually("A no longer reconnecting on B", async () => {
    const p = await onB();
    return p !== undefined && !p.connected && p.reconnecting !== true;
  }, 90_000);
  assert.equal((await B.http(`/${hashPart(paths[3]!)}.narinfo`)).status, 404);
});
