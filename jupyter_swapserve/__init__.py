"""jupyter-swapserve: many LLMs on few GPUs, hot-swapped on demand, inside Jupyter Server."""

from __future__ import annotations

from typing import Any

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


# ---- in a notebook kernel (kernel/): the OpenAI client on the swap route, found like %%llm finds it ----
def openai_client(url: str | None = None, token: str | None = None, **kwargs: Any) -> Any:
    """An ``openai.OpenAI`` client of the swap service this kernel reaches (see kernel/openai_client.py)."""
    from .kernel.openai_client import openai_client as make

    return make(url, token, **kwargs)


def async_openai_client(url: str | None = None, token: str | None = None, **kwargs: Any) -> Any:
    """An ``openai.AsyncOpenAI`` client of the swap service this kernel reaches."""
    from .kernel.openai_client import async_openai_client as make

    return make(url, token, **kwargs)


def connection(url: str | None = None, token: str | None = None) -> Any:
    """The swap service this kernel reaches: ``base_url``, ``token``, ``api_url``."""
    from .kernel.openai_client import connection as find

    return find(url, token)
