// Compression of NAR transfers between agents (/fleetcache/nar/2.0.0, PEER-PROTOCOL.md): the
// zstd streams on both sides, and the policy that says when to ask for them.
//
// When it pays. zstd level 1 (node:zlib) makes real binaries about 43 % of their size at about
// 300 MB/s per core on a quiet machine and decodes at about 700 MB/s. Over a link slower than
// that, fewer bytes on the wire is more NAR per second; on a LAN, where the mesh itself runs at
// 100-200 MB/s, compressing takes CPU the transfer needs, and content that does not compress
// (random data, .xz files) gains nothing anywhere. Only the requester sees the link (the bytes
// arrive at it), so it says whether it accepts zstd; the holder compresses when accepted.
//
// "auto", per peer. Each transfer from the peer is timed by how long the requester waited for
// its NAR bytes: for the network and its own decoding, not for its own client (a slow Nix is
// backpressure, not a slow link). That gives NAR bytes per second of waiting, times the
// transfers from that peer that ran alongside it on average (they share the link): a moving
// average for plain and one for zstd transfers. Then:
//   - nothing measured yet: plain if the peer is on one of this host's networks (on-link.ts), else
//     zstd if its ping RTT says it is not on the LAN (>= WAN_RTT_MS);
//   - only a zstd figure: one plain transfer (at a time) to measure the link itself;
//   - only a plain figure: zstd if the link delivered under SLOW_LINK_BYTES_PER_SEC;
//   - both: whichever delivered more (zstd only by a MARGIN), and every RETRY_EVERY-th transfer
//     the other one, so that a link or contents that changed are noticed; a fast link whose zstd
//     lost is not probed again.
import { constants, createZstdCompress, createZstdDecompress } from "node:zlib";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { ACCEPT_ZSTD, MAX_ZSTD_WINDOW_LOG, NAR_ENCODING, type NarEncoding } from "../../protocol/peer-codec.js";

export type CompressionMode = "auto" | "zstd" | "off";
export const COMPRESSION_MODES: readonly CompressionMode[] = ["auto", "zstd", "off"];

/** 40 MB/s = 320 Mbit/s: a link that delivers less is worth trying zstd on. */
export const SLOW_LINK_BYTES_PER_SEC = 40e6;
/** A ping RTT at least this long is not a LAN (LANs answer in well under a millisecond). */
export const WAN_RTT_MS = 5;
/** zstd must deliver this much more than plain transfers to be chosen over them. */
export const MARGIN = 1.1;
export const RETRY_EVERY = 16;
/** With only a zstd figure, how long one plain transfer may take before another is asked for. */
const PLAIN_PROBE_MS = 10_000;
/** Transfers with fewer NAR bytes are not timed (they time mostly the round trips). */
const MIN_SAMPLE_BYTES = 256 * 1024;
/** Weight of a new sample in the moving averages. */
const EWMA = 0.3;
const ZSTD_LEVEL = 1;
/** Level 1's own window for large inputs (512 KiB), well within what requesters decode. */
const ZSTD_WINDOW_LOG = 19;
/** Output piece size of the (de)compressors: bounds each step's memory. */
const CHUNK = 128 * 1024;

/** A compressed stream that is not a valid zstd encoding of exactly the expected bytes. */
export class CompressedStreamError extends Error {
  override name = "CompressedStreamError";
  constructor(
    /** corrupt: not valid zstd; size-mismatch: more or fewer bytes than announced; interrupted: the wire ended mid-stream. */
    readonly reason: "corrupt" | "size-mismatch" | "interrupted",
    message: string,
    opts?: { cause?: unknown },
  ) {
    super(message, opts);
  }
}

