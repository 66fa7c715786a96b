// A client of the Nix daemon's worker protocol over its unix socket, for store metadata only. An
// unprivileged agent cannot open Nix's database (WAL mode needs a writable directory), but any
// allowed user may ask the daemon. A few connections are kept open (each daemon connection is a
// forked process that answers one request at a time); requests on one connection are serialised.
// A store listing never takes one of them: it holds its connection for seconds (70 MB for a
// million paths, read at our pace), so it gets a connection of its own, closed after it.
import { connect, type Socket } from "node:net";
import {
  ByteQueue,
  CLIENT_VERSION,
  DaemonError,
  Incremental,
  daemonInfo,
  encodeClientHello,
  encodeClientVersion,
  encodeQueryAllValidPaths,
  encodeQueryPathFromHashPart,
  encodeQueryPathInfo,
  OP,
  queryAllValidPathHashParts,
  queryPathFromHashPartReply,
  queryPathInfoReply,
  serverHello,
  stderrStream,
  type DaemonInfo,
  type DaemonPathInfo,
  type Decoder,
} from "../../protocol/daemon-wire.js";

export { DaemonError };

/** The store cannot answer now (daemon unreachable, connection lost, timeout): try again later. */
export class StoreUnavailableError extends Error {}

export interface DaemonClientOptions {
  /** Pooled connections for lookups, at most (default 4; a listing opens one of its own besides). */
  maxConnections?: number;
  /** Per request, from being sent to the whole reply (default 10 s; QueryAllValidPaths 60 s). */
  timeoutMs?: number;
  /**
   * A connection is retired after this long (default 60 s): the daemon process behind it has
   * Nix's in-memory path info cache. Nix 2.8 showed a new signature at once on the same
   * connection, but bounding what any daemon could hold back costs a handshake a minute.
   */
  maxAgeMs?: number;
}

export class DaemonClient {
  private readonly idle: DaemonConnection[] = [];
  private readonly waiters: ((c: DaemonConnection | Error) => void)[] = [];
  /** Connections of listings under way (not in the pool; see queryAllValidHashParts). */
  private readonly listers = new Set<DaemonConnection>();
  private open = 0;
  private closed = false;
  private readonly max: number;
  private readonly timeoutMs: number;
  private readonly maxAgeMs: number;
  /** Requests sent to the daemon so far (listings included; handshakes not). */
  requests = 0;
  /** From the last handshake. */
  info: (DaemonInfo & { protocol: number }) | undefined;

  constructor(
    readonly socketPath: string,
    opts: DaemonClientOptions = {},
  ) {
    this.max = opts.maxConnections ?? 4;
    this.timeoutMs = opts.timeoutMs ?? 10_000;
    this.maxAgeMs = opts.maxAgeMs ?? 60_000;
  }

  /** Connects once (handshake included), so that an unreachable daemon shows at start-up. */
  async check(): Promise<DaemonInfo & { protocol: number }> {
    await this.withConnection((c) => Promise.resolve(c));
    return this.info!;
  }

  async queryPathFromHashPart(hashPart: string): Promise<string | undefined> {
    return this.request(encodeQueryPathFromHashPart(hashPart), queryPathFromHashPartReply);
  }

  async queryPathInfo(storePath: string): Promise<DaemonPathInfo | undefined> {
    return this.request(encodeQueryPathInfo(storePath), (q, v) => queryPathInfoReply(q, v));
  }

  /**
   * The hash parts of all valid paths (QueryAllValidPaths), packed: 32 bytes each, in the daemon's
   * order. On a connection outside the pool, opened for this listing and closed after it, so
   * lookups never wait behind it and the daemon process that built the reply exits.
   */
  async queryAllValidHashParts(): Promise<Buffer> {
    if (this.closed) throw new StoreUnavailableError("the daemon client is closed");
    const c = await DaemonConnection.open(this.socketPath, this.timeoutMs);
    this.listers.add(c);
    try {
      return await this.exchangeOn(c, encodeQueryAllValidPaths(), (q) => queryAllValidPathHashParts(q), Math.max(this.timeoutMs, 60_000));
    } finally {
      this.listers.delete(c);
      c.destroy();
    }
  }

