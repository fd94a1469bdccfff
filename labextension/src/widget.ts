/** The sidebar widget: glues the status client, the panel state and the DOM view. */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { Message } from '@lumino/messaging';
import { Widget } from '@lumino/widgets';

import { IHttpResponse, Requester, StatusClient } from './client';
import { swapServeIcon } from './icon';
import { IQuotaDoc, probeQuotas, QuotaSection } from './quotas';
import { PanelView } from './render';
import { KernelSection } from './kernels';
import { fetchUsage, IUsageDoc, nextRefresh, UsageSection } from './usage';
import {
  dismissMessage,
  initialState,
  IPanelState,
  withActionDone,
  withConnection,
  withError,
  withPending,
  withPrefetchDone,
  withStatus
} from './state';
import { IModelRef, modelKey, SwapAction } from './types';

/** Requests under <base>/swapserve/api/ with the page's credentials (cookie + XSRF header, or token). */
export function makeRequester(settings: ServerConnection.ISettings): Requester {
  return async (path, init = {}) => {
    const url = URLExt.join(settings.baseUrl, 'swapserve/api', path);
    const requestInit: RequestInit = { method: init.method ?? 'GET', cache: 'no-store' };
    if (init.body !== undefined) {
      requestInit.body = init.body;
      requestInit.headers = { 'Content-Type': 'application/json' };
    }
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(url, requestInit, settings);
    } catch (e) {
      return { status: 0, body: e instanceof Error ? e.message : String(e) };
    }
    const text = await response.text().catch(() => '');
    let body: unknown = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      // keep the text (an HTML error page, a proxy's message)
    }
    return { status: response.status, body } as IHttpResponse;
  };
}

/** The events URL: the cookie authenticates; the token is appended only where the settings ask for it. */
export function eventsUrl(settings: ServerConnection.ISettings): string {
  const url = URLExt.join(settings.baseUrl, 'swapserve/api/events');
  return settings.appendToken && settings.token ? `${url}?token=${encodeURIComponent(settings.token)}` : url;
}

export class SwapServePanel extends Widget {
  private state: IPanelState = initialState();
  private view: PanelView;
  private quotas: QuotaSection;
  private quotaDoc: IQuotaDoc | null = null;
  private quotaProbedFor: string | null = null;
  private usage: UsageSection;
  private kernels: KernelSection;
  private usageDoc: IUsageDoc | null = null;
  private usageFetchedAt = 0;
  /** when the last usage document arrived (the page's clock) */
  private usageArrivedAt = 0;
  private usageVersion = -1;
  private usageTimer: ReturnType<typeof setTimeout> | null = null;
  /** fetches the usage again when its next limit resets: the numbers stay true with no event */
  private resetTimer: ReturnType<typeof setTimeout> | null = null;
  private client: StatusClient;
  private request: Requester;
  private frame = 0;
  private ticker: ReturnType<typeof setInterval> | null = null;

  constructor(settings: ServerConnection.ISettings = ServerConnection.makeSettings()) {
    super();
    this.id = 'jupyter-swapserve-panel';
    this.title.icon = swapServeIcon;
    this.title.caption = 'SwapServe: models, GPU memory, queues and swap latency';
    this.addClass('jp-SwapServe');
    this.node.setAttribute('role', 'region');
    this.node.setAttribute('aria-label', 'SwapServe');
    this.node.tabIndex = -1;

    this.request = makeRequester(settings);
    this.view = new PanelView({
      swap: (model, action) => void this.swap(model, action),
      prefetch: model => void this.useNow(model),
      retry: () => void this.client.refresh(),
      dismiss: key => this.setState(dismissMessage(this.state, key))
    });
    this.quotas = new QuotaSection(this.request);
    this.quotas.onChanged = () => this.refreshQuotas();
    this.usage = new UsageSection();
    this.kernels = new KernelSection(this.request);
    this.view.extra.append(this.kernels.node, this.usage.node, this.quotas.node);
    this.node.appendChild(this.view.node);
    this.client = new StatusClient({
      request: this.request,
      eventsUrl: typeof EventSource === 'undefined' ? null : eventsUrl(settings),
      createEventSource: typeof EventSource === 'undefined' ? null : url => new EventSource(url, { withCredentials: true }),
      onStatus: (status, via) => {
        this.setState(withStatus(this.state, status, Date.now(), via));
        const user = status.user?.name ?? '';
        if (this.quotaProbedFor !== user) {
          this.quotaProbedFor = user;
          this.refreshQuotas();
        }
        this.refreshUsage(status.version);
      },
      onError: error => this.setState(withError(this.state, error)),
      onReconnecting: () => this.setState(withConnection(this.state, this.state.status ? 'polling' : 'connecting'))
    });
    // Nothing moves an engine but a button that says so: a card clicked or focused sends no hint
    // (a click on Swap in used to send one too, which swapped the model in for a user whose
    // Swap in was then refused). "Use now" is the hint, asked for by name.
    this.render();
  }

