// The peer protocol's messages (specified in protocol/PEER-PROTOCOL.md): protocol IDs, limits, and
// encode/decode for narinfo, NAR and peer-exchange messages; summaries live in peer-summary.ts and
// the wire primitives in peer-wire.ts, both re-exported here. Pure: payloads in, values out.
// Hashes travel as raw bytes (20 for a hash part, 32 for a NAR hash): any such bytes are valid, so
// the only checks left are lengths, and the nix32 strings we hand back are canonical.
import { decodeNix32, encodeNix32 } from "./nix32.js";
import { isValidHashPart } from "./store-path.js";
import { PeerProtocolError, Reader, Writer } from "./peer-wire.js";
import { MAX_SUMMARY_FRAME_BYTES } from "./peer-summary.js";
import { MAX_MINT_KEY_LIFETIME_S, MIN_MINT_KEY_LIFETIME_S, MINT_KEY_BYTES, MINT_KEY_ID_BYTES } from "./direct-ticket.js";

export * from "./peer-wire.js";
export * from "./peer-summary.js";

export const PROTOCOL_SUMMARY = "/fleetcache/summary/1.0.0";
export const PROTOCOL_NARINFO = "/fleetcache/narinfo/1.0.0";
export const PROTOCOL_NAR = "/fleetcache/nar/1.0.0";
/** The NAR transfer with content encodings (compression) negotiated per stream; 1.0.0 is served next to it. */
export const PROTOCOL_NAR_V2 = "/fleetcache/nar/2.0.0";
/** 2.0.0 plus a bulk connection for the NAR body (a one-time TLS ticket); 2.0.0 and 1.0.0 are served next to it. */
export const PROTOCOL_NAR_V3 = "/fleetcache/nar/3.0.0";
export const PROTOCOL_PEERS = "/fleetcache/peers/1.0.0";

export const TAG_NARINFO_REQUEST = 0x10;
export const TAG_NARINFO_FOUND = 0x11;
export const TAG_NARINFO_NOT_FOUND = 0x12;
export const TAG_NAR_REQUEST = 0x20;
export const TAG_NAR_OK = 0x21;
export const TAG_NAR_ERROR = 0x22;
export const TAG_NAR_REQUEST_V2 = 0x23;
export const TAG_NAR_OK_V2 = 0x24;
export const TAG_NAR_REQUEST_V3 = 0x25;
export const TAG_NAR_BULK = 0x26;
export const TAG_NAR_DIRECT = 0x27;
export const TAG_NAR_DIRECT_KEY = 0x28;
export const TAG_PEERS_REQUEST = 0x30;
export const TAG_PEERS_RESPONSE = 0x31;

/** Largest narinfo text a peer may send (as parseNarinfo's default). */
export const MAX_NARINFO_BYTES = 64 * 1024;
export const MAX_NAR_ERROR_MESSAGE_BYTES = 256;
export const MAX_PEERS = 256;
export const MAX_ADDRS_PER_PEER = 16;
export const MAX_PEER_ID_BYTES = 128;
export const MAX_MULTIADDR_BYTES = 256;

/** Largest frame payload each protocol accepts, in both directions. */
export const MAX_FRAME_BYTES = {
  summary: MAX_SUMMARY_FRAME_BYTES,
  narinfo: MAX_NARINFO_BYTES + 16,
  nar: 512,
  // Every bound at once: tag, count, then per peer its ID and addresses with their lengths.
  peers: 1 + 2 + MAX_PEERS * (2 + MAX_PEER_ID_BYTES + 1 + MAX_ADDRS_PER_PEER * (2 + MAX_MULTIADDR_BYTES)),
} as const;

/** NarError codes. Requesters treat every code, known or not, as "try another holder". */
export const NAR_ERROR = {
  /** No valid path with this hash part and NAR hash here (never had it, or collected). */
  notFound: 1,
  /** Offset beyond the NAR's size. */
  badOffset: 2,
  /** Too many transfers in progress; retry elsewhere or later. */
  busy: 3,
  /** Anything else (I/O error reading the store). */
  internal: 4,
} as const;

/**
 * Content encodings of /fleetcache/nar/2.0.0: what NarOk2 names, and as bit (1 << code) of a
 * NarRequest2's `accept` what the requester can decode. Identity (0) is always acceptable.
 */
