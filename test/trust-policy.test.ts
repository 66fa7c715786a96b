// The trust policy (which peer narinfo to believe) and the upstream check, with real signatures:
// FleetSource against fake holders that answer with narinfos signed by fleet or upstream keys, and
// UpstreamCheck against a real HTTP cache on loopback and a file:// one.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { createLogger } from "../agent/log.js";
import { FleetSource, type PeerRequests } from "../agent/mesh/fleet-source.js";
import { HolderPenalties } from "../agent/mesh/holder-penalties.js";
import { MAX_HOLDERS_ASKED, TrustPolicy } from "../agent/mesh/trust-policy.js";
import { NarFetchError } from "../agent/mesh/nar-service.js";
import { NarUnavailableError } from "../agent/source.js";
import { UpstreamCheck } from "../agent/mesh/upstream-check.js";
import { ConfigError, loadConfig } from "../agent/config.js";
import { resolveUpstreamKeys } from "../agent/upstream-keys.js";
import type { LocalStore } from "../agent/store/local-store.js";
import { formatPublicKey, generateKeyPair, sign, verify, type SecretKey } from "../protocol/keys.js";
import { fingerprint, renderNarinfo, type Narinfo } from "../protocol/narinfo.js";
import { hasNix, tempDir } from "./helpers/nix.js";

const HASH_PART = "0".repeat(31) + "1";
const STORE_PATH = `/nix/store/${HASH_PART}-hello`;
const log = createLogger({ level: "silent", pretty: false });
const upstreamKey = generateKeyPair("upstream-1");
const fleetKeys = { a: generateKeyPair("a-1"), c: generateKeyPair("c-1") };

/** A narinfo for STORE_PATH with the contents `which` (genuine or forged), signed by `keys`. */
function narinfo(which: "genuine" | "forged", ...keys: SecretKey[]): Narinfo {
  const narHash = which === "genuine" ? "sha256:" + "1".repeat(52) : "sha256:1" + "2".repeat(51);
  const n: Narinfo = { storePath: STORE_PATH, narHash, narSize: 1000, references: [], sigs: [], url: "nar/x.nar", compression: "none" };
  n.sigs = keys.map((k) => sign(k, fingerprint(n)));
  return n;
}

type Reply = { narinfo?: Narinfo; delayMs?: number; never?: boolean };

/** A FleetSource over holders (fastest first) that answer as told; records who was asked. */
function lookupFleet(replies: Record<string, Reply>, opts: ConstructorParameters<typeof FleetSource>[4] = {}, nar: PeerRequests["nar"] = () => Promise.reject(new Error("not used"))) {
  const asked: string[] = [];
  const order = Object.keys(replies);
  const requests: PeerRequests = {
    narinfo: async (peer, _hashPart, signal) => {
      asked.push(peer);
      const r = replies[peer]!;
      if (r.never) return new Promise((_, reject) => signal.addEventListener("abort", () => reject(new Error("aborted"))));
      if (r.delayMs) await sleep(r.delayMs);
      return r.narinfo;
    },
    nar,
  };
  const local = { pathInfo: async () => undefined } as unknown as LocalStore;
  const source = new FleetSource(local, { holders: () => order, reconnectingHolders: () => [], onChange: () => () => {}, holderPenalties: new HolderPenalties() }, requests, log, opts);
  return { source, asked };
}

const withUpstreamKeys = (check?: UpstreamCheck) => ({ trust: new TrustPolicy([upstreamKey], check), hedgeAfterMs: 60_000, narinfoDeadlineMs: 60_000 });