  private refreshQuotas(): void {
    void probeQuotas(this.request).then(doc => {
      this.quotaDoc = doc;
      this.refreshUsage(this.usageVersion, true);
      this.schedule();
    });
  }

  /** Usage changes when requests finish, which changes the status: fetch again then, at most every 2 s. */
  private refreshUsage(version: number, force = false): void {
    const now = Date.now();
    if (!force && (version === this.usageVersion || now - this.usageFetchedAt < 2000)) {
      if (version !== this.usageVersion && !this.usageTimer) {
        this.usageTimer = setTimeout(() => {
          this.usageTimer = null;
          this.refreshUsage(this.state.status?.version ?? version);
        }, 2000);
      }
      return;
    }
    this.usageVersion = version;
    this.usageFetchedAt = now;
    void fetchUsage(this.request).then(doc => {
      this.usageDoc = doc;
      this.usageArrivedAt = Date.now();
      this.scheduleReset();
      this.schedule();
    });
  }

  /** A timer to the next moment a usage number changes by itself (a window or the day resets). */
  private scheduleReset(): void {
    if (this.resetTimer) {
      clearTimeout(this.resetTimer);
      this.resetTimer = null;
    }
    const delay = this.usageDoc && this.client.isRunning ? nextRefresh(this.usageDoc, this.usageArrivedAt, Date.now()) : null;
    if (delay !== null) {
      // setTimeout holds at most 2^31-1 ms; a day is far below that
      this.resetTimer = setTimeout(() => {
        this.resetTimer = null;
        this.refreshUsage(this.usageVersion, true);
      }, delay);
    }
  }

  /** "Use now": the intent hint, for users who may not swap by hand (and anyone who wants it);
   * a model of a given node (client mode) is asked for on that node. */
  async useNow(model: IModelRef | string): Promise<void> {
    const ref = typeof model === 'string' ? { name: model } : model;
    const key = modelKey(ref);
    if (this.state.pending[key]) {
      return;
    }
    this.setState(withPending(this.state, key, 'prefetch', Date.now()));
    const outcome = await this.client.prefetch(ref.name, ref.node);
    this.setState(withPrefetchDone(this.state, key, outcome, ref.name));
  }

  /** For tests and the command palette: swap from code (on the model's node, where one is given). */
  async swap(model: IModelRef | string, action: SwapAction): Promise<void> {
    const ref = typeof model === 'string' ? { name: model } : model;
    const key = modelKey(ref);
    if (this.state.pending[key]) {
      return;
    }
    this.setState(withPending(this.state, key, action, Date.now()));
    const outcome = await this.client.swap(ref.name, action, ref.node);
    this.setState(withActionDone(this.state, key, action, outcome));
  }

  dispose(): void {
    if (this.isDisposed) {
      return;
    }
    this.client.stop();
    this.stopTicker();
    if (this.usageTimer) {
      clearTimeout(this.usageTimer);
    }
    if (this.resetTimer) {
      clearTimeout(this.resetTimer);
    }
    if (this.frame) {
      cancelAnimationFrame(this.frame);
    }
    super.dispose();
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    this.client.start();
    this.startTicker();
    if (this.usageDoc) {
      this.refreshUsage(this.usageVersion, true); // it may have reset while nobody looked
    }
    this.render();
  }

  protected onAfterHide(msg: Message): void {
    super.onAfterHide(msg);
    // nobody looks: no stream, no polling, no timers
    this.client.stop();
    this.stopTicker();
    if (this.resetTimer) {
      clearTimeout(this.resetTimer);
      this.resetTimer = null;
    }
    this.setState(withConnection(this.state, 'connecting'));
  }

  private startTicker(): void {
    if (this.ticker === null) {
      // relative times ("12 s ago") move on their own
      this.ticker = setInterval(() => this.schedule(), 1000);
    }
  }

  private stopTicker(): void {
    if (this.ticker !== null) {
      clearInterval(this.ticker);
      this.ticker = null;
    }
  }

  private setState(state: IPanelState): void {
    if (state !== this.state) {
      this.state = state;
      this.schedule();
    }
  }

  /** Coalesces bursts of updates into one DOM patch per animation frame. */
  private schedule(): void {
    if (!this.frame) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }
  }

  private render(): void {
    this.view.update(this.state, Date.now(), this.usageDoc?.limits?.allowed_models ?? null);
    this.quotas.update(this.quotaDoc, this.state.status);
    this.usage.update(this.usageDoc, Date.now(), this.usageArrivedAt);
    this.kernels.update(this.state.status?.kernels, Date.now() / 1000, this.state.status?.user?.name);
  }
}
