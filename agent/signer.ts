// Signs path fingerprints with this agent's keys. Ed25519 signatures are deterministic, so each
// fingerprint is signed once and the result kept: repeated narinfo requests cost a map lookup.
import { sign, type SecretKey } from "../protocol/keys.js";

const MAX_CACHED = 100_000;

export class Signer {
  private readonly cache = new Map<string, string[]>();

  constructor(readonly keys: SecretKey[]) {}

  /** Our signatures ("name:base64") for a fingerprint. */
  signatures(fingerprint: string): string[] {
    let sigs = this.cache.get(fingerprint);
    if (!sigs) {
      sigs = this.keys.map((k) => sign(k, fingerprint));
      // The fingerprint includes the NAR hash, so a replaced path gets a new entry; evict oldest.
      if (this.cache.size >= MAX_CACHED) this.cache.delete(this.cache.keys().next().value!);
      this.cache.set(fingerprint, sigs);
    }
    return sigs;
  }
}
