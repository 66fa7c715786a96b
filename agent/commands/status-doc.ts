// A tolerant reading of GET /api/v1/status. The document grows (traffic per peer, counters,
// recent errors); older and newer agents must both be readable, so every field is optional here
// and counters are looked up under their current and earlier names.

export interface StatusPeer {
  name: string;
  publicKey?: string;
  peerId?: string;
  addresses: string[];
  connected: boolean;
  /** Disconnected within the reconnect grace: lookups wait for it briefly. */
  reconnecting?: boolean;
  rttMs?: number;
  pathCount?: number;
  lastSeen?: unknown;
  bytesSent?: number;
  bytesReceived?: number;
  /** What those NAR bytes took on the wire (less when compressed). */
  wireBytesSent?: number;
  wireBytesReceived?: number;
  /** Whether this host's next NAR request to the peer accepts zstd: "zstd" or "none". */
  compression?: string;
  /** NARs from the peer that failed NarSize or NarHash. */
  badNars?: number;
  /** Narinfos from the peer that contradicted the path's upstream signature. */
  badNarinfos?: number;
  /** While set, the peer is asked last for every path (ms since the epoch). */
  penalisedUntil?: number;
  /** Set once the peer went over a per-peer limit. */
  penalty?: { reason: string; count?: number; until?: number };
  /** Summary traffic received from the peer: snapshot (resync) and delta bytes. */
  summary?: { snapshotBytes?: number; deltaBytes?: number; snapshots?: number; resumes?: number };
}

export interface StatusView {
  self: {
    name?: string;
    publicKey?: string;
    peerId?: string | null;
    listen: string[];
    addresses: string[];
    paths?: number;
    /** Where the agent reads store metadata: "database" or "daemon". */
    storeBackend?: string;
    /** The agent's use_case_hack; absent from agents older than the setting's report. */
    useCaseHack?: boolean;
    version?: string;
    uptimeSeconds?: number;
  };
  peers: StatusPeer[];
  counters: {
    narinfoHitsLocal?: number;
    narinfoHitsPeer?: number;
    narinfoMisses?: number;
    narBytesServed?: number;
    narBytesFromPeers?: number;
    narWireBytesFromPeers?: number;
    narBytesToPeers?: number;
    narWireBytesToPeers?: number;
    compressedNarsFromPeers?: number;
    compressedNarsToPeers?: number;
    /** LAN-direct NARs (direct_lan): Nix redirected to peers' direct ports, fallbacks to relaying; NARs and bytes our direct port sent, requests it refused. */
    directRedirects?: number;
    directFallbacks?: number;
    directNarsSent?: number;
    directBytesSent?: number;
    directRefused?: number;
    /** Of the redirects: tickets asked of holders over the mesh, tickets minted here; of directNarsSent, those for tickets minted by the requester. */
    directTicketsAsked?: number;
    directTicketsMinted?: number;
    directMintedServed?: number;
    /** NAR requests relayed because Nix asked for the NAR again soon after a redirect for it. */
    directRepeatsRelayed?: number;
    peerQueries?: number;
    failovers?: number;
    transferFailures?: number;
    verifyFailures?: number;
    queuedTransfers?: number;
    narinfoConflicts?: number;
  };
  recentErrors: string[];
  /** Inbound mesh sockets refused by the per-host limit, and the hosts refused lately. */
  admission?: { refused?: number; recentOffenders: { host: string; refused?: number; lastRefusedAt?: number }[] };
}

type Obj = Record<string, unknown>;
const obj = (v: unknown): Obj => (v && typeof v === "object" && !Array.isArray(v) ? (v as Obj) : {});
const num = (v: unknown): number | undefined => (typeof v === "number" && Number.isFinite(v) ? v : undefined);
const str = (v: unknown): string | undefined => (typeof v === "string" ? v : undefined);
const strs = (v: unknown): string[] => (Array.isArray(v) ? v.filter((x): x is string => typeof x === "string") : typeof v === "string" ? [v] : []);

/** The first of several names a counter has had. */
function counter(c: Obj, ...names: string[]): number | undefined {
  for (const n of names) if (num(c[n]) !== undefined) return num(c[n]);
  return undefined;
}

