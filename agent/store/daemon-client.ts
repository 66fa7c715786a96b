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

/** One socket to the daemon, after the handshake. Not shared: one exchange at a time. */
class DaemonConnection {
  readonly openedAt = Date.now();
  broken = false;
  /** Requests sent on this connection (counted by the client; the handshake is none). */
  exchanges = 0;
  private readonly queue = new ByteQueue();
  private current: { decoder: Incremental<unknown>; settle: (e?: Error) => void } | undefined;

  /** The negotiated protocol version and what the daemon said about itself (set by open()). */
  version = 0;
  daemon: DaemonInfo = {};

  private constructor(private readonly socket: Socket) {}

  static async open(path: string, timeoutMs: number): Promise<DaemonConnection> {
    const socket = connect(path);
    const conn = new DaemonConnection(socket);
    socket.on("data", (chunk: Buffer) => conn.onData(chunk));
    socket.on("error", (e) => conn.fail(new StoreUnavailableError(`Nix daemon at ${path}: ${e.message}`)));
    socket.on("close", () => conn.fail(new StoreUnavailableError(`the Nix daemon at ${path} closed the connection`)));
    try {
      const daemonVersion = await conn.exchange(encodeClientHello(), serverHello, timeoutMs);
      // Speak the daemon's version if it is older than ours; never newer than ours.
      const version = Math.min(daemonVersion, CLIENT_VERSION);
      conn.version = version;
      conn.daemon = await conn.exchange(encodeClientVersion(version), function* (q) {
        const info = yield* daemonInfo(q, version);
        yield* stderrStream(q, version);
        return info;
      }, timeoutMs);
      return conn;
    } catch (e) {
      conn.destroy();
      throw e;
    }
  }

  /** Sends `payload` and decodes the reply. Anything but a DaemonError leaves the connection broken. */
  exchange<T>(payload: Buffer, decoder: (q: ByteQueue) => Decoder<T>, timeoutMs: number): Promise<T> {
    if (this.broken) return Promise.reject(new StoreUnavailableError("connection to the Nix daemon is broken"));
    return new Promise<T>((resolve, reject) => {
      const incremental = new Incremental(this.queue, decoder);
      const timer = setTimeout(() => this.fail(new StoreUnavailableError(`the Nix daemon did not answer within ${timeoutMs} ms`)), timeoutMs);
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

  destroy(): void {
    this.broken = true;
    this.socket.destroy();
  }

  private onData(chunk: Buffer): void {
    if (!this.current) {
      // Nothing asked: the stream is out of step.
      return this.fail(new StoreUnavailableError("the Nix daemon sent data nobody asked for"));
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
      this.destroy();
      cur.settle(e as Error);
    }
  }

  private fail(e: Error): void {
    this.destroy();
    this.current?.settle(e);
  }
}
