import {
  classifyError,
  connectionText,
  deviceView,
  dismissMessage,
  errorDetail,
  initialState,
  isStatus,
  modelView,
  withActionDone,
  withError,
  withPending,
  withPrefetchDone,
  withStatus
} from '../state';
import { model, status } from './fixtures';

const NOW = 1_700_000_000;

describe('panel state', () => {
  it('starts connecting, without data', () => {
    const s = initialState();
    expect(s.status).toBeNull();
    expect(s.connection).toBe('connecting');
    expect(connectionText(s, 0)).toBe('connecting…');
  });

  it('takes a status and clears the error', () => {
    let s = withError(initialState(), classifyError(0, 'Failed to fetch'));
    expect(s.connection).toBe('offline');
    s = withStatus(s, status(), 1000, 'sse');
    expect(s.error).toBeNull();
    expect(s.connection).toBe('live');
    expect(s.lastUpdate).toBe(1000);
    expect(withStatus(s, status(), 2000, 'poll').connection).toBe('polling');
  });

  it('keeps the last status when an error comes (stale, not empty)', () => {
    const st = status();
    const s = withError(withStatus(initialState(), st, 1000, 'sse'), classifyError(403, null));
    expect(s.status).toBe(st);
    expect(s.error?.kind).toBe('forbidden');
    expect(connectionText(s, 31_000)).toBe('offline · data from 30 s ago');
  });

  it('tracks a pending swap and its outcome', () => {
    let s = withPending(initialState(), 'gemma', 'swap-in', 5);
    expect(s.pending.gemma).toEqual({ action: 'swap-in', since: 5 });
    s = withActionDone(s, 'gemma', 'swap-in', {
      result: { model: 'gemma', swapped: true, state: 'running', seconds: 0.2 }
    });
    expect(s.pending.gemma).toBeUndefined();
    expect(s.messages.gemma).toBeUndefined();
  });

  it('answers "Use now" in words, a declined hint being no error', () => {
    let s = withPending(initialState(), 'gemma', 'prefetch', 5);
    expect(s.pending.gemma.action).toBe('prefetch');
    s = withPrefetchDone(s, 'gemma', { prefetch: 'starting' });
    expect(s.pending.gemma).toBeUndefined();
    expect(s.messages.gemma).toEqual({ kind: 'info', text: 'gemma is being swapped in for you.' });
    s = withPrefetchDone(s, 'gemma', { prefetch: 'declined: no free memory without evicting a busy model' });
    expect(s.messages.gemma).toEqual({
      kind: 'info',
      text: 'Not swapped in now (no free memory without evicting a busy model). Your next request to gemma still gets it: it waits for its turn.'
    });
    expect(withPrefetchDone(s, 'gemma', { prefetch: 'running' }).messages.gemma.text).toBe(
      'gemma is running: your requests go straight to it.'
    );
    expect(withPrefetchDone(s, 'gemma', { error: classifyError(404, { error: { message: 'no such model' } }) }).messages.gemma).toEqual(
      { kind: 'error', text: 'Not found (404): no such model' }
    );
  });

  it('reports a refused swap', () => {
    let s = withPending(initialState(), 'gemma', 'swap-out', 5);
    s = withActionDone(s, 'gemma', 'swap-out', { error: classifyError(409, { error: { message: 'busy' } }) });
    expect(s.messages.gemma).toEqual({ kind: 'error', text: 'The server answered 409: busy.' });
    expect(dismissMessage(s, 'gemma').messages.gemma).toBeUndefined();
    expect(dismissMessage(s, 'other')).toBe(s);
  });

  it('explains a swap-out that did not happen', () => {
    const s = withActionDone(withPending(initialState(), 'm', 'swap-out', 0), 'm', 'swap-out', {
      result: { model: 'm', swapped: false, state: 'running', reason: 'checkpoint failed' }
    });
    expect(s.messages.m).toEqual({ kind: 'error', text: 'Not swapped out: checkpoint failed' });
    const t = withActionDone(withPending(initialState(), 'm', 'swap-in', 0), 'm', 'swap-in', {
      result: { model: 'm', swapped: false, state: 'running', seconds: 0 }
    });
    expect(t.messages.m).toEqual({ kind: 'info', text: 'Already running.' });
  });
});

