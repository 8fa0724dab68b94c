// One connection to a timer server over node:net (TCP or a Unix socket): pipelined
// calls paired with replies by order, call timeouts that keep that order, and the
// event extension as async iterators.
import * as net from "node:net";
import {
  FrameReader,
  RET_CLOSE_NOTICE,
  RET_ERROR,
  RET_EVENT,
  RET_EVENTS_DROPPED,
  RET_OK,
  decodeItem,
  encodeRequest,
  readInt64,
  readMap,
  readText,
  type Frame,
  type Read,
} from "./wire.js";

/** The server answered a call with an error reply (ret 1). */
export class RemoteCallError extends Error {
  override readonly name = "RemoteCallError";
  constructor(
    readonly method: string,
    readonly remoteMessage: string,
  ) {
    // The server's message usually names the method already: say it once.
    super(remoteMessage.startsWith(`${method}:`) ? remoteMessage : `${method}: ${remoteMessage}`);
  }
}

/**
 * A call got no reply within its timeout. Its reply, when it comes, is read and
 * dropped, so every later call still gets its own reply.
 */
export class CallTimeoutError extends Error {
  override readonly name = "CallTimeoutError";
  constructor(
    readonly method: string,
    readonly timeoutMs: number,
  ) {
    super(`${method}: no reply within ${timeoutMs} ms`);
  }
}

/**
 * A success reply that this client cannot decode: a field it knows missing or of the
 * wrong type, or an integer beyond 2^53 - 1. Fields it does not know are ignored.
 */
export class InvalidReplyError extends Error {
  override readonly name = "InvalidReplyError";
  constructor(
    readonly method: string,
    cause: Error,
  ) {
    super(`${method}: invalid reply: ${cause.message}`, { cause });
  }
}

/** No connection could be made: a bad address, a refusal, or no answer in time. */
export class ConnectError extends Error {
  override readonly name = "ConnectError";
  constructor(
    readonly address: string,
    message: string,
    options?: ErrorOptions,
  ) {
    super(`${address}: ${message}`, options);
  }
}

/**
 * The connection closed (or broke) before this call's reply or this stream's end. A
 * call sent before the close may have run on the server, unless the error is a
 * CallNotStartedError.
 */
export class ConnectionClosedError extends Error {
  override readonly name: string = "ConnectionClosedError";
}

/**
 * The server closed the connection gracefully before it read this call, and said so
 * (the close notice, asked for with `closeNotice: true`): the call never started, so
 * it is safe to send again, even a call with effects.
 */
export class CallNotStartedError extends ConnectionClosedError {
  override readonly name = "CallNotStartedError";
}

export interface CallOptions {
  /** Milliseconds to wait for this call's reply; 0 waits for ever. Default: the connection's. */
  timeoutMs?: number;
}

export interface ConnectOptions {
  /** Default milliseconds to wait for each reply; 0 waits for ever (default 30000). */
  timeoutMs?: number;
  /** Milliseconds to wait for the connection (default 10000). */
  connectTimeoutMs?: number;
  /**
   * Ask the server to say so before it closes gracefully (`server.goaway`, sent first):
   * then a call it never read rejects with CallNotStartedError, safe to send again. A
   * server without the extension refuses, and the client carries on without the
   * promise. Off by default, so the client sends the base protocol byte for byte.
   */
  closeNotice?: boolean;
}

/**
 * One item of an event stream: an event; an event of a kind this client does not
 * know (a newer server's), with its data as decoded and unchecked; how many events
 * were lost right here; or a gap of unknown size (the server lost its event bus,
 * and says why).
 */
export type EventItem<M> =
  | { [K in keyof M]: { kind: "event"; event: K; data: M[K] } }[keyof M]
  | { kind: "unknown"; event: string; data: unknown }
  | { kind: "dropped"; count: number }
  | { kind: "gap"; reason: string };

/** How each event's data is read, by event name. */
export type EventReaders<M> = { [K in keyof M]: Read<M[K]> };

