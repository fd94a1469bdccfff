/**
 * Admin section: per-user quotas, against the server's quota API (docs/quotas.md):
 *   GET    /swapserve/api/quotas          → {"admin": true, "fields": [...], "field_info": {...}, "models": [...],
 *                                            "quotas": [{"user": "*", <field>: ..., "models": {...}}, ...]}
 *   PUT    /swapserve/api/quotas/<user>   ← {<field>: number|list|null, "models": {...}}  → the stored row
 *   DELETE /swapserve/api/quotas/<user>   → the user falls back to the default row "*"
 *   GET    /swapserve/api/users           → {"users": [names]}: whom a quota can be given to (the hub's users)
 * The section appears only for admins (GET answers 200 with admin: true, or the status says so).
 * A field left empty means "no limit" in the default row and "as the default" in a user's row; each
 * input says which (its placeholder names the value that applies), with its unit and a line of help
 * from the server's `field_info`. Each row's message sits beside the Save that caused it.
 */

import { Requester } from './client';
import { h, setAttr, setHidden, setText } from './dom';
import { errorDetail } from './state';
import { IStatus } from './types';

export const DEFAULT_USER = '*';
const LIST_FIELDS = ['allowed_models'];
const MODELS_FIELD = 'models';

export interface IQuotaEntry {
  user: string;
  models?: Record<string, Record<string, number | null>>;
  [field: string]: unknown;
}

/** What a field means (the server's `field_info`): label, unit, help, and what applies when unset. */
export interface IFieldInfo {
  label: string;
  unit: string;
  help: string;
  kind: string;
  unset: string;
  minimum?: number | null;
  maximum?: number | null;
}

export interface IQuotaDoc {
  admin?: boolean;
  fields?: string[];
  field_info?: Record<string, IFieldInfo>;
  /** the service's models: the names a row may use */
  models?: string[];
  day_starts?: string;
  quotas: IQuotaEntry[];
}

