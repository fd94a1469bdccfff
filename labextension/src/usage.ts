/**
 * Usage section: GET /swapserve/api/usage (docs/quotas.md). Everyone sees their own limits, what is
 * left of each and when it resets, their tokens and requests today, and their last refused request;
 * admins also see every user's usage per model. The numbers stay true on their own: the panel
 * fetches the document again when the next limit resets (nextRefresh), not only when the status
 * changes.
 */

import { Requester } from './client';
import { h, setAttr, setHidden, setText } from './dom';
import { formatClock, formatCount, parseTime, plural } from './format';

export interface IUsageRow {
  user: string;
  model: string;
  day: string;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

export interface IRefusal {
  at: string;
  model: string;
  status: number;
  code: string;
  message: string;
  param?: string | null;
  /** when the request may be sent again (ISO), when the refusal says */
  retry_at?: string | null;
}

export interface IUsageLimits {
  allowed_models?: string[] | null;
  max_concurrent?: number | null;
  requests_per_minute?: number | null;
  tokens_per_day?: number | null;
  max_tokens_per_request?: number | null;
  priority?: number | null;
  [field: string]: unknown;
}

export interface IUsageDoc {
  user: string;
  admin: boolean;
  day: string;
  usage: IUsageRow[];
  limits: IUsageLimits;
  used: { tokens_today: number; requests_this_minute: number; concurrent: number };
  remaining: { tokens_today: number | null; requests_this_minute: number | null; concurrent: number | null };
  resets: { tokens: string; requests: string };
  /** the server's clock when it answered (ISO); absent from older servers */
  now?: string;
  last_refusal?: IRefusal | null;
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

function isNumber(x: unknown): x is number {
  return typeof x === 'number' && isFinite(x);
}

export interface IUsageLine {
  key: string;
  text: string;
}

/**
 * The user's limits, each with what is left and when it resets, in the local time of the page:
 * "Requests: 1 per minute · 0 requests left · resets at 23:03:54". `nowMs` is the page's clock.
 */
export function limitLines(doc: IUsageDoc, nowMs: number): IUsageLine[] {
  const lines: IUsageLine[] = [];
  const limits = doc.limits ?? {};
  const rpm = limits.requests_per_minute;
  if (isNumber(rpm)) {
    const left = doc.remaining.requests_this_minute ?? rpm;
    const reset = parseTime(doc.resets?.requests);
    const parts = [`Requests: ${formatCount(rpm)} per minute`, `${plural(left, 'request')} left`];
    if (doc.used.requests_this_minute > 0 && reset !== null) {
      parts.push(`resets at ${formatClock(reset, nowMs)}`);
    }
    lines.push({ key: 'requests', text: parts.join(' · ') });
  }
  const tpd = limits.tokens_per_day;
  const tokenReset = parseTime(doc.resets?.tokens);
  if (isNumber(tpd)) {
    const left = doc.remaining.tokens_today ?? tpd;
    const parts = [
      `Tokens: ${formatCount(doc.used.tokens_today)} of ${formatCount(tpd)} per day`,
      `${plural(left, 'token')} left`
    ];
    if (tokenReset !== null) {
      parts.push(`resets at ${formatClock(tokenReset, nowMs)} (00:00 UTC)`);
    }
    lines.push({ key: 'tokens', text: parts.join(' · ') });
  } else {
    lines.push({
      key: 'tokens',
      text: `Tokens: ${plural(doc.used.tokens_today, 'token')} today (UTC day) · no daily limit`
    });
  }
  if (isNumber(limits.max_concurrent)) {
    lines.push({
      key: 'concurrent',
      text: `At once: ${plural(limits.max_concurrent, 'request')} · ${formatCount(doc.used.concurrent)} running now`
    });
  }
  if (isNumber(limits.max_tokens_per_request)) {
    lines.push({ key: 'max_tokens', text: `Per request: at most ${plural(limits.max_tokens_per_request, 'token')}` });
  }
  if (Array.isArray(limits.allowed_models)) {
    lines.push({
      key: 'models',
      text: limits.allowed_models.length
        ? `Models: ${limits.allowed_models.join(', ')} only`
        : 'Models: none (ask an admin)'
    });
  }
  return lines;
}

/** The user's last refused request, or ''; "Refused at 23:02:55 (gemma): Rate limit reached: …". */
export function refusalText(doc: IUsageDoc, nowMs: number): string {
  const r = doc.last_refusal;
  if (!r) {
    return '';
  }
  const at = parseTime(r.at);
  return `Last refused${at !== null ? ` at ${formatClock(at, nowMs)}` : ''} (${r.model}, ${r.status}): ${r.message}`;
}

/** Whether the last refusal still holds: its retry time is ahead of the server's clock. */
export function refusalActive(doc: IUsageDoc, fetchedAtMs: number, nowMs: number): boolean {
  const retry = parseTime(doc.last_refusal?.retry_at);
  return retry !== null && retry > serverNow(doc, nowMs, fetchedAtMs);
}

/** The server's clock now: its `now` when the document was fetched, moved on by the page's clock. */
function serverNow(doc: IUsageDoc, nowMs: number, fetchedAtMs: number): number {
  const at = parseTime(doc.now);
  return at === null ? nowMs : at + (nowMs - fetchedAtMs);
}

/**
 * How long (ms) until a number in the document changes on its own: the per-minute window frees a
 * request, the UTC day ends, or the last refusal's retry time passes. Counted on the server's
 * clock (`now`), with a second of slack (the times are whole seconds). Null: nothing to wait for.
 */
export function nextRefresh(doc: IUsageDoc, fetchedAtMs: number, nowMs: number): number | null {
  const server = serverNow(doc, nowMs, fetchedAtMs);
  const moments: (number | null)[] = [parseTime(doc.resets?.tokens), parseTime(doc.last_refusal?.retry_at)];
  if (doc.used.requests_this_minute > 0) {
    moments.push(parseTime(doc.resets?.requests));
  }
  const ahead = moments.filter((t): t is number => t !== null && t > server - 1000);
  if (!ahead.length) {
    return null;
  }
  return Math.max(1000, Math.min(...ahead) - server + 1000);
}

/** One line about the user's own day, for narrow places: "1,234 tokens today · 98,766 left". */
export function ownSummary(doc: IUsageDoc): string {
  const parts = [`${plural(doc.used.tokens_today, 'token')} today`];
  const left = doc.remaining.tokens_today;
  parts.push(left !== null && left !== undefined ? `${formatCount(left)} left` : 'no daily token limit');
  const rpm = doc.remaining.requests_this_minute;
  if (rpm !== null && rpm !== undefined) {
    parts.push(`${plural(rpm, 'request')} left this minute`);
  }
  return parts.join(' · ');
}

/** Today's rows, busiest first. */
export function todayRows(doc: IUsageDoc): IUsageRow[] {
  return doc.usage.filter(r => r.day === doc.day).sort((a, b) => b.total_tokens - a.total_tokens);
}

export class UsageSection {
  readonly node: HTMLElement;
  private who: HTMLElement;
  private limits: HTMLElement;
  private refusal: HTMLElement;
  private table: HTMLElement;
  private key = '';
  private linesKey = '';

