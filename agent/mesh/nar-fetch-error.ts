// Why a NAR could not be had from a peer, as the requester's transfer code tells its callers
// (fleet-source.ts tries the next holder, or says busy, or penalises wrong bytes).
import { NAR_ERROR } from "../../protocol/peer-codec.js";

export type NarFetchReason =
  | "not-found"
  | "bad-offset"
  | "busy"
  | "internal"
  | "size-mismatch"
  | "hash-mismatch"
  | "timeout"
  | "stalled"
  | "failed" // could not open the stream, or it broke before the header
  | "protocol" // a malformed header
  | "corrupt" // a compressed stream that does not decode
  | "interrupted"; // the bytes stopped before the end

/** A NAR could not be had from this peer (or did not check out); try another holder. */
export class NarFetchError extends Error {
  override name = "NarFetchError";
  constructor(
    readonly reason: NarFetchReason,
    message: string,
    opts?: { cause?: unknown },
  ) {
    super(`${reason}: ${message}`, opts);
  }
}

export const REASON_BY_CODE: Record<number, NarFetchReason> = {
  [NAR_ERROR.notFound]: "not-found",
  [NAR_ERROR.badOffset]: "bad-offset",
  [NAR_ERROR.busy]: "busy",
};
