// Starting and stopping the agent for one host: keys, store, HTTP listener.
import type { Server } from "node:http";
import { join } from "node:path";
import type { AddressInfo } from "node:net";
import { formatPublicKey, type SecretKey } from "../protocol/keys.js";
import type { AgentConfig } from "./config.js";
import type { StatusDocument } from "./http/admin-routes.js";
import { createHttpServer } from "./http/server.js";
import { loadSendfile } from "./http/send-file.js";
import { sendNar } from "./http/cache-routes.js";
import { handleDashboard } from "./http/dashboard.js";
import { ensureHostKey, readSecretKeyFile } from "./keys-file.js";
import type { Logger } from "./log.js";
import { Signer } from "./signer.js";
import { chooseBackend, defaultDaemonSocket, LocalStore } from "./store/local-store.js";
import { databaseFilesVisible, nativeLooks } from "./store/db-version.js";
import { AgentMetrics } from "./metrics.js";
import { tuneGcForBuffers } from "./gc-tuning.js";
import { Mesh } from "./mesh/mesh.js";
import { directSource } from "./mesh/direct-listener.js";
import { meshListenPort } from "./address.js";
import type { PathSource } from "./source.js";
import { VERSION } from "./version.js";
import { resolveUpstreamKeys } from "./upstream-keys.js";

export interface RunningAgent {
  server: Server;
  store: LocalStore;
  mesh: Mesh | undefined;
  metrics: AgentMetrics;
  keys: SecretKey[];
  /** The address actually bound (the port may have been 0). */
  address: AddressInfo;
  stop(): Promise<void>;
}

