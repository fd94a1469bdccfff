import { IKernelTenant, kernelActions, kernelFacts, kernelLabel, KernelSection } from '../kernels';

const kernel = (extra: Partial<IKernelTenant> = {}): IKernelTenant => ({
  kernel_id: '0123456789abcdef',
  user: 'alice',
  path: 'work/train.ipynb',
  device: 0,
  memory_gib: 1.5,
  state: 'resident',
  busy: false,
  pinned: false,
  last_execution: 1000,
  last_swap_in_seconds: 0.9,
  last_swap_out_seconds: 0.4,
  swaps_in: 1,
  swaps_out: 1,
  error: null,
  ...extra
});

describe('kernels', () => {
  it('names a kernel by its notebook, else by its id', () => {
    expect(kernelLabel(kernel())).toBe('train.ipynb');
    expect(kernelLabel(kernel({ path: '' }))).toBe('kernel 01234567');
  });

  it('states the facts in one line', () => {
    const line = kernelFacts(kernel({ busy: true }), 1180);
    expect(line).toContain('device 0');
    expect(line).toContain('busy');
    expect(line).toContain('restored in');
    expect(line).toContain('last run');
    expect(line).not.toContain('out:');
    const out = kernelFacts(kernel({ state: 'swapped_out', last_swap_out_reason: 'idle for 600 s' }), 1180);
    expect(out).toContain('out: idle for 600 s');
  });

  it("says whose kernel it is to an admin of the shared node, its named server, and an owner that cannot answer", () => {
    const mine = kernelFacts(kernel({ server: '', owner: 'answering' }), 1180, 'alice');
    expect(mine).not.toContain("alice's");
    expect(mine).not.toContain('server');
    const theirs = kernelFacts(kernel({ user: 'bob', server: 'one', owner: 'not answering', node: 'gpu2' }), 1180, 'teacher');
    expect(theirs.startsWith("bob's · server one · ")).toBe(true);
    expect(theirs).toContain('node gpu2');
    expect(theirs).toContain('its server is not answering');
    expect(kernelFacts(kernel({ owner: 'lost' }), 1180, 'alice')).toContain('its server is gone');
    const section = new KernelSection(async () => ({ status: 200, body: {} }));
    section.update([kernel({ user: 'bob' })], 1100, 'teacher');
    expect(section.node.querySelector('.jp-SwapServe-kernelFacts')?.textContent).toContain("bob's");
  });

  it('offers release and pin to a resident kernel, only unpin to a pinned one', () => {
    expect(kernelActions(kernel())).toEqual(['release', 'pin']);
    expect(kernelActions(kernel({ state: 'swapped_out' }))).toEqual(['pin']);
    expect(kernelActions(kernel({ pinned: true }))).toEqual(['unpin']);
  });

  it('lists the kernels, hides when there are none, and posts the action clicked', async () => {
    const calls: Array<[string, string | undefined]> = [];
    const section = new KernelSection(async (path, init) => {
      calls.push([path, init?.method]);
      return { status: 200, body: { result: 'will be swapped out as soon as the cell finishes' } };
    });
    section.update([], 0);
    expect(section.node.hidden).toBe(true);
    section.update([kernel(), kernel({ kernel_id: 'ffff', path: '', state: 'swapped_out' })], 1100);
    expect(section.node.hidden).toBe(false);
    const items = section.node.querySelectorAll('li[data-kernel]');
    expect(items.length).toBe(2);
    expect(items[1].textContent).toContain('swapped out');
    const release = items[0].querySelector('button[data-action="release"]') as HTMLButtonElement;
    release.click();
    await new Promise(resolve => setTimeout(resolve, 0));
    expect(calls).toEqual([['kernels/0123456789abcdef/release', 'POST']]);
    expect(section.node.querySelector('[role="status"]')?.textContent).toBe(
      'train.ipynb: will be swapped out as soon as the cell finishes'
    );
  });

  it('shows the refusal of the server', async () => {
    const section = new KernelSection(async () => ({
      status: 409,
      body: { error: { message: "pinning would exceed the 0 GiB of kernel GPU memory 'alice' may pin" } }
    }));
    await section.act(kernel(), 'pin');
    expect(section.node.querySelector('[role="status"]')?.textContent).toContain('may pin');
  });
});