  constructor() {
    this.node = h('section', 'jp-SwapServe-section jp-SwapServe-usage');
    this.node.setAttribute('aria-label', 'Your usage and limits');
    this.node.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Usage and limits'));
    this.who = h('div', 'jp-SwapServe-usageWho');
    this.limits = h('ul', 'jp-SwapServe-usageLimits');
    this.limits.setAttribute('aria-live', 'polite');
    this.refusal = h('div', 'jp-SwapServe-usageRefusal');
    this.refusal.setAttribute('role', 'status');
    this.refusal.hidden = true;
    this.table = h('div', 'jp-SwapServe-usageTable');
    this.node.append(this.who, this.limits, this.refusal, this.table);
    this.node.hidden = true;
  }

  /** `fetchedAtMs`: when the document arrived (the page's clock), to tell how far the server's clock moved. */
  update(doc: IUsageDoc | null, nowMs: number = Date.now(), fetchedAtMs: number = nowMs): void {
    setHidden(this.node, !doc);
    if (!doc) {
      return;
    }
    setText(this.who, `Your limits (${doc.user}):`);
    const lines = limitLines(doc, nowMs);
    const linesKey = JSON.stringify(lines);
    if (linesKey !== this.linesKey) {
      this.linesKey = linesKey;
      this.limits.textContent = '';
      for (const line of lines) {
        const li = h('li', 'jp-SwapServe-usageLimit', line.text);
        li.dataset.limit = line.key;
        this.limits.appendChild(li);
      }
    }
    const refusal = refusalText(doc, nowMs);
    setHidden(this.refusal, !refusal);
    setText(this.refusal, refusal);
    setAttr(this.refusal, 'data-active', refusalActive(doc, fetchedAtMs, nowMs) ? 'true' : 'false');

    const rows = todayRows(doc);
    const key = JSON.stringify(rows);
    if (key === this.key) {
      return;
    }
    this.key = key;
    const table = h('table', '');
    const caption = h('caption', '', doc.admin ? 'Today (UTC), every user' : 'Today (UTC)');
    table.appendChild(caption);
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
      this.table.appendChild(h('p', 'jp-SwapServe-usageEmpty', 'No requests today (UTC).'));
    }
  }
}
