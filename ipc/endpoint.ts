/**
 * One side of the control channel: validates what arrives, correlates replies
 * with requests, dispatches the peer's requests to a handler, and answers a
 * malformed or unknown message with a typed `error` instead of dying.
 *
 * @module
 */

import type { ErrorCode, ErrorMessage } from "./protocol.ts";
import { ValidationError } from "./validate.ts";

/** The subset of Worker / worker-global-scope that the endpoint uses. */
export interface MessagePortLike {
  postMessage(message: unknown, transfer?: Transferable[]): void;
  onmessage: ((event: MessageEvent) => void) | null;
}

/** A request the peer refused or failed; carries the peer's error message. */
export class IpcError extends Error {
  override name = "IpcError";
  constructor(readonly code: ErrorCode, readonly field: string | undefined, message: string) {
    super(message);
  }
}

/**
 * A request the peer never answered: it timed out, or the channel closed
 * first. Whatever the request handed over (transferred buffers) may still be
 * in the peer's hands, unlike after a reply, even an error reply.
 */
export class NoAnswerError extends IpcError {
  override name = "NoAnswerError";
  constructor(message: string) {
    super("failed", undefined, message);
  }
}

/** Thrown by a request handler to answer with a typed error rather than `failed`. */
export class RefusedError extends Error {
  override name = "RefusedError";
  constructor(message: string, readonly field?: string, readonly code: ErrorCode = "refused") {
    super(message);
  }
}

type Msg = { kind: string; id?: number | null };
/** A request as the caller writes it: everything but the id, which the endpoint assigns. */
export type WithoutId<T> = T extends { id: number } ? Omit<T, "id"> : never;

export interface EndpointOptions<In extends Msg, Out extends Msg> {
  /** Validator for the peer's messages. */
  parse: (raw: unknown) => In;
  /** Kinds that are requests from the peer (they carry an id and want a reply). */
  requestKinds: ReadonlySet<string>;
  /** Kinds that are replies to our requests. */
  replyKinds: ReadonlySet<string>;
  /** Serves a peer request; returns the reply (without id) or throws. */
  onRequest: (req: In) => Promise<{ reply: WithoutId<Out>; transfer?: Transferable[] }>;
  /** Every other valid message (hello, ready, log, ...). */
  onNotice: (msg: In) => void;
  /** A problem worth logging: bad input from the peer, or the peer's complaint about ours. */
  onProblem: (text: string) => void;
  /** Milliseconds before an unanswered request fails; 0 for none. */
  timeoutMs?: number;
}

interface Pending {
  expect: string;
  resolve: (msg: Msg) => void;
  reject: (e: Error) => void;
  timer?: ReturnType<typeof setTimeout>;
}

/** The correlated, validating request/reply channel over a message port. */
export class Endpoint<In extends Msg, Out extends Msg> {
  #nextId = 1;
  #pending = new Map<number, Pending>();
  #closed = false;

  constructor(
    private readonly port: MessagePortLike,
    private readonly opts: EndpointOptions<In, Out>,
  ) {
    port.onmessage = (event) => this.receive(event.data);
  }

