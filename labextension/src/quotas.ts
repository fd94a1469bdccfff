/**
 * Admin section: per-user quotas. The server has no quota API yet, so this section stays absent:
 * it appears only when GET /swapserve/api/quotas answers 200 AND the user is an admin (the status'
 * `user.admin`, or `admin: true` in the quotas document). Nothing is shown or faked otherwise.
 *
 * Expected contract (to be confirmed by the server side when it lands):
 *   GET  /swapserve/api/quotas          → {"admin"?: bool, "quotas": [{"user": str, <field>: number|null, ...}]}
 *   PUT  /swapserve/api/quotas/<user>   ← {<field>: number|null, ...}  → the updated entry
 */

import { Requester } from './client';
import { h, setHidden, setText } from './dom';
import { errorDetail } from './state';
import { IStatus } from './types';

export interface IQuotaEntry {
  user: string;
  [field: string]: unknown;
}

export interface IQuotaDoc {
  admin?: boolean;
  quotas: IQuotaEntry[];
}

export function isQuotaDoc(doc: unknown): doc is IQuotaDoc {
  const d = doc as IQuotaDoc;
  return !!d && typeof d === 'object' && Array.isArray(d.quotas) && d.quotas.every(q => q && typeof q.user === 'string');
}

/** The quota document, or null when the API is absent (404, …), refused (403) or malformed. */
export async function probeQuotas(request: Requester): Promise<IQuotaDoc | null> {
  try {
    const r = await request('quotas');
    return r.status === 200 && isQuotaDoc(r.body) ? r.body : null;
  } catch {
    return null;
  }
}

export function quotaSectionVisible(doc: IQuotaDoc | null, status: IStatus | null): boolean {
  if (!doc) {
    return false;
  }
  return doc.admin === true || status?.user?.admin === true;
}

/** Editable fields: numeric (or null) values, in first-seen order. */
export function quotaFields(doc: IQuotaDoc): string[] {
  const fields: string[] = [];
  for (const q of doc.quotas) {
    for (const [k, v] of Object.entries(q)) {
      if (k !== 'user' && (typeof v === 'number' || v === null) && !fields.includes(k)) {
        fields.push(k);
      }
    }
  }
  return fields;
}

/** Parses an input's text: '' → null (no limit), else a non-negative number; undefined if invalid. */
export function parseQuotaValue(text: string): number | null | undefined {
  const t = text.trim();
  if (t === '') {
    return null;
  }
  const n = Number(t);
  return isFinite(n) && n >= 0 ? n : undefined;
}

export class QuotaSection {
  readonly node: HTMLElement;
  private body: HTMLElement;
  private status: HTMLElement;
  private key = '';

  constructor(private request: Requester) {
    this.node = h('section', 'jp-SwapServe-section jp-SwapServe-quotas');
    this.node.setAttribute('aria-label', 'Quotas (admin)');
    this.node.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Quotas (admin)'));
    this.body = h('div', 'jp-SwapServe-quotaTable');
    this.status = h('div', 'jp-SwapServe-quotaStatus');
    this.status.setAttribute('role', 'status');
    this.node.append(this.body, this.status);
    this.node.hidden = true;
  }

  update(doc: IQuotaDoc | null, status: IStatus | null): void {
    const visible = quotaSectionVisible(doc, status);
    setHidden(this.node, !visible);
    if (!visible || !doc) {
      return;
    }
    const key = JSON.stringify(doc.quotas);
    const active = this.node.contains(document.activeElement) && document.activeElement?.tagName === 'INPUT';
    if (key === this.key || active) {
      return; // never rebuild under the admin's cursor
    }
    this.key = key;
    this.render(doc);
  }

  private render(doc: IQuotaDoc): void {
    const fields = quotaFields(doc);
    const table = h('table', '');
    const head = h('tr', '');
    head.appendChild(h('th', '', 'User'));
    fields.forEach(f => head.appendChild(h('th', '', f.replace(/_/g, ' '))));
    head.appendChild(h('th', '', ''));
    table.appendChild(head);
    for (const q of doc.quotas) {
      const tr = h('tr', '');
      tr.appendChild(h('td', '', q.user));
      const inputs: Record<string, HTMLInputElement> = {};
      for (const f of fields) {
        const td = h('td', '');
        const input = h('input', 'jp-mod-styled');
        input.type = 'text';
        input.inputMode = 'decimal';
        input.value = q[f] === null || q[f] === undefined ? '' : String(q[f]);
        input.placeholder = 'no limit';
        input.setAttribute('aria-label', `${f.replace(/_/g, ' ')} of ${q.user}`);
        inputs[f] = input;
        td.appendChild(input);
        tr.appendChild(td);
      }
      const td = h('td', '');
      const save = h('button', 'jp-SwapServe-button', 'Save');
      save.type = 'button';
      save.setAttribute('aria-label', `Save the quotas of ${q.user}`);
      save.addEventListener('click', () => void this.save(q.user, inputs));
      td.appendChild(save);
      tr.appendChild(td);
      table.appendChild(tr);
    }
    this.body.textContent = '';
    this.body.appendChild(table);
  }

  private async save(user: string, inputs: Record<string, HTMLInputElement>): Promise<void> {
    const body: Record<string, number | null> = {};
    for (const [f, input] of Object.entries(inputs)) {
      const v = parseQuotaValue(input.value);
      if (v === undefined) {
        setText(this.status, `${f.replace(/_/g, ' ')} of ${user}: enter a number ≥ 0, or nothing for no limit.`);
        input.focus();
        return;
      }
      body[f] = v;
    }
    setText(this.status, `Saving the quotas of ${user}…`);
    const r = await this.request(`quotas/${encodeURIComponent(user)}`, { method: 'PUT', body: JSON.stringify(body) });
    setText(
      this.status,
      r.status === 200 ? `Saved the quotas of ${user}.` : `Could not save (${r.status}): ${errorDetail(r.body) || 'error'}`
    );
  }
}
