// Child processes and temporary files for the benchmark: everything started or created here is
// registered, so that cleanup() can stop and remove it on success, failure or Ctrl-C.
import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { chmodSync, lstatSync, readdirSync, rmSync } from "node:fs";
import { join } from "node:path";

/** Every external command the benchmark ran, for the report (temp paths shortened to $TMP). */
export const commandLog: string[] = [];
let tmpRoot: string | undefined;
let repoRoot: string | undefined;

export function setTmpRoot(dir: string): void {
  tmpRoot = dir;
}

/** Paths under the repository are shown relative to it (commands are run from there). */
export function setRepoRoot(dir: string): void {
  repoRoot = dir;
}

function shellQuote(arg: string): string {
  return /^[A-Za-z0-9_\-./:=@,+%]+$/.test(arg) ? arg : `'${arg.replace(/'/g, `'\\''`)}'`;
}

export function displayCommand(cmd: string, args: string[]): string {
  const shown = cmd === process.execPath ? "node" : cmd;
  let text = [shown, ...args].map(shellQuote).join(" ");
  if (tmpRoot) text = text.split(tmpRoot).join("$TMP");
  if (repoRoot) text = text.split(`${repoRoot}/`).join("");
  return text.replace(/127\.0\.0\.1:\d+/g, "127.0.0.1:$PORT");
}

/** Records a command in the log unless an equal one is already there (loops log once). */
export function logCommand(cmd: string, args: string[]): void {
  const text = displayCommand(cmd, args);
  if (!commandLog.includes(text)) commandLog.push(text);
}

const children = new Set<ChildProcess>();
const tempDirs: string[] = [];
const exitHooks: Array<() => Promise<void> | void> = [];

export function registerTempDir(dir: string): void {
  tempDirs.push(dir);
}

/** Runs before children are killed (e.g. to stop a server gracefully). */
export function onCleanup(hook: () => Promise<void> | void): void {
  exitHooks.push(hook);
}

/** Spawns a tracked child; it is killed by cleanup() if still running. */
export function spawnTracked(cmd: string, args: string[], opts: SpawnOptions & { log?: boolean } = {}): ChildProcess {
  if (opts.log !== false) logCommand(cmd, args);
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], ...opts });
  children.add(child);
  child.on("exit", () => children.delete(child));
  child.on("error", () => children.delete(child));
  return child;
}

export interface RunResult {
  stdout: string;
  stderr: string;
  code: number | null;
}

/** Runs a command to completion, capturing output; throws (with stderr) unless it exits 0. */
export async function run(
  cmd: string,
  args: string[],
  opts: { allowFail?: boolean; log?: boolean; timeoutMs?: number; env?: NodeJS.ProcessEnv } = {},
): Promise<RunResult> {
  const child = spawnTracked(cmd, args, { log: opts.log, env: opts.env ? { ...process.env, ...opts.env } : process.env });
  let stdout = "";
  let stderr = "";
  child.stdout?.setEncoding("utf8").on("data", (d: string) => (stdout += d));
  child.stderr?.setEncoding("utf8").on("data", (d: string) => {
    stderr += d;
    if (stderr.length > 1 << 20) stderr = stderr.slice(-(1 << 19));
  });
  let timer: NodeJS.Timeout | undefined;
  if (opts.timeoutMs) timer = setTimeout(() => child.kill("SIGKILL"), opts.timeoutMs);
  const code = await new Promise<number | null>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (c) => resolve(c));
  });
  if (timer) clearTimeout(timer);
  if (code !== 0 && !opts.allowFail) {
    throw new Error(`${displayCommand(cmd, args)} exited ${code}: ${stderr.trim().slice(-2000)}`);
  }
  return { stdout, stderr, code };
}

/** Waits for a child to exit, killing it with SIGKILL after `graceMs`. */
export async function stopChild(child: ChildProcess, signal: NodeJS.Signals = "SIGTERM", graceMs = 5000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill(signal);
  const timer = setTimeout(() => child.kill("SIGKILL"), graceMs);
  await exited;
  clearTimeout(timer);
}

/** Removes a directory tree, making read-only store directories writable first if needed. */
export function removeTree(dir: string): void {
  try {
    rmSync(dir, { recursive: true, force: true });
    return;
  } catch {
    // Store paths are read-only (0555/0444); without root we must chmod before removing.
  }
  const makeWritable = (p: string): void => {
    let st;
    try {
      st = lstatSync(p);
    } catch {
      return;
    }
    if (!st.isDirectory()) return;
    try {
      chmodSync(p, 0o755);
    } catch {
      /* best effort */
    }
    for (const name of readdirSync(p)) makeWritable(join(p, name));
  };
  makeWritable(dir);
  rmSync(dir, { recursive: true, force: true });
}

let cleaning: Promise<void> | undefined;

/** Stops every server and child, then removes temporary directories. Safe to call twice. */
export function cleanup(opts: { keepTemp?: boolean } = {}): Promise<void> {
  cleaning ??= (async () => {
    for (const hook of exitHooks.splice(0).reverse()) {
      try {
        await hook();
      } catch (e) {
        console.error(`cleanup: ${(e as Error).message}`);
      }
    }
    await Promise.all([...children].map((c) => stopChild(c, "SIGTERM", 3000).catch(() => undefined)));
    for (const dir of tempDirs.splice(0)) {
      if (opts.keepTemp) {
        console.error(`keeping ${dir}`);
        continue;
      }
      try {
        removeTree(dir);
      } catch (e) {
        console.error(`cleanup: could not remove ${dir}: ${(e as Error).message}`);
      }
    }
  })();
  return cleaning;
}

let signalled = false;

/** True once Ctrl-C (or SIGTERM/SIGHUP) has started the cleanup: failures after it are expected. */
export function interrupted(): boolean {
  return signalled;
}

/** Makes Ctrl-C / SIGTERM / SIGHUP and crashes clean up before the process exits. */
export function installSignalHandlers(opts: { keepTemp?: boolean }): void {
  for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
    process.on(sig, () => {
      if (signalled) {
        console.error(`\n${sig} again: exiting without finishing cleanup`);
        process.exit(130);
      }
      signalled = true;
      console.error(`\n${sig}: stopping servers and removing temporary files...`);
      void cleanup(opts).finally(() => process.exit(130));
    });
  }
}