export const NAR_ENCODING = { identity: 0, zstd: 1 } as const;
export type NarEncoding = (typeof NAR_ENCODING)[keyof typeof NAR_ENCODING];
export const ACCEPT_ZSTD = 1 << NAR_ENCODING.zstd;
/**
 * Bulk transports of /fleetcache/nar/3.0.0, as bits of NarRequest3's `bulk`: 1 = TLS 1.3 on a
 * separate TCP connection keyed by a one-time external PSK (NarBulk's ticket and key).
 */
export const BULK_TLS_PSK = 1;
/**
 * Bit 2 of NarRequest3's `bulk`: a one-time ticket for the requester's Nix to fetch the whole NAR
 * over plain HTTP from the responder's direct port (NarDirect). Only with offset 0.
 */
export const BULK_DIRECT_HTTP = 2;
/**
 * Bit 4 of NarRequest3's `bulk`, only with BULK_DIRECT_HTTP: the requester also wants a minting
 * key (NarDirectKey), to make the tickets for this responder's next NARs itself.
 */
export const BULK_DIRECT_MINT = 4;
export const BULK_TICKET_BYTES = 16;
export const BULK_KEY_BYTES = 32;
/** Largest zstd window a requester must decode (2^23 bytes): bounds its memory per stream. */
export const MAX_ZSTD_WINDOW_LOG = 23;

export type NarinfoResponse = { type: "found"; narinfo: string } | { type: "not-found" };

export interface NarRequest {
  hashPart: string;
  /** The 52 nix32 characters of the NAR's sha256, without "sha256:". */
  narHash: string;
  /** First byte wanted: 0, or where a transfer from another holder broke off. */
  offset: number;
  /**
   * /fleetcache/nar/2.0.0 only (NarRequest2): the encodings the requester decodes, a bit set of
   * 1 << NAR_ENCODING; bits this version does not define are ignored by the responder.
   */
  accept?: number;
  /** /fleetcache/nar/3.0.0 only (NarRequest3): the bulk transports the requester can take (BULK_TLS_PSK, BULK_DIRECT_HTTP). */
  bulk?: number;
}

export type NarResponseHeader =
  /** `encoding` only in 2.0.0 and 3.0.0 (NarOk2): how the bytes after the header are encoded. */
  | { type: "ok"; narSize: number; encoding?: NarEncoding }
  /**
   * 3.0.0 only (NarBulk): the body, encoded as `encoding`, goes over one TLS connection to the
   * responder's `port`, PSK identity = the ticket (hex), key = `key`; nothing more on this stream.
   */
  | { type: "bulk"; narSize: number; encoding: NarEncoding; port: number; ticket: Uint8Array; key: Uint8Array }
  /**
   * 3.0.0 only (NarDirect): the whole NAR, unencoded, is for one plain-HTTP GET of
   * http://<responder>:<port>/<ticket hex>/nar/<hash part>-<NAR hash>.nar; nothing more on this stream.
   */
  | { type: "direct"; narSize: number; port: number; ticket: Uint8Array; mint?: MintKey }
  | { type: "error"; code: number; message: string };

/** NarDirectKey's minting key (direct-ticket.ts): for tickets to the responder's direct port, good for `lifetimeS` from its receipt. */
export interface MintKey {
  keyId: Uint8Array;
  key: Uint8Array;
  lifetimeS: number;
}

export interface PeerRecord {
  /** libp2p peer ID, as text (base58btc "12D3KooW..." for Ed25519 keys). */
  peerId: string;
  /** Multiaddrs as text, e.g. "/ip4/10.0.0.2/tcp/37516". */
  multiaddrs: string[];
}

// --- shared field helpers ---------------------------------------------------------------------

function hashPartBytes(hashPart: string): Uint8Array {
  if (!isValidHashPart(hashPart)) throw new PeerProtocolError(`invalid hash part ${JSON.stringify(String(hashPart).slice(0, 40))}`);
  return decodeNix32(hashPart, 20);
}

function narHashBytes(narHash: string): Uint8Array {
  try {
    return decodeNix32(narHash, 32);
  } catch (e) {
    throw new PeerProtocolError(`invalid NAR hash ${JSON.stringify(String(narHash).slice(0, 60))}: ${(e as Error).message}`);
  }
}

function tagOf(r: Reader, allowed: readonly number[]): number {
  const tag = r.u8();
  if (!allowed.includes(tag)) r.fail(`unknown message tag 0x${tag.toString(16)}`);
  return tag;
}

// --- /fleetcache/narinfo/1.0.0 ----------------------------------------------------------------

export function encodeNarinfoRequest(hashPart: string): Uint8Array {
  return new Writer(21).u8(TAG_NARINFO_REQUEST).fixed(hashPartBytes(hashPart)).finish();
}

