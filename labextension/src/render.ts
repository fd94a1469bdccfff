/**
 * The panel's DOM. Built once; every update patches text and attributes in place, keyed by device
 * and model (`node/index`, `node/name` in client mode, where every node has a device 0 and a model
 * may be on several nodes), so nothing flickers, scroll stays put and a focused button keeps focus.
 */

import { createChart, summaryParts, updateChart } from './chart';
import { h, reorder, setAttr, setClass, setHidden, setStyle, setText } from './dom';
import {
  connectionText,
  deviceView,
  headerView,
  IDeviceView,
  IModelView,
  IPanelState,
  modelView,
  nodeViews
} from './state';
import { CardAction, IModelRef, INode, modelKey, SwapAction } from './types';

export interface IPanelCallbacks {
  /** a manual swap of the model on its node */
  swap(model: IModelRef, action: SwapAction): void;
  /** "Use now": ask for the model ahead of need (the prefetch hint); never evicts a busy model */
  prefetch(model: IModelRef): void;
  retry(): void;
  /** dismiss the message of the model's row (its modelKey) */
  dismiss(key: string): void;
}

const COLORS = 6;

interface IDeviceRow {
  root: HTMLElement;
  title: HTMLElement;
  node: HTMLElement;
  kind: HTMLElement;
  capacity: HTMLElement;
  bar: HTMLElement;
  segs: HTMLElement;
  used: HTMLElement;
  reserved: HTMLElement;
  free: HTMLElement;
  usedLegend: HTMLElement;
  waiting: HTMLElement;
}

interface IModelRow {
  root: HTMLElement;
  swatch: HTMLElement;
  name: HTMLElement;
  node: HTMLElement;
  subtitle: HTMLElement;
  pinned: HTMLElement;
  state: HTMLElement;
  stateText: HTMLElement;
  memBar: HTMLElement;
  memFill: HTMLElement;
  memText: HTMLElement;
  memNote: HTMLElement;
  values: Record<string, HTMLElement>;
  chart: SVGSVGElement;
  chartText: HTMLElement;
  message: HTMLElement;
  messageText: HTMLElement;
  messageClose: HTMLButtonElement;
  error: HTMLElement;
  notAllowed: HTMLElement;
  swapIn: HTMLButtonElement;
  swapOut: HTMLButtonElement;
  prefetch: HTMLButtonElement;
}

const STATS: [string, string, string][] = [
  ['device', 'Device', 'The device the model runs on'],
  ['queue', 'Queued', 'Requests waiting in the queue (of the queue limit)'],
  ['inflight', 'In flight', 'Requests being answered by the engine now'],
  ['requests', 'Requests', 'Requests served since the server started'],
  ['swapin', 'Swap-in', 'Duration of the last swap-in'],
  ['swapout', 'Swap-out', 'Duration of the last swap-out'],
  ['lastused', 'Last used', 'When the model last served a request (start-up and swaps do not count)']
];

export class PanelView {
  readonly node: HTMLElement;
  private conn: HTMLElement;
  private connText: HTMLElement;
  private meta: HTMLElement;
  private metaHow: HTMLElement;
  private errorBox: HTMLElement;
  private errorText: HTMLElement;
  private configErrors: HTMLElement;
  private nodesSection: HTMLElement;
  private nodesList: HTMLElement;
  private devicesSection: HTMLElement;
  private devicesList: HTMLElement;
  private modelsSection: HTMLElement;
  private modelsHeading: HTMLElement;
  private modelsList: HTMLElement;
  private empty: HTMLElement;
  private devices = new Map<string, IDeviceRow>();
  private models = new Map<string, IModelRow>();
  private nodeItems = new Map<string, { root: HTMLElement; name: HTMLElement; state: HTMLElement; models: HTMLElement }>();
  /** Extra sections (e.g. admin quotas) appended after the models. */
  readonly extra: HTMLElement;