test("a fleet-only forgery answering first loses to a slower holder's upstream-signed answer; the forger is penalised", async () => {
  const { source, asked } = lookupFleet(
    { c: { narinfo: narinfo("forged", fleetKeys.c) }, a: { narinfo: narinfo("genuine", fleetKeys.a, upstreamKey), delayMs: 20 } },
    withUpstreamKeys(),
  );
  const info = await source.pathInfo(HASH_PART);
  assert.equal(info?.narHash, narinfo("genuine").narHash);
  assert.deepEqual(asked, ["c", "a"], "the fleet-only answer made the agent ask the other holder at once (no hedge delay)");
  assert.equal(source.counters.narinfoConflicts, 1);
  assert.equal(source.penalties.status("c").badNarinfos, 1);
  assert.ok(source.penalties.barred("c", HASH_PART), "the forger is passed over for the path (its NAR too)");
  assert.equal(source.penalties.status("a").badNarinfos, 0);
});

test("a forger whose answer arrives after the upstream-signed one (hedged past it) is penalised all the same", async () => {
  const { source, asked } = lookupFleet(
    { c: { narinfo: narinfo("forged", fleetKeys.c), delayMs: 30 }, a: { narinfo: narinfo("genuine", fleetKeys.a, upstreamKey) } },
    { trust: new TrustPolicy([upstreamKey]), hedgeAfterMs: 1, narinfoDeadlineMs: 60_000 },
  );
  assert.equal((await source.pathInfo(HASH_PART))?.narHash, narinfo("genuine").narHash, "the genuine answer is used at once");
  assert.deepEqual(asked, ["c", "a"]);
  assert.equal(source.penalties.status("c").badNarinfos, 0, "not yet: C's answer is still on its way");
  await sleep(60);
  assert.equal(source.penalties.status("c").badNarinfos, 1);
  assert.equal(source.counters.narinfoConflicts, 1);
});

test("an upstream-signed answer is taken at once: slower holders are not waited for", async () => {
  const { source, asked } = lookupFleet({ a: { narinfo: narinfo("genuine", fleetKeys.a, upstreamKey) }, c: { never: true } }, withUpstreamKeys());
  assert.equal((await source.pathInfo(HASH_PART))?.narHash, narinfo("genuine").narHash);
  assert.deepEqual(asked, ["a"]);
});

// A path `nix-store --add` made of "fleetcache trust\n" (Nix 2.8): its CA field makes its store
// path name its NAR hash (protocol/content-address.ts).
const CA_PATH = "/nix/store/39hphjmgmcpp10xa7k6kd6mrancg6fsh-trust.txt";
function caNarinfo(which: "genuine" | "forged", withCa: boolean, ...keys: SecretKey[]): Narinfo {
  const n: Narinfo = {
    storePath: CA_PATH,
    narHash: which === "genuine" ? "sha256-PFtS1zAiLLtMgBs3xNmx6RQeR0LohwJNx7Xwvc2f2tE=" : "sha256:1" + "2".repeat(51),
    narSize: 136, references: [], sigs: [], url: "nar/x.nar", compression: "none",
    ...(withCa ? { ca: "fixed:r:sha256:1lfskz6vvw5mqx6h51z8893iw579n7cw8dqvh16bnb1263bm4nrw" } : {}),
  };
  n.sigs = keys.map((k) => sign(k, fingerprint(n)));
  return n;
}

test("a fleet-only answer whose store path names its contents (CA) is taken at once: slower holders are not waited for", async () => {
  const { source, asked } = lookupFleet({ c: { narinfo: caNarinfo("genuine", true, fleetKeys.c) }, a: { never: true } }, withUpstreamKeys());
  assert.equal((await source.pathInfo(CA_PATH.slice(11, 43)))?.narHash, caNarinfo("genuine", true).narHash);
  assert.deepEqual(asked, ["c"]);
  // A CA field that does not fit (another NarHash under that name) proves nothing: the wait is as for any fleet-only answer.
  const forged = { ...caNarinfo("forged", false), ca: caNarinfo("genuine", true).ca };
  assert.equal(new TrustPolicy([upstreamKey]).conclusive({ ...forged, sigs: [sign(fleetKeys.c, fingerprint(forged))] }), false);
});

