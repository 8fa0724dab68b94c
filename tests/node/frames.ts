// Event frames interleaved with replies, as a stand-in server sends them; prints what it saw.
// Usage: node frames.js ADDRESS
import { RemoteCallError, TimerClient } from "../dist/index.js";

const client = await TimerClient.connect(process.argv[2] ?? "");
const stream = await client.subscribe();
const error = await client.version().then(String, (e: unknown) =>
  e instanceof RemoteCallError ? [e.name, e.message] : String(e),
);
const echo = await client.echo({ message: "hello over the wire", delayMs: 5 });
const items = [];
for (let i = 0; i < 5; i++) items.push((await stream.next()).value);
await client.close();
const end = await stream.next();
console.log(JSON.stringify({ error, echo, items, ended: end.done }));
