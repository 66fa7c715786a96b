// Reading and writing libp2p v3 streams with bounded memory.
//
// Reading: `for await` over a stream does not slow the sender (yamux keeps granting window), so
// StreamReader consumes 'message' events into its own queue and pauses the stream (yamux then
// stops granting window) when the queue reaches a high-water mark. What a reader holds is bounded
// by its high-water mark plus two windows: the one in flight when it paused, which resume() hands
// over, and the one resume() grants before we can pause again. Frames are varint
// length-prefixed (unsigned LEB128, as libp2p's own length-prefixed protocols) with a caller-given
// maximum: an oversized frame resets the stream before its payload is read.
//
// Writing: stream.send() returns false when the muxer is full; we then wait until the stream's
// write queue is empty (see send() for why not onDrain()).
//
// Ends: a clean FIN from the remote ends reads normally; a reset or an abort throws. A connection
// that closes under the stream without a FIN throws TruncatedStreamError. A peer that shuts down
// gracefully may still FIN a half-sent stream, so callers must know how many bytes to expect
// (readExactly, chunks(limit)) rather than trust an end.
import type { AbortOptions, Stream, StreamCloseEvent, StreamMessageEvent } from "@libp2p/interface";

/** Largest yamux receive window we configure (see node.ts); in flight when we pause. */
export const MAX_STREAM_WINDOW = 4 * 1024 * 1024;
export const DEFAULT_HIGH_WATER_MARK = 1024 * 1024;
/** Longest varint we read: 8 bytes = 56 bits, more than any frame limit we would accept. */
const MAX_VARINT_BYTES = 8;

export class FrameTooLargeError extends Error {
  override name = "FrameTooLargeError";
  constructor(readonly length: number, readonly maxBytes: number) {
    super(`frame of ${length} bytes exceeds the limit of ${maxBytes}`);
  }
}

/**
 * Whether a stream kept idle (a pooled narinfo stream, a NAR stream opened ahead) can still carry
 * a request: open both ways, and nothing unread from the other side.
 */
export function idleAndSound(stream: Stream, reader: StreamReader): boolean {
  return stream.status === "open" && stream.writeStatus === "writable" && stream.remoteWriteStatus === "writable" && reader.buffered === 0;
}

/** The stream ended (or its connection closed) before the expected bytes arrived. */
export class TruncatedStreamError extends Error {
  override name = "TruncatedStreamError";
}

export class StreamReader {
  readonly stream: Stream;
  #chunks: Uint8Array[] = [];
  #head = 0; // read offset into #chunks[0]
  #buffered = 0;
  #bytesRead = 0;
  #want = 0; // bytes a pending read needs: never pause below this, or it would wait forever
  #fin = false; // remote closed its write end
  #closed = false;
  #error: Error | undefined;
  #wake: (() => void) | undefined;
  #resuming = false;
  readonly #highWater: number;

