# Options and configuration shared by the NixOS and nix-darwin modules: what the agent is told
# (its TOML configuration) and how this host's Nix is pointed at it. How the agent runs (systemd
# or launchd, which user) is in nixos.nix and darwin.nix.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkDefault mkIf mkOption types;
  cfg = config.services.fleetcache;
  toTOML = import ../lib/to-toml.nix;

  # The URL Nix uses: the agent's own listen address, with a wildcard host reached on loopback.
  substituterUrl =
    let
      listen = cfg.settings.listen;
      bracketed = builtins.match "[[](.*)[]]:([0-9]+)" listen;
      plain = builtins.match "(.*):([0-9]+)" listen;
      host = if bracketed != null then builtins.elemAt bracketed 0 else builtins.elemAt plain 0;
      port = if bracketed != null then builtins.elemAt bracketed 1 else builtins.elemAt plain 1;
      reachable = { "0.0.0.0" = "127.0.0.1"; "::" = "::1"; }.${host} or host;
    in
    if bracketed == null && plain == null then throw "services.fleetcache.listen: expected HOST:PORT, got ${listen}"
    else if lib.hasInfix ":" reachable then "http://[${reachable}]:${port}"
    else "http://${reachable}:${port}";

  settingValue = types.nullOr (types.oneOf [ types.bool types.int types.str (types.listOf types.str) ]);

  # A key in the Nix store is readable by every user of the host, and the agent serves store
  # paths to the fleet: a path literal is copied there, and so is a string made from one.
  keyInStore =
    let k = cfg.signKeyFile;
    in k != null && (builtins.isPath k || builtins.hasContext k || lib.hasPrefix "${builtins.storeDir}/" k);
