import {
  formatModelOverrides,
  parseModelList,
  parseModelOverrides,
  parseQuotaValue,
  probeQuotas,
  QuotaSection,
  quotaFields,
  quotaSectionVisible
} from '../quotas';
import { status } from './fixtures';

const FIELDS = [
  'allowed_models',
  'max_concurrent',
  'requests_per_minute',
  'tokens_per_day',
  'max_tokens_per_request',
  'priority',
  'models'
];
const row = (user: string, extra: Record<string, unknown> = {}) => ({
  user,
  allowed_models: null,
  max_concurrent: null,
  requests_per_minute: null,
  tokens_per_day: null,
  max_tokens_per_request: null,
  priority: null,
  models: {},
  ...extra
});
const doc = { admin: true, fields: FIELDS, quotas: [row('*', { tokens_per_day: 1000 }), row('alice')] };

describe('admin quotas', () => {
  it('is absent while the quota API refuses or is missing', async () => {
    expect(await probeQuotas(async () => ({ status: 404, body: '<html>' }))).toBeNull();
    expect(await probeQuotas(async () => ({ status: 403, body: {} }))).toBeNull();
    expect(await probeQuotas(async () => ({ status: 200, body: { nope: 1 } }))).toBeNull();
    expect(await probeQuotas(() => Promise.reject(new Error('down')))).toBeNull();
    expect(await probeQuotas(async () => ({ status: 200, body: doc }))).toEqual(doc);
  });

  it('shows only to admins', () => {
    expect(quotaSectionVisible(null, status({ user: { name: 'root', admin: true } }))).toBe(false);
    expect(quotaSectionVisible({ quotas: [] }, status())).toBe(false);
    expect(quotaSectionVisible({ quotas: [] }, status({ user: { name: 'root', admin: true } }))).toBe(true);
    expect(quotaSectionVisible(doc, null)).toBe(true);
  });

  it("takes the server's fields, without the per-model map", () => {
    expect(quotaFields(doc)).toEqual(FIELDS.slice(0, -1));
    expect(quotaFields({ quotas: [{ user: 'a', x: 1, y: null, note: 'n' }] })).toEqual(['x', 'y']);
  });

  it('parses numbers, model lists and per-model overrides', () => {
    expect(parseQuotaValue('')).toBeNull();
    expect(parseQuotaValue(' 2.5 ')).toBe(2.5);
    expect(parseQuotaValue('-1')).toBeUndefined();
    expect(parseQuotaValue('lots')).toBeUndefined();
    expect(parseModelList(' gemma, smollm2 ,')).toEqual(['gemma', 'smollm2']);
    expect(parseModelList('  ')).toBeNull();
    const models = { gemma: { tokens_per_day: 1000, priority: 2 }, smollm2: { max_concurrent: 1 } };
    const text = formatModelOverrides(models);
    expect(text).toBe('gemma: tokens_per_day=1000, priority=2; smollm2: max_concurrent=1');
    expect(parseModelOverrides(text)).toEqual({ ok: true, value: models });
    expect(parseModelOverrides('')).toEqual({ ok: true, value: {} });
    const bad = parseModelOverrides('gemma: tokens_per_day=many');
    expect(bad.ok).toBe(false);
    expect(parseModelOverrides('tokens_per_day=5').ok).toBe(false);
  });

  it('renders a row per user with the default first, and saves a row as the API wants it', async () => {
    const calls: Array<{ path: string; method?: string; body?: string }> = [];
    const section = new QuotaSection(async (path, init) => {
      calls.push({ path, ...init });
      return { status: 200, body: row('alice') };
    });
    let changed = 0;
    section.onChanged = () => changed++;
    section.update(null, status());
    expect(section.node.hidden).toBe(true);
    section.update(doc, status());
    expect(section.node.hidden).toBe(false);
    const rows = section.node.querySelectorAll('fieldset[data-user]');
    expect(Array.from(rows).map(r => (r as HTMLElement).dataset.user)).toEqual(['*', 'alice']);
    const alice = rows[1] as HTMLElement;
    const input = (field: string) => alice.querySelector(`input[data-field="${field}"]`) as HTMLInputElement;
    expect(input('tokens_per_day').placeholder).toBe('default');
    expect((rows[0].querySelector('input[data-field="tokens_per_day"]') as HTMLInputElement).value).toBe('1000');
    input('tokens_per_day').value = '50';
    input('allowed_models').value = 'gemma';
    input('models').value = 'gemma: priority=2';
    (alice.querySelector('button') as HTMLButtonElement).click();
    await new Promise(r => setTimeout(r, 0));
    expect(calls[0].path).toBe('quotas/alice');
    expect(calls[0].method).toBe('PUT');
    const body = JSON.parse(calls[0].body ?? '{}');
    expect(body.tokens_per_day).toBe(50);
    expect(body.allowed_models).toEqual(['gemma']);
    expect(body.models).toEqual({ gemma: { priority: 2 } });
    expect(body.max_concurrent).toBeNull();
    expect(changed).toBe(1);
  });

  it('refuses a bad value before sending, naming the field', async () => {
    const calls: string[] = [];
    const section = new QuotaSection(async path => {
      calls.push(path);
      return { status: 200, body: {} };
    });
    section.update(doc, status());
    const alice = section.node.querySelectorAll('fieldset[data-user]')[1] as HTMLElement;
    (alice.querySelector('input[data-field="max_concurrent"]') as HTMLInputElement).value = 'two';
    (alice.querySelector('button') as HTMLButtonElement).click();
    await new Promise(r => setTimeout(r, 0));
    expect(calls).toEqual([]);
    expect(section.node.querySelector('.jp-SwapServe-quotaStatus')?.textContent).toContain('max concurrent');
  });

  it("shows the server's error, and removes a user's row", async () => {
    const section = new QuotaSection(async (_path, init) =>
      init?.method === 'DELETE'
        ? { status: 200, body: { deleted: true } }
        : { status: 400, body: { error: { message: "'priority' must be greater than 0", param: 'priority' } } }
    );
    section.update(doc, status());
    const alice = section.node.querySelectorAll('fieldset[data-user]')[1] as HTMLElement;
    (alice.querySelector('button') as HTMLButtonElement).click();
    await new Promise(r => setTimeout(r, 0));
    const line = section.node.querySelector('.jp-SwapServe-quotaStatus')?.textContent ?? '';
    expect(line).toContain('400');
    expect(line).toContain('priority');
    const remove = alice.querySelectorAll('button')[1] as HTMLButtonElement;
    expect(remove.textContent).toBe('Remove');
    remove.click();
    await new Promise(r => setTimeout(r, 0));
    expect(section.node.querySelector('.jp-SwapServe-quotaStatus')?.textContent).toContain('back on the default');
  });
});
