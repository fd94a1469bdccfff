/**
 * The JSON documents of the swapserve server API (GET /swapserve/api/status, the `status`
 * server-sent event, POST /swapserve/api/models/<name>/swap-in|swap-out).
 */

import type { IKernelTenant } from './kernels';

export type ModelState =
  | 'stopped'
  | 'starting'
  | 'running'
  | 'swapping_out'
  | 'swapped_out'
  | 'swapping_in'
  | 'failed';

export interface IWaiting {
  model: string;
  gib: number;
}

export interface IDevice {
  index: number;
  name: string;
  kind: 'nvidia' | 'virtual' | string;
  capacity_gib: number;
  reserved_gib: number;
  free_gib: number;
  used_gib: number | null;
  waiting: IWaiting[];
  /** client mode with several nodes: the node service that has this device (device 0 is on every node) */
  node?: string;
}

export interface ISwapSample {
  t: number;
  seconds: number;
}

export interface IStep {
  step: string;
  seconds: number;
  ok: boolean;
}

export interface IModel {
  name: string;
  engine: string;
  runtime?: string;
  api?: string;
  state: ModelState | string;
  device: number;
  device_kind?: string;
  memory_gib: number | null;
  reserved_gib?: number;
  queue_depth: number;
  in_flight: number;
  max_queue?: number | null;
  pinned?: boolean;
  last_swap_in_seconds: number | null;
  last_swap_out_seconds: number | null;
  last_cold_start_seconds?: number | null;
  /** the scheduler's last activity: requests, but also start-up and swap-ins */
  last_used: number | null;
  /** when a request was last served (unix seconds); null: never. Absent from older servers. */
  last_request?: number | null;
  /** what a swapped-out engine keeps reserved on its device (GiB) */
  residual_gib?: number;
  swaps_in?: number;
  swaps_out?: number;
  requests?: number;
  swap_in_history?: ISwapSample[];
  last_steps?: IStep[];
  error?: string | null;
  /** client mode: the node service that serves this model (the same name may be on several nodes) */
  node?: string;
}

/** Client mode: one node service of the hub, as the user's server sees it (service/nodes.py). */
export interface INode {
  name: string;
  url?: string;
  /** whether its event stream answers now */
  up: boolean;
  /** why not, while it is down */
  error?: string | null;
  /** since when (unix seconds) it is up, or down */
  since?: number;
  /** the models it offers */
  models: string[];
  devices?: number;
}

export interface IStatus {
  version: number;
  /** how swaps move memory; client mode with nodes that differ: one per node */
  checkpointer?: string | Record<string, string | null>;
  devices: IDevice[];
  models: IModel[];
  /** notebook kernels holding GPU memory (a standalone server's own, or on the shared service a user's own; an admin's: all) */
  kernels?: IKernelTenant[];
  config_errors?: string[];
  /** who looks, and whether they administer the service (manual swaps, quotas) */
  user?: { name?: string | null; admin?: boolean } | null;
  /** 'service': the node's shared swap service (JupyterHub); 'standalone': this server's own engines */
  mode?: 'standalone' | 'service' | string;
  /** client mode: the node services this server forwards to, up or down */
  nodes?: INode[];
}

/** Which model a button is about: its name, and the node that serves it (client mode). */
export interface IModelRef {
  name: string;
  node?: string;
}

/** The key of a model's row, pending request and message: a name is unique only on its node. */
export function modelKey(m: IModelRef): string {
  return m.node ? `${m.node}/${m.name}` : m.name;
}

/** The key of a device's row: every node has a device 0. */
export function deviceKey(d: { index: number; node?: string }): string {
  return d.node ? `${d.node}/${d.index}` : String(d.index);
}

export interface ISwapResult {
  model: string;
  swapped: boolean;
  state: string;
  seconds?: number;
  reason?: string;
}

/** The error body of every swapserve route (OpenAI's shape). */
export interface IErrorBody {
  error: { message: string; type?: string; param?: string | null; code?: string | null };
}

export type SwapAction = 'swap-in' | 'swap-out';

/** What a card's buttons do: admins swap by hand; every user may ask for a model ahead of need. */
export type CardAction = SwapAction | 'prefetch';
