// Agent configuration: command-line flags over environment variables over the TOML file over
// defaults. Every setting has all three spellings (flag --store-root, env FLEETCACHE_STORE_ROOT,
// TOML store_root) so that the CLI, systemd units and the NixOS module can each use what suits.
import { readFileSync } from "node:fs";
import { parse as parseToml } from "smol-toml";

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
}

export const DEFAULT_PORT = 37515;

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
  if (!items || items.some((i) => typeof i !== "string" || i === "")) throw new ConfigError(`${from}: expected a list of file paths`);
  return items as string[];
}

function priority(raw: unknown, from: string): number {
  const n = typeof raw === "number" ? raw : typeof raw === "string" && /^\d+$/.test(raw) ? Number(raw) : NaN;
  if (!Number.isInteger(n) || n < 0 || n > 10000) throw new ConfigError(`${from}: expected an integer between 0 and 10000`);
  return n;
}

export function parseListen(raw: unknown, from = "listen"): ListenAddress {
  const s = str(raw, from);
  const m = /^(?:\[([0-9a-fA-F:.]+)\]|([^:\[\]]+)):(\d{1,5})$/.exec(s);
  const port = m ? Number(m[3]) : NaN;
  if (!m || port > 65535) throw new ConfigError(`${from}: expected ADDR:PORT (e.g. 127.0.0.1:${DEFAULT_PORT} or [::1]:${DEFAULT_PORT}), got ${JSON.stringify(s)}`);
  return { host: (m[1] ?? m[2])!, port };
}

const SETTINGS: { [K in keyof AgentConfig]: Setting<K> } = {
  listen: { key: "listen", toml: "listen", env: "FLEETCACHE_LISTEN", parse: parseListen },
  storeRoot: { key: "storeRoot", toml: "store_root", env: "FLEETCACHE_STORE_ROOT", parse: str },
  signKeyFiles: { key: "signKeyFiles", toml: "sign_key", env: "FLEETCACHE_SIGN_KEY", parse: list },
  stateDir: { key: "stateDir", toml: "state_dir", env: "FLEETCACHE_STATE_DIR", parse: str },
  priority: { key: "priority", toml: "priority", env: "FLEETCACHE_PRIORITY", parse: priority },
};

export const DEFAULTS: AgentConfig = {
  listen: { host: "127.0.0.1", port: DEFAULT_PORT },
  storeRoot: "/",
  signKeyFiles: [],
  stateDir: "/var/lib/fleetcache",
  priority: 30,
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

function kebab(s: string): string {
  return s.replace(/[A-Z]/g, (c) => "-" + c.toLowerCase()).replace("sign-key-files", "sign-key");
}
