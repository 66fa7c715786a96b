// A userspace TCP proxy that behaves like a slow link, for the fault suite and its tests (this
// kernel has no netem). Each direction delays every chunk by a fixed latency from the moment it
// arrived, and may be limited to a bandwidth by a token bucket shared by all connections through
// the proxy (one link, one capacity per direction). What a link does to the byte stream is kept:
// bytes in order, backpressure (a full link stops reading from the sender), half-close (a FIN
// reaches the other side after the data before it) and reset (an RST reaches it as an RST).
// freeze() makes the link silent without closing anything, like a host that vanished; refuse()
// makes it loud: open connections are reset and new ones refused (a firewall rejecting, a host
// whose port is closed).
import { createServer, connect, type AddressInfo, type Server, type Socket } from "node:net";
import { performance } from "node:perf_hooks";

export interface LinkOptions {
  /** Delay added to every chunk in this direction, in ms (default 0). */
  latencyMs?: number;
  /** Bytes per second in this direction (default unlimited). */
  rateBytesPerSec?: number;
  /** Token bucket size in bytes: how much may leave at once (default 20 ms worth, at least 16 KiB). */
  burstBytes?: number;
}

export interface LinkProxyOptions {
  /** Where to listen (default 127.0.0.1, port 0). */
  host?: string;
  port?: number;
  target: { host: string; port: number };
  /**
   * More ports of the same link (the agents' bulk port beside the mesh port): each listens on
   * `host` at `port` and leads to its target; all share the link's latency, capacity and cuts.
   */
  also?: { port: number; target: { host: string; port: number } }[];
  /** Client to target. */
  up?: LinkOptions;
  /** Target to client. */
  down?: LinkOptions;
  /**
   * Bytes a direction holds (in flight on the "wire" plus waiting for the bucket) before it stops
   * reading from the sender (default 4 MiB). It also caps throughput at about this / latency.
   */
  highWaterBytes?: number;
}

export interface LinkStats {
  connections: number;
  bytesUp: number;
  bytesDown: number;
}

export interface LinkProxy {
  readonly host: string;
  readonly port: number;
  /** The ports of `also`, in order (as listened on: a 0 in the options is a port picked now). */
  readonly also: number[];
  stats(): LinkStats;
  /** Stops delivering and reading in both directions, closing nothing (a silent host). */
  freeze(): void;
  thaw(): void;
  /** Resets every open connection and stops listening, so the kernel refuses new ones (RST to the SYN). */
  refuse(): Promise<void>;
  /** Undoes freeze() or refuse(): listening again and carrying bytes. */
  heal(): Promise<void>;
  /** Resets every open connection through the proxy. */
  cutAll(): void;
  close(): Promise<void>;
}

/**
 * A token bucket: `take` says how many bytes may leave now, `waitMs` how long until `bytes` may.
 * A link sends whole packets at its line rate, and a receiver's NIC hands them over in batches
 * (interrupt moderation, GRO), so bytes leave in sends of at least `minSend`: one packet, or a
 * millisecond of the rate if that is more. Without it every wake-up of the proxy (each chunk the
 * sender wrote) let out the few bytes earned since the last one: 80 MB at 12.5 MB/s reached the
 * receiver in 755,000 reads of about 100 bytes, and its CPU per GB was twenty times a real link's.
 */
