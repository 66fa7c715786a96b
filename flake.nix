{
  description = "fleetcache: every host's Nix store as a binary cache, shared across the fleet by a mesh of agents";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;
      systems = [ "x86_64-linux" "aarch64-linux" "x86_64-darwin" "aarch64-darwin" ];
      forAllSystems = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The modules default to this flake's package for the host's platform.
      withPackage = module: { pkgs, ... }: {
        imports = [ module ];
        services.fleetcache.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };
    in
    {
      overlays.default = final: prev: {
        fleetcache = final.callPackage ./nix/package.nix { };
      };

      packages = forAllSystems (pkgs: rec {
        fleetcache = pkgs.callPackage ./nix/package.nix { };
        default = fleetcache;
      });

      nixosModules.default = withPackage ./nix/modules/nixos.nix;
      nixosModules.fleetcache = self.nixosModules.default;
      darwinModules.default = withPackage ./nix/modules/darwin.nix;
      darwinModules.fleetcache = self.darwinModules.default;

      checks = forAllSystems (
        pkgs:
        { package = self.packages.${pkgs.stdenv.hostPlatform.system}.default; }
        // lib.optionalAttrs pkgs.stdenv.hostPlatform.isLinux {
          # Three NixOS machines: one builds, the others fetch through their localhost agents.
          fleet = pkgs.testers.runNixOSTest (import ./nix/tests/fleet.nix { nixosModule = self.nixosModules.default; });
        }
      );
    };
}
