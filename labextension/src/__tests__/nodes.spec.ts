/**
 * Several node services as one sidebar (client mode): the status a user's server makes of two GPU
 * nodes (two-nodes.status.json, made by the server's own NodeDirectory and compared with it by
 * tests/browser/test_sidebar_nodes.py) has the same model name and device 0 once per node. Each
 * row is keyed by its node and name, says which node serves it, and its buttons act on that node;
 * a strip lists the nodes, up or not, and their models.
 */
import { modelPath } from '../client';
import { PanelView } from '../render';
import { deviceView, headerView, initialState, modelView, nodeViews, withPending, withStatus } from '../state';
import { IModelRef, IStatus, modelKey, SwapAction } from '../types';
import fixture from './two-nodes.status.json';

const GPU1 = 'swapserve-gpu1';
const GPU2 = 'swapserve-gpu2';

function union(which: 'union' | 'union_gpu2_down' = 'union'): IStatus {
  return JSON.parse(JSON.stringify(fixture[which])) as IStatus;
}

function mount() {
  const swaps: [string, SwapAction][] = [];
  const prefetches: string[] = [];
  const view = new PanelView({
    swap: (m: IModelRef, a) => swaps.push([modelKey(m), a]),
    prefetch: (m: IModelRef) => prefetches.push(modelKey(m)),
    retry: () => undefined,
    dismiss: () => undefined
  });
  document.body.appendChild(view.node);
  return { view, swaps, prefetches };
}

const cardOn = (root: HTMLElement, node: string, name: string) =>
  root.querySelector<HTMLElement>(`.jp-SwapServe-model[data-node="${node}"][data-model="${name}"]`)!;

afterEach(() => {
  document.body.textContent = '';
});

