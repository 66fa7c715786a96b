// Content routing summaries (/fleetcache/summary/1.0.0): the publisher announces this host's
// paths, the table holds what peers announced. One import for the agent and the router.
export { SummaryPublisher, type StoreChanges, type SummaryPublisherOptions } from "./summary-publisher.js";
export { SummaryTable, type SummaryTableOptions, type SummaryTraffic } from "./summary-table.js";
