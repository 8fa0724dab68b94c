// The framing of the timer wire protocol, without I/O: requests to bytes, bytes to frames.
//
//   request: [u32 method_len][method: UTF-8][u32 payload_len][payload: one CBOR item]
//   reply:   [i32 ret][u32 body_len][body]
//
// All integers are big-endian. Replies carry no id: order alone pairs them with requests.
import { Decoder, Encoder } from "cbor-x";

/** Success: the body is one CBOR item. */
export const RET_OK = 0;
/** Error: the body is the message as raw UTF-8 text, not CBOR. */
export const RET_ERROR = 1;
/** An event frame of the event extension; never a reply. */
export const RET_EVENT = 16;
/** A drop notice of the event extension: `{dropped: count}`, or `{dropped: 0, gap: reason}`; never a reply. */
export const RET_EVENTS_DROPPED = 17;
/** The close notice `{reason}`, only on a connection that asked (`server.goaway`); never a reply. */
export const RET_CLOSE_NOTICE = 18;
// Any other code is never a reply: a frame with a code this client does not know (a
// newer server's, such as a "still running" 3 before a reply) is skipped whole.

/** The largest reply body this client accepts (64 MiB) before it closes the connection. */
export const MAX_BODY = 64 * 1024 * 1024;

// Map headers sized by count, no record extension, no tags: the reference's bytes exactly.
const encoder = new Encoder({ variableMapSize: true, useRecords: false, tagUint8Array: false });
const decoder = new Decoder({ mapsAsObjects: true, useRecords: false });

/** A frame as read: its return code and its raw body. */
export interface Frame {
  ret: number;
  body: Buffer;
}

/**
 * A value as the wire wants it: members that are `undefined` or `null` left out (an
 * unset optional field is never sent, as the reference encodes it, so an older server
 * that lacks the field still accepts the call), and integers checked to be exact,
 * since a JavaScript number beyond 2^53 - 1 is no longer the integer it was meant to be.
 */
function toWire(value: unknown, path: string): unknown {
  if (typeof value === "number" && Number.isInteger(value)) {
    if (!Number.isSafeInteger(value)) {
      throw new RangeError(`${path || "value"}: ${value} is beyond Number.MAX_SAFE_INTEGER, so not exact`);
    }
    // cbor-x writes a number beyond 32 bits as a float; a bigint goes out as the integer.
    return value > 0xffffffff || value < -0xffffffff ? BigInt(value) : value;
  }
  if (Array.isArray(value)) return value.map((item, i) => toWire(item, `${path}.${i}`));
  if (value !== null && typeof value === "object" && !ArrayBuffer.isView(value)) {
    const out: Record<string, unknown> = {};
    for (const [key, member] of Object.entries(value)) {
      if (member !== undefined && member !== null) out[key] = toWire(member, at(path, key));
    }
    return out;
  }
  return value;
}

/** A decoded value with every integer as a `number`; one beyond 2^53 - 1 is an error. */
function fromWire(value: unknown, path: string): unknown {
  if (typeof value === "bigint") {
    const number = Number(value);
    if (!Number.isSafeInteger(number)) {
      throw new RangeError(`${path || "reply"}: ${value} is beyond Number.MAX_SAFE_INTEGER`);
    }
    return number;
  }
  if (Array.isArray(value)) return value.map((item, i) => fromWire(item, `${path}.${i}`));
  if (value !== null && typeof value === "object" && !ArrayBuffer.isView(value)) {
    const record = value as Record<string, unknown>;
    for (const key of Object.keys(record)) {
      record[key] = fromWire(record[key], path ? `${path}.${key}` : key);
    }
  }
  return value;
}

/**
 * Reads one decoded value as type `T` at `path` (for errors): every field the type
 * declares is checked, and a map's keys it does not declare (a newer server's) are
 * left out. Throws a TypeError naming the path and what was expected.
 */
export type Read<T> = (value: unknown, path: string) => T;

function refuse(path: string, expected: string, value: unknown): never {
  const where = path || "value";
  if (value === undefined) throw new TypeError(`${where}: missing`);
  const got = value === null ? "null" : Array.isArray(value) ? "an array" : typeof value;
  throw new TypeError(`${where}: expected ${expected}, got ${got}`);
}

/** The path of a map's member, for errors. */
export function at(path: string, key: string): string {
  return path ? `${path}.${key}` : key;
}

export const readText: Read<string> = (value, path) =>
  typeof value === "string" ? value : refuse(path, "text", value);

export const readInt64: Read<number> = (value, path) =>
  Number.isInteger(value) ? (value as number) : refuse(path, "an integer", value);

export const readBool: Read<boolean> = (value, path) =>
  typeof value === "boolean" ? value : refuse(path, "a boolean", value);

export const readFloat: Read<number> = (value, path) =>
  typeof value === "number" ? value : refuse(path, "a number", value);

export function readList<T>(read: Read<T>): Read<T[]> {
  return (value, path) =>
    Array.isArray(value) ? value.map((item, i) => read(item, at(path, String(i)))) : refuse(path, "an array", value);
}

export function readNullable<T>(read: Read<T>): Read<T | null> {
  return (value, path) => (value === null ? null : read(value, path));
}

/** A map's members by key; `read<Model>` functions take the keys they know from it. */
export function readMap(value: unknown, path: string): Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value) || ArrayBuffer.isView(value)) {
    return refuse(path, "a map", value);
  }
  return value as Record<string, unknown>;
}

/** Encode one CBOR item the way the reference does (`{}` is the single byte a0). */
export function encodeItem(value: unknown): Buffer {
  // The encoder reuses its buffer: copy before the next call overwrites it.
  return Buffer.from(encoder.encode(toWire(value, "")));
}

/** Decode one CBOR item, integers as numbers. */
export function decodeItem(body: Buffer): unknown {
  return fromWire(decoder.decode(body), "");
}

/** One whole request frame: the method name and its payload map. */
export function encodeRequest(method: string, payload: object): Buffer {
  const name = Buffer.from(method, "utf8");
  const body = encodeItem(payload);
  const frame = Buffer.allocUnsafe(8 + name.length + body.length);
  frame.writeUInt32BE(name.length, 0);
  name.copy(frame, 4);
  frame.writeUInt32BE(body.length, 4 + name.length);
  body.copy(frame, 8 + name.length);
  return frame;
}

/** Cuts a byte stream into whole frames, however it was split. */
export class FrameReader {
  private buffer: Buffer = Buffer.alloc(0);

  constructor(private readonly maxBody: number = MAX_BODY) {}

  /** Add bytes as they arrived; return every frame now complete, in order. */
  push(data: Buffer): Frame[] {
    this.buffer = this.buffer.length ? Buffer.concat([this.buffer, data]) : data;
    const frames: Frame[] = [];
    let at = 0;
    while (this.buffer.length - at >= 8) {
      const size = this.buffer.readUInt32BE(at + 4);
      if (size > this.maxBody) {
        throw new RangeError(`a reply body of ${size} bytes is over the limit of ${this.maxBody}`);
      }
      if (this.buffer.length - at - 8 < size) break;
      const ret = this.buffer.readInt32BE(at);
      frames.push({ ret, body: this.buffer.subarray(at + 8, at + 8 + size) });
      at += 8 + size;
    }
    this.buffer = this.buffer.subarray(at);
    return frames;
  }
}