test("a forger answering first without the CA field loses to a slower holder's answer whose name proves its contents", async () => {
  const { source, asked } = lookupFleet(
    { c: { narinfo: caNarinfo("forged", false, fleetKeys.c) }, a: { narinfo: caNarinfo("genuine", true, fleetKeys.a), delayMs: 20 } },
    withUpstreamKeys(),
  );
  assert.equal((await source.pathInfo(CA_PATH.slice(11, 43)))?.narHash, caNarinfo("genuine", true).narHash);
  assert.deepEqual(asked, ["c", "a"]);
  assert.equal(source.counters.narinfoConflicts, 0, "only upstream signatures count against a holder");
});

test("a holder whose NAR is announced with another size than the narinfo from another holder says is passed over, not penalised (either may lie)", async () => {
  // C answers first with the path's true NarHash and CA, and a false NarSize: its answer settles the lookup.
  const lie = { ...caNarinfo("genuine", true), narSize: 137 };
  lie.sigs = [sign(fleetKeys.c, fingerprint(lie))];
  const narAsked: string[] = [];
  const { source } = lookupFleet({ c: { narinfo: lie }, a: { narinfo: caNarinfo("genuine", true, fleetKeys.a), delayMs: 20 } }, withUpstreamKeys(), async (peer) => {
    narAsked.push(peer);
    if (peer === "c") throw new NarFetchError("not-found", "gone");
    throw new NarFetchError("size-mismatch", "peer announced 136 bytes, the narinfo says 137"); // A's header: the true size
  });
  const info = await source.pathInfo(CA_PATH.slice(11, 43));
  assert.equal(info?.narSize, 137, "C's answer was used");
  await assert.rejects(async () => {
    for await (const _ of source.narStream(info!, 0, info!.narSize)) void _;
  }, NarUnavailableError);
  assert.deepEqual(narAsked.sort(), ["a", "c"]);
  assert.equal(source.penalties.status("a").badNars, 0, "A, which may well be right, earns no strike");
  assert.equal(source.penalties.barred("a", CA_PATH.slice(11, 43)), false);
});

test("without upstream keys the first verified answer wins, as before (nothing to tell answers apart by)", async () => {
  const { source, asked } = lookupFleet({ c: { narinfo: narinfo("forged", fleetKeys.c) }, a: { narinfo: narinfo("genuine", fleetKeys.a, upstreamKey) } }, { hedgeAfterMs: 60_000 });
  assert.equal((await source.pathInfo(HASH_PART))?.narHash, narinfo("forged").narHash);
  assert.deepEqual(asked, ["c"]);
});

test("fleet-only answers for a fleet build: every holder (up to the cap) is asked, and the preferred holder's answer is used", async () => {
  const replies: Record<string, Reply> = {};
  for (let i = 0; i < MAX_HOLDERS_ASKED + 3; i++) replies[`h${i}`] = { narinfo: narinfo("genuine", fleetKeys.a), delayMs: i === 0 ? 0 : 5 };
  const { source, asked } = lookupFleet(replies, withUpstreamKeys());
  const info = await source.pathInfo(HASH_PART);
  assert.equal(info?.narHash, narinfo("genuine").narHash);
  assert.equal(asked.length, MAX_HOLDERS_ASKED);
  assert.equal(source.counters.narinfoConflicts, 0);
});

test("a 'no' makes room for the next holder; the deadline ends the wait with the fleet-only answer in hand", async () => {
  const { source, asked } = lookupFleet(
    { a: { narinfo: narinfo("genuine", fleetKeys.a) }, b: { narinfo: undefined }, c: { never: true }, d: { narinfo: narinfo("genuine", fleetKeys.a) } },
    { trust: new TrustPolicy([upstreamKey]), hedgeAfterMs: 60_000, narinfoDeadlineMs: 50 },
  );
  assert.equal((await source.pathInfo(HASH_PART))?.narHash, narinfo("genuine").narHash);
  assert.deepEqual(asked.sort(), ["a", "b", "c", "d"]);
});

