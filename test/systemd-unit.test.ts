// The shipped unit, nix/systemd/fleetcache.service, under a real systemd (booted as PID 1 in
// private namespaces, see helpers/systemd.ts): with every hardening line as shipped, the agent
// runs as a dynamic user, reaches the Nix daemon of a chroot store through its socket (the
// daemon backend: the database is root's), serves the store to the real `nix copy` with its
// signatures verified, follows store changes, keeps its host key in its StateDirectory, is
// restarted after a crash, logs to the journal, and signs with a key handed to it by
// LoadCredential (the unit's commented variant) with the mesh listening.
import { after, before, describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { chmodSync, existsSync, mkdirSync, readFileSync, statSync, writeFileSync } from "node:fs";
import { connect } from "node:net";
import { join, relative } from "node:path";
import { fileURLToPath } from "node:url";
import { CLI, freePort, keygen } from "./helpers/agent.js";
import { makeShapesClosure, type ShapesClosure } from "./helpers/fixtures.js";
import { NIX_FLAGS, hasNix, nix, pathInfo, run, tempDir } from "./helpers/nix.js";
import { SystemdNamespace, SystemdUnavailableError, skipOrThrow, sleep, systemdMissing } from "./helpers/systemd.js";

const UNIT_FILE = fileURLToPath(new URL("../../nix/systemd/fleetcache.service", import.meta.url));
const SHIPPED_PROGRAM = "/nix/var/nix/profiles/fleetcache/bin/fleetcache";
const SHIPPED_CONFIG = "--config /etc/fleetcache/config.toml";
/** Where the test's directory appears inside the namespace (outside /tmp: the unit has PrivateTmp). */
const NS_DIR = "/var/lib/fleetcache-systemd-test";
/** The repository (dist/, node_modules/), wherever it is checked out, appears read-only here. */
const REPO = fileURLToPath(new URL("../..", import.meta.url));
const NS_REPO = "/var/lib/fleetcache-systemd-test-repo";

/** The shipped unit with only the program and the configuration path replaced. */
function unitText(shipped: string, opts: { credential?: string } = {}): string {
  let text = shipped.replaceAll(SHIPPED_PROGRAM, `${NS_DIR}/bin/fleetcache`).replaceAll(SHIPPED_CONFIG, `--config ${NS_DIR}/config.toml`);
  if (opts.credential) {
    // The variant the unit's comment describes: uncomment its three lines.
    text = text
      .replace("#LoadCredential=sign-key:/etc/fleetcache/sign-key", `LoadCredential=sign-key:${opts.credential}`)
      .replace(/^#ExecStart=$/m, "ExecStart=")
      .replace(/^#ExecStart=(.*--sign-key %d\/sign-key)$/m, "ExecStart=$1");
  }
  return text;
}

/** The [Service] directives of a unit file, in order (repeated ones repeat). */
function serviceDirectives(text: string): [string, string][] {
  const out: [string, string][] = [];
  let section = "";
  for (const line of text.split("\n")) {
    const s = /^\[(\w+)\]$/.exec(line);
    if (s) section = s[1]!;
    const d = /^([A-Za-z]+)=(.*)$/.exec(line);
    if (d && section === "Service") out.push([d[1]!, d[2]!]);
  }
  return out;
}

async function waitFor<T>(what: string, probe: () => Promise<T | undefined>, ms = 30_000, detail: () => Promise<string> = async () => ""): Promise<T> {
  const deadline = Date.now() + ms;
  let last = "";
  while (Date.now() < deadline) {
    try {
      const v = await probe();
      if (v !== undefined) return v;
    } catch (e) {
      last = (e as Error).message;
    }
    await sleep(100);
  }
  throw new Error(`timed out waiting for ${what} (${last})\n${await detail().catch((e: Error) => e.message)}`);
}

async function getJson(url: string): Promise<any> {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: ${r.status}`);
  return r.json();
}

function tcpConnects(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(port, "127.0.0.1");
    s.once("connect", () => (s.destroy(), resolve(true)));
    s.once("error", () => resolve(false));
  });
}

// One systemd, one store and one agent for every test; each test checks one property of the
// running unit. The tests run in order: the later ones crash, restart and reconfigure it.
describe("the shipped systemd unit, hardening intact, runs the agent as a dynamic user serving a chroot store through the Nix daemon", { concurrency: false, timeout: 300_000 }, () => {
  /** Why these tests cannot run here (no Nix, no systemd in a namespace), if so. */
  let skipReason: string | undefined;
  let tmp: ReturnType<typeof tempDir> | undefined;
  let sd: SystemdNamespace | undefined;
  let ns: SystemdNamespace;
  let started = 0;
  let port = 0;
  let url = "";
  let shipped = "";
  let hostStore = "";
  let work = "";
  let closure: ShapesClosure;
  let expected: string[] = [];
  let allPaths = 0;
  /** Active units right after the boot, before the agent was started. */
  let bootUnits: string[] = [];
  let show: Record<string, string | undefined> = {};
  let mainPid = 0;
  let uid = 0;
  let hostKey = "";
  let writeConfig: (p2p?: string) => void = () => {};
  let nixHere: (cache: string, args: string[]) => Promise<string>;
  let diagnose: () => Promise<string> = async () => "";

  before(async () => {
    if (!(await hasNix())) {
      if (process.env.CI === "true") throw new Error("real Nix is required under CI=true but `nix` was not found");
      skipReason = "nix not installed";
      return;
    }
    skipReason = await systemdMissing();
    if (skipReason) return;
    // The repository is shown to the service at NS_REPO; node itself must be where it can see it.
    if (/^\/(home|root|run\/user|tmp|var\/tmp)\//.test(process.execPath)) {
      skipReason = `${process.execPath} is under a directory the unit's ProtectHome=yes or PrivateTmp=yes hides`;
      return;
    }

    tmp = tempDir("fleetcache-systemd-test-");
    const dir = tmp.dir;
    chmodSync(dir, 0o755);
    writeFileSync(join(dir, "sentinel"), "the host's /tmp must survive systemd\n");
    hostStore = join(dir, "store");
    const nsStore = `${NS_DIR}/store`;
    const socket = `${nsStore}/nix/var/nix/daemon-socket/socket`;
    port = await freePort();
    url = `http://127.0.0.1:${port}`;
    shipped = readFileSync(UNIT_FILE, "utf8");
    // Nix's own narinfo cache would remember the first key's signatures for the agent's URL.
    nixHere = (cache, args) => run("nix", [...NIX_FLAGS, ...args], { env: { XDG_CACHE_HOME: join(dir, cache) } });
    const nixDaemon = (await run("sh", ["-c", "command -v nix-daemon"])).trim();
    writeConfig = (p2p = "off") =>
      writeFileSync(join(dir, "config.toml"), `listen = "127.0.0.1:${port}"\nstore_root = "${nsStore}"\np2p_listen = "${p2p}"\nmdns = false\n`, { mode: 0o644 });

    // The program the unit starts: node with the agent built in this repository.
    mkdirSync(join(dir, "bin"));
    writeFileSync(join(dir, "bin/fleetcache"), `#!/bin/sh\nexec ${process.execPath} ${join(NS_REPO, relative(REPO, CLI))} "$@"\n`, { mode: 0o755 });
    writeConfig();
    mkdirSync(join(dir, "nix-conf"));
    mkdirSync(join(dir, "daemon-home"));
    writeFileSync(join(dir, "nix-conf/nix.conf"), "sandbox = false\nbuild-users-group =\nsubstituters =\n", { mode: 0o644 });

    const units: Record<string, string> = {
      // The boot target: journald only; the test starts the agent like an operator would.
      "fleetcache-test.target": "[Unit]\nDescription=fleetcache systemd-unit test\nDefaultDependencies=no\nWants=systemd-journald.socket systemd-journald.service\nAfter=systemd-journald.socket systemd-journald.service\n",
      // The unit wants nix-daemon.socket: here it is the chroot store's daemon, socket-activated.
      "nix-daemon.socket": `[Unit]\nDescription=Nix daemon socket (the test's chroot store)\n[Socket]\nListenStream=${socket}\nService=nix-daemon-test.service\n`,
      "nix-daemon-test.service": [
        "[Unit]",
        "Description=Nix daemon (the test's chroot store)",
        "Requires=nix-daemon.socket",
        "After=nix-daemon.socket",
        "[Service]",
        `ExecStart=${nixDaemon} --store ${nsStore}`,
        `Environment=NIX_DAEMON_SOCKET_PATH=${socket} NIX_CONF_DIR=${NS_DIR}/nix-conf HOME=${NS_DIR}/daemon-home`,
        "",
      ].join("\n"),
      "fleetcache.service": unitText(shipped),
    };

    started = Date.now();
    try {
      sd = await SystemdNamespace.boot({ hostDir: dir, nsDir: NS_DIR, units, hostReadOnly: REPO, nsReadOnly: NS_REPO });
    } catch (e) {
      if (e instanceof SystemdUnavailableError) {
        skipReason = e.message;
        return;
      }
      throw e;
    }
    ns = sd;
    diagnose = async () =>
      `${await ns.systemctl(["status", "--lines=0", "fleetcache.service", "nix-daemon-test.service", "nix-daemon.socket"]).catch((e: Error) => e.message)}\n` +
      `journal:\n${await ns.exec("journalctl", ["--no-pager", "-n", "60"]).catch((e: Error) => e.message)}`;
    bootUnits = await activeUnits();

    // A chroot store with a closure of every shape; its directories traversable by any user.
    work = join(dir, "work");
    mkdirSync(work);
    closure = await makeShapesClosure(hostStore, work);
    for (const d of ["", "nix", "nix/var", "nix/var/nix", "nix/var/nix/db"]) chmodSync(join(hostStore, d), 0o755);
    expected = (await pathInfo(hostStore, closure.paths, true)).map((i) => i.path).sort();
    allPaths = await nix(["path-info", "--store", hostStore, "--all"]).then((o) => o.trim().split("\n").length); // with the derivations

    await ns.systemctl(["start", "fleetcache.service"]);
    await waitFor("the agent's /nix-cache-info", async () => ((await fetch(`${url}/nix-cache-info`)).ok ? true : undefined), 30_000, diagnose);
    show = await ns.show("fleetcache.service", [
      ...new Set(serviceDirectives(shipped).map(([k]) => (k === "RestartSec" ? "RestartUSec" : k)).filter((k) => k !== "ExecStart")),
      "FragmentPath", "DropInPaths", "MainPID", "NRestarts", "ActiveState", "User",
    ]);
    mainPid = Number(show.MainPID);
    hostKey = (await ns.exec("cat", ["/var/lib/fleetcache/host-key.pub"])).trim();
  });

  after(async () => {
    if (!tmp) return;
    await sd?.stop();
    // Nothing of the test on the host: no state, no config, and the host's /tmp intact.
    const leftovers = ["/var/lib/fleetcache", "/var/lib/private/fleetcache", "/etc/fleetcache", NS_DIR].filter((p) => existsSync(p));
    const sentinel = existsSync(join(tmp.dir, "sentinel"));
    tmp.cleanup();
    assert.deepEqual(leftovers, []);
    assert.ok(sentinel, "the host's /tmp was not touched");
  });

  /** Skips (or, under CI, fails) when the setup could not run here. */
  function runs(t: TestContext): boolean {
    if (skipReason === undefined) return true;
    skipOrThrow(t, skipReason);
    return false;
  }

  async function activeUnits(): Promise<string[]> {
    return (await ns.systemctl(["list-units", "--all", "--plain", "--no-legend", "--state=active", "--type=service,socket,timer,path,automount"]))
      .trim().split("\n").map((l) => l.split(/\s+/)[0]!).sort();
  }

  test("only the test's units exist for this systemd: none of the host's boot ran", (t) => {
    if (!runs(t)) return;
    t.diagnostic(`systemd booted and the agent answered ${Date.now() - started} ms after the boot began`);
    assert.deepEqual(bootUnits, ["systemd-journald.service", "systemd-journald.socket"]);
    assert.equal(statSync(join(hostStore, "nix/store")).mode & 0o005, 0o005, "the store directory is world-readable");
  });

  test("the unit loaded is the shipped one, changed only in its program and configuration paths", (t) => {
    if (!runs(t)) return;
    const loadedLines = readFileSync(join(tmp!.dir, "units/fleetcache.service"), "utf8").split("\n");
    const shippedLines = shipped.split("\n");
    assert.equal(loadedLines.length, shippedLines.length);
    const changed = shippedLines.filter((l, i) => l !== loadedLines[i]);
    assert.ok(changed.length >= 1 && changed.every((l) => l.includes(SHIPPED_PROGRAM)), `only the ExecStart lines differ: ${changed.join("\n")}`);
    assert.equal(show.FragmentPath, `${NS_DIR}/units/fleetcache.service`);
    assert.equal(show.DropInPaths, "");
  });

  test("every [Service] directive of the shipped unit is in effect as written", (t) => {
    if (!runs(t)) return;
    const byKey = new Map<string, string[]>();
    for (const [k, v] of serviceDirectives(shipped)) byKey.set(k, [...(byKey.get(k) ?? []), v]);
    for (const [key, values] of byKey) {
      const v = values.at(-1)!;
      switch (key) {
        case "ExecStart":
          break;
        case "RestartSec":
          assert.equal(show.RestartUSec, v);
          break;
        case "RestrictAddressFamilies":
          assert.deepEqual(show[key]!.split(" ").sort(), v.split(" ").sort());
          break;
        case "SystemCallErrorNumber":
          assert.ok(show[key] === v || (v === "EPERM" && show[key] === "1"), `${key}=${show[key]}`);
          break;
        case "SystemCallFilter": {
          assert.deepEqual(values, ["@system-service", "~@privileged"]);
          const allowed = new Set(show[key]!.split(" "));
          for (const s of ["openat", "read", "epoll_wait", "connect", "bind", "inotify_add_watch", "mmap"]) assert.ok(allowed.has(s), `${s} allowed`);
          for (const s of ["mount", "setuid", "chroot", "reboot", "init_module", "settimeofday"]) assert.ok(!allowed.has(s), `${s} denied`);
          break;
        }
        default:
          assert.equal(show[key], v, `${key} as shipped`);
      }
    }
    t.diagnostic(`in effect as shipped: ${[...byKey.keys()].filter((k) => k !== "ExecStart").join(" ")}`);
  });

  test("the agent runs as a dynamic user, without privileges or capabilities, under seccomp, in a read-only system", async (t) => {
    if (!runs(t)) return;
    assert.ok(mainPid > 1 && show.ActiveState === "active" && show.User === "fleetcache", JSON.stringify(show));
    const status = await ns.exec("cat", [`/proc/${mainPid}/status`]);
    const field = (name: string) => new RegExp(`^${name}:\\s+(.*)$`, "m").exec(status)?.[1]?.trim() ?? "";
    const uids = field("Uid").split(/\s+/).map(Number);
    assert.equal(uids.length, 4);
    assert.ok(uids.every((u) => u === uids[0] && u >= 61184 && u <= 65519), `a dynamic user (61184-65519): Uid ${field("Uid")}`);
    uid = uids[0]!;
    assert.equal(field("CapEff"), "0000000000000000");
    assert.equal(field("CapBnd"), "0000000000000000");
    assert.equal(field("NoNewPrivs"), "1");
    assert.equal(field("Seccomp"), "2");
    const rootMount = (await ns.exec("cat", [`/proc/${mainPid}/mountinfo`])).split("\n").find((l) => l.split(" ")[4] === "/");
    assert.match(rootMount ?? "", /^\S+ \S+ \S+ \S+ \/ ro[, ]/, "ProtectSystem=strict: / is read-only for the agent");
  });

  test("it chose the daemon backend and keeps its host key in its StateDirectory", async (t) => {
    if (!runs(t)) return;
    // The daemon: it cannot write the database directory. The key: /var/lib/private/fleetcache
    // for a dynamic user, mode 0700.
    const doc = await getJson(`${url}/api/v1/status`);
    assert.equal(doc.self.storeBackend, "daemon");
    // Under the unit's sandbox it may still look at the database's files (the daemon backend's cache).
    const journal = await ns.journal("fleetcache.service");
    assert.match(journal, /store metadata from the Nix daemon/);
    assert.doesNotMatch(journal, /cannot look at the Nix database/);
    assert.equal(doc.self.paths, allPaths);
    assert.equal(doc.self.publicKey, hostKey);
    const [mode, owner] = (await ns.exec("stat", ["-c", "%a %u", "/var/lib/private/fleetcache/host-key.sec"])).trim().split(" ");
    assert.equal(mode, "600");
    if (uid) assert.equal(Number(owner), uid, "owned by the service's user");
    assert.equal((await ns.exec("stat", ["-c", "%a", "/var/lib/private/fleetcache"])).trim(), "700");
  });

  test("the real Nix copies the closure from it with its signatures required, and verifies every path", async (t) => {
    if (!runs(t)) return;
    const dest = join(tmp!.dir, "dest");
    await nixHere("cache1", ["copy", "--from", url, "--to", dest, "--option", "require-sigs", "true", "--option", "trusted-public-keys", hostKey, "--option", "substituters", "", ...closure.paths]);
    assert.deepEqual((await pathInfo(dest, closure.paths, true)).map((i) => i.path).sort(), expected);
    await nixHere("cache1", ["store", "verify", "--store", dest, "--sigs-needed", "1", "--trusted-public-keys", hostKey, "-r", ...closure.paths]);
    const narinfo = await (await fetch(`${url}/${closure.built.slice("/nix/store/".length, "/nix/store/".length + 32)}.narinfo`)).text();
    assert.match(narinfo, new RegExp(`^Sig: ${hostKey.split(":")[0]}:`, "m"));
  });

  test("a path added to the store shows: the watch and the daemon's listing work under the filter", async (t) => {
    if (!runs(t)) return;
    const before = (await getJson(`${url}/api/v1/status`)).self.paths as number;
    writeFileSync(join(work, "late.txt"), "added while the agent runs\n");
    const late = (await run("nix-store", ["--store", hostStore, "--add", join(work, "late.txt")])).trim();
    await waitFor("the new path in the agent's count", async () => ((await getJson(`${url}/api/v1/status`)).self.paths === before + 1 ? true : undefined), 15_000);
    assert.equal((await fetch(`${url}/${late.slice("/nix/store/".length, "/nix/store/".length + 32)}.narinfo`)).status, 200);
  });

  test("a crash (SIGKILL) is followed by a restart with the same host key, and the journal tells of both", async (t) => {
    if (!runs(t)) return;
    const pid = Number((await ns.show("fleetcache.service", ["MainPID"])).MainPID);
    const restartsBefore = Number((await ns.show("fleetcache.service", ["NRestarts"])).NRestarts);
    await ns.exec("kill", ["-KILL", String(pid)]);
    const restarted = await waitFor("the restart", async () => {
      const s = await ns.show("fleetcache.service", ["MainPID", "ActiveState", "NRestarts"]);
      return s.ActiveState === "active" && Number(s.MainPID) > 0 && Number(s.MainPID) !== pid ? s : undefined;
    }, 20_000, diagnose);
    assert.equal(Number(restarted.NRestarts), restartsBefore + 1);
    await waitFor("the restarted agent", async () => ((await fetch(`${url}/nix-cache-info`)).ok ? true : undefined), 30_000, diagnose);
    assert.equal((await getJson(`${url}/api/v1/status`)).self.publicKey, hostKey);

    // The journal has the agent's lines (JSON on stderr) and systemd's about the crash.
    const journal = await ns.journal("fleetcache.service");
    assert.equal(journal.match(/"msg":"fleetcache agent serving this host's store"/g)?.length, 2, journal);
    assert.match(journal, /"storeBackend":"daemon"/);
    assert.match(journal, /"msg":"created this host's signing key/);
    assert.match(journal, /status=9\/KILL/);
  });

  test("the unit's commented variant: the sign key by LoadCredential, with the mesh listening", async (t) => {
    if (!runs(t)) return;
    // The key file stays root's, mode 0600; systemd hands the agent a copy.
    const fleetKey = await keygen("fleet-systemd-test-1", join(tmp!.dir, "sign-key"));
    assert.equal(statSync(join(tmp!.dir, "sign-key")).mode & 0o777, 0o600);
    const p2pPort = await freePort();
    writeConfig(`127.0.0.1:${p2pPort}`);
    const variant = unitText(shipped, { credential: `${NS_DIR}/sign-key` });
    const variantChanged = shipped.split("\n").filter((l, i) => l !== variant.split("\n")[i]);
    assert.equal(variantChanged.length, 4, variantChanged.join("\n")); // two ExecStart, LoadCredential, the ExecStart= reset
    writeFileSync(join(tmp!.dir, "units/fleetcache.service"), variant);
    await ns.systemctl(["daemon-reload"]);
    await ns.systemctl(["restart", "fleetcache.service"]);
    const doc2 = await waitFor("the agent with the fleet key", async () => {
      const d = await getJson(`${url}/api/v1/status`);
      return d.self.publicKey === fleetKey ? d : undefined;
    }, 30_000, diagnose);
    assert.equal(doc2.self.storeBackend, "daemon");
    assert.ok(doc2.self.peerId, "the mesh is on");
    assert.ok(await tcpConnects(p2pPort), "the mesh listens");
    // The agent was given the credential's copy, in its credentials directory.
    const pid2 = (await ns.show("fleetcache.service", ["MainPID"])).MainPID!;
    const argv = (await ns.exec("cat", [`/proc/${pid2}/cmdline`])).split("\0");
    assert.deepEqual(argv.slice(argv.indexOf("--sign-key"), argv.indexOf("--sign-key") + 2), ["--sign-key", "/run/credentials/fleetcache.service/sign-key"]);
    const dest2 = join(tmp!.dir, "dest2");
    await nixHere("cache2", ["copy", "--from", url, "--to", dest2, "--option", "require-sigs", "true", "--option", "trusted-public-keys", fleetKey, "--option", "substituters", "", closure.built]);
    await nixHere("cache2", ["store", "verify", "--store", dest2, "--sigs-needed", "1", "--trusted-public-keys", fleetKey, "-r", closure.built]);
  });

  test("nothing else ran in that systemd, and nothing failed", async (t) => {
    if (!runs(t)) return;
    assert.deepEqual(await activeUnits(), ["fleetcache.service", "nix-daemon-test.service", "nix-daemon.socket", "systemd-journald.service", "systemd-journald.socket"]);
    assert.equal((await ns.systemctl(["list-units", "--all", "--plain", "--no-legend", "--state=failed"])).trim(), "");
    t.diagnostic(`all checks done ${Date.now() - started} ms after the boot began`);
  });
});
