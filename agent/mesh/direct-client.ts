// The requester's side of LAN-direct NARs (`direct_lan`, direct-listener.ts): for a NAR Nix asks
// this agent for, a one-time ticket to the holder's direct port, turned into the URL Nix is
// redirected to. Only for a holder on one of this host's networks (on-link.ts, as the bulk path)
// over a link where NARs go uncompressed, and only while the holder offers direct at all and its
// direct port can be reached from here (Nix, on this host, would otherwise fail the download on
// every retry: a firewall that opens only the mesh and bulk ports).
// The first ticket from a holder is asked for over the mesh (a round trip, ~4 ms on a LAN); its
// answer carries a minting key too, and until that key nears its end the tickets for that
// holder's NARs are minted here, with no round trip (protocol/direct-ticket.ts).
// Nix checks a redirected NAR's bytes, not this agent, so a holder whose bytes are wrong (a store
// file changed on disk, a lying peer) fails Nix's substitution unseen here. Nix asking for the NAR
// again soon after a redirect is the sign that something went wrong there: that NAR is relayed
// (verified, from the holder Nix was sent to first, fleet-source.ts), not redirected again, so a
// holder with wrong bytes is caught and penalised and the NAR comes from an intact one.
import { randomBytes } from "node:crypto";
import { connect, isIPv6 } from "node:net";
import type { PeerId } from "@libp2p/interface";
import { MAX_MINTS_PER_KEY, MINT_NONCE_BYTES, mintTicket } from "../../protocol/direct-ticket.js";
import { narUrl } from "../../protocol/nar-url.js";
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

/** A minting key is used until this long before its lifetime (from its receipt, by this host's clock) runs out. */
export const MINT_KEY_MARGIN_MS = 60_000;
/**
 * A NAR Nix asks for again this soon after a redirect for it (a hash mismatch, a 502, a broken
 * download; or a second copy of the same closure) is relayed, not redirected. Long enough for a
 * user's or a CI job's rerun after a failed build (minutes), and as long as the bar on a holder
 * for a path whose bytes it got wrong (holder-penalties.ts), so a retry within it never goes
 * back to an unchecked holder. The cost: a second copy of the same NARs within it is relayed.
 */
export const REPEAT_RELAY_MS = 10 * 60_000;

/**
 * Redirects remembered for REPEAT_RELAY_MS, the oldest forgotten first past this many (about a
 * megabyte). Nix stops at a failed NAR, so the one to catch is among the last redirected before
 * the rerun: only 10,000 other redirects in between (a large closure) lose it.
 */
const MAX_RECENT = 10_000;

interface HeldKey {
  keyId: Uint8Array;
  key: Uint8Array;
  port: number;
  /** performance.now() after which no more tickets are minted with it. */
  goodUntil: number;
  mints: number;
}

export class DirectRoutes {
  readonly #noDirectUntil = new Map<string, number>();
  /** Minting keys by holder. */
  readonly #keys = new Map<string, HeldKey>();
  /**
   * Holders a key is being asked of, settled when it is in (one ask at a time: the holder keeps
   * only a peer's last two keys; NARs Nix asks for meanwhile wait for it rather than ask too).
   */
  readonly #askingKey = new Map<string, Promise<unknown>>();
  /** Redirected NARs by hash part, oldest first: the holder, and until when a repeat is relayed (performance.now()). */
  readonly #recent = new Map<string, { peer: string; until: number }>();
  /** "host:port" of direct ports a TCP connection reached, until when. */
  readonly #reachableUntil = new Map<string, number>();
  /** NAR requests answered with a redirect to a holder's direct port. */
  redirects = 0;
  /** Tickets asked for and not had (no offer, an error, the deadline): those NARs were relayed. */
  fallbacks = 0;
  /** Tickets asked of holders over the mesh (a round trip each). */
  asked = 0;
  /** Of `redirects`: tickets minted here, without asking. */
  minted = 0;
  /** NAR requests relayed because Nix asked for the NAR again soon after a redirect (REPEAT_RELAY_MS). */
  repeats = 0;

  constructor(
    readonly node: MeshNode,
    readonly compression: NarCompression | undefined,
    readonly log?: Logger,
  ) {
    // A holder's keys die with its agent (a restart): a new connection, a new key.
    node.libp2p.addEventListener("peer:disconnect", this.#onDisconnect);
  }

  readonly #onDisconnect = (evt: CustomEvent<PeerId>): void => {
    this.#keys.delete(evt.detail.toString());
  };