in
{
  options.services.fleetcache = {
    enable = lib.mkEnableOption "the fleetcache agent, which serves this host's Nix store as a binary cache on localhost and fetches what the fleet's other hosts hold";

    package = lib.mkPackageOption pkgs "fleetcache" { };

    listen = mkOption {
      type = types.str;
      default = "127.0.0.1:37515";
      description = ''
        Address and port of the binary cache that this host's Nix uses (HTTP). Keep it on
        loopback: every host runs its own agent, and hosts reach each other through the mesh
        port, which only lets in the fleet's keys.
      '';
    };

    p2pPort = mkOption {
      type = types.port;
      default = 37516;
      description = "TCP port, on every interface, where the fleet's agents connect to each other (libp2p, encrypted, keys checked).";
    };

    signKeyFile = mkOption {
      type = types.nullOr types.path;
      default = null;
      example = "/run/agenix/fleetcache-signing-key";
      description = ''
        Nix secret key file (NAME:BASE64, as written by `nix-store --generate-binary-cache-key`
        or `fleetcache keygen`) that the agent signs narinfos with and that is its identity in
        the mesh. It must be a string path outside the Nix store (an agenix or sops-nix
        secret, e.g. `config.age.secrets.fleetcache-key.path`): a path literal such as
        `./fleetcache.sec`, or a string made from one, would be copied into the world-readable
        store, and an assertion refuses it. null: the agent creates a host key in its state
        directory on first start (its public key is then in `/var/lib/fleetcache/host-key.pub`).
      '';
    };

    trustedKeys = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "web1:9yoAa4M8zgNU5jDhC5Q3xXn2x8L0O9CVd0cTq4HGyyY=" ];
      description = ''
        Public keys (NAME:BASE64) of the fleet's agents: the only peers let into the mesh, and
        the signatures a peer's narinfo must carry. Use the same list on every host, this host's
        own key included; with `configureNix`, Nix trusts these keys too.
      '';
    };

    upstreamKeys = mkOption {
      type = types.listOf types.str;
      default = lib.subtractLists cfg.trustedKeys
        ((config.nix.settings.trusted-public-keys or [ ]) ++ (config.nix.settings.extra-trusted-public-keys or [ ]));
      defaultText = lib.literalExpression "Nix's trusted-public-keys (nix.settings) without trustedKeys";
      example = [ "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=" ];
      description = ''
        Public keys of the upstream caches this host trusts (cache.nixos.org-1 and the like). A
        peer's narinfo for a path such a key signed is used only with that signature intact;
        fleet signatures alone suffice only for paths no upstream signed (the fleet's own
        builds). Fleet keys are never upstream keys. The default is what this host's Nix trusts
        besides the fleet, so a host that trusts cache.nixos.org is protected against a
        compromised fleet member re-signing its paths. See "Trust" in the README.
      '';
    };

    upstreamCaches = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "https://cache.nixos.org" ];
      description = ''
        Upstream caches (https://, http:// or file:// URLs) the agent asks, before it uses a
        peer's narinfo signed by fleet keys alone, whether they signed the path with other
        contents (one narinfo request per such path, remembered; an unreachable cache is
        skipped for 30 s). Without it, a compromised fleet member can still stand in for an
        upstream path that no other holder it is weighed against has with its upstream
        signature. Empty: no check, no traffic to upstream from the agent.
      '';
    };

    peers = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "build1.example.org:37516" "10.0.0.7:37516" ];
      description = "Agents to dial at start (HOST:PORT or multiaddrs). Others are found by mDNS, peer exchange and Tailscale.";
    };

    mdns = mkOption {
      type = types.bool;
      default = true;
      description = "Find the fleet's agents on the local network by multicast DNS.";
    };

    tailscale = mkOption {
      type = types.bool;
      default = false;
      description = "Dial the online peers that `tailscale status --json` lists (tailnets have no multicast).";
    };

    priority = mkOption {
      type = types.ints.between 0 10000;
      default = 30;
      description = "Priority announced in /nix-cache-info; Nix asks caches with lower numbers first (cache.nixos.org has 40).";
    };

    settings = mkOption {
      type = types.submodule { freeformType = types.attrsOf settingValue; };
      default = { };
      example = { state_dir = "/var/lib/fleetcache"; };
      description = ''
        The agent's configuration file, as TOML keys (see the configuration table in the README).
        The options above fill in their keys; a key set here wins over them. null leaves a key out.
      '';
    };

    configureNix = mkOption {
      type = types.bool;
      default = true;
      description = ''
        Point this host's Nix at the agent: add it to `nix.settings.substituters`, the
        `trustedKeys` to `trusted-public-keys`, and set `narinfo-cache-negative-ttl` to
        `narinfoCacheNegativeTtl`.
      '';
    };

    narinfoCacheNegativeTtl = mkOption {
      type = types.ints.unsigned;
      default = 30;
      example = 0;
      description = ''
        Seconds Nix remembers that a cache lacks a path (`narinfo-cache-negative-ttl`, set with
        `configureNix`; Nix's default is 3600). The setting is global: it applies to
        cache.nixos.org as much as to the agent. Within this time after a miss Nix does not
        ask again, so a path that a peer gains meanwhile is built or downloaded here instead.
        0 always asks again, but a Nix run then asks every cache about each path it builds
        about three times instead of once, and again on every dry run or retry (measured with
        Nix 2.8 by bench/negative-ttl.ts: 83 narinfo requests to upstream instead of 41 for a
        build of 21 local paths over 20 substituted ones). 30 s keeps one question per path
        within a run and lets the fleet's new paths be seen half a minute later at most.
      '';
    };

    configFile = mkOption {
      type = types.path;
      readOnly = true;
      description = "The generated TOML configuration (read-only).";
    };

    substituterUrl = mkOption {
      type = types.str;
      readOnly = true;
      description = "The URL this host's Nix reaches the agent at (read-only).";
    };
  };

  config = mkIf cfg.enable {
    assertions = [
      {
        assertion = !keyInStore;
        message = ''
          services.fleetcache.signKeyFile is in the Nix store (${toString cfg.signKeyFile}), where
          every user can read it (a path literal such as ./key.sec is copied there): the fleet's
          secret key would be world-readable. Give a string path outside the store instead, such as
          an agenix or sops-nix secret: signKeyFile = config.age.secrets.fleetcache-key.path; (or
          config.sops.secrets.fleetcache-key.path), or leave it null for a host key.'';
      }
    ];

    services.fleetcache.settings = {
      listen = mkDefault cfg.listen;
      p2p_listen = mkDefault "0.0.0.0:${toString cfg.p2pPort}";
      state_dir = mkDefault "/var/lib/fleetcache";
      peers = mkDefault cfg.peers;
      trusted_keys = mkDefault cfg.trustedKeys;
      upstream_keys = mkDefault cfg.upstreamKeys;
      upstream_caches = mkDefault cfg.upstreamCaches;
      mdns = mkDefault cfg.mdns;
      tailscale = mkDefault cfg.tailscale;
      priority = mkDefault cfg.priority;
    };

    # Built by evaluation alone (no builder), so `nix eval` shows it and tests can read it.
    services.fleetcache.configFile = builtins.toFile "fleetcache.toml" (toTOML cfg.settings);
    services.fleetcache.substituterUrl = substituterUrl;

    nix.settings = mkIf cfg.configureNix {
      substituters = [ substituterUrl ];
      trusted-public-keys = cfg.trustedKeys;
      narinfo-cache-negative-ttl = cfg.narinfoCacheNegativeTtl;
    };

    # `fleetcache status`, `doctor` and `prefetch` for operators.
    environment.systemPackages = [ cfg.package ];
  };
}
