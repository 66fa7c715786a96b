// Resolving a file inside a store path the way a browser would see /nix/store/<path>/<file>,
// following symlinks, but never leaving the store: every step is checked against the logical
// /nix/store tree, and the store path it lands in must be a valid one.
//
// Names are those of the path's NAR. With Nix's case hack they differ from the names on disk
// (`foo` may be `foo~nix~case~hack~1` there), so each name is looked up among the NAR names of
// its directory; a name on disk that is not a NAR name (`foo~nix~case~hack~1` itself) is not
// found, exactly as it is absent from what Nix would serve.
import { lstat, readdir, readlink } from "node:fs/promises";
import type { Stats } from "node:fs";
import { join } from "node:path";
import { STORE_DIR } from "../../protocol/path-info.js";
import { narEntries } from "./case-hack.js";

const MAX_SYMLINK_HOPS = 40;

export type Resolved =
  | { kind: "found"; realPath: string; logicalPath: string; stat: Stats }
  | { kind: "not-found"; reason: string }
  | { kind: "forbidden"; reason: string };

/** The name on disk of the entry `name` of the directory `dir`, undefined if there is none. */
async function nameOnDisk(dir: string, name: string, caseHack: boolean): Promise<string | undefined> {
  if (!caseHack) return name;
  const wanted = Buffer.from(name);
  const entries = narEntries(await readdir(dir, { encoding: "buffer" }).catch(() => []), (n) => n, true, dir);
  return entries.find((e) => e.name.equals(wanted))?.onDisk.toString();
}

/**
 * Resolves `components` (already URL-decoded, none empty, ".", "..", or containing "/" or NUL)
 * below the store path `basename`. `isValidBasename` says whether a store path is valid.
 * `caseHack`: the store was written with Nix's case hack (see case-hack.ts).
 */
export async function resolveInStore(
  root: string,
  basename: string,
  components: string[],
  isValidBasename: (basename: string) => Promise<boolean>,
  caseHack = false,
): Promise<Resolved> {
  const realStore = join(root, STORE_DIR);
  const resolved: string[] = []; // NAR names, from the store path's basename on
  const onDisk: string[] = []; // the same entries' names on disk
  const queue = [basename, ...components];
  let hops = 0;
  while (queue.length > 0) {
    const c = queue.shift()!;
    if (c === "" || c === ".") continue;
    if (c === "..") {
      resolved.pop();
      onDisk.pop();
      if (resolved.length === 0) return { kind: "forbidden", reason: "symlink leads out of its store path to the store directory" };
      continue;
    }
    // Store path basenames are never case-hacked (they are not NAR entries).
    const disk = resolved.length === 0 ? c : await nameOnDisk(join(realStore, ...onDisk), c, caseHack);
    if (disk === undefined) return { kind: "not-found", reason: "no such file" };
    resolved.push(c);
    onDisk.push(disk);
    if (resolved.length === 1 && !(await isValidBasename(c))) return { kind: "not-found", reason: `${STORE_DIR}/${c} is not a valid store path` };
    const real = join(realStore, ...onDisk);
    let st: Stats;
    try {
      st = await lstat(real);
    } catch {
      return { kind: "not-found", reason: "no such file" };
    }
    if (st.isSymbolicLink()) {
      if (++hops > MAX_SYMLINK_HOPS) return { kind: "not-found", reason: "too many levels of symbolic links" };
      const target = await readlink(real);
      resolved.pop();
      onDisk.pop();
      if (target.startsWith("/")) {
        if (!target.startsWith(STORE_DIR + "/")) return { kind: "forbidden", reason: "symlink points outside the Nix store" };
        resolved.length = 0;
        onDisk.length = 0;
        queue.unshift(...target.slice(STORE_DIR.length + 1).split("/"));
      } else {
        queue.unshift(...target.split("/"));
      }
      continue;
    }
    if (queue.some((q) => q !== "" && q !== ".") && !st.isDirectory()) return { kind: "not-found", reason: "not a directory" };
    if (queue.length === 0) return { kind: "found", realPath: real, logicalPath: [STORE_DIR, ...resolved].join("/"), stat: st };
  }
  if (resolved.length === 0) return { kind: "forbidden", reason: "symlink points to the store directory itself" };
  const real = join(realStore, ...onDisk);
  return { kind: "found", realPath: real, logicalPath: [STORE_DIR, ...resolved].join("/"), stat: await lstat(real) };
}
