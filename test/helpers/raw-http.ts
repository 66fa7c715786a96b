// Raw HTTP/1.1 exchanges for the HTTP tests: requests written as bytes (pipelined, split, half-
// closed), answers read as bytes, so that two servers' answers can be compared byte for byte.
import { connect } from "node:net";

/**
 * Writes `parts` one after another (a pause between them, so that they tend to arrive as
 * separate reads), then half-closes unless `keepOpen`; resolves with every byte received until
 * the server closed the connection.
 */
export function exchange(port: number, parts: string[], keepOpen = false, readAfterMs = 0): Promise<string> {
  return new Promise((resolve, reject) => {
    const sock = connect(port, "127.0.0.1");
    sock.setNoDelay(true);
    if (readAfterMs > 0) {
      // A client that does not read for a while: the server must wait for it, not buffer for it.
      sock.pause();
      setTimeout(() => sock.resume(), readAfterMs);
    }
    let got = "";
    sock.on("data", (d: Buffer) => (got += d.toString("latin1")));
    sock.on("close", () => resolve(got));
    sock.on("error", (e: NodeJS.ErrnoException) => (e.code === "ECONNRESET" ? resolve(got + "<reset>") : reject(e)));
    sock.on("connect", async () => {
      for (const [i, p] of parts.entries()) {
        if (i > 0) await new Promise((r) => setTimeout(r, 5));
        if (!sock.destroyed) sock.write(p, "latin1");
      }
      if (!keepOpen && !sock.destroyed) sock.end();
    });
  });
}

/** The answer with each Date header's value blanked (the two servers may cross a second). */
export function undated(raw: string): string {
  return raw.replace(/\r\nDate: [^\r]*\r\n/g, "\r\nDate: -\r\n");
}

/** A request head: `method target version`, a Host header, then `extra` header lines. */
export const req = (target: string, extra = "", method = "GET", version = "HTTP/1.1") => `${method} ${target} ${version}\r\nHost: localhost\r\n${extra}\r\n`;
/** A GET with Connection: close. */
export const closing = (target: string) => req(target, "Connection: close\r\n");