  constructor(private callbacks: IPanelCallbacks) {
    const node = (this.node = h('div', 'jp-SwapServe-content'));

    const header = h('header', 'jp-SwapServe-header');
    const titleRow = h('div', 'jp-SwapServe-titleRow');
    titleRow.appendChild(h('h2', 'jp-SwapServe-title', 'SwapServe'));
    this.conn = h('span', 'jp-SwapServe-conn');
    this.conn.setAttribute('role', 'status');
    this.conn.setAttribute('aria-live', 'polite');
    this.conn.appendChild(h('span', 'jp-SwapServe-connDot'));
    this.connText = h('span', 'jp-SwapServe-connText', 'connecting…');
    this.conn.appendChild(this.connText);
    titleRow.appendChild(this.conn);
    header.appendChild(titleRow);
    this.meta = h('div', 'jp-SwapServe-meta jp-SwapServe-who');
    this.metaHow = h('div', 'jp-SwapServe-meta jp-SwapServe-how');
    header.append(this.meta, this.metaHow);
    node.appendChild(header);

    this.errorBox = h('div', 'jp-SwapServe-alert jp-SwapServe-alert-error');
    this.errorBox.setAttribute('role', 'alert');
    this.errorText = h('span', 'jp-SwapServe-alertText');
    this.errorBox.appendChild(this.errorText);
    const retry = h('button', 'jp-SwapServe-button jp-SwapServe-retry', 'Retry now');
    retry.type = 'button';
    retry.addEventListener('click', () => this.callbacks.retry());
    this.errorBox.appendChild(retry);
    this.errorBox.hidden = true;
    node.appendChild(this.errorBox);

    this.configErrors = h('ul', 'jp-SwapServe-alert jp-SwapServe-alert-warn jp-SwapServe-configErrors');
    this.configErrors.setAttribute('aria-label', 'Configuration errors');
    this.configErrors.hidden = true;
    node.appendChild(this.configErrors);

    // client mode with several nodes: which node services there are, up or not, and their models
    this.nodesSection = h('section', 'jp-SwapServe-section jp-SwapServe-nodes');
    this.nodesSection.setAttribute('aria-label', 'Nodes');
    this.nodesSection.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Nodes'));
    this.nodesList = h('ul', 'jp-SwapServe-nodeList');
    this.nodesSection.appendChild(this.nodesList);
    this.nodesSection.hidden = true;
    node.appendChild(this.nodesSection);

    this.devicesSection = h('section', 'jp-SwapServe-section jp-SwapServe-devices');
    this.devicesSection.setAttribute('aria-label', 'Devices');
    this.devicesSection.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Devices'));
    this.devicesList = h('div', 'jp-SwapServe-list');
    this.devicesSection.appendChild(this.devicesList);
    this.devicesSection.hidden = true;
    node.appendChild(this.devicesSection);

    this.modelsSection = h('section', 'jp-SwapServe-section jp-SwapServe-models');
    this.modelsSection.setAttribute('aria-label', 'Models');
    this.modelsHeading = h('h3', 'jp-SwapServe-sectionTitle', 'Models');
    this.modelsSection.appendChild(this.modelsHeading);
    this.modelsList = h('div', 'jp-SwapServe-list');
    this.modelsSection.appendChild(this.modelsList);
    this.empty = h('p', 'jp-SwapServe-empty', 'No models are configured. Pass a models file with --SwapServe.models_file.');
    this.empty.hidden = true;
    this.modelsSection.appendChild(this.empty);
    this.modelsSection.hidden = true;
    node.appendChild(this.modelsSection);

    this.extra = h('div', 'jp-SwapServe-extra');
    node.appendChild(this.extra);
  }

