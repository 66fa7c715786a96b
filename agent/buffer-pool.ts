// Reused buffers for byte paths (NAR reads, for HTTP clients and for peers). On these VMs a
// page fault on freshly allocated memory costs about 11 µs, 2.7 CPU s per GB touched: a new 1 MiB
// Buffer per read put most of the NAR path's CPU in faults and GC (see NIX-FACTS.md). A buffer
// taken from here is either a reused one or a fresh one; it goes back only when its last user
// calls release(), so a buffer nobody releases is simply garbage, never handed out twice.
//
// The rule for release(): call it only once nothing will read the bytes again. For a buffer
// passed to socket.write / res.write that is the write's callback (libuv holds the pointer until
// the write completes or is cancelled), never right after write() returns. For one handed to a
// mesh stream it is the moment noise has encrypted its last byte (releaseWhenEncrypted in
// mesh/noise-crypto.ts), not when stream.send() returns or its write queue drains.

/** Smallest size class; requests below it get a buffer of this size. */
const MIN_CLASS = 64 << 10;

/**
 * On the ArrayBuffer of a buffer handed out and not yet released: the pool it may go back to.
 * A mark on the memory itself, not a WeakSet: a WeakSet kept every ArrayBuffer alive until a full
 * GC, and a consumer that never releases (one reading a 4 GiB NAR into a hash) grew by 150 MiB.
 */
const OUT = Symbol("lent by a BufferPool");
type Marked = ArrayBuffer & { [OUT]?: BufferPool | undefined };

export class BufferPool {
  /** Free buffers by size (a power of two from MIN_CLASS up). */
  readonly #free = new Map<number, Buffer[]>();
  #freeBytes = 0;

  /** `maxFreeBytes`: free buffers kept for reuse; more than that are left to the GC. */
  constructor(readonly maxFreeBytes = 16 << 20) {}

  /**
   * A buffer of at least `size` bytes (its length is the size class: a power of two, at least
   * 64 KiB). Its contents are arbitrary. Sizes above 64 MiB are not pooled.
   */
  acquire(size: number): Buffer {
    const cls = sizeClass(size);
    const buf = this.#free.get(cls)?.pop();
    if (buf) {
      this.#freeBytes -= cls;
    }
    // allocUnsafe of 64 KiB and more gets an ArrayBuffer of its own (Node's shared slab is
    // only for allocations under 4 KiB), so the whole ArrayBuffer is this buffer's.
    const out = buf ?? Buffer.allocUnsafe(cls);
    (out.buffer as Marked)[OUT] = this;
    return out;
  }

  /**
   * Gives back a buffer from acquire(), or any view of one (a subarray). Anything else, and a
   * buffer released twice, is ignored: a foreign Buffer may share memory with others.
   */
  release(view: Buffer): void {
    const ab = view.buffer as Marked;
    if (ab[OUT] !== this) return;
    ab[OUT] = undefined;
    const cls = ab.byteLength;
    if (this.#freeBytes + cls > this.maxFreeBytes) return;
    let list = this.#free.get(cls);
    if (!list) this.#free.set(cls, (list = []));
    list.push(Buffer.from(ab, 0, cls));
    this.#freeBytes += cls;
  }

  /** Bytes held for reuse (for tests and status). */
  get freeBytes(): number {
    return this.#freeBytes;
  }
}

function sizeClass(size: number): number {
  if (!Number.isSafeInteger(size) || size < 0 || size > 64 << 20) throw new RangeError(`bad buffer size ${size}`);
  let cls = MIN_CLASS;
  while (cls < size) cls *= 2;
  return cls;
}

/** The process's pool for NAR bytes read from the local store. */
export const narBuffers = new BufferPool();
