// One Ed25519 key per host is both its Nix signing key and its libp2p identity, so the list of
// trusted Nix public keys is also the list of peers allowed to connect.
import { generateKeyPairFromSeed, publicKeyFromRaw } from "@libp2p/crypto/keys";
import { peerIdFromPublicKey } from "@libp2p/peer-id";
import type { Ed25519PrivateKey, PeerId } from "@libp2p/interface";
import type { PublicKey, SecretKey } from "../../protocol/keys.js";

/**
 * The libp2p private key for a Nix secret key. Derived from the seed (not from the stored
 * public half), and checked against it, so a key file with a mismatched half cannot make us
 * claim one identity and prove another.
 */
export async function libp2pPrivateKey(key: SecretKey): Promise<Ed25519PrivateKey> {
  if (key.seed.length !== 32 || key.publicKey.length !== 32) {
    throw new Error(`invalid secret key "${key.name}": expected a 32-byte seed and public key`);
  }
  const priv = await generateKeyPairFromSeed("Ed25519", key.seed);
  if (!equalBytes(priv.publicKey.raw, key.publicKey)) {
    throw new Error(`invalid secret key "${key.name}": its public half does not match its seed`);
  }
  return priv;
}

/** The libp2p peer ID of a host whose Nix public key is `key`. */
export function peerIdOf(key: PublicKey): PeerId {
  if (key.publicKey.length !== 32) throw new Error(`invalid public key "${key.name}": expected 32 bytes`);
  return peerIdFromPublicKey(publicKeyFromRaw(key.publicKey));
}

/**
 * Peer ID string -> the Nix public key it is derived from. Two names for the same key bytes
 * map to one peer; the first name wins (names only matter for signatures, not for transport).
 */
export function trustedPeers(publicKeys: readonly PublicKey[]): Map<string, PublicKey> {
  const map = new Map<string, PublicKey>();
  for (const key of publicKeys) {
    const id = peerIdOf(key).toString();
    if (!map.has(id)) map.set(id, key);
  }
  return map;
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((v, i) => v === b[i]);
}
