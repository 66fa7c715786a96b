# The fleetcache agent and CLI, built from this repository with nixpkgs' buildNpmPackage.
{
  lib,
  buildNpmPackage,
  nodejs_24,
  python3,
}:
let
  packageJson = lib.importJSON ../package.json;
in
buildNpmPackage {
  pname = "fleetcache";
  inherit (packageJson) version;

  # Only what the build reads: edits to tests, benchmarks or docs do not rebuild the package.
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../package.json
      ../package-lock.json
      ../tsconfig.json
      ../agent
      ../protocol
      ../binding.gyp
      ../native
    ];
  };

  # The hash of the npm dependencies in package-lock.json, for package-lock.json with
  # sha256 76d6dd5233e54f4bbd4f8f89e92af487202d314a10f0514624498c9131a99fe6 (a test compares).
  # After changing the lock file, set it to lib.fakeHash, build, copy the hash Nix reports, and
  # update the sha256 above. The lock file must keep its "resolved" URLs (see .npmrc).
  npmDepsHash = "sha256-bRxKpO5GVmu6+YbwT4CWFxUGUkZ+KSd5yQIcre7InqQ=";

  # The active LTS line, the one the tests run on (.ci/run) and package.json's engines name.
  nodejs = nodejs_24;

  # Two native addons, native/sendfile.c (NAR bodies with sendfile(2)) and native/file-version.c
  # (the daemon backend's fstat of Nix's database files; README "Set-up"), built
  # with node-gyp. npmConfigHook installs with --ignore-scripts, so package.json's install script
  # (node-gyp rebuild) does not run: it is built here after tsc. The hook sets
  # npm_config_nodedir to this nodejs's headers and npm_config_node_gyp to its bundled node-gyp,
  # so nothing is downloaded; node-gyp needs Python, and the stdenv's C compiler (gcc on Linux,
  # clang on macOS). The addons use N-API (and sendfile.c libuv's
  # stable 1.x API from Node's headers), so they do not depend on the Node release.
  # The agent reads Nix's database with Node's own node:sqlite: nothing else is compiled.
  nativeBuildInputs = [ python3 ];
  postBuild = ''
    node "$npm_config_node_gyp" rebuild
  '';

  # `npm run build` (tsc) is the build phase. The install phase keeps the files that package.json
  # lists, prunes dev dependencies and links bin/fleetcache; its `npm pack` would run the
  # `prepare` script (tsc again) without this.
  npmPackFlags = [ "--ignore-scripts" ];

  # V8's young generation capped at 2 x 16 MiB (Node 24's V8 grows it to 2 x 64 MiB under a
  # steady allocation rate, such as a busy mesh, and keeps it: some 100 MiB of RSS; FAULTS.md,
  # soak). It must be given when node starts, so in NODE_OPTIONS, ahead of any the operator sets
  # (a later --max-semi-space-size wins). The unit, the plist and the modules run this wrapper.
  postInstall = ''
    wrapProgram $out/bin/fleetcache --prefix NODE_OPTIONS " " "--max-semi-space-size=16"
  '';

  meta = {
    description = packageJson.description;
    license = lib.licenses.mit;
    mainProgram = "fleetcache";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
