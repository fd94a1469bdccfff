/**
 * The panel's state and the pure functions that change it and derive what is shown.
 * Everything here is synchronous and free of DOM and JupyterLab, so it is unit-tested directly.
 */

import {
  deviceKindLabel,
  formatAgo,
  formatGiB,
  formatQueue,
  formatSeconds,
  isTransitional,
  percent,
  stateClass,
  stateLabel,
  swapMethodText
} from './format';
import { CardAction, deviceKey, IDevice, IModel, INode, ISwapResult, IStatus, modelKey, SwapAction } from './types';

/** How the panel gets its updates. */
export type ConnectionMode = 'connecting' | 'live' | 'polling' | 'offline';

export type ErrorKind =
  | 'unreachable'
  | 'unauthorized'
  | 'forbidden'
  | 'not-found'
  | 'server'
  | 'bad-response';

export interface IPanelError {
  kind: ErrorKind;
  status?: number;
  message: string;
}

export interface IPending {
  action: CardAction;
  since: number;
}

export interface IActionMessage {
  kind: 'error' | 'info';
  text: string;
}

export interface IPanelState {
  status: IStatus | null;
  connection: ConnectionMode;
  error: IPanelError | null;
  /** Local time (ms) of the last status received. */
  lastUpdate: number | null;
  /** Swap requests sent from this panel that have not answered yet, by model key (modelKey). */
  pending: Record<string, IPending>;
  /** The outcome of the last swap request per model key, when worth showing. */
  messages: Record<string, IActionMessage>;
}

export function initialState(): IPanelState {
  return {
    status: null,
    connection: 'connecting',
    error: null,
    lastUpdate: null,
    pending: {},
    messages: {}
  };
}

export function withStatus(
  state: IPanelState,
  status: IStatus,
  now: number,
  via: 'sse' | 'poll'
): IPanelState {
  return {
    ...state,
    status,
    error: null,
    lastUpdate: now,
    connection: via === 'sse' ? 'live' : 'polling'
  };
}

/** An error while fetching status: the last status stays (shown as stale). */
export function withError(state: IPanelState, error: IPanelError): IPanelState {
  return { ...state, error, connection: 'offline' };
}

export function withConnection(state: IPanelState, connection: ConnectionMode): IPanelState {
  return state.connection === connection ? state : { ...state, connection };
}

export function withPending(
  state: IPanelState,
  /** the model's key (modelKey): the same name on two nodes is two models */
  model: string,
  action: CardAction,
  now: number
): IPanelState {
  const messages = { ...state.messages };
  delete messages[model];
  return { ...state, pending: { ...state.pending, [model]: { action, since: now } }, messages };
}

/** A swap request answered: 200 with a result, or an error. */
export function withActionDone(
  state: IPanelState,
  model: string,
  action: SwapAction,
  outcome: { result: ISwapResult } | { error: IPanelError }
): IPanelState {
  const pending = { ...state.pending };
  delete pending[model];
  const messages = { ...state.messages };
  delete messages[model];
  if ('error' in outcome) {
    messages[model] = { kind: 'error', text: outcome.error.message };
  } else {
    const r = outcome.result;
    if (action === 'swap-out' && !r.swapped && r.reason) {
      messages[model] = { kind: 'error', text: `Not swapped out: ${r.reason}` };
    } else if (action === 'swap-out' && !r.swapped) {
      messages[model] = { kind: 'info', text: `Already ${stateLabel(r.state)}.` };
    } else if (action === 'swap-in' && !r.swapped) {
      messages[model] = { kind: 'info', text: `Already ${stateLabel(r.state)}.` };
    }
  }
  return { ...state, pending, messages };
}

/**
 * The answer to "Use now" (the prefetch hint): the server's outcome ('running', 'starting', or
 * 'declined: why'), or an error. A declined hint is not an error: the next request still swaps the
 * model in, in its turn.
 */
export function withPrefetchDone(
  state: IPanelState,
  /** the model's key (modelKey) */
  model: string,
  outcome: { prefetch: string } | { error: IPanelError },
  /** the model's name, where the key is `node/name` */
  name: string = model
): IPanelState {
  const pending = { ...state.pending };
  delete pending[model];
  const messages = { ...state.messages };
  messages[model] = prefetchMessage(name, outcome);
  return { ...state, pending, messages };
}

