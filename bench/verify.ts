// What one narinfo signature check costs: the pure-JS @noble/ed25519 verification the agent used
// before against node:crypto's (Verifier, protocol/keys.ts), on a real fingerprint with ten
// references. Rounds alternate between the two so a busy machine hurts both alike.
//
//   npx tsc -p . && node dist/bench/verify.js [--rounds 9] [--per-round 200]
//
// Prints per-verify time (median and best round) for each.
import * as ed from "@noble/ed25519";
import { generateKeyPair, sign, Verifier } from "../protocol/keys.js";
import { fingerprint } from "../protocol/narinfo.js";

function arg(name: string, fallback: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && process.argv[i + 1] ? process.argv[i + 1]! : fallback;
}
const ROUNDS = Number(arg("rounds", "9"));
const PER_ROUND = Number(arg("per-round", "200"));

const key = generateKeyPair("cache.example.org-1");
const refs = Array.from({ length: 10 }, (_, i) => `/nix/store/${String(i).repeat(32).slice(0, 32).replace(/[eotu]/g, "a")}-dep-${i}`);
const fp = fingerprint({ storePath: refs[0]!, narHash: "sha256:" + "1".repeat(52), narSize: 123456, references: refs, sigs: [] });
const sig = sign(key, fp);
const raw = Buffer.from(sig.slice(sig.indexOf(":") + 1), "base64");
const msg = new TextEncoder().encode(fp);
const verifier = new Verifier([key]);

const ways: Record<string, () => boolean> = {
  // As protocol/keys.ts verified before (RFC 8032 rules, no ZIP 215).
  "@noble/ed25519 (before)": () => ed.verify(raw, msg, key.publicKey, { zip215: false }),
  "node:crypto Verifier (now)": () => verifier.verify(fp, sig),
};

const times = new Map<string, number[]>(Object.keys(ways).map((k) => [k, []]));
for (let r = 0; r < ROUNDS; r++) {
  for (const [name, fn] of Object.entries(ways)) {
    const t0 = process.hrtime.bigint();
    for (let i = 0; i < PER_ROUND; i++) if (!fn()) throw new Error(`${name}: a valid signature did not verify`);
    times.get(name)!.push(Number(process.hrtime.bigint() - t0) / 1e3 / PER_ROUND);
  }
}
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
for (const [name, xs] of times) {
  console.log(`${name.padEnd(28)} median ${median(xs).toFixed(0).padStart(5)} µs per verify, best round ${Math.min(...xs).toFixed(0).padStart(5)} µs (${ROUNDS} rounds of ${PER_ROUND})`);
}
