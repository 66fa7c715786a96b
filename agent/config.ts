// Agent configuration: command-line flags over environment variables over the TOML file over
// defaults. Every setting has all three spellings (flag --store-root, env FLEETCACHE_STORE_ROOT,
// TOML store_root) so that the CLI, systemd units and the NixOS module can each use what suits.
import { readFileSync } from "node:fs";
import { parse as parseToml } from "smol-toml";
import { parsePublicKey } from "../protocol/keys.js";
import { AddressError, meshListenAddr, parseHostPort, peerAddr } from "./address.js";
import { isUpstreamCacheUrl } from "./mesh/upstream-check.js";
import { COMPRESSION_MODES, type CompressionMode } from "./mesh/nar-compression.js";

export interface ListenAddress {
  host: string;
  port: number;
}

export interface AgentConfig {
  listen: ListenAddress;
  /** Root of the store's filesystem: "/" for the system store, DIR for a chroot store. */
  storeRoot: string;
  signKeyFiles: string[];
  stateDir: string;
  priority: number;
  /** libp2p listen address for the mesh ("ADDR:PORT" or a multiaddr); null: no mesh. */
  p2pListen: string | null;
  /** Peers to dial at start ("ADDR:PORT" or multiaddrs); others are found by discovery. */
  peers: string[];
  /** Nix public keys ("name:base64") of the fleet: the only peers let in, and whose signatures count. */
  trustedKeys: string[];
  mdns: boolean;
  /** Dial the online peers of `tailscale status --json` (tailnets have no multicast). */
  tailscale: boolean;
  /** Read the Tailscale status from this file instead of running `tailscale status --json`. */
  tailscaleStatusFile: string | null;
  /** Where store metadata comes from: "auto" picks the database when its directory is writable. */
  storeBackend: "auto" | "database" | "daemon";
  /** The Nix daemon's socket; null: <storeRoot>/nix/var/nix/daemon-socket/socket. */
  daemonSocket: string | null;
  /** Undo Nix's case hack (`use-case-hack`) when reading the store; as Nix: on for macOS. */
  useCaseHack: boolean;
  /** Summary keys a peer may send in a burst (then 20,000 a second) before it is disconnected. */
  summaryBudget: number;
  /** Seconds a lookup waits for a reconnecting peer that alone holds the path (0: answer 404 at once). */
  reconnectWait: number;
  /**
   * Nix public keys of the upstream caches this host trusts (cache.nixos.org-1:...): a peer's
   * narinfo for a path they signed must carry their signature. null: Nix's trusted-public-keys
   * that are not the fleet's, read at start.
   */
  upstreamKeys: string[] | null;
  /** Upstream caches (https://, http:// or file:// URLs) asked before a fleet-only narinfo is believed; none: no check. */
  upstreamCaches: string[];
  /** NAR transfers between agents: zstd when the link is slow (auto), whenever the peer can (zstd), never (off). */
  meshCompression: CompressionMode;
  /** NAR bodies between agents on the bulk port (mesh port + 1, TLS keyed by one-time tickets) instead of the mesh stream. */
  meshBulk: boolean;
  /** NAR bodies from this host's store sent with sendfile(2) when the addon is built (agent/http/send-file.ts). */
  sendfile: boolean;
  /**
   * LAN-direct NARs (trusted LANs only, both ends): as holder, a plain-HTTP direct port (mesh port
   * + 2) serving NARs to one-time tickets; as requester, Nix's NAR GET answered with a redirect
   * to an on-link holder's direct port. Off: NARs are relayed and verified by this agent.
   */
  directLan: boolean;
}

export const DEFAULT_PORT = 37515;
export const DEFAULT_P2P_PORT = 37516;

/** One setting: its TOML key, environment variable, and how to read a string form of it. */
interface Setting<K extends keyof AgentConfig> {
  key: K;
  toml: string;
  env: string;
  parse: (raw: unknown, from: string) => AgentConfig[K];
}

function str(raw: unknown, from: string): string {
  if (typeof raw !== "string" || raw === "") throw new ConfigError(`${from}: expected a non-empty string`);
  return raw;
}

function list(raw: unknown, from: string): string[] {
  // Arrays come from TOML and repeated flags; the environment gives one comma-separated string.
  const items = Array.isArray(raw) ? raw : typeof raw === "string" ? raw.split(",").map((s) => s.trim()).filter(Boolean) : null;
  if (!items || items.some((i) => typeof i !== "string" || i === "")) throw new ConfigError(`${from}: expected a list of strings`);
  return items as string[];
}

function bool(raw: unknown, from: string): boolean {
  if (typeof raw === "boolean") return raw;
  if (typeof raw === "string" && /^(true|1|yes|on)$/i.test(raw)) return true;
  if (typeof raw === "string" && /^(false|0|no|off)$/i.test(raw)) return false;
  throw new ConfigError(`${from}: expected true or false`);
}