export interface SubscribeOptions {
  /** Events held for a slow reader before the oldest are dropped (default 1024). */
  maxQueue?: number;
}

interface Pending {
  method: string;
  read: Read<unknown>;
  resolve: (value: unknown) => void;
  reject: (error: Error) => void;
  timer: NodeJS.Timeout | undefined;
  done: boolean;
}

/** Open a socket to `tcp:HOST:PORT` (HOST may be `[v6]`) or `unix:PATH`. */
export function dial(address: string, options: ConnectOptions = {}): Promise<net.Socket> {
  let target: net.NetConnectOpts;
  if (address.startsWith("unix:")) {
    target = { path: address.slice("unix:".length) };
  } else if (address.startsWith("tcp:")) {
    const rest = address.slice("tcp:".length);
    const colon = rest.lastIndexOf(":");
    const port = Number(rest.slice(colon + 1));
    if (colon < 0 || !Number.isInteger(port) || port < 1 || port > 65535) {
      throw new ConnectError(address, "expected tcp:HOST:PORT with a port from 1 to 65535");
    }
    target = { host: rest.slice(0, colon).replace(/^\[(.*)\]$/, "$1"), port };
  } else {
    throw new ConnectError(address, "expected tcp:HOST:PORT or unix:PATH (this client has no TLS)");
  }
  const timeoutMs = options.connectTimeoutMs ?? 10_000;
  return new Promise((resolve, reject) => {
    const socket = net.connect(target);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new ConnectError(address, `no connection within ${timeoutMs} ms`));
    }, timeoutMs);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.removeAllListeners("error");
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once("error", (error) => {
      clearTimeout(timer);
      reject(new ConnectError(address, error.message, { cause: error }));
    });
  });
}

/** A stream of events on one connection; `for await` it, and `close()` it when done. */
export class Subscription<M> implements AsyncIterableIterator<EventItem<M>> {
  private readonly queue: EventItem<M>[] = [];
  private dropped = 0;
  private gap: string | undefined; // a gap notice that overflowed the queue
  private waiter: ((result: IteratorResult<EventItem<M>>) => void) | undefined;
  private failWaiter: ((error: Error) => void) | undefined;
  private ended = false;
  private error: Error | undefined;

  constructor(
    private readonly maxQueue: number,
    private readonly onClose: (subscription: Subscription<M>) => Promise<void>,
  ) {}

  /** Queue an item; beyond `maxQueue`, drop the oldest and count it. */
  push(item: EventItem<M>): void {
    if (this.ended) return;
    if (this.waiter !== undefined && this.dropped === 0 && this.gap === undefined) {
      const resolve = this.waiter;
      this.waiter = this.failWaiter = undefined;
      resolve({ value: item, done: false });
      return;
    }
    this.queue.push(item);
    if (this.queue.length > this.maxQueue) {
      const lost = this.queue.shift();
      if (lost?.kind === "gap") this.gap = lost.reason;
      else this.dropped += lost?.kind === "dropped" ? lost.count : 1;
    }
  }

  /** End the stream: cleanly, or with the error the next read raises. */
  end(error?: Error): void {
    if (this.ended) return;
    this.ended = true;
    this.error = error;
    if (error !== undefined && this.failWaiter !== undefined) this.failWaiter(error);
    else this.waiter?.({ value: undefined, done: true });
    this.waiter = this.failWaiter = undefined;
  }

  next(): Promise<IteratorResult<EventItem<M>>> {
    if (this.gap !== undefined) {
      const reason = this.gap;
      this.gap = undefined;
      return Promise.resolve({ value: { kind: "gap", reason }, done: false });
    }
    if (this.dropped > 0) {
      // The gap comes before the events still held: the oldest were the ones dropped.
      const count = this.dropped;
      this.dropped = 0;
      return Promise.resolve({ value: { kind: "dropped", count }, done: false });
    }
    const item = this.queue.shift();
    if (item !== undefined) return Promise.resolve({ value: item, done: false });
    if (this.error !== undefined) return Promise.reject(this.error);
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve, reject) => {
      this.waiter = resolve;
      this.failWaiter = reject;
    });
  }

  /** Stop the stream; the last one on a connection unsubscribes it. */
  async close(): Promise<void> {
    if (this.ended) return;
    this.end();
    await this.onClose(this);
  }

  async return(): Promise<IteratorResult<EventItem<M>>> {
    await this.close();
    return { value: undefined, done: true };
  }

  [Symbol.asyncIterator](): this {
    return this;
  }
}