  /** `allowedModels`: the models the user's quota allows (their usage document), null for every one. */
  update(state: IPanelState, nowMs: number, allowedModels: readonly string[] | null = null): void {
    setAttr(this.conn, 'data-mode', state.connection);
    setText(this.connText, connectionText(state, nowMs));
    setAttr(
      this.conn,
      'title',
      state.connection === 'live'
        ? 'Updates arrive as server-sent events.'
        : state.connection === 'polling'
          ? 'Server-sent events are unavailable: polling the status once a second.'
          : ''
    );

    setHidden(this.errorBox, !state.error);
    setText(this.errorText, state.error ? state.error.message : '');
    setAttr(this.errorBox, 'data-kind', state.error ? state.error.kind : null);

    const status = state.status;
    setClass(this.node, 'jp-mod-stale', !!state.error && !!status);
    if (!status) {
      setText(this.meta, state.error ? '' : 'Loading the status…');
      setHidden(this.metaHow, true);
      return;
    }
    const head = headerView(status);
    setText(this.meta, head.who);
    setAttr(this.meta, 'title', head.whoTitle);
    setText(this.metaHow, head.how);
    setHidden(this.metaHow, !head.how);
    const admin = status.user?.admin !== false;

    this.updateConfigErrors(status.config_errors ?? []);
    const severalNodes = (status.nodes ?? []).length > 1;
    this.updateNodes(severalNodes ? status.nodes! : [], nowMs);

    setHidden(this.devicesSection, status.devices.length === 0);
    const modelKeys = status.models.map(m => modelKey(m));
    const deviceRows: HTMLElement[] = [];
    const deviceKeys = new Set<string>();
    for (const d of status.devices) {
      const view = deviceView(d, status.models, severalNodes);
      let row = this.devices.get(view.key);
      if (!row) {
        row = this.createDevice();
        this.devices.set(view.key, row);
      }
      this.patchDevice(row, view, modelKeys);
      deviceRows.push(row.root);
      deviceKeys.add(view.key);
    }
    for (const [key, row] of this.devices) {
      if (!deviceKeys.has(key)) {
        this.devices.delete(key);
        row.root.remove();
      }
    }
    reorder(this.devicesList, deviceRows);

    setHidden(this.modelsSection, false);
    setText(this.modelsHeading, `Models (${status.models.length})`);
    setHidden(this.empty, status.models.length > 0);
    const modelRows: HTMLElement[] = [];
    status.models.forEach((m, i) => {
      const key = modelKeys[i];
      let row = this.models.get(key);
      if (!row) {
        row = this.createModel({ name: m.name, node: m.node });
        this.models.set(key, row);
      }
      const view = modelView(
        m,
        status.devices,
        state.pending[key],
        state.messages[key],
        nowMs / 1000,
        admin,
        allowedModels,
        severalNodes
      );
      this.patchModel(row, view, i);
      modelRows.push(row.root);
    });
    const wanted = new Set(modelKeys);
    for (const [key, row] of this.models) {
      if (!wanted.has(key)) {
        this.models.delete(key);
        row.root.remove();
      }
    }
    reorder(this.modelsList, modelRows);
  }

  private updateNodes(nodes: INode[], nowMs: number): void {
    setHidden(this.nodesSection, nodes.length === 0);
    const items: HTMLElement[] = [];
    for (const v of nodeViews(nodes, nowMs / 1000)) {
      let item = this.nodeItems.get(v.name);
      if (!item) {
        const root = h('li', 'jp-SwapServe-node');
        root.dataset.node = v.name;
        const name = h('span', 'jp-SwapServe-nodeName', v.name);
        const state = h('span', 'jp-SwapServe-nodeState');
        const models = h('span', 'jp-SwapServe-nodeModels');
        root.append(name, state, models);
        item = { root, name, state, models };
        this.nodeItems.set(v.name, item);
      }
      setAttr(item.root, 'data-up', v.up ? 'true' : 'false');
      setAttr(item.root, 'title', v.title);
      setText(item.state, v.stateText);
      setText(item.models, v.modelsText);
      items.push(item.root);
    }
    for (const [name, item] of this.nodeItems) {
      if (!nodes.some(n => n.name === name)) {
        this.nodeItems.delete(name);
        item.root.remove();
      }
    }
    reorder(this.nodesList, items);
  }

