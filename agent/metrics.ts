// What the agent counts, for Prometheus (GET /metrics) and the status document. Each agent has
// its own Registry (never prom-client's global one), so several agents in one process (tests)
// keep separate books. Counters of things the mesh already tallies as plain numbers are mirrored
// into Prometheus when scraped; the HTTP side increments its own, with children resolved once.
// Labels are bounded sets only: never a path, a hash or a peer in a label.
import { monitorEventLoopDelay, type ELDHistogram } from "node:perf_hooks";
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics, type Metric } from "prom-client";

export const ROUTES = ["narinfo", "nar", "nix-cache-info", "ls", "log", "serve", "health", "version", "status", "metrics", "dashboard", "other"] as const;
export type Route = (typeof ROUTES)[number];
export const OUTCOMES = ["hit_local", "hit_peer", "miss", "ok", "client_error", "server_error", "aborted"] as const;
export type Outcome = (typeof OUTCOMES)[number];
const METHODS = ["GET", "HEAD", "other"] as const;
type Method = (typeof METHODS)[number];
const indexOf = <T extends string>(list: readonly T[]) => Object.fromEntries(list.map((v, i) => [v, i])) as Record<T, number>;
const ROUTE_INDEX = indexOf(ROUTES);
const METHOD_INDEX = indexOf(METHODS);
const OUTCOME_INDEX = indexOf(OUTCOMES);

/** Seconds; from a cached narinfo (~50 µs) to a multi-GiB NAR. */
const DURATION_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300];

/** Seconds; a healthy loop stays under 10 ms, a blocked one shows in the upper buckets. */
const LOOP_DELAY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];

/** Mesh-side tallies (FleetSource's counters and the mesh's byte counts), read on scrape. */
export interface MeshTallies {
  peerQueries: number;
  /** Narinfo requests to peers that opened a stream of their own, and that reused an idle pooled one. */
  narinfoStreamsOpened: number;
  narinfoStreamsReused: number;
  /** Narinfo streams opened ahead for peers that connected (Nix's first burst of lookups finds them open). */
  narinfoStreamsWarmed: number;
  /** NAR requests to peers on the mesh that opened a stream of their own, and that took one opened ahead (nar-streams-ahead.ts). */
  narStreamsOpened: number;
  narStreamsTakenAhead: number;
  failovers: number;
  transferFailures: number;
  bytesFromPeers: number;
  bytesToPeers: number;
  refusedConnections: number;
  /** NARs from peers that failed NarSize or NarHash. */
  verifyFailures: number;
  /** NAR requests that waited for a slot because every holder was at its transfer limit. */
  queuedTransfers: number;
  /** Peers asked last for every path after repeated wrong NARs (a gauge). */
  peersPenalised: number;
  /** Times a trusted peer went over a per-peer limit and was disconnected. */
  penalties: number;
  /** Peers refused right now for that (a gauge). */
  peersRefused: number;
  /** Fleet-only narinfos from peers that contradicted an upstream signature (trust-policy.ts). */
  narinfoConflicts: number;
  /** Questions to the upstream caches (upstream_caches), and those that failed. */
  upstreamChecks: number;
  upstreamCheckFailures: number;
  /** NAR transfer compression (nar-compression.ts): wire bytes, and transfers by encoding. */
  wireBytesFromPeers: number;
  wireBytesToPeers: number;
  compressedFromPeers: number;
  compressedToPeers: number;
  uncompressedFromPeers: number;
  uncompressedToPeers: number;
  // Summary resync and admission (issue 10).
  /** Summary bytes received from peers in snapshot frames (full resyncs) and in delta frames. */
  summarySnapshotBytes: number;
  summaryDeltaBytes: number;
  /** Inbound sockets refused by the per-remote-host limit before any handshake. */
  admissionRefused: number;
  /** NAR bodies on the bulk port (bulk-listener.ts): sent, received, fallbacks to the mesh stream, connections refused. */
  bulkNarsSent: number;
  bulkNarsReceived: number;
  bulkFallbacks: number;
  bulkRefused: number;
  /** Bulk sessions (kept connections): NARs sent and received on them, connections opened to peers. */
  bulkSessionNarsSent: number;
  bulkSessionNarsReceived: number;
  bulkSessionConnections: number;
  /**
   * LAN-direct NARs: requests to the direct port, NARs sent there, requests and sockets refused,
   * bytes sent; Nix's NAR requests redirected to a peer's direct port, and tickets not had (relayed).
   */
  directRequests: number;
  directNarsSent: number;
  directRefused: number;
  directBytesSent: number;
  directRedirects: number;
  directFallbacks: number;
  /** Of the redirects: tickets asked of the holder over the mesh, and tickets minted here without asking; of directNarsSent, those for a minted ticket. */
  directTicketsAsked: number;
  directTicketsMinted: number;
  directMintedServed: number;
  /** NAR requests relayed, not redirected, because Nix asked for the NAR again soon after a redirect for it. */
  directRepeatsRelayed: number;
}