/**
 * Calls over one socket. Requests may be pipelined: each reply goes to the oldest
 * call still waiting, which is why a call that timed out keeps its place.
 * `M` maps each event name to its payload type.
 */
export class Connection<M> {
  private readonly reader = new FrameReader();
  private readonly pending: Pending[] = [];
  private readonly subscriptions = new Set<Subscription<M>>();
  private readonly defaultTimeoutMs: number;
  private closedError: Error | undefined;
  private closing = false;
  private eventsRequested = false; // event frames count only once we asked for them
  private noticeGranted = false; // a close notice counts only once the server agreed
  private readonly closed: Promise<void>;

  protected constructor(
    private readonly socket: net.Socket,
    options: ConnectOptions = {},
    private readonly eventReaders: EventReaders<M>,
  ) {
    this.defaultTimeoutMs = options.timeoutMs ?? 30_000;
    socket.on("data", (data: Buffer) => this.received(data));
    socket.on("error", (error) => this.fail(new ConnectionClosedError(error.message, { cause: error })));
    this.closed = new Promise((resolve) =>
      socket.once("close", () => {
        this.fail(new ConnectionClosedError("the connection closed"));
        resolve();
      }),
    );
    if (options.closeNotice) {
      // Not a call: its reply says whether a notice will come. It is read as it arrives,
      // so a notice right behind it counts; a refusal (an older server) means none.
      const granted = () => {
        this.noticeGranted = true;
      };
      this.call("server.goaway", {}, { timeoutMs: 0 }, granted).catch(() => undefined);
    }
  }

  /**
   * Send one request and wait for its reply; any method, any payload map. `read`
   * checks the decoded reply (by default it is returned as decoded).
   */
  call<T = unknown>(
    method: string,
    payload: object,
    options: CallOptions = {},
    read: Read<T> = (value) => value as T,
  ): Promise<T> {
    if (this.closedError !== undefined) return Promise.reject(this.closedError);
    if (this.closing) return Promise.reject(new ConnectionClosedError("the client is closing"));
    let frame: Buffer;
    try {
      frame = encodeRequest(method, payload);
    } catch (error) {
      return Promise.reject(error as Error); // a promise's caller expects no synchronous throw
    }
    const timeoutMs = options.timeoutMs ?? this.defaultTimeoutMs;
    return new Promise((resolve, reject) => {
      const entry: Pending = { method, read, resolve: resolve as (value: unknown) => void, reject, timer: undefined, done: false };
      if (timeoutMs > 0) {
        entry.timer = setTimeout(() => {
          entry.done = true; // stays queued: its reply is still read, then dropped
          reject(new CallTimeoutError(method, timeoutMs));
        }, timeoutMs);
      }
      this.pending.push(entry);
      this.socket.write(frame);
    });
  }

  /**
   * Subscribe this connection to events (all of them by default). Events may come
   * before the subscribe reply, so the stream is registered before the request goes.
   */
  async subscribe(
    events?: (keyof M & string)[],
    options: SubscribeOptions = {},
  ): Promise<Subscription<M>> {
    const subscription = new Subscription<M>(options.maxQueue ?? 1024, (s) => this.unsubscribe(s));
    this.subscriptions.add(subscription);
    this.eventsRequested = true;
    try {
      await this.call("events.subscribe", events === undefined ? {} : { events });
    } catch (error) {
      this.subscriptions.delete(subscription);
      throw error;
    }
    return subscription;
  }

