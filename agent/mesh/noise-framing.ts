// Hands the noise encrypter its incoming messages whole: each 'message' event it sees on the
// connection carries one noise message (2-byte big-endian length, then the bytes), its bytes in
// one contiguous buffer (plus the next message's length, see #dispatch). Same wire bytes, same
// library; only how the received bytes are cut differs.
//
// Why: @chainsafe/libp2p-noise decodes messages from whatever pieces the socket delivers, and a
// message that spans two reads (almost all of them: messages are 65,537 bytes, Node's reads 64
// KiB) is copied into a fresh buffer inside the library (EncryptedMessageStream.decrypt, for a
// destination Node's cipher never uses), then decrypted piece by piece, one plaintext buffer per
// socket read. On a slow link reads are small, so every later step (yamux, hashing, holding,
// writing to Nix) ran once per small read (BENCHMARKS.md, "Compression on slow links"). Here a
// message that spans reads is assembled once, into a buffer reused for the whole connection once
// only the transport decrypter reads (see #mayReuse), and decrypted in one call into one plaintext.
//
// The connection given to noise is a Proxy of the TCP connection: everything but the 'message'
// listeners and unshift() goes straight to it (bound to it), so sending is untouched.
import { StreamMessageEvent, type MultiaddrConnection } from "@libp2p/interface";
import { noise } from "@chainsafe/libp2p-noise";
import { Uint8ArrayList } from "uint8arraylist";
import { noiseCrypto } from "./noise-crypto.js";

/** Length prefix of a noise message (libp2p noise spec: uint16 big-endian). */
const PREFIX = 2;
const MAX_MESSAGE = PREFIX + 0xffff;

type Listener = ((evt: StreamMessageEvent) => void) | { handleEvent(evt: StreamMessageEvent): void };
/** A Uint8Array, or a Uint8ArrayList (of whichever copy of that package the caller uses). */
type Bytes = Uint8Array | (Iterable<Uint8Array> & { byteLength: number });
/** The connection's own listener methods, untyped (its events are typed per name). */
type AnyListeners = { addEventListener(type: string, l: unknown, o?: unknown): void; removeEventListener(type: string, l: unknown, o?: unknown): void };
type NoiseInit = NonNullable<Parameters<typeof noise>[0]>;

/**
 * noise with the mesh's cipher calls (noise-crypto.ts), whose connections are framed
 * (framedConnection) before the library reads them. The cipher is not a choice: the reused
 * buffer is safe only with one that never decrypts into the library's `dst` (the library's own
 * default does, for small messages).
 */
export function framedNoise(init: Omit<NoiseInit, "crypto"> = {}): ReturnType<typeof noise> {
  const make = noise({ ...init, crypto: noiseCrypto });
  return (components) => {
    const inner = make(components);
    // Everything else (protocol, capabilities) as the library's.
    return Object.assign(Object.create(inner) as typeof inner, {
      secureInbound: async (conn: MultiaddrConnection, opts?: Parameters<typeof inner.secureInbound>[1]) => quietDecoder(await inner.secureInbound(framedConnection(conn), opts)),
      secureOutbound: async (conn: MultiaddrConnection, opts?: Parameters<typeof inner.secureOutbound>[1]) => quietDecoder(await inner.secureOutbound(framedConnection(conn), opts)),
    });
  };
}

/** The library's transport decoder, as far as quietDecoder needs it (a field its class does not hide at run time). */
interface LengthDecoding {
  decoder?: { lengthDecoder?: unknown };
}

/**
 * Gives the secured connection's message decoder a length reader that, when fewer than 2 bytes
 * are buffered, answers a length no such buffer can hold instead of throwing. The library's
 * reader throws a RangeError there, which its decoder catches to mean "wait for more": an Error
 * and its stack trace every time a message arrives alone (a request, a window update, the last
 * of a burst). #dispatch below avoids it when the next length has come; on a NAR request's few
 * small messages it mostly has not, and the throws were 3 % of the holder's CPU per peer NAR
 * (BENCHMARKS.md, "Relay: CPU per byte"). A library without that field is left as it is.
 */
