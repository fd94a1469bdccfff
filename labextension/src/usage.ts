/**
 * Usage section: GET /swapserve/api/usage (docs/quotas.md). Everyone sees their own tokens and
 * requests today and what remains of their quota; admins also see every user's usage per model.
 */

import { Requester } from './client';
import { h, setHidden, setText } from './dom';
import { formatCount } from './format';

export interface IUsageRow {
  user: string;
  model: string;
  day: string;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface IUsageDoc {
  user: string;
  admin: boolean;
  day: string;
  usage: IUsageRow[];
  limits: Record<string, unknown>;
  used: { tokens_today: number; requests_this_minute: number; concurrent: number };
  remaining: { tokens_today: number | null; requests_this_minute: number | null; concurrent: number | null };
  resets: { tokens: string; requests: string };
}

export function isUsageDoc(doc: unknown): doc is IUsageDoc {
  const d = doc as IUsageDoc;
  return !!d && typeof d === 'object' && typeof d.user === 'string' && Array.isArray(d.usage) && !!d.used;
}

export async function fetchUsage(request: Requester): Promise<IUsageDoc | null> {
  try {
    const r = await request('usage');
    return r.status === 200 && isUsageDoc(r.body) ? r.body : null;
  } catch {
    return null;
  }
}

/** One line about the user's own day: "1,234 tokens today · 98,766 left (resets 00:00 UTC)". */
export function ownSummary(doc: IUsageDoc): string {
  const parts = [`${formatCount(doc.used.tokens_today)} tokens today`];
  const left = doc.remaining.tokens_today;
  if (left !== null && left !== undefined) {
    parts.push(`${formatCount(left)} left (resets ${doc.resets.tokens.replace('T', ' ').replace('Z', ' UTC')})`);
  } else {
    parts.push('no daily token limit');
  }
  const rpm = doc.remaining.requests_this_minute;
  if (rpm !== null && rpm !== undefined) {
    parts.push(`${formatCount(rpm)} requests left this minute`);
  }
  return parts.join(' · ');
}

/** Today's rows, busiest first. */
export function todayRows(doc: IUsageDoc): IUsageRow[] {
  return doc.usage.filter(r => r.day === doc.day).sort((a, b) => b.total_tokens - a.total_tokens);
}

export class UsageSection {
  readonly node: HTMLElement;
  private summary: HTMLElement;
  private table: HTMLElement;
  private key = '';

  constructor() {
    this.node = h('section', 'jp-SwapServe-section jp-SwapServe-usage');
    this.node.setAttribute('aria-label', 'Usage');
    this.node.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Usage'));
    this.summary = h('div', 'jp-SwapServe-usageSummary');
    this.table = h('div', 'jp-SwapServe-usageTable');
    this.node.append(this.summary, this.table);
    this.node.hidden = true;
  }

  update(doc: IUsageDoc | null): void {
    setHidden(this.node, !doc);
    if (!doc) {
      return;
    }
    setText(this.summary, `${doc.user}: ${ownSummary(doc)}`);
    const rows = todayRows(doc);
    const key = JSON.stringify(rows);
    if (key === this.key) {
      return;
    }
    this.key = key;
    const table = h('table', '');
    const head = h('tr', '');
    for (const title of ['User', 'Model', 'Requests', 'Tokens (prompt + completion)']) {
      head.appendChild(h('th', '', title));
    }
    table.appendChild(head);
    for (const r of rows) {
      const tr = h('tr', '');
      tr.dataset.user = r.user;
      tr.dataset.model = r.model;
      tr.append(
        h('td', '', r.user),
        h('td', '', r.model),
        h('td', 'jp-SwapServe-usageRequests', formatCount(r.requests)),
        h('td', 'jp-SwapServe-usageTokens', `${formatCount(r.total_tokens)} (${formatCount(r.prompt_tokens)} + ${formatCount(r.completion_tokens)})`)
      );
      table.appendChild(tr);
    }
    this.table.textContent = '';
    if (rows.length) {
      this.table.appendChild(table);
    } else {
      this.table.appendChild(h('p', 'jp-SwapServe-usageEmpty', 'No requests today.'));
    }
  }
}
