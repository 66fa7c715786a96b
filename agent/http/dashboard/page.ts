// The dashboard's HTML shell. Everything in it is static; script.ts fills it from /api/v1/status,
// so the page itself carries no host data and can be served to any client of the listener.
export const DASHBOARD_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>fleetcache</title>
<link rel="icon" href="/dashboard/icon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/dashboard/style.css">
<script src="/dashboard/app.js" defer></script>
</head>
<body>
<header>
  <h1>fleetcache <span id="host-name"></span></h1>
  <p><span id="conn-state" role="status" aria-live="polite">Connecting to the agent…</span>
     <span id="updated" class="muted"></span></p>
</header>
<noscript><p>The dashboard needs JavaScript. The same data is at <a href="/api/v1/status">/api/v1/status</a>.</p></noscript>
<main>
  <section aria-labelledby="peers-h" class="card wide">
    <h2 id="peers-h">Peers <span id="peer-summary" class="muted"></span></h2>
    <figure>
      <svg id="graph" role="img" aria-labelledby="graph-title graph-desc" viewBox="0 0 760 440" preserveAspectRatio="xMidYMid meet">
        <title id="graph-title">Mesh of this host and its peers</title>
        <desc id="graph-desc">No data yet.</desc>
        <g id="graph-edges"></g>
        <g id="graph-nodes"></g>
      </svg>
      <figcaption>
        <span class="key"><span class="swatch connected"></span>connected (edge label: round-trip time)</span>
        <span class="key"><span class="swatch disconnected"></span>disconnected</span>
        <span class="muted">Node labels: name, paths announced, bytes received ↓ / sent ↑.</span>
      </figcaption>
    </figure>
    <div class="scroll">
      <table id="peers-table">
        <caption>Known peers</caption>
        <thead>
          <tr>
            <th scope="col">Name</th>
            <th scope="col">State</th>
            <th scope="col" class="num">Round trip</th>
            <th scope="col" class="num">Paths announced</th>
            <th scope="col" class="num">Received</th>
            <th scope="col" class="num">Sent</th>
            <th scope="col">Last seen</th>
            <th scope="col">Address</th>
            <th scope="col">Peer ID</th>
          </tr>
        </thead>
        <tbody></tbody>
      </table>
    </div>
  </section>

  <section aria-labelledby="self-h" class="card">
    <h2 id="self-h">This host</h2>
    <dl id="self" class="facts"></dl>
  </section>

  <section aria-labelledby="lookups-h" class="card">
    <h2 id="lookups-h">Narinfo lookups</h2>
    <div id="hit-bar" class="bar" role="img" aria-label="No lookups yet"></div>
    <ul id="hit-legend" class="legend"></ul>
  </section>

  <section aria-labelledby="activity-h" class="card">
    <h2 id="activity-h">Transfers and errors</h2>
    <dl id="counters" class="facts"></dl>
    <div id="transfers-box" hidden>
      <h3>Recent transfers</h3>
      <ul id="transfers" class="events"></ul>
    </div>
    <h3>Recent errors</h3>
    <ul id="errors" class="events"></ul>
  </section>
</main>
</body>
</html>
`;
