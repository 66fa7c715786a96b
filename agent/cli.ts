#!/usr/bin/env node
// The fleetcache command: `agent` runs the daemon, `keygen` makes a signing key, and `status`,
// `doctor` and `prefetch` are the operator's tools that talk to a running agent.
import { writeFileSync } from "node:fs";
import { Command } from "commander";
import { formatPublicKey, generateKeyPair } from "../protocol/keys.js";
import { startAgent } from "./agent.js";
import { UsageError } from "./commands/agent-client.js";
import { runDoctor } from "./commands/doctor.js";
import { runPrefetch } from "./commands/prefetch.js";
import { runStatus } from "./commands/status.js";
import { ConfigError, DEFAULT_P2P_PORT, DEFAULT_PORT, loadConfig } from "./config.js";
import { readSecretKeyFile, writeSecretKeyFile } from "./keys-file.js";
import { createLogger } from "./log.js";
import { VERSION } from "./version.js";

// Exit codes: 0 ok, 1 runtime failure, 2 usage or configuration error (as commander does).
const EXIT_FAILURE = 1;
const EXIT_USAGE = 2;

const collect = (value: string, previous: string[] = []): string[] => [...previous, value];

const program = new Command()
  .name("fleetcache")
  .description("A binary cache for Nix fleets: serves this host's store to Nix, and later the fleet's.")
  .version(VERSION)
  .showHelpAfterError()
  .exitOverride((err) => process.exit(err.exitCode === 0 ? 0 : EXIT_USAGE));

