# Evaluates one of our modules with nixpkgs' lib.evalModules and returns what the tests check.
# Without a NixOS or nix-darwin tree here, the options those systems declare (systemd, users,
# nix, networking, launchd ...) are taken as free-form values: our module's own option types,
# defaults, priorities and conditions are evaluated for real; the values it hands to the system
# are returned for inspection.
{ lib, module, configuration }:
let
  eval = lib.evalModules {
    modules = [
      module
      { freeformType = lib.types.lazyAttrsOf lib.types.anything; }
      # Declared as NixOS and nix-darwin declare it, so the module's entries are merged as there.
      { options.assertions = lib.mkOption { type = lib.types.listOf lib.types.unspecified; default = [ ]; }; }
      # No package set: tests give services.fleetcache.package (a derivation never built).
      { _module.args.pkgs = { }; }
      configuration
    ];
  };
  inherit (eval) config;
  cfg = config.services.fleetcache;
  # A value the module defined, or `default` where it defined none (an option whose only
  # definitions are under a false mkIf has no value, and reading it throws).
  get = path: default:
    let r = builtins.tryEval (let v = lib.attrByPath path default config; in builtins.deepSeq v v);
    in if r.success then r.value else default;
in
{
  settings = if cfg.enable then cfg.settings else null;
  substituterUrl = if cfg.enable then cfg.substituterUrl else null;
  configText = if cfg.enable then builtins.readFile cfg.configFile else null;
  nix = get [ "nix" ] { };
  users = get [ "users" ] { };
  firewall = get [ "networking" "firewall" ] null;
  systemd = get [ "systemd" "services" "fleetcache" ] null;
  launchd = get [ "launchd" "daemons" "fleetcache" ] null;
  activation = get [ "system" "activationScripts" "postActivation" "text" ] null;
  systemPackages = map (p: p.name) (get [ "environment" "systemPackages" ] [ ]);
  etc = builtins.attrNames (get [ "environment" "etc" ] { });
  # What the system would refuse to build with ("Failed assertions: ...").
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
}
