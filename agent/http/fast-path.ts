// A fast path under node:http for the requests Nix makes most: keep-alive HTTP/1.1 GET and HEAD
// requests with no body, answered from memory (narinfo hits and misses, nix-cache-info).
//
// Why hand-written: node:http's request and response objects cost more CPU per answer than
// nginx spends on a whole request (BENCHMARKS.md, "narinfo: the gap to a bare node:http
// server"), and there is no well-kept pure-JS HTTP server below node:http to use instead
// (uWebSockets.js is a native addon, not on npm). So this parses request heads itself and
// answers only the simple cases, each with one socket write, and leaves everything else to
// node:http.
//
// An answer that needs waiting (a narinfo the daemon or a peer must be asked for, or one asked
// again later in the turn: AskAgain) is awaited here too, one a connection at a time: requests after it are read but not parsed until it is
// written, so answers go out in request order, every request is looked up (and counted in the
// metrics) once, and a client pipelining thousands of lookups holds one promise, not thousands
// (Nix does not pipeline: it opens parallel connections). While it waits the connection is busy,
// as node:http's with a request in progress: no headers or keep-alive timer, not idle for
// closeIdleConnections() or the connection cap. A lookup that fails hands the connection over
// with that request's bytes, and node:http asks again and answers its error (503).
//
// Every connection starts here. The first request this module does not answer itself (another
// URL, a body, an odd version, anything malformed or large, a lookup that failed) hands
// the connection to node:http for good: at a request boundary, with the bytes not consumed yet
// put back on the socket (unshift) and Node's own connection listener run on it. Answers already
// written are queued on the socket ahead of anything node:http writes, so the order holds.
//
// What node:http does for such connections is kept: the same status lines, headers (Date,
// Connection: keep-alive, Keep-Alive: timeout=N) and bodies; the headers timeout for a request
// head (and a connection that sends nothing), the keep-alive timeout between requests, answers
// in order for pipelined requests, a half-closed client answered then closed, a client that
// does not read paused rather than buffered for, the server's "clientError" and "timeout"
// events, closeIdleConnections() and closeAllConnections().
import { STATUS_CODES, type Server } from "node:http";
import type { Socket } from "node:net";

/** A complete answer: status, headers as a flat name/value array, and a string body. */
export interface Reply {
  readonly status: number;
  readonly head: readonly string[];
  readonly body: string;
  /** "latin1" only for ASCII bodies (the same bytes as UTF-8, without the conversion). */
  readonly encoding: BufferEncoding;
}

/**
 * "Ask again soon": `when(run)` calls `run` later in this event-loop turn, when the same request,
 * asked again, is answered without waiting (a Reply, or a promise: never AskAgain again). The
 * connection waits meanwhile as for a promise, without one (a narinfo lookup that shares the daemon
 * backend's look with the other lookups of its turn: agent/store/db-version.ts).
 */
export class AskAgain {
  constructor(readonly when: (run: () => void) => void) {}
}

/**
 * The answer to a request the fast path may answer, a promise of it when it needs waiting (a
 * rejection hands the request to node:http), AskAgain, or undefined to leave the connection to
 * node:http.
 */
export type FastAnswer = (method: "GET" | "HEAD", target: string) => Reply | Promise<Reply> | AskAgain | undefined;

/** The connection cap's view of the fast path's sockets (connections.ts). */
export interface FastHooks {
  /** A socket just answered: now the most recently idle. */
  touch(socket: Socket): void;
  /** A socket waits for an answer (busy, not idle), or no longer does. */
  busy(socket: Socket, busy: boolean): void;
}

/** Request heads longer than this go to node:http, which applies its own limits (431). */
const HEAD_LIMIT = 4096;
/** Answers to pipelined requests are written in batches of about this many characters (bytes). */
const FLUSH_AT = 64 * 1024;
/** While an answer is awaited, the socket stops reading once this many bytes of later requests are held. */
const HELD_WHILE_WAITING = 64 * 1024;

type ConnectionListener = (this: Server, socket: Socket) => void;