program
  .command("agent")
  .description("Run the agent: serve this host's Nix store as a signed binary cache")
  .option("--config <file>", "TOML config file (env FLEETCACHE_CONFIG)")
  .option("--listen <addr:port>", `HTTP listen address (env FLEETCACHE_LISTEN; default 127.0.0.1:${DEFAULT_PORT})`)
  .option("--store-root <dir>", "root of the Nix store's filesystem; DIR for a chroot store (env FLEETCACHE_STORE_ROOT; default /)")
  .option("--sign-key <file>", "secret key file to sign with, repeatable (env FLEETCACHE_SIGN_KEY, comma-separated; default: the host key in the state directory)", collect)
  .option("--state-dir <dir>", "state directory (env FLEETCACHE_STATE_DIR; default /var/lib/fleetcache)")
  .option("--priority <n>", "cache priority announced to Nix; lower is asked first (env FLEETCACHE_PRIORITY; default 30)")
  .option("--p2p-listen <addr:port>", `mesh (libp2p) listen address: IP:PORT ([::]:PORT for IPv6), a TCP multiaddr, or "off" (env FLEETCACHE_P2P_LISTEN; default 0.0.0.0:${DEFAULT_P2P_PORT})`)
  .option("--peer <addr:port>", "a peer agent to dial (its mesh address or multiaddr), repeatable (env FLEETCACHE_PEERS, comma-separated)", collect)
  .option("--trusted-key <name:base64>", "Nix public key of a fleet member, repeatable (env FLEETCACHE_TRUSTED_KEYS, comma-separated)", collect)
  .option("--mdns", "find peers on the LAN by multicast DNS (env FLEETCACHE_MDNS; default on)")
  .option("--no-mdns", "do not use multicast DNS")
  .option("--tailscale", "dial the online peers listed by `tailscale status --json` (env FLEETCACHE_TAILSCALE; default off)")
  .option("--no-tailscale", "do not use Tailscale discovery")
  .option("--tailscale-status-file <file>", "read the Tailscale status from this file instead of running tailscale (env FLEETCACHE_TAILSCALE_STATUS_FILE)")
  .option("--store-backend <backend>", "where store metadata comes from: database (Nix's SQLite, needs write access to its directory: root), daemon (the Nix daemon's socket, for an unprivileged agent) or auto (database when its directory is writable, else daemon) (env FLEETCACHE_STORE_BACKEND; default auto)")
  .option("--daemon-socket <path>", "the Nix daemon's socket for the daemon backend (env FLEETCACHE_DAEMON_SOCKET; default <store-root>/nix/var/nix/daemon-socket/socket)")
  .option("--use-case-hack", "the store was written with Nix's use-case-hack (names on disk may end in ~nix~case~hack~N): serve the names Nix's NARs have (env FLEETCACHE_USE_CASE_HACK; default as Nix: on for macOS, off elsewhere)")
  .option("--no-use-case-hack", "serve the names on disk as they are")
  .option("--mesh-compression <mode>", "compress NAR transfers between agents with zstd: auto (when the link from the peer is slow, under 40 MB/s measured, or its ping is 5 ms or more before any measurement), zstd (whenever the peer can) or off (env FLEETCACHE_MESH_COMPRESSION; default auto)")
  .option("--mesh-bulk", "send and take NAR bodies between agents on the bulk port (mesh port + 1: TLS 1.3 keyed by one-time tickets given over the mesh), falling back to the mesh stream where it cannot be reached (env FLEETCACHE_MESH_BULK; default on)")
  .option("--no-mesh-bulk", "NAR bodies on the mesh stream only; no bulk port")
  .option("--sendfile", "send NAR file contents from this host's store with sendfile(2), when the native addon is built (env FLEETCACHE_SENDFILE; default on)")
  .option("--no-sendfile", "read NAR file contents into pooled buffers and write them")
  .option("--direct-lan", "trusted LANs only: serve NARs to peers' Nix on a plain-HTTP direct port (mesh port + 2, one-time tickets) and answer Nix's NAR requests for paths an on-link peer holds with a redirect to that peer's direct port; NAR bytes then cross the LAN unencrypted and are checked by Nix alone (env FLEETCACHE_DIRECT_LAN; default off)")
  .option("--no-direct-lan", "relay and verify every peer's NAR (no direct port)")
  .option("--summary-budget <keys>", "summary keys a peer may send in a burst (then 20,000 a second); a peer over it is disconnected and refused for a while (env FLEETCACHE_SUMMARY_BUDGET; default 8454144: two snapshots of the largest summary)")
  .option("--reconnect-wait <seconds>", "how long a lookup waits for a peer that just disconnected (an agent restarting) when it alone holds the path, before answering 404 (env FLEETCACHE_RECONNECT_WAIT; default 5; 0: at once)")
  .option("--upstream-key <name:base64>", "Nix public key of an upstream cache this host trusts (cache.nixos.org-1:...), repeatable: a peer's narinfo for a path such a key signed is used only with that signature; fleet keys alone suffice only for paths no upstream signed (env FLEETCACHE_UPSTREAM_KEYS, comma-separated; default: Nix's trusted-public-keys that are not fleet keys; \"none\" for none)", collect)
  .option("--upstream-cache <url>", "upstream binary cache (https://, http:// or file://) asked whether it signed a path before a peer's narinfo signed by fleet keys alone is used, repeatable (env FLEETCACHE_UPSTREAM_CACHES, comma-separated; default none: no check)", collect)
  .option("--check-config", "validate the configuration and key files, print the result as JSON, and exit")
  .action(async (opts: Record<string, unknown>) => {
    const log = createLogger();
    let config;
    try {
      config = loadConfig({
        configFile: opts.config as string | undefined,
        flags: {
          listen: opts.listen,
          storeRoot: opts.storeRoot,
          signKeyFiles: opts.signKey,
          stateDir: opts.stateDir,
          priority: opts.priority,
          p2pListen: opts.p2pListen,
          peers: opts.peer,
          trustedKeys: opts.trustedKey,
          mdns: opts.mdns,
          tailscale: opts.tailscale,
          tailscaleStatusFile: opts.tailscaleStatusFile,
          storeBackend: opts.storeBackend,
          daemonSocket: opts.daemonSocket,
          useCaseHack: opts.useCaseHack,
          summaryBudget: opts.summaryBudget,
          reconnectWait: opts.reconnectWait,
          upstreamKeys: opts.upstreamKey,
          upstreamCaches: opts.upstreamCache,
          meshCompression: opts.meshCompression,
          meshBulk: opts.meshBulk,
          sendfile: opts.sendfile,
          directLan: opts.directLan,
        },
      });
    } catch (e) {
      if (!(e instanceof ConfigError)) throw e;
      process.stderr.write(`fleetcache: ${e.message}\n`);
      process.exit(EXIT_USAGE);
    }
    if (opts.checkConfig) {
      try {
        for (const f of config.signKeyFiles) readSecretKeyFile(f);
      } catch (e) {
        process.stderr.write(`fleetcache: ${(e as Error).message}\n`);
        process.exit(EXIT_USAGE);
      }
      process.stdout.write(JSON.stringify(config, null, 2) + "\n");
      return;
    }
    let agent;
    try {
      agent = await startAgent(config, log);
    } catch (e) {
      log.fatal({ err: (e as Error).message }, "agent failed to start");
      await new Promise((r) => setTimeout(r, 100)); // let the pretty transport (a worker thread) flush
      process.exit(EXIT_FAILURE);
    }
    const shutdown = async (signal: string) => {
      log.info({ signal }, "shutting down");
      await agent.stop();
      process.exit(0);
    };
    process.once("SIGTERM", () => void shutdown("SIGTERM"));
    process.once("SIGINT", () => void shutdown("SIGINT"));
  });

