// Nix's effective configuration, as `nix config show --json` reports it (the files, NIX_CONFIG,
// NIX_CONF_DIR and NIX_USER_CONF_FILES all applied by Nix itself, so we read what Nix will use),
// and the warnings Nix prints about it (an unknown setting is ignored with only a warning).
import { execFile } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { promisify } from "node:util";

const execFileP = promisify(execFile);

export type NixSettings = Map<string, unknown>;

export interface NixConfig {
  settings: NixSettings;
  /** Nix's warnings while reading its configuration, without the "warning: " prefix. */
  warnings: string[];
}

/**
 * Runs `nix config show --json`, or `nix show-config --json` on a Nix that has only that name
 * (2.8; current Nix still takes it, with a deprecation warning). Both print the same JSON. With
 * `confFile`, Nix reads that file alone (through a temporary NIX_CONF_DIR whose nix.conf includes
 * it; no user files, no NIX_CONFIG).
 */
export async function readNixConfig(confFile?: string): Promise<NixConfig> {
  let env: NodeJS.ProcessEnv = process.env;
  let tmp: string | undefined;
  if (confFile) {
    tmp = mkdtempSync(join(tmpdir(), "fleetcache-nixconf-"));
    writeFileSync(join(tmp, "nix.conf"), `include ${resolve(confFile)}\n`);
    env = { ...process.env, NIX_CONF_DIR: tmp, NIX_USER_CONF_FILES: join(tmp, "none.conf") };
    delete env.NIX_CONFIG;
  }
  try {
    let out = await runNix(["config", "show"], env);
    if ("failed" in out && UNKNOWN_COMMAND.test(out.failed)) out = await runNix(["show-config"], env);
    if ("failed" in out) throw new Error(out.failed);
    return { settings: parseShowConfig(out.stdout), warnings: nixWarnings(out.stderr) };
  } finally {
    if (tmp) rmSync(tmp, { recursive: true, force: true });
  }
}

/** What Nix 2.8 says to `nix config show`. */
const UNKNOWN_COMMAND = /'config' is not a recognised command/;

async function runNix(command: string[], env: NodeJS.ProcessEnv): Promise<{ stdout: string; stderr: string } | { failed: string }> {
  try {
    return await execFileP("nix", ["--extra-experimental-features", "nix-command", ...command, "--json"], { env, maxBuffer: 16 << 20, timeout: 30_000 });
  } catch (e) {
    const err = e as { code?: string; stderr?: string; message: string };
    if (err.code === "ENOENT") throw new Error("`nix` is not on PATH");
    return { failed: `nix ${command.join(" ")} failed: ${(err.stderr || err.message).trim().split("\n").filter((l) => !l.startsWith("Try '")).slice(-3).join(" ")}` };
  }
}

/** Nix 2.8 to 2.26 write {name: {value, defaultValue, ...}} (2.26 adds experimentalFeature); older Nix wrote {name: value}. */
export function parseShowConfig(json: string): NixSettings {
  const doc = JSON.parse(json) as Record<string, unknown>;
  const settings: NixSettings = new Map();
  for (const [k, v] of Object.entries(doc)) {
    settings.set(k, v && typeof v === "object" && !Array.isArray(v) && "value" in v ? (v as { value: unknown }).value : v);
  }
  return settings;
}

/** The distinct `warning: ...` lines of Nix's stderr. */
export function nixWarnings(stderr: string): string[] {
  // Nix colours its messages where it believes a terminal reads them.
  const plain = stderr.replace(/\x1b\[[0-9;]*m/g, "");
  const lines = plain.split("\n").map((l) => /^warning: (.*)$/.exec(l.trim())?.[1]).filter((l): l is string => Boolean(l));
  return [...new Set(lines)];
}

/** A list setting (Nix gives arrays; a string is split on whitespace). */
export function listSetting(s: NixSettings, name: string): string[] {
  const v = s.get(name);
  if (Array.isArray(v)) return v.map(String);
  if (typeof v === "string") return v.split(/\s+/).filter(Boolean);
  return [];
}

/** A boolean setting (Nix gives true/false; nix.conf spells them "true"/"false"). */
export function boolSetting(s: NixSettings, name: string): boolean | undefined {
  const v = s.get(name);
  return typeof v === "boolean" ? v : v === "true" ? true : v === "false" ? false : undefined;
}

export function numberSetting(s: NixSettings, name: string): number | undefined {
  const v = s.get(name);
  const n = typeof v === "number" ? v : typeof v === "string" && /^\d+$/.test(v) ? Number(v) : NaN;
  return Number.isFinite(n) ? n : undefined;
}
