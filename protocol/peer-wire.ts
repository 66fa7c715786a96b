// Primitives of the peer protocol (protocol/PEER-PROTOCOL.md): unsigned LEB128 varints, byte and
// string fields, and the varint length-prefixed frames every stream carries. Everything read here
// comes from another host, so every read is bounded and every malformation throws
// PeerProtocolError, which callers answer by resetting that one stream.

/** Anything a peer sent (or we were asked to send) that the peer protocol does not allow. */
export class PeerProtocolError extends Error {
  override readonly name = "PeerProtocolError";
}

const MAX_U64 = (1n << 64n) - 1n;
const TEXT = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true });
const UTF8 = new TextEncoder();

/** Reads one message's payload; `what` names the message in errors. */
export class Reader {
  pos = 0;
  constructor(
    private readonly buf: Uint8Array,
    readonly what: string,
  ) {}

  fail(reason: string): never {
    throw new PeerProtocolError(`${this.what}: ${reason}`);
  }

  get remaining(): number {
    return this.buf.length - this.pos;
  }

  u8(): number {
    if (this.pos >= this.buf.length) this.fail("truncated");
    return this.buf[this.pos++]!;
  }

  /** A varint holding a JS-safe integer (<= 2^53 - 1, so at most 8 bytes), at most `max`. */
  uint(field: string, max = Number.MAX_SAFE_INTEGER): number {
    let value = 0;
    for (let i = 0; ; i++) {
      if (i === 8) this.fail(`${field}: varint too long`);
      const b = this.u8();
      value += (b & 0x7f) * 2 ** (7 * i);
      if (b < 0x80) {
        // A zero final byte after others is an overlong (non-canonical) encoding.
        if (b === 0 && i > 0) this.fail(`${field}: non-minimal varint`);
        break;
      }
    }
    if (value > max) this.fail(`${field}: ${value} exceeds the limit ${max}`);
    return value;
  }

  /** A varint holding an unsigned 64-bit integer (at most 10 bytes). */
  u64(field: string): bigint {
    const lo = this.u64Split(field);
    return this.hi32 === 0 ? BigInt(lo) : (BigInt(this.hi32) << 32n) | BigInt(lo);
  }

  /** The high 32 bits of the last u64Split value. */
  hi32 = 0;

  /**
   * u64 without a BigInt: returns the low 32 bits and leaves the high 32 in hi32. Summary keys
   * are decoded this way, 8,192 to a frame.
   */
  u64Split(field: string): number {
    // Two number accumulators (28 + 36 bits), exact in a double. The hot loop of summary
    // decoding: one bounds check per byte against a local, shifts by a running multiplier (no
    // Math.pow per byte), and the errors checked once the varint has ended.
    const buf = this.buf;
    const len = buf.length;
    let pos = this.pos;
    let lo = 0;
    let hi = 0;
    let mul = 1;
    let i = 0;
    let b = 0;
    for (; i < 4; i++) {
      if (pos >= len) this.fail("truncated");
      b = buf[pos++]!;
      lo += (b & 0x7f) * mul;
      mul *= 128;
      if (b < 0x80) break;
    }
    if (i === 4) {
      mul = 1;
      for (; ; i++) {
        if (i === 10) this.fail(`${field}: varint too long`);
        if (pos >= len) this.fail("truncated");
        b = buf[pos++]!;
        if (i === 9 && (b & 0x7f) > 1) this.fail(`${field}: varint exceeds 64 bits`);
        hi += (b & 0x7f) * mul;
        mul *= 128;
        if (b < 0x80) break;
      }
    }
    this.pos = pos;
    // A zero final byte after others is an overlong (non-canonical) encoding.
    if (b === 0 && i > 0) this.fail(`${field}: non-minimal varint`);
    this.hi32 = Math.floor(hi / 16);
    return lo + (hi % 16) * 2 ** 28;
  }

  fixed(field: string, n: number): Uint8Array {
    if (this.remaining < n) this.fail(`${field}: truncated`);
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }

