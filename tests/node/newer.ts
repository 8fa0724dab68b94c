// Every method against a newer server, then calls against an older one; prints what it saw.
// Usage: node newer.js NEWER_ADDRESS OLDER_ADDRESS (tests/_newer_server.py, with and without --older)
import { TimerClient, type EventItem, type EventMap } from "../dist/index.js";

const refused = (error: unknown) => (error instanceof Error ? `${error.name}: ${error.message}` : "?");
const job = { name: "j", payload: ["p"], priority: 1 };
const retry = { maxAttempts: 3, backoffMs: 100, retryOn: ["timeout"] };
const when = { startAtMs: 1000, intervalMs: 500, jitter: 7 };
const two = { messages: [{ message: "a", delayMs: 0 }, { message: "a", delayMs: 0 }], tags: ["x"], note: "n" };
const seen: Record<string, unknown> = {};

const client = await TimerClient.connect(process.argv[2] ?? "", { timeoutMs: 20_000 });
const stream = await client.subscribe();
seen.calls = [
  await client.version(),
  await client.echo({ message: "one", delayMs: 0 }),
  await client.complex(two),
  await client.schedule(job, retry, when),
  await client.echo({ message: "two", delayMs: 0 }),
];
const items: EventItem<EventMap>[] = [];
for (let i = 0; i < 3; i++) items.push((await stream.next()).value as EventItem<EventMap>);
seen.items = items;
seen.wrongType = await client.echo({ message: "answer with a wrong type", delayMs: 0 }).then(String, refused);
seen.after = await client.version();
await stream.close();
await client.close();

// The older server knows neither complex's `retries` nor the schedule's `jitter`.
const older = await TimerClient.connect(process.argv[3] ?? "", { timeoutMs: 20_000 });
seen.olderComplex = await older.complex({ ...two, retries: null }).then((r) => r.summary, refused);
seen.olderSchedule = await older.schedule(job, retry, { ...when, jitter: undefined }).then((r) => r.firstRunAtMs, refused);
seen.olderRefuses = await older.complex({ ...two, retries: 3 }).then((r) => r.summary, refused);
await older.close();
console.log(JSON.stringify(seen));
