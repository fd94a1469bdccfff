import { bars, createChart, summarize, summaryParts, summaryText, updateChart } from '../chart';

describe('swap-in chart', () => {
  it('summarizes', () => {
    expect(summarize([])).toEqual({ count: 0, last: null, median: null, max: null });
    expect(summarize([3, 1, 2])).toEqual({ count: 3, last: 2, median: 2, max: 3 });
    expect(summarize([1, 2, 3, 4]).median).toBe(2.5);
    expect(summaryText([])).toBe('no swap-in yet');
    expect(summaryText([0.5])).toBe('1 swap-in: 500 ms');
    expect(summaryText([0.5, 1.5])).toBe('last 1.50 s · median 1.00 s · max 1.50 s');
    expect(summaryParts([0.5, 1.5])).toEqual(['last 1.50 s', 'median 1.00 s', 'max 1.50 s']);
  });

  it('draws the newest bars on the right, scaled to the largest', () => {
    const b = bars([1, 2], 4);
    expect(b).toHaveLength(2);
    expect(b[1].h).toBeGreaterThan(b[0].h);
    expect(b[1].x).toBeGreaterThan(b[0].x);
    expect(b[1].x + b[1].w).toBeLessThanOrEqual(200);
    expect(b[1].y + b[1].h).toBeCloseTo(36);
    expect(bars(Array.from({ length: 30 }, (_, i) => i))).toHaveLength(20);
  });

  it('redraws only when the values change', () => {
    const svg = createChart();
    updateChart(svg, [0.1, 0.2], 'gemma');
    const first = svg.querySelector('rect');
    expect(svg.querySelectorAll('rect')).toHaveLength(2);
    expect(svg.getAttribute('aria-label')).toContain('gemma');
    updateChart(svg, [0.1, 0.2], 'gemma');
    expect(svg.querySelector('rect')).toBe(first);
    updateChart(svg, [0.1, 0.2, 0.3], 'gemma');
    expect(svg.querySelectorAll('rect')).toHaveLength(3);
    updateChart(svg, [], 'gemma');
    expect(svg.querySelectorAll('rect')).toHaveLength(0);
    expect(svg.getAttribute('aria-label')).toBe('No swap-in of gemma yet');
  });
});
