// NAR streams opened one ahead of need, per holder. A NAR on the mesh takes a stream of its own,
// and opening one costs multistream-select's round trip before the request can go out (libp2p
// 3's select always negotiates fully), so across a routed link a relayed NAR cost two round
// trips: 120 ms of a 60 ms link before the first byte. When a holder is asked for a NAR on the
// mesh, one more stream to it is opened in the background, up to AHEAD_PER_PEER idle ones, and
// the next NAR for that holder takes it: in a burst (Nix substitutes up to 16 paths at once)
// every NAR after the first few starts with its request. The holder waits for a stream's first
// request up to FIRST_REQUEST_MS (10 s); one not taken is closed before that (AHEAD_IDLE_MS), and
// the holder's handler ends on the close without a word.
import type { MeshNode, MeshStream } from "./node.js";
import { idleAndSound } from "./stream-io.js";

/** Streams kept open ahead per holder and protocol list: the holder's transfer limit (MAX_NAR_TRANSFERS_PER_PEER). */
export const AHEAD_PER_PEER = 8;
/** Unused streams ahead over all holders: a fleet of 100 routed peers in use at once gets some each. */
export const AHEAD_MAX = 128;
/** An idle stream ahead is closed before the holder's first-request limit (10 s) would reset it. */
export const AHEAD_IDLE_MS = 8_000;
/** Longest wait for a stream ahead to open (a slow or gone peer: the next NAR opens its own). */
const AHEAD_OPEN_MS = 10_000;

interface Ahead {
  ms: MeshStream;
  timer: NodeJS.Timeout;
}

export interface AheadCounts {
  /** NARs whose stream was opened for them. */
  opened: number;
  /** NARs that took a stream opened ahead. */
  taken: number;
  /** Streams opened ahead (taken, closed unused, or still idle). */
  ahead: number;
}

export class NarStreamsAhead {
  /** Per holder and protocol list: idle streams, oldest first. */
  readonly #idle = new Map<string, Ahead[]>();
  /** Per holder and protocol list: streams ahead still opening. */
  readonly #opening = new Map<string, number>();
  /** Streams ahead opening or idle, over all holders. */
  #unused = 0;
  readonly counts: AheadCounts = { opened: 0, taken: 0, ahead: 0 };

  constructor(
    readonly node: MeshNode,
    readonly opts: { perPeer?: number; max?: number; idleMs?: number } = {},
  ) {}

  /**
   * A stream to `peerId` negotiated for one of `protocols`: one opened ahead if one is idle and
   * sound, else a new one. Either way, one more is opened ahead for the holder's next NAR.
   */
  async take(peerId: string, protocols: string[], signal: AbortSignal): Promise<MeshStream> {
    const key = `${peerId} ${protocols.join(" ")}`;
    this.#openAhead(peerId, protocols, key);
    const list = this.#idle.get(key);
    while (list && list.length > 0) {
      const { ms, timer } = list.shift()!;
      clearTimeout(timer);
      this.#unused--;
      if (list.length === 0) this.#idle.delete(key);
      const s = ms.stream;
      if (idleAndSound(s, ms.reader)) {
        this.counts.taken++;
        return ms;
      }
      s.abort(new Error("stale NAR stream opened ahead"));
    }
    this.counts.opened++;
    return this.node.open(peerId, protocols, { signal });
  }

  /** Idle streams ahead over all holders (for tests and status). */
  get idle(): number {
    let n = 0;
    for (const list of this.#idle.values()) n += list.length;
    return n;
  }

  #openAhead(peerId: string, protocols: string[], key: string): void {
    const perPeer = this.opts.perPeer ?? AHEAD_PER_PEER;
    const opening = this.#opening.get(key) ?? 0;
    if ((this.#idle.get(key)?.length ?? 0) + opening >= perPeer) return;
    if (this.#unused >= (this.opts.max ?? AHEAD_MAX)) return;
    this.#unused++;
    this.counts.ahead++;
    this.#opening.set(key, opening + 1);
    const opened = () => {
      const n = (this.#opening.get(key) ?? 1) - 1;
      if (n > 0) this.#opening.set(key, n);
      else this.#opening.delete(key);
    };
    this.node.open(peerId, protocols, { signal: AbortSignal.timeout(AHEAD_OPEN_MS) }).then(
      (ms) => {
        opened();
        this.#add(key, ms);
      },
      () => {
        opened();
        this.#unused--; // the peer went, or is slow: its next NAR opens its own
      },
    );
  }

  #add(key: string, ms: MeshStream): void {
    if (ms.stream.status !== "open") {
      this.#unused--;
      return;
    }
    const list = this.#idle.get(key) ?? [];
    const entry: Ahead = {
      ms,
      timer: setTimeout(() => {
        const i = list.indexOf(entry);
        if (i >= 0) list.splice(i, 1);
        if (list.length === 0 && this.#idle.get(key) === list) this.#idle.delete(key);
        this.#unused--;
        ms.stream.close().catch(() => {}); // the holder's handler sees the end before a request: done
      }, this.opts.idleMs ?? AHEAD_IDLE_MS),
    };
    entry.timer.unref();
    list.push(entry);
    this.#idle.set(key, list);
  }
}

const byNode = new WeakMap<MeshNode, NarStreamsAhead>();

/** The node's streams ahead (one set per mesh node, as its narinfo stream pool). */
export function narStreamsAhead(node: MeshNode): NarStreamsAhead {
  let s = byNode.get(node);
  if (!s) byNode.set(node, (s = new NarStreamsAhead(node)));
  return s;
}
