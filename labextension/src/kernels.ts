/**
 * Kernels section: the notebook kernels holding GPU memory (`kernels` in GET /swapserve/api/status),
 * with their state, memory and last restore, and buttons to release (swap out when idle) and to
 * pin or unpin. POST /swapserve/api/kernels/<id>/<action> (docs/kernels.md).
 */

import { Requester } from './client';
import { h, setHidden, setText } from './dom';
import { formatAgo, formatGiB, formatSeconds, stateClass, stateLabel } from './format';

export interface IKernelTenant {
  kernel_id: string;
  user: string;
  path: string;
  device: number;
  memory_gib: number;
  state: 'resident' | 'swapping_out' | 'swapped_out' | 'swapping_in' | string;
  busy: boolean;
  pinned: boolean;
  last_execution: number | null;
  last_swap_in_seconds: number | null;
  last_swap_out_seconds: number | null;
  last_swap_out_reason?: string | null;
  swaps_in: number;
  swaps_out: number;
  error?: string | null;
  /** the shared service: the user's server that owns it ('' for the default one) */
  server?: string;
  /** the shared service: whether its server can be asked to swap it now */
  owner?: 'answering' | 'not answering' | 'lost' | string;
  /** client mode: the node that books it */
  node?: string;
}

export type KernelAction = 'release' | 'pin' | 'unpin';

/** The kernel's name in the list: its notebook, else the start of its id. */
export function kernelLabel(k: IKernelTenant): string {
  return k.path ? k.path.split('/').pop() || k.path : `kernel ${k.kernel_id.slice(0, 8)}`;
}

/**
 * One line of facts: "1.20 GiB · device 0 · busy · restored in 0.9 s · last run 3 min ago". On a
 * shared node an admin sees every user's kernels: another user's says whose it is ("bob's"), a
 * named server's says which, and one whose server cannot be asked to swap it now says so.
 */
export function kernelFacts(k: IKernelTenant, nowSeconds: number, viewer?: string | null): string {
  const parts: string[] = [];
  if (viewer && k.user && k.user !== viewer) {
    parts.push(`${k.user}'s`);
  }
  if (k.server) {
    parts.push(`server ${k.server}`);
  }
  parts.push(formatGiB(k.memory_gib), `device ${k.device}`);
  if (k.node) {
    parts.push(`node ${k.node}`);
  }
  if (k.owner && k.owner !== 'answering') {
    parts.push(`its server is ${k.owner === 'lost' ? 'gone' : 'not answering'}`);
  }
  if (k.busy) {
    parts.push('busy');
  }
  if (k.pinned) {
    parts.push('pinned');
  }
  if (k.last_swap_in_seconds !== null && k.last_swap_in_seconds !== undefined) {
    parts.push(`restored in ${formatSeconds(k.last_swap_in_seconds)}`);
  }
  if (k.last_execution) {
    parts.push(`last run ${formatAgo(k.last_execution, nowSeconds)}`);
  }
  if (k.state === 'swapped_out' && k.last_swap_out_reason) {
    parts.push(`out: ${k.last_swap_out_reason}`);
  }
  return parts.join(' · ');
}

/** What the user may do with the kernel now. */
export function kernelActions(k: IKernelTenant): KernelAction[] {
  if (k.pinned) {
    return ['unpin'];
  }
  return k.state === 'resident' ? ['release', 'pin'] : ['pin'];
}

const ACTION_LABELS: Record<KernelAction, string> = { release: 'Release', pin: 'Pin', unpin: 'Unpin' };

export class KernelSection {
  readonly node: HTMLElement;
  private list: HTMLElement;
  private message: HTMLElement;
  private key = '';

  constructor(private request: Requester) {
    this.node = h('section', 'jp-SwapServe-section jp-SwapServe-kernels');
    this.node.setAttribute('aria-label', 'Notebook kernels on the GPU');
    this.node.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Kernels on the GPU'));
    this.list = h('ul', 'jp-SwapServe-kernelList');
    this.message = h('p', 'jp-SwapServe-kernelMessage');
    this.message.setAttribute('role', 'status');
    this.node.append(this.list, this.message);
    this.node.hidden = true;
  }

  /** ``viewer``: who looks (status.user.name), so that other users' kernels say whose they are. */
  update(kernels: IKernelTenant[] | undefined, nowSeconds: number, viewer?: string | null): void {
    const all = kernels ?? [];
    setHidden(this.node, all.length === 0);
    const key = JSON.stringify(
      all.map(k => [k.kernel_id, k.state, k.pinned, k.busy, kernelFacts(k, nowSeconds, viewer), k.error])
    );
    if (key === this.key) {
      return;
    }
    this.key = key;
    this.list.textContent = '';
    for (const k of all) {
      const item = h('li', 'jp-SwapServe-kernel');
      item.dataset.kernel = k.kernel_id;
      const title = h('div', 'jp-SwapServe-kernelTitle');
      const state = h('span', `jp-SwapServe-state ${stateClass(k.state)}`, stateLabel(k.state));
      title.append(h('span', 'jp-SwapServe-kernelName', kernelLabel(k)), state);
      const facts = h('div', 'jp-SwapServe-kernelFacts', kernelFacts(k, nowSeconds, viewer));
      item.append(title, facts);
      if (k.error) {
        item.appendChild(h('div', 'jp-SwapServe-error', k.error));
      }
      const actions = h('div', 'jp-SwapServe-kernelActions');
      for (const action of kernelActions(k)) {
        const button = h('button', 'jp-SwapServe-button', ACTION_LABELS[action]);
        button.type = 'button';
        button.dataset.action = action;
        button.setAttribute('aria-label', `${ACTION_LABELS[action]} the GPU memory of ${kernelLabel(k)}`);
        button.addEventListener('click', () => void this.act(k, action));
        actions.appendChild(button);
      }
      item.appendChild(actions);
      this.list.appendChild(item);
    }
  }

  async act(k: IKernelTenant, action: KernelAction): Promise<void> {
    try {
      const r = await this.request(`kernels/${encodeURIComponent(k.kernel_id)}/${action}`, { method: 'POST', body: '{}' });
      const body = r.body as { result?: string; error?: { message?: string } } | null;
      setText(
        this.message,
        r.status === 200 ? `${kernelLabel(k)}: ${body?.result ?? 'done'}` : `${kernelLabel(k)}: ${body?.error?.message ?? `HTTP ${r.status}`}`
      );
    } catch (err) {
      setText(this.message, `${kernelLabel(k)}: ${String(err)}`);
    }
  }
}