  close(): void {
    this.closed = true;
    for (const c of this.listers) c.destroy();
    for (const c of this.idle.splice(0)) c.destroy();
    for (const w of this.waiters.splice(0)) w(new StoreUnavailableError("the daemon client is closed"));
  }

  private exchangeOn<T>(c: DaemonConnection, payload: Buffer, reply: (q: ByteQueue, version: number) => Decoder<T>, timeoutMs: number): Promise<T> {
    c.exchanges++;
    this.requests++;
    return c.exchange(payload, function* (q) {
      yield* stderrStream(q, c.version);
      return yield* reply(q, c.version);
    }, timeoutMs);
  }

  private async request<T>(payload: Buffer, reply: (q: ByteQueue, version: number) => Decoder<T>): Promise<T> {
    const exchange = (c: DaemonConnection) => this.exchangeOn(c, payload, reply, this.timeoutMs);
    try {
      return await this.withConnection(exchange);
    } catch (e) {
      // An idle connection may have died with its daemon process (daemon restarted): once more
      // on a fresh one. The operations are queries, so asking twice is harmless.
      if (!(e instanceof StoreUnavailableError) || (e as { fresh?: boolean }).fresh) throw e;
      return this.withConnection(exchange, true);
    }
  }

  private async withConnection<T>(use: (c: DaemonConnection) => Promise<T>, fresh = false): Promise<T> {
    const c = await this.acquire(fresh);
    try {
      return await use(c);
    } catch (e) {
      if (e instanceof StoreUnavailableError && c.exchanges === 1) Object.assign(e, { fresh: true });
      throw e;
    } finally {
      this.release(c);
    }
  }

  private async acquire(fresh = false): Promise<DaemonConnection> {
    if (this.closed) throw new StoreUnavailableError("the daemon client is closed");
    for (let idle = this.idle.pop(); idle; idle = this.idle.pop()) {
      if (!idle.broken && !fresh) return idle;
      idle.destroy();
      this.open--;
    }
    if (this.open >= this.max && !fresh) {
      const c = await new Promise<DaemonConnection | Error>((resolve) => this.waiters.push(resolve));
      if (c instanceof Error) throw c;
      return c;
    }
    this.open++;
    try {
      const c = await DaemonConnection.open(this.socketPath, this.timeoutMs);
      this.info = { ...c.daemon, protocol: c.version };
      return c;
    } catch (e) {
      this.open--;
      this.wakeWaiter(); // a waiter may try a connection of its own
      throw e;
    }
  }

  private release(c: DaemonConnection): void {
    if (c.broken || this.closed || Date.now() - c.openedAt > this.maxAgeMs) {
      c.destroy();
      this.open--;
      this.wakeWaiter();
      return;
    }
    const waiter = this.waiters.shift();
    if (waiter) waiter(c);
    else this.idle.push(c);
  }

  /** A slot freed up: let the oldest waiter open a new connection. */
  private wakeWaiter(): void {
    const waiter = this.waiters.shift();
    if (!waiter) return;
    // Could not connect: the waiter's request fails like any other on a dead daemon.
    this.acquire().then(waiter, (e: Error) => waiter(e));
  }
}

/** Bytes of the daemon's last answer that an error quotes (the last stderr message's code and the start of its text). */
const LAST_BYTES = 32;

const OP_NAMES = new Map<number, string>(Object.entries(OP).map(([name, code]) => [code, name]));
/** A request's operation by name (its first word), for errors. */
const opName = (payload: Buffer) => OP_NAMES.get(payload.readUInt32LE(0)) ?? `operation ${payload.readUInt32LE(0)}`;

/** One socket to the daemon, after the handshake. Not shared: one exchange at a time. */
class DaemonConnection {
  readonly openedAt = Date.now();
  broken = false;
  /** Requests sent on this connection (counted by the client; the handshake is none). */
  exchanges = 0;
  private readonly queue = new ByteQueue();
  private current: { decoder: Incremental<unknown>; settle: (e?: Error) => void } | undefined;
  /** For errors: what was asked last, how much of the answer came, and its last bytes. */
  private asked = "the handshake";
  private received = 0;
  private lastBytes = Buffer.alloc(0);