/** Returns the requested hash part (32 nix32 characters). */
export function decodeNarinfoRequest(payload: Uint8Array): string {
  const r = new Reader(payload, "narinfo request");
  tagOf(r, [TAG_NARINFO_REQUEST]);
  const hashPart = encodeNix32(r.fixed("hash part", 20));
  r.end();
  return hashPart;
}

export function encodeNarinfoResponse(m: NarinfoResponse): Uint8Array {
  if (m.type === "not-found") return Uint8Array.of(TAG_NARINFO_NOT_FOUND);
  if (m.narinfo.length === 0) throw new PeerProtocolError("narinfo response: empty narinfo");
  return new Writer(m.narinfo.length + 8).u8(TAG_NARINFO_FOUND).utf8("narinfo", m.narinfo, MAX_NARINFO_BYTES).finish();
}

/** The narinfo text is only checked for size and UTF-8 here; parse and verify it with parseNarinfo. */
export function decodeNarinfoResponse(payload: Uint8Array): NarinfoResponse {
  const r = new Reader(payload, "narinfo response");
  const tag = tagOf(r, [TAG_NARINFO_FOUND, TAG_NARINFO_NOT_FOUND]);
  let m: NarinfoResponse = { type: "not-found" };
  if (tag === TAG_NARINFO_FOUND) {
    const narinfo = r.utf8("narinfo", MAX_NARINFO_BYTES);
    if (narinfo.length === 0) r.fail("empty narinfo");
    m = { type: "found", narinfo };
  }
  r.end();
  return m;
}

// --- /fleetcache/nar/1.0.0 --------------------------------------------------------------------

/** A NarRequest (1.0.0), a NarRequest2 (2.0.0) when `accept` is given, a NarRequest3 (3.0.0) when `bulk` is too. */
export function encodeNarRequest(m: NarRequest): Uint8Array {
  if (m.bulk !== undefined && m.accept === undefined) throw new PeerProtocolError("NAR request: bulk needs accept");
  const w = new Writer(64).u8(m.bulk !== undefined ? TAG_NAR_REQUEST_V3 : m.accept === undefined ? TAG_NAR_REQUEST : TAG_NAR_REQUEST_V2);
  w.fixed(hashPartBytes(m.hashPart)).fixed(narHashBytes(m.narHash)).uint("offset", m.offset);
  if (m.accept !== undefined) w.uint("accept", m.accept);
  if (m.bulk !== undefined) w.uint("bulk", m.bulk);
  return w.finish();
}

/**
 * `version`: the stream's protocol, 1.0.0, 2.0.0 (`true` also means 2) or 3.0.0; only that
 * version's request is valid on it.
 */
export function decodeNarRequest(payload: Uint8Array, version: boolean | 1 | 2 | 3 = 1): NarRequest {
  const v = version === true ? 2 : version === false ? 1 : version;
  const r = new Reader(payload, "NAR request");
  tagOf(r, [v === 3 ? TAG_NAR_REQUEST_V3 : v === 2 ? TAG_NAR_REQUEST_V2 : TAG_NAR_REQUEST]);
  const hashPart = encodeNix32(r.fixed("hash part", 20));
  const narHash = encodeNix32(r.fixed("NAR hash", 32));
  const offset = r.uint("offset");
  const m: NarRequest = { hashPart, narHash, offset };
  if (v >= 2) m.accept = r.uint("accept");
  if (v === 3) m.bulk = r.uint("bulk");
  r.end();
  return m;
}

