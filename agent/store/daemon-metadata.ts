// Store metadata from the Nix daemon, for an agent that cannot open the database. Every lookup
// asks the daemon (QueryPathFromHashPart, then QueryPathInfo), so answers are never stale and a
// miss is real; the cost is two round trips over the socket. The daemon cannot find a path by
// its NAR hash, so the legacy NAR URL that carries nothing else is a miss with this backend.
import { join } from "node:path";
import { STORE_DIR, type PathInfo } from "../../protocol/path-info.js";
import { hashPartOf } from "../../protocol/store-path.js";
import type { DaemonPathInfo } from "../../protocol/daemon-wire.js";
import type { Signer } from "../signer.js";
import type { DaemonClient } from "./daemon-client.js";
import { DaemonWatcher } from "./daemon-watch.js";
import { toPathInfo, type StoreMetadata } from "./metadata.js";

interface CachedInfo {
  /** What the daemon said, condensed: the PathInfo is reused while this is unchanged. */
  key: string;
  info: PathInfo;
}

const MAX_CACHED = 100_000;

export class DaemonMetadata implements StoreMetadata {
  readonly backend = "daemon";
  readonly watcher: DaemonWatcher;
  // Reusing the PathInfo object lets the HTTP side reuse the rendered narinfo.
  private readonly infos = new Map<string, CachedInfo>();

  constructor(
    root: string,
    readonly client: DaemonClient,
    private readonly signer: Signer,
  ) {
    this.watcher = new DaemonWatcher(client, join(root, STORE_DIR));
  }

  /** The first listing of the store (so pathCount and the mesh summary start right). */
  async load(): Promise<void> {
    await this.watcher.refresh();
  }

  watch(): DaemonWatcher {
    return this.watcher.start();
  }

  async pathInfo(hashPart: string): Promise<PathInfo | undefined> {
    const storePath = await this.client.queryPathFromHashPart(hashPart);
    if (!storePath) return undefined;
    // Deleted in between: QueryPathInfo says "not valid" (protocol >= 1.17), also a miss.
    const raw = await this.client.queryPathInfo(storePath);
    if (!raw) return undefined;
    const key = [storePath, raw.narHash, raw.narSize, raw.registrationTime, raw.deriver, raw.ca, ...raw.sigs].join("\n");
    const cached = this.infos.get(hashPart);
    if (cached?.key === key) return cached.info;
    const info = this.toPathInfo(storePath, raw);
    if (this.infos.size >= MAX_CACHED) this.infos.delete(this.infos.keys().next().value!);
    this.infos.set(hashPart, { key, info });
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
  }

  private toPathInfo(storePath: string, raw: DaemonPathInfo): PathInfo {
    // The daemon sends the NAR hash in base16 without the "sha256:" prefix.
    const narHash = raw.narHash.includes(":") ? raw.narHash : "sha256:" + raw.narHash;
    return toPathInfo({ ...raw, storePath, narHash, sigs: [...raw.sigs], references: [...raw.references] }, this.signer);
  }
}
