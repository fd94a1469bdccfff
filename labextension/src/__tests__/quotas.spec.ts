import { parseQuotaValue, probeQuotas, QuotaSection, quotaFields, quotaSectionVisible } from '../quotas';
import { status } from './fixtures';

const doc = { quotas: [{ user: 'alice', max_gib: 8, max_requests_per_hour: null, note: 'x' }] };

describe('admin quotas', () => {
  it('is absent while the quota API does not exist', async () => {
    expect(await probeQuotas(async () => ({ status: 404, body: '<html>' }))).toBeNull();
    expect(await probeQuotas(async () => ({ status: 403, body: {} }))).toBeNull();
    expect(await probeQuotas(async () => ({ status: 200, body: { nope: 1 } }))).toBeNull();
    expect(await probeQuotas(() => Promise.reject(new Error('down')))).toBeNull();
    expect(await probeQuotas(async () => ({ status: 200, body: doc }))).toEqual(doc);
  });

  it('shows only to admins', () => {
    expect(quotaSectionVisible(null, status({ user: { name: 'root', admin: true } }))).toBe(false);
    expect(quotaSectionVisible(doc, status())).toBe(false);
    expect(quotaSectionVisible(doc, status({ user: { name: 'root', admin: true } }))).toBe(true);
    expect(quotaSectionVisible({ ...doc, admin: true }, null)).toBe(true);
  });

  it('edits numeric fields', () => {
    expect(quotaFields(doc)).toEqual(['max_gib', 'max_requests_per_hour']);
    expect(parseQuotaValue('')).toBeNull();
    expect(parseQuotaValue(' 2.5 ')).toBe(2.5);
    expect(parseQuotaValue('-1')).toBeUndefined();
    expect(parseQuotaValue('lots')).toBeUndefined();
  });

  it('renders nothing in the DOM unless visible', () => {
    const section = new QuotaSection(async () => ({ status: 404, body: null }));
    section.update(null, status());
    expect(section.node.hidden).toBe(true);
    expect(section.node.querySelector('table')).toBeNull();
    section.update({ ...doc, admin: true }, status());
    expect(section.node.hidden).toBe(false);
    expect(section.node.querySelectorAll('input')).toHaveLength(2);
  });
});
