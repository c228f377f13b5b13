/**
 * A QEMU Machine Protocol client for tests: connects to a QEMU started with
 * `-qmp unix:<path>,server=on,wait=off`, negotiates capabilities, and runs
 * commands one at a time (QMP answers in order; asynchronous events are
 * kept apart, newest last). Used to drive live migrations.
 *
 * @module
 */

/** A QMP error answer. */
export class QmpError extends Error {
  constructor(readonly command: string, readonly klass: string, desc: string) {
    super(`QMP ${command}: ${klass}: ${desc}`);
    this.name = "QmpError";
  }
}

interface Waiter {
  command: string;
  resolve: (v: unknown) => void;
  reject: (e: Error) => void;
}

/** One QMP connection. */
export class Qmp {
  readonly events: Array<{ event: string; data?: unknown; at: number }> = [];
  #conn: Deno.UnixConn;
  #waiters: Waiter[] = [];
  #closed = false;
  #queue: Promise<unknown> = Promise.resolve();
  readonly #done: Promise<void>;

  private constructor(conn: Deno.UnixConn) {
    this.#conn = conn;
    this.#done = this.#read();
  }

  /** Connects to `path` (retrying while QEMU starts, up to `timeoutMs`) and negotiates. */
  static async connect(path: string, timeoutMs = 30_000): Promise<Qmp> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      try {
        const conn = await Deno.connect({ transport: "unix", path });
        const qmp = new Qmp(conn);
        // The greeting comes first; the first answer is to qmp_capabilities.
        await qmp.execute("qmp_capabilities");
        return qmp;
      } catch (e) {
        if (Date.now() > end) throw new Error(`no QMP at ${path}: ${(e as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  /** Runs one command; resolves with its `return` value. */
  execute<T = unknown>(command: string, args?: Record<string, unknown>): Promise<T> {
    const run = this.#queue.then(() => this.#send(command, args));
    this.#queue = run.catch(() => {});
    return run as Promise<T>;
  }

  #send(command: string, args?: Record<string, unknown>): Promise<unknown> {
    if (this.#closed) return Promise.reject(new Error(`QMP ${command}: connection closed`));
    return new Promise((resolve, reject) => {
      this.#waiters.push({ command, resolve, reject });
      const line = JSON.stringify(
        args ? { execute: command, arguments: args } : { execute: command },
      );
      this.#conn.write(new TextEncoder().encode(line + "\n")).catch(reject);
    });
  }

  async #read(): Promise<void> {
    const decoder = new TextDecoder();
    let buffered = "";
    let greeted = false;
    try {
      for await (const chunk of this.#conn.readable) {
        buffered += decoder.decode(chunk, { stream: true });
        let nl: number;
        while ((nl = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, nl).trim();
          buffered = buffered.slice(nl + 1);
          if (line === "") continue;
          const msg = JSON.parse(line);
          if (!greeted && "QMP" in msg) {
            greeted = true;
          } else if ("event" in msg) {
            this.events.push({ event: msg.event, data: msg.data, at: Date.now() });
          } else {
            const w = this.#waiters.shift();
            if (w === undefined) continue;
            if ("error" in msg) w.reject(new QmpError(w.command, msg.error.class, msg.error.desc));
            else w.resolve(msg.return);
          }
        }
      }
    } catch { /* closed */ }
    this.#closed = true;
    for (const w of this.#waiters.splice(0)) {
      w.reject(new Error(`QMP ${w.command}: QEMU went away`));
    }
  }

  close(): Promise<void> {
    try {
      this.#conn.close();
    } catch { /* already */ }
    return this.#done;
  }
}
