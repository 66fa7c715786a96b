// This host's Nix store as a PathSource: metadata from the database or the daemon (see
// metadata.ts), NARs from the filesystem (store files are world-readable either way).
import { accessSync, constants } from "node:fs";
import { join } from "node:path";
import type { PathInfo } from "../../protocol/path-info.js";
import type { Listing } from "../../protocol/listing.js";
import { NarGoneError, type NarPieceOptions, type NOT_NOW, type PathSource, type SOON } from "../source.js";
import type { Signer } from "../signer.js";
import { DaemonClient } from "./daemon-client.js";
import { DaemonMetadata } from "./daemon-metadata.js";
import { DatabaseMetadata } from "./db-metadata.js";
import type { PathWatcher, StoreBackend, StoreMetadata } from "./metadata.js";
import { narListing, narPieces, type NarPiece } from "./nar-dump.js";

export type { StoreBackend } from "./metadata.js";

export interface OpenStoreOptions {
  backend: StoreBackend;
  /** The daemon's socket (daemon backend); default <root>/nix/var/nix/daemon-socket/socket. */
  daemonSocket?: string | null;
  /** The store was written with Nix's case hack (macOS): see case-hack.ts. */
  caseHack?: boolean;
}

/**
 * "auto": the database when this process may write its directory (SQLite in WAL mode cannot be
 * opened read-only by others once Nix has removed the -wal and -shm files), else the daemon. A
 * missing directory is no store at all: the database backend's error says so best.
 */
export function chooseBackend(root: string, wanted: StoreBackend | "auto"): StoreBackend {
  if (wanted !== "auto") return wanted;
  try {
    accessSync(join(root, "nix/var/nix/db"), constants.W_OK);
    return "database";
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "ENOENT" ? "database" : "daemon";
  }
}

export const defaultDaemonSocket = (root: string) => join(root, "nix/var/nix/daemon-socket/socket");

export class LocalStore implements PathSource {
  private readonly meta: StoreMetadata;
  /** Names on disk may carry Nix's case-hack suffix, which NARs, listings and /serve leave out. */
  readonly caseHack: boolean;

  /** Opens the database backend, or wraps a daemon backend made by open(). */
  constructor(
    readonly root: string,
    signer: Signer,
    meta?: StoreMetadata,
    opts: { caseHack?: boolean } = {},
  ) {
    this.meta = meta ?? new DatabaseMetadata(root, signer);
    this.caseHack = opts.caseHack ?? false;
  }

  /** Opens the store with either backend; for the daemon, connects and lists the store first. */
  static async open(root: string, signer: Signer, opts: OpenStoreOptions): Promise<LocalStore> {
    const caseHack = { caseHack: opts.caseHack ?? false };
    if (opts.backend === "database") return new LocalStore(root, signer, undefined, caseHack);
    const meta = new DaemonMetadata(root, new DaemonClient(opts.daemonSocket ?? defaultDaemonSocket(root)), signer);
    try {
      await meta.load();
    } catch (e) {
      meta.close();
      throw e;
    }
    return new LocalStore(root, signer, meta, caseHack);
  }

  get backend(): StoreBackend {
    return this.meta.backend;
  }

  /** Starts watching the store for changes (once); the mesh summary follows its events. */
  watch(): PathWatcher {
    return this.meta.watch();
  }

  /** The same PathInfo object is returned while the path is unchanged (callers may cache by it). */
  pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    return this.meta.pathInfo(hashPart);
  }

  /** pathInfo()'s answer when it needs no I/O to wait for (see PathSource), else NOT_NOW or SOON. */
  pathInfoNow(hashPart: string): PathInfo | undefined | typeof NOT_NOW | typeof SOON {
    return this.meta.pathInfoNow(hashPart);
  }

  /** See PathSource.whenSoon (the daemon backend's look shared by a turn's lookups). */
  whenSoon(run: () => void): void {
    if (!this.meta.whenSoon) throw new Error(`the ${this.meta.backend} backend never says SOON`);
    this.meta.whenSoon(run);
  }

  /** Lookup by NAR hash ("sha256:..." in any encoding), for legacy NAR URLs; the daemon backend has none. */
  pathInfoByNarHash(narHash: string): Promise<PathInfo | undefined> {
    return this.meta.pathInfoByNarHash(narHash);
  }

  isValidPath(storePath: string): Promise<boolean> {
    return this.meta.isValidPath(storePath);
  }

  /** Where a store path's files are on this machine (differs from the logical path in a chroot store). */
  realPath(storePath: string): string {
    return join(this.root, storePath);
  }

  /** A path whose files are gone (a GC between lookup and read) throws NarGoneError. */
  narStream(info: PathInfo, start: number, end: number, readSize?: () => number): AsyncGenerator<Buffer> {
    return this.narPieces(info, start, end, { ...(readSize ? { readSize } : {}) }) as AsyncGenerator<Buffer>;
  }

  /** narStream(), with large file contents as FileRegions (see PathSource.narPieces). */
  async *narPieces(info: PathInfo, start: number, end: number, opts: NarPieceOptions = {}): AsyncGenerator<NarPiece> {
    try {
      yield* narPieces(this.realPath(info.storePath), {
        start, end, caseHack: this.caseHack,
        ...(opts.readSize ? { chunkSize: opts.readSize } : {}),
        ...(opts.regionMin !== undefined ? { regionMin: opts.regionMin } : {}),
      });
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === "ENOENT") throw new NarGoneError(`${info.storePath} is gone from the store`, { cause: e });
      throw e;
    }
  }

  listing(info: PathInfo): Promise<Listing> {
    return narListing(this.realPath(info.storePath), { caseHack: this.caseHack });
  }

  pathCount(): number {
    return this.meta.pathCount();
  }

  close(): void {
    this.meta.close();
  }
}
