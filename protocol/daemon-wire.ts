// The parts of Nix's worker protocol (the daemon socket) that a reader of store metadata needs:
// numbers are u64 little-endian, strings are a length, the bytes and zero padding to a multiple
// of 8, lists are a count and their items. Every reply is preceded by a stream of stderr
// messages (log lines, activities) that ends in STDERR_LAST, or in STDERR_ERROR instead of the
// reply. Pure: no I/O. Decoders are generators that consume a ByteQueue and yield whenever they
// need more bytes, so a reply can be decoded as its bytes trickle in, without re-parsing.
import { STORE_DIR } from "./path-info.js";

export const WORKER_MAGIC_1 = 0x6e697863;
export const WORKER_MAGIC_2 = 0x6478696f;

export const STDERR_NEXT = 0x6f6c6d67;
export const STDERR_READ = 0x64617461;
export const STDERR_WRITE = 0x64617416;
export const STDERR_LAST = 0x616c7473;
export const STDERR_ERROR = 0x63787470;
export const STDERR_START_ACTIVITY = 0x53545254;
export const STDERR_STOP_ACTIVITY = 0x53544f50;
export const STDERR_RESULT = 0x52534c54;

export const OP = { queryAllValidPaths: 23, queryPathInfo: 26, queryPathFromHashPart: 29 } as const;

/** Protocol versions are major << 8 | minor. */
export const protocolVersion = (major: number, minor: number) => (major << 8) | minor;
export const minorOf = (version: number) => version & 0xff;
/** The newest version we speak: 1.35 and later add only the trusted flag before features (1.38). */
export const CLIENT_VERSION = protocolVersion(1, 34);

/** Limits on what a peer's length fields may claim (a store path is at most ~250 bytes). */
export const LIMITS = { string: 1 << 20, list: 10_000_000, fields: 1024, traces: 1024 };

export class ProtocolError extends Error {}

/** An error the daemon reported (STDERR_ERROR): the operation failed, the connection is fine. */
export class DaemonError extends Error {
  constructor(
    message: string,
    readonly traces: string[] = [],
  ) {
    super(message);
  }
}

// --- encoding -----------------------------------------------------------------------------------

/** Appends words and strings; build() returns the bytes. */
export class WireWriter {
  private readonly parts: Buffer[] = [];

  u64(n: number | bigint): this {
    const b = Buffer.alloc(8);
    b.writeBigUInt64LE(BigInt(n));
    this.parts.push(b);
    return this;
  }

  string(s: string | Uint8Array): this {
    const bytes = typeof s === "string" ? Buffer.from(s) : Buffer.from(s.buffer, s.byteOffset, s.length);
    this.u64(bytes.length);
    this.parts.push(bytes, Buffer.alloc(padding(bytes.length)));
    return this;
  }

  strings(list: readonly (string | Uint8Array)[]): this {
    this.u64(list.length);
    for (const s of list) this.string(s);
    return this;
  }

  build(): Buffer {
    return Buffer.concat(this.parts);
  }
}

const padding = (len: number) => (8 - (len % 8)) % 8;

/** The client's first words: the magic. */
export const encodeClientHello = () => new WireWriter().u64(WORKER_MAGIC_1).build();

/** The client's version and the obsolete words after it (CPU affinity, reserve space: both off). */
export function encodeClientVersion(negotiated: number): Buffer {
  const w = new WireWriter().u64(negotiated);
  if (minorOf(negotiated) >= 14) w.u64(0);
  if (minorOf(negotiated) >= 11) w.u64(0);
  return w.build();
}

export const encodeQueryPathInfo = (storePath: string) => new WireWriter().u64(OP.queryPathInfo).string(storePath).build();
export const encodeQueryPathFromHashPart = (hashPart: string) => new WireWriter().u64(OP.queryPathFromHashPart).string(hashPart).build();
export const encodeQueryAllValidPaths = () => new WireWriter().u64(OP.queryAllValidPaths).build();

// --- decoding -----------------------------------------------------------------------------------

/** Bytes received and not yet decoded. Decoders take from the front. */
export class ByteQueue {
  private buf = Buffer.alloc(0);
  private pos = 0;

