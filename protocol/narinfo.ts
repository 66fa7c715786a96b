// The narinfo text format (what GET /<hash>.narinfo returns), the signature fingerprint, and
// /nix-cache-info. Parsing is strict and bounded: narinfo files come from peers we don't control.
import { normalizeHash } from "./hash.js";
import { STORE_DIR, type PathInfo } from "./path-info.js";
import { isValidKeyName } from "./keys.js";
import { parseStorePath, storePathBaseName, storePathFromBaseName } from "./store-path.js";

/** A parsed narinfo: the path's metadata plus where and how its NAR is served. */
export interface Narinfo extends PathInfo {
  url: string;
  /** "none", "xz", "zstd", ...; "bzip2" when the field is absent (Nix's default). */
  compression: string;
  /** "sha256:<nix32>" of the (compressed) file, if given. */
  fileHash?: string;
  fileSize?: number;
}

export interface ParseNarinfoOptions {
  /** Largest accepted input in bytes (UTF-8). Default 64 KiB. */
  maxBytes?: number;
  /** Most lines accepted. Default 1024. */
  maxLines?: number;
}

export const DEFAULT_MAX_NARINFO_BYTES = 64 * 1024;
export const DEFAULT_MAX_NARINFO_LINES = 1024;

/** The string a path signature signs: "1;<path>;<sha256:nix32>;<narSize>;<refs,comma-joined>". */
export function fingerprint(info: PathInfo): string {
  parseStorePath(info.storePath);
  if (!isSize(info.narSize) || info.narSize === 0) {
    throw new Error(`cannot fingerprint ${info.storePath}: NAR size ${info.narSize} is not known`);
  }
  // Normalise so a base16/SRI hash still yields the nix32 form Nix signs.
  const narHash = normalizeHash(info.narHash);
  for (const r of info.references) parseStorePath(r);
  return `1;${info.storePath};${narHash};${info.narSize};${sortedUnique(info.references).join(",")}`;
}

/**
 * Narinfo text in Nix's field order. We serve uncompressed NARs, so FileHash/FileSize equal
 * NarHash/NarSize. "References: " is written even when empty, as Nix does.
 */
export function renderNarinfo(info: PathInfo, url: string): string {
  parseStorePath(info.storePath);
  if (!url || /[\s\x00-\x1f\x7f]/.test(url)) throw new Error(`invalid NAR URL ${JSON.stringify(url)}`);
  if (!isSize(info.narSize) || info.narSize === 0) throw new Error(`invalid NAR size ${info.narSize} for ${info.storePath}`);
  const narHash = normalizeHash(info.narHash);
  const refs = sortedUnique(info.references).map(storePathBaseName);
  let out =
    `StorePath: ${info.storePath}\n` +
    `URL: ${url}\n` +
    `Compression: none\n` +
    `FileHash: ${narHash}\n` +
    `FileSize: ${info.narSize}\n` +
    `NarHash: ${narHash}\n` +
    `NarSize: ${info.narSize}\n` +
    `References: ${refs.join(" ")}\n`;
  if (info.deriver) out += `Deriver: ${storePathBaseName(info.deriver)}\n`;
  // A malformed stored signature could never verify, and our own parser would reject it: drop it.
  for (const sig of info.sigs) if (isValidSig(sig)) out += `Sig: ${sig}\n`;
  if (info.ca) out += `CA: ${checkCa(info.ca)}\n`;
  return out;
}

