// Real Nix for tests: chroot stores, paths added to them, and the reference tools.
// When Nix is missing, tests skip locally but fail under CI=true (CI must prove the real thing).
import "./nix-cache.js";
import { execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import type { TestContext } from "node:test";
import { parseHash, toNix32Hash } from "../../protocol/hash.js";
import type { PathInfo } from "../../protocol/path-info.js";

const execFileP = promisify(execFile);

export const NIX_FLAGS = ["--extra-experimental-features", "nix-command"];
/** Options that keep test Nix commands offline and able to build in a chroot store. */
export const OFFLINE = ["--option", "substituters", "", "--option", "sandbox-paths", "/bin /lib /lib64 /usr"];

let nixAvailable: boolean | undefined;
export async function hasNix(): Promise<boolean> {
  if (nixAvailable === undefined) {
    nixAvailable = await execFileP("nix", ["--version"]).then(() => true, () => false);
  }
  return nixAvailable;
}

/** Call at the top of a test that needs real Nix: skips locally, throws under CI. */
export async function needNix(t: TestContext): Promise<boolean> {
  if (await hasNix()) return true;
  if (process.env.CI === "true") throw new Error("real Nix is required under CI=true but `nix` was not found");
  t.skip("nix not installed");
  return false;
}

/** Runs a command and returns its stdout (utf8); throws with stderr on failure. */
export async function run(cmd: string, args: string[], opts: { env?: NodeJS.ProcessEnv } = {}): Promise<string> {
  try {
    const { stdout } = await execFileP(cmd, args, { maxBuffer: 256 << 20, env: { ...process.env, ...opts.env } });
    return stdout;
  } catch (e) {
    const err = e as { stderr?: string; message: string };
    throw new Error(`${cmd} ${args.join(" ")} failed: ${err.stderr ?? err.message}`);
  }
}

export function nix(args: string[]): Promise<string> {
  return run("nix", [...NIX_FLAGS, ...args]);
}

/** A temporary directory removed by cleanup(). */
export function tempDir(prefix = "fleetcache-test-"): { dir: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Adds a file or directory to the chroot store at `root` (content-addressed); returns its store path. */
export async function addToStore(root: string, path: string): Promise<string> {
  return (await run("nix-store", ["--store", root, "--add", path])).trim();
}

/** Builds a Nix expression file in the chroot store at `root`; returns the output paths. */
export async function buildInStore(root: string, exprFile: string): Promise<string[]> {
  const out = await run("nix-build", ["--store", root, ...OFFLINE, exprFile, "--no-out-link"]);
  return out.trim().split("\n").filter(Boolean);
}

/** `nix path-info --json` for paths in the store at `root`. */
export async function pathInfo(root: string, paths: string[], recursive = false): Promise<NixPathInfoJson[]> {
  return JSON.parse(await nix(["path-info", "--store", root, "--json", ...(recursive ? ["-r"] : []), ...paths]));
}

export interface NixPathInfoJson {
  path: string;
  narHash: string;
  narSize: number;
  references: string[];
  deriver?: string;
  signatures?: string[];
  ca?: string;
  registrationTime?: number;
  ultimate?: boolean;
}

/** Streams `nix store dump-path` for a path into a consumer (no buffering of the whole NAR). */
export function dumpPath(root: string, storePath: string): NodeJS.ReadableStream & { done: Promise<void> } {
  const child = spawn("nix", [...NIX_FLAGS, "store", "dump-path", "--store", root, storePath], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => (stderr += d));
  const done = new Promise<void>((resolve, reject) =>
    child.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`dump-path ${storePath}: ${stderr}`)))),
  );
  return Object.assign(child.stdout, { done });
}

/** `nix path-info --json` output in our PathInfo form. */
export function toPathInfo(j: NixPathInfoJson): PathInfo {
  const info: PathInfo = {
    storePath: j.path,
    narHash: toNix32Hash(parseHash(j.narHash)),
    narSize: j.narSize,
    references: [...j.references].sort(),
    sigs: j.signatures ?? [],
  };
  if (j.deriver) info.deriver = j.deriver;
  if (j.ca) info.ca = j.ca;
  return info;
}
