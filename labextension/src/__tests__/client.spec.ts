import { IEventSourceLike, IHttpResponse, StatusClient } from '../client';
import { IPanelError } from '../state';
import { IStatus } from '../types';
import { status } from './fixtures';

class FakeEventSource implements IEventSourceLike {
  static all: FakeEventSource[] = [];
  readyState = 0;
  onopen: ((ev: any) => any) | null = null;
  onerror: ((ev: any) => any) | null = null;
  closed = false;
  private listeners: Record<string, ((ev: any) => void)[]> = {};
  constructor(public url: string) {
    FakeEventSource.all.push(this);
  }
  addEventListener(type: string, l: (ev: any) => void): void {
    (this.listeners[type] ??= []).push(l);
  }
  close(): void {
    this.closed = true;
    this.readyState = 2;
  }
  emit(doc: unknown): void {
    this.readyState = 1;
    for (const l of this.listeners.status ?? []) {
      l({ data: typeof doc === 'string' ? doc : JSON.stringify(doc) });
    }
  }
  fail(closed: boolean): void {
    this.readyState = closed ? 2 : 0;
    this.onerror?.({});
  }
}

/** Flush pending promise callbacks (the fake request answers asynchronously). */
async function flush(): Promise<void> {
  for (let i = 0; i < 5; i++) {
    await Promise.resolve();
  }
}

function setup(answers: () => IHttpResponse, withSse = true) {
  const calls: { path: string; method: string }[] = [];
  const statuses: { status: IStatus; via: string }[] = [];
  const errors: IPanelError[] = [];
  const client = new StatusClient({
    request: async (path, init) => {
      calls.push({ path, method: init?.method ?? 'GET' });
      return answers();
    },
    eventsUrl: withSse ? '/swapserve/api/events' : null,
    createEventSource: withSse ? url => new FakeEventSource(url) : null,
    onStatus: (s, via) => statuses.push({ status: s, via }),
    onError: e => errors.push(e)
  });
  return { client, calls, statuses, errors };
}

beforeEach(() => {
  jest.useFakeTimers();
  FakeEventSource.all = [];
});

afterEach(() => {
  jest.useRealTimers();
});

