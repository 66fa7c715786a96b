// Nix remembers narinfos per cache URL in ~/.cache/nix for a month. Test agents listen on random
// free ports with fresh keys, so a port used by an earlier run (or an earlier test) would hand Nix
// a remembered narinfo signed by a key nobody trusts now ("lacks a valid signature", seen in CI).
// Every test process, and every Nix it starts, gets an empty cache of its own.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const dir = mkdtempSync(join(tmpdir(), "fleetcache-test-nix-cache-"));
process.env.XDG_CACHE_HOME = dir;
process.on("exit", () => rmSync(dir, { recursive: true, force: true }));