  constructor(stream: Stream, opts: { highWaterMark?: number } = {}) {
    this.stream = stream;
    this.#highWater = opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK;
    // While paused, frames already in flight (up to one window) land in the stream's own buffer,
    // and libp2p resets a stream whose buffer passes maxReadBufferLength (4 MiB by default).
    stream.maxReadBufferLength = Math.max(stream.maxReadBufferLength, 2 * MAX_STREAM_WINDOW);
    stream.addEventListener("message", (evt: StreamMessageEvent) => this.#onMessage(evt));
    stream.addEventListener("remoteCloseWrite", () => {
      this.#fin = true;
      this.#notify();
    });
    stream.addEventListener("close", (evt: StreamCloseEvent) => {
      this.#closed = true;
      this.#error ??= evt.error;
      this.#notify();
    });
    if (stream.remoteWriteStatus === "closed" && stream.status === "open") this.#fin = true;
    if (stream.status !== "open") this.#closed = true;
  }

  /** Bytes received but not yet handed to the caller (ours plus the stream's paused buffer). */
  get buffered(): number {
    return this.#buffered + this.stream.readBufferLength;
  }

  /** Bytes handed to the caller so far. */
  get bytesRead(): number {
    return this.#bytesRead;
  }

  /**
   * Next length-prefixed frame, or undefined when the remote closed cleanly between frames.
   * A frame longer than maxBytes resets the stream and throws FrameTooLargeError. With `scratch`,
   * a frame that arrived in pieces is put together there (if it fits) instead of in a fresh
   * array: the caller must be done with the previous frame by then.
   */
  async readFrame(maxBytes: number, scratch?: Uint8Array): Promise<Uint8Array | undefined> {
    let length = 0;
    for (let i = 0; ; i++) {
      if (!(await this.#fill(1))) {
        if (i === 0) return undefined;
        throw new TruncatedStreamError("stream ended inside a frame header");
      }
      const b = this.#take(1)[0]!;
      length += (b & 0x7f) * 2 ** (7 * i);
      if (length > maxBytes || (b & 0x80 && i + 1 >= MAX_VARINT_BYTES)) {
        const err = new FrameTooLargeError(length, maxBytes);
        this.stream.abort(err);
        throw err;
      }
      if (!(b & 0x80)) break;
    }
    return this.readExactly(length, scratch);
  }

  /**
   * Exactly n bytes (one copy only when they span chunks: into `scratch` if given and large
   * enough); TruncatedStreamError if it ends first.
   */
  async readExactly(n: number, scratch?: Uint8Array): Promise<Uint8Array> {
    if (n === 0) return new Uint8Array(0);
    if (!(await this.#fill(n))) {
      throw new TruncatedStreamError(`stream ended after ${this.#buffered} of ${n} expected bytes`);
    }
    return this.#take(n, scratch);
  }

  /**
   * Raw bytes as they arrive, without copying. With a limit, stops after exactly that many bytes
   * and throws TruncatedStreamError if the stream ends first; without one, runs to the end.
   */
  async *chunks(limit = Infinity): AsyncGenerator<Uint8Array, void, undefined> {
    let left = limit;
    while (left > 0) {
      if (!(await this.#fill(1))) {
        if (limit === Infinity) return;
        throw new TruncatedStreamError(`stream ended after ${limit - left} of ${limit} expected bytes`);
      }
      const head = this.#chunks[0]!;
      const n = Math.min(left, head.length - this.#head);
      const chunk = this.#take(n);
      left -= n;
      yield chunk;
    }
  }

  #onMessage(evt: StreamMessageEvent): void {
    // A message is a Uint8Array or a Uint8ArrayList (iterable over its Uint8Arrays).
    const parts = evt.data instanceof Uint8Array ? [evt.data] : evt.data;
    for (const part of parts) {
      if (part.length === 0) continue;
      this.#chunks.push(part);
      this.#buffered += part.length;
    }
    if (!this.#resuming) this.#maybePause();
    this.#notify();
  }

  #maybePause(): void {
    if (this.#buffered >= Math.max(this.#highWater, this.#want) && this.stream.readStatus === "readable") {
      this.stream.pause();
    }
  }

  /**
   * resume() hands over the paused buffer (our 'message' listener runs inside it) and only then
   * tells yamux to grant window again, undoing a pause() made from that listener while leaving the
   * stream marked paused: the remote then sends into a buffer nobody drains until libp2p resets
   * the stream. So pause, if needed, only after resume() has returned.
   */
  #resume(): void {
    this.#resuming = true;
    try {
      this.stream.resume();
    } finally {
      this.#resuming = false;
    }
    this.#maybePause();
  }

  /** Waits until n bytes are queued (true) or no more will come (false); throws on reset/abort. */
  async #fill(n: number): Promise<boolean> {
    this.#want = n;
    try {
      while (this.#buffered < n) {
        if (this.#error) throw this.#error;
        // Resuming hands over anything the stream held while paused, synchronously.
        if (this.stream.readStatus === "paused" && this.#buffered < Math.max(this.#highWater / 2, n)) {
          this.#resume();
          continue;
        }
        if (this.#fin && this.stream.readBufferLength === 0) return false;
        if (this.#closed && this.stream.readBufferLength === 0) {
          if (this.#fin) return false;
          // The connection went away without the remote closing the stream.
          throw new TruncatedStreamError("connection closed before the remote finished the stream");
        }
        await new Promise<void>((resolve) => (this.#wake = resolve));
      }
      return true;
    } finally {
      this.#want = 0;
    }
  }

  #take(n: number, scratch?: Uint8Array): Uint8Array {
    this.#buffered -= n;
    this.#bytesRead += n;
    const head = this.#chunks[0]!;
    if (head.length - this.#head >= n) {
      const out = head.subarray(this.#head, this.#head + n);
      this.#head += n;
      if (this.#head === head.length) this.#shift();
      return out;
    }
    const out = scratch && scratch.length >= n ? scratch.subarray(0, n) : new Uint8Array(n);
    let off = 0;
    while (off < n) {
      const c = this.#chunks[0]!;
      const m = Math.min(n - off, c.length - this.#head);
      out.set(c.subarray(this.#head, this.#head + m), off);
      off += m;
      this.#head += m;
      if (this.#head === c.length) this.#shift();
    }
    return out;
  }

  #shift(): void {
    this.#chunks.shift();
    this.#head = 0;
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = undefined;
    wake?.();
  }
}

/**
 * Sends bytes; when the stream reports it is full, waits until its write queue is empty.
 *
 * Not stream.onDrain(): in @libp2p/utils 7.x its promise is created once and never replaced, so
 * after the first 'drain' it resolves at once forever, and 'drain' itself fires on every yamux
 * window update however small. Writers trusting it queue without bound (measured: 100 MiB queued
 * behind a slow reader). 'idle' (write queue empty) is the signal that bounds the queue to one chunk.
 */
export async function send(stream: Stream, data: Uint8Array, opts?: AbortOptions): Promise<void> {
  if (stream.send(data)) return;
  await writeQueueEmpty(stream, opts);
}

function writeQueueEmpty(stream: Stream, opts?: AbortOptions): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    const signal = opts?.signal;
    const done = (err?: Error) => {
      stream.removeEventListener("idle", onIdle);
      stream.removeEventListener("close", onClose);
      signal?.removeEventListener("abort", onAbort);
      if (err) reject(err);
      else resolve();
    };
    const onIdle = () => done();
    const onClose = (evt: StreamCloseEvent) => done(evt.error ?? new Error("stream closed while sending"));
    const onAbort = () => done(signal?.reason instanceof Error ? signal.reason : new Error("aborted"));
    if (stream.writeBufferLength === 0) return resolve();
    if (stream.status !== "open") return reject(new Error(`stream ${stream.status} while sending`));
    if (signal?.aborted) return onAbort();
    stream.addEventListener("idle", onIdle);
    stream.addEventListener("close", onClose);
    signal?.addEventListener("abort", onAbort);
  });
}

/** Frames up to this size go out with their length prefix in one send (a copy of the payload). */
const JOIN_FRAME_BYTES = 64 * 1024;

/**
 * Writes one varint length-prefixed frame. A small one goes in one send: each send is a yamux
 * data frame and a noise message, so a prefix sent apart cost the peer a second read,
 * decryption and dispatch (and js-yamux a window update) for one or two bytes.
 */
export async function writeFrame(stream: Stream, payload: Uint8Array, opts?: AbortOptions): Promise<void> {
  const prefix = encodeVarint(payload.length);
  if (payload.length > 0 && payload.length <= JOIN_FRAME_BYTES) {
    const frame = new Uint8Array(prefix.length + payload.length);
    frame.set(prefix);
    frame.set(payload, prefix.length);
    return send(stream, frame, opts);
  }
  await send(stream, prefix, opts);
  if (payload.length > 0) await send(stream, payload, opts);
}

/** Streams raw bytes with backpressure; returns how many were written. */
export async function writeAll(
  stream: Stream,
  source: Iterable<Uint8Array> | AsyncIterable<Uint8Array>,
  opts?: AbortOptions,
): Promise<number> {
  let total = 0;
  for await (const chunk of source) {
    opts?.signal?.throwIfAborted();
    if (chunk.length === 0) continue;
    await send(stream, chunk, opts);
    total += chunk.length;
  }
  return total;
}

export function encodeVarint(n: number): Uint8Array {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError(`invalid length ${n}`);
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Uint8Array.from(out);
}