/**
 * Puts the fast path in front of `server`'s own connection handling. Call it after every other
 * "connection" listener is installed (the connection limiter runs first). Reads the server's
 * timeouts and keep-alive settings when called. Returns false, leaving the server as it was, when
 * this Node's server does not look as expected.
 */
export function installFastPath(server: Server, answer: FastAnswer, hooks?: FastHooks): boolean {
  // node:http's Server registers its connectionListener in its constructor; the fast path takes
  // its place and calls it for the connections it hands over.
  const nodeListener = server.listeners("connection").find((l) => l.name === "connectionListener") as ConnectionListener | undefined;
  // Settings whose answers the fast path does not make (a request limit per connection, HTTP/1.1 without Host).
  const settings = server as Server & { requireHostHeader?: boolean; connectionsCheckingInterval?: number };
  if (!nodeListener || (server.maxRequestsPerSocket ?? 0) > 0 || settings.requireHostHeader === false) return false;
  server.removeListener("connection", nodeListener);
  const keepAlive = server.keepAliveTimeout;
  const tail = keepAlive > 0 ? `\r\nConnection: keep-alive\r\nKeep-Alive: timeout=${Math.floor(keepAlive / 1000)}\r\n\r\n` : "\r\nConnection: keep-alive\r\n\r\n";
  const fast: FastPath = {
    server,
    answer,
    hooks,
    nodeListener,
    tail,
    idleTimeout: keepAlive > 0 ? keepAlive + (server.keepAliveTimeoutBuffer ?? 1000) : 0,
    connections: new Set(),
  };
  server.on("connection", (socket: Socket) => {
    if (!socket.destroyed) new FastConnection(socket, fast);
  });

  // As node:http checks its connections' head deadlines: one timer for all, every
  // connectionsCheckingInterval.
  let timer: NodeJS.Timeout | undefined;
  server.on("listening", () => {
    clearInterval(timer);
    timer = setInterval(() => {
      const limit = server.headersTimeout;
      if (!(limit > 0)) return;
      const now = performance.now();
      for (const c of fast.connections) if (c.headSince >= 0 && now - c.headSince > limit) c.timedOut();
    }, settings.connectionsCheckingInterval ?? 30_000).unref();
  });
  server.on("close", () => clearInterval(timer));
  // server.close() calls closeIdleConnections(): a fast-path connection between requests is idle.
  const closeIdle = server.closeIdleConnections.bind(server);
  server.closeIdleConnections = () => {
    closeIdle();
    for (const c of fast.connections) if (c.headSince < 0 && !c.waiting) c.socket.destroy();
  };
  const closeAll = server.closeAllConnections.bind(server);
  server.closeAllConnections = () => {
    closeAll();
    for (const c of fast.connections) c.socket.destroy();
  };
  return true;
}

interface FastPath {
  server: Server;
  answer: FastAnswer;
  hooks: FastHooks | undefined;
  nodeListener: ConnectionListener;
  /** The end of every head after Date. */
  tail: string;
  /** Socket inactivity timeout once a request was answered (node:http's keep-alive timeout plus its buffer). */
  idleTimeout: number;
  connections: Set<FastConnection>;
}

/** One connection while the fast path answers it. */
class FastConnection {
  /** Received bytes (as latin1: one character a byte) of a request head not complete yet. */
  pending = "";
  /** When the request head being received began (performance.now()), -1 between requests. As Node, from the connection's start. */
  headSince = performance.now();
  /** An answer is awaited; `pending` then holds every byte received after its request, unparsed. */
  waiting = false;
  #idleArmed = false;
  /** The socket was paused because too many bytes came in while waiting. */
  #heldBack = false;
  /** The client half-closed while an answer was awaited ("end" was emitted, to be acted on after it). */
  #ended = false;
  /** Handed over, failed or closed: a lookup that settles now writes nothing. */
  #gone = false;