describe('several nodes', () => {
  it('has the same model name and device index on both nodes (the collision this keying is for)', () => {
    const st = union();
    expect(st.models.filter(m => m.name === 'smollm2').map(m => m.node)).toEqual([GPU1, GPU2]);
    expect(st.devices.map(d => [d.node, d.index])).toEqual([
      [GPU1, 0],
      [GPU2, 0]
    ]);
  });

  it("keys every card by node and name: one card per node's model, each with its own state", () => {
    const { view } = mount();
    const st = union();
    view.update(withStatus(initialState(), st, 0, 'sse'), 0);
    const cards = [...view.node.querySelectorAll<HTMLElement>('.jp-SwapServe-model')];
    expect(cards.map(c => `${c.dataset.node}/${c.dataset.model}`)).toEqual([
      `${GPU1}/gemma`,
      `${GPU1}/smollm2`,
      `${GPU2}/smollm2`,
      `${GPU2}/gemma-b`
    ]);
    // running on gpu1, swapped out on gpu2: neither overwrites the other
    expect(cardOn(view.node, GPU1, 'smollm2').dataset.state).toBe('running');
    expect(cardOn(view.node, GPU2, 'smollm2').dataset.state).toBe('swapped_out');
    expect(cardOn(view.node, GPU1, 'smollm2').querySelector('.jp-SwapServe-stat-requests dd')!.textContent).toBe('3');
    expect(cardOn(view.node, GPU2, 'smollm2').querySelector('.jp-SwapServe-stat-requests dd')!.textContent).toBe('0');
    // each card says which node serves it
    expect(cardOn(view.node, GPU2, 'smollm2').querySelector('.jp-SwapServe-onNode')!.textContent).toBe(`on ${GPU2}`);
    expect(cardOn(view.node, GPU1, 'gemma').querySelector('.jp-SwapServe-onNode')!.textContent).toBe(`on ${GPU1}`);
    // a change on one node's smollm2 patches its own card only
    const gpu1Card = cardOn(view.node, GPU1, 'smollm2');
    const next = union();
    next.models[2] = { ...next.models[2], state: 'swapping_in' };
    view.update(withStatus(initialState(), next, 0, 'sse'), 0);
    expect(cardOn(view.node, GPU1, 'smollm2')).toBe(gpu1Card);
    expect(gpu1Card.dataset.state).toBe('running');
    expect(cardOn(view.node, GPU2, 'smollm2').dataset.state).toBe('swapping_in');
  });

  it("keys every device by node and index, each bar with its own node's models", () => {
    const { view } = mount();
    view.update(withStatus(initialState(), union(), 0, 'sse'), 0);
    const devices = [...view.node.querySelectorAll<HTMLElement>('.jp-SwapServe-device')];
    expect(devices.map(d => [d.dataset.node, d.dataset.device])).toEqual([
      [GPU1, '0'],
      [GPU2, '0']
    ]);
    expect(devices.map(d => d.querySelector('.jp-SwapServe-deviceName')!.textContent)).toEqual(['gpu1-cpu', 'gpu2-cpu']);
    expect(devices.map(d => d.querySelector('.jp-SwapServe-onNode')!.textContent)).toEqual([`on ${GPU1}`, `on ${GPU2}`]);
    // gpu1's bar holds gpu1's smollm2 (0.5 GiB); gpu2's holds gpu2's gemma-b (0.6 GiB), not gpu1's smollm2
    const segs = devices.map(d => [...d.querySelectorAll<HTMLElement>('.jp-SwapServe-seg')].map(s => s.title));
    expect(segs).toEqual([['smollm2: 0.50 GiB'], ['gemma-b: 0.60 GiB']]);
    expect(devices.map(d => d.querySelector('.jp-SwapServe-legend-free')!.textContent)).toEqual([
      'free 0.50 GiB',
      'free 0.40 GiB'
    ]);
    // a model's device is the one of its own node
    const st = union();
    const gemmaB = modelView(st.models[3], st.devices, undefined, undefined, 0, false, null, true);
    expect(gemmaB.deviceText).toBe('gpu2-cpu (virtual)');
    expect(gemmaB.memoryText).toBe('0.60 / 1.00 GiB');
    expect(deviceView(st.devices[1], st.models, true).ariaText).toBe(
      `gpu2-cpu on ${GPU2}: 0.60 GiB reserved, 0.40 GiB free of 1.00 GiB`
    );
  });

  it("sends a swap of a model of a node to that node, and keeps each node's pending apart", () => {
    const { view, swaps, prefetches } = mount();
    const st = union();
    st.user = { name: 'teacher', admin: true };
    let s = withStatus(initialState(), st, 0, 'sse');
    view.update(s, 0);
    const swapIn = cardOn(view.node, GPU2, 'smollm2').querySelector<HTMLButtonElement>('.jp-SwapServe-swap-in')!;
    expect(swapIn.getAttribute('aria-label')).toBe(`Swap in smollm2 on ${GPU2}`);
    swapIn.click();
    cardOn(view.node, GPU1, 'smollm2').querySelector<HTMLButtonElement>('.jp-SwapServe-swap-out')!.click();
    expect(swaps).toEqual([
      [`${GPU2}/smollm2`, 'swap-in'],
      [`${GPU1}/smollm2`, 'swap-out']
    ]);
    expect(prefetches).toEqual([]);
    // the swap pending on gpu2's smollm2 shows on that card, not on gpu1's
    s = withPending(s, `${GPU2}/smollm2`, 'swap-in', 0);
    view.update(s, 0);
    expect(cardOn(view.node, GPU2, 'smollm2').dataset.state).toBe('swapping_in');
    expect(cardOn(view.node, GPU1, 'smollm2').dataset.state).toBe('running');
    expect(cardOn(view.node, GPU1, 'smollm2').querySelector('.jp-SwapServe-swap-out')!.getAttribute('aria-disabled')).toBe(
      null
    );
    // the requests name the node: the user's server routes by ?node= (handlers/proxy.py)
    expect(modelPath('smollm2', 'swap-in', GPU2)).toBe(`models/smollm2/swap-in?node=${GPU2}`);
    expect(modelPath('smollm2', 'prefetch', GPU1)).toBe(`models/smollm2/prefetch?node=${GPU1}`);
    expect(modelPath('a b', 'swap-out')).toBe('models/a%20b/swap-out');
  });

  it("offers a user 'Use now' on each node's swapped-out model, for that node", () => {
    const { view, prefetches } = mount();
    view.update(withStatus(initialState(), union(), 0, 'sse'), 0);
    const useNow = (node: string, name: string) =>
      cardOn(view.node, node, name).querySelector<HTMLButtonElement>('.jp-SwapServe-prefetch')!;
    expect(useNow(GPU1, 'smollm2').hidden).toBe(true); // running there
    expect(useNow(GPU2, 'smollm2').hidden).toBe(false);
    expect(useNow(GPU2, 'smollm2').getAttribute('aria-label')).toBe(
      `Use smollm2 on ${GPU2} now: swap it in ahead of your request, if that pushes out no model in use`
    );
    useNow(GPU2, 'smollm2').click();
    useNow(GPU1, 'gemma').click();
    expect(prefetches).toEqual([`${GPU2}/smollm2`, `${GPU1}/gemma`]);
  });

  it('lists the nodes, up or not, with their models, in plain words', () => {
    const { view } = mount();
    view.update(withStatus(initialState(), union(), 0, 'sse'), 1796170130 * 1000);
    const strip = view.node.querySelector<HTMLElement>('.jp-SwapServe-nodes')!;
    expect(strip.hidden).toBe(false);
    const items = [...strip.querySelectorAll<HTMLElement>('.jp-SwapServe-node')];
    expect(items.map(i => i.textContent)).toEqual([
      `${GPU1}up2 models: gemma, smollm2`,
      `${GPU2}up2 models: smollm2, gemma-b`
    ]);
    expect(items[0].title).toBe(`${GPU1} is up (came up 30 s ago); 2 models: gemma, smollm2`);
    expect(view.node.querySelector('.jp-SwapServe-who')!.textContent).toBe(
      'The shared swap services of 2 GPU nodes · signed in as bob'
    );
    expect(headerView({ ...union(), user: { name: 'teacher', admin: true } }).who).toBe(
      'The shared swap services of 2 GPU nodes · you (teacher) are their admin'
    );

    // gpu2 stops answering: it says so and why; its models are unavailable, gpu1's are not
    const down = union('union_gpu2_down');
    view.update(withStatus(initialState(), down, 0, 'sse'), 1796170130 * 1000);
    const gpu2 = strip.querySelector<HTMLElement>(`.jp-SwapServe-node[data-node="${GPU2}"]`)!;
    expect(gpu2).toBe(items[1]); // patched in place
    expect(gpu2.dataset.up).toBe('false');
    expect(gpu2.querySelector('.jp-SwapServe-nodeState')!.textContent).toBe('not answering');
    expect(gpu2.title).toBe(
      `${GPU2} is not answering (stopped 30 s ago): ClientConnectorError: Cannot connect to host 127.0.0.1:1; ` +
        'its models are unavailable until it answers again'
    );
    expect(cardOn(view.node, GPU2, 'gemma-b').dataset.state).toBe('unavailable');
    expect(cardOn(view.node, GPU2, 'gemma-b').querySelector('.jp-SwapServe-stateText')!.textContent).toBe('unavailable');
    expect(cardOn(view.node, GPU2, 'gemma-b').querySelector('.jp-SwapServe-modelError')!.textContent).toContain(
      `node ${GPU2} is not answering`
    );
    expect(cardOn(view.node, GPU2, 'smollm2').querySelector<HTMLElement>('.jp-SwapServe-prefetch')!.hidden).toBe(true);
    expect(cardOn(view.node, GPU1, 'smollm2').dataset.state).toBe('running');
    expect(nodeViews(down.nodes, 1796170130).map(n => [n.name, n.stateText])).toEqual([
      [GPU1, 'up'],
      [GPU2, 'not answering']
    ]);
  });

  it('shows no node strip and no node names for one node or none', () => {
    const { view } = mount();
    const one = union();
    one.nodes = one.nodes!.slice(0, 1);
    one.models = one.models.filter(m => m.node === GPU1);
    one.devices = one.devices.filter(d => d.node === GPU1);
    one.mode = 'service';
    view.update(withStatus(initialState(), one, 0, 'sse'), 0);
    expect(view.node.querySelector<HTMLElement>('.jp-SwapServe-nodes')!.hidden).toBe(true);
    expect(cardOn(view.node, GPU1, 'smollm2').querySelector<HTMLElement>('.jp-SwapServe-onNode')!.hidden).toBe(true);
    expect(view.node.querySelector('.jp-SwapServe-who')!.textContent).toBe(
      "The node's shared swap service · signed in as bob"
    );
  });
});