  /** Sends a message that expects no reply. */
  send(msg: Out | ErrorMessage, transfer: Transferable[] = []): void {
    if (!this.#closed) this.port.postMessage(msg, transfer);
  }

  /**
   * Sends a request and resolves with the peer's reply of kind `expect`;
   * rejects with IpcError if the peer answers `error` or the wrong kind.
   */
  request<R extends In>(
    msg: WithoutId<Out>,
    expect: R["kind"],
    transfer: Transferable[] = [],
  ): Promise<R> {
    if (this.#closed) return Promise.reject(new NoAnswerError("channel is closed"));
    const id = this.#nextId;
    this.#nextId = this.#nextId >= 2 ** 31 - 1 ? 1 : this.#nextId + 1;
    return new Promise<R>((resolve, reject) => {
      const p: Pending = { expect, resolve: resolve as (m: Msg) => void, reject };
      const timeout = this.opts.timeoutMs ?? 0;
      if (timeout > 0) {
        p.timer = setTimeout(() => {
          this.#pending.delete(id);
          reject(
            new NoAnswerError(`${(msg as Msg).kind} request ${id} timed out after ${timeout} ms`),
          );
        }, timeout);
      }
      this.#pending.set(id, p);
      this.port.postMessage({ ...msg, id }, transfer);
    });
  }

  /** Fails every pending request and ignores whatever arrives later. */
  close(reason: string): void {
    this.#closed = true;
    this.port.onmessage = null;
    for (const [, p] of this.#pending) {
      clearTimeout(p.timer);
      p.reject(new NoAnswerError(reason));
    }
    this.#pending.clear();
  }

  /** Handles one raw message from the peer; never throws. */
  receive(raw: unknown): void {
    if (this.#closed) return;
    let msg: In;
    try {
      msg = this.opts.parse(raw);
    } catch (e) {
      this.rejectInput(raw, e);
      return;
    }
    if (msg.kind === "error") {
      this.receiveError(msg as unknown as ErrorMessage);
    } else if (this.opts.replyKinds.has(msg.kind)) {
      this.settle(msg);
    } else if (this.opts.requestKinds.has(msg.kind)) {
      this.serve(msg);
    } else {
      try {
        this.opts.onNotice(msg);
      } catch (e) {
        this.opts.onProblem(`handling ${msg.kind} failed: ${(e as Error).message}`);
      }
    }
  }

  private rejectInput(raw: unknown, e: unknown): void {
    const err = e instanceof ValidationError
      ? e
      : new ValidationError("malformed", undefined, String((e as Error)?.message ?? e));
    this.opts.onProblem(`rejected a message from the peer: ${err.message}`);
    // Never answer an error with an error: two confused peers would ping-pong forever.
    const kind = (raw as { kind?: unknown } | null)?.kind;
    if (kind === "error") return;
    const reply: ErrorMessage = { kind: "error", id: err.id, code: err.code, message: err.message };
    if (err.field !== undefined) reply.field = err.field;
    this.send(reply);
  }

  private receiveError(err: ErrorMessage): void {
    const p = err.id === null ? undefined : this.#pending.get(err.id);
    if (!p) {
      this.opts.onProblem(
        `peer reported ${err.code}${err.field ? ` in ${err.field}` : ""}: ${err.message}`,
      );
      return;
    }
    this.#pending.delete(err.id!);
    clearTimeout(p.timer);
    p.reject(new IpcError(err.code, err.field, err.message));
  }

  private settle(msg: In): void {
    const id = msg.id!;
    const p = this.#pending.get(id);
    if (!p) {
      this.opts.onProblem(`peer sent ${msg.kind} for unknown request id ${id}`);
      this.send({
        kind: "error",
        id,
        code: "refused",
        field: "id",
        message: `no request ${id} is outstanding`,
      });
      return;
    }
    this.#pending.delete(id);
    clearTimeout(p.timer);
    if (msg.kind !== p.expect) {
      p.reject(
        new IpcError(
          "malformed",
          "kind",
          `expected ${p.expect} in reply to ${id}, got ${msg.kind}`,
        ),
      );
      return;
    }
    p.resolve(msg);
  }

  private serve(req: In): void {
    const id = req.id!;
    // A handler that throws before returning its promise is answered like one that rejects.
    let pending: ReturnType<EndpointOptions<In, Out>["onRequest"]>;
    try {
      pending = this.opts.onRequest(req);
    } catch (e) {
      pending = Promise.reject(e);
    }
    pending.then(
      ({ reply, transfer }) => this.send({ ...reply, id } as unknown as Out, transfer),
      (e: unknown) => {
        const refused = e instanceof RefusedError ? e : undefined;
        const reply: ErrorMessage = {
          kind: "error",
          id,
          code: refused?.code ?? "failed",
          message: `${req.kind}: ${(e as Error)?.message ?? String(e)}`,
        };
        if (refused?.field !== undefined) reply.field = refused.field;
        this.send(reply);
      },
    );
  }
}
