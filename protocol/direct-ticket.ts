// Minted direct tickets (protocol/PEER-PROTOCOL.md, "Minted tickets"): a requester holding a
// minting key from a holder (NarDirectKey) makes tickets for that holder's direct port itself,
// without a round trip. Pure: the ticket's layout and its MAC.
//   ticket = key id (8) || nonce (12) || HMAC-SHA256(key, key id || nonce || URL tail)[:16]
// where the URL tail is "nar/<hash part>-<NAR hash>.nar": the MAC binds the ticket to one NAR.
import { createHmac, timingSafeEqual } from "node:crypto";

export const MINT_KEY_BYTES = 32;
export const MINT_KEY_ID_BYTES = 8;
export const MINT_NONCE_BYTES = 12;
export const MINT_MAC_BYTES = 16;
export const MINTED_TICKET_BYTES = MINT_KEY_ID_BYTES + MINT_NONCE_BYTES + MINT_MAC_BYTES;
/** Tickets one key may open: the holder remembers each nonce until the key expires, and retires a key past this. */
export const MAX_MINTS_PER_KEY = 200_000;
/** Bounds of a key's lifetime in NarDirectKey, in seconds. */
export const MIN_MINT_KEY_LIFETIME_S = 60;
export const MAX_MINT_KEY_LIFETIME_S = 3600;

function mac(key: Uint8Array, keyId: Uint8Array, nonce: Uint8Array, urlTail: string): Buffer {
  return createHmac("sha256", key).update(keyId).update(nonce).update(urlTail, "latin1").digest().subarray(0, MINT_MAC_BYTES);
}

/** A ticket for the NAR at `urlTail` ("nar/<hash part>-<NAR hash>.nar"); `nonce` must be fresh random bytes. */
export function mintTicket(key: Uint8Array, keyId: Uint8Array, nonce: Uint8Array, urlTail: string): Buffer {
  if (key.length !== MINT_KEY_BYTES || keyId.length !== MINT_KEY_ID_BYTES || nonce.length !== MINT_NONCE_BYTES) throw new RangeError("minted ticket: bad key, key id or nonce length");
  return Buffer.concat([keyId, nonce, mac(key, keyId, nonce, urlTail)]);
}

/** A minted ticket's parts, or undefined when it is not MINTED_TICKET_BYTES long. */
export function splitMinted(ticket: Uint8Array): { keyId: Buffer; nonce: Buffer; mac: Buffer } | undefined {
  if (ticket.length !== MINTED_TICKET_BYTES) return undefined;
  const b = Buffer.from(ticket.buffer, ticket.byteOffset, ticket.length);
  return { keyId: b.subarray(0, MINT_KEY_ID_BYTES), nonce: b.subarray(MINT_KEY_ID_BYTES, MINT_KEY_ID_BYTES + MINT_NONCE_BYTES), mac: b.subarray(MINT_KEY_ID_BYTES + MINT_NONCE_BYTES) };
}

/** Whether `ticket`'s MAC is right for `urlTail` under `key` (constant time). */
export function mintedMacOk(key: Uint8Array, ticket: Uint8Array, urlTail: string): boolean {
  const p = splitMinted(ticket);
  return p !== undefined && timingSafeEqual(p.mac, mac(key, p.keyId, p.nonce, urlTail));
}
