// `fleetcache doctor`: checks that this host's agent works and that Nix actually uses it, each
// with a plain verdict and, when something is wrong, the fix in one sentence.
import { accessSync, constants, statSync } from "node:fs";
import { join } from "node:path";
import { ConfigError, loadConfig, type AgentConfig } from "../config.js";
import { parsePublicKey, type PublicKey } from "../../protocol/keys.js";
import { upstreamKeysAmong } from "../upstream-keys.js";
import { AgentError, agentGet, agentJson, agentUrl, parseCacheInfo } from "./agent-client.js";
import { boolSetting, listSetting, numberSetting, readNixConfig, type NixSettings } from "./nix-config.js";
import { readStatus, type StatusView } from "./status-doc.js";

export type Verdict = "ok" | "warn" | "FAIL" | "skip";

export interface CheckResult {
  check: string;
  verdict: Verdict;
  message: string;
  fix?: string;
}

export interface DoctorOptions {
  agent?: string;
  config?: string;
  nixConf?: string;
  storeRoot?: string;
  json?: boolean;
}

const CACHE_NIXOS_ORG = "https://cache.nixos.org";
const CACHE_NIXOS_ORG_PRIORITY = 40;
/** Above this, a miss remembered by Nix hides paths peers build meanwhile for too long. */
const MAX_NEGATIVE_TTL = 60;
const NEGATIVE_TTL_FIX = "set narinfo-cache-negative-ttl = 30 in nix.conf";
const MESH_PORT = 37516;

/** Exit code: 1 when any check FAILs, else 0 (warnings alone are not failures). */
export async function runDoctor(opts: DoctorOptions, out: NodeJS.WritableStream = process.stdout): Promise<number> {
  const results = await doctor(opts);
  if (opts.json) {
    out.write(JSON.stringify(results, null, 2) + "\n");
  } else {
    const width = Math.max(...results.map((r) => r.check.length));
    for (const r of results) out.write(`${r.verdict.padEnd(4)}  ${r.check.padEnd(width)}  ${r.message}${r.fix ? ` Fix: ${r.fix}` : ""}\n`);
    const count = (v: Verdict) => results.filter((r) => r.verdict === v).length;
    out.write(`doctor: ${count("FAIL")} failed, ${count("warn")} warnings, ${count("ok")} ok${count("skip") ? `, ${count("skip")} skipped` : ""}\n`);
  }
  return results.some((r) => r.verdict === "FAIL") ? 1 : 0;
}

