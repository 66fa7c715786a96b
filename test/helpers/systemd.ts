// A real systemd (the distribution's, as PID 1) in private namespaces, for testing unit files.
//
// systemd runs as PID 1 of a new PID namespace, with its own mount, UTS, IPC and cgroup
// namespaces; only the network namespace is the host's (the test talks to services on
// 127.0.0.1). Nothing it does may reach the host, so before systemd starts:
//   - the host's root and /sys are read-only (per-mount flags of the namespace's own mounts),
//     and so is /proc/sys: the sysctls systemd sets as PID 1 (core_pattern, nr_open, file-max)
//     are the whole machine's;
//   - /run, /tmp, /var/tmp, /var/lib, /var/log, /var/cache and /dev are empty tmpfs of its own
//     (tmpfiles would clean /tmp; units would write /var/lib; journald would write
//     /var/log/journal; socket units would add /dev/log);
//   - it sees only the test's units: SYSTEMD_UNIT_PATH is the test's directory, no generators
//     run, so nothing of the host's default boot (tmpfiles, udev, sysctl, remount-fs...) exists;
//   - its cgroups are a subtree of its own, removed afterwards, and its bounding set lacks the
//     capabilities for the clock, kernel modules, raw I/O, syslog, audit and network settings.
// A directory of the host (the test's) appears inside at another path, outside /tmp since
// services with PrivateTmp would not see it there.
import { spawn, type ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, openSync, closeSync, readFileSync, readdirSync, writeFileSync, chmodSync } from "node:fs";
import { basename, join } from "node:path";
import type { TestContext } from "node:test";
import { run } from "./nix.js";

const SETUP = String.raw`#!/bin/bash
# PID 1 of the new PID namespace, in new mount/UTS/IPC/cgroup namespaces; ends by exec'ing systemd.
set -euo pipefail
host_dir=$1 ns_dir=$2 units=$3 systemd=$4 host_ro=$5 ns_ro=$6
mount --make-rprivate /
# Writable places of our own first, then the host's tree read-only (MS_REMOUNT|MS_BIND: the
# flags of this namespace's mounts only).
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /var/lib
mkdir -p "$ns_dir" "$ns_ro"
mount --bind "$host_dir" "$ns_dir"
mount --bind "$host_ro" "$ns_ro"
mount -o remount,bind,ro "$ns_ro"
mount -o remount,bind,ro /
mount -o remount,bind,ro /sys
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
# Only the name=systemd and unified hierarchies, rooted at the test's cgroup (cgroup namespace),
# on a read-only tmpfs so that systemd mounts no other controller.
umount -R /sys/fs/cgroup 2>/dev/null || true
mount -t tmpfs -o mode=0755,nosuid,nodev,noexec tmpfs /sys/fs/cgroup
mkdir /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
mount -t cgroup -o none,name=systemd,nosuid,nodev,noexec cgroup /sys/fs/cgroup/systemd
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup/unified
mount -o remount,bind,ro /sys/fs/cgroup
for d in /tmp /var/tmp; do mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$d"; done
for d in /var/log /var/cache; do mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$d"; done
# A /dev of our own: the host's devtmpfs stays untouched.
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5; mknod -m 666 /dev/full c 1 7
mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9; mknod -m 666 /dev/tty c 5 0
mkdir /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin; ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
mkdir -p /run/fleetcache-test/no-generators
# As a container manager would: shared propagation inside (new peer groups, none with the host,
# since everything was made private first), which systemd relies on, e.g. to hand a service its
# LoadCredential= directory, mounted in a child namespace.
mount --make-rshared /
export container=fleetcache-test SYSTEMD_UNIT_PATH="$units"
export SYSTEMD_GENERATOR_PATH=/run/fleetcache-test/no-generators SYSTEMD_ENVIRONMENT_GENERATOR_PATH=/run/fleetcache-test/no-generators
exec setpriv --bounding-set -sys_time,-sys_module,-sys_boot,-sys_rawio,-syslog,-wake_alarm,-net_admin,-audit_control,-audit_write,-audit_read,-block_suspend,-mac_admin \
  "$systemd" --system --unit=fleetcache-test.target --log-target=journal --show-status=no
`;

// The supervisor (outside the namespaces) starts unshare in the test's cgroup, then waits for
// its stdin to close: on that (the test finished, or its process died), it kills what is left
// and removes the cgroups, so nothing outlives the test.
const SUPERVISOR = String.raw`
cg=$1; shift
for h in systemd unified; do mkdir -p "/sys/fs/cgroup/$h/$cg"; done
bash -c 'for h in systemd unified; do echo $$ > "/sys/fs/cgroup/$h/'"$cg"'/cgroup.procs"; done; exec "$@"' unshare \
  unshare --pid --fork --mount --uts --ipc --cgroup --mount-proc --kill-child=SIGKILL -- "$@" &
u=$!
trap '' INT TERM HUP PIPE # (set after unshare started: it keeps the default dispositions)
echo "unshare $u" || true
read -r _ || true
kill -KILL "$u" 2>/dev/null || true
wait "$u" 2>/dev/null || true
for i in $(seq 50); do
  left=0
  for h in systemd unified; do
    d="/sys/fs/cgroup/$h/$cg"
    [ -d "$d" ] || continue
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [ -d "$d" ] && left=1
  done
  [ "$left" = 0 ] && break
  sleep 0.1
done
[ "$left" = 0 ] || { echo "cgroups of $cg remain" >&2; exit 1; }
`;