  push(chunk: Uint8Array): void {
    const rest = this.buf.subarray(this.pos);
    // The undecoded rest is at most one partial item, so copying it along is cheap.
    this.buf = rest.length === 0 ? Buffer.from(chunk) : Buffer.concat([rest, chunk]);
    this.pos = 0;
  }

  get available(): number {
    return this.buf.length - this.pos;
  }

  // Reads at an offset from the front, without taking and without allocating (for long lists;
  // the caller has checked the bytes are available).
  peek(n: number): Buffer {
    return this.buf.subarray(this.pos, this.pos + n);
  }

  byteAt(offset: number): number {
    return this.buf[this.pos + offset]!;
  }

  /** A u64 length or count (a high word over 2^21 reads as a number past 2^53, which limits refuse). */
  u64At(offset: number): number {
    return this.buf.readUInt32LE(this.pos + offset + 4) * 2 ** 32 + this.buf.readUInt32LE(this.pos + offset);
  }

  matches(offset: number, expected: Buffer): boolean {
    const at = this.pos + offset;
    return this.buf.compare(expected, 0, expected.length, at, at + expected.length) === 0;
  }

  copyOut(target: Buffer, targetStart: number, offset: number, n: number): void {
    this.buf.copy(target, targetStart, this.pos + offset, this.pos + offset + n);
  }

  skip(n: number): void {
    this.pos += n;
  }

  /** n bytes, which the caller has checked are available. */
  take(n: number): Buffer {
    const out = this.buf.subarray(this.pos, this.pos + n);
    this.pos += n;
    return out;
  }
}

/** A decoder: yields when it needs more bytes in the queue, returns its value when complete. */
export type Decoder<T> = Generator<void, T, void>;

function* need(q: ByteQueue, n: number): Decoder<void> {
  while (q.available < n) yield;
}

/** A u64 as a JS number; values beyond 2^53 are a protocol error (no length or count is that big). */
export function* u64(q: ByteQueue): Decoder<number> {
  yield* need(q, 8);
  const b = q.take(8);
  const hi = b.readUInt32LE(4);
  if (hi > 0x1fffff) throw new ProtocolError(`number too large: 0x${b.readBigUInt64LE().toString(16)}`);
  return hi * 2 ** 32 + b.readUInt32LE(0);
}

export function* bytes(q: ByteQueue, max = LIMITS.string): Decoder<Buffer> {
  const len = yield* u64(q);
  if (len > max) throw new ProtocolError(`string of ${len} bytes exceeds the limit of ${max}`);
  const padded = len + padding(len);
  yield* need(q, padded);
  const b = Buffer.from(q.take(padded)); // a copy: the queue's buffer is replaced on the next push
  if (b.subarray(len).some((x) => x !== 0)) throw new ProtocolError("non-zero string padding");
  return b.subarray(0, len);
}

export function* string(q: ByteQueue, max = LIMITS.string): Decoder<string> {
  return (yield* bytes(q, max)).toString("utf8");
}

export function* strings(q: ByteQueue, maxCount = LIMITS.list): Decoder<string[]> {
  const n = yield* u64(q);
  if (n > maxCount) throw new ProtocolError(`list of ${n} items exceeds the limit of ${maxCount}`);
  const out: string[] = [];
  for (let i = 0; i < n; i++) out.push(yield* string(q));
  return out;
}

/** The daemon's answer to the magic: its magic and protocol version. */
export function* serverHello(q: ByteQueue): Decoder<number> {
  const magic = yield* u64(q);
  if (magic !== WORKER_MAGIC_2) throw new ProtocolError(`not a Nix daemon (magic 0x${magic.toString(16)})`);
  const version = yield* u64(q);
  if (version >> 8 !== 1) throw new ProtocolError(`unsupported daemon protocol ${version >> 8}.${minorOf(version)}`);
  return version;
}

export interface DaemonInfo {
  /** Nix's version string (protocol >= 1.33). */
  nixVersion?: string;
  /** Whether the daemon trusts us (>= 1.35); undefined when it does not say. */
  trusted?: boolean;
}