  constructor(
    readonly socket: Socket,
    readonly fast: FastPath,
  ) {
    fast.connections.add(this);
    socket.on("data", this.#onData);
    socket.on("end", this.#onEnd);
    socket.on("drain", this.#onDrain);
    socket.on("timeout", this.#onTimeout);
    socket.on("error", this.#onError);
    socket.on("close", this.#onClose);
  }

  #onData = (chunk: Buffer): void => {
    const text = chunk.toString("latin1");
    if (this.waiting) {
      // Kept for after the answer; read on (to see a client that closes or resets) up to a bound.
      this.pending += text;
      if (this.pending.length > HELD_WHILE_WAITING && !this.socket.isPaused()) {
        this.#heldBack = true;
        this.socket.pause();
      }
      return;
    }
    const seen = this.pending.length;
    const buf = seen === 0 ? text : this.pending + text;
    this.pending = "";
    this.#run(buf, seen);
    if (this.#ended) this.#endIfDone();
  };

  /**
   * Answers every complete request head in `buf`, in order; keeps a partial one for later.
   * `seen`: the length of its start already looked at (a head arriving in many small pieces
   * costs each piece its own length, not the whole head's, in these searches). `out`: answers
   * not written yet, to go first (an awaited one).
   */
  #run(buf: string, seen: number, out = "", encoding: BufferEncoding = "latin1"): void {
    const socket = this.socket;
    let pos = 0;
    let end: number;
    let from = seen > 3 ? seen - 3 : 0;
    while ((end = buf.indexOf("\r\n\r\n", from)) !== -1) {
      if (end - pos > HEAD_LIMIT) break; // node:http's to judge
      if (out.length >= FLUSH_AT) {
        this.#answered(out, encoding);
        out = "";
        encoding = "latin1";
      }
      if (socket.writableNeedDrain) {
        // The client is not reading its answers (a write found the socket's buffer full): stop
        // until "drain", the rest left on the socket, which stops reading from the network once
        // its own buffer is full. (Only a write that returns false promises a "drain".)
        if (out !== "") this.#answered(out, encoding);
        socket.pause();
        socket.unshift(Buffer.from(buf.slice(pos), "latin1"));
        this.headSince = -1; // the requests waiting are complete ones
        return;
      }
      const eol = buf.indexOf("\r\n", pos);
      const method = requestLine(buf, pos, eol);
      // The target: from after the method to before " HTTP/1.1".
      const target = method && headersOk(buf, eol + 2, end) ? buf.slice(pos + method.length + 1, eol - 9) : undefined;
      const reply = target !== undefined ? this.fast.answer(method!, target) : undefined;
      if (!reply) {
        this.#write(out, encoding);
        return this.#handOver(buf.slice(pos));
      }
      if (reply instanceof Promise) {
        if (out !== "") this.#answered(out, encoding);
        return this.#wait(reply, method!, buf.slice(pos, end + 4), buf.slice(end + 4));
      }
      if (reply instanceof AskAgain) {
        if (out !== "") this.#answered(out, encoding);
        return this.#askLater(reply, method!, target!, buf, pos, end + 4);
      }
      out += this.#rendered(reply, method!);
      if (method === "GET" && reply.encoding !== "latin1") encoding = "utf8"; // the rest is ASCII: the same bytes either way
      pos = end + 4;
      from = pos;
    }
    const rest = pos === 0 ? buf : buf.slice(pos);
    if (rest !== "" && !mayWait(rest, pos === 0 ? seen : 0)) {
      this.#write(out, encoding);
      return this.#handOver(rest);
    }
    if (out !== "") this.#answered(out, encoding);
    this.pending = rest;
    if (rest === "") this.headSince = -1;
    else if (pos > 0 || this.headSince < 0) this.headSince = performance.now();
  }

  /** The answer's bytes: status line and headers, and for GET the body. */
  #rendered(reply: Reply, method: "GET" | "HEAD"): string {
    const head = rawHead(reply) + utcDate() + this.fast.tail;
    return method === "GET" ? head + reply.body : head;
  }

  /**
   * Waits for the answer to `request` (its bytes, for node:http if the lookup fails); `rest`, the
   * bytes after it, and whatever comes meanwhile are parsed once it is written. Busy meanwhile, as
   * node:http's connection with a request in progress: no headers timeout (headSince -1), no
   * keep-alive timeout (it has none while a request is processed, and a lookup may take longer).
   */
  #wait(lookup: Promise<Reply>, method: "GET" | "HEAD", request: string, rest: string): void {
    this.#park(rest);
    lookup.then(
      (reply) => this.#settled(() => this.#run(this.#takePending(), 0, this.#rendered(reply, method), method === "GET" ? reply.encoding : "latin1")),
      () => this.#settled(() => this.#handOver(request + this.#takePending())),
    );
  }

  /** Waits (see #wait), holding `held`, the bytes not parsed yet, and whatever comes meanwhile. */
  #park(held: string): void {
    this.waiting = true;
    this.pending = held;
    this.headSince = -1;
    // The keep-alive timer stays armed (disarming and re-arming it a lookup costs more than the
    // rest of the wait here): #onTimeout ignores it while waiting.
    this.fast.hooks?.busy(this.socket, true);
  }

  /**
   * Waits for AskAgain's `run` (#askAgain, one function for all of this connection's requests),
   * then asks again for `target` and goes on as for an answer that was awaited.
   */
  #askLater(later: AskAgain, method: "GET" | "HEAD", target: string, buf: string, start: number, end: number): void {
    this.#park(buf.slice(end));
    // The request's bytes (for node:http, should the lookup fail) are cut out only if needed.
    this.#askMethod = method;
    this.#askTarget = target;
    this.#askBuf = buf;
    this.#askStart = start;
    this.#askEnd = end;
    later.when(this.#askAgain);
  }

  #askMethod: "GET" | "HEAD" = "GET";
  #askTarget = "";
  /** The request asked again is #askBuf from #askStart to #askEnd. */
  #askBuf = "";
  #askStart = 0;
  #askEnd = 0;
  #askAgain = (): void => this.#settled(this.#answerAgain);
  #answerAgain = (): void => {
    const method = this.#askMethod;
    const reply = this.fast.answer(method, this.#askTarget);
    const buf = this.#askBuf;
    this.#askBuf = ""; // not kept alive until the next lookup
    if (reply !== undefined && !(reply instanceof Promise) && !(reply instanceof AskAgain)) {
      return this.#run(this.#takePending(), 0, this.#rendered(reply, method), method === "GET" ? reply.encoding : "latin1");
    }
    const request = buf.slice(this.#askStart, this.#askEnd);
    if (!reply) return this.#handOver(request + this.#takePending());
    if (reply instanceof Promise) return this.#wait(reply, method, request, this.#takePending());
    const held = this.#takePending();
    this.#askLater(reply, method, this.#askTarget, request + held, 0, request.length);
  };

  #settled(next: () => void): void {
    this.waiting = false;
    if (this.#gone) return; // the client left (or failed): nothing to write
    this.fast.hooks?.busy(this.socket, false);
    if (this.#heldBack) {
      // Resumed before parsing: if the answers fill the socket's buffer, #run pauses it again.
      this.#heldBack = false;
      this.socket.resume();
    }
    next();
    if (this.#ended) this.#endIfDone();
  }

  /**
   * The client's FIN came while an answer was awaited: act on it once everything before it is
   * answered (not while requests wait on the paused socket for the client to read).
   */
  #endIfDone(): void {
    if (!this.waiting && !this.#gone && this.socket.readableLength === 0) this.#onEnd();
  }

  #takePending(): string {
    const p = this.pending;
    this.pending = "";
    return p;
  }

  #write(out: string, encoding: BufferEncoding): void {
    if (out !== "") this.socket.write(out, encoding);
  }

  /** Sends the answers to one or more requests. */
  #answered(out: string, encoding: BufferEncoding): void {
    this.socket.write(out, encoding);
    this.fast.hooks?.touch(this.socket);
    if (!this.#idleArmed && this.fast.idleTimeout > 0) {
      // As node:http after an answer: a connection silent this long is closed. The socket
      // restarts the timer on every read and write.
      this.socket.setTimeout(this.fast.idleTimeout);
      this.#idleArmed = true;
    }
  }

  /** Gives the connection to node:http for good, with `rest` (not consumed yet) back on the socket. */
  #handOver(rest: string): void {
    const socket = this.socket;
    this.#detach();
    if (this.#idleArmed) socket.setTimeout(0);
    if (this.#ended) {
      // The client's FIN was read while an answer was awaited: the stream has ended, so nothing
      // can be put back on it. node:http gets the bytes and the end as the events it listens to.
      this.fast.nodeListener.call(this.fast.server, socket);
      if (rest !== "") socket.emit("data", Buffer.from(rest, "latin1"));
      socket.emit("end");
      return;
    }
    // Paused, so that the bytes put back wait for node:http's listeners instead of being
    // emitted at once; resumed after, which delivers them (in the next tick, before any new
    // read from the network) to node:http's parser.
    socket.pause();
    if (rest !== "") socket.unshift(Buffer.from(rest, "latin1"));
    this.fast.nodeListener.call(this.fast.server, socket);
    socket.resume();
  }

  #detach(): void {
    const socket = this.socket;
    this.#gone = true;
    this.fast.connections.delete(this);
    socket.off("data", this.#onData);
    socket.off("end", this.#onEnd);
    socket.off("drain", this.#onDrain);
    socket.off("timeout", this.#onTimeout);
    socket.off("error", this.#onError);
    socket.off("close", this.#onClose);
  }

  #onDrain = (): void => {
    if (this.socket.isPaused() && !this.#heldBack) this.socket.resume();
  };

  // The client half-closed: as node:http with httpAllowHalfOpen, answered requests are already
  // written, so the connection ends; an incomplete head is a client error (node:http's parser
  // fails at the end of input, HPE_INVALID_EOF_STATE).
  #onEnd = (): void => {
    if (this.waiting) {
      this.#ended = true;
      return;
    }
    if (this.pending === "") this.socket.end();
    else this.#clientError(Object.assign(new Error("Parse Error: Invalid EOF state"), { code: "HPE_INVALID_EOF_STATE" }));
  };

  /** A request head (or a connection's first) took longer than the server's headersTimeout. */
  timedOut(): void {
    this.#clientError(Object.assign(new Error("Request timeout"), { code: "ERR_HTTP_REQUEST_TIMEOUT" }));
  }

  #onTimeout = (): void => {
    if (this.waiting) {
      this.socket.setTimeout(this.fast.idleTimeout); // silent while its lookup waits: armed again
      return;
    }
    if (!this.fast.server.emit("timeout", this.socket)) this.socket.destroy();
  };

  #onError = (e: Error): void => this.#clientError(e);

  /** As node:http: the server's "clientError" listeners decide; without any, the socket is destroyed. */
  #clientError(e: Error): void {
    this.#detach();
    this.socket.on("error", () => {}); // later errors of a socket being closed
    if (!this.fast.server.emit("clientError", e, this.socket)) this.socket.destroy();
  }

  #onClose = (): void => {
    this.#gone = true;
    this.fast.connections.delete(this);
  };
}

/** "GET" or "HEAD" when the request line from `pos` to `eol` is one the fast path takes: GET or HEAD of an origin-form target, HTTP/1.1. */
function requestLine(buf: string, pos: number, eol: number): "GET" | "HEAD" | undefined {
  const method = buf.startsWith("GET /", pos) ? "GET" : buf.startsWith("HEAD /", pos) ? "HEAD" : undefined;
  if (!method) return undefined;
  const sp = buf.indexOf(" ", pos + method.length + 1);
  if (sp === -1 || sp + 9 !== eol || !buf.startsWith("HTTP/1.1", sp + 1)) return undefined;
  // The target: visible ASCII only (node:http rejects control characters).
  for (let i = pos + method.length + 1; i < sp; i++) {
    const c = buf.charCodeAt(i);
    if (c <= 32 || c >= 127) return undefined;
  }
  return method;
}

/**
 * Whether the header lines from `start` to `end` (the final CRLF CRLF) allow the fast path: each
 * line a token name, a colon and a value of visible ASCII, spaces and tabs; a Host header; no
 * body (Content-Length, Transfer-Encoding), no Expect or Upgrade; Connection absent or
 * "keep-alive". Anything else node:http answers (or rejects) itself.
 */
function headersOk(buf: string, start: number, end: number): boolean {
  let host = false;
  let ls = start;
  while (ls <= end) {
    const le = buf.indexOf("\r\n", ls);
    const colon = buf.indexOf(":", ls);
    if (colon <= ls || colon > le) return false;
    for (let i = ls; i < colon; i++) if (!TOKEN[buf.charCodeAt(i)]) return false;
    for (let i = colon + 1; i < le; i++) {
      const c = buf.charCodeAt(i);
      if ((c < 32 && c !== 9) || c >= 127) return false;
    }
    switch (colon - ls) {
      case 4:
        if (nameIs(buf, ls, "host")) host = true;
        break;
      case 10:
        if (nameIs(buf, ls, "connection") && !valueIs(buf, colon + 1, le, "keep-alive")) return false;
        break;
      case 6:
        if (nameIs(buf, ls, "expect")) return false;
        break;
      case 7:
        if (nameIs(buf, ls, "upgrade")) return false;
        break;
      case 14:
        if (nameIs(buf, ls, "content-length")) return false;
        break;
      case 17:
        if (nameIs(buf, ls, "transfer-encoding")) return false;
        break;
    }
    ls = le + 2;
  }
  return host;
}

/** The header name at `pos` is `lower`, ignoring case (valid for letters and "-", all a name here has). */
function nameIs(buf: string, pos: number, lower: string): boolean {
  for (let i = 0; i < lower.length; i++) if ((buf.charCodeAt(pos + i) | 0x20) !== lower.charCodeAt(i)) return false;
  return true;
}

/** The header value between `from` and `to`, without surrounding spaces and tabs, is `lower`, ignoring case. */
function valueIs(buf: string, from: number, to: number, lower: string): boolean {
  while (from < to && (buf.charCodeAt(from) === 32 || buf.charCodeAt(from) === 9)) from++;
  while (to > from && (buf.charCodeAt(to - 1) === 32 || buf.charCodeAt(to - 1) === 9)) to--;
  return to - from === lower.length && nameIs(buf, from, lower);
}

/**
 * Whether an incomplete head may wait for more bytes here. Not when node:http would answer it
 * already (a request line the fast path does not take, a byte no head may have, a lone CR or
 * LF), nor when it is too long: those go to node:http at once, so a client never waits on the
 * fast path for an answer node:http would have given.
 */
function mayWait(rest: string, seen: number): boolean {
  if (rest.length > HEAD_LIMIT) return false;
  // The characters before `seen` passed this check before (all but a CR that was last).
  for (let i = seen > 1 ? seen - 1 : 0; i < rest.length; i++) {
    const c = rest.charCodeAt(i);
    if (c === 13) {
      if (i + 1 < rest.length && rest.charCodeAt(i + 1) !== 10) return false;
    } else if (c === 10) {
      if (i === 0 || rest.charCodeAt(i - 1) !== 13) return false;
    } else if ((c < 32 && c !== 9) || c >= 127) {
      return false;
    }
  }
  const eol = rest.indexOf("\r\n");
  // A request line still coming must be able to become one the fast path takes.
  if (eol === -1) return "GET /".startsWith(rest.slice(0, 5)) || "HEAD /".startsWith(rest.slice(0, 6));
  return requestLine(rest, 0, eol) !== undefined;
}

/** Characters of an HTTP token (RFC 9110), by code. */
const TOKEN = new Uint8Array(128);
for (const c of "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") TOKEN[c.charCodeAt(0)] = 1;

// Status line and headers up to "Date: ", by reply; built once per reply object.
const heads = new WeakMap<Reply, string>();

function rawHead(reply: Reply): string {
  let head = heads.get(reply);
  if (head === undefined) {
    head = `HTTP/1.1 ${reply.status} ${STATUS_CODES[reply.status] ?? "unknown"}\r\n`;
    for (let i = 0; i < reply.head.length; i += 2) head += `${reply.head[i]}: ${reply.head[i + 1]}\r\n`;
    head += "Date: ";
    heads.set(reply, head);
  }
  return head;
}

// The Date header's value, as node:http makes it: computed at most once a second.
let date: string | undefined;

function utcDate(): string {
  if (date === undefined) {
    const now = new Date();
    date = now.toUTCString();
    setTimeout(() => (date = undefined), 1000 - now.getMilliseconds()).unref();
  }
  return date;
}
