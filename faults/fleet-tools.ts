// Fleets for fault scenarios: hosts in network namespaces (test/helpers), a link proxy between
// two sites, store contents, and downloads checked against the narinfo's NarHash.
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { fileURLToPath } from "node:url";
import type { ChildProcess } from "node:child_process";
import { createFleet, eventually, P2P_PORT, type Fleet, type FleetHost } from "../test/helpers/fleet.js";
import { createSites, type NetHost } from "../test/helpers/netns.js";
import { addToStore, run } from "../test/helpers/nix.js";
import { parseNarinfo, type Narinfo } from "../protocol/narinfo.js";
import { normalizeHash } from "../protocol/hash.js";
import type { LinkStats } from "./link-proxy.js";

const PROXY_MAIN = fileURLToPath(new URL("./link-proxy-main.js", import.meta.url));

export interface LinkedFleet {
  fleet: Fleet;
  /** On site 0. */
  a: FleetHost;
  /** On site 1: reaches A only through the link proxy, at `aViaLink`. */
  b: FleetHost;
  /** "ip:port" on B's site that leads to A's mesh port through the proxy (and port + 1 to A's bulk port). */
  aViaLink: string;
  proxy: ChildProcess;
  /** The proxy's byte counts so far (both directions, every connection through it). */
  linkStats(): Promise<LinkStats>;
  destroy(): Promise<void>;
}

/** The link between the two sites; `cut` is what the proxy's SIGUSR1 does (link-proxy-main.ts). */
export interface LinkSpec {
  latencyMs: number;
  rate?: string;
  cut?: "freeze" | "refuse";
  /** Whether the link carries the bulk port (mesh port + 1) as well, as a real link does (default true). */
  bulkPort?: boolean;
}

/**
 * Two hosts on two sites; B's only way to A is a link proxy (latency each way, optional rate) in
 * the namespace between them. Agents are not started.
 */
export async function linkedFleet(link: LinkSpec): Promise<LinkedFleet> {
  const sites = await createSites([1, 1]);
  const fleet = await createFleet(["a", "b"], { hosts: [sites.sites[0]![0]!, sites.sites[1]![0]!], destroy: sites.destroy });
  const [a, b] = fleet.hosts as [FleetHost, FleetHost];
  // A routed address, as A's would be from another site: B does not see A as on its LAN.
  const aViaLink = `${sites.link.routedIps[1]}:${P2P_PORT}`;
  let proxy: { child: ChildProcess; lines: AsyncIterator<string> } | undefined;
  try {
    proxy = await startProxy(sites.link, aViaLink, `${a.net.ip}:${P2P_PORT}`, link);
  } catch (e) {
    await fleet.destroy();
    throw e;
  }
  const { child, lines } = proxy;
  return {
    fleet,
    a,
    b,
    aViaLink,
    proxy: child,
    async linkStats() {
      child.kill("SIGHUP");
      const next = await lines.next();
      if (next.done) throw new Error("the link proxy is gone");
      return JSON.parse(next.value) as LinkStats;
    },
    async destroy() {
      child.kill("SIGTERM");
      await fleet.destroy();
    },
  };
}

/** Starts the proxy and waits for its first line (listening); later lines (stats) come from `lines`. */
export async function startProxy(
  on: NetHost,
  listen: string,
  target: string,
  link: LinkSpec,
): Promise<{ child: ChildProcess; lines: AsyncIterator<string> }> {
  // The agents' bulk port (mesh port + 1) crosses the same link, so NAR bodies take the path they
  // would take between sites, not a fallback to the mesh stream because the proxy refused them.
  const port = (hostPort: string) => Number(hostPort.slice(hostPort.lastIndexOf(":") + 1));
  const bulkTarget = `${target.slice(0, target.lastIndexOf(":"))}:${port(target) + 1}`;
  const args = [
    PROXY_MAIN, "--listen", listen, "--target", target, "--latency-ms", String(link.latencyMs),
    ...(link.bulkPort === false ? [] : ["--also", `${port(listen) + 1}=${bulkTarget}`]),
    ...(link.rate ? ["--rate", link.rate] : []), ...(link.cut ? ["--cut", link.cut] : []),
  ];
  const child = on.spawn(process.execPath, args, { stdio: ["ignore", "pipe", "inherit"] });
  const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
  const exited = new Promise<never>((_, reject) => child.once("exit", (code) => reject(new Error(`link proxy exited with ${code}`))));
  exited.catch(() => undefined);
  const first = await Promise.race([lines.next(), exited]);
  if (first.done) throw new Error("link proxy closed its output before listening");
  return { child, lines };
}