describe('StatusClient', () => {
  it('fetches once, then lives on server-sent events without polling', async () => {
    const { client, calls, statuses } = setup(() => ({ status: 200, body: status() }));
    client.start();
    await flush();
    expect(calls.map(c => c.path)).toEqual(['status']);
    expect(FakeEventSource.all).toHaveLength(1);
    FakeEventSource.all[0].emit(status({ version: 2 }));
    expect(client.mode).toBe('sse');
    expect(statuses.map(s => s.via)).toEqual(['poll', 'sse']);
    jest.advanceTimersByTime(10_000);
    await flush();
    expect(calls).toHaveLength(1);
    client.stop();
    expect(FakeEventSource.all[0].closed).toBe(true);
  });

  it('ignores events that are not a status document', async () => {
    const { client, statuses } = setup(() => ({ status: 200, body: status() }));
    client.start();
    await flush();
    FakeEventSource.all[0].emit('not json');
    FakeEventSource.all[0].emit({ hello: 1 });
    expect(statuses).toHaveLength(1);
    client.stop();
  });

  it('falls back to polling at most once a second when events are refused', async () => {
    const { client, calls, statuses } = setup(() => ({ status: 200, body: status() }));
    client.start();
    await flush();
    FakeEventSource.all[0].fail(true);
    expect(FakeEventSource.all[0].closed).toBe(true);
    jest.advanceTimersByTime(0);
    await flush();
    expect(calls).toHaveLength(2);
    for (let i = 0; i < 5; i++) {
      jest.advanceTimersByTime(999);
      await flush();
      const before = calls.length;
      jest.advanceTimersByTime(1);
      await flush();
      expect(calls.length).toBe(before + 1);
    }
    expect(statuses.every(s => s.via === 'poll')).toBe(true);
    expect(client.mode).toBe('poll');
    client.stop();
  });

  it('tries server-sent events again after a while of polling', async () => {
    const { client } = setup(() => ({ status: 200, body: status() }));
    client.start();
    await flush();
    FakeEventSource.all[0].fail(true);
    for (let i = 0; i < 17; i++) {
      jest.advanceTimersByTime(1000);
      await flush();
    }
    expect(FakeEventSource.all).toHaveLength(2);
    FakeEventSource.all[1].emit(status());
    expect(client.mode).toBe('sse');
    client.stop();
  });

  it('polls while the stream reconnects and stops once it is back', async () => {
    const { client, calls } = setup(() => ({ status: 200, body: status() }));
    client.start();
    await flush();
    const es = FakeEventSource.all[0];
    es.emit(status());
    es.fail(false); // the browser reconnects by itself
    expect(es.closed).toBe(false);
    jest.advanceTimersByTime(0);
    await flush();
    const n = calls.length;
    expect(n).toBe(2);
    es.emit(status({ version: 9 }));
    jest.advanceTimersByTime(5000);
    await flush();
    expect(calls.length).toBe(n);
    client.stop();
  });

  it('reports 403 and backs off while the server refuses', async () => {
    const { client, calls, errors } = setup(() => ({
      status: 403,
      body: { error: { message: "User 'bob' may not read swapserve." } }
    }), false);
    client.start();
    await flush();
    expect(errors[0].kind).toBe('forbidden');
    expect(errors[0].message).toContain("User 'bob' may not read swapserve.");
    // backoff: 1 s, 2 s, 4 s, …, 10 s at most
    const times: number[] = [];
    let t = 0;
    for (let i = 0; i < 40; i++) {
      const before = calls.length;
      jest.advanceTimersByTime(1000);
      t += 1000;
      await flush();
      if (calls.length > before) {
        times.push(t);
      }
    }
    const gaps = times.slice(1).map((x, i) => x - times[i]);
    expect(gaps[0]).toBeGreaterThanOrEqual(2000);
    expect(Math.max(...gaps)).toBeLessThanOrEqual(10_000);
    client.stop();
  });

  it('reports an unreachable server when the request throws', async () => {
    const errors: IPanelError[] = [];
    const client = new StatusClient({
      request: () => Promise.reject(new TypeError('Failed to fetch')),
      eventsUrl: null,
      createEventSource: null,
      onStatus: () => undefined,
      onError: e => errors.push(e)
    });
    client.start();
    await flush();
    expect(errors[0].kind).toBe('unreachable');
    client.stop();
  });

  it('flags an answer that is not the status (a proxy page)', async () => {
    const { client, errors } = setup(() => ({ status: 200, body: '<html>login</html>' }), false);
    client.start();
    await flush();
    expect(errors[0].kind).toBe('bad-response');
    client.stop();
  });

  it('drops a poll answer that is older than an event', async () => {
    let resolve: (r: IHttpResponse) => void = () => undefined;
    const statuses: IStatus[] = [];
    const client = new StatusClient({
      request: () => new Promise(r => (resolve = r)),
      eventsUrl: '/events',
      createEventSource: url => new FakeEventSource(url),
      onStatus: s => statuses.push(s),
      onError: () => undefined
    });
    client.start();
    FakeEventSource.all[0].emit(status({ version: 5 }));
    resolve({ status: 200, body: status({ version: 4 }) });
    await flush();
    expect(statuses.map(s => s.version)).toEqual([5]);
    client.stop();
  });

  it('posts swaps and classifies their errors', async () => {
    let answer: IHttpResponse = { status: 200, body: { model: 'gemma', swapped: true, state: 'running', seconds: 0.3 } };
    const { client, calls } = setup(() => answer, false);
    const ok = await client.swap('gemma', 'swap-in');
    expect(calls[0]).toEqual({ path: 'models/gemma/swap-in', method: 'POST' });
    expect(ok).toEqual({ result: { model: 'gemma', swapped: true, state: 'running', seconds: 0.3 } });
    answer = { status: 404, body: { error: { message: 'Not Found' } } };
    const missing = await client.swap('a/b', 'swap-out');
    expect(calls[1].path).toBe('models/a%2Fb/swap-out');
    expect('error' in missing && missing.error.message).toBe("Model 'a/b' is not known to the server (404).");
    answer = { status: 409, body: { error: { message: "model 'gemma' is pinned" } } };
    const refused = await client.swap('gemma', 'swap-out');
    expect('error' in refused && refused.error.message).toBe("The server answered 409: model 'gemma' is pinned.");
  });
});

describe('prefetch ("Use now")', () => {
  it("posts to the model's prefetch route each time it is asked and returns the outcome", async () => {
    const { client, calls } = setup(() => ({ status: 202, body: { model: 'a b', prefetch: 'starting' } }), false);
    expect(await client.prefetch('a b')).toEqual({ prefetch: 'starting' });
    expect(await client.prefetch('a b')).toEqual({ prefetch: 'starting' });
    expect(calls).toEqual([
      { path: 'models/a%20b/prefetch', method: 'POST' },
      { path: 'models/a%20b/prefetch', method: 'POST' }
    ]);
  });

  it('never throws: a refused or failed request is an error to show', async () => {
    const { client } = setup(() => ({ status: 404, body: { error: { message: 'no such model' } } }), false);
    const refused = await client.prefetch('nope');
    expect('error' in refused && refused.error.message).toBe('Not found (404): no such model');
    const failing = new StatusClient({
      request: async () => {
        throw new Error('network down');
      },
      eventsUrl: null,
      createEventSource: null,
      onStatus: () => undefined,
      onError: () => undefined
    });
    const failed = await failing.prefetch('m');
    expect('error' in failed && failed.error.kind).toBe('unreachable');
  });
});