  /** 8 bytes, big-endian. */
  fixedU64(field: string): bigint {
    const b = this.fixed(field, 8);
    return new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, false);
  }

  /** A varint length (<= max) followed by that many bytes. */
  bytes(field: string, max: number): Uint8Array {
    const n = this.uint(`${field} length`, max);
    return this.fixed(field, n);
  }

  /** Like bytes(), and the bytes must be valid UTF-8. */
  utf8(field: string, max: number): string {
    const b = this.bytes(field, max);
    try {
      return TEXT.decode(b);
    } catch {
      this.fail(`${field}: not valid UTF-8`);
    }
  }

  /** The payload must end here: trailing bytes are an error, never ignored. */
  end(): void {
    if (this.remaining !== 0) this.fail(`${this.remaining} trailing byte(s)`);
  }
}

/** Builds one message's payload in a growing buffer. */
export class Writer {
  private buf: Uint8Array;
  private len = 0;

  constructor(initial = 64) {
    this.buf = new Uint8Array(initial);
  }

  private ensure(n: number): void {
    if (this.len + n <= this.buf.length) return;
    const next = new Uint8Array(Math.max(this.buf.length * 2, this.len + n));
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
  }

  u8(v: number): this {
    this.ensure(1);
    this.buf[this.len++] = v;
    return this;
  }

  uint(field: string, v: number, max = Number.MAX_SAFE_INTEGER): this {
    if (!Number.isSafeInteger(v) || v < 0) throw new PeerProtocolError(`${field}: ${v} is not a non-negative integer`);
    if (v > max) throw new PeerProtocolError(`${field}: ${v} exceeds the limit ${max}`);
    this.ensure(8);
    while (v >= 0x80) {
      this.buf[this.len++] = (v % 0x80) | 0x80;
      v = Math.floor(v / 0x80);
    }
    this.buf[this.len++] = v;
    return this;
  }

  u64(field: string, v: bigint): this {
    if (v < 0n || v > MAX_U64) throw new PeerProtocolError(`${field}: ${v} is not an unsigned 64-bit integer`);
    if (v <= 0xfffffffn) return this.uint(field, Number(v));
    // Low 28 bits as four full groups, then the high part as an ordinary varint.
    let lo = Number(v & 0xfffffffn);
    this.ensure(4);
    for (let i = 0; i < 4; i++) {
      this.buf[this.len++] = (lo & 0x7f) | 0x80;
      lo >>>= 7;
    }
    return this.uint(field, Number(v >> 28n));
  }

  fixed(bytes: Uint8Array): this {
    this.ensure(bytes.length);
    this.buf.set(bytes, this.len);
    this.len += bytes.length;
    return this;
  }

  fixedU64(field: string, v: bigint): this {
    if (v < 0n || v > MAX_U64) throw new PeerProtocolError(`${field}: ${v} is not an unsigned 64-bit integer`);
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, v, false);
    return this.fixed(b);
  }

  bytes(field: string, b: Uint8Array, max: number): this {
    this.uint(`${field} length`, b.length, max);
    return this.fixed(b);
  }

  utf8(field: string, s: string, max: number): this {
    if (/\p{Cs}/u.test(s)) throw new PeerProtocolError(`${field}: lone surrogate, not encodable as UTF-8`);
    return this.bytes(field, UTF8.encode(s), max);
  }

  finish(): Uint8Array {
    return this.buf.slice(0, this.len);
  }
}

/** The bytes of a varint length prefix for `n`. */
function varintBytes(n: number): Uint8Array {
  return new Writer(8).uint("frame length", n).finish();
}

/** Prefixes a payload with its varint length, as @libp2p/utils' length-prefixed streams do. */
export function encodeFrame(payload: Uint8Array, maxFrameBytes: number): Uint8Array {
  if (payload.length > maxFrameBytes) {
    throw new PeerProtocolError(`frame of ${payload.length} bytes exceeds the limit ${maxFrameBytes}`);
  }
  const prefix = varintBytes(payload.length);
  const out = new Uint8Array(prefix.length + payload.length);
  out.set(prefix);
  out.set(payload, prefix.length);
  return out;
}

/**
 * Splits a byte stream into frames. Feed chunks with push(), take frames with next(). The length
 * is checked against the limit as soon as its prefix is read, so an oversized frame is refused
 * before its bytes are buffered. takeRest() hands back what follows (the raw bytes of a NAR
 * after its header frame). Chunks and returned frames are views, not copies: don't reuse a
 * chunk's memory while its frames are in use.
 */