/** Adds `size` bytes of incompressible data to the host's store; returns the store path. */
/**
 * Three hosts on one bridge, each with a small path of its own: A and C running, B told of both
 * as static peers and connected to them (the corrupted-holder and range-check set-up).
 */
export async function holdersAroundB(): Promise<{ fleet: Fleet; a: FleetHost; b: FleetHost; c: FleetHost }> {
  const fleet = await createFleet(["a", "b", "c"]);
  const [a, b, c] = fleet.hosts as [FleetHost, FleetHost, FleetHost];
  try {
    await addBlob(a, "a-own", 1024);
    await addBlob(b, "b-own", 1024);
    await addBlob(c, "c-own", 1024);
    await a.start();
    await c.start();
    await b.start(["--peer", `${a.net.ip}:${P2P_PORT}`, "--peer", `${c.net.ip}:${P2P_PORT}`]);
    await eventually("B connected to A and C", async () => (await b.status()).peers.filter((p) => p.connected).length === 2, 60_000);
  } catch (e) {
    await fleet.destroy();
    throw e;
  }
  return { fleet, a, b, c };
}

export async function addBlob(host: FleetHost, name: string, size: number, seed = name): Promise<string> {
  const buf = Buffer.alloc(size);
  let block = createHash("sha512").update(seed).digest();
  for (let i = 0; i < size; i += block.length) {
    block.copy(buf, i, 0, Math.min(block.length, size - i));
    block = createHash("sha512").update(block).digest();
  }
  const file = join(host.dir, name);
  writeFileSync(file, buf);
  return addToStore(host.storeRoot, file);
}

/** Flips one byte of a store path's file on disk, under the agent (its database keeps the old NarHash: bit rot). */
export async function corruptOnDisk(host: FleetHost, storePath: string, at: number): Promise<void> {
  const file = join(host.storeRoot, storePath);
  await run("chmod", ["u+w", file]);
  const buf = readFileSync(file);
  buf[at] = buf[at]! ^ 0xff;
  writeFileSync(file, buf);
}

export const hashPart = (storePath: string) => storePath.slice(11, 43);

/** The narinfo as the host's agent answers it, or undefined for a non-200. */
export async function narinfoVia(host: FleetHost, storePath: string): Promise<Narinfo | undefined> {
  const r = await host.http(`/${hashPart(storePath)}.narinfo`);
  return r.status === 200 ? parseNarinfo(r.body) : undefined;
}

export interface Download {
  ok: boolean;
  ms: number;
  bytes: number;
  /** curl's error, or the hash mismatch. */
  error?: string;
}

/** GETs the NAR through the host's agent with curl (optionally rate-limited); checks size and NarHash. */
export async function downloadNar(host: FleetHost, info: Narinfo, limitRate?: string): Promise<Download> {
  if (info.compression !== "none") throw new Error(`expected an uncompressed NAR, got ${info.compression}`);
  const t0 = performance.now();
  const curl = host.net.spawn("curl", ["-sS", "--fail", ...(limitRate ? ["--limit-rate", limitRate] : []), "-o", "-", `${host.agent!.url}/${info.url}`], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  const hash = createHash("sha256");
  let bytes = 0;
  let stderr = "";
  curl.stdout!.on("data", (d: Buffer) => {
    hash.update(d);
    bytes += d.length;
  });
  curl.stderr!.on("data", (d: Buffer) => (stderr += d.toString()));
  const code = await new Promise<number | null>((r) => curl.once("close", (c) => r(c)));
  const ms = performance.now() - t0;
  if (code !== 0) return { ok: false, ms, bytes, error: stderr.trim() || `curl exited with ${code}` };
  const got = normalizeHash(`sha256:${hash.digest("hex")}`);
  if (bytes !== info.narSize || got !== normalizeHash(info.narHash)) {
    return { ok: false, ms, bytes, error: `got ${bytes} bytes with ${got}, narinfo says ${info.narSize} bytes with ${info.narHash}` };
  }
  return { ok: true, ms, bytes };
}

/** Time of one narinfo GET on the host's own agent, in ms, as curl measures it. */
export async function narinfoLatencyMs(host: FleetHost, storePath: string): Promise<{ status: number; ms: number }> {
  const out = await host.exec("curl", ["-sS", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", `${host.agent!.url}/${hashPart(storePath)}.narinfo`]);
  const [status, secs] = out.trim().split(" ");
  return { status: Number(status), ms: Number(secs) * 1000 };
}
