# The fleetcache agent and CLI, built from this repository with nixpkgs' buildNpmPackage.
{
  lib,
  stdenv,
  buildNpmPackage,
  nodejs_24,
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

  # The hash of the npm dependencies in package-lock.json, for package-lock.json with
  # sha256 816c9079445f9b124de0ae7cd3a4a21b45f229aaa61804a291957794f6b5bef5 (a test compares).
  # After changing the lock file, set it to lib.fakeHash, build, copy the hash Nix reports, and
  # update the sha256 above. The lock file must keep its "resolved" URLs (see .npmrc).
  npmDepsHash = "sha256-+TJlZHP+PbsMV2djXTh8FyBfM37fQd0uQ4oere8HlZM=";

  # The active LTS line, the one the tests run on (.ci/run) and package.json's engines name.
  nodejs = nodejs_24;

  # better-sqlite3 is a native addon: npm rebuild compiles it with node-gyp from its source (no
  # prebuilt binary is downloaded in the sandbox). buildNpmPackage brings node-gyp's Python (and
  # cctools on macOS); gyp also calls xcrun on macOS.
  nativeBuildInputs = lib.optionals stdenv.hostPlatform.isDarwin [ xcbuild ];

  # `npm run build` (tsc) is the build phase. The install phase keeps the files that package.json
  # lists, prunes dev dependencies and links bin/fleetcache; its `npm pack` would run the
  # `prepare` script (tsc again) without this.
  npmPackFlags = [ "--ignore-scripts" ];

  meta = {
    description = packageJson.description;
    license = lib.licenses.mit;
    mainProgram = "fleetcache";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
