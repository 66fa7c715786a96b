# The fleetcache agent and CLI, built from this repository with nixpkgs' buildNpmPackage.
{
  lib,
  stdenv,
  buildNpmPackage,
  nodejs_22,
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
  # sha256 7aa7f95ebc823e54b9f7dcd7b1355722ea905a71ab5a7f83d4f0839d2588f610 (a test compares).
  # After changing the lock file, set it to lib.fakeHash, build, copy the hash Nix reports, and
  # update the sha256 above. The lock file must keep its "resolved" URLs (see .npmrc).
  npmDepsHash = "sha256-pI/wdWKbsa1ZHPj4eiyNSU3tVtZ6273iMdS8FHuRYz0=";

  # Node 20 is end-of-life (nixpkgs marks it insecure), and a libp2p dependency asks for 22.
  nodejs = nodejs_22;

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