  /** The negotiated protocol version and what the daemon said about itself (set by open()). */
  version = 0;
  daemon: DaemonInfo = {};

  private constructor(private readonly socket: Socket) {}

  static async open(path: string, timeoutMs: number): Promise<DaemonConnection> {
    const socket = connect(path);
    const conn = new DaemonConnection(socket);
    socket.on("data", (chunk: Buffer) => conn.onData(chunk));
    socket.on("error", (e) => conn.destroy(new StoreUnavailableError(`Nix daemon at ${path}: ${e.message} (${conn.progress()})`)));
    socket.on("close", () => conn.destroy(new StoreUnavailableError(`the Nix daemon at ${path} closed the connection (${conn.progress()})`)));
    try {
      const daemonVersion = await conn.exchange(encodeClientHello(), serverHello, timeoutMs, "the handshake");
      // Speak the daemon's version if it is older than ours; never newer than ours.
      const version = Math.min(daemonVersion, CLIENT_VERSION);
      conn.version = version;
      conn.daemon = await conn.exchange(encodeClientVersion(version), function* (q) {
        const info = yield* daemonInfo(q, version);
        yield* stderrStream(q, version);
        return info;
      }, timeoutMs, "the handshake");
      return conn;
    } catch (e) {
      conn.destroy();
      throw e;
    }
  }

  /** Sends `payload` and decodes the reply. Anything but a DaemonError leaves the connection broken. */
  exchange<T>(payload: Buffer, decoder: (q: ByteQueue) => Decoder<T>, timeoutMs: number, asked = opName(payload)): Promise<T> {
    if (this.broken) return Promise.reject(new StoreUnavailableError("connection to the Nix daemon is broken"));
    [this.asked, this.received, this.lastBytes] = [asked, 0, Buffer.alloc(0)];
    return new Promise<T>((resolve, reject) => {
      const incremental = new Incremental(this.queue, decoder);
      const timer = setTimeout(() => this.destroy(new StoreUnavailableError(`the Nix daemon did not answer within ${timeoutMs} ms (${this.progress()})`)), timeoutMs);
      this.current = {
        decoder: incremental,
        settle: (e) => {
          clearTimeout(timer);
          this.current = undefined;
          if (e) reject(e);
          else resolve(incremental.value);
        },
      };
      this.socket.write(payload);
      this.step(); // bytes may already be queued (never in practice: the daemon only answers)
    });
  }

  /**
   * Ends the connection. An exchange under way fails with `e`: by default, that this side closed
   * it (DaemonClient.close() during a listing), which its socket's "close" would blame on the daemon.
   */
  destroy(e: Error = new StoreUnavailableError("the daemon client is closed")): void {
    this.broken = true;
    this.socket.destroy();
    this.current?.settle(e);
  }

  /** What the daemon had answered to the last request, for an error: its size and its last bytes. */
  progress(): string {
    if (this.received === 0) return `nothing of its answer to ${this.asked} had come`;
    return `${this.received} bytes of its answer to ${this.asked} had come, the last ${this.lastBytes.length}: ${this.lastBytes.toString("hex")}`;
  }

  private onData(chunk: Buffer): void {
    this.received += chunk.length;
    this.lastBytes = Buffer.concat([this.lastBytes, chunk.subarray(-LAST_BYTES)]).subarray(-LAST_BYTES);
    if (!this.current) {
      // Nothing asked: the stream is out of step.
      return this.destroy(new StoreUnavailableError("the Nix daemon sent data nobody asked for"));
    }
    this.step(chunk);
  }

  private step(chunk?: Buffer): void {
    const cur = this.current;
    if (!cur) return;
    try {
      if (cur.decoder.push(chunk)) cur.settle();
      else if (chunk && !this.socket.isPaused()) {
        // A long reply (a store listing is ~70 MB per million paths): libuv reads up to 32
        // chunks in one turn of the event loop, ~30 ms of decoding; take one chunk a turn.
        this.socket.pause();
        setImmediate(() => this.broken || this.socket.resume());
      }
    } catch (e) {
      // Whatever it was, the connection is not reused: after a daemon error some daemons close
      // it (an error before the operation started), and anything else means we lost the framing.
      this.destroy(e as Error);
    }
  }
}
