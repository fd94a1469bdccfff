import { LabIcon } from '@jupyterlab/ui-components';

/** Two opposed arrows around a chip: engines moving in and out of GPU memory. */
const svgstr = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M5 5.25h9.5V2.5l5 4-5 4V7.75H5z"/>
    <path d="M19 18.75H9.5v2.75l-5-4 5-4v2.75H19z"/>
    <rect x="10" y="10.25" width="4" height="3.5" rx="0.6"/>
  </g>
</svg>`;

export const swapServeIcon = new LabIcon({ name: 'jupyter-swapserve:icon', svgstr });
