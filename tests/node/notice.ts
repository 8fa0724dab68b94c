// The close notice: a graceful close while one call runs and one was never read, with
// the notice asked for ("notice") or not ("no-notice"), each step waiting for a line
// on stdin; or asked of a server without it ("older"). Prints what it saw as JSON.
// Usage: node notice.js MODE ADDRESS
import * as readline from "node:readline";
import { ConnectionClosedError, TimerClient, type EventItem, type EventMap } from "../dist/index.js";

const [mode, address] = [process.argv[2] ?? "", process.argv[3] ?? ""];
const input = readline.createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
const step = async (say: string) => {
  console.log(say);
  await lines.next();
};
const described = (error: unknown) =>
  error instanceof ConnectionClosedError ? `${error.name}: ${error.message}` : `not closed: ${error}`;
const hello = { message: "hello over the wire", delayMs: 5 };
const seen: Record<string, unknown> = {};

const client = await TimerClient.connect(address, { timeoutMs: 20_000, closeNotice: mode !== "no-notice" });
if (mode === "older") {
  seen.version = await client.version();
  seen.echo = await client.echo(hello);
  seen.unanswered = await client.echo(hello).then(String, described); // the stand-in closes
} else {
  seen.before = await client.version();
  const stream = await client.subscribe();
  const first = client.echo({ message: "first", delayMs: 0 }).then((reply) => reply.echoed, described);
  await step("running"); // the test: the first echo runs; the server stops reading
  const second = client.echo({ message: "second", delayMs: 0 }).then((reply) => reply.echoed, described);
  await step("unread"); // the test: the first echo may end
  seen.first = await first;
  seen.second = await second;
  seen.after = await client.version().then(String, described);
  const items: (EventItem<EventMap> | string)[] = [];
  try {
    for await (const item of stream) items.push(item);
    items.push("ended without an error");
  } catch (error) {
    items.push(described(error));
  }
  seen.events = items;
}
input.close();
console.log(JSON.stringify(seen));
