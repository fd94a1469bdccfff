/**
 * Keeps the status fresh: server-sent events from /swapserve/api/events when they work, polling
 * /swapserve/api/status (at most once a second, slower while failing) when they do not.
 * Transport is injected (a request function and an EventSource factory) so it is unit-tested.
 */

import { classifyError, IPanelError, isStatus } from './state';
import { ISwapResult, IStatus, SwapAction } from './types';

export interface IHttpResponse {
  /** HTTP status; 0 when no answer came (network error). */
  status: number;
  body: unknown;
}

/** Sends a request to a path under <base>/swapserve/api/. */
export type Requester = (path: string, init?: { method?: string; body?: string }) => Promise<IHttpResponse>;

export interface IEventSourceLike {
  readonly readyState: number;
  onopen: ((ev: any) => any) | null;
  onerror: ((ev: any) => any) | null;
  addEventListener(type: string, listener: (ev: any) => void): void;
  close(): void;
}

export type EventSourceFactory = (url: string) => IEventSourceLike;

export interface IClientOptions {
  request: Requester;
  /** The events URL, or null to poll only. */
  eventsUrl: string | null;
  createEventSource: EventSourceFactory | null;
  onStatus(status: IStatus, via: 'sse' | 'poll'): void;
  onError(error: IPanelError): void;
  onReconnecting?(): void;
  /** Polling period (ms); never below 1000. */
  pollInterval?: number;
  /** Longest wait between polls while the server fails (ms). */
  maxBackoff?: number;
  /** How long to poll before trying server-sent events again (ms). */
  sseRetryInterval?: number;
}

const CLOSED = 2;

/** The route of an action on a model, on its node where one is given (client mode). */
export function modelPath(model: string, action: string, node?: string): string {
  const path = `models/${encodeURIComponent(model)}/${action}`;
  return node ? `${path}?node=${encodeURIComponent(node)}` : path;
}

export class StatusClient {
  private es: IEventSourceLike | null = null;
  private sseLive = false;
  private lastSseAttempt = 0;
  private pollTimer: ReturnType<typeof setTimeout> | null = null;
  private polling = false;
  private failures = 0;
  private running = false;
  /** Bumped on every status applied; a poll answer older than the last event is dropped. */
  private generation = 0;
  private readonly pollInterval: number;
  private readonly maxBackoff: number;
  private readonly sseRetryInterval: number;

  constructor(private options: IClientOptions) {
    this.pollInterval = Math.max(1000, options.pollInterval ?? 1000);
    this.maxBackoff = Math.max(this.pollInterval, options.maxBackoff ?? 10000);
    this.sseRetryInterval = options.sseRetryInterval ?? 15000;
  }

  get isRunning(): boolean {
    return this.running;
  }

  get mode(): 'sse' | 'poll' | 'idle' {
    return !this.running ? 'idle' : this.sseLive ? 'sse' : 'poll';
  }

  start(): void {
    if (this.running) {
      return;
    }
    this.running = true;
    this.failures = 0;
    void this.pollOnce();
    this.openEvents();
  }

  stop(): void {
    this.running = false;
    this.closeEvents();
    this.cancelPoll();
  }

  /** Fetch the status now (the panel's "Retry now"), then carry on as before. */
  async refresh(): Promise<void> {
    this.failures = 0;
    await this.pollOnce();
    if (this.running && !this.es) {
      this.openEvents();
    }
  }

  /** A manual swap; `node` (client mode): on that node service (the server routes by `?node=`). */
  async swap(
    model: string,
    action: SwapAction,
    node?: string
  ): Promise<{ result: ISwapResult } | { error: IPanelError }> {
    let r: IHttpResponse;
    try {
      r = await this.options.request(modelPath(model, action, node), { method: 'POST' });
    } catch (e) {
      r = { status: 0, body: String(e) };
    }
    if (r.status === 200 && r.body && typeof r.body === 'object') {
      return { result: r.body as ISwapResult };
    }
    const error = classifyError(r.status, r.body, action === 'swap-in' ? 'swapping in' : 'swapping out');
    if (r.status === 404 && error.kind === 'not-found') {
      error.message = `Model '${model}' is not known to the server (404).`;
    }
    return { error };
  }