/** Parses narinfo text (or bytes, which must be valid UTF-8). Throws with the reason on bad input. */
export function parseNarinfo(input: string | Uint8Array, opts: ParseNarinfoOptions = {}): Narinfo {
  const maxBytes = opts.maxBytes ?? DEFAULT_MAX_NARINFO_BYTES;
  const maxLines = opts.maxLines ?? DEFAULT_MAX_NARINFO_LINES;
  let text: string;
  if (typeof input === "string") {
    // Cheap bound first (UTF-8 takes >= 1 byte per UTF-16 unit), then the exact one.
    if (input.length > maxBytes || Buffer.byteLength(input, "utf8") > maxBytes) {
      throw new Error(`narinfo larger than ${maxBytes} bytes`);
    }
    if (/\p{Cs}/u.test(input)) throw new Error("narinfo is not valid UTF-8 text");
    text = input;
  } else {
    if (input.length > maxBytes) throw new Error(`narinfo larger than ${maxBytes} bytes`);
    try {
      text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(input);
    } catch {
      throw new Error("narinfo is not valid UTF-8 text");
    }
  }

  const lines = text.split("\n");
  if (lines[lines.length - 1] === "") lines.pop(); // the final newline
  if (lines.length > maxLines) throw new Error(`narinfo has more than ${maxLines} lines`);

  const fields = new Map<string, string>();
  const sigs: string[] = [];
  for (const [i, line] of lines.entries()) {
    const colon = line.indexOf(":");
    if (colon <= 0) throw new Error(`narinfo line ${i + 1}: expected "Key: value"`);
    if (/[\x00-\x1f\x7f]/.test(line)) throw new Error(`narinfo line ${i + 1}: control character`);
    const key = line.slice(0, colon);
    const rest = line.slice(colon + 1);
    if (rest !== "" && rest[0] !== " ") throw new Error(`narinfo line ${i + 1}: expected ": " after "${key.slice(0, 40)}"`);
    const value = rest.slice(1);
    if (key === "Sig") sigs.push(value);
    else if (fields.has(key)) throw new Error(`narinfo: duplicate field "${key.slice(0, 40)}"`);
    else fields.set(key, value);
  }

  const need = (k: string): string => {
    const v = fields.get(k);
    if (v === undefined) throw new Error(`narinfo: missing ${k}`);
    return v;
  };
  const storePath = need("StorePath");
  parseStorePath(storePath);
  const url = need("URL");
  if (url === "" || /\s/.test(url)) throw new Error("narinfo: URL is empty or contains whitespace");
  const narHash = normalizeHash(need("NarHash"));
  const narSize = parseSize("NarSize", need("NarSize"));
  if (narSize === 0) throw new Error("narinfo: NarSize must be positive");

  const compression = fields.get("Compression") ?? "bzip2";
  if (!/^[a-z0-9][a-z0-9.+-]{0,31}$/.test(compression)) throw new Error("narinfo: invalid Compression");

  const refsText = fields.get("References") ?? "";
  const refs = refsText === "" ? [] : refsText.split(" ").map((b) => storePathFromBaseName(b));
  const references = sortedUnique(refs);
  if (references.length !== refs.length) throw new Error("narinfo: duplicate reference");

  const info: Narinfo = { storePath, url, compression, narHash, narSize, references, sigs: [] };
  const fileHash = fields.get("FileHash");
  if (fileHash !== undefined) info.fileHash = normalizeHash(fileHash);
  const fileSize = fields.get("FileSize");
  if (fileSize !== undefined) info.fileSize = parseSize("FileSize", fileSize);
  const deriver = fields.get("Deriver");
  // Nix writes "unknown-deriver" in some old caches; it means none.
  if (deriver !== undefined && deriver !== "unknown-deriver") info.deriver = storePathFromBaseName(deriver);
  for (const s of sigs) {
    checkSig(s);
    if (!info.sigs.includes(s)) info.sigs.push(s);
  }
  const ca = fields.get("CA");
  if (ca !== undefined && ca !== "") info.ca = checkCa(ca);
  return info;
}

/** The body of GET /nix-cache-info. Lower priority is asked first (cache.nixos.org is 40). */
export function nixCacheInfo(priority: number): string {
  if (!Number.isSafeInteger(priority) || priority < 0) throw new Error(`invalid cache priority ${priority}`);
  return `StoreDir: ${STORE_DIR}\nWantMassQuery: 1\nPriority: ${priority}\n`;
}

function isSize(n: number): boolean {
  return Number.isSafeInteger(n) && n >= 0;
}

function parseSize(field: string, s: string): number {
  // Plain decimal only: no sign, exponent, hex or leading zeros that Number() would accept.
  if (!/^(0|[1-9][0-9]{0,15})$/.test(s) || !isSize(Number(s))) throw new Error(`narinfo: invalid ${field} ${JSON.stringify(s.slice(0, 40))}`);
  return Number(s);
}

// Byte order equals UTF-16 order for the ASCII that valid store paths are made of.
function sortedUnique(paths: readonly string[]): string[] {
  return [...new Set(paths)].sort();
}

function isValidSig(sig: string): boolean {
  const colon = sig.indexOf(":");
  return colon > 0 && isValidKeyName(sig.slice(0, colon)) && /^[A-Za-z0-9+/]{85}[AQgw]==$/.test(sig.slice(colon + 1));
}

function checkSig(sig: string): string {
  if (!isValidSig(sig)) {
    throw new Error(`invalid signature ${JSON.stringify(sig.slice(0, 100))}: expected "name:base64 of 64 bytes"`);
  }
  return sig;
}

function checkCa(ca: string): string {
  if (!/^(text|fixed):[\x21-\x7e]+$/.test(ca) || ca.length > 256) throw new Error(`invalid CA ${JSON.stringify(ca.slice(0, 100))}`);
  return ca;
}
