// Secret key files on disk, in Nix's format ("name:base64", as nix-store --generate-binary-cache-key
// writes them), and the host key the agent makes for itself when none is configured.
import { existsSync, mkdirSync, readFileSync, renameSync, statSync, writeFileSync } from "node:fs";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import { formatPublicKey, formatSecretKey, generateKeyPair, parseSecretKey, type SecretKey } from "../protocol/keys.js";
import type { Logger } from "./log.js";

export const HOST_KEY_FILE = "host-key.sec";

export function readSecretKeyFile(path: string, log?: Logger): SecretKey {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (e) {
    throw new Error(`cannot read sign key ${path}: ${(e as Error).message}`);
  }
  const mode = statSync(path).mode & 0o777;
  if (mode & 0o077) log?.warn({ path, mode: mode.toString(8) }, "sign key file is readable by other users; chmod 600 it");
  try {
    return parseSecretKey(text.trim());
  } catch (e) {
    throw new Error(`${path}: not a Nix secret key (expected NAME:BASE64 as written by nix-store --generate-binary-cache-key): ${(e as Error).message}`);
  }
}

/** Writes a secret key file readable only by its owner; refuses to overwrite unless asked. */
export function writeSecretKeyFile(path: string, key: SecretKey, overwrite = false): void {
  if (!overwrite && existsSync(path)) throw new Error(`${path} already exists (use --force to overwrite)`);
  mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
  // Written under another name with its final mode, then renamed: never a readable partial key.
  const tmp = `${path}.tmp-${process.pid}`;
  writeFileSync(tmp, formatSecretKey(key), { mode: 0o600, flag: "w" });
  renameSync(tmp, path);
}

/** The agent's own key in its state directory, created on first start. */
export function ensureHostKey(stateDir: string, log: Logger): SecretKey {
  const path = join(stateDir, HOST_KEY_FILE);
  if (existsSync(path)) return readSecretKeyFile(path, log);
  const name = `${hostname().split(".")[0] || "host"}-fleetcache-1`;
  const key = generateKeyPair(name);
  writeSecretKeyFile(path, key);
  writeFileSync(join(stateDir, "host-key.pub"), formatPublicKey(key));
  log.info({ path, publicKey: formatPublicKey(key) }, "created this host's signing key; add its public key to the fleet's trusted keys");
  return key;
}
