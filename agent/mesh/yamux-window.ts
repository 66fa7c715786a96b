// js-yamux (@chainsafe/libp2p-yamux 8) answers every data frame it receives with a window update
// frame, however little of the 256 KiB window the frame used. On a narinfo stream that is an
// extra frame for the request and one for the answer: each a noise message, a socket write on one
// side and a read, a decryption and a dispatch on the other, 9 % of a peer lookup's CPU on the
// asking agent and 14 % on the holder (BENCHMARKS.md, "Peer lookups and per-NAR CPU").
// go-yamux and Hashicorp's yamux wait until half the window is used; this makes
// one stream do the same. The peer needs nothing new: it only gets fewer updates, always before
// its window could run out, so it never waits for one. Streams that open, acknowledge or are
// paused keep the library's behaviour (those updates carry flags or state).
import type { Stream } from "@libp2p/interface";
import { StreamState, YamuxStream } from "@chainsafe/libp2p-yamux/stream";

/** The fields the library keeps private (names as in its stream.js). */
interface Window {
  recvWindow: number;
  recvWindowCapacity: number;
}

/**
 * Makes `stream` (if a js-yamux stream; anything else is left alone) send a window update only
 * once less than half its receive window is left, as go-yamux does. For streams of small
 * messages (narinfo); a bulk stream keeps the library's eager updates.
 */
export function quietWindowUpdates(stream: Stream): void {
  if (!(stream instanceof YamuxStream)) return;
  const w = stream as unknown as Window;
  if (typeof w.recvWindow !== "number" || typeof w.recvWindowCapacity !== "number") return;
  const eager = stream.sendWindowUpdate;
  stream.sendWindowUpdate = function (this: YamuxStream) {
    if (this.state === StreamState.Established && w.recvWindowCapacity > w.recvWindow / 2) return;
    eager.call(this);
  };
}
