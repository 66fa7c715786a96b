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

function makeHost(ns: string, ip: string): NetHost {
  return {
    ns,
    ip,
    exec: (cmd, args) => run("ip", ["netns", "exec", ns, cmd, ...args]),
    spawn: (cmd, args, opts = {}) => spawn("ip", ["netns", "exec", ns, cmd, ...args], opts),
  };
}