program
  .command("keygen")
  .description("Write a new secret signing key in Nix's format and print its public key")
  .argument("<name>", "key name, conventionally <host or cache>-1")
  .requiredOption("--out <file>", "where to write the secret key (mode 0600)")
  .option("--public-out <file>", "also write the public key to this file")
  .option("--force", "overwrite an existing file")
  .action((name: string, opts: { out: string; publicOut?: string; force?: boolean }) => {
    let key;
    try {
      key = generateKeyPair(name);
    } catch (e) {
      process.stderr.write(`fleetcache keygen: ${(e as Error).message}\n`);
      process.exit(EXIT_USAGE);
    }
    try {
      writeSecretKeyFile(opts.out, key, opts.force);
      if (opts.publicOut) writeFileSync(opts.publicOut, formatPublicKey(key));
    } catch (e) {
      process.stderr.write(`fleetcache keygen: ${(e as Error).message}\n`);
      process.exit(EXIT_FAILURE);
    }
    process.stdout.write(formatPublicKey(key) + "\n");
  });

/** Runs an operator command: its result is the exit code, and a UsageError exits 2. */
async function exitWith(name: string, run: () => Promise<number>): Promise<void> {
  try {
    process.exitCode = await run();
  } catch (e) {
    if (!(e instanceof UsageError)) throw e;
    process.stderr.write(`fleetcache ${name}: ${e.message}\n`);
    process.exitCode = EXIT_USAGE;
  }
}

const AGENT_OPTION = "the agent's HTTP URL (env FLEETCACHE_AGENT; default http://127.0.0.1:37515)";

program
  .command("status")
  .description("Show what the local agent sees: this host, its peers (connected, round-trip time, paths, traffic), lookup counters and recent errors")
  .option("--agent <url>", AGENT_OPTION)
  .option("--json", "print the agent's status document (GET /api/v1/status) as JSON")
  .addHelpText("after", "\nExit status: 0 the agent answered, 1 it did not (the message says what to check), 2 usage error.")
  .action((opts: { agent?: string; json?: boolean }) => exitWith("status", () => runStatus(opts)));

program
  .command("doctor")
  .description("Check that the agent works and that Nix uses it: one line per check, ok / warn / FAIL, with the fix")
  .option("--agent <url>", AGENT_OPTION)
  .option("--config <file>", "the agent's TOML config file, for its sign keys and fleet (env FLEETCACHE_CONFIG; FLEETCACHE_* variables apply too)")
  .option("--nix-conf <file>", "check this nix.conf alone instead of Nix's effective configuration (nix config show)")
  .option("--store-root <dir>", "check read access to the Nix database under DIR directly instead of asking the agent")
  .option("--json", "print the checks as JSON")
  .addHelpText("after", `
Checks: the agent answers (/health, /nix-cache-info); the store is readable; Nix lists the agent
among its substituters with a priority below cache.nixos.org's 40; Nix trusts this host's and
every fleet member's key, and no trusted key has a fleet member's name with other bytes (a
rotated key); narinfo-cache-negative-ttl is at most 60 s; the agent's use_case_hack equals Nix's
use-case-hack; the sign key files are not readable by group or others; each known peer is
connected. Nix's configuration is read with \`nix config show\` (\`nix show-config\` on Nix 2.8),
so NIX_CONF_DIR, NIX_USER_CONF_FILES and NIX_CONFIG apply; Nix's warnings about it (an unknown
setting) are shown as a nix-config warning.

Exit status: 0 no check failed (warnings allowed), 1 a check failed, 2 usage error.`)
  .action((opts: { agent?: string; config?: string; nixConf?: string; storeRoot?: string; json?: boolean }) => exitWith("doctor", () => runDoctor(opts)));

program
  .command("prefetch")
  .description("Bring store paths and their closures into the local store from the fleet, ahead of a deployment")
  .argument("<paths...>", "store paths (/nix/store/<hash>-<name>, optionally with a file inside), <hash>-<name>, or 32-character hash parts")
  .option("--agent <url>", AGENT_OPTION)
  .option("--store <store>", "the store to fill: a Nix store URI or a chroot store directory (default: Nix's default store)")
  .addHelpText("after", `
The agent resolves the closure (asking its peers), paths already present are skipped, and
\`nix copy --from <agent>\` brings in the rest. Nix checks signatures as its configuration says:
the fleet's keys must be in trusted-public-keys (for a one-off run, e.g.
NIX_CONFIG="extra-trusted-public-keys = host-1:BASE64..."). Progress goes to stderr: a bar on a
terminal, otherwise a line at each change (at least every 10 s) and a final "prefetch: done" line.

Exit status: 0 the closure is in the store, 1 a path is not in the fleet or nix copy failed,
2 usage error.`)
  .action((paths: string[], opts: { agent?: string; store?: string }) => exitWith("prefetch", () => runPrefetch(paths, opts)));

await program.parseAsync(process.argv);