test("policy: a fleet-only answer that matches upstream's narinfo is served with the upstream signature (Nix checks that one)", () => {
  const policy = new TrustPolicy([upstreamKey]);
  const fleetOnly = narinfo("genuine", fleetKeys.a);
  const v = policy.decide([{ peer: "c", narinfo: narinfo("forged", fleetKeys.c) }, { peer: "a", narinfo: fleetOnly }], narinfo("genuine", upstreamKey));
  assert.equal(v.chosen?.peer, "a");
  assert.deepEqual(v.losers, ["c"]);
  const upSigs = v.chosen!.narinfo.sigs.filter((s) => verify([upstreamKey], fingerprint(v.chosen!.narinfo), s));
  assert.equal(upSigs.length, 1, "the served narinfo carries a valid upstream signature");
  // A fleet key is never evidence, even if it is a signature "by the fleet" on a matching narinfo.
  const none = policy.decide([{ peer: "c", narinfo: narinfo("forged", fleetKeys.c) }], narinfo("forged", fleetKeys.a));
  assert.equal(none.chosen?.peer, "c", "no upstream signature anywhere: the fleet-only answer stands");
  // Upstream has it with other contents and no holder matches: nothing is served.
  const refused = policy.decide([{ peer: "c", narinfo: narinfo("forged", fleetKeys.c) }], narinfo("genuine", upstreamKey));
  assert.equal(refused.chosen, undefined);
  assert.deepEqual(refused.losers, ["c"]);
});

