import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';

import { swapServeIcon } from './icon';
import { SwapServePanel } from './widget';

const COMMAND = 'swapserve:open-panel';

/** The SwapServe sidebar: live models, GPU memory, queues and swap latency. */
const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-swapserve:plugin',
  description: 'A sidebar panel of the hot-swapped LLM engines of jupyter-swapserve.',
  autoStart: true,
  optional: [ILayoutRestorer, ICommandPalette],
  activate: (app: JupyterFrontEnd, restorer: ILayoutRestorer | null, palette: ICommandPalette | null) => {
    const panel = new SwapServePanel(app.serviceManager.serverSettings);
    panel.title.caption = 'SwapServe';
    app.shell.add(panel, 'left', { rank: 900 });
    if (restorer) {
      restorer.add(panel, 'jupyter-swapserve');
    }
    app.commands.addCommand(COMMAND, {
      label: 'Show SwapServe Models',
      caption: 'Show the SwapServe panel: models, GPU memory, queues and swap latency',
      icon: swapServeIcon,
      execute: () => app.shell.activateById(panel.id)
    });
    if (palette) {
      palette.addItem({ command: COMMAND, category: 'SwapServe' });
    }
  }
};

export default plugin;
