// Real Nix for tests: chroot stores, paths added to them, and the reference tools.
// When Nix is missing, tests skip locally but fail under CI=true (CI must prove the real thing).
import "./nix-cache.js";
import assert from "node:assert/strict";
import { execFile, spawn } from "node:child_process";
import { isUtf8 } from "node:buffer";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import type { TestContext } from "node:test";
import { parseHash, toNix32Hash } from "../../protocol/hash.js";
import type { PathInfo } from "../../protocol/path-info.js";

const execFileP = promisify(execFile);

export const NIX_FLAGS = ["--extra-experimental-features", "nix-command"];
/** Nix refusing a path without a signature by a trusted key (2.8: "lacks a valid signature"; 2.26: "lacks a signature by a trusted key"). */
export const UNSIGNED_REFUSED = /lacks a valid signature|lacks a signature by a trusted key/;
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
  return parsePathInfoJson(await nix(["path-info", "--store", root, "--json", ...(recursive ? ["-r"] : []), ...paths]));
}

/**
 * `nix path-info --json` output of any Nix we test against, as Nix 2.8 writes it: an array of
 * objects with a `path` and only the fields that are set. Nix 2.19 and later write an object
 * keyed by path, with `null` for a missing deriver or CA and `[]` for no signatures.
 */
export function parsePathInfoJson(text: string): NixPathInfoJson[] {
  const parsed = JSON.parse(text) as NixPathInfoJson[] | Record<string, Omit<NixPathInfoJson, "path"> | null>;
  const list = Array.isArray(parsed)
    ? parsed
    : Object.entries(parsed).map(([path, info]) => {
        if (!info) throw new Error(`nix path-info: ${path} is not valid`);
        return { path, ...info } as NixPathInfoJson;
      });
  return list.map((info) => {
    const out = Object.fromEntries(Object.entries(info).filter(([, v]) => v !== null)) as unknown as NixPathInfoJson;
    if (out.signatures?.length === 0) delete out.signatures;
    return out;
  });
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

/** The NAR of `storePath` in the store at `root`, as `nix store dump-path` writes it (Nix's bytes, the judge's). */
export async function dumpNar(root: string, storePath: string): Promise<Buffer> {
  const s = dumpPath(root, storePath);
  const parts: Buffer[] = [];
  for await (const c of s) parts.push(c as Buffer);
  await s.done;
  return Buffer.concat(parts);
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

/**
 * The `.ls` listing Nix writes for a path (`nix copy` to a file:// cache with write-nar-listing),
 * or why Nix would not write one. Nix 2.8 writes any path. Nix 2.26 refuses names or symlink
 * targets that are not valid UTF-8 (its JSON library throws "invalid UTF-8 byte") and directories
 * nested deeper than about 70 ("stack overflow": it recurses on a small coroutine stack).
 */
export async function nixListing(root: string, storePath: string, cacheDir: string): Promise<Buffer | "not UTF-8" | "too deep"> {
  try {
    await nix(["copy", "--from", root, "--to", `file://${cacheDir}?compression=none&write-nar-listing=true`, storePath]);
  } catch (e) {
    const message = (e as Error).message;
    if (/invalid UTF-8 byte/.test(message)) return "not UTF-8";
    if (/stack overflow/.test(message)) return "too deep";
    throw e;
  }
  return readFileSync(join(cacheDir, `${storePath.slice(11, 43)}.ls`));
}

/** Why Nix 2.26 cannot write this listing of ours (see nixListing), if it has a reason to refuse. */
export function listingRefusal(ours: Buffer): "not UTF-8" | "too deep" | undefined {
  if (!isUtf8(ours)) return "not UTF-8";
  type Node = { entries?: Record<string, Node> };
  const depth = (n: Node): number => 1 + Math.max(0, ...Object.values(n.entries ?? {}).map(depth));
  return depth((JSON.parse(ours.toString("latin1")) as { root: Node }).root) > 60 ? "too deep" : undefined;
}

/**
 * Asserts that our listing is Nix's: the same JSON value (read as latin1, so that names which are
 * not UTF-8 compare too), and the same bytes when Nix orders the keys as Nix 2.8 and the agent
 * do ("version" first, "type" first); Nix 2.26 writes them in alphabetical order.
 */
export function assertSameListing(ours: Buffer, theirs: Buffer, message: string): void {
  assert.deepEqual(JSON.parse(ours.toString("latin1")), JSON.parse(theirs.toString("latin1")), message);
  if (theirs.toString("latin1").startsWith('{"version":1,')) assert.ok(ours.equals(theirs), `${message}: bytes differ from Nix's`);
}