export function encodeNarResponseHeader(m: NarResponseHeader): Uint8Array {
  const w = new Writer(80);
  if (m.type === "direct") {
    if (m.narSize === 0) throw new PeerProtocolError("NAR response: NAR size must be positive");
    if (!Number.isInteger(m.port) || m.port < 1 || m.port > 65535) throw new PeerProtocolError(`NAR response: invalid port ${m.port}`);
    if (m.ticket.length !== BULK_TICKET_BYTES) throw new PeerProtocolError("NAR response: bad ticket length");
    if (m.mint) {
      const { keyId, key, lifetimeS } = m.mint;
      if (keyId.length !== MINT_KEY_ID_BYTES || key.length !== MINT_KEY_BYTES) throw new PeerProtocolError("NAR response: bad minting key or key id length");
      if (!Number.isInteger(lifetimeS) || lifetimeS < MIN_MINT_KEY_LIFETIME_S || lifetimeS > MAX_MINT_KEY_LIFETIME_S) throw new PeerProtocolError(`NAR response: minting key lifetime ${lifetimeS} s out of bounds`);
      return w.u8(TAG_NAR_DIRECT_KEY).uint("NAR size", m.narSize).uint("port", m.port, 65535).fixed(m.ticket).fixed(keyId).fixed(key).uint("lifetime", lifetimeS, MAX_MINT_KEY_LIFETIME_S).finish();
    }
    return w.u8(TAG_NAR_DIRECT).uint("NAR size", m.narSize).uint("port", m.port, 65535).fixed(m.ticket).finish();
  }
  if (m.type === "bulk") {
    if (m.narSize === 0) throw new PeerProtocolError("NAR response: NAR size must be positive");
    if (!Number.isInteger(m.port) || m.port < 1 || m.port > 65535) throw new PeerProtocolError(`NAR response: invalid port ${m.port}`);
    if (m.ticket.length !== BULK_TICKET_BYTES || m.key.length !== BULK_KEY_BYTES) throw new PeerProtocolError("NAR response: bad ticket or key length");
    return w.u8(TAG_NAR_BULK).uint("NAR size", m.narSize).uint("encoding", m.encoding).uint("port", m.port, 65535).fixed(m.ticket).fixed(m.key).finish();
  }
  if (m.type === "ok") {
    if (m.narSize === 0) throw new PeerProtocolError("NAR response: NAR size must be positive");
    if (m.encoding === undefined) return w.u8(TAG_NAR_OK).uint("NAR size", m.narSize).finish();
    return w.u8(TAG_NAR_OK_V2).uint("NAR size", m.narSize).uint("encoding", m.encoding).finish();
  }
  return w.u8(TAG_NAR_ERROR).uint("error code", m.code, 255).utf8("error message", m.message, MAX_NAR_ERROR_MESSAGE_BYTES).finish();
}

/**
 * After an "ok" header the stream carries the NAR's bytes from the requested offset to its end
 * (in 2.0.0, encoded as `encoding` says). `accept` (2.0.0): what the request accepted; a NarOk2
 * naming another encoding is a protocol error. `bulk` (3.0.0): what the request's `bulk` said;
 * a NarBulk is valid only when it had BULK_TLS_PSK, a NarDirect only when it had BULK_DIRECT_HTTP,
 * a NarDirectKey only when it had BULK_DIRECT_HTTP and BULK_DIRECT_MINT.
 */
export function decodeNarResponseHeader(payload: Uint8Array, accept?: number, bulk?: number): NarResponseHeader {
  const r = new Reader(payload, "NAR response");
  const bulkOk = accept !== undefined && bulk !== undefined && (bulk & BULK_TLS_PSK) !== 0;
  const directOk = accept !== undefined && bulk !== undefined && (bulk & BULK_DIRECT_HTTP) !== 0;
  const mintOk = directOk && (bulk! & BULK_DIRECT_MINT) !== 0;
  const tag = tagOf(r, [accept === undefined ? TAG_NAR_OK : TAG_NAR_OK_V2, TAG_NAR_ERROR, ...(bulkOk ? [TAG_NAR_BULK] : []), ...(directOk ? [TAG_NAR_DIRECT] : []), ...(mintOk ? [TAG_NAR_DIRECT_KEY] : [])]);
  let m: NarResponseHeader;
  if (tag === TAG_NAR_DIRECT || tag === TAG_NAR_DIRECT_KEY) {
    const narSize = r.uint("NAR size");
    if (narSize === 0) r.fail("NAR size must be positive");
    const port = r.uint("port", 65535);
    if (port === 0) r.fail("port 0");
    m = { type: "direct", narSize, port, ticket: r.fixed("ticket", BULK_TICKET_BYTES).slice() };
    if (tag === TAG_NAR_DIRECT_KEY) {
      const keyId = r.fixed("key id", MINT_KEY_ID_BYTES).slice();
      const key = r.fixed("minting key", MINT_KEY_BYTES).slice();
      const lifetimeS = r.uint("lifetime", MAX_MINT_KEY_LIFETIME_S);
      if (lifetimeS < MIN_MINT_KEY_LIFETIME_S) r.fail(`minting key lifetime ${lifetimeS} s`);
      m.mint = { keyId, key, lifetimeS };
    }
  } else if (tag === TAG_NAR_BULK) {
    const narSize = r.uint("NAR size");
    if (narSize === 0) r.fail("NAR size must be positive");
    const encoding = r.uint("encoding", 255);
    if (encoding !== NAR_ENCODING.identity && !(encoding === NAR_ENCODING.zstd && accept! & ACCEPT_ZSTD)) r.fail(`encoding ${encoding} was not accepted`);
    const port = r.uint("port", 65535);
    if (port === 0) r.fail("port 0");
    m = { type: "bulk", narSize, encoding: encoding as NarEncoding, port, ticket: r.fixed("ticket", BULK_TICKET_BYTES).slice(), key: r.fixed("key", BULK_KEY_BYTES).slice() };
  } else if (tag !== TAG_NAR_ERROR) {
    const narSize = r.uint("NAR size");
    if (narSize === 0) r.fail("NAR size must be positive");
    m = { type: "ok", narSize };
    if (tag === TAG_NAR_OK_V2) {
      const encoding = r.uint("encoding", 255);
      if (encoding !== NAR_ENCODING.identity && !(encoding === NAR_ENCODING.zstd && accept! & ACCEPT_ZSTD)) r.fail(`encoding ${encoding} was not accepted`);
      m.encoding = encoding as NarEncoding;
    }
  } else {
    const code = r.uint("error code", 255);
    if (code === 0) r.fail("error code 0");
    m = { type: "error", code, message: r.utf8("error message", MAX_NAR_ERROR_MESSAGE_BYTES) };
  }
  r.end();
  return m;
}

