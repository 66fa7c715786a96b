// The dashboard at GET /: its assets as HTTP answers, and the page itself in headless Chromium —
// against hostile and partial status documents, and against a real two-agent mesh on loopback.
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { createServer, request, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { inflateSync } from "node:zlib";
import type { TestContext } from "node:test";
import { chromium, type Browser, type Page } from "playwright-core";
import { handleDashboard, isDashboardPath } from "../agent/http/dashboard.js";
import { startAgentProcess, type AgentProcess, freePort, keygen } from "./helpers/agent.js";
import { eventually } from "./helpers/fleet.js";
import { addToStore, needNix, tempDir } from "./helpers/nix.js";

const CHROMIUM = "/usr/bin/chromium";
const SCREENSHOT = fileURLToPath(new URL("../../docs/dashboard.png", import.meta.url));
const WAIT_MS = 30_000;

/** Chromium is needed: skip locally without it, fail under CI=true. */
function needChromium(t: TestContext): boolean {
  if (existsSync(CHROMIUM)) return true;
  if (process.env.CI === "true") throw new Error(`${CHROMIUM} is required under CI=true`);
  t.skip(`${CHROMIUM} not installed`);
  return false;
}

async function launch(): Promise<Browser> {
  // Playwright gives each launch a fresh temporary profile.
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"],
  });
}

/**
 * A page that records what a test must check afterwards: console errors, uncaught exceptions,
 * every request's URL and every navigation of the main frame.
 */
async function openPage(browser: Browser, colorScheme: "light" | "dark" = "light") {
  const context = await browser.newContext({ viewport: { width: 1200, height: 900 }, deviceScaleFactor: 1, colorScheme });
  const page = await context.newPage();
  const errors: string[] = [];
  const requests: string[] = [];
  const navigations: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(m.text());
  });
  page.on("pageerror", (e) => errors.push(`uncaught: ${e.message}`));
  page.on("request", (r) => requests.push(r.url()));
  page.on("framenavigated", (f) => {
    if (f === page.mainFrame()) navigations.push(f.url());
  });
  return { page, errors, requests, navigations };
}