export function readStatus(doc: unknown): StatusView {
  const d = obj(doc);
  const self = obj(d.self);
  const c = obj(d.counters);
  const listen = self.listen;
  return {
    self: {
      name: str(self.name),
      publicKey: str(self.publicKey),
      peerId: str(self.peerId) ?? null,
      // listen may be "host:port", a list, or {host, port}.
      listen: typeof listen === "object" && listen && !Array.isArray(listen)
        ? [`${String(obj(listen).host)}:${String(obj(listen).port)}`]
        : strs(listen),
      addresses: strs(self.addresses),
      paths: num(self.paths) ?? num(self.pathCount),
      storeBackend: str(self.storeBackend),
      useCaseHack: typeof self.useCaseHack === "boolean" ? self.useCaseHack : undefined,
      version: str(self.version),
      uptimeSeconds: num(self.uptimeSeconds),
    },
    peers: (Array.isArray(d.peers) ? d.peers : []).map((p) => {
      const q = obj(p);
      const publicKey = str(q.publicKey);
      return {
        name: str(q.name) ?? publicKey?.split(":")[0] ?? str(q.peerId) ?? "?",
        publicKey,
        peerId: str(q.peerId),
        addresses: strs(q.addresses),
        connected: q.connected === true,
        ...(q.reconnecting === true && { reconnecting: true }),
        rttMs: num(q.rttMs),
        pathCount: num(q.pathCount),
        lastSeen: q.lastSeen,
        bytesSent: num(q.bytesSent),
        bytesReceived: num(q.bytesReceived),
        wireBytesSent: num(q.wireBytesSent),
        wireBytesReceived: num(q.wireBytesReceived),
        compression: str(q.compression),
        badNars: num(q.badNars),
        badNarinfos: num(q.badNarinfos),
        penalisedUntil: num(q.penalisedUntil),
        ...(q.summary !== undefined && {
          summary: {
            snapshotBytes: num(obj(q.summary).snapshotBytes),
            deltaBytes: num(obj(q.summary).deltaBytes),
            snapshots: num(obj(q.summary).snapshots),
            resumes: num(obj(q.summary).resumes),
          },
        }),
        ...(str(obj(q.penalty).reason) !== undefined && {
          penalty: { reason: str(obj(q.penalty).reason)!, count: num(obj(q.penalty).count), until: num(obj(q.penalty).until) },
        }),
      };
    }),
    counters: {
      narinfoHitsLocal: counter(c, "narinfoHitsLocal", "localHits"),
      narinfoHitsPeer: counter(c, "narinfoHitsPeer", "peerHits"),
      narinfoMisses: counter(c, "narinfoMisses", "misses"),
      narBytesServed: counter(c, "narBytesServed"),
      narBytesFromPeers: counter(c, "narBytesFromPeers", "bytesFromPeers"),
      narWireBytesFromPeers: counter(c, "narWireBytesFromPeers"),
      narBytesToPeers: counter(c, "narBytesToPeers"),
      narWireBytesToPeers: counter(c, "narWireBytesToPeers"),
      compressedNarsFromPeers: counter(c, "compressedNarsFromPeers"),
      compressedNarsToPeers: counter(c, "compressedNarsToPeers"),
      directRedirects: counter(c, "directRedirects"),
      directFallbacks: counter(c, "directFallbacks"),
      directNarsSent: counter(c, "directNarsSent"),
      directBytesSent: counter(c, "directBytesSent"),
      directRefused: counter(c, "directRefused"),
      directTicketsAsked: counter(c, "directTicketsAsked"),
      directTicketsMinted: counter(c, "directTicketsMinted"),
      directMintedServed: counter(c, "directMintedServed"),
      directRepeatsRelayed: counter(c, "directRepeatsRelayed"),
      peerQueries: counter(c, "peerQueries"),
      failovers: counter(c, "failovers"),
      transferFailures: counter(c, "transferFailures"),
      verifyFailures: counter(c, "verifyFailures"),
      queuedTransfers: counter(c, "queuedTransfers"),
      narinfoConflicts: counter(c, "narinfoConflicts"),
    },
    recentErrors: (Array.isArray(d.recentErrors) ? d.recentErrors : []).map(describeError),
    ...(d.admission !== undefined && {
      admission: {
        refused: num(obj(d.admission).refused),
        recentOffenders: (Array.isArray(obj(d.admission).recentOffenders) ? (obj(d.admission).recentOffenders as unknown[]) : [])
          .map(obj)
          .filter((o) => str(o.host) !== undefined)
          .map((o) => ({ host: str(o.host)!, refused: num(o.refused), lastRefusedAt: num(o.lastRefusedAt) })),
      },
    }),
  };
}

/** One recent error as a line: its time, then what it says (strings or {time, message, ...}). */
function describeError(e: unknown): string {
  if (typeof e === "string") return e;
  const o = obj(e);
  const t = o.time ?? o.at ?? o.ts ?? o.timestamp;
  const time = typeof t === "number" ? new Date(t).toISOString() : str(t);
  const msg = str(o.message) ?? str(o.msg) ?? str(o.error) ?? str(o.err);
  const rest = Object.entries(o)
    .filter(([k, v]) => !["time", "at", "ts", "timestamp", "message", "msg", "error", "err"].includes(k) && v !== undefined && v !== null)
    .map(([k, v]) => `${k}=${typeof v === "string" ? v : JSON.stringify(v)}`);
  return [time, msg ?? (rest.length ? "" : JSON.stringify(e)), ...rest].filter(Boolean).join("  ");
}