export async function doctor(opts: DoctorOptions): Promise<CheckResult[]> {
  const url = agentUrl(opts.agent);
  const results: CheckResult[] = [];
  const add = (check: string, verdict: Verdict, message: string, fix?: string) => results.push({ check, verdict, message, ...(fix ? { fix } : {}) });

  // The agent: alive, and a binary cache for /nix/store.
  const agent = await checkAgent(url);
  results.push(agent.result);
  let status: StatusView | undefined;
  let storeBackend: unknown;
  let statusProblem = "the agent does not answer";
  if (agent.ok) {
    try {
      const doc = await agentJson(url, "/api/v1/status");
      status = readStatus(doc);
      storeBackend = (doc as { self?: { storeBackend?: unknown } } | null)?.self?.storeBackend;
    } catch (e) {
      statusProblem = `its status is unavailable (${(e as Error).message})`;
    }
  }

  // The store.
  if (opts.storeRoot) {
    const db = join(opts.storeRoot, "nix/var/nix/db/db.sqlite");
    try {
      accessSync(db, constants.R_OK);
      add("store", "ok", `the Nix database ${db} is readable`);
    } catch (e) {
      add("store", "FAIL", `cannot read the Nix database ${db}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`,
        "run the agent (and this check) as a user that can read the store's database, or correct --store-root.");
    }
  } else if (!status) {
    add("store", "skip", `cannot tell: ${statusProblem}.`);
  } else if ((status.self.paths ?? 0) > 0) {
    add("store", "ok", `the agent reads the store: ${status.self.paths} valid paths`);
  } else {
    add("store", "warn", "the agent's store has no valid paths (wrong --store-root?)", "point --store-root at the root of the store Nix uses (/ for the system store).");
  }

  if (storeBackend === "database" || storeBackend === "daemon") {
    add("store-backend", "ok", storeBackend === "database"
      ? "the agent reads store metadata from the Nix database"
      : "the agent asks the Nix daemon for store metadata (it runs unprivileged; the database would be faster)");
  }

  // Nix's configuration.
  let nix: NixSettings | undefined;
  try {
    const read = await readNixConfig(opts.nixConf);
    nix = read.settings;
    // Only shown when Nix complains: a misspelled setting is ignored by Nix with just a warning.
    if (read.warnings.length) {
      add("nix-config", "warn", `Nix warns about its configuration: ${read.warnings.join("; ")}`,
        "correct or remove what Nix names in nix.conf (an unknown setting has no effect).");
    }
  } catch (e) {
    add("nix-config", "FAIL", `cannot read Nix's configuration: ${(e as Error).message}`, "install Nix (or put `nix` on PATH) and run `nix config show` (`nix show-config` on Nix 2.8) to see the problem.");
  }
  if (nix) {
    checkSubstituters(nix, url, agent.priority, add);
  }

  // The fleet's keys: this host's, the known peers', and the configured trusted keys.
  let config: AgentConfig | undefined;
  try {
    config = loadConfig({ configFile: opts.config, flags: {} });
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    add("agent-config", "FAIL", `the agent configuration is invalid: ${e.message}`, "fix the file or variable named, then `fleetcache agent --check-config`.");
  }
  if (nix) checkKeys(nix, status, statusProblem, config?.trustedKeys ?? [], add);
  if (nix) checkUpstreamKeys(nix, status, config, add);
  if (nix) {
    const ttl = numberSetting(nix, "narinfo-cache-negative-ttl");
    if (ttl === undefined) add("negative-ttl", "warn", "Nix does not report narinfo-cache-negative-ttl", `${NEGATIVE_TTL_FIX}.`);
    else if (ttl > MAX_NEGATIVE_TTL) {
      add("negative-ttl", "warn", `narinfo-cache-negative-ttl is ${ttl} s: after a miss Nix will not ask the fleet again for that long, even once a peer has the path.`,
        `${NEGATIVE_TTL_FIX} (what the modules set: Nix then asks each cache once per missing path in a run, and sees what a peer gains within half a minute; 0 asks every time, about three times as many questions to cache.nixos.org).`);
    } else add("negative-ttl", "ok", `narinfo-cache-negative-ttl is ${ttl} s`);
  }

  if (nix) checkCaseHack(nix, status, statusProblem, add);

  if (config) checkSignKeys(config, add);

  // Peers.
  if (!status) add("peers", "skip", `cannot tell: ${statusProblem}.`);
  else if (!status.self.peerId) add("peers", "ok", "the mesh is off (single-host cache)");
  else if (status.peers.length === 0) {
    add("peers", "warn", "no peers known", `give the agent a fleet member with --peer HOST:${MESH_PORT} (or enable mDNS/Tailscale), and open TCP ${MESH_PORT} between the hosts.`);
  } else {
    for (const p of status.peers) {
      if (p.connected) add(`peer ${p.name}`, "ok", `connected${p.rttMs !== undefined ? `, rtt ${p.rttMs.toFixed(1)} ms` : ""}`);
      else {
        add(`peer ${p.name}`, "warn", `not connected (addresses: ${p.addresses.join(" ") || "none known"})`,
          `check that its agent runs, that TCP ${MESH_PORT} is open between the hosts, and that --peer names its mesh address.`);
      }
    }
  }
  return results;
}

