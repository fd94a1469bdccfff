import {
  fetchUsers,
  fieldOfParam,
  formatModelOverrides,
  parseModelList,
  parseModelOverrides,
  parseQuotaValue,
  placeholderFor,
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
const info = (label: string, unit: string, help: string, unset = 'no limit') => ({ label, unit, help, kind: 'integer', unset });
const INFO = {
  allowed_models: info('Allowed models', 'model names', 'The models the user may call; empty: every model.', 'every model'),
  max_concurrent: info('Concurrent requests', 'requests at once', 'Requests queued or running at the same time.'),
  requests_per_minute: info('Requests per minute', 'per minute', 'Requests admitted in any 60 seconds.'),
  tokens_per_day: info('Tokens per day', 'tokens per UTC day', 'Prompt + completion tokens per day; the day starts at 00:00 UTC.'),
  max_tokens_per_request: info('Max tokens per request', 'tokens', 'The largest max_tokens a request may ask for.'),
  priority: info('Priority', 'weight', 'Share of the queue against other users.', '1'),
  models: info('Per model', 'model: field=value, …', 'Extra limits on one model.', 'none')
};

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
      return { status: 200, body: path === 'users' ? { users: [] } : row('alice') };
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
    const input = (field: string) => alice.querySelector(`[data-field="${field}"]`) as HTMLInputElement;
    // an empty field says what applies: the default row's value, never a bare value
    const empty = (field: string) =>
      input(field).closest('.jp-SwapServe-quotaField')!.querySelector('.jp-SwapServe-quotaEmpty')!.textContent;
    expect(empty('tokens_per_day')).toBe('empty: as default (1000)');
    expect(empty('max_concurrent')).toBe('empty: as default (no limit)');
    expect(input('tokens_per_day').placeholder).toBe(''); // an input would cut it off
    expect(empty('allowed_models')).toBe('empty: as default (every model)');
    expect((rows[0].querySelector('[data-field="tokens_per_day"]') as HTMLInputElement).value).toBe('1000');
    input('tokens_per_day').value = '50';
    input('allowed_models').value = 'gemma';
    input('models').value = 'gemma: priority=2';
    (alice.querySelector('button') as HTMLButtonElement).click();
    await new Promise(r => setTimeout(r, 0));
    const put = calls.find(c => c.method === 'PUT')!;
    expect(put.path).toBe('quotas/alice');
    const body = JSON.parse(put.body ?? '{}');
    expect(body.tokens_per_day).toBe(50);
    expect(body.allowed_models).toEqual(['gemma']);
    expect(body.models).toEqual({ gemma: { priority: 2 } });
    expect(body.max_concurrent).toBeNull();
    expect(changed).toBe(1);
    // the answer sits beside the Save it answers, marked as a success
    const line = alice.querySelector<HTMLElement>('.jp-SwapServe-quotaActions .jp-SwapServe-quotaStatus')!;
    expect(line.textContent).toBe('Saved the quotas of alice.');
    expect(line.dataset.kind).toBe('ok');
    expect((rows[0].querySelector('.jp-SwapServe-quotaStatus') as HTMLElement).hidden).toBe(true);
  });

  it("explains each field from the server's field_info: label, unit, help, the default", () => {
    const section = new QuotaSection(async () => ({ status: 200, body: { users: [] } }));
    section.update({ ...doc, field_info: INFO, models: ['gemma', 'smollm2'] }, status());
    const star = section.node.querySelector('fieldset[data-user="*"]') as HTMLElement;
    const cell = (field: string) => star.querySelector(`[data-field="${field}"]`)!.closest('.jp-SwapServe-quotaField') as HTMLElement;
    expect(cell('tokens_per_day').querySelector('label')!.textContent).toBe('Tokens per day');
    expect(cell('tokens_per_day').querySelector('.jp-SwapServe-quotaUnit')!.textContent).toBe('tokens per UTC day');
    expect(cell('tokens_per_day').querySelector('label')!.title).toContain('00:00 UTC');
    const guide = section.node.querySelector('.jp-SwapServe-quotaGuide')!;
    expect(guide.querySelector('dt[data-field="tokens_per_day"]')!.textContent).toBe('Tokens per day (tokens per UTC day)');
    expect(guide.querySelector('dt[data-field="tokens_per_day"] + dd')!.textContent).toBe(
      'Prompt + completion tokens per day; the day starts at 00:00 UTC. Empty in the * row: no limit.'
    );
    expect(cell('max_concurrent').querySelector('.jp-SwapServe-quotaEmpty')!.textContent).toBe('empty: no limit');
    expect(cell('priority').querySelector('.jp-SwapServe-quotaEmpty')!.textContent).toBe('empty: 1');
    // the model fields are wide, name the service's models, and the overrides are a textarea
    expect(cell('allowed_models').classList.contains('jp-mod-wide')).toBe(true);
    expect(cell('allowed_models').textContent).toContain("This service's models: gemma, smollm2.");
    expect(star.querySelector('[data-field="models"]')!.tagName).toBe('TEXTAREA');
    expect(section.node.textContent).toContain('Days are UTC days');
  });

  it("offers the hub's users that have no row yet", async () => {
    const section = new QuotaSection(async path =>
      path === 'users' ? { status: 200, body: { users: ['alice', 'bob', 'carol'] } } : { status: 200, body: {} }
    );
    section.update(doc, status());
    await new Promise(r => setTimeout(r, 0));
    expect(section.offeredUsers).toEqual(['bob', 'carol']); // alice has a row
    const options = [...section.node.querySelectorAll('datalist option')].map(o => (o as HTMLOptionElement).value);
    expect(options).toEqual(['bob', 'carol']);
    const add = section.node.querySelector<HTMLInputElement>('[aria-label="User to give a quota"]')!;
    expect(add.getAttribute('list')).toBe(section.node.querySelector('datalist')!.id);
    expect(section.node.querySelector('.jp-SwapServe-quotaAdd .jp-SwapServe-quotaEmpty')!.textContent).toBe(
      '2 hub users have no row yet: pick from the list or type a name.'
    );
    expect(await fetchUsers(async () => ({ status: 403, body: {} }))).toEqual([]);
  });

  it('refuses a bad value before sending, naming the field, beside its Save', async () => {
    const calls: string[] = [];
    const section = new QuotaSection(async path => {
      calls.push(path);
      return { status: 200, body: {} };
    });
    section.update(doc, status());
    const alice = section.node.querySelectorAll('fieldset[data-user]')[1] as HTMLElement;
    (alice.querySelector('[data-field="max_concurrent"]') as HTMLInputElement).value = 'two';
    (alice.querySelector('button') as HTMLButtonElement).click();
    await new Promise(r => setTimeout(r, 0));
    expect(calls.filter(c => c !== 'users')).toEqual([]);
    const line = alice.querySelector<HTMLElement>('.jp-SwapServe-quotaStatus')!;
    expect(line.textContent).toBe('Not saved: max concurrent: enter a number ≥ 0, or leave it empty.');
    expect(line.dataset.kind).toBe('error');
  });

  it("shows the server's error at the field it names, and removes a user's row", async () => {
    const section = new QuotaSection(async (path, init) =>
      path === 'users'
        ? { status: 200, body: { users: [] } }
        : init?.method === 'DELETE'
          ? { status: 200, body: { deleted: true } }
          : {
              status: 400,
              body: {
                error: {
                  message: "'models.nosuchmodel' is not a model of this service (models: gemma, smollm2).",
                  param: 'models.nosuchmodel'
                }
              }
            }
    );
    section.update(doc, status());
    const alice = section.node.querySelectorAll('fieldset[data-user]')[1] as HTMLElement;
    const models = alice.querySelector('[data-field="models"]') as HTMLTextAreaElement;
    models.value = 'nosuchmodel: tokens_per_day=5';
    (alice.querySelector('button') as HTMLButtonElement).click();
    await new Promise(r => setTimeout(r, 0));
    const line = alice.querySelector<HTMLElement>('.jp-SwapServe-quotaStatus')!;
    expect(line.textContent).toBe(
      "Not saved (400): 'models.nosuchmodel' is not a model of this service (models: gemma, smollm2)."
    );
    expect(line.dataset.kind).toBe('error');
    expect(models.getAttribute('aria-invalid')).toBe('true');
    expect(document.activeElement === models || !document.body.contains(models)).toBe(true);
    const remove = alice.querySelectorAll('button')[1] as HTMLButtonElement;
    expect(remove.textContent).toBe('Remove');
    remove.click();
    await new Promise(r => setTimeout(r, 0));
    expect(section.node.querySelector('.jp-SwapServe-quotaAdd .jp-SwapServe-quotaStatus')?.textContent).toContain(
      'back on the default'
    );
  });

  it('maps a parameter to its input', () => {
    expect(fieldOfParam('models.gemma.priority')).toBe('models');
    expect(fieldOfParam('allowed_models')).toBe('allowed_models');
    expect(fieldOfParam(null)).toBeNull();
    expect(placeholderFor({ quotas: [row('*', { allowed_models: [] })] }, 'allowed_models', 'bob')).toBe(
      'empty: as default (no model)'
    );
  });
});
