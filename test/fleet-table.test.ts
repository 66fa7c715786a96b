// The fleet table's own bookkeeping: when a peer counts as a holder, as reconnecting, or neither.
// The peer manager and summary table are fakes that emit what the real ones emit.
import { test } from "node:test";
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { setTimeout as sleep } from "node:timers/promises";
import { FleetTable } from "../agent/mesh/fleet-table.js";
import type { PeerInfo, PeerManager } from "../agent/mesh/peer-manager.js";
import type { SummaryTable } from "../agent/mesh/summary-table.js";

const PATH = "0".repeat(31) + "1";

/** One peer "p" that announces PATH; the test moves it between states. */
function setup(graceMs = 60_000) {
  const state = { connected: true, ready: true, kept: true };
  const manager = Object.assign(new EventEmitter(), {
    connectedPeers: () => (state.connected ? ["p"] : []),
    peers: (): PeerInfo[] => [{ peerId: "p", name: "p-1", publicKey: "p-1:x", addresses: [], connected: state.connected, sources: ["static"], failures: 0 }],
  });
  const summaries = Object.assign(new EventEmitter(), {
    subscribe: () => {},
    holders: () => (state.ready ? ["p"] : []),
    keptHolders: () => (!state.ready && state.kept ? ["p"] : []),
    pathCount: () => (state.ready ? 1 : undefined),
  });
  const table = new FleetTable(manager as unknown as PeerManager, summaries as unknown as SummaryTable, undefined, { reconnectGraceMs: graceMs });
  const changes = { n: 0 };
  table.onChange(() => changes.n++);
  const summaryChanged = () => summaries.emit("change", "p");
  return { state, manager, summaryChanged, table, changes };
}

test("fleet table: a peer whose summary leaves lookups, then whose connection closes, is reconnecting until it is back", () => {
  const { state, manager, summaryChanged, table, changes } = setup();
  summaryChanged();
  assert.deepEqual(table.holders(PATH), ["p"]);
  assert.deepEqual(table.reconnectingHolders(PATH), []);
  // Its publisher stops first: the summary is parked while the connection is still open.
  state.ready = false;
  summaryChanged();
  assert.deepEqual(table.holders(PATH), []);
  assert.deepEqual(table.reconnectingHolders(PATH), ["p"], "waited for from the moment its summary left");
  state.connected = false;
  manager.emit("disconnected", "p");
  assert.equal(table.rows()[0]!.reconnecting, true);
  // Back: connected, then its summary resumed.
  state.connected = true;
  manager.emit("connected", "p");
  assert.deepEqual(table.reconnectingHolders(PATH), ["p"], "still waited for until its summary is back");
  state.ready = true;
  summaryChanged();
  assert.deepEqual(table.holders(PATH), ["p"]);
  assert.deepEqual(table.reconnectingHolders(PATH), []);
  assert.equal(table.rows()[0]!.reconnecting, undefined);
  assert.ok(changes.n >= 4, "every step told the waiting lookups");
  table.stop();
});

test("fleet table: a peer not back within the grace is forgotten; one whose summary was dropped is never waited for", async () => {
  const { state, manager, summaryChanged, table, changes } = setup(10);
  summaryChanged();
  state.ready = false;
  state.connected = false;
  summaryChanged();
  manager.emit("disconnected", "p");
  assert.deepEqual(table.reconnectingHolders(PATH), ["p"]);
  const before = changes.n;
  await sleep(50);
  assert.deepEqual(table.reconnectingHolders(PATH), [], "forgotten after the grace");
  assert.equal(table.rows()[0]!.reconnecting, undefined);
  assert.ok(changes.n > before, "the end of the grace is a change: waiting lookups give up");
  const other = setup();
  other.summaryChanged();
  other.state.ready = false;
  other.state.kept = false; // a protocol error: the summary is dropped, not kept
  other.summaryChanged();
  assert.deepEqual(other.table.reconnectingHolders(PATH), []);
  other.table.stop();
  // Connected, but its summary stays out of lookups (its stream keeps failing): waited for only
  // within the grace, not on every lookup from then on.
  const stuck = setup(10);
  stuck.summaryChanged();
  stuck.state.ready = false;
  stuck.summaryChanged();
  assert.deepEqual(stuck.table.reconnectingHolders(PATH), ["p"]);
  await sleep(50);
  assert.deepEqual(stuck.table.reconnectingHolders(PATH), []);
  stuck.table.stop();
  table.stop();
});