async function checkAgent(url: string): Promise<{ ok: boolean; priority?: number; result: CheckResult }> {
  const fail = (message: string): { ok: false; result: CheckResult } => ({
    ok: false,
    result: { check: "agent", verdict: "FAIL", message, fix: "start the agent (systemctl start fleetcache, or `fleetcache agent`) or pass --agent with its --listen URL." },
  });
  try {
    const health = await agentGet(url, "/health");
    if (health.status !== 200) return fail(`${url}/health answered ${health.status}`);
    const info = await agentGet(url, "/nix-cache-info");
    if (info.status !== 200) return fail(`${url}/nix-cache-info answered ${info.status}`);
    const fields = parseCacheInfo(info.body);
    if (fields.get("StoreDir") !== "/nix/store") {
      return { ok: false, result: { check: "agent", verdict: "FAIL", message: `${url} serves StoreDir ${fields.get("StoreDir") ?? "(none)"}, not /nix/store`, fix: "point --agent at a fleetcache agent serving /nix/store." } };
    }
    const p = Number(fields.get("Priority"));
    return { ok: true, ...(Number.isFinite(p) ? { priority: p } : {}), result: { check: "agent", verdict: "ok", message: `${url} answers (StoreDir /nix/store, Priority ${fields.get("Priority") ?? "?"})` } };
  } catch (e) {
    if (e instanceof AgentError) return fail(e.message);
    throw e;
  }
}

/** A substituter URL in a comparable form: lower-case, localhost as 127.0.0.1, no slash or query. */
function normalizeUrl(raw: string): { key: string; priority?: number } {
  try {
    const u = new URL(raw);
    const host = u.hostname === "localhost" ? "127.0.0.1" : u.hostname;
    const p = u.searchParams.get("priority");
    return { key: `${u.protocol}//${host}${u.port ? ":" + u.port : ""}${u.pathname.replace(/\/+$/, "")}`, ...(p !== null && /^\d+$/.test(p) ? { priority: Number(p) } : {}) };
  } catch {
    return { key: raw };
  }
}

function checkSubstituters(nix: NixSettings, url: string, agentPriority: number | undefined, add: (c: string, v: Verdict, m: string, f?: string) => void): void {
  const subs = listSetting(nix, "substituters");
  const mine = subs.map(normalizeUrl).find((s) => s.key === normalizeUrl(url).key);
  if (!mine) {
    add("substituters", "FAIL", `Nix does not use the agent: substituters = ${subs.join(" ") || "(none)"}`,
      `put it first in nix.conf: substituters = ${url} ${CACHE_NIXOS_ORG} (for a non-root user of the Nix daemon, also in trusted-substituters).`);
    add("priority", "skip", "the agent is not a substituter");
    return;
  }
  add("substituters", "ok", `Nix uses ${url}`);
  const effective = mine.priority ?? agentPriority;
  const upstream = subs.map(normalizeUrl).find((s) => s.key === CACHE_NIXOS_ORG);
  const upstreamPriority = upstream?.priority ?? CACHE_NIXOS_ORG_PRIORITY;
  if (effective === undefined) add("priority", "skip", "the agent's priority is unknown (it did not answer)");
  else if (effective < upstreamPriority) add("priority", "ok", `the agent's priority ${effective} comes before cache.nixos.org's ${upstreamPriority}`);
  else {
    add("priority", "warn", `the agent's priority ${effective} is not below cache.nixos.org's ${upstreamPriority}: Nix downloads from upstream what a peer already has`,
      `run the agent with --priority 30 (or write ${url}?priority=30 in substituters).`);
  }
}

function splitKey(k: string): { name: string; bytes: string } {
  const colon = k.indexOf(":");
  return colon < 0 ? { name: k, bytes: "" } : { name: k.slice(0, colon), bytes: k.slice(colon + 1).trim() };
}