/** What the daemon sends after the client's version words; the handshake's stderr stream follows. */
export function* daemonInfo(q: ByteQueue, negotiated: number): Decoder<DaemonInfo> {
  const info: DaemonInfo = {};
  if (minorOf(negotiated) >= 33) info.nixVersion = yield* string(q, 1024);
  if (minorOf(negotiated) >= 35) {
    const t = yield* u64(q); // 0 unknown, 1 trusted, 2 not trusted
    if (t === 1 || t === 2) info.trusted = t === 1;
  }
  return info;
}

/** Activity and result fields: (type 0: u64 | type 1: string)*. Read and dropped. */
function* fields(q: ByteQueue): Decoder<void> {
  const n = yield* u64(q);
  if (n > LIMITS.fields) throw new ProtocolError(`${n} fields exceed the limit of ${LIMITS.fields}`);
  for (let i = 0; i < n; i++) {
    const type = yield* u64(q);
    if (type === 0) yield* u64(q);
    else if (type === 1) yield* string(q);
    else throw new ProtocolError(`unknown field type ${type}`);
  }
}

function* error(q: ByteQueue, negotiated: number): Decoder<DaemonError> {
  if (minorOf(negotiated) < 26) {
    const msg = yield* string(q);
    yield* u64(q); // exit status
    return new DaemonError(msg);
  }
  const type = yield* string(q, 64);
  if (type !== "Error") throw new ProtocolError(`unexpected error type ${JSON.stringify(type)}`);
  yield* u64(q); // verbosity
  yield* string(q); // the error's name (no longer used)
  const msg = yield* string(q);
  const traces: string[] = [];
  if ((yield* u64(q)) !== 0) throw new ProtocolError("error with a position");
  const n = yield* u64(q);
  if (n > LIMITS.traces) throw new ProtocolError(`${n} traces exceed the limit of ${LIMITS.traces}`);
  for (let i = 0; i < n; i++) {
    if ((yield* u64(q)) !== 0) throw new ProtocolError("trace with a position");
    traces.push(yield* string(q));
  }
  return new DaemonError(msg, traces);
}

/**
 * The stderr stream before a reply. Returns the log lines (STDERR_NEXT) when it ends with
 * STDERR_LAST; throws the DaemonError when it ends with STDERR_ERROR. The daemon asking for data
 * (READ) or sending some (WRITE) never happens for the operations we use: a protocol error.
 */
export function* stderrStream(q: ByteQueue, negotiated: number, maxLogLines = 100): Decoder<string[]> {
  const logs: string[] = [];
  for (;;) {
    const code = yield* u64(q);
    switch (code) {
      case STDERR_LAST:
        return logs;
      case STDERR_ERROR:
        throw yield* error(q, negotiated);
      case STDERR_NEXT: {
        const line = yield* string(q);
        if (logs.length < maxLogLines) logs.push(line);
        break;
      }
      case STDERR_START_ACTIVITY:
        yield* u64(q); // id
        yield* u64(q); // level
        yield* u64(q); // type
        yield* string(q); // text
        yield* fields(q);
        yield* u64(q); // parent
        break;
      case STDERR_STOP_ACTIVITY:
        yield* u64(q);
        break;
      case STDERR_RESULT:
        yield* u64(q); // id
        yield* u64(q); // type
        yield* fields(q);
        break;
      case STDERR_READ:
      case STDERR_WRITE:
        throw new ProtocolError(`the daemon ${code === STDERR_READ ? "asked for" : "sent"} data unexpectedly`);
      default:
        throw new ProtocolError(`unknown stderr message 0x${code.toString(16)}`);
    }
  }
}

/** A store path's metadata as the daemon sends it (narHash is base16 without a prefix). */
export interface DaemonPathInfo {
  deriver?: string;
  narHash: string;
  references: string[];
  registrationTime: number;
  narSize: number;
  ultimate: boolean;
  sigs: string[];
  ca?: string;
}

