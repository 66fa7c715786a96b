// A simulated fleet: hosts in their own network namespaces, each with a chroot store, a key of
// its own and a real agent process, so tests see what crosses a network.
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { startAgentProcess, CLI, type AgentProcess } from "./agent.js";
import { createNetwork, type NetHost, type TestNetwork } from "./netns.js";
import { NIX_FLAGS, run, tempDir } from "./nix.js";

export const P2P_PORT = 37516;

export interface FleetHost {
  name: string;
  net: NetHost;
  dir: string;
  storeRoot: string;
  keyFile: string;
  publicKey: string;
  agent?: AgentProcess;
  /** Starts this host's agent in its namespace; trusts `trusted` keys (default: the whole fleet); `env` adds to its environment. */
  start(extra?: string[], trusted?: string[], env?: NodeJS.ProcessEnv): Promise<AgentProcess>;
  stop(): Promise<void>;
  /** Kills the agent with SIGKILL (a crash, the OOM killer, a power cut) and waits until it is gone. */
  crash(): Promise<void>;
  /** Runs a command inside the host's namespace. */
  exec(cmd: string, args: string[]): Promise<string>;
  /** `nix <args>` in the host's namespace. */
  nix(args: string[]): Promise<string>;
  /** GET on the host's own agent (from inside its namespace); body as text. */
  http(path: string, curlArgs?: string[]): Promise<{ status: number; body: string }>;
  /** The agent's status document. */
  status(): Promise<AgentStatus>;
}

export interface AgentStatus {
  self: { peerId: string; publicKey: string; paths: number };
  peers: { peerId: string; name: string; publicKey: string; connected: boolean; pathCount?: number; addresses: string[] }[];
  counters: Record<string, number>;
}

export interface Fleet {
  hosts: FleetHost[];
  network: TestNetwork;
  trustedKeys: string[];
  destroy(): Promise<void>;
}

/** One host per name, on one bridge, or on the given hosts (their network is destroyed with the fleet). */
export async function createFleet(names: string[], on?: { hosts: NetHost[]; destroy(): Promise<void> }): Promise<Fleet> {
  const network: TestNetwork = on ?? (await createNetwork(names.length));
  const tmp = tempDir("fleetcache-fleet-");
  const hosts: FleetHost[] = [];
  const fleet: Fleet = {
    hosts,
    network,
    trustedKeys: [],
    async destroy() {
      await Promise.allSettled(hosts.map((h) => h.stop()));
      await network.destroy();
      tmp.cleanup();
    },
  };
  try {
    for (const [i, name] of names.entries()) {
      const dir = join(tmp.dir, name);
      const keyFile = join(dir, "key.sec");
      const publicKey = (await run(process.execPath, [CLI, "keygen", `${name}-1`, "--out", keyFile])).trim();
      fleet.trustedKeys.push(publicKey);
      hosts.push(makeHost(name, network.hosts[i]!, dir, keyFile, publicKey, fleet));
    }
  } catch (e) {
    await fleet.destroy();
    throw e;
  }
  return fleet;
}

function makeHost(name: string, net: NetHost, dir: string, keyFile: string, publicKey: string, fleet: Fleet): FleetHost {
  const host: FleetHost = {
    name,
    net,
    dir,
    storeRoot: join(dir, "store"),
    keyFile,
    publicKey,
    async start(extra = [], trusted = fleet.trustedKeys, env = {}) {
      await host.stop();
      host.agent = await startAgentProcess(
        [
          "--store-root", host.storeRoot, "--sign-key", keyFile, "--state-dir", join(dir, "state"),
          "--p2p-listen", `0.0.0.0:${P2P_PORT}`,
          ...trusted.flatMap((k) => ["--trusted-key", k]),
          ...extra,
        ],
        env,
        ["ip", "netns", "exec", net.ns],
      );
      return host.agent;
    },
    async stop() {
      await host.agent?.stop();
      host.agent = undefined;
    },
    async crash() {
      const child = host.agent?.child;
      host.agent = undefined;
      if (!child || child.exitCode !== null || child.signalCode !== null) return;
      const gone = new Promise((r) => child.once("exit", r));
      child.kill("SIGKILL");
      await gone;
    },
    exec: (cmd, args) => net.exec(cmd, args),
    nix: (args) => net.exec("nix", [...NIX_FLAGS, ...args]),
    async http(path, curlArgs = []) {
      if (!host.agent) throw new Error(`${name}: agent not running`);
      const out = await net.exec("curl", ["-sS", "-o", "-", "-w", "\n%{http_code}", ...curlArgs, `${host.agent.url}${path}`]);
      const cut = out.lastIndexOf("\n");
      return { status: Number(out.slice(cut + 1)), body: out.slice(0, cut) };
    },
    async status() {
      const { status, body } = await host.http("/api/v1/status");
      if (status !== 200) throw new Error(`${name}: status answered ${status}`);
      return JSON.parse(body) as AgentStatus;
    },
  };
  return host;
}

/** Changes one byte of a store file on disk under the host's agent; its database keeps the old NarHash (a lying holder looks the same). */
export async function corruptOnDisk(host: FleetHost, file: string, at: number): Promise<void> {
  await run("chmod", ["u+w", join(host.storeRoot, file)]);
  const buf = readFileSync(join(host.storeRoot, file));
  buf[at] = buf[at]! ^ 0xff;
  writeFileSync(join(host.storeRoot, file), buf);
}

/** Waits until `check` returns a truthy value (polling), or fails after `ms`. */
/**
 * Waits until `viewer` holds `holder`'s whole current summary: the holder's agent counts every
 * path Nix has in its store (its watcher polls, so it lags an addition by up to a poll) and the
 * viewer has that many from it. Comparing with the agent's own count alone could pass before
 * the holder has seen a path just added. Counts only: a deletion and an addition together look
 * like no change, so tests must not delete on the holder right before adding.
 */
export async function announcedTo(viewer: FleetHost, holder: FleetHost): Promise<void> {
  const inStore = (await run("nix", [...NIX_FLAGS, "path-info", "--store", holder.storeRoot, "--all"])).trim().split("\n").filter(Boolean).length;
  await eventually(`${viewer.name} has ${holder.name}'s whole summary (${inStore} paths)`, async () => {
    const paths = (await holder.status()).self.paths;
    const p = (await viewer.status()).peers.find((x) => x.publicKey === holder.publicKey);
    return paths === inStore && p?.connected && p.pathCount === inStore;
  });
}

export async function eventually<T>(what: string, check: () => Promise<T | undefined | false>, ms = 20_000): Promise<T> {
  const until = Date.now() + ms;
  let last: unknown;
  for (;;) {
    try {
      const v = await check();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ""}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

