// Tailnets have no multicast, so mDNS finds nothing there: instead we ask the local tailscaled
// for its peer list (`tailscale status --json`) and dial every online peer at our mesh port.
// Non-fleet devices (phones, printers) just refuse the connection, or the gater refuses them.
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { isIP } from "node:net";
import { multiaddr, type Multiaddr } from "@multiformats/multiaddr";

export interface TailscalePeer {
  hostName: string;
  /** Tailscale IPs (IPv4 first, as tailscaled lists them), each a valid IP literal. */
  ips: string[];
  online: boolean;
}

export const DEFAULT_TAILSCALE_COMMAND = ["tailscale", "status", "--json"] as const;

const isObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * The peers in a `tailscale status --json` answer (not "Self": dialing ourselves is pointless).
 * Strict about types: an entry without a string HostName, an array of TailscaleIPs or a boolean
 * Online is skipped, and so is any IP that is not an IP literal. A backend that is not running
 * reaches nobody, so it yields no peers.
 */
export function parseTailscaleStatus(json: unknown): TailscalePeer[] {
  if (!isObject(json)) return [];
  if (typeof json.BackendState === "string" && json.BackendState !== "Running") return [];
  if (!isObject(json.Peer)) return []; // null when the tailnet has no other nodes
  const out: TailscalePeer[] = [];
  for (const p of Object.values(json.Peer)) {
    if (!isObject(p)) continue;
    const { HostName: hostName, TailscaleIPs: ips, Online: online } = p;
    if (typeof hostName !== "string" || !Array.isArray(ips) || typeof online !== "boolean") continue;
    const valid = ips.filter((ip): ip is string => typeof ip === "string" && isIP(ip) !== 0);
    if (valid.length === 0) continue;
    out.push({ hostName, ips: valid, online });
  }
  return out;
}

/** One dial target per online peer: its Tailscale IPs (IPv4 first) at the mesh port. */
export function tailscaleDialTargets(peers: readonly TailscalePeer[], port: number): { hostName: string; addrs: Multiaddr[] }[] {
  return peers
    .filter((p) => p.online)
    .map((p) => ({
      hostName: p.hostName,
      addrs: [...p.ips]
        .sort((a, b) => isIP(a) - isIP(b))
        .map((ip) => multiaddr(`/${isIP(ip) === 6 ? "ip6" : "ip4"}/${ip}/tcp/${port}`)),
    }));
}

/** Runs the status command (or reads a recorded answer) and parses it. */
export async function readTailscaleStatus(
  opts: { statusCommand?: readonly string[]; statusFile?: string },
  signal?: AbortSignal,
): Promise<TailscalePeer[]> {
  let text: string;
  if (opts.statusFile !== undefined) {
    text = await readFile(opts.statusFile, { encoding: "utf8", signal });
  } else {
    const [cmd, ...args] = opts.statusCommand ?? DEFAULT_TAILSCALE_COMMAND;
    if (cmd === undefined) throw new Error("empty Tailscale status command");
    text = await new Promise<string>((resolve, reject) => {
      execFile(cmd, args, { timeout: 10_000, maxBuffer: 16 * 1024 * 1024, signal }, (err, stdout) =>
        err ? reject(err) : resolve(stdout),
      );
    });
  }
  return parseTailscaleStatus(JSON.parse(text) as unknown);
}