export function quietDecoder<T extends { connection: unknown }>(secured: T): T {
  const d = (secured.connection as LengthDecoding).decoder;
  if (d && typeof d.lengthDecoder === "function") d.lengthDecoder = lengthOrWait;
  return secured;
}

/** A noise message's length; with fewer than 2 bytes at hand, one longer than any message, so the decoder waits. */
function lengthOrWait(data: Uint8Array | Uint8ArrayList): number {
  if (data.length < PREFIX) return MAX_MESSAGE;
  return data instanceof Uint8Array ? data[0]! * 256 + data[1]! : data.getUint16(0);
}

/** `conn` as seen by a reader of noise messages: one whole message per 'message' event. */
export function framedConnection(conn: MultiaddrConnection): MultiaddrConnection {
  const framer = new NoiseFramer(conn);
  const bound = new Map<PropertyKey, unknown>();
  return new Proxy(conn, {
    get(target, prop) {
      if (prop === "addEventListener") return framer.addEventListener;
      if (prop === "removeEventListener") return framer.removeEventListener;
      if (prop === "unshift") return framer.unshift;
      const v: unknown = Reflect.get(target, prop, target);
      // A function-valued field (its logger) as it is; methods run on the connection itself (its
      // fields, private state and events are its own).
      if (typeof v !== "function" || Object.hasOwn(target, prop)) return v;
      let b = bound.get(prop);
      if (b === undefined) bound.set(prop, (b = (v as (...a: unknown[]) => unknown).bind(target)));
      return b;
    },
  });
}

/**
 * Cuts the connection's bytes into noise messages for the listeners added through the proxy. One
 * listener of its own sits on the connection from the first proxied one on; bytes no listener
 * wants yet wait here, in order.
 */
export class NoiseFramer {
  readonly #conn: MultiaddrConnection;
  readonly #listeners: Listener[] = [];
  /** Received bytes not yet handed out, in order (the head may be partly consumed: #head). */
  #pieces: Uint8Array[] = [];
  #head = 0;
  #bytes = 0;
  #attached = false;
  /** Length of the next message when its prefix went out already (with the previous one), else -1. */
  #nextLength = -1;
  #removed = false;
  #dispatching = false;
  /** Reused for messages that span reads, once #mayReuse. */
  #scratch: Buffer | undefined;

  constructor(conn: MultiaddrConnection) {
    this.#conn = conn;
  }

