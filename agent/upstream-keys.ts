// The upstream keys the trust policy goes by (mesh/trust-policy.ts): as configured, or by default
// the keys Nix itself trusts (trusted-public-keys, read with `nix config show` as doctor does)
// that are not the fleet's. Fleet keys are never upstream keys, even when configured as such:
// every fleet host signs all it serves, so one would make any fleet answer "upstream-signed".
import { parsePublicKey, type PublicKey } from "../protocol/keys.js";
import { listSetting, readNixConfig } from "./commands/nix-config.js";
import type { AgentConfig } from "./config.js";
import type { Logger } from "./log.js";

export async function resolveUpstreamKeys(config: Pick<AgentConfig, "upstreamKeys" | "trustedKeys">, own: readonly PublicKey[], log: Logger): Promise<PublicKey[]> {
  let texts = config.upstreamKeys;
  const fromNix = texts === null;
  if (texts === null) {
    try {
      texts = listSetting((await readNixConfig()).settings, "trusted-public-keys");
    } catch (e) {
      log.warn({ err: (e as Error).message }, "cannot read Nix's trusted-public-keys for the default upstream keys: none, so a fleet signature is enough for any path (set upstream_keys)");
      texts = [];
    }
  }
  const fleet = [...config.trustedKeys.map(parsePublicKey), ...own];
  const { keys, notKeys, fleetKeys } = upstreamKeysAmong(texts, fleet);
  for (const t of notKeys) log.warn({ key: t }, "ignoring a trusted-public-keys entry of Nix's that is not a public key");
  if (!fromNix) for (const t of fleetKeys) log.warn({ key: t }, "upstream_keys names a fleet key (by name or bytes): not used as an upstream key");
  log.info({ upstreamKeys: keys.map((k) => k.name), from: fromNix ? "nix trusted-public-keys" : "configuration" }, "trust: upstream keys");
  if (keys.length === 0) {
    log.warn({}, "trust: no upstream key (Nix trusts only fleet keys, or upstream_keys is none): every path is fleet-only, and one compromised fleet host can serve forgeries of any path (README: Trust; `fleetcache doctor`)");
  }
  return keys;
}

/**
 * The upstream keys among `texts` ("name:base64"): those that parse and are not fleet keys (by
 * name or bytes). Also doctor's rule (commands/doctor.ts), so both see the same keys.
 */
export function upstreamKeysAmong(texts: readonly string[], fleet: readonly PublicKey[]): { keys: PublicKey[]; notKeys: string[]; fleetKeys: string[] } {
  const isFleet = (k: PublicKey) => fleet.some((f) => f.name === k.name || Buffer.from(f.publicKey).equals(Buffer.from(k.publicKey)));
  const out = { keys: [] as PublicKey[], notKeys: [] as string[], fleetKeys: [] as string[] };
  for (const t of texts) {
    let k: PublicKey;
    try {
      k = parsePublicKey(t);
    } catch {
      out.notKeys.push(t);
      continue;
    }
    if (isFleet(k)) out.fleetKeys.push(t);
    else out.keys.push(k);
  }
  return out;
}
