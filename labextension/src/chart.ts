/** A small SVG bar chart of recent swap-in latencies (plain SVG, theme colours from CSS). */

import { formatSeconds } from './format';

const SVG_NS = 'http://www.w3.org/2000/svg';
export const CHART_POINTS = 20;
const WIDTH = 200;
const HEIGHT = 36;

export interface IChartSummary {
  count: number;
  last: number | null;
  median: number | null;
  max: number | null;
}

export function summarize(values: number[]): IChartSummary {
  if (!values.length) {
    return { count: 0, last: null, median: null, max: null };
  }
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  return { count: values.length, last: values[values.length - 1], median, max: sorted[sorted.length - 1] };
}

export function summaryParts(values: number[]): string[] {
  const s = summarize(values);
  if (!s.count) {
    return ['no swap-in yet'];
  }
  if (s.count === 1) {
    return [`1 swap-in: ${formatSeconds(s.last)}`];
  }
  return [`last ${formatSeconds(s.last)}`, `median ${formatSeconds(s.median)}`, `max ${formatSeconds(s.max)}`];
}

export function summaryText(values: number[]): string {
  return summaryParts(values).join(' · ');
}

/** Geometry of the bars (pure, tested): x, width, height and y in the 200×36 view box. */
export function bars(values: number[], points = CHART_POINTS): { x: number; y: number; w: number; h: number }[] {
  const shown = values.slice(-points);
  const max = Math.max(...shown, 1e-9);
  // at least 8 slots, so one or two swaps still draw readable bars
  const slots = Math.min(points, Math.max(8, shown.length));
  const slot = WIDTH / slots;
  const w = Math.max(1, slot * 0.7);
  // newest on the right, like a time axis
  const offset = slots - shown.length;
  return shown.map((v, i) => {
    const h = Math.max(1.5, (v / max) * (HEIGHT - 2));
    return { x: (offset + i) * slot + (slot - w) / 2, y: HEIGHT - h, w, h };
  });
}

export function createChart(): SVGSVGElement {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('class', 'jp-SwapServe-chart');
  svg.setAttribute('viewBox', `0 0 ${WIDTH} ${HEIGHT}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  svg.setAttribute('role', 'img');
  svg.setAttribute('focusable', 'false');
  return svg;
}

/** Redraws only when the values changed, so a status update without a new swap costs nothing. */
export function updateChart(svg: SVGSVGElement, values: number[], modelName: string): void {
  const key = values.slice(-CHART_POINTS).join(',');
  if (svg.getAttribute('data-key') === key && svg.childNodes.length) {
    return;
  }
  svg.setAttribute('data-key', key);
  while (svg.firstChild) {
    svg.removeChild(svg.firstChild);
  }
  const label = values.length
    ? `Swap-in latency of ${modelName}, last ${Math.min(values.length, CHART_POINTS)}: ` +
      values.slice(-CHART_POINTS).map(v => formatSeconds(v)).join(', ')
    : `No swap-in of ${modelName} yet`;
  svg.setAttribute('aria-label', label);
  const title = document.createElementNS(SVG_NS, 'title');
  title.textContent = label;
  svg.appendChild(title);
  const base = document.createElementNS(SVG_NS, 'line');
  base.setAttribute('class', 'jp-SwapServe-chart-axis');
  base.setAttribute('x1', '0');
  base.setAttribute('x2', String(WIDTH));
  base.setAttribute('y1', String(HEIGHT - 0.5));
  base.setAttribute('y2', String(HEIGHT - 0.5));
  svg.appendChild(base);
  const shown = values.slice(-CHART_POINTS);
  bars(values).forEach((b, i) => {
    const rect = document.createElementNS(SVG_NS, 'rect');
    rect.setAttribute('class', 'jp-SwapServe-chart-bar' + (i === shown.length - 1 ? ' jp-mod-last' : ''));
    rect.setAttribute('x', b.x.toFixed(2));
    rect.setAttribute('y', b.y.toFixed(2));
    rect.setAttribute('width', b.w.toFixed(2));
    rect.setAttribute('height', b.h.toFixed(2));
    const t = document.createElementNS(SVG_NS, 'title');
    t.textContent = formatSeconds(shown[i]);
    rect.appendChild(t);
    svg.appendChild(rect);
  });
}
