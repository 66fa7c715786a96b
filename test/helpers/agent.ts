// Runs the real `fleetcache agent` CLI as a child process for tests, on a free port.
import "./nix-cache.js";
import { execFile, spawn, type ChildProcess } from "node:child_process";
import { createServer, type AddressInfo } from "node:net";
import { promisify } from "node:util";
import { fileURLToPath } from "node:url";

const execFileP = promisify(execFile);

export const CLI = fileURLToPath(new URL("../../agent/cli.js", import.meta.url));

/**
 * The node flags the agent ships with: nix/package.nix's wrapper puts them in NODE_OPTIONS and
 * package.json's start script on node's command line (test/nix-packaging.test.ts checks that all
 * three agree). The young generation capped at 2 x 16 MiB: V8 would otherwise grow it to 2 x 64
 * MiB under a steady allocation rate and keep it (FAULTS.md, soak). Tests and fault scenarios
 * run the agent with them, as shipped.
 */
export const AGENT_NODE_FLAGS = ["--max-semi-space-size=16"];

export interface AgentProcess {
  url: string;
  port: number;
  child: ChildProcess;
  /** Everything the agent logged so far (JSON lines on stderr). */
  logs(): string;
  /** What it printed on stdout: kept only when FLEETCACHE_TEST_NODE_ARGS has --trace-gc (V8's lines), else "". */
  stdout(): string;
  stop(): Promise<void>;
}

/**
 * Starts `fleetcache agent` with `args`. Unless the args say otherwise, the mesh is off and mDNS
 * too (multicast would leave the machine from the root namespace): single-host tests need neither.
 */
export async function startAgentProcess(args: string[], env: NodeJS.ProcessEnv = {}, wrap: string[] = []): Promise<AgentProcess> {
  const defaults = [
    ...(args.includes("--listen") ? [] : ["--listen", "127.0.0.1:0"]),
    ...(args.includes("--p2p-listen") ? [] : ["--p2p-listen", "off"]),
    ...(args.includes("--mdns") ? [] : ["--no-mdns"]),
  ];
  // FLEETCACHE_TEST_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" profiles the agents of a test;
  // it comes after the shipped flags, so "--max-semi-space-size=0" runs with V8's default.
  const nodeArgs = [...AGENT_NODE_FLAGS, ...(process.env.FLEETCACHE_TEST_NODE_ARGS ?? "").split(" ").filter(Boolean)];
  const [cmd, ...pre] = [...wrap, process.execPath, ...nodeArgs];
  const child = spawn(cmd!, [...pre, CLI, "agent", ...defaults, ...args], {
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, FLEETCACHE_LOG_LEVEL: "debug", ...env },
  });
  let stderr = "";
  let stdout = "";
  if (nodeArgs.includes("--trace-gc")) child.stdout!.on("data", (d: Buffer) => (stdout += d.toString()));
  else child.stdout!.resume();
  const port = await new Promise<number>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`agent did not start in 20 s:\n${stderr}`)), 20_000);
    child.stderr!.on("data", (d: Buffer) => {
      stderr += d.toString();
      const m = /"listen":"[^"]*:(\d+)"/.exec(stderr);
      if (m) {
        clearTimeout(timer);
        resolve(Number(m[1]));
      }
    });
    child.on("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`agent exited with ${code} before listening:\n${stderr}`));
    });
  });
  return {
    url: `http://127.0.0.1:${port}`,
    port,
    child,
    logs: () => stderr,
    stdout: () => stdout,
    stop: () =>
      new Promise<void>((resolve) => {
        if (child.exitCode !== null) return resolve();
        child.once("exit", () => resolve());
        child.kill("SIGTERM");
      }),
  };
}

export interface CliRun {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the fleetcache CLI. None of the test runner's own FLEETCACHE_* or NIX_CONFIG leaks in. */
export async function runCli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<CliRun> {
  const base = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("FLEETCACHE_") && k !== "NIX_CONFIG"));
  try {
    const { stdout, stderr } = await execFileP(process.execPath, [CLI, ...args], { env: { ...base, ...env } });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as CliRun;
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
}

/** Writes a new secret key with `fleetcache keygen` and returns its public key. */
export async function keygen(name: string, out: string): Promise<string> {
  const r = await runCli(["keygen", name, "--out", out]);
  if (r.code !== 0) throw new Error(`keygen ${name}: ${r.stderr}`);
  return r.stdout.trim();
}

/** A TCP port free on 127.0.0.1 right now (for mesh listeners, which need a known port). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = createServer();
    srv.once("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}