  private updateConfigErrors(errors: string[]): void {
    setHidden(this.configErrors, errors.length === 0);
    const key = JSON.stringify(errors);
    if (this.configErrors.getAttribute('data-key') === key) {
      return;
    }
    this.configErrors.setAttribute('data-key', key);
    this.configErrors.textContent = '';
    for (const e of errors) {
      this.configErrors.appendChild(h('li', '', e));
    }
  }

  // ---- devices --------------------------------------------------------------------------
  private createDevice(): IDeviceRow {
    const root = h('div', 'jp-SwapServe-device');
    const head = h('div', 'jp-SwapServe-rowHead');
    const title = h('span', 'jp-SwapServe-deviceName');
    const kind = h('span', 'jp-SwapServe-badge jp-SwapServe-kind');
    head.append(title, kind);
    // its node, on a line of its own: a narrow sidebar keeps the device's name whole
    const node = h('div', 'jp-SwapServe-onNode');
    node.hidden = true;
    const capacity = h('span', 'jp-SwapServe-legendItem jp-SwapServe-capacity');
    const bar = h('div', 'jp-SwapServe-bar jp-SwapServe-deviceBar');
    bar.setAttribute('role', 'img');
    const segs = h('div', 'jp-SwapServe-segs');
    const used = h('div', 'jp-SwapServe-usedMarker');
    bar.append(segs, used);
    const legend = h('div', 'jp-SwapServe-legend');
    const reserved = h('span', 'jp-SwapServe-legendItem jp-SwapServe-legend-reserved');
    const usedLegend = h('span', 'jp-SwapServe-legendItem jp-SwapServe-legend-used');
    const free = h('span', 'jp-SwapServe-legendItem jp-SwapServe-legend-free');
    legend.append(reserved, free, usedLegend, capacity);
    const waiting = h('div', 'jp-SwapServe-waiting');
    waiting.setAttribute('aria-live', 'polite');
    root.append(head, node, bar, legend, waiting);
    return { root, title, node, kind, capacity, bar, segs, used, reserved, free, usedLegend, waiting };
  }

  private patchDevice(row: IDeviceRow, v: IDeviceView, modelOrder: string[]): void {
    setAttr(row.root, 'data-device', String(v.index));
    setAttr(row.root, 'data-node', v.node);
    setText(row.title, v.title);
    setAttr(row.title, 'title', v.title);
    setHidden(row.node, !v.nodeText);
    setText(row.node, v.nodeText ? `on ${v.nodeText}` : '');
    setAttr(row.node, 'title', v.nodeText ? `A device of the node ${v.nodeText}` : null);
    setText(row.kind, v.kindText);
    setClass(row.kind, 'jp-mod-virtual', v.virtual);
    setAttr(
      row.kind,
      'title',
      v.virtual
        ? 'A virtual device: capacity and sizes come from the configuration; swaps freeze and thaw the engine, no GPU memory moves.'
        : null
    );
    setText(row.capacity, `of ${v.capacityText}`);
    setAttr(row.bar, 'aria-label', v.ariaText);
    setAttr(row.bar, 'title', v.ariaText);
    // segments keyed by label
    const wanted: HTMLElement[] = [];
    const existing = new Map<string, HTMLElement>();
    row.segs.querySelectorAll<HTMLElement>('.jp-SwapServe-seg').forEach(el => {
      existing.set(el.dataset.label ?? '', el);
    });
    for (const s of v.segments) {
      let el = existing.get(s.label);
      if (!el) {
        el = h('div', 'jp-SwapServe-seg');
        el.dataset.label = s.label;
      }
      const color = s.key ? modelOrder.indexOf(s.key) % COLORS : -1;
      setAttr(el, 'data-color', String(color));
      setStyle(el, 'width', `${s.percent.toFixed(2)}%`);
      setAttr(el, 'title', `${s.label || 'other reservations'}: ${s.gib.toFixed(2)} GiB`);
      wanted.push(el);
    }
    reorder(row.segs, wanted);
    setHidden(row.used, v.usedPercent === null);
    if (v.usedPercent !== null) {
      setStyle(row.used, 'width', `${v.usedPercent.toFixed(2)}%`);
    }
    setHidden(row.usedLegend, v.legend.used === null);
    setText(row.usedLegend, v.legend.used === null ? '' : `used ${v.legend.used}`);
    setText(row.reserved, `reserved ${v.legend.reserved}`);
    setText(row.free, `free ${v.legend.free}`);
    setHidden(row.waiting, !v.waitingText);
    setText(row.waiting, v.waitingText ? `Waiting for memory: ${v.waitingText}` : '');
  }