  /**
   * Whether a message may be handed out as a view of the reused buffer: only to the transport
   * decrypter, which decrypts each message within its listener and keeps none of it (its
   * ciphers write fresh plaintext: noise-crypto.ts never decrypts into the library's `dst`).
   * The handshake's reader (lpStream) keeps what it is given until read; it is the first listener
   * and lets go (removes itself) when the handshake is done, before the decrypter listens.
   */
  get #mayReuse(): boolean {
    return this.#removed && this.#listeners.length === 1;
  }

  /** For 'message', options (once, signal) are not supported: noise's readers pass none. */
  readonly addEventListener = (type: string, listener: Listener, opts?: unknown): void => {
    if (type !== "message") return (this.#conn as unknown as AnyListeners).addEventListener(type, listener, opts);
    if (!this.#listeners.includes(listener)) this.#listeners.push(listener);
    if (!this.#attached) {
      this.#attached = true;
      this.#conn.addEventListener("message", (evt) => this.#receive(evt.data as Bytes));
    }
    // Bytes that waited for a listener: after this call returns, as the connection itself does.
    if (this.#bytes > 0) queueMicrotask(() => this.#dispatch());
  };

  readonly removeEventListener = (type: string, listener: Listener, opts?: unknown): void => {
    if (type !== "message") return (this.#conn as unknown as AnyListeners).removeEventListener(type, listener, opts);
    const i = this.#listeners.indexOf(listener);
    if (i < 0) return;
    this.#listeners.splice(i, 1);
    this.#removed = true;
  };

  /** Bytes a reader took and gives back unread (the handshake reader's leftovers): first in line. */
  readonly unshift = (data: Bytes): void => {
    const parts = data instanceof Uint8Array ? [data] : [...data];
    const rest = this.#pieces.slice();
    if (rest.length > 0 && this.#head > 0) rest[0] = rest[0]!.subarray(this.#head);
    this.#pieces = [...parts.filter((p) => p.length > 0), ...rest];
    this.#head = 0;
    this.#bytes += data.byteLength;
    // Given back from a message boundary on: any length we handed out ahead is among these bytes.
    if (data.byteLength > 0) this.#nextLength = -1;
    if (this.#listeners.length > 0) queueMicrotask(() => this.#dispatch());
  };

  #receive(data: Bytes): void {
    for (const p of data instanceof Uint8Array ? [data] : data) {
      if (p.length === 0) continue;
      this.#pieces.push(p);
      this.#bytes += p.length;
    }
    this.#dispatch();
  }

  /**
   * Hands out every whole message while someone listens. An event carries one message, and the
   * next message's 2-byte length when it is here already (a copy of its own): the library's
   * decoder then never runs dry between messages, which it signals by throwing a RangeError
   * (an Error with a stack trace per message, a tenth of the receiver's CPU when measured). That
   * message's event then starts with its body.
   */
  #dispatch(): void {
    if (this.#dispatching) return; // a listener's call back into us: the running loop goes on
    this.#dispatching = true;
    try {
      while (this.#listeners.length > 0) {
        let body = this.#nextLength; // set when the length went out with the previous message
        let prefix = 0;
        if (body < 0) {
          if (this.#bytes < PREFIX) break;
          body = this.#byteAt(0) * 256 + this.#byteAt(1);
          prefix = PREFIX;
        }
        if (this.#bytes < prefix + body) break;
        const message = this.#take(prefix + body);
        this.#nextLength = -1;
        let data: Uint8Array | Uint8ArrayList = message;
        if (this.#bytes >= PREFIX) {
          const next = Uint8Array.of(this.#byteAt(0), this.#byteAt(1));
          this.#skip(PREFIX);
          this.#nextLength = next[0]! * 256 + next[1]!;
          data = new Uint8ArrayList(message, next);
        }
        const evt = new StreamMessageEvent(data as ConstructorParameters<typeof StreamMessageEvent>[0]);
        for (const l of this.#listeners.slice()) {
          if (typeof l === "function") l(evt);
          else l.handleEvent(evt);
        }
      }
    } finally {
      this.#dispatching = false;
    }
  }

  #byteAt(i: number): number {
    let at = this.#head + i;
    for (const p of this.#pieces) {
      if (at < p.length) return p[at]!;
      at -= p.length;
    }
    throw new RangeError("framer: byte beyond the buffered ones");
  }

  /** The next `n` bytes: a view when they lie in one piece, else assembled into one buffer. */
  #take(n: number): Uint8Array {
    this.#bytes -= n;
    const head = this.#pieces[0]!;
    if (head.length - this.#head >= n) {
      const out = head.subarray(this.#head, this.#head + n);
      this.#advance(n);
      return out;
    }
    const out = this.#mayReuse ? (this.#scratch ??= Buffer.allocUnsafe(MAX_MESSAGE)).subarray(0, n) : Buffer.allocUnsafe(n);
    for (let off = 0; off < n; ) {
      const p = this.#pieces[0]!;
      const m = Math.min(n - off, p.length - this.#head);
      out.set(p.subarray(this.#head, this.#head + m), off);
      off += m;
      this.#advance(m);
    }
    return out;
  }

  /** Drops the next `n` bytes (already copied out). */
  #skip(n: number): void {
    this.#bytes -= n;
    for (let left = n; left > 0; ) {
      const m = Math.min(left, this.#pieces[0]!.length - this.#head);
      this.#advance(m);
      left -= m;
    }
  }

  #advance(m: number): void {
    this.#head += m;
    if (this.#head === this.#pieces[0]!.length) {
      this.#pieces.shift(); // short: the pieces of one or two messages (64 KiB each)
      this.#head = 0;
    }
  }
}
