// The requester's side of LAN-direct NARs (`direct_lan`, direct-listener.ts): for a NAR Nix asks
// this agent for, a one-time ticket to the holder's direct port, turned into the URL Nix is
// redirected to. Only for a holder on one of this host's networks (on-link.ts, as the bulk path)
// over a link where NARs go uncompressed, and only while the holder offers direct at all and its
// direct port can be reached from here (Nix, on this host, would otherwise fail the download on
// every retry: a firewall that opens only the mesh and bulk ports).
import { connect, isIPv6 } from "node:net";
import type { Logger } from "../log.js";
import { bulkHost } from "./bulk-client.js";
import type { NarCompression } from "./nar-compression.js";
import { askDirect, type NarFetchRequest } from "./nar-service.js";
import type { MeshNode } from "./node.js";

/** A holder that answered a direct request with the body (it does not offer direct) is not asked again for this long. */
export const DIRECT_RETRY_AFTER_MS = 10 * 60_000;
/** The ticket's round trip: a LAN peer answers in a millisecond or two; past this, relay rather than keep Nix waiting. */
export const DIRECT_ASK_MS = 2_000;
/** A holder's direct port found reachable (a TCP connection made from here) is trusted to stay so this long. */
export const DIRECT_REACHABLE_MS = 10 * 60_000;
/** How long the reachability probe waits for the TCP connection. */
export const DIRECT_PROBE_MS = 1_000;

export class DirectRoutes {
  readonly #noDirectUntil = new Map<string, number>();
  /** "host:port" of direct ports a TCP connection reached, until when. */
  readonly #reachableUntil = new Map<string, number>();
  /** NAR requests answered with a redirect to a holder's direct port. */
  redirects = 0;
  /** Tickets asked for and not had (no offer, an error, the deadline): those NARs were relayed. */
  fallbacks = 0;

  constructor(
    readonly node: MeshNode,
    readonly compression: NarCompression | undefined,
    readonly log?: Logger,
  ) {}

  /** The URL for Nix to fetch the whole NAR from `peerId` directly, or undefined: relay it. Never throws. */
  async url(peerId: string, req: Omit<NarFetchRequest, "offset">, signal?: AbortSignal): Promise<string | undefined> {
    const until = this.#noDirectUntil.get(peerId);
    if (until !== undefined && Date.now() < until) return undefined;
    // Not on-link (routed, a tailnet, IPv6 link-local): relay, as the bulk path does.
    const host = bulkHost(this.node, peerId);
    if (host === undefined) return undefined;
    // A link slow enough for zstd is not a LAN Nix should pull plain bytes over.
    if (this.compression?.wantsZstd(peerId)) return undefined;
    const asked = performance.now();
    try {
      const t = await askDirect(this.node, peerId, req, { headerTimeoutMs: DIRECT_ASK_MS, ...(signal && { signal }) });
      // For bench/mesh.ts: the ticket's round trip is the latency this mode adds per NAR.
      this.log?.debug({ peer: peerId, hashPart: req.hashPart, ms: Math.round((performance.now() - asked) * 10) / 10, ticket: typeof t === "object" }, "mesh: direct ticket asked");
      if (typeof t === "string") {
        this.fallbacks++;
        if (t === "no-direct") this.#noDirectUntil.set(peerId, Date.now() + DIRECT_RETRY_AFTER_MS);
        return undefined;
      }
      if (!(await this.#reachable(host, t.port))) {
        // The ticket expires unused; Nix gets the NAR relayed, and so do this holder's next ones for a while.
        this.fallbacks++;
        this.#noDirectUntil.set(peerId, Date.now() + DIRECT_RETRY_AFTER_MS);
        this.log?.info({ peer: peerId, host, port: t.port }, "mesh: a peer's direct port cannot be reached from here; relaying its NARs for a while");
        return undefined;
      }
      this.redirects++;
      return `http://${isIPv6(host) ? `[${host}]` : host}:${t.port}${t.path}`;
    } catch (err) {
      this.fallbacks++;
      this.log?.debug({ peer: peerId, hashPart: req.hashPart, err: (err as Error).message }, "mesh: no direct ticket; relaying");
      return undefined;
    }
  }

  /** Whether a TCP connection to the direct port can be made from here (probed once per DIRECT_REACHABLE_MS). */
  async #reachable(host: string, port: number): Promise<boolean> {
    const key = `${host}:${port}`;
    const until = this.#reachableUntil.get(key);
    if (until !== undefined && Date.now() < until) return true;
    const ok = await new Promise<boolean>((resolve) => {
      const sock = connect({ host, port, timeout: DIRECT_PROBE_MS });
      const done = (result: boolean) => {
        sock.destroy();
        resolve(result);
      };
      sock.once("connect", () => done(true));
      sock.once("timeout", () => done(false));
      sock.once("error", () => done(false));
    });
    if (ok) this.#reachableUntil.set(key, Date.now() + DIRECT_REACHABLE_MS);
    else this.#reachableUntil.delete(key);
    return ok;
  }
}
