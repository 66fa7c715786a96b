// Peer addresses as the mesh keeps them: dialable TCP multiaddrs without /p2p/, as strings.
import type { Multiaddr } from "@multiformats/multiaddr";
import { isLoopback } from "./peer-exchange.js";

/** The multiaddr as a dialable TCP address without /p2p/, or undefined (other peer, other transport, unspecified host). */
export function tcpAddress(ma: Multiaddr, peerId: string): string | undefined {
  const parts = ma.getComponents();
  const p2p = parts.filter((c) => c.name === "p2p");
  if (p2p.some((c) => c.value !== peerId) && peerId !== "") return undefined;
  const rest = parts.filter((c) => c.name !== "p2p");
  const [host, tcp] = rest;
  if (rest.length !== 2 || !host || tcp?.name !== "tcp") return undefined;
  if (!["ip4", "ip6", "dns", "dns4", "dns6"].includes(host.name)) return undefined;
  if (host.value === "0.0.0.0" || host.value === "::" || tcp.value === "0") return undefined;
  return `/${host.name}/${host.value}/tcp/${tcp.value}`;
}

/** The peer ID a multiaddr ends in, if any. */
export function peerIdIn(ma: Multiaddr): string | undefined {
  return ma.getComponents().findLast((c) => c.name === "p2p")?.value;
}

/** Loopback addresses last: another host dialing them would reach itself. */
export function dialableFirst(addrs: readonly string[]): string[] {
  return [...addrs.filter((a) => !isLoopback(a)), ...addrs.filter(isLoopback)];
}
