// Store metadata from the Nix daemon, for an agent that cannot open the database. A lookup asks
// the daemon (QueryPathFromHashPart, then QueryPathInfo: two round trips over the socket) unless
// Nix's database is unchanged (db-version.ts) since the daemon gave a cached answer for the path,
// or since it listed the store's paths without it (a miss). A path deleted, re-added or re-signed
// is a write to the database, so an answer is never staler than the daemon's own. Whether the
// database is unchanged is a look at its files taken after the lookup came in: its own, or one
// shared by the lookups of an event-loop turn (DbVersion.afterLook(), next()). The daemon
// cannot find a path by its NAR hash, so the legacy NAR URL that carries nothing else is a miss
// with this backend.
import { join } from "node:path";
import { STORE_DIR, type PathInfo } from "../../protocol/path-info.js";
import { hashPartOf } from "../../protocol/store-path.js";
import type { DaemonPathInfo } from "../../protocol/daemon-wire.js";
import type { Signer } from "../signer.js";
import { NOT_NOW, SOON } from "../source.js";
import type { DaemonClient } from "./daemon-client.js";
import { DaemonWatcher } from "./daemon-watch.js";
import { DbVersion } from "./db-version.js";
import { RecentlyUsed } from "./recent.js";
import { toPathInfo, type StoreMetadata } from "./metadata.js";

interface CachedInfo {
  /** What the daemon said, condensed: the PathInfo is reused while this is unchanged. */
  key: string;
  info: PathInfo;
  /** The database's version (DbVersion) read before the daemon was asked; undefined: none. */
  dbVersion: string | undefined;
}

/** Answers kept, about the most recently used (a PathInfo with its references: 1.1-3 KB of heap each with 0-20 references). */
const MAX_CACHED = 100_000;
/** Shared looks answering one lookup each, in a row, after which lookups look on their own again. */
const SINGLE_SHARES = 8;
/** One lookup in this many looking on its own has its turn's lookups counted (a setImmediate each). */
const COUNT_EVERY = 16;

export class DaemonMetadata implements StoreMetadata {
  readonly backend = "daemon";
  readonly watcher: DaemonWatcher;
  // Answers by hash part (recent.ts: a hit only marks its entry). Reusing the PathInfo object lets
  // the HTTP side reuse the rendered narinfo.
  private readonly infos = new RecentlyUsed<string, CachedInfo>(MAX_CACHED);
  private readonly dbVersion: DbVersion;
  // A lookup looks at the database's files on its own (answered at once, in one go with the HTTP
  // answer) or shares a look with the other lookups of its event-loop turn: pathInfoNow() says
  // SOON and answers when asked again from whenSoon()'s run, right after the turn's look
  // (DbVersion.afterLook(): an immediate later, one fstat for all; pathInfo() awaits the same
  // look). Sharing pays only when lookups come several to a turn (concurrent connections):
  // lookups share from a turn that had more than one on (counted in one turn of COUNT_EVERY
  // lookups: a setImmediate a lookup cost a few µs at one connection in the benchmark), and look
  // on their own again after SINGLE_SHARES shared looks of one lookup each. Either way every look
  // is taken after the lookups it answers came in.
  private sharing = false;
  /** Whether this turn's lookups are counted (in ownLooks), until turnEnded. */
  private counting = false;
  private ownLooks = 0;
  private uncounted = 0;
  private singleShares = 0;

  constructor(
    root: string,
    readonly client: DaemonClient,
    private readonly signer: Signer,
  ) {
    this.dbVersion = new DbVersion(join(root, "nix/var/nix/db"), { onShared: this.shared });
    this.watcher = new DaemonWatcher(client, join(root, STORE_DIR), { dbVersion: () => this.dbVersion.current() });
  }

  /** The first listing of the store (so pathCount and the mesh summary start right). */
  async load(): Promise<void> {
    await this.watcher.refresh();
  }

  watch(): DaemonWatcher {
    return this.watcher.start();
  }

