// A cap on open connections that idle sockets cannot exhaust. Node's own server.maxConnections
// refuses every newcomer once the cap is reached, and idle keep-alive sockets hold their slots
// until keepAliveTimeout (30 s): a client holding thousands of them locks everyone out. Here a
// newcomer over the cap makes room by closing the longest-idle sockets (keep-alive ones between
// requests, and ones that never sent a request); only when every socket is busy with a request is
// the newcomer refused.
import type { IncomingMessage, Server, ServerResponse } from "node:http";
import type { Socket } from "node:net";

/** Requests in progress on a socket (a property rather than a WeakMap: cheaper per request). */
const BUSY = Symbol("requests in progress");
/** The fast path waits for an answer on this socket. */
const WAITING = Symbol("fast path waiting");
type Tracked = Socket & { [BUSY]?: number; [WAITING]?: boolean };

export interface ConnectionLimiter {
  /**
   * Marks a request in progress: the server's own request listener calls it first thing (one
   * listener a request instead of two: each extra one costs an emit with its listener array
   * copied, per request).
   */
  track(req: IncomingMessage, res: ServerResponse): void;
  /** A socket just answered without a request object (the fast path): now the most recently idle. */
  touch(socket: Socket): void;
  /** The fast path waits for an answer on this socket (busy: never reaped as idle), or no longer does. */
  busy(socket: Socket, busy: boolean): void;
}

/** Installs the cap on `server` (its "connection" listener: install it before the fast path's). */
export function limitConnections(server: Server, limit: number): ConnectionLimiter {
  const live = new Set<Socket>();
  // Sockets with no request in progress, longest idle first (a Set keeps insertion order); those
  // the fast path marks as waiting for an answer stay in it, passed over by the reaper.
  const idle = new Set<Socket>();

  server.on("connection", (socket: Socket) => {
    live.add(socket);
    idle.add(socket);
    socket.once("close", () => {
      live.delete(socket);
      idle.delete(socket);
    });
    // Make room before refusing; the newcomer itself is the newest idle socket, reaped last.
    for (const victim of idle) {
      if (live.size <= limit) break;
      if (victim === socket || (victim as Tracked)[WAITING]) continue;
      idle.delete(victim);
      live.delete(victim); // gone now, though its "close" event comes later
      victim.destroy();
    }
    if (live.size > limit) {
      live.delete(socket);
      socket.destroy();
    }
  });

  function started(socket: Tracked): void {
    const n = (socket[BUSY] ?? 0) + 1;
    socket[BUSY] = n;
    if (n === 1) idle.delete(socket);
  }

  function finished(socket: Tracked): void {
    const n = (socket[BUSY] ?? 1) - 1;
    socket[BUSY] = n;
    // Re-inserted at the end: it has been idle for the shortest time.
    if (n === 0 && !socket.destroyed && live.has(socket)) idle.add(socket);
  }

  // One shared listener, no closure per request: the response's socket is its request's.
  function answered(this: ServerResponse): void {
    finished(this.req.socket as Tracked);
  }

  return {
    track(req: IncomingMessage, res: ServerResponse): void {
      started(req.socket as Tracked);
      res.on("close", answered); // emitted once (Node guards it); on() spares once()'s wrapper
    },
    busy(socket: Socket, busy: boolean): void {
      // A mark the reaper skips, the socket left where it is in `idle`: taking it out and putting
      // it back, twice a lookup that waits, made V8 grow and shrink the set's table over and over
      // (BENCHMARKS.md, "Daemon backend"). The answer's touch() then moves it to the end.
      (socket as Tracked)[WAITING] = busy;
    },
    touch(socket: Socket): void {
      // Fast-path answers are written whole at once: such a socket is never busy, only idle for less time.
      if (idle.delete(socket)) idle.add(socket);
    },
  };
}