function checkKeys(nix: NixSettings, status: StatusView | undefined, statusProblem: string, configured: string[], add: (c: string, v: Verdict, m: string, f?: string) => void): void {
  const trusted = listSetting(nix, "trusted-public-keys").map(splitKey);
  // The fleet: name -> its current key, labelled for messages.
  const fleet = new Map<string, { key: string; who: string }>();
  const member = (key: string | undefined, who: string) => {
    if (!key) return;
    const k = splitKey(key);
    if (!fleet.has(`${k.name}:${k.bytes}`)) fleet.set(`${k.name}:${k.bytes}`, { key: `${k.name}:${k.bytes}`, who });
  };
  member(status?.self.publicKey, "this host");
  for (const p of status?.peers ?? []) member(p.publicKey, `peer ${p.name}`);
  for (const k of configured) member(k, "configured fleet member");
  if (fleet.size === 0) {
    add("trusted-keys", "skip", `cannot tell the fleet's keys: ${statusProblem}, and no trusted keys are configured`);
    return;
  }
  const isTrusted = (key: string) => trusted.some((t) => `${t.name}:${t.bytes}` === key);
  const missing = [...fleet.values()].filter((m) => !isTrusted(m.key));
  if (missing.length === 0) add("trusted-keys", "ok", `Nix trusts all ${fleet.size} fleet keys`);
  else {
    add("trusted-keys", "FAIL", `Nix does not trust ${missing.map((m) => `${m.key.split(":")[0]} (${m.who})`).join(", ")}: it will refuse their paths`,
      `add to trusted-public-keys in nix.conf: ${missing.map((m) => m.key).join(" ")}`);
  }
  // The key-rotation mismatch: Nix trusts a key under a fleet member's name, but not the bytes
  // that member signs with now.
  const fleetByName = new Map<string, string[]>();
  for (const m of fleet.values()) fleetByName.set(splitKey(m.key).name, [...(fleetByName.get(splitKey(m.key).name) ?? []), m.key]);
  const stale = trusted.filter((t) => fleetByName.has(t.name) && !fleetByName.get(t.name)!.includes(`${t.name}:${t.bytes}`));
  if (stale.length === 0) add("stale-keys", "ok", "no trusted key names a fleet member with other key bytes");
  else {
    add("stale-keys", "warn", `Nix trusts ${stale.map((t) => `${t.name}:${t.bytes}`).join(", ")}, but that fleet member now signs with ${stale.map((t) => fleetByName.get(t.name)!.join(" or ")).join(", ")} (a rotated key?)`,
      "replace the old key with the current one in trusted-public-keys.");
  }
}

/**
 * The trust policy (README "Trust") tells a fleet member's forgery of an upstream path from
 * upstream's contents by the upstream keys: upstream_keys, or Nix's trusted-public-keys that are
 * not the fleet's (the agent's rule, upstream-keys.ts). With none, every path is fleet-only and
 * one compromised fleet host can serve forgeries of any path Nix asks the agent for.
 */
function checkUpstreamKeys(nix: NixSettings, status: StatusView | undefined, config: AgentConfig | undefined, add: (c: string, v: Verdict, m: string, f?: string) => void): void {
  const meshOff = status ? status.self.peerId === null : config?.p2pListen === null;
  if (meshOff) {
    add("upstream-keys", "ok", "the mesh is off: every path is this host's own");
    return;
  }
  const fleet: PublicKey[] = [];
  for (const k of [status?.self.publicKey, ...(status?.peers ?? []).map((p) => p.publicKey), ...(config?.trustedKeys ?? [])]) {
    try {
      if (k) fleet.push(parsePublicKey(k));
    } catch {
      // not a key: checkKeys reports what it can
    }
  }
  const configured = config?.upstreamKeys ?? null;
  const nixKeys = listSetting(nix, "trusted-public-keys");
  const { keys } = upstreamKeysAmong(configured ?? nixKeys, fleet);
  if (keys.length > 0) {
    add("upstream-keys", "ok", `the agent tells upstream paths by ${keys.map((k) => k.name).join(", ")} (${configured ? "upstream_keys" : "Nix's trusted-public-keys that are not fleet keys"})`);
    return;
  }
  const harm = "every path is fleet-only to the agent, so a single compromised fleet host can serve forged contents of any path, cache.nixos.org's included, and Nix accepts them for its fleet signature";
  const nixUpstream = upstreamKeysAmong(nixKeys, fleet).keys;
  const example = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY= for cache.nixos.org";
  if (configured && nixUpstream.length > 0) {
    add("upstream-keys", "warn", `upstream_keys is ${configured.length ? "only fleet keys" : "none"}, though Nix trusts ${nixUpstream.map((k) => k.name).join(", ")}: ${harm}.`,
      `remove upstream_keys from the agent's configuration (it then takes Nix's trusted-public-keys that are not fleet keys) and restart the agent; README "Trust".`);
  } else {
    // upstream_keys none as the NixOS and nix-darwin modules write it when Nix trusts only the fleet, or unset.
    add("upstream-keys", "warn", `Nix trusts no key but the fleet's (trusted-public-keys = ${nixKeys.join(" ") || "(none)"})${configured ? " and upstream_keys is none" : ", and upstream_keys is not set"}: ${harm}.`,
      `add the upstream caches' keys to trusted-public-keys in nix.conf (nix.settings.trusted-public-keys with the NixOS and nix-darwin modules; ${example}) and restart the agent, or set the agent's upstream_keys to them; README "Trust".`);
  }
}