/** A binary cache on loopback serving `files` (name -> body); counts requests; `status` overrides. */
async function httpCache(files: Record<string, string>, status?: number) {
  let hits = 0;
  const server = createServer((req, res) => {
    hits++;
    const body = files[req.url!.slice(1)];
    if (status) res.writeHead(status).end();
    else if (body === undefined) res.writeHead(404).end();
    else res.writeHead(200, { "content-type": "text/x-nix-narinfo" }).end(body);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return { url, hits: () => hits, close: () => new Promise<void>((r) => server.close(() => r())) };
}

const upstreamText = (n: Narinfo) => renderNarinfo(n, "nar/abc.nar.xz").replace("Compression: none", "Compression: xz");

test("upstream check over HTTP: signed, absent (remembered), unsigned (not evidence), errors (the cache left alone a while)", async () => {
  const cache = await httpCache({ [`${HASH_PART}.narinfo`]: upstreamText(narinfo("genuine", upstreamKey)) });
  try {
    const check = new UpstreamCheck([cache.url + "/"], [upstreamKey]);
    const found = await check.lookup(HASH_PART);
    assert.equal(found.kind, "signed");
    assert.equal(found.kind === "signed" && found.narinfo.narHash, narinfo("genuine").narHash);
    const other = "1".repeat(32);
    assert.deepEqual(await check.lookup(other), { kind: "absent" });
    await check.lookup(other);
    await check.lookup(HASH_PART);
    assert.equal(cache.hits(), 2, "found and absent answers are remembered");
  } finally {
    await cache.close();
  }
  const unsigned = await httpCache({ [`${HASH_PART}.narinfo`]: upstreamText(narinfo("forged", fleetKeys.c)) });
  try {
    assert.deepEqual(await new UpstreamCheck([unsigned.url], [upstreamKey]).lookup(HASH_PART), { kind: "absent" });
  } finally {
    await unsigned.close();
  }
  const broken = await httpCache({}, 500);
  try {
    const check = new UpstreamCheck([broken.url], [upstreamKey]);
    assert.equal((await check.lookup(HASH_PART)).kind, "unknown");
    assert.equal((await check.lookup(HASH_PART)).kind, "unknown");
    assert.equal(broken.hits(), 1, "a failed cache is not asked again at once");
    assert.deepEqual(check.counters, { checks: 2, failures: 2 });
  } finally {
    await broken.close();
  }
});

test("upstream check from a file:// cache, and FleetSource with it: a sole forger is refused, a matching fleet-only answer gets upstream's signature", async () => {
  const dir = tempDir();
  try {
    mkdirSync(join(dir.dir, "cache"));
    writeFileSync(join(dir.dir, "cache", `${HASH_PART}.narinfo`), upstreamText(narinfo("genuine", upstreamKey)));
    const check = () => new UpstreamCheck([`file://${join(dir.dir, "cache")}`], [upstreamKey]);
    const forger = lookupFleet({ c: { narinfo: narinfo("forged", fleetKeys.c) } }, withUpstreamKeys(check()));
    assert.equal(await forger.source.pathInfo(HASH_PART), undefined, "no answer rather than the forgery");
    assert.equal(forger.source.penalties.status("c").badNarinfos, 1);
    const honest = lookupFleet({ a: { narinfo: narinfo("genuine", fleetKeys.a) } }, withUpstreamKeys(check()));
    const info = await honest.source.pathInfo(HASH_PART);
    assert.ok(info?.sigs.some((s) => verify([upstreamKey], fingerprint(info), s)), "served with the upstream signature");
    // Upstream does not have the path (a fleet build): the fleet-only answer stands.
    const fleetBuild = lookupFleet({ a: { narinfo: narinfo("genuine", fleetKeys.a) } }, withUpstreamKeys(new UpstreamCheck([`file://${join(dir.dir, "empty")}`], [upstreamKey])));
    assert.ok(await fleetBuild.source.pathInfo(HASH_PART));
  } finally {
    dir.cleanup();
  }
});

test("config: upstream_keys and upstream_caches by flag, environment and TOML; 'none'; bad values refused", () => {
  const up = formatPublicKey(upstreamKey);
  assert.equal(loadConfig({ flags: {}, env: {} }).upstreamKeys, null, "default: from Nix");
  assert.deepEqual(loadConfig({ flags: { upstreamKeys: [up] }, env: {} }).upstreamKeys, [up]);
  assert.deepEqual(loadConfig({ flags: {}, env: { FLEETCACHE_UPSTREAM_KEYS: "none" } }).upstreamKeys, []);
  assert.deepEqual(loadConfig({ flags: {}, env: { FLEETCACHE_UPSTREAM_CACHES: "https://cache.nixos.org, file:///srv/cache" } }).upstreamCaches, ["https://cache.nixos.org", "file:///srv/cache"]);
  const dir = tempDir();
  try {
    writeFileSync(join(dir.dir, "c.toml"), `upstream_keys = []\nupstream_caches = ["https://cache.nixos.org"]\n`);
    const c = loadConfig({ flags: {}, env: {}, configFile: join(dir.dir, "c.toml") });
    assert.deepEqual([c.upstreamKeys, c.upstreamCaches], [[], ["https://cache.nixos.org"]]);
  } finally {
    dir.cleanup();
  }
  assert.throws(() => loadConfig({ flags: { upstreamCaches: ["s3://bucket"] }, env: {} }), ConfigError);
  assert.throws(() => loadConfig({ flags: { upstreamKeys: ["nope"] }, env: {} }), ConfigError);
});

test("default upstream keys: Nix's trusted-public-keys without the fleet's (by name or bytes) and this host's", async (t) => {
  if (!(await hasNix())) return t.skip("nix not installed");
  const up = formatPublicKey(upstreamKey);
  const saved = process.env.NIX_CONFIG;
  process.env.NIX_CONFIG = `trusted-public-keys = ${up} ${formatPublicKey(fleetKeys.a)} ${formatPublicKey(fleetKeys.c)}`;
  try {
    const keys = await resolveUpstreamKeys({ upstreamKeys: null, trustedKeys: [formatPublicKey(fleetKeys.a)] }, [fleetKeys.c], log);
    assert.deepEqual(keys.map(formatPublicKey), [up]);
  } finally {
    if (saved === undefined) delete process.env.NIX_CONFIG;
    else process.env.NIX_CONFIG = saved;
  }
  // Configured: fleet keys are dropped even there.
  const keys = await resolveUpstreamKeys({ upstreamKeys: [up, formatPublicKey(fleetKeys.a)], trustedKeys: [formatPublicKey(fleetKeys.a)] }, [], log);
  assert.deepEqual(keys.map(formatPublicKey), [up]);
});
