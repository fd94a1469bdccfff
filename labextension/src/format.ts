/** Pure formatting helpers of the panel (unit-tested; no DOM, no JupyterLab). */

const DASH = '–';

function finite(x: unknown): x is number {
  return typeof x === 'number' && isFinite(x);
}

/** GiB with a precision that suits the size: 0.60 GiB, 12.3 GiB, 141 GiB. */
export function formatGiB(gib: number | null | undefined, unit = true): string {
  if (!finite(gib)) {
    return DASH;
  }
  const abs = Math.abs(gib);
  const text = abs < 10 ? gib.toFixed(2) : abs < 100 ? gib.toFixed(1) : gib.toFixed(0);
  return unit ? `${text} GiB` : text;
}

/** A duration: 850 ms, 1.23 s, 12.3 s, 2 min 05 s. */
export function formatSeconds(seconds: number | null | undefined): string {
  if (!finite(seconds) || seconds < 0) {
    return DASH;
  }
  if (seconds < 0.001) {
    return seconds === 0 ? '0 s' : '<1 ms';
  }
  if (seconds < 1) {
    return `${Math.round(seconds * 1000)} ms`;
  }
  if (seconds < 10) {
    return `${seconds.toFixed(2)} s`;
  }
  if (seconds < 60) {
    return `${seconds.toFixed(1)} s`;
  }
  const minutes = Math.floor(seconds / 60);
  const rest = Math.round(seconds - minutes * 60);
  return `${minutes} min ${String(rest).padStart(2, '0')} s`;
}

/** How long ago a unix timestamp (seconds) was, relative to `nowSeconds`. */
export function formatAgo(unixSeconds: number | null | undefined, nowSeconds: number): string {
  if (!finite(unixSeconds) || unixSeconds <= 0) {
    return 'never';
  }
  const age = nowSeconds - unixSeconds;
  if (age < 2) {
    return 'just now';
  }
  if (age < 60) {
    return `${Math.floor(age)} s ago`;
  }
  if (age < 3600) {
    return `${Math.floor(age / 60)} min ago`;
  }
  if (age < 86400) {
    return `${Math.floor(age / 3600)} h ago`;
  }
  return `${Math.floor(age / 86400)} d ago`;
}

/** Percentage (0–100, clamped) of `part` in `whole`; 0 when either is unknown. */
export function percent(part: number | null | undefined, whole: number | null | undefined): number {
  if (!finite(part) || !finite(whole) || whole <= 0) {
    return 0;
  }
  return Math.max(0, Math.min(100, (part / whole) * 100));
}

const STATE_LABELS: Record<string, string> = {
  stopped: 'stopped',
  starting: 'starting…',
  running: 'running',
  swapping_out: 'swapping out…',
  swapped_out: 'swapped out',
  swapping_in: 'swapping in…',
  failed: 'failed'
};

export function stateLabel(state: string): string {
  return STATE_LABELS[state] ?? state.replace(/_/g, ' ');
}

/** States in which the engine is moving: shown with a progress indicator. */
export function isTransitional(state: string): boolean {
  return state === 'starting' || state === 'swapping_in' || state === 'swapping_out';
}

/** A CSS-safe token of a state, for class names: `jp-SwapServe-state-swapping_in`. */
export function stateClass(state: string): string {
  return 'jp-SwapServe-state-' + state.replace(/[^a-z0-9_-]/gi, '');
}

/** The device label: its name, and "virtual" for a virtual device. */
export function deviceKindLabel(kind: string | null | undefined): string {
  if (kind === 'virtual') {
    return 'virtual';
  }
  if (kind === 'nvidia') {
    return 'GPU';
  }
  return kind || 'device';
}

/** Queue depth text: "3 / 16" when a limit is known, else "3". */
export function formatQueue(depth: number, max: number | null | undefined): string {
  const d = finite(depth) ? depth : 0;
  return finite(max) && max > 0 ? `${d} / ${max}` : String(d);
}

/** A count with thousands separators, fixed to en-US so the panel reads the same everywhere. */
export function formatCount(n: number | null | undefined): string {
  return typeof n === 'number' && isFinite(n) ? Math.round(n).toLocaleString('en-US') : '\u2013';
}

/** A count and its noun, singular or plural: "1 request", "2 requests", "1,000 tokens". */
export function plural(n: number, one: string, many?: string): string {
  return `${formatCount(n)} ${n === 1 ? one : many ?? `${one}s`}`;
}

function pad2(n: number): string {
  return String(n).padStart(2, '0');
}

/** A moment as the local clock shows it: "23:03:54"; with the date when it is not today. */
export function formatClock(ms: number, nowMs: number): string {
  if (!finite(ms)) {
    return DASH;
  }
  const d = new Date(ms);
  const time = `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
  const now = new Date(nowMs);
  const sameDay =
    d.getFullYear() === now.getFullYear() && d.getMonth() === now.getMonth() && d.getDate() === now.getDate();
  return sameDay ? time : `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${time}`;
}

/** Milliseconds of an ISO time ("2026-11-25T23:03:54Z"), or null. */
export function parseTime(iso: string | null | undefined): number | null {
  if (typeof iso !== 'string' || !iso) {
    return null;
  }
  const t = Date.parse(iso);
  return isFinite(t) ? t : null;
}

/** How a swap moves an engine, in plain words (the status's `checkpointer`). */
export function swapMethodText(checkpointer: string | null | undefined, hasGpu: boolean): string {
  if (!hasGpu || checkpointer === 'none') {
    return 'no GPU here: a swap pauses and resumes the engine';
  }
  if (checkpointer === 'cuda-driver') {
    return 'a swap moves GPU memory to host memory and back (CUDA driver)';
  }
  return checkpointer ? `a swap moves GPU memory to host memory and back (${checkpointer})` : '';
}
