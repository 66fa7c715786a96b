# nix-darwin module: services.fleetcache runs the agent as a launchd daemon under its own hidden
# user, logging to /var/log. Unprivileged, the agent asks the Nix daemon for metadata and reads
# NARs straight from the world-readable store.
{ config, lib, pkgs, ... }:
let
  inherit (lib) mkIf mkOption optionals types;
  cfg = config.services.fleetcache;
  user = "_fleetcache";
  stateDir = cfg.settings.state_dir;
in
{
  imports = [ ./common.nix ];

  options.services.fleetcache = {
    uid = mkOption {
      type = types.int;
      default = 537;
      description = "User id of the `_fleetcache` user that nix-darwin creates for the agent.";
    };
    gid = mkOption {
      type = types.int;
      default = 537;
      description = "Group id of the `_fleetcache` group.";
    };
    logFile = mkOption {
      type = types.str;
      default = "/var/log/fleetcache.log";
      description = "Where launchd writes the agent's output (JSON lines); rotated by newsyslog.";
    };
  };

  config = mkIf cfg.enable {
    users.users.${user} = {
      uid = cfg.uid;
      gid = cfg.gid;
      home = stateDir;
      shell = "/usr/bin/false";
      isHidden = true;
      description = "fleetcache agent";
    };
    users.groups.${user} = {
      gid = cfg.gid;
      description = "fleetcache agent";
    };
    users.knownUsers = [ user ];
    users.knownGroups = [ user ];

    nix.settings.extra-allowed-users = [ user ];

    # launchd has no state directory or credentials: make the directory and log file the agent's.
    # A signKeyFile must be readable by _fleetcache (agenix/sops-nix: set the secret's owner).
    system.activationScripts.postActivation.text = ''
      install -d -m 0700 -o ${user} -g ${user} ${lib.escapeShellArg stateDir}
      touch ${lib.escapeShellArg cfg.logFile}
      chown ${user}:${user} ${lib.escapeShellArg cfg.logFile}
      chmod 0640 ${lib.escapeShellArg cfg.logFile}
    '';

    environment.etc."newsyslog.d/fleetcache.conf".text = ''
      # logfilename          [owner:group]      mode count size(KiB) when flags
      ${cfg.logFile} ${user}:${user} 640 7 10240 * J
    '';

    launchd.daemons.fleetcache.serviceConfig = {
      Label = "org.fleetcache.agent";
      ProgramArguments =
        [ "${cfg.package}/bin/fleetcache" "agent" "--config" "${cfg.configFile}" ]
        # toString: a path literal (refused by an assertion) is not copied into the store.
        ++ optionals (cfg.signKeyFile != null) [ "--sign-key" (toString cfg.signKeyFile) ];
      UserName = user;
      GroupName = user;
      WorkingDirectory = stateDir;
      RunAtLoad = true;
      # Restart when it exits with an error (launchd's "restart on failure").
      KeepAlive = { SuccessfulExit = false; };
      ThrottleInterval = 5;
      StandardOutPath = cfg.logFile;
      StandardErrorPath = cfg.logFile;
      SoftResourceLimits.NumberOfFiles = 65536;
      # launchd's PATH has no Nix profiles: the Tailscale CLI must be named.
      EnvironmentVariables.PATH = lib.concatStringsSep ":" (
        optionals cfg.tailscale [ "${config.services.tailscale.package}/bin" ] ++ [ "/usr/bin" "/bin" "/usr/sbin" "/sbin" ]
      );
    };
  };
}
