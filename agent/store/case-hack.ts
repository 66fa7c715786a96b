// Nix's case hack (`use-case-hack`, on by default on macOS): on a case-insensitive filesystem
// Nix cannot store both `Foo` and `foo`, so when it unpacks a NAR it renames each entry whose
// name collides case-insensitively with an earlier one to `NAME~nix~case~hack~N`. When it dumps,
// it cuts every name at the first `~nix~case~hack~`, sorts the entries by the names so cut, and
// refuses a directory where two entries end up with the same name (src/libutil/archive.cc).
// Everything that shows a store path's contents (NARs, listings, /serve) must see those names,
// the NAR's names, or its bytes stop matching the NarHash Nix recorded.
import { compareNames } from "../../protocol/nar.js";

export const CASE_HACK_SUFFIX = Buffer.from("~nix~case~hack~");

/** The name Nix gives an entry whose name on disk is `onDisk`: everything before the first suffix. */
export function narName(onDisk: Buffer): Buffer {
  const at = onDisk.indexOf(CASE_HACK_SUFFIX);
  return at === -1 ? onDisk : onDisk.subarray(0, at);
}

/** Two entries of one directory that Nix's dump would give the same name. */
export class CaseHackCollisionError extends Error {}

/** A directory entry: the name it has in the NAR, and the entry as read from disk. */
export interface NarEntry<T> {
  name: Buffer;
  onDisk: T;
}

/**
 * A directory's entries in NAR order, named as in the NAR. `nameOf` gives an entry's name on
 * disk; `dir` is only for the message when two entries collide (as Nix, we refuse those).
 */
export function narEntries<T>(entries: T[], nameOf: (e: T) => Buffer, caseHack: boolean, dir: string): NarEntry<T>[] {
  const out = entries.map((e) => ({ name: caseHack ? narName(nameOf(e)) : nameOf(e), onDisk: e }));
  out.sort((a, b) => compareNames(a.name, b.name));
  if (caseHack) {
    for (let i = 1; i < out.length; i++) {
      if (out[i - 1]!.name.equals(out[i]!.name)) {
        const [a, b] = [nameOf(out[i - 1]!.onDisk), nameOf(out[i]!.onDisk)].map((n) => `${dir}/${n.toString()}`);
        throw new CaseHackCollisionError(`file name collision between '${a}' and '${b}' (use-case-hack)`);
      }
    }
  }
  return out;
}