/** What gauges and mirrored counters read when Prometheus scrapes. */
export interface MetricsSources {
  storePaths(): number;
  /** Known peers (empty without the mesh). */
  peers(): readonly { connected: boolean; pathCount?: number | undefined }[];
  mesh(): MeshTallies | undefined;
}

export interface RecentError {
  /** ISO 8601. */
  time: string;
  message: string;
  /** The store path concerned, if any. */
  path?: string;
  /** The peer concerned (its key name), if any. */
  peer?: string;
}

/** The last few errors operators should see (transfer failures, peer errors), oldest first. */
export class RecentErrors {
  readonly #items: RecentError[] = [];
  constructor(readonly limit = 20) {}

  add(e: Omit<RecentError, "time">): void {
    const item: RecentError = { time: new Date().toISOString(), message: e.message };
    if (e.path !== undefined) item.path = e.path;
    if (e.peer !== undefined) item.peer = e.peer;
    this.#items.push(item);
    if (this.#items.length > this.limit) this.#items.shift();
  }

  list(): RecentError[] {
    return this.#items.map((e) => ({ ...e }));
  }
}

interface RequestSeries {
  labels: { route: Route; method: Method; outcome: Outcome };
  /** Requests so far: a plain number on the hot path, handed to prom-client when scraped. */
  count: number;
  duration: DurationSeries;
}

/** One route and outcome's request durations: per-bucket counts (not cumulative), sum, count. */
interface DurationSeries {
  labels: { route: Route; outcome: Outcome };
  buckets: number[];
  sum: number;
  count: number;
}

/**
 * fleetcache_http_request_duration_seconds, observed with plain numbers on the hot path.
 * prom-client's Histogram hashes the label object on every observe (a few µs a request, a
 * tenth of a narinfo hit's CPU); this keeps counts in arrays and builds prom-client's export
 * format only when scraped. Registered in the registry as a metric of its own.
 */
class RequestDurations {
  readonly name = "fleetcache_http_request_duration_seconds";
  readonly help = "Time from receiving an HTTP request to the end of its answer (NARs: the whole transfer).";
  readonly type = "histogram";
  readonly aggregator = "sum";
  readonly #series = new Map<string, DurationSeries>();

  series(route: Route, outcome: Outcome): DurationSeries {
    const key = route + " " + outcome;
    let s = this.#series.get(key);
    if (!s) this.#series.set(key, (s = { labels: { route, outcome }, buckets: DURATION_BUCKETS.map(() => 0), sum: 0, count: 0 }));
    return s;
  }

  static observe(s: DurationSeries, seconds: number): void {
    let i = 0;
    while (i < DURATION_BUCKETS.length && seconds > DURATION_BUCKETS[i]!) i++;
    if (i < DURATION_BUCKETS.length) s.buckets[i]!++;
    s.sum += seconds;
    s.count++;
  }

  /** prom-client's shape for a histogram's values (as Histogram.get() returns them). */
  get(): { name: string; help: string; type: string; aggregator: string; values: { labels: Record<string, string | number>; value: number; metricName: string }[] } {
    const values = [];
    for (const s of this.#series.values()) {
      let acc = 0;
      for (let i = 0; i < DURATION_BUCKETS.length; i++) {
        acc += s.buckets[i]!;
        values.push({ labels: { le: DURATION_BUCKETS[i]!, ...s.labels }, value: acc, metricName: `${this.name}_bucket` });
      }
      values.push({ labels: { le: "+Inf", ...s.labels }, value: s.count, metricName: `${this.name}_bucket` });
      values.push({ labels: { ...s.labels }, value: s.sum, metricName: `${this.name}_sum` });
      values.push({ labels: { ...s.labels }, value: s.count, metricName: `${this.name}_count` });
    }
    return { name: this.name, help: this.help, type: this.type, aggregator: this.aggregator, values };
  }