  close(): void {
    this.node.libp2p.removeEventListener("peer:disconnect", this.#onDisconnect);
    this.#keys.clear();
  }

  /** The holder Nix was redirected to for this NAR within REPEAT_RELAY_MS, if any (asked first when it is relayed). */
  redirectedTo(hashPart: string): string | undefined {
    const r = this.#recent.get(hashPart);
    if (r === undefined) return undefined;
    if (performance.now() < r.until) return r.peer;
    this.#recent.delete(hashPart);
    return undefined;
  }

  /** Remembers a redirect of this NAR to `peerId`; the map stays bounded whatever Nix asks. */
  #redirected(peerId: string, hashPart: string): void {
    this.#recent.delete(hashPart); // re-inserted last: the map stays in order of redirects
    if (this.#recent.size >= MAX_RECENT) this.#recent.delete(this.#recent.keys().next().value!);
    this.#recent.set(hashPart, { peer: peerId, until: performance.now() + REPEAT_RELAY_MS });
  }

  /** A ticket minted with `peerId`'s key for this NAR, or undefined (no usable key). */
  #mint(peerId: string, req: Omit<NarFetchRequest, "offset">): { port: number; path: string } | undefined {
    const k = this.#keys.get(peerId);
    if (!k || performance.now() >= k.goodUntil || k.mints >= MAX_MINTS_PER_KEY) return undefined;
    k.mints++;
    const tail = narUrl(req.hashPart, req.narHash);
    const ticket = mintTicket(k.key, k.keyId, randomBytes(MINT_NONCE_BYTES), tail);
    return { port: k.port, path: `/${ticket.toString("hex")}/${tail}` };
  }

  /** The URL for Nix to fetch the whole NAR from `peerId` directly, or undefined: relay it. Never throws. */
  async url(peerId: string, req: Omit<NarFetchRequest, "offset">, signal?: AbortSignal): Promise<string | undefined> {
    if (this.redirectedTo(req.hashPart) !== undefined) {
      this.repeats++;
      this.log?.debug({ peer: peerId, hashPart: req.hashPart }, "mesh: Nix asked again for a NAR it was redirected for; relaying it, verified");
      return undefined;
    }
    const until = this.#noDirectUntil.get(peerId);
    if (until !== undefined && Date.now() < until) return undefined;
    // Not on-link (routed, a tailnet, IPv6 link-local): relay, as the bulk path does.
    const host = bulkHost(this.node, peerId);
    if (host === undefined) return undefined;
    // A link known to be slow enough for zstd (measured, or set so) is not a LAN Nix should pull
    // plain bytes over. Not the ping's guess: a loaded agent's pings run long on a LAN too, and
    // direct NARs are never timed, so that guess would never be corrected.
    if (this.compression?.slowLinkKnown(peerId)) return undefined;
    const pending = this.#askingKey.get(peerId);
    if (pending && !this.#usable(peerId)) await pending;
    const minted = this.#mint(peerId, req);
    // The port was reachable when the key came (probed then); probed again once that has lapsed.
    if (minted && (await this.#reachable(host, minted.port))) {
      this.redirects++;
      this.minted++;
      this.#redirected(peerId, req.hashPart);
      return `http://${isIPv6(host) ? `[${host}]` : host}:${minted.port}${minted.path}`;
    }
    const asked = performance.now();
    const wantKey = !this.#askingKey.has(peerId) && !this.#usable(peerId);
    const keyIn = { resolve: () => {} };
    if (wantKey) this.#askingKey.set(peerId, new Promise<void>((r) => (keyIn.resolve = r)));
    try {
      this.asked++;
      const t = await askDirect(this.node, peerId, req, { headerTimeoutMs: DIRECT_ASK_MS, wantKey, ...(signal && { signal }) });
      // For bench/mesh.ts: the ticket's round trip is the latency this mode adds per NAR.
      this.log?.debug({ peer: peerId, hashPart: req.hashPart, ms: Math.round((performance.now() - asked) * 10) / 10, ticket: typeof t === "object" }, "mesh: direct ticket asked");
      if (typeof t === "string") {
        this.fallbacks++;
        if (t === "no-direct") this.#noDirectUntil.set(peerId, Date.now() + DIRECT_RETRY_AFTER_MS);
        return undefined;
      }
      if (t.mint) {
        const lifetimeMs = t.mint.lifetimeS * 1000;
        const goodFor = lifetimeMs > 2 * MINT_KEY_MARGIN_MS ? lifetimeMs - MINT_KEY_MARGIN_MS : lifetimeMs / 2;
        this.#keys.set(peerId, { keyId: t.mint.keyId, key: t.mint.key, port: t.port, goodUntil: asked + goodFor, mints: 0 });
        keyIn.resolve();
      }
      if (!(await this.#reachable(host, t.port))) {
        // The ticket expires unused; Nix gets the NAR relayed, and so do this holder's next ones for a while.
        this.fallbacks++;
        this.#noDirectUntil.set(peerId, Date.now() + DIRECT_RETRY_AFTER_MS);
        this.log?.info({ peer: peerId, host, port: t.port }, "mesh: a peer's direct port cannot be reached from here; relaying its NARs for a while");
        return undefined;
      }
      this.redirects++;
      this.#redirected(peerId, req.hashPart);
      return `http://${isIPv6(host) ? `[${host}]` : host}:${t.port}${t.path}`;
    } catch (err) {
      this.fallbacks++;
      this.log?.debug({ peer: peerId, hashPart: req.hashPart, err: (err as Error).message }, "mesh: no direct ticket; relaying");
      return undefined;
    } finally {
      if (wantKey) {
        this.#askingKey.delete(peerId);
        keyIn.resolve();
      }
    }
  }

  /** Whether tickets for `peerId` can be minted now. */
  #usable(peerId: string): boolean {
    const k = this.#keys.get(peerId);
    return k !== undefined && performance.now() < k.goodUntil && k.mints < MAX_MINTS_PER_KEY;
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
