/**
 * Admin section: per-user quotas, against the server's quota API (docs/quotas.md):
 *   GET    /swapserve/api/quotas          → {"admin": true, "fields": [...], "quotas": [{"user": "*", <field>: ..., "models": {...}}, ...]}
 *   PUT    /swapserve/api/quotas/<user>   ← {<field>: number|list|null, "models": {...}}  → the stored row
 *   DELETE /swapserve/api/quotas/<user>   → the user falls back to the default row "*"
 * The section appears only for admins (GET answers 200 with admin: true, or the status says so).
 * A field left empty means "no limit" in the default row and "as the default" in a user's row.
 */

import { Requester } from './client';
import { h, setHidden, setText } from './dom';
import { errorDetail } from './state';
import { IStatus } from './types';

export const DEFAULT_USER = '*';
const LIST_FIELDS = ['allowed_models'];

export interface IQuotaEntry {
  user: string;
  models?: Record<string, Record<string, number | null>>;
  [field: string]: unknown;
}

export interface IQuotaDoc {
  admin?: boolean;
  fields?: string[];
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

/** Editable scalar fields: the server's list (without `models`), else numeric/null values in first-seen order. */
export function quotaFields(doc: IQuotaDoc): string[] {
  if (Array.isArray(doc.fields)) {
    return doc.fields.filter(f => f !== 'models');
  }
  const fields: string[] = [];
  for (const q of doc.quotas) {
    for (const [k, v] of Object.entries(q)) {
      if (k !== 'user' && k !== 'models' && (typeof v === 'number' || v === null) && !fields.includes(k)) {
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

/** A comma-separated list of model names: '' → null (every model). */
export function parseModelList(text: string): string[] | null {
  const names = text
    .split(',')
    .map(s => s.trim())
    .filter(s => s.length > 0);
  return names.length ? names : null;
}

/** Per-model overrides as compact text: `gemma: tokens_per_day=1000, priority=2; smollm2: ...`. */
export function formatModelOverrides(models: IQuotaEntry['models']): string {
  if (!models) {
    return '';
  }
  return Object.entries(models)
    .map(([model, fields]) => {
      const parts = Object.entries(fields)
        .filter(([, v]) => v !== null && v !== undefined)
        .map(([k, v]) => `${k}=${v}`);
      return `${model}: ${parts.join(', ')}`;
    })
    .join('; ');
}

/** Parses the compact text back; an error message naming the bad part, or the object. */
export function parseModelOverrides(
  text: string
): { ok: true; value: Record<string, Record<string, number | null>> } | { ok: false; error: string } {
  const value: Record<string, Record<string, number | null>> = {};
  for (const part of text.split(';')) {
    const t = part.trim();
    if (!t) {
      continue;
    }
    const colon = t.indexOf(':');
    const model = colon > 0 ? t.slice(0, colon).trim() : '';
    if (!model) {
      return { ok: false, error: `"${t}": write model: field=value, field=value` };
    }
    const fields: Record<string, number | null> = {};
    for (const pair of t.slice(colon + 1).split(',')) {
      const p = pair.trim();
      if (!p) {
        continue;
      }
      const [k, v] = p.split('=').map(s => s.trim());
      const n = parseQuotaValue(v ?? '');
      if (!k || v === undefined || n === undefined) {
        return { ok: false, error: `"${p}" for ${model}: write field=number` };
      }
      fields[k] = n;
    }
    value[model] = fields;
  }
  return { ok: true, value };
}

function label(field: string): string {
  return field.replace(/_/g, ' ');
}

function inputValue(value: unknown): string {
  if (Array.isArray(value)) {
    return value.join(', ');
  }
  return value === null || value === undefined ? '' : String(value);
}

export class QuotaSection {
  readonly node: HTMLElement;
  private body: HTMLElement;
  private status: HTMLElement;
  private key = '';
  /** called after a change was saved, to fetch the document again */
  onChanged: () => void = () => undefined;

  constructor(private request: Requester) {
    this.node = h('section', 'jp-SwapServe-section jp-SwapServe-quotas');
    this.node.setAttribute('aria-label', 'Quotas (admin)');
    this.node.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Quotas (admin)'));
    this.body = h('div', 'jp-SwapServe-quotaTable');
    this.status = h('div', 'jp-SwapServe-quotaStatus');
    this.status.setAttribute('role', 'status');
    this.node.append(this.body, this.status, this.addRow());
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

  private addRow(): HTMLElement {
    const row = h('div', 'jp-SwapServe-quotaAdd');
    const input = h('input', 'jp-mod-styled');
    input.type = 'text';
    input.placeholder = 'user name';
    input.setAttribute('aria-label', 'User to give a quota');
    const add = h('button', 'jp-SwapServe-button', 'Add user');
    add.type = 'button';
    add.addEventListener('click', () => {
      const name = input.value.trim();
      if (!name) {
        setText(this.status, 'Enter the user name first.');
        input.focus();
        return;
      }
      void this.send(name, 'PUT', '{}', `Added ${name}: edit the row and save.`).then(ok => {
        if (ok) {
          input.value = '';
        }
      });
    });
    row.append(input, add);
    return row;
  }

  private render(doc: IQuotaDoc): void {
    // one small form per user: a sidebar is too narrow for a table of seven inputs
    const fields = quotaFields(doc);
    const list = h('div', 'jp-SwapServe-quotaList');
    for (const q of doc.quotas) {
      const isDefault = q.user === DEFAULT_USER;
      const row = h('fieldset', 'jp-SwapServe-quotaRow');
      row.dataset.user = q.user;
      row.appendChild(h('legend', 'jp-SwapServe-quotaUser', isDefault ? '* (everyone)' : q.user));
      const grid = h('div', 'jp-SwapServe-quotaGrid');
      const inputs: Record<string, HTMLInputElement> = {};
      const field = (name: string, value: string, placeholder: string): HTMLInputElement => {
        const id = `jp-SwapServe-quota-${encodeURIComponent(q.user)}-${name}`;
        const lab = h('label', 'jp-SwapServe-quotaLabel', label(name));
        lab.htmlFor = id;
        const input = h('input', 'jp-mod-styled');
        input.id = id;
        input.type = 'text';
        input.value = value;
        input.placeholder = placeholder;
        input.dataset.field = name;
        input.setAttribute('aria-label', `${label(name)} of ${q.user}`);
        grid.append(lab, input);
        return input;
      };
      for (const f of fields) {
        const isList = LIST_FIELDS.includes(f);
        const none = f === 'priority' ? '1' : isList ? 'all models' : 'no limit';
        const input = field(f, inputValue(q[f]), isDefault ? none : 'default');
        input.inputMode = isList ? 'text' : 'decimal';
        inputs[f] = input;
      }
      const models = field('models', formatModelOverrides(q.models), 'gemma: tokens_per_day=1000');
      models.setAttribute('aria-label', `per-model quotas of ${q.user}`);
      row.appendChild(grid);
      const actions = h('div', 'jp-SwapServe-quotaActions');
      const save = h('button', 'jp-SwapServe-button', 'Save');
      save.type = 'button';
      save.setAttribute('aria-label', `Save the quotas of ${q.user}`);
      save.addEventListener('click', () => void this.save(q.user, inputs, models));
      actions.appendChild(save);
      if (!isDefault) {
        const remove = h('button', 'jp-SwapServe-button', 'Remove');
        remove.type = 'button';
        remove.setAttribute('aria-label', `Remove the quotas of ${q.user} (back to the default)`);
        remove.addEventListener(
          'click',
          () => void this.send(q.user, 'DELETE', undefined, `${q.user} is back on the default quota.`)
        );
        actions.appendChild(remove);
      }
      row.appendChild(actions);
      list.appendChild(row);
    }
    this.body.textContent = '';
    this.body.appendChild(list);
  }

  /** The PUT body from the row's inputs, or a message naming the bad field. */
  static rowBody(
    inputs: Record<string, HTMLInputElement>,
    models: HTMLInputElement
  ): { ok: true; body: Record<string, unknown> } | { ok: false; error: string; input: HTMLInputElement } {
    const body: Record<string, unknown> = {};
    for (const [f, input] of Object.entries(inputs)) {
      if (LIST_FIELDS.includes(f)) {
        body[f] = parseModelList(input.value);
        continue;
      }
      const v = parseQuotaValue(input.value);
      if (v === undefined) {
        return { ok: false, error: `${label(f)}: enter a number ≥ 0, or nothing.`, input };
      }
      body[f] = v;
    }
    const parsed = parseModelOverrides(models.value);
    if (!parsed.ok) {
      return { ok: false, error: `per model: ${parsed.error}`, input: models };
    }
    body.models = parsed.value;
    return { ok: true, body };
  }

  private async save(user: string, inputs: Record<string, HTMLInputElement>, models: HTMLInputElement): Promise<void> {
    const row = QuotaSection.rowBody(inputs, models);
    if (!row.ok) {
      setText(this.status, `${user}: ${row.error}`);
      row.input.focus();
      return;
    }
    setText(this.status, `Saving the quotas of ${user}…`);
    await this.send(user, 'PUT', JSON.stringify(row.body), `Saved the quotas of ${user}.`);
  }

  private async send(user: string, method: string, body: string | undefined, done: string): Promise<boolean> {
    const r = await this.request(`quotas/${encodeURIComponent(user)}`, { method, body });
    const ok = r.status === 200;
    setText(this.status, ok ? done : `Could not save (${r.status}): ${errorDetail(r.body) || 'error'}`);
    if (ok) {
      this.key = ''; // show what the server stored
      this.onChanged();
    }
    return ok;
  }
}