// --- /fleetcache/peers/1.0.0 ------------------------------------------------------------------

// Text forms only: base58btc/base32 for IDs, printable ASCII without spaces for multiaddrs. The
// libp2p glue parses them properly; this keeps junk (and terminal escapes in logs) out.
const PEER_ID = /^[A-Za-z0-9]+$/;
const MULTIADDR = /^\/[\x21-\x7e]*$/;

function checkPeer(p: PeerRecord, fail: (reason: string) => never): void {
  if (p.peerId.length === 0 || p.peerId.length > MAX_PEER_ID_BYTES || !PEER_ID.test(p.peerId)) fail(`invalid peer ID ${JSON.stringify(p.peerId.slice(0, 60))}`);
  if (p.multiaddrs.length > MAX_ADDRS_PER_PEER) fail(`more than ${MAX_ADDRS_PER_PEER} addresses for one peer`);
  for (const a of p.multiaddrs) {
    if (a.length > MAX_MULTIADDR_BYTES || !MULTIADDR.test(a)) fail(`invalid multiaddr ${JSON.stringify(a.slice(0, 60))}`);
  }
}

export function encodePeersRequest(): Uint8Array {
  return Uint8Array.of(TAG_PEERS_REQUEST);
}

export function decodePeersRequest(payload: Uint8Array): void {
  const r = new Reader(payload, "peers request");
  tagOf(r, [TAG_PEERS_REQUEST]);
  r.end();
}

export function encodePeersResponse(peers: readonly PeerRecord[]): Uint8Array {
  if (peers.length > MAX_PEERS) throw new PeerProtocolError(`peers response: more than ${MAX_PEERS} peers`);
  const w = new Writer(256).u8(TAG_PEERS_RESPONSE).uint("peer count", peers.length);
  for (const p of peers) {
    checkPeer(p, (reason) => {
      throw new PeerProtocolError(`peers response: ${reason}`);
    });
    w.utf8("peer ID", p.peerId, MAX_PEER_ID_BYTES).uint("address count", p.multiaddrs.length);
    for (const a of p.multiaddrs) w.utf8("multiaddr", a, MAX_MULTIADDR_BYTES);
  }
  return w.finish();
}

export function decodePeersResponse(payload: Uint8Array): PeerRecord[] {
  const r = new Reader(payload, "peers response");
  tagOf(r, [TAG_PEERS_RESPONSE]);
  const count = r.uint("peer count", MAX_PEERS);
  const peers: PeerRecord[] = [];
  const seen = new Set<string>();
  for (let i = 0; i < count; i++) {
    const peerId = r.utf8("peer ID", MAX_PEER_ID_BYTES);
    const n = r.uint("address count", MAX_ADDRS_PER_PEER);
    const multiaddrs: string[] = [];
    for (let j = 0; j < n; j++) multiaddrs.push(r.utf8("multiaddr", MAX_MULTIADDR_BYTES));
    const p = { peerId, multiaddrs };
    checkPeer(p, (reason) => r.fail(`peer ${i}: ${reason}`));
    if (seen.has(peerId)) r.fail(`peer ${i}: duplicate peer ID`);
    seen.add(peerId);
    peers.push(p);
  }
  r.end();
  return peers;
}