export interface IQuotaMessage {
  kind: 'ok' | 'error' | 'busy';
  text: string;
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

/** The user names an admin can pick from (the hub's users), or [] when the server cannot say. */
export async function fetchUsers(request: Requester): Promise<string[]> {
  try {
    const r = await request('users');
    const users = (r.body as { users?: unknown } | null)?.users;
    return r.status === 200 && Array.isArray(users) ? users.filter((u): u is string => typeof u === 'string') : [];
  } catch {
    return [];
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
    return doc.fields.filter(f => f !== MODELS_FIELD);
  }
  const fields: string[] = [];
  for (const q of doc.quotas) {
    for (const [k, v] of Object.entries(q)) {
      if (k !== 'user' && k !== MODELS_FIELD && (typeof v === 'number' || v === null) && !fields.includes(k)) {
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
  for (const part of text.split(/[;\n]/)) {
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

/** The field's label: the server's, else its name in words. */
export function fieldLabel(doc: IQuotaDoc, field: string): string {
  return doc.field_info?.[field]?.label ?? field.replace(/_/g, ' ');
}

function inputValue(value: unknown): string {
  if (Array.isArray(value)) {
    return value.join(', ');
  }
  return value === null || value === undefined ? '' : String(value);
}

/**
 * What an empty input means, as its placeholder: in the default row, what applies when nobody
 * sets the field ("no limit", "every model", "1"); in a user's row, the default row's value
 * ("default: 30", "default: no limit"). Never a bare value, so it is not mistaken for one.
 */
export function placeholderFor(doc: IQuotaDoc, field: string, user: string): string {
  const info = doc.field_info?.[field];
  const unset = info?.unset ?? (field === 'priority' ? '1' : LIST_FIELDS.includes(field) ? 'every model' : 'no limit');
  if (field === MODELS_FIELD) {
    return user === DEFAULT_USER ? 'none; e.g. gemma: tokens_per_day=1000' : 'none of their own; e.g. gemma: priority=2';
  }
  if (user === DEFAULT_USER) {
    return `empty: ${unset}`;
  }
  const row = doc.quotas.find(q => q.user === DEFAULT_USER);
  const value = row ? row[field] : null;
  const shown =
    value === null || value === undefined ? unset : Array.isArray(value) && !value.length ? 'no model' : inputValue(value);
  return `empty: as default (${shown})`;
}

/** The input a server's 400 names (`param`): a field, or the per-model map for "models.<model>…". */
export function fieldOfParam(param: string | null | undefined): string | null {
  if (!param) {
    return null;
  }
  return param === MODELS_FIELD || param.startsWith(`${MODELS_FIELD}.`) ? MODELS_FIELD : param;
}

type FieldInput = HTMLInputElement | HTMLTextAreaElement;

interface IRowView {
  inputs: Record<string, FieldInput>;
  status: HTMLElement;
}

export class QuotaSection {
  readonly node: HTMLElement;
  private body: HTMLElement;
  private guide: HTMLDetailsElement;
  private guideList: HTMLElement;
  private addStatus: HTMLElement;
  private addNote: HTMLElement;
  private userList: HTMLDataListElement;
  private listId = `jp-SwapServe-hubUsers-${Math.random().toString(36).slice(2, 8)}`;
  private key = '';
  private rows = new Map<string, IRowView>();
  /** each row's last message, kept across rebuilds (a save fetches the document again) */
  private messages = new Map<string, IQuotaMessage>();
  private users: string[] = [];
  /** users who have a row already: not offered again */
  private taken = new Set<string>();
  private usersAsked = false;
  /** called after a change was saved, to fetch the document again */
  onChanged: () => void = () => undefined;

  constructor(private request: Requester) {
    this.node = h('section', 'jp-SwapServe-section jp-SwapServe-quotas');
    this.node.setAttribute('aria-label', 'Quotas (admin)');
    this.node.appendChild(h('h3', 'jp-SwapServe-sectionTitle', 'Quotas (admin)'));
    this.node.appendChild(
      h(
        'p',
        'jp-SwapServe-quotaIntro',
        'The row * applies to everyone; a user\u2019s row overrides it field by field. Days are UTC days (they start at 00:00 UTC).'
      )
    );
    this.guide = h('details', 'jp-SwapServe-quotaGuide');
    this.guide.appendChild(h('summary', '', 'What each field means'));
    this.guideList = h('dl', '');
    this.guide.appendChild(this.guideList);
    this.node.appendChild(this.guide);
    this.body = h('div', 'jp-SwapServe-quotaTable');
    this.userList = h('datalist', '');
    this.userList.id = this.listId;
    const add = this.addRow();
    this.addStatus = add.status;
    this.addNote = add.note;
    this.node.append(this.body, add.row, this.userList);
    this.node.hidden = true;
  }

  update(doc: IQuotaDoc | null, status: IStatus | null): void {
    const visible = quotaSectionVisible(doc, status);
    setHidden(this.node, !visible);
    if (!visible || !doc) {
      return;
    }
    if (!this.usersAsked) {
      this.usersAsked = true;
      void this.refreshUsers();
    }
    const key = JSON.stringify([doc.quotas, doc.field_info, doc.models]);
    const active =
      this.node.contains(document.activeElement) &&
      (document.activeElement?.tagName === 'INPUT' || document.activeElement?.tagName === 'TEXTAREA');
    if (key === this.key || active) {
      return; // never rebuild under the admin's cursor
    }
    this.key = key;
    this.render(doc);
    this.taken = new Set(doc.quotas.map(q => q.user));
    this.updateUserList();
  }

  /** Ask the server again for the users to pick from (after a change, or when the section shows). */
  async refreshUsers(): Promise<void> {
    this.users = await fetchUsers(this.request);
    this.updateUserList();
  }

  /** The users an admin may pick for a new row: the server's list, less those with a row. */
  get offeredUsers(): string[] {
    return this.users.filter(u => !this.taken.has(u));
  }

  private updateUserList(): void {
    this.userList.textContent = '';
    const free = this.offeredUsers;
    for (const u of free) {
      const option = h('option', '');
      option.value = u;
      this.userList.appendChild(option);
    }
    setText(
      this.addNote,
      free.length
        ? `${free.length === 1 ? '1 hub user has' : `${free.length} hub users have`} no row yet: pick from the list or type a name.`
        : ''
    );
    setHidden(this.addNote, !free.length);
  }

  private addRow(): { row: HTMLElement; status: HTMLElement; note: HTMLElement } {
    const row = h('div', 'jp-SwapServe-quotaAdd');
    const line = h('div', 'jp-SwapServe-quotaAddLine');
    const input = h('input', 'jp-mod-styled');
    input.type = 'text';
    input.placeholder = 'user name';
    input.setAttribute('list', this.listId);
    input.setAttribute('aria-label', 'User to give a quota');
    input.autocomplete = 'off';
    const add = h('button', 'jp-SwapServe-button', 'Add user');
    add.type = 'button';
    const status = h('div', 'jp-SwapServe-quotaStatus');
    status.setAttribute('role', 'status');
    status.hidden = true;
    add.addEventListener('click', () => {
      const name = input.value.trim();
      if (!name) {
        this.show(status, { kind: 'error', text: 'Enter the user name first.' });
        input.focus();
        return;
      }
      void this.send(name, 'PUT', '{}', `Added ${name}: set their limits and save.`, status).then(ok => {
        if (ok) {
          input.value = '';
          this.messages.set(name, { kind: 'ok', text: `Added ${name}: set their limits and save.` });
          this.hide(status);
        }
      });
    });
    line.append(input, add);
    const note = h('div', 'jp-SwapServe-quotaEmpty');
    note.hidden = true;
    row.append(line, note, status);
    return { row, status, note };
  }

  private show(el: HTMLElement, message: IQuotaMessage): void {
    setHidden(el, false);
    setAttr(el, 'data-kind', message.kind);
    setText(el, message.text);
  }

  private hide(el: HTMLElement): void {
    setHidden(el, true);
    setText(el, '');
  }

  private render(doc: IQuotaDoc): void {
    // one small form per user: a sidebar is too narrow for a table of eight inputs
    const fields = quotaFields(doc);
    const list = h('div', 'jp-SwapServe-quotaList');
    this.rows.clear();
    const modelsText = doc.models && doc.models.length ? doc.models.join(', ') : null;
    this.guideList.textContent = '';
    for (const f of [...fields, MODELS_FIELD]) {
      const info = doc.field_info?.[f];
      if (info) {
        const term = h('dt', '', `${info.label} (${info.unit})`);
        term.dataset.field = f;
        this.guideList.append(term, h('dd', '', `${info.help} Empty in the * row: ${info.unset}.`));
      }
    }
    setHidden(this.guide, !this.guideList.childElementCount);
    for (const q of doc.quotas) {
      const isDefault = q.user === DEFAULT_USER;
      const row = h('fieldset', 'jp-SwapServe-quotaRow');
      row.dataset.user = q.user;
      row.appendChild(h('legend', 'jp-SwapServe-quotaUser', isDefault ? '* (everyone)' : q.user));
      const grid = h('div', 'jp-SwapServe-quotaGrid');
      const inputs: Record<string, FieldInput> = {};
      const field = (name: string, value: string, wide: boolean): FieldInput => {
        const info = doc.field_info?.[name];
        const id = `jp-SwapServe-quota-${encodeURIComponent(q.user)}-${name}`;
        const cell = h('div', `jp-SwapServe-quotaField${wide ? ' jp-mod-wide' : ''}`);
        const lab = h('label', 'jp-SwapServe-quotaLabel', fieldLabel(doc, name));
        lab.htmlFor = id;
        const input: FieldInput = name === MODELS_FIELD ? h('textarea', 'jp-mod-styled') : h('input', 'jp-mod-styled');
        if (input instanceof HTMLInputElement) {
          input.type = 'text';
          input.inputMode = wide ? 'text' : 'decimal';
        } else {
          input.rows = 2;
        }
        input.id = id;
        input.value = value;
        // what an empty field means: in a wide field its placeholder; a narrow one would cut it
        // ("empty: as de…"), so it is said in a line under the input instead
        // what an empty field means, said under it: a placeholder would be cut in a narrow input
        // ("empty: as de…") and, grey in the box, pass for a value; only the overrides' textarea,
        // which wraps, has one: an example of the syntax
        const empty = placeholderFor(doc, name, q.user);
        const emptyNote = h('span', 'jp-SwapServe-quotaEmpty', name === MODELS_FIELD ? '' : empty);
        if (name === MODELS_FIELD) {
          input.placeholder = empty;
          emptyNote.hidden = true;
        }
        input.dataset.field = name;
        input.setAttribute('aria-label', `${fieldLabel(doc, name)} of ${q.user}`);
        const help = [info?.help, name === MODELS_FIELD || LIST_FIELDS.includes(name) ? (modelsText ? `This service's models: ${modelsText}.` : '') : '']
          .filter(Boolean)
          .join(' ');
        const unit = h('span', 'jp-SwapServe-quotaUnit', info?.unit ?? '');
        setHidden(unit, !info?.unit);
        if (help) {
          const helpId = `${id}-help`;
          const helpEl = h('span', 'jp-SwapServe-quotaHelp', help);
          helpEl.id = helpId;
          input.setAttribute('aria-describedby', helpId);
          lab.title = help;
          input.title = help;
          // the model fields say their help in full (which models exist); the others in the tooltip
          // and in the section's guide, or the form would be three times as long
          setHidden(helpEl, !wide);
          cell.append(lab, unit, input, emptyNote, helpEl);
        } else {
          cell.append(lab, unit, input, emptyNote);
        }
        grid.appendChild(cell);
        return input;
      };
      for (const f of fields) {
        inputs[f] = field(f, inputValue(q[f]), LIST_FIELDS.includes(f));
      }
      inputs[MODELS_FIELD] = field(MODELS_FIELD, formatModelOverrides(q.models), true);
      row.appendChild(grid);
      const actions = h('div', 'jp-SwapServe-quotaActions');
      const save = h('button', 'jp-SwapServe-button', 'Save');
      save.type = 'button';
      save.setAttribute('aria-label', `Save the quotas of ${q.user}`);
      const status = h('div', 'jp-SwapServe-quotaStatus');
      status.setAttribute('role', 'status');
      status.hidden = true;
      const view: IRowView = { inputs, status };
      save.addEventListener('click', () => void this.save(q.user, view, doc));
      actions.appendChild(save);
      if (!isDefault) {
        const remove = h('button', 'jp-SwapServe-button', 'Remove');
        remove.type = 'button';
        remove.setAttribute('aria-label', `Remove the quotas of ${q.user} (back to the default)`);
        remove.addEventListener('click', () => {
          void this.send(q.user, 'DELETE', undefined, `${q.user} is back on the default quota.`, status).then(ok => {
            if (ok) {
              this.messages.delete(q.user);
              this.show(this.addStatus, { kind: 'ok', text: `${q.user} is back on the default quota.` });
            }
          });
        });
        actions.appendChild(remove);
      }
      // the message beside the button it answers
      actions.appendChild(status);
      row.appendChild(actions);
      const kept = this.messages.get(q.user);
      if (kept) {
        this.show(status, kept);
      }
      this.rows.set(q.user, view);
      list.appendChild(row);
    }
    this.body.textContent = '';
    this.body.appendChild(list);
  }

  /** The PUT body from the row's inputs, or a message naming the bad field. */
  static rowBody(
    inputs: Record<string, FieldInput>,
    doc: IQuotaDoc | null = null
  ): { ok: true; body: Record<string, unknown> } | { ok: false; error: string; input: FieldInput } {
    const body: Record<string, unknown> = {};
    const label = (f: string) => (doc ? fieldLabel(doc, f) : f.replace(/_/g, ' '));
    for (const [f, input] of Object.entries(inputs)) {
      if (f === MODELS_FIELD) {
        const parsed = parseModelOverrides(input.value);
        if (!parsed.ok) {
          return { ok: false, error: `${label(f)}: ${parsed.error}`, input };
        }
        body[f] = parsed.value;
        continue;
      }
      if (LIST_FIELDS.includes(f)) {
        body[f] = parseModelList(input.value);
        continue;
      }
      const v = parseQuotaValue(input.value);
      if (v === undefined) {
        return { ok: false, error: `${label(f)}: enter a number ≥ 0, or leave it empty.`, input };
      }
      body[f] = v;
    }
    return { ok: true, body };
  }

  private async save(user: string, row: IRowView, doc: IQuotaDoc): Promise<void> {
    const parsed = QuotaSection.rowBody(row.inputs, doc);
    if (!parsed.ok) {
      this.show(row.status, { kind: 'error', text: `Not saved: ${parsed.error}` });
      parsed.input.focus();
      return;
    }
    this.show(row.status, { kind: 'busy', text: 'Saving…' });
    const ok = await this.send(user, 'PUT', JSON.stringify(parsed.body), `Saved the quotas of ${user}.`, row.status, row);
    if (ok) {
      this.messages.set(user, { kind: 'ok', text: `Saved the quotas of ${user}.` });
    }
  }

  private async send(
    user: string,
    method: string,
    body: string | undefined,
    done: string,
    status: HTMLElement,
    row?: IRowView
  ): Promise<boolean> {
    const r = await this.request(`quotas/${encodeURIComponent(user)}`, { method, body });
    const ok = r.status === 200;
    if (ok) {
      this.show(status, { kind: 'ok', text: done });
      this.key = ''; // show what the server stored
      this.onChanged();
      void this.refreshUsers();
    } else {
      const message: IQuotaMessage = {
        kind: 'error',
        text: `Not saved (${r.status}): ${errorDetail(r.body) || 'the server refused the change.'}`
      };
      this.show(status, message);
      this.messages.set(user, message);
      const param = (r.body as { error?: { param?: string | null } } | null)?.error?.param;
      const field = fieldOfParam(param);
      const input = field && row ? row.inputs[field] : undefined;
      if (input) {
        input.setAttribute('aria-invalid', 'true');
        input.focus();
        input.addEventListener('input', () => input.removeAttribute('aria-invalid'), { once: true });
      }
    }
    return ok;
  }
}