export async function startAgent(config: AgentConfig, log: Logger): Promise<RunningAgent> {
  tuneGcForBuffers();
  const keys = config.signKeyFiles.length > 0
    ? config.signKeyFiles.map((f) => readSecretKeyFile(f, log))
    : [ensureHostKey(config.stateDir, log)];
  const backend = chooseBackend(config.storeRoot, config.storeBackend);
  const daemonSocket = config.daemonSocket ?? defaultDaemonSocket(config.storeRoot);
  let store: LocalStore;
  try {
    store = await LocalStore.open(config.storeRoot, new Signer(keys), { backend, daemonSocket, caseHack: config.useCaseHack });
  } catch (e) {
    throw new Error(backend === "database"
      ? `cannot open the Nix database under ${config.storeRoot} (is this a Nix store root, and readable?): ${(e as Error).message}`
      : `cannot reach the Nix daemon at ${daemonSocket} (is nix-daemon running, and this user allowed?): ${(e as Error).message}`);
  }
  log.info(
    { storeBackend: backend, ...(backend === "daemon" ? { daemonSocket, dbLooks: nativeLooks ? "addon" : "fstatSync" } : {}), configured: config.storeBackend },
    backend === "database" ? "store metadata from the Nix database" : "store metadata from the Nix daemon",
  );
  const dbDir = join(config.storeRoot, "nix/var/nix/db");
  if (backend === "daemon" && !databaseFilesVisible(dbDir)) {
    log.warn({ dbDir }, "cannot look at the Nix database's files: every narinfo lookup asks the daemon (README: Database or daemon)");
  }
  store.watch().on("error", (err) => log.warn({ err: err.message }, `watching the store (${backend}) failed; will retry`));
  let mesh: Mesh | undefined;
  const metrics = new AgentMetrics({
    storePaths: () => store.pathCount(),
    peers: () => mesh?.peerGauges() ?? [],
    mesh: () => mesh?.tallies(),
  });
  const sendfile = config.sendfile ? loadSendfile() : { why: "switched off (sendfile = false)" };
  if (config.p2pListen) {
    const upstreamKeys = await resolveUpstreamKeys(config, keys, log);
    if (config.upstreamCaches.length > 0 && upstreamKeys.length === 0) {
      log.warn({ upstreamCaches: config.upstreamCaches }, "upstream_caches is set but there are no upstream keys to check their answers with: no upstream check");
    }
    mesh = await Mesh.start({
      upstreamKeys,
      upstreamCaches: config.upstreamCaches,
      key: keys[0]!, // the first signing key is also this host's identity in the mesh
      trustedKeys: config.trustedKeys,
      listen: config.p2pListen,
      peers: config.peers,
      mdns: config.mdns,
      ...(config.tailscale ? { tailscale: { port: meshListenPort(config.p2pListen), ...(config.tailscaleStatusFile ? { statusFile: config.tailscaleStatusFile } : {}) } } : {}),
      local: store,
      log,
      summaryBudget: config.summaryBudget,
      reconnectWaitMs: config.reconnectWait * 1000,
      compression: config.meshCompression,
      bulk: config.meshBulk,
      // The direct port sends NARs of this store exactly as the local NAR route does.
      ...(config.directLan && { direct: { serve: (req, res, info, count) => sendNar({ source: directSource(store), local: store, priority: config.priority, log, sendfile: sendfile.binding }, req, res, info, count) } }),
      onError: (e) => metrics.errors.add(e),
    }).catch((e: Error) => {
      store.close();
      metrics.close();
      throw new Error(`cannot start the mesh on ${config.p2pListen}: ${e.message}`);
    });
  }
  const source: PathSource = mesh?.source ?? store;
  const startedAt = Date.now();
  let listen = "";
  const status = (): StatusDocument => {
    const c = mesh?.source.counters;
    const served = metrics.narBytesServed;
    return {
      self: {
        name: keys[0]!.name,
        publicKey: formatPublicKey(keys[0]!),
        peerId: mesh?.node.peerId.toString() ?? null,
        addresses: mesh?.node.addresses().map(String) ?? [],
        listen,
        paths: store.pathCount(),
        storeBackend: store.backend,
        useCaseHack: config.useCaseHack,
        version: VERSION,
        uptimeSeconds: Math.round((Date.now() - startedAt) / 1000),
      },
      peers: mesh?.status().peers ?? [],
      counters: {
        // The router's own counters (lookups of narinfos and NARs alike) under their old names.
        ...(c ?? {}),
        narinfoHitsLocal: metrics.narinfo.hitsLocal,
        narinfoHitsPeer: metrics.narinfo.hitsPeer,
        narinfoMisses: metrics.narinfo.misses,
        narBytesServed: served.local + served.peer,
        narBytesFromPeers: c?.bytesFromPeers ?? 0,
        peerQueries: c?.peerQueries ?? 0,
        narinfoStreamsOpened: mesh?.tallies().narinfoStreamsOpened ?? 0,
        narinfoStreamsReused: mesh?.tallies().narinfoStreamsReused ?? 0,
        narinfoStreamsWarmed: mesh?.tallies().narinfoStreamsWarmed ?? 0,
        narStreamsOpened: mesh?.tallies().narStreamsOpened ?? 0,
        narStreamsTakenAhead: mesh?.tallies().narStreamsTakenAhead ?? 0,
        failovers: c?.failovers ?? 0,
        transferFailures: c?.transferFailures ?? 0,
        verifyFailures: c?.verifyFailures ?? 0,
        queuedTransfers: c?.queuedTransfers ?? 0,
        refusedConnections: mesh?.tallies().refusedConnections ?? 0,
        peerPenalties: mesh?.tallies().penalties ?? 0,
        upstreamChecks: mesh?.tallies().upstreamChecks ?? 0,
        upstreamCheckFailures: mesh?.tallies().upstreamCheckFailures ?? 0,
        narBytesToPeers: mesh?.tallies().bytesToPeers ?? 0,
        narWireBytesFromPeers: mesh?.compression.totals.wireReceived ?? 0,
        narWireBytesToPeers: mesh?.compression.totals.wireSent ?? 0,
        compressedNarsFromPeers: mesh?.compression.totals.zstdReceived ?? 0,
        compressedNarsToPeers: mesh?.compression.totals.zstdSent ?? 0,
        summarySnapshotBytes: mesh?.tallies().summarySnapshotBytes ?? 0,
        summaryDeltaBytes: mesh?.tallies().summaryDeltaBytes ?? 0,
        admissionRefused: mesh?.tallies().admissionRefused ?? 0,
        ...(mesh?.bulk && { bulkNarsSent: mesh.bulk.served, bulkRefused: mesh.bulk.refused, bulkSessionNarsSent: mesh.bulk.sessionServed }),
        ...(mesh?.bulkRoutes && { bulkNarsReceived: mesh.bulkRoutes.received, bulkFallbacks: mesh.bulkRoutes.fallbacks }),
        ...(mesh?.bulkSessions && { bulkSessionNarsReceived: mesh.bulkSessions.received, bulkSessionConnections: mesh.bulkSessions.connections }),
        ...(mesh?.direct && { directRequests: mesh.direct.counters.requests, directNarsSent: mesh.direct.counters.served, directRefused: mesh.direct.counters.refused, directBytesSent: mesh.direct.counters.bytes, directMintedServed: mesh.direct.counters.minted }),
        ...(mesh?.directRoutes && { directRedirects: mesh.directRoutes.redirects, directFallbacks: mesh.directRoutes.fallbacks, directTicketsAsked: mesh.directRoutes.asked, directTicketsMinted: mesh.directRoutes.minted, directRepeatsRelayed: mesh.directRoutes.repeats }),
      },
      recentErrors: metrics.errors.list(),
      ...(mesh && { admission: mesh.admissionStatus() }),
    };
  };
  if (sendfile.binding) log.info({ narSend: "sendfile" }, "NAR bodies from this host's store go out with sendfile(2)");
  else log.info({ narSend: "pooled", reason: sendfile.why }, "NAR bodies from this host's store go out through pooled reads");
  const server = createHttpServer({
    sendfile: sendfile.binding,
    source,
    local: store,
    priority: config.priority,
    log,
    status,
    metrics,
    dashboard: handleDashboard,
    ...(mesh ? { fromPeer: mesh.source.fromPeer.bind(mesh.source) } : {}),
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(config.listen.port, config.listen.host, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const address = server.address() as AddressInfo;
  listen = address.family === "IPv6" ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`;
  log.info(
    {
      listen: `${address.address}:${address.port}`,
      storeRoot: config.storeRoot,
      useCaseHack: config.useCaseHack,
      paths: store.pathCount(),
      publicKeys: keys.map(formatPublicKey),
      version: VERSION,
    },
    "fleetcache agent serving this host's store",
  );
  return {
    server,
    store,
    mesh,
    metrics,
    keys,
    address,
    async stop() {
      // Let running transfers finish for a moment, then cut them: a client sees a short body.
      const closed = new Promise<void>((resolve) => server.close(() => resolve()));
      server.closeIdleConnections();
      const timer = setTimeout(() => server.closeAllConnections(), 5000);
      await closed;
      clearTimeout(timer);
      await mesh?.stop();
      store.close();
      metrics.close();
    },
  };
}