  /**
   * The answer from memory while Nix's database is unchanged since the daemon gave it, with a look
   * of its own or, asked from whenSoon()'s run, the look of the turn; SOON when lookups share looks
   * (see above); NOT_NOW when the daemon must be asked.
   */
  pathInfoNow(hashPart: string): PathInfo | undefined | typeof NOT_NOW | typeof SOON {
    // From a run of whenSoon(): a request that came in before the look (db-version.ts).
    if (this.dbVersion.looking) return this.fromMemory(hashPart, this.dbVersion.looked);
    if (this.sharing) return SOON;
    if (this.counting) this.ownLooks++;
    else if (++this.uncounted >= COUNT_EVERY) {
      [this.counting, this.ownLooks, this.uncounted] = [true, 1, 0];
      setImmediate(this.turnEnded);
    }
    return this.fromMemory(hashPart, this.dbVersion.current());
  }

  /** After pathInfoNow() said SOON: `run` is called right after the turn's shared look. */
  whenSoon(run: () => void): void {
    this.dbVersion.afterLook(run);
  }

  private readonly turnEnded = (): void => {
    if (this.ownLooks > 1) this.sharing = true;
    this.counting = false;
  };

  /** After each shared look: back to looks of their own after SINGLE_SHARES in a row answered one lookup each. */
  private readonly shared = (lookups: number): void => {
    if (lookups > 1) this.singleShares = 0;
    else if (++this.singleShares >= SINGLE_SHARES) [this.sharing, this.singleShares] = [false, 0];
  };

  private fromMemory(hashPart: string, dbVersion: string | undefined): PathInfo | undefined | typeof NOT_NOW {
    if (dbVersion === undefined) return NOT_NOW;
    const cached = this.infos.get(hashPart);
    if (cached?.dbVersion === dbVersion) return cached.info;
    // The last listing is still the store's list: a path not in it is not valid.
    if (this.watcher.listedVersion === dbVersion && !this.watcher.has(hashPart)) return undefined;
    return NOT_NOW;
  }

  async pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    // A look after this call (or, from whenSoon()'s run, the turn's, taken after the request came
    // in): the answer from memory is then at least as new as the database when the lookup came
    // in, and the daemon's answer (asked after the look) as this version.
    const dbVersion = this.dbVersion.looking ? this.dbVersion.looked : await this.dbVersion.next();
    const known = this.fromMemory(hashPart, dbVersion);
    if (known !== NOT_NOW) return known;
    const cached = this.infos.peek(hashPart);
    const storePath = await this.client.queryPathFromHashPart(hashPart);
    // Deleted in between: QueryPathInfo says "not valid" (protocol >= 1.17), also a miss.
    const raw = storePath ? await this.client.queryPathInfo(storePath) : undefined;
    if (!storePath || !raw) {
      this.infos.delete(hashPart); // not valid: nothing to keep for it
      return undefined;
    }
    const key = [storePath, raw.narHash, raw.narSize, raw.registrationTime, raw.deriver, raw.ca, ...raw.sigs].join("\n");
    const info = cached?.key === key ? cached.info : this.toPathInfo(storePath, raw);
    this.infos.set(hashPart, { key, info, dbVersion });
    return info;
  }

  /** Unsupported: the daemon has no lookup by NAR hash (QueryAllValidPaths gives no hashes). */
  async pathInfoByNarHash(): Promise<PathInfo | undefined> {
    return undefined;
  }

  async isValidPath(storePath: string): Promise<boolean> {
    return (await this.client.queryPathFromHashPart(hashPartOf(storePath))) === storePath;
  }

  pathCount(): number {
    return this.watcher.size;
  }

  close(): void {
    this.watcher.stop();
    this.client.close();
    this.dbVersion.close();
  }

  private toPathInfo(storePath: string, raw: DaemonPathInfo): PathInfo {
    // The daemon sends the NAR hash in base16 without the "sha256:" prefix.
    const narHash = raw.narHash.includes(":") ? raw.narHash : "sha256:" + raw.narHash;
    return toPathInfo({ ...raw, storePath, narHash, sigs: [...raw.sigs], references: [...raw.references] }, this.signer);
  }
}
