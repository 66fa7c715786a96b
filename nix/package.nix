# The fleetcache agent and CLI, built from this repository with nixpkgs' buildNpmPackage.
{
  lib,
  stdenv,
  buildNpmPackage,
  nodejs_22,
  python3,
  cctools,
  xcbuild,
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
    ];
  };

  # The hash of the npm dependencies in package-lock.json. After changing the lock file, set it
  # to lib.fakeHash, build, and copy the hash Nix reports.
  npmDepsHash = "@NPM_DEPS_HASH@";

  # libp2p's dependencies ask for Node 22 or later (they run on 20, but 22 is what they test).
  nodejs = nodejs_22;

  # better-sqlite3 is a native addon: npm rebuild compiles it with node-gyp from its source
  # (no prebuilt binary is downloaded in the sandbox), which needs Python, and on macOS the
  # Xcode-like tools that gyp calls.
  nativeBuildInputs = [ python3 ] ++ lib.optionals stdenv.hostPlatform.isDarwin [ cctools xcbuild ];

  # `npm run build` (tsc) is the default build phase; the install phase keeps the files that
  # package.json lists, prunes dev dependencies and links bin/fleetcache.

  meta = {
    description = packageJson.description;
    license = lib.licenses.mit;
    mainProgram = "fleetcache";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
