// Store paths of every shape the cache must serve, made with the real Nix in a chroot store.
import { chmodSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { parseNarinfo } from "../../protocol/narinfo.js";
import { hashPartOf } from "../../protocol/store-path.js";
import { startAgentProcess, type AgentProcess } from "./agent.js";
import { addToStore, buildInStore, dumpPath, hasNix, run, tempDir } from "./nix.js";

export interface ShapesClosure {
  /** Every store path made, the closure's roots and their dependencies. */
  paths: string[];
  tree: string; // a directory with every kind of entry
  singleFile: string;
  executableFile: string;
  symlinkPath: string; // a store path that is itself a symlink
  built: string; // a built output with references, a deriver and a build log
  builtDep: string;
  builtSymlink: string; // a built output that is a symlink into another path
}

/** Makes the tree of every entry kind under `dir` (which must not exist). */
export function makeShapesTree(dir: string): void {
  mkdirSync(dir);
  const f = (p: string, content: string | Buffer, mode?: number) => {
    writeFileSync(join(dir, p), content);
    if (mode !== undefined) chmodSync(join(dir, p), mode);
  };
  f("hello.txt", "hello, fleet\n");
  f("run.sh", "#!/bin/sh\necho run\n", 0o755);
  f("empty", "");
  f("eight", "12345678");
  f("odd", "1234567890123");
  mkdirSync(join(dir, "empty-dir"));
  mkdirSync(join(dir, "sub"));
  f("sub/inner", "inner\n");
  symlinkSync("hello.txt", join(dir, "rel-link"));
  symlinkSync("/nix/store", join(dir, "abs-link"));
  symlinkSync("does/not/exist", join(dir, "dangling"));
  symlinkSync("sub", join(dir, "dir-link"));
  symlinkSync("../hello.txt", join(dir, "sub/up-link"));
  // Byte order, not locale order: uppercase before "_" before lowercase, "-" before ".".
  for (const name of ["B", "a", "_", "Z", "a.b", "a-b", "é", "日本", "ẞ", "zz"]) f(`n-${name}`, name);
  mkdirSync(join(dir, "order"));
  for (const name of ["b", "B", "a", "A", "_x", "-x", ".x", "x.", "~", "ä"]) writeFileSync(join(dir, "order", name), name);
  let deep = join(dir, "deep");
  for (let i = 0; i < 60; i++) {
    deep = join(deep, `level${i}`);
    mkdirSync(deep, { recursive: true });
  }
  writeFileSync(join(deep, "bottom"), "bottom\n");
  // A name that is not valid UTF-8: Nix names are bytes.
  writeFileSync(Buffer.concat([Buffer.from(join(dir, "n-")), Buffer.from([0xff, 0xfe])]), "not utf-8");
  f("binary.bin", Buffer.from(Array.from({ length: 4099 }, (_, i) => (i * 7919) & 0xff)));
}

/** Adds every shape to the chroot store at `root`; `work` is a scratch directory. */
export async function makeShapesClosure(root: string, work: string): Promise<ShapesClosure> {
  const treeDir = join(work, "shapes");
  makeShapesTree(treeDir);
  writeFileSync(join(work, "single.txt"), "a store path that is a single file\n");
  writeFileSync(join(work, "tool"), "#!/bin/sh\necho tool\n", { mode: 0o755 });
  symlinkSync("/nix/store/nonexistent-target", join(work, "link"));
  const expr = join(work, "closure.nix");
  writeFileSync(
    expr,
    `let
  sh = "/bin/sh";
  mk = name: script: derivation { inherit name; system = builtins.currentSystem; builder = sh; args = [ "-c" script ]; };
  dep = mk "fleetcache-dep" "/bin/mkdir $out; echo dependency > $out/data; echo built dep";
  top = mk "fleetcache-top" "/bin/mkdir -p $out/bin; echo ${"$"}{dep} > $out/ref; echo $out > $out/self; echo building top; echo line two >&2";
  link = mk "fleetcache-link" "/bin/ln -s ${"$"}{dep}/data $out";
in [ top dep link ]
`,
  );
  const [built, builtDep, builtSymlink] = await buildInStore(root, expr);
  const tree = await addToStore(root, treeDir);
  const singleFile = await addToStore(root, join(work, "single.txt"));
  const executableFile = await addToStore(root, join(work, "tool"));
  const symlinkPath = await addToStore(root, join(work, "link"));
  const closure = { tree, singleFile, executableFile, symlinkPath, built: built!, builtDep: builtDep!, builtSymlink: builtSymlink! };
  return { ...closure, paths: Object.values(closure) };
}

export interface ShapesAgent {
  dir: string;
  storeRoot: string;
  closure: ShapesClosure;
  agent: AgentProcess;
  /** The agent's public key "name:base64" (a key made by nix-store --generate-binary-cache-key). */
  publicKey: string;
  stop(): Promise<void>;
}

/**
 * A chroot store holding the shapes closure, served by a real agent signing with a Nix-made key.
 * Undefined when Nix is missing (locally); under CI=true a missing Nix is an error.
 */
export async function startShapesAgent(): Promise<ShapesAgent | undefined> {
  if (!(await hasNix())) {
    if (process.env.CI === "true") throw new Error("real Nix is required under CI=true");
    return undefined;
  }
  const tmp = tempDir();
  const storeRoot = join(tmp.dir, "store");
  const closure = await makeShapesClosure(storeRoot, tmp.dir);
  await run("nix-store", ["--generate-binary-cache-key", "shapes-test-1", join(tmp.dir, "sec"), join(tmp.dir, "pub")]);
  const publicKey = readFileSync(join(tmp.dir, "pub"), "utf8").trim();
  const agent = await startAgentProcess(["--store-root", storeRoot, "--sign-key", join(tmp.dir, "sec"), "--state-dir", join(tmp.dir, "state")]);
  return {
    dir: tmp.dir,
    storeRoot,
    closure,
    agent,
    publicKey,
    async stop() {
      await agent.stop();
      tmp.cleanup();
    },
  };
}

/**
 * What the HTTP tests ask a shapes agent. `current` is read at each call, as the agent is only
 * started in before() (and is undefined when Nix is missing).
 */
export function shapesHttp(current: () => ShapesAgent | undefined) {
  const get = (path: string, init?: RequestInit) => fetch(current()!.agent.url + path, init);
  return {
    get,
    /** False, with the test skipped, when there is no agent. */
    ready(t: { skip: (m: string) => void }): boolean {
      if (current()) return true;
      t.skip("nix not installed");
      return false;
    },
    /** The NAR URL the agent's narinfo for `storePath` gives, with its leading "/". */
    async narUrlOf(storePath: string): Promise<string> {
      return "/" + parseNarinfo(await (await get(`/${hashPartOf(storePath)}.narinfo`)).text()).url;
    },
    /** The NAR of `storePath` as nix-store --dump writes it. */
    async fullNar(storePath: string): Promise<Buffer> {
      const s = dumpPath(current()!.storeRoot, storePath);
      const chunks: Buffer[] = [];
      for await (const c of s) chunks.push(c as Buffer);
      await s.done;
      return Buffer.concat(chunks);
    },
  };
}

/** A chroot store with a plain file (no references) and a built path referring to two others and itself. */
export async function plainAndBuiltPaths(dir: string): Promise<{ root: string; paths: string[] }> {
  const root = join(dir, "store");
  writeFileSync(join(dir, "plain.txt"), "plain\n");
  const plain = await addToStore(root, join(dir, "plain.txt"));
  writeFileSync(
    join(dir, "refs.nix"),
    `let a = builtins.toFile "dep-a" "a"; b = builtins.toFile "dep-b" "b"; in
     derivation { name = "with-refs"; system = builtins.currentSystem; builder = "/bin/sh";
       args = [ "-c" "echo \${b} \${a} > $out; echo $out >> $out" ]; }`,
  );
  const [built] = await buildInStore(root, join(dir, "refs.nix"));
  return { root, paths: [plain, built!] };
}
