// A real nix-daemon for a chroot store, on the store's own socket, for tests and benchmarks.
import assert from "node:assert/strict";
import { spawn, type ChildProcess } from "node:child_process";
import { closeSync, existsSync, mkdirSync, openSync, readFileSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { join } from "node:path";
import { setTimeout as sleep } from "node:timers/promises";
import { run } from "./nix.js";

/** A nix-daemon for the chroot store at `root`, on its own socket. */
export class Daemon {
  child: ChildProcess | undefined;
  constructor(readonly root: string) {}
  get socket(): string {
    return join(this.root, "nix/var/nix/daemon-socket/socket");
  }
  /** Where its stderr goes: why it refused or dropped a connection ("error processing connection", "unexpected Nix daemon error"). */
  get logFile(): string {
    return join(this.root, "nix/var/nix/daemon-socket/stderr.log");
  }
  /** The end of its stderr, for a failing test's message. */
  log(): string {
    return existsSync(this.logFile) ? readFileSync(this.logFile, "utf8").slice(-2000) : "";
  }
  async start(): Promise<void> {
    mkdirSync(join(this.root, "nix/var/nix/daemon-socket"), { recursive: true, mode: 0o755 });
    rmSync(this.socket, { force: true });
    const stderr = openSync(this.logFile, "a");
    this.child = spawn("nix-daemon", ["--store", this.root], {
      stdio: ["ignore", "ignore", stderr],
      env: { ...process.env, NIX_DAEMON_SOCKET_PATH: this.socket, NIX_CONFIG: "sandbox = false\nsubstituters =" },
    });
    closeSync(stderr);
    // Ready once it accepts a connection: the socket file appears at bind(), before listen(), and
    // a client in between is refused (seen with Nix 2.26 in its chroot under load).
    let ready = false;
    for (let i = 0; i < 400 && !ready; i++) {
      ready = existsSync(this.socket) && (await accepts(this.socket));
      if (!ready) await sleep(25);
    }
    assert.ok(ready, "nix-daemon listens on its socket");
  }
  /** Kills the daemon and the per-connection processes it forked (ours, by their ids). */
  async stop(): Promise<void> {
    const child = this.child;
    if (!child || child.exitCode !== null || child.signalCode !== null) return; // not started, or stopped already
    const kids = (await run("pgrep", ["-P", String(child.pid)]).catch(() => "")).split("\n").filter(Boolean).map(Number);
    for (const pid of kids) {
      try {
        process.kill(pid, "SIGKILL");
      } catch {
        // already gone
      }
    }
    const exited = new Promise((resolve) => child.once("exit", resolve));
    child.kill("SIGKILL");
    await exited;
  }
}


function accepts(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    const c = connect(socket);
    c.once("connect", () => {
      c.destroy();
      resolve(true);
    });
    c.once("error", () => resolve(false));
  });
}
