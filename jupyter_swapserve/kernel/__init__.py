"""Code that runs inside a notebook kernel, not in the server: the client of the swap service
(discovery, streaming), the ``%%llm``/``%llm`` and ``%gpu`` magics, and the ipywidgets panels.

Nothing here imports the server side (``service/``, ``handlers/``, ``app``): a kernel talks to the
service only over HTTP."""
