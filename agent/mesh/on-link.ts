// Whether a peer's address is on one of this host's own networks: inside the prefix of an address
// on one of its interfaces, so reached without a router, as hosts on one LAN are. The bulk path
// (bulk-client.ts) is for such peers only. Over a routed link (between sites, a tailnet) a bulk
// connection per NAR costs two round trips and a TCP slow start that the warm mesh connection
// does not pay: over 40 ms each way at 100 Mbit/s a closure copied 15-20 % slower with it
// (BENCHMARKS.md, "The bulk path over a WAN"). Ping RTTs could not tell the two apart: they
// include both agents' event loops and ran over 20 ms between namespaces under CI's load.
import { BlockList, isIP } from "node:net";
import { networkInterfaces, type NetworkInterfaceInfo } from "node:os";

export type Interfaces = NodeJS.Dict<NetworkInterfaceInfo[]>;

/**
 * How long this host's networks, once read, are used before they are read again. Reading them
 * (getifaddrs, a netlink round trip) and building the list cost about 200 µs, on every peer NAR;
 * an interface that comes or goes changes the verdicts within this long (until then a NAR may be
 * relayed that could go on the bulk or direct port, or the other way round, which still works).
 */
export const LOCAL_NETS_TTL_MS = 5_000;

/** This host's networks, read at most once per `ttlMs`. */
export class LocalNetworks {
  #nets: BlockList | undefined;
  #readAt = 0;
  constructor(
    readonly read: () => Interfaces = networkInterfaces,
    readonly ttlMs = LOCAL_NETS_TTL_MS,
    readonly now: () => number = performance.now.bind(performance),
  ) {}

  has(ip: string): boolean {
    const now = this.now();
    if (!this.#nets || now - this.#readAt >= this.ttlMs) {
      this.#nets = networks(this.read());
      this.#readAt = now;
    }
    return inside(ip, this.#nets);
  }
}

const thisHost = new LocalNetworks();

/** Whether `ip` is on one of `interfaces`' networks (this host's by default, as read within LOCAL_NETS_TTL_MS). */
export function onLink(ip: string, interfaces?: Interfaces): boolean {
  return interfaces ? inside(ip, networks(interfaces)) : thisHost.has(ip);
}

function inside(ip: string, nets: BlockList): boolean {
  const family = isIP(ip);
  if (family === 0) return false;
  // IPv6 link-local: reachable only with a zone (fe80::1%eth0), which a mesh address does not carry.
  if (family === 6 && /^fe[89ab]/i.test(ip)) return false;
  return nets.check(ip, family === 4 ? "ipv4" : "ipv6");
}

function networks(interfaces: Interfaces): BlockList {
  const nets = new BlockList();
  for (const addrs of Object.values(interfaces)) {
    for (const a of addrs ?? []) {
      if (!a.cidr) continue;
      const slash = a.cidr.lastIndexOf("/");
      // A /32 or /128 (a tailnet's addresses) holds only the host itself: its peers are routed.
      nets.addSubnet(a.cidr.slice(0, slash), Number(a.cidr.slice(slash + 1)), a.family === "IPv4" ? "ipv4" : "ipv6");
    }
  }
  return nets;
}