describe('errors', () => {
  it('names the usual failures', () => {
    expect(classifyError(0, 'Failed to fetch').kind).toBe('unreachable');
    expect(classifyError(0, 'Failed to fetch').message).toMatch(/Cannot reach the Jupyter server/);
    expect(classifyError(401, null).kind).toBe('unauthorized');
    const forbidden = classifyError(403, { error: { message: "User 'bob' may not read swapserve." } });
    expect(forbidden.kind).toBe('forbidden');
    expect(forbidden.message).toBe("Permission denied (403): User 'bob' may not read swapserve.");
    expect(classifyError(403, null).message).toBe('Permission denied (403): you may not use the swapserve API.');
    expect(classifyError(404, '<html>Not Found</html>').message).toMatch(/server extension enabled/);
    expect(classifyError(503, { error: { message: 'queue full' } }).message).toBe('The server answered 503: queue full.');
  });

  it('extracts details from any body', () => {
    expect(errorDetail({ error: { message: 'x' } })).toBe('x');
    expect(errorDetail('{"error": {"message": "y"}}')).toBe('y');
    expect(errorDetail({ message: 'z' })).toBe('z');
    expect(errorDetail('<!DOCTYPE html>')).toBe('');
    expect(errorDetail(null)).toBe('');
  });

  it('recognizes a status document', () => {
    expect(isStatus(status())).toBe(true);
    expect(isStatus({ models: [] })).toBe(false);
    expect(isStatus('<html>')).toBe(false);
    expect(isStatus(null)).toBe(false);
  });
});

describe('modelView', () => {
  const st = status();

  it('shows a swapped-out model on a virtual device', () => {
    const v = modelView(st.models[0], st.devices, undefined, undefined, NOW);
    expect(v.stateText).toBe('swapped out');
    expect(v.busy).toBe(false);
    expect(v.canSwapIn).toBe(true);
    expect(v.canSwapOut).toBe(false);
    expect(v.virtual).toBe(true);
    expect(v.deviceText).toBe('demo (virtual, CPU)');
    // what it holds now (nothing: no residual), not its size
    expect(v.memoryText).toBe('0.00 / 1.00 GiB');
    expect(v.memoryPercent).toBe(0);
    expect(v.memoryNote).toBe('0.60 GiB when running');
    expect(v.queueText).toBe('0 / 64');
    expect(v.swapInText).toBe('–');
    expect(v.swapOutText).toBe('80 ms');
    expect(v.lastUsedText).toBe('never');
    expect(v.subtitle).toBe('llamacpp · completion');
  });

  it('shows the move at once while the swap request is pending', () => {
    const v = modelView(st.models[0], st.devices, { action: 'swap-in', since: 0 }, undefined, NOW);
    expect(v.state).toBe('swapping_in');
    expect(v.stateText).toBe('swapping in…');
    expect(v.busy).toBe(true);
    expect(v.canSwapIn).toBe(false);
    expect(v.pendingAction).toBe('swap-in');
    const out = modelView(st.models[1], st.devices, { action: 'swap-out', since: 0 }, undefined, NOW);
    expect(out.state).toBe('swapping_out');
  });

  it('trusts the server once it reports a transition', () => {
    const m = model({ state: 'swapping_in' });
    const v = modelView(m, st.devices, undefined, undefined, NOW);
    expect(v.busy).toBe(true);
    expect(v.canSwapIn || v.canSwapOut).toBe(false);
  });

  it('offers swap-out for a running, unpinned model only', () => {
    const running = model({
      state: 'running',
      reserved_gib: 0.6,
      last_used: NOW - 3,
      last_request: NOW - 30,
      last_swap_in_seconds: 0.25
    });
    const v = modelView(running, st.devices, undefined, undefined, NOW);
    expect(v.canSwapOut).toBe(true);
    expect(v.canSwapIn).toBe(false);
    expect(v.lastUsedText).toBe('30 s ago'); // the last request, not the swap-in 3 s ago
    expect(v.memoryText).toBe('0.60 / 1.00 GiB');
    expect(v.memoryNote).toBe('');
    expect(v.swapInText).toBe('250 ms');
    expect(modelView({ ...running, pinned: true }, st.devices, undefined, undefined, NOW).canSwapOut).toBe(false);
  });

  it('counts only real use as "last used"', () => {
    // started and swapped in 5 s ago, never asked anything
    expect(modelView(model({ last_used: NOW - 5, last_request: null }), st.devices, undefined, undefined, NOW).lastUsedText).toBe('never');
    // an older server without last_request: its last_used means use only once there were requests
    expect(modelView(model({ last_used: NOW - 5, requests: 0 }), st.devices, undefined, undefined, NOW).lastUsedText).toBe('never');
    expect(modelView(model({ last_used: NOW - 5, requests: 2 }), st.devices, undefined, undefined, NOW).lastUsedText).toBe('5 s ago');
  });

  it("shows a swapped-out model's residual, what it still holds on the GPU", () => {
    const gpu = { ...st.devices[0], kind: 'nvidia', name: 'NVIDIA H100', capacity_gib: 80 };
    const m = model({ device_kind: 'nvidia', memory_gib: 31, reserved_gib: 0.94, residual_gib: 0.94 });
    const v = modelView(m, [gpu], undefined, undefined, NOW);
    expect(v.heldGiB).toBeCloseTo(0.94);
    expect(v.memoryText).toBe('0.94 / 80.0 GiB');
    expect(v.memoryNote).toBe('keeps 0.94 GiB on the GPU; 31.0 GiB when running');
    expect(v.memoryTitle).toContain('holds 0.94 GiB of the GPU');
  });

  it('offers a user who is not an admin only "Use now"', () => {
    const user = (m = st.models[0]) => modelView(m, st.devices, undefined, undefined, NOW, false);
    expect(user().canSwapIn).toBe(false);
    expect(user().canPrefetch).toBe(true);
    expect(user(model({ state: 'running' })).canSwapOut).toBe(false);
    expect(user(model({ state: 'running' })).canPrefetch).toBe(false);
    expect(user(model({ state: 'failed' })).canSwapIn).toBe(false); // Start is an admin's too
    expect(modelView(st.models[0], st.devices, undefined, undefined, NOW, true).canPrefetch).toBe(false);
  });

  it("does not offer 'Use now' for a model the user's quota excludes, and says why", () => {
    const user = (allowed: string[] | null, m = st.models[0]) =>
      modelView(m, st.devices, undefined, undefined, NOW, false, allowed);
    expect(user(['smollm2']).canPrefetch).toBe(false);
    expect(user(['smollm2']).offersPrefetch).toBe(true); // shown, disabled, with the reason
    expect(user(['smollm2']).notAllowedText).toBe('Your quota does not include gemma (allowed: smollm2); ask an admin.');
    expect(user([]).notAllowedText).toBe('Your quota includes no model; ask an admin.');
    expect(user(['gemma']).canPrefetch).toBe(true);
    expect(user(['gemma']).notAllowedText).toBe('');
    expect(user(null).canPrefetch).toBe(true);
    // a running model the user may not call: the reason still shows, nothing to offer
    const running = user(['smollm2'], model({ state: 'running' }));
    expect([running.offersPrefetch, running.notAllowedText !== '']).toEqual([false, true]);
    expect(modelView(st.models[0], st.devices, undefined, undefined, NOW, true, ['smollm2']).notAllowedText).toBe('');
  });

  it('offers Start for a failed or stopped model and shows its error', () => {
    const v = modelView(model({ state: 'failed', error: 'start failed: boom' }), st.devices, undefined, undefined, NOW);
    expect(v.canSwapIn).toBe(true);
    expect(v.swapInLabel).toBe('Start');
    expect(v.error).toBe('start failed: boom');
  });

  it('labels a virtual device as virtual', () => {
    const d = [{ ...st.devices[0], name: 'laptop' }];
    expect(modelView(st.models[0], d, undefined, undefined, NOW).deviceText).toBe('laptop (virtual)');
  });

  it('names a GPU device with its index', () => {
    const gpu = { ...st.devices[0], kind: 'nvidia', name: 'NVIDIA H100', capacity_gib: 80 };
    const v = modelView(model({ device_kind: 'nvidia', state: 'running', memory_gib: 16, reserved_gib: 16 }), [gpu], undefined, undefined, NOW);
    expect(v.deviceText).toBe('NVIDIA H100 (GPU 0)');
    expect(v.virtual).toBe(false);
    expect(v.memoryPercent).toBeCloseTo(20);
  });

  it('copes with an unmeasured size and a missing history', () => {
    const v = modelView(model({ memory_gib: null, swap_in_history: undefined }), st.devices, undefined, undefined, NOW);
    expect(v.memoryText).toBe('0.00 / 1.00 GiB');
    expect(v.memoryNote).toBe('');
    expect(v.memoryTitle).toBe('memory not measured yet');
    expect(v.memoryPercent).toBe(0);
    expect(v.history).toEqual([]);
  });
});

