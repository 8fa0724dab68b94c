// The two requests of the captured vectors through the generated client; prints the replies.
// Usage: node vectors.js ADDRESS (a server that answers as the reference did)
import { TimerClient } from "../dist/index.js";

const client = await TimerClient.connect(process.argv[2] ?? "");
const version = await client.version();
const echo = await client.echo({ message: "hello over the wire", delayMs: 5 });
await client.close();
console.log(JSON.stringify({ version, echo }));
