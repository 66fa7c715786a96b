// Where this host's store metadata comes from: Nix's database (read directly, as root: fastest)
// or the Nix daemon (for an agent running as an unprivileged user). LocalStore works with either.
import type { EventEmitter } from "node:events";
import { parseHash, toNix32Hash } from "../../protocol/hash.js";
import { fingerprint } from "../../protocol/narinfo.js";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Signer } from "../signer.js";
import type { NOT_NOW, SOON } from "../source.js";
import type { StoreChange } from "./watch.js";

export type StoreBackend = "database" | "daemon";

/** The store's valid paths, kept current; "change" events say what entered and left. */
export interface PathWatcher extends EventEmitter<{ change: [StoreChange]; error: [Error] }> {
  /** Hash parts of every valid path, as of the last look. */
  hashParts(): IterableIterator<string>;
  readonly size: number;
  has(hashPart: string): boolean;
  readonly running: boolean;
  start(): this;
  stop(): void;
}

export interface StoreMetadata {
  readonly backend: StoreBackend;
  /** The valid path with this hash part, with our signatures added; undefined when not valid. */
  pathInfo(hashPart: string): Promise<PathInfo | undefined>;
  /** pathInfo()'s answer if it needs no I/O to wait for, else NOT_NOW (or SOON: see PathSource). */
  pathInfoNow(hashPart: string): PathInfo | undefined | typeof NOT_NOW | typeof SOON;
  /** As PathSource.whenSoon(), for a backend whose pathInfoNow() may say SOON. */
  whenSoon?(run: () => void): void;
  /** Lookup by NAR hash ("sha256:..." in any encoding), for legacy NAR URLs; may be unsupported (undefined). */
  pathInfoByNarHash(narHash: string): Promise<PathInfo | undefined>;
  /** Whether this full store path is valid. */
  isValidPath(storePath: string): Promise<boolean>;
  /** Valid paths in the store (as of the last look, for the daemon). */
  pathCount(): number;
  /** Starts (once) and returns the watcher. */
  watch(): PathWatcher;
  close(): void;
}

/** What both backends know of a path, in their own forms. */
export interface RawPathInfo {
  storePath: string;
  /** "sha256:<base16>" or any other form parseHash accepts. */
  narHash: string;
  narSize: number;
  references: string[];
  deriver?: string | null;
  sigs: string[];
  ca?: string | null;
}

/** The PathInfo served for a path: references in byte order, our signatures after the stored ones. */
export function toPathInfo(raw: RawPathInfo, signer: Signer): PathInfo {
  const info: PathInfo = {
    storePath: raw.storePath,
    narHash: toNix32Hash(parseHash(raw.narHash)),
    narSize: raw.narSize,
    references: raw.references.sort(byteOrder),
    sigs: raw.sigs,
  };
  if (raw.deriver) info.deriver = raw.deriver;
  if (raw.ca) info.ca = raw.ca;
  for (const sig of signer.signatures(fingerprint(info))) {
    if (!info.sigs.includes(sig)) info.sigs.push(sig);
  }
  return info;
}

/** Store paths are ASCII, so UTF-16 code unit order equals byte order. */
function byteOrder(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}