  private async unsubscribe(subscription: Subscription<M>): Promise<void> {
    this.subscriptions.delete(subscription);
    if (this.subscriptions.size === 0 && !this.closing && this.closedError === undefined) {
      await this.call("events.unsubscribe", {});
    }
  }

  /**
   * Close the connection: new calls fail at once, calls already sent get the replies
   * the server sends before it closes its side, and the rest fail with
   * ConnectionClosedError.
   */
  async close(): Promise<void> {
    this.closing = true;
    for (const subscription of this.subscriptions) subscription.end();
    this.subscriptions.clear();
    this.socket.end();
    await this.closed;
  }

  private received(data: Buffer): void {
    let frames: Frame[];
    try {
      frames = this.reader.push(data);
    } catch (error) {
      this.socket.destroy(error as Error);
      return;
    }
    for (const frame of frames) {
      if (frame.ret === RET_OK || frame.ret === RET_ERROR) this.reply(frame);
      else if (this.eventsRequested && (frame.ret === RET_EVENT || frame.ret === RET_EVENTS_DROPPED)) {
        this.event(frame);
      } else if (this.noticeGranted && frame.ret === RET_CLOSE_NOTICE) {
        this.notice(frame);
        return;
      }
      // Any other code is never a reply: skipped whole, the connection kept.
    }
  }

  private reply(frame: Frame): void {
    const entry = this.pending.shift();
    if (entry === undefined) {
      this.socket.destroy(new Error(`a reply (ret ${frame.ret}) with no call waiting`));
      return;
    }
    clearTimeout(entry.timer);
    if (entry.done) return; // timed out: consumed, so the next reply goes to the next call
    entry.done = true;
    if (frame.ret === RET_OK) {
      try {
        entry.resolve(entry.read(decodeItem(frame.body), ""));
      } catch (error) {
        entry.reject(new InvalidReplyError(entry.method, error as Error));
      }
    } else {
      entry.reject(new RemoteCallError(entry.method, frame.body.toString("utf8")));
    }
  }

  private event(frame: Frame): void {
    let item: EventItem<M>;
    try {
      const body = readMap(decodeItem(frame.body), "");
      if (frame.ret === RET_EVENT) {
        const event = readText(body.event, "event");
        const readers = this.eventReaders as Record<string, Read<unknown>>;
        item = Object.prototype.hasOwnProperty.call(readers, event)
          ? ({ kind: "event", event, data: readers[event]!(body.data, "data") } as EventItem<M>)
          : { kind: "unknown", event, data: body.data };
      } else if (typeof body.gap === "string") {
        item = { kind: "gap", reason: body.gap }; // {dropped: 0, gap}: the bus was lost
      } else {
        item = { kind: "dropped", count: readInt64(body.dropped, "dropped") };
      }
    } catch (error) {
      this.socket.destroy(new Error(`invalid event frame: ${(error as Error).message}`));
      return;
    }
    for (const subscription of this.subscriptions) subscription.push(item);
  }

  /** The server read nothing after its last reply: every call still waiting never started. */
  private notice(frame: Frame): void {
    let reason = "the server is closing the connection";
    try {
      const told = readMap(decodeItem(frame.body), "").reason; // any body: the frame is the promise
      if (typeof told === "string" && told !== "") reason = told;
    } catch {
      // unreadable: the default reason
    }
    const closed = `closed by the server (${reason})`;
    this.fail(
      new ConnectionClosedError(closed),
      new CallNotStartedError(`${closed} before it read this call: it never started, and is safe to send again`),
    );
    this.socket.destroy();
  }

  /** End the connection once: calls waiting and later ones get `calls`, streams `error`. */
  private fail(error: Error, calls: Error = error): void {
    if (this.closedError !== undefined) return;
    this.closedError = calls;
    for (const entry of this.pending.splice(0)) {
      clearTimeout(entry.timer);
      if (!entry.done) entry.reject(calls);
    }
    for (const subscription of this.subscriptions) subscription.end(error);
    this.subscriptions.clear();
  }
}