/** Runs one of the address parsers (address.ts, shared with the mesh), as a configuration error. */
function address<T>(parse: (s: string) => T, s: string, from: string): T {
  try {
    return parse(s);
  } catch (e) {
    if (e instanceof AddressError) throw new ConfigError(`${from}: ${e.message}`);
    throw e;
  }
}

function p2pListen(raw: unknown, from: string): string | null {
  const s = str(raw, from);
  if (s === "off") return null;
  address(meshListenAddr, s, from); // exactly what the mesh will accept at start
  return s;
}

function peers(raw: unknown, from: string): string[] {
  const items = list(raw, from);
  for (const p of items) address(peerAddr, p, from);
  return items;
}

function optionalPath(raw: unknown, from: string): string | null {
  return raw === "" ? null : str(raw, from);
}

function storeBackend(raw: unknown, from: string): AgentConfig["storeBackend"] {
  const s = str(raw, from);
  if (s !== "auto" && s !== "database" && s !== "daemon") throw new ConfigError(`${from}: expected auto, database or daemon, got ${JSON.stringify(s)}`);
  return s;
}

function trustedKeys(raw: unknown, from: string): string[] {
  const keys = list(raw, from).map((k) => k.trim());
  for (const k of keys) {
    try {
      parsePublicKey(k);
    } catch (e) {
      throw new ConfigError(`${from}: "${k}" is not a Nix public key (NAME:BASE64 of 32 bytes): ${(e as Error).message}`);
    }
  }
  return keys;
}

/** Like trusted_keys; "none" (or an empty TOML list) says: no upstream keys, rather than Nix's. */
function upstreamKeys(raw: unknown, from: string): string[] {
  if (raw === "none" || (Array.isArray(raw) && raw.length === 1 && raw[0] === "none")) return [];
  if (Array.isArray(raw) && raw.length === 0) return [];
  return trustedKeys(raw, from);
}

function upstreamCaches(raw: unknown, from: string): string[] {
  const urls = list(raw, from);
  for (const u of urls) {
    if (!isUpstreamCacheUrl(u)) throw new ConfigError(`${from}: "${u}" is not an http://, https:// or file:// cache URL (without ?parameters)`);
  }
  return urls;
}

function priority(raw: unknown, from: string): number {
  const n = typeof raw === "number" ? raw : typeof raw === "string" && /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isInteger(n) || n < 0 || n > 10000) throw new ConfigError(`${from}: expected an integer between 0 and 10000`);
  return n;
}

function summaryBudget(raw: unknown, from: string): number {
  const n = typeof raw === "number" ? raw : typeof raw === "string" && /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isInteger(n) || n < 1_000 || n > 1_000_000_000) throw new ConfigError(`${from}: expected a number of keys between 1000 and 1000000000`);
  return n;
}

function reconnectWait(raw: unknown, from: string): number {
  const n = typeof raw === "number" ? raw : typeof raw === "string" && /^\d+(\.\d+)?$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isFinite(n) || n < 0 || n > 60) throw new ConfigError(`${from}: expected a number of seconds between 0 and 60`);
  return n;
}

function meshCompression(raw: unknown, from: string): CompressionMode {
  const s = str(raw, from);
  if (!(COMPRESSION_MODES as readonly string[]).includes(s)) throw new ConfigError(`${from}: expected auto, zstd or off, got ${JSON.stringify(s)}`);
  return s as CompressionMode;
}

export function parseListen(raw: unknown, from = "listen"): ListenAddress {
  const { host, port } = address(parseHostPort, str(raw, from), from);
  return { host, port };
}