export function systemdBinary(): string | undefined {
  return ["/usr/lib/systemd/systemd", "/lib/systemd/systemd"].find((p) => existsSync(p));
}

export function systemUnitDir(): string | undefined {
  return ["/usr/lib/systemd/system", "/lib/systemd/system"].find((p) => existsSync(join(p, "systemd-journald.service")));
}

/** Why systemd cannot be booted here without trying, or undefined if it may work. */
export async function systemdMissing(): Promise<string | undefined> {
  if (process.platform !== "linux") return "not Linux";
  if (process.getuid?.() !== 0) return "not root (booting systemd in namespaces needs root)";
  if (!systemdBinary() || !systemUnitDir()) return "systemd is not installed (no /lib/systemd/systemd or its journald units)";
  for (const tool of ["unshare", "nsenter", "setpriv", "systemctl", "journalctl"]) {
    if (!(await run("sh", ["-c", `command -v ${tool}`]).then(() => true, () => false))) return `${tool} is missing`;
  }
  if (!existsSync("/sys/fs/cgroup/systemd/cgroup.procs") || !existsSync("/sys/fs/cgroup/unified/cgroup.procs")) {
    return "no writable cgroup v1 name=systemd + cgroup2 (hybrid) hierarchies at /sys/fs/cgroup/{systemd,unified}";
  }
  return undefined;
}

/** Skips the test (locally) or throws (under CI=true) with the reason systemd cannot run here. */
export function skipOrThrow(t: TestContext, reason: string): void {
  if (process.env.CI === "true") throw new Error(`systemd in a namespace is required under CI=true: ${reason}`);
  t.skip(reason);
}

export class SystemdUnavailableError extends Error {}

export interface BootOptions {
  /** A directory of the host, shown inside at nsDir; the unit files are in its "units" folder. */
  hostDir: string;
  /** Where hostDir appears inside: under /var/lib, the namespace's own tmpfs (not /tmp: PrivateTmp). */
  nsDir: string;
  /** Unit files by name, written to hostDir/units; fleetcache-test.target is the boot target. */
  units: Record<string, string>;
  /**
   * A host directory shown read-only at nsReadOnly (/var/lib/NAME): the code under test, which may
   * live where services cannot see it (/tmp with PrivateTmp, /home or /root with ProtectHome).
   */
  hostReadOnly: string;
  nsReadOnly: string;
}

export class SystemdNamespace {
  private exited = false;
  private readonly exitedP: Promise<void>;

  private constructor(
    readonly hostDir: string,
    readonly nsDir: string,
    /** systemd's PID as the host sees it. */
    readonly pid: number,
    private readonly supervisor: ChildProcess,
    private readonly bootLog: string,
  ) {
    this.exitedP = new Promise((resolve) => {
      if (supervisor.exitCode !== null || supervisor.signalCode !== null) {
        this.exited = true;
        return resolve();
      }
      supervisor.once("close", () => {
        this.exited = true;
        resolve();
      });
    });
  }