/** NAR bytes compressed as one zstd stream, produced as the reader takes them (bounded memory). */
export async function* zstdCompress(source: AsyncIterable<Uint8Array>): AsyncGenerator<Buffer> {
  const z = createZstdCompress({
    chunkSize: CHUNK,
    // A checksum lets the requester's decoder, not only the NarHash at the end, catch a corrupt stream.
    params: { [constants.ZSTD_c_compressionLevel]: ZSTD_LEVEL, [constants.ZSTD_c_windowLog]: ZSTD_WINDOW_LOG, [constants.ZSTD_c_checksumFlag]: 1 },
  });
  // The pipeline destroys the compressor if the source fails, so the loop below throws too; and
  // destroying the compressor (the reader went away) stops reading the source.
  const feeding = pipeline(Readable.from(source, { objectMode: false, highWaterMark: CHUNK }), z);
  feeding.catch(() => {});
  try {
    for await (const out of z) yield out as Buffer;
    await feeding;
  } finally {
    z.destroy();
  }
}

/**
 * Decodes a zstd stream that must hold exactly `expected` bytes. Never yields more than that (a
 * stream that would is cut off at once: a bomb costs one output piece), never accepts a window
 * above 2^MAX_ZSTD_WINDOW_LOG (the decoder's memory), and throws CompressedStreamError for
 * anything but exactly `expected` bytes followed by the end of the wire.
 */
export async function* zstdDecompress(wire: AsyncIterable<Uint8Array>, expected: number): AsyncGenerator<Uint8Array> {
  const z = createZstdDecompress({ chunkSize: CHUNK, params: { [constants.ZSTD_d_windowLogMax]: MAX_ZSTD_WINDOW_LOG } });
  let wireError: unknown;
  // Feeds the wire in as the decoder takes it: write() says when its small input buffer is full.
  void (async () => {
    try {
      for await (const c of wire) {
        if (z.destroyed) break; // we are done (or failed): leaving the loop closes the wire
        if (!z.write(c)) await drained(z);
      }
      if (!z.destroyed) z.end();
    } catch (err) {
      wireError = err;
      z.destroy(err as Error);
    }
  })();
  let out = 0;
  try {
    for await (const c of z as AsyncIterable<Buffer>) {
      if (out + c.length > expected) throw new CompressedStreamError("size-mismatch", `zstd stream holds more than the ${expected} bytes announced`);
      out += c.length;
      yield c;
    }
  } catch (err) {
    if (err instanceof CompressedStreamError) throw err;
    if (wireError !== undefined) throw wireError; // the network's failure, not the encoding's
    // zlib's "unexpected end of file": the wire ended inside a frame (cut off, not malformed).
    const truncated = (err as NodeJS.ErrnoException).code === "Z_BUF_ERROR";
    throw new CompressedStreamError(truncated ? "interrupted" : "corrupt", `zstd: ${(err as Error).message}`, { cause: err });
  } finally {
    z.destroy();
  }
  if (out !== expected) throw new CompressedStreamError("size-mismatch", `zstd stream ended after ${out} of ${expected} bytes`);
}

function drained(z: NodeJS.WritableStream & { destroyed: boolean }): Promise<void> {
  if (z.destroyed) return Promise.resolve();
  return new Promise<void>((resolve) => {
    const done = () => {
      z.off("drain", done);
      z.off("close", done);
      resolve();
    };
    z.on("drain", done);
    z.on("close", done);
  });
}

/** Per peer: what the requester has measured of the transfers from it. */
interface PeerLink {
  /** NAR bytes per second of waiting for them (network and decoding) times the transfers alongside, moving averages, by encoding. */
  plain?: number;
  zstd?: number;
  /** Requests made (for the probes). */
  requests: number;
  /** Transfers open now, and their count integrated over time (transfers x ms) up to `at`. */
  active: number;
  activeMs: number;
  at: number;
  /** When a plain transfer was last asked for to measure the link while only zstd was (ms). */
  plainProbeAt?: number;
}

export interface CompressionTotals {
  /** NAR bytes on the wire, received from / sent to peers (compressed or not; the NAR bytes they carry are counted by FleetSource and the mesh). */
  wireReceived: number;
  wireSent: number;
  /** Transfers by encoding, per direction. */
  zstdReceived: number;
  identityReceived: number;
  zstdSent: number;
  identitySent: number;
}

