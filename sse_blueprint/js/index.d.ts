// Types for sse-blueprint's browser client (index.js).

/** A block of a turn: `text`, `reasoning`, `tool_call`, `tool_result` or an app's own kind. */
export interface Block {
  kind: string;
  meta: Record<string, unknown>;
  content: string;
  complete: boolean;
}

/** An app event of the turn (`citation`, `usage`, `progress`, ...), as received. */
export interface AppEvent {
  id: number;
  name: string;
  data: Record<string, unknown>;
}

export type TurnState = "running" | "done" | "error" | "cancelled";

/** What a stream's events build: blocks by number, app events, and how it ended. */
export interface Turn {
  blocks: Block[];
  /** Every app event received, in id order (a resumed follower gets each durable one once). */
  events: AppEvent[];
  /** The newest data of each app event name. */
  latest: Record<string, Record<string, unknown>>;
  lastEventId: number;
  state: TurnState;
  /** The terminal event's data (`{"message"}` for an error). */
  end: Record<string, unknown> | null;
}

export type FollowerState =
  | "connecting"
  | "open"
  | "reconnecting"
  | "done"
  | "error"
  | "cancelled"
  | "not-found"
  | "unauthorized"
  | "forbidden"
  | "unreachable";

/** Where a follower keeps its turn across reloads (`sessionStorage` by default). */
export interface TurnStore {
  getItem(key: string): string | null;
  setItem(key: string, value: string): void;
}

export interface FollowOptions {
  /** `sessionStorage` by default; `null` keeps nothing. */
  store?: TurnStore | null;
  /** The store's key; `sse:<stream URL>` by default. */
  key?: string;
  /** `eventsource` (default) or `fetch` (NDJSON over fetch: custom headers such as Authorization). */
  transport?: "eventsource" | "fetch";
  /** Headers for fetch requests (the `fetch` transport, status and cancel). */
  headers?: Record<string, string>;
  /** App event names an EventSource listens for (default: APP_EVENTS). NDJSON gets every one. */
  events?: string[];
  /** Reconnects in a row without an answer before the follower gives up (default 8). */
  maxRetries?: number;
  /** The first delay of the fetch transport's reconnects, doubling (default 1000 ms). */
  retryMs?: number;
  onChange?: (turn: Turn, follower: StreamFollower) => void;
  onState?: (state: FollowerState, follower: StreamFollower) => void;
  /** An EventSource class (tests, polyfills). */
  EventSource?: typeof EventSource;
}

/** App events an EventSource listens for by default. */
export const APP_EVENTS: string[];

export function newTurn(): Turn;

/** The contract's client rule for one event; false (nothing changes) for an id it has. */
export function applyEvent(turn: Turn, id: number, name: string, data: any): boolean;

/** Follows one stream. Dispatches `change` after each event it applies, `state` on a new state. */
export class StreamFollower extends EventTarget {
  constructor(url: string, options?: FollowOptions);
  readonly url: string;
  readonly turn: Turn;
  readonly state: FollowerState;
  readonly reconnects: number;
  readonly lastEventId: number;
  readonly closed?: boolean;
  /** POST the stream's cancel: every reader then gets `cancelled`. */
  cancel(): Promise<Response>;
  /** Stop following; the turn so far stays saved. */
  close(): void;
}

export function followStream(url: string, options?: FollowOptions): StreamFollower;