  /**
   * Boots systemd with the units given (plus journald's, from the host's systemd) and waits until
   * it answers and has reached fleetcache-test.target. Throws SystemdUnavailableError when
   * systemd does not come up.
   */
  static async boot(opts: BootOptions): Promise<SystemdNamespace> {
    // The mount point is made inside the namespace's /var/lib tmpfs; anywhere else, mkdir would
    // write to the host's root before it is made read-only.
    for (const dir of [opts.nsDir, opts.nsReadOnly]) {
      if (!/^\/var\/lib\/[^/]+$/.test(dir)) throw new Error(`namespace directories must be /var/lib/NAME, not ${dir}`);
    }
    const systemd = systemdBinary()!;
    const unitDir = systemUnitDir()!;
    const units = join(opts.hostDir, "units");
    mkdirSync(units, { recursive: true });
    // journald for the journal, without its audit and /dev/log sockets.
    for (const u of ["systemd-journald.socket", "systemd-journald.service"]) {
      const text = readFileSync(join(unitDir, u), "utf8")
        .replace(/ systemd-journald-(audit|dev-log)\.socket/g, "")
        .replace(/^IPAddressDeny=.*\n/m, "");
      writeFileSync(join(units, u), text);
    }
    // The targets a service's default dependencies name, empty.
    for (const name of ["sysinit", "basic", "sockets", "shutdown", "network-online"]) {
      writeFileSync(join(units, `${name}.target`), `[Unit]\nDescription=${name}.target (empty, for the test)\nDefaultDependencies=no\n`);
    }
    for (const [name, text] of Object.entries(opts.units)) writeFileSync(join(units, name), text);
    const setup = join(opts.hostDir, "ns-setup.sh");
    writeFileSync(setup, SETUP);
    chmodSync(setup, 0o755);

    const bootLog = join(opts.hostDir, "boot.log");
    const log = openSync(bootLog, "a");
    const cg = `${basename(opts.hostDir)}`;
    const supervisor = spawn("bash", ["-c", SUPERVISOR, "supervisor", cg, "bash", setup, opts.hostDir, opts.nsDir, join(opts.nsDir, "units"), systemd, opts.hostReadOnly, opts.nsReadOnly], {
      stdio: ["pipe", "pipe", log],
      cwd: "/",
      // Its own process group: a ^C to the test's group reaches the test, whose exit closes the
      // supervisor's stdin, and the supervisor cleans up.
      detached: true,
    });
    closeSync(log);
    const unsharePid = await new Promise<number>((resolve, reject) => {
      let out = "";
      supervisor.stdout!.on("data", (d: Buffer) => {
        out += d.toString();
        const m = /unshare (\d+)/.exec(out);
        if (m) resolve(Number(m[1]));
      });
      supervisor.once("close", () => reject(new SystemdUnavailableError(`the supervisor exited: ${readFileSync(bootLog, "utf8")}`)));
    });
    // systemd is unshare's only child.
    let pid = 0;
    const deadline = Date.now() + 30_000;
    while (!pid && Date.now() < deadline) {
      try {
        pid = Number(readFileSync(`/proc/${unsharePid}/task/${unsharePid}/children`, "utf8").trim().split(" ")[0]) || 0;
      } catch {
        break; // unshare is gone
      }
      if (!pid) await sleep(50);
    }
    const sd = new SystemdNamespace(opts.hostDir, opts.nsDir, pid, supervisor, bootLog);
    if (!pid) {
      await sd.stop();
      throw new SystemdUnavailableError(`unshare did not start systemd: ${readFileSync(bootLog, "utf8")}`);
    }
    let lastError = "";
    while (Date.now() < deadline) {
      try {
        const state = (await sd.systemctl(["show", "-p", "ActiveState", "--value", "fleetcache-test.target"])).trim();
        if (state === "active") return sd;
        lastError = `fleetcache-test.target is ${state}`;
      } catch (e) {
        lastError = (e as Error).message;
        if (!existsSync(`/proc/${pid}`) || isZombie(pid)) {
          lastError = "systemd exited during the boot";
          break;
        }
      }
      await sleep(100);
    }
    await sd.stop();
    throw new SystemdUnavailableError(`systemd did not come up in a namespace: ${lastError}\n${readFileSync(bootLog, "utf8")}`);
  }

  /** Runs a command inside all of systemd's namespaces; returns its stdout. */
  exec(cmd: string, args: string[]): Promise<string> {
    return run("nsenter", ["-t", String(this.pid), "-a", cmd, ...args], { env: { SYSTEMD_PAGER: "", SYSTEMD_COLORS: "0" } });
  }

  systemctl(args: string[]): Promise<string> {
    return this.exec("systemctl", ["--no-pager", ...args]);
  }

  /** `systemctl show` properties of a unit as a record. */
  async show(unit: string, props: string[]): Promise<Record<string, string>> {
    const out = await this.systemctl(["show", unit, ...props.flatMap((p) => ["-p", p])]);
    const r: Record<string, string> = {};
    for (const line of out.split("\n")) {
      const i = line.indexOf("=");
      if (i > 0) r[line.slice(0, i)] = line.slice(i + 1);
    }
    return r;
  }

  /** A unit's messages in the journal (message text only). */
  journal(unit: string): Promise<string> {
    return this.exec("journalctl", ["--no-pager", "-o", "cat", "-u", unit]);
  }

  /** What systemd itself printed (and the namespace set-up's errors). */
  bootOutput(): string {
    return readFileSync(this.bootLog, "utf8");
  }

  /**
   * Stops systemd (an immediate power-off: it kills its services and exits), then has the
   * supervisor kill whatever is left and remove the cgroups. Safe to call twice.
   */
  async stop(): Promise<void> {
    if (!this.exited && this.pid) {
      // SIGRTMIN+14: power off at once (systemd's signal; node has no name for it).
      await run("kill", ["-s", "RTMIN+14", String(this.pid)]).catch(() => undefined);
      const gone = Date.now() + 10_000;
      while (Date.now() < gone && existsSync(`/proc/${this.pid}`) && !isZombie(this.pid)) await sleep(50);
    }
    this.supervisor.stdin!.end();
    await this.exitedP;
    if (this.supervisor.exitCode !== 0) throw new Error(`systemd namespace teardown failed (${this.supervisor.exitCode}): ${this.bootOutput()}`);
  }
}

function isZombie(pid: number): boolean {
  try {
    return / Z /.test(readFileSync(`/proc/${pid}/stat`, "utf8").replace(/^.*\)/, ""));
  } catch {
    return true;
  }
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Every directory under (and including) dir, for making a tree traversable. */
export function directoriesUnder(dir: string): string[] {
  const out = [dir];
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    if (e.isDirectory()) out.push(...directoriesUnder(join(dir, e.name)));
  }
  return out;
}