export function prefetchMessage(model: string, outcome: { prefetch: string } | { error: IPanelError }): IActionMessage {
  if ('error' in outcome) {
    return { kind: 'error', text: outcome.error.message };
  }
  const p = outcome.prefetch;
  if (p === 'running') {
    return { kind: 'info', text: `${model} is running: your requests go straight to it.` };
  }
  if (p === 'starting') {
    return { kind: 'info', text: `${model} is being swapped in for you.` };
  }
  const why = p.replace(/^declined:\s*/, '');
  return {
    kind: 'info',
    text: `Not swapped in now (${why}). Your next request to ${model} still gets it: it waits for its turn.`
  };
}

export function dismissMessage(state: IPanelState, model: string): IPanelState {
  if (!(model in state.messages)) {
    return state;
  }
  const messages = { ...state.messages };
  delete messages[model];
  return { ...state, messages };
}

/** Turns an HTTP status (0: no answer) and the answer's body into a message for the panel. */
export function classifyError(status: number, body: unknown, what = 'the swapserve API'): IPanelError {
  const detail = errorDetail(body);
  if (status === 0) {
    return {
      kind: 'unreachable',
      status,
      message: `Cannot reach the Jupyter server${detail ? ` (${detail})` : ''}. Retrying…`
    };
  }
  if (status === 401) {
    return {
      kind: 'unauthorized',
      status,
      message: 'Not logged in to the Jupyter server (401). Reload the page and log in again.'
    };
  }
  if (status === 403) {
    return {
      kind: 'forbidden',
      status,
      message: `Permission denied (403): ${sentence(detail || `you may not use ${what}`)}`
    };
  }
  if (status === 404) {
    return {
      kind: 'not-found',
      status,
      message:
        detail && !/^not found$/i.test(detail)
          ? `Not found (404): ${detail}`
          : `${capitalize(what)} is not available on this server (404): is the jupyter_swapserve server extension enabled?`
    };
  }
  return {
    kind: 'server',
    status,
    message: `The server answered ${status}${detail ? `: ${sentence(detail)}` : '.'}`
  };
}

/** Ends a message with a full stop unless it already ends with punctuation. */
export function sentence(s: string): string {
  const t = s.trim();
  return /[.!?…]$/.test(t) ? t : `${t}.`;
}