  reset(): void {
    this.#series.clear();
  }
}

export class AgentMetrics {
  readonly registry = new Registry();
  readonly errors = new RecentErrors();
  /** Narinfo lookups answered over HTTP (GET and HEAD), for the status document. */
  readonly narinfo = { hitsLocal: 0, hitsPeer: 0, misses: 0 };
  /** NAR bytes sent to HTTP clients, by where they came from. */
  readonly narBytesServed = { local: 0, peer: 0 };
  /** Index of (route, method, outcome) -> its series, made on first use. */
  readonly #series = new Map<number, RequestSeries>();
  readonly #duration = new RequestDurations();
  readonly #loopDelay: ELDHistogram;
  readonly #loopTimer: NodeJS.Timeout;

  constructor(sources: MetricsSources) {
    const registers = [this.registry];
    // The defaults include fleetcache_nodejs_eventloop_lag_{max,p99,...}_seconds: gauges of
    // monitorEventLoopDelay that every scrape resets (the max since the previous scrape, whoever
    // scraped) and percentiles of 10 ms samples, mostly idle ones. Operators get, besides them,
    // a histogram no scrape disturbs: each second's longest delay, so that a stall of N seconds
    // counts once near N and `increase(..._bucket{le="0.1"}[5m])` against `_count` says how
    // many seconds of the last five minutes had the loop blocked for more than 100 ms.
    collectDefaultMetrics({ register: this.registry, prefix: "fleetcache_" });
    const loopDelay = new Histogram({
      name: "fleetcache_event_loop_delay_seconds",
      help: "Longest event-loop delay in each second (perf_hooks.monitorEventLoopDelay, 10 ms resolution); a stall observes its length once.",
      buckets: LOOP_DELAY_BUCKETS,
      registers,
    });
    this.#loopDelay = monitorEventLoopDelay({ resolution: 10 });
    this.#loopDelay.enable();
    // A blocked loop delays this timer too: it fires once after the stall and records it whole.
    this.#loopTimer = setInterval(() => {
      if (this.#loopDelay.count > 0) loopDelay.observe(this.#loopDelay.max / 1e9);
      this.#loopDelay.reset();
    }, 1000).unref();
    const series = this.#series;
    new Counter({
      name: "fleetcache_http_requests_total",
      help: "HTTP requests answered, by route, method and outcome.",
      labelNames: ["route", "method", "outcome"],
      registers,
      collect() {
        this.reset();
        for (const s of series.values()) this.inc(s.labels, s.count);
      },
    });
    this.registry.registerMetric(this.#duration as unknown as Metric);
    const served = this.narBytesServed;
    new Counter({
      name: "fleetcache_nar_bytes_served_total",
      help: "NAR bytes sent to HTTP clients, by source: this host's store (local) or streamed from a peer (peer).",
      labelNames: ["source"],
      registers,
      collect() {
        this.reset();
        this.inc({ source: "local" }, served.local);
        this.inc({ source: "peer" }, served.peer);
      },
    });
    const mirror = (name: string, help: string, read: (t: MeshTallies) => number) =>
      new Counter({
        name,
        help,
        registers,
        collect() {
          const t = sources.mesh();
          this.reset();
          this.inc(t ? read(t) : 0);
        },
      });
    mirror("fleetcache_peer_bytes_received_total", "NAR bytes received from peers.", (t) => t.bytesFromPeers);
    mirror("fleetcache_peer_bytes_sent_total", "NAR bytes sent to peers from this host's store.", (t) => t.bytesToPeers);
    mirror("fleetcache_nar_transfer_failures_total", "NAR transfers from a peer that failed part-way or could not start.", (t) => t.transferFailures);
    mirror("fleetcache_nar_failovers_total", "NAR transfers taken over by another holder after one failed.", (t) => t.failovers);
    mirror("fleetcache_nar_verify_failures_total", "NARs from peers that failed their NarSize or NarHash (the holder is penalised).", (t) => t.verifyFailures);
    mirror("fleetcache_nar_transfers_queued_total", "NAR requests that waited for a transfer slot because every holder was at its limit.", (t) => t.queuedTransfers);
    mirror("fleetcache_peer_queries_total", "Narinfo questions asked of peers.", (t) => t.peerQueries);
    mirror("fleetcache_peer_connections_refused_total", "Mesh connections refused after the handshake because the peer's key is not trusted.", (t) => t.refusedConnections);
    mirror("fleetcache_narinfo_conflicts_total", "Narinfos from peers signed only by fleet keys that contradicted the path's upstream signature (the holder is penalised).", (t) => t.narinfoConflicts);
    mirror("fleetcache_upstream_checks_total", "Narinfo lookups asked of the upstream caches (upstream_caches) before a fleet-only answer was used.", (t) => t.upstreamChecks);
    mirror("fleetcache_upstream_check_failures_total", "Upstream checks that got no answer (error, timeout, cache left alone after a failure): the peers' answers alone decided.", (t) => t.upstreamCheckFailures);
    mirror("fleetcache_peer_penalties_total", "Times a fleet peer went over a per-peer limit (summary work) and was disconnected and refused for a backoff.", (t) => t.penalties);
    // NAR transfers between agents, per direction: NAR bytes delivered, bytes on the wire (fewer
    // when compressed), and transfers by encoding.
    const labelled = (name: string, help: string, labelNames: string[], read: (t: MeshTallies) => [Record<string, string>, number][]) =>
      new Counter({
        name,
        help,
        labelNames,
        registers,
        collect() {
          const t = sources.mesh();
          this.reset();
          if (t) for (const [labels, n] of read(t)) this.inc(labels, n);
        },
      });
    labelled("fleetcache_peer_nar_bytes_total", "NAR bytes transferred between this agent and peers (decoded NAR bytes), by direction.", ["direction"], (t) => [
      [{ direction: "received" }, t.bytesFromPeers],
      [{ direction: "sent" }, t.bytesToPeers],
    ]);
    labelled("fleetcache_peer_nar_wire_bytes_total", "Bytes those NAR transfers took on the wire (after compression), by direction.", ["direction"], (t) => [
      [{ direction: "received" }, t.wireBytesFromPeers],
      [{ direction: "sent" }, t.wireBytesToPeers],
    ]);
    labelled("fleetcache_peer_nar_transfers_total", "NAR transfers between this agent and peers, by direction and encoding (zstd or none).", ["direction", "encoding"], (t) => [
      [{ direction: "received", encoding: "zstd" }, t.compressedFromPeers],
      [{ direction: "received", encoding: "none" }, t.uncompressedFromPeers],
      [{ direction: "sent", encoding: "zstd" }, t.compressedToPeers],
      [{ direction: "sent", encoding: "none" }, t.uncompressedToPeers],
    ]);
    // Summary resync and admission (issue 10).
    new Counter({
      name: "fleetcache_summary_received_bytes_total",
      help: "Summary bytes received from peers, by kind: snapshot (a full resync) or delta (changes; a resumed subscription sends only these).",
      labelNames: ["kind"],
      registers,
      collect() {
        const t = sources.mesh();
        this.reset();
        this.inc({ kind: "snapshot" }, t?.summarySnapshotBytes ?? 0);
        this.inc({ kind: "delta" }, t?.summaryDeltaBytes ?? 0);
      },
    });
    mirror("fleetcache_bulk_nars_sent_total", "NAR bodies sent to peers on the bulk port (TLS keyed by a one-time ticket) instead of the mesh stream.", (t) => t.bulkNarsSent);
    mirror("fleetcache_bulk_nars_received_total", "NAR bodies received from peers on their bulk port.", (t) => t.bulkNarsReceived);
    mirror("fleetcache_bulk_session_nars_sent_total", "NAR bodies sent to peers on bulk session connections (kept TLS connections to the bulk port, one NAR after another).", (t) => t.bulkSessionNarsSent);
    mirror("fleetcache_bulk_session_nars_received_total", "NAR bodies received from peers on bulk session connections.", (t) => t.bulkSessionNarsReceived);
    mirror("fleetcache_bulk_session_connections_total", "Bulk session connections opened to peers' bulk ports (each carries NARs until idle for 20 s).", (t) => t.bulkSessionConnections);
    mirror("fleetcache_bulk_fallbacks_total", "Bulk connections to a peer that failed (unreachable port, failed handshake); that NAR and the peer's next ones for 10 minutes went on the mesh stream.", (t) => t.bulkFallbacks);
    mirror("fleetcache_direct_requests_total", "Requests to the direct port (direct_lan): peers' Nix fetching NARs of this host's store.", (t) => t.directRequests);
    mirror("fleetcache_direct_nars_sent_total", "NARs sent on the direct port for a live ticket (one-time or minted).", (t) => t.directNarsSent);
    mirror("fleetcache_direct_refused_total", "Requests and sockets refused on the direct port: no such ticket (forged, used, expired, for another NAR), a bad request, or over the per-host limit.", (t) => t.directRefused);
    mirror("fleetcache_direct_bytes_sent_total", "NAR bytes sent on the direct port.", (t) => t.directBytesSent);
    mirror("fleetcache_direct_redirects_total", "NAR requests from Nix answered with a redirect to a peer's direct port.", (t) => t.directRedirects);
    mirror("fleetcache_direct_tickets_asked_total", "Direct tickets asked of a holder over the mesh (a round trip each; the first from a holder also brings a minting key).", (t) => t.directTicketsAsked);
    mirror("fleetcache_direct_tickets_minted_total", "Redirects to a peer's direct port with a ticket minted here with that peer's minting key (no round trip).", (t) => t.directTicketsMinted);
    mirror("fleetcache_direct_minted_nars_sent_total", "NARs sent on the direct port for a ticket a peer minted.", (t) => t.directMintedServed);
    mirror("fleetcache_direct_repeats_relayed_total", "NAR requests relayed (verified, the holder Nix was sent to asked first) instead of redirected, because Nix asked for that NAR again within 10 minutes of a redirect for it: a failed download or hash mismatch, or a second copy.", (t) => t.directRepeatsRelayed);
    mirror("fleetcache_direct_fallbacks_total", "NAR requests for which no direct ticket was had (the holder does not offer it, refused, or failed): relayed instead.", (t) => t.directFallbacks);
    mirror("fleetcache_bulk_refused_total", "Connections to the bulk port refused: no such ticket (forged, used or expired) or over the per-host limit of sockets in their handshake.", (t) => t.bulkRefused);
    mirror("fleetcache_admission_refused_total", "Inbound mesh sockets refused before any handshake because their remote host already held its limit of sockets in their handshake (status lists recent offenders).", (t) => t.admissionRefused);
    const gauge = (name: string, help: string, read: () => number) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          this.set(read());
        },
      });
    gauge("fleetcache_peers_connected", "Fleet peers with a live mesh connection.", () => sources.peers().filter((p) => p.connected).length);
    gauge("fleetcache_peers_penalised", "Peers asked last for every path after repeated wrong NAR bytes or narinfos.", () => sources.mesh()?.peersPenalised ?? 0);
    gauge("fleetcache_peers_known", "Fleet peers known (connected or not).", () => sources.peers().length);
    gauge("fleetcache_peers_refused", "Fleet peers refused right now for going over a per-peer limit.", () => sources.mesh()?.peersRefused ?? 0);
    gauge("fleetcache_store_paths", "Valid paths in this host's Nix store.", () => sources.storePaths());
    gauge("fleetcache_peer_paths_announced", "Store paths announced by peers, summed over peers (a path two peers hold counts twice).", () =>
      sources.peers().reduce((n, p) => n + (p.pathCount ?? 0), 0),
    );
  }

  /** Records one answered request; `start` is performance.now() when it arrived. */
  request(route: Route, method: string | undefined, outcome: Outcome, start: number): void {
    const seconds = (performance.now() - start) / 1e3;
    const m: Method = method === "GET" || method === "HEAD" ? method : "other";
    // An index, not a string key: building "route method outcome" cost more than the rest.
    const key = (ROUTE_INDEX[route] * METHODS.length + METHOD_INDEX[m]) * OUTCOMES.length + OUTCOME_INDEX[outcome];
    let s = this.#series.get(key);
    if (!s) {
      s = { labels: { route, method: m, outcome }, count: 0, duration: this.#duration.series(route, outcome) };
      this.#series.set(key, s);
    }
    s.count++;
    RequestDurations.observe(s.duration, seconds);
    if (route === "narinfo") {
      if (outcome === "hit_local") this.narinfo.hitsLocal++;
      else if (outcome === "hit_peer") this.narinfo.hitsPeer++;
      else if (outcome === "miss") this.narinfo.misses++;
    }
  }

  /** Stops the event-loop sampling. */
  close(): void {
    clearInterval(this.#loopTimer);
    this.#loopDelay.disable();
  }

  /** The Prometheus text exposition. */
  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
