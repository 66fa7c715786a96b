// GET /metrics against a real agent and store: after a narinfo hit, a miss, a NAR download and a
// bad request, the exposition parses and counts exactly those, with bounded labels; the admin
// endpoints refuse clients that are not on loopback.
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { isLoopback } from "../agent/http/admin-routes.js";
import { AgentMetrics } from "../agent/metrics.js";
import { parseNarinfo } from "../protocol/narinfo.js";
import { startAgentProcess } from "./helpers/agent.js";
import { addToStore, needNix, pathInfo, tempDir } from "./helpers/nix.js";

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}
interface Exposition {
  types: Map<string, string>;
  helps: Map<string, string>;
  samples: Sample[];
}

/** Prometheus text format 0.0.4, strictly: every line is a comment we know or a sample. */
function parseExposition(text: string): Exposition {
  const types = new Map<string, string>();
  const helps = new Map<string, string>();
  const samples: Sample[] = [];
  for (const line of text.split("\n")) {
    if (line === "") continue;
    let m = /^# (HELP|TYPE) ([a-zA-Z_:][a-zA-Z0-9_:]*) (.*)$/.exec(line);
    if (m) {
      (m[1] === "HELP" ? helps : types).set(m[2]!, m[3]!);
      continue;
    }
    m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    assert.ok(m, `not a sample line: ${JSON.stringify(line)}`);
    const labels: Record<string, string> = {};
    const body = m[2] ?? "";
    const labelRe = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)",?/gy;
    let lm: RegExpExecArray | null;
    let consumed = 0;
    while ((lm = labelRe.exec(body))) {
      labels[lm[1]!] = lm[2]!;
      consumed = labelRe.lastIndex;
    }
    assert.equal(consumed, body.length, `malformed labels in ${line}`);
    const value = m[3] === "+Inf" ? Infinity : m[3] === "-Inf" ? -Infinity : Number(m[3]);
    assert.ok(!Number.isNaN(value) || m[3] === "NaN", `bad value in ${line}`);
    samples.push({ name: m[1]!, labels, value });
  }
  return { types, helps, samples };
}

function value(e: Exposition, name: string, labels: Record<string, string> = {}): number | undefined {
  const s = e.samples.find((s) => s.name === name && Object.entries(labels).every(([k, v]) => s.labels[k] === v) && Object.keys(s.labels).length === Object.keys(labels).length);
  return s?.value;
}

/** The family a sample belongs to (histogram samples carry suffixes). */
function familyOf(e: Exposition, sample: string): string | undefined {
  if (e.types.has(sample)) return sample;
  const base = sample.replace(/_(bucket|sum|count)$/, "");
  return e.types.get(base) === "histogram" || e.types.get(base) === "summary" ? base : undefined;
}

test("isLoopback accepts this host's loopback addresses only", () => {
  for (const a of ["127.0.0.1", "127.1.2.3", "::1", "::ffff:127.0.0.1"]) assert.equal(isLoopback(a), true, a);
  for (const a of [undefined, "", "10.0.0.1", "192.168.1.127", "::", "::ffff:10.0.0.1", "fe80::1", "0.0.0.0", "1127.0.0.1"]) {
    assert.equal(isLoopback(a), false, String(a));
  }
});

