// Where store paths come from. The HTTP side asks a PathSource and does not care whether the
// answer comes from this host's store or (later) from a peer's: keep that decision behind this.
import type { PathInfo } from "../protocol/path-info.js";
import type { NarPiece } from "./store/nar-dump.js";

/** What pathInfoNow() returns when the answer needs I/O (the daemon, a peer): ask pathInfo(). */
export const NOT_NOW = Symbol("ask pathInfo()");

/**
 * What pathInfoNow() returns when it will answer without waiting if asked again from a callback
 * of whenSoon(), later in this event-loop turn (the daemon backend: once the look at Nix's
 * database that the turn's lookups share is taken). A caller without whenSoon() asks pathInfo().
 */
export const SOON = Symbol("ask pathInfoNow() again from whenSoon()");

export interface PathSource {
  /** Metadata (with signatures to offer) of the path with this 32-character hash part, if held. */
  pathInfo(hashPart: string): Promise<PathInfo | undefined>;
  /**
   * pathInfo()'s answer when it can be had without waiting (from memory, or the database's
   * synchronous read), else NOT_NOW. The HTTP side answers such lookups (most of what Nix asks)
   * from request to res.end in one go, with no promise in between. Counts as a lookup as
   * pathInfo() does, except when it returns NOT_NOW or SOON.
   */
  pathInfoNow?(hashPart: string): PathInfo | undefined | typeof NOT_NOW | typeof SOON;
  /**
   * After pathInfoNow() said SOON: calls `run` later in this event-loop turn, when pathInfoNow(),
   * asked again from `run` for a request that came in before `run` was called, answers without
   * waiting (a path, undefined, or NOT_NOW; never SOON). Only with a pathInfoNow() that says SOON.
   */
  whenSoon?(run: () => void): void;
  /**
   * NAR bytes [start, end) of a path that pathInfo returned. Throws (never ends early) if the
   * path disappears or changes while streaming, so that a truncated body is never passed off
   * as complete. Before its first chunk it throws NarGoneError or NarUnavailableError when it
   * can say why there are no bytes (the HTTP side answers 404 or 502 then, instead of a 200).
   * `readSize`, asked before each read from the local store, bounds what one read holds in memory.
   */
  narStream(info: PathInfo, start: number, end: number, readSize?: () => number): AsyncIterable<Buffer>;
  /**
   * narStream(), where bytes of this host's store files may come as FileRegions (with
   * `opts.regionMin`) for the HTTP side to send with sendfile(2); bytes from peers stay Buffers.
   */
  narPieces?(info: PathInfo, start: number, end: number, opts?: NarPieceOptions): AsyncIterable<NarPiece>;
  /**
   * LAN-direct NARs: an absolute URL where Nix can fetch the whole NAR straight from a peer that
   * holds it (a one-time ticket to its direct port), or undefined to have it sent from here. Never
   * throws: any failure means "send it from here".
   */
  directUrl?(info: PathInfo): Promise<string | undefined>;
}

export interface NarPieceOptions {
  /** As narStream's readSize. */
  readSize?: () => number;
  /** File contents of at least this many bytes come as FileRegions (nar-dump.ts narPieces). */
  regionMin?: number;
}

/** The path's bytes are no longer anywhere the source can reach (collected here, no peer holds it). */
export class NarGoneError extends Error {}

/** Holders of the path were asked and all of them failed (unreachable, errors, wrong bytes). */
export class NarUnavailableError extends Error {}

/**
 * Starts `chunks` and waits for its first result, so that a source failing before its first byte
 * throws here, before the caller commits to an answer (an HTTP status, a peer's "ok" header).
 * The generator returned yields every chunk; closing it early closes the source.
 */
export async function primed<T = Buffer>(chunks: AsyncIterable<T>): Promise<AsyncGenerator<T>> {
  const it = chunks[Symbol.asyncIterator]();
  const first = await it.next();
  const gen = (async function* () {
    try {
      if (first.done) return;
      yield first.value;
      for (let r = await it.next(); !r.done; r = await it.next()) yield r.value;
    } finally {
      await it.return?.();
    }
  })();
  // A generator closed before its first next() skips its body, finally included: close the
  // source here too, or a transfer that never started (no bulk connection came) leaks its file.
  const close = gen.return.bind(gen);
  gen.return = async (v) => {
    const r = await close(v);
    await it.return?.();
    return r;
  };
  return gen;
}