export interface PeerCompressionStatus {
  wireBytesReceived: number;
  wireBytesSent: number;
  /** NAR bytes per second of waiting on the network, of plain and of zstd transfers from the peer, once measured. */
  plainBytesPerSec?: number;
  zstdBytesPerSec?: number;
  /** Whether the next NAR request to the peer accepts zstd. */
  compression: "zstd" | "none";
}

/** One agent's compression settings and measurements (both sides of the NAR service). */
export class NarCompression {
  readonly totals: CompressionTotals = { wireReceived: 0, wireSent: 0, zstdReceived: 0, identityReceived: 0, zstdSent: 0, identitySent: 0 };
  readonly #links = new Map<string, PeerLink>();
  readonly #wireSentTo = new Map<string, number>();
  readonly #wireReceivedFrom = new Map<string, number>();

  constructor(
    readonly mode: CompressionMode,
    /** The peer's ping RTT in ms, if known. */
    private readonly rttMs: (peerId: string) => number | undefined = () => undefined,
    private readonly now: () => number = () => performance.now(),
    /** Whether the peer's mesh connection is to an address on one of this host's networks (on-link.ts). */
    private readonly onLink: (peerId: string) => boolean = () => false,
  ) {}

  /** Requester: the `accept` bits of a NarRequest2 to this peer (counts as a request made). */
  accept(peerId: string): number {
    const l = this.#link(peerId);
    l.requests++;
    return this.#wants(peerId, l, true) ? ACCEPT_ZSTD : 0;
  }

  /** Whether NARs from this peer would be asked for compressed now (no request counted, no probe started). */
  wantsZstd(peerId: string): boolean {
    return this.#wants(peerId, this.#link(peerId), false);
  }

  /**
   * Whether this peer's link is known to be one where NARs go compressed: set so (mode zstd), or
   * measured (auto: plain transfers under SLOW_LINK_BYTES_PER_SEC, or zstd delivering more). Not
   * the ping's guess before any measurement: a loaded host's pings run long on a LAN too. For
   * LAN-direct NARs (direct-client.ts), which are never timed here.
   */
  slowLinkKnown(peerId: string): boolean {
    if (this.mode !== "auto") return this.mode === "zstd";
    const l = this.#links.get(peerId);
    if (l?.plain === undefined) return false;
    return l.plain < SLOW_LINK_BYTES_PER_SEC || (l.zstd !== undefined && l.zstd > l.plain * MARGIN);
  }

