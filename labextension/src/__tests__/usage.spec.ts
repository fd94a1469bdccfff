import { fetchUsage, IUsageDoc, limitLines, nextRefresh, ownSummary, refusalActive, refusalText, todayRows, UsageSection } from '../usage';

// the tests run in UTC (jest.config.js): the page's clock shows UTC times
const NOW = Date.parse('2026-11-25T23:02:55Z');

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
  resets: { tokens: '2026-11-26T00:00:00Z', requests: '2026-11-25T23:03:54Z' },
  now: '2026-11-25T23:02:55Z',
  last_refusal: null,
  ...extra
});

/** Bob after his second request of a minute limited to one. */
const refused = (): IUsageDoc =>
  usage({
    user: 'bob',
    limits: { requests_per_minute: 1 },
    used: { tokens_today: 12, requests_this_minute: 1, concurrent: 0 },
    remaining: { tokens_today: null, requests_this_minute: 0, concurrent: null },
    last_refusal: {
      at: '2026-11-25T23:02:55Z',
      model: 'gemma',
      status: 429,
      code: 'rate_limit_exceeded',
      message: 'Rate limit reached: 1 request per minute; it resets at 2026-11-25T23:03:54Z.',
      retry_at: '2026-11-25T23:03:54Z'
    }
  });

describe('usage', () => {
  it('fetches only a well-formed document', async () => {
    expect(await fetchUsage(async () => ({ status: 404, body: null }))).toBeNull();
    expect(await fetchUsage(async () => ({ status: 200, body: { user: 'x' } }))).toBeNull();
    expect(await fetchUsage(async () => ({ status: 200, body: usage() }))).toEqual(usage());
  });

  it('says each limit, what is left and when it resets, in the singular where it is one', () => {
    expect(limitLines(refused(), NOW).map(l => l.text)).toEqual([
      'Requests: 1 per minute · 0 requests left · resets at 23:03:54',
      'Tokens: 12 tokens today (UTC day) · no daily limit'
    ]);
    const one = usage({
      limits: { requests_per_minute: 2, tokens_per_day: 2000, max_concurrent: 1, max_tokens_per_request: 1, allowed_models: ['smollm2'] },
      remaining: { tokens_today: 755, requests_this_minute: 1, concurrent: 1 }
    });
    expect(limitLines(one, NOW).map(l => l.text)).toEqual([
      'Requests: 2 per minute · 1 request left · resets at 23:03:54',
      'Tokens: 1,245 of 2,000 per day · 755 tokens left · resets at 2026-11-26 00:00:00 (00:00 UTC)',
      'At once: 1 request · 0 running now',
      'Per request: at most 1 token',
      'Models: smollm2 only'
    ]);
    // nothing used this minute: nothing to reset
    const fresh = usage({
      limits: { requests_per_minute: 1 },
      used: { tokens_today: 0, requests_this_minute: 0, concurrent: 0 },
      remaining: { tokens_today: null, requests_this_minute: 1, concurrent: null }
    });
    expect(limitLines(fresh, NOW)[0].text).toBe('Requests: 1 per minute · 1 request left');
  });

  it('shows the last refusal, active until its retry time', () => {
    expect(refusalText(usage(), NOW)).toBe('');
    expect(refusalText(refused(), NOW)).toBe(
      'Last refused at 23:02:55 (gemma, 429): Rate limit reached: 1 request per minute; it resets at 2026-11-25T23:03:54Z.'
    );
    expect(refusalActive(refused(), NOW, NOW)).toBe(true);
    expect(refusalActive(refused(), NOW, NOW + 60_000)).toBe(false);
  });

  it('refreshes when the next number changes by itself, on the server clock', () => {
    // the window frees a request at 23:03:54: 59 s after the server's now, plus a second of slack
    expect(nextRefresh(refused(), NOW, NOW)).toBe(60_000);
    // ten seconds later on the page, ten seconds less to wait
    expect(nextRefresh(refused(), NOW, NOW + 10_000)).toBe(50_000);
    // the page's clock five minutes off: still timed by the server's clock
    expect(nextRefresh({ ...refused(), now: '2026-11-25T22:57:55Z' }, NOW, NOW)).toBe(360_000);
    // nothing used this minute: the next change is the UTC day's end
    const quiet = usage({ used: { tokens_today: 0, requests_this_minute: 0, concurrent: 0 } });
    expect(nextRefresh(quiet, NOW, NOW)).toBe(Date.parse('2026-11-26T00:00:00Z') - NOW + 1000);
    // never a busy loop, even when a reset is just past
    expect(nextRefresh(refused(), NOW, NOW + 59_500)).toBe(1000);
  });

  it('summarises the day in one line', () => {
    expect(ownSummary(usage())).toBe('1,245 tokens today · 755 left');
    expect(ownSummary(usage({ remaining: { tokens_today: null, requests_this_minute: 1, concurrent: null } }))).toBe(
      '1,245 tokens today · no daily token limit · 1 request left this minute'
    );
  });

  it("lists today's rows, busiest first, and the user's limits", () => {
    const section = new UsageSection();
    section.update(null);
    expect(section.node.hidden).toBe(true);
    expect(todayRows(usage()).map(r => r.model)).toEqual(['smollm2', 'gemma']);
    section.update(usage(), NOW, NOW);
    expect(section.node.hidden).toBe(false);
    const rows = section.node.querySelectorAll('tr[data-user]');
    expect(rows).toHaveLength(2);
    expect(rows[0].querySelector('.jp-SwapServe-usageTokens')?.textContent).toBe('1,230 (1,200 + 30)');
    expect(section.node.querySelector<HTMLElement>('.jp-SwapServe-usageRefusal')!.hidden).toBe(true);
    section.update(refused(), NOW, NOW);
    const refusal = section.node.querySelector<HTMLElement>('.jp-SwapServe-usageRefusal')!;
    expect(refusal.hidden).toBe(false);
    expect(refusal.dataset.active).toBe('true');
    expect(section.node.querySelector('[data-limit="requests"]')?.textContent).toBe(
      'Requests: 1 per minute · 0 requests left · resets at 23:03:54'
    );
    section.update(usage({ usage: [] }), NOW, NOW);
    expect(section.node.textContent).toContain('No requests today (UTC).');
  });
});
