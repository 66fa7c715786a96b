// Simulated hosts for multi-host tests: one network namespace per host, each with a veth pair
// into a bridge that exists only for the test. Traffic stays among these namespaces; the bridge
// has no address in the root namespace, so nothing reaches the machine's real network.
import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { randomBytes } from "node:crypto";
import { run } from "./nix.js";

export interface NetHost {
  /** Namespace name. */
  ns: string;
  /** The host's address on the test bridge. */
  ip: string;
  /** Runs a command inside the namespace and returns its stdout. */
  exec(cmd: string, args: string[]): Promise<string>;
  /** Starts a long-running command inside the namespace. */
  spawn(cmd: string, args: string[], opts?: SpawnOptions): ChildProcess;
}

export interface TestNetwork {
  hosts: NetHost[];
  destroy(): Promise<void>;
}

/** True when this process may create namespaces (root with iproute2). */
export async function canUseNetns(): Promise<boolean> {
  if (process.getuid?.() !== 0) return false;
  return run("ip", ["netns", "list"]).then(() => true, () => false);
}

/**
 * Creates `count` hosts on one bridge, addressed 10.231.<subnet>.<1..count>/24, with loopback
 * up and multicast flowing (mDNS needs it: snooping is off so the bridge floods it).
 */
export async function createNetwork(count: number, subnet = 1 + (randomBytes(1)[0]! % 250)): Promise<TestNetwork> {
  const id = randomBytes(3).toString("hex"); // interface names are limited to 15 characters
  const bridge = `fcbr${id}`;
  const hosts: NetHost[] = [];
  const cleanup = async () => {
    for (const h of hosts) await run("ip", ["netns", "del", h.ns]).catch(() => {});
    await run("ip", ["link", "del", bridge]).catch(() => {});
  };
  try {
    await run("ip", ["link", "add", bridge, "type", "bridge", "mcast_snooping", "0"]);
    await run("ip", ["link", "set", bridge, "up"]);
    for (let i = 1; i <= count; i++) {
      const ns = `fc${id}h${i}`;
      const outer = `fc${id}v${i}`;
      const ip = `10.231.${subnet}.${i}`;
      await run("ip", ["netns", "add", ns]);
      hosts.push(makeHost(ns, ip));
      await run("ip", ["link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns]);
      await run("ip", ["link", "set", outer, "master", bridge, "up"]);
      await run("ip", ["-n", ns, "addr", "add", `${ip}/24`, "dev", "eth0"]);
      await run("ip", ["-n", ns, "link", "set", "eth0", "up", "multicast", "on"]);
      await run("ip", ["-n", ns, "link", "set", "lo", "up"]);
      // Multicast (mDNS) leaves through eth0 even without a default route.
      await run("ip", ["-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
    }
  } catch (e) {
    await cleanup();
    throw e;
  }
  return { hosts, destroy: cleanup };
}

export interface TestSites {
  /** sites[i] are the hosts on bridge i, addressed 10.231.<subnet i>.<1..n>. */
  sites: NetHost[][];
  /**
   * A namespace on every bridge (at .254 of each subnet, `linkIps[i]` on site i) that routes
   * nothing: sites reach each other only through what runs there, such as a link proxy.
   * `routedIps[i]` is another address of it that site i's hosts reach through a route via
   * `linkIps[i]`, as a host at another site is reached (not on their own subnet).
   */
  link: NetHost & { linkIps: string[]; routedIps: string[] };
  destroy(): Promise<void>;
}

/**
 * Hosts on separate bridges, one per site, joined only by a `link` namespace with IP forwarding
 * off (as in every new namespace), so that a userspace proxy there is the only way between sites.
 */
export async function createSites(counts: number[]): Promise<TestSites> {
  const id = randomBytes(3).toString("hex");
  const first = 1 + (randomBytes(1)[0]! % 200);
  const bridges = counts.map((_, i) => `fcbr${id}s${i}`);
  const linkNs = `fc${id}link`;
  const sites: NetHost[][] = [];
  const linkIps: string[] = [];
  const routedIps: string[] = [];
  const created: string[] = [];
  const cleanup = async () => {
    for (const ns of created) await run("ip", ["netns", "del", ns]).catch(() => {});
    for (const b of bridges) await run("ip", ["link", "del", b]).catch(() => {});
  };
  try {
    await run("ip", ["netns", "add", linkNs]);
    created.push(linkNs);
    await run("ip", ["-n", linkNs, "link", "set", "lo", "up"]);
    for (const [i, count] of counts.entries()) {
      const bridge = bridges[i]!;
      const subnet = first + i;
      await run("ip", ["link", "add", bridge, "type", "bridge", "mcast_snooping", "0"]);
      await run("ip", ["link", "set", bridge, "up"]);
      const hosts: NetHost[] = [];
      for (let h = 1; h <= count; h++) {
        const ns = `fc${id}s${i}h${h}`;
        await run("ip", ["netns", "add", ns]);
        created.push(ns);
        await attach(ns, bridge, `fc${id}s${i}v${h}`, "eth0", `10.231.${subnet}.${h}`);
        hosts.push(makeHost(ns, `10.231.${subnet}.${h}`));
      }
      sites.push(hosts);
      linkIps.push(`10.231.${subnet}.254`);
      await attach(linkNs, bridge, `fc${id}s${i}vl`, `eth${i}`, linkIps[i]!);
      // An address of the link namespace that this site's hosts reach through a route, as a host
      // at another site is reached: not on their subnet (what the agent's bulk path looks at).
      routedIps.push(`10.232.${subnet}.1`);
      await run("ip", ["-n", linkNs, "addr", "add", `${routedIps[i]}/32`, "dev", "lo"]);
      for (const h of hosts) await run("ip", ["-n", h.ns, "route", "add", "10.232.0.0/16", "via", linkIps[i]!]);
    }
  } catch (e) {
    await cleanup();
    throw e;
  }
  return { sites, link: { ...makeHost(linkNs, linkIps[0]!), linkIps, routedIps }, destroy: cleanup };
}

/** A veth from `bridge` into namespace `ns` as interface `inner`, addressed `ip`/24. */
async function attach(ns: string, bridge: string, outer: string, inner: string, ip: string): Promise<void> {
  await run("ip", ["link", "add", outer, "type", "veth", "peer", "name", inner, "netns", ns]);
  await run("ip", ["link", "set", outer, "master", bridge, "up"]);
  await run("ip", ["-n", ns, "addr", "add", `${ip}/24`, "dev", inner]);
  await run("ip", ["-n", ns, "link", "set", inner, "up"]);
  await run("ip", ["-n", ns, "link", "set", "lo", "up"]);
}

function makeHost(ns: string, ip: string): NetHost {
  return {
    ns,
    ip,
    exec: (cmd, args) => run("ip", ["netns", "exec", ns, cmd, ...args]),
    spawn: (cmd, args, opts = {}) => spawn("ip", ["netns", "exec", ns, cmd, ...args], opts),
  };
}

/** A tc rate ("1gbit", "2500mbit", "40mbit", "800kbit") in bytes per second. */
export function rateBytesPerSecond(rate: string): number {
  const m = /^(\d+(?:\.\d+)?)(k|m|g)?bit$/i.exec(rate.trim());
  if (!m) throw new Error(`not a rate in bits per second (e.g. 1gbit, 2500mbit): ${rate}`);
  const scale = { k: 1e3, m: 1e6, g: 1e9 }[(m[2] ?? "").toLowerCase()] ?? 1;
  return (Number(m[1]) * scale) / 8;
}

/** The kernel's timer frequency (CONFIG_HZ) on the machine the tests run on. */
const KERNEL_HZ = 250;

/**
 * Limits a host's link to `rate` in both directions, as a switch port of that speed would: a
 * token bucket (tbf) on eth0's egress, and another on an IFB device that eth0's ingress is
 * redirected to. All of it lives in the host's namespace and goes away with it.
 * The bucket holds a timer tick's worth of bytes (rate / HZ, the usual rule; at least 128 KiB):
 * measured at 1 Gbit/s between two namespaces, 128 KiB to 500 KB reached 117-120 MB/s of a
 * 119.5 MB/s payload maximum, 64 KiB only 57-66. `latency` bounds the queue; with TCP's small
 * queues on the sender it stays nearly empty (no drops in those runs).
 */
export async function shapeLink(host: NetHost, rate: string): Promise<void> {
  const burst = String(Math.max(128 << 10, Math.ceil(rateBytesPerSecond(rate) / KERNEL_HZ)));
  const tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", "20ms"];
  const tc = (...args: string[]) => run("tc", ["-n", host.ns, ...args]);
  await tc("qdisc", "add", "dev", "eth0", ...tbf);
  await run("ip", ["-n", host.ns, "link", "add", "ifb0", "type", "ifb"]);
  await run("ip", ["-n", host.ns, "link", "set", "ifb0", "up"]);
  await tc("qdisc", "add", "dev", "ifb0", ...tbf);
  await tc("qdisc", "add", "dev", "eth0", "handle", "ffff:", "ingress");
  await tc("filter", "add", "dev", "eth0", "parent", "ffff:", "protocol", "all", "u32", "match", "u32", "0", "0", "action", "mirred", "egress", "redirect", "dev", "ifb0");
}

/** What a host's shaping did: bytes sent, drops and overlimits of each tbf (eth0's egress, ifb0's: the host's ingress). */
export async function shapingStats(host: NetHost): Promise<{ dev: string; sentBytes: number; dropped: number; overlimits: number }[]> {
  const out = await run("tc", ["-s", "-n", host.ns, "qdisc", "show"]);
  const stats: { dev: string; sentBytes: number; dropped: number; overlimits: number }[] = [];
  for (const m of out.matchAll(/qdisc tbf \S+ dev (\S+)[^\n]*\n\s*Sent (\d+) bytes \d+ pkt \(dropped (\d+), overlimits (\d+)/g)) {
    stats.push({ dev: m[1]!, sentBytes: Number(m[2]), dropped: Number(m[3]), overlimits: Number(m[4]) });
  }
  return stats;
}
