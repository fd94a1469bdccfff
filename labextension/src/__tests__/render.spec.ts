import { PanelView } from '../render';
import { classifyError, initialState, IPanelState, withError, withPending, withStatus } from '../state';
import { modelKey, SwapAction } from '../types';
import { model, status } from './fixtures';

function mount() {
  const swaps: [string, SwapAction][] = [];
  const prefetches: string[] = [];
  const view = new PanelView({
    swap: (m, a) => swaps.push([modelKey(m), a]),
    prefetch: m => prefetches.push(modelKey(m)),
    retry: () => undefined,
    dismiss: () => undefined
  });
  document.body.appendChild(view.node);
  return { view, swaps, prefetches };
}

const card = (root: HTMLElement, name: string) =>
  root.querySelector<HTMLElement>(`.jp-SwapServe-model[data-model="${name}"]`)!;

afterEach(() => {
  document.body.textContent = '';
});

describe('PanelView', () => {
  it('shows loading, then one card per model and one bar per device', () => {
    const { view } = mount();
    view.update(initialState(), 0);
    expect(view.node.textContent).toContain('Loading the status');
    view.update(withStatus(initialState(), status(), 1000, 'sse'), 1000);
    expect(view.node.querySelectorAll('.jp-SwapServe-model')).toHaveLength(2);
    expect(view.node.querySelectorAll('.jp-SwapServe-device')).toHaveLength(1);
    const gemma = card(view.node, 'gemma');
    expect(gemma.querySelector('.jp-SwapServe-stateText')!.textContent).toBe('swapped out');
    // swapped out, it holds nothing on the device; its size is said beside
    expect(gemma.querySelector('.jp-SwapServe-memText')!.textContent).toBe('0.00 / 1.00 GiB');
    expect(gemma.querySelector('.jp-SwapServe-memNote')!.textContent).toBe('0.60 GiB when running');
    expect(card(view.node, 'smollm2').querySelector('.jp-SwapServe-memText')!.textContent).toBe('0.50 / 1.00 GiB');
    expect(card(view.node, 'smollm2').querySelector<HTMLElement>('.jp-SwapServe-memNote')!.hidden).toBe(true);
    expect(view.node.querySelector('.jp-SwapServe-kind')!.textContent).toBe('virtual');
    // plain words in the header; a virtual device has no "used" to report
    expect(view.node.querySelector('.jp-SwapServe-who')!.textContent).toBe("This server's own engines · tester, admin");
    expect(view.node.querySelector('.jp-SwapServe-how')!.textContent).toBe(
      'no GPU here: a swap pauses and resumes the engine'
    );
    expect(view.node.textContent).not.toContain('checkpointer');
    expect(view.node.querySelector<HTMLElement>('.jp-SwapServe-legend-used')!.hidden).toBe(true);
    expect(view.node.querySelector('.jp-SwapServe-connText')!.textContent).toBe('live');
  });

  it('patches in place: same nodes, focus kept, nothing rebuilt', () => {
    const { view } = mount();
    let s: IPanelState = withStatus(initialState(), status(), 1000, 'sse');
    view.update(s, 1000);
    const gemma = card(view.node, 'gemma');
    const button = gemma.querySelector<HTMLButtonElement>('.jp-SwapServe-swap-in')!;
    button.focus();
    expect(document.activeElement).toBe(button);
    const observer = new MutationObserver(() => undefined);
    observer.observe(view.node, { subtree: true, childList: true, attributes: true, characterData: true });
    // the same status again: not a single DOM mutation
    view.update(withStatus(s, status(), 1000, 'sse'), 1000);
    expect(observer.takeRecords()).toHaveLength(0);
    // a real change: still the same nodes, the focused button keeps focus
    const st = status();
    st.models[0] = model({ state: 'swapping_in' });
    s = withStatus(s, st, 2000, 'sse');
    view.update(s, 2000);
    expect(card(view.node, 'gemma')).toBe(gemma);
    expect(document.activeElement).toBe(button);
    expect(gemma.querySelector('.jp-SwapServe-stateText')!.textContent).toBe('swapping in…');
    expect(gemma.querySelector('.jp-SwapServe-state')!.classList.contains('jp-mod-busy')).toBe(true);
    expect(button.getAttribute('aria-disabled')).toBe('true');
    observer.disconnect();
  });

  it('calls back on swap buttons, not when disabled', () => {
    const { view, swaps } = mount();
    view.update(withStatus(initialState(), status(), 0, 'sse'), 0);
    card(view.node, 'gemma').querySelector<HTMLButtonElement>('.jp-SwapServe-swap-in')!.click();
    card(view.node, 'gemma').querySelector<HTMLButtonElement>('.jp-SwapServe-swap-out')!.click();
    card(view.node, 'smollm2').querySelector<HTMLButtonElement>('.jp-SwapServe-swap-out')!.click();
    expect(swaps).toEqual([
      ['gemma', 'swap-in'],
      ['smollm2', 'swap-out']
    ]);
    const b = card(view.node, 'gemma').querySelector<HTMLButtonElement>('.jp-SwapServe-swap-in')!;
    expect(b.getAttribute('aria-label')).toBe('Swap in gemma');
    expect(b.type).toBe('button');
  });

  it("offers a user who is not an admin 'Use now', never the manual swaps", () => {
    const { view, swaps, prefetches } = mount();
    const st = status({ user: { name: 'bob', admin: false }, mode: 'service' });
    view.update(withStatus(initialState(), st, 0, 'sse'), 0);
    expect(view.node.querySelector('.jp-SwapServe-who')!.textContent).toBe(
      "The node's shared swap service · signed in as bob"
    );
    for (const name of ['gemma', 'smollm2']) {
      const c = card(view.node, name);
      expect(c.querySelector<HTMLElement>('.jp-SwapServe-swap-in')!.hidden).toBe(true);
      expect(c.querySelector<HTMLElement>('.jp-SwapServe-swap-out')!.hidden).toBe(true);
    }
    const useNow = card(view.node, 'gemma').querySelector<HTMLButtonElement>('.jp-SwapServe-prefetch')!;
    expect(useNow.hidden).toBe(false);
    expect(useNow.textContent).toBe('Use now');
    expect(card(view.node, 'smollm2').querySelector<HTMLElement>('.jp-SwapServe-prefetch')!.hidden).toBe(true); // running
    useNow.click();
    // a click on a card or its buttons moves nothing else: no swap, one hint
    card(view.node, 'gemma').click();
    expect(prefetches).toEqual(['gemma']);
    expect(swaps).toEqual([]);
    const pending = withPending(withStatus(initialState(), st, 0, 'sse'), 'gemma', 'prefetch', 0);
    view.update(pending, 0);
    expect(useNow.textContent).toBe('Asking…');
    expect(card(view.node, 'gemma').getAttribute('data-state')).toBe('swapped_out'); // a hint may be declined
  });

  it("disables 'Use now' with a one-line reason for a model the user's quota does not include", () => {
    const { view, prefetches } = mount();
    const st = status({ user: { name: 'bob', admin: false }, mode: 'service' });
    st.models.push(model({ name: 'phi' }));
    view.update(withStatus(initialState(), st, 0, 'sse'), 0, ['smollm2', 'phi']);
    const gemma = card(view.node, 'gemma');
    const useNow = gemma.querySelector<HTMLButtonElement>('.jp-SwapServe-prefetch')!;
    expect(useNow.hidden).toBe(false);
    expect(useNow.getAttribute('aria-disabled')).toBe('true');
    const reason = 'Your quota does not include gemma (allowed: smollm2, phi); ask an admin.';
    expect(useNow.getAttribute('aria-label')).toBe(reason);
    const note = gemma.querySelector<HTMLElement>('.jp-SwapServe-notAllowed')!;
    expect(note.hidden).toBe(false);
    expect(note.textContent).toBe(reason);
    useNow.click();
    expect(prefetches).toEqual([]);
    // an allowed model: no note, the button works
    expect(card(view.node, 'phi').querySelector<HTMLElement>('.jp-SwapServe-notAllowed')!.hidden).toBe(true);
    card(view.node, 'phi').querySelector<HTMLButtonElement>('.jp-SwapServe-prefetch')!.click();
    expect(prefetches).toEqual(['phi']);
    // the quota changes to every model: the note goes, the button comes back
    view.update(withStatus(initialState(), st, 0, 'sse'), 0, null);
    expect(note.hidden).toBe(true);
    expect(useNow.getAttribute('aria-disabled')).toBe(null);
    // an admin is never told: admins swap by hand whatever their own quota says
    const admin = status({ user: { name: 'teacher', admin: true }, mode: 'service' });
    view.update(withStatus(initialState(), admin, 0, 'sse'), 0, ['smollm2']);
    expect(note.hidden).toBe(true);
    expect(gemma.querySelector<HTMLElement>('.jp-SwapServe-swap-in')!.getAttribute('aria-disabled')).toBe(null);
  });

  it("says when this is the node's shared service and you are its admin", () => {
    const { view } = mount();
    const st = status({ user: { name: 'teacher', admin: true }, mode: 'service' });
    view.update(withStatus(initialState(), st, 0, 'sse'), 0);
    expect(view.node.querySelector('.jp-SwapServe-who')!.textContent).toBe(
      "The node's shared swap service · you (teacher) are its admin"
    );
    expect(card(view.node, 'gemma').querySelector<HTMLElement>('.jp-SwapServe-swap-in')!.hidden).toBe(false);
    expect(card(view.node, 'gemma').querySelector<HTMLElement>('.jp-SwapServe-prefetch')!.hidden).toBe(true);
  });

  it('labels the pending button and the state right away', () => {
    const { view } = mount();
    const s = withPending(withStatus(initialState(), status(), 0, 'sse'), 'gemma', 'swap-in', 0);
    view.update(s, 0);
    const gemma = card(view.node, 'gemma');
    expect(gemma.querySelector('.jp-SwapServe-swap-in')!.textContent).toBe('Swapping in…');
    expect(gemma.querySelector('.jp-SwapServe-swap-in')!.getAttribute('aria-busy')).toBe('true');
    expect(gemma.getAttribute('data-state')).toBe('swapping_in');
  });

  it('shows errors, keeps the stale data, and hides the error once fixed', () => {
    const { view } = mount();
    let s = withStatus(initialState(), status(), 0, 'sse');
    view.update(s, 0);
    s = withError(s, classifyError(403, { error: { message: 'no' } }));
    view.update(s, 5000);
    const alert = view.node.querySelector<HTMLElement>('[role="alert"]')!;
    expect(alert.hidden).toBe(false);
    expect(alert.textContent).toContain('Permission denied (403): no.');
    expect(view.node.classList.contains('jp-mod-stale')).toBe(true);
    expect(view.node.querySelectorAll('.jp-SwapServe-model')).toHaveLength(2);
    view.update(withStatus(s, status(), 6000, 'poll'), 6000);
    expect(alert.hidden).toBe(true);
    expect(view.node.querySelector('.jp-SwapServe-connText')!.textContent).toBe('polling');
  });

  it('shows an error with no data at all (never silent emptiness)', () => {
    const { view } = mount();
    view.update(withError(initialState(), classifyError(0, 'Failed to fetch')), 0);
    const alert = view.node.querySelector<HTMLElement>('[role="alert"]')!;
    expect(alert.hidden).toBe(false);
    expect(alert.textContent).toContain('Cannot reach the Jupyter server');
  });

  it('adds, removes and reorders models', () => {
    const { view } = mount();
    view.update(withStatus(initialState(), status(), 0, 'sse'), 0);
    const st = status();
    st.models = [st.models[1], model({ name: 'phi' })];
    view.update(withStatus(initialState(), st, 0, 'sse'), 0);
    const names = [...view.node.querySelectorAll<HTMLElement>('.jp-SwapServe-model')].map(e => e.dataset.model);
    expect(names).toEqual(['smollm2', 'phi']);
  });

  it('draws the device reservations per model and the waiting list', () => {
    const { view } = mount();
    const st = status();
    st.devices[0].waiting = [{ model: 'gemma', gib: 0.6 }];
    view.update(withStatus(initialState(), st, 0, 'sse'), 0);
    const segs = view.node.querySelectorAll<HTMLElement>('.jp-SwapServe-seg');
    expect(segs).toHaveLength(1);
    expect(segs[0].style.width).toBe('50.00%');
    expect(segs[0].title).toBe('smollm2: 0.50 GiB');
    expect(view.node.querySelector('.jp-SwapServe-waiting')!.textContent).toBe('Waiting for memory: gemma (0.60 GiB)');
    expect(view.node.querySelector('.jp-SwapServe-usedMarker')!.hasAttribute('hidden')).toBe(true);
  });

  it('lists configuration errors', () => {
    const { view } = mount();
    view.update(withStatus(initialState(), status({ config_errors: ['models[2]: unknown engine'] }), 0, 'sse'), 0);
    const list = view.node.querySelector<HTMLElement>('.jp-SwapServe-configErrors')!;
    expect(list.hidden).toBe(false);
    expect(list.textContent).toBe('models[2]: unknown engine');
  });
});
