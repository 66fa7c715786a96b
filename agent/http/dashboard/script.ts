// The dashboard's browser script, served as /dashboard.js (a string: the build is only tsc).
// It polls /api/v1/status (same origin) and redraws. Every string from the agent (peer names
// come from operators' keys) goes through textContent or setAttribute, never innerHTML. Fields
// the status document lacks are shown as "—", so older and newer agents render alike.
// Kept free of backticks and dollar-brace so it can live in this template literal.
export const DASHBOARD_JS = String.raw`"use strict";
(function () {
  var POLL_MS = 2000;
  var FETCH_TIMEOUT_MS = 5000;
  var SVG_NS = "http://www.w3.org/2000/svg";
  var W = 760, H = 440; // H follows the number of peers (see renderGraph)
  var lastOk = 0;
  var timer = null;
  var inflight = false;

  function byId(id) { return document.getElementById(id); }

  function fill(node, children) {
    if (children === undefined || children === null) return node;
    if (!Array.isArray(children)) children = [children];
    for (var i = 0; i < children.length; i++) {
      var c = children[i];
      if (c === undefined || c === null || c === false) continue;
      node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
    }
    return node;
  }
  function attrs(node, a) {
    if (a) for (var k in a) if (a[k] !== undefined && a[k] !== null) node.setAttribute(k, String(a[k]));
    return node;
  }
  function el(tag, a, children) { return fill(attrs(document.createElement(tag), a), children); }
  function sv(tag, a, children) { return fill(attrs(document.createElementNS(SVG_NS, tag), a), children); }

  function isNum(v) { return typeof v === "number" && isFinite(v); }
  /** The first of several field names the object has as a number (names vary across agent versions). */
  function num(obj, names) {
    if (!obj || typeof obj !== "object") return undefined;
    for (var i = 0; i < names.length; i++) {
      var path = names[i].split("."), v = obj;
      for (var j = 0; j < path.length && v !== undefined && v !== null; j++) v = v[path[j]];
      if (isNum(v)) return v;
    }
    return undefined;
  }
  function str(v) { return typeof v === "string" ? v : v === undefined || v === null ? "" : String(v); }
  var DASH = "—";

  var nf = new Intl.NumberFormat();
  function count(v) { return isNum(v) ? nf.format(v) : DASH; }
  function bytes(v) {
    if (!isNum(v)) return DASH;
    var units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"], i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? String(v) : v.toFixed(v < 10 ? 1 : 0)) + " " + units[i];
  }
  function duration(s) {
    if (!isNum(s)) return DASH;
    s = Math.max(0, Math.round(s));
    var d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60, sec = s % 60;
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " min";
    if (m) return m + " min " + sec + " s";
    return sec + " s";
  }
  function ms(v) { return isNum(v) ? (v < 10 ? v.toFixed(1) : Math.round(v)) + " ms" : DASH; }
  /** A time field: ms since the epoch, seconds since the epoch, or an ISO string. */
  function toDate(v) {
    if (isNum(v)) return new Date(v < 1e11 ? v * 1000 : v);
    if (typeof v === "string" && v) { var d = new Date(v); if (!isNaN(d.getTime())) return d; }
    return undefined;
  }
  function ago(v) {
    var d = toDate(v);
    if (!d) return DASH;
    return duration((Date.now() - d.getTime()) / 1000) + " ago";
  }
  function plural(v, what) { return count(v) + " " + what + (v === 1 ? "" : "s"); }
  function clip(s, n) { s = str(s); return s.length > n ? s.slice(0, n - 1) + "…" : s; }
  function short(s) { s = str(s); return s.length > 16 ? s.slice(0, 8) + "…" + s.slice(-6) : s; }
  var LABELS = {
    narBytesServed: "NAR bytes served to Nix", narBytesFromPeers: "NAR bytes from peers", bytesFromPeers: "NAR bytes from peers",
    peerQueries: "questions to peers", failovers: "NAR failovers to another holder", transferFailures: "failed transfers"
  };
  function words(key) {
    if (Object.prototype.hasOwnProperty.call(LABELS, key)) return LABELS[key]; return key.replace(/([a-z0-9])([A-Z])/g, "$1 $2").replace(/[._]/g, " ").toLowerCase(); }

  // ---- this host ----
  function renderSelf(self) {
    var name = str(self.name);
    byId("host-name").textContent = name;
    document.title = name ? "fleetcache · " + name : "fleetcache";
    var addrs = Array.isArray(self.addresses) ? self.addresses : Array.isArray(self.listen) ? self.listen : [];
    var rows = [
      ["Name", name || DASH],
      ["Public key", el("code", null, str(self.publicKey) || DASH)],
      ["Peer ID", self.peerId ? el("code", null, str(self.peerId)) : "mesh off"],
      ["HTTP listener", self.listen ? el("code", null, str(self.listen)) : DASH],
      ["Version", str(self.version) || DASH],
      ["Uptime", duration(num(self, ["uptimeSeconds", "uptime"]))],
      ["Store paths", count(num(self, ["paths", "pathCount", "storePaths", "storePathCount"]))],
      ["Mesh addresses", addrs.length ? addrs.map(function (a) { return el("div", null, el("code", null, str(a))); }) : DASH]
    ];
    var dl = byId("self");
    dl.replaceChildren();
    rows.forEach(function (r) { dl.appendChild(el("dt", null, r[0])); dl.appendChild(el("dd", null, r[1])); });
  }

  // ---- peers ----
  function peerBytes(p, dir) {
    return dir === "in"
      ? num(p, ["bytesReceived", "bytesIn", "traffic.received", "traffic.bytesReceived"])
      : num(p, ["bytesSent", "bytesOut", "traffic.sent", "traffic.bytesSent"]);
  }
  function peerPaths(p) { return num(p, ["pathCount", "paths", "announcedPaths"]); }
  function peerName(p) { return str(p.name) || short(p.peerId) || "unknown peer"; }

  function renderGraph(self, peers, meshOn) {
    var edges = byId("graph-edges"), nodes = byId("graph-nodes");
    edges.replaceChildren();
    nodes.replaceChildren();
    var n = peers.length;
    H = n <= 1 ? 200 : n <= 4 ? 340 : 440;
    byId("graph").setAttribute("viewBox", "0 0 " + W + " " + H);
    var cx = W / 2, cy = n <= 1 ? 80 : H / 2;
    var connected = peers.filter(function (p) { return p.connected === true; }).length;
    byId("graph-desc").textContent = !meshOn && n === 0
      ? "The mesh is off on this host."
      : n + (n === 1 ? " peer, " : " peers, ") + connected + " connected: " +
        peers.map(function (p) { return peerName(p) + " " + (p.connected ? "connected" : "disconnected"); }).join(", ") + ".";
    var r = n <= 1 ? 210 : H / 2 - 70;
    var compact = n > 12;
    peers.forEach(function (p, i) {
      // One peer sits to the right; more are spread evenly around, starting at the top.
      var angle = n === 1 ? 0 : -Math.PI / 2 + (2 * Math.PI * i) / n;
      var ex = Math.cos(angle), ey = Math.sin(angle);
      var x = cx + (n === 1 ? r : r * 1.45) * ex, y = cy + r * ey;
      var state = p.connected === true ? "connected" : "disconnected";
      edges.appendChild(sv("line", { "class": "edge " + state, x1: cx, y1: cy, x2: x, y2: y }));
      if (state === "connected" && isNum(p.rttMs)) {
        edges.appendChild(sv("text", { "class": "rtt", x: (cx + x) / 2, y: (cy + y) / 2 - 6, "text-anchor": "middle" }, ms(p.rttMs)));
      }
      var g = sv("g", { "class": "peer-node " + state, "data-peer-id": str(p.peerId), "data-name": str(p.name) });
      g.appendChild(sv("title", null, peerName(p) + " (" + state + ")" + (p.publicKey ? " " + str(p.publicKey) : "")));
      g.appendChild(sv("circle", { "class": "node " + state, cx: x, cy: y, r: compact ? 12 : 20 }));
      // Labels go outward from the centre so they never sit on an edge.
      var anchor = ex > 0.35 ? "start" : ex < -0.35 ? "end" : "middle";
      var lx = x + (anchor === "start" ? 28 : anchor === "end" ? -28 : 0);
      var ly = anchor === "middle" ? (ey < 0 ? y - 58 : y + 40) : y - 12;
      if (compact) { lx = x + (anchor === "start" ? 16 : anchor === "end" ? -16 : 0); ly = anchor === "middle" ? (ey < 0 ? y - 18 : y + 26) : y + 4; }
      g.appendChild(sv("text", { x: lx, y: ly, "text-anchor": anchor }, sv("tspan", { "class": "name" }, clip(peerName(p), compact ? 14 : 26))));
      if (!compact) {
        var paths = peerPaths(p);
        g.appendChild(sv("text", { "class": "sub", x: lx, y: ly + 17, "text-anchor": anchor }, plural(paths, "path")));
        var rx = peerBytes(p, "in"), tx = peerBytes(p, "out");
        g.appendChild(sv("text", { "class": "sub", x: lx, y: ly + 33, "text-anchor": anchor }, "↓ " + bytes(rx) + "  ↑ " + bytes(tx)));
      }
      nodes.appendChild(g);
    });
    var me = sv("g", { "class": "self-node" });
    me.appendChild(sv("title", null, "this host: " + str(self.name)));
    me.appendChild(sv("circle", { "class": "node self", cx: cx, cy: cy, r: 28 }));
    me.appendChild(sv("text", { x: cx, y: cy + 48, "text-anchor": "middle" }, sv("tspan", { "class": "name" }, clip(self.name || "this host", 30))));
    me.appendChild(sv("text", { "class": "sub", x: cx, y: cy + 65, "text-anchor": "middle" }, plural(num(self, ["paths", "pathCount", "storePaths"]), "path")));
    nodes.appendChild(me);
    if (n === 0) {
      nodes.appendChild(sv("text", { "class": "empty", x: cx, y: 40, "text-anchor": "middle" },
        meshOn ? "No peers known yet: give the agent --peer and --trusted-key." : "Mesh off (--p2p-listen off): this host serves only its own store."));
    }
  }

  function renderPeerTable(peers) {
    var body = byId("peers-table").tBodies[0];
    body.replaceChildren();
    if (peers.length === 0) {
      body.appendChild(el("tr", null, el("td", { colspan: 9, "class": "muted" }, "No peers.")));
      return;
    }
    peers.forEach(function (p) {
      var state = p.connected === true ? "connected" : "disconnected";
      var addrs = Array.isArray(p.addresses) ? p.addresses : [];
      var tr = el("tr", { "data-peer-id": str(p.peerId), "data-name": str(p.name) });
      fill(tr, [
        el("th", { scope: "row", title: str(p.publicKey) || null }, peerName(p)),
        el("td", { "class": "state " + state }, state + (state === "disconnected" && isNum(p.failures) && p.failures > 0 ? " (" + p.failures + " failed dials)" : "")),
        el("td", { "class": "num rtt" }, state === "connected" ? ms(p.rttMs) : DASH),
        el("td", { "class": "num paths" }, count(peerPaths(p))),
        el("td", { "class": "num" }, bytes(peerBytes(p, "in"))),
        el("td", { "class": "num" }, bytes(peerBytes(p, "out"))),
        el("td", null, ago(p.lastSeen)),
        el("td", { title: addrs.map(str).join(" ") || null }, addrs.length ? [el("code", null, str(addrs[0])), addrs.length > 1 ? " +" + (addrs.length - 1) : null] : DASH),
        el("td", { title: str(p.peerId) || null }, el("code", null, short(p.peerId) || DASH))
      ]);
      body.appendChild(tr);
    });
  }

  // ---- lookups ----
  function renderLookups(doc) {
    var c = doc.counters && typeof doc.counters === "object" ? doc.counters : {};
    // Narinfo requests by outcome; older agents had only the router's counters (localHits...).
    var local = num(c, ["narinfoHitsLocal", "localHits"]);
    var peer = num(c, ["narinfoHitsPeer", "peerHits"]);
    var miss = num(c, ["narinfoMisses", "misses"]);
    var parts = [["local", "local hits", local], ["peer", "from peers", peer], ["miss", "misses", miss]];
    var total = (local || 0) + (peer || 0) + (miss || 0);
    var bar = byId("hit-bar"), legend = byId("hit-legend");
    bar.replaceChildren();
    legend.replaceChildren();
    var pct = function (v) { return total > 0 && isNum(v) ? Math.round((1000 * v) / total) / 10 : 0; };
    parts.forEach(function (p) {
      if (total > 0 && p[2]) {
        var s = el("span", { "class": p[0] });
        s.style.width = (100 * p[2]) / total + "%"; // CSSOM, which the page's CSP allows
        bar.appendChild(s);
      }
      legend.appendChild(el("li", { "class": p[0], "data-counter": p[0] }, p[1] + ": " + count(p[2]) + (total > 0 ? " (" + pct(p[2]) + "%)" : "")));
    });
    legend.appendChild(el("li", { "class": "total" }, "total: " + count(total)));
    bar.setAttribute("aria-label", total > 0
      ? "Narinfo lookups: " + pct(local) + "% local hits, " + pct(peer) + "% from peers, " + pct(miss) + "% misses"
      : "No narinfo lookups yet");
    // Every other counter the agent reports, whatever it is named, less the lookups above (and the
    // router's counters of narinfo and NAR lookups, which newer agents report beside them).
    var hide = ["narinfoHitsLocal", "narinfoHitsPeer", "narinfoMisses"];
    hide.push("localHits", "peerHits", "misses");
    if (isNum(c.narBytesFromPeers)) hide.push("bytesFromPeers");
    var dl = byId("counters");
    dl.replaceChildren();
    var shown = 0;
    (function walk(obj, prefix) {
      Object.keys(obj).forEach(function (k) {
        var v = obj[k], key = prefix + k;
        if (v && typeof v === "object" && !Array.isArray(v)) return walk(v, key + ".");
        if (!isNum(v) || hide.indexOf(key) >= 0) return;
        dl.appendChild(el("dt", null, words(key)));
        dl.appendChild(el("dd", { "data-counter": key }, /bytes/i.test(key) ? bytes(v) : /seconds$/i.test(key) ? duration(v) : count(v)));
        shown++;
      });
    })(c, "");
    if (!shown) { dl.appendChild(el("dt", null, "none")); dl.appendChild(el("dd", null, doc.counters ? "" : "(mesh off)")); }
  }

  // ---- recent transfers and errors ----
  function eventItem(e) {
    if (typeof e !== "object" || e === null) return el("li", null, str(e));
    var t = toDate(e.time !== undefined ? e.time : e.at !== undefined ? e.at : e.timestamp);
    var msg = str(e.message !== undefined ? e.message : e.error !== undefined ? e.error : e.msg);
    var rest = Object.keys(e).filter(function (k) { return ["time", "at", "timestamp", "message", "error", "msg"].indexOf(k) < 0; })
      .map(function (k) { var v = e[k]; return words(k) + ": " + (/bytes/i.test(k) && isNum(v) ? bytes(v) : typeof v === "object" ? JSON.stringify(v) : str(v)); });
    return el("li", null, [
      t ? el("time", { datetime: t.toISOString() }, t.toLocaleTimeString()) : null,
      msg ? el("span", { "class": "msg" }, msg) : null,
      rest.length ? el("span", { "class": "muted" }, (msg ? " — " : "") + rest.join(", ")) : null
    ]);
  }
  function renderEvents(id, list, none) {
    var ul = byId(id);
    ul.replaceChildren();
    if (!Array.isArray(list) || list.length === 0) { ul.appendChild(el("li", { "class": "none" }, none)); return; }
    list.slice(-50).reverse().forEach(function (e) { ul.appendChild(eventItem(e)); });
  }

  function render(doc) {
    var self = doc.self && typeof doc.self === "object" ? doc.self : {};
    var peers = Array.isArray(doc.peers) ? doc.peers.filter(function (p) { return p && typeof p === "object"; }) : [];
    // Connected first, then by name, so the picture is stable between refreshes.
    peers.sort(function (a, b) { return (b.connected === true) - (a.connected === true) || peerName(a).localeCompare(peerName(b)); });
    var connected = peers.filter(function (p) { return p.connected === true; }).length;
    byId("peer-summary").textContent = peers.length ? connected + " of " + peers.length + " connected" : "";
    renderSelf(self);
    renderGraph(self, peers, Boolean(self.peerId));
    renderPeerTable(peers);
    renderLookups(doc);
    var c = doc.counters || {};
    var transfers = doc.recentTransfers || c.recentTransfers;
    byId("transfers-box").hidden = !Array.isArray(transfers); // shown by agents that report them
    renderEvents("transfers", transfers, "None yet.");
    renderEvents("errors", doc.recentErrors || c.recentErrors || doc.errors, "No recent errors.");
  }

  function setConn(ok, text) {
    var s = byId("conn-state");
    if (s.textContent !== text) s.textContent = text; // the live region speaks only on change
    s.className = ok ? "ok" : "bad";
    document.querySelector("main").classList.toggle("stale", !ok);
  }

  function poll() {
    timer = null;
    inflight = true;
    var ctl = new AbortController();
    var t = setTimeout(function () { ctl.abort(); }, FETCH_TIMEOUT_MS);
    fetch("/api/v1/status", { cache: "no-store", signal: ctl.signal, headers: { Accept: "application/json" } })
      .then(function (res) {
        if (!res.ok) return res.text().then(function (body) { throw new Error("status answered " + res.status + (body ? ": " + body.trim() : "")); });
        return res.json();
      })
      .then(function (doc) {
        render(doc);
        lastOk = Date.now();
        setConn(true, "Live");
        byId("updated").textContent = "updated " + new Date(lastOk).toLocaleTimeString() + ", every " + POLL_MS / 1000 + " s";
      })
      .catch(function (e) {
        var why = e && e.name === "AbortError" ? "no answer in " + FETCH_TIMEOUT_MS / 1000 + " s" : str(e && e.message);
        setConn(false, "Cannot read the agent's status: " + why);
        byId("updated").textContent = lastOk ? "showing data from " + new Date(lastOk).toLocaleTimeString() : "";
      })
      .then(function () { clearTimeout(t); inflight = false; schedule(); });
  }
  function schedule() {
    if (timer === null && !document.hidden) timer = setTimeout(poll, POLL_MS);
  }
  // A hidden tab stops polling and catches up as soon as it is shown again.
  document.addEventListener("visibilitychange", function () {
    if (!document.hidden && timer === null && !inflight) poll();
  });
  poll();
})();
`;
