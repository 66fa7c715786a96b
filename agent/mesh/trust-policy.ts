// Which peer narinfo to believe. Every fleet host signs all it serves with its own key, and Nix
// trusts the fleet's keys (it must, for the fleet's own builds), so a fleet signature only says
// "a fleet member vouches for this"; one compromised member could vouch for anything. A signature
// by an upstream key (cache.nixos.org-1, ...) says what a path's contents are. Hence:
//
// - an answer carrying a valid upstream signature is taken as it is;
// - so is one whose CA field makes its store path name its NAR hash and references
//   (protocol/content-address.ts: no other contents can go by that name, so nobody needs to vouch
//   for them, and the other holders are not waited for); it is preferred to other fleet-only ones;
// - an answer with fleet signatures only is taken only when nothing shows the path to be
//   upstream-signed with other contents: no other holder's upstream-signed answer, and (when
//   upstream caches are configured) not the upstream cache's own narinfo. When such evidence
//   exists, a fleet-only answer must match it (same fingerprint: store path, NarHash, NarSize,
//   references) and is then served with the upstream signatures, so Nix checks those; answers
//   that disagree lose, and their holders are penalised.
//
// The decision is a pure function of the answers gathered (FleetSource gathers them).
import { namesOwnContents } from "../../protocol/content-address.js";
import { fingerprint, type Narinfo } from "../../protocol/narinfo.js";
import { Verifier, type PublicKey } from "../../protocol/keys.js";
import type { UpstreamCheck } from "./upstream-check.js";

export interface PeerAnswer {
  peer: string;
  narinfo: Narinfo;
}

export interface Verdict {
  /** The answer to serve (its sigs completed with upstream's when it matched upstream's narinfo), if any. */
  chosen?: PeerAnswer;
  /** Holders whose fleet-only answers contradict an upstream signature. */
  losers: string[];
  /** Fingerprints upstream signed, as far as the answers showed (late answers are judged by them). */
  upstreamSigned: ReadonlySet<string>;
}

/** Fleet-only answers that agree are asked of at most this many holders per lookup. */
export const MAX_HOLDERS_ASKED = 8;

export class TrustPolicy {
  /**
   * @param upstreamKeys keys of upstream caches (never the fleet's: those are removed by the caller)
   * @param upstream optional check against the upstream caches' own narinfos
   */
  constructor(
    readonly upstreamKeys: readonly PublicKey[],
    readonly upstream?: UpstreamCheck,
  ) {
    this.#keys = new Verifier(upstreamKeys);
  }

  readonly #keys: Verifier;

  /** Without upstream keys nothing can be told apart: the first verified answer is as good as any. */
  get corroborates(): boolean {
    return this.upstreamKeys.length > 0;
  }

  /** The signatures of `n` that verify with an upstream key (worked out once per narinfo, as `decide` asks again). */
  upstreamSigs(n: Narinfo): string[] {
    if (this.upstreamKeys.length === 0) return [];
    let sigs = this.#verified.get(n);
    if (!sigs) {
      const fp = fingerprint(n);
      sigs = n.sigs.filter((s) => this.#keys.verify(fp, s));
      this.#verified.set(n, sigs);
    }
    return sigs;
  }

  readonly #verified = new WeakMap<Narinfo, string[]>();

  /**
   * Whether `n` settles a lookup by itself: without upstream keys every verified answer does; else
   * one with an upstream signature, or one whose store path names its contents (no holder's
   * answer could show other contents for that path).
   */
  conclusive(n: Narinfo): boolean {
    return !this.corroborates || this.upstreamSigs(n).length > 0 || namesOwnContents(n);
  }

  /**
   * Decides a lookup. `answers` are in the order the holders are preferred (fastest first);
   * `upstream` is the upstream cache's narinfo for the path, already verified, when it has one.
   */
  decide(answers: readonly PeerAnswer[], upstream?: Narinfo): Verdict {
    // What upstream signed: fingerprint -> its upstream signatures.
    const signed = new Map<string, string[]>();
    const note = (n: Narinfo, sigs: string[]) => {
      if (sigs.length === 0) return;
      const fp = fingerprint(n);
      signed.set(fp, [...new Set([...(signed.get(fp) ?? []), ...sigs])]);
    };
    for (const a of answers) note(a.narinfo, this.upstreamSigs(a.narinfo));
    if (upstream) note(upstream, this.upstreamSigs(upstream));
    const upstreamSigned = new Set(signed.keys());
    if (signed.size === 0) {
      // Nothing upstream-signed: a fleet build, or a content-addressed path. An answer whose name
      // proves its contents wins over the others (a forger may leave the CA field out), else the fastest.
      const chosen = answers.find((a) => namesOwnContents(a.narinfo)) ?? answers[0];
      return chosen ? { chosen, losers: [], upstreamSigned } : { losers: [], upstreamSigned };
    }

    const losers = answers.filter((a) => this.contradicts(a.narinfo, upstreamSigned)).map((a) => a.peer);
    // An answer that carries an upstream signature itself first, then one that matches upstream's.
    const carrying = answers.find((a) => this.upstreamSigs(a.narinfo).length > 0);
    if (carrying) return { chosen: carrying, losers, upstreamSigned };
    const matching = answers.find((a) => signed.has(fingerprint(a.narinfo)));
    if (!matching) return { losers, upstreamSigned };
    const sigs = [...new Set([...matching.narinfo.sigs, ...signed.get(fingerprint(matching.narinfo))!])];
    return { chosen: { peer: matching.peer, narinfo: { ...matching.narinfo, sigs } }, losers, upstreamSigned };
  }

  /** Whether `n`, signed by fleet keys only, disagrees with what upstream signed (`upstreamSigned` fingerprints). */
  contradicts(n: Narinfo, upstreamSigned: ReadonlySet<string>): boolean {
    return upstreamSigned.size > 0 && this.upstreamSigs(n).length === 0 && !upstreamSigned.has(fingerprint(n));
  }
}
