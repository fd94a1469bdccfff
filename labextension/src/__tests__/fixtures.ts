import { IModel, IStatus } from '../types';

export function model(over: Partial<IModel> = {}): IModel {
  return {
    name: 'gemma',
    engine: 'llamacpp',
    runtime: 'process',
    api: 'completion',
    state: 'swapped_out',
    device: 0,
    device_kind: 'virtual',
    memory_gib: 0.6,
    reserved_gib: 0,
    queue_depth: 0,
    in_flight: 0,
    max_queue: 64,
    pinned: false,
    last_swap_in_seconds: null,
    last_swap_out_seconds: 0.08,
    last_cold_start_seconds: 2.5,
    last_used: null,
    swaps_in: 0,
    swaps_out: 1,
    requests: 0,
    swap_in_history: [],
    last_steps: [],
    error: null,
    ...over
  };
}

export function status(over: Partial<IStatus> = {}): IStatus {
  return {
    version: 1,
    checkpointer: 'none',
    devices: [
      {
        index: 0,
        name: 'demo (virtual, CPU)',
        kind: 'virtual',
        capacity_gib: 1.0,
        reserved_gib: 0.5,
        free_gib: 0.5,
        used_gib: null,
        waiting: []
      }
    ],
    models: [
      model(),
      model({ name: 'smollm2', api: 'chat', state: 'running', memory_gib: 0.5, reserved_gib: 0.5 })
    ],
    config_errors: [],
    user: { name: 'tester' },
    ...over
  };
}