  /**
   * "Use now": the intent hint (POST .../prefetch), sent when the user asks for it. The server swaps
   * the model in ahead of the request if that evicts nothing busy, and says so: 'running',
   * 'starting', or 'declined: why'. Any user who may call the model may send it; it never moves a
   * model someone is using, which is why it is offered where the manual swaps are not.
   */
  async prefetch(model: string, node?: string): Promise<{ prefetch: string } | { error: IPanelError }> {
    let r: IHttpResponse;
    try {
      r = await this.options.request(modelPath(model, 'prefetch', node), { method: 'POST' });
    } catch (e) {
      r = { status: 0, body: String(e) };
    }
    const body = r.body as { prefetch?: unknown } | null;
    if ((r.status === 200 || r.status === 202) && body && typeof body.prefetch === 'string') {
      return { prefetch: body.prefetch };
    }
    return { error: classifyError(r.status, r.body, `asking for ${model}`) };
  }

  // ---- server-sent events -----------------------------------------------------------------
  private openEvents(): void {
    const { eventsUrl, createEventSource } = this.options;
    if (!this.running || !eventsUrl || !createEventSource || this.es) {
      if (this.running && !this.es) {
        this.schedulePoll();
      }
      return;
    }
    this.lastSseAttempt = Date.now();
    let es: IEventSourceLike;
    try {
      es = createEventSource(eventsUrl);
    } catch {
      this.schedulePoll();
      return;
    }
    this.es = es;
    es.addEventListener('status', (ev: { data: string }) => {
      if (this.es !== es) {
        return;
      }
      let doc: unknown;
      try {
        doc = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (!isStatus(doc)) {
        return;
      }
      this.sseLive = true;
      this.failures = 0;
      this.cancelPoll();
      this.generation++;
      this.options.onStatus(doc, 'sse');
    });
    es.onerror = () => {
      if (this.es !== es) {
        return;
      }
      this.sseLive = false;
      if (es.readyState === CLOSED) {
        // refused for good (403, 404, a proxy without streaming): poll instead, retry later
        this.closeEvents();
      } else {
        this.options.onReconnecting?.();
      }
      // either way, poll meanwhile: it keeps the panel fresh and tells the real error (403, …)
      this.schedulePoll(0);
    };
  }

  private closeEvents(): void {
    if (this.es) {
      const es = this.es;
      this.es = null;
      es.onerror = null;
      es.onopen = null;
      es.close();
    }
    this.sseLive = false;
  }

  // ---- polling ------------------------------------------------------------------------------
  private cancelPoll(): void {
    if (this.pollTimer !== null) {
      clearTimeout(this.pollTimer);
      this.pollTimer = null;
    }
  }

  private schedulePoll(delay?: number): void {
    if (!this.running || this.pollTimer !== null || this.sseLive) {
      return;
    }
    const wait =
      delay ??
      (this.failures === 0
        ? this.pollInterval
        : Math.min(this.maxBackoff, this.pollInterval * 2 ** Math.min(this.failures - 1, 10)));
    this.pollTimer = setTimeout(() => {
      this.pollTimer = null;
      void this.pollOnce().then(() => this.afterPoll());
    }, wait);
  }

  private afterPoll(): void {
    if (!this.running || this.sseLive) {
      return;
    }
    // polling works again: give server-sent events another chance now and then
    if (
      !this.es &&
      this.failures === 0 &&
      this.options.eventsUrl &&
      Date.now() - this.lastSseAttempt >= this.sseRetryInterval
    ) {
      this.openEvents();
    }
    this.schedulePoll();
  }

  private async pollOnce(): Promise<void> {
    if (this.polling) {
      return;
    }
    this.polling = true;
    const generation = this.generation;
    let r: IHttpResponse;
    try {
      r = await this.options.request('status');
    } catch (e) {
      r = { status: 0, body: String(e) };
    } finally {
      this.polling = false;
    }
    if (!this.running) {
      return;
    }
    if (r.status === 200 && isStatus(r.body)) {
      this.failures = 0;
      if (generation === this.generation && !this.sseLive) {
        this.generation++;
        this.options.onStatus(r.body, 'poll');
      }
      return;
    }
    this.failures++;
    const error =
      r.status === 200
        ? { kind: 'bad-response' as const, status: 200, message: 'The server answered with something that is not the swapserve status.' }
        : classifyError(r.status, r.body, 'the swapserve status');
    this.options.onError(error);
  }
}
