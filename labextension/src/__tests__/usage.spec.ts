import { fetchUsage, IUsageDoc, ownSummary, todayRows, UsageSection } from '../usage';

const usage = (extra: Partial<IUsageDoc> = {}): IUsageDoc => ({
  user: 'alice',
  admin: false,
  day: '2026-11-25',
  usage: [
    { user: 'alice', model: 'gemma', day: '2026-11-25', requests: 2, prompt_tokens: 10, completion_tokens: 5, total_tokens: 15 },
    { user: 'alice', model: 'smollm2', day: '2026-11-25', requests: 1, prompt_tokens: 1200, completion_tokens: 30, total_tokens: 1230 },
    { user: 'alice', model: 'gemma', day: '2026-11-24', requests: 9, prompt_tokens: 9, completion_tokens: 9, total_tokens: 18 }
  ],
  limits: { tokens_per_day: 2000 },
  used: { tokens_today: 1245, requests_this_minute: 1, concurrent: 0 },
  remaining: { tokens_today: 755, requests_this_minute: null, concurrent: null },
  resets: { tokens: '2026-11-26T00:00:00Z', requests: '2026-11-25T10:00:00Z' },
  ...extra
});

describe('usage', () => {
  it('fetches only a well-formed document', async () => {
    expect(await fetchUsage(async () => ({ status: 404, body: null }))).toBeNull();
    expect(await fetchUsage(async () => ({ status: 200, body: { user: 'x' } }))).toBeNull();
    expect(await fetchUsage(async () => ({ status: 200, body: usage() }))).toEqual(usage());
  });

  it("summarises the user's day and what remains", () => {
    expect(ownSummary(usage())).toBe('1,245 tokens today · 755 left (resets 2026-11-26 00:00:00 UTC)');
    expect(ownSummary(usage({ remaining: { tokens_today: null, requests_this_minute: 3, concurrent: null } }))).toBe(
      '1,245 tokens today · no daily token limit · 3 requests left this minute'
    );
  });

  it("lists today's rows, busiest first", () => {
    const section = new UsageSection();
    section.update(null);
    expect(section.node.hidden).toBe(true);
    expect(todayRows(usage()).map(r => r.model)).toEqual(['smollm2', 'gemma']);
    section.update(usage());
    expect(section.node.hidden).toBe(false);
    const rows = section.node.querySelectorAll('tr[data-user]');
    expect(rows).toHaveLength(2);
    expect(rows[0].querySelector('.jp-SwapServe-usageTokens')?.textContent).toBe('1,230 (1,200 + 30)');
    section.update(usage({ usage: [] }));
    expect(section.node.textContent).toContain('No requests today.');
  });
});