  /** `asking`: for a request being made (probes may be due), not a status read. */
  #wants(peerId: string, l: PeerLink, asking: boolean): boolean {
    if (this.mode !== "auto") return this.mode === "zstd";
    if (l.plain === undefined) {
      // The ping's guess is for routed peers only: on a LAN a busy agent answers pings late too,
      // and NARs under MIN_SAMPLE_BYTES never correct it. A slow LAN is found by measuring.
      if (l.zstd === undefined) return !this.onLink(peerId) && (this.rttMs(peerId) ?? 0) >= WAN_RTT_MS;
      // One plain transfer at a time measures the link (it may take a while); the others stay zstd.
      const measuring = l.plainProbeAt !== undefined && this.now() - l.plainProbeAt < PLAIN_PROBE_MS;
      if (!asking || measuring) return true;
      l.plainProbeAt = this.now();
      return false;
    }
    if (l.zstd === undefined) return l.plain < SLOW_LINK_BYTES_PER_SEC;
    const better = l.zstd > l.plain * MARGIN;
    const probe = asking && l.requests % RETRY_EVERY === 0 && (better || l.plain < SLOW_LINK_BYTES_PER_SEC);
    return probe ? !better : better;
  }

  /** Holder: the encoding for a request that accepts `accept`. */
  choose(accept: number): NarEncoding {
    return this.mode !== "off" && accept & ACCEPT_ZSTD ? NAR_ENCODING.zstd : NAR_ENCODING.identity;
  }

  /** Holder: NAR bytes [offset, end) for `peerId` as `encoding` makes them, counting what goes on the wire. */
  async *encode(peerId: string, encoding: NarEncoding, nar: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
    this.totals[encoding === NAR_ENCODING.zstd ? "zstdSent" : "identitySent"]++;
    for await (const c of encoding === NAR_ENCODING.zstd ? zstdCompress(nar) : nar) {
      this.totals.wireSent += c.length;
      this.#wireSentTo.set(peerId, (this.#wireSentTo.get(peerId) ?? 0) + c.length);
      yield c;
    }
  }

  /**
   * Requester: the decoded NAR bytes of one transfer from `peerId`, counting its wire bytes and
   * timing the waits for them (the link measurement) on the way.
   */
  async *receive(peerId: string, encoding: NarEncoding, narBytes: number, wire: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
    const zstd = encoding === NAR_ENCODING.zstd;
    this.totals[zstd ? "zstdReceived" : "identityReceived"]++;
    const l = this.#link(peerId);
    this.#tick(l);
    l.active++;
    const [start, activeMs0] = [l.at, l.activeMs];
    let waitMs = 0;
    const self = this;
    async function* counted(): AsyncGenerator<Uint8Array> {
      for await (const c of wire) {
        self.totals.wireReceived += c.length;
        self.#wireReceivedFrom.set(peerId, (self.#wireReceivedFrom.get(peerId) ?? 0) + c.length);
        yield c;
      }
    }
    // Timed where the NAR bytes come out: the waits for the network and, for zstd, for our own
    // decoding (which costs CPU the transfer could have had), but not our client's time.
    const it = (zstd ? zstdDecompress(counted(), narBytes) : counted())[Symbol.asyncIterator]();
    let complete = false;
    try {
      for (;;) {
        const t0 = this.now();
        const next = await it.next();
        waitMs += this.now() - t0;
        if (next.done) break;
        yield next.value;
      }
      complete = true;
    } finally {
      if (!complete) await it.return?.(undefined);
      this.#tick(l);
      l.active--;
      // Parallel transfers share the link: this one's rate times how many ran alongside it on
      // average is the link's. Only whole transfers are timed: a failed one says more about the
      // holder than the link.
      if (complete && narBytes >= MIN_SAMPLE_BYTES) {
        const parallel = Math.max(1, (l.activeMs - activeMs0) / Math.max(l.at - start, 1));
        const rate = ((narBytes * 1000) / Math.max(waitMs, 1)) * parallel;
        if (zstd) l.zstd = avg(l.zstd, rate);
        else l.plain = avg(l.plain, rate);
      }
    }
  }

  /** Brings the peer's transfers-over-time integral up to now. */
  #tick(l: PeerLink): void {
    const now = this.now();
    l.activeMs += l.active * (now - l.at);
    l.at = now;
  }

  #link(peerId: string): PeerLink {
    let l = this.#links.get(peerId);
    if (!l) this.#links.set(peerId, (l = { requests: 0, active: 0, activeMs: 0, at: this.now() }));
    return l;
  }

  peerStatus(peerId: string): PeerCompressionStatus {
    const l = this.#links.get(peerId);
    return {
      wireBytesReceived: this.#wireReceivedFrom.get(peerId) ?? 0,
      wireBytesSent: this.#wireSentTo.get(peerId) ?? 0,
      ...(l?.plain !== undefined && { plainBytesPerSec: Math.round(l.plain) }),
      ...(l?.zstd !== undefined && { zstdBytesPerSec: Math.round(l.zstd) }),
      compression: this.#wants(peerId, this.#link(peerId), false) ? "zstd" : "none",
    };
  }
}

function avg(prev: number | undefined, sample: number): number {
  return prev === undefined ? sample : prev + EWMA * (sample - prev);
}
