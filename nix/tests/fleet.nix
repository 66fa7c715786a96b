# NixOS VM test (flake check `fleet`): three machines run the agent from the NixOS module. `a`
# builds a path; `b` and `c` get it by asking their own localhost agent, which fetches it from a
# peer over the mesh (agents listen for HTTP on loopback only, so nothing else could serve it).
# The fleet keeps working across a restart of an agent and garbage collection.
#
# The keys in ./keys are for this test only.
{ nixosModule }:
{ lib, ... }:
let
  names = [ "a" "b" "c" ];
  publicKey = name: lib.fileContents (./keys + "/${name}.pub");
in
{
  name = "fleetcache-fleet";

  nodes = lib.genAttrs names (
    name:
    { config, nodes, pkgs, ... }:
    {
      imports = [ nixosModule ];

      services.fleetcache = {
        enable = true;
        # A string path outside the store, as agenix or sops-nix would give (the module refuses
        # a path literal): the file is put there below.
        signKeyFile = "/etc/fleetcache-test/sign-key";
        trustedKeys = map publicKey names;
        # Static peers by address; mDNS is left on as it would be on a LAN.
        peers = map (n: "${nodes.${n}.networking.primaryIPAddress}:37516") (lib.remove name names);
        openFirewall = true;
      };

      # The test network has no Internet: the agent is the only substituter.
      nix.settings.substituters = lib.mkForce [ config.services.fleetcache.substituterUrl ];
      nix.settings.experimental-features = [ "nix-command" ];

      # A test key, public anyway: here it may pass through the store. With a mode set, NixOS
      # copies the file into /etc (root-only) instead of linking to the store; systemd's
      # LoadCredential hands it to the agent.
      environment.etc."fleetcache-test/sign-key" = {
        source = ./keys + "/${name}.sec";
        mode = "0400";
      };

      environment.systemPackages = [ pkgs.jq pkgs.curl ];
      environment.etc."fleetcache-test/built.nix".text = ''
        { seed }:
        derivation {
          name = "built-on-${name}";
          system = builtins.currentSystem;
          builder = "/bin/sh";
          args = [ "-c" "echo built on ${name} ''${seed} > $out" ];
        }
      '';
    }
  );

  testScript = ''
    def status_ok(machine, jq_filter, timeout=60):
        machine.wait_until_succeeds(f"fleetcache status --json | jq -e '{jq_filter}'", timeout=timeout)

    def fetch(machine, path):
        machine.wait_until_succeeds(f"nix-store --realise {path}", timeout=60)
        machine.succeed(f"grep -q 'built on a' {path}")
        machine.succeed(f"nix-store --verify-path {path}")

    start_all()
    for m in (a, b, c):
        m.wait_for_unit("fleetcache.service")
        m.wait_for_open_port(37515)
    for m in (a, b, c):
        status_ok(m, "[.peers[] | select(.connected)] | length == 2")

    with subtest("the agent runs as its own user and Nix points at it"):
        a.succeed("test \"$(systemctl show -p User --value fleetcache.service)\" = fleetcache")
        # The key comes from outside the store (the module names the file, not a copy of it).
        a.succeed("grep -q 'LoadCredential=sign-key:/etc/fleetcache-test/sign-key' /etc/systemd/system/fleetcache.service")
        a.succeed("grep -E '^substituters = http://127.0.0.1:37515$' /etc/nix/nix.conf")
        a.succeed("grep -E '^narinfo-cache-negative-ttl = 30$' /etc/nix/nix.conf")
        a.succeed("grep -q fleetcache-test-b: /etc/nix/nix.conf")
        # HTTP is on loopback only: other hosts cannot reach it.
        b.fail("curl --fail --max-time 5 http://a:37515/nix-cache-info")

    out = a.succeed("nix-build --no-out-link --argstr seed \"$(date +%s%N)\" /etc/fleetcache-test/built.nix").strip()

    with subtest("b fetches a's build through its own agent, signed by a"):
        b.fail(f"test -e {out}")
        fetch(b, out)
        info = b.succeed(f"nix path-info --json {out}")
        assert "fleetcache-test-a:" in info, info
        status_ok(b, ".counters.narBytesFromPeers > 0")

    with subtest("an agent restart: the fleet reconnects and serves on"):
        a.systemctl("restart fleetcache.service")
        a.wait_for_unit("fleetcache.service")
        a.wait_for_open_port(37515)
        for m in (a, b, c):
            status_ok(m, "[.peers[] | select(.connected)] | length == 2")
        fetch(c, out)

    with subtest("garbage collection: a loses the path and gets it back from the fleet"):
        a.succeed(f"nix-store --delete {out}")
        a.fail(f"test -e {out}")
        fetch(a, out)

    with subtest("garbage collection of everything unrooted on b"):
        b.succeed("nix-collect-garbage")
        b.fail(f"test -e {out}")
        fetch(b, out)

    for m in (a, b, c):
        m.succeed("systemctl is-active fleetcache.service")
        m.fail("journalctl -u fleetcache.service | grep -i 'uncaught\\|fatal'")
  '';
}