  // ---- models ---------------------------------------------------------------------------
  private createModel(ref: IModelRef): IModelRow {
    const name = ref.name;
    const root = h('article', 'jp-SwapServe-model');
    root.dataset.model = name;
    if (ref.node) {
      root.dataset.node = ref.node;
    }
    const headId = `jp-SwapServe-model-${modelKey(ref).replace(/[^a-zA-Z0-9_-]/g, '_')}`;
    root.setAttribute('aria-labelledby', headId);

    const head = h('div', 'jp-SwapServe-rowHead');
    const swatch = h('span', 'jp-SwapServe-swatch');
    swatch.setAttribute('aria-hidden', 'true');
    const nameEl = h('span', 'jp-SwapServe-modelName', name);
    nameEl.id = headId;
    nameEl.title = name;
    const subRow = h('div', 'jp-SwapServe-subRow');
    const subtitle = h('span', 'jp-SwapServe-subtitle');
    const pinned = h('span', 'jp-SwapServe-badge jp-SwapServe-pinned', 'pinned');
    pinned.title = 'Pinned: never swapped out to make room';
    const state = h('span', 'jp-SwapServe-state');
    state.setAttribute('role', 'status');
    state.setAttribute('aria-live', 'polite');
    state.appendChild(h('span', 'jp-SwapServe-stateIcon'));
    const stateText = h('span', 'jp-SwapServe-stateText');
    state.appendChild(stateText);
    // its node (several nodes), first on the line under the name: the name stays whole
    const nodeEl = h('span', 'jp-SwapServe-onNode');
    nodeEl.hidden = true;
    head.append(swatch, nameEl);
    subRow.append(nodeEl, subtitle, pinned, state);

    const mem = h('div', 'jp-SwapServe-memory');
    const memLabel = h('span', 'jp-SwapServe-label', 'Memory');
    memLabel.title = 'What the model holds on its device now, against the device\'s capacity';
    mem.appendChild(memLabel);
    const memBar = h('div', 'jp-SwapServe-bar jp-SwapServe-memBar');
    memBar.setAttribute('role', 'meter');
    memBar.setAttribute('aria-valuemin', '0');
    memBar.setAttribute('aria-valuemax', '100');
    memBar.setAttribute('aria-label', `Memory of ${name} against its device's capacity`);
    const memFill = h('div', 'jp-SwapServe-memFill');
    memBar.appendChild(memFill);
    const memText = h('span', 'jp-SwapServe-memText');
    const memNote = h('span', 'jp-SwapServe-memNote');
    mem.append(memBar, memText, memNote);

    const stats = h('dl', 'jp-SwapServe-stats');
    const values: Record<string, HTMLElement> = {};
    for (const [key, label, help] of STATS) {
      const item = h('div', `jp-SwapServe-stat jp-SwapServe-stat-${key}`);
      item.title = help;
      item.append(h('dt', '', label));
      values[key] = h('dd', '');
      item.append(values[key]);
      stats.appendChild(item);
    }

    const chartBox = h('div', 'jp-SwapServe-chartBox');
    chartBox.appendChild(h('span', 'jp-SwapServe-label', 'Swap-in latency'));
    const chart = createChart();
    const chartText = h('span', 'jp-SwapServe-chartText');
    chartBox.append(chart, chartText);

    const message = h('div', 'jp-SwapServe-message');
    message.setAttribute('role', 'status');
    const messageText = h('span', '');
    const messageClose = h('button', 'jp-SwapServe-iconButton', '×');
    messageClose.type = 'button';
    messageClose.setAttribute('aria-label', `Dismiss the message about ${name}${ref.node ? ` on ${ref.node}` : ''}`);
    messageClose.addEventListener('click', () => this.callbacks.dismiss(modelKey(ref)));
    message.append(messageText, messageClose);
    message.hidden = true;

    const error = h('div', 'jp-SwapServe-modelError');
    error.hidden = true;

    const notAllowed = h('div', 'jp-SwapServe-notAllowed');
    notAllowed.hidden = true;

    const actions = h('div', 'jp-SwapServe-actions');
    const swapIn = this.actionButton(ref, 'swap-in');
    const swapOut = this.actionButton(ref, 'swap-out');
    const prefetch = this.actionButton(ref, 'prefetch');
    prefetch.hidden = true;
    actions.append(swapIn, swapOut, prefetch);

    root.append(head, subRow, mem, stats, chartBox, message, error, notAllowed, actions);
    return {
      root,
      swatch,
      name: nameEl,
      node: nodeEl,
      subtitle,
      pinned,
      state,
      stateText,
      memBar,
      memFill,
      memText,
      memNote,
      values,
      chart,
      chartText,
      message,
      messageText,
      messageClose,
      error,
      notAllowed,
      swapIn,
      swapOut,
      prefetch
    };
  }

