/**
 * The sidebar's status fixtures against the server's status schema
 * (jupyter_swapserve/schema/status.schema.json, checked against the live status by
 * tests/test_status_schema.py): whatever a fixture says, a server could say. The fixtures give only
 * the fields the sidebar reads, so the schema's `required` lists are left out here; every type,
 * enum and bound stays (a checkpointer 'driver', a state or a device kind the server never sends,
 * fails). The complete server response the browser tests serve is checked in full by
 * tests/test_status_schema.py.
 */
// ajv comes with JupyterLab's settings registry (yarn.lock pins it); the sidebar itself needs no validator
import Ajv2020 from 'ajv/dist/2020';

import { model, status } from './fixtures';

declare const __dirname: string;
const fs = jest.requireActual<{ readFileSync(path: string, encoding: string): string }>('fs');
const path = jest.requireActual<{ join(...parts: string[]): string }>('path');

const SCHEMA_PATH = path.join(__dirname, '..', '..', '..', 'jupyter_swapserve', 'schema', 'status.schema.json');

/** The schema with every `required` list removed, at any depth. */
function withoutRequired(node: unknown): unknown {
  if (Array.isArray(node)) {
    return node.map(withoutRequired);
  }
  if (node !== null && typeof node === 'object') {
    const out: Record<string, unknown> = {};
    for (const [key, value] of Object.entries(node as Record<string, unknown>)) {
      if (key !== 'required') {
        out[key] = withoutRequired(value);
      }
    }
    return out;
  }
  return node;
}

const schema = JSON.parse(fs.readFileSync(SCHEMA_PATH, 'utf-8')) as Record<string, unknown>;
const validate = new Ajv2020({ allErrors: true, strict: false }).compile(withoutRequired(schema) as object);

function errors(data: unknown): string[] {
  return validate(data) ? [] : (validate.errors ?? []).map(e => `${e.instancePath} ${e.message}`);
}

describe('status fixtures', () => {
  it('say only what the server could say', () => {
    expect(errors(status())).toEqual([]);
    expect(errors(status({ checkpointer: 'cuda-driver' }))).toEqual([]);
    for (const state of ['starting', 'running', 'swapping_out', 'swapped_out', 'swapping_in', 'failed', 'stopped']) {
      expect(errors(status({ models: [model({ state })] }))).toEqual([]);
    }
  });

  it('are checked for real: drift is caught', () => {
    expect(errors(status({ checkpointer: 'driver' }))).not.toEqual([]);
    expect(errors(status({ models: [model({ state: 'sleeping' })] }))).not.toEqual([]);
    expect(errors(status({ models: [model({ queue_depth: -1 })] }))).not.toEqual([]);
  });
});
