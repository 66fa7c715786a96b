// A libp2p node for the fleet mesh: TCP + noise + yamux, identity = the host's Nix key, and a
// gater that admits only trusted keys. Protocol handlers get a bounded StreamReader and the
// caller's Nix public key.
import { createLibp2p, type Libp2p } from "libp2p";
import { tcp } from "@libp2p/tcp";
import { framedNoise } from "./noise-framing.js";
import { yamux } from "@chainsafe/libp2p-yamux";
import { identify, type Identify } from "@libp2p/identify";
import { ping, type Ping } from "@libp2p/ping";
import { mdns } from "@libp2p/mdns";
import { multiaddr, type Multiaddr } from "@multiformats/multiaddr";
import { peerIdFromString } from "@libp2p/peer-id";
import type { AbortOptions, ComponentLogger, Connection, Logger as Libp2pLogger, PeerDiscovery, PeerId, Stream, StreamHandlerOptions } from "@libp2p/interface";
import type { Logger } from "pino";
import type { PublicKey, SecretKey } from "../../protocol/keys.js";
import { libp2pPrivateKey, trustedPeers } from "./identity.js";
import { meshGater, type DeniedPeer, type RefusedPeer } from "./gater.js";
import { MAX_STREAM_WINDOW, StreamReader } from "./stream-io.js";
import { meshListenAddr } from "../address.js";
import { INBOUND_CONNECTION_SETTINGS, type InboundPerHost } from "./admission.js";
import { fewerProtocolMerges, type MergeCounts } from "./protocol-merges.js";

export interface MeshNodeOptions {
  /** This host's Nix signing key, also its libp2p identity. */
  key: SecretKey;
  /** Nix public keys of the fleet: the only peers allowed in or out. Our own is implied. */
  trusted: readonly PublicKey[];
  /** "0.0.0.0:37516", "[::]:37516" or a multiaddr ("/ip4/127.0.0.1/tcp/0"). */
  listen: string;
  log: Logger;
  /** Discover peers by multicast DNS and dial the trusted ones (default off). */
  mdns?: boolean;
  /** Further discovery modules (static peers, Tailscale: fleet-discovery.ts); their finds are dialed as mDNS ones are. */
  discovery?: PeerDiscovery[];
  /** Told of every connection refused after the handshake because the remote's key is not trusted. */
  onRefused?: RefusedPeer;
  /** Trusted peers to refuse for now (penalised: over a per-peer limit). */
  denied?: DeniedPeer;
  /**
   * How often libp2p's connection monitor pings every connection (default 10 s). It is the mesh's
   * only pinger: it measures each connection's RTT (`Connection.rtt`) and closes a connection
   * whose ping fails, which is how a peer that vanished without a FIN is dropped.
   */
  pingIntervalMs?: number;
  /** Counts inbound sockets per remote host before their handshake (and the ones it refused). */
  admission?: InboundPerHost;
}

export const DEFAULT_PING_INTERVAL_MS = 10_000;

/**
 * The ping interval unless the caller sets one: FLEETCACHE_PING_INTERVAL_MS (not a setting: the
 * fault suite's soak runs agents at an accelerated rate with it), else the default.
 */
function pingIntervalFromEnv(): number {
  const ms = Number(process.env.FLEETCACHE_PING_INTERVAL_MS);
  return Number.isFinite(ms) && ms >= 100 ? ms : DEFAULT_PING_INTERVAL_MS;
}

/**
 * The connection monitor's settings. A ping may take up to 80 % of the interval: long enough that
 * a slow or saturated link keeps its connection, short enough that one ping always ends before
 * the next starts (the ping protocol allows one outbound stream per connection; an overlapping
 * ping fails and the monitor would close a healthy connection). A dead peer is thus dropped
 * within 1.8 intervals.
 */
export function connectionMonitorSettings(pingIntervalMs = DEFAULT_PING_INTERVAL_MS) {
  const timeout = Math.round(pingIntervalMs * 0.8);
  return { pingInterval: pingIntervalMs, pingTimeout: { minTimeout: timeout, maxTimeout: timeout }, abortConnectionOnPingFailure: true };
}

export type MeshServices = { identify: Identify; ping: Ping };

/**
 * libp2p's own debug logs, unless DEBUG asks for them (DEBUG=libp2p:* shows them as usual).
 * libp2p makes a logger per connection (the debug module checks the terminal and colours each
 * time): about 7 % of the agent's CPU while a host floods the mesh port with sockets.
 */
const silentLog: Libp2pLogger = Object.assign(() => {}, { error: () => {}, trace: () => {}, enabled: false, newScope: () => silentLog });
const silentLogger: ComponentLogger = { forComponent: () => silentLog };

export interface MeshRequest {
  stream: Stream;
  reader: StreamReader;
  connection: Connection;
  /** Peer ID string of the caller (always a trusted one). */
  peerId: string;
  /** The caller's Nix public key. */
  peer: PublicKey;
}

/** Returns when done; the stream is then closed cleanly. A throw resets the stream instead. */
export type MeshHandler = (req: MeshRequest) => Promise<void>;

export interface MeshStream {
  stream: Stream;
  reader: StreamReader;
}