function capitalize(s: string): string {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

/** The message of an OpenAI-shaped error body, a Tornado reason, or a plain string. */
export function errorDetail(body: unknown): string {
  if (!body) {
    return '';
  }
  if (typeof body === 'string') {
    const trimmed = body.trim();
    if (trimmed.startsWith('{')) {
      try {
        return errorDetail(JSON.parse(trimmed));
      } catch {
        // not JSON: fall through
      }
    }
    return trimmed.startsWith('<') ? '' : trimmed.slice(0, 300);
  }
  if (typeof body === 'object') {
    const b = body as any;
    if (b.error && typeof b.error.message === 'string') {
      return b.error.message;
    }
    if (typeof b.message === 'string') {
      return b.message;
    }
    if (typeof b.reason === 'string') {
      return b.reason;
    }
  }
  return '';
}

/** Checks that a document looks like the status JSON (protects the panel from a proxy's HTML page). */
export function isStatus(doc: unknown): doc is IStatus {
  const d = doc as IStatus;
  return !!d && typeof d === 'object' && Array.isArray(d.models) && Array.isArray(d.devices);
}

// ---- derived views ------------------------------------------------------------------------

export interface IModelView {
  /** the row's key: `node/name` in client mode, else the name */
  key: string;
  name: string;
  /** the node service that serves it (client mode), or null */
  node: string | null;
  /** the node's name on the card: only where several nodes are shown, so one name reads apart from another */
  nodeText: string;
  subtitle: string;
  state: string;
  stateText: string;
  stateClass: string;
  busy: boolean;
  pinned: boolean;
  deviceText: string;
  virtual: boolean;
  memoryText: string;
  memoryPercent: number;
  memoryTitle: string;
  queueText: string;
  inFlightText: string;
  swapInText: string;
  swapOutText: string;
  lastUsedText: string;
  requestsText: string;
  /** what the model holds on its device now (GiB), and its size when it runs */
  heldGiB: number;
  memoryNote: string;
  /** admins: the Swap in / Swap out buttons; others: "Use now" */
  admin: boolean;
  canSwapIn: boolean;
  canSwapOut: boolean;
  canPrefetch: boolean;
  /** "Use now" is offered (enabled or not): the model is not running and the user may not swap by hand */
  offersPrefetch: boolean;
  /** why the user may not use the model (their quota's allowed models), or '' */
  notAllowedText: string;
  swapInLabel: string;
  swapOutLabel: string;
  pendingAction: CardAction | null;
  history: number[];
  error: string | null;
  message: IActionMessage | null;
}

/** What a model holds on its device now: its reservation while it runs or moves, its residual (if
 * any) while swapped out, nothing while stopped. */
export function heldGiB(model: IModel): number {
  const reserved = typeof model.reserved_gib === 'number' ? model.reserved_gib : null;
  switch (model.state) {
    case 'running':
    case 'swapping_in':
    case 'swapping_out':
    case 'starting':
      return reserved || model.memory_gib || 0;
    case 'swapped_out':
      return model.residual_gib ?? reserved ?? 0;
    default:
      return reserved ?? 0;
  }
}

/** When a request was last served; servers before `last_request` only had the scheduler's time. */
export function lastRequest(model: IModel): number | null {
  if (model.last_request !== undefined) {
    return model.last_request;
  }
  return model.requests ? model.last_used : null;
}

/** The device a model runs on: the one of the same index on the same node. */
export function deviceOf(model: IModel, devices: IDevice[]): IDevice | undefined {
  return devices.find(d => d.index === model.device && (d.node ?? null) === (model.node ?? null));
}

/** Why the user may not call a model, from their quota's allowed models (null: every model), or ''. */
export function notAllowedReason(model: string, allowedModels: readonly string[] | null | undefined): string {
  if (!Array.isArray(allowedModels) || allowedModels.includes(model)) {
    return '';
  }
  return allowedModels.length
    ? `Your quota does not include ${model} (allowed: ${allowedModels.join(', ')}); ask an admin.`
    : `Your quota includes no model; ask an admin.`;
}

/** What a model's row shows, given the status, the pending requests, the time and who looks
 * (`admin`: may swap by hand; others may only ask for the model ahead of need; `allowedModels`:
 * the models the user's quota allows, null for every one). `severalNodes`: name the node on the card. */
export function modelView(
  model: IModel,
  devices: IDevice[],
  pending: IPending | undefined,
  message: IActionMessage | undefined,
  nowSeconds: number,
  admin = true,
  allowedModels: readonly string[] | null = null,
  severalNodes = false
): IModelView {
  const device = deviceOf(model, devices);
  const kind = model.device_kind ?? device?.kind;
  const virtual = kind === 'virtual';
  let state = model.state;
  // the POST was sent but the next status has not arrived yet: show the move at once (a hint may
  // be declined: it shows nothing until the server answers)
  if (pending && pending.action !== 'prefetch' && !isTransitional(state)) {
    if (pending.action === 'swap-in' && state !== 'running') {
      state = state === 'swapped_out' ? 'swapping_in' : 'starting';
    } else if (pending.action === 'swap-out' && state === 'running') {
      state = 'swapping_out';
    }
  }
  const busy = isTransitional(state) || !!pending;
  const startable = state === 'stopped' || state === 'failed';
  const capacity = device?.capacity_gib ?? null;
  const deviceName = device ? device.name : `device ${model.device}`;
  const history = (model.swap_in_history ?? [])
    .map(s => s.seconds)
    .filter(s => typeof s === 'number' && isFinite(s));
  const parts = [model.engine, model.api, model.runtime && model.runtime !== 'process' ? model.runtime : null];
  const held = heldGiB(model);
  const size = typeof model.memory_gib === 'number' ? model.memory_gib : null;
  const where = kind === 'nvidia' ? 'the GPU' : 'the device';
  let memoryNote = '';
  if (model.state !== 'running' && size !== null && !isTransitional(model.state)) {
    memoryNote = held > 0.005 ? `keeps ${formatGiB(held)} on ${where}; ${formatGiB(size)} when running` : `${formatGiB(size)} when running`;
  }
  const notAllowedText = admin ? '' : notAllowedReason(model.name, allowedModels);
  const offersPrefetch = !admin && (state === 'swapped_out' || state === 'stopped' || pending?.action === 'prefetch');
  return {
    key: modelKey(model),
    name: model.name,
    node: model.node ?? null,
    nodeText: severalNodes && model.node ? model.node : '',
    subtitle: parts.filter(Boolean).join(' · '),
    state,
    stateText: stateLabel(state),
    stateClass: stateClass(state),
    busy,
    pinned: !!model.pinned,
    deviceText: virtual
      ? /virtual/i.test(deviceName)
        ? deviceName
        : `${deviceName} (virtual)`
      : `${deviceName} (${deviceKindLabel(kind)} ${model.device})`,
    virtual,
    memoryText: capacity !== null ? `${formatGiB(held, false)} / ${formatGiB(capacity)}` : formatGiB(held),
    memoryPercent: percent(held, capacity),
    memoryTitle:
      size === null && held === 0
        ? 'memory not measured yet'
        : `holds ${formatGiB(held)} of ${where}'s ${formatGiB(capacity)} now (${Math.round(percent(held, capacity))} %)` +
          (size !== null && model.state !== 'running' ? `; ${formatGiB(size)} when running` : ''),
    heldGiB: held,
    memoryNote,
    queueText: formatQueue(model.queue_depth, model.max_queue),
    inFlightText: String(model.in_flight ?? 0),
    swapInText: formatSeconds(model.last_swap_in_seconds),
    swapOutText: formatSeconds(model.last_swap_out_seconds),
    lastUsedText: formatAgo(lastRequest(model), nowSeconds),
    requestsText: String(model.requests ?? 0),
    admin,
    canSwapIn: admin && !busy && (state === 'swapped_out' || startable),
    canSwapOut: admin && !busy && state === 'running' && !model.pinned,
    canPrefetch: !admin && !busy && !notAllowedText && (state === 'swapped_out' || state === 'stopped'),
    offersPrefetch,
    notAllowedText,
    swapInLabel: startable ? 'Start' : 'Swap in',
    swapOutLabel: 'Swap out',
    pendingAction: pending ? pending.action : null,
    history,
    error: model.error || null,
    message: message ?? null
  };
}

export interface ISegment {
  /** A model's name, or '' for memory used outside any model's reservation. */
  label: string;
  /** the model's key (modelKey), or '' */
  key: string;
  gib: number;
  percent: number;
}

export interface IDeviceView {
  /** the row's key: `node/index` in client mode, else the index */
  key: string;
  index: number;
  node: string | null;
  /** the node's name on the row, where several nodes are shown */
  nodeText: string;
  title: string;
  kindText: string;
  virtual: boolean;
  capacityText: string;
  /** Reservations of the models on the device, in model order. */
  segments: ISegment[];
  reservedPercent: number;
  usedPercent: number | null;
  /** `used` is null where nothing measures it (a virtual device has no GPU to ask) */
  legend: { used: string | null; reserved: string; free: string };
  waitingText: string;
  ariaText: string;
}

export function deviceView(device: IDevice, models: IModel[], severalNodes = false): IDeviceView {
  const cap = device.capacity_gib;
  const segments: ISegment[] = [];
  let known = 0;
  for (const m of models) {
    const gib = deviceOf(m, [device]) ? m.reserved_gib ?? 0 : 0;
    if (gib > 0) {
      segments.push({ label: m.name, key: modelKey(m), gib, percent: percent(gib, cap) });
      known += gib;
    }
  }
  // reservations not attributed to a listed model (e.g. a kernel): one anonymous segment
  const rest = device.reserved_gib - known;
  if (rest > 0.005) {
    segments.push({ label: '', key: '', gib: rest, percent: percent(rest, cap) });
  }
  const virtual = device.kind === 'virtual';
  const used = device.used_gib;
  const legend = {
    used: used === null || used === undefined ? (virtual ? null : 'not measured yet') : formatGiB(used),
    reserved: formatGiB(device.reserved_gib),
    free: formatGiB(device.free_gib)
  };
  const waitingText = (device.waiting ?? [])
    .map(w => `${w.model} (${formatGiB(w.gib)})`)
    .join(', ');
  return {
    key: deviceKey(device),
    index: device.index,
    node: device.node ?? null,
    nodeText: severalNodes && device.node ? device.node : '',
    title: device.name,
    kindText: deviceKindLabel(device.kind),
    virtual,
    capacityText: formatGiB(cap),
    segments,
    reservedPercent: percent(device.reserved_gib, cap),
    usedPercent: used === null || used === undefined ? null : percent(used, cap),
    legend,
    waitingText,
    ariaText:
      `${device.name}${severalNodes && device.node ? ` on ${device.node}` : ''}: ${legend.reserved} reserved, ${legend.free} free of ${formatGiB(cap)}` +
      (used === null || used === undefined ? '' : `, ${legend.used} used`)
  };
}

export interface IHeaderView {
  /** whose engines these are and who looks: "The node's shared swap service · you are its admin (teacher)" */
  who: string;
  whoTitle: string;
  /** how a swap moves an engine, in plain words */
  how: string;
}

export function headerView(status: IStatus): IHeaderView {
  const name = status.user?.name || null;
  const admin = status.user?.admin !== false;
  const shared = status.mode === 'service';
  const nodes = status.nodes ?? [];
  let who: string;
  let whoTitle: string;
  if (nodes.length > 1) {
    who = `The shared swap services of ${nodes.length} GPU nodes · ${admin ? `you${name ? ` (${name})` : ''} are their admin` : `signed in as ${name ?? 'you'}`}`;
    whoTitle =
      'One service per GPU node, each with its own engines, for every user of this JupyterHub; a request goes to a node that serves its model. ' +
      (admin
        ? "As an admin you swap models by hand on each node and set everyone's quotas."
        : 'Your requests count against one quota on all nodes; admins swap models and set quotas.');
  } else if (shared) {
    who = `The node's shared swap service · ${admin ? `you${name ? ` (${name})` : ''} are its admin` : `signed in as ${name ?? 'you'}`}`;
    whoTitle = admin
      ? "One set of engines for every user of this JupyterHub. As an admin you swap models by hand and set everyone's quotas."
      : "One set of engines for every user of this JupyterHub. Your requests count against your quota; admins swap models and set quotas.";
  } else {
    who = `This server's own engines · ${name ? `${name}, ` : ''}${admin ? 'admin' : 'not an admin'}`;
    whoTitle = admin
      ? 'The engines run inside this Jupyter server; its user administers them.'
      : 'The engines run inside this Jupyter server; the admins named in its configuration swap them and set quotas.';
  }
  return { who, whoTitle, how: howText(status) };
}

/** How a swap moves an engine; nodes that differ (client mode) each say theirs. */
function howText(status: IStatus): string {
  const c = status.checkpointer;
  if (c === null || c === undefined || typeof c === 'string') {
    return swapMethodText(c, status.devices.some(d => d.kind === 'nvidia'));
  }
  const texts = new Map<string, string[]>();
  for (const [node, checkpointer] of Object.entries(c)) {
    const text = swapMethodText(checkpointer, status.devices.some(d => d.node === node && d.kind === 'nvidia'));
    if (text) {
      texts.set(text, [...(texts.get(text) ?? []), node]);
    }
  }
  if (texts.size === 1) {
    return [...texts.keys()][0];
  }
  return [...texts].map(([text, nodes]) => `${nodes.join(', ')}: ${text}`).join('; ');
}

export interface INodeView {
  name: string;
  up: boolean;
  /** "up" or "not answering" */
  stateText: string;
  /** "2 models: gemma, smollm2" */
  modelsText: string;
  /** the whole line, for a title and screen readers */
  title: string;
}

/** The node strip (client mode with several nodes): each node, up or not, and the models it offers. */
export function nodeViews(nodes: INode[] | undefined, nowSeconds: number): INodeView[] {
  return (nodes ?? []).map(n => {
    const models = n.models ?? [];
    const modelsText = models.length
      ? `${models.length === 1 ? '1 model' : `${models.length} models`}: ${models.join(', ')}`
      : 'no models';
    const since = typeof n.since === 'number' && n.since > 0 ? formatAgo(n.since, nowSeconds) : '';
    const stateText = n.up ? 'up' : 'not answering';
    const title = n.up
      ? `${n.name} is up${since ? ` (came up ${since})` : ''}; ${modelsText}`
      : `${n.name} is not answering${since ? ` (stopped ${since})` : ''}${n.error ? `: ${n.error}` : ''}; its models are unavailable until it answers again`;
    return { name: n.name, up: n.up, stateText, modelsText, title };
  });
}

/** The connection line of the header. */
export function connectionText(state: IPanelState, nowMs: number): string {
  switch (state.connection) {
    case 'connecting':
      return 'connecting…';
    case 'live':
      return 'live';
    case 'polling':
      return 'polling';
    case 'offline':
      return state.lastUpdate === null
        ? 'offline'
        : `offline · data from ${formatAgo(state.lastUpdate / 1000, nowMs / 1000)}`;
  }
}