test("GET /metrics counts hits, misses, NAR bytes and client errors, in Prometheus' text format", async (t) => {
  if (!(await needNix(t))) return;
  const tmp = tempDir();
  t.after(tmp.cleanup);
  const file = join(tmp.dir, "payload");
  writeFileSync(file, Buffer.alloc(300_000, "fleet"));
  const storeRoot = join(tmp.dir, "store");
  const path = await addToStore(storeRoot, file);
  const [info] = await pathInfo(storeRoot, [path]);
  const agent = await startAgentProcess(["--store-root", storeRoot, "--state-dir", join(tmp.dir, "state")]);
  t.after(() => agent.stop());
  const get = (p: string) => fetch(agent.url + p);

  const hit = await get(`/${path.slice(11, 43)}.narinfo`);
  assert.equal(hit.status, 200);
  const narUrl = parseNarinfo(await hit.text()).url;
  assert.equal((await get(`/${"0".repeat(32)}.narinfo`)).status, 404);
  const nar = await get("/" + narUrl);
  assert.equal(nar.status, 200);
  assert.equal((await nar.arrayBuffer()).byteLength, info!.narSize);
  assert.equal((await get("/nar/garbage.nar")).status, 400);

  const res = await get("/metrics");
  assert.equal(res.status, 200);
  assert.match(res.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  const e = parseExposition(await res.text());

  const requests = (route: string, method: string, outcome: string) =>
    value(e, "fleetcache_http_requests_total", { route, method, outcome });
  assert.equal(requests("narinfo", "GET", "hit_local"), 1);
  assert.equal(requests("narinfo", "GET", "miss"), 1);
  assert.equal(requests("nar", "GET", "hit_local"), 1);
  assert.equal(requests("nar", "GET", "client_error"), 1);
  assert.equal(value(e, "fleetcache_nar_bytes_served_total", { source: "local" }), info!.narSize);
  assert.equal(value(e, "fleetcache_nar_bytes_served_total", { source: "peer" }), 0);
  assert.equal(value(e, "fleetcache_store_paths"), 1);
  assert.equal(value(e, "fleetcache_peers_connected"), 0);
  assert.equal(value(e, "fleetcache_peers_known"), 0);
  for (const n of ["fleetcache_peer_bytes_received_total", "fleetcache_peer_bytes_sent_total", "fleetcache_nar_transfer_failures_total", "fleetcache_nar_failovers_total", "fleetcache_peer_queries_total", "fleetcache_peer_connections_refused_total", "fleetcache_peer_paths_announced"]) {
    assert.equal(value(e, n), 0, n);
  }
  assert.ok(value(e, "fleetcache_process_cpu_seconds_total")! > 0, "default process metrics, prefixed");

  // The histogram: cumulative buckets ending in +Inf, which equals _count.
  const h = "fleetcache_http_request_duration_seconds";
  assert.equal(e.types.get(h), "histogram");
  for (const [route, outcome] of [["narinfo", "hit_local"], ["narinfo", "miss"], ["nar", "hit_local"], ["nar", "client_error"]] as const) {
    const buckets = e.samples.filter((s) => s.name === `${h}_bucket` && s.labels.route === route && s.labels.outcome === outcome);
    assert.ok(buckets.length > 10, `${route}/${outcome}: buckets`);
    const les = buckets.map((b) => Number(b.labels.le === "+Inf" ? Infinity : b.labels.le));
    assert.deepEqual(les, [...les].sort((a, b) => a - b), "buckets in order");
    assert.equal(les.at(-1), Infinity);
    for (let i = 1; i < buckets.length; i++) assert.ok(buckets[i]!.value >= buckets[i - 1]!.value, "cumulative");
    assert.equal(buckets.at(-1)!.value, 1);
    assert.equal(value(e, `${h}_count`, { route, outcome }), 1);
    assert.ok(value(e, `${h}_sum`, { route, outcome })! > 0);
  }

  // Conventions: every sample belongs to a typed, documented fleetcache_ family; counters end in
  // _total; labels come from bounded sets (no path or hash ever reaches a label).
  const routes = new Set(["narinfo", "nar", "nix-cache-info", "ls", "log", "serve", "health", "version", "status", "metrics", "dashboard", "other"]);
  const outcomes = new Set(["hit_local", "hit_peer", "miss", "ok", "client_error", "server_error", "aborted"]);
  for (const s of e.samples) {
    const family = familyOf(e, s.name);
    assert.ok(family, `${s.name} has a TYPE`);
    assert.ok(family.startsWith("fleetcache_"), family);
    assert.ok(e.helps.get(family), `${family} has HELP`);
    if (e.types.get(family) === "counter") assert.match(family, /_total$/);
    if (s.labels.route !== undefined) assert.ok(routes.has(s.labels.route), s.labels.route);
    if (s.labels.outcome !== undefined) assert.ok(outcomes.has(s.labels.outcome), s.labels.outcome);
    for (const v of Object.values(s.labels)) assert.ok(!/[0-9a-df-np-sv-z]{32}/.test(v), `no hashes in labels: ${v}`);
  }
  for (const [name, type] of e.types) {
    if (name.startsWith("fleetcache_http") || name.startsWith("fleetcache_nar") || name.startsWith("fleetcache_peer")) {
      assert.ok(type !== "counter" || /_(total)$/.test(name), name);
    }
    assert.ok(!/_seconds_total$/.test(name) || type === "counter", name);
  }

  // The status document agrees.
  const status = (await (await get("/api/v1/status")).json()) as { self: { listen: string; paths: number }; counters: Record<string, number>; recentErrors: unknown[] };
  assert.equal(status.self.listen, `127.0.0.1:${agent.port}`);
  assert.equal(status.self.paths, 1);
  assert.equal(status.counters.narinfoHitsLocal, 1);
  assert.equal(status.counters.narinfoMisses, 1);
  assert.equal(status.counters.narinfoHitsPeer, 0);
  assert.equal(status.counters.narBytesServed, info!.narSize);
  assert.deepEqual(status.recentErrors, []);
});

test("a blocked event loop shows in fleetcache_event_loop_delay_seconds, whoever scraped in between", async () => {
  const metrics = new AgentMetrics({ storePaths: () => 0, peers: () => [], mesh: () => undefined });
  try {
    // Only this family: prom-client's own event-loop gauges read "Nan" when two scrapes come
    // within its 10 ms sampling interval, as here.
    const scrape = async () =>
      parseExposition((await metrics.text()).split("\n").filter((l) => l.includes("fleetcache_event_loop_delay_seconds")).join("\n"));
    const before = await scrape();
    assert.equal(before.types.get("fleetcache_event_loop_delay_seconds"), "histogram");
    const over = (e: Exposition, le: string) =>
      value(e, "fleetcache_event_loop_delay_seconds_count")! - value(e, "fleetcache_event_loop_delay_seconds_bucket", { le })!;
    assert.equal(over(before, "0.25"), 0, "no delay over 250 ms yet");
    // Block the loop for 400 ms (as a synchronous rescan of a big store did), with a scrape in
    // between that resets prom-client's own max gauge.
    await sleep(100); // the monitor measures from its first tick on
    const start = Date.now();
    while (Date.now() - start < 400);
    await scrape();
    await sleep(2200); // the per-second sample, taken after the stall
    const after = await scrape();
    assert.equal(over(after, "0.25"), 1, "one second's longest delay was over 250 ms");
    assert.ok(value(after, "fleetcache_event_loop_delay_seconds_sum")! >= 0.39);
    assert.ok(value(after, "fleetcache_event_loop_delay_seconds_count")! >= 2, "one sample a second");
  } finally {
    metrics.close();
  }
});

test("/metrics and /api/v1/status refuse a client that is not on loopback", async (t) => {
  if (!(await needNix(t))) return;
  const own = Object.values(networkInterfaces())
    .flat()
    .find((a) => a && a.family === "IPv4" && !a.internal)?.address;
  if (!own) return t.skip("this machine has no non-loopback IPv4 address");
  const tmp = tempDir();
  t.after(tmp.cleanup);
  writeFileSync(join(tmp.dir, "f"), "x\n");
  const storeRoot = join(tmp.dir, "store");
  await addToStore(storeRoot, join(tmp.dir, "f"));
  const agent = await startAgentProcess(["--listen", "0.0.0.0:0", "--store-root", storeRoot, "--state-dir", join(tmp.dir, "state")]);
  t.after(() => agent.stop());
  // Connecting to our own address, the agent sees that address as the client's: not loopback.
  const remote = `http://${own}:${agent.port}`;
  assert.equal((await fetch(`${remote}/nix-cache-info`)).status, 200, "the cache itself answers there");
  assert.equal((await fetch(`${remote}/metrics`)).status, 403);
  assert.equal((await fetch(`${remote}/api/v1/status`)).status, 403);
  assert.equal((await fetch(`${agent.url}/metrics`)).status, 200);
  assert.equal((await fetch(`${agent.url}/api/v1/status`)).status, 200);
});