export interface MeshNode {
  readonly libp2p: Libp2p<MeshServices>;
  readonly peerId: PeerId;
  /** Peer ID string -> Nix public key, including our own. */
  readonly trusted: ReadonlyMap<string, PublicKey>;
  /** libp2p's per-stream peer store merges: how many went through, how many were skipped (protocol-merges.ts). */
  readonly protocolMerges: MergeCounts;
  /** Where peers can reach us, each ending in /p2p/<our peer id>. */
  addresses(): Multiaddr[];
  handle(protocol: string, handler: MeshHandler, opts?: StreamHandlerOptions): Promise<void>;
  /**
   * Opens a stream to a trusted peer (peer ID, its string, or a multiaddr); given several
   * protocols, the first the peer supports (stream.protocol says which).
   */
  open(peer: PeerId | Multiaddr | string, protocol: string | string[], opts?: AbortOptions): Promise<MeshStream>;
  stop(): Promise<void>;
}

export const MDNS_SERVICE_TAG = "_fleetcache._udp.local";

/** Streams queued while a new connection is being set up (see streamMuxers in createMeshNode). */
const MAX_EARLY_STREAMS = 256;

export async function createMeshNode(opts: MeshNodeOptions): Promise<MeshNode> {
  const { log } = opts;
  const privateKey = await libp2pPrivateKey(opts.key);
  // Our own key first, and its public half only: the map is handed to every protocol handler.
  const trusted = trustedPeers([{ name: opts.key.name, publicKey: opts.key.publicKey }, ...opts.trusted]);
  const self = [...trusted.keys()][0]!;

  const libp2p = await createLibp2p<MeshServices>({
    privateKey,
    ...(process.env.DEBUG ? {} : { logger: silentLogger }),
    addresses: { listen: [meshListenAddr(opts.listen).toString()] },
    transports: [tcp()],
    // Same noise protocol and keys; the cipher calls copy less (noise-crypto.ts), and incoming
    // messages reach the library whole, one buffer each (noise-framing.ts).
    connectionEncrypters: [framedNoise()],
    // A bounded per-stream window bounds what is in flight when a reader pauses (stream-io.ts).
    // The initial window stays yamux's 256 KiB: a sender assumes it of its peer, and a peer on
    // an older version would reset a stream that overran it (BENCHMARKS.md, "Mesh transfer").
    // Streams a peer opens before this side has set the new connection up ("early") are queued,
    // and past yamux's default of 10 the whole connection is aborted (MaxEarlyStreamsError): Nix's
    // burst of 25+ parallel narinfo lookups right after a (re)connect did that. The per-protocol
    // limits (64 narinfo streams, 8 NAR transfers per peer) apply once the streams are handed over.
    streamMuxers: [yamux({ maxEarlyStreams: MAX_EARLY_STREAMS, streamOptions: { maxStreamWindowSize: MAX_STREAM_WINDOW } })],
    connectionGater: meshGater(self, trusted, opts.onRefused, opts.denied, opts.admission),
    peerDiscovery: [...(opts.mdns ? [mdns({ serviceTag: MDNS_SERVICE_TAG })] : []), ...(opts.discovery ?? []).map((d) => () => d)],
    connectionMonitor: connectionMonitorSettings(opts.pingIntervalMs ?? pingIntervalFromEnv()),
    // Short handshake deadline, a pending queue sized for a fleet (admission.ts); the gater
    // limits sockets per remote host.
    connectionManager: INBOUND_CONNECTION_SETTINGS,
    // Answers the monitor's pings; nothing else here pings (see connectionMonitorSettings).
    services: { identify: identify(), ping: ping() },
  });

  // Discovery modules only report peers; dialing is up to us (the peer manager redials those
  // that drop). Untrusted ones are not worth a handshake.
  libp2p.addEventListener("peer:discovery", (evt) => {
    const id = evt.detail.id;
    if (!trusted.has(id.toString()) || id.toString() === self) return;
    if (libp2p.getConnections(id).length > 0) return;
    libp2p.dial(id).then(
      () => log.debug({ peer: id.toString() }, "mesh: connected to discovered peer"),
      (err: unknown) => log.debug({ peer: id.toString(), err }, "mesh: dialing discovered peer failed"),
    );
  });

  // Each stream opened or accepted merges its protocol into the peer store; once in a while is enough.
  const protocolMerges = fewerProtocolMerges(libp2p);

  await libp2p.start();
  log.info({ peerId: self, addrs: libp2p.getMultiaddrs().map(String) }, "mesh: listening");

  return {
    libp2p,
    peerId: libp2p.peerId,
    trusted,
    protocolMerges,
    addresses: () => libp2p.getMultiaddrs(),
    async handle(protocol, handler, handlerOpts) {
      await libp2p.handle(
        protocol,
        async (stream, connection) => {
          const peerId = connection.remotePeer.toString();
          const peer = trusted.get(peerId);
          if (!peer) {
            // Unreachable while the gater holds; never serve an unknown peer if it does not.
            stream.abort(new Error("untrusted peer"));
            return;
          }
          const reader = new StreamReader(stream);
          try {
            await handler({ stream, reader, connection, peerId, peer });
            await stream.close();
          } catch (err) {
            // A reset, not a clean close, so the caller cannot take a partial answer as whole.
            log.debug({ protocol, peer: peer.name, err }, "mesh: handler failed; resetting stream");
            stream.abort(err instanceof Error ? err : new Error(String(err)));
          }
        },
        handlerOpts,
      );
    },
    async open(peer, protocol, dialOpts) {
      const target = typeof peer === "string" ? multiaddrOrPeer(peer) : peer;
      const stream = await libp2p.dialProtocol(target, protocol, dialOpts);
      return { stream, reader: new StreamReader(stream) };
    },
    async stop() {
      await libp2p.stop();
    },
  };
}

function multiaddrOrPeer(s: string): Multiaddr | PeerId {
  return s.startsWith("/") ? multiaddr(s) : peerIdFromString(s);
}
