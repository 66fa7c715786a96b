# NixOS module: services.fleetcache runs the agent as a hardened systemd service under its own
# user. Unprivileged, the agent asks the Nix daemon for metadata (the database is root's) and
# reads NARs straight from the world-readable store.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkIf mkOption optional optionals types;
  cfg = config.services.fleetcache;
in
{
  imports = [ ./common.nix ];

  options.services.fleetcache.openFirewall = mkOption {
    type = types.bool;
    default = false;
    description = "Open the mesh port (p2pPort, TCP), the bulk port next to it (p2pPort + 1, TCP) unless settings.mesh_bulk is false, the direct port (p2pPort + 2, TCP) when settings.direct_lan is true, and, when mdns is on, multicast DNS (UDP 5353) in the firewall.";
  };

  config = mkIf cfg.enable {
    users.users.fleetcache = {
      isSystemUser = true;
      group = "fleetcache";
      home = "/var/lib/fleetcache";
      description = "fleetcache agent";
    };
    users.groups.fleetcache = { };

    # The daemon serves only allowed-users; "extra-" adds to whatever list the host has.
    nix.settings.extra-allowed-users = [ "fleetcache" ];

    networking.firewall = mkIf cfg.openFirewall {
      # The bulk port (mesh port + 1) carries NAR bodies; closed, transfers fall back to the mesh port.
      allowedTCPPorts = [ cfg.p2pPort ] ++ optional (cfg.settings.mesh_bulk or true) (cfg.p2pPort + 1) ++ optional (cfg.settings.direct_lan or false) (cfg.p2pPort + 2);
      allowedUDPPorts = optional cfg.mdns 5353;
    };

    systemd.services.fleetcache = {
      description = "fleetcache agent: this host's Nix store as a binary cache, shared with the fleet";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" "nix-daemon.socket" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      restartTriggers = [ cfg.configFile ];
      path = optional cfg.tailscale config.services.tailscale.package;

      serviceConfig = {
        ExecStart = lib.escapeShellArgs (
          [ "${cfg.package}/bin/fleetcache" "agent" "--config" cfg.configFile ]
          # systemd copies the key into the service's credentials directory (%d), so the secret
          # itself can stay readable by root only.
          ++ optionals (cfg.signKeyFile != null) [ "--sign-key" "%d/sign-key" ]
        );
        # toString, not interpolation: a path literal (refused by an assertion) must not be
        # copied into the store while the unit is evaluated.
        LoadCredential = optional (cfg.signKeyFile != null) "sign-key:${toString cfg.signKeyFile}";
        User = "fleetcache";
        Group = "fleetcache";
        StateDirectory = "fleetcache";
        StateDirectoryMode = "0700";
        WorkingDirectory = "/var/lib/fleetcache";
        Restart = "on-failure";
        RestartSec = "2s";
        # Logs are JSON lines on stderr: the journal keeps them.
        StandardOutput = "journal";
        StandardError = "journal";
        LimitNOFILE = 65536;
        UMask = "0077";

        # Hardening: a read-only view of the system (the state directory is the only writable
        # place), no privileges, only the address families the agent uses: UNIX (daemon socket),
        # IPv4/IPv6 (HTTP, mesh, mDNS) and netlink (listing interfaces for mDNS and status).
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        # V8 compiles JavaScript to machine code at run time: denying W+X memory kills Node.
        MemoryDenyWriteExecute = false;
        CapabilityBoundingSet = "";
        AmbientCapabilities = "";
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" "~@privileged" ];
        SystemCallErrorNumber = "EPERM";
      };
    };
  };
}
