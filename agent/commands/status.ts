// `fleetcache status`: what the local agent sees — this host, its peers, lookup counters and
// recent errors — from GET /api/v1/status, as a summary or the raw JSON.
import { AgentError, agentJson, agentUrl, DEFAULT_AGENT_URL } from "./agent-client.js";
import { formatAgo, formatBytes, formatDuration } from "./format.js";
import { readStatus, type StatusView } from "./status-doc.js";

export interface StatusOptions {
  agent?: string;
  json?: boolean;
}

/** Exit code: 0 the agent answered, 1 it did not. */
export async function runStatus(opts: StatusOptions, out: NodeJS.WritableStream = process.stdout, err: NodeJS.WritableStream = process.stderr): Promise<number> {
  const url = agentUrl(opts.agent);
  let doc: unknown;
  try {
    doc = await agentJson(url, "/api/v1/status");
  } catch (e) {
    if (!(e instanceof AgentError)) throw e;
    err.write(`fleetcache status: ${e.message}\n${hint(e, url)}\n`);
    return 1;
  }
  out.write(opts.json ? JSON.stringify(doc, null, 2) + "\n" : renderStatus(url, readStatus(doc)));
  return 0;
}

function hint(e: AgentError, url: string): string {
  if (e.status === 403) return "The status API answers only on loopback: run this command on the agent's host.";
  if (e.status === 404) return `${url} is not a fleetcache agent with a status API (too old, or another service on that port?).`;
  return `Check that the agent runs (systemctl status fleetcache, or \`fleetcache agent\`) and that --agent or FLEETCACHE_AGENT is its --listen address (default ${DEFAULT_AGENT_URL}).`;
}

/** " (N on the wire)" when compression made the wire bytes differ from the NAR bytes. */
function onWire(nar: number | undefined, wire: number | undefined): string {
  return wire === undefined || nar === undefined || wire === nar ? "" : ` (${formatBytes(wire)} on the wire)`;
}

