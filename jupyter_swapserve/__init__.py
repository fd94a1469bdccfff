"""jupyter-swapserve: many LLMs on few GPUs, hot-swapped on demand, inside Jupyter Server."""

from __future__ import annotations

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict]:
    from .app import SwapServe

    return [{"module": "jupyter_swapserve", "app": SwapServe}]


def _jupyter_labextension_paths() -> list[dict]:
    # lets `jupyter labextension develop` link the sidebar built into jupyter_swapserve/labextension
    return [{"src": "labextension", "dest": "jupyter-swapserve"}]


def load_ipython_extension(ipython) -> None:
    """``%load_ext jupyter_swapserve`` registers the ``%%llm`` magic."""
    from .kernel.magics import load_ipython_extension as _load

    _load(ipython)