describe('deviceView', () => {
  it('splits the reservations by model and reports free memory', () => {
    const st = status();
    const v = deviceView(st.devices[0], st.models);
    expect(v.segments).toEqual([{ label: 'smollm2', key: 'smollm2', gib: 0.5, percent: 50 }]);
    expect(v.reservedPercent).toBe(50);
    expect(v.usedPercent).toBeNull();
    expect(v.legend).toEqual({ used: null, reserved: '0.50 GiB', free: '0.50 GiB' }); // nothing to measure
    const gpu = deviceView({ ...st.devices[0], kind: 'nvidia' }, st.models);
    expect(gpu.legend.used).toBe('not measured yet');
    expect(v.kindText).toBe('virtual');
    expect(v.virtual).toBe(true);
  });

  it('keeps unattributed reservations and names who waits', () => {
    const st = status();
    const d = { ...st.devices[0], reserved_gib: 0.8, free_gib: 0.2, used_gib: 0.7, waiting: [{ model: 'gemma', gib: 0.6 }] };
    const v = deviceView(d, st.models);
    expect(v.segments.map(s => s.label)).toEqual(['smollm2', '']);
    expect(v.segments[1].gib).toBeCloseTo(0.3);
    expect(v.usedPercent).toBeCloseTo(70);
    expect(v.waitingText).toBe('gemma (0.60 GiB)');
    expect(v.ariaText).toContain('0.70 GiB used');
  });
});
