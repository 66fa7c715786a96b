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
  const isFleet = (k: PublicKey) => fleet.some((f) => f.name === k.name || Buffer.from(f.publicKey).equals(Buffer.from(k.publicKey)));
  const keys: PublicKey[] = [];
  for (const t of texts) {
    let k: PublicKey;
    try {
      k = parsePublicKey(t);
    } catch {
      log.warn({ key: t }, "ignoring a trusted-public-keys entry of Nix's that is not a public key");
      continue;
    }
    if (isFleet(k)) {
      if (!fromNix) log.warn({ key: t }, "upstream_keys names a fleet key (by name or bytes): not used as an upstream key");
      continue;
    }
    keys.push(k);
  }
  log.info({ upstreamKeys: keys.map((k) => k.name), from: fromNix ? "nix trusted-public-keys" : "configuration" }, "trust: upstream keys");
  return keys;
}
