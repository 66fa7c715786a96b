// Compression of NAR transfers between agents (/fleetcache/nar/2.0.0, PEER-PROTOCOL.md): the
// zstd streams on both sides, and the policy that says when to ask for them.
//
// When it pays. zstd level 1 (node:zlib) makes real binaries about 43 % of their size at about
// 300 MB/s per core and decompresses at about 700 MB/s. Over a link slower than that, fewer bytes
// on the wire is more NAR per second; on a LAN, where the mesh itself runs at 100-200 MB/s on these
// machines, compressing costs the CPU the transfer needs. Only the requester knows the link (the
// bytes arrive at it), so it says whether it accepts zstd, and the holder, which has the bytes,
// compresses when accepted. In "auto" the requester accepts zstd from a peer when:
//   - the link from it is slow: the wire bytes per busy second of recent transfers from that peer
//     (all of them together: 8 parallel transfers share one link) are under SLOW_LINK_BYTES_PER_SEC;
//     before any measurement, when the peer's ping RTT says it is not on the LAN (>= WAN_RTT_MS);
//   - and the NARs from it compress: transfers it compressed lately came out smaller than
//     USEFUL_RATIO of their size (a peer of incompressible NARs is asked again every
//     RETRY_EVERY transfers, since contents change).
// Measured while compressing, the wire rate of a slow link stays the link's rate (so compression
// stays on); a fast link whose compressed transfers run faster than the threshold turns it off.
import { constants, createZstdCompress, createZstdDecompress } from "node:zlib";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { ACCEPT_ZSTD, MAX_ZSTD_WINDOW_LOG, NAR_ENCODING, type NarEncoding } from "../../protocol/peer-codec.js";

export type CompressionMode = "auto" | "zstd" | "off";
export const COMPRESSION_MODES: readonly CompressionMode[] = ["auto", "zstd", "off"];

/** 40 MB/s = 320 Mbit/s: below this a link is the bottleneck zstd can widen. */
export const SLOW_LINK_BYTES_PER_SEC = 40e6;
/** A ping RTT at least this long is not a LAN (LANs answer in well under a millisecond). */
export const WAN_RTT_MS = 5;
/** Compressed size / NAR size under which compressing is worth the CPU. */
export const USEFUL_RATIO = 0.9;
export const RETRY_EVERY = 16;
/** A rate sample needs this many wire bytes and busy ms (small transfers time mostly round trips). */
const MIN_SAMPLE_BYTES = 1 << 20;
const MIN_SAMPLE_MS = 50;
/** A compressed transfer this large counts towards the peer's compression ratio. */
const MIN_RATIO_BYTES = 64 * 1024;
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

/** Per peer: what the requester has learnt about the link from it and its NARs. */
interface PeerLink {
  /** Wire bytes per busy second, moving average; undefined until measured. */
  rate?: number;
  /** Compressed / NAR bytes of its compressed transfers, moving average. */
  ratio?: number;
  /** Transfers open now, and since when at least one has been (the busy period). */
  active: number;
  busySince: number;
  /** The sample being gathered: wire bytes, and busy ms of the periods before the current one. */
  sampleBytes: number;
  sampleMs: number;
  transfers: number;
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
  /** The link from the peer as measured (wire bytes per second), once measured. */
  linkBytesPerSec?: number;
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
  ) {}

  /** Requester: the `accept` bits of a NarRequest2 to this peer. */
  accept(peerId: string): number {
    if (this.mode === "off") return 0;
    if (this.mode === "zstd") return ACCEPT_ZSTD;
    const l = this.#links.get(peerId);
    if (l?.ratio !== undefined && l.ratio >= USEFUL_RATIO && l.transfers % RETRY_EVERY !== 0) return 0;
    const slow = l?.rate !== undefined ? l.rate < SLOW_LINK_BYTES_PER_SEC : (this.rttMs(peerId) ?? 0) >= WAN_RTT_MS;
    return slow ? ACCEPT_ZSTD : 0;
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
   * Requester: the decoded NAR bytes of one transfer from `peerId`, counting and timing its wire
   * bytes (the link measurement) on the way.
   */
  async *receive(peerId: string, encoding: NarEncoding, narBytes: number, wire: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
    const l = this.#link(peerId);
    l.transfers++;
    if (l.active++ === 0) l.busySince = this.now();
    let wireBytes = 0;
    let complete = false;
    const self = this;
    async function* counted(): AsyncGenerator<Uint8Array> {
      for await (const c of wire) {
        wireBytes += c.length;
        l.sampleBytes += c.length;
        if (l.sampleBytes >= MIN_SAMPLE_BYTES) self.#sampleRate(l);
        self.totals.wireReceived += c.length;
        self.#wireReceivedFrom.set(peerId, (self.#wireReceivedFrom.get(peerId) ?? 0) + c.length);
        yield c;
      }
    }
    try {
      if (encoding === NAR_ENCODING.zstd) {
        this.totals.zstdReceived++;
        yield* zstdDecompress(counted(), narBytes);
      } else {
        this.totals.identityReceived++;
        yield* counted();
      }
      complete = true;
    } finally {
      if (complete && encoding === NAR_ENCODING.zstd && narBytes >= MIN_RATIO_BYTES) l.ratio = avg(l.ratio, wireBytes / narBytes);
      if (--l.active === 0) l.sampleMs += this.now() - l.busySince;
    }
  }

  /**
   * A rate sample: wire bytes over the time at least one transfer from the peer was open (idle
   * gaps between transfers are Nix's time, not the link's), once there are enough bytes and time
   * to time.
   */
  #sampleRate(l: PeerLink): void {
    const now = this.now();
    const ms = l.sampleMs + (now - l.busySince);
    if (ms < MIN_SAMPLE_MS) return;
    l.rate = avg(l.rate, (l.sampleBytes * 1000) / ms);
    l.sampleBytes = 0;
    l.sampleMs = 0;
    l.busySince = now;
  }

  #link(peerId: string): PeerLink {
    let l = this.#links.get(peerId);
    if (!l) this.#links.set(peerId, (l = { active: 0, busySince: 0, sampleBytes: 0, sampleMs: 0, transfers: 0 }));
    return l;
  }

  peerStatus(peerId: string): PeerCompressionStatus {
    const rate = this.#links.get(peerId)?.rate;
    return {
      wireBytesReceived: this.#wireReceivedFrom.get(peerId) ?? 0,
      wireBytesSent: this.#wireSentTo.get(peerId) ?? 0,
      ...(rate !== undefined && { linkBytesPerSec: Math.round(rate) }),
      compression: this.accept(peerId) & ACCEPT_ZSTD ? "zstd" : "none",
    };
  }
}

function avg(prev: number | undefined, sample: number): number {
  return prev === undefined ? sample : prev + EWMA * (sample - prev);
}