export class FrameDecoder {
  private buf: Uint8Array = new Uint8Array(0);
  private pos = 0;

  constructor(private readonly maxFrameBytes: number) {}

  push(chunk: Uint8Array): void {
    if (chunk.length === 0) return;
    const left = this.buf.length - this.pos;
    if (left === 0) {
      this.buf = chunk;
      this.pos = 0;
      return;
    }
    const next = new Uint8Array(left + chunk.length);
    next.set(this.buf.subarray(this.pos));
    next.set(chunk, left);
    this.buf = next;
    this.pos = 0;
  }

  /** The next whole frame's payload, or undefined until more bytes arrive. */
  next(): Uint8Array | undefined {
    let len = 0;
    let i = 0;
    for (; ; i++) {
      if (this.pos + i >= this.buf.length) return undefined; // prefix incomplete
      if (i === 8) throw new PeerProtocolError("frame length: varint too long");
      const b = this.buf[this.pos + i]!;
      len += (b & 0x7f) * 2 ** (7 * i);
      if (len > this.maxFrameBytes) {
        throw new PeerProtocolError(`frame of ${len}+ bytes exceeds the limit ${this.maxFrameBytes}`);
      }
      if (b < 0x80) {
        if (b === 0 && i > 0) throw new PeerProtocolError("frame length: non-minimal varint");
        break;
      }
    }
    const start = this.pos + i + 1;
    if (this.buf.length - start < len) return undefined;
    this.pos = start + len;
    return this.buf.subarray(start, start + len);
  }

  /** Bytes received but not consumed as frames. */
  get buffered(): number {
    return this.buf.length - this.pos;
  }

  /** Removes and returns the bytes not consumed as frames. */
  takeRest(): Uint8Array {
    const rest = this.buf.subarray(this.pos);
    this.buf = new Uint8Array(0);
    this.pos = 0;
    return rest;
  }
}

/**
 * One frame gathered from bytes the caller does not keep (a socket's read buffer, about to be
 * reused for what follows the frame): take() copies only the frame's own bytes and says how many
 * it used, so the caller knows where the unframed bytes after it begin.
 */
export class FrameCollector {
  #len = 0;
  #prefixBytes = 0;
  #prefixDone = false;
  #payload: Uint8Array | undefined;
  #have = 0;

  constructor(private readonly maxFrameBytes: number) {}

  /** Consumes bytes of `src` up to the end of the frame; returns how many. Throws on a bad prefix. */
  take(src: Uint8Array): number {
    let i = 0;
    while (!this.#prefixDone && i < src.length) {
      if (this.#prefixBytes === 8) throw new PeerProtocolError("frame length: varint too long");
      const b = src[i++]!;
      this.#len += (b & 0x7f) * 2 ** (7 * this.#prefixBytes);
      this.#prefixBytes++;
      if (this.#len > this.maxFrameBytes) throw new PeerProtocolError(`frame of ${this.#len}+ bytes exceeds the limit ${this.maxFrameBytes}`);
      if (b < 0x80) {
        if (b === 0 && this.#prefixBytes > 1) throw new PeerProtocolError("frame length: non-minimal varint");
        this.#prefixDone = true;
        this.#payload = new Uint8Array(this.#len);
      }
    }
    if (!this.#prefixDone) return i;
    const n = Math.min(src.length - i, this.#len - this.#have);
    this.#payload!.set(src.subarray(i, i + n), this.#have);
    this.#have += n;
    return i + n;
  }

  /** The whole frame has been taken. */
  get done(): boolean {
    return this.#prefixDone && this.#have === this.#len;
  }

  /** No byte of a frame taken yet. */
  get empty(): boolean {
    return this.#prefixBytes === 0;
  }

  /** The payload once done; the collector starts over for the next frame. */
  frame(): Uint8Array {
    if (!this.done) throw new Error("frame not complete");
    const p = this.#payload!;
    this.#len = this.#prefixBytes = this.#have = 0;
    this.#prefixDone = false;
    this.#payload = undefined;
    return p;
  }
}
