// Nix's effective configuration, as `nix show-config --json` reports it (the files, NIX_CONFIG,
// NIX_CONF_DIR and NIX_USER_CONF_FILES all applied by Nix itself, so we read what Nix will use).
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";

const execFileP = promisify(execFile);

export type NixSettings = Map<string, unknown>;

/**
 * Runs `nix show-config --json`. With `confFile`, Nix reads that file alone (through a temporary
 * NIX_CONF_DIR whose nix.conf includes it; no user files, no NIX_CONFIG).
 */
export async function readNixConfig(confFile?: string): Promise<NixSettings> {
  let env: NodeJS.ProcessEnv = process.env;
  let tmp: string | undefined;
  if (confFile) {
    tmp = mkdtempSync(join(tmpdir(), "fleetcache-nixconf-"));
    writeFileSync(join(tmp, "nix.conf"), `include ${resolve(confFile)}\n`);
    env = { ...process.env, NIX_CONF_DIR: tmp, NIX_USER_CONF_FILES: join(tmp, "none.conf") };
    delete env.NIX_CONFIG;
  }
  try {
    const { stdout } = await execFileP("nix", ["--extra-experimental-features", "nix-command", "show-config", "--json"], { env, maxBuffer: 16 << 20 });
    return parseShowConfig(stdout);
  } catch (e) {
    const err = e as { code?: string; stderr?: string; message: string };
    if (err.code === "ENOENT") throw new Error("`nix` is not on PATH");
    throw new Error(`nix show-config failed: ${(err.stderr || err.message).trim().split("\n").slice(-3).join(" ")}`);
  } finally {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  }
}

/** Nix 2.8+ writes {name: {value, defaultValue, ...}}; older Nix wrote {name: value}. */
export function parseShowConfig(json: string): NixSettings {
  const doc = JSON.parse(json) as Record<string, unknown>;
  const settings: NixSettings = new Map();
  for (const [k, v] of Object.entries(doc)) {
    settings.set(k, v && typeof v === "object" && !Array.isArray(v) && "value" in v ? (v as { value: unknown }).value : v);
  }
  return settings;
}

/** A list setting (Nix gives arrays; a string is split on whitespace). */
export function listSetting(s: NixSettings, name: string): string[] {
  const v = s.get(name);
  if (Array.isArray(v)) return v.map(String);
  if (typeof v === "string") return v.split(/\s+/).filter(Boolean);
  return [];
}

export function numberSetting(s: NixSettings, name: string): number | undefined {
  const v = s.get(name);
  const n = typeof v === "number" ? v : typeof v === "string" && /^\d+$/.test(v) ? Number(v) : NaN;
  return Number.isFinite(n) ? n : undefined;
}
