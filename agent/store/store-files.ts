// Resolving a file inside a store path the way a browser would see /nix/store/<path>/<file>,
// following symlinks, but never leaving the store: every step is checked against the logical
// /nix/store tree, and the store path it lands in must be a valid one.
import { lstat, readlink } from "node:fs/promises";
import type { Stats } from "node:fs";
import { join } from "node:path";
import { STORE_DIR } from "../../protocol/path-info.js";

const MAX_SYMLINK_HOPS = 40;

export type Resolved =
  | { kind: "found"; realPath: string; logicalPath: string; stat: Stats }
  | { kind: "not-found"; reason: string }
  | { kind: "forbidden"; reason: string };

/**
 * Resolves `components` (already URL-decoded, none empty, ".", "..", or containing "/" or NUL)
 * below the store path `basename`. `isValidBasename` says whether a store path is valid.
 */
export async function resolveInStore(
  root: string,
  basename: string,
  components: string[],
  isValidBasename: (basename: string) => Promise<boolean>,
): Promise<Resolved> {
  const realStore = join(root, STORE_DIR);
  const resolved: string[] = [];
  const queue = [basename, ...components];
  let hops = 0;
  while (queue.length > 0) {
    const c = queue.shift()!;
    if (c === "" || c === ".") continue;
    if (c === "..") {
      resolved.pop();
      if (resolved.length === 0) return { kind: "forbidden", reason: "symlink leads out of its store path to the store directory" };
      continue;
    }
    resolved.push(c);
    if (resolved.length === 1 && !(await isValidBasename(c))) return { kind: "not-found", reason: `${STORE_DIR}/${c} is not a valid store path` };
    const real = join(realStore, ...resolved);
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
      if (target.startsWith("/")) {
        if (!target.startsWith(STORE_DIR + "/")) return { kind: "forbidden", reason: "symlink points outside the Nix store" };
        resolved.length = 0;
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
  const real = join(realStore, ...resolved);
  return { kind: "found", realPath: real, logicalPath: [STORE_DIR, ...resolved].join("/"), stat: await lstat(real) };
}