/**
 * The agent must undo the case hack exactly when Nix does it: otherwise the names in the agent's
 * NARs differ from those Nix hashed (a suffix kept, or one cut that belongs to the name), and Nix
 * refuses every path that has such a name (NAR hash mismatch).
 */
function checkCaseHack(nix: NixSettings, status: StatusView | undefined, statusProblem: string, add: (c: string, v: Verdict, m: string, f?: string) => void): void {
  const nixHack = boolSetting(nix, "use-case-hack");
  const agentHack = status?.self.useCaseHack;
  const on = (b: boolean) => (b ? "on" : "off");
  if (nixHack === undefined) add("case-hack", "skip", "Nix does not report use-case-hack");
  else if (!status) add("case-hack", "skip", `cannot tell: ${statusProblem}.`);
  else if (agentHack === undefined) add("case-hack", "skip", "the agent does not report its use_case_hack (an older agent)");
  else if (agentHack === nixHack) add("case-hack", "ok", `use-case-hack is ${on(nixHack)} for Nix and the agent`);
  else {
    const harm = nixHack
      ? "names Nix stored with a ~nix~case~hack~N suffix (Foo beside foo) keep it in the agent's NARs"
      : "the agent cuts ~nix~case~hack~ from names that really contain it";
    add("case-hack", "FAIL", `Nix's use-case-hack is ${on(nixHack)} but the agent's use_case_hack is ${on(agentHack)}: ${harm}, and such NARs do not match their NarHash`,
      `run the agent with ${nixHack ? "--use-case-hack" : "--no-use-case-hack"} (use_case_hack = ${nixHack} in its TOML, or FLEETCACHE_USE_CASE_HACK=${nixHack}), as Nix writes the store.`);
  }
}

function checkSignKeys(config: AgentConfig, add: (c: string, v: Verdict, m: string, f?: string) => void): void {
  const files = config.signKeyFiles.length ? config.signKeyFiles : [join(config.stateDir, "host-key.sec")];
  for (const f of files) {
    let mode: number;
    try {
      mode = statSync(f).mode & 0o777;
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      add("sign-key", "warn", `cannot check ${f}: ${code ?? (e as Error).message}`,
        code === "ENOENT" && config.signKeyFiles.length === 0
          ? "pass --config (or FLEETCACHE_* variables) as the agent has them, or start the agent once to create its host key."
          : "pass --config (or FLEETCACHE_* variables) as the agent has them, and run doctor as a user that can see the file.");
      continue;
    }
    if (mode & 0o066) {
      add("sign-key", "FAIL", `${f} has mode ${mode.toString(8).padStart(4, "0")}: other users can read or change the key that signs for this host`, `chmod 600 ${f}`);
    } else add("sign-key", "ok", `${f} has mode ${mode.toString(8).padStart(4, "0")}`);
  }
}
