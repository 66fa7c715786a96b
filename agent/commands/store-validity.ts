// Which store paths a store already holds, asked of Nix itself (works for the local store, the
// daemon, and chroot or other store URIs alike).
import { execFile } from "node:child_process";
import { promisify } from "node:util";

const execFileP = promisify(execFile);
const BATCH = 500; // paths per command line

/** The subset of `paths` that are NOT valid in `store` (undefined: Nix's default store). */
export async function invalidPaths(paths: string[], store: string | undefined): Promise<Set<string>> {
  const invalid = new Set<string>();
  for (let i = 0; i < paths.length; i += BATCH) {
    const args = [...(store ? ["--store", store] : []), "--check-validity", "--print-invalid", ...paths.slice(i, i + BATCH)];
    let stdout: string;
    try {
      ({ stdout } = await execFileP("nix-store", args, { maxBuffer: 64 << 20 }));
    } catch (e) {
      const err = e as { code?: string; stderr?: string; message: string };
      if (err.code === "ENOENT") throw new Error("`nix-store` is not on PATH");
      throw new Error(`nix-store --check-validity failed: ${(err.stderr || err.message).trim()}`);
    }
    for (const line of stdout.split("\n")) if (line) invalid.add(line);
  }
  return invalid;
}