  private actionButton(ref: IModelRef, action: CardAction): HTMLButtonElement {
    const b = h('button', `jp-SwapServe-button jp-SwapServe-${action}`);
    b.type = 'button';
    b.dataset.action = action;
    // aria-disabled, not disabled: a disabled button would drop keyboard focus mid-swap
    b.addEventListener('click', () => {
      if (b.getAttribute('aria-disabled') !== 'true') {
        if (action === 'prefetch') {
          this.callbacks.prefetch(ref);
        } else {
          this.callbacks.swap(ref, action);
        }
      }
    });
    return b;
  }

  private patchModel(row: IModelRow, v: IModelView, index: number): void {
    setAttr(row.root, 'data-state', v.state);
    setClass(row.root, 'jp-mod-busy', v.busy);
    setAttr(row.swatch, 'data-color', String(index % COLORS));
    setHidden(row.node, !v.nodeText);
    setText(row.node, v.nodeText ? `on ${v.nodeText}` : '');
    setAttr(row.node, 'title', v.nodeText ? `Served by the swap service of the node ${v.nodeText}` : null);
    setText(row.subtitle, v.subtitle);
    setHidden(row.pinned, !v.pinned);
    const stateCls = `jp-SwapServe-state ${v.stateClass}${v.busy ? ' jp-mod-busy' : ''}`;
    if (row.state.className !== stateCls) {
      row.state.className = stateCls;
    }
    setText(row.stateText, v.stateText);
    setAttr(row.state, 'aria-label', `${v.name}${v.nodeText ? ` on ${v.nodeText}` : ''}: ${v.stateText}`);

    setStyle(row.memFill, 'width', `${v.memoryPercent.toFixed(2)}%`);
    setAttr(row.memFill, 'data-color', String(index % COLORS));
    setAttr(row.memBar, 'aria-valuenow', v.memoryPercent.toFixed(0));
    setAttr(row.memBar, 'aria-valuetext', v.memoryTitle);
    setAttr(row.memBar, 'title', v.memoryTitle);
    setText(row.memText, v.memoryText);
    setText(row.memNote, v.memoryNote);
    setHidden(row.memNote, !v.memoryNote);

    setText(row.values.device, v.deviceText);
    setClass(row.values.device, 'jp-mod-virtual', v.virtual);
    setText(row.values.queue, v.queueText);
    setClass(row.values.queue, 'jp-mod-active', v.queueText !== '0' && !v.queueText.startsWith('0 '));
    setText(row.values.inflight, v.inFlightText);
    setClass(row.values.inflight, 'jp-mod-active', v.inFlightText !== '0');
    setText(row.values.requests, v.requestsText);
    setText(row.values.swapin, v.swapInText);
    setText(row.values.swapout, v.swapOutText);
    setText(row.values.lastused, v.lastUsedText);
    setAttr(row.subtitle, 'title', v.subtitle);
    for (const key of ['device', 'swapin', 'swapout', 'lastused', 'queue']) {
      setAttr(row.values[key], 'title', row.values[key].textContent);
    }

    updateChart(row.chart, v.history, v.name);
    // one span per figure: lines break between figures, never inside one
    const parts = summaryParts(v.history);
    const key = parts.join('|');
    if (row.chartText.getAttribute('data-key') !== key) {
      row.chartText.setAttribute('data-key', key);
      row.chartText.textContent = '';
      parts.forEach((part, i) => {
        row.chartText.appendChild(h('span', '', i < parts.length - 1 ? `${part} ·` : part));
      });
    }

    setHidden(row.message, !v.message);
    setAttr(row.message, 'data-kind', v.message ? v.message.kind : null);
    setText(row.messageText, v.message ? v.message.text : '');

    setHidden(row.error, !v.error);
    setText(row.error, v.error ? `Error: ${v.error}` : '');

    // a model the user's quota does not include: said once, and "Use now" is not offered for it
    setHidden(row.notAllowed, !v.notAllowedText);
    setText(row.notAllowed, v.notAllowedText);

    // admins swap by hand; everyone else may only ask for a model ahead of need ("Use now")
    const on = v.nodeText ? ` on ${v.nodeText}` : '';
    setHidden(row.swapIn, !v.admin);
    setHidden(row.swapOut, !v.admin);
    setHidden(row.prefetch, !v.offersPrefetch);
    this.patchButton(
      row.prefetch,
      v.pendingAction === 'prefetch' ? 'Asking…' : 'Use now',
      v.canPrefetch,
      v.notAllowedText
        ? v.notAllowedText
        : `Use ${v.name}${on} now: swap it in ahead of your request, if that pushes out no model in use`,
      v.pendingAction === 'prefetch'
    );
    this.patchButton(
      row.swapIn,
      v.pendingAction === 'swap-in' ? `${v.swapInLabel === 'Start' ? 'Starting' : 'Swapping in'}…` : v.swapInLabel,
      v.canSwapIn,
      `${v.swapInLabel} ${v.name}${on}`,
      v.pendingAction === 'swap-in'
    );
    this.patchButton(
      row.swapOut,
      v.pendingAction === 'swap-out' ? 'Swapping out…' : v.swapOutLabel,
      v.canSwapOut,
      v.pinned ? `${v.name}${on} is pinned and is never swapped out` : `${v.swapOutLabel} ${v.name}${on}`,
      v.pendingAction === 'swap-out'
    );
  }

  private patchButton(b: HTMLButtonElement, text: string, enabled: boolean, label: string, busy: boolean): void {
    setText(b, text);
    setAttr(b, 'aria-disabled', enabled ? null : 'true');
    setAttr(b, 'aria-label', label);
    setAttr(b, 'aria-busy', busy ? 'true' : null);
    setAttr(b, 'title', label);
    setClass(b, 'jp-mod-busy', busy);
  }
}