/** The reply to QueryPathInfo (after its stderr stream): undefined when the path is not valid. */
export function* queryPathInfoReply(q: ByteQueue, negotiated: number): Decoder<DaemonPathInfo | undefined> {
  // Before 1.17 an invalid path was an error instead of a 0.
  if (minorOf(negotiated) >= 17 && (yield* u64(q)) === 0) return undefined;
  const deriver = yield* string(q);
  const info: DaemonPathInfo = {
    narHash: yield* string(q),
    references: yield* strings(q),
    registrationTime: yield* u64(q),
    narSize: yield* u64(q),
    ultimate: minorOf(negotiated) >= 16 ? (yield* u64(q)) !== 0 : false,
    sigs: minorOf(negotiated) >= 16 ? yield* strings(q) : [],
  };
  const ca = minorOf(negotiated) >= 16 ? yield* string(q) : "";
  if (deriver) info.deriver = deriver;
  if (ca) info.ca = ca;
  return info;
}

/** The reply to QueryPathFromHashPart: the store path, or undefined (an empty string). */
export function* queryPathFromHashPartReply(q: ByteQueue): Decoder<string | undefined> {
  const path = yield* string(q);
  return path === "" ? undefined : path;
}

/** The reply to QueryAllValidPaths: every valid store path. */
export function* queryAllValidPathsReply(q: ByteQueue): Decoder<string[]> {
  return yield* strings(q);
}

const STORE_PREFIX = Buffer.from(STORE_DIR + "/", "latin1");
/** Bytes of a store path's hash part, and of one record of a packed list of them. */
export const HASH_PART_BYTES = 32;

/**
 * The reply to QueryAllValidPaths as the paths' hash parts only (all the mesh summary needs),
 * packed: 32 ASCII bytes per path, in the daemon's order, in one buffer. A 1M-path store is
 * ~70 MB of reply; a JS string per path would be a million objects for the garbage collector to
 * promote and trace on every listing (pauses of up to ~90 ms measured here), this is one buffer.
 */
export function* queryAllValidPathHashParts(q: ByteQueue, maxCount = LIMITS.list): Decoder<Buffer> {
  const n = yield* u64(q);
  if (n > maxCount) throw new ProtocolError(`list of ${n} items exceeds the limit of ${maxCount}`);
  // Grown as items arrive: a count alone must not make us allocate gigabytes.
  let out = Buffer.allocUnsafe(Math.min(n, 65_536) * HASH_PART_BYTES);
  const hashAt = STORE_PREFIX.length;
  for (let i = 0; i < n; i++) {
    if (q.available < 8) yield* need(q, 8);
    const len = q.u64At(0);
    if (len > LIMITS.string) throw new ProtocolError(`string of ${len} bytes exceeds the limit of ${LIMITS.string}`);
    const padded = len + padding(len);
    if (q.available < 8 + padded) yield* need(q, 8 + padded);
    if (len < hashAt + HASH_PART_BYTES || !q.matches(8, STORE_PREFIX)) {
      throw new ProtocolError(`not a path in ${STORE_DIR}: ${JSON.stringify(q.peek(8 + Math.min(len, 100)).subarray(8).toString("latin1"))}`);
    }
    for (let k = 8 + len; k < 8 + padded; k++) if (q.byteAt(k) !== 0) throw new ProtocolError("non-zero string padding");
    if ((i + 1) * HASH_PART_BYTES > out.length) {
      const bigger = Buffer.allocUnsafe(Math.min(n, 2 * (i + 1)) * HASH_PART_BYTES);
      out.copy(bigger, 0, 0, i * HASH_PART_BYTES);
      out = bigger;
    }
    q.copyOut(out, i * HASH_PART_BYTES, 8 + hashAt, HASH_PART_BYTES);
    q.skip(8 + padded);
  }
  return out;
}

/** Feeds chunks to one decoder: push() returns true once the decoder has finished. */
export class Incremental<T> {
  private readonly gen: Decoder<T>;
  private result: { value: T } | undefined;

  constructor(
    readonly queue: ByteQueue,
    decoder: (q: ByteQueue) => Decoder<T>,
  ) {
    this.gen = decoder(queue);
  }

  /** Adds bytes (if any) and runs the decoder as far as they go; throws what the decoder throws. */
  push(chunk?: Uint8Array): boolean {
    if (this.result) return true;
    if (chunk) this.queue.push(chunk);
    const step = this.gen.next();
    if (step.done) this.result = { value: step.value };
    return this.result !== undefined;
  }

  get value(): T {
    if (!this.result) throw new Error("decoder has not finished");
    return this.result.value;
  }
}
