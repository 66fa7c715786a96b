// The one parser for the addresses the agent is given: its HTTP listen address, its mesh listen
// address and the peers to dial. The configuration check and the mesh both use it, so an address
// that passes `--check-config` is one the mesh accepts at start.
import { isIP } from "node:net";
import { multiaddr, type Multiaddr } from "@multiformats/multiaddr";

export class AddressError extends Error {}

export interface HostPort {
  /** An IP address (IPv6 without brackets) or a DNS name. */
  host: string;
  port: number;
  kind: "ip4" | "ip6" | "dns";
}

const FORMS = "IPv4:PORT, [IPv6]:PORT or HOSTNAME:PORT";
// RFC 1123 labels, dot-separated, an optional final dot.
const HOSTNAME = /^(?=.{1,254}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$/;

/** "IPv4:PORT", "[IPv6]:PORT" or "hostname:PORT" (port 0-65535). */
export function parseHostPort(s: string): HostPort {
  const m = /^(?:\[([^\]]*)\]|([^:[\]]*)):(\d{1,5})$/.exec(s);
  const port = Number(m?.[3]);
  if (!m || port > 65535) throw new AddressError(`expected ADDR:PORT (${FORMS}), got ${JSON.stringify(s)}`);
  if (m[1] !== undefined) {
    if (isIP(m[1]) !== 6) throw new AddressError(`"${m[1]}" in brackets is not an IPv6 address`);
    return { host: m[1], port, kind: "ip6" };
  }
  const host = m[2]!;
  if (isIP(host) === 4) return { host, port, kind: "ip4" };
  // All digits and dots but not an IPv4 address (300.1.2.3): a typo, not a name to look up.
  if (/^[\d.]+$/.test(host) || !HOSTNAME.test(host)) throw new AddressError(`"${host}" is not an IP address or a host name (${FORMS})`);
  return { host, port, kind: "dns" };
}

/**
 * The mesh's listen address: "IP:PORT" or a TCP multiaddr (/ip4/.../tcp/N, /ip6/.../tcp/N), the
 * only transport the mesh has. Host names are refused: libp2p listens on addresses, not names.
 */
export function meshListenAddr(s: string): Multiaddr {
  if (s.startsWith("/")) {
    let ma: Multiaddr;
    try {
      ma = multiaddr(s);
    } catch (e) {
      throw new AddressError(`${JSON.stringify(s)} is not a TCP multiaddr (/ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT): ${(e as Error).message}`);
    }
    const [ip, tcp, ...rest] = ma.getComponents();
    if (!ip || (ip.name !== "ip4" && ip.name !== "ip6") || tcp?.name !== "tcp" || rest.length > 0) {
      throw new AddressError(`${JSON.stringify(s)} is not a TCP multiaddr (/ip4/ADDR/tcp/PORT or /ip6/ADDR/tcp/PORT): the mesh listens on TCP only`);
    }
    return ma;
  }
  const a = parseHostPort(s);
  if (a.kind === "dns") {
    throw new AddressError(`"${a.host}" is not an IP address: the mesh listens on an IP address (0.0.0.0:PORT for every IPv4 interface, [::]:PORT for IPv6)`);
  }
  return multiaddr(`/${a.kind}/${a.host}/tcp/${a.port}`);
}

/** The TCP port of a mesh listen address. */
export function meshListenPort(s: string): number {
  return Number(meshListenAddr(s).getComponents().find((c) => c.name === "tcp")!.value);
}

/**
 * The bulk port's address (agent/mesh/bulk-listener.ts): the mesh's IP and the next port (37517
 * beside 37516); any free port when the mesh's is 0; none past 65535.
 */
/** The direct port (LAN-direct NARs, direct-listener.ts): the mesh address's IP, the mesh port + 2 (any free port for mesh port 0). */
export function directListenAddr(s: string): { host: string; port: number } | undefined {
  const [ip, tcp] = meshListenAddr(s).getComponents();
  const port = Number(tcp!.value);
  if (port >= 65534) return undefined;
  return { host: ip!.value!, port: port === 0 ? 0 : port + 2 };
}

export function bulkListenAddr(s: string): { host: string; port: number } | undefined {
  const [ip, tcp] = meshListenAddr(s).getComponents();
  const port = Number(tcp!.value);
  if (port === 65535) return undefined;
  return { host: ip!.value!, port: port === 0 ? 0 : port + 1 };
}

/** A peer to dial: "IPv4:PORT", "[IPv6]:PORT", "hostname:PORT" (resolved when dialled) or a multiaddr. */
export function peerAddr(s: string): Multiaddr {
  if (s.startsWith("/")) {
    try {
      return multiaddr(s);
    } catch (e) {
      throw new AddressError(`${JSON.stringify(s)} is not a multiaddr: ${(e as Error).message}`);
    }
  }
  const a = parseHostPort(s);
  if (a.port === 0) throw new AddressError(`${JSON.stringify(s)}: port 0 cannot be dialled`);
  return multiaddr(`/${a.kind}/${a.host}/tcp/${a.port}`);
}