const SETTINGS: { [K in keyof AgentConfig]: Setting<K> } = {
  listen: { key: "listen", toml: "listen", env: "FLEETCACHE_LISTEN", parse: parseListen },
  storeRoot: { key: "storeRoot", toml: "store_root", env: "FLEETCACHE_STORE_ROOT", parse: str },
  signKeyFiles: { key: "signKeyFiles", toml: "sign_key", env: "FLEETCACHE_SIGN_KEY", parse: list },
  stateDir: { key: "stateDir", toml: "state_dir", env: "FLEETCACHE_STATE_DIR", parse: str },
  priority: { key: "priority", toml: "priority", env: "FLEETCACHE_PRIORITY", parse: priority },
  p2pListen: { key: "p2pListen", toml: "p2p_listen", env: "FLEETCACHE_P2P_LISTEN", parse: p2pListen },
  peers: { key: "peers", toml: "peers", env: "FLEETCACHE_PEERS", parse: peers },
  trustedKeys: { key: "trustedKeys", toml: "trusted_keys", env: "FLEETCACHE_TRUSTED_KEYS", parse: trustedKeys },
  mdns: { key: "mdns", toml: "mdns", env: "FLEETCACHE_MDNS", parse: bool },
  tailscale: { key: "tailscale", toml: "tailscale", env: "FLEETCACHE_TAILSCALE", parse: bool },
  tailscaleStatusFile: { key: "tailscaleStatusFile", toml: "tailscale_status_file", env: "FLEETCACHE_TAILSCALE_STATUS_FILE", parse: optionalPath },
  storeBackend: { key: "storeBackend", toml: "store_backend", env: "FLEETCACHE_STORE_BACKEND", parse: storeBackend },
  daemonSocket: { key: "daemonSocket", toml: "daemon_socket", env: "FLEETCACHE_DAEMON_SOCKET", parse: optionalPath },
  useCaseHack: { key: "useCaseHack", toml: "use_case_hack", env: "FLEETCACHE_USE_CASE_HACK", parse: bool },
  summaryBudget: { key: "summaryBudget", toml: "summary_budget", env: "FLEETCACHE_SUMMARY_BUDGET", parse: summaryBudget },
  reconnectWait: { key: "reconnectWait", toml: "reconnect_wait", env: "FLEETCACHE_RECONNECT_WAIT", parse: reconnectWait },
  upstreamKeys: { key: "upstreamKeys", toml: "upstream_keys", env: "FLEETCACHE_UPSTREAM_KEYS", parse: upstreamKeys },
  upstreamCaches: { key: "upstreamCaches", toml: "upstream_caches", env: "FLEETCACHE_UPSTREAM_CACHES", parse: upstreamCaches },
  meshCompression: { key: "meshCompression", toml: "mesh_compression", env: "FLEETCACHE_MESH_COMPRESSION", parse: meshCompression },
  meshBulk: { key: "meshBulk", toml: "mesh_bulk", env: "FLEETCACHE_MESH_BULK", parse: bool },
  sendfile: { key: "sendfile", toml: "sendfile", env: "FLEETCACHE_SENDFILE", parse: bool },
  directLan: { key: "directLan", toml: "direct_lan", env: "FLEETCACHE_DIRECT_LAN", parse: bool },
};

export const DEFAULTS: AgentConfig = {
  listen: { host: "127.0.0.1", port: DEFAULT_PORT },
  storeRoot: "/",
  signKeyFiles: [],
  stateDir: "/var/lib/fleetcache",
  priority: 30,
  p2pListen: `0.0.0.0:${DEFAULT_P2P_PORT}`,
  peers: [],
  trustedKeys: [],
  mdns: true,
  tailscale: false,
  tailscaleStatusFile: null,
  storeBackend: "auto",
  daemonSocket: null,
  useCaseHack: process.platform === "darwin",
  summaryBudget: 2 * (1 << 22) + 65_536, // two snapshots of the largest summary (DEFAULT_SUMMARY_BUDGET)
  reconnectWait: 5, // an agent restart (FAULTS.md, restart-under-load), well under Nix's timeouts
  upstreamKeys: null,
  upstreamCaches: [],
  meshCompression: "auto",
  meshBulk: true,
  sendfile: true,
  directLan: false,
};

export class ConfigError extends Error {}

/** Flags as given on the command line (undefined when absent). */
export type ConfigFlags = { [K in keyof AgentConfig]?: unknown };

export function loadConfig(opts: { flags: ConfigFlags; configFile?: string; env?: NodeJS.ProcessEnv }): AgentConfig {
  const env = opts.env ?? process.env;
  const configFile = opts.configFile ?? env.FLEETCACHE_CONFIG;
  const file = configFile ? readTomlFile(configFile) : {};
  const known = new Set(Object.values(SETTINGS).map((s) => s.toml));
  for (const k of Object.keys(file)) {
    if (!known.has(k)) throw new ConfigError(`${configFile}: unknown setting "${k}" (known: ${[...known].join(", ")})`);
  }
  const config = { ...DEFAULTS } as Record<keyof AgentConfig, unknown>;
  for (const s of Object.values(SETTINGS) as Setting<keyof AgentConfig>[]) {
    const flag = opts.flags[s.key];
    const flagGiven = flag !== undefined && !(Array.isArray(flag) && flag.length === 0);
    if (flagGiven) config[s.key] = s.parse(flag, `--${kebab(s.key)}`);
    else if (env[s.env] !== undefined && env[s.env] !== "") config[s.key] = s.parse(env[s.env], s.env);
    else if (file[s.toml] !== undefined) config[s.key] = s.parse(file[s.toml], `${configFile}: ${s.toml}`);
  }
  return config as unknown as AgentConfig;
}

function readTomlFile(path: string): Record<string, unknown> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new ConfigError(`cannot read config file ${path}: ${(e as Error).message}`);
  }
  try {
    return parseToml(text) as Record<string, unknown>;
  } catch (e) {
    throw new ConfigError(`${path}: invalid TOML: ${(e as Error).message}`);
  }
}

/** The flag spelling of a setting, for messages. */
function kebab(s: string): string {
  const special: Record<string, string> = { signKeyFiles: "sign-key", peers: "peer", trustedKeys: "trusted-key", p2pListen: "p2p-listen", upstreamKeys: "upstream-key", upstreamCaches: "upstream-cache" };
  return special[s] ?? s.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase());
}