class TokenBucket {
  #tokens: number;
  #at = performance.now();
  readonly minSend: number;
  constructor(
    readonly rate: number,
    readonly burst: number,
  ) {
    this.#tokens = burst;
    this.minSend = Math.min(burst, Math.max(PACKET_BYTES, Math.round(rate / 1000)));
  }
  #refill(): void {
    const now = performance.now();
    this.#tokens = Math.min(this.burst, this.#tokens + ((now - this.#at) * this.rate) / 1000);
    this.#at = now;
  }
  /** Up to `want` bytes, or none when fewer than `min` (a send's least, or all that is queued) have been earned. */
  take(want: number, min = 1): number {
    this.#refill();
    if (this.#tokens < Math.min(min, want)) return 0;
    const n = Math.min(want, Math.floor(this.#tokens));
    this.#tokens -= n;
    return n;
  }
  waitMs(bytes = 1): number {
    this.#refill();
    return this.#tokens >= bytes ? 0 : Math.ceil(((bytes - this.#tokens) * 1000) / this.rate);
  }
}

/** A TCP segment's payload on a 1500-byte MTU with timestamps. */
const PACKET_BYTES = 1448;

type Item = { due: number; chunk: Buffer } | { due: number; end: true } | { due: number; reset: true };

/** One direction of one connection: a queue of timestamped chunks delivered when due. */
class Pipe {
  readonly #queue: Item[] = [];
  #queued = 0;
  #timer: NodeJS.Timeout | undefined;
  #waitingDrain = false;
  #done = false;
  frozen = false;

  constructor(
    readonly from: Socket,
    readonly to: Socket,
    readonly latencyMs: number,
    readonly bucket: TokenBucket | undefined,
    readonly highWater: number,
    readonly count: (n: number) => void,
  ) {
    from.on("data", (chunk: Buffer) => {
      this.#queued += chunk.length;
      if (this.#queued >= highWater) from.pause();
      this.#push({ due: performance.now() + latencyMs, chunk });
    });
    from.on("end", () => this.#push({ due: performance.now() + latencyMs, end: true }));
    to.on("drain", () => {
      this.#waitingDrain = false;
      this.pump();
    });
  }

  /** The sender reset (or failed): the other side gets an RST after the latency; queued data is lost. */
  reset(): void {
    if (this.#done) return;
    this.#queue.length = 0;
    this.#queued = 0;
    this.#push({ due: performance.now() + this.latencyMs, reset: true });
  }

  #push(item: Item): void {
    if (this.#done) return;
    this.#queue.push(item);
    this.pump();
  }

  pump(): void {
    clearTimeout(this.#timer);
    this.#timer = undefined;
    while (!this.#done && !this.frozen && !this.#waitingDrain && this.#queue.length > 0) {
      if (this.to.destroyed) return this.stop();
      const head = this.#queue[0]!;
      const wait = head.due - performance.now();
      if (wait > 0) return this.#wake(wait);
      if ("reset" in head) {
        this.#done = true;
        this.to.resetAndDestroy();
        return;
      }
      if ("end" in head) {
        this.#queue.shift();
        this.#done = true;
        this.to.end();
        return;
      }
      let n = head.chunk.length;
      if (this.bucket) {
        const least = Math.min(n, this.bucket.minSend);
        n = this.bucket.take(n, least);
        if (n === 0) return this.#wake(this.bucket.waitMs(least));
      }
      const part = n === head.chunk.length ? head.chunk : head.chunk.subarray(0, n);
      if (n === head.chunk.length) this.#queue.shift();
      else head.chunk = head.chunk.subarray(n);
      this.#queued -= n;
      this.count(n);
      if (this.#queued < this.highWater && this.from.isPaused() && !this.frozen) this.from.resume();
      if (!this.to.write(part)) this.#waitingDrain = true;
    }
  }

  #wake(ms: number): void {
    this.#timer = setTimeout(() => this.pump(), Math.max(1, Math.ceil(ms)));
  }

  stop(): void {
    this.#done = true;
    clearTimeout(this.#timer);
  }
}

export async function startLinkProxy(opts: LinkProxyOptions): Promise<LinkProxy> {
  const highWater = opts.highWaterBytes ?? 4 << 20;
  const bucketFor = (l: LinkOptions | undefined) =>
    l?.rateBytesPerSec ? new TokenBucket(l.rateBytesPerSec, l.burstBytes ?? Math.max(16 << 10, Math.round(l.rateBytesPerSec / 50))) : undefined;
  const upBucket = bucketFor(opts.up);
  const downBucket = bucketFor(opts.down);
  const stats: LinkStats = { connections: 0, bytesUp: 0, bytesDown: 0 };
  const open = new Set<{ client: Socket; server: Socket; pipes: Pipe[] }>();
  let frozen = false;

  const serve = (target: { host: string; port: number }): Server =>
    createServer({ allowHalfOpen: true, pauseOnConnect: true }, (client) => {
      stats.connections++;
      const upstream = connect({ host: target.host, port: target.port, allowHalfOpen: true, noDelay: true });
      // The link's latency is the only delay wanted: no Nagle on either side.
      client.setNoDelay(true);
      upstream.pause();
      const up = new Pipe(client, upstream, opts.up?.latencyMs ?? 0, upBucket, highWater, (n) => (stats.bytesUp += n));
      const down = new Pipe(upstream, client, opts.down?.latencyMs ?? 0, downBucket, highWater, (n) => (stats.bytesDown += n));
      const conn = { client, server: upstream, pipes: [up, down] };
      open.add(conn);
      up.frozen = down.frozen = frozen;
      // A socket that errs (ECONNRESET, or the target refusing) resets the other side; a socket that
      // closes cleanly has already sent its FIN through its pipe.
      client.on("error", () => up.reset());
      upstream.on("error", () => down.reset());
      client.on("close", () => {
        if (upstream.destroyed) done();
      });
      upstream.on("close", () => {
        if (client.destroyed) done();
      });
      const done = () => {
        up.stop();
        down.stop();
        open.delete(conn);
      };
      upstream.once("connect", () => {
        if (frozen) return;
        client.resume();
        upstream.resume();
      });
    });
  const host = opts.host ?? "127.0.0.1";
  const ports = [{ server: serve(opts.target), port: opts.port ?? 0 }, ...(opts.also ?? []).map((a) => ({ server: serve(a.target), port: a.port }))];
  const listen = (server: Server, port: number) =>
    new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(port, host, () => {
        server.off("error", reject);
        resolve();
      });
    });
  for (const p of ports) {
    await listen(p.server, p.port);
    p.port = (p.server.address() as AddressInfo).port;
  }
  const addr = ports[0]!.server.address() as AddressInfo;
  let refusing = false;
  const cutAll = () => {
    for (const c of open) {
      c.client.resetAndDestroy();
      c.server.resetAndDestroy();
    }
  };
  const thaw = () => {
    frozen = false;
    for (const c of open) {
      for (const p of c.pipes) {
        p.frozen = false;
        p.pump();
      }
      if (!c.client.connecting) c.client.resume();
      if (!c.server.connecting) c.server.resume();
    }
  };

  return {
    host: addr.address,
    port: addr.port,
    also: ports.slice(1).map((p) => p.port),
    stats: () => ({ ...stats }),
    freeze() {
      frozen = true;
      for (const c of open) {
        for (const p of c.pipes) p.frozen = true;
        c.client.pause();
        c.server.pause();
      }
    },
    thaw,
    async refuse() {
      if (refusing) return;
      refusing = true;
      // close() stops listening at once (its callback waits for open connections: not awaited).
      for (const p of ports) p.server.close();
      cutAll();
    },
    async heal() {
      thaw();
      if (!refusing) return;
      refusing = false;
      for (const p of ports) await listen(p.server, p.port);
    },
    cutAll,
    async close() {
      const closed = ports.map((p) => new Promise<void>((resolve) => p.server.close(() => resolve())));
      for (const c of open) {
        c.client.destroy();
        c.server.destroy();
      }
      await Promise.all(closed);
    },
  };
}

/** "4MiB", "512KiB", "1000000" (bytes per second). */
export function parseRate(text: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(|B|KiB|MiB|GiB|k|M|G)(?:\/s)?$/.exec(text.trim());
  if (!m) throw new Error(`invalid rate "${text}": expected e.g. 1MiB or 512KiB`);
  const unit: Record<string, number> = { "": 1, B: 1, KiB: 1024, MiB: 1 << 20, GiB: 1 << 30, k: 1e3, M: 1e6, G: 1e9 };
  return Math.round(Number(m[1]) * unit[m[2]!]!);
}