export function renderStatus(url: string, s: StatusView, now = Date.now()): string {
  const lines: string[] = [];
  const self = s.self;
  lines.push(`fleetcache agent ${url}${self.version ? ` (version ${self.version}` + (self.uptimeSeconds !== undefined ? `, up ${formatDuration(self.uptimeSeconds)})` : ")") : ""}`);
  lines.push(`  host     ${self.name ?? "?"}`);
  if (self.publicKey) lines.push(`  key      ${self.publicKey}`);
  lines.push(`  store    ${self.paths ?? "?"} paths${self.storeBackend ? ` (metadata from the Nix ${self.storeBackend})` : ""}`);
  if (self.listen.length) lines.push(`  listen   ${self.listen.join(", ")}`);
  lines.push(`  mesh     ${self.peerId ? `${self.peerId}${self.addresses.length ? ` on ${self.addresses.join(", ")}` : ""}` : "off (single-host cache)"}`);

  const b = (v: number | undefined) => (v === undefined ? "?" : formatBytes(v));
  const connected = s.peers.filter((p) => p.connected).length;
  lines.push("", `peers: ${s.peers.length} known, ${connected} connected`);
  for (const p of [...s.peers].sort((a, b) => Number(b.connected) - Number(a.connected) || a.name.localeCompare(b.name))) {
    const facts = [
      p.connected ? "connected" : p.reconnecting ? "DISCONNECTED (reconnecting: lookups wait for it)" : "DISCONNECTED",
      p.rttMs !== undefined ? `rtt ${p.rttMs < 10 ? p.rttMs.toFixed(1) : Math.round(p.rttMs)} ms` : undefined,
      p.pathCount !== undefined ? `${p.pathCount} paths` : undefined,
      p.bytesReceived !== undefined ? `received ${formatBytes(p.bytesReceived)}${onWire(p.bytesReceived, p.wireBytesReceived)}` : undefined,
      p.bytesSent !== undefined ? `sent ${formatBytes(p.bytesSent)}${onWire(p.bytesSent, p.wireBytesSent)}` : undefined,
      p.compression === "zstd" ? "compressing (zstd)" : undefined,
      p.lastSeen !== undefined && formatAgo(p.lastSeen, now) ? `seen ${formatAgo(p.lastSeen, now)}` : undefined,
      p.badNars ? `${p.badNars} wrong NARs` : undefined,
      p.badNarinfos ? `${p.badNarinfos} narinfos contradicting upstream` : undefined,
      p.penalisedUntil !== undefined && p.penalisedUntil > now ? `PENALISED (asked last) for ${formatDuration(Math.ceil((p.penalisedUntil - now) / 1000))}` : undefined,
    ].filter(Boolean);
    lines.push(`  ${p.name}  ${facts.join(", ")}`);
    if (p.addresses.length) lines.push(`      ${p.addresses.join(" ")}`);
    const sum = p.summary;
    if (sum && (sum.snapshotBytes !== undefined || sum.deltaBytes !== undefined)) {
      lines.push(`      summary received: ${b(sum.snapshotBytes)} in ${sum.snapshots ?? "?"} snapshots, ${b(sum.deltaBytes)} in deltas, ${sum.resumes ?? "?"} resumes`);
    }
    const pen = p.penalty;
    if (pen && pen.until !== undefined && pen.until > now) {
      lines.push(`      REFUSED until ${new Date(pen.until).toISOString()} (offence ${pen.count ?? "?"}): ${pen.reason}`);
    }
  }

  const c = s.counters;
  const n = (v: number | undefined) => (v === undefined ? "?" : String(v));
  const hits = (c.narinfoHitsLocal ?? 0) + (c.narinfoHitsPeer ?? 0);
  const lookups = hits + (c.narinfoMisses ?? 0);
  lines.push("", "lookups:");
  if (c.narinfoHitsLocal === undefined && c.narinfoHitsPeer === undefined && c.narinfoMisses === undefined) {
    lines.push("  no counters (the mesh is off: every lookup is answered by this host's store)");
  } else {
    lines.push(`  narinfo: ${n(c.narinfoHitsLocal)} from this host, ${n(c.narinfoHitsPeer)} from peers, ${n(c.narinfoMisses)} misses` +
      (lookups > 0 ? ` (hit rate ${Math.round((100 * hits) / lookups)} %)` : ""));
    lines.push(`  NAR: ${b(c.narBytesServed)} served, ${b(c.narBytesFromPeers)} from peers${onWire(c.narBytesFromPeers, c.narWireBytesFromPeers)}` +
      (c.narBytesToPeers !== undefined ? `, ${b(c.narBytesToPeers)} to peers${onWire(c.narBytesToPeers, c.narWireBytesToPeers)}` : ""));
    if (c.compressedNarsFromPeers || c.compressedNarsToPeers) {
      lines.push(`  compressed NAR transfers (zstd): ${n(c.compressedNarsFromPeers)} from peers, ${n(c.compressedNarsToPeers)} to peers`);
    }
    // Present only with direct_lan on: Nix sent to peers' direct ports, and what ours served.
    if (c.directRedirects !== undefined || c.directNarsSent !== undefined) {
      lines.push(`  LAN-direct NARs: ${n(c.directRedirects)} redirected to peers (${n(c.directFallbacks)} relayed instead, ${n(c.directRepeatsRelayed)} relayed as asked for again), ` +
        `${n(c.directNarsSent)} sent from this host's direct port (${b(c.directBytesSent)}, ${n(c.directRefused)} requests refused)`);
      // Minted tickets cost no round trip; a run of asked ones means holders' minting keys are not reaching us.
      if (c.directTicketsAsked !== undefined || c.directTicketsMinted !== undefined) {
        lines.push(`  LAN-direct tickets: ${n(c.directTicketsAsked)} asked of holders, ${n(c.directTicketsMinted)} minted here; ` +
          `${n(c.directMintedServed)} of this host's direct NARs on tickets peers minted`);
      }
    }
    lines.push(`  peer queries ${n(c.peerQueries)}, failovers ${n(c.failovers)}, transfer failures ${n(c.transferFailures)}` +
      (c.verifyFailures !== undefined ? `, wrong NARs ${n(c.verifyFailures)}, queued ${n(c.queuedTransfers)}` : "") +
      (c.narinfoConflicts ? `, narinfos contradicting upstream ${n(c.narinfoConflicts)}` : ""));
  }

  const adm = s.admission;
  if (adm) {
    lines.push("", `admission: ${n(adm.refused)} inbound sockets refused by the per-host limit${adm.recentOffenders.length ? "; lately from:" : ""}`);
    for (const o of adm.recentOffenders) {
      const ago = o.lastRefusedAt !== undefined ? formatAgo(o.lastRefusedAt, now) : undefined;
      lines.push(`  ${o.host}  ${n(o.refused)} refused${ago ? `, last ${ago}` : ""}`);
    }
  }

  lines.push("", `recent errors: ${s.recentErrors.length ? "" : "none"}`);
  for (const e of s.recentErrors) lines.push(`  ${e}`);
  return lines.join("\n") + "\n";
}