/** Serves the dashboard and answers /api/v1/status with `status()` (a canned document or a real agent's). */
async function dashboardServer(status: () => Promise<{ code: number; body: string }>): Promise<{ url: string; server: Server }> {
  const server = createServer((req, res) => {
    const path = (req.url ?? "/").split("?")[0]!;
    // As agent/http/server.ts routes them.
    if (path === "/" || path.startsWith("/dashboard/")) return handleDashboard(req, res, path);
    if (path === "/api/v1/status") {
      status().then(
        ({ code, body }) => {
          res.writeHead(code, { "Content-Type": "application/json", "Cache-Control": "no-store" });
          res.end(body);
        },
        () => res.destroy(),
      );
      return;
    }
    res.writeHead(404).end();
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  return { url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`, server };
}

function httpGet(url: string, headers: Record<string, string> = {}, method = "GET") {
  return new Promise<{ status: number; headers: Record<string, string | string[] | undefined>; body: string }>((resolve, reject) => {
    const req = request(url, { method, headers }, (res) => {
      let body = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => (body += d));
      res.on("end", () => resolve({ status: res.statusCode!, headers: res.headers, body }));
    });
    req.on("error", reject);
    req.end();
  });
}

/** Minimal PNG decoder (8-bit RGB/RGBA, not interlaced: what Chromium writes) to RGBA pixels. */
function decodePng(png: Buffer): { width: number; height: number; rgba: Buffer } {
  assert.equal(png.subarray(0, 8).toString("hex"), "89504e470d0a1a0a", "PNG signature");
  let pos = 8, width = 0, height = 0, colorType = 0;
  const idat: Buffer[] = [];
  while (pos < png.length) {
    const len = png.readUInt32BE(pos);
    const type = png.toString("latin1", pos + 4, pos + 8);
    const data = png.subarray(pos + 8, pos + 8 + len);
    if (type === "IHDR") {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      assert.equal(data[8], 8, "bit depth 8");
      colorType = data[9]!;
      assert.ok(colorType === 2 || colorType === 6, `colour type ${colorType}`);
      assert.equal(data[12], 0, "not interlaced");
    } else if (type === "IDAT") idat.push(data);
    else if (type === "IEND") break;
    pos += 12 + len;
  }
  const bpp = colorType === 6 ? 4 : 3;
  const stride = width * bpp;
  const raw = inflateSync(Buffer.concat(idat));
  const out = Buffer.alloc(width * height * bpp);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (stride + 1)]!;
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let i = 0; i < stride; i++) {
      const a = i >= bpp ? out[y * stride + i - bpp]! : 0;
      const b = y > 0 ? out[(y - 1) * stride + i]! : 0;
      const c = i >= bpp && y > 0 ? out[(y - 1) * stride + i - bpp]! : 0;
      const p = a + b - c;
      const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
      const pred = [0, a, b, (a + b) >> 1, pa <= pb && pa <= pc ? a : pb <= pc ? b : c][filter];
      assert.ok(pred !== undefined, `PNG filter ${filter}`);
      out[y * stride + i] = (line[i]! + pred) & 0xff;
    }
  }
  if (bpp === 4) return { width, height, rgba: out };
  const rgba = Buffer.alloc(width * height * 4, 255);
  for (let i = 0; i < width * height; i++) out.copy(rgba, i * 4, i * 3, i * 3 + 3);
  return { width, height, rgba };
}

/** How many pixels of a screenshot of `selector`'s box have the colour CSS computes for its fill. */
async function pixelsOfFill(page: Page, selector: string): Promise<{ fill: string; matching: number; total: number }> {
  const target = page.locator(selector).first();
  const fill = await target.evaluate((e) => (globalThis as unknown as { getComputedStyle(e: unknown): { fill: string } }).getComputedStyle(e).fill);
  const m = /^rgb\((\d+), (\d+), (\d+)\)$/.exec(fill);
  assert.ok(m, `computed fill ${fill}`);
  const [r, g, b] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const box = await target.boundingBox();
  assert.ok(box && box.width > 4 && box.height > 4, `bounding box of ${selector}`);
  const { width, height, rgba } = decodePng(await page.screenshot({ clip: box }));
  let matching = 0;
  for (let i = 0; i < width * height; i++) {
    const d = Math.max(Math.abs(rgba[i * 4]! - r), Math.abs(rgba[i * 4 + 1]! - g), Math.abs(rgba[i * 4 + 2]! - b));
    if (d <= 6) matching++;
  }
  return { fill, matching, total: width * height };
}

function assertSameOrigin(requests: string[], base: string): void {
  const origin = new URL(base).origin;
  assert.ok(requests.length > 0, "the page made requests");
  const foreign = requests.filter((u) => new URL(u).origin !== origin);
  assert.deepEqual(foreign, [], "requests to other origins");
}

test("dashboard assets: types, CSP, HEAD, revalidation by ETag, unknown paths 404", async () => {
  const { url, server } = await dashboardServer(async () => ({ code: 200, body: "{}" }));
  try {
    const page = await httpGet(url + "/");
    assert.equal(page.status, 200);
    assert.equal(page.headers["content-type"], "text/html; charset=utf-8");
    const csp = String(page.headers["content-security-policy"]);
    assert.match(csp, /default-src 'self'/);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|https?:/);
    assert.match(page.body, /<script src="\/dashboard\/app\.js" defer><\/script>/);
    assert.doesNotMatch(page.body, /https?:\/\//, "the page links to no other origin");
    assert.doesNotMatch(page.body, /<script>|<style>| style=| on[a-z]+=/, "no inline script or style (CSP)");
    for (const [path, type] of [["/dashboard/app.js", "text/javascript"], ["/dashboard/style.css", "text/css"], ["/dashboard/icon.svg", "image/svg+xml"]] as const) {
      const r = await httpGet(url + path);
      assert.equal(r.status, 200, path);
      assert.ok(String(r.headers["content-type"]).startsWith(type), `${path}: ${r.headers["content-type"]}`);
      assert.equal(r.headers["x-content-type-options"], "nosniff");
      const again = await httpGet(url + path, { "If-None-Match": String(r.headers.etag) });
      assert.equal(again.status, 304, `${path} revalidated`);
      assert.equal(again.body, "");
    }
    const js = (await httpGet(url + "/dashboard/app.js")).body;
    assert.doesNotMatch(js, /innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(/, "strings reach the DOM only as text");
    const head = await httpGet(url + "/", {}, "HEAD");
    assert.equal(head.status, 200);
    assert.equal(head.body, "");
    assert.equal(Number(head.headers["content-length"]), Buffer.byteLength(page.body));
    assert.equal((await httpGet(url + "/?refresh=1")).status, 200, "a query string is ignored");
    assert.equal((await httpGet(url + "/dashboard/app.jsx")).status, 404);
    assert.equal((await httpGet(url + "/dashboard/")).status, 404);
    assert.equal(isDashboardPath("/dashboard/app.jsx"), false);
    assert.equal(isDashboardPath("/index.html"), false);
  } finally {
    server.close();
  }
});

test("the page renders hostile and partial status documents as text, and says when the agent is unreachable", async (t) => {
  if (!needChromium(t)) return;
  const hostile = '<img src="http://198.51.100.1/x.png" onerror="window.__pwned=1">';
  let answer = {
    code: 200,
    body: JSON.stringify({
      self: { name: "host<b>x</b>", publicKey: "k:AAAA", version: "9.9.9" }, // no peerId, paths or uptime
      peers: [
        { peerId: "12D3KooWHostile", name: hostile, connected: true, rttMs: 3.25, addresses: ["/ip4/127.0.0.1/tcp/1"], bytesReceived: 1536, bytesSent: 5 * 1024 * 1024 },
        { peerId: "12D3KooWBare" }, // nothing but an ID
        null,
      ],
      counters: { localHits: 3, peerHits: 1, misses: 0, nested: { narBytesServed: 2048 } },
      recentErrors: [{ time: Date.now(), message: "<script>alert(1)</script>", peer: hostile }, "plain string error"],
    }),
  };
  const { url, server } = await dashboardServer(async () => answer);
  const browser = await launch();
  try {
    const { page, errors, requests } = await openPage(browser);
    await page.goto(url + "/");
    const row = page.locator("#peers-table tbody tr").filter({ hasText: hostile });
    await row.waitFor({ timeout: WAIT_MS });
    assert.equal(await page.locator("#host-name").textContent(), "host<b>x</b>");
    assert.equal(await page.locator("img, b, main script").count(), 0, "no markup from the document became elements");
    assert.equal(await page.evaluate(() => (globalThis as { __pwned?: number }).__pwned), undefined);
    assert.match((await row.textContent()) ?? "", /connected.*3\.3 ms.*1\.5 KiB.*5\.0 MiB/);
    assert.equal(await page.locator("g.peer-node").count(), 2, "one graph node per peer object");
    const bare = page.locator('#peers-table tbody tr[data-peer-id="12D3KooWBare"]');
    assert.match((await bare.textContent()) ?? "", /disconnected/);
    // Newest first: the agent lists them oldest first.
    assert.match((await page.locator("#errors").textContent()) ?? "", /^plain string error.*<script>alert\(1\)<\/script> — peer: <img src=/s);
    assert.match((await page.locator("#hit-legend").textContent()) ?? "", /local hits: 3 \(75%\).*from peers: 1 \(25%\)/);
    assert.equal(await page.locator('#counters [data-counter="nested.narBytesServed"]').textContent(), "2.0 KiB");
    assert.match((await page.locator("#graph").getAttribute("aria-labelledby")) ?? "", /graph-desc/);
    assert.match((await page.locator("#graph-desc").textContent()) ?? "", /2 peers, 1 connected/);
    // The agent goes away: the page says so by itself and keeps the last data.
    answer = { code: 403, body: "the admin API answers only on loopback\n" };
    await page.locator("#conn-state.bad").waitFor({ timeout: WAIT_MS });
    assert.match((await page.locator("#conn-state").textContent()) ?? "", /403: the admin API answers only on loopback/);
    assert.equal(await row.count(), 1, "the last data stays");
    // A failed fetch logs a console error in Chromium; only those are expected.
    assert.deepEqual(errors.filter((e) => !/status of 403/.test(e)), []);
    assertSameOrigin(requests, url);
  } finally {
    await browser.close();
    server.close();
  }
});



test("B's dashboard in Chromium shows A as a connected peer, follows A's new paths by itself, and draws it", async (t) => {
  if (!(await needNix(t))) return;
  if (!needChromium(t)) return;
  const tmp = tempDir();
  const agents: AgentProcess[] = [];
  let browser: Browser | undefined;
  try {
    const host = (name: string) => ({ name, dir: join(tmp.dir, name), root: join(tmp.dir, name, "root"), key: join(tmp.dir, name, "key.sec") });
    const A = host("host-a"), B = host("host-b");
    for (const h of [A, B]) {
      mkdirSync(h.root, { recursive: true });
      writeFileSync(join(h.dir, "first.txt"), `first path of ${h.name}\n`);
    }
    const pathA = await addToStore(A.root, join(A.dir, "first.txt"));
    const pathB = await addToStore(B.root, join(B.dir, "first.txt"));
    const [pubA, pubB] = [await keygen("host-a-1", A.key), await keygen("host-b-1", B.key)];
    const [portA, portB] = [await freePort(), await freePort()];
    const agentArgs = (h: typeof A, port: number, otherPort: number, otherKey: string) => [
      "--store-root", h.root, "--state-dir", h.dir, "--sign-key", h.key,
      "--p2p-listen", `127.0.0.1:${port}`, "--peer", `127.0.0.1:${otherPort}`, "--trusted-key", otherKey,
    ];
    agents.push(await startAgentProcess(agentArgs(A, portA, portB, pubB)));
    const agentB = await startAgentProcess(agentArgs(B, portB, portA, pubA));
    agents.push(agentB);

    // The agent itself serves the dashboard.
    const base = agentB.url;
    assert.equal((await httpGet(base + "/")).status, 200, "GET / on the agent serves the dashboard");

    browser = await launch();
    const { page, errors, requests, navigations } = await openPage(browser);
    await page.goto(base + "/");
    // The name arrives with the page's first status poll, which may finish after goto() returns.
    await eventually("B's name on the page", async () => (await page.locator("#host-name").textContent()) === "host-b-1", WAIT_MS);

    // A appears as a connected peer, in the table and in the graph, with its one path.
    const rowA = page.locator('#peers-table tbody tr[data-name="host-a-1"]');
    await rowA.locator("td.state.connected").waitFor({ timeout: WAIT_MS });
    await page.locator('g.peer-node.connected[data-name="host-a-1"]').waitFor({ timeout: WAIT_MS });
    await eventually("A's path count 1 on the page", async () => (await rowA.locator("td.paths").textContent()) === "1", WAIT_MS);
    assert.match((await page.locator("#peer-summary").textContent()) ?? "", /^1 of 1 connected$/);
    assert.match((await rowA.locator("td.rtt").textContent()) ?? "", /^\d+(\.\d)? ms$|^—$/);

    // A adds a path: the page, left alone, shows A announcing two.
    writeFileSync(join(A.dir, "second.txt"), "second path of host-a\n");
    await addToStore(A.root, join(A.dir, "second.txt"));
    await eventually("A's path count 2 on the page", async () => (await rowA.locator("td.paths").textContent()) === "2", WAIT_MS);
    const label = await page.locator('g.peer-node[data-name="host-a-1"]').textContent();
    assert.match(label ?? "", /host-a-1.*2 paths/);

    // Lookups through B: one local hit, one from A, one miss; the hit rates follow.
    const hash = (p: string) => p.slice(11, 43);
    assert.equal((await httpGet(`${agentB.url}/${hash(pathB)}.narinfo`)).status, 200);
    assert.equal((await httpGet(`${agentB.url}/${hash(pathA)}.narinfo`)).status, 200);
    assert.equal((await httpGet(`${agentB.url}/${"0".repeat(32)}.narinfo`)).status, 404);
    await eventually("hit rates on the page", async () => /local hits: 1 \(33\.3%\).*from peers: 1 \(33\.3%\).*misses: 1 \(33\.3%\)/.test((await page.locator("#hit-legend").textContent()) ?? ""), WAIT_MS);
    // A NAR from A through B: the page shows the traffic the status document reports for A.
    const narinfoA = (await httpGet(`${agentB.url}/${hash(pathA)}.narinfo`)).body;
    const narUrl = /^URL: (.*)$/m.exec(narinfoA)?.[1];
    assert.ok(narUrl, narinfoA);
    assert.equal((await httpGet(`${agentB.url}/${narUrl}`)).status, 200);
    const status = JSON.parse((await httpGet(agentB.url + "/api/v1/status")).body) as { peers: { name: string; bytesReceived?: number }[] };
    const received = status.peers.find((p) => p.name === "host-a-1")?.bytesReceived;
    const cell = () => rowA.locator("td:nth-child(5)").textContent();
    if (received === undefined || received === 0) assert.match((await cell()) ?? "", /^(—|0 B)$/);
    else await eventually(`A's received bytes (${received}) on the page`, async () => /^[1-9][\d.]* (B|KiB|MiB)$/.test((await cell()) ?? ""), WAIT_MS);
    assert.deepEqual(navigations, [base + "/"], "the page refreshed its data without reloading");

    // The peer's node is drawn in the 'connected' colour, in the light and the dark scheme.
    const node = 'g.peer-node[data-name="host-a-1"] circle';
    const light = await pixelsOfFill(page, node);
    assert.ok(light.matching >= 0.3 * light.total, `light: ${light.matching} of ${light.total} pixels are ${light.fill}`);
    const shot = await page.screenshot({ fullPage: true });
    decodePng(shot); // a well-formed PNG
    const out = process.env.FLEETCACHE_UPDATE_SCREENSHOT === "1" ? SCREENSHOT : join(tmp.dir, "dashboard.png");
    writeFileSync(out, shot);
    await page.emulateMedia({ colorScheme: "dark" });
    const dark = await pixelsOfFill(page, node);
    assert.notEqual(dark.fill, light.fill, "the dark scheme has its own palette");
    assert.ok(dark.matching >= 0.3 * dark.total, `dark: ${dark.matching} of ${dark.total} pixels are ${dark.fill}`);

    assert.deepEqual(errors, [], "console errors");
    assertSameOrigin(requests, base);
  } finally {
    await browser?.close();
    await Promise.all(agents.map((a) => a.stop()));
    tmp.cleanup();
  }
});
