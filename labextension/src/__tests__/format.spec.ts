import {
  deviceKindLabel,
  formatAgo,
  formatClock,
  formatGiB,
  formatQueue,
  formatSeconds,
  isTransitional,
  parseTime,
  percent,
  plural,
  stateClass,
  stateLabel,
  swapMethodText
} from '../format';

// jest.config.js runs the tests in UTC: local clock times are UTC times here

describe('plural', () => {
  it('says one request and two requests', () => {
    expect(plural(1, 'request')).toBe('1 request');
    expect(plural(0, 'request')).toBe('0 requests');
    expect(plural(2, 'request')).toBe('2 requests');
    expect(plural(100000, 'token')).toBe('100,000 tokens');
    expect(plural(2, 'entry', 'entries')).toBe('2 entries');
  });
});

describe('formatClock', () => {
  it('gives the time of day, with the date only when it is not today', () => {
    const now = Date.parse('2026-11-25T23:02:55Z');
    expect(formatClock(Date.parse('2026-11-25T23:03:54Z'), now)).toBe('23:03:54');
    expect(formatClock(Date.parse('2026-11-26T00:00:00Z'), now)).toBe('2026-11-26 00:00:00');
    expect(formatClock(NaN, now)).toBe('–');
    expect(parseTime('2026-11-25T23:03:54Z')).toBe(Date.parse('2026-11-25T23:03:54Z'));
    expect(parseTime('soon')).toBeNull();
    expect(parseTime(null)).toBeNull();
  });
});

describe('swapMethodText', () => {
  it('says how a swap works without jargon', () => {
    expect(swapMethodText('none', false)).toBe('no GPU here: a swap pauses and resumes the engine');
    expect(swapMethodText('cuda-driver', true)).toBe('a swap moves GPU memory to host memory and back (CUDA driver)');
  });
});

describe('formatGiB', () => {
  it('adapts the precision to the size', () => {
    expect(formatGiB(0.6)).toBe('0.60 GiB');
    expect(formatGiB(12.345)).toBe('12.3 GiB');
    expect(formatGiB(141.2)).toBe('141 GiB');
    expect(formatGiB(0)).toBe('0.00 GiB');
  });
  it('can leave the unit out', () => {
    expect(formatGiB(0.5, false)).toBe('0.50');
  });
  it('shows a dash for unknown values', () => {
    expect(formatGiB(null)).toBe('–');
    expect(formatGiB(undefined)).toBe('–');
    expect(formatGiB(NaN)).toBe('–');
  });
});

describe('formatSeconds', () => {
  it('uses ms below a second', () => {
    expect(formatSeconds(0.1234)).toBe('123 ms');
    expect(formatSeconds(0.0004)).toBe('<1 ms');
    expect(formatSeconds(0)).toBe('0 s');
  });
  it('uses seconds and minutes above', () => {
    expect(formatSeconds(1.234)).toBe('1.23 s');
    expect(formatSeconds(12.34)).toBe('12.3 s');
    expect(formatSeconds(125)).toBe('2 min 05 s');
  });
  it('shows a dash for unknown or negative values', () => {
    expect(formatSeconds(null)).toBe('–');
    expect(formatSeconds(-1)).toBe('–');
    expect(formatSeconds(Infinity)).toBe('–');
  });
});

describe('formatAgo', () => {
  const now = 1_700_000_000;
  it('says never for no timestamp', () => {
    expect(formatAgo(null, now)).toBe('never');
    expect(formatAgo(0, now)).toBe('never');
  });
  it('rounds to a readable unit', () => {
    expect(formatAgo(now - 0.5, now)).toBe('just now');
    expect(formatAgo(now + 3, now)).toBe('just now'); // clock skew: never "in the future"
    expect(formatAgo(now - 12.7, now)).toBe('12 s ago');
    expect(formatAgo(now - 300, now)).toBe('5 min ago');
    expect(formatAgo(now - 7200, now)).toBe('2 h ago');
    expect(formatAgo(now - 3 * 86400, now)).toBe('3 d ago');
  });
});

describe('percent', () => {
  it('clamps to 0..100', () => {
    expect(percent(0.5, 1)).toBe(50);
    expect(percent(2, 1)).toBe(100);
    expect(percent(-1, 1)).toBe(0);
  });
  it('is 0 when unknown', () => {
    expect(percent(null, 1)).toBe(0);
    expect(percent(1, 0)).toBe(0);
  });
});

describe('states', () => {
  it('labels every server state', () => {
    expect(stateLabel('swapping_in')).toBe('swapping in…');
    expect(stateLabel('swapped_out')).toBe('swapped out');
    expect(stateLabel('running')).toBe('running');
    expect(stateLabel('some_new_state')).toBe('some new state');
  });
  it('knows which states are in progress', () => {
    expect(['starting', 'swapping_in', 'swapping_out'].every(isTransitional)).toBe(true);
    expect(['running', 'swapped_out', 'failed', 'stopped'].some(isTransitional)).toBe(false);
  });
  it('makes CSS-safe classes', () => {
    expect(stateClass('swapping_in')).toBe('jp-SwapServe-state-swapping_in');
    expect(stateClass('a b"c')).toBe('jp-SwapServe-state-abc');
  });
});

describe('misc', () => {
  it('labels devices', () => {
    expect(deviceKindLabel('virtual')).toBe('virtual');
    expect(deviceKindLabel('nvidia')).toBe('GPU');
    expect(deviceKindLabel(null)).toBe('device');
  });
  it('formats the queue', () => {
    expect(formatQueue(3, 64)).toBe('3 / 64');
    expect(formatQueue(3, null)).toBe('3');
  });
});
