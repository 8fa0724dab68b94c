// Every method of the generated client against a real server; prints what it saw as JSON.
// Usage: node e2e.js ADDRESS
import {
  CallTimeoutError,
  ConnectError,
  RemoteCallError,
  TimerClient,
  type EventItem,
  type EventMap,
} from "../dist/index.js";

const address = process.argv[2] ?? "";
const client = await TimerClient.connect(address, { timeoutMs: 20_000 });
const other = await TimerClient.connect(address, { timeoutMs: 20_000 });
const third = await TimerClient.connect(address, { timeoutMs: 20_000 });
const seen: Record<string, unknown> = {};

seen.version = await client.version();
seen.echo = await client.echo({ message: "hello over the wire", delayMs: 5 });
seen.complex = await client.complex({
  messages: [{ message: "a", delayMs: 0 }, { message: "b", delayMs: 0 }],
  tags: ["x", "y"],
  note: "n",
  retries: 3,
});
seen.complexBare = await client.complex({ messages: [], tags: [] });
const job = { name: "j", payload: ["p"], priority: 1 };
const retry = { maxAttempts: 3, backoffMs: 100, retryOn: ["timeout"] };
const when = { startAtMs: 1000, intervalMs: 500, jitter: 7 };
seen.schedule = await client.schedule(job, retry, when);

try {
  await client.schedule({ ...job, name: "" }, retry, when);
  seen.error = "no error";
} catch (error) {
  seen.error = error instanceof RemoteCallError ? [error.name, error.method, error.remoteMessage] : String(error);
}

// Integers beyond 2^53 - 1 are refused both ways rather than rounded: this request
// before it is sent, and a reply whose firstRunAtMs (startAtMs + jitter) is past it.
const refused = (error: unknown) => (error instanceof Error ? `${error.name}: ${error.message}` : "?");
seen.unsafeRequest = await client.echo({ message: "big", delayMs: 2 ** 60 }).then(String, refused);
const edge = { ...when, startAtMs: Number.MAX_SAFE_INTEGER, jitter: 2 };
seen.unsafeReply = await client.schedule(job, retry, edge).then(String, refused);
const wide = { ...when, startAtMs: 2 ** 40, jitter: -(2 ** 41) }; // beyond 32 bits both ways
seen.wide = (await client.schedule(job, retry, wide)).firstRunAtMs;
seen.afterUnsafe = (await client.echo({ message: "still in step", delayMs: 0 })).echoed;

const burst = await Promise.all(
  Array.from({ length: 1000 }, (_, i) => client.echo({ message: `burst ${i}`, delayMs: 0 })),
);
seen.burst = burst.map((reply) => reply.echoed);

// The slow reply cannot come before 300 ms, so the 20 ms timeout always fires first;
// the next call goes out after it and must get its own reply, not the slow one's.
seen.timeout = await client.echo({ message: "slow", delayMs: 300 }, { timeoutMs: 20 }).then(
  (reply) => `replied ${reply.echoed}`,
  (error) => (error instanceof CallTimeoutError ? `${error.name} ${error.method}` : String(error)),
);
seen.afterTimeout = (await client.echo({ message: "next", delayMs: 0 })).echoed;

// Two streams on one connection get every event at once, so once `all` has seen five,
// `small` (which holds two) has dropped three.
const all = await client.subscribe();
const small = await client.subscribe(["on_echo_fired"], { maxQueue: 2 });
for (let i = 0; i < 5; i++) await other.echo({ message: `event ${i}`, delayMs: 0 });
const items = async (stream: AsyncIterator<EventItem<EventMap>>, n: number) => {
  const out: EventItem<EventMap>[] = [];
  for (let i = 0; i < n; i++) out.push((await stream.next()).value as EventItem<EventMap>);
  return out;
};
seen.events = await items(all, 5);
seen.smallEvents = await items(small, 3);
await small.close();
await all.close();
seen.afterUnsubscribe = await client.version();

await other.close();
const late = client.echo({ message: "late", delayMs: 50 });
await client.close(); // graceful: a call already sent still gets its reply
seen.lateReply = await late.then((reply) => reply.echoed, refused);
try {
  await client.version();
  seen.afterClose = "answered";
} catch (error) {
  seen.afterClose = (error as Error).name;
}

// An error reply names its method once, whether or not the server's message does.
const messageOf = (error: unknown) => (error instanceof RemoteCallError ? error.message : `${error}`);
seen.errorMessages = [
  await third.schedule({ ...job, name: "" }, retry, when).then(String, messageOf),
  await third.echo({ message: 5 as unknown as string, delayMs: 0 }).then(String, messageOf),
];
await third.close();
// A connection that cannot be made is a ConnectError, like the client's other typed errors.
const failed = async (target: string) =>
  TimerClient.connect(target, { connectTimeoutMs: 5_000 }).then(
    () => "connected",
    (error) => (error instanceof ConnectError ? `${error.name} ${error.message}` : `${error}`),
  );
seen.connectErrors = [await failed("unix:/nonexistent/timer.sock"), await failed("nats://x:1")];
console.log(JSON.stringify(seen));
