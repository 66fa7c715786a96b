// A partition that heals, with a link that refuses while cut (a firewall rejecting, a router
// answering "unreachable", a host whose port is closed): open connections are reset and every
// dial is refused at once, instead of hanging as in partition-heal. Same measurements.
import { partitionScenario } from "./partition-heal.js";

export const partitionRefuse = partitionScenario("refuse");
